//! From received task to ack: the bounded queue, at most
//! `handler_concurrency` handlers at once, and what is remembered after.

use std::sync::{Arc, atomic::Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{EventKind, Handler, Shared, TaskKey, spool::SpoolError};
use crate::proto::contact::{Outcome, ServerMsg};

/// A task waiting for room in a full spool looks again this often, besides
/// when delivered acks are recorded (`Shared::room`).
const ROOM_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A task waiting for a handler.
pub(super) struct Job {
    pub(super) task: ServerMsg,
    pub(super) key: TaskKey,
}

/// Starts queued tasks, at most `handler_concurrency` at once, until the
/// agent drains; queued tasks left then are forgotten (not acked).
pub(super) async fn dispatch(
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
    let spool = shared.spool.as_ref().filter(|_| job.task.id != 0);
    if let Some(spool) = spool {
        // Recorded before the handler starts: after a crash from here on,
        // the task is not run again (it is acked as interrupted).
        let room = handler.max_output as u64;
        let mut waiting = false;
        let started = loop {
            match spool.start(job.key, &job.task, room).await {
                // Full of results not yet delivered: the task waits, with
                // its handler slot, until delivered acks make room (a
                // broadcast server would not send it again before the next
                // connection); at a drain or stop it goes unacked.
                Err(SpoolError::Full(reason)) => {
                    if !waiting {
                        waiting = true;
                        shared.counters.spool_waits.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            task_id = job.task.id,
                            "task waits for room in the agent spool (its results are not \
                             delivered yet): {reason}"
                        );
                    }
                    tokio::select! {
                        () = kill.cancelled() => break Err(SpoolError::Full(reason)),
                        () = shared.draining.cancelled() => break Err(SpoolError::Full(reason)),
                        () = shared.room.notified() => {}
                        () = tokio::time::sleep(ROOM_RECHECK) => {}
                    }
                }
                other => break other,
            }
        };
        if waiting && started.is_ok() {
            tracing::info!(
                task_id = job.task.id,
                "room in the agent spool: task started"
            );
        }
        match started {
            Ok(None) => {}
            Ok(Some(ack)) => {
                // Handled before, beyond what memory keeps: acked again.
                drop(slot);
                tracing::debug!(
                    task_id = job.task.id,
                    "task delivered again: acking the outcome the spool kept"
                );
                shared.handled.lock().done(job.key, ack.clone());
                shared.push_ack((Some(job.key), ack));
                shared.emit(EventKind::Reacked {
                    task_id: job.task.id,
                });
                return;
            }
            Err(e) => {
                drop(slot);
                shared.handled.lock().abandon(job.key);
                shared
                    .counters
                    .spool_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    task_id = job.task.id,
                    "task not started, nor acked (the server delivers it again): {e}"
                );
                return;
            }
        }
    }
    let started = std::time::Instant::now();
    let ack = handler.handle(&job.task, &kill).await;
    drop(slot);
    if let Some(spool) = spool {
        match spool.done(job.key, &ack).await {
            Ok(()) => tracing::debug!(task_id = job.task.id, "result spooled"),
            Err(e) => tracing::warn!(
                task_id = job.task.id,
                "result not kept in the spool (sent now; after a restart before it is \
                 delivered, the task is acked as interrupted): {e}"
            ),
        }
    }
    shared
        .counters
        .handler_seconds
        .observe(started.elapsed().as_secs_f64());
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
    let key = (job.task.id != 0).then_some(job.key);
    shared.push_ack((key, ack));
    shared.emit(EventKind::Handled {
        task_id: job.task.id,
        outcome,
    });
}
