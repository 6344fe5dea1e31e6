//! New connections admitted at `server.accept_rate` (over a burst of
//! `server.accept_burst`), so that a fleet reconnecting at once, as after a
//! restart, is taken at a pace the server keeps up with instead of all
//! together: a storm costs time, not memory or refused agents.
//!
//! The pace is the generic cell rate algorithm (a token bucket kept as one
//! "theoretical arrival time"): a connection may be admitted when that time
//! is at most the burst ahead of now. What comes above the pace:
//!
//! - over TLS, it waits for its turn before it is even accepted: in the
//!   listening socket's backlog, which costs the server nothing (answering
//!   it in gRPC would need the very TLS handshake that the pace bounds);
//! - in plaintext, it is answered at once by a small HTTP/2 responder:
//!   every call UNAVAILABLE with gRPC's retry hint (`grpc-retry-pushback-ms`),
//!   each connection turned away given its own later turn, so that the
//!   agents that honour the hint come back at the pace. At most
//!   `server.max_handshakes` answers are under way at once; while all are,
//!   the next connection waits in the backlog for a free one or its turn.
//!   None is closed unanswered.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;

/// How long a connection turned away has to send its call and read the
/// answer: a client sends its call at once, and a peer that sends nothing
/// must not hold one of the (bounded) answers in progress for long.
pub(super) const TURN_AWAY_LIMIT: Duration = Duration::from_secs(2);

/// Longest retry hint given: turns further ahead are not promised.
const MAX_HINT: Duration = Duration::from_secs(60);

/// What a connection turned away is told.
const BUSY: &str = "server busy: too many new connections at once (server.accept_rate); \
                    call again after the retry hint";

/// The pace of admissions.
#[derive(Debug)]
pub(super) struct Pace {
    /// Time between two admissions at the rate.
    interval: Duration,
    /// How far ahead of now the theoretical arrival time may be: the burst.
    tolerance: Duration,
    /// When the next admission is due at the rate (GCRA's TAT).
    due: Instant,
    /// The next turn to give a connection turned away.
    next_hint: Instant,
}

/// A connection's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Turn {
    /// Now.
    Now,
    /// After this wait.
    After(Duration),
}

impl Pace {
    /// `rate` admissions a second, `burst` of them at once after a quiet
    /// time.
    pub(super) fn new(rate: u32, burst: u32, now: Instant) -> Pace {
        let interval = Duration::from_secs(1) / rate.max(1);
        Pace {
            interval,
            tolerance: interval * burst.max(1).saturating_sub(1),
            due: now,
            next_hint: now,
        }
    }

    /// When the next connection may be admitted, as seen at `now`.
    pub(super) fn turn(&self, now: Instant) -> Turn {
        let earliest = self.due.checked_sub(self.tolerance).unwrap_or(now).max(now);
        if earliest <= now {
            Turn::Now
        } else {
            Turn::After(earliest - now)
        }
    }

    /// Admits a connection at `now` (its turn has come, or it is admitted
    /// anyway).
    pub(super) fn admit(&mut self, now: Instant) {
        self.due = self.due.max(now) + self.interval;
    }

    /// A turn for a connection turned away at `now`: after the admissions
    /// already due, and after every turn given before, one interval apart.
    pub(super) fn hint(&mut self, now: Instant) -> Duration {
        let Turn::After(wait) = self.turn(now) else {
            return Duration::ZERO;
        };
        let turn = self.next_hint.max(now + wait);
        self.next_hint = turn + self.interval;
        (turn - now).min(MAX_HINT)
    }
}

/// Answers every call on `stream` UNAVAILABLE with the retry hint `after`,
/// then closes it (GOAWAY), all within `limit`. Nothing of the caller's is
/// read beyond the call headers.
pub(super) async fn turn_away(stream: TcpStream, after: Duration, limit: Duration) {
    let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    let answer = async move {
        let mut connection = h2::server::Builder::new()
            .max_concurrent_streams(8)
            .initial_window_size(1024)
            .max_header_list_size(16 * 1024)
            .handshake::<_, Bytes>(stream)
            .await?;
        while let Some(call) = connection.accept().await {
            let (_, mut respond) = call?;
            // Trailers-only: the status in the headers, no body.
            let response = http::Response::builder()
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", "14")
                .header("grpc-message", BUSY)
                .header(crate::proto::RETRY_HINT, ms)
                .body(())
                .expect("a valid response");
            let _ = respond.send_response(response, true);
            // No more calls on this connection: GOAWAY, and the loop ends
            // once the calls in flight are answered.
            connection.graceful_shutdown();
        }
        Ok::<_, h2::Error>(())
    };
    let _ = tokio::time::timeout(limit, answer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let mut pace = Pace::new(10, 3, start);
        for _ in 0..3 {
            assert_eq!(pace.turn(start), Turn::Now);
            pace.admit(start);
        }
        assert_eq!(pace.turn(start), Turn::After(Duration::from_millis(100)));
        let later = start + Duration::from_millis(100);
        assert_eq!(pace.turn(later), Turn::Now);
        pace.admit(later);
        assert_eq!(pace.turn(later), Turn::After(Duration::from_millis(100)));
        // A quiet second refills the burst, and no more.
        let quiet = later + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(pace.turn(quiet), Turn::Now);
            pace.admit(quiet);
        }
        assert_ne!(pace.turn(quiet), Turn::Now);
    }

    #[test]
    fn connections_turned_away_get_turns_one_interval_apart() {
        let start = Instant::now();
        let mut pace = Pace::new(10, 1, start);
        assert_eq!(pace.hint(start), Duration::ZERO);
        pace.admit(start);
        let hints: Vec<u128> = (0..4).map(|_| pace.hint(start).as_millis()).collect();
        assert_eq!(hints, [100, 200, 300, 400]);
        // Never further than MAX_HINT.
        for _ in 0..10_000 {
            pace.hint(start);
        }
        assert_eq!(pace.hint(start), MAX_HINT);
        // Turns already passed are not given.
        let later = start + Duration::from_secs(3600);
        pace.admit(later);
        assert_eq!(pace.hint(later), Duration::from_millis(100));
    }
}
