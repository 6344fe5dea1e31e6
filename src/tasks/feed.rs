//! What a `getTask` stream sends, in both delivery modes: the broker's
//! [`subscribe`](Broker::subscribe) and the [`Feed`] it returns. (What an
//! ack changes is the broker's [`ack`](Broker::ack).)
//!
//! Broadcast: every subscriber reads the shared hub. A named agent resumes
//! after the tasks it acked (its [`AckCursor`]), so it gets what it missed
//! while away; tasks that left retention meanwhile are counted as missed.
//! Queue: every stream is a [`Slot`] of the queue, which hands each task to
//! one agent and redelivers what is not acked.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{
    Delivery, Start, Subscription,
    broker::{self, Agent, Broker, Mode},
    cursor::Tracked,
    direct::Mailbox,
    queue::Slot,
};
use crate::{
    model::{AckCursor, Task},
    net::shown_address,
    proto::{contact::ServerMsg, wire::Run},
    store::Write,
};

/// Where a `getTask` stream's tasks come from.
pub struct Feed {
    source: Source,
    /// Broadcast: a ready task taken from the subscription that did not
    /// fit the last frame; the next frame's first.
    held: Option<Arc<Task>>,
    /// The epoch, the store, and `tasks.retain` (the bound of a cursor's
    /// out-of-order acks).
    broker: Arc<Broker>,
    /// Who the stream is for.
    agent: Agent,
    /// Broadcast, a named agent: its cursor, by name the broker's.
    tracked: Option<Arc<Tracked>>,
    /// Broadcast: tasks that left retention before this stream got them,
    /// not yet taken by [`take_missed`](Self::take_missed).
    missed: u64,
    /// A named agent: what job runs send it directly.
    mailbox: Option<Arc<Mailbox>>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        if self.mailbox.take().is_some() {
            self.broker.jobs().left(&self.agent.name);
        }
    }
}

enum Source {
    Broadcast(Subscription),
    Queue(Slot),
}

impl Feed {
    /// The feed for a new `getTask` stream of `agent`, and the tasks it
    /// missed (left retention) while it was away.
    pub(super) fn open(broker: &Arc<Broker>, agent: Agent, cap: Option<usize>) -> (Feed, u64) {
        let (source, tracked, missed) = Source::open(broker, &agent, cap);
        let mailbox = agent.named.then(|| broker.jobs().join(&agent));
        let feed = Feed {
            mailbox,
            source,
            held: None,
            broker: Arc::clone(broker),
            agent,
            tracked,
            missed: 0,
        };
        (feed, missed)
    }

    /// Whether tasks come from the broadcast hub (else from the queue).
    pub fn is_broadcast(&self) -> bool {
        matches!(self.source, Source::Broadcast(_))
    }

    /// Queue mode: the next task to send, as its own message (each
    /// delivery has its own attempt number). Cancel-safe. Pending for ever
    /// on a broadcast feed, which sends frames of shared bytes instead
    /// ([`try_next_frame`](Self::try_next_frame)).
    pub async fn next(&mut self) -> ServerMsg {
        let Source::Queue(slot) = &mut self.source else {
            return std::future::pending().await;
        };
        let direct = async {
            match &self.mailbox {
                Some(mailbox) => mailbox.recv().await,
                None => std::future::pending().await,
            }
        };
        let (task, attempt) = tokio::select! {
            biased;
            msg = direct => {
                tracing::trace!(task_id = msg.id, attempt = msg.attempt, "run's task sent");
                return msg;
            }
            next = slot.recv() => next,
        };
        if attempt > 1 {
            tracing::info!(
                agent = %self.agent.name,
                address = %shown_address(self.agent.address),
                task_id = task.id,
                attempt,
                "task redelivered"
            );
        }
        tracing::trace!(task_id = task.id, attempt, "task sent");
        broker::message(&task, attempt, self.broker.epoch())
    }

    /// Broadcast: the tasks for this stream's agent that are ready now and
    /// were published together, up to `max` bytes (more than one task only if
    /// they fit), as the bytes of their gRPC messages for one DATA frame: a
    /// slice of the block every stream shares, never a copy. A copy per
    /// stream would let an agent that reads slowly make the server hold up
    /// to HTTP/2's send buffer (400 KiB) of its own for each of its
    /// streams. With the frame, how many tasks it holds. `None` when none
    /// is ready (or in queue mode). The stream's fast path: no future and
    /// no encoding.
    pub fn try_next_frame(&mut self, max: usize) -> Option<(Bytes, u64)> {
        let Source::Broadcast(subscription) = &mut self.source else {
            return None;
        };
        if let Some(msg) = self.mailbox.as_ref().and_then(|m| m.pop()) {
            // A run's task, to this agent only: a frame of its own.
            tracing::trace!(task_id = msg.id, attempt = msg.attempt, "run's task sent");
            let framed = crate::proto::wire::encode_block(&[msg])
                .pop()
                .expect("one message encoded");
            return Some((Run::new(&framed).into_bytes(), 1));
        }
        let epoch = self.broker.epoch();
        let mut run: Option<Run> = None;
        let (mut count, mut last) = (0, 0);
        // Tasks this frame delivers for the first time: one store write
        // for them all (each write wakes the store's thread).
        let mut first = Vec::new();
        // A named agent's cursor, locked once per frame rather than per task.
        let tracked = self.tracked.as_ref();
        let mut cursor = tracked.map(|tracked| tracked.cursor.lock());
        loop {
            let Some(task) = self.held.take().or_else(|| {
                let cursor = tracked.zip(cursor.as_deref_mut());
                ready_broadcast(
                    subscription,
                    &self.agent,
                    cursor,
                    &self.broker,
                    &mut self.missed,
                )
            }) else {
                break;
            };
            let framed = task
                .wire
                .get_or_init(|| broker::encode_broadcast_one(&task, epoch));
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
        drop(cursor);
        if !first.is_empty() {
            self.broker.store().record(Write::Delivered { ids: first });
        }
        let run = run?;
        // Before its bytes go: the agent may ack any of them (saved with
        // the cursor, at the next ack).
        if let Some(tracked) = tracked {
            tracked.sent_up_to.fetch_max(last, Relaxed);
        }
        Some((run.into_bytes(), count))
    }

    /// Broadcast: tasks that left retention before this stream got them,
    /// counted since the last call.
    pub fn take_missed(&mut self) -> u64 {
        std::mem::take(&mut self.missed)
    }

    /// Broadcast: resolves `true` when
    /// [`try_next_frame`](Self::try_next_frame) may have tasks again, after
    /// it found none, or `false` once `closing` is cancelled (looked at
    /// first). An idle broadcast stream holds this future, one per agent,
    /// so its waits sit side by side in one future: a future awaiting
    /// another keeps the inner one twice (as it was made, and as awaited):
    /// the nested version of this wait took 936 bytes per idle agent, this
    /// one 344.
    pub fn published_or_closing(
        &self,
        closing: CancellationToken,
    ) -> Option<impl Future<Output = bool> + Send + 'static> {
        let mut published = match &self.source {
            Source::Broadcast(subscription) => subscription.watch(),
            Source::Queue(_) => return None,
        };
        let mailbox = self.mailbox.clone();
        Some(async move {
            let direct = async {
                match &mailbox {
                    Some(mailbox) => mailbox.ready().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = closing.cancelled() => false,
                // Fails only once the hub (its sender) is gone: the wait
                // ends then too.
                _ = published.changed() => true,
                () = direct => true,
            }
        })
    }
}

/// What a stream is sent is decided here, with the stream's feed.
impl Broker {
    /// The feed of a new `getTask` stream of `agent`, and how many tasks it
    /// missed (they left retention) while it was away. `cap`: how many tasks
    /// the agent said it runs at once; in queue mode it is assigned no more.
    pub async fn subscribe(self: &Arc<Self>, agent: Agent, cap: Option<usize>) -> (Feed, u64) {
        if agent.named
            && let Mode::Broadcast { cursors } = self.mode()
            && self.store().is_shared()
        {
            // Several servers: the agent may have acked tasks through
            // another one since it was last here.
            match self.store().cursor(&agent.name).await {
                Ok(Some(saved)) => cursors.merge(saved),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    agent = %agent.name,
                    "cannot read the agent's acks from the task store (going on with this \
                     server's; tasks it acked elsewhere may be sent again): {e}"
                ),
            }
        }
        Feed::open(self, agent, cap)
    }
}

impl Source {
    /// Where `agent`'s tasks come from, its cursor (broadcast, named), and
    /// how many tasks it missed while away.
    fn open(
        broker: &Broker,
        agent: &Agent,
        cap: Option<usize>,
    ) -> (Source, Option<Arc<Tracked>>, u64) {
        let (hub, cursors) = match broker.mode() {
            Mode::Queue { queue } => {
                let slot = queue.join_capped(Arc::clone(&agent.name), cap);
                return (Source::Queue(slot), None, 0);
            }
            Mode::Broadcast { cursors } => (broker.hub(), cursors),
        };
        let fresh = if broker.replay() {
            Start::Oldest
        } else {
            Start::Latest
        };
        if !agent.named {
            return (Source::Broadcast(hub.subscribe(fresh)), None, 0);
        }
        // The cursor is the store's, by name, whoever else has called since.
        let mut fresh_subscription = None;
        let tracked = cursors.get_or_insert(&agent.name, || {
            let subscription = hub.subscribe(fresh);
            let cursor = AckCursor::at(subscription.position() - 1);
            fresh_subscription = Some(subscription);
            cursor
        });
        if let Some(subscription) = fresh_subscription {
            return (Source::Broadcast(subscription), Some(tracked), 0);
        }
        let subscription = {
            let mut cursor = tracked.cursor.lock();
            let missed = cursor.skip_to(hub.first_id());
            if missed > 0 {
                tracked.touch();
                tracing::warn!(
                    agent = %agent.name,
                    missed,
                    "agent missed tasks that left retention while it was away (raise tasks.retain to keep more)"
                );
            }
            (hub.subscribe(Start::After(cursor.watermark())), missed)
        };
        (
            Source::Broadcast(subscription.0),
            Some(tracked),
            subscription.1,
        )
    }
}

/// The next task for `agent` that is ready now, without waiting; a named
/// agent's `cursor` is locked by the caller of this function. Tasks that
/// left retention first are added to `missed`.
fn ready_broadcast(
    subscription: &mut Subscription,
    agent: &Agent,
    mut cursor: Option<(&Arc<Tracked>, &mut AckCursor)>,
    broker: &Broker,
    missed_total: &mut u64,
) -> Option<Arc<Task>> {
    loop {
        match subscription.try_recv()? {
            Delivery::Task(task) => {
                // A cancelled task is not sent to anyone who has not had it.
                let not_for_it = task.void
                    || task.direct
                    || task
                        .target
                        .as_ref()
                        .is_some_and(|target| *target != agent.name)
                    || !broker::selects(&task, agent)
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
                    let _ = cursor.ack(task.id, broker.retain());
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
                *missed_total += missed;
                tracing::warn!(
                    caller = %agent.name,
                    skipped,
                    missed,
                    resumed_at = subscription.position(),
                    "subscriber too slow: skipped tasks that left retention (raise tasks.retain to keep more)"
                );
            }
        }
    }
}
