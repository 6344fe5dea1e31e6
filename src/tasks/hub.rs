//! The task hub: one bounded ring of retained tasks, shared by every
//! subscriber.
//!
//! Each task is stored once (`Arc<Task>`); a subscriber holds only a cursor
//! (the id of the next task it wants) and a watch receiver that wakes it when
//! tasks are published. Publishing never waits for subscribers: a subscriber
//! that falls behind the ring's tail jumps to it, and the gap is reported as
//! [`Delivery::Skipped`] so it can be counted. Memory is O(retain) for the
//! ring plus O(1) per subscriber, however slow the subscribers are.

use std::{
    collections::VecDeque,
    ops::Range,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use parking_lot::RwLock;

use crate::model::Task;
use tokio::sync::watch;

/// Where a new subscription starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the oldest retained task (replay of the backlog).
    Oldest,
    /// With the next task to be published.
    Latest,
    /// With the first task after this id (catching up from a cursor).
    After(u64),
}

/// What a subscription yields next.
#[derive(Debug)]
pub enum Delivery {
    /// The next task in order.
    Task(Arc<Task>),
    /// The subscriber fell behind the ring's tail; this many tasks were
    /// dropped from retention before it read them, and it resumes at the tail.
    Skipped(u64),
}

/// The shared ring of retained tasks.
#[derive(Debug)]
pub struct Hub {
    ring: RwLock<Ring>,
    /// Carries the id the next task will get, so waiting subscribers wake
    /// on every publish and never miss one.
    published: watch::Sender<u64>,
    /// The retained ids, readable without the lock.
    bounds: Bounds,
}

/// A copy of the ring's id range, updated under its write lock, so a
/// lookup of an id outside it needs no lock at all. A stale copy only
/// sends a lookup on to the lock, which has the final word.
#[derive(Debug, Default)]
struct Bounds {
    first: AtomicU64,
    next: AtomicU64,
}

impl Bounds {
    fn update(&self, ring: &Ring) {
        self.first.store(ring.first_id(), Ordering::Release);
        self.next.store(ring.next_id, Ordering::Release);
    }

    fn may_hold(&self, id: u64) -> bool {
        id >= self.first.load(Ordering::Acquire) && id < self.next.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct Ring {
    tasks: VecDeque<Arc<Task>>,
    capacity: usize,
    next_id: u64,
}

impl Ring {
    fn first_id(&self) -> u64 {
        self.next_id - self.tasks.len() as u64
    }

    /// Pushes tasks in id order, filling gaps with void ones; ids already
    /// in the ring are ignored.
    fn push_all(&mut self, tasks: impl Iterator<Item = Arc<Task>>) {
        for task in tasks {
            if task.id < self.next_id {
                continue;
            }
            self.fill_to(task.id);
            self.tasks.push_back(task);
            self.next_id += 1;
        }
    }

    /// Void tasks up to (not including) `id`.
    fn fill_to(&mut self, id: u64) {
        while self.next_id < id {
            self.tasks.push_back(Arc::new(Task::void(self.next_id)));
            self.next_id += 1;
            // A long gap only keeps its last `capacity` ids.
            if self.tasks.len() > 2 * self.capacity {
                self.trim();
            }
        }
    }

    fn trim(&mut self) {
        let excess = self.tasks.len().saturating_sub(self.capacity);
        self.tasks.drain(..excess);
    }
}

/// How many tasks a subscriber takes per lock of the ring.
const READ_BATCH: usize = 64;

impl Hub {
    /// A hub that keeps the last `retain` tasks (at least one).
    pub fn new(retain: usize) -> Arc<Hub> {
        Hub::restored(retain, 1, Vec::new())
    }

    /// A hub whose next task gets the id `next_id`, holding those of `tasks`
    /// (sorted by id, below `next_id`) that fall in its last `retain` ids;
    /// the ids among them that no task has are void.
    pub fn restored(retain: usize, next_id: u64, tasks: Vec<Arc<Task>>) -> Arc<Hub> {
        let capacity = retain.max(1);
        let first = next_id.saturating_sub(capacity as u64).max(1);
        let mut ring = Ring {
            tasks: VecDeque::with_capacity(0),
            capacity,
            next_id: first,
        };
        ring.push_all(tasks.into_iter().filter(|t| t.id >= first));
        ring.fill_to(next_id);
        ring.trim();
        let hub = Hub {
            published: watch::Sender::new(ring.next_id),
            ring: RwLock::new(ring),
            bounds: Bounds::default(),
        };
        hub.bounds.update(&hub.ring.read());
        Arc::new(hub)
    }

    /// Appends tasks numbered by a store (in id order, from the hub's next
    /// id; a gap is filled with void tasks) and wakes the subscribers.
    pub fn append_tasks(&self, tasks: &[Arc<Task>]) {
        let next = {
            let mut ring = self.ring.write();
            ring.push_all(tasks.iter().cloned());
            ring.trim();
            self.bounds.update(&ring);
            ring.next_id
        };
        self.published.send_replace(next);
    }

    /// Appends `count` tasks made by `make` from their ids, wakes the
    /// subscribers, and returns the last one.
    fn append(&self, count: usize, mut make: impl FnMut(u64) -> Task) -> Option<Arc<Task>> {
        let (last, next) = {
            let mut ring = self.ring.write();
            let mut last = None;
            for _ in 0..count {
                let task = Arc::new(make(ring.next_id));
                ring.next_id += 1;
                ring.tasks.push_back(Arc::clone(&task));
                last = Some(task);
            }
            ring.trim();
            self.bounds.update(&ring);
            (last, ring.next_id)
        };
        self.published.send_replace(next);
        last
    }

    /// Publishes `count` tasks whose text `render` makes from the task id,
    /// returning the ids given.
    pub fn publish_with(&self, count: usize, mut render: impl FnMut(u64) -> String) -> Range<u64> {
        let created = SystemTime::now();
        let last = self.append(count, |id| Task::new(id, render(id), created, None));
        last.map_or(0..0, |last| last.id + 1 - count as u64..last.id + 1)
    }

    /// Publishes one task, for every agent or for `target` only, returning it.
    pub fn publish(&self, text: String, target: Option<Arc<str>>) -> Arc<Task> {
        let mut text = Some(text);
        let now = SystemTime::now();
        self.append(1, |id| {
            Task::new(id, text.take().unwrap_or_default(), now, target.clone())
        })
        .expect("one task was appended")
    }

    /// The retained task with this id, if it is still retained.
    pub fn get(&self, id: u64) -> Option<Arc<Task>> {
        // Most acks of tasks long gone (or never published) need no lock.
        if !self.bounds.may_hold(id) {
            return None;
        }
        let ring = self.ring.read();
        let offset = id.checked_sub(ring.first_id())?;
        ring.tasks.get(usize::try_from(offset).ok()?).cloned()
    }

    /// Every retained task, oldest first (void ones left out).
    pub fn retained_tasks(&self) -> Vec<Arc<Task>> {
        let ring = self.ring.read();
        ring.tasks.iter().filter(|t| !t.void).cloned().collect()
    }

    /// The id the next published task gets, without the lock (for metrics).
    pub fn next_id(&self) -> u64 {
        self.bounds.next.load(Ordering::Acquire)
    }

    /// The id of the oldest retained task (the next id when none is).
    pub fn first_id(&self) -> u64 {
        self.ring.read().first_id()
    }

    /// Changes how many tasks are retained (on a config reload).
    pub fn set_retain(&self, retain: usize) {
        let mut ring = self.ring.write();
        ring.capacity = retain.max(1);
        ring.trim();
        self.bounds.update(&ring);
    }

    /// How many tasks are retained now.
    pub fn retained(&self) -> usize {
        self.ring.read().tasks.len()
    }

    /// A new subscription starting at `start`.
    pub fn subscribe(self: &Arc<Self>, start: Start) -> Subscription {
        let next = {
            let ring = self.ring.read();
            match start {
                Start::Oldest => ring.first_id(),
                Start::Latest => ring.next_id,
                Start::After(id) => id.saturating_add(1).min(ring.next_id),
            }
        };
        Subscription {
            hub: Arc::clone(self),
            next,
            published: self.published.subscribe(),
            ready: VecDeque::with_capacity(0),
        }
    }
}

/// One subscriber's cursor into the hub.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    /// Id of the next task this subscriber reads.
    next: u64,
    published: watch::Receiver<u64>,
    /// Tasks taken from the ring in one lock, not yet yielded (at most
    /// [`READ_BATCH`]).
    ready: VecDeque<Arc<Task>>,
}

impl Subscription {
    /// The next delivery; waits while there is nothing new.
    ///
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn recv(&mut self) -> Delivery {
        loop {
            if let Some(delivery) = self.try_recv() {
                return delivery;
            }
            self.published().await;
        }
    }

    /// The next delivery if there is one now, without waiting; `None`:
    /// wait with [`published`](Self::published), then try again.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        if let Some(task) = self.ready.pop_front() {
            return Some(Delivery::Task(task));
        }
        // Mark the current publish count as seen *before* reading the
        // ring, so a publish after the read always wakes `published()`.
        self.published.borrow_and_update();
        if let Some(skipped) = self.fill() {
            return Some(Delivery::Skipped(skipped));
        }
        self.ready.pop_front().map(Delivery::Task)
    }

    /// Resolves when tasks were published after the last
    /// [`try_recv`](Self::try_recv) that found none. Owns what it waits on
    /// (a stream keeps it while it is idle, without borrowing the
    /// subscription).
    pub fn published(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut published = self.watch();
        async move {
            // Fails only once the hub (its sender) is gone: the wait
            // ends then too.
            let _ = published.changed().await;
        }
    }

    /// What [`published`](Self::published) waits on, for a wait that
    /// awaits it beside others: its `changed()` resolves when tasks were
    /// published after the last [`try_recv`](Self::try_recv) that found
    /// none, or once the hub is gone.
    pub fn watch(&self) -> watch::Receiver<u64> {
        // A clone has seen what the original has seen.
        self.published.clone()
    }

    /// Takes the next tasks from the ring; `Some(n)` if `n` were skipped.
    fn fill(&mut self) -> Option<u64> {
        let ring = self.hub.ring.read();
        let first = ring.first_id();
        if self.next < first {
            let skipped = first - self.next;
            self.next = first;
            return Some(skipped);
        }
        let offset = (self.next - first) as usize;
        self.ready
            .extend(ring.tasks.iter().skip(offset).take(READ_BATCH).cloned());
        self.next += self.ready.len() as u64;
        None
    }

    /// Id of the next task this subscription will read.
    pub fn position(&self) -> u64 {
        self.next - self.ready.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(hub: &Hub, n: usize) -> Range<u64> {
        hub.publish_with(n, |id| format!("t{id}"))
    }

    async fn next_task(sub: &mut Subscription) -> u64 {
        match sub.recv().await {
            Delivery::Task(t) => t.id,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn subscribers_see_every_task_in_order() {
        let hub = Hub::new(100);
        let mut a = hub.subscribe(Start::Latest);
        let mut b = hub.subscribe(Start::Latest);
        assert_eq!(texts(&hub, 3), 1..4);
        for want in 1..4 {
            assert_eq!(next_task(&mut a).await, want);
            assert_eq!(next_task(&mut b).await, want);
        }
    }

    #[tokio::test]
    async fn replay_starts_at_the_oldest_retained() {
        let hub = Hub::new(5);
        texts(&hub, 8);
        let mut sub = hub.subscribe(Start::Oldest);
        assert_eq!(next_task(&mut sub).await, 4);
        let mut after = hub.subscribe(Start::After(6));
        assert_eq!(next_task(&mut after).await, 7);
    }

    #[tokio::test]
    async fn a_slow_subscriber_skips_ahead_and_memory_stays_bounded() {
        let hub = Hub::new(10);
        let mut sub = hub.subscribe(Start::Latest);
        texts(&hub, 1000);
        assert_eq!(hub.retained(), 10);
        assert!(hub.get(990).is_none() && hub.get(1001).is_none());
        assert_eq!(hub.get(991).unwrap().id, 991);
        match sub.recv().await {
            Delivery::Skipped(n) => assert_eq!(n, 990),
            other => panic!("expected a skip, got {other:?}"),
        }
        assert_eq!(next_task(&mut sub).await, 991);
    }

    #[tokio::test]
    async fn a_restored_hub_goes_on_from_its_next_id_and_voids_gaps() {
        let task = |id| Arc::new(Task::new(id, format!("t{id}"), SystemTime::now(), None));
        let hub = Hub::restored(4, 10, vec![task(2), task(7), task(9)]);
        assert_eq!(hub.first_id(), 6);
        assert!(hub.get(6).unwrap().void && hub.get(8).unwrap().void);
        assert_eq!(hub.get(7).unwrap().text, "t7");
        let ids: Vec<u64> = hub.retained_tasks().iter().map(|t| t.id).collect();
        assert_eq!(ids, [7, 9]);
        let mut sub = hub.subscribe(Start::Latest);
        hub.append_tasks(&[task(12)]);
        assert!(hub.get(10).unwrap().void && hub.get(11).unwrap().void);
        match sub.recv().await {
            Delivery::Task(t) => assert_eq!((t.id, t.void), (10, true)),
            other => panic!("{other:?}"),
        }
        assert_eq!(texts(&hub, 1), 13..14);
    }

    #[tokio::test]
    async fn a_waiting_subscriber_wakes_on_publish() {
        let hub = Hub::new(10);
        let mut sub = hub.subscribe(Start::Latest);
        let waiter = tokio::spawn(async move { next_task(&mut sub).await });
        tokio::task::yield_now().await;
        let task = hub.publish("x".into(), Some(Arc::from("a1")));
        assert_eq!(waiter.await.unwrap(), 1);
        assert_eq!(hub.get(1).unwrap().target.as_deref(), Some("a1"));
        assert!(Arc::ptr_eq(&hub.get(task.id).unwrap(), &task));
        assert!(hub.get(2).is_none());
    }
}
