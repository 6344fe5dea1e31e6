//! The agent (`contactd agent`): keeps a session with a server through
//! restarts and network failures, runs the configured handler for each task
//! it receives, acks the result, and reports its status.
//!
//! - [`run`]: the whole agent, until a shutdown token is cancelled; many
//!   can run in one process (tests do).
//! - `reconnect`: sessions one after another, with backoff, forever.
//! - `session`: one connection: getTask, tellResult, sendStatus.
//! - `dispatch`: the bounded task queue and the handler slots.
//! - `handler`: running the handler for one task and making its ack.
//! - `memory`: handled tasks (dedup) and unsent acks, both bounded.
//! - [`spool`]: both of those kept across agent restarts, in a file.
//!
//! Shutdown: cancelling the token stops taking tasks (queued ones are
//! dropped unacked, so the server redelivers them), lets running handlers
//! finish within `shutdown_grace` (then kills them), sends their acks over
//! the current session if there is one, and returns.

mod dispatch;
mod facts;
mod handler;
mod memory;
mod metrics;
mod reconnect;
mod session;
pub mod spool;
mod status;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use handler::{ENV_AGENT, ENV_TASK_ATTEMPT, ENV_TASK_ID, Handler};
pub use memory::{Handled, Outbox, Pending, Seen, TaskKey};
pub use session::SessionError;

use crate::{
    config::AgentConfig,
    proto::contact::{Outcome, ServerMsg},
};

/// Tasks received but not yet running, at most.
const QUEUE: usize = 256;
/// Acks not yet handed to a session, at most.
const MAX_PENDING_ACKS: usize = 4096;
/// After killing handlers at the end of the grace period, how long to wait
/// for them to end.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// At shutdown, how long sending the last acks may take.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Why the agent stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A session failed in a way retrying cannot fix (a bad URL or name).
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the agent has no server to connect to: set agent.servers")]
    NoServers,
}

/// Something the agent did, with when, for tests and monitoring.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEvent {
    pub at: Instant,
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// A connection attempt begins.
    Connecting { server: String },
    /// The session is up: getTask, tellResult and sendStatus are open.
    Connected { server: String },
    /// A connection attempt or a session failed.
    Failed { server: String, error: String },
    /// The next attempt comes after this delay.
    Waiting { delay: Duration },
    /// A task was handled and its ack queued.
    Handled { task_id: u64, outcome: Outcome },
    /// A task delivered again was acked from memory, not run.
    Reacked { task_id: u64 },
    /// The agent has stopped.
    Stopped,
}

/// What [`run`] runs with. [`Run::new`] gives the two an agent cannot do
/// without.
#[derive(Debug)]
pub struct Run {
    /// The config in force, and every reloaded one after it.
    pub config: watch::Receiver<Arc<AgentConfig>>,
    /// Cancelled to drain and stop (SIGTERM).
    pub shutdown: CancellationToken,
    /// Where what the agent does is reported (tests watch it).
    pub events: Option<broadcast::Sender<AgentEvent>>,
    /// Serves `GET /metrics` too.
    pub metrics: Option<crate::metrics::Endpoint>,
    /// The spool, opened by the caller ([`spool::Spool::open`]): what the
    /// agent handled and has not delivered is kept across restarts.
    /// Without one (tests, embedders), only in memory.
    pub spool: Option<spool::Opened>,
}

impl Run {
    /// An agent following `config` until `shutdown`.
    pub fn new(config: watch::Receiver<Arc<AgentConfig>>, shutdown: CancellationToken) -> Run {
        Run {
            config,
            shutdown,
            events: None,
            metrics: None,
            spool: None,
        }
    }
}

/// Runs an agent until `run.shutdown` is cancelled, following config
/// changes sent on `run.config`, reporting what it does on `run.events` and
/// serving metrics on `run.metrics` if given.
///
/// # Errors
/// Only what retrying cannot fix ([`AgentError`]); connection failures are
/// retried forever.
pub async fn run(run: Run) -> Result<(), AgentError> {
    let Run {
        config,
        shutdown,
        events,
        metrics: endpoint,
        spool,
    } = run;
    let initial = Arc::clone(&config.borrow());
    if initial.servers.is_empty() {
        return Err(AgentError::NoServers);
    }
    let (queue_tx, queue_rx) = mpsc::channel(QUEUE);
    let mut handled = Handled::new(initial.remember);
    let outbox = Outbox::new(MAX_PENDING_ACKS);
    let spool = spool.map(|opened| {
        let spool::Opened { spool, recovered } = opened;
        let interrupted = recovered.interrupted.len();
        tracing::info!(
            path = %spool.path().display(),
            handled = recovered.handled.len(),
            to_resend = recovered.undelivered.len(),
            interrupted,
            "agent spool opened"
        );
        if interrupted > 0 {
            tracing::warn!(
                interrupted,
                task_ids = ?recovered.interrupted,
                "tasks whose handler was running when the agent stopped: not run again, \
                 acked as FAILED (interrupted)"
            );
        }
        for (key, ack) in recovered.handled {
            handled.check(key);
            handled.done(key, ack);
        }
        for (key, ack) in recovered.undelivered {
            outbox.push((Some(key), ack));
        }
        spool
    });
    let shared = Arc::new(Shared {
        handled: Mutex::new(handled),
        outbox,
        spool,
        room: tokio::sync::Notify::new(),
        config,
        succeeded: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        counters: metrics::Counters::default(),
        events,
        queue: queue_tx,
        draining: CancellationToken::new(),
        finished: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let kill = CancellationToken::new();
    // Stopped with the agent (the server's is stopped by its shutdown).
    let stop_metrics = CancellationToken::new();
    let _stop_metrics = stop_metrics.clone().drop_guard();
    if let Some(endpoint) = endpoint {
        let collector = metrics::AgentCollector::new(&shared);
        tokio::spawn(endpoint.serve(&initial.metrics, collector, stop_metrics));
    }
    // If this future is dropped, stop the dispatcher and kill the handlers.
    let _stop = (
        shared.draining.clone().drop_guard(),
        kill.clone().drop_guard(),
    );
    let dispatcher = tokio::spawn(dispatch::dispatch(
        Arc::clone(&shared),
        queue_rx,
        tracker.clone(),
        kill.clone(),
    ));
    tracing::info!(name = %initial.name, servers = ?initial.servers, "agent starting");
    let connection = reconnect::connect_loop(Arc::clone(&shared));
    tokio::pin!(connection);
    tokio::select! {
        result = &mut connection => result?,
        () = shutdown.cancelled() => {}
    }

    let grace = shared.config().shutdown_grace;
    tracing::info!(
        grace = %humantime::format_duration(grace),
        "shutting down: taking no new tasks, letting running handlers finish"
    );
    shared.draining.cancel();
    let handlers = async {
        let _ = dispatcher.await;
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                running = tracker.len(),
                "handlers still running at the end of agent.shutdown_grace: killing them"
            );
            kill.cancel();
            let _ = tokio::time::timeout(KILL_WAIT, tracker.wait()).await;
        }
        shared.finished.cancel();
    };
    let flush = async {
        let _ = tokio::time::timeout(grace + KILL_WAIT + FLUSH_LIMIT, &mut connection).await;
    };
    tokio::join!(handlers, flush);
    let unsent = shared.outbox.len();
    if let Some(spool) = &shared.spool {
        spool.flush().await;
        if unsent > 0 {
            tracing::info!(
                unsent,
                "acks not sent (no session): kept in the spool, sent after the restart"
            );
        }
    } else if unsent > 0 {
        tracing::warn!(
            unsent,
            "acks not sent (no session): the server will deliver those tasks again"
        );
    }
    shared.emit(EventKind::Stopped);
    tracing::info!("agent stopped");
    Ok(())
}

/// What the agent's parts share.
struct Shared {
    config: watch::Receiver<Arc<AgentConfig>>,
    /// Tasks handled and in flight, for dedup.
    handled: Mutex<Handled>,
    /// Acks waiting for a session.
    outbox: Outbox,
    /// What is handled and undelivered, kept across restarts (if kept).
    spool: Option<spool::Spool>,
    /// Notified when delivered acks are recorded in the spool: tasks
    /// waiting for room in it look again.
    room: tokio::sync::Notify,
    /// Tasks handled with an OK / a FAILED outcome, for the status line.
    succeeded: AtomicU64,
    failed: AtomicU64,
    /// What only the metrics read.
    counters: metrics::Counters,
    events: Option<broadcast::Sender<AgentEvent>>,
    /// Received tasks on their way to a handler.
    queue: mpsc::Sender<dispatch::Job>,
    /// Cancelled at shutdown: take no new tasks, do not reconnect.
    draining: CancellationToken,
    /// Cancelled when the last handler has ended: send the remaining acks
    /// and end the session.
    finished: CancellationToken,
}

/// For the metrics collector, which holds a `Weak<Shared>` (collectors
/// must be `Debug`).
impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    fn config(&self) -> Arc<AgentConfig> {
        Arc::clone(&self.config.borrow())
    }

    fn emit(&self, kind: EventKind) {
        let c = &self.counters;
        match &kind {
            EventKind::Connected { .. } => {
                c.connected.store(true, Ordering::Relaxed);
                c.connections.fetch_add(1, Ordering::Relaxed);
                let now = crate::clock::now_ms();
                c.last_connected_ms
                    .store(u64::try_from(now).unwrap_or(0), Ordering::Relaxed);
            }
            EventKind::Failed { .. } => {
                c.connected.store(false, Ordering::Relaxed);
                c.failures.fetch_add(1, Ordering::Relaxed);
            }
            EventKind::Reacked { .. } => {
                c.reacked.fetch_add(1, Ordering::Relaxed);
            }
            EventKind::Stopped => c.connected.store(false, Ordering::Relaxed),
            _ => {}
        }
        if let Some(events) = &self.events {
            // Nobody listening is fine.
            let _ = events.send(AgentEvent {
                at: Instant::now(),
                kind,
            });
        }
    }

    /// Takes a task from the session: queues it for a handler, or acks it
    /// again if it was handled before. Waits while the queue is full.
    async fn intake(&self, task: ServerMsg) {
        let key = TaskKey::with_epoch(task.epoch, task.id, &task.task, task.retry);
        // Id 0: a server that does not number its tasks; nothing to dedup by.
        if task.id != 0 {
            let seen = self.handled.lock().check(key);
            match seen {
                Seen::New => {}
                Seen::InFlight => {
                    tracing::debug!(task_id = task.id, "task delivered again while in flight");
                    return;
                }
                Seen::Done(ack) => {
                    tracing::debug!(
                        task_id = task.id,
                        attempt = task.attempt,
                        "task delivered again: acking the remembered outcome"
                    );
                    self.push_ack((Some(key), ack));
                    self.emit(EventKind::Reacked { task_id: task.id });
                    return;
                }
            }
        }
        tracing::debug!(task_id = task.id, attempt = task.attempt, "task received");
        let queued = tokio::select! {
            biased;
            () = self.draining.cancelled() => false,
            sent = self.queue.send(dispatch::Job { task, key }) => sent.is_ok(),
        };
        if !queued {
            self.handled.lock().abandon(key);
        }
    }

    fn push_ack(&self, ack: Pending) {
        if let Some(dropped) = self.outbox.push(ack) {
            self.dropped_ack(&dropped);
        }
    }

    fn dropped_ack(&self, (_, dropped): &Pending) {
        self.counters.acks_dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            task_id = dropped.task_id,
            "too many unsent acks: dropped one from memory (the server will deliver its task \
             again; a spool keeps it until then)"
        );
    }
}
