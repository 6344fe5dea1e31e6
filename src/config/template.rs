//! Task templates: the text of a generated task, with placeholders filled in
//! per task. Parsed once when the config is loaded (hence here, in
//! `config`), rendered per task by `tasks` (which re-exports it).
//!
//! Placeholders: `{seq}` (the task id), `{rand}` (a random integer in
//! 100..=200, as the seed's tasks), `{rand:LO-HI}` (a random integer in
//! LO..=HI), `{unix}` (seconds since the Unix epoch); `{{` and `}}` are
//! literal braces.

use std::{fmt, fmt::Write as _, time::SystemTime};

use serde::{Deserialize, Serialize};

/// A parsed task template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Seq,
    Rand { low: i64, high: i64 },
    Unix,
}

const SEED_RANGE: (i64, i64) = (100, 200);

impl TaskTemplate {
    /// Renders the template for the task with id `seq`.
    pub fn render(&self, seq: u64) -> String {
        let mut out = String::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            // Writing to a String cannot fail.
            let _ = match part {
                Part::Literal(text) => {
                    out.push_str(text);
                    Ok(())
                }
                Part::Seq => write!(out, "{seq}"),
                Part::Rand { low, high } => {
                    write!(out, "{}", fastrand::i64(*low..=*high))
                }
                Part::Unix => write!(out, "{}", unix_now()),
            };
        }
        out
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Default for TaskTemplate {
    fn default() -> Self {
        "task:{rand}".parse().expect("the default template parses")
    }
}

impl std::str::FromStr for TaskTemplate {
    type Err = String;

    fn from_str(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            let tail = &rest[i..];
            if tail.starts_with("{{") || tail.starts_with("}}") {
                literal.push_str(&tail[..1]);
                rest = &tail[2..];
                continue;
            }
            if tail.starts_with('}') {
                return Err(format!(
                    "unmatched '}}' in template {source:?}: write '}}}}' for a literal brace"
                ));
            }
            let Some(end) = tail.find('}') else {
                return Err(format!(
                    "unclosed '{{' in template {source:?}: write '{{{{' for a literal brace"
                ));
            };
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(
                placeholder(&tail[1..end]).map_err(|e| format!("{e} in template {source:?}"))?,
            );
            rest = &tail[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(TaskTemplate {
            source: source.to_owned(),
            parts,
        })
    }
}

fn placeholder(name: &str) -> Result<Part, String> {
    const KNOWN: &str = "expected {seq}, {rand}, {rand:LO-HI} or {unix}";
    match name {
        "seq" => Ok(Part::Seq),
        "unix" => Ok(Part::Unix),
        "rand" => Ok(Part::Rand {
            low: SEED_RANGE.0,
            high: SEED_RANGE.1,
        }),
        _ => {
            let Some(range) = name.strip_prefix("rand:") else {
                return Err(format!("unknown placeholder {{{name}}} ({KNOWN})"));
            };
            let bad = || {
                format!("bad range in {{{name}}}: expected {{rand:LO-HI}} with integers LO <= HI")
            };
            // Split at the '-' that follows the first digit, so negative bounds work.
            let split = range
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == '-')
                .map(|(i, _)| i);
            let (low, high) = split
                .map(|i| (&range[..i], &range[i + 1..]))
                .ok_or_else(bad)?;
            let low: i64 = low.trim().parse().map_err(|_| bad())?;
            let high: i64 = high.trim().parse().map_err(|_| bad())?;
            if low > high {
                return Err(bad());
            }
            Ok(Part::Rand { low, high })
        }
    }
}

impl TryFrom<String> for TaskTemplate {
    type Error = String;

    fn try_from(source: String) -> Result<Self, String> {
        source.parse()
    }
}

impl From<TaskTemplate> for String {
    fn from(template: TaskTemplate) -> String {
        template.source
    }
}

impl fmt::Display for TaskTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_renders_like_the_seed() {
        let text = TaskTemplate::default().render(7);
        let n: i64 = text.strip_prefix("task:").unwrap().parse().unwrap();
        assert!((100..=200).contains(&n), "{text}");
    }

    #[test]
    fn placeholders_and_escapes() {
        let t: TaskTemplate = "{{job}} #{seq} r={rand:-5--5} {unix}".parse().unwrap();
        let text = t.render(42);
        assert!(text.starts_with("{job} #42 r=-5 "), "{text}");
        assert!(text.rsplit(' ').next().unwrap().parse::<u64>().unwrap() > 1_600_000_000);
    }

    #[test]
    fn errors_name_the_problem() {
        for (bad, needle) in [
            ("{nope}", "unknown placeholder {nope}"),
            ("{rand:9-1}", "bad range"),
            ("x{seq", "unclosed"),
            ("x}", "unmatched"),
        ] {
            let err = bad.parse::<TaskTemplate>().unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
