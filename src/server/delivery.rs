//! What a `getTask` stream sends and what an ack changes, in both delivery
//! modes.
//!
//! Broadcast: every subscriber reads the shared hub. A named agent resumes
//! after the tasks it acked (its [`AckCursor`]), so it gets what it missed
//! while away; tasks that left retention meanwhile are counted as missed.
//! Queue: every stream is a [`Slot`] of the queue, which hands each task to
//! one agent and redelivers what is not acked.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use bytes::Bytes;

use super::{State, callers::CallGuard};
use crate::{
    model::{AckCursor, Task},
    proto::{
        contact::{Outcome, Result as ResultMsg, ServerMsg},
        wire::{self, Framed, Run},
    },
    store::Write,
    tasks::{
        Delivery, Start, Subscription,
        cursor::Tracked,
        queue::{AckRefusal, Slot},
    },
};

/// Where a `getTask` stream's tasks come from.
pub(super) struct Feed {
    source: Source,
    /// Broadcast: a ready task taken from the subscription that did not
    /// fit the last frame; the next frame's first.
    held: Option<Arc<Task>>,
    epoch: u64,
    store: crate::store::Store,
    /// For `tasks.retain`, the bound of a cursor's out-of-order acks.
    config: tokio::sync::watch::Receiver<Arc<crate::config::Config>>,
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
            held: None,
            epoch: state.epoch,
            store: state.store.clone(),
            config: state.config.clone(),
        }
    }

    /// Whether tasks come from the broadcast hub (else from the queue).
    pub(super) fn is_broadcast(&self) -> bool {
        matches!(self.source, Source::Broadcast(_))
    }

    /// Queue mode: the next task to send to `caller`, as its own message
    /// (each delivery has its own attempt number). Cancel-safe. Pending
    /// for ever on a broadcast feed, which sends frames of shared bytes
    /// instead ([`try_next_frame`](Self::try_next_frame)).
    pub(super) async fn next(&mut self, caller: &CallGuard) -> ServerMsg {
        let Source::Queue(slot) = &mut self.source else {
            return std::future::pending().await;
        };
        let (task, attempt) = slot.recv().await;
        if attempt > 1 {
            tracing::info!(
                agent = %caller.id,
                address = %super::callers::shown_address(caller.address()),
                task_id = task.id,
                attempt,
                "task redelivered"
            );
        }
        sent(caller, 1, task.id);
        tracing::trace!(task_id = task.id, attempt, "task sent");
        message(&task, attempt, self.epoch)
    }

    /// Broadcast: the tasks for `caller` that are ready now and were
    /// published together, up to `max` bytes (more than one task only if
    /// they fit), as the bytes of their gRPC messages for one DATA frame: a
    /// slice of the block every stream shares, never a copy. A copy per
    /// stream would let an agent that reads slowly make the server hold up
    /// to HTTP/2's send buffer (400 KiB) of its own for each of its
    /// streams. `None` when none is ready (or in queue mode). The stream's
    /// fast path: no future and no encoding.
    pub(super) fn try_next_frame(&mut self, caller: &CallGuard, max: usize) -> Option<Bytes> {
        let Source::Broadcast(subscription) = &mut self.source else {
            return None;
        };
        let mut run: Option<Run> = None;
        let (mut count, mut last) = (0, 0);
        // Tasks this frame delivers for the first time: one store write
        // for them all (each write wakes the store's thread).
        let mut first = Vec::new();
        // A named agent's cursor, locked once per frame rather than per task.
        let tracked = caller.cursor.get();
        let mut cursor = tracked.map(|tracked| tracked.cursor.lock());
        loop {
            let Some(task) = self.held.take().or_else(|| {
                let cursor = tracked.zip(cursor.as_deref_mut());
                ready_broadcast(subscription, caller, cursor, &self.config)
            }) else {
                break;
            };
            let framed = task
                .wire
                .get_or_init(|| encode_broadcast_one(&task, self.epoch));
            match &mut run {
                None => run = Some(Run::new(framed)),
                Some(run) => {
                    if run.len() + framed.len() > max || !run.extend(framed) {
                        // The next frame's first.
                        self.held = Some(task);
                        break;
                    }
                }
            }
            if task.progress.record_delivery() {
                first.push(task.id);
            }
            tracing::trace!(task_id = task.id, attempt = 1, "task sent");
            count += 1;
            last = task.id;
        }
        if !first.is_empty() {
            self.store.record(Write::Delivered { ids: first });
        }
        let run = run?;
        // Before its bytes go: the agent may ack any of them.
        sent(caller, count, last);
        Some(run.into_bytes())
    }

    /// Broadcast: resolves when [`try_next_frame`](Self::try_next_frame)
    /// may have tasks again, after it found none.
    pub(super) fn published(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        match &self.source {
            Source::Broadcast(subscription) => Some(subscription.published()),
            Source::Queue(_) => None,
        }
    }
}

/// Broadcast: encodes newly published tasks once, as one block every
/// stream sends slices of (see [`crate::proto::wire`]).
pub(super) fn encode_broadcast(tasks: &[Arc<Task>], epoch: u64) {
    // A broadcast delivery is always a first attempt.
    let msgs: Vec<ServerMsg> = tasks.iter().map(|task| message(task, 1, epoch)).collect();
    for (task, framed) in tasks.iter().zip(wire::encode_block(&msgs)) {
        // Set already only for a task published twice (the ring ignores
        // the second): its first encoding stands.
        let _ = task.wire.set(framed);
    }
}

/// A task that was not encoded with its batch (none is, but the stream
/// does not depend on it), encoded alone.
fn encode_broadcast_one(task: &Task, epoch: u64) -> Framed {
    wire::encode_block(&[message(task, 1, epoch)])
        .pop()
        .expect("one message encoded")
}

/// `task` as sent on attempt `attempt`.
fn message(task: &Task, attempt: u32, epoch: u64) -> ServerMsg {
    ServerMsg {
        task: task.text.clone(),
        id: task.id,
        attempt,
        epoch,
        retry: task.progress.retries(),
    }
}

/// Counts `count` tasks as sent to `caller`, the last (the highest id) `last`.
fn sent(caller: &CallGuard, count: u64, last: u64) {
    caller.delivered.fetch_add(count, Relaxed);
    caller.sent_up_to.fetch_max(last, Relaxed);
    if let Some(tracked) = caller.cursor.get() {
        // Saved with the cursor, at the next ack.
        tracked.sent_up_to.fetch_max(last, Relaxed);
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
        // The cursor is the store's, by name, whoever else has called since.
        let mut fresh_subscription = None;
        let tracked = state.cursors.get_or_insert(&caller.id, || {
            let subscription = state.hub.subscribe(fresh);
            let cursor = AckCursor::at(subscription.position() - 1);
            fresh_subscription = Some(subscription);
            cursor
        });
        let _ = caller.cursor.set(Arc::clone(&tracked));
        // Its acks of tasks sent before a server restart are its own.
        caller
            .sent_up_to
            .fetch_max(tracked.sent_up_to.load(Relaxed), Relaxed);
        if let Some(subscription) = fresh_subscription {
            return Source::Broadcast(subscription);
        }
        let mut cursor = tracked.cursor.lock();
        let missed = cursor.skip_to(state.hub.first_id());
        if missed > 0 {
            tracked.touch();
            caller.missed.fetch_add(missed, Relaxed);
            tracing::warn!(
                agent = %caller.id,
                missed,
                "agent missed tasks that left retention while it was away (raise tasks.retain to keep more)"
            );
        }
        Source::Broadcast(state.hub.subscribe(Start::After(cursor.watermark())))
    }
}

/// The next task for `caller` that is ready now, without waiting; a named
/// caller's `cursor` is locked by the caller of this function.
fn ready_broadcast(
    subscription: &mut Subscription,
    caller: &CallGuard,
    mut cursor: Option<(&Arc<Tracked>, &mut AckCursor)>,
    config: &tokio::sync::watch::Receiver<Arc<crate::config::Config>>,
) -> Option<Arc<Task>> {
    loop {
        match subscription.try_recv()? {
            Delivery::Task(task) => {
                // A cancelled task is not sent to anyone who has not had it.
                let not_for_it = task.void
                    || task
                        .target
                        .as_ref()
                        .is_some_and(|target| *target != caller.id)
                    || task.progress.is_cancelled();
                let Some((tracked, cursor)) = cursor.as_mut() else {
                    if not_for_it {
                        continue;
                    }
                    return Some(task);
                };
                if cursor.is_acked(task.id) {
                    continue;
                }
                if not_for_it {
                    // Done with, as far as this agent goes: the watermark
                    // moves past it rather than stopping below it until it
                    // leaves retention (and then counting it as missed).
                    // The config is read here only: not per delivery.
                    cursor.ack(task.id, config.borrow().tasks.retain);
                    tracked.touch();
                    continue;
                }
                return Some(task);
            }
            Delivery::Skipped(skipped) => {
                let missed = match cursor.as_mut() {
                    Some((tracked, cursor)) => {
                        tracked.touch();
                        cursor.skip_to(subscription.position())
                    }
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

/// Records a result from `caller`: an ack when it names a task that was
/// delivered to it (queue mode: whose current attempt it holds; broadcast:
/// that exists, is meant for it and was sent on its streams). Any other ack
/// changes nothing and is counted and, at most every few seconds per
/// caller, logged.
pub(super) fn record_result(state: &State, caller: &CallGuard, result: &ResultMsg) {
    let outcome = Outcome::try_from(result.outcome).unwrap_or(Outcome::Unspecified);
    let ok = outcome != Outcome::Failed;
    tracing::debug!(task_id = result.task_id, ?outcome, ret = %crate::untrusted::shown(&result.ret), "result received");
    if result.task_id == 0 {
        // A seed client's free-form result.
        let counter = if ok { &caller.acked } else { &caller.failed };
        counter.fetch_add(1, Relaxed);
        return;
    }
    if result.epoch != 0 && result.epoch != state.epoch {
        tracing::debug!(
            task_id = result.task_id,
            "ack of a task from an earlier server run: ignored"
        );
        return;
    }
    let task = if !caller.named {
        Err("the caller has no name: anonymous callers ack nothing")
    } else if let Some(queue) = &state.queue {
        match queue.ack(result.task_id, &caller.id) {
            Ok(task) => Ok(task),
            // Late or repeated: not forged, already counted by the queue.
            Err(AckRefusal::NotInFlight) => {
                // Only for a task that exists: an agent acking made-up ids
                // costs a counter, not a database statement each.
                if state.store.is_shared() && result.task_id < state.hub.next_id() {
                    // Perhaps sent through another server (the agent came
                    // here with the ack): the store knows whether this
                    // agent holds the task's claim, and keeps it only then.
                    state.store.record(Write::Acked {
                        id: result.task_id,
                        agent: Arc::clone(&caller.id),
                        ok,
                        text: caller.kept(&result.ret).to_owned(),
                        at_ms: crate::clock::now_ms(),
                        claimed: true,
                    });
                }
                return;
            }
            Err(AckRefusal::NotTheHolder) => Err("the task is in flight at another agent"),
            Err(AckRefusal::Cancelled) => return ignore_cancelled(state, result.task_id),
        }
    } else {
        broadcast_ack(state, caller, result.task_id)
    };
    match task {
        // Sent before an operator cancelled it: the agent ran it, but its
        // ack changes nothing (the cursor above still moved past it).
        Ok(task) if task.progress.is_cancelled() => ignore_cancelled(state, task.id),
        Ok(task) => {
            let counter = if ok { &caller.acked } else { &caller.failed };
            counter.fetch_add(1, Relaxed);
            let text = caller.kept(&result.ret).to_owned();
            state.store.record(Write::Acked {
                id: task.id,
                agent: Arc::clone(&caller.id),
                ok,
                text: text.clone(),
                at_ms: crate::clock::now_ms(),
                claimed: state.queue.is_some(),
            });
            task.progress.record_ack(ok, &caller.id, text);
        }
        Err(reason) => caller.refuse_ack(result.task_id, reason),
    }
}

fn ignore_cancelled(state: &State, task_id: u64) {
    state.cancelled_acks.fetch_add(1, Relaxed);
    tracing::debug!(task_id, "ack of a cancelled task: ignored");
}

/// Applies a broadcast ack to the caller's cursor, if the task was sent to it.
fn broadcast_ack(state: &State, caller: &CallGuard, id: u64) -> Result<Arc<Task>, &'static str> {
    if id > caller.sent_up_to.load(Relaxed) {
        return Err("the task was never sent to this agent");
    }
    let task = state
        .hub
        .get(id)
        .ok_or("the task is not retained (unknown, or too old)")?;
    if task
        .target
        .as_ref()
        .is_some_and(|target| *target != caller.id)
    {
        return Err("the task is meant for another agent");
    }
    if task.void {
        return Err("the task is not retained (unknown, or too old)");
    }
    if let Some(tracked) = caller.cursor.get() {
        tracked
            .cursor
            .lock()
            .ack(id, state.config.borrow().tasks.retain);
        tracked.touch();
    }
    Ok(task)
}
