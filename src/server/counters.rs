//! The server's own counters: events that are rare next to task traffic
//! (refused connections and calls, Contact calls, remote commands), plain
//! atomics indexed by a fixed label set so that no label is looked up while
//! serving. Read by the metrics at a scrape (`metrics.rs`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus_client::metrics::histogram::Histogram;
use tonic::Code;

/// The Contact methods, as the `method` label names them.
pub(super) const METHODS: [&str; 5] = ["sendStatus", "getTask", "tellResult", "remoteCMD", "other"];

/// gRPC status codes 0 to 16, as the `code` label names them.
pub(super) const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// How a remote command ended, as the `outcome` label names it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CmdOutcome {
    /// Ran and exited with status 0.
    Ok = 0,
    /// Ran and failed (or was killed at shutdown).
    Failed = 1,
    /// Refused: commands off, not allowed, or not a valid command.
    Denied = 2,
    /// Killed at `remote_cmd.timeout`.
    Timeout = 3,
    /// Refused: `remote_cmd.max_concurrent` running and the queue full.
    Exhausted = 4,
}

pub(super) const CMD_OUTCOMES: [&str; 5] = ["ok", "failed", "denied", "timeout", "exhausted"];

/// Why a connection was closed before it was served.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// `server.max_connections` were open.
    Connections = 0,
    /// Its TLS handshake or HTTP/2 preface failed.
    Handshake = 1,
    /// No handshake within `server.handshake_timeout`.
    HandshakeTimeout = 2,
    /// Its address had `server.max_handshakes_per_address` connections in
    /// their handshake (a plaintext one is answered UNAVAILABLE with a
    /// retry hint). (While all `server.max_handshakes` are taken, new
    /// connections wait in the backlog: none is refused for it.)
    HandshakesPerAddress = 3,
    /// Above `server.accept_rate`: answered UNAVAILABLE with a retry hint
    /// (plaintext; over TLS, connections wait for their turn in the
    /// backlog).
    AcceptRate = 4,
    /// Its address had `server.max_connections_per_address` connections
    /// open.
    ConnectionsPerAddress = 5,
    /// The server was at its open-files limit: accepted with a file kept
    /// spare for it, and closed at once.
    OpenFiles = 6,
}

pub(super) const REFUSALS: [&str; 7] = [
    "max_connections",
    "handshake_failed",
    "handshake_timeout",
    "max_handshakes_per_address",
    "accept_rate",
    "max_connections_per_address",
    "open_files",
];

/// The server's own counters: events that are rare next to task traffic.
#[derive(Debug)]
pub(crate) struct Counters {
    /// Contact calls ended, by method and status code.
    pub(super) calls: [[AtomicU64; CODES.len()]; METHODS.len()],
    /// Contact calls the gate refused before any handler ran, by code.
    pub(super) refused_calls: [AtomicU64; CODES.len()],
    /// Connections closed before they were served, by [`Refusal`].
    pub(super) refused_connections: [AtomicU64; REFUSALS.len()],
    /// Remote commands, by [`CmdOutcome`].
    pub(super) commands: [AtomicU64; CMD_OUTCOMES.len()],
    /// How long remote commands took (run, or refused).
    pub(super) command_seconds: Histogram,
    /// How long unary Contact calls (remoteCMD) took, headers to trailers.
    pub(super) unary_seconds: Histogram,
    /// Bytes produced for all connections and not yet written out
    /// ([`super::outbox`]).
    pub(super) unsent: Arc<AtomicUsize>,
    /// Times a response stream waited for its peer to read
    /// (`server.max_connection_unsent`, `server.max_unsent`).
    pub(super) sends_paused: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            calls: Default::default(),
            refused_calls: Default::default(),
            refused_connections: Default::default(),
            commands: Default::default(),
            command_seconds: Histogram::new(crate::metrics::duration_buckets()),
            unary_seconds: Histogram::new(crate::metrics::duration_buckets()),
            unsent: Arc::default(),
            sends_paused: AtomicU64::new(0),
        }
    }
}

impl Counters {
    /// Counts a Contact call that ended with `code`; `took` is given for
    /// unary calls.
    pub(crate) fn call_ended(&self, method: usize, code: Code, took: Option<Duration>) {
        let code = (code as usize).min(CODES.len() - 1);
        self.calls[method][code].fetch_add(1, Relaxed);
        if let Some(took) = took {
            self.unary_seconds.observe(took.as_secs_f64());
        }
    }

    /// Counts a call the gate refused.
    pub(crate) fn call_refused(&self, code: Code) {
        let code = (code as usize).min(CODES.len() - 1);
        self.refused_calls[code].fetch_add(1, Relaxed);
    }

    /// Counts a connection closed before it was served.
    pub(crate) fn connection_refused(&self, why: Refusal) {
        self.refused_connections[why as usize].fetch_add(1, Relaxed);
    }

    /// Counts a remote command.
    pub(crate) fn command(&self, outcome: CmdOutcome, took: Duration) {
        self.commands[outcome as usize].fetch_add(1, Relaxed);
        self.command_seconds.observe(took.as_secs_f64());
    }
}
