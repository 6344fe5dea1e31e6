//! Where a config comes from ([`Source`]: which decides whether a missing
//! file is an error, and loads or reloads it), and how configs are shown:
//! the keys a reload changed ([`changed_keys`], [`shown_keys`]) and the
//! TOML `check-config` prints ([`to_toml`]).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{ConfigError, ConfigFile, load};

/// Where a config comes from, which decides whether a missing file is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Named by `--config` or `$CONTACTD_CONFIG`: it must exist.
    Given(PathBuf),
    /// The default path: if it is absent, built-in defaults are used.
    Default(PathBuf),
}

impl Source {
    /// `given` if set, else `default`.
    pub fn new(given: Option<PathBuf>, default: &str) -> Source {
        given.map_or_else(|| Source::Default(PathBuf::from(default)), Source::Given)
    }

    /// The path this source names.
    pub fn path(&self) -> &Path {
        match self {
            Source::Given(path) | Source::Default(path) => path,
        }
    }

    /// Loads the config; `Ok(None)` means the default file is absent and
    /// built-in defaults apply.
    ///
    /// # Errors
    /// A file that cannot be read, or has problems.
    pub fn load<T: ConfigFile>(&self) -> Result<Option<T>, ConfigError> {
        match (self, load(self.path())) {
            (Source::Default(_), Err(ConfigError::Read { source, .. }))
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            (_, result) => result.map(Some),
        }
    }

    /// Loads the config, or the built-in defaults if the default file is
    /// absent; the flag says whether a file was read.
    ///
    /// # Errors
    /// A file that cannot be read, or has problems.
    pub fn load_or_default<T: ConfigFile>(&self) -> Result<(T, bool), ConfigError> {
        let loaded = self.load::<T>()?;
        let found = loaded.is_some();
        Ok((loaded.unwrap_or_default(), found))
    }

    /// Loads the config for a reload: on problems, logs each on its own
    /// line (one journal entry each) and returns `None`, so the config in
    /// force stays.
    pub fn reload<T: ConfigFile>(&self) -> Option<T> {
        match self.load_or_default::<T>() {
            Ok((config, _)) => Some(config),
            Err(e) => {
                for (i, line) in e.to_string().lines().enumerate() {
                    if i == 0 {
                        tracing::error!("config reload failed, keeping the current config: {line}");
                    } else {
                        tracing::error!("{line}");
                    }
                }
                None
            }
        }
    }
}

/// The dotted keys whose values differ between `old` and `new`, sorted
/// (a key on one side only counts as changed): what a reload's log line
/// names. Values are not shown (a token file path is harmless, but the
/// line is about which settings moved).
pub fn changed_keys<T: Serialize>(old: &T, new: &T) -> Vec<String> {
    fn diff(prefix: &str, old: &toml::Value, new: &toml::Value, keys: &mut Vec<String>) {
        match (old, new) {
            (toml::Value::Table(a), toml::Value::Table(b)) => {
                let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for name in names {
                    let key = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    match (a.get(name), b.get(name)) {
                        (Some(x), Some(y)) => diff(&key, x, y, keys),
                        _ => keys.push(key),
                    }
                }
            }
            _ if old != new => keys.push(prefix.to_owned()),
            _ => {}
        }
    }
    let (Ok(old), Ok(new)) = (toml::Value::try_from(old), toml::Value::try_from(new)) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    diff("", &old, &new, &mut keys);
    keys
}

/// [`changed_keys`] for a log field: comma-separated, or `none`.
pub fn shown_keys(keys: &[String]) -> String {
    if keys.is_empty() {
        "none".to_owned()
    } else {
        keys.join(",")
    }
}

/// A config as TOML, as `check-config` prints it.
pub fn to_toml<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).expect("configs serialize to TOML")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn changed_keys_name_what_moved_and_nothing_else() {
        let old = Config::default();
        assert!(changed_keys(&old, &old).is_empty());
        let mut new = old.clone();
        new.tasks.batch += 1;
        new.log.level = "debug".into();
        new.store.path = Some("/tmp/x.db".into());
        assert_eq!(
            changed_keys(&old, &new),
            ["log.level", "store.path", "tasks.batch"]
        );
        assert_eq!(
            shown_keys(&changed_keys(&old, &new)),
            "log.level,store.path,tasks.batch"
        );
        assert_eq!(shown_keys(&[]), "none");
    }
}
