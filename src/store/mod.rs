//! The task store: what must outlive the process (tasks and their ids,
//! queue claims, acks, broadcast cursors), behind one small trait.
//!
//! Serving stays in memory (the hub's ring, the queue, the cursors); the
//! store is told of every change and keeps it:
//! - publishing is *committed before it is delivered*: [`Store::publish`]
//!   returns once the tasks are in the database, and only then are they
//!   handed to the hub and the queue (by the writer, in id order);
//! - a queue claim is committed before its task is sent ([`Store::claim`]
//!   gives a sequence number; [`Store::committed`] says when it is durable),
//!   so a restart never hands a task another agent may be running to a
//!   second agent;
//! - acks, broadcast deliveries and cursors are written behind, off the
//!   streaming path: a crash loses at most the last moment of them, and
//!   their tasks are delivered again (agents dedupe and ack again).
//!
//! Every write goes through one channel to one writer thread, which
//! commits whatever has queued up as one transaction (group commit).
//! Backends implement [`Backend`]: SQLite ([`sqlite`]) here; with `kind =
//! "memory"` there is no writer at all and nothing outlives the process.

pub mod postgres;
mod runs;
pub mod sqlite;

use std::{
    collections::HashMap,
    ops::Range,
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

pub use runs::{Firing, JobRow, RelayedAck, RunAgentRow, RunRecord, RunRow, RunsNews};

use crate::{
    config::{StoreConfig, StoreKind},
    model::{AckCursor, Draft, Saved, SavedAgent, Task, TaskState},
    selector::Selector,
};

/// A new database's epoch: random, never 0 (which means "not said" in an
/// ack).
pub(crate) fn new_epoch() -> u64 {
    u64::from_ne_bytes(crate::secret_random::<8>()).max(1)
}

/// An epoch as a database column keeps it (the i64 of the same bits).
pub(crate) fn epoch_column(epoch: u64) -> i64 {
    i64::from_ne_bytes(epoch.to_ne_bytes())
}

/// The epoch a database column holds.
pub(crate) fn epoch_from_column(column: i64) -> u64 {
    u64::from_ne_bytes(column.to_ne_bytes()).max(1)
}

/// The error behind a store failure, shared: one commit answers many
/// waiters, so [`StoreError`] is `Clone`.
pub type Source = Arc<dyn std::error::Error + Send + Sync>;

/// Why the store failed.
///
/// `Display` and `Error` are written out rather than derived: the source
/// of a [`Detail`] variant is the error inside its `Arc` (so a caller can
/// downcast it), or none; `thiserror`'s `#[source]` on an optional `Arc`
/// would give the `Arc` itself, which downcasts to nothing.
#[derive(Debug, Clone)]
pub enum StoreError {
    /// The database cannot be used as configured (missing directory, not
    /// writable, not a database, a newer schema): fix the config or file.
    Open { path: PathBuf, reason: String },
    /// The database named by `store.url` (or its CA file) cannot be used
    /// as configured: the message names the key.
    Unusable(Detail),
    /// Another contactd holds the database (its file, or its name).
    Locked { path: PathBuf, reason: String },
    /// The disk (or the database's size limit) is full.
    Full(Detail),
    /// Any other failure to read or write.
    Failed(Detail),
    /// The database cannot be reached now (reconnecting): try again later.
    Unavailable(Detail),
    /// The store was closed (the server is stopping).
    Closed,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Open { path, reason } => {
                write!(f, "store.path {}: {reason}", path.display())
            }
            StoreError::Unusable(detail) => write!(f, "{detail}"),
            StoreError::Locked { path, reason } => write!(f, "{}: {reason}", path.display()),
            StoreError::Full(detail) => write!(f, "the task store is full: {detail}"),
            StoreError::Failed(detail) => write!(f, "the task store failed: {detail}"),
            StoreError::Unavailable(detail) => {
                write!(f, "the task store is unavailable: {detail}")
            }
            StoreError::Closed => f.write_str("the task store is closed"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Unusable(detail)
            | StoreError::Full(detail)
            | StoreError::Failed(detail)
            | StoreError::Unavailable(detail) => detail.source(),
            StoreError::Open { .. } | StoreError::Locked { .. } | StoreError::Closed => None,
        }
    }
}

impl StoreError {
    /// Whether the config (the path, or the file it names) is at fault.
    pub fn is_config(&self) -> bool {
        matches!(self, StoreError::Open { .. } | StoreError::Unusable(_))
    }

    /// [`StoreError::Unusable`]: `text` as the operator reads it (the
    /// source's own text included, as it ends), and the error it came from.
    pub fn unusable(
        text: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Unusable(Detail::new(text, source))
    }

    /// [`StoreError::Full`], as [`StoreError::unusable`].
    pub fn full(
        text: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Full(Detail::new(text, source))
    }

    /// [`StoreError::Failed`], as [`StoreError::unusable`].
    pub fn failed(
        text: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Failed(Detail::new(text, source))
    }

    /// [`StoreError::Unavailable`], as [`StoreError::unusable`].
    pub fn unavailable(
        text: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Unavailable(Detail::new(text, source))
    }
}

/// What a store failure says, and the error it came from (none for a
/// failure contactd itself found, as "the database connection ended").
///
/// The text is the whole of what the operator reads after the variant's
/// words, the source's own text included (it ends with it wherever it
/// can), so `Display` says what it always said and
/// `crate::error_chain` does not repeat the source.
#[derive(Debug, Clone)]
pub struct Detail {
    text: String,
    source: Option<Source>,
}

impl Detail {
    /// `text`, caused by `source`.
    pub fn new(
        text: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Detail {
        Detail {
            text: text.into(),
            source: Some(Source::from(source.into())),
        }
    }

    /// The error it came from: the one inside the `Arc`, so it downcasts.
    pub fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A failure contactd found itself: no source.
impl From<String> for Detail {
    fn from(text: String) -> Detail {
        Detail { text, source: None }
    }
}

/// A failure contactd found itself: no source.
impl From<&str> for Detail {
    fn from(text: &str) -> Detail {
        Detail::from(text.to_owned())
    }
}

/// A change to keep, written behind or claimed.
#[derive(Debug, Clone)]
pub enum Write {
    /// Broadcast: these tasks were delivered for the first time (the ones
    /// of one frame: one write for them all).
    Delivered { ids: Vec<u64> },
    /// Queue: attempt `attempt` of the task is held by `holder` until
    /// `deadline_ms`.
    Claimed {
        id: u64,
        attempt: u32,
        holder: Arc<str>,
        deadline_ms: i64,
    },
    /// Queue: the task is back in line (pending) or parked (dead), ending
    /// the claim `claim` (its holder and deadline; `None`: it had none).
    /// A shared database changes it only if that claim is still the one
    /// in force: another server may have claimed it since.
    State {
        id: u64,
        state: TaskState,
        claim: Option<(Arc<str>, i64)>,
    },
    /// An operator cancelled the task; `held`: an agent holds its current
    /// attempt (kept, to show who may still run it).
    Cancelled { id: u64, held: bool },
    /// An operator sent the failed or dead task back to the queue: pending,
    /// attempts 0, one more retry.
    Retried { id: u64 },
    /// An agent's ack, `ok` false for a failure, with its result text.
    /// `claimed` (queue mode): a shared database keeps it only if `agent`
    /// holds the task's claim.
    Acked {
        id: u64,
        agent: Arc<str>,
        ok: bool,
        text: String,
        at_ms: i64,
        claimed: bool,
    },
    /// A shared database: an agent's ack, through this server, of a run
    /// another server carries out (the agent moved here). Kept and counted
    /// only if the agent is running it in that run, whose server reads it
    /// back ([`Store::runs_news`]). A lone server never writes it.
    Relayed {
        id: u64,
        agent: Arc<str>,
        ok: bool,
        text: String,
        at_ms: i64,
    },
    /// A broadcast cursor to keep.
    Cursor(Saved),
    /// A named agent's roster entry to keep.
    Agent(SavedAgent),
    /// A job's latest nominal time fired or skipped (kept if later than
    /// the stored one), whether it is paused, and its latest success.
    Job {
        name: Arc<str>,
        last_nominal_ms: Option<i64>,
        paused: Option<bool>,
        last_success_ms: Option<i64>,
    },
    /// A run's state and counts changed.
    Run(RunRow),
    /// An agent's state in a run changed.
    RunAgent(RunAgentRow),
    /// A shared database: a named agent connected to `server`, or its
    /// last call there ended.
    Presence {
        name: Arc<str>,
        server: Arc<str>,
        connected: bool,
        address: Option<String>,
        at_ms: i64,
    },
}

/// A queue claim a shared database refused: another server's agent holds
/// the task, or it is finished. What the database says of the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostClaim {
    pub state: TaskState,
    pub holder: Option<Arc<str>>,
    pub deadline_ms: Option<i64>,
}

/// What a shared database knows of the fleet: every server sharing it and
/// every named agent, with where each is connected.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fleet {
    pub servers: Vec<ServerRow>,
    pub agents: Vec<FleetAgent>,
}

/// A server sharing the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRow {
    pub name: String,
    pub started_ms: i64,
    /// Its latest heartbeat (every `store.poll_interval`).
    pub heartbeat_ms: i64,
    /// It stopped cleanly.
    pub stopped: bool,
}

/// A named agent as a shared database knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetAgent {
    pub saved: SavedAgent,
    /// The server it is (or was last) connected to.
    pub server: Option<String>,
    /// Connected, as that server last said.
    pub connected: bool,
    pub address: Option<String>,
}

/// What housekeeping deletes.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Tasks created before this are deleted once finished.
    pub created_before_ms: i64,
    /// At most this many finished tasks are kept.
    pub retain_finished: usize,
    /// Queue mode: unfinished tasks are never deleted. Broadcast mode:
    /// every task counts as finished (it is delivered from the ring only).
    pub queue_mode: bool,
    /// Cursors and roster entries of agents last seen before this are
    /// deleted.
    pub forget_before_ms: i64,
}

/// What housekeeping deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub tasks: u64,
    pub cursors: u64,
    pub agents: u64,
}

/// A task as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTask {
    pub id: u64,
    pub text: String,
    pub target: Option<Arc<str>>,
    /// Its selector's canonical text, as the store keeps it.
    pub selector: Option<String>,
    pub created_ms: i64,
    pub state: TaskState,
    pub attempts: u32,
    /// Queue mode: who holds the current attempt, and until when.
    pub claim: Option<(Arc<str>, i64)>,
    pub delivered: u32,
    pub acked: u32,
    pub failed: u32,
    pub last_result: Option<(Arc<str>, String)>,
    /// Times an operator retried it.
    pub retries: u32,
    /// [`Task::job`].
    pub job: Option<String>,
    /// [`Task::direct`].
    pub direct: bool,
}

/// One agent's latest result for a task.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentResult {
    pub agent: Arc<str>,
    pub ok: bool,
    pub text: String,
    pub at_ms: i64,
}

/// A task with every agent's latest result for it, as the store keeps them.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub task: StoredTask,
    /// By agent name.
    pub results: Vec<AgentResult>,
}

/// A selector as the store kept it (its canonical text, written by this
/// or an earlier contactd). One that no longer parses targets nobody: a
/// task must never reach agents it was not meant for.
fn stored_selector(id: u64, text: &str) -> Selector {
    Selector::parse(text).unwrap_or_else(|e| {
        tracing::warn!(
            task_id = id,
            selector = %crate::untrusted::shown(text),
            "a stored task's selector does not parse ({e}): it is sent to no agent"
        );
        Selector::parse("!name").expect("a selector that matches no agent")
    })
}

impl StoredTask {
    /// The task as the hub keeps it.
    pub fn to_task(&self) -> Task {
        let created = SystemTime::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(self.created_ms).unwrap_or(0));
        let draft = Draft {
            text: self.text.clone(),
            target: self.target.clone(),
            selector: self
                .selector
                .as_deref()
                .map(|text| Arc::new(stored_selector(self.id, text))),
            job: self.job.as_deref().map(Arc::from),
            direct: self.direct,
        };
        let mut task = Task::from_draft(self.id, draft, created);
        task.progress = crate::model::Progress::restored(
            self.state,
            [self.delivered, self.acked, self.failed, self.retries],
            self.last_result.clone(),
        );
        task
    }
}

/// What a store holds at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Random, made when the database was: sent with every task
    /// (`ServerMsg.epoch`), so agents dedupe across server restarts.
    pub epoch: u64,
    /// The id the next task gets: ids never repeat.
    pub next_id: u64,
    /// The last `ring` tasks by id, and every unfinished one in queue mode,
    /// sorted by id.
    pub tasks: Vec<StoredTask>,
    pub cursors: Vec<Saved>,
    /// The agent roster, most recently seen first.
    pub agents: Vec<SavedAgent>,
    /// Every job the store knows.
    pub jobs: Vec<JobRow>,
    /// The runs not finished, with their agents; their tasks are in
    /// `tasks` (however old).
    pub runs: Vec<RunRecord>,
}

/// What a backend does: blocking calls, all made from the writer thread.
pub trait Backend: Send {
    /// Reads what the server starts from: the last `ring` tasks, and every
    /// unfinished one when `queue_mode`.
    fn load(&mut self, ring: usize, queue_mode: bool) -> Result<Snapshot, StoreError>;
    /// Applies `ops` in order, all or none.
    fn apply(&mut self, ops: &[Op<'_>]) -> Result<(), StoreError>;
    /// Deletes what `retention` no longer keeps, a bounded amount per call.
    fn prune(&mut self, retention: &Retention) -> Result<Pruned, StoreError>;
    /// Reads one task and its per-agent results; `None` if it is not kept.
    fn task(&mut self, id: u64) -> Result<Option<TaskRecord>, StoreError>;

    /// Lets go of what the backend holds (at a clean stop).
    fn close(&mut self) {}

    /// Whether several servers may share this database: task ids are then
    /// the database's ([`reserve`](Backend::reserve)), and what the other
    /// servers publish is read back ([`tasks_after`](Backend::tasks_after)).
    fn shared(&self) -> bool {
        false
    }

    /// Shared: opens a transaction, reserving `count` task ids in it, and
    /// returns the first; the next [`apply`](Backend::apply) commits it.
    /// Reservations are taken one at a time across servers until their
    /// commit, so tasks are committed in id order.
    fn reserve(&mut self, count: u64) -> Result<u64, StoreError> {
        let _ = count;
        Err(StoreError::Failed("this store gives no task ids".into()))
    }

    /// Shared: the tasks with ids above `after`, lowest first, at most
    /// `limit` of them.
    fn tasks_after(&mut self, after: u64, limit: usize) -> Result<Vec<StoredTask>, StoreError> {
        let _ = (after, limit);
        Ok(Vec::new())
    }

    /// Shared: the claims among the last [`apply`](Backend::apply)'s ops
    /// that the database refused, by their index in its `ops`.
    fn lost_claims(&mut self) -> Vec<(usize, LostClaim)> {
        Vec::new()
    }

    /// The runs among the last [`apply`](Backend::apply)'s
    /// [`Op::Fire`]s whose job and nominal time had a run already: their
    /// tasks were not stored. By task id.
    fn refused_runs(&mut self) -> Vec<u64> {
        Vec::new()
    }

    /// Every job the store knows (a server taking the lease over reads
    /// what the last holder fired).
    fn jobs(&mut self) -> Result<Vec<JobRow>, StoreError>;

    /// The latest `limit` runs, of `job` only when it is given, newest
    /// first.
    fn runs(&mut self, job: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError>;

    /// One run with its agents.
    fn run(&mut self, task_id: u64) -> Result<Option<RunRecord>, StoreError>;

    /// Shared: what the database says of this server's runs `mine`, each
    /// with the earliest time it sent its task to an agent still running
    /// it (see [`RunsNews`]); other servers' runs are orphans when their
    /// server stopped or its heartbeat is older than `silent_before_ms`.
    fn runs_news(
        &mut self,
        mine: &[(u64, i64)],
        silent_before_ms: i64,
    ) -> Result<RunsNews, StoreError> {
        let _ = (mine, silent_before_ms);
        Ok(RunsNews::default())
    }

    /// Shared: takes over `runs` of `server`, if that server is not
    /// running now (its name is free), and reads them; none when it is.
    fn adopt(&mut self, server: &str, runs: &[u64]) -> Result<Vec<RunRecord>, StoreError> {
        let _ = (server, runs);
        Ok(Vec::new())
    }
}

/// Makes a task's text and target from its id.
pub type Make = Box<dyn FnMut(u64) -> Draft + Send>;

/// One change in a group commit.
#[derive(Debug)]
pub enum Op<'a> {
    /// New tasks (their ids were given out in order).
    Publish(&'a [Arc<Task>]),
    /// Runs fired: each run's task is stored only if no run of its job
    /// has its nominal time yet (see [`Backend::refused_runs`]); the jobs'
    /// last nominal times move to theirs either way.
    Fire(&'a [Arc<Task>], &'a [RunRow]),
    Write(&'a Write),
}

/// Receives tasks once they are committed, in id order (the hub and the
/// queue); void tasks stand for ids whose tasks could not be stored.
pub type Sink = Arc<dyn Fn(&[Arc<Task>]) + Send + Sync>;

/// Opens the store `config` names, reading what it holds.
///
/// # Errors
/// [`StoreError::Open`] (exit 78: the path or file is wrong),
/// [`StoreError::Locked`], [`StoreError::Failed`].
pub fn open(
    config: &StoreConfig,
    server: &str,
    ring: usize,
    queue_mode: bool,
) -> Result<Opened, StoreError> {
    match config.kind {
        StoreKind::Memory => Ok(Opened {
            snapshot: Snapshot {
                epoch: new_epoch(),
                next_id: 1,
                ..Snapshot::default()
            },
            backend: None,
            watcher: None,
            reader: None,
            write_queue: config.write_queue,
        }),
        StoreKind::Postgres => {
            // On a thread of its own: connecting blocks (on a runtime of
            // the backend's), and the server opens its store from async code.
            let (backend, snapshot) = std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let mut backend = postgres::Postgres::open(config, server)?;
                        let snapshot = backend.load(ring, queue_mode)?;
                        Ok::<_, StoreError>((backend, snapshot))
                    })
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })?;
            Ok(Opened {
                snapshot,
                watcher: Some(backend.watcher()),
                reader: Some(Arc::new(backend.reader(config.pool_size)?)),
                backend: Some(Box::new(backend)),
                write_queue: config.write_queue,
            })
        }
        StoreKind::Sqlite => {
            let path = config.resolved_path();
            let mut backend = sqlite::Sqlite::open(&path, config.sync)?;
            if config.max_size.as_u64() > 0 {
                backend.set_max_size(config.max_size.as_u64())?;
            }
            // What cannot be read back now (a task text that is not UTF-8)
            // stops the start naming the file, not as a bare failure.
            let snapshot = backend
                .load(ring, queue_mode)
                .map_err(|e| sqlite::unreadable(&path, e))?;
            Ok(Opened {
                snapshot,
                backend: Some(Box::new(backend)),
                watcher: None,
                reader: None,
                write_queue: config.write_queue,
            })
        }
    }
}

/// An opened store: what it holds, and the backend to start the writer on.
pub struct Opened {
    pub snapshot: Snapshot,
    backend: Option<Box<dyn Backend>>,
    /// A shared database: what watches it for the other servers' tasks.
    watcher: Option<postgres::Watcher>,
    /// A shared database: the pool its reads use.
    reader: Option<Arc<postgres::Reader>>,
    write_queue: usize,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("durable", &self.backend.is_some())
            .field("next_id", &self.snapshot.next_id)
            .finish_non_exhaustive()
    }
}

impl Opened {
    /// Starts the writer (for a durable store), returning the store and
    /// what it held; tasks published go to the sink set with
    /// [`Store::set_sink`].
    pub fn start(self) -> (Store, Snapshot) {
        let sink: Arc<OnceLock<Sink>> = Arc::new(OnceLock::new());
        let (committed_tx, committed) = watch::channel(0);
        let shared_db = self.backend.as_ref().is_some_and(|b| b.shared());
        let (leader_tx, leader) = watch::channel(!shared_db);
        let (reachable_tx, reachable) = watch::channel(true);
        let shared = Arc::new(Shared {
            next_id: Mutex::new(SeqState {
                next_id: self.snapshot.next_id.max(1),
                next_seq: 1,
            }),
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            write_queue: self.write_queue as u64,
            sink: Arc::clone(&sink),
            follow_asked: AtomicBool::new(false),
            lost: Mutex::new(HashMap::new()),
        });
        let followed = self.snapshot.next_id.saturating_sub(1);
        let journal = self.backend.map(|backend| {
            let (tx, rx) = mpsc::unbounded_channel();
            let thread = {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name("contactd-store".into())
                    .spawn(move || writer(backend, rx, &shared, &committed_tx, followed))
                    .expect("spawn the store's writer thread")
            };
            Journal {
                tx,
                thread: Mutex::new(Some(thread)),
                watcher: Mutex::new(None),
            }
        });
        let store = Store {
            shared,
            journal: journal.map(Arc::new),
            committed,
            shared_db,
            leader,
            reachable,
            reader: self.reader,
        };
        if let (Some(watcher), Some(journal)) = (self.watcher, &store.journal) {
            let follow = {
                let store = store.clone();
                Box::new(move || store.follow())
            };
            *journal.watcher.lock() = Some(watcher.start(follow, leader_tx, reachable_tx));
        }
        (store, self.snapshot)
    }
}

/// The handle every part of the server writes through. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
    /// `None`: the memory store.
    journal: Option<Arc<Journal>>,
    /// The highest sequence number committed.
    committed: watch::Receiver<u64>,
    /// Several servers may share the database.
    shared_db: bool,
    /// Whether this server runs the fleet's task generator: always, but
    /// for a shared database, where one server at a time holds the lease.
    leader: watch::Receiver<bool>,
    /// Whether the database answers (a shared database's watcher says;
    /// always true otherwise).
    reachable: watch::Receiver<bool>,
    /// A shared database: its reads, on a pool of their own.
    reader: Option<Arc<postgres::Reader>>,
}

struct Shared {
    /// Ids and sequence numbers are given out, and their messages queued,
    /// under this lock, so the writer sees them in order.
    next_id: Mutex<SeqState>,
    /// Written-behind messages queued and not yet taken by the writer.
    queued: AtomicU64,
    /// Written-behind messages dropped because `write_queue` were queued.
    dropped: AtomicU64,
    write_queue: u64,
    sink: Arc<OnceLock<Sink>>,
    /// A [`Msg::Follow`] is on its way to the writer (one is enough).
    follow_asked: AtomicBool,
    /// Claims a shared database refused, by sequence number, until the
    /// queue takes them.
    lost: Mutex<HashMap<u64, LostClaim>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("queued", &self.queued)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct SeqState {
    next_id: u64,
    next_seq: u64,
}

#[derive(Debug)]
struct Journal {
    tx: mpsc::UnboundedSender<Envelope>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// A shared database's watcher, stopped at close.
    watcher: Mutex<Option<postgres::Watching>>,
}

struct Envelope {
    seq: u64,
    msg: Msg,
}

enum Msg {
    Publish(Vec<Arc<Task>>, oneshot::Sender<Result<(), StoreError>>),
    /// A shared database: `count` tasks made by `Make` from the ids the
    /// database gives.
    PublishShared(usize, Make, oneshot::Sender<Result<Range<u64>, StoreError>>),
    /// Runs to fire, their tasks made (ids given out in order).
    Fire(Vec<Arc<Task>>, Vec<RunRow>, FireReply),
    /// A shared database: runs to fire, their tasks made once the
    /// database gives ids.
    FireShared(Vec<Draft>, Vec<RunRow>, FireReply),
    /// A shared database: read what other servers published.
    Follow,
    /// Written behind: counted in `queued`.
    Behind(Write),
    Claim(Write),
    /// Written through: answered once committed.
    Now(Write, oneshot::Sender<Result<(), StoreError>>),
    /// Answered after everything sent before it is committed.
    Query(Query),
    Housekeep(Retention, oneshot::Sender<Result<Pruned, StoreError>>),
    Close(oneshot::Sender<()>),
}

/// The answer to a fire: per run, its task id, or `None` when its job had
/// a run for its nominal time already.
type FireReply = oneshot::Sender<Result<Vec<Option<u64>>, StoreError>>;

/// A read run on the writer thread (answering through its own channel).
type Query = Box<dyn FnOnce(&mut dyn Backend) + Send>;

/// Messages one group commit takes at most.
const MAX_GROUP: usize = 4096;

/// Written-behind changes and claims of a group that failed to commit (the
/// disk full, the database away) are applied again, in order, with the next
/// groups for at most this long; then they are dropped, with an ERROR.
const CARRY_FOR: Duration = Duration::from_secs(300);

/// With only failed changes waiting, the writer tries them again this often.
const CARRY_PAUSE: Duration = Duration::from_millis(500);

impl Store {
    /// A store that keeps nothing (`kind = "memory"`), numbering tasks from 1.
    pub fn memory() -> Store {
        open(
            &StoreConfig {
                kind: StoreKind::Memory,
                ..StoreConfig::default()
            },
            "memory",
            1,
            false,
        )
        .expect("the memory store opens")
        .start()
        .0
    }

    /// Sets where committed tasks go (once, before the first publish).
    pub fn set_sink(&self, sink: Sink) {
        if self.shared.sink.set(sink).is_err() {
            tracing::error!("the task store's sink was set twice (a bug): keeping the first");
        }
    }

    fn sink(&self, tasks: &[Arc<Task>]) {
        if let Some(sink) = self.shared.sink.get() {
            sink(tasks);
        }
    }

    /// Whether what is written outlives the process.
    pub fn is_durable(&self) -> bool {
        self.journal.is_some()
    }

    /// Publishes `count` tasks, each made by `make` from its id (its text
    /// and who it is for: a [`Draft`], or a text and an optional agent),
    /// returning their ids once they are committed.
    ///
    /// # Errors
    /// The store could not keep them ([`StoreError::Full`] for a full
    /// disk): they are not delivered and their ids are not used again.
    pub async fn publish<D>(
        &self,
        count: usize,
        mut make: impl FnMut(u64) -> D + Send + 'static,
    ) -> Result<Range<u64>, StoreError>
    where
        D: Into<Draft>,
    {
        if self.shared_db
            && let Some(journal) = &self.journal
        {
            // The database gives the ids, in the order tasks are committed
            // across every server sharing it.
            let (tx, rx) = oneshot::channel();
            let make: Make = Box::new(move |id| make(id).into());
            self.send(journal, Msg::PublishShared(count, make, tx));
            return rx.await.map_err(|_| StoreError::Closed)?;
        }
        let created = SystemTime::now();
        let (ids, reply) = {
            let mut seq = self.shared.next_id.lock();
            let start = seq.next_id;
            let tasks: Vec<Arc<Task>> = (start..start + count as u64)
                .map(|id| Arc::new(Task::from_draft(id, make(id).into(), created)))
                .collect();
            seq.next_id += count as u64;
            let ids = start..seq.next_id;
            let Some(journal) = &self.journal else {
                self.sink(&tasks);
                return Ok(ids);
            };
            let (tx, rx) = oneshot::channel();
            let envelope = Envelope {
                seq: seq.next_seq,
                msg: Msg::Publish(tasks, tx),
            };
            seq.next_seq += 1;
            if let Err(mpsc::error::SendError(envelope)) = journal.tx.send(envelope) {
                if let Msg::Publish(tasks, _) = envelope.msg {
                    self.sink(&voids(&tasks));
                }
                return Err(StoreError::Closed);
            }
            (ids, rx)
        };
        reply.await.map_err(|_| StoreError::Closed)??;
        Ok(ids)
    }

    /// Fires runs: publishes each run's task and writes its row in one
    /// transaction, unless its job has a run for its nominal time already
    /// (written by another server, or before a crash): that one is not
    /// published. Per run, its task id, or `None` when it was not fired.
    /// The memory store fires every one.
    ///
    /// # Errors
    /// The store could not keep them: none was fired.
    pub async fn fire(&self, firings: Vec<Firing>) -> Result<Vec<Option<u64>>, StoreError> {
        if firings.is_empty() {
            return Ok(Vec::new());
        }
        let (drafts, mut runs): (Vec<Draft>, Vec<RunRow>) =
            firings.into_iter().map(|f| (f.draft, f.run)).unzip();
        let (tx, rx) = oneshot::channel();
        if self.shared_db
            && let Some(journal) = &self.journal
        {
            self.send(journal, Msg::FireShared(drafts, runs, tx));
            return rx.await.map_err(|_| StoreError::Closed)?;
        }
        let created = SystemTime::now();
        {
            let mut seq = self.shared.next_id.lock();
            let start = seq.next_id;
            let tasks: Vec<Arc<Task>> = drafts
                .into_iter()
                .zip(start..)
                .map(|(draft, id)| Arc::new(Task::from_draft(id, draft, created)))
                .collect();
            seq.next_id += tasks.len() as u64;
            for (run, task) in runs.iter_mut().zip(&tasks) {
                run.task_id = task.id;
            }
            let Some(journal) = &self.journal else {
                self.sink(&tasks);
                return Ok(tasks.iter().map(|t| Some(t.id)).collect());
            };
            let envelope = Envelope {
                seq: seq.next_seq,
                msg: Msg::Fire(tasks, runs, tx),
            };
            seq.next_seq += 1;
            if let Err(mpsc::error::SendError(envelope)) = journal.tx.send(envelope) {
                if let Msg::Fire(tasks, ..) = envelope.msg {
                    self.sink(&voids(&tasks));
                }
                return Err(StoreError::Closed);
            }
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Every job the store knows (empty for the memory store).
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        if self.journal.is_none() {
            return Ok(Vec::new());
        }
        self.query(|backend| backend.jobs()).await
    }

    /// The latest `limit` runs (of `job` only, when given), newest first.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn runs(&self, job: Option<String>, limit: usize) -> Result<Vec<RunRow>, StoreError> {
        if self.journal.is_none() {
            return Ok(Vec::new());
        }
        self.query(move |backend| backend.runs(job.as_deref(), limit))
            .await
    }

    /// One run with its agents (`None`: not kept, or the memory store).
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn run(&self, task_id: u64) -> Result<Option<RunRecord>, StoreError> {
        if self.journal.is_none() {
            return Ok(None);
        }
        self.query(move |backend| backend.run(task_id)).await
    }

    /// Writes `write` behind: never waits; dropped (and counted) when
    /// `store.write_queue` writes are already waiting.
    pub fn record(&self, write: Write) {
        let Some(journal) = &self.journal else {
            return;
        };
        if self.shared.queued.load(Ordering::Relaxed) >= self.shared.write_queue {
            let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped_total = dropped,
                    write_queue = self.shared.write_queue,
                    "the task store is behind: dropping writes (acks and cursors; their tasks \
                     may be delivered again after a restart)"
                );
            }
            return;
        }
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        self.send(journal, Msg::Behind(write));
    }

    /// Writes a queue claim; its task may be sent once [`committed`]
    /// reaches the returned number (0 for the memory store: at once).
    ///
    /// [`committed`]: Store::committed
    pub fn claim(&self, write: Write) -> u64 {
        match &self.journal {
            None => 0,
            Some(journal) => self.send(journal, Msg::Claim(write)),
        }
    }

    fn send(&self, journal: &Journal, msg: Msg) -> u64 {
        let mut seq = self.shared.next_id.lock();
        let this = seq.next_seq;
        seq.next_seq += 1;
        // After close: nothing more is kept (the server is stopping).
        let _ = journal.tx.send(Envelope { seq: this, msg });
        this
    }

    /// Writes `write` in order with every other write (never dropped); the
    /// returned [`Commit`] says when it is committed. For operator changes
    /// (cancel, retry), which must not be lost once answered.
    pub fn write_now(&self, write: Write) -> Commit {
        let Some(journal) = &self.journal else {
            return Commit(None);
        };
        let (tx, rx) = oneshot::channel();
        self.send(journal, Msg::Now(write, tx));
        Commit(Some(rx))
    }

    /// The task `id` with every agent's latest result for it, as committed
    /// after everything written so far; `None` if the store does not keep
    /// it (or is the memory store, which keeps nothing).
    ///
    /// # Errors
    /// The store cannot be read, or is closed.
    pub async fn task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError> {
        if self.journal.is_none() {
            return Ok(None);
        }
        if let Some(reader) = self.reader().await? {
            return reader.task(id).await;
        }
        self.query(move |backend| backend.task(id)).await
    }

    /// A shared database's reader, once everything written so far is
    /// committed (so a read sees it); `None` for the others.
    async fn reader(&self) -> Result<Option<&postgres::Reader>, StoreError> {
        let (Some(reader), Some(journal)) = (&self.reader, &self.journal) else {
            return Ok(None);
        };
        // A barrier: the writer commits what came before it first.
        let seq = self.send(journal, Msg::Query(Box::new(|_| ())));
        let mut committed = self.committed.clone();
        committed
            .wait_for(|c| *c >= seq)
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(Some(reader))
    }

    /// Runs `read` on the writer thread once everything written before it
    /// is committed, and returns what it gives.
    ///
    /// # Errors
    /// `read`'s, or [`StoreError::Closed`]; the memory store has nothing
    /// to read ([`StoreError::Closed`] too: callers ask durable stores).
    async fn query<T: Send + 'static>(
        &self,
        read: impl FnOnce(&mut dyn Backend) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(journal) = &self.journal else {
            return Err(StoreError::Closed);
        };
        let (tx, rx) = oneshot::channel();
        self.send(
            journal,
            Msg::Query(Box::new(move |backend| {
                let _ = tx.send(read(backend));
            })),
        );
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A shared database: what it says of this server's runs (see
    /// [`Backend::runs_news`]). A lone server's store has no news.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn runs_news(
        &self,
        mine: Vec<(u64, i64)>,
        silent_before_ms: i64,
    ) -> Result<RunsNews, StoreError> {
        if !self.shared_db {
            return Ok(RunsNews::default());
        }
        self.query(move |backend| backend.runs_news(&mine, silent_before_ms))
            .await
    }

    /// A shared database: takes over `runs` of `server` if that server is
    /// not running (see [`Backend::adopt`]).
    ///
    /// # Errors
    /// The store cannot be read or written.
    pub async fn adopt(
        &self,
        server: Arc<str>,
        runs: Vec<u64>,
    ) -> Result<Vec<RunRecord>, StoreError> {
        if !self.shared_db {
            return Ok(Vec::new());
        }
        self.query(move |backend| backend.adopt(&server, &runs))
            .await
    }

    /// Whether several servers may share the database.
    pub fn is_shared(&self) -> bool {
        self.shared_db
    }

    /// Whether this server runs the fleet's task generator now (see
    /// [`Store::leader`]).
    pub fn leader(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Whether the database answers now: a shared database's watcher
    /// follows it (always true for the others).
    pub fn reachable(&self) -> watch::Receiver<bool> {
        self.reachable.clone()
    }

    /// A shared database: `agent`'s broadcast cursor as the database keeps
    /// it, after everything written so far (`None` elsewhere).
    ///
    /// # Errors
    /// The store cannot be read, or is closed.
    pub async fn cursor(&self, agent: &Arc<str>) -> Result<Option<Saved>, StoreError> {
        match self.reader().await? {
            Some(reader) => reader.cursor(agent).await,
            None => Ok(None),
        }
    }

    /// A shared database: every agent and server it knows of (`None`
    /// elsewhere: this server knows its own fleet).
    ///
    /// # Errors
    /// The store cannot be read, or is closed.
    pub async fn fleet(&self) -> Result<Option<Fleet>, StoreError> {
        match self.reader().await? {
            Some(reader) => reader.fleet().await.map(Some),
            None => Ok(None),
        }
    }

    /// A shared database: the tasks with these ids as it keeps them (their
    /// progress through every server), in no order.
    ///
    /// # Errors
    /// The store cannot be read, or is closed.
    pub async fn tasks(&self, ids: Vec<u64>) -> Result<Vec<StoredTask>, StoreError> {
        match self.reader().await? {
            Some(reader) => reader.tasks(&ids).await,
            None => Ok(Vec::new()),
        }
    }

    /// A shared database: what it said of the claim numbered `seq`, if it
    /// refused it (once committed: see [`Store::claim`]).
    pub fn take_lost(&self, seq: u64) -> Option<LostClaim> {
        if !self.shared_db {
            return None;
        }
        self.shared.lost.lock().remove(&seq)
    }

    /// Asks the writer to read what other servers published (one request
    /// at a time is enough: it reads everything there is).
    fn follow(&self) {
        if let Some(journal) = &self.journal
            && !self.shared.follow_asked.swap(true, Ordering::AcqRel)
        {
            self.send(journal, Msg::Follow);
        }
    }

    /// The highest sequence number committed, to wait on.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Writes behind that were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Deletes what `retention` no longer keeps (a bounded batch).
    pub async fn housekeep(&self, retention: Retention) -> Result<Pruned, StoreError> {
        let Some(journal) = &self.journal else {
            return Ok(Pruned::default());
        };
        let (tx, rx) = oneshot::channel();
        self.send(journal, Msg::Housekeep(retention, tx));
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Commits everything written so far and stops the writer.
    pub async fn close(&self) {
        let Some(journal) = &self.journal else {
            return;
        };
        let watching = journal.watcher.lock().take();
        if let Some(watching) = watching {
            watching.stop().await;
        }
        if let Some(reader) = &self.reader {
            reader.close();
        }
        let (tx, rx) = oneshot::channel();
        self.send(journal, Msg::Close(tx));
        let _ = rx.await;
        let thread = journal.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// A write made with [`Store::write_now`], on its way to the database.
#[derive(Debug)]
#[must_use = "a write is not known to be kept until it is committed"]
pub struct Commit(Option<oneshot::Receiver<Result<(), StoreError>>>);

impl Commit {
    /// Waits until the write is committed.
    ///
    /// # Errors
    /// The store could not keep it, or is closed.
    pub async fn committed(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.map_err(|_| StoreError::Closed)?,
        }
    }
}

/// `tasks` as fired: those of `refused` runs void.
fn fired(tasks: &[Arc<Task>], refused: &std::collections::HashSet<u64>) -> Vec<Arc<Task>> {
    if refused.is_empty() {
        return tasks.to_vec();
    }
    tasks
        .iter()
        .map(|t| {
            if refused.contains(&t.id) {
                Arc::new(Task::void(t.id))
            } else {
                Arc::clone(t)
            }
        })
        .collect()
}

/// Per task, its id, or `None` for a refused run's.
fn fired_ids(tasks: &[Arc<Task>], refused: &std::collections::HashSet<u64>) -> Vec<Option<u64>> {
    tasks
        .iter()
        .map(|t| (!refused.contains(&t.id)).then_some(t.id))
        .collect()
}

fn voids(tasks: &[Arc<Task>]) -> Vec<Arc<Task>> {
    tasks.iter().map(|t| Arc::new(Task::void(t.id))).collect()
}

/// The writer thread: takes what has queued up, commits it as one
/// transaction, then hands committed tasks to the sink and answers.
///
/// With a shared database, every task reaches the sink from here in id
/// order, whichever server published it: `followed` is the highest id
/// handed on, and the tasks other servers committed below this server's
/// own are read before its own are handed on.
fn writer(
    mut backend: Box<dyn Backend>,
    mut rx: mpsc::UnboundedReceiver<Envelope>,
    shared: &Shared,
    committed: &watch::Sender<u64>,
    followed: u64,
) {
    let mut following = Following {
        followed,
        own: Vec::new(),
    };
    let mut group: Vec<Envelope> = Vec::new();
    let mut failures = 0u64;
    // Changes of failed groups, applied again before the next ones (an ack
    // lost to a full disk was lost for good, and after a restart its task
    // went to another agent and ran twice: RELIABILITY.md, defect 8).
    let mut carried: Vec<Envelope> = Vec::new();
    let mut carried_since: Option<std::time::Instant> = None;
    let mut closed = false;
    loop {
        if carried.is_empty() {
            let Some(first) = rx.blocking_recv() else {
                return;
            };
            group.push(first);
        } else {
            match rx.try_recv() {
                Ok(envelope) => group.push(envelope),
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(CARRY_PAUSE);
                    if let Ok(envelope) = rx.try_recv() {
                        group.push(envelope);
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(envelope) => group.push(envelope),
                Err(_) => break,
            }
        }
        let behind = group
            .iter()
            .filter(|e| matches!(e.msg, Msg::Behind(_)))
            .count();
        shared.queued.fetch_sub(behind as u64, Ordering::Relaxed);
        // The older changes first, as they were queued.
        group.splice(0..0, carried.drain(..));
        let (made, reserved) = make_shared(backend.as_mut(), &mut group);
        let mut made_tasks = made.iter();
        let mut op_seqs: Vec<u64> = Vec::new();
        let ops: Vec<Op<'_>> = group
            .iter()
            .filter_map(|e| {
                match &e.msg {
                    Msg::Publish(tasks, _) => Some(Op::Publish(tasks)),
                    Msg::Fire(tasks, runs, _) => Some(Op::Fire(tasks, runs)),
                    Msg::PublishShared(..) => made_tasks
                        .next()
                        .filter(|tasks| !tasks.is_empty())
                        .map(|tasks| Op::Publish(tasks)),
                    Msg::FireShared(_, runs, _) => made_tasks
                        .next()
                        .filter(|tasks| !tasks.is_empty())
                        .map(|tasks| Op::Fire(tasks, runs)),
                    Msg::Behind(write) | Msg::Claim(write) | Msg::Now(write, _) => {
                        Some(Op::Write(write))
                    }
                    Msg::Housekeep(..) | Msg::Query(_) | Msg::Close(_) | Msg::Follow => None,
                }
                .inspect(|_| op_seqs.push(e.seq))
            })
            .collect();
        let result = if ops.is_empty() && !matches!(reserved, Some(Ok(_))) {
            Ok(())
        } else {
            backend.apply(&ops)
        };
        if result.is_err() && backend.shared() {
            // Whether these claims were committed is not known: another
            // server may hold the tasks now. Not sent; tried again after
            // an ack timeout, as claims lost to another server are.
            let mut map = shared.lost.lock();
            for (at, op) in ops.iter().enumerate() {
                if let Op::Write(Write::Claimed {
                    id, deadline_ms, ..
                }) = op
                {
                    tracing::debug!(
                        task_id = id,
                        seq = op_seqs[at],
                        "a claim whose commit failed: held as another server's until its deadline"
                    );
                    let claim = LostClaim {
                        state: TaskState::Delivered,
                        holder: None,
                        deadline_ms: Some(*deadline_ms),
                    };
                    map.insert(op_seqs[at], claim);
                }
            }
        }
        drop(ops);
        let refused: std::collections::HashSet<u64> = if result.is_ok() {
            backend.refused_runs().into_iter().collect()
        } else {
            std::collections::HashSet::new()
        };
        if result.is_ok() {
            let lost = backend.lost_claims();
            if !lost.is_empty() {
                let mut map = shared.lost.lock();
                for (at, claim) in lost {
                    map.insert(op_seqs[at], claim);
                }
            }
        }
        if let Err(e) = &result {
            failures += 1;
            if failures.is_power_of_two() {
                tracing::error!(failures, "the task store could not commit: {e}");
            }
            let log = failures.is_power_of_two();
            carry(
                &group,
                backend.shared(),
                &mut carried,
                &mut carried_since,
                shared,
                log,
            );
        } else {
            carried_since = None;
        }
        if let (Ok(()), Some(Ok(ids))) = (&result, &reserved) {
            // Others' tasks below ours first, then ours: in id order.
            let caught_up = follow(backend.as_mut(), shared, &mut following, ids.start - 1);
            for tasks in &made {
                sink(shared, &fired(tasks, &refused));
            }
            if caught_up {
                following.followed = following.followed.max(ids.end - 1);
            } else {
                // Others' tasks below ours are still to be read (the
                // database went between the commit and the read): ours
                // are not read back as theirs then.
                following.own.push(ids.clone());
            }
        }
        let last = group.last().map_or(0, |e| e.seq);
        // A claim that failed to commit is sent all the same: holding
        // deliveries back would not make the disk any less full. (Never
        // backwards: a group of carried changes alone ends below what the
        // group that failed them already said.)
        committed.send_if_modified(|c| {
            let newer = last > *c;
            *c = (*c).max(last);
            newer
        });
        let mut close = None;
        let mut made_ranges = made
            .iter()
            .map(|tasks| match (tasks.first(), tasks.last()) {
                (Some(first), Some(last)) => first.id..last.id + 1,
                _ => 0..0,
            });
        for envelope in group.drain(..) {
            match envelope.msg {
                Msg::Publish(tasks, reply) => {
                    match &result {
                        Ok(()) => sink(shared, &tasks),
                        Err(_) => sink(shared, &voids(&tasks)),
                    }
                    let _ = reply.send(result.clone());
                }
                Msg::Fire(tasks, _, reply) => {
                    match &result {
                        Ok(()) => sink(shared, &fired(&tasks, &refused)),
                        Err(_) => sink(shared, &voids(&tasks)),
                    }
                    let _ = reply.send(result.clone().map(|()| fired_ids(&tasks, &refused)));
                }
                Msg::FireShared(_, _, reply) => {
                    let ids = made_ranges.next().unwrap_or(0..0);
                    let answer = match (&reserved, &result) {
                        (Some(Err(e)), _) | (_, Err(e)) => Err(e.clone()),
                        _ => Ok(ids
                            .map(|id| (!refused.contains(&id)).then_some(id))
                            .collect()),
                    };
                    let _ = reply.send(answer);
                }
                Msg::PublishShared(_, _, reply) => {
                    let ids = made_ranges.next().unwrap_or(0..0);
                    let answer = match (&reserved, &result) {
                        (Some(Err(e)), _) | (_, Err(e)) => Err(e.clone()),
                        _ => Ok(ids),
                    };
                    let _ = reply.send(answer);
                }
                Msg::Follow => {
                    shared.follow_asked.store(false, Ordering::Release);
                    follow(backend.as_mut(), shared, &mut following, u64::MAX);
                }
                Msg::Now(_, reply) => {
                    let _ = reply.send(result.clone());
                }
                Msg::Query(read) => read(backend.as_mut()),
                Msg::Housekeep(retention, reply) => {
                    let _ = reply.send(backend.prune(&retention));
                }
                Msg::Close(reply) => close = Some(reply),
                Msg::Behind(_) | Msg::Claim(_) => {}
            }
        }
        if close.is_some() || closed {
            if !carried.is_empty() {
                tracing::error!(
                    dropped = carried.len(),
                    "the task store is closing with changes it could not commit: they are lost \
                     (their tasks may be delivered again after the restart)"
                );
            }
            backend.close();
            drop(backend);
            if let Some(reply) = close {
                let _ = reply.send(());
            }
            return;
        }
    }
}

/// Keeps the written-behind changes of `group`, which failed to commit (and
/// its claims, but for a shared database, where a claim whose commit failed
/// is treated as lost: see the writer), to apply them again with the next
/// group; at most `write_queue` of them, for at most [`CARRY_FOR`].
fn carry(
    group: &[Envelope],
    shared_backend: bool,
    carried: &mut Vec<Envelope>,
    since: &mut Option<std::time::Instant>,
    shared: &Shared,
    log: bool,
) {
    let now = std::time::Instant::now();
    let first = *since.get_or_insert(now);
    let again = group.iter().filter_map(|e| {
        let msg = match &e.msg {
            Msg::Behind(write) => Msg::Behind(write.clone()),
            Msg::Claim(write) if !shared_backend => Msg::Claim(write.clone()),
            _ => return None,
        };
        Some(Envelope { seq: e.seq, msg })
    });
    if now.duration_since(first) >= CARRY_FOR {
        let dropped = again.count();
        *since = None;
        tracing::error!(
            dropped,
            failing_for = ?CARRY_FOR,
            "the task store has failed to commit for too long: changes waiting to be written \
             (acks, deliveries, claims) are dropped; their tasks may be delivered again after \
             a restart"
        );
        return;
    }
    carried.extend(again);
    let bound = usize::try_from(shared.write_queue).unwrap_or(usize::MAX);
    if carried.len() > bound {
        let dropped = carried.len() - bound;
        carried.drain(..dropped);
        if log {
            tracing::error!(
                dropped,
                "the task store cannot commit and more than store.write_queue changes wait: the \
             oldest are dropped; their tasks may be delivered again after a restart"
            );
        }
    }
}

/// A shared database: reserves ids for the group's publishes and makes
/// their tasks (one list per publish, in order), returning them and the
/// ids reserved (`None`: the group publishes nothing this way).
#[allow(clippy::type_complexity)]
fn make_shared(
    backend: &mut dyn Backend,
    group: &mut [Envelope],
) -> (Vec<Vec<Arc<Task>>>, Option<Result<Range<u64>, StoreError>>) {
    let count: usize = group
        .iter()
        .map(|e| match &e.msg {
            Msg::PublishShared(count, ..) => *count,
            Msg::FireShared(drafts, ..) => drafts.len(),
            _ => 0,
        })
        .sum();
    let publishes = group
        .iter()
        .filter(|e| matches!(e.msg, Msg::PublishShared(..) | Msg::FireShared(..)))
        .count();
    if publishes == 0 {
        return (Vec::new(), None);
    }
    let first = match backend.reserve(count as u64) {
        Ok(first) => first,
        Err(e) => return (vec![Vec::new(); publishes], Some(Err(e))),
    };
    let created = SystemTime::now();
    let mut next = first;
    let made = group
        .iter_mut()
        .filter_map(|e| match &mut e.msg {
            Msg::PublishShared(count, make, _) => {
                let tasks: Vec<Arc<Task>> = (next..next + *count as u64)
                    .map(|id| Arc::new(Task::from_draft(id, make(id), created)))
                    .collect();
                next += *count as u64;
                Some(tasks)
            }
            Msg::FireShared(drafts, runs, _) => {
                let tasks: Vec<Arc<Task>> = std::mem::take(drafts)
                    .into_iter()
                    .zip(next..)
                    .map(|(draft, id)| Arc::new(Task::from_draft(id, draft, created)))
                    .collect();
                for (run, task) in runs.iter_mut().zip(&tasks) {
                    run.task_id = task.id;
                }
                next += tasks.len() as u64;
                Some(tasks)
            }
            _ => None,
        })
        .collect();
    (made, Some(Ok(first..next)))
}

/// Tasks read back per query when following a shared database.
const FOLLOW_BATCH: usize = 1024;

/// How far a shared database's tasks have been handed on.
#[derive(Debug, Default)]
struct Following {
    /// The highest id handed on (every task at or below it was).
    followed: u64,
    /// This server's own tasks above `followed`, handed on when they were
    /// committed: a follow that failed left others' tasks below them
    /// unread, and the next one must not hand these on again.
    own: Vec<Range<u64>>,
}

/// Hands on the tasks committed above `following.followed`, up to `until`,
/// in id order, but for this server's own (already handed on). A failure is
/// logged: the next notice or poll reads them. Returns whether it read
/// everything up to `until`.
fn follow(
    backend: &mut dyn Backend,
    shared: &Shared,
    following: &mut Following,
    until: u64,
) -> bool {
    while following.followed < until {
        match backend.tasks_after(following.followed, FOLLOW_BATCH) {
            Ok(stored) => {
                let within: Vec<&StoredTask> = stored.iter().filter(|t| t.id <= until).collect();
                let Some(last) = within.last() else {
                    return true;
                };
                following.followed = last.id;
                let own = &following.own;
                let tasks: Vec<Arc<Task>> = within
                    .iter()
                    .filter(|t| !own.iter().any(|ids| ids.contains(&t.id)))
                    .map(|t| Arc::new(t.to_task()))
                    .collect();
                let followed = following.followed;
                following.own.retain(|ids| ids.end > followed + 1);
                if !tasks.is_empty() {
                    sink(shared, &tasks);
                }
                if stored.len() < FOLLOW_BATCH {
                    return true;
                }
            }
            Err(e) => {
                tracing::warn!("cannot read the tasks other servers published: {e}");
                return false;
            }
        }
    }
    true
}

fn sink(shared: &Shared, tasks: &[Arc<Task>]) {
    if let Some(sink) = shared.sink.get() {
        sink(tasks);
    }
}

/// A cursor as the store keeps it: the watermark and the acked ids above.
pub fn cursor_parts(cursor: &AckCursor) -> (u64, Vec<u8>) {
    let above: Vec<u8> = cursor.above().flat_map(u64::to_le_bytes).collect();
    (cursor.watermark(), above)
}

/// The cursor [`cursor_parts`] made.
pub fn cursor_from_parts(watermark: u64, above: &[u8]) -> AckCursor {
    let ids = above
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    AckCursor::from_parts(watermark, ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreSync;

    fn sqlite_config(path: PathBuf) -> StoreConfig {
        StoreConfig {
            path: Some(path),
            sync: StoreSync::Normal,
            ..StoreConfig::default()
        }
    }

    #[test]
    fn a_failure_keeps_its_source_through_a_clone_and_says_what_it_said() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device");
        // As `sqlite::backup` builds it; it was
        // `StoreError::Failed(format!("backup to {}: {e}", to.display()))`.
        let e = StoreError::failed(format!("backup to /srv/c.db: {io}"), io);
        let text = "the task store failed: backup to /srv/c.db: no space left on device";
        assert_eq!(e.to_string(), text);
        let clone = e.clone();
        assert_eq!(clone.to_string(), text);
        for e in [&e, &clone] {
            let source = e.source().expect("the io::Error");
            let io = source
                .downcast_ref::<std::io::Error>()
                .expect("itself, not a wrapper");
            assert_eq!(io.kind(), std::io::ErrorKind::StorageFull);
        }
        assert!(
            std::ptr::addr_eq(e.source().unwrap(), clone.source().unwrap()),
            "a clone shares the source"
        );
        assert_eq!(crate::error_chain(&e), text, "the source is not said twice");

        let found = StoreError::Failed("the database connection ended".into());
        assert!(
            found.source().is_none(),
            "a failure contactd found has none"
        );
        assert_eq!(
            found.to_string(),
            "the task store failed: the database connection ended"
        );
    }

    #[test]
    fn every_failure_says_what_the_derived_display_said() {
        let io = || std::io::Error::other("cause");
        let said = [
            (
                StoreError::Open {
                    path: "/var/lib/contactd/c.db".into(),
                    reason: "is not a contactd database".into(),
                },
                "store.path /var/lib/contactd/c.db: is not a contactd database",
            ),
            (
                StoreError::unusable("store.ca_file: cause", io()),
                "store.ca_file: cause",
            ),
            (
                StoreError::Locked {
                    path: "/var/lib/contactd/c.db".into(),
                    reason: "another contactd is using this database (busy)".into(),
                },
                "/var/lib/contactd/c.db: another contactd is using this database (busy)",
            ),
            (
                StoreError::full("cause", io()),
                "the task store is full: cause",
            ),
            (
                StoreError::failed("cause", io()),
                "the task store failed: cause",
            ),
            (
                StoreError::unavailable("cause", io()),
                "the task store is unavailable: cause",
            ),
            (StoreError::Closed, "the task store is closed"),
        ];
        for (e, text) in said {
            assert_eq!(e.to_string(), text);
            assert_eq!(crate::error_chain(&e), text);
        }
    }

    #[tokio::test]
    async fn publishes_are_committed_then_handed_on_in_id_order_and_claims_become_committed() {
        let dir = tempfile::tempdir().unwrap();
        let config = sqlite_config(dir.path().join("c.db"));
        let (store, _) = open(&config, "test", 10, true).unwrap().start();
        let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
        store.set_sink({
            let seen = Arc::clone(&seen);
            Arc::new(move |tasks| seen.lock().extend(tasks.iter().map(|t| t.id)))
        });
        let (a, b) = tokio::join!(
            store.publish(2, |id| (format!("a{id}"), None)),
            store.publish(1, |id| (format!("b{id}"), Some("web1".into()))),
        );
        let mut ranges = [a.unwrap(), b.unwrap()];
        ranges.sort_by_key(|r| r.start);
        assert_eq!(ranges[0].start, 1);
        assert_eq!(ranges[1].end, 4);
        assert_eq!(*seen.lock(), [1, 2, 3]);
        let seq = store.claim(Write::Claimed {
            id: 1,
            attempt: 1,
            holder: "web1".into(),
            deadline_ms: crate::clock::now_ms() + 1000,
        });
        let mut committed = store.committed();
        tokio::time::timeout(Duration::from_secs(10), committed.wait_for(|c| *c >= seq))
            .await
            .expect("the claim commits")
            .unwrap();
        store.close().await;

        let mut opened = open(&config, "test", 10, true).unwrap();
        let snapshot = std::mem::take(&mut opened.snapshot);
        assert_eq!(snapshot.next_id, 4);
        let claims: Vec<_> = snapshot.tasks.iter().map(|t| t.claim.is_some()).collect();
        assert_eq!(claims, [true, false, false]);
        assert_eq!(snapshot.tasks[2].target.as_deref(), Some("web1"));
    }

    /// SQLite whose commits fail while `full` is set, as on a full disk.
    struct Flaky {
        inner: sqlite::Sqlite,
        full: Arc<AtomicBool>,
    }

    impl Backend for Flaky {
        fn load(&mut self, ring: usize, queue_mode: bool) -> Result<Snapshot, StoreError> {
            self.inner.load(ring, queue_mode)
        }
        fn apply(&mut self, ops: &[Op<'_>]) -> Result<(), StoreError> {
            if self.full.load(Ordering::Relaxed) {
                let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full");
                return Err(StoreError::full("database or disk is full", io));
            }
            self.inner.apply(ops)
        }
        fn prune(&mut self, retention: &Retention) -> Result<Pruned, StoreError> {
            self.inner.prune(retention)
        }
        fn task(&mut self, id: u64) -> Result<Option<TaskRecord>, StoreError> {
            self.inner.task(id)
        }
        fn jobs(&mut self) -> Result<Vec<JobRow>, StoreError> {
            self.inner.jobs()
        }
        fn runs(&mut self, job: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError> {
            self.inner.runs(job, limit)
        }
        fn run(&mut self, task_id: u64) -> Result<Option<RunRecord>, StoreError> {
            self.inner.run(task_id)
        }
    }

    /// RELIABILITY.md's defect 8: an ack written behind while the disk was
    /// full was lost for good, so after a restart its task went to another
    /// agent and ran twice. Now what failed is applied again once commits
    /// work, in order.
    #[tokio::test]
    async fn changes_that_failed_to_commit_are_applied_again_once_the_disk_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.db");
        let full = Arc::new(AtomicBool::new(false));
        let mut inner = sqlite::Sqlite::open(&path, StoreSync::Normal).unwrap();
        let snapshot = inner.load(10, true).unwrap();
        let opened = Opened {
            snapshot,
            backend: Some(Box::new(Flaky {
                inner,
                full: Arc::clone(&full),
            })),
            watcher: None,
            reader: None,
            write_queue: 1000,
        };
        let (store, _) = opened.start();
        store
            .publish(2, |id| (format!("t{id}"), None))
            .await
            .unwrap();
        full.store(true, Ordering::Relaxed);
        let seq = store.claim(Write::Claimed {
            id: 1,
            attempt: 1,
            holder: "web1".into(),
            deadline_ms: crate::clock::now_ms() + 60_000,
        });
        store.record(Write::Acked {
            id: 1,
            agent: "web1".into(),
            ok: true,
            text: "done".into(),
            at_ms: 5,
            claimed: true,
        });
        // The claim's group failed (it is sent all the same).
        let mut committed = store.committed();
        tokio::time::timeout(Duration::from_secs(10), committed.wait_for(|c| *c >= seq))
            .await
            .expect("the failed group is let go")
            .unwrap();
        // A write through fails, and says so, while the disk is full.
        let refused = store.write_now(Write::Retried { id: 2 }).committed().await;
        assert!(refused.is_err(), "{refused:?}");
        full.store(false, Ordering::Relaxed);
        // The writer applies what failed again on its own (within a pause).
        let acked = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let record = store.task(1).await.unwrap().unwrap();
                if record.task.state == TaskState::Acked {
                    return record;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the ack written once the disk had room");
        assert_eq!(&*acked.results[0].agent, "web1");
        store.close().await;
        // After a restart, too: task 1 is acked, not sent again.
        let opened = open(&sqlite_config(path), "test", 10, true).unwrap();
        let states: Vec<_> = opened.snapshot.tasks.iter().map(|t| t.state).collect();
        assert_eq!(states, [TaskState::Acked, TaskState::Pending]);
    }

    /// A shared database in memory: ids are reserved, tasks read back, and
    /// reading them back fails once when `down` is set.
    #[derive(Default)]
    struct SharedMemory {
        tasks: Arc<Mutex<Vec<StoredTask>>>,
        next_id: Arc<Mutex<u64>>,
        down: Arc<AtomicBool>,
    }

    fn stored(id: u64) -> StoredTask {
        StoredTask {
            id,
            text: format!("t{id}"),
            target: None,
            selector: None,
            created_ms: 0,
            state: TaskState::Pending,
            attempts: 0,
            claim: None,
            delivered: 0,
            acked: 0,
            failed: 0,
            last_result: None,
            retries: 0,
            job: None,
            direct: false,
        }
    }

    impl Backend for SharedMemory {
        fn load(&mut self, _: usize, _: bool) -> Result<Snapshot, StoreError> {
            Ok(Snapshot::default())
        }
        fn apply(&mut self, ops: &[Op<'_>]) -> Result<(), StoreError> {
            for op in ops {
                if let Op::Publish(tasks) = op {
                    self.tasks.lock().extend(tasks.iter().map(|t| stored(t.id)));
                }
            }
            Ok(())
        }
        fn prune(&mut self, _: &Retention) -> Result<Pruned, StoreError> {
            Ok(Pruned::default())
        }
        fn task(&mut self, _: u64) -> Result<Option<TaskRecord>, StoreError> {
            Ok(None)
        }
        fn shared(&self) -> bool {
            true
        }
        fn reserve(&mut self, count: u64) -> Result<u64, StoreError> {
            let mut next = self.next_id.lock();
            let first = *next;
            *next += count;
            Ok(first)
        }
        fn tasks_after(&mut self, after: u64, limit: usize) -> Result<Vec<StoredTask>, StoreError> {
            if self.down.swap(false, Ordering::Relaxed) {
                return Err(StoreError::Unavailable("the database went away".into()));
            }
            let mut tasks: Vec<StoredTask> = self
                .tasks
                .lock()
                .iter()
                .filter(|t| t.id > after)
                .cloned()
                .collect();
            tasks.sort_by_key(|t| t.id);
            tasks.truncate(limit);
            Ok(tasks)
        }
        fn jobs(&mut self) -> Result<Vec<JobRow>, StoreError> {
            Ok(Vec::new())
        }
        fn runs(&mut self, _: Option<&str>, _: usize) -> Result<Vec<RunRow>, StoreError> {
            Ok(Vec::new())
        }
        fn run(&mut self, _: u64) -> Result<Option<RunRecord>, StoreError> {
            Ok(None)
        }
    }

    /// A task another server committed just before this one's own was not
    /// read when the database went between this server's commit and its
    /// read of the others' tasks: it was skipped for good (this server's
    /// agents never got it, however long the other server had none).
    #[tokio::test]
    async fn others_tasks_below_our_own_are_read_after_a_failed_follow() {
        let backend = SharedMemory {
            next_id: Arc::new(Mutex::new(1)),
            ..SharedMemory::default()
        };
        let (tasks, next_id, down) = (
            Arc::clone(&backend.tasks),
            Arc::clone(&backend.next_id),
            Arc::clone(&backend.down),
        );
        let opened = Opened {
            snapshot: Snapshot {
                epoch: 1,
                next_id: 1,
                ..Snapshot::default()
            },
            backend: Some(Box::new(backend)),
            watcher: None,
            reader: None,
            write_queue: 1000,
        };
        let (store, _) = opened.start();
        let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
        store.set_sink({
            let seen = Arc::clone(&seen);
            Arc::new(move |tasks| seen.lock().extend(tasks.iter().map(|t| t.id)))
        });
        // Another server commits task 1; this one's read of it fails.
        tasks.lock().push(stored(1));
        *next_id.lock() = 2;
        down.store(true, Ordering::Relaxed);
        let ours = store
            .publish(1, |id| (format!("t{id}"), None))
            .await
            .unwrap();
        assert_eq!(ours, 2..3);
        assert_eq!(*seen.lock(), [2], "its own, at once");
        // The next notice reads task 1, and not task 2 again.
        store.follow();
        store.jobs().await.unwrap();
        assert_eq!(*seen.lock(), [2, 1]);
        tasks.lock().push(stored(3));
        *next_id.lock() = 4;
        store.follow();
        store.jobs().await.unwrap();
        assert_eq!(*seen.lock(), [2, 1, 3]);
        let ours = store
            .publish(1, |id| (format!("t{id}"), None))
            .await
            .unwrap();
        assert_eq!(ours, 4..5);
        store.follow();
        store.jobs().await.unwrap();
        assert_eq!(*seen.lock(), [2, 1, 3, 4], "each once");
        store.close().await;
    }

    #[tokio::test]
    async fn a_selector_is_kept_with_its_task() {
        let dir = tempfile::tempdir().unwrap();
        let config = sqlite_config(dir.path().join("s.db"));
        let (store, _) = open(&config, "test", 10, false).unwrap().start();
        let selector = Arc::new(Selector::parse("role in (web, api),!canary").unwrap());
        let draft = Draft {
            text: "deploy".into(),
            target: None,
            selector: Some(Arc::clone(&selector)),
            ..Draft::default()
        };
        let mut draft = Some(draft);
        store
            .publish(1, move |_| draft.take().unwrap_or_default())
            .await
            .unwrap();
        store.close().await;

        let opened = open(&config, "test", 10, false).unwrap();
        let stored = &opened.snapshot.tasks[0];
        assert_eq!(
            stored.selector.as_deref(),
            Some("role in (api,web),!canary")
        );
        assert_eq!(stored.to_task().selector.as_deref(), Some(&*selector));
    }

    #[tokio::test]
    async fn a_read_sees_every_write_sent_before_it_and_writes_through_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(&sqlite_config(dir.path().join("c.db")), "test", 10, true)
            .unwrap()
            .start();
        store
            .publish(2, |id| (format!("t{id}"), None))
            .await
            .unwrap();
        // Written behind: not waited for, yet the read after it sees it.
        store.record(Write::Acked {
            id: 1,
            agent: "web1".into(),
            ok: false,
            text: "exit 1".into(),
            at_ms: 5,
            claimed: false,
        });
        let record = store.task(1).await.unwrap().unwrap();
        assert_eq!(record.task.state, TaskState::Failed);
        assert_eq!(&*record.results[0].agent, "web1");
        store
            .write_now(Write::Retried { id: 1 })
            .committed()
            .await
            .unwrap();
        store
            .write_now(Write::Cancelled { id: 2, held: false })
            .committed()
            .await
            .unwrap();
        let states = (
            store.task(1).await.unwrap().unwrap().task.state,
            store.task(2).await.unwrap().unwrap().task.state,
        );
        assert_eq!(states, (TaskState::Pending, TaskState::Cancelled));
        assert_eq!(store.task(3).await.unwrap(), None);
        store.close().await;
        assert!(matches!(store.task(1).await, Err(StoreError::Closed)));

        let memory = Store::memory();
        assert_eq!(
            memory.task(1).await.unwrap(),
            None,
            "the memory store keeps nothing"
        );
        memory
            .write_now(Write::Retried { id: 1 })
            .committed()
            .await
            .unwrap();
    }
}
