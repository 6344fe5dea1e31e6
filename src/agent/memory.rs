//! What the agent remembers between deliveries: which tasks it is handling
//! or has handled (so a redelivered task is acked again, not run twice), and
//! the acks not yet delivered (so a lost connection loses none). Both are
//! bounded, and both are kept across agent restarts by the
//! [`spool`](super::spool).

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::proto::contact::Result as ResultMsg;

/// A task's identity for deduplication: its id and a hash of its text, of
/// the server's task id space (epoch) that issued it and of its operator
/// retry count.
///
/// Task ids start at 1 again with a new store (the memory store at every
/// server start); the epoch, the store's random id, tells such a new task 1
/// from the old one (and the text does, for a server that sends no epoch). A
/// task an operator retried (`contactd task retry`) is a new run of the same
/// task: it is run again, not acked from memory.
///
/// The hash is kept in the agent's spool across restarts and upgrades, so it
/// is SHA-256 (its first 8 bytes), whose value no toolchain changes; std's
/// `DefaultHasher` makes no such promise. It costs well under a microsecond
/// for a task text of a few hundred bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskKey {
    pub id: u64,
    pub(super) text: u64,
}

impl TaskKey {
    /// The key of the task with `id` and `text`.
    pub fn new(id: u64, text: &str) -> TaskKey {
        TaskKey::with_epoch(0, id, text, 0)
    }

    /// The key of a task from the server run `epoch`, retried `retry` times.
    pub fn with_epoch(epoch: u64, id: u64, text: &str, retry: u32) -> TaskKey {
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        hash.update(&epoch.to_le_bytes());
        hash.update(&retry.to_le_bytes());
        hash.update(text.as_bytes());
        let digest = hash.finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        TaskKey {
            id,
            text: u64::from_le_bytes(first),
        }
    }
}

/// What to do with a delivered task.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// New: run it.
    New,
    /// Queued or running: its ack will follow; do nothing.
    InFlight,
    /// Handled before: send this ack again.
    Done(ResultMsg),
}

#[derive(Debug, Clone)]
enum State {
    InFlight,
    Done(ResultMsg),
}

/// Recently handled tasks, at most `capacity` of them (the oldest are
/// forgotten first), plus those in flight (bounded by the queue and the
/// handlers running).
#[derive(Debug)]
pub struct Handled {
    states: HashMap<TaskKey, State>,
    /// Handled tasks, oldest first.
    order: VecDeque<TaskKey>,
    capacity: usize,
}

impl Handled {
    /// Remembers up to `capacity` handled tasks.
    pub fn new(capacity: usize) -> Handled {
        Handled {
            states: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Changes the capacity (after a config reload).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        self.evict();
    }

    /// Looks `key` up; a new key is marked in flight.
    pub fn check(&mut self, key: TaskKey) -> Seen {
        match self.states.get(&key) {
            Some(State::InFlight) => Seen::InFlight,
            Some(State::Done(ack)) => Seen::Done(ack.clone()),
            None => {
                self.states.insert(key, State::InFlight);
                Seen::New
            }
        }
    }

    /// Forgets an in-flight task that will not run after all (shutdown).
    pub fn abandon(&mut self, key: TaskKey) {
        if let Some(State::InFlight) = self.states.get(&key) {
            self.states.remove(&key);
        }
    }

    /// Records the ack of a handled task.
    pub fn done(&mut self, key: TaskKey, ack: ResultMsg) {
        if let Some(State::Done(_)) = self.states.insert(key, State::Done(ack)) {
            return;
        }
        self.order.push_back(key);
        self.evict();
    }

    fn evict(&mut self) {
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.states.remove(&old);
            }
        }
    }

    /// Handled tasks remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no handled task is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// An ack waiting to be sent, with the key of its task (`None` for a task
/// without an id), by which the spool marks it delivered.
pub type Pending = (Option<TaskKey>, ResultMsg);

/// Acks waiting to be sent, oldest first, at most `capacity`: beyond, the
/// oldest is dropped (the server redelivers an unacked task, and the agent
/// then acks it again from [`Handled`]).
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<VecDeque<Pending>>,
    capacity: usize,
    /// Wakes the session streams waiting for an ack.
    added: Notify,
}

impl Outbox {
    /// An outbox holding at most `capacity` acks.
    pub fn new(capacity: usize) -> Outbox {
        Outbox {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            added: Notify::new(),
        }
    }

    /// Adds an ack; returns the one dropped to make room, if any.
    pub fn push(&self, ack: Pending) -> Option<Pending> {
        let dropped = {
            let mut queue = self.queue.lock();
            let dropped = if queue.len() >= self.capacity {
                queue.pop_front()
            } else {
                None
            };
            queue.push_back(ack);
            dropped
        };
        self.added.notify_waiters();
        dropped
    }

    /// Puts back acks taken but not delivered (their call failed), ahead
    /// of the others, in their order; beyond the capacity the newest are
    /// dropped and returned (their tasks are delivered again).
    pub fn put_back(&self, acks: Vec<Pending>) -> Vec<Pending> {
        let mut queue = self.queue.lock();
        for ack in acks.into_iter().rev() {
            queue.push_front(ack);
        }
        let excess = queue.len().saturating_sub(self.capacity);
        let at = queue.len() - excess;
        queue.split_off(at).into()
    }

    /// Takes the oldest ack, if any.
    pub fn pop(&self) -> Option<Pending> {
        self.queue.lock().pop_front()
    }

    /// Acks waiting.
    pub fn len(&self) -> usize {
        self.queue.lock().len()
    }

    /// Whether no ack is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.lock().is_empty()
    }

    /// Waits for the next ack. Cancel-safe: nothing is taken until it returns.
    pub async fn next(&self) -> Pending {
        loop {
            let added = self.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            if let Some(ack) = self.pop() {
                return ack;
            }
            added.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(id: u64) -> ResultMsg {
        ResultMsg {
            ret: "ok".into(),
            task_id: id,
            outcome: 1,
            ..Default::default()
        }
    }

    fn pending(id: u64) -> Pending {
        (Some(TaskKey::new(id, "t")), ack(id))
    }

    #[test]
    fn a_task_runs_once_and_is_acked_again() {
        let mut handled = Handled::new(2);
        let key = TaskKey::new(1, "t");
        assert_eq!(handled.check(key), Seen::New);
        assert_eq!(handled.check(key), Seen::InFlight);
        handled.done(key, ack(1));
        assert_eq!(handled.check(key), Seen::Done(ack(1)));
        // A new server's task 1 with another text is another task.
        assert_eq!(handled.check(TaskKey::new(1, "other")), Seen::New);
        // So is the same task once an operator retried it.
        let retried = TaskKey::with_epoch(0, 1, "t", 1);
        assert_eq!(handled.check(retried), Seen::New);
    }

    #[test]
    fn memory_is_bounded_oldest_first() {
        let mut handled = Handled::new(3);
        for id in 1..=10 {
            let key = TaskKey::new(id, "t");
            assert_eq!(handled.check(key), Seen::New);
            handled.done(key, ack(id));
        }
        assert_eq!(handled.len(), 3);
        assert_eq!(handled.states.len(), 3);
        assert_eq!(handled.check(TaskKey::new(8, "t")), Seen::Done(ack(8)));
        assert_eq!(handled.check(TaskKey::new(7, "t")), Seen::New);
        handled.abandon(TaskKey::new(7, "t"));
        assert_eq!(handled.check(TaskKey::new(7, "t")), Seen::New);
    }

    #[tokio::test]
    async fn the_outbox_is_bounded_and_wakes_its_reader() {
        let outbox = std::sync::Arc::new(Outbox::new(2));
        let reader = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.next().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(outbox.push(pending(1)), None);
        assert_eq!(reader.await.unwrap(), pending(1));
        outbox.push(pending(2));
        outbox.push(pending(3));
        assert_eq!(outbox.push(pending(4)), Some(pending(2)));
        assert_eq!(outbox.pop(), Some(pending(3)));
        assert_eq!(outbox.len(), 1);
        // A failed batch goes back first; what does not fit is returned.
        assert_eq!(outbox.put_back(vec![pending(2), pending(3)]), [pending(4)]);
        assert_eq!(outbox.pop(), Some(pending(2)));
        assert_eq!(outbox.pop(), Some(pending(3)));
        assert_eq!(outbox.pop(), None);
    }
}
