//! The SQLite backend: one database file in WAL mode, written by the store's
//! writer thread only; `contactd store backup` reads it at the same time.
//!
//! The schema is versioned with `PRAGMA user_version`: `MIGRATIONS`
//! brings a database from any earlier version to the latest, in one
//! transaction; a database from a newer contactd is refused, never changed.
//! A file that is not a contactd database is refused and left as it is.
//!
//! Start-up proves the file before the server serves from it: only a
//! missing file becomes a new store (an empty one is refused, not taken for
//! new); the file must pass `PRAGMA quick_check`, take a write and a
//! checkpoint, and its tasks must read back. Whatever fails is a
//! [`StoreError::Open`] naming the file and the way out. The files the store
//! creates are [`FILE_MODE`] whatever the umask, and `store.max_size` counts
//! the write-ahead log with the database.

mod batch;

use std::{
    fs::{File, Permissions},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};

use super::{
    AgentResult, Backend, JobRow, Op, Pruned, Retention, RunAgentRow, RunRecord, RunRow, Snapshot,
    StoreError, StoredTask, TaskRecord, Write, cursor_from_parts, cursor_parts,
};
use crate::{
    config::StoreSync,
    model::{RunAgentState, RunState, Saved, SavedAgent, Task, TaskState},
};

/// `PRAGMA application_id` of a contactd database ("ctd1").
const APPLICATION_ID: i32 = 0x6374_6431;

/// Schema migrations: `MIGRATIONS[n]` brings version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: tasks, per-agent results, broadcast cursors, counters.
    "CREATE TABLE meta (
         key TEXT PRIMARY KEY,
         value INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE tasks (
         id INTEGER PRIMARY KEY,
         text TEXT NOT NULL,
         target TEXT,
         created_ms INTEGER NOT NULL,
         state INTEGER NOT NULL DEFAULT 0,
         attempts INTEGER NOT NULL DEFAULT 0,
         holder TEXT,
         deadline_ms INTEGER,
         delivered INTEGER NOT NULL DEFAULT 0,
         acked INTEGER NOT NULL DEFAULT 0,
         failed INTEGER NOT NULL DEFAULT 0,
         last_agent TEXT,
         last_result TEXT
     );
     CREATE INDEX tasks_unfinished ON tasks (id) WHERE state < 2;
     CREATE INDEX tasks_finished ON tasks (id) WHERE state >= 2;
     CREATE TABLE results (
         task_id INTEGER NOT NULL,
         agent TEXT NOT NULL,
         ok INTEGER NOT NULL,
         text TEXT NOT NULL,
         at_ms INTEGER NOT NULL,
         PRIMARY KEY (task_id, agent)
     ) WITHOUT ROWID;
     CREATE TABLE cursors (
         agent TEXT PRIMARY KEY,
         watermark INTEGER NOT NULL,
         above BLOB NOT NULL,
         sent_up_to INTEGER NOT NULL,
         seen_ms INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 2: operator retries of a task (sent with it, so agents run it again);
    // the first task id each broadcast cursor was owed (for `task show`);
    // the agent roster.
    "ALTER TABLE tasks ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE cursors ADD COLUMN since INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE agents (
         name TEXT PRIMARY KEY,
         first_ms INTEGER NOT NULL,
         last_ms INTEGER NOT NULL,
         delivered INTEGER NOT NULL,
         acked INTEGER NOT NULL,
         failed INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 3: the label selector a broadcast task was submitted for.
    "ALTER TABLE tasks ADD COLUMN selector TEXT;",
    // 4: jobs, their runs (one per job and nominal time at most) and each
    // agent's state in a run; the job a task is the run of.
    "ALTER TABLE tasks ADD COLUMN job TEXT;
     ALTER TABLE tasks ADD COLUMN direct INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE jobs (
         name TEXT PRIMARY KEY,
         last_nominal_ms INTEGER NOT NULL,
         paused INTEGER NOT NULL DEFAULT 0,
         last_success_ms INTEGER NOT NULL DEFAULT 0
     ) WITHOUT ROWID;
     CREATE TABLE runs (
         task_id INTEGER PRIMARY KEY,
         job TEXT NOT NULL,
         nominal_ms INTEGER,
         mode TEXT NOT NULL,
         state INTEGER NOT NULL,
         target TEXT NOT NULL,
         targets INTEGER NOT NULL,
         batch INTEGER NOT NULL,
         max_failed INTEGER NOT NULL,
         wait_ms INTEGER NOT NULL,
         retries INTEGER NOT NULL,
         started_ms INTEGER NOT NULL,
         deadline_ms INTEGER NOT NULL,
         finished_ms INTEGER NOT NULL,
         acked INTEGER NOT NULL,
         failed INTEGER NOT NULL,
         missed INTEGER NOT NULL
     );
     CREATE UNIQUE INDEX runs_fired ON runs (job, nominal_ms);
     CREATE INDEX runs_unfinished ON runs (task_id) WHERE state < 2;
     CREATE TABLE run_agents (
         task_id INTEGER NOT NULL,
         agent TEXT NOT NULL,
         state INTEGER NOT NULL,
         tries INTEGER NOT NULL,
         at_ms INTEGER NOT NULL,
         PRIMARY KEY (task_id, agent)
     ) WITHOUT ROWID;",
];

/// The schema version this contactd writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Prepared statements the connection keeps: about 30 of its own
/// (writes, reads, housekeeping) and the multi-row ones of [`batch`]; rusqlite's
/// default of 16 would prepare some of the hot ones again and again.
const STATEMENT_CACHE: usize = 32 + batch::STATEMENTS;

/// Rows one housekeeping call deletes at most (a short transaction).
const PRUNE_BATCH: i64 = 2000;

/// Mode of every file the store creates: the database, its `-wal`, `-shm`
/// and `.lock` files (SQLite gives the side files the database's own mode)
/// and the copies `store backup` writes. Owner read-write, group read,
/// nothing for others, whatever the umask: the packaged unit runs as user
/// and group contactd (`UMask=0027`), and operators in group contactd, who
/// may read its logs and use its admin socket, may read its tasks too.
pub const FILE_MODE: u32 = 0o640;

/// The write-ahead log's bound without `store.max_size`: SQLite's own
/// checkpoint threshold (1000 pages of 4 KiB), now also the size the file
/// is truncated to (`journal_size_limit`), which SQLite leaves unbounded.
const WAL_LIMIT: u64 = 4 * 1024 * 1024;

/// The write-ahead log's share of `store.max_size` (the database gets the
/// rest): an eighth, at least 64 KiB (a few group commits between
/// checkpoints) and at most [`WAL_LIMIT`].
fn wal_budget(max_size: u64) -> u64 {
    (max_size / 8).clamp(64 * 1024, WAL_LIMIT)
}

/// An open contactd database.
pub struct Sqlite {
    conn: Connection,
    path: PathBuf,
    /// The `-wal` file, whose size is checked after each commit.
    wal_path: PathBuf,
    /// Beyond this size the write-ahead log is checkpointed and truncated
    /// after a commit: [`WAL_LIMIT`], or the log's share of `max_size`.
    wal_limit: u64,
    /// Held for as long as the database is open: one server per file.
    _lock: File,
    /// The runs the last apply did not fire (see [`Backend::refused_runs`]).
    refused: Vec<u64>,
}

fn open_error(path: &Path, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// What an operator does with a damaged or unreadable store.
const RESTORE: &str = "not opened, and left as it is: restore the latest copy made by \
                       `contactd store backup` (put it at this path, remove the -wal and -shm \
                       files next to it, then start contactd), or move this file and those \
                       two away to start with an empty store";

/// An error met while proving the file at start, as the operator reads it.
fn refused(path: &Path, e: &rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::ReadOnly | C::CannotOpen | C::PermissionDenied) => open_error(
            path,
            format!(
                "cannot be written ({e}): not opened. contactd's user must be able to write \
                 the file and create the -wal, -shm and .lock files next to it (check the \
                 file's and its directory's owner, mode and mount); its tasks can still be \
                 copied with `contactd store backup`"
            ),
        ),
        Some(C::NotADatabase) => open_error(path, format!("{e}: not opened (name another file)")),
        Some(C::DiskFull) => open_error(path, format!("{e}: not opened (free some space)")),
        _ => open_error(path, format!("is damaged ({e}): {RESTORE}")),
    }
}

/// A failure to read back what the store holds at start (a text that is
/// not UTF-8, a page that cannot be read): [`StoreError::Open`] naming the
/// file, so that the server stops with exit 78 and says what to do.
pub fn unreadable(path: &Path, e: StoreError) -> StoreError {
    match e {
        StoreError::Failed(detail) | StoreError::Full(detail) => {
            open_error(path, format!("cannot be read ({detail}): {RESTORE}"))
        }
        other => other,
    }
}

fn failed(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => StoreError::full(e.to_string(), e),
        _ => StoreError::failed(e.to_string(), e),
    }
}

fn id(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn count(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `path` with `suffix` appended (`-wal`, `.lock`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates `path`, which must not exist, with exactly [`FILE_MODE`].
fn create_private(path: &Path) -> std::io::Result<File> {
    let file = File::options()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    // The umask may have taken bits away from FILE_MODE: set it whole.
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Takes away what a file of the store (from an older contactd, or made by
/// hand) grants beyond [`FILE_MODE`]; never adds anything.
fn tighten(path: &Path) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & !FILE_MODE == 0 {
        return;
    }
    let tight = mode & FILE_MODE;
    match std::fs::set_permissions(path, Permissions::from_mode(tight)) {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            was = format!("{mode:04o}"),
            now = format!("{tight:04o}"),
            "task store file was readable beyond its owner and group: mode tightened"
        ),
        Err(e) => tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:04o}"),
            error = %e,
            "task store file is readable beyond its owner and group, and its mode cannot be changed"
        ),
    }
}

impl Sqlite {
    /// Opens the database at `path`, creating it only if no file is there.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the file cannot be made a contactd
    /// database of this version, or fails the start-up proof (empty,
    /// damaged, not writable); [`StoreError::Locked`] when another
    /// contactd has it open.
    pub fn open(path: &Path, sync: StoreSync) -> Result<Sqlite, StoreError> {
        let lock_path = beside(path, ".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(|e| {
                open_error(
                    path,
                    format!(
                        "cannot create {}: {e} (contactd's user must be able to create files \
                         in the store's directory)",
                        lock_path.display()
                    ),
                )
            })?;
        if let Err(e) = lock.try_lock() {
            return Err(StoreError::Locked {
                path: path.to_owned(),
                reason: format!("another contactd is using this database ({e})"),
            });
        }
        tighten(&lock_path);
        let new = Sqlite::create_if_missing(path)?;
        match Sqlite::open_file(path, sync, lock, new) {
            Err(e) if new => {
                // Not left as an empty file, which the next start would
                // refuse as a store whose tasks were lost.
                for file in [beside(path, "-wal"), beside(path, "-shm"), path.to_owned()] {
                    let _ = std::fs::remove_file(file);
                }
                Err(e)
            }
            Ok(db) => {
                // Only once the file proved to be a contactd store: a file
                // refused is left exactly as it is.
                for file in [path.to_owned(), beside(path, "-wal"), beside(path, "-shm")] {
                    tighten(&file);
                }
                Ok(db)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the database file when none is there (then `true`). An
    /// existing empty file is refused: SQLite would take it for a new
    /// database, and a store truncated by accident (a full disk, a botched
    /// copy) would silently start over at task id 1.
    fn create_if_missing(path: &Path) -> Result<bool, StoreError> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => Err(open_error(path, "is a directory: name a file")),
            Ok(meta) if meta.len() == 0 => Err(open_error(
                path,
                "is an empty file (0 bytes), not a contactd database: not opened, and left as \
                 it is (a new store is created only where no file exists, so that a store \
                 emptied by accident is not taken for a new one). Restore the latest copy made \
                 by `contactd store backup` to this path, or, to start afresh with no tasks, \
                 move or delete this file and the -wal and -shm files next to it",
            )),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // SQLite would replay another database's log into the new
                // file (its frames are checked against the log, not the
                // database).
                let wal = beside(path, "-wal");
                if wal.exists() {
                    return Err(open_error(
                        path,
                        format!(
                            "is missing, but {} is there (the write-ahead log of a database \
                             that was at this path): not created. Put that database back, or \
                             move the -wal and -shm files away to start with an empty store",
                            wal.display()
                        ),
                    ));
                }
                create_private(path)
                    .map_err(|e| open_error(path, format!("cannot create the file: {e}")))?;
                Ok(true)
            }
            Err(e) => Err(open_error(path, e)),
        }
    }

    fn open_file(
        path: &Path,
        sync: StoreSync,
        lock: File,
        new: bool,
    ) -> Result<Sqlite, StoreError> {
        // No SQLITE_OPEN_CREATE: the file exists by now, and SQLite would
        // create a missing one with the umask's mode.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| refused(path, &e))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // SQLite opens a file it may not write read-only without a word;
        // every write would then fail, long after the server said it serves.
        if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
            return Err(refused(
                path,
                &rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
                    Some("the file is read-only for contactd's user".into()),
                ),
            ));
        }
        let mut db = Sqlite {
            conn,
            path: path.to_owned(),
            wal_path: beside(path, "-wal"),
            wal_limit: WAL_LIMIT,
            _lock: lock,
            refused: Vec::new(),
        };
        db.prepare(sync, new)?;
        Ok(db)
    }

    fn prepare(&mut self, sync: StoreSync, new: bool) -> Result<(), StoreError> {
        let path = self.path.clone();
        let bad = |e: rusqlite::Error| refused(&path, &e);
        // Reading the header first: a file that is not a database fails
        // here, before anything is written to it.
        let (application_id, version): (i32, i64) = self
            .conn
            .query_row(
                "SELECT (SELECT application_id FROM pragma_application_id), \
                        (SELECT user_version FROM pragma_user_version)",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(bad)?;
        let tables: i64 = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
            .map_err(bad)?;
        if application_id != APPLICATION_ID && (application_id != 0 || tables > 0) {
            return Err(open_error(
                &path,
                "is an SQLite database of another program: not opened (name another file)",
            ));
        }
        if !new && tables == 0 {
            return Err(open_error(
                &path,
                format!(
                    "holds no tables: it is not a contactd database (a store whose tasks were lost?); {RESTORE}"
                ),
            ));
        }
        if version > SCHEMA_VERSION {
            return Err(open_error(
                &path,
                format!(
                    "was written by a newer contactd (schema {version}; this one knows up to \
                     {SCHEMA_VERSION}): not opened, run that version or a newer one"
                ),
            ));
        }
        self.quick_check()?;
        self.conn
            .busy_timeout(Duration::from_secs(5))
            .map_err(bad)?;
        // WAL: readers (a backup) never block the writer. Incremental auto
        // vacuum must be set before the first table exists.
        if tables == 0 {
            self.conn
                .pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(bad)?;
        }
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(bad)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_error(
                &path,
                format!("cannot use WAL mode (got {mode})"),
            ));
        }
        let synchronous = match sync {
            StoreSync::Full => "FULL",
            StoreSync::Normal => "NORMAL",
        };
        self.conn
            .pragma_update(None, "synchronous", synchronous)
            .map_err(bad)?;
        // Statement journals (see `batch`) and temporary tables in memory,
        // not in files of their own.
        self.conn
            .pragma_update(None, "temp_store", "MEMORY")
            .map_err(bad)?;
        self.bound_wal(WAL_LIMIT).map_err(bad)?;
        self.migrate(version).map_err(bad)?;
        self.prove_writable()
    }

    /// `PRAGMA quick_check`: every page of every table and index is read and
    /// its structure checked (`integrity_check` would also match indexes to
    /// their tables). Cheap enough for every start, so not bounded: measured
    /// on 100,000 tasks, each with a result (26.6 MB, the size the default
    /// `tasks.retain_finished` keeps), 55-67 ms with the file cached (debug
    /// build; 30 ms for an optimised SQLite) and 580 ms read from a cold
    /// disk cache. It grows with the file (about 2.5 ms per MB cached):
    /// seconds for a store of a few GB, which `store.max_size` bounds.
    fn quick_check(&self) -> Result<(), StoreError> {
        let found: Vec<String> = self
            .conn
            .prepare("PRAGMA quick_check(5)")
            .and_then(|mut s| s.query_map([], |row| row.get(0))?.collect())
            .map_err(|e| refused(&self.path, &e))?;
        if found.len() == 1 && found[0] == "ok" {
            return Ok(());
        }
        Err(open_error(
            &self.path,
            format!("is damaged (quick_check: {}): {RESTORE}", found.join("; ")),
        ))
    }

    /// A write and a checkpoint at start, so that a file or directory
    /// contactd may not write stops the start (exit 78) rather than every
    /// submit later; the checkpoint also leaves a new database whole in its
    /// main file.
    fn prove_writable(&mut self) -> Result<(), StoreError> {
        let bad = |e: rusqlite::Error| refused(&self.path, &e);
        // A real write to the log (SQLite writes a row an UPDATE sets to
        // its own value), committed.
        self.conn
            .execute("UPDATE meta SET value = value WHERE key = 'next_id'", [])
            .map_err(bad)?;
        self.checkpoint().map_err(bad)
    }

    /// Copies the write-ahead log into the database and truncates it.
    fn checkpoint(&self) -> rusqlite::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }

    /// Bounds the write-ahead log to about `bytes`: checkpointed by SQLite
    /// once it holds that much, cut back to it when it is reset
    /// (`journal_size_limit`: SQLite otherwise keeps the file at its
    /// largest), and checkpointed and truncated by [`Sqlite::after_commit`]
    /// when a large commit or a reader took it beyond.
    fn bound_wal(&mut self, bytes: u64) -> rusqlite::Result<()> {
        let page_size: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |row| row.get(0))?;
        // A frame is a page and a 24-byte header.
        let frames = i64::try_from(bytes).unwrap_or(i64::MAX) / (page_size.max(1) + 24);
        self.conn.query_row(
            &format!("PRAGMA wal_autocheckpoint = {}", frames.max(1)),
            [],
            |_| Ok(()),
        )?;
        self.conn
            .query_row(&format!("PRAGMA journal_size_limit = {bytes}"), [], |_| {
                Ok(())
            })?;
        self.wal_limit = bytes;
        Ok(())
    }

    /// After a commit: a write-ahead log beyond its bound is checkpointed
    /// and truncated, so that `store.max_size` holds for the database and
    /// its log together between commits. A failure is only logged: the
    /// commit itself holds, and the next one tries again.
    fn after_commit(&self) {
        let size = std::fs::metadata(&self.wal_path).map_or(0, |m| m.len());
        if size <= self.wal_limit {
            return;
        }
        if let Err(e) = self.checkpoint() {
            tracing::warn!(
                path = %self.path.display(),
                wal_bytes = size,
                error = %e,
                "task store: the write-ahead log cannot be checkpointed"
            );
        }
    }

    fn migrate(&mut self, from: i64) -> rusqlite::Result<()> {
        if from == SCHEMA_VERSION {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for (version, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            tx.execute_batch(sql)?;
            tracing::info!(
                path = %self.path.display(),
                version = version + 1,
                "task store schema migrated"
            );
        }
        if from == 0 {
            let epoch = super::new_epoch();
            // Stored as the i64 of the same bits.
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?1), ('next_id', 1)",
                [super::epoch_column(epoch)],
            )?;
            tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()
    }

    /// Limits the database and its write-ahead log together to about
    /// `bytes` (`store.max_size`): the log gets [`wal_budget`] of it and is
    /// checkpointed and truncated beyond; the database gets the rest, and
    /// beyond, writes fail as on a full disk ([`StoreError::Full`]). Between
    /// commits the two files stay within `bytes`; during one, the log may
    /// hold that commit's pages on top (the `-shm` index, 32 KiB, is not
    /// counted).
    ///
    /// # Errors
    /// The limit cannot be set.
    pub fn set_max_size(&mut self, bytes: u64) -> Result<(), StoreError> {
        let wal = wal_budget(bytes);
        self.bound_wal(wal).map_err(|e| open_error(&self.path, e))?;
        let page_size: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .map_err(|e| open_error(&self.path, e))?;
        let pages = i64::try_from(bytes.saturating_sub(wal)).unwrap_or(i64::MAX) / page_size.max(1);
        // SQLite never sets the limit below the pages already in use.
        self.conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .map_err(|e| open_error(&self.path, e))
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT user_version FROM pragma_user_version", [], |row| {
                row.get(0)
            })
            .map_err(failed)
    }
}

fn meta(tx: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
        row.get(0)
    })
    .optional()
}

const TASK_COLUMNS: &str = "id, text, target, created_ms, state, attempts, holder, deadline_ms, \
                            delivered, acked, failed, last_agent, last_result, retries, selector, \
                            job, direct";

fn stored_task(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredTask> {
    let holder: Option<String> = row.get(6)?;
    let deadline: Option<i64> = row.get(7)?;
    let last_agent: Option<String> = row.get(11)?;
    let last_result: Option<String> = row.get(12)?;
    Ok(StoredTask {
        id: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
        text: row.get(1)?,
        target: row.get::<_, Option<String>>(2)?.map(Arc::from),
        created_ms: row.get(3)?,
        state: TaskState::from_u8(u8::try_from(row.get::<_, i64>(4)?).unwrap_or(0)),
        attempts: count(row.get(5)?),
        claim: holder.zip(deadline).map(|(h, d)| (Arc::from(h), d)),
        delivered: count(row.get(8)?),
        acked: count(row.get(9)?),
        failed: count(row.get(10)?),
        last_result: last_agent.map(|a| (Arc::from(a), last_result.unwrap_or_default())),
        retries: count(row.get(13)?),
        selector: row.get(14)?,
        job: row.get(15)?,
        direct: row.get(16)?,
    })
}

const RUN_COLUMNS: &str = "task_id, job, nominal_ms, mode, state, target, targets, batch, \
                           max_failed, wait_ms, retries, started_ms, deadline_ms, finished_ms, \
                           acked, failed, missed";

fn run_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let n = |i| row.get::<_, i64>(i).map(count);
    Ok(RunRow {
        task_id: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
        job: Arc::from(row.get::<_, String>(1)?),
        nominal_ms: row.get(2)?,
        mode: Arc::from(row.get::<_, String>(3)?),
        state: RunState::from_u8(u8::try_from(row.get::<_, i64>(4)?).unwrap_or(0)),
        target: Arc::from(row.get::<_, String>(5)?),
        targets: n(6)?,
        batch: n(7)?,
        max_failed: n(8)?,
        wait_ms: row.get(9)?,
        retries: n(10)?,
        started_ms: row.get(11)?,
        deadline_ms: row.get(12)?,
        finished_ms: row.get(13)?,
        acked: n(14)?,
        failed: n(15)?,
        missed: n(16)?,
    })
}

fn run_agent_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunAgentRow> {
    Ok(RunAgentRow {
        task_id: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
        agent: Arc::from(row.get::<_, String>(1)?),
        state: RunAgentState::from_u8(u8::try_from(row.get::<_, i64>(2)?).unwrap_or(0)),
        tries: count(row.get(3)?),
        at_ms: row.get(4)?,
    })
}

fn job_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        name: Arc::from(row.get::<_, String>(0)?),
        last_nominal_ms: row.get(1)?,
        paused: row.get(2)?,
        last_success_ms: row.get(3)?,
    })
}

fn read_jobs(conn: &Connection) -> rusqlite::Result<Vec<JobRow>> {
    conn.prepare_cached("SELECT name, last_nominal_ms, paused, last_success_ms FROM jobs")?
        .query_map([], job_row)?
        .collect()
}

fn read_run(conn: &Connection, task: u64) -> rusqlite::Result<Option<RunRecord>> {
    let Some(run) = conn
        .prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE task_id = ?1"
        ))?
        .query_row([id(task)], run_row)
        .optional()?
    else {
        return Ok(None);
    };
    let agents = conn
        .prepare_cached(
            "SELECT task_id, agent, state, tries, at_ms FROM run_agents WHERE task_id = ?1 \
             ORDER BY agent",
        )?
        .query_map([id(task)], run_agent_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some(RunRecord { run, agents }))
}

impl Backend for Sqlite {
    fn load(&mut self, ring: usize, queue_mode: bool) -> Result<Snapshot, StoreError> {
        let conn = &self.conn;
        let epoch = meta(conn, "epoch").map_err(failed)?.unwrap_or(1);
        let stored_next = meta(conn, "next_id").map_err(failed)?.unwrap_or(1);
        let max_id: i64 = conn
            .query_row("SELECT coalesce(max(id), 0) FROM tasks", [], |row| {
                row.get(0)
            })
            .map_err(failed)?;
        let next_id = u64::try_from(stored_next.max(max_id + 1)).unwrap_or(1);
        let first = id(next_id.saturating_sub(ring as u64));
        let mut tasks: Vec<StoredTask> = conn
            .prepare(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE id >= ?1 ORDER BY id"
            ))
            .and_then(|mut s| s.query_map([first], stored_task)?.collect())
            .map_err(failed)?;
        if queue_mode {
            let unfinished: Vec<StoredTask> = conn
                .prepare(&format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE state < 2 AND id < ?1 ORDER BY id"
                ))
                .and_then(|mut s| s.query_map([first], stored_task)?.collect())
                .map_err(failed)?;
            tasks.splice(0..0, unfinished);
        }
        // The tasks of unfinished runs, however old: their runs resume.
        let run_tasks: Vec<StoredTask> = conn
            .prepare(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE id < ?1 AND id IN \
                 (SELECT task_id FROM runs WHERE state < 2) ORDER BY id"
            ))
            .and_then(|mut s| s.query_map([first], stored_task)?.collect())
            .map_err(failed)?;
        for task in run_tasks {
            if let Err(at) = tasks.binary_search_by_key(&task.id, |t| t.id) {
                tasks.insert(at, task);
            }
        }
        let jobs = read_jobs(conn).map_err(failed)?;
        let unfinished: Vec<i64> = conn
            .prepare("SELECT task_id FROM runs WHERE state < 2 ORDER BY task_id")
            .and_then(|mut s| s.query_map([], |row| row.get(0))?.collect())
            .map_err(failed)?;
        let runs = unfinished
            .into_iter()
            .filter_map(|task| read_run(conn, u64::try_from(task).unwrap_or(0)).transpose())
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(failed)?;
        let cursors = conn
            .prepare("SELECT agent, watermark, above, sent_up_to, seen_ms, since FROM cursors")
            .and_then(|mut s| {
                s.query_map([], |row| {
                    let agent: String = row.get(0)?;
                    let watermark: i64 = row.get(1)?;
                    let above: Vec<u8> = row.get(2)?;
                    let sent_up_to: i64 = row.get(3)?;
                    Ok(Saved {
                        agent: Arc::from(agent),
                        cursor: cursor_from_parts(u64::try_from(watermark).unwrap_or(0), &above),
                        since: u64::try_from(row.get::<_, i64>(5)?).unwrap_or(0),
                        sent_up_to: u64::try_from(sent_up_to).unwrap_or(0),
                        seen_ms: row.get(4)?,
                    })
                })?
                .collect()
            })
            .map_err(failed)?;
        let agents = conn
            .prepare(
                "SELECT name, first_ms, last_ms, delivered, acked, failed FROM agents \
                 ORDER BY last_ms DESC",
            )
            .and_then(|mut s| {
                s.query_map([], |row| {
                    let n = |i| row.get::<_, i64>(i).map(|n| u64::try_from(n).unwrap_or(0));
                    Ok(SavedAgent {
                        name: Arc::from(row.get::<_, String>(0)?),
                        first_ms: row.get(1)?,
                        last_ms: row.get(2)?,
                        delivered: n(3)?,
                        acked: n(4)?,
                        failed: n(5)?,
                    })
                })?
                .collect()
            })
            .map_err(failed)?;
        Ok(Snapshot {
            epoch: super::epoch_from_column(epoch),
            next_id,
            tasks,
            cursors,
            agents,
            jobs,
            runs,
        })
    }

    fn apply(&mut self, ops: &[Op<'_>]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(failed)?;
        self.refused.clear();
        apply(&tx, ops, &mut self.refused).map_err(failed)?;
        tx.commit().map_err(failed)?;
        self.after_commit();
        Ok(())
    }

    fn prune(&mut self, retention: &Retention) -> Result<Pruned, StoreError> {
        let tx = self.conn.transaction().map_err(failed)?;
        let pruned = prune(&tx, retention).map_err(failed)?;
        tx.commit().map_err(failed)?;
        if pruned.tasks > 0 {
            // Gives the freed pages back to the file system.
            self.conn
                .execute_batch("PRAGMA incremental_vacuum")
                .map_err(failed)?;
        }
        self.after_commit();
        Ok(pruned)
    }

    fn refused_runs(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.refused)
    }

    fn jobs(&mut self) -> Result<Vec<JobRow>, StoreError> {
        read_jobs(&self.conn).map_err(failed)
    }

    fn runs(&mut self, job: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.conn
            .prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE ?1 IS NULL OR job = ?1 \
                 ORDER BY task_id DESC LIMIT ?2"
            ))
            .and_then(|mut s| s.query_map(params![job, limit], run_row)?.collect())
            .map_err(failed)
    }

    fn run(&mut self, task: u64) -> Result<Option<RunRecord>, StoreError> {
        read_run(&self.conn, task).map_err(failed)
    }

    fn task(&mut self, task: u64) -> Result<Option<TaskRecord>, StoreError> {
        let Some(stored) = self
            .conn
            .prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id(task)], stored_task).optional())
            .map_err(failed)?
        else {
            return Ok(None);
        };
        let results = self
            .conn
            .prepare_cached(
                "SELECT agent, ok, text, at_ms FROM results WHERE task_id = ?1 ORDER BY agent",
            )
            .and_then(|mut s| {
                s.query_map([id(task)], |row| {
                    Ok(AgentResult {
                        agent: Arc::from(row.get::<_, String>(0)?),
                        ok: row.get(1)?,
                        text: row.get(2)?,
                        at_ms: row.get(3)?,
                    })
                })?
                .collect()
            })
            .map_err(failed)?;
        Ok(Some(TaskRecord {
            task: stored,
            results,
        }))
    }
}

fn insert_task(tx: &Transaction<'_>, task: &Task) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO tasks (id, text, target, created_ms, selector, job, direct) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        id(task.id),
        task.text,
        task.target.as_deref(),
        crate::clock::unix_ms(task.created),
        task.selector.as_ref().map(ToString::to_string),
        task.job.as_deref(),
        task.direct,
    ])?;
    Ok(())
}

/// Applies `ops` in `tx`: new tasks, claims and acks gathered into
/// multi-row statements ([`batch`]), every other change in its place.
fn apply(tx: &Transaction<'_>, ops: &[Op<'_>], refused: &mut Vec<u64>) -> rusqlite::Result<()> {
    let mut next_id = 0;
    let mut batches = batch::Batches::default();
    for op in ops {
        match op {
            Op::Publish(tasks) => {
                for task in *tasks {
                    batches.task(tx, task)?;
                    next_id = next_id.max(task.id + 1);
                }
            }
            Op::Write(Write::Claimed {
                id: task,
                attempt,
                holder,
                deadline_ms,
            }) => batches.claim(tx, *task, *attempt, holder, *deadline_ms)?,
            Op::Write(Write::Acked {
                id: task,
                agent,
                ok,
                text,
                at_ms,
                ..
            }) => batches.ack(tx, *task, agent, *ok, text, *at_ms)?,
            Op::Fire(tasks, runs) => {
                batches.flush(tx)?;
                for (task, run) in tasks.iter().zip(*runs) {
                    next_id = next_id.max(task.id + 1);
                    if let Some(nominal) = run.nominal_ms {
                        job_fired(tx, &run.job, nominal)?;
                    }
                    if insert_run(tx, run)? {
                        insert_task(tx, task)?;
                    } else {
                        refused.push(task.id);
                    }
                }
            }
            Op::Write(write) => {
                batches.flush(tx)?;
                apply_write(tx, write)?;
            }
        }
    }
    batches.flush(tx)?;
    if next_id > 0 {
        tx.prepare_cached("UPDATE meta SET value = max(value, ?1) WHERE key = 'next_id'")?
            .execute([id(next_id)])?;
    }
    Ok(())
}

/// Moves the job's last nominal time to `nominal` if later.
fn job_fired(tx: &Transaction<'_>, job: &str, nominal: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO jobs (name, last_nominal_ms) VALUES (?1, ?2) \
         ON CONFLICT (name) DO UPDATE SET \
         last_nominal_ms = max(last_nominal_ms, excluded.last_nominal_ms)",
    )?
    .execute(params![job, nominal])?;
    Ok(())
}

/// Inserts a new run; `false` when its job has a run for its nominal
/// time already.
fn insert_run(tx: &Transaction<'_>, run: &RunRow) -> rusqlite::Result<bool> {
    let inserted = tx
        .prepare_cached(&format!(
            "INSERT INTO runs ({RUN_COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
             ON CONFLICT (job, nominal_ms) DO NOTHING"
        ))?
        .execute(params![
            id(run.task_id),
            &*run.job,
            run.nominal_ms,
            &*run.mode,
            run.state as u8,
            &*run.target,
            run.targets,
            run.batch,
            run.max_failed,
            run.wait_ms,
            run.retries,
            run.started_ms,
            run.deadline_ms,
            run.finished_ms,
            run.acked,
            run.failed,
            run.missed,
        ])?;
    Ok(inserted == 1)
}

fn apply_write(tx: &Transaction<'_>, write: &Write) -> rusqlite::Result<()> {
    match write {
        Write::Job {
            name,
            last_nominal_ms,
            paused,
            last_success_ms,
        } => {
            tx.prepare_cached(
                "INSERT INTO jobs (name, last_nominal_ms, paused, last_success_ms) \
                 VALUES (?1, coalesce(?2, 0), coalesce(?3, 0), coalesce(?4, 0)) \
                 ON CONFLICT (name) DO UPDATE SET \
                 last_nominal_ms = max(last_nominal_ms, coalesce(?2, last_nominal_ms)), \
                 paused = coalesce(?3, paused), \
                 last_success_ms = max(last_success_ms, coalesce(?4, 0))",
            )?
            .execute(params![&**name, last_nominal_ms, paused, last_success_ms])?;
        }
        Write::Run(run) => {
            tx.prepare_cached(
                "UPDATE runs SET state = ?2, finished_ms = ?3, acked = ?4, failed = ?5, \
                 missed = ?6, deadline_ms = ?7 WHERE task_id = ?1",
            )?
            .execute(params![
                id(run.task_id),
                run.state as u8,
                run.finished_ms,
                run.acked,
                run.failed,
                run.missed,
                run.deadline_ms
            ])?;
        }
        Write::RunAgent(agent) => {
            tx.prepare_cached(
                "INSERT INTO run_agents (task_id, agent, state, tries, at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (task_id, agent) DO UPDATE SET \
                 state = excluded.state, tries = excluded.tries, at_ms = excluded.at_ms",
            )?
            .execute(params![
                id(agent.task_id),
                &*agent.agent,
                agent.state as u8,
                agent.tries,
                agent.at_ms
            ])?;
        }
        // One server per SQLite file: its own registry is the fleet view.
        // Several servers only (PostgreSQL).
        Write::Presence { .. } | Write::Relayed { .. } => {}
        Write::Delivered { ids } => {
            let mut update = tx.prepare_cached(
                "UPDATE tasks SET delivered = delivered + 1, \
                 state = CASE WHEN state = 0 THEN 1 ELSE state END WHERE id = ?1",
            )?;
            for task in ids {
                update.execute([id(*task)])?;
            }
        }
        // Gathered by `apply`; one alone is a batch of one.
        Write::Claimed {
            id: task,
            attempt,
            holder,
            deadline_ms,
        } => {
            let mut one = batch::Batches::default();
            one.claim(tx, *task, *attempt, holder, *deadline_ms)?;
            one.flush(tx)?;
        }
        Write::State {
            id: task, state, ..
        } => {
            tx.prepare_cached(
                "UPDATE tasks SET state = ?2, holder = NULL, deadline_ms = NULL WHERE id = ?1",
            )?
            .execute(params![id(*task), *state as u8])?;
        }
        Write::Cancelled { id: task, held } => {
            tx.prepare_cached(
                "UPDATE tasks SET state = ?2, \
                 holder = CASE WHEN ?3 THEN holder END, \
                 deadline_ms = CASE WHEN ?3 THEN deadline_ms END WHERE id = ?1",
            )?
            .execute(params![id(*task), TaskState::Cancelled as u8, held])?;
        }
        Write::Retried { id: task } => {
            tx.prepare_cached(
                "UPDATE tasks SET state = ?2, attempts = 0, holder = NULL, deadline_ms = NULL, \
                 retries = retries + 1 WHERE id = ?1",
            )?
            .execute(params![id(*task), TaskState::Pending as u8])?;
        }
        Write::Acked {
            id: task,
            agent,
            ok,
            text,
            at_ms,
            ..
        } => {
            let mut one = batch::Batches::default();
            one.ack(tx, *task, agent, *ok, text, *at_ms)?;
            one.flush(tx)?;
        }
        Write::Cursor(saved) => {
            let (watermark, above) = cursor_parts(&saved.cursor);
            tx.prepare_cached(
                "INSERT INTO cursors (agent, watermark, above, sent_up_to, seen_ms, since) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (agent) DO UPDATE SET watermark = excluded.watermark, \
                 above = excluded.above, sent_up_to = excluded.sent_up_to, \
                 seen_ms = excluded.seen_ms, since = excluded.since",
            )?
            .execute(params![
                &*saved.agent,
                id(watermark),
                above,
                id(saved.sent_up_to),
                saved.seen_ms,
                id(saved.since)
            ])?;
        }
        Write::Agent(agent) => {
            tx.prepare_cached(
                "INSERT INTO agents (name, first_ms, last_ms, delivered, acked, failed) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (name) DO UPDATE SET first_ms = min(first_ms, excluded.first_ms), \
                 last_ms = max(last_ms, excluded.last_ms), delivered = excluded.delivered, \
                 acked = excluded.acked, failed = excluded.failed",
            )?
            .execute(params![
                &*agent.name,
                agent.first_ms,
                agent.last_ms,
                id(agent.delivered),
                id(agent.acked),
                id(agent.failed)
            ])?;
        }
    }
    Ok(())
}

fn prune(tx: &Transaction<'_>, r: &Retention) -> rusqlite::Result<Pruned> {
    // Broadcast mode: every task is delivered from the ring only, so every
    // task counts as finished here.
    let finished = if r.queue_mode {
        "state >= 2 AND id NOT IN (SELECT task_id FROM runs WHERE state < 2)"
    } else {
        "id NOT IN (SELECT task_id FROM runs WHERE state < 2)"
    };
    let mut ids: Vec<i64> = tx
        .prepare(&format!(
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE {finished} \
             AND created_ms < ?1 ORDER BY id LIMIT ?2) RETURNING id"
        ))?
        .query_map(params![r.created_before_ms, PRUNE_BATCH], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let kept: i64 = tx.query_row(
        &format!("SELECT count(*) FROM tasks WHERE {finished}"),
        [],
        |row| row.get(0),
    )?;
    let excess = (kept - i64::try_from(r.retain_finished).unwrap_or(i64::MAX))
        .clamp(0, PRUNE_BATCH - ids.len() as i64);
    if excess > 0 {
        let more: Vec<i64> = tx
            .prepare(&format!(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE {finished} \
                 ORDER BY id LIMIT ?1) RETURNING id"
            ))?
            .query_map([excess], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids.extend(more);
    }
    let mut results = tx.prepare_cached("DELETE FROM results WHERE task_id = ?1")?;
    let mut runs = tx.prepare_cached("DELETE FROM runs WHERE task_id = ?1")?;
    let mut run_agents = tx.prepare_cached("DELETE FROM run_agents WHERE task_id = ?1")?;
    for task in &ids {
        results.execute([task])?;
        runs.execute([task])?;
        run_agents.execute([task])?;
    }
    let cursors = tx.execute(
        "DELETE FROM cursors WHERE seen_ms < ?1",
        [r.forget_before_ms],
    )?;
    let agents = tx.execute(
        "DELETE FROM agents WHERE last_ms < ?1",
        [r.forget_before_ms],
    )?;
    Ok(Pruned {
        tasks: ids.len() as u64,
        cursors: cursors as u64,
        agents: agents as u64,
    })
}

/// Copies the database at `path` to `to` while a server may be writing it
/// (SQLite's online backup: a consistent snapshot). The copy is created
/// with [`FILE_MODE`], whatever the umask: it holds every task.
///
/// # Errors
/// The database cannot be read or the copy cannot be written.
pub fn backup(path: &Path, to: &Path) -> Result<(), StoreError> {
    let exists = || {
        StoreError::Failed(
            format!(
                "{} exists: not overwritten (remove it, or name another file)",
                to.display()
            )
            .into(),
        )
    };
    if to.exists() {
        return Err(exists());
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_error(path, e))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(failed)?;
    let application_id: i32 = conn
        .query_row(
            "SELECT application_id FROM pragma_application_id",
            [],
            |row| row.get(0),
        )
        .map_err(|e| open_error(path, e))?;
    if application_id != APPLICATION_ID {
        return Err(open_error(path, "is not a contactd database"));
    }
    // Created here, not by SQLite (which would use the umask's mode); an
    // empty file is what SQLite's backup writes into.
    create_private(to).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => exists(),
        _ => StoreError::failed(format!("backup to {}: {e}", to.display()), e),
    })?;
    if let Err(e) = conn.backup(
        rusqlite::MAIN_DB,
        to,
        None::<fn(rusqlite::backup::Progress)>,
    ) {
        // Not left half-written, or empty (a store no start accepts).
        let _ = std::fs::remove_file(to);
        return Err(StoreError::failed(
            format!("backup to {}: {e}", to.display()),
            e,
        ));
    }
    tracing::debug!(from = %path.display(), to = %to.display(), at_ms = crate::clock::now_ms(), "store backed up");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::model::{AckCursor, Task};

    fn task(id: u64, text: &str) -> Arc<Task> {
        Arc::new(Task::new(id, text.into(), SystemTime::now(), None))
    }

    #[test]
    fn tasks_acks_claims_and_cursors_outlive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let epoch = {
            let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
            let snapshot = db.load(10, true).unwrap();
            assert_eq!(snapshot.next_id, 1);
            let tasks = [task(1, "a"), task(2, "b"), task(3, "c")];
            let acked = Write::Acked {
                id: 1,
                agent: "web1".into(),
                ok: true,
                text: "done".into(),
                at_ms: 5,
                claimed: false,
            };
            let claimed = Write::Claimed {
                id: 2,
                attempt: 1,
                holder: "web2".into(),
                deadline_ms: 99,
            };
            let cursor = Write::Cursor(Saved {
                agent: "web1".into(),
                cursor: AckCursor::from_parts(1, [3, 5]),
                since: 1,
                sent_up_to: 6,
                seen_ms: 7,
            });
            db.apply(&[
                Op::Publish(&tasks),
                Op::Write(&acked),
                Op::Write(&claimed),
                Op::Write(&cursor),
            ])
            .unwrap();
            snapshot.epoch
        };
        let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
        let snapshot = db.load(10, true).unwrap();
        assert_eq!((snapshot.epoch, snapshot.next_id), (epoch, 4));
        let states: Vec<_> = snapshot.tasks.iter().map(|t| (t.id, t.state)).collect();
        assert_eq!(
            states,
            [
                (1, TaskState::Acked),
                (2, TaskState::Delivered),
                (3, TaskState::Pending)
            ]
        );
        assert_eq!(snapshot.tasks[1].claim, Some(("web2".into(), 99)));
        assert_eq!(
            snapshot.tasks[0].last_result,
            Some(("web1".into(), "done".into()))
        );
        let saved = &snapshot.cursors[0];
        assert_eq!(
            (
                &*saved.agent,
                saved.cursor.watermark(),
                saved.sent_up_to,
                saved.seen_ms
            ),
            ("web1", 1, 6, 7)
        );
        let cursor = &saved.cursor;
        assert!(cursor.is_acked(3) && cursor.is_acked(5) && !cursor.is_acked(4));
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
    }

    /// New tasks, claims and acks are gathered into statements of many rows
    /// (reordered among different tasks); a group commit must leave what
    /// its changes applied one at a time leave, even with several changes
    /// of one task in it.
    #[test]
    fn a_group_gathered_into_multi_row_statements_leaves_what_its_changes_one_by_one_leave() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let mut db = Sqlite::open(&dir.path().join(name), StoreSync::Normal).unwrap();
            db.load(10, true).unwrap();
            db
        };
        let count = 2 * batch::ROWS as u64 + 13;
        let tasks: Vec<Arc<Task>> = (1..=count).map(|id| task(id, &format!("t{id}"))).collect();
        let claim = |id, attempt, holder: &str| Write::Claimed {
            id,
            attempt,
            holder: holder.into(),
            deadline_ms: 1000 + i64::try_from(id).unwrap(),
        };
        let ack = |id, agent: &str, ok| Write::Acked {
            id,
            agent: agent.into(),
            ok,
            text: format!("{agent} on {id}"),
            at_ms: 7,
            claimed: true,
        };
        let mut writes = Vec::new();
        for id in 1..=count {
            writes.push(claim(id, 1, "web1"));
            if id % 3 != 0 {
                writes.push(ack(id, "web1", id % 5 != 0));
            }
        }
        // Several changes of task 3 and 6 in the group, in an order that
        // only holds if each task's changes stay in theirs.
        writes.extend([
            Write::State {
                id: 3,
                state: TaskState::Pending,
                claim: Some(("web1".into(), 1003)),
            },
            claim(3, 2, "web2"),
            ack(3, "web2", false),
            Write::Retried { id: 3 },
            claim(3, 1, "web3"),
            ack(3, "web3", true),
            ack(3, "web3", true),
            claim(6, 2, "web2"),
            ack(6, "web1", true),
        ]);
        let mut ops = vec![Op::Publish(&tasks)];
        ops.extend(writes.iter().map(Op::Write));
        let mut together = open("together.db");
        together.apply(&ops).unwrap();
        let mut apart = open("apart.db");
        for op in &ops {
            apart.apply(std::slice::from_ref(op)).unwrap();
        }
        for id in 1..=count {
            let record = together.task(id).unwrap();
            assert_eq!(record, apart.task(id).unwrap(), "task {id}");
            assert!(record.is_some(), "task {id}");
        }
        let three = together.task(3).unwrap().unwrap();
        assert_eq!(three.task.state, TaskState::Acked);
        assert_eq!(
            (three.task.acked, three.task.failed, three.task.retries),
            (2, 1, 1)
        );
        let agents: Vec<_> = three.results.iter().map(|r| (&*r.agent, r.ok)).collect();
        assert_eq!(agents, [("web2", false), ("web3", true)]);
        let six = together.task(6).unwrap().unwrap().task;
        assert_eq!(
            (six.state, six.attempts, six.acked),
            (TaskState::Acked, 2, 1)
        );
        assert_eq!(six.claim, None);
    }

    #[test]
    fn one_task_is_read_with_every_agents_latest_result_and_retry_and_cancel_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
        let ack = |agent: &str, ok, text: &str, at_ms| Write::Acked {
            id: 1,
            agent: agent.into(),
            ok,
            text: text.into(),
            at_ms,
            claimed: false,
        };
        let claimed = Write::Claimed {
            id: 2,
            attempt: 1,
            holder: "web2".into(),
            deadline_ms: 99,
        };
        db.apply(&[
            Op::Publish(&[task(1, "a"), task(2, "b"), task(3, "c")]),
            Op::Write(&ack("web2", false, "exit 1", 5)),
            Op::Write(&ack("web1", true, "first", 6)),
            Op::Write(&ack("web1", true, "again", 7)),
            Op::Write(&claimed),
            Op::Write(&Write::Cancelled { id: 2, held: true }),
            Op::Write(&Write::Cancelled { id: 3, held: false }),
        ])
        .unwrap();
        assert_eq!(db.task(4).unwrap(), None);
        let one = db.task(1).unwrap().unwrap();
        assert_eq!(
            (one.task.text.as_str(), one.task.acked, one.task.failed),
            ("a", 2, 1)
        );
        let results: Vec<_> = one
            .results
            .iter()
            .map(|r| (&*r.agent, r.ok, r.text.as_str(), r.at_ms))
            .collect();
        assert_eq!(
            results,
            [("web1", true, "again", 7), ("web2", false, "exit 1", 5)],
            "one row per agent, its latest, by name"
        );
        let two = db.task(2).unwrap().unwrap();
        assert_eq!(two.task.state, TaskState::Cancelled);
        assert_eq!(
            two.task.claim,
            Some(("web2".into(), 99)),
            "who may still run it"
        );
        assert!(two.results.is_empty());
        assert_eq!(db.task(3).unwrap().unwrap().task.claim, None);
        // An ack of a cancelled task leaves it cancelled.
        db.apply(&[Op::Write(&Write::Acked {
            id: 2,
            agent: "web2".into(),
            ok: true,
            text: String::new(),
            at_ms: 8,
            claimed: false,
        })])
        .unwrap();
        assert_eq!(
            db.task(2).unwrap().unwrap().task.state,
            TaskState::Cancelled
        );

        let dead = Write::State {
            id: 1,
            state: TaskState::Dead,
            claim: None,
        };
        db.apply(&[Op::Write(&dead), Op::Write(&Write::Retried { id: 1 })])
            .unwrap();
        drop(db);
        let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
        let one = db.task(1).unwrap().unwrap();
        assert_eq!(
            (one.task.state, one.task.attempts, one.task.retries),
            (TaskState::Pending, 0, 1)
        );
        let unfinished: Vec<u64> = db
            .load(0, true)
            .unwrap()
            .tasks
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(
            unfinished,
            [1],
            "a retried task is back in the queue; a cancelled one is not"
        );
    }

    #[test]
    fn a_schema_1_database_is_migrated_keeping_its_tasks_and_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "INSERT INTO meta (key, value) VALUES ('epoch', 5), ('next_id', 2);
                 INSERT INTO tasks (id, text, created_ms, state) VALUES (1, 'old', 0, 3);
                 INSERT INTO cursors VALUES ('web1', 1, x'', 1, 0);",
            )
            .unwrap();
            conn.pragma_update(None, "application_id", APPLICATION_ID)
                .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
        let snapshot = db.load(10, false).unwrap();
        assert_eq!(
            (snapshot.tasks[0].state, snapshot.tasks[0].retries),
            (TaskState::Failed, 0)
        );
        assert_eq!(
            (&*snapshot.cursors[0].agent, snapshot.cursors[0].since),
            ("web1", 0)
        );
        assert_eq!((snapshot.epoch, snapshot.next_id), (5, 2));

        // The roster (new in schema 2): the first sighting is kept, the
        // last one moves on; agents long gone are forgotten.
        let agent = SavedAgent {
            name: "web1".into(),
            first_ms: 10,
            last_ms: 20,
            delivered: 3,
            acked: 2,
            failed: 1,
        };
        let later = Write::Agent(SavedAgent {
            first_ms: 15,
            last_ms: 30,
            ..agent.clone()
        });
        db.apply(&[Op::Write(&Write::Agent(agent)), Op::Write(&later)])
            .unwrap();
        drop(db);
        let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
        let web1 = &db.load(10, false).unwrap().agents[0];
        assert_eq!((web1.first_ms, web1.last_ms, web1.acked), (10, 30, 2));
        let forget = Retention {
            created_before_ms: 0,
            retain_finished: 100,
            queue_mode: false,
            forget_before_ms: 31,
        };
        assert_eq!(db.prune(&forget).unwrap().agents, 1);
    }

    #[test]
    fn ids_never_repeat_even_when_every_task_was_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
            db.apply(&[Op::Publish(&[task(1, "a"), task(2, "b")])])
                .unwrap();
            let pruned = db
                .prune(&Retention {
                    created_before_ms: i64::MAX,
                    retain_finished: 1,
                    queue_mode: false,
                    forget_before_ms: 0,
                })
                .unwrap();
            assert_eq!(pruned.tasks, 2);
        }
        let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
        let snapshot = db.load(10, false).unwrap();
        assert_eq!((snapshot.next_id, snapshot.tasks.len()), (3, 0));
    }

    #[test]
    fn queue_mode_keeps_unfinished_tasks_and_bounds_finished_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
        let tasks: Vec<_> = (1..=10).map(|i| task(i, "t")).collect();
        db.apply(&[Op::Publish(&tasks)]).unwrap();
        let acks: Vec<Write> = (1..=6)
            .map(|i| Write::Acked {
                id: i,
                agent: "a".into(),
                ok: true,
                text: String::new(),
                at_ms: 0,
                claimed: false,
            })
            .collect();
        let ops: Vec<Op<'_>> = acks.iter().map(Op::Write).collect();
        db.apply(&ops).unwrap();
        let retention = Retention {
            created_before_ms: 0,
            retain_finished: 2,
            queue_mode: true,
            forget_before_ms: 0,
        };
        assert_eq!(db.prune(&retention).unwrap().tasks, 4);
        // The last 3 ids in the ring, plus every unfinished task.
        let ids: Vec<u64> = db
            .load(3, true)
            .unwrap()
            .tasks
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, [7, 8, 9, 10]);
        let ids: Vec<u64> = db
            .load(6, true)
            .unwrap()
            .tasks
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, [5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn a_file_that_is_not_ours_or_is_newer_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        let bytes = b"this is not a database, and it must stay as it is\n".repeat(100);
        std::fs::write(&garbage, &bytes).unwrap();
        let e = Sqlite::open(&garbage, StoreSync::Full).err().unwrap();
        assert!(
            e.is_config() && e.to_string().contains("not a database"),
            "{e}"
        );
        assert_eq!(std::fs::read(&garbage).unwrap(), bytes);

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let e = Sqlite::open(&other, StoreSync::Full).err().unwrap();
        assert!(e.to_string().contains("another program"), "{e}");

        let newer = dir.path().join("newer.db");
        drop(Sqlite::open(&newer, StoreSync::Full).unwrap());
        Connection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = Sqlite::open(&newer, StoreSync::Full).err().unwrap();
        assert!(
            e.is_config() && e.to_string().contains("newer contactd"),
            "{e}"
        );
    }

    #[test]
    fn one_server_per_database_and_a_backup_while_it_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut db = Sqlite::open(&path, StoreSync::Full).unwrap();
        db.apply(&[Op::Publish(&[task(1, "kept")])]).unwrap();
        let e = Sqlite::open(&path, StoreSync::Full).err().unwrap();
        assert!(matches!(e, StoreError::Locked { .. }), "{e}");
        let copy = dir.path().join("copy.db");
        backup(&path, &copy).unwrap();
        assert!(
            backup(&path, &copy).is_err(),
            "an existing file is not overwritten"
        );
        drop(db);
        let mut restored = Sqlite::open(&copy, StoreSync::Full).unwrap();
        let snapshot = restored.load(10, false).unwrap();
        assert_eq!(snapshot.tasks[0].text, "kept");
    }

    #[test]
    fn only_a_missing_file_becomes_a_new_store_an_empty_one_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        File::create(&path).unwrap();
        let e = Sqlite::open(&path, StoreSync::Normal).err().unwrap();
        assert!(
            e.is_config()
                && e.to_string().contains("empty file")
                && e.to_string().contains("contactd store backup"),
            "{e}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert!(!beside(&path, "-wal").exists());

        std::fs::remove_file(&path).unwrap();
        // A log without its database is not replayed into a new one.
        std::fs::write(beside(&path, "-wal"), b"frames of another database").unwrap();
        let e = Sqlite::open(&path, StoreSync::Normal).err().unwrap();
        assert!(e.is_config() && e.to_string().contains("-wal"), "{e}");
        assert!(!path.exists());
        std::fs::remove_file(beside(&path, "-wal")).unwrap();
        let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
        db.apply(&[Op::Publish(&[task(1, "a")])]).unwrap();
        // The new store is whole in its main file from the start: a crash
        // now leaves no empty file behind.
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
    }

    #[test]
    fn a_new_store_that_fails_its_start_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        // A real failure after the file was created: its `-shm` cannot be
        // made (a directory holds the name).
        std::fs::create_dir(beside(&path, "-shm")).unwrap();
        let e = Sqlite::open(&path, StoreSync::Normal).err().unwrap();
        assert!(e.to_string().contains("cannot be written"), "{e}");
        assert!(
            !path.exists(),
            "an empty file would be refused at the next start"
        );
    }

    #[test]
    fn max_size_counts_the_write_ahead_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let wal = beside(&path, "-wal");
        let mut db = Sqlite::open(&path, StoreSync::Normal).unwrap();
        let max = 1024 * 1024;
        db.set_max_size(max).unwrap();
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut largest_wal = 0;
        let mut full = false;
        // One small task per commit: three or more pages each (the task's
        // leaf, the index, the id counter), which filled a 4 MB log before.
        for i in 1..=20_000 {
            match db.apply(&[Op::Publish(&[task(i, &"x".repeat(200))])]) {
                Ok(()) => {}
                Err(StoreError::Full(_)) => {
                    full = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            largest_wal = largest_wal.max(size(&wal));
            assert!(
                size(&path) + size(&wal) <= max,
                "after commit {i}: db {} + wal {} > {max}",
                size(&path),
                size(&wal)
            );
        }
        assert!(full, "1 MiB never filled up");
        assert!(largest_wal > 0, "the log was never written");
    }
}
