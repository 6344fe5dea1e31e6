//! Reading a config file and turning every problem in it into a [`Problem`]
//! that names the file, line, column, key and what is expected.
//!
//! serde stops at the first error, but an operator wants every problem at
//! once. So the file is parsed once into a spanned table, and deserialized
//! repeatedly: each failure is recorded and the offending key removed, until
//! what remains deserializes (its missing keys fall back to their defaults).
//! Then the semantic checks of [`ConfigFile::validate`] run on the result.

use std::{fmt, ops::Range, path::Path};

use serde::de::DeserializeOwned;
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

/// A config file type: deserializable with defaults, and able to check
/// what types alone cannot.
pub trait ConfigFile: DeserializeOwned + Default {
    /// Every semantic problem, as (dotted key, message) pairs.
    fn validate(&self) -> Vec<(String, String)>;

    /// What is valid but unsafe: printed by `check-config` and logged at
    /// start-up.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column of the offending key or value, when known.
    pub position: Option<(usize, usize)>,
    /// The dotted key (`tasks.interval`), when known.
    pub key: Option<String>,
    /// What is wrong and what is expected.
    pub message: String,
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but has problems; all of them are listed.
    #[error("{}", display_problems(.path, .problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

fn display_problems(path: &str, problems: &[Problem]) -> String {
    let count = problems.len();
    let mut out = format!(
        "{path}: {count} problem{} in config file",
        if count == 1 { "" } else { "s" }
    );
    for problem in problems {
        out.push('\n');
        out.push_str(&ProblemAt { path, problem }.to_string());
    }
    out
}

struct ProblemAt<'a> {
    path: &'a str,
    problem: &'a Problem,
}

impl fmt::Display for ProblemAt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path)?;
        if let Some((line, column)) = self.problem.position {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(key) = &self.problem.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.problem.message)
    }
}

/// Reads and checks the config file at `path`.
///
/// # Errors
/// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Invalid`]
/// with every problem found otherwise.
pub fn load<T: ConfigFile>(path: &Path) -> Result<T, ConfigError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: display.clone(),
        source,
    })?;
    parse(&text).map_err(|problems| ConfigError::Invalid {
        path: display,
        problems,
    })
}

/// Parses and checks config text.
///
/// # Errors
/// Every problem found, in file order.
pub fn parse<T: ConfigFile>(text: &str) -> Result<T, Vec<Problem>> {
    let (mut table, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        return Err(syntax_errors
            .iter()
            .map(|e| Problem {
                position: e.span().map(|s| position(text, s.start)),
                key: None,
                message: one_line(e.message()),
            })
            .collect());
    }

    let mut problems = Vec::new();
    // Each failed round removes one entry, so this ends; the bound is a guard.
    let value = loop {
        match T::deserialize(toml::de::Deserializer::from(table.clone())) {
            Ok(value) => break Some(value),
            Err(e) => {
                let span = e.span();
                let key = span.clone().and_then(|s| remove_entry_at(&mut table, &s));
                let removed = key.is_some();
                problems.push(Problem {
                    position: span.map(|s| position(text, s.start)),
                    key,
                    message: one_line(e.message()),
                });
                if !removed || problems.len() > 1000 {
                    break None;
                }
            }
        }
    };
    if let Some(value) = &value {
        for (key, message) in value.validate() {
            let span = locate(&table, &key);
            problems.push(Problem {
                position: span.map(|s| position(text, s.start)),
                key: Some(key),
                message,
            });
        }
    }
    match value {
        Some(value) if problems.is_empty() => Ok(value),
        _ => {
            problems.sort_by_key(|p| p.position);
            Err(problems)
        }
    }
}

/// Removes the innermost key/value entry whose key or value covers `span`,
/// returning its dotted key. (A `[section]` table's own span is only its
/// header, so every table is searched, not only those covering the span.)
fn remove_entry_at(table: &mut Spanned<DeTable<'_>>, span: &Range<usize>) -> Option<String> {
    fn find(table: &DeTable<'_>, span: &Range<usize>) -> Option<Vec<String>> {
        let covers = |s: Range<usize>| s.start <= span.start && span.end <= s.end.max(s.start + 1);
        table.iter().find_map(|(k, v)| {
            let name = k.get_ref().to_string();
            if let DeValue::Table(inner) = v.get_ref()
                && let Some(mut path) = find(inner, span)
            {
                path.insert(0, name);
                return Some(path);
            }
            (covers(k.span()) || covers(v.span())).then(|| vec![name])
        })
    }
    let path = find(table.get_ref(), span)?;
    let mut current = table.get_mut();
    for part in &path[..path.len() - 1] {
        match current.get_mut(part.as_str()).map(|v| v.get_mut()) {
            Some(DeValue::Table(inner)) => current = inner,
            _ => return None,
        }
    }
    current.remove(path[path.len() - 1].as_str())?;
    Some(path.join("."))
}

/// The span of the value at a dotted key, or of the nearest enclosing table.
fn locate(table: &Spanned<DeTable<'_>>, key: &str) -> Option<Range<usize>> {
    let mut current = table.get_ref();
    let mut found = None;
    for part in key.split('.') {
        let Some((k, v)) = current.get_key_value(part) else {
            break;
        };
        found = Some(if part == key.rsplit('.').next()? {
            v.span()
        } else {
            k.span()
        });
        match v.get_ref() {
            DeValue::Table(inner) => current = inner,
            _ => break,
        }
    }
    found
}

fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn one_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        section: Section,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Section {
        count: u32,
        name: String,
    }

    impl ConfigFile for Demo {
        fn validate(&self) -> Vec<(String, String)> {
            if self.section.count > 10 {
                vec![("section.count".into(), "must be at most 10".into())]
            } else {
                vec![]
            }
        }
    }

    #[test]
    fn reports_every_problem_with_positions() {
        let text = "[section]\ncount = \"many\"\nbogus = 1\nname = 5\n";
        let problems = parse::<Demo>(text).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_deref()).collect();
        assert_eq!(
            keys,
            [
                Some("section.count"),
                Some("section.bogus"),
                Some("section.name")
            ]
        );
        assert_eq!(problems[0].position, Some((2, 9)));
        assert_eq!(problems[1].position, Some((3, 1)));
        assert!(
            problems[1].message.contains("unknown field"),
            "{problems:?}"
        );
    }

    #[test]
    fn semantic_problems_are_located() {
        let problems = parse::<Demo>("\n[section]\n  count = 11\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].position, Some((3, 11)));
        assert_eq!(problems[0].message, "must be at most 10");
    }

    #[test]
    fn syntax_errors_stop_early_with_a_position() {
        let problems = parse::<Demo>("[section\ncount = 1\n").unwrap_err();
        assert!(problems[0].position.is_some(), "{problems:?}");
    }
}
