//! The broker: the one owner of task state. It holds the hub (the ring of
//! retained tasks), the delivery mode (broadcast with every named agent's
//! ack cursor, or the queue), the store and its epoch, and decides
//! everything that happens to a task: what a stream is sent
//! ([`subscribe`](Broker::subscribe)), which acks count
//! ([`ack`](Broker::ack)), publishing, listing, showing, cancelling and
//! retrying, housekeeping, and what is saved at the end.
//!
//! The transports (the Contact service, the admin API) only translate: they
//! hand it an [`Agent`] and a message and get values back ([`Acked`], a
//! frame and its count, a [`TaskView`], a [`Refused`]), and keep their own
//! counters and log lines about callers. It is the only writer of the store.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use super::caller::{Acked, Agent};
use super::{
    Cursors, Hub, generator,
    jobs::Jobs,
    queue::{self, AckRefusal, Place, Queue, Refusal},
};
use crate::{
    config::{Config, DeliveryMode, TasksConfig},
    model::{Draft, SavedAgent, Task, TaskState},
    proto::{
        contact::{Outcome, Result as ResultMsg, ServerMsg},
        wire::{self, Framed},
    },
    store::{self, Fleet, Store, StoreError, TaskRecord, Write},
};

/// How tasks reach agents.
#[derive(Debug)]
pub(super) enum Mode {
    /// Every agent gets every task (meant for it); named agents resume
    /// after what they acked.
    Broadcast { cursors: Cursors },
    /// Each task goes to one agent and is redelivered until acked.
    Queue { queue: Arc<Queue> },
}

/// Why an operator's request about a task was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    #[error(
        "no task {0}: never submitted, or deleted since (tasks.keep_for, tasks.retain_finished)"
    )]
    NotFound(u64),
    #[error("task {0} is {1}: only a pending or delivered task can be cancelled")]
    CannotCancel(u64, TaskState),
    #[error("task {0} is no longer retained (tasks.retain): it is not sent to anyone any more")]
    NotRetained(u64),
    #[error("task {0} is {1}: only a failed or dead task can be retried")]
    CannotRetry(u64, TaskState),
    #[error(
        "task {0} is a broadcast task ({1}): only queue mode retries tasks; to run it again, \
         submit it again (with --agent NAME for one agent)"
    )]
    Broadcast(u64, TaskState),
    #[error(
        "task {0} is the task of job run {0}: its run sends it, agent by agent (`contactd job \
         show {0}`); it is not cancelled or retried on its own"
    )]
    RunTask(u64),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Where one agent stands with one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    Owed,
    Delivered,
    Acked,
    Failed,
    Missed,
    Cancelled,
}

/// One agent's row of a [`TaskView`].
#[derive(Debug, Clone)]
pub struct AgentRow {
    pub agent: Arc<str>,
    pub state: AgentState,
    /// Its latest result (cut to `server.max_status_size`).
    pub result: String,
    /// When the result arrived (unix ms; 0: not known).
    pub result_ms: i64,
    /// Queue mode: when its claim runs out (unix ms; 0: none).
    pub deadline_ms: i64,
}

impl AgentRow {
    fn new(agent: &Arc<str>, state: AgentState) -> AgentRow {
        AgentRow {
            agent: Arc::clone(agent),
            state,
            result: String::new(),
            result_ms: 0,
            deadline_ms: 0,
        }
    }
}

/// One task in full: `task show`.
#[derive(Debug)]
pub struct TaskView {
    pub task: Arc<Task>,
    /// Queue mode: deliveries of its current round.
    pub attempts: u32,
    /// Every agent it concerns, by name.
    pub agents: Vec<AgentRow>,
}

/// Counts for the metrics, read at a scrape.
#[derive(Debug, Default)]
pub struct Stats {
    /// The id the next published task gets.
    pub next_id: u64,
    /// Queue mode's counters and depths (zero in broadcast mode).
    pub queue: queue::Counters,
    pub depths: queue::Depths,
    /// Acks of cancelled tasks, ignored.
    pub cancelled_acks: u64,
}

/// What housekeeping reads from the config (`apply` keeps it current).
#[derive(Debug, Clone, Copy, Default)]
struct Keeping {
    keep_for: Duration,
    retain_finished: usize,
    forget_agents_after: Duration,
}

/// The one owner of task state (see the module's documentation).
#[derive(Debug)]
pub struct Broker {
    /// The tasks agents receive: the last `tasks.retain`.
    hub: Arc<Hub>,
    mode: Mode,
    /// Where tasks, claims, acks and cursors are kept.
    store: Store,
    /// The store's random id (kept across restarts by a durable store; new
    /// at each start with the memory store), sent with every task
    /// (`ServerMsg.epoch`) so acks of tasks from an earlier run can be told
    /// apart.
    epoch: u64,
    /// Acks of cancelled tasks (from agents that had them), ignored.
    cancelled_acks: AtomicU64,
    /// `tasks.retain`: the bound of a cursor's out-of-order acks (read per
    /// ack and per skipped task, so an atomic rather than the config).
    retain: AtomicUsize,
    /// `tasks.replay`: a new agent starts with the oldest retained task.
    replay: AtomicBool,
    keeping: Mutex<Keeping>,
    /// This server's name, for the fleet view of a shared store.
    server: Arc<str>,
    /// `[[jobs]]` and their runs.
    jobs: Arc<Jobs>,
}

impl Broker {
    /// Opens the task store `config` names and reads what it holds (before
    /// the server says it is ready: a store that cannot be used stops the
    /// start).
    ///
    /// # Errors
    /// The store's: [`StoreError::is_config`] tells a bad path or file.
    pub fn open_store(config: &Config) -> Result<store::Opened, StoreError> {
        let queue_mode = config.tasks.mode == DeliveryMode::Queue;
        let opened = store::open(
            &config.store,
            &config.server.resolved_name(),
            config.tasks.retain,
            queue_mode,
        )?;
        if opened.snapshot.next_id > 1 {
            tracing::info!(
                path = %config.store.resolved_path().display(),
                tasks = opened.snapshot.tasks.len(),
                next_id = opened.snapshot.next_id,
                cursors = opened.snapshot.cursors.len(),
                "task store opened"
            );
        }
        Ok(opened)
    }

    /// The broker over an opened store, in the delivery mode `config` says,
    /// with what the store kept restored; and the agent roster it kept.
    pub fn open(config: &Config, opened: store::Opened) -> (Arc<Broker>, Vec<SavedAgent>) {
        let (store, snapshot) = opened.start();
        let queue_mode = config.tasks.mode == DeliveryMode::Queue;
        // A run's task, however old: its run resumes.
        let run_tasks: std::collections::HashMap<u64, Arc<Task>> = snapshot
            .runs
            .iter()
            .filter_map(|r| {
                let id = r.run.task_id;
                let stored = snapshot.tasks.iter().find(|t| t.id == id)?;
                Some((id, Arc::new(stored.to_task())))
            })
            .collect();
        let (hub, restored) = restore(&config.tasks, snapshot.next_id, snapshot.tasks);
        let epoch = snapshot.epoch;
        let mode = if queue_mode {
            let queue = Queue::new(queue_limits(&config.tasks), store.clone());
            queue.restore(restored);
            Mode::Queue { queue }
        } else {
            encode_broadcast(&hub.retained_tasks(), epoch);
            Mode::Broadcast {
                cursors: Cursors::restored(snapshot.cursors),
            }
        };
        store.set_sink({
            let hub = Arc::clone(&hub);
            let queue = match &mode {
                Mode::Queue { queue } => Some(Arc::clone(queue)),
                Mode::Broadcast { .. } => None,
            };
            Arc::new(move |tasks| {
                if queue.is_none() {
                    // Encoded once, here on the store's thread, for every stream.
                    encode_broadcast(tasks, epoch);
                }
                hub.append_tasks(tasks);
                if let Some(queue) = &queue {
                    // A run's task reaches agents through its run only.
                    if tasks.iter().any(|t| t.direct) {
                        let queued: Vec<Arc<Task>> =
                            tasks.iter().filter(|t| !t.direct).cloned().collect();
                        queue.push_all(&queued);
                    } else {
                        queue.push_all(tasks);
                    }
                }
            })
        });
        let jobs = Arc::new(Jobs::restore(
            store.clone(),
            Arc::clone(&hub),
            epoch,
            snapshot.jobs,
            snapshot.runs,
            |id| {
                hub.get(id)
                    .filter(|t| !t.void)
                    .or_else(|| run_tasks.get(&id).cloned())
            },
        ));
        let broker = Broker {
            jobs,
            hub,
            mode,
            store,
            epoch,
            cancelled_acks: AtomicU64::new(0),
            // Set by `apply` below: start applies the config as a reload
            // does, through the same path.
            retain: AtomicUsize::new(0),
            replay: AtomicBool::new(false),
            keeping: Mutex::new(Keeping::default()),
            server: Arc::from(config.server.resolved_name()),
        };
        broker.apply(config);
        (Arc::new(broker), snapshot.agents)
    }

    /// Applies the settings of `config` that can change live (the tasks'
    /// retention and queue limits, housekeeping's periods); the delivery
    /// mode is the one the broker was opened with.
    pub fn apply(&self, config: &Config) {
        let tasks = &config.tasks;
        if self.retain.swap(tasks.retain, Relaxed) != tasks.retain {
            self.hub.set_retain(tasks.retain);
        }
        self.replay.store(tasks.replay, Relaxed);
        if let Mode::Queue { queue } = &self.mode {
            queue.set_limits(queue_limits(tasks));
        }
        *self.keeping.lock() = keeping(config);
        self.jobs.configure(config);
    }

    /// The server is shutting down: queue mode hands nothing out any more,
    /// and the streams that end keep their tasks' claims ([`Queue::close`]).
    pub fn stop_handing_out(&self) {
        if let Mode::Queue { queue } = &self.mode {
            queue.close();
        }
    }

    /// The agents `names` are gone for good (a reload revoked their
    /// credentials): in queue mode the tasks they hold go to other agents
    /// now, not at their claims' deadline ([`Queue::let_go`]).
    pub fn let_go(&self, names: &[Arc<str>]) {
        if let Mode::Queue { queue } = &self.mode {
            queue.let_go(names);
        }
    }

    /// `[[jobs]]` and their runs.
    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// The task `id` with every agent's latest result, as the store keeps
    /// it (`None` for the memory store).
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn store_task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError> {
        self.store.task(id).await
    }

    pub(super) fn mode(&self) -> &Mode {
        &self.mode
    }

    pub(super) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(super) fn retain(&self) -> usize {
        self.retain.load(Relaxed)
    }

    pub(super) fn replay(&self) -> bool {
        self.replay.load(Relaxed)
    }

    /// Whether tasks are delivered in queue mode (else broadcast).
    pub fn is_queue(&self) -> bool {
        matches!(self.mode, Mode::Queue { .. })
    }

    /// The delivery mode's name, as the admin API shows it.
    pub fn mode_name(&self) -> &'static str {
        if self.is_queue() {
            "queue"
        } else {
            "broadcast"
        }
    }

    /// Whether the store's database answers (always, but for a shared one).
    pub fn reachable(&self) -> watch::Receiver<bool> {
        self.store.reachable()
    }

    /// Whether several servers share the store.
    pub fn is_shared(&self) -> bool {
        self.store.is_shared()
    }

    /// Records a result from `agent` (its text `kept` as the server keeps
    /// it): an ack when it names a task that was delivered to it (queue
    /// mode: whose current attempt it holds; broadcast: that exists, is
    /// meant for it and was sent on its streams).
    pub fn ack(&self, agent: &Agent, result: &ResultMsg, kept: &str) -> Acked {
        let outcome = Outcome::try_from(result.outcome).unwrap_or(Outcome::Unspecified);
        let ok = outcome != Outcome::Failed;
        tracing::debug!(task_id = result.task_id, ?outcome, ret = %crate::untrusted::shown(&result.ret), "result received");
        if result.task_id == 0 {
            // A seed client's free-form result.
            return Acked::Counted { ok };
        }
        if result.epoch != 0 && result.epoch != self.epoch {
            tracing::debug!(
                task_id = result.task_id,
                "ack of a task from an earlier server run: ignored"
            );
            return Acked::Ignored;
        }
        if !agent.named {
            return Acked::Refused("the caller has no name: anonymous callers ack nothing");
        }
        if let Some(acked) = self.jobs.ack(agent, result.task_id, ok) {
            if let Acked::Counted { ok } = acked {
                self.record_ack(result.task_id, agent, ok, kept, false);
            }
            return acked;
        }
        // DEFECT, in test builds only and only when asked for (see
        // `crate::defects`): a queue-mode ack dropped, nothing recorded.
        #[cfg(all(feature = "test-defects", debug_assertions))]
        if matches!(self.mode, Mode::Queue { .. }) && crate::defects::drop_ack() {
            return Acked::Ignored;
        }
        let task = match &self.mode {
            Mode::Queue { queue } => match queue.ack(result.task_id, &agent.name) {
                Ok(task) => task,
                // Late or repeated: not forged, already counted by the queue.
                Err(AckRefusal::NotInFlight) => {
                    if self.relay(result.task_id, agent, ok, kept) {
                        return Acked::Ignored;
                    }
                    // Only for a task that exists: an agent acking made-up
                    // ids costs a counter, not a database statement each.
                    if self.store.is_shared() && result.task_id < self.hub.next_id() {
                        // Perhaps sent through another server (the agent
                        // came here with the ack): the store knows whether
                        // this agent holds the task's claim, and keeps it
                        // only then.
                        self.record_ack(result.task_id, agent, ok, kept, true);
                    }
                    return Acked::Ignored;
                }
                Err(AckRefusal::NotTheHolder) => {
                    return Acked::Refused("the task is in flight at another agent");
                }
                Err(AckRefusal::Cancelled) => return self.ignore_cancelled(result.task_id),
            },
            Mode::Broadcast { cursors } => {
                match self.broadcast_ack(cursors, agent, result.task_id) {
                    Ok(Some(task)) => task,
                    // Acked before (an agent back from a cut sends its
                    // spooled ack, and acks the task sent again from what
                    // it remembers): counted once.
                    Ok(None) => return Acked::Ignored,
                    // A run's task after its run ended (timed out, say):
                    // late, not forged. (Looked up only on refusal: not on
                    // every ack's path.)
                    Err(_) if self.hub.get(result.task_id).is_some_and(|t| t.direct) => {
                        self.relay(result.task_id, agent, ok, kept);
                        return Acked::Ignored;
                    }
                    Err(reason) => return Acked::Refused(reason),
                }
            }
        };
        if task.progress.is_cancelled() {
            // Sent before an operator cancelled it: the agent ran it, but
            // its ack changes nothing (the cursor above still moved past it).
            return self.ignore_cancelled(task.id);
        }
        self.record_ack(task.id, agent, ok, kept, self.is_queue());
        task.progress.record_ack(ok, &agent.name, kept.to_owned());
        Acked::Counted { ok }
    }

    /// Writes an ack behind. `claimed` (queue mode): the store keeps it
    /// only if the agent holds the task's claim.
    fn record_ack(&self, id: u64, agent: &Agent, ok: bool, kept: &str, claimed: bool) {
        self.store.record(Write::Acked {
            id,
            agent: Arc::clone(&agent.name),
            ok,
            text: kept.to_owned(),
            at_ms: crate::clock::now_ms(),
            claimed,
        });
    }

    /// With a shared database, an ack of a run's task that no run here
    /// carries out is perhaps of another server's run, its agent moved
    /// here: it is written for that server to read (and kept only if the
    /// agent is running it there). `false`: not a run's task, or a lone
    /// server (where it is late).
    fn relay(&self, id: u64, agent: &Agent, ok: bool, kept: &str) -> bool {
        if !self.store.is_shared() || !self.hub.get(id).is_some_and(|t| t.direct) {
            return false;
        }
        self.store.record(Write::Relayed {
            id,
            agent: Arc::clone(&agent.name),
            ok,
            text: kept.to_owned(),
            at_ms: crate::clock::now_ms(),
        });
        true
    }

    fn ignore_cancelled(&self, task_id: u64) -> Acked {
        self.cancelled_acks.fetch_add(1, Relaxed);
        tracing::debug!(task_id, "ack of a cancelled task: ignored");
        Acked::Ignored
    }

    /// Applies a broadcast ack to the agent's cursor, if the task was sent
    /// to it; `None` when the cursor had it acked already.
    fn broadcast_ack(
        &self,
        cursors: &Cursors,
        agent: &Agent,
        id: u64,
    ) -> Result<Option<Arc<Task>>, &'static str> {
        let tracked = cursors
            .get(&agent.name)
            .filter(|tracked| id <= tracked.sent_up_to.load(Relaxed))
            .ok_or("the task was never sent to this agent")?;
        let task = self
            .hub
            .get(id)
            .ok_or("the task is not retained (unknown, or too old)")?;
        if task
            .target
            .as_ref()
            .is_some_and(|target| *target != agent.name)
            || !selects(&task, agent)
            || task.direct
        {
            return Err("the task is meant for another agent");
        }
        if task.void {
            return Err("the task is not retained (unknown, or too old)");
        }
        let new = tracked.cursor.lock().ack(id, self.retain());
        tracked.touch();
        Ok(new.then_some(task))
    }

    /// Publishes the task `draft` describes, returning its id once it is
    /// committed to the store.
    ///
    /// # Errors
    /// The store could not keep it ([`StoreError::Full`] for a full disk).
    pub async fn submit(&self, draft: Draft) -> Result<u64, StoreError> {
        let mut draft = Some(draft);
        let ids = self
            .store
            .publish(1, move |_| draft.take().unwrap_or_default())
            .await?;
        Ok(ids.start)
    }

    /// The tasks memory holds (the ring's and the queue's), by id, with
    /// their progress through every server when the store is shared; only
    /// those in `state` when it is given. And queue mode's counters.
    pub async fn list(&self, state: Option<TaskState>) -> (Vec<Arc<Task>>, queue::Counters) {
        let mut tasks: BTreeMap<u64, Arc<Task>> = self
            .hub
            .retained_tasks()
            .into_iter()
            .map(|t| (t.id, t))
            .collect();
        let counters = match &self.mode {
            Mode::Queue { queue } => {
                tasks.extend(queue.tasks().into_iter().map(|t| (t.id, t)));
                queue.counters()
            }
            Mode::Broadcast { .. } => queue::Counters::default(),
        };
        if self.store.is_shared() {
            // Their progress through every server, as the store has it.
            let ids = tasks.keys().copied().collect();
            match self.store.tasks(ids).await {
                Ok(stored) => {
                    tasks.extend(stored.iter().map(|t| (t.id, Arc::new(t.to_task()))));
                }
                Err(e) => tracing::warn!(
                    "cannot read the tasks' progress through the other servers (listing this \
                     server's): {e}"
                ),
            }
        }
        let tasks = tasks
            .into_values()
            .filter(|t| state.is_none_or(|state| t.progress.state() == state))
            .collect();
        (tasks, counters)
    }

    /// The queue's tasks in flight, by the agent holding them (empty in
    /// broadcast mode).
    pub fn in_flight_by_agent(&self) -> std::collections::HashMap<Arc<str>, usize> {
        match &self.mode {
            Mode::Queue { queue } => queue.load_by_agent(),
            Mode::Broadcast { .. } => std::collections::HashMap::new(),
        }
    }

    /// Several servers sharing the store: the servers and the agents the
    /// store knows (`None` for a store of one server).
    ///
    /// # Errors
    /// The store could not be read.
    pub async fn fleet(&self) -> Result<Option<Fleet>, StoreError> {
        self.store.fleet().await
    }

    /// Acks of cancelled tasks, ignored, since the start.
    pub fn cancelled_acks(&self) -> u64 {
        self.cancelled_acks.load(Relaxed)
    }

    /// The metrics' counts.
    pub fn stats(&self) -> Stats {
        let (queue, depths) = match &self.mode {
            Mode::Queue { queue } => (queue.counters(), queue.depths()),
            Mode::Broadcast { .. } => Default::default(),
        };
        Stats {
            next_id: self.hub.next_id(),
            queue,
            depths,
            cancelled_acks: self.cancelled_acks(),
        }
    }

    /// Several servers sharing the store: records that `agent` is (or is no
    /// longer) connected here, for the fleet view of the others.
    pub fn record_presence(&self, agent: &Agent, connected: bool) {
        if !self.store.is_shared() {
            return;
        }
        self.store.record(Write::Presence {
            name: Arc::clone(&agent.name),
            server: Arc::clone(&self.server),
            connected,
            address: agent.address.map(|a| a.to_string()),
            at_ms: crate::clock::now_ms(),
        });
    }

    /// The task generator, until `shutdown` (a scheduled stream of tasks
    /// from `[tasks]`, published while this server holds the lease).
    pub fn generate(
        &self,
        config: watch::Receiver<Arc<Config>>,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + use<> {
        generator::run(Arc::clone(&self.hub), self.store.clone(), config, shutdown)
    }

    /// Queue mode: redelivers what is not acked in time, until `shutdown`.
    pub fn reap(&self, shutdown: CancellationToken) -> Option<impl Future<Output = ()> + use<>> {
        match &self.mode {
            Mode::Queue { queue } => Some(Arc::clone(queue).reap(shutdown)),
            Mode::Broadcast { .. } => None,
        }
    }
}

/// One task: `show`, `cancel`, `retry`. What the server knows about a task
/// is split: its state and counters live in memory (the hub's ring, the
/// queue), each agent's latest result in the store's `results` table, and
/// whether a broadcast agent got it in that agent's ack cursor. `show`
/// reads the store first (through its writer, so it sees every write sent
/// before) and memory after, which is the fresher.
impl Broker {
    /// The task as memory holds it: in the hub's ring, or in the queue.
    fn live(&self, id: u64) -> Option<Arc<Task>> {
        self.hub
            .get(id)
            .filter(|t| !t.void)
            .or_else(|| match &self.mode {
                Mode::Queue { queue } => queue.find(id).map(|(task, ..)| task),
                Mode::Broadcast { .. } => None,
            })
    }

    /// The task from memory, else from the store.
    async fn find(&self, id: u64) -> Result<Arc<Task>, Refused> {
        if let Some(task) = self.live(id) {
            return Ok(task);
        }
        let record = self.store.task(id).await?.ok_or(Refused::NotFound(id))?;
        Ok(Arc::new(record.task.to_task()))
    }

    /// One task with a row per agent it concerns.
    ///
    /// # Errors
    /// [`Refused::NotFound`] for a task neither in memory nor in the store.
    pub async fn show(&self, id: u64) -> Result<TaskView, Refused> {
        let record = self.store.task(id).await?;
        let held = match &self.mode {
            Mode::Queue { queue } => queue.find(id),
            Mode::Broadcast { .. } => None,
        };
        // The queue's, the ring's, else the store's (the queue was asked once).
        let task = held
            .as_ref()
            .map(|(task, ..)| Arc::clone(task))
            .or_else(|| self.hub.get(id).filter(|t| !t.void))
            .or_else(|| record.as_ref().map(|r| Arc::new(r.task.to_task())))
            .ok_or(Refused::NotFound(id))?;
        // Every agent's latest result: the store keeps them all; the memory
        // store only the latest ack's.
        let mut rows: BTreeMap<Arc<str>, AgentRow> = BTreeMap::new();
        match &record {
            Some(record) => {
                for result in &record.results {
                    let mut r = AgentRow::new(&result.agent, outcome(result.ok));
                    r.result.clone_from(&result.text);
                    r.result_ms = result.at_ms;
                    rows.insert(Arc::clone(&result.agent), r);
                }
            }
            None => {
                if let Some((agent, ok, text)) = task.progress.last_outcome() {
                    let mut r = AgentRow::new(&agent, outcome(ok));
                    r.result = text;
                    rows.insert(agent, r);
                }
            }
        }
        match &self.mode {
            Mode::Queue { .. } => queue_rows(
                &mut rows,
                held.as_ref().map(|(_, place, _)| place),
                &task,
                record.as_ref(),
            ),
            Mode::Broadcast { cursors } => self.broadcast_rows(cursors, &mut rows, &task),
        }
        let attempts = held
            .as_ref()
            .map(|(_, _, attempts)| *attempts)
            .or(record.as_ref().map(|r| r.task.attempts))
            .unwrap_or(0);
        Ok(TaskView {
            task,
            attempts,
            agents: rows.into_values().collect(),
        })
    }

    /// Broadcast mode: every named agent the task was meant for (the
    /// target, or every agent with a cursor that began at or before the
    /// task), by what its cursor says; agents with a result keep it. A task
    /// for a selector shows the agents that answered only: which of the
    /// others it matches is known only while they are connected.
    fn broadcast_rows(
        &self,
        cursors: &Cursors,
        rows: &mut BTreeMap<Arc<str>, AgentRow>,
        task: &Task,
    ) {
        if task.selector.is_some() {
            return;
        }
        let id = task.id;
        let retained = self.hub.get(id).is_some_and(|t| !t.void);
        let cancelled = task.progress.is_cancelled();
        let durable = self.store.is_durable();
        let agents = match &task.target {
            Some(target) => vec![(Arc::clone(target), cursors.get(target))],
            None => cursors
                .all()
                .into_iter()
                .map(|(name, tracked)| (name, Some(tracked)))
                .collect(),
        };
        for (agent, tracked) in agents {
            if rows.contains_key(&agent) {
                continue;
            }
            let agent_state = match tracked {
                // The target has never connected.
                None if cancelled => AgentState::Cancelled,
                None if !retained => AgentState::Missed,
                None => AgentState::Owed,
                Some(tracked) => {
                    if tracked.since > id {
                        // It first connected after the task was published
                        // (tasks.replay off, or the task left retention first).
                        continue;
                    }
                    let acked = tracked.cursor.lock().is_acked(id);
                    let sent = tracked.sent_up_to.load(Relaxed) >= id;
                    if cancelled {
                        AgentState::Cancelled
                    } else if acked {
                        // Every ack leaves a result in a durable store: a
                        // cursor past the task without one skipped it, as it
                        // had left retention. The memory store keeps only
                        // the latest ack's outcome: the others show as acked.
                        if durable || (!retained && !sent) {
                            AgentState::Missed
                        } else {
                            AgentState::Acked
                        }
                    } else if !retained {
                        AgentState::Missed
                    } else if sent {
                        AgentState::Delivered
                    } else {
                        AgentState::Owed
                    }
                }
            };
            rows.insert(Arc::clone(&agent), AgentRow::new(&agent, agent_state));
        }
    }

    /// Stops a pending or delivered task from being sent (again).
    ///
    /// # Errors
    /// [`Refused::NotFound`] for an unknown task; [`Refused::CannotCancel`]
    /// for one that is finished, [`Refused::NotRetained`] for a broadcast
    /// task no longer retained; [`Refused::Store`] when the change cannot
    /// be committed.
    pub async fn cancel(&self, id: u64) -> Result<Arc<Task>, Refused> {
        if self.hub.get(id).is_some_and(|t| t.direct) {
            return Err(Refused::RunTask(id));
        }
        let (task, commit) = match &self.mode {
            Mode::Queue { queue } => match queue.cancel(id) {
                Ok(cancelled) => cancelled,
                Err(Refusal::State(s)) => return Err(Refused::CannotCancel(id, s)),
                Err(Refusal::NotHeld) => {
                    let state = self.find(id).await?.progress.state();
                    return Err(Refused::CannotCancel(id, state));
                }
            },
            Mode::Broadcast { .. } => {
                let Some(task) = self.hub.get(id).filter(|t| !t.void) else {
                    self.store.task(id).await?.ok_or(Refused::NotFound(id))?;
                    return Err(Refused::NotRetained(id));
                };
                task.progress
                    .cancel()
                    .map_err(|s| Refused::CannotCancel(id, s))?;
                let commit = self.store.write_now(Write::Cancelled { id, held: false });
                (task, commit)
            }
        };
        commit.committed().await?;
        tracing::info!(task_id = id, "task cancelled");
        Ok(task)
    }

    /// Queue mode: sends a failed or dead task back to the queue.
    ///
    /// # Errors
    /// [`Refused::NotFound`] for an unknown task; [`Refused::CannotRetry`]
    /// for one that is not failed or dead, [`Refused::Broadcast`] in
    /// broadcast mode; [`Refused::Store`] when the change cannot be
    /// committed.
    pub async fn retry(&self, id: u64) -> Result<Arc<Task>, Refused> {
        let task = self.find(id).await?;
        if task.direct {
            return Err(Refused::RunTask(id));
        }
        let Mode::Queue { queue } = &self.mode else {
            // Re-sending to the agents whose result failed would need their
            // cursors to forget the ack: submitting again is simpler and clear.
            return Err(Refused::Broadcast(id, task.progress.state()));
        };
        let commit = queue.retry(&task).map_err(|refusal| match refusal {
            Refusal::State(s) => Refused::CannotRetry(id, s),
            Refusal::NotHeld => Refused::CannotRetry(id, task.progress.state()),
        })?;
        commit.committed().await?;
        let task = queue.find(id).map_or(task, |(task, ..)| task);
        tracing::info!(
            task_id = id,
            retry = task.progress.retries(),
            "task retried: pending again"
        );
        Ok(task)
    }
}

/// Housekeeping and the end.
impl Broker {
    /// Saves the broadcast cursors that changed (every second, and at the
    /// end).
    pub fn save_cursors(&self) {
        let Mode::Broadcast { cursors } = &self.mode else {
            return;
        };
        if !self.store.is_durable() {
            return;
        }
        for saved in cursors.take_dirty() {
            self.store.record(Write::Cursor(saved));
        }
    }

    /// Writes the named agents whose roster entry changed.
    pub fn save_roster(&self, roster: Vec<SavedAgent>) {
        if !self.store.is_durable() {
            return;
        }
        for agent in roster {
            self.store.record(Write::Agent(agent));
        }
    }

    /// Agents last seen before this time (unix ms) are forgotten
    /// (`store.forget_agents_after`).
    pub fn forget_before_ms(&self) -> i64 {
        let after = self.keeping.lock().forget_agents_after;
        crate::clock::now_ms().saturating_sub(millis(after))
    }

    /// Every ten seconds: marks the `connected` named agents' cursors seen,
    /// forgets the cursors of agents not seen since `forget_before_ms`,
    /// saves `roster` (the roster entries that changed), and deletes what
    /// retention no longer keeps.
    pub async fn housekeep(
        &self,
        connected: &[Arc<str>],
        roster: Vec<SavedAgent>,
        forget_before_ms: i64,
    ) {
        let keeping = *self.keeping.lock();
        let forgotten = match &self.mode {
            Mode::Broadcast { cursors } => {
                for name in connected {
                    cursors.seen(name);
                }
                cursors.forget_before(forget_before_ms)
            }
            Mode::Queue { .. } => 0,
        };
        self.save_roster(roster);
        let retention = store::Retention {
            created_before_ms: crate::clock::now_ms().saturating_sub(millis(keeping.keep_for)),
            retain_finished: keeping.retain_finished,
            queue_mode: self.is_queue(),
            forget_before_ms,
        };
        match self.store.housekeep(retention).await {
            Ok(pruned) => {
                if pruned.tasks > 0 {
                    tracing::debug!(
                        tasks = pruned.tasks,
                        "deleted tasks past tasks.keep_for or tasks.retain_finished"
                    );
                }
                if forgotten > 0 || pruned.cursors > 0 || pruned.agents > 0 {
                    tracing::info!(
                        agents = forgotten.max(pruned.cursors.max(pruned.agents) as usize),
                        after = %humantime::format_duration(keeping.forget_agents_after),
                        "forgot the agents (roster entries and broadcast cursors) not seen for store.forget_agents_after"
                    );
                }
            }
            Err(e) => tracing::warn!("task store housekeeping failed: {e}"),
        }
    }

    /// At the end, after every stream ended: saves the cursors and the
    /// roster's changes, and closes the store (the last acks committed).
    pub async fn close(&self, roster: Vec<SavedAgent>) {
        self.save_cursors();
        self.save_roster(roster);
        self.store.close().await;
    }
}

/// Whether `task`'s selector (if any) matches `agent`: a seed client,
/// which has no labels, only a task without one.
pub(super) fn selects(task: &Task, agent: &Agent) -> bool {
    match &task.selector {
        None => true,
        Some(selector) => agent.named && selector.matches(&agent.name, &**agent.labels.load()),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn keeping(config: &Config) -> Keeping {
    Keeping {
        keep_for: config.tasks.keep_for,
        retain_finished: config.tasks.retain_finished,
        forget_agents_after: config.store.forget_agents_after,
    }
}

/// An agent's state for a task it acked: `ok` or failed.
fn outcome(ok: bool) -> AgentState {
    if ok {
        AgentState::Acked
    } else {
        AgentState::Failed
    }
}

/// Queue mode: the agent holding the task (or owed it), over its result.
fn queue_rows(
    rows: &mut BTreeMap<Arc<str>, AgentRow>,
    place: Option<&Place>,
    task: &Task,
    record: Option<&TaskRecord>,
) {
    let (agent, agent_state, deadline_ms) = match place {
        Some(Place::Waiting(Some(agent)) | Place::Assigned(agent)) => {
            (Arc::clone(agent), AgentState::Owed, 0)
        }
        Some(Place::InFlight {
            holder,
            deadline_ms,
        }) => (Arc::clone(holder), AgentState::Delivered, *deadline_ms),
        // Cancelled while an agent held it: that agent may still run it.
        Some(Place::Cancelled(Some(holder))) => (Arc::clone(holder), AgentState::Delivered, 0),
        None if task.progress.is_cancelled() => match record.and_then(|r| r.task.claim.as_ref()) {
            Some((holder, _)) => (Arc::clone(holder), AgentState::Delivered, 0),
            None => return,
        },
        _ => return,
    };
    let r = rows
        .entry(Arc::clone(&agent))
        .or_insert_with(|| AgentRow::new(&agent, agent_state));
    r.state = agent_state;
    r.deadline_ms = deadline_ms;
}

/// The hub (the last `tasks.retain` tasks) and, in queue mode, the
/// unfinished tasks for the queue, from what the store kept.
fn restore(
    tasks: &TasksConfig,
    next_id: u64,
    stored: Vec<store::StoredTask>,
) -> (Arc<Hub>, Vec<queue::Restored>) {
    let retain = tasks.retain;
    let first_in_ring = next_id.saturating_sub(retain as u64);
    let mut ring = Vec::new();
    let mut queued = Vec::new();
    for stored in stored {
        let task = Arc::new(stored.to_task());
        // A run's task is its run's to send, never the queue's.
        if tasks.mode == DeliveryMode::Queue && !stored.state.is_finished() && !stored.direct {
            queued.push(queue::Restored {
                task: Arc::clone(&task),
                attempts: stored.attempts,
                claim: stored.claim.clone(),
            });
        }
        if task.id >= first_in_ring {
            ring.push(task);
        }
    }
    (Hub::restored(retain, next_id, ring), queued)
}

fn queue_limits(tasks: &TasksConfig) -> queue::Limits {
    queue::Limits {
        ack_timeout: tasks.ack_timeout,
        max_attempts: tasks.max_attempts,
        window: tasks.window,
        max_pending: tasks.max_pending,
        max_dead: tasks.retain,
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
pub(super) fn encode_broadcast_one(task: &Task, epoch: u64) -> Framed {
    wire::encode_block(&[message(task, 1, epoch)])
        .pop()
        .expect("one message encoded")
}

/// `task` as sent on attempt `attempt`.
pub(super) fn message(task: &Task, attempt: u32, epoch: u64) -> ServerMsg {
    ServerMsg {
        task: task.text.clone(),
        id: task.id,
        attempt,
        epoch,
        retry: task.progress.retries(),
    }
}
