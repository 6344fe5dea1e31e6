//! Caller input on its way into a log line or a status message: escaped and
//! cut, through [`shown`], so it is data and never format.
//!
//! A caller controls `cmdStr`, `log`, status and result texts. Written raw,
//! a newline forges a log line, a CR or an escape sequence rewrites a
//! terminal, and a 4 MB string rotates the log history away or makes a
//! gRPC trailer no client accepts. Shown through [`shown`], control
//! characters are visible (`\n`, `\u{1b}`), the text stops after
//! [`SHOWN_BYTES`] bytes of input, and a cut says how long the original was.
//!
//! [`Budget`] rate-limits lines a caller can make the server write
//! (refusals, the HTTP/2 layer's complaints about abusive peers).

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use parking_lot::Mutex;

/// Input bytes shown before the text is cut (on a character boundary).
pub const SHOWN_BYTES: usize = 256;

/// `text`, escaped and cut, for a log line or a status message.
pub fn shown(text: &str) -> Shown<'_> {
    Shown(text)
}

/// See [`shown`].
#[derive(Clone, Copy)]
pub struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        let text = self.0;
        let kept = &text[..text.floor_char_boundary(SHOWN_BYTES)];
        for c in kept.chars() {
            match c {
                // Quotes are harmless and common in command lines: left as they are.
                '"' | '\'' => f.write_char(c)?,
                // Backslashes, control and invisible characters are escaped.
                c => write!(f, "{}", c.escape_debug())?,
            }
        }
        if kept.len() < text.len() {
            write!(f, "…[{} bytes in all]", text.len())?;
        }
        Ok(())
    }
}

/// `text` with the escaping of [`shown`] and none of its cutting: for a
/// table cell an operator's terminal shows (an agent's status, a task's
/// result), so a newline cannot forge a row and an escape sequence cannot
/// rewrite the screen. Borrowed when nothing needs escaping.
pub fn escaped(text: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| c == '"' || c == '\'' || c.escape_debug().len() == 1;
    if text.chars().all(plain) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if plain(c) {
            out.push(c);
        } else {
            use fmt::Write;
            let _ = write!(out, "{}", c.escape_debug());
        }
    }
    std::borrow::Cow::Owned(out)
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// How often each kind of refusal (of a connection, a call, an ack) is
/// logged at most.
pub const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// At most `per_window` events per `window`; the rest are counted, so the
/// next allowed line can say how many were left out.
///
/// Timed with the coarse monotonic clock (a few milliseconds of
/// resolution): a flood of refused calls reads it once per event, and the
/// precise clock cost more than the rest of refusing a forged ack.
#[derive(Debug)]
pub struct Budget {
    per_window: u32,
    window: Duration,
    /// Start of the current window (coarse clock), events in it.
    state: Mutex<(Duration, u32)>,
    /// Events left out since the last one let through.
    suppressed: AtomicU64,
}

impl Budget {
    /// A budget of `per_window` events every `window`.
    pub fn new(per_window: u32, window: Duration) -> Budget {
        Budget {
            per_window,
            window,
            state: Mutex::new((coarse_now(), 0)),
            suppressed: AtomicU64::new(0),
        }
    }

    /// A budget of one event every `window`.
    pub fn every(window: Duration) -> Budget {
        Budget::new(1, window)
    }

    /// Counts this event; when it may be logged, calls `log` with the
    /// number of events since the last one logged, this one included.
    pub fn hit(&self, log: impl FnOnce(u64)) {
        if let Some(left_out) = self.admit() {
            log(left_out + 1);
        }
    }

    /// `Some(n)` if this event may be logged, `n` being how many were left
    /// out before it; `None` if it is to be left out (and counted).
    pub fn admit(&self) -> Option<u64> {
        self.allow()
            .then(|| self.suppressed.swap(0, Ordering::Relaxed))
    }

    /// Whether this event may be logged; if not, it is counted, for
    /// [`take_suppressed`](Self::take_suppressed).
    pub fn allow(&self) -> bool {
        let now = coarse_now();
        let mut state = self.state.lock();
        if now.saturating_sub(state.0) >= self.window {
            *state = (now, 0);
        }
        if state.1 < self.per_window {
            state.1 += 1;
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Counts one more event left out (by another budget).
    pub fn count_suppressed(&self) {
        self.suppressed.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the count of events left out so far (for a periodic report).
    pub fn take_suppressed(&self) -> u64 {
        self.suppressed.swap(0, Ordering::Relaxed)
    }
}

/// The coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`: no hardware
/// clock read, a few milliseconds of resolution).
fn coarse_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_visible_and_long_text_is_cut() {
        assert_eq!(
            shown("ls\n2026 INFO forged\r\0\u{1b}[2J").to_string(),
            "ls\\n2026 INFO forged\\r\\0\\u{1b}[2J"
        );
        assert_eq!(
            shown("echo 'a \"b\"' \\").to_string(),
            "echo 'a \"b\"' \\\\"
        );
        let long = "é".repeat(1000);
        let out = shown(&long).to_string();
        assert!(out.ends_with("…[2000 bytes in all]"), "{out}");
        assert_eq!(out.matches('é').count(), SHOWN_BYTES / 2);
        assert_eq!(shown("").to_string(), "");
    }

    #[test]
    fn escaped_text_is_shown_text_uncut() {
        assert_eq!(escaped("plain é 'q' \"d\""), "plain é 'q' \"d\"");
        assert!(matches!(escaped("plain"), std::borrow::Cow::Borrowed(_)));
        let hostile = "ok\n2026 INFO forged\r\u{1b}[2J\\";
        assert_eq!(escaped(hostile), shown(hostile).to_string());
        let long = "\n".repeat(SHOWN_BYTES * 2);
        assert_eq!(escaped(&long).len(), long.len() * 2, "not cut");
    }

    #[test]
    fn a_budget_lets_through_its_share_and_counts_the_rest() {
        let budget = Budget::new(2, Duration::from_secs(3600));
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), None);
        assert_eq!(budget.admit(), None);
        assert_eq!(budget.take_suppressed(), 2);
        assert_eq!(budget.take_suppressed(), 0);
        let budget = Budget::new(1, Duration::ZERO);
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), Some(0), "a new window");
        let budget = Budget::every(Duration::from_secs(3600));
        let mut logged = Vec::new();
        for _ in 0..3 {
            budget.hit(|count| logged.push(count));
        }
        assert_eq!(logged, [1], "the first, then none within the window");
        assert_eq!(budget.take_suppressed(), 2);
    }
}
