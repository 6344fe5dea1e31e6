//! Label selectors: which agents a task, a command or an admin query
//! targets. This module owns the one parser for them (config, command line
//! and admin API all read selectors through [`Selector::parse`]), their
//! canonical text, and the match of a selector against one agent.
//!
//! The syntax is Kubernetes' label-selector syntax; requirements are joined
//! by `,`, which means AND:
//!
//! ```text
//! selector    = [ requirement { "," requirement } ]       empty: every agent
//! requirement = key ( "=" | "==" | "!=" ) value           role=web, region!=us
//!             | key ( "in" | "notin" ) "(" value { "," value } ")"
//!             | key                                       the label exists
//!             | "!" key                                   the label is absent
//! ```
//!
//! ASCII whitespace may surround every token. Keys and values follow
//! Kubernetes' rules for label keys and values: a key is an optional
//! lowercase DNS prefix (at most 253 characters, `example.com/`) and a name
//! of 1 to 63 letters, digits, `.`, `_` and `-` that begins and ends with a
//! letter or digit; a value is empty or made of the same characters, at
//! most 63 of them. Two departures from Kubernetes: a value inside `( )`
//! may not be empty (a trailing `,` is a typo more often than a wish to
//! select the empty value), and the key `name` is ours (below).
//!
//! **`name`** is not a label: it is the agent's name, and its values may be
//! globs (`*`, `?`, `[a-z]`, by the `glob` crate), so `name=web-*` or
//! `name in (db1,cache-?)`. Agent names are up to 253 visible ASCII
//! characters, so `name` values may be up to 253 characters; those of them
//! outside letters, digits, `.`, `_` and `-` are reached with `?`. A label
//! an agent happens to call `name` cannot be selected (use a prefixed key).
//! Every agent has a name, so `name` alone matches every agent and `!name`
//! none; both are accepted, like the contradiction `role=web,role=api`,
//! because they are well-formed statements that are simply always or never
//! true. Globs are for `name` only: another key's value that holds `*` is
//! refused, saying so, rather than compared literally.
//!
//! As in Kubernetes, `!=` and `notin` also match an agent that lacks the
//! label: `region!=us` selects agents in `eu` and agents with no region.
//!
//! The input is bounded (operators and admin-API callers write it):
//! [`MAX_LEN`] bytes, [`MAX_REQUIREMENTS`] requirements, [`MAX_SET_VALUES`]
//! values in one set.
//!
//! Matching runs for every agent at every dispatch (10,000 agents is the
//! scale in mind), so the work is done at parse time: globs compiled, a
//! set's values sorted for a binary search, and a match allocates nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest selector accepted, in bytes.
pub const MAX_LEN: usize = 4096;
/// Most requirements (comma-separated parts) in one selector.
pub const MAX_REQUIREMENTS: usize = 64;
/// Most values in one `in (...)` or `notin (...)` set.
pub const MAX_SET_VALUES: usize = 64;

/// Kubernetes' bounds: a key's name part, its DNS prefix, a value.
const MAX_KEY_NAME: usize = 63;
const MAX_PREFIX: usize = 253;
const MAX_VALUE: usize = 63;
/// A `name` value: as long as an agent name may be.
const MAX_NAME_VALUE: usize = 253;

/// The key that selects on the agent's name rather than a label.
const NAME: &str = "name";

/// Agent names have no path separators, so `*` matches any run of
/// characters, a leading `.` included.
const GLOB: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

/// An agent's labels, as a selector reads them: its own labels and its
/// built-in facts (`os`, `arch`, `hostname`, `kernel`,
/// `contactd_version`) alike.
///
/// A trait rather than a map type, so an agent record can answer from its
/// label map and its facts fields without merging them into a new map for
/// every match; and rather than a `Fn(&str) -> Option<&str>`, because the
/// value borrows from the labels, not from the key, which that signature
/// cannot say (its elided lifetimes tie the result to the key).
pub trait Labels {
    /// The value of label `key`, or `None` when the agent has no such label.
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl<S: BuildHasher> Labels for HashMap<String, String, S> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// A few labels in a list (looked up by a linear scan).
impl Labels for [(&str, &str)] {
    fn label(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

impl<const N: usize> Labels for [(&str, &str); N] {
    fn label(&self, key: &str) -> Option<&str> {
        self.as_slice().label(key)
    }
}

/// A parsed label selector: requirements that an agent must all meet.
///
/// Equal selectors are those with the same canonical text (its `Display`),
/// so `role==web` equals `role = web` and `role in (a,b)` equals
/// `role in (b, a, b)`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    /// Every one must hold; in the order written, so the canonical text
    /// keeps the operator's order.
    requirements: Vec<Requirement>,
    /// The canonical text, rendered once at parse: display, equality and
    /// serialization read it.
    text: String,
}

impl Selector {
    /// Parses a selector (see the module documentation for the syntax).
    /// Empty or all-whitespace text is [`Selector::everything`].
    ///
    /// # Errors
    ///
    /// The first problem, with its byte position and what was expected
    /// there: a syntax error, a key or value Kubernetes would refuse, a glob
    /// outside `name` or a bad glob, or input beyond the bounds
    /// ([`MAX_LEN`], [`MAX_REQUIREMENTS`], [`MAX_SET_VALUES`]).
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if text.len() > MAX_LEN {
            return Err(SelectorError::new(
                MAX_LEN,
                format!(
                    "the selector is {} bytes long; at most {MAX_LEN} are allowed",
                    text.len()
                ),
            ));
        }
        let mut parser = Parser { text, pos: 0 };
        let mut requirements = Vec::new();
        parser.skip_space();
        if parser.peek().is_some() {
            loop {
                if requirements.len() == MAX_REQUIREMENTS {
                    return Err(parser.error(format!(
                        "more than {MAX_REQUIREMENTS} requirements; at most \
                         {MAX_REQUIREMENTS} are allowed"
                    )));
                }
                requirements.push(parser.requirement(requirements.is_empty())?);
                parser.skip_space();
                match parser.peek() {
                    None => break,
                    Some(b',') => {
                        parser.pos += 1;
                        parser.skip_space();
                    }
                    Some(_) => {
                        return Err(parser.error(format!(
                            "expected `,` and another requirement, or the end of the \
                             selector, found {}",
                            parser.found()
                        )));
                    }
                }
            }
        }
        let text = render(&requirements);
        Ok(Selector { requirements, text })
    }

    /// The empty selector, which matches every agent.
    #[must_use]
    pub fn everything() -> Selector {
        Selector::default()
    }

    /// Whether this is the empty selector. (`name` alone also matches every
    /// agent, but is not the empty selector.)
    #[must_use]
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether the agent called `name`, with these labels, meets every
    /// requirement. Allocates nothing.
    #[must_use]
    pub fn matches<L: Labels + ?Sized>(&self, name: &str, labels: &L) -> bool {
        self.requirements.iter().all(|r| r.holds(name, labels))
    }

    /// The canonical text, as [`Display`](fmt::Display) writes it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Selector {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Selector {}

impl Hash for Selector {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

/// The canonical form: no spaces except around `in` and `notin`, `=` for
/// `==`, a set's values sorted and deduplicated, the requirements in the
/// order written: `role in (api,web),region!=us,!canary`. Parsing it gives
/// an equal selector.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Selector::parse(text)
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Selector::parse(&text)
    }
}

impl From<Selector> for String {
    fn from(selector: Selector) -> Self {
        selector.text
    }
}

/// Why a selector did not parse, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {}: {}", .position + 1, .message)]
pub struct SelectorError {
    /// 0-based byte offset of the problem in the text, at most its length
    /// (the length itself: the problem is the end of the text). The syntax
    /// is ASCII and parsing stops at the first character outside it, so
    /// this is the character offset too.
    pub position: usize,
    /// What was expected there, and what was found.
    pub message: String,
}

impl SelectorError {
    fn new(position: usize, message: String) -> Self {
        SelectorError { position, message }
    }

    /// The 1-based column the error's display names.
    #[must_use]
    pub fn column(&self) -> usize {
        self.position + 1
    }
}

/// One requirement, ready to match.
#[derive(Debug, Clone)]
struct Requirement {
    /// The label it reads, or the agent's name.
    subject: Subject,
    op: Op,
    /// The values that are plain strings, sorted and deduplicated (for a
    /// binary search). Empty for `Exists` and `Absent`.
    exact: Vec<String>,
    /// The values that are globs (for `name` only), compiled.
    globs: Vec<glob::Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    Name,
    Label(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Exists,
    Absent,
    Eq,
    NotEq,
    In,
    NotIn,
}

/// A value as parsed: `name` values with glob characters are globs.
enum Value {
    Exact(String),
    Glob(glob::Pattern),
}

impl Requirement {
    fn new(subject: Subject, op: Op, values: Vec<Value>) -> Self {
        let mut exact = Vec::new();
        let mut globs: Vec<glob::Pattern> = Vec::new();
        for value in values {
            match value {
                Value::Exact(v) => exact.push(v),
                Value::Glob(g) => globs.push(g),
            }
        }
        exact.sort_unstable();
        exact.dedup();
        globs.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        globs.dedup_by(|a, b| a.as_str() == b.as_str());
        Requirement {
            subject,
            op,
            exact,
            globs,
        }
    }

    fn holds<L: Labels + ?Sized>(&self, name: &str, labels: &L) -> bool {
        let value = match &self.subject {
            Subject::Name => Some(name),
            Subject::Label(key) => labels.label(key),
        };
        match self.op {
            Op::Exists => value.is_some(),
            Op::Absent => value.is_none(),
            Op::Eq | Op::In => value.is_some_and(|v| self.admits(v)),
            Op::NotEq | Op::NotIn => !value.is_some_and(|v| self.admits(v)),
        }
    }

    /// Whether `value` is one of the values (or matches one of the globs).
    fn admits(&self, value: &str) -> bool {
        self.exact
            .binary_search_by(|e| e.as_str().cmp(value))
            .is_ok()
            || self.globs.iter().any(|g| g.matches_with(value, GLOB))
    }

    /// The values' texts, sorted.
    fn values(&self) -> Vec<&str> {
        let mut values: Vec<&str> = self.exact.iter().map(String::as_str).collect();
        values.extend(self.globs.iter().map(glob::Pattern::as_str));
        values.sort_unstable();
        values
    }

    fn render(&self, out: &mut String) {
        let key = match &self.subject {
            Subject::Name => NAME,
            Subject::Label(key) => key,
        };
        let values = self.values();
        let (before, between) = match self.op {
            Op::Exists => ("", ""),
            Op::Absent => ("!", ""),
            Op::Eq => ("", "="),
            Op::NotEq => ("", "!="),
            Op::In => ("", " in ("),
            Op::NotIn => ("", " notin ("),
        };
        out.push_str(before);
        out.push_str(key);
        out.push_str(between);
        out.push_str(&values.join(","));
        if matches!(self.op, Op::In | Op::NotIn) {
            out.push(')');
        }
    }
}

fn render(requirements: &[Requirement]) -> String {
    let mut out = String::new();
    for (i, requirement) in requirements.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        requirement.render(&mut out);
    }
    out
}

/// A cursor over the text. `pos` only ever stops on ASCII bytes or the
/// end, so every slice from it is on a character boundary.
struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

/// Bytes that end a word (a key, a value, `in`, `notin`).
fn is_delimiter(byte: u8) -> bool {
    byte.is_ascii_whitespace() || matches!(byte, b',' | b'(' | b')' | b'=' | b'!')
}

fn is_glob_char(byte: u8) -> bool {
    matches!(byte, b'*' | b'?' | b'[' | b']')
}

/// Letters, digits, `.`, `_`, `-`: what Kubernetes keys and values are made of.
fn is_label_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-')
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn at_word(&self) -> bool {
        self.peek().is_some_and(|b| !is_delimiter(b))
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// The word at the cursor (possibly empty), and its start; the cursor
    /// moves past it.
    fn word(&mut self) -> (usize, &'a str) {
        let start = self.pos;
        while self.at_word() {
            self.pos += 1;
        }
        (start, &self.text[start..self.pos])
    }

    fn error(&self, message: String) -> SelectorError {
        SelectorError::new(self.pos, message)
    }

    /// What is at the cursor, for "expected …, found …".
    fn found(&self) -> String {
        match self.peek() {
            None => "the end of the selector".to_owned(),
            Some(b) if is_delimiter(b) => format!("`{}`", (b as char).escape_debug()),
            Some(_) => {
                let rest = &self.text[self.pos..];
                let end = rest.find(|c: char| c.is_ascii() && is_delimiter(c as u8));
                let word = &rest[..end.unwrap_or(rest.len())];
                match word.char_indices().nth(24) {
                    Some((cut, _)) => format!("`{}…`", word[..cut].escape_debug()),
                    None => format!("`{}`", word.escape_debug()),
                }
            }
        }
    }

    /// One requirement; `first` says whether a `,` came before it (for
    /// the error when the key is missing).
    fn requirement(&mut self, first: bool) -> Result<Requirement, SelectorError> {
        if self.peek() == Some(b'!') {
            self.pos += 1;
            self.skip_space();
            let subject = self.key("after `!`")?;
            return Ok(Requirement::new(subject, Op::Absent, Vec::new()));
        }
        let subject = self.key(if first { "" } else { "after `,`" })?;
        self.skip_space();
        let op_pos = self.pos;
        match self.peek() {
            None | Some(b',') => Ok(Requirement::new(subject, Op::Exists, Vec::new())),
            Some(b'=') => {
                self.pos += 1;
                let op = if self.peek() == Some(b'=') {
                    self.pos += 1;
                    "=="
                } else {
                    "="
                };
                let value = self.single_value(&subject, op)?;
                Ok(Requirement::new(subject, Op::Eq, vec![value]))
            }
            Some(b'!') if self.text.as_bytes().get(self.pos + 1) == Some(&b'=') => {
                self.pos += 2;
                let value = self.single_value(&subject, "!=")?;
                Ok(Requirement::new(subject, Op::NotEq, vec![value]))
            }
            _ => {
                let (_, word) = self.word();
                let op = match word {
                    "in" => Op::In,
                    "notin" => Op::NotIn,
                    _ => {
                        self.pos = op_pos;
                        return Err(self.error(format!(
                            "expected `=`, `==`, `!=`, `in`, `notin`, `,` or the end of the \
                             selector after the key, found {}",
                            self.found()
                        )));
                    }
                };
                let values = self.set(&subject, op_pos, word)?;
                Ok(Requirement::new(subject, op, values))
            }
        }
    }

    /// A key at the cursor; `context` says what came before, for the error.
    fn key(&mut self, context: &str) -> Result<Subject, SelectorError> {
        if !self.at_word() {
            let space = if context.is_empty() { "" } else { " " };
            return Err(self.error(format!(
                "expected a label key{space}{context}, found {}",
                self.found()
            )));
        }
        let (start, word) = self.word();
        if word == NAME {
            return Ok(Subject::Name);
        }
        check_key(start, word)?;
        Ok(Subject::Label(word.to_owned()))
    }

    /// The value of `=`, `==` or `!=`: a word, or nothing (the empty value)
    /// when a `,` or the end follows.
    fn single_value(&mut self, subject: &Subject, op: &str) -> Result<Value, SelectorError> {
        self.skip_space();
        match self.peek() {
            None | Some(b',') => Ok(Value::Exact(String::new())),
            _ if self.at_word() => self.value(subject),
            _ => Err(self.error(format!(
                "expected a value (or nothing) after `{op}`, found {}",
                self.found()
            ))),
        }
    }

    /// The `( … )` after `in` or `notin`, which started at `op_pos`.
    fn set(
        &mut self,
        subject: &Subject,
        op_pos: usize,
        op: &str,
    ) -> Result<Vec<Value>, SelectorError> {
        self.skip_space();
        if self.peek() != Some(b'(') {
            return Err(self.error(format!(
                "expected `(` to open the set of values after `{op}`, found {}",
                self.found()
            )));
        }
        self.pos += 1;
        let mut values = Vec::new();
        loop {
            self.skip_space();
            if values.len() == MAX_SET_VALUES {
                return Err(self.error(format!(
                    "more than {MAX_SET_VALUES} values in the set; at most {MAX_SET_VALUES} \
                     are allowed"
                )));
            }
            if !self.at_word() {
                let what = if values.is_empty() && self.peek() == Some(b')') {
                    format!("`{op}` needs at least one value")
                } else {
                    "values in a set may not be empty".to_owned()
                };
                return Err(
                    self.error(format!("expected a value, found {} ({what})", self.found()))
                );
            }
            values.push(self.value(subject)?);
            self.skip_space();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b')') => {
                    self.pos += 1;
                    return Ok(values);
                }
                _ => {
                    return Err(self.error(format!(
                        "expected `,` or `)` to close the set started at column {}, found {}",
                        op_pos + 1,
                        self.found()
                    )));
                }
            }
        }
    }

    /// The value word at the cursor, checked for `subject`.
    fn value(&mut self, subject: &Subject) -> Result<Value, SelectorError> {
        let (start, word) = self.word();
        match subject {
            Subject::Name => name_value(start, word),
            Subject::Label(_) => {
                check_label_value(start, word)?;
                Ok(Value::Exact(word.to_owned()))
            }
        }
    }
}

/// The first character of `text` at or after byte `at` (`text[at..]` must
/// be on a boundary: it is, as checks stop at the first non-ASCII byte).
fn char_at(text: &str, at: usize) -> char {
    text[at..].chars().next().unwrap_or('\u{fffd}')
}

/// An error for the byte at `offset` of `word` (which starts at `start`)
/// that is not allowed in `what`; the glob characters get their own
/// explanation.
fn bad_char(start: usize, word: &str, offset: usize, what: &str, allowed: &str) -> SelectorError {
    let c = char_at(word, offset);
    let message = if c.is_ascii() && is_glob_char(c as u8) {
        format!(
            "`{c}` is a glob character: globs are allowed only in `name` values \
             (`name=web-*`); {what} matches exactly"
        )
    } else {
        format!(
            "invalid character `{}` in {what}: {allowed}",
            c.escape_debug()
        )
    };
    SelectorError::new(start + offset, message)
}

/// Checks `key` as a label key, by the rules selectors read keys with (so
/// that no label is made that no selector could name).
///
/// # Errors
/// Where the key breaks them, and how.
pub fn check_label_key(key: &str) -> Result<(), SelectorError> {
    check_key(0, key)
}

/// Checks `value` as a label value, by the rules selectors read values
/// with.
///
/// # Errors
/// Where the value breaks them, and how.
pub fn check_value(value: &str) -> Result<(), SelectorError> {
    check_label_value(0, value)
}

/// A key other than `name` (Kubernetes' label-key rules), starting at byte
/// `start` of the selector.
fn check_key(start: usize, key: &str) -> Result<(), SelectorError> {
    let (prefix, name, name_start) = match key.find('/') {
        Some(slash) => {
            if let Some(second) = key[slash + 1..].find('/') {
                return Err(SelectorError::new(
                    start + slash + 1 + second,
                    "a key has at most one `/`, between its DNS prefix and its name".to_owned(),
                ));
            }
            (Some(&key[..slash]), &key[slash + 1..], slash + 1)
        }
        None => (None, key, 0),
    };
    if let Some(prefix) = prefix {
        check_prefix(start, prefix)?;
    }
    check_word(start + name_start, name, "a label key", MAX_KEY_NAME, false)
}

/// A key's DNS prefix: lowercase RFC 1123 labels joined by dots.
fn check_prefix(start: usize, prefix: &str) -> Result<(), SelectorError> {
    if prefix.is_empty() {
        return Err(SelectorError::new(
            start,
            "empty prefix before `/` in a key (a prefix is a DNS name such as `example.com`)"
                .to_owned(),
        ));
    }
    for (i, b) in prefix.bytes().enumerate() {
        if !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-') {
            return Err(bad_char(
                start,
                prefix,
                i,
                "a key prefix",
                "a key prefix is a lowercase DNS name (`a-z`, `0-9`, `-`, `.`)",
            ));
        }
    }
    let mut label_start = 0;
    for label in prefix.split('.') {
        let ok = label.starts_with(|c: char| c.is_ascii_alphanumeric())
            && label.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(SelectorError::new(
                start + label_start,
                "each dot-separated part of a key prefix must be non-empty and begin and end \
                 with a letter or digit"
                    .to_owned(),
            ));
        }
        label_start += label.len() + 1;
    }
    if prefix.len() > MAX_PREFIX {
        return Err(SelectorError::new(
            start + MAX_PREFIX,
            format!(
                "the key prefix is {} characters long; at most {MAX_PREFIX} are allowed",
                prefix.len()
            ),
        ));
    }
    Ok(())
}

fn check_label_value(start: usize, value: &str) -> Result<(), SelectorError> {
    check_word(start, value, "a label value", MAX_VALUE, true)
}

/// A key name or a label value: letters, digits, `.`, `_`, `-`, beginning
/// and ending with a letter or digit, at most `max` long; a value may be
/// empty.
fn check_word(
    start: usize,
    word: &str,
    what: &str,
    max: usize,
    may_be_empty: bool,
) -> Result<(), SelectorError> {
    if word.is_empty() && !may_be_empty {
        return Err(SelectorError::new(
            start,
            format!("expected the name of {what} after the prefix's `/`"),
        ));
    }
    if let Some(i) = word.bytes().position(|b| !is_label_char(b)) {
        return Err(bad_char(
            start,
            word,
            i,
            what,
            "use letters, digits, `.`, `_` and `-`",
        ));
    }
    let bytes = word.as_bytes();
    for (i, b) in [
        (0, bytes.first()),
        (word.len().saturating_sub(1), bytes.last()),
    ] {
        if b.is_some_and(|b| !b.is_ascii_alphanumeric()) {
            return Err(SelectorError::new(
                start + i,
                format!("{what} must begin and end with a letter or digit"),
            ));
        }
    }
    if word.len() > max {
        return Err(SelectorError::new(
            start + max,
            format!(
                "{what} is {} characters long; at most {max} are allowed",
                word.len()
            ),
        ));
    }
    Ok(())
}

/// A `name` value: exact, or a glob when it has a glob character.
fn name_value(start: usize, value: &str) -> Result<Value, SelectorError> {
    if let Some(i) = value
        .bytes()
        .position(|b| !is_label_char(b) && !is_glob_char(b))
    {
        return Err(bad_char(
            start,
            value,
            i,
            "a `name` value",
            "use letters, digits, `.`, `_`, `-` and the globs `*`, `?`, `[a-z]` (`?` \
             stands for any other character of an agent name)",
        ));
    }
    if value.len() > MAX_NAME_VALUE {
        return Err(SelectorError::new(
            start + MAX_NAME_VALUE,
            format!(
                "a `name` value is {} characters long; at most {MAX_NAME_VALUE} are allowed",
                value.len()
            ),
        ));
    }
    if !value.bytes().any(is_glob_char) {
        return Ok(Value::Exact(value.to_owned()));
    }
    // The value is ASCII, so the glob's character position is a byte offset.
    glob::Pattern::new(value).map(Value::Glob).map_err(|e| {
        SelectorError::new(
            start + e.pos.min(value.len()),
            format!("bad glob `{value}`: {}", e.msg),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent: its name and labels.
    type Agent = (&'static str, &'static [(&'static str, &'static str)]);

    const WEB_EU: Agent = ("web-1", &[("role", "web"), ("region", "eu")]);
    const WEB_US: Agent = ("web-2", &[("role", "web"), ("region", "us")]);
    const API: Agent = ("api-1", &[("role", "api"), ("region", "ap")]);
    const CANARY: Agent = ("web-3", &[("role", "web"), ("canary", "")]);
    const BARE: Agent = ("db1", &[]);

    /// (selector, canonical text, agents it matches, agents it does not).
    const VALID: &[(&str, &str, &[Agent], &[Agent])] = &[
        ("", "", &[WEB_EU, BARE], &[]),
        (" \t\n", "", &[WEB_EU, BARE], &[]),
        ("role=web", "role=web", &[WEB_EU, CANARY], &[API, BARE]),
        ("role==web", "role=web", &[WEB_EU], &[API]),
        ("  role = web  ", "role=web", &[WEB_EU], &[API]),
        ("region!=us", "region!=us", &[WEB_EU, API, BARE], &[WEB_US]),
        (
            "role in (web,api)",
            "role in (api,web)",
            &[WEB_EU, API],
            &[BARE],
        ),
        ("role in(web)", "role in (web)", &[WEB_EU], &[API]),
        ("role in ( web , web )", "role in (web)", &[WEB_EU], &[API]),
        (
            "region notin (us, ap)",
            "region notin (ap,us)",
            &[WEB_EU, BARE],
            &[WEB_US, API],
        ),
        ("canary", "canary", &[CANARY], &[WEB_EU, BARE]),
        ("!canary", "!canary", &[WEB_EU, BARE], &[CANARY]),
        ("! canary", "!canary", &[WEB_EU], &[CANARY]),
        ("role=", "role=", &[("a", &[("role", "")])], &[WEB_EU, BARE]),
        (
            "role!=",
            "role!=",
            &[WEB_EU, BARE],
            &[("a", &[("role", "")])],
        ),
        (
            "role=web,region!=us,!canary",
            "role=web,region!=us,!canary",
            &[WEB_EU],
            &[WEB_US, CANARY, API],
        ),
        (
            "role=web,role=api",
            "role=web,role=api",
            &[],
            &[WEB_EU, API, BARE],
        ),
        (
            "example.com/tier=a-1",
            "example.com/tier=a-1",
            &[("x", &[("example.com/tier", "a-1")])],
            &[("x", &[("tier", "a-1")])],
        ),
        (
            "A.b_c-9=X_1.y",
            "A.b_c-9=X_1.y",
            &[("x", &[("A.b_c-9", "X_1.y")])],
            &[BARE],
        ),
        (
            "os=linux,arch in (amd64,arm64)",
            "os=linux,arch in (amd64,arm64)",
            &[("h", &[("os", "linux"), ("arch", "arm64")])],
            &[("h", &[("os", "linux"), ("arch", "riscv64")])],
        ),
        // `name` is the agent's name, and may be a glob.
        (
            "name=web-*",
            "name=web-*",
            &[WEB_EU, WEB_US, ("web-", &[])],
            &[API, BARE, ("web", &[])],
        ),
        ("name!=web-*", "name!=web-*", &[API, BARE], &[WEB_EU]),
        (
            "name in (db1, api-?)",
            "name in (api-?,db1)",
            &[API, BARE],
            &[WEB_EU, ("api-10", &[])],
        ),
        (
            "name notin (b*,db1)",
            "name notin (b*,db1)",
            &[WEB_EU, API],
            &[BARE, ("b", &[])],
        ),
        (
            "name=web-[0-2]",
            "name=web-[0-2]",
            &[WEB_EU, WEB_US],
            &[CANARY],
        ),
        ("name=db1", "name=db1", &[BARE], &[WEB_EU, ("db10", &[])]),
        ("name==.x_y-", "name=.x_y-", &[(".x_y-", &[])], &[BARE]),
        ("name", "name", &[WEB_EU, BARE], &[]),
        ("!name", "!name", &[], &[WEB_EU, BARE]),
        ("name=", "name=", &[("", &[])], &[BARE]),
        // A label called `name` is shadowed by the agent's name.
        (
            "name=foo",
            "name=foo",
            &[("foo", &[])],
            &[("bar", &[("name", "foo")])],
        ),
        (
            "example.com/name=foo",
            "example.com/name=foo",
            &[("bar", &[("example.com/name", "foo")])],
            &[("foo", &[])],
        ),
        // `in` and `notin` are keywords only where an operator goes.
        (
            "in=notin",
            "in=notin",
            &[("x", &[("in", "notin")])],
            &[BARE],
        ),
    ];

    /// (selector, error position, a fragment of the message).
    const INVALID: &[(&str, usize, &str)] = &[
        (
            "role in (web",
            12,
            "expected `,` or `)` to close the set started at column 6, found the end",
        ),
        (
            "role in (web x)",
            13,
            "expected `,` or `)` to close the set started at column 6, found `x`",
        ),
        (
            "role=web,",
            9,
            "expected a label key after `,`, found the end of the selector",
        ),
        (",role", 0, "expected a label key, found `,`"),
        (
            "role=web,,a",
            9,
            "expected a label key after `,`, found `,`",
        ),
        ("=web", 0, "expected a label key, found `=`"),
        ("!=web", 1, "expected a label key after `!`, found `=`"),
        ("!", 1, "expected a label key after `!`"),
        (
            "role web",
            5,
            "expected `=`, `==`, `!=`, `in`, `notin`, `,` or the end of the selector after the key, found `web`",
        ),
        ("role!web", 4, "after the key, found `!`"),
        (
            "role===web",
            6,
            "expected a value (or nothing) after `==`, found `=`",
        ),
        (
            "role=(",
            5,
            "expected a value (or nothing) after `=`, found `(`",
        ),
        (
            "role=web extra",
            9,
            "expected `,` and another requirement, or the end of the selector, found `extra`",
        ),
        ("role=web)", 8, "found `)`"),
        ("!canary=x", 7, "expected `,` and another requirement"),
        (
            "role in web",
            8,
            "expected `(` to open the set of values after `in`, found `web`",
        ),
        (
            "role notin",
            10,
            "expected `(` to open the set of values after `notin`, found the end",
        ),
        ("role in ()", 9, "`in` needs at least one value"),
        ("role in (a,)", 11, "values in a set may not be empty"),
        ("role in (,a)", 9, "values in a set may not be empty"),
        (
            "role=w*",
            6,
            "`*` is a glob character: globs are allowed only in `name` values",
        ),
        ("role in (a,b?)", 12, "`?` is a glob character"),
        ("ro*le", 2, "`*` is a glob character"),
        (
            "-role=x",
            0,
            "a label key must begin and end with a letter or digit",
        ),
        (
            "role-=x",
            4,
            "a label key must begin and end with a letter or digit",
        ),
        (
            "role=x.",
            6,
            "a label value must begin and end with a letter or digit",
        ),
        ("role=a/b", 6, "invalid character `/` in a label value"),
        (
            "Example.com/role=x",
            0,
            "a key prefix is a lowercase DNS name",
        ),
        ("a/b/c=x", 3, "a key has at most one `/`"),
        ("/role=x", 0, "empty prefix before `/`"),
        ("ex..com/r=x", 3, "each dot-separated part of a key prefix"),
        (
            "example.com/=x",
            12,
            "expected the name of a label key after the prefix's `/`",
        ),
        ("rolé=web", 3, "invalid character `é` in a label key"),
        ("role=wéb", 6, "invalid character `é` in a label value"),
        ("role=web\u{a0}", 8, "invalid character `\\u{a0}`"),
        ("role=\u{1f600}", 5, "invalid character"),
        ("ro\0le", 2, "invalid character `\\0`"),
        ("name=web/1", 8, "invalid character `/` in a `name` value"),
        ("name=web-[", 9, "bad glob `web-[`: invalid range pattern"),
        ("name=web**", 7, "bad glob `web**`: recursive wildcards"),
    ];

    #[test]
    fn valid_selectors_render_canonically_and_match() {
        for &(text, canonical, yes, no) in VALID {
            let selector = Selector::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(selector.to_string(), canonical, "{text:?}");
            assert_eq!(Selector::parse(canonical).unwrap(), selector, "{text:?}");
            for (name, labels) in yes {
                assert!(
                    selector.matches(name, *labels),
                    "{text:?} must match {name} {labels:?}"
                );
            }
            for (name, labels) in no {
                assert!(
                    !selector.matches(name, *labels),
                    "{text:?} must not match {name} {labels:?}"
                );
            }
        }
    }

    #[test]
    fn invalid_selectors_say_where_and_what_was_expected() {
        for &(text, position, fragment) in INVALID {
            let error = Selector::parse(text).expect_err(text);
            assert_eq!(error.position, position, "{text:?}: {error}");
            assert!(
                error.message.contains(fragment),
                "{text:?}: {error}\nlacks: {fragment}"
            );
            let shown = error.to_string();
            assert!(
                shown.starts_with(&format!("at column {}: ", position + 1)),
                "{shown}"
            );
        }
    }

    #[test]
    fn the_empty_selector_is_everything() {
        assert!(Selector::everything().is_everything());
        assert!(Selector::parse("  ").unwrap().is_everything());
        assert_eq!(Selector::parse("").unwrap(), Selector::everything());
        assert!(Selector::everything().matches("any", &BTreeMap::new()));
        // `name` matches every agent too, but is written, so it is kept.
        assert!(!Selector::parse("name").unwrap().is_everything());
    }

    #[test]
    fn labels_come_from_maps_and_lists() {
        let selector: Selector = "role=web,!canary".parse().unwrap();
        let mut map = BTreeMap::new();
        map.insert("role".to_owned(), "web".to_owned());
        assert!(selector.matches("a", &map));
        let hashed: HashMap<String, String> = map.clone().into_iter().collect();
        assert!(selector.matches("a", &hashed));
        assert!(selector.matches("a", &[("role", "web")]));
        map.insert("canary".to_owned(), "yes".to_owned());
        assert!(!selector.matches("a", &map));
    }

    #[test]
    fn bounds_are_enforced_with_a_position() {
        let long = format!("role={}", "a".repeat(MAX_LEN));
        let error = Selector::parse(&long).unwrap_err();
        assert_eq!(error.position, MAX_LEN);
        assert!(error.message.contains("at most 4096"), "{error}");
        // Exactly at the limit is fine (a long `name` glob list).
        let values: Vec<String> = (0..MAX_SET_VALUES).map(|i| format!("w{i}*")).collect();
        let fits = format!("name in ({})", values.join(","));
        assert!(Selector::parse(&fits).is_ok());

        let many = vec!["a"; MAX_REQUIREMENTS].join(",");
        assert!(Selector::parse(&many).is_ok());
        let error = Selector::parse(&format!("{many},b")).unwrap_err();
        assert_eq!(error.position, many.len() + 1);
        assert!(
            error.message.contains("more than 64 requirements"),
            "{error}"
        );

        let values: Vec<String> = (0..=MAX_SET_VALUES).map(|i| format!("v{i}")).collect();
        let set = format!("role in ({})", values.join(","));
        let error = Selector::parse(&set).unwrap_err();
        assert_eq!(error.position, set.find("v64").unwrap());
        assert!(error.message.contains("more than 64 values"), "{error}");

        let key = "k".repeat(MAX_KEY_NAME);
        assert!(Selector::parse(&key).is_ok());
        assert_eq!(
            Selector::parse(&format!("{key}k")).unwrap_err().position,
            63
        );
        let prefix = format!("{}com", "a.".repeat(125));
        Selector::parse(&format!("{prefix}/k")).unwrap();
        let error = Selector::parse(&format!("b{prefix}/k")).unwrap_err();
        assert_eq!(error.position, MAX_PREFIX, "{error}");
        let value = "v".repeat(MAX_VALUE);
        assert!(Selector::parse(&format!("k={value}")).is_ok());
        assert_eq!(
            Selector::parse(&format!("k={value}v"))
                .unwrap_err()
                .position,
            65
        );
        let glob = format!("{}*", "n".repeat(MAX_NAME_VALUE - 1));
        assert!(Selector::parse(&format!("name={glob}")).is_ok());
        let error = Selector::parse(&format!("name={glob}n")).unwrap_err();
        assert_eq!(error.position, 5 + MAX_NAME_VALUE, "{error}");
    }

    #[test]
    fn a_config_file_holds_a_selector_as_a_string() {
        #[derive(Debug, Deserialize, Serialize)]
        struct Task {
            target: Selector,
        }
        let task: Task = toml::from_str(r#"target = "role in (web, api), !canary""#).unwrap();
        assert_eq!(task.target.as_str(), "role in (api,web),!canary");
        assert_eq!(
            toml::to_string(&task).unwrap().trim(),
            r#"target = "role in (api,web),!canary""#
        );
        let error = toml::from_str::<Task>(r#"target = "role in (web""#).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("at column 13: expected `,` or `)`"),
            "{error}"
        );
    }
}

/// Generated selectors and garbage: canonical text round-trips, matching
/// agrees with a reference written from the rules, and nothing panics.
/// Deterministic (fixed seeds) and bounded in count, so a failure names its
/// case and repeats.
#[cfg(test)]
mod fuzz {
    use std::fmt::Write as _;

    use super::*;

    /// Cases per property.
    const CASES: usize = 3000;

    const KEYS: [&str; 5] = ["role", "region", "canary", "example.com/tier", "name"];
    const VALUES: [&str; 6] = ["web", "Web", "api", "eu", "", "a.b-c_1"];
    /// Pieces of agent names and of `name` globs.
    const NAME_PIECES: [&str; 7] = ["web", "-", "1", "db", ".", "a", "W"];
    const GLOB_PIECES: [&str; 4] = ["*", "?", "[0-9]", "[a-c]"];
    const SPACE: [&str; 4] = ["", "", " ", " \t"];

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Op {
        Exists,
        Absent,
        Eq,
        NotEq,
        In,
        NotIn,
    }

    /// A requirement as the reference sees it.
    #[derive(Debug)]
    struct Req {
        key: &'static str,
        op: Op,
        values: Vec<String>,
    }

    fn pick<T: Copy>(rng: &mut fastrand::Rng, items: &[T]) -> T {
        items[rng.usize(..items.len())]
    }

    /// A `name` value: pieces and glob characters, never `**` (the glob
    /// crate wants those to be a whole path component).
    fn name_value(rng: &mut fastrand::Rng) -> String {
        let mut value = String::new();
        for _ in 0..rng.usize(1..4) {
            let piece = if rng.usize(..3) == 0 {
                pick(rng, &GLOB_PIECES)
            } else {
                pick(rng, &NAME_PIECES)
            };
            if !(piece == "*" && value.ends_with('*')) {
                value.push_str(piece);
            }
        }
        value
    }

    /// A random valid selector: its text, loosely spaced, and its meaning.
    fn selector(rng: &mut fastrand::Rng) -> (String, Vec<Req>) {
        let mut text = String::new();
        let mut reqs = Vec::new();
        for i in 0..rng.usize(..5) {
            if i > 0 {
                text.push_str(pick(rng, &SPACE));
                text.push(',');
            }
            text.push_str(pick(rng, &SPACE));
            let key = pick(rng, &KEYS);
            let op = pick(
                rng,
                &[Op::Exists, Op::Absent, Op::Eq, Op::NotEq, Op::In, Op::NotIn],
            );
            let value = |rng: &mut fastrand::Rng, in_set: bool| loop {
                let v = if key == "name" {
                    name_value(rng)
                } else {
                    pick(rng, &VALUES).to_owned()
                };
                if !(in_set && v.is_empty()) {
                    return v;
                }
            };
            let values: Vec<String> = match op {
                Op::Exists | Op::Absent => Vec::new(),
                Op::Eq | Op::NotEq => vec![value(rng, false)],
                Op::In | Op::NotIn => (0..rng.usize(1..4)).map(|_| value(rng, true)).collect(),
            };
            let space = |rng: &mut fastrand::Rng| pick(rng, &SPACE);
            match op {
                Op::Exists => text.push_str(key),
                Op::Absent => write!(text, "!{}{key}", space(rng)).unwrap(),
                Op::Eq | Op::NotEq => {
                    let sign = match op {
                        Op::NotEq => "!=",
                        _ if rng.bool() => "==",
                        _ => "=",
                    };
                    let (before, after) = (space(rng), space(rng));
                    write!(text, "{key}{before}{sign}{after}{}", values[0]).unwrap();
                }
                Op::In | Op::NotIn => {
                    let word = if op == Op::In { "in" } else { "notin" };
                    write!(text, "{key} {word}{}(", space(rng)).unwrap();
                    for (j, v) in values.iter().enumerate() {
                        let comma = if j > 0 { "," } else { "" };
                        let (before, after) = (space(rng), space(rng));
                        write!(text, "{comma}{before}{v}{after}").unwrap();
                    }
                    text.push(')');
                }
            }
            text.push_str(pick(rng, &SPACE));
            reqs.push(Req { key, op, values });
        }
        (text, reqs)
    }

    /// A random agent: a name of pieces, and some of the keys' labels
    /// (`name` among them, which no selector may see).
    fn agent(rng: &mut fastrand::Rng) -> (String, Vec<(&'static str, &'static str)>) {
        let name = (0..rng.usize(1..4))
            .map(|_| pick(rng, &NAME_PIECES))
            .collect();
        let mut labels = Vec::new();
        for key in KEYS {
            if rng.bool() {
                labels.push((key, pick(rng, &VALUES)));
            }
        }
        (name, labels)
    }

    /// Glob matching from its definition: `*` any run, `?` any one
    /// character, `[a-c]` one character in the ranges, else itself.
    fn glob_matches(pattern: &[u8], name: &[u8]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some((b'*', rest)) => (0..=name.len()).any(|i| glob_matches(rest, &name[i..])),
            Some((b'?', rest)) => !name.is_empty() && glob_matches(rest, &name[1..]),
            Some((b'[', rest)) => {
                let close = rest.iter().position(|&b| b == b']').unwrap();
                let class = &rest[..close];
                let hit = name.first().is_some_and(|&c| {
                    class.chunks(3).any(|r| {
                        if r.len() == 3 && r[1] == b'-' {
                            (r[0]..=r[2]).contains(&c)
                        } else {
                            r.contains(&c)
                        }
                    })
                });
                hit && glob_matches(&rest[close + 1..], &name[1..])
            }
            Some((&c, rest)) => name.first() == Some(&c) && glob_matches(rest, &name[1..]),
        }
    }

    /// The rules, straight: every requirement holds.
    fn reference(reqs: &[Req], name: &str, labels: &[(&str, &str)]) -> bool {
        reqs.iter().all(|r| {
            let actual = if r.key == "name" {
                Some(name)
            } else {
                labels.label(r.key)
            };
            let hit = |a: &str| {
                r.values.iter().any(|v| {
                    if r.key == "name" {
                        glob_matches(v.as_bytes(), a.as_bytes())
                    } else {
                        v == a
                    }
                })
            };
            match r.op {
                Op::Exists => actual.is_some(),
                Op::Absent => actual.is_none(),
                Op::Eq | Op::In => actual.is_some_and(hit),
                Op::NotEq | Op::NotIn => !actual.is_some_and(hit),
            }
        })
    }

    #[test]
    fn generated_selectors_round_trip_and_match_like_the_reference() {
        let mut rng = fastrand::Rng::with_seed(0x5e1e_c701);
        let mut matched = 0;
        for case in 0..CASES {
            let (text, reqs) = selector(&mut rng);
            let parsed = Selector::parse(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let again = Selector::parse(&parsed.to_string()).unwrap();
            assert_eq!(again, parsed, "{text:?}");
            assert_eq!(
                format!("{:?}", again.requirements),
                format!("{:?}", parsed.requirements),
                "{text:?}"
            );
            for _ in 0..8 {
                let (name, labels) = agent(&mut rng);
                let expected = reference(&reqs, &name, &labels);
                assert_eq!(
                    parsed.matches(&name, labels.as_slice()),
                    expected,
                    "case {case}: {text:?} on {name} {labels:?}"
                );
                matched += usize::from(expected);
            }
        }
        // The generator is useful only if both outcomes are common.
        assert!((CASES..CASES * 7).contains(&matched), "{matched} matches");
    }

    /// Pieces garbage is built from: the syntax, words, and non-ASCII.
    const JUNK: [&str; 20] = [
        "=",
        "==",
        "!=",
        "!",
        ",",
        "(",
        ")",
        " ",
        "in",
        "notin",
        "name",
        "role",
        "web",
        "*",
        "[",
        "]",
        "/",
        "é",
        "\u{1f600}",
        "\0",
    ];

    fn check_error_or_round_trip(text: &str) {
        match Selector::parse(text) {
            Ok(parsed) => {
                assert_eq!(
                    Selector::parse(parsed.as_str()).as_ref(),
                    Ok(&parsed),
                    "{text:?}"
                );
            }
            Err(e) => {
                assert!(e.position <= text.len(), "{text:?}: {e}");
                assert!(text.is_char_boundary(e.position), "{text:?}: {e}");
                assert!(!e.message.is_empty());
            }
        }
    }

    /// 1,000 cases each; a failure is shrunk to the smallest input that
    /// still fails, printed, and not saved beside the sources.
    fn proptest_config() -> proptest::test_runner::Config {
        proptest::test_runner::Config {
            cases: 1000,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        }
    }

    /// Garbage: pieces of the syntax, random bytes made text, or printable
    /// ASCII.
    fn garbage() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            prop::collection::vec(prop::sample::select(&JUNK[..]), 0..12)
                .prop_map(|pieces| pieces.concat()),
            prop::collection::vec(any::<u8>(), 0..24)
                .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
            prop::collection::vec(prop::char::range(' ', '~'), 0..24)
                .prop_map(|chars| chars.into_iter().collect()),
        ]
    }

    /// A generated selector (from a seed: the generator is `selector`'s)
    /// with 1 to 3 edits: a character removed, a piece of syntax or any
    /// character inserted. Shrinking removes edits and simplifies them.
    fn mutated() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let edit = (
            any::<prop::sample::Index>(),
            0..3usize,
            prop::sample::select(&JUNK[..]),
            any::<char>(),
        );
        (any::<u64>(), prop::collection::vec(edit, 1..4)).prop_map(|(seed, edits)| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut chars: Vec<char> = selector(&mut rng).0.chars().collect();
            for (at, kind, junk, c) in edits {
                let at = at.index(chars.len() + 1);
                match kind {
                    0 if at < chars.len() => {
                        chars.remove(at);
                    }
                    1 => chars.splice(at..at, junk.chars()).for_each(drop),
                    _ => chars.insert(at, c),
                }
            }
            chars.into_iter().collect()
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn garbage_never_panics_and_errors_point_into_the_input(text in garbage()) {
            check_error_or_round_trip(&text);
        }

        #[test]
        fn mutated_selectors_never_panic_and_errors_point_into_the_input(text in mutated()) {
            check_error_or_round_trip(&text);
        }
    }
}
