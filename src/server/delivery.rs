//! What a `getTask` stream sends and what an ack changes, in both delivery
//! modes.
//!
//! Broadcast: every subscriber reads the shared hub. A named agent resumes
//! after the tasks it acked (its [`AckCursor`]), so it gets what it missed
//! while away; tasks that left retention meanwhile are counted as missed.
//! Queue: every stream is a [`Slot`] of the queue, which hands each task to
//! one agent and redelivers what is not acked.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use super::{State, callers::CallGuard};
use crate::{
    proto::contact::{Outcome, Result as ResultMsg, ServerMsg},
    tasks::{AckCursor, Delivery, Start, Subscription, Task, queue::Slot},
};

/// Where a `getTask` stream's tasks come from.
pub(super) struct Feed {
    source: Source,
    epoch: u64,
}

enum Source {
    Broadcast(Subscription),
    Queue(Slot),
}

impl Feed {
    /// The feed for a new `getTask` stream of `caller`.
    pub(super) fn open(state: &State, caller: &CallGuard) -> Feed {
        Feed {
            source: Source::open(state, caller),
            epoch: state.epoch,
        }
    }

    /// The next task to send to `caller`. Cancel-safe.
    pub(super) async fn next(&mut self, caller: &CallGuard) -> ServerMsg {
        let (task, attempt) = match &mut self.source {
            Source::Queue(slot) => slot.recv().await,
            Source::Broadcast(subscription) => (next_broadcast(subscription, caller).await, 1),
        };
        caller.delivered.fetch_add(1, Relaxed);
        tracing::trace!(task_id = task.id, attempt, "task sent");
        ServerMsg {
            task: task.text.clone(),
            id: task.id,
            attempt,
            epoch: self.epoch,
        }
    }
}

impl Source {
    fn open(state: &State, caller: &CallGuard) -> Source {
        if let Some(queue) = &state.queue {
            return Source::Queue(queue.join(Arc::clone(&caller.id)));
        }
        let replay = state.config.borrow().tasks.replay;
        let fresh = if replay { Start::Oldest } else { Start::Latest };
        if !caller.named {
            return Source::Broadcast(state.hub.subscribe(fresh));
        }
        let mut cursor = caller.cursor.lock();
        let subscription = match cursor.as_mut() {
            Some(cursor) => {
                let missed = cursor.skip_to(state.hub.first_id());
                if missed > 0 {
                    caller.missed.fetch_add(missed, Relaxed);
                    tracing::warn!(
                        agent = %caller.id,
                        missed,
                        "agent missed tasks that left retention while it was away (raise tasks.retain to keep more)"
                    );
                }
                state.hub.subscribe(Start::After(cursor.watermark()))
            }
            None => {
                let subscription = state.hub.subscribe(fresh);
                *cursor = Some(AckCursor::at(subscription.position() - 1));
                subscription
            }
        };
        Source::Broadcast(subscription)
    }
}

async fn next_broadcast(subscription: &mut Subscription, caller: &CallGuard) -> Arc<Task> {
    loop {
        match subscription.recv().await {
            Delivery::Task(task) => {
                if task
                    .target
                    .as_ref()
                    .is_some_and(|target| *target != caller.id)
                {
                    continue;
                }
                if caller.named
                    && caller
                        .cursor
                        .lock()
                        .as_ref()
                        .is_some_and(|c| c.is_acked(task.id))
                {
                    continue;
                }
                task.progress.record_delivery();
                return task;
            }
            Delivery::Skipped(skipped) => {
                let missed = match caller.cursor.lock().as_mut() {
                    Some(cursor) => cursor.skip_to(subscription.position()),
                    None => skipped,
                };
                caller.missed.fetch_add(missed, Relaxed);
                tracing::warn!(
                    caller = %caller.id,
                    skipped,
                    missed,
                    resumed_at = subscription.position(),
                    "subscriber too slow: skipped tasks that left retention (raise tasks.retain to keep more)"
                );
            }
        }
    }
}

/// Records a result from `caller`: an ack when it names a task.
pub(super) fn record_result(state: &State, caller: &CallGuard, result: &ResultMsg) {
    let outcome = Outcome::try_from(result.outcome).unwrap_or(Outcome::Unspecified);
    let ok = outcome != Outcome::Failed;
    tracing::debug!(task_id = result.task_id, ?outcome, ret = %crate::untrusted::shown(&result.ret), "result received");
    let counter = if ok { &caller.acked } else { &caller.failed };
    counter.fetch_add(1, Relaxed);
    if result.task_id == 0 {
        return; // A seed client's free-form result.
    }
    if result.epoch != 0 && result.epoch != state.epoch {
        tracing::debug!(
            task_id = result.task_id,
            "ack of a task from an earlier server run: ignored"
        );
        return;
    }
    let task = match &state.queue {
        Some(queue) => queue.ack(result.task_id),
        None => {
            if caller.named
                && let Some(cursor) = caller.cursor.lock().as_mut()
            {
                cursor.ack(result.task_id, state.config.borrow().tasks.retain);
            }
            state.hub.get(result.task_id)
        }
    };
    if let Some(task) = task {
        task.progress
            .record_ack(ok, &caller.id, caller.kept(&result.ret).to_owned());
    }
}
