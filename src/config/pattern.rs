//! Allow-list patterns for remote commands (`remote_cmd.allow`). They live
//! with the config, which parses them when it is loaded; `remote_cmd`
//! matches command lines against them (and re-exports them).
//!
//! A pattern is a command line split into words shell-style, like the
//! command it matches. Each word matches one word of the command, literally
//! or as a glob (`veth*`, `eth[0-9]`); a last word that is a lone `*` matches
//! any number of further words, including none. So `"ip link add *"` allows
//! `ip link add veth0 type veth` and `"true"` allows exactly `true`. A glob
//! never matches across `/`, so `"cat /var/log/*.log"` cannot reach
//! `/var/log/../../etc/x.log`.
//!
//! Nor can a glob climb or stand still: in a word that has a glob, a `.` or
//! `..` path component, or an empty one (`/tmp//x`, `/tmp/`), matches only
//! where the pattern's word has that very component, so `"ls /tmp/*"` allows
//! `ls /tmp/x` but not `ls /tmp/..`, `ls /tmp/.` or `ls /tmp/`. The further
//! words a trailing `*` takes may not have a `.` or `..` component at all.

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
    /// The glob, and the pattern word's `/`-separated components.
    Glob(glob::Pattern, Vec<String>),
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
            Word::Glob(glob, components) => {
                glob.matches_with(word, GLOB)
                    && word.split('/').enumerate().all(|(i, part)| {
                        !is_special(part) || components.get(i).is_some_and(|c| c == part)
                    })
            }
        }
    }
}

/// A path component a glob must not supply: empty, `.` or `..`.
fn is_special(component: &str) -> bool {
    matches!(component, "" | "." | "..")
}

/// Whether a word taken by a trailing `*` stays where it is: no `.` or `..`
/// component.
fn stays(word: &str) -> bool {
    word.split('/').all(|part| part != "." && part != "..")
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
            && argv[self.words.len()..].iter().all(|a| stays(a.as_ref()))
    }

    /// The program this pattern runs when its first word names one (not a
    /// glob): the word's last path component (`find` for `/usr/bin/find`).
    pub fn program(&self) -> Option<&str> {
        self.literal(0)
    }

    /// Word `at` when it is a literal, as a file name (its last path
    /// component).
    pub fn literal(&self, at: usize) -> Option<&str> {
        match self.words.get(at) {
            Some(Word::Literal(word)) => word.rsplit('/').next(),
            _ => None,
        }
    }

    /// Whether callers choose arguments here: a last `*` (any further
    /// words) or a glob argument (`-exec*` is as open as `*`).
    pub fn takes_chosen_arguments(&self) -> bool {
        self.open_ended
            || self
                .words
                .iter()
                .skip(1)
                .any(|word| matches!(word, Word::Glob(..)))
    }

    /// Whether this pattern lets any program at all run: its first word is a
    /// glob that matches program names of every kind (`*`, `?*`, `[a-z]*`),
    /// as in `"*"` or `"* *"`.
    pub fn matches_any_program(&self) -> bool {
        match self.words.first() {
            Some(Word::Glob(glob, _)) => ["sh", "rm", "python3", "x"]
                .iter()
                .all(|name| glob.matches_with(name, GLOB)),
            _ => false,
        }
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
            "cannot split \"{}\" into words: unbalanced quotes or trailing backslash",
            crate::untrusted::shown(line)
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
                let components = word.split('/').map(str::to_owned).collect();
                glob::Pattern::new(&word)
                    .map(|g| Word::Glob(g, components))
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
    fn globs_do_not_climb_or_stand_still() {
        for line in [
            "ls /tmp/..",
            "ls /tmp/.",
            "ls /tmp/",
            "ls /tmp//",
            "ls /tmp/../etc",
        ] {
            assert!(!allows("ls /tmp/*", line), "{line}");
        }
        assert!(allows("ls /tmp/*", "ls /tmp/x"));
        assert!(allows("ls /tmp/*", "ls /tmp/.hidden"));
        assert!(!allows("cat *", "cat .."));
        assert!(!allows("cat *", "cat ."));
        // A component the pattern spells out itself is fine.
        assert!(allows("cat ./*.log", "cat ./a.log"));
        assert!(allows("ls /*", "ls /x"));
        assert!(!allows("ls /*", "ls /.."));
        // Words taken by a trailing `*` may not climb either.
        assert!(!allows("ls /tmp *", "ls /tmp .."));
        assert!(!allows("ls /tmp *", "ls /tmp /tmp/../etc"));
        assert!(allows("ls /tmp *", "ls /tmp -l /etc"));
    }

    #[test]
    fn patterns_that_allow_any_program_are_recognised() {
        for any in ["*", "* *", "* * *", "?*", "[a-z]* *", "** *"] {
            let p: CommandPattern = any.parse().unwrap();
            assert!(p.matches_any_program(), "{any}");
        }
        for narrow in ["ls *", "/usr/bin/* *", "ip*", "echo", "e* *"] {
            let p: CommandPattern = narrow.parse().unwrap();
            assert!(!p.matches_any_program(), "{narrow}");
        }
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

/// Fuzzing of the splitter and the matcher with generated lines and
/// patterns: no panic, and no match that climbs. Bounded in count; a
/// failure is shrunk to its smallest case and printed.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// The pieces words are built from: separators, dots, glob syntax, and
    /// a few plain names.
    const PIECES: [&str; 11] = [
        "/", ".", "..", "*", "?", "[a-c]", "{a,b}", "a", "b", "tmp", "-",
    ];

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 1000,
            // No file of failures beside the sources: a failure prints its
            // shrunk case, and a test for it is written by hand.
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// A word of 1 to 5 pieces.
    fn word() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(&PIECES[..]), 1..6).prop_map(|p| p.concat())
    }

    /// Up to 3 printable characters (no control character), ASCII or not.
    fn printable() -> impl Strategy<Value = String> {
        let char = prop_oneof![
            prop::char::range(' ', '~'),
            prop::char::range('\u{a1}', '\u{17f}'),
            prop::char::range('\u{4e00}', '\u{9fa5}'),
            prop::char::range('\u{1f600}', '\u{1f64f}'),
        ];
        prop::collection::vec(char, 0..4).prop_map(|c| c.into_iter().collect())
    }

    /// A line of 0 to 7 parts joined by spaces: words, quotes, backslashes,
    /// newlines, NULs, spaces and printable text.
    fn line() -> impl Strategy<Value = String> {
        let part = prop_oneof![
            word(),
            Just("'".to_owned()),
            Just("\"".to_owned()),
            Just("\\".to_owned()),
            Just("\n".to_owned()),
            Just("\0".to_owned()),
            Just(" ".to_owned()),
            printable(),
        ];
        prop::collection::vec(part, 0..8).prop_map(|parts| parts.join(" "))
    }

    /// A pattern of 1 to 3 words, perhaps with a last `*`, and 1 to 4
    /// command words: each half the time a random word, else the pattern's
    /// word with each glob character replaced by a piece without glob
    /// syntax (so matches, and climbing attempts, are common).
    fn pattern_and_argv() -> impl Strategy<Value = (Vec<String>, bool, Vec<String>)> {
        const FILL: [&str; 7] = ["", ".", "..", "a", "b", "tmp", "/"];
        (prop::collection::vec(word(), 1..4), any::<bool>()).prop_flat_map(|(pattern, star)| {
            let words = pattern.clone();
            let argv = prop::collection::vec(
                (
                    any::<bool>(),
                    word(),
                    prop::collection::vec(0..FILL.len(), 16),
                ),
                1..5,
            )
            .prop_map(move |args| {
                args.into_iter()
                    .enumerate()
                    .map(|(i, (own, random, fills))| match words.get(i) {
                        Some(pattern) if own => {
                            let mut fills = fills.into_iter().cycle();
                            pattern
                                .replace("[a-c]", "?")
                                .chars()
                                .map(|c| match c {
                                    '*' | '?' => FILL[fills.next().unwrap_or(0)].to_owned(),
                                    c => c.to_string(),
                                })
                                .collect()
                        }
                        _ => random,
                    })
                    .collect()
            });
            (Just(pattern), Just(star), argv)
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn splitting_never_panics_and_quoted_words_split_back(line in line()) {
            if let Ok(words) = split_words(&line) {
                prop_assert!(!words.is_empty(), "{line:?}");
                let quoted: Vec<String> = words
                    .iter()
                    .map(|w| shlex::try_quote(w).map(|q| q.into_owned()))
                    .collect::<Result<_, _>>()
                    .unwrap_or_default();
                if !quoted.is_empty() {
                    prop_assert_eq!(split_words(&quoted.join(" ")).unwrap(), words, "{:?}", line);
                }
            }
        }

        #[test]
        fn a_glob_never_supplies_a_dot_dotdot_or_empty_component(
            (pattern, star, argv) in pattern_and_argv()
        ) {
            let mut source = pattern
                .iter()
                .map(|w| shlex::try_quote(w).unwrap().into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            if star {
                source.push_str(" *");
            }
            if let Ok(parsed) = source.parse::<CommandPattern>()
                && parsed.matches(&argv)
            {
                for (i, arg) in argv.iter().enumerate() {
                    match parsed.words.get(i) {
                        Some(Word::Literal(literal)) => {
                            prop_assert_eq!(literal, arg, "{:?} matched {:?}", source, argv);
                        }
                        Some(Word::Glob(_, components)) => {
                            for (j, part) in arg.split('/').enumerate() {
                                if is_special(part) {
                                    prop_assert_eq!(
                                        components.get(j).map(String::as_str),
                                        Some(part),
                                        "{:?} matched {:?}", source, argv
                                    );
                                }
                            }
                        }
                        None => prop_assert!(stays(arg), "{source:?} matched {argv:?}"),
                    }
                }
            }
        }
    }
}
