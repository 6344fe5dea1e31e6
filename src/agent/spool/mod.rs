//! The agent's spool: the tasks it started and the results it has not yet
//! had delivered, in a small durable file (`agent-spool-NAME.db` in the
//! agent's state directory, per agent name: a task id space is the server's
//! and dedup is per agent), so that a restarted agent re-sends its undelivered
//! results and does not run again a task it already ran.
//!
//! A task's life in the spool, by its [`TaskKey`] (id, and a hash of the
//! server's epoch, the retry count and the text):
//!
//! 1. **started**: written (and committed) before its handler starts;
//! 2. **done**: its result, written before the ack is queued to be sent;
//! 3. **delivered**: the `tellResult` call carrying the ack returned OK.
//!
//! Delivered entries are kept for dedup (the newest `remember` of them),
//! then pruned. When the agent starts, done entries are queued to be sent
//! again, and started ones, whose handler was running when the agent died,
//! are not run again: they are acked FAILED as interrupted (the handler may
//! have done part or all of its work; the server and the operator decide,
//! e.g. with `contactd task retry`).
//!
//! **Why SQLite, not a hand-written log:** an append-only log with
//! compaction, checksums and recovery is a solved problem, and the binary
//! already carries SQLite (the server's store): WAL commits are atomic, a
//! torn write is rolled back by SQLite itself, and `quick_check` finds a
//! damaged file. The cost per task is three small commits (started, done,
//! delivered) on the spool's own thread (group commit: writes that arrive
//! together share one), without an fsync with `spool_sync = "normal"`
//! (safe from a crash or kill of the agent, not from a power loss), with
//! one per commit with `"full"`: the `spool_cost` test measures them.
//!
//! **Bound:** the file may hold at most `spool_max_size` (SQLite's
//! `max_page_count`; its `-wal` comes on top, checkpointed and truncated at
//! about 4 MiB). A new task is
//! started only if there is room for the results of every running handler
//! and its own (`max_output` each); to make room, the oldest delivered
//! entries go first; if only undelivered ones are left, the task is not
//! started (not acked either: the server delivers it again later).
//!
//! **A damaged file** (not a spool, truncated, failing `quick_check`, or
//! written by a newer contactd) is refused with an error naming it, and
//! never changed: the agent does not start. Moving it aside starts an empty
//! spool; the tasks it recorded may then run again, which the operator
//! chooses knowingly rather than the agent silently.
//!
//! - this file: the handle the agent writes through ([`Spool`]), and what a
//!   restart finds ([`Recovered`]);
//! - `file`: creating, checking, locking and reading back the file;
//! - `writer`: the spool's own thread, group commit, and the bound.

mod file;
mod writer;

use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};

use super::memory::TaskKey;
use crate::{
    config::AgentConfig,
    proto::contact::{Outcome, Result as ResultMsg, ServerMsg},
};

/// The spool file of the agent `name`, in its state directory: per name,
/// so that agents sharing a directory (the working directory, by default)
/// each have theirs. Characters other than letters, digits, `.`, `_` and
/// `-` are written as `_`.
pub fn file_name(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("agent-spool-{name}.db")
}

/// Writes waiting for the spool's thread, at most.
const QUEUE: usize = 4096;

/// Why the spool cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// The file or its directory cannot be opened or created.
    #[error("agent spool {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    /// The file is not a spool, or it is damaged: refused, never changed.
    #[error(
        "agent spool {path} is damaged or not a spool ({detail}): the agent does not start on \
         it. Move it aside to start with an empty spool (tasks it recorded may then run again, \
         and results it had not delivered are lost unless the server delivers their tasks \
         again), or restore it from a copy"
    )]
    Damaged { path: PathBuf, detail: String },
    /// No room for another started task (every entry is undelivered).
    #[error("agent spool full: {0} (raise agent.spool_max_size)")]
    Full(String),
    /// A write failed.
    #[error("agent spool write failed: {0}")]
    Write(String),
    /// The spool's thread is gone (the agent is stopping).
    #[error("agent spool closed")]
    Closed,
}

/// What a spool kept from before the agent's restart.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every handled task's key and ack, oldest first: for dedup.
    pub handled: Vec<(TaskKey, ResultMsg)>,
    /// The acks not yet delivered, oldest first: to be sent again.
    pub undelivered: Vec<(TaskKey, ResultMsg)>,
    /// Tasks whose handler was running when the agent stopped (included in
    /// both lists above, acked FAILED as interrupted).
    pub interrupted: Vec<u64>,
}

/// An open spool and what it kept: what [`Run::spool`](super::Run) takes.
#[derive(Debug)]
pub struct Opened {
    pub spool: Spool,
    pub recovered: Recovered,
}

/// The handle the agent writes through (to the spool's own thread).
#[derive(Debug, Clone)]
pub struct Spool {
    writes: mpsc::Sender<Op>,
    path: PathBuf,
}

/// What a write came to: for a start, the ack of the task if the spool
/// already has it handled.
type Written = Result<Option<ResultMsg>, SpoolError>;

enum Op {
    Start {
        key: TaskKey,
        epoch: u64,
        /// Room to keep for its result (`max_output`).
        room: u64,
        reply: oneshot::Sender<Written>,
    },
    Done {
        key: TaskKey,
        ack: ResultMsg,
        reply: oneshot::Sender<Written>,
    },
    Delivered {
        keys: Vec<TaskKey>,
        /// `remember`: delivered entries kept beyond are pruned.
        keep: usize,
    },
    Flush(oneshot::Sender<()>),
}

/// The ack of a task whose handler was running when the agent stopped.
pub fn interrupted_ack(id: u64, epoch: u64) -> ResultMsg {
    ResultMsg {
        ret: "[contactd: interrupted: the agent stopped while this task's handler ran; \
              not run again]"
            .to_owned(),
        task_id: id,
        outcome: Outcome::Failed as i32,
        epoch,
    }
}

/// The other spools in `dir` (agents of other names, or this one under an
/// earlier name) no agent holds now, with their results not yet
/// delivered: those only an agent of that name would send. A spool another
/// running agent holds (locked) or that cannot be read is passed over.
fn others_undelivered(dir: &Path, ours: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten().take(OTHERS_LOOKED_AT) {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("agent-spool-")
            || !name.ends_with(".db")
            || path.file_name() == ours.file_name()
        {
            continue;
        }
        let undelivered = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|conn| {
            // One another agent holds is locked for good: passed over at
            // once, not after a wait for each (20 agents sharing a
            // directory held each start for 95 s: CI's soak).
            conn.busy_timeout(std::time::Duration::ZERO)?;
            conn.query_row(
                "SELECT count(*) FROM tasks WHERE state = ?1",
                [file::DONE],
                |row| row.get::<_, i64>(0),
            )
        });
        match undelivered {
            Ok(n) if n > 0 => found.push((path, u64::try_from(n).unwrap_or(0))),
            Ok(_) => {}
            Err(e) => tracing::debug!(spool = %path.display(), "another agent spool not read: {e}"),
        }
    }
    found
}

/// Files in the state directory looked at for other spools, at most (a
/// directory shared by many agents is not read whole at each start).
const OTHERS_LOOKED_AT: usize = 1000;

impl Spool {
    /// Opens (or creates) the spool in `config`'s state directory and reads
    /// what it kept; tasks whose handler was running are marked done as
    /// interrupted.
    ///
    /// # Errors
    /// The directory or file cannot be used ([`SpoolError::Open`]), another
    /// agent holds it, or the file is damaged ([`SpoolError::Damaged`]).
    pub fn open(config: &AgentConfig) -> Result<Opened, SpoolError> {
        let dir = config.resolved_state_dir();
        let path = dir.join(file_name(&config.name));
        let open_error = |detail: String| SpoolError::Open {
            path: path.clone(),
            detail,
        };
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| open_error(format!("cannot create its directory: {e}")))?;
        }
        if !path.exists() {
            file::create(&path).map_err(open_error)?;
        }
        let mut conn = file::open_existing(&path, config)?;
        let recovered = file::recover(&mut conn, &path)?;
        for (other, undelivered) in others_undelivered(&dir, &path) {
            tracing::warn!(
                spool = %other.display(),
                undelivered,
                "another name's agent spool here holds results not delivered yet (was this \
                 agent renamed?): only an agent of that name sends them; start one (or this \
                 agent under that name) to deliver them, or remove the file"
            );
        }
        let (writes, queue) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("agent-spool".into())
            .spawn(move || writer::writer(conn, queue))
            .map_err(|e| open_error(format!("cannot start its thread: {e}")))?;
        Ok(Opened {
            spool: Spool { writes, path },
            recovered,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that `task`'s handler is about to start, keeping `room`
    /// bytes for its result; returns once committed. If the spool has the
    /// task handled already (the agent's memory, bounded by `remember`,
    /// forgot it), nothing is written and its ack is returned: it must not
    /// run again.
    ///
    /// # Errors
    /// No room ([`SpoolError::Full`]), a failed write, or a closed spool.
    pub async fn start(
        &self,
        key: TaskKey,
        task: &ServerMsg,
        room: u64,
    ) -> Result<Option<ResultMsg>, SpoolError> {
        let (reply, done) = oneshot::channel();
        let op = Op::Start {
            key,
            epoch: task.epoch,
            room,
            reply,
        };
        self.call(op, done).await
    }

    /// Records a handled task's ack; returns once committed.
    ///
    /// # Errors
    /// A failed write (the disk is full), or a closed spool.
    pub async fn done(&self, key: TaskKey, ack: &ResultMsg) -> Result<(), SpoolError> {
        let (reply, done) = oneshot::channel();
        let op = Op::Done {
            key,
            ack: ack.clone(),
            reply,
        };
        self.call(op, done).await.map(|_| ())
    }

    /// Records that the acks of `keys` were delivered; keeps the newest
    /// `keep` delivered entries. Not waited for: if it is lost in a crash,
    /// those acks are sent again after the restart (and ignored by the
    /// server as repeated).
    pub async fn delivered(&self, keys: Vec<TaskKey>, keep: usize) {
        if !keys.is_empty() {
            let _ = self.writes.send(Op::Delivered { keys, keep }).await;
        }
    }

    /// Waits until every write sent before is committed.
    pub async fn flush(&self) {
        let (reply, done) = oneshot::channel();
        if self.writes.send(Op::Flush(reply)).await.is_ok() {
            let _ = done.await;
        }
    }

    async fn call(&self, op: Op, done: oneshot::Receiver<Written>) -> Written {
        self.writes.send(op).await.map_err(|_| SpoolError::Closed)?;
        done.await.map_err(|_| SpoolError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytesize::ByteSize;
    use rusqlite::Connection;

    use super::*;
    use crate::config::StoreSync;

    fn config(dir: &Path) -> AgentConfig {
        AgentConfig {
            state_dir: Some(dir.to_owned()),
            ..AgentConfig::default()
        }
    }

    fn task(id: u64) -> (TaskKey, ServerMsg) {
        let task = ServerMsg {
            task: format!("task {id}"),
            id,
            attempt: 1,
            epoch: 77,
            retry: 0,
        };
        (TaskKey::with_epoch(77, id, &task.task, 0), task)
    }

    /// Opens the spool again once the previous handle's thread has let go
    /// of the file (it drains its writes first), within 10 s.
    fn reopen(config: &AgentConfig) -> Opened {
        for _ in 0..1000 {
            match Spool::open(config) {
                Err(SpoolError::Open { detail, .. }) if detail.contains("another agent") => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
        panic!("the spool stayed locked");
    }

    fn ack(id: u64, ret: &str) -> ResultMsg {
        ResultMsg {
            ret: ret.into(),
            task_id: id,
            outcome: Outcome::Ok as i32,
            epoch: 77,
        }
    }

    #[tokio::test]
    async fn what_was_started_done_and_delivered_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { spool, recovered } = Spool::open(&config(dir.path())).unwrap();
        assert!(recovered.handled.is_empty());
        for id in 1..=3 {
            let (key, task) = task(id);
            spool.start(key, &task, 4096).await.unwrap();
        }
        spool.done(task(1).0, &ack(1, "one")).await.unwrap();
        spool.done(task(2).0, &ack(2, "two")).await.unwrap();
        // Started again (memory forgot it): the spool answers with its ack.
        let (key, again) = task(1);
        assert_eq!(
            spool.start(key, &again, 4096).await.unwrap(),
            Some(ack(1, "one"))
        );
        spool.delivered(vec![task(1).0], 100).await;
        spool.flush().await;
        drop(spool);

        let reopened = || reopen(&config(dir.path()));
        let Opened { spool, recovered } = reopened();
        let ids = |list: &[(TaskKey, ResultMsg)]| -> Vec<(u64, String)> {
            list.iter().map(|(k, a)| (k.id, a.ret.clone())).collect()
        };
        let interrupted = interrupted_ack(3, 77).ret;
        assert_eq!(
            ids(&recovered.handled),
            [
                (1, "one".into()),
                (2, "two".into()),
                (3, interrupted.clone())
            ]
        );
        assert_eq!(
            ids(&recovered.undelivered),
            [(2, "two".into()), (3, interrupted)]
        );
        assert_eq!(recovered.interrupted, [3]);
        assert_eq!(recovered.handled[2].1.outcome(), Outcome::Failed);
        assert_eq!(recovered.handled[2].1.epoch, 77);
        drop(spool);
        // Marked done once: a second restart does not count it again.
        let Opened { recovered, .. } = reopened();
        assert!(recovered.interrupted.is_empty());
        assert_eq!(recovered.undelivered.len(), 2);
    }

    /// An agent renamed starts a spool of its new name; the old one's
    /// results not yet delivered are found (and the start warns of them),
    /// unless an agent of that name holds it now.
    #[tokio::test]
    async fn another_names_spool_with_undelivered_results_is_found_unless_held() {
        let dir = tempfile::tempdir().unwrap();
        let old = AgentConfig {
            name: "old-name".into(),
            ..config(dir.path())
        };
        let Opened { spool, .. } = Spool::open(&old).unwrap();
        let (key, task) = task(1);
        spool.start(key, &task, 100).await.unwrap();
        spool.done(key, &ack(1, "ok")).await.unwrap();
        spool.flush().await;
        let ours = dir.path().join(file_name("new-name"));
        // Held by its running agent: passed over, at once.
        let started = std::time::Instant::now();
        assert!(others_undelivered(dir.path(), &ours).is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waited {:?} for a held spool",
            started.elapsed()
        );
        drop(spool);
        let found = || others_undelivered(dir.path(), &ours);
        for _ in 0..1000 {
            if !found().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(found(), [(dir.path().join(file_name("old-name")), 1)]);
        // Its own file is never counted.
        let own = dir.path().join(file_name("old-name"));
        assert!(others_undelivered(dir.path(), &own).is_empty());
    }

    #[tokio::test]
    async fn delivered_entries_beyond_remember_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let Opened { spool, .. } = Spool::open(&config(dir.path())).unwrap();
        for id in 1..=10 {
            let (key, task) = task(id);
            spool.start(key, &task, 100).await.unwrap();
            spool.done(key, &ack(id, "ok")).await.unwrap();
            spool.delivered(vec![key], 3).await;
        }
        spool.flush().await;
        drop(spool);
        let opened = reopen(&config(dir.path()));
        let kept: Vec<u64> = opened.recovered.handled.iter().map(|(k, _)| k.id).collect();
        assert_eq!(kept, [8, 9, 10]);
    }

    #[tokio::test]
    async fn at_its_bound_the_spool_prunes_delivered_entries_then_refuses_new_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.spool_max_size = ByteSize::mib(1);
        let Opened { spool, .. } = Spool::open(&config).unwrap();
        let big = "x".repeat(8 * 1024);
        // Delivered results filling the file: pruned to make room.
        let mut id = 0;
        for _ in 0..300 {
            id += 1;
            let (key, task) = task(id);
            spool.start(key, &task, 8 * 1024).await.unwrap();
            spool.done(key, &ack(id, &big)).await.unwrap();
            spool.delivered(vec![key], usize::MAX).await;
        }
        // Undelivered results: once nothing delivered is left, a new task
        // is refused instead of losing one of them.
        let mut refused = None;
        for _ in 0..300 {
            id += 1;
            let (key, task) = task(id);
            match spool.start(key, &task, 8 * 1024).await {
                Ok(None) => spool.done(key, &ack(id, &big)).await.unwrap(),
                Ok(Some(known)) => panic!("task {id} is new: {known:?}"),
                Err(e) => {
                    refused = Some((id, e));
                    break;
                }
            }
        }
        let (first_refused, error) = refused.expect("the bound is reached");
        assert!(matches!(error, SpoolError::Full(_)), "{error}");
        assert!(
            error.to_string().contains("agent.spool_max_size"),
            "{error}"
        );
        let size = std::fs::metadata(dir.path().join(file_name(&config.name)))
            .unwrap()
            .len();
        assert!(
            size <= 1024 * 1024,
            "the file stays within its bound: {size}"
        );
        spool.flush().await;
        drop(spool);
        let opened = reopen(&config);
        // Every undelivered result is still there.
        let undelivered: Vec<u64> = opened
            .recovered
            .undelivered
            .iter()
            .map(|(k, _)| k.id)
            .collect();
        assert_eq!(undelivered, (301..first_refused).collect::<Vec<_>>());
        assert!(opened.recovered.interrupted.is_empty());
    }

    /// What the spool costs per task (start, done, delivered), one task at
    /// a time and 16 at once, with each `spool_sync`. Run by hand:
    /// `cargo test --release --lib spool_cost -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, printed: run by hand"]
    async fn spool_cost() {
        for sync in [StoreSync::Normal, StoreSync::Full] {
            for parallel in [1u64, 16] {
                let dir = tempfile::tempdir().unwrap();
                let mut config = config(dir.path());
                config.spool_sync = sync;
                let Opened { spool, .. } = Spool::open(&config).unwrap();
                let tasks = 2000 / parallel * parallel;
                let started = std::time::Instant::now();
                let workers: Vec<_> = (0..parallel)
                    .map(|w| {
                        let spool = spool.clone();
                        tokio::spawn(async move {
                            for i in 0..2000 / parallel {
                                let id = w * 1_000_000 + i + 1;
                                let (key, task) = task(id);
                                spool.start(key, &task, 4096).await.unwrap();
                                spool.done(key, &ack(id, "ok")).await.unwrap();
                                spool.delivered(vec![key], 10_000).await;
                            }
                        })
                    })
                    .collect();
                for worker in workers {
                    worker.await.unwrap();
                }
                spool.flush().await;
                let per_task = started.elapsed() / u32::try_from(tasks).unwrap();
                println!("spool_sync={sync:?} parallel={parallel}: {per_task:?} per task");
            }
        }
    }

    #[tokio::test]
    async fn a_second_agent_of_the_same_name_is_refused_another_name_has_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Spool::open(&config(dir.path())).unwrap();
        let second = Spool::open(&config(dir.path())).unwrap_err();
        assert!(second.to_string().contains("another agent"), "{second}");
        // Another name, another file.
        let other = AgentConfig {
            name: "web/2 x".into(),
            ..config(dir.path())
        };
        let Opened { spool, .. } = Spool::open(&other).unwrap();
        assert_eq!(spool.path(), dir.path().join("agent-spool-web_2_x.db"));
    }

    #[tokio::test]
    async fn a_damaged_or_foreign_file_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(&config(dir.path()).name));
        let refused = |what: &str| {
            let before = std::fs::read(&path).unwrap();
            let error = Spool::open(&config(dir.path())).unwrap_err();
            assert!(
                matches!(error, SpoolError::Damaged { .. }),
                "{what}: {error}"
            );
            assert!(error.to_string().contains(&path.display().to_string()));
            assert_eq!(std::fs::read(&path).unwrap(), before, "{what}: unchanged");
            error.to_string()
        };
        std::fs::write(&path, b"").unwrap();
        assert!(refused("empty").contains("empty"));
        std::fs::write(&path, b"not a database at all, just some text".repeat(200)).unwrap();
        refused("garbage");
        // Another SQLite file (a server's store, say).
        std::fs::remove_file(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(refused("foreign").contains("application_id"));
        // A real spool, cut short (a copy that stopped halfway, a disk
        // that lost its tail).
        std::fs::remove_file(&path).unwrap();
        let Opened { spool, .. } = Spool::open(&config(dir.path())).unwrap();
        for id in 1..=200 {
            let (key, task) = task(id);
            spool.start(key, &task, 100).await.unwrap();
            spool.done(key, &ack(id, &"r".repeat(500))).await.unwrap();
        }
        spool.flush().await;
        drop(spool);
        drop(reopen(&config(dir.path())));
        // Once its thread has closed it (and folded the -wal in).
        for _ in 0..1000 {
            if !path.with_extension("db-wal").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let whole = std::fs::read(&path).unwrap();
        assert!(whole.len() > 64 * 1024, "{}", whole.len());
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        refused("truncated");
    }
}
