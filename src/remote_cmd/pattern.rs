//! Allow-list patterns for remote commands.
//!
//! A pattern is a command line split into words shell-style, like the
//! command it matches. Each word matches one word of the command, literally
//! or as a glob (`veth*`, `eth[0-9]`); a last word that is a lone `*` matches
//! any number of further words, including none. So `"ip link add *"` allows
//! `ip link add veth0 type veth` and `"true"` allows exactly `true`. A glob
//! never matches across `/`, so `"cat /var/log/*.log"` cannot reach
//! `/var/log/../../etc/x.log`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One allow-list entry, parsed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommandPattern {
    source: String,
    words: Vec<Word>,
    /// The pattern ended in a lone `*`: any further words are allowed.
    open_ended: bool,
}

#[derive(Debug, Clone)]
enum Word {
    Literal(String),
    Glob(glob::Pattern),
}

/// `*` and `?` never match `/`; a leading `.` is an ordinary character.
const GLOB: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl Word {
    fn matches(&self, word: &str) -> bool {
        match self {
            Word::Literal(literal) => literal == word,
            Word::Glob(glob) => glob.matches_with(word, GLOB),
        }
    }
}

impl CommandPattern {
    /// Whether the command words `argv` are allowed by this pattern.
    pub fn matches<S: AsRef<str>>(&self, argv: &[S]) -> bool {
        let fits = if self.open_ended {
            argv.len() >= self.words.len()
        } else {
            argv.len() == self.words.len()
        };
        fits && self
            .words
            .iter()
            .zip(argv)
            .all(|(w, a)| w.matches(a.as_ref()))
    }
}

/// Splits a command line into words as a POSIX shell would, without
/// expanding anything.
///
/// # Errors
/// When quotes are unbalanced or the line holds no word.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    match shlex::split(line) {
        None => Err(format!(
            "cannot split {line:?} into words: unbalanced quotes or trailing backslash"
        )),
        Some(words) if words.is_empty() => Err("empty command line".to_owned()),
        Some(words) => Ok(words),
    }
}

impl std::str::FromStr for CommandPattern {
    type Err = String;

    fn from_str(source: &str) -> Result<Self, String> {
        let mut raw = split_words(source).map_err(|e| format!("bad allow pattern: {e}"))?;
        let open_ended = raw.len() > 1 && raw.last().is_some_and(|w| w == "*");
        if open_ended {
            raw.pop();
        }
        let words = raw
            .into_iter()
            .map(|word| {
                if !word.contains(['*', '?', '[']) {
                    return Ok(Word::Literal(word));
                }
                glob::Pattern::new(&word)
                    .map(Word::Glob)
                    .map_err(|e| format!("bad glob {word:?} in allow pattern {source:?}: {e}"))
            })
            .collect::<Result<_, String>>()?;
        Ok(CommandPattern {
            source: source.to_owned(),
            words,
            open_ended,
        })
    }
}

impl TryFrom<String> for CommandPattern {
    type Error = String;

    fn try_from(source: String) -> Result<Self, String> {
        source.parse()
    }
}

impl From<CommandPattern> for String {
    fn from(pattern: CommandPattern) -> String {
        pattern.source
    }
}

impl PartialEq for CommandPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Display for CommandPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(pattern: &str, line: &str) -> bool {
        let pattern: CommandPattern = pattern.parse().unwrap();
        pattern.matches(&split_words(line).unwrap())
    }

    #[test]
    fn exact_words() {
        assert!(allows("true", "true"));
        assert!(!allows("true", "true x"));
        assert!(!allows("true", "truex"));
        assert!(allows("echo 'a b'", "echo \"a b\""));
        assert!(!allows("echo 'a b'", "echo a b"));
    }

    #[test]
    fn trailing_star_takes_any_rest() {
        assert!(allows("ip link add *", "ip link add veth0 type veth"));
        assert!(allows("ip link add *", "ip link add"));
        assert!(!allows("ip link add *", "ip link del veth0"));
        assert!(!allows("ip link add *", "ip"));
    }

    #[test]
    fn globs_match_within_one_word() {
        assert!(allows("ip link del veth*", "ip link del veth12"));
        assert!(!allows("ip link del veth*", "ip link del eth0"));
        assert!(!allows("ip link del veth*", "ip link del veth1 extra"));
        assert!(allows("cat /tmp/*.log", "cat /tmp/a.log"));
        assert!(!allows("cat /tmp/*.log", "cat /tmp/../etc/a.log"));
        assert!(allows("ip link del eth[0-9]", "ip link del eth3"));
        assert!(!allows("ip link del eth[0-9]", "ip link del eth10"));
        assert!(allows("cat /tmp/?", "cat /tmp/x"));
        assert!(!allows("cat /tmp?x", "cat /tmp/x"));
        assert!(allows("ls .*", "ls .hidden"));
        // Braces are literal, not alternation.
        assert!(allows("echo {a,b}", "echo {a,b}"));
        assert!(!allows("echo {a,b}", "echo a"));
    }

    #[test]
    fn bad_patterns_are_explained() {
        assert!(
            "'unclosed"
                .parse::<CommandPattern>()
                .unwrap_err()
                .contains("unbalanced")
        );
        assert!("".parse::<CommandPattern>().unwrap_err().contains("empty"));
        assert!(
            "ls [a"
                .parse::<CommandPattern>()
                .unwrap_err()
                .contains("bad glob")
        );
    }
}
