//! The server's metrics (`contactd_*`), read at scrape time: per-task
//! counts from the callers' own counters (the ones `contactd agents`
//! shows) and the queue's, gauges from the state they describe; only cold
//! events (refused connections and calls, Contact calls, remote commands)
//! have counters here, all plain atomics indexed by a fixed label set, so
//! no label is looked up while serving.

use std::sync::{Arc, Weak, atomic::Ordering::Relaxed};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};

use super::{
    counters::{CMD_OUTCOMES, CODES, Counters, METHODS, REFUSALS},
    state::State,
};
use crate::metrics::{counter, gauge, labelled_counter, labelled_gauge};

impl Counters {
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
            first_id: state.broker.stats().next_id,
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
        let stats = state.broker.stats();
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
            stats.next_id.saturating_sub(self.first_id),
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
        let (counters, depths) = (stats.queue, stats.depths);
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
                ("cancelled", stats.cancelled_acks),
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
