//! `[log]`: what is logged and where, with its checks (shared by the
//! server's file and the agent's), and the filter directives of
//! `log.level` (and `RUST_LOG`), checked here so that `check-config` and the
//! logger read them the same way.

use std::path::PathBuf;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::Targets;

use super::{Checks, ranges, units};

/// `[log]`: what is logged and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A level and `target=level` directives (`"info"`, `"info,contactd::server=debug"`);
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// Line format.
    pub format: LogFormat,
    /// Whether to log to stderr (the journal, under systemd).
    pub stderr: bool,
    /// A log file, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// How the file rotates.
    pub rotation: Rotation,
    /// With `rotation = "size"`: the size at which the file rotates.
    #[serde(with = "units::size")]
    pub max_size: ByteSize,
    /// With `rotation = "size"`: rotated files kept (`.1` … `.N`).
    pub backups: usize,
    /// With `rotation = "daily"` or `"hourly"`: rotated files kept.
    pub keep: usize,
    /// Events whose message contains one of these substrings are dropped.
    pub exclude: Vec<String>,
    /// Lines each writer buffers; beyond, lines are dropped and counted
    /// rather than slowing the server down.
    pub buffer_lines: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
            stderr: true,
            file: None,
            rotation: Rotation::Size,
            max_size: ByteSize::mib(10),
            backups: 2,
            keep: 7,
            exclude: Vec::new(),
            buffer_lines: 16_384,
        }
    }
}

impl LogConfig {
    /// Range checks, something to log to, and a usable `level`; the same
    /// for the server's file and the agent's.
    pub(crate) fn check(&self, c: &mut Checks) {
        use ranges::*;
        c.check(
            self.stderr || self.file.is_some(),
            "log.stderr",
            "is false and no log.file is set: nothing would be logged",
        );
        c.size("log.max_size", self.max_size, LOG_MAX_SIZE);
        c.count("log.backups", self.backups as u64, LOG_BACKUPS);
        c.count("log.keep", self.keep as u64, LOG_KEEP);
        c.count("log.buffer_lines", self.buffer_lines as u64, BUFFER_LINES);
        if let Some(problem) = filter_problem(&self.level) {
            c.check(false, "log.level", problem);
        }
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `log.rotation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    /// By size: `max_size`, `backups`.
    Size,
    /// At every UTC midnight: `keep`.
    Daily,
    /// At every UTC hour: `keep`.
    Hourly,
}

/// Filter directives: a default level and `target=level` pairs, as in
/// `"info"` or `"warn,contactd=debug"`. (tracing-subscriber's `Targets`: the
/// span and field filters of its `EnvFilter` would bring a regex engine into
/// every build, for directives an operator of a daemon does not need.)
///
/// # Errors
/// Words that are not such directives, or no directive at all.
pub fn parse_filter(directives: &str) -> Result<Targets, String> {
    // `Targets` itself lets odd text through (`"="` parses), so each
    // directive is checked first.
    let mut any = false;
    for directive in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        any = true;
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target), level),
            None => (None, directive),
        };
        if let Some(target) = target {
            let ok = target.split("::").all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            });
            if !ok {
                return Err(format!("bad target {target:?} in {directive:?}"));
            }
        }
        // (LevelFilter reads an empty level as ERROR.)
        if level.is_empty()
            || level
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "bad level {level:?} in {directive:?}: expected off, error, warn, info, debug or trace"
            ));
        }
    }
    if !any {
        return Err("no directive: expected a level such as \"info\"".to_owned());
    }
    directives.parse::<Targets>().map_err(|e| e.to_string())
}

/// Why `directives` is not a usable `log.level`, or `None` if it is.
///
/// Stricter than [`parse_filter`] (`Targets`), which takes any word for a
/// target: a level misspelt (`"chatty!!"`, `"inf"`) would parse as a target
/// nobody logs to, and the server would then log nothing at all. So each
/// directive must be a level (`info`), or `target=level` with a module path
/// for a target (`contactd::server=debug`, `h2=warn`), possibly with field
/// names (`target[{field}]=level`).
pub fn filter_problem(directives: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let expected = "expected directives such as \"info\" or \"warn,contactd=debug\"";
    if directives.trim().is_empty() {
        return Some(format!("is empty: {expected}"));
    }
    if let Err(e) = parse_filter(directives) {
        return Some(format!("invalid filter {directives:?} ({e}): {expected}"));
    }
    let is_level = |word: &str| LEVELS.contains(&word.trim().to_ascii_lowercase().as_str());
    let is_path = |target: &str| {
        target.split("::").all(|part| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
    };
    for directive in directives.split(',').map(str::trim) {
        let ok = match directive.rsplit_once('=') {
            None => is_level(directive),
            Some((target, level)) => {
                // The field part (`target[{field}]`) is `Targets`' to check.
                let target = target.split('[').next().unwrap_or_default();
                is_level(level) && (target.is_empty() || is_path(target))
            }
        };
        if !ok {
            return Some(format!(
                "{directive:?} in {directives:?} is neither a level (off, error, warn, info, \
                 debug, trace) nor TARGET=LEVEL with a module path for TARGET: {expected}"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::parse_filter;

    #[test]
    fn filter_directives() {
        for good in [
            "info",
            "warn,contactd=debug",
            "info,contactd::server=trace,h2=off",
            "DEBUG",
        ] {
            assert!(parse_filter(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("", "no directive"),
            (" , ", "no directive"),
            ("=", "bad target"),
            ("loud", "bad level"),
            ("contactd=", "bad level"),
            ("contactd::server[remoteCMD]=trace", "bad target"),
            ("a::=info", "bad target"),
        ] {
            let err = parse_filter(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
