//! Agent labels: `key = value` pairs that say what an agent is
//! (`role = "web"`, `region = "eu"`), set in its config, completed with
//! facts every agent reports (`os`, `arch`, `hostname`, `kernel`,
//! `contactd_version`), and pinned per identity by the server. Selectors
//! ([`crate::selector`]) target agents by them.
//!
//! Keys and values follow Kubernetes' label rules, which operators already
//! know: a key is a name of at most 63 characters (`[A-Za-z0-9]`, and
//! `.`, `_`, `-` inside), optionally after a lowercase DNS prefix and a
//! slash (`example.com/role`, prefix at most 253 characters); a value is empty or
//! a name of at most 63 characters. So labels travel in one header
//! (`x-contactd-labels: role=web,region=eu`) with no escaping, and a
//! selector can never be ambiguous about where a key or value ends.

use std::{collections::BTreeMap, fmt, sync::Arc};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// The header an agent sends its labels in, on every call.
pub const LABELS_HEADER: &str = "x-contactd-labels";

/// Most labels one agent may carry (its own, facts and pinned together).
pub const MAX_LABELS: usize = 64;

/// Longest labels header the server reads: 64 labels of a short key and
/// value fit; a longer header is refused before anything is kept.
pub const MAX_HEADER: usize = 4096;

/// Longest name part of a key, and longest value.
pub const MAX_NAME: usize = 63;

/// The facts every agent reports, by key.
pub const FACTS: [&str; 5] = ["os", "arch", "hostname", "kernel", "contactd_version"];

/// Why a label (or a labels header) is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error(
        "label key {key:?} is not valid ({reason}): expected a name of 1 to {MAX_NAME} \
         letters, digits, '.', '_' or '-' (starting and ending with a letter or digit), \
         optionally after a lowercase DNS prefix and '/' (example.com/role)"
    )]
    Key { key: String, reason: String },
    #[error(
        "label value {value:?} (of {key}) is not valid ({reason}): expected at most \
         {MAX_NAME} letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
    )]
    Value {
        key: String,
        value: String,
        reason: String,
    },
    #[error("too many labels: {0}, at most {MAX_LABELS}")]
    TooMany(usize),
    #[error("the labels header is {0} bytes, at most {MAX_HEADER}")]
    TooLong(usize),
    #[error("{0:?} in the labels header is not KEY=VALUE")]
    NotAPair(String),
    #[error("label {0} is given twice")]
    Twice(String),
}

/// Whether `key` is a valid label key: the rules selectors read keys with
/// ([`crate::selector::check_label_key`]), so every label can be selected.
#[must_use]
pub fn valid_key(key: &str) -> bool {
    crate::selector::check_label_key(key).is_ok()
}

/// Whether `value` is a valid label value (empty, or a name), by the rules
/// selectors read values with.
#[must_use]
pub fn valid_value(value: &str) -> bool {
    crate::selector::check_value(value).is_ok()
}

/// Makes a valid label value of a fact read from the system (a kernel
/// release such as `6.1.21-v8+`, a long host name): characters a value
/// cannot hold become `_`, the ends are trimmed to a letter or digit, and
/// it is cut to [`MAX_NAME`] bytes.
#[must_use]
pub fn fact_value(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// An agent's labels, by key (sorted, so that they print and compare the
/// same wherever they come from).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// No labels.
    #[must_use]
    pub fn new() -> Labels {
        Labels::default()
    }

    /// The labels a header carries (`role=web,region=eu`; spaces around
    /// pairs are allowed; empty: none).
    ///
    /// # Errors
    /// A header over [`MAX_HEADER`] bytes, a pair that is not `KEY=VALUE`,
    /// an invalid key or value, a key given twice, more than
    /// [`MAX_LABELS`] labels.
    pub fn from_header(header: &str) -> Result<Labels, LabelError> {
        if header.len() > MAX_HEADER {
            return Err(LabelError::TooLong(header.len()));
        }
        let mut labels = BTreeMap::new();
        for pair in header.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| LabelError::NotAPair(pair.to_owned()))?;
            let (key, value) = (key.trim(), value.trim());
            check(key, value)?;
            if labels.insert(key.to_owned(), value.to_owned()).is_some() {
                return Err(LabelError::Twice(key.to_owned()));
            }
            if labels.len() > MAX_LABELS {
                return Err(LabelError::TooMany(labels.len()));
            }
        }
        Ok(Labels(labels))
    }

    /// The header value that carries these labels.
    #[must_use]
    pub fn to_header(&self) -> String {
        self.to_string()
    }

    /// The value of label `key`.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Sets label `key` (already checked by the caller).
    pub fn insert(&mut self, key: String, value: String) {
        self.0.insert(key, value);
    }

    /// The labels, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many labels there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn check(key: &str, value: &str) -> Result<(), LabelError> {
    crate::selector::check_label_key(key).map_err(|e| LabelError::Key {
        key: key.to_owned(),
        reason: e.message,
    })?;
    crate::selector::check_value(value).map_err(|e| LabelError::Value {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: e.message,
    })
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = LabelError;

    fn try_from(map: BTreeMap<String, String>) -> Result<Labels, LabelError> {
        if map.len() > MAX_LABELS {
            return Err(LabelError::TooMany(map.len()));
        }
        for (key, value) in &map {
            check(key, value)?;
        }
        Ok(Labels(map))
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(labels: Labels) -> BTreeMap<String, String> {
        labels.0
    }
}

impl FromIterator<(String, String)> for Labels {
    /// Labels from pairs already checked (facts made by [`fact_value`]).
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Labels {
        Labels(pairs.into_iter().collect())
    }
}

impl crate::selector::Labels for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

/// An agent's labels in force, shared by its caller entry (which changes
/// them when it reconnects or a reload pins others) and its streams (which
/// match task selectors against them).
pub type LabelCell = Arc<ArcSwap<Labels>>;

/// A pinned label the agent claimed otherwise: the pin is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub key: String,
    pub claimed: String,
    pub pinned: String,
}

/// `claimed` with `pinned` in force over it, and the claims that differed
/// from a pin.
#[must_use]
pub fn pin(claimed: &Labels, pinned: &Labels) -> (Labels, Vec<Conflict>) {
    let mut labels = claimed.clone();
    let mut conflicts = Vec::new();
    for (key, value) in pinned.iter() {
        if let Some(said) = claimed.get(key).filter(|said| *said != value) {
            conflicts.push(Conflict {
                key: key.to_owned(),
                claimed: said.to_owned(),
                pinned: value.to_owned(),
            });
        }
        labels.insert(key.to_owned(), value.to_owned());
    }
    (labels, conflicts)
}

/// `role=web,region=eu`: the header's form.
impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_follow_kubernetes_rules() {
        for key in [
            "role",
            "a",
            "example.com/role",
            "app.kubernetes.io/name",
            "a-b_c.d",
        ] {
            assert!(valid_key(key), "{key}");
        }
        for key in [
            "",
            "-a",
            "a-",
            "a b",
            "role=",
            "/role",
            "example.com/",
            "Example.com/role",
            "ex_ample.com/role",
            "é",
            &"a".repeat(64),
        ] {
            assert!(!valid_key(key), "{key:?}");
        }
        for value in ["", "web", "6.1.0-18-amd64", &"v".repeat(63)] {
            assert!(valid_value(value), "{value}");
        }
        for value in ["-web", "web-", "a b", "x,y", "a=b", &"v".repeat(64)] {
            assert!(!valid_value(value), "{value:?}");
        }
    }

    #[test]
    fn the_header_round_trips_and_is_bounded() {
        let labels = Labels::from_header(" role=web , region=eu,canary=").unwrap();
        assert_eq!(labels.to_header(), "canary=,region=eu,role=web");
        assert_eq!(Labels::from_header(&labels.to_header()).unwrap(), labels);
        assert_eq!(labels.get("role"), Some("web"));
        assert!(Labels::from_header("").unwrap().is_empty());
        assert!(matches!(
            Labels::from_header("role"),
            Err(LabelError::NotAPair(_))
        ));
        assert!(matches!(
            Labels::from_header("role=web,role=api"),
            Err(LabelError::Twice(_))
        ));
        assert!(matches!(
            Labels::from_header("role=we b"),
            Err(LabelError::Value { .. })
        ));
        let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("k{i}=v")).collect();
        assert!(matches!(
            Labels::from_header(&many.join(",")),
            Err(LabelError::TooMany(_))
        ));
        let long = format!("k={}", "v".repeat(MAX_HEADER));
        assert!(matches!(
            Labels::from_header(&long),
            Err(LabelError::TooLong(_))
        ));
    }

    #[test]
    fn pins_are_in_force_over_claims_and_conflicts_are_named() {
        let claimed = Labels::from_header("role=db,region=eu,os=linux").unwrap();
        let pinned = Labels::from_header("role=web,zone=a").unwrap();
        let (labels, conflicts) = pin(&claimed, &pinned);
        assert_eq!(labels.to_header(), "os=linux,region=eu,role=web,zone=a");
        assert_eq!(
            conflicts,
            vec![Conflict {
                key: "role".into(),
                claimed: "db".into(),
                pinned: "web".into()
            }]
        );
        let (_, none) = pin(&Labels::from_header("role=web").unwrap(), &pinned);
        assert!(none.is_empty());
    }

    #[test]
    fn facts_become_valid_values() {
        assert_eq!(fact_value("6.1.21-v8+"), "6.1.21-v8");
        assert_eq!(fact_value("my host"), "my_host");
        assert_eq!(fact_value(&"h".repeat(100)).len(), MAX_NAME);
        assert_eq!(fact_value("--"), "");
        for raw in ["6.1.21-v8+", "my host", "x86_64", "node-1.example.com"] {
            assert!(valid_value(&fact_value(raw)), "{raw}");
        }
    }
}
