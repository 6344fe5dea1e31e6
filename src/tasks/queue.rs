//! Queue mode: each task goes to exactly one connected agent, the least
//! busy; a task not acked within `ack_timeout` is redelivered (to another
//! agent when there is one); after `max_attempts` deliveries it is parked
//! as dead and reported. A task whose agent's connection drops waits for
//! that agent (it may still be running it: it gets the task back first when
//! it reconnects) or for that deadline, whichever comes first. Tasks wait
//! while no agent is connected, up to `max_pending`; beyond that the oldest
//! are dropped and counted.
//!
//! Every agent stream is a [`Slot`] with a small outbox; at most `window`
//! tasks are assigned to a slot at once (queued in its outbox or in flight),
//! so a slow agent cannot hoard work. An agent that says how many tasks it
//! runs at once (its `handler_concurrency`, see [`Queue::join_capped`]) is
//! assigned no more than that: a claim's deadline then measures handling,
//! not waiting in the agent's own queue (Celery's prefetch lesson).
//!
//! Published tasks come straight from the store (never through the
//! broadcast ring, whose retention would lose them). Each assignment is a
//! claim written to the store, and a task is sent only once its claim is
//! committed: after a crash, the store knows who may be running every task.
//! Claims restored at start-up wait for their holder to come back (it gets
//! them again first, and dedupes) or for their deadline.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::model::{Task, TaskState};
use crate::store::{Commit, LostClaim, Store, Write};

/// The queue's limits; all change live on a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub ack_timeout: Duration,
    pub max_attempts: u32,
    pub window: usize,
    pub max_pending: usize,
    pub max_dead: usize,
}

/// Counters for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Deliveries after the first, because of a timeout or a disconnect.
    pub redelivered: u64,
    /// Tasks dropped because `max_pending` tasks already waited.
    pub dropped: u64,
    /// Tasks parked as dead so far.
    pub dead: u64,
    /// Acks for tasks no longer in flight (late or repeated).
    pub duplicate_acks: u64,
}

/// How many tasks the queue holds now, by place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depths {
    /// Not sent yet: waiting for an agent, or in an agent's outbox.
    pub waiting: usize,
    /// Sent, waiting for the ack.
    pub in_flight: usize,
    /// Parked as dead (the latest `max_dead`).
    pub dead: usize,
}

/// Why an ack changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckRefusal {
    /// The task is not in flight: acked already, or handed back.
    NotInFlight,
    /// The task's current attempt is held by another agent.
    NotTheHolder,
    /// An operator cancelled the task while the agent held it.
    Cancelled,
}

/// Why [`Queue::cancel`] or [`Queue::retry`] changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue does not hold the task (finished and let go, or unknown).
    NotHeld,
    /// The task is in this state, which the change does not apply to.
    State(TaskState),
}

/// Where the queue holds a task, for `task show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Waiting for any agent, or for the one it is for.
    Waiting(Option<Arc<str>>),
    /// Assigned to this agent, its claim not sent yet.
    Assigned(Arc<str>),
    /// Sent to this agent, whose ack is due by `deadline_ms` (unix ms).
    InFlight {
        holder: Arc<str>,
        deadline_ms: i64,
    },
    Dead,
    /// Cancelled; the agent that held it then, if one did.
    Cancelled(Option<Arc<str>>),
}

/// A task waiting or in flight, with its delivery history.
#[derive(Debug, Clone)]
struct Entry {
    task: Arc<Task>,
    /// Deliveries so far.
    attempts: u32,
    /// The slot it was last delivered to, avoided on redelivery.
    last_slot: Option<u64>,
    /// The store's sequence number of its current claim: it is sent once
    /// that is committed.
    seq: u64,
    /// Its current claim's deadline as the store has it (unix ms; 0: none),
    /// which with the holder names the claim a state change ends.
    claim_deadline_ms: i64,
}

impl Entry {
    fn new(task: Arc<Task>, attempts: u32) -> Entry {
        Entry {
            task,
            attempts,
            last_slot: None,
            seq: 0,
            claim_deadline_ms: 0,
        }
    }
}

#[derive(Debug)]
struct SlotState {
    name: Arc<str>,
    outbox: VecDeque<Entry>,
    in_flight: usize,
    wake: Arc<Notify>,
    /// The tasks its agent runs at once, if it said: it is assigned at
    /// most that many (and at most `window`).
    cap: Option<usize>,
}

impl SlotState {
    fn load(&self) -> usize {
        self.outbox.len() + self.in_flight
    }

    /// Its own window: `window`, or less if its agent runs fewer at once.
    fn window(&self, window: usize) -> usize {
        self.cap.map_or(window, |cap| cap.min(window))
    }

    /// Its key in `by_load`: its load plus what its own window lacks of
    /// `window`, so that a slot has room exactly when its rank is below
    /// `window` and the slot with the most room comes first.
    fn rank(&self, window: usize) -> usize {
        self.load() + (window - self.window(window))
    }
}

#[derive(Debug)]
struct Flight {
    entry: Entry,
    /// The stream it was sent on; `None` for a claim restored at start-up.
    slot: Option<u64>,
    /// The agent whose ack counts.
    holder: Arc<str>,
    deadline: Instant,
    /// Claimed through another server sharing the store: at its deadline
    /// it is only put back in line (this server had no attempt of it).
    remote: bool,
}

#[derive(Debug)]
struct State {
    limits: Limits,
    /// Untargeted tasks waiting, oldest first.
    pending: VecDeque<Entry>,
    /// Tasks for one named agent, waiting for it.
    targeted: HashMap<Arc<str>, VecDeque<Entry>>,
    in_flight: HashMap<u64, Flight>,
    slots: HashMap<u64, SlotState>,
    /// (rank, slot id) of every slot ([`SlotState::rank`]): the one with
    /// the most room first.
    by_load: BTreeSet<(usize, u64)>,
    next_slot: u64,
    dead: VecDeque<Arc<Task>>,
    /// Tasks cancelled here, with the agent that held each (whose later
    /// ack is then told apart from a forged one), the latest `max_dead`.
    cancelled: VecDeque<(Arc<Task>, Option<Arc<str>>)>,
    /// The ids of `cancelled` whose task an agent held, with that agent:
    /// an ack of a task not in flight is looked up here, not by a scan of
    /// `cancelled` under the queue's lock.
    cancelled_holders: HashMap<u64, Arc<str>>,
    counters: Counters,
    store: Store,
    /// The server is shutting down: nothing more is handed out, and a
    /// stream that ends keeps its tasks' claims (see [`Queue::close`]).
    closing: bool,
    /// Agents gone for good (their credentials revoked, [`Queue::let_go`]):
    /// a stream of theirs that ends hands its tasks on at once. Until the
    /// agent joins again.
    let_go: HashSet<Arc<str>>,
}

/// The queue shared by all agent streams.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<State>,
    committed: watch::Receiver<u64>,
}

/// One agent stream's place in the queue. Dropping it puts the tasks
/// assigned but not sent back in line; those sent and not acked stay
/// claimed by its agent until their deadline (or go back in line at once,
/// if the agent was let go).
#[derive(Debug)]
pub struct Slot {
    queue: Arc<Queue>,
    id: u64,
    wake: Arc<Notify>,
    committed: watch::Receiver<u64>,
}

/// A task as a store kept it, for [`Queue::restore`].
#[derive(Debug)]
pub struct Restored {
    pub task: Arc<Task>,
    pub attempts: u32,
    /// The agent holding its current attempt, and the attempt's deadline
    /// (unix ms).
    pub claim: Option<(Arc<str>, i64)>,
}

/// What [`Slot::take`] found.
enum Take {
    Task(Arc<Task>, u32),
    /// The next task's claim is not committed yet.
    Uncommitted(u64),
    Empty,
}

impl Queue {
    /// An empty queue writing its claims to `store`.
    pub fn new(limits: Limits, store: Store) -> Arc<Queue> {
        Arc::new(Queue {
            committed: store.committed(),
            state: Mutex::new(State {
                limits,
                pending: VecDeque::new(),
                targeted: HashMap::new(),
                in_flight: HashMap::new(),
                slots: HashMap::new(),
                by_load: BTreeSet::new(),
                next_slot: 1,
                dead: VecDeque::new(),
                cancelled: VecDeque::new(),
                cancelled_holders: HashMap::new(),
                counters: Counters::default(),
                store,
                closing: false,
                let_go: HashSet::new(),
            }),
        })
    }

    /// The server is shutting down: from now on no task is handed to any
    /// stream, and the tasks in flight on a stream that ends keep their
    /// claims (holder and deadline, as claims restored at start-up do)
    /// instead of going to the next stream. Streams end one by one at
    /// shutdown; before this, each end handed its tasks to a stream still
    /// open, whose agent ran them and whose own end handed them on again:
    /// in a soak, one task ran at 12 agents and used up all its attempts
    /// within 300 ms, then was parked as dead.
    pub fn close(&self) {
        self.state.lock().closing = true;
    }

    /// Takes back the unfinished tasks a store kept: claimed ones wait for
    /// their holder or their deadline, the others are in line.
    pub fn restore(&self, tasks: Vec<Restored>) {
        let mut state = self.state.lock();
        let (now, now_ms) = (Instant::now(), crate::clock::now_ms());
        let mut waiting = Vec::new();
        for restored in tasks {
            let mut entry = Entry::new(restored.task, restored.attempts);
            match restored.claim {
                Some((holder, deadline_ms)) => {
                    entry.claim_deadline_ms = deadline_ms;
                    let left = u64::try_from(deadline_ms.saturating_sub(now_ms)).unwrap_or(0);
                    let flight = Flight {
                        entry,
                        slot: None,
                        holder,
                        deadline: now + Duration::from_millis(left),
                        remote: false,
                    };
                    state.in_flight.insert(flight.entry.task.id, flight);
                }
                None => waiting.push(entry),
            }
        }
        for entry in waiting {
            state.enqueue(entry);
        }
        state.dispatch();
    }

    /// Applies reloaded limits.
    pub fn set_limits(&self, limits: Limits) {
        let mut state = self.state.lock();
        let rerank = state.limits.window != limits.window;
        state.limits = limits;
        if rerank {
            let window = limits.window;
            state.by_load = state
                .slots
                .iter()
                .map(|(id, s)| (s.rank(window), *id))
                .collect();
        }
        state.dispatch();
    }

    /// Adds newly published tasks (void ones are left out).
    pub fn push_all(&self, tasks: &[Arc<Task>]) {
        let mut state = self.state.lock();
        for task in tasks.iter().filter(|t| !t.void) {
            state.enqueue(Entry::new(Arc::clone(task), 0));
        }
        state.dispatch();
    }

    /// Adds a newly published task.
    pub fn push(&self, task: Arc<Task>) {
        self.push_all(&[task]);
    }

    /// A new agent stream named `name`, assigned up to `window` tasks.
    pub fn join(self: &Arc<Self>, name: Arc<str>) -> Slot {
        self.join_capped(name, None)
    }

    /// A new agent stream named `name` whose agent runs `cap` tasks at once
    /// (if it said): it is assigned at most that many, so the tasks it
    /// holds are the ones it runs, and their `ack_timeout` measures
    /// handling rather than waiting.
    pub fn join_capped(self: &Arc<Self>, name: Arc<str>, cap: Option<usize>) -> Slot {
        let cap = cap.map(|c| c.max(1));
        let wake = Arc::new(Notify::new());
        let mut state = self.state.lock();
        let id = state.next_slot;
        state.next_slot += 1;
        state.let_go.remove(&name);
        // Claims restored at start-up that this agent holds: it gets them
        // again first (it acks again what it handled before the restart).
        let mut restored: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.slot.is_none() && *f.holder == *name)
            .map(|(id, _)| *id)
            .collect();
        restored.sort_unstable();
        state.slots.insert(
            id,
            SlotState {
                name,
                outbox: VecDeque::new(),
                in_flight: 0,
                wake: Arc::clone(&wake),
                cap,
            },
        );
        let rank = state.slots[&id].rank(state.limits.window);
        state.by_load.insert((rank, id));
        for task in restored {
            if let Some(flight) = state.in_flight.remove(&task) {
                state.assign(id, flight.entry);
            }
        }
        state.dispatch();
        Slot {
            queue: Arc::clone(self),
            id,
            wake,
            committed: self.committed.clone(),
        }
    }

    /// The agents `names` are gone for good (a reload revoked their
    /// credentials): the tasks they hold go back in line now rather than at
    /// their deadline, as their streams end (or at once, for a claim
    /// without a stream). Each redelivery counts as an attempt.
    pub fn let_go(&self, names: &[Arc<str>]) {
        // Sets, not scans: a CA change can let a whole fleet go at once.
        let names: HashSet<&Arc<str>> = names.iter().collect();
        let mut state = self.state.lock();
        // Marked only while it has a stream to end (the last to end clears
        // it): the set stays as small as the streams.
        let streaming: Vec<Arc<str>> = state
            .slots
            .values()
            .filter(|s| names.contains(&s.name))
            .map(|s| Arc::clone(&s.name))
            .collect();
        state.let_go.extend(streaming);
        let held: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.slot.is_none() && !f.remote && names.contains(&f.holder))
            .map(|(id, _)| *id)
            .collect();
        for id in held {
            if let Some(flight) = state.in_flight.remove(&id) {
                state.retry(flight.entry, flight.holder);
            }
        }
        state.dispatch();
    }

    /// Records an ack of task `id` by the agent `by`, returning the task.
    ///
    /// # Errors
    /// The task is not in flight (a late or repeated ack, counted), it is
    /// in flight at another agent (the ack changes nothing), or it was
    /// cancelled while `by` held it.
    pub fn ack(&self, id: u64, by: &str) -> Result<Arc<Task>, AckRefusal> {
        let mut state = self.state.lock();
        let Some(flight) = state.in_flight.get(&id) else {
            let held_when_cancelled = state
                .cancelled_holders
                .get(&id)
                .is_some_and(|holder| &**holder == by);
            if held_when_cancelled {
                return Err(AckRefusal::Cancelled);
            }
            state.counters.duplicate_acks += 1;
            return Err(AckRefusal::NotInFlight);
        };
        if *flight.holder != *by {
            return Err(AckRefusal::NotTheHolder);
        }
        let flight = state.in_flight.remove(&id).expect("looked up above");
        if let Some(slot) = flight.slot {
            state.change_load(slot, |s| s.in_flight -= 1);
        }
        state.dispatch();
        Ok(flight.entry.task)
    }

    /// Cancels task `id` if it waits or is in flight: it is not sent (again),
    /// and an ack from the agent holding it is refused as
    /// [`AckRefusal::Cancelled`]. Returns the task and the store's write.
    ///
    /// # Errors
    /// The queue does not hold the task, or it is dead or cancelled.
    pub fn cancel(&self, id: u64) -> Result<(Arc<Task>, Commit), Refusal> {
        let mut state = self.state.lock();
        let (entry, holder) = state.take(id)?;
        entry
            .task
            .progress
            .cancel()
            .map_err(Refusal::State)
            .inspect_err(|_| tracing::error!(task_id = id, "a finished task was queued (a bug)"))?;
        let commit = state.store.write_now(Write::Cancelled {
            id,
            held: holder.is_some(),
        });
        if let Some(holder) = &holder {
            state.cancelled_holders.insert(id, Arc::clone(holder));
        }
        state.cancelled.push_back((Arc::clone(&entry.task), holder));
        while state.cancelled.len() > state.limits.max_dead {
            if let Some((gone, _)) = state.cancelled.pop_front() {
                state.cancelled_holders.remove(&gone.id);
            }
        }
        state.dispatch();
        Ok((entry.task, commit))
    }

    /// Sends a failed or dead task back in line: pending, its attempts
    /// reset, its retry count (sent with it, so agents run it again) one
    /// higher. `task` is the queue's own if it holds it (dead), else the
    /// hub's or the store's. Returns the store's write.
    ///
    /// # Errors
    /// The task is not failed or dead (the queue holds it waiting or in
    /// flight, or it is acked or cancelled).
    pub fn retry(&self, task: &Arc<Task>) -> Result<Commit, Refusal> {
        let mut state = self.state.lock();
        if let Some((held, place)) = state.place(task.id)
            && place != Place::Dead
        {
            return Err(Refusal::State(held.progress.state()));
        }
        let task = match state.dead.iter().position(|t| t.id == task.id) {
            Some(at) => state.dead.remove(at).expect("found above"),
            None => Arc::clone(task),
        };
        task.progress.retry().map_err(Refusal::State)?;
        let commit = state.store.write_now(Write::Retried { id: task.id });
        state.enqueue(Entry::new(task, 0));
        state.dispatch();
        Ok(commit)
    }

    /// The task `id` if the queue holds it (waiting, in flight, dead or
    /// cancelled here), with where it is and its attempts so far.
    pub fn find(&self, id: u64) -> Option<(Arc<Task>, Place, u32)> {
        let state = self.state.lock();
        let attempts = state.attempts(id);
        state
            .place(id)
            .map(|(task, place)| (task, place, attempts.unwrap_or(0)))
    }

    /// Requeues or parks every task whose ack is overdue.
    pub fn expire(&self, now: Instant) {
        let mut state = self.state.lock();
        let overdue: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(flight) = state.in_flight.remove(&id) {
                if let Some(slot) = flight.slot {
                    state.change_load(slot, |s| s.in_flight -= 1);
                }
                if flight.remote {
                    // Another server's claim lapsed: this one may try.
                    tracing::debug!(
                        task_id = id,
                        holder = %flight.holder,
                        "another server's claim lapsed: back in line"
                    );
                    state.requeue(flight.entry);
                    continue;
                }
                tracing::debug!(
                    task_id = id,
                    attempts = flight.entry.attempts,
                    holder = %flight.holder,
                    "ack overdue"
                );
                state.retry(flight.entry, flight.holder);
            }
        }
        state.dispatch();
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        self.state.lock().counters
    }

    /// How many tasks are where, now.
    pub fn depths(&self) -> Depths {
        let state = self.state.lock();
        let targeted: usize = state.targeted.values().map(VecDeque::len).sum();
        let outboxes: usize = state.slots.values().map(|s| s.outbox.len()).sum();
        Depths {
            waiting: state.pending.len() + targeted + outboxes,
            in_flight: state.in_flight.len(),
            dead: state.dead.len(),
        }
    }

    /// Every task the queue holds (waiting, in flight, dead), for listing.
    pub fn tasks(&self) -> Vec<Arc<Task>> {
        let state = self.state.lock();
        let waiting = state
            .pending
            .iter()
            .chain(state.targeted.values().flatten());
        let assigned = state.slots.values().flat_map(|s| s.outbox.iter());
        waiting
            .chain(assigned)
            .map(|e| Arc::clone(&e.task))
            .chain(state.in_flight.values().map(|f| Arc::clone(&f.entry.task)))
            .chain(state.dead.iter().cloned())
            .chain(state.cancelled.iter().map(|(t, _)| Arc::clone(t)))
            .collect()
    }

    /// Tasks assigned to (queued for or in flight at) each slot's agent.
    pub fn load_by_agent(&self) -> HashMap<Arc<str>, usize> {
        let state = self.state.lock();
        let mut loads = HashMap::new();
        for slot in state.slots.values() {
            *loads.entry(Arc::clone(&slot.name)).or_insert(0) += slot.load();
        }
        loads
    }

    /// Expires overdue acks every quarter of `ack_timeout` until `shutdown`.
    pub async fn reap(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let every = (self.state.lock().limits.ack_timeout / 4)
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            if shutdown
                .run_until_cancelled(tokio::time::sleep(every))
                .await
                .is_none()
            {
                return;
            }
            self.expire(Instant::now());
        }
    }
}

impl State {
    /// Where task `id` is held, if it is.
    fn place(&self, id: u64) -> Option<(Arc<Task>, Place)> {
        let is = |e: &&Entry| e.task.id == id;
        if let Some(e) = self.pending.iter().find(is) {
            return Some((Arc::clone(&e.task), Place::Waiting(None)));
        }
        for (name, queue) in &self.targeted {
            if let Some(e) = queue.iter().find(is) {
                return Some((Arc::clone(&e.task), Place::Waiting(Some(Arc::clone(name)))));
            }
        }
        for slot in self.slots.values() {
            if let Some(e) = slot.outbox.iter().find(is) {
                return Some((Arc::clone(&e.task), Place::Assigned(Arc::clone(&slot.name))));
            }
        }
        if let Some(f) = self.in_flight.get(&id) {
            let left = f.deadline.saturating_duration_since(Instant::now());
            let deadline_ms = crate::clock::now_ms()
                .saturating_add(i64::try_from(left.as_millis()).unwrap_or(i64::MAX));
            let place = Place::InFlight {
                holder: Arc::clone(&f.holder),
                deadline_ms,
            };
            return Some((Arc::clone(&f.entry.task), place));
        }
        if let Some(t) = self.dead.iter().find(|t| t.id == id) {
            return Some((Arc::clone(t), Place::Dead));
        }
        self.cancelled
            .iter()
            .rev()
            .find(|(t, _)| t.id == id)
            .map(|(t, holder)| (Arc::clone(t), Place::Cancelled(holder.clone())))
    }

    /// The deliveries so far of task `id`, if it waits or is in flight.
    fn attempts(&self, id: u64) -> Option<u32> {
        let waiting = self
            .pending
            .iter()
            .chain(self.targeted.values().flatten())
            .chain(self.slots.values().flat_map(|s| s.outbox.iter()));
        waiting
            .chain(self.in_flight.values().map(|f| &f.entry))
            .find(|e| e.task.id == id)
            .map(|e| e.attempts)
    }

    /// Takes task `id` out of line or out of flight, with the agent that
    /// held it (in flight).
    fn take(&mut self, id: u64) -> Result<(Entry, Option<Arc<str>>), Refusal> {
        if let Some(at) = self.pending.iter().position(|e| e.task.id == id) {
            let entry = self.pending.remove(at).expect("found above");
            return Ok((entry, None));
        }
        let targeted = self.targeted.iter_mut().find_map(|(name, queue)| {
            let at = queue.iter().position(|e| e.task.id == id)?;
            Some((Arc::clone(name), queue.remove(at).expect("found above")))
        });
        if let Some((name, entry)) = targeted {
            if self.targeted.get(&name).is_some_and(VecDeque::is_empty) {
                self.targeted.remove(&name);
            }
            return Ok((entry, None));
        }
        let assigned = self.slots.iter().find_map(|(slot, s)| {
            let at = s.outbox.iter().position(|e| e.task.id == id)?;
            Some((*slot, at))
        });
        if let Some((slot, at)) = assigned {
            let mut entry = None;
            self.change_load(slot, |s| entry = s.outbox.remove(at));
            let entry = entry.expect("found above");
            let _ = self.store.take_lost(entry.seq);
            return Ok((entry, None));
        }
        if let Some(flight) = self.in_flight.remove(&id) {
            if let Some(slot) = flight.slot {
                self.change_load(slot, |s| s.in_flight -= 1);
            }
            return Ok((flight.entry, Some(flight.holder)));
        }
        match self.place(id) {
            Some((task, _)) => Err(Refusal::State(task.progress.state())),
            None => Err(Refusal::NotHeld),
        }
    }

    fn change_load(&mut self, slot: u64, change: impl FnOnce(&mut SlotState)) {
        let window = self.limits.window;
        if let Some(s) = self.slots.get_mut(&slot) {
            self.by_load.remove(&(s.rank(window), slot));
            change(s);
            self.by_load.insert((s.rank(window), slot));
        }
    }

    /// Puts a new (or restored) task in line; beyond `max_pending` waiting,
    /// the oldest is dropped, counted and logged.
    fn enqueue(&mut self, entry: Entry) {
        let max = self.limits.max_pending;
        let dropped: Option<Entry> = match entry.task.target.clone() {
            // Tasks for absent agents are bounded too (submitted ones only,
            // so a sum over the targets is cheap enough).
            Some(name) => {
                let waiting: usize = self.targeted.values().map(VecDeque::len).sum();
                let queue = self.targeted.entry(name).or_default();
                queue.push_back(entry);
                if waiting + 1 > max {
                    queue.pop_front()
                } else {
                    None
                }
            }
            None => {
                self.pending.push_back(entry);
                if self.pending.len() > max {
                    self.pending.pop_front()
                } else {
                    None
                }
            }
        };
        if let Some(entry) = dropped {
            self.counters.dropped += 1;
            entry.task.progress.set_state(TaskState::Dead);
            self.store.record(Write::State {
                id: entry.task.id,
                state: TaskState::Dead,
                claim: None,
            });
            if self.counters.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped_total = self.counters.dropped,
                    max_pending = max,
                    task_id = entry.task.id,
                    "queue full with no agent to take tasks: dropping the oldest (raise tasks.max_pending)"
                );
            }
        }
    }

    /// Puts a task that `holder` did not ack back in line, or parks it as
    /// dead.
    fn retry(&mut self, entry: Entry, holder: Arc<str>) {
        if entry.attempts >= self.limits.max_attempts {
            self.counters.dead += 1;
            entry.task.progress.set_state(TaskState::Dead);
            self.store.record(Write::State {
                id: entry.task.id,
                state: TaskState::Dead,
                claim: Some((holder, entry.claim_deadline_ms)),
            });
            tracing::warn!(
                task_id = entry.task.id,
                attempts = entry.attempts,
                "task parked as dead: not acked after tasks.max_attempts deliveries"
            );
            self.dead.push_back(entry.task);
            while self.dead.len() > self.limits.max_dead {
                self.dead.pop_front();
            }
            return;
        }
        self.counters.redelivered += 1;
        entry.task.progress.set_state(TaskState::Pending);
        self.store.record(Write::State {
            id: entry.task.id,
            state: TaskState::Pending,
            claim: Some((holder, entry.claim_deadline_ms)),
        });
        self.requeue(entry);
    }

    /// Puts a task back at the head of its line.
    fn requeue(&mut self, entry: Entry) {
        match entry.task.target.clone() {
            Some(name) => self.targeted.entry(name).or_default().push_front(entry),
            None => self.pending.push_front(entry),
        }
    }

    /// A shared store refused `entry`'s claim: `lost` says what another
    /// server did with it. Finished there, it is let go; held by another
    /// server's agent, it waits for that claim's deadline (or for that
    /// agent to connect here, which gets it first, as after a restart).
    fn lost(&mut self, mut entry: Entry, lost: LostClaim) {
        let id = entry.task.id;
        entry.claim_deadline_ms = lost.deadline_ms.unwrap_or(0);
        if lost.state.is_finished() {
            entry.task.progress.set_state(lost.state);
            tracing::debug!(task_id = id, state = ?lost.state, "task finished through another server");
            return;
        }
        let left = lost
            .deadline_ms
            .map_or(self.limits.ack_timeout, |deadline| {
                Duration::from_millis(
                    u64::try_from(deadline.saturating_sub(crate::clock::now_ms())).unwrap_or(0),
                )
            });
        if let Some(holder) = &lost.holder {
            // Its holder moved here (its server stopped): it gets the task
            // again now (and dedupes it), as after a restart.
            let here = self.slots.iter().find(|(_, s)| s.name == *holder);
            if let Some(slot) = here.map(|(slot, _)| *slot) {
                self.assign(slot, entry);
                return;
            }
        }
        let holder = lost.holder.unwrap_or_else(|| Arc::from("(another server)"));
        tracing::debug!(task_id = id, %holder, "task claimed through another server");
        self.in_flight.insert(
            id,
            Flight {
                entry,
                slot: None,
                holder,
                deadline: Instant::now() + left,
                remote: true,
            },
        );
    }

    /// Assigns waiting tasks to slots with room, least busy first.
    fn dispatch(&mut self) {
        if self.closing {
            return;
        }
        let window = self.limits.window;
        if !self.targeted.is_empty() {
            let ids: Vec<u64> = self.slots.keys().copied().collect();
            for id in ids {
                let name = Arc::clone(&self.slots[&id].name);
                let own = self.slots[&id].window(window);
                while self.slots[&id].load() < own {
                    let Some(entry) = self.targeted.get_mut(&name).and_then(VecDeque::pop_front)
                    else {
                        break;
                    };
                    self.assign(id, entry);
                }
                if self.targeted.get(&name).is_some_and(VecDeque::is_empty) {
                    self.targeted.remove(&name);
                }
            }
        }
        while let Some(entry) = self.pending.front() {
            let mut candidates = self.by_load.iter().take_while(|(rank, _)| *rank < window);
            let Some(&(_, first)) = candidates.next() else {
                return;
            };
            let second = candidates.next().map(|&(_, second)| second);
            // Redeliver to another agent when one has room.
            let slot = match (entry.last_slot, second) {
                (Some(last), Some(second)) if last == first => second,
                _ => first,
            };
            let entry = self.pending.pop_front().expect("front exists");
            // DEFECT, in test builds only and only when asked for (see
            // `crate::defects`): the task handed to a second agent too.
            #[cfg(all(feature = "test-defects", debug_assertions))]
            if let Some(other) = [first].into_iter().chain(second).find(|s| *s != slot)
                && crate::defects::hand_out_twice()
            {
                self.assign(other, entry.clone());
            }
            self.assign(slot, entry);
        }
    }

    /// Gives `entry` to `slot`: claims it in the store, and queues it to be
    /// sent once the claim is committed.
    fn assign(&mut self, slot: u64, mut entry: Entry) {
        let Some(holder) = self.slots.get(&slot).map(|s| Arc::clone(&s.name)) else {
            tracing::error!(
                task_id = entry.task.id,
                slot,
                "a task assigned to a stream that is gone (a bug): dropped"
            );
            return;
        };
        let deadline_ms = crate::clock::now_ms()
            .saturating_add(i64::try_from(self.limits.ack_timeout.as_millis()).unwrap_or(i64::MAX));
        entry.claim_deadline_ms = deadline_ms;
        entry.seq = self.store.claim(Write::Claimed {
            id: entry.task.id,
            attempt: entry.attempts + 1,
            holder,
            deadline_ms,
        });
        self.change_load(slot, |s| {
            s.outbox.push_back(entry);
            s.wake.notify_one();
        });
    }
}

impl Slot {
    /// The next task for this agent and its attempt number; waits while
    /// none is assigned, or its claim is not committed yet. Cancel-safe.
    pub async fn recv(&mut self) -> (Arc<Task>, u32) {
        loop {
            match self.take() {
                Take::Task(task, attempt) => return (task, attempt),
                Take::Uncommitted(seq) => {
                    // The store's writer lives as long as the server; if it
                    // is gone, the next take sends the task anyway.
                    let _ = self.committed.wait_for(|c| *c >= seq).await;
                }
                Take::Empty => self.wake.notified().await,
            }
        }
    }

    fn take(&self) -> Take {
        let committed = *self.committed.borrow();
        let writer_gone = self.committed.has_changed().is_err();
        let mut guard = self.queue.state.lock();
        let state = &mut *guard;
        let ack_timeout = state.limits.ack_timeout;
        loop {
            let Some(slot) = state.slots.get_mut(&self.id) else {
                return Take::Empty;
            };
            let Some(front) = slot.outbox.front() else {
                return Take::Empty;
            };
            if front.seq > committed && !writer_gone {
                return Take::Uncommitted(front.seq);
            }
            if let Some(lost) = state.store.take_lost(front.seq) {
                let mut entry = None;
                state.change_load(self.id, |s| entry = s.outbox.pop_front());
                state.lost(entry.expect("front exists"), lost);
                state.dispatch();
                continue;
            }
            let mut entry = slot.outbox.pop_front().expect("front exists");
            slot.in_flight += 1;
            let holder = Arc::clone(&slot.name);
            entry.attempts += 1;
            entry.last_slot = Some(self.id);
            let next = Take::Task(Arc::clone(&entry.task), entry.attempts);
            entry.task.progress.record_delivery();
            state.in_flight.insert(
                entry.task.id,
                Flight {
                    entry,
                    slot: Some(self.id),
                    holder,
                    deadline: Instant::now() + ack_timeout,
                    remote: false,
                },
            );
            return next;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.queue.state.lock();
        let Some(slot) = state.slots.remove(&self.id) else {
            return;
        };
        let window = state.limits.window;
        state.by_load.remove(&(slot.rank(window), self.id));
        // Assigned but never sent: back in line, no attempt used (and what
        // a shared store said of its claim, if anything, is let go: the
        // next assignment makes a new claim).
        for entry in slot.outbox.into_iter().rev() {
            let lost = state.store.take_lost(entry.seq);
            tracing::debug!(
                task_id = entry.task.id,
                agent = %slot.name,
                seq = entry.seq,
                claim_lost = lost.is_some(),
                "a stream ended before its task was sent: back in line"
            );
            match entry.task.target.clone() {
                Some(name) => state.targeted.entry(name).or_default().push_front(entry),
                None => state.pending.push_front(entry),
            }
        }
        // Sent but not acked: the agent may still be running them (a
        // connection lost is not an agent gone), so its claims stand until
        // their deadline, as claims restored at start-up do: it gets them
        // again first when it comes back (and acks what it handled, from
        // its spool), and at the deadline they go to another agent. Handing
        // them on at once ran a task twice whenever a connection dropped.
        // At shutdown the same: the next start restores them from the store.
        let mut held = Vec::new();
        for (id, flight) in &mut state.in_flight {
            if flight.slot == Some(self.id) {
                flight.slot = None;
                held.push(*id);
            }
        }
        if state.closing {
            return;
        }
        if state.let_go.contains(&slot.name) {
            // Its agent is gone for good: nobody to wait for.
            if !state.slots.values().any(|s| s.name == slot.name) {
                state.let_go.remove(&slot.name);
            }
            held.sort_unstable();
            for id in held {
                if let Some(flight) = state.in_flight.remove(&id) {
                    state.retry(flight.entry, flight.holder);
                }
            }
            state.dispatch();
            return;
        }
        // The agent already came back on another stream (its new connection
        // overtook the old one's end): it gets them there now, as it would
        // had it joined after this. (A scan of the slots, so only when it
        // held something: a reconnect storm drops thousands of streams.)
        let again = if held.is_empty() {
            None
        } else {
            state
                .slots
                .iter()
                .find(|(_, s)| s.name == slot.name)
                .map(|(id, _)| *id)
        };
        if let Some(again) = again {
            held.sort_unstable();
            for id in held {
                if let Some(flight) = state.in_flight.remove(&id) {
                    state.assign(again, flight.entry);
                }
            }
        }
        state.dispatch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Hub;

    fn limits() -> Limits {
        Limits {
            ack_timeout: Duration::from_secs(30),
            max_attempts: 3,
            window: 2,
            max_pending: 100,
            max_dead: 10,
        }
    }

    fn new_queue(limits: Limits) -> Arc<Queue> {
        Queue::new(limits, Store::memory())
    }

    fn publish(hub: &Hub, queue: &Queue, n: usize) {
        for i in 0..n {
            queue.push(hub.publish(format!("t{i}"), None));
        }
    }

    #[tokio::test]
    async fn each_task_goes_to_one_agent_the_least_busy() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let mut a = queue.join("a".into());
        let mut b = queue.join("b".into());
        publish(&hub, &queue, 4);
        let mut ids: Vec<u64> = Vec::new();
        for _ in 0..2 {
            ids.push(a.recv().await.0.id);
            ids.push(b.recv().await.0.id);
        }
        ids.sort();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert!(
            matches!(a.take(), Take::Empty) && matches!(b.take(), Take::Empty),
            "window 2 each, all taken"
        );
    }

    #[tokio::test]
    async fn at_shutdown_an_ending_stream_keeps_its_claims() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let mut a = queue.join("a".into());
        let mut b = queue.join("b".into());
        publish(&hub, &queue, 2);
        let first = a.recv().await.0.id;
        let second = b.recv().await.0.id;
        queue.close();
        // The streams end one by one, as at shutdown: a's task must not go
        // to b (whose agent would run it too), nor b's anywhere.
        drop(a);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), b.recv())
                .await
                .is_err(),
            "nothing is handed out after close"
        );
        drop(b);
        assert_eq!(queue.counters().redelivered, 0);
        assert_eq!(queue.counters().dead, 0);
        for (id, holder) in [(first, "a"), (second, "b")] {
            let (_, place, attempts) = queue.find(id).unwrap();
            assert!(
                matches!(place, Place::InFlight { holder: ref h, .. } if &**h == holder),
                "task {id}: {place:?}"
            );
            assert_eq!(attempts, 1);
        }
    }

    #[tokio::test]
    async fn an_agent_that_runs_fewer_at_once_is_assigned_no_more() {
        let hub = Hub::new(100);
        let queue = new_queue(Limits {
            window: 4,
            ..limits()
        });
        let mut one = queue.join_capped("one".into(), Some(1));
        let mut wide = queue.join_capped("wide".into(), Some(100));
        publish(&hub, &queue, 6);
        // The capped agent takes 1; the other its window of 4; 1 waits.
        let first = one.recv().await.0.id;
        assert!(matches!(one.take(), Take::Empty), "one at a time");
        for _ in 0..4 {
            wide.recv().await;
        }
        assert!(matches!(wide.take(), Take::Empty), "capped by the window");
        assert_eq!(queue.depths().waiting, 1);
        // Its ack makes room for exactly one more.
        queue.ack(first, "one").unwrap();
        one.recv().await;
        assert!(matches!(one.take(), Take::Empty));
        // A narrower window applies to both.
        queue.set_limits(Limits {
            window: 1,
            ..limits()
        });
        assert_eq!(queue.depths().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnect_keeps_the_claim_until_its_deadline() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let mut a = queue.join("a".into());
        publish(&hub, &queue, 1);
        assert_eq!(a.recv().await.1, 1);
        let mut b = queue.join("b".into());
        // a's connection is gone, but a may still be running the task: b
        // does not get it while a's claim stands.
        drop(a);
        assert!(matches!(b.take(), Take::Empty), "a's claim stands");
        assert_eq!(queue.counters().redelivered, 0);
        tokio::time::advance(Duration::from_secs(31)).await;
        queue.expire(Instant::now());
        let (task, attempt) = b.recv().await;
        assert_eq!((task.id, attempt), (1, 2));
        assert_eq!(queue.counters().redelivered, 1);
        assert_eq!(
            queue.ack(1, "a").unwrap_err(),
            AckRefusal::NotTheHolder,
            "a no longer holds task 1"
        );
        assert!(queue.ack(1, "b").is_ok());
        assert_eq!(queue.ack(1, "b").unwrap_err(), AckRefusal::NotInFlight);
        assert_eq!(queue.counters().duplicate_acks, 1);
    }

    #[tokio::test]
    async fn the_tasks_of_an_agent_let_go_go_to_another_agent_at_once() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        // Let go while its stream is open, and after it ended.
        for let_go_first in [true, false] {
            let mut a = queue.join("a".into());
            publish(&hub, &queue, 1);
            let id = a.recv().await.0.id;
            let mut b = queue.join("b".into());
            if let_go_first {
                queue.let_go(&["a".into()]);
                drop(a);
            } else {
                drop(a);
                queue.let_go(&["a".into()]);
            }
            let (task, attempt) = b.recv().await;
            assert_eq!((task.id, attempt), (id, 2), "let go first: {let_go_first}");
            assert!(queue.ack(id, "b").is_ok());
            assert!(queue.state.lock().let_go.is_empty(), "no mark left behind");
        }
    }

    #[tokio::test]
    async fn an_agent_that_reconnects_gets_its_tasks_again_first() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let mut a = queue.join("a".into());
        let mut b = queue.join("b".into());
        publish(&hub, &queue, 2);
        // One each: the least busy agent gets the next task.
        let first = a.recv().await.0.id;
        let second = b.recv().await.0.id;
        assert_ne!(first, second);
        drop(a);
        let mut a = queue.join("a".into());
        let (task, attempt) = a.recv().await;
        assert_eq!((task.id, attempt), (first, 2), "a's own task, again");
        assert!(matches!(b.take(), Take::Empty));
        // Its ack (from its spool, as it ran the task before) is the holder's.
        assert!(queue.ack(first, "a").is_ok());
        assert!(queue.ack(second, "b").is_ok());
    }

    #[tokio::test]
    async fn a_new_stream_that_overtakes_the_old_ones_end_gets_its_tasks() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let mut old = queue.join("a".into());
        publish(&hub, &queue, 1);
        assert_eq!(old.recv().await.1, 1);
        // The agent reconnected before the server saw its old stream end.
        let mut new = queue.join("a".into());
        assert!(matches!(new.take(), Take::Empty), "the old stream holds it");
        drop(old);
        let (task, attempt) = new.recv().await;
        assert_eq!((task.id, attempt), (1, 2));
        assert!(queue.ack(1, "a").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn overdue_acks_are_retried_then_parked_as_dead() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let mut a = queue.join("a".into());
        publish(&hub, &queue, 1);
        for attempt in 1..=3 {
            assert_eq!(a.recv().await.1, attempt);
            tokio::time::advance(Duration::from_secs(31)).await;
            queue.expire(Instant::now());
        }
        assert_eq!(hub.get(1).unwrap().progress.state(), TaskState::Dead);
        assert_eq!(queue.counters().dead, 1);
        assert!(matches!(a.take(), Take::Empty));
    }

    #[tokio::test]
    async fn restored_claims_wait_for_their_holder_who_gets_them_again_first() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let (one, two, three) = (
            hub.publish("one".into(), None),
            hub.publish("two".into(), None),
            hub.publish("three".into(), None),
        );
        let later = crate::clock::now_ms() + 30_000;
        queue.restore(vec![
            Restored {
                task: one,
                attempts: 1,
                claim: Some(("a".into(), later)),
            },
            Restored {
                task: two,
                attempts: 1,
                claim: Some(("a".into(), later)),
            },
            Restored {
                task: three,
                attempts: 0,
                claim: None,
            },
        ]);
        let mut b = queue.join("b".into());
        assert_eq!(b.recv().await.0.id, 3, "the unclaimed task goes to anyone");
        assert!(matches!(b.take(), Take::Empty), "a's claims wait for a");
        assert_eq!(queue.ack(1, "b").unwrap_err(), AckRefusal::NotTheHolder);
        // a's ack of a task it handled before the restart counts, even
        // before its stream opens.
        assert!(queue.ack(1, "a").is_ok());
        let mut a = queue.join("a".into());
        let (task, attempt) = a.recv().await;
        assert_eq!((task.id, attempt), (2, 2));
        assert!(queue.ack(2, "a").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_claim_is_redelivered_to_another_agent_at_its_deadline() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let soon = crate::clock::now_ms() + 1000;
        queue.restore(vec![Restored {
            task: hub.publish("one".into(), None),
            attempts: 1,
            claim: Some(("gone".into(), soon)),
        }]);
        let mut b = queue.join("b".into());
        assert!(matches!(b.take(), Take::Empty));
        tokio::time::advance(Duration::from_millis(1100)).await;
        queue.expire(Instant::now());
        let (task, attempt) = b.recv().await;
        assert_eq!((task.id, attempt), (1, 2));
        assert_eq!(queue.counters().redelivered, 1);
    }

    #[tokio::test]
    async fn targeted_tasks_wait_for_their_agent() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let mut a = queue.join("a".into());
        queue.push(hub.publish("for b".into(), Some("b".into())));
        publish(&hub, &queue, 1);
        assert_eq!(a.recv().await.0.id, 2, "the untargeted task is not blocked");
        let mut b = queue.join("b".into());
        assert_eq!(b.recv().await.0.id, 1);
    }

    #[tokio::test]
    async fn a_cancelled_task_is_not_sent_and_its_holders_ack_is_told_apart() {
        let hub = Hub::new(100);
        let queue = new_queue(Limits {
            window: 1,
            ..limits()
        });
        publish(&hub, &queue, 3);
        let (task, commit) = queue.cancel(2).unwrap();
        commit.committed().await.unwrap();
        assert_eq!(task.progress.state(), TaskState::Cancelled);
        assert_eq!(
            queue.cancel(2).unwrap_err(),
            Refusal::State(TaskState::Cancelled)
        );
        assert_eq!(queue.cancel(99).unwrap_err(), Refusal::NotHeld);
        let mut a = queue.join("a".into());
        assert_eq!(a.recv().await.0.id, 1);
        // In flight at a, with a window of one: cancelling it frees room.
        let (_, commit) = queue.cancel(1).unwrap();
        commit.committed().await.unwrap();
        assert_eq!(a.recv().await.0.id, 3, "task 2 was cancelled while waiting");
        assert_eq!(queue.ack(1, "a").unwrap_err(), AckRefusal::Cancelled);
        assert_eq!(queue.ack(1, "b").unwrap_err(), AckRefusal::NotInFlight);
        assert_eq!(
            queue.counters().duplicate_acks,
            1,
            "only b's ack is a duplicate"
        );
        let (_, place, _) = queue.find(1).unwrap();
        assert_eq!(place, Place::Cancelled(Some("a".into())));
        assert!(queue.ack(3, "a").is_ok());
        drop(a);
        assert_eq!(queue.counters().redelivered, 0, "nothing handed back");
        let listed: Vec<(u64, TaskState)> = {
            let mut l: Vec<_> = queue
                .tasks()
                .iter()
                .map(|t| (t.id, t.progress.state()))
                .collect();
            l.sort_unstable();
            l
        };
        assert_eq!(
            listed,
            [(1, TaskState::Cancelled), (2, TaskState::Cancelled)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_or_failed_task_retried_is_delivered_anew_with_its_attempts_reset() {
        let hub = Hub::new(100);
        let queue = new_queue(limits());
        let mut a = queue.join("a".into());
        publish(&hub, &queue, 2);
        assert_eq!(a.recv().await.0.id, 1);
        assert_eq!(a.recv().await.0.id, 2);
        // Task 2 fails: acked, and let go by the queue.
        let failed = queue.ack(2, "a").unwrap();
        failed
            .progress
            .record_ack(false, &"a".into(), "exit 1".into());
        // Task 1 is never acked: dead after 3 attempts.
        for attempt in 2..=3 {
            tokio::time::advance(Duration::from_secs(31)).await;
            queue.expire(Instant::now());
            let (task, got) = a.recv().await;
            assert_eq!((task.id, got), (1, attempt));
        }
        tokio::time::advance(Duration::from_secs(31)).await;
        queue.expire(Instant::now());
        let dead = hub.get(1).unwrap();
        assert_eq!(dead.progress.state(), TaskState::Dead);
        assert_eq!(queue.find(1).unwrap().1, Place::Dead);

        queue.retry(&dead).unwrap().committed().await.unwrap();
        assert_eq!(
            queue.retry(&dead).unwrap_err(),
            Refusal::State(TaskState::Pending),
            "a pending task is not retried"
        );
        let (task, attempt) = a.recv().await;
        assert_eq!((task.id, attempt, task.progress.retries()), (1, 1, 1));
        assert!(queue.ack(1, "a").is_ok());

        assert!(queue.find(2).is_none(), "a failed task is not held");
        queue.retry(&failed).unwrap().committed().await.unwrap();
        let (task, attempt) = a.recv().await;
        assert_eq!((task.id, attempt, task.progress.retries()), (2, 1, 1));
        assert_eq!(task.progress.state(), TaskState::Delivered);
        assert_eq!(
            queue.retry(&failed).unwrap_err(),
            Refusal::State(TaskState::Delivered)
        );
    }

    #[tokio::test]
    async fn pending_is_bounded() {
        let hub = Hub::new(1000);
        let queue = new_queue(Limits {
            max_pending: 5,
            ..limits()
        });
        publish(&hub, &queue, 8);
        assert_eq!(queue.counters().dropped, 3);
        for i in 0..7 {
            queue.push(hub.publish(format!("for b {i}"), Some("b".into())));
        }
        assert_eq!(
            queue.counters().dropped,
            5,
            "tasks for an absent agent are bounded too"
        );
        let mut a = queue.join("a".into());
        assert_eq!(a.recv().await.0.id, 4, "the oldest were dropped");
    }
}
