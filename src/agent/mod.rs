//! The agent (`contactd agent`): keeps a session with a server through
//! restarts and network failures, runs the configured handler for each task
//! it receives, acks the result, and reports its status.
//!
//! - [`run`] / [`run_with`]: the whole agent, until a shutdown token is
//!   cancelled; many can run in one process (tests do).
//! - `session`: one connection: getTask, tellResult, sendStatus.
//! - [`Backoff`]: reconnection delays as a pure value.
//! - `handler`: running the handler for one task and making its ack.
//! - `memory`: handled tasks (dedup) and unsent acks, both bounded.
//! - [`command`]: the `agent` command: config, logging, signals, systemd.
//!
//! Shutdown: cancelling the token stops taking tasks (queued ones are
//! dropped unacked, so the server redelivers them), lets running handlers
//! finish within `shutdown_grace` (then kills them), sends their acks over
//! the current session if there is one, and returns.

mod backoff;
pub mod command;
mod handler;
mod memory;
mod session;
mod status;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use backoff::Backoff;
pub use handler::{ENV_AGENT, ENV_TASK_ATTEMPT, ENV_TASK_ID, Handler};
pub use memory::{Handled, Outbox, Seen, TaskKey};
pub use session::SessionError;

use crate::{
    config::AgentConfig,
    proto::contact::{Outcome, ServerMsg},
    systemd,
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

/// Runs an agent with a fixed config until `shutdown` is cancelled.
///
/// # Errors
/// Only what retrying cannot fix ([`AgentError`]); connection failures are
/// retried forever.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let (_keep, config) = watch::channel(Arc::new(config));
    run_with(config, shutdown, None).await
}

/// Runs an agent until `shutdown` is cancelled, following config changes
/// sent on `config`, and reporting what it does on `events` if given.
///
/// # Errors
/// As [`run`].
pub async fn run_with(
    config: watch::Receiver<Arc<AgentConfig>>,
    shutdown: CancellationToken,
    events: Option<broadcast::Sender<AgentEvent>>,
) -> Result<(), AgentError> {
    let initial = Arc::clone(&config.borrow());
    if initial.servers.is_empty() {
        return Err(AgentError::NoServers);
    }
    let (queue_tx, queue_rx) = mpsc::channel(QUEUE);
    let shared = Arc::new(Shared {
        handled: Mutex::new(Handled::new(initial.remember)),
        outbox: Outbox::new(MAX_PENDING_ACKS),
        config,
        succeeded: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        events,
        queue: queue_tx,
        draining: CancellationToken::new(),
        finished: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let kill = CancellationToken::new();
    // If this future is dropped, stop the dispatcher and kill the handlers.
    let _stop = (
        shared.draining.clone().drop_guard(),
        kill.clone().drop_guard(),
    );
    let dispatcher = tokio::spawn(dispatch(
        Arc::clone(&shared),
        queue_rx,
        tracker.clone(),
        kill.clone(),
    ));
    tracing::info!(name = %initial.name, servers = ?initial.servers, "agent starting");
    let connection = connect_loop(Arc::clone(&shared));
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
    systemd::stopping();
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
    if unsent > 0 {
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
    /// Tasks handled with an OK / a FAILED outcome, for the status line.
    succeeded: AtomicU64,
    failed: AtomicU64,
    events: Option<broadcast::Sender<AgentEvent>>,
    /// Received tasks on their way to a handler.
    queue: mpsc::Sender<Job>,
    /// Cancelled at shutdown: take no new tasks, do not reconnect.
    draining: CancellationToken,
    /// Cancelled when the last handler has ended: send the remaining acks
    /// and end the session.
    finished: CancellationToken,
}

impl Shared {
    fn config(&self) -> Arc<AgentConfig> {
        Arc::clone(&self.config.borrow())
    }

    fn emit(&self, kind: EventKind) {
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
        let key = TaskKey::new(task.id, &task.task);
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
                    self.push_ack(ack);
                    self.emit(EventKind::Reacked { task_id: task.id });
                    return;
                }
            }
        }
        tracing::debug!(task_id = task.id, attempt = task.attempt, "task received");
        let queued = tokio::select! {
            biased;
            () = self.draining.cancelled() => false,
            sent = self.queue.send(Job { task, key }) => sent.is_ok(),
        };
        if !queued {
            self.handled.lock().abandon(key);
        }
    }

    fn push_ack(&self, ack: crate::proto::contact::Result) {
        if let Some(dropped) = self.outbox.push(ack) {
            tracing::warn!(
                task_id = dropped.task_id,
                "too many unsent acks: dropped the oldest (the server will deliver its task again)"
            );
        }
    }
}

/// A task waiting for a handler.
struct Job {
    task: ServerMsg,
    key: TaskKey,
}

/// Starts queued tasks, at most `handler_concurrency` at once, until the
/// agent drains; queued tasks left then are forgotten (not acked).
async fn dispatch(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<Job>,
    tracker: TaskTracker,
    kill: CancellationToken,
) {
    let mut limit = shared.config().handler_concurrency;
    let mut slots = Arc::new(Semaphore::new(limit));
    loop {
        let job = tokio::select! {
            biased;
            () = shared.draining.cancelled() => break,
            job = queue.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        let config = shared.config();
        if config.handler_concurrency != limit {
            // Handlers holding the old slots finish on their own; for a
            // while both limits apply.
            limit = config.handler_concurrency;
            slots = Arc::new(Semaphore::new(limit));
        }
        let slot = tokio::select! {
            biased;
            () = shared.draining.cancelled() => {
                shared.handled.lock().abandon(job.key);
                break;
            }
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let handler = Handler {
            argv: config.handler.clone(),
            timeout: config.handler_timeout,
            max_output: config.max_output.as_u64() as usize,
            agent: config.name.clone(),
        };
        tracker.spawn(run_job(
            Arc::clone(&shared),
            job,
            handler,
            slot,
            kill.clone(),
        ));
    }
    queue.close();
    let mut dropped = 0;
    while let Ok(job) = queue.try_recv() {
        shared.handled.lock().abandon(job.key);
        dropped += 1;
    }
    if dropped > 0 {
        tracing::info!(
            dropped,
            "queued tasks not started (not acked: the server delivers them again)"
        );
    }
}

async fn run_job(
    shared: Arc<Shared>,
    job: Job,
    handler: Handler,
    slot: OwnedSemaphorePermit,
    kill: CancellationToken,
) {
    let ack = handler.handle(&job.task, &kill).await;
    drop(slot);
    let outcome = ack.outcome();
    let counter = if outcome == Outcome::Ok {
        &shared.succeeded
    } else {
        &shared.failed
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if job.task.id != 0 {
        let mut handled = shared.handled.lock();
        handled.set_capacity(shared.config().remember);
        handled.done(job.key, ack.clone());
    }
    shared.push_ack(ack);
    shared.emit(EventKind::Handled {
        task_id: job.task.id,
        outcome,
    });
}

/// Connects, runs a session, and after any failure waits (with backoff) and
/// connects again to the next server, until the agent drains.
async fn connect_loop(shared: Arc<Shared>) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(shared.config().backoff.clone());
    let mut index = 0usize;
    // Failed attempts since the last session, and since when.
    let mut failures = 0u32;
    let mut down_since = Instant::now();
    loop {
        let config = shared.config();
        backoff.set_config(config.backoff.clone());
        let server = config.servers[index % config.servers.len()].clone();
        shared.emit(EventKind::Connecting {
            server: server.clone(),
        });
        tracing::debug!(%server, attempt = failures + 1, "connecting");
        let mut connected_at = None;
        let on_connected = |at: Instant| {
            if failures == 0 {
                tracing::info!(%server, "connected to {server}");
            } else {
                tracing::info!(
                    %server,
                    failed_attempts = failures,
                    down_for = %humantime::format_duration(Duration::from_secs(down_since.elapsed().as_secs())),
                    "connected to {server}"
                );
            }
            systemd::status(&format!("connected to {server}"));
            shared.emit(EventKind::Connected {
                server: server.clone(),
            });
            connected_at = Some(at);
        };
        let result = session::run(&shared, &config, &server, on_connected).await;
        let error = match result {
            Ok(()) => return Ok(()),
            Err(e) if !e.is_retryable() => return Err(e.into()),
            Err(e) => e,
        };
        shared.emit(EventKind::Failed {
            server: server.clone(),
            error: error.to_string(),
        });
        if let Some(at) = connected_at {
            tracing::warn!(%server, "disconnected from {server}: {error}");
            if at.elapsed() >= config.healthy_after {
                backoff.reset();
            }
            failures = 1;
            down_since = Instant::now();
        } else {
            failures += 1;
            if failures == 1 {
                tracing::warn!(%server, "cannot connect to {server}: {error}; retrying with backoff");
            } else {
                tracing::debug!(%server, attempt = failures, "cannot connect: {error}");
            }
        }
        if shared.draining.is_cancelled() {
            return Ok(());
        }
        index = index.wrapping_add(1);
        let delay = backoff.next_delay();
        systemd::status(&format!("reconnecting in {:.1}s", delay.as_secs_f64()));
        shared.emit(EventKind::Waiting { delay });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.draining.cancelled() => return Ok(()),
        }
    }
}
