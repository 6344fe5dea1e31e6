//! The server's metrics (`contactd_*`), read at scrape time: per-task
//! counts from the callers' own counters (the ones `contactd agents`
//! shows) and the queue's, gauges from the state they describe; only cold
//! events (refused connections and calls, Contact calls, remote commands)
//! have counters here, all plain atomics indexed by a fixed label set, so
//! no label is looked up while serving.

use std::{
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, histogram::Histogram},
};
use tonic::Code;

use super::State;
use crate::metrics::{counter, gauge, labelled_counter, labelled_gauge};

/// The Contact methods, as the `method` label names them.
pub(super) const METHODS: [&str; 5] = ["sendStatus", "getTask", "tellResult", "remoteCMD", "other"];

/// gRPC status codes 0 to 16, as the `code` label names them.
const CODES: [&str; 17] = [
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

const CMD_OUTCOMES: [&str; 5] = ["ok", "failed", "denied", "timeout", "exhausted"];

/// Why a connection was closed before it was served.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// `server.max_handshakes` connections were in their handshake.
    Handshakes = 0,
    /// `server.max_connections` were open.
    Connections = 1,
    /// Its TLS handshake or HTTP/2 preface failed.
    Handshake = 2,
    /// No handshake within `server.handshake_timeout`.
    HandshakeTimeout = 3,
}

const REFUSALS: [&str; 4] = [
    "max_handshakes",
    "max_connections",
    "handshake_failed",
    "handshake_timeout",
];

/// The server's own counters: events that are rare next to task traffic.
#[derive(Debug)]
pub(crate) struct Counters {
    /// Contact calls ended, by method and status code.
    calls: [[AtomicU64; CODES.len()]; METHODS.len()],
    /// Contact calls the gate refused before any handler ran, by code.
    refused_calls: [AtomicU64; CODES.len()],
    /// Connections closed before they were served, by [`Refusal`].
    refused_connections: [AtomicU64; REFUSALS.len()],
    /// Remote commands, by [`CmdOutcome`].
    commands: [AtomicU64; CMD_OUTCOMES.len()],
    /// How long remote commands took (run, or refused).
    command_seconds: Histogram,
    /// How long unary Contact calls (remoteCMD) took, headers to trailers.
    unary_seconds: Histogram,
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

    /// `grpc_requests_total`: the codes seen, and OK for every method.
    fn encode_calls(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = e.encode_descriptor(
            "grpc_requests",
            "Contact calls by method and gRPC status code: unary and client-stream calls when \
             they end, server and bidi streams when they open (OK) or are refused",
            None,
            MetricType::Counter,
        )?;
        for (method, codes) in METHODS.iter().zip(&self.calls) {
            for (code, count) in CODES.iter().zip(codes) {
                let count = count.load(Relaxed);
                // Only the codes seen: 85 series of zeros say nothing.
                if count > 0 || *code == "OK" {
                    ConstCounter::new(count)
                        .encode(m.encode_family(&[("method", *method), ("code", *code)])?)?;
                }
            }
        }
        Ok(())
    }

    /// Counts a remote command.
    pub(crate) fn command(&self, outcome: CmdOutcome, took: Duration) {
        self.commands[outcome as usize].fetch_add(1, Relaxed);
        self.command_seconds.observe(took.as_secs_f64());
    }
}

/// Reads the server's state at each scrape. Weak: the registry outlives
/// nothing, but a scrape racing the shutdown must not keep the state.
#[derive(Debug)]
pub(super) struct ServerCollector {
    state: Weak<State>,
    /// The id the next published task gets, at start: published tasks
    /// are counted from there.
    first_id: u64,
}

impl ServerCollector {
    pub(super) fn new(state: &Arc<State>) -> ServerCollector {
        ServerCollector {
            state: Arc::downgrade(state),
            first_id: state.hub.next_id(),
        }
    }
}

impl Collector for ServerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        let closing = state.closing.is_cancelled();
        gauge(
            &mut e,
            "serving",
            "1 while the server serves (health SERVING), 0 once it is shutting down",
            u64::from(!closing),
        )?;
        let callers = state.callers.totals();
        labelled_gauge(
            &mut e,
            "agents_connected",
            "Callers with a call open now: named agents, and anonymous (seed) clients by IP address",
            "kind",
            &[
                ("named", callers.connected_named),
                ("anonymous", callers.connected_anonymous),
            ],
        )?;
        labelled_counter(
            &mut e,
            "agent_connections",
            "Times a caller went from no open call to one: a named agent's connection, or an \
             anonymous (seed) client's call",
            "kind",
            &[
                ("named", callers.connections[0]),
                ("anonymous", callers.connections[1]),
            ],
        )?;
        counter(
            &mut e,
            "tasks_published",
            "Tasks published (generated or submitted) since the start",
            state.hub.next_id().saturating_sub(self.first_id),
        )?;
        counter(
            &mut e,
            "tasks_delivered",
            "Tasks sent to agents (each delivery of a task to each agent, redeliveries included)",
            callers.counts.delivered,
        )?;
        labelled_counter(
            &mut e,
            "tasks_acked",
            "Results applied, by the outcome the agent reported",
            "outcome",
            &[
                ("ok", callers.counts.acked),
                ("failed", callers.counts.failed),
            ],
        )?;
        counter(
            &mut e,
            "tasks_skipped",
            "Broadcast: tasks an agent never got because they left retention first (a slow or absent subscriber)",
            callers.counts.missed,
        )?;
        let queue = state.queue.as_ref().map(|q| (q.counters(), q.depths()));
        let (counters, depths) = queue.unwrap_or_default();
        counter(
            &mut e,
            "tasks_redelivered",
            "Queue mode: deliveries after the first, after an ack timeout or a disconnect",
            counters.redelivered,
        )?;
        counter(
            &mut e,
            "tasks_dead",
            "Queue mode: tasks parked as dead after tasks.max_attempts deliveries",
            counters.dead,
        )?;
        labelled_counter(
            &mut e,
            "tasks_dropped",
            "Queue mode: tasks dropped unsent, by reason (max_pending: the queue was full)",
            "reason",
            &[("max_pending", counters.dropped)],
        )?;
        gauge(
            &mut e,
            "tasks_pending",
            "Queue mode: tasks waiting for an agent (not yet sent)",
            depths.waiting as u64,
        )?;
        gauge(
            &mut e,
            "tasks_in_flight",
            "Queue mode: tasks sent and waiting for their ack",
            depths.in_flight as u64,
        )?;
        gauge(
            &mut e,
            "tasks_dead_retained",
            "Queue mode: dead tasks kept for `contactd task retry` (at most tasks.retain)",
            depths.dead as u64,
        )?;
        labelled_counter(
            &mut e,
            "acks_refused",
            "Acks that changed nothing, by reason: not_delivered (the task was not sent to the caller), \
             cancelled (an operator cancelled it), duplicate (queue mode: late or repeated)",
            "reason",
            &[
                ("not_delivered", callers.counts.refused_acks),
                ("cancelled", state.cancelled_acks.load(Relaxed)),
                ("duplicate", counters.duplicate_acks),
            ],
        )?;
        let c = &state.counters;
        c.encode_calls(&mut e)?;
        c.unary_seconds.encode(e.encode_descriptor(
            "grpc_request_duration_seconds",
            "How long unary Contact calls (remoteCMD) took, request headers to response trailers",
            None,
            MetricType::Histogram,
        )?)?;
        let refused: Vec<(&str, u64)> = CODES
            .iter()
            .zip(&c.refused_calls)
            .map(|(code, n)| (*code, n.load(Relaxed)))
            .filter(|(code, n)| {
                *n > 0 || *code == "UNAUTHENTICATED" || *code == "PERMISSION_DENIED"
            })
            .collect();
        labelled_counter(
            &mut e,
            "calls_refused",
            "Contact calls refused on their headers, before any body was read, by gRPC status code",
            "code",
            &refused,
        )?;
        let refused: Vec<(&str, u64)> = REFUSALS
            .iter()
            .zip(&c.refused_connections)
            .map(|(why, n)| (*why, n.load(Relaxed)))
            .collect();
        labelled_counter(
            &mut e,
            "connections_refused",
            "Connections closed before they were served, by reason",
            "reason",
            &refused,
        )?;
        let commands: Vec<(&str, u64)> = CMD_OUTCOMES
            .iter()
            .zip(&c.commands)
            .map(|(outcome, n)| (*outcome, n.load(Relaxed)))
            .collect();
        labelled_counter(
            &mut e,
            "remote_commands",
            "remoteCMD calls, by outcome: ok, failed, denied (not allowed), timeout, exhausted (too many at once)",
            "outcome",
            &commands,
        )?;
        c.command_seconds.encode(e.encode_descriptor(
            "remote_command_duration_seconds",
            "How long remote commands took, refused ones included",
            None,
            MetricType::Histogram,
        )?)?;
        Ok(())
    }
}
