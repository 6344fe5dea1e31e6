//! The agent's metrics (`contactd_agent_*`): its session, the tasks it
//! handled (the counters its status line already reports), its queues,
//! read at scrape time.

use std::sync::{
    Arc, Weak,
    atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, histogram::Histogram},
};

use super::{QUEUE, Shared};
use crate::metrics::{counter, gauge, labelled_counter};

/// What the agent counts for its metrics alone.
#[derive(Debug)]
pub(super) struct Counters {
    /// Whether a session is up.
    pub(super) connected: AtomicBool,
    /// Sessions established.
    pub(super) connections: AtomicU64,
    /// Connection attempts and sessions that failed.
    pub(super) failures: AtomicU64,
    /// When the latest session was established (unix ms; 0: never).
    pub(super) last_connected_ms: AtomicU64,
    /// Tasks delivered again and acked from memory, not run.
    pub(super) reacked: AtomicU64,
    /// Acks dropped unsent, the oldest first, with the outbox full.
    pub(super) acks_dropped: AtomicU64,
    /// Tasks not started because the spool could not record them (a
    /// failed write; or full, at a drain or stop while they waited).
    pub(super) spool_refused: AtomicU64,
    /// Tasks that waited for room in a full spool before they started.
    pub(super) spool_waits: AtomicU64,
    /// How long handlers ran.
    pub(super) handler_seconds: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_connected_ms: AtomicU64::new(0),
            reacked: AtomicU64::new(0),
            acks_dropped: AtomicU64::new(0),
            spool_refused: AtomicU64::new(0),
            spool_waits: AtomicU64::new(0),
            handler_seconds: Histogram::new(crate::metrics::duration_buckets()),
        }
    }
}

/// Reads the agent's state at each scrape.
#[derive(Debug)]
pub(super) struct AgentCollector(pub(super) Weak<Shared>);

impl AgentCollector {
    pub(super) fn new(shared: &Arc<Shared>) -> AgentCollector {
        AgentCollector(Arc::downgrade(shared))
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(shared) = self.0.upgrade() else {
            return Ok(());
        };
        let c = &shared.counters;
        gauge(
            &mut e,
            "connected",
            "1 while a session with a server is up",
            u64::from(c.connected.load(Relaxed)),
        )?;
        counter(
            &mut e,
            "sessions",
            "Sessions established with a server (the first and every reconnection)",
            c.connections.load(Relaxed),
        )?;
        counter(
            &mut e,
            "connect_failures",
            "Connection attempts and sessions that failed",
            c.failures.load(Relaxed),
        )?;
        gauge(
            &mut e,
            "last_connected_timestamp_seconds",
            "When the latest session was established, in seconds since the Unix epoch (0: never)",
            c.last_connected_ms.load(Relaxed) as f64 / 1000.0,
        )?;
        labelled_counter(
            &mut e,
            "tasks_handled",
            "Tasks run by the handler, by outcome",
            "outcome",
            &[
                ("ok", shared.succeeded.load(Relaxed)),
                ("failed", shared.failed.load(Relaxed)),
            ],
        )?;
        counter(
            &mut e,
            "tasks_reacked",
            "Tasks delivered again and acked from memory, not run again",
            c.reacked.load(Relaxed),
        )?;
        c.handler_seconds.encode(e.encode_descriptor(
            "handler_duration_seconds",
            "How long the handler ran per task",
            None,
            MetricType::Histogram,
        )?)?;
        gauge(
            &mut e,
            "tasks_queued",
            "Tasks received and waiting for a handler slot",
            (QUEUE - shared.queue.capacity()) as u64,
        )?;
        gauge(
            &mut e,
            "acks_unsent",
            "Acks waiting for a session to be sent",
            shared.outbox.len() as u64,
        )?;
        counter(
            &mut e,
            "acks_dropped",
            "Acks dropped unsent because too many waited for a session (the server delivers their tasks again)",
            c.acks_dropped.load(Relaxed),
        )?;
        counter(
            &mut e,
            "spool_refused",
            "Tasks not started (nor acked: the server delivers them again) because the spool could not record them (a failed write; or agent.spool_max_size reached, at a drain or stop while they waited)",
            c.spool_refused.load(Relaxed),
        )?;
        counter(
            &mut e,
            "spool_waits",
            "Tasks that waited for room in the spool before they started (agent.spool_max_size reached with only undelivered results in it)",
            c.spool_waits.load(Relaxed),
        )?;
        Ok(())
    }
}
