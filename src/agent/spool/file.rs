//! The spool's file: made whole before it gets its name, checked and
//! locked when opened, and read back after a restart.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, OpenFlags, params};

use super::{Recovered, SpoolError, interrupted_ack};
use crate::{
    agent::memory::TaskKey,
    config::{AgentConfig, StoreSync},
    proto::contact::Result as ResultMsg,
};

/// `PRAGMA application_id` of a spool ("ctda"): a server's task store or
/// any other SQLite file is refused, not taken for an empty spool.
const APPLICATION_ID: i32 = 0x6374_6461;
/// The schema's version (`PRAGMA user_version`).
const SCHEMA_VERSION: i32 = 1;
const SCHEMA: &str = "
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,  -- the order tasks started in: oldest pruned first
    id INTEGER NOT NULL,      -- the task's id
    key INTEGER NOT NULL,     -- TaskKey's hash of epoch, retry and text
    epoch INTEGER NOT NULL,   -- echoed in the ack
    state INTEGER NOT NULL,   -- 0 started, 1 done, 2 delivered
    outcome INTEGER NOT NULL DEFAULT 0,
    ret TEXT NOT NULL DEFAULT '',
    UNIQUE (id, key)
);
CREATE INDEX tasks_by_state ON tasks (state, seq);
";

pub(super) const STARTED: i64 = 0;
pub(super) const DONE: i64 = 1;
pub(super) const DELIVERED: i64 = 2;

/// SQLite's page, fixed for a new file (an existing one keeps its own).
pub(super) const PAGE: u64 = 4096;
/// The `-wal` file is truncated to this after a checkpoint.
const WAL_LIMIT: i64 = 4 * 1024 * 1024;
/// How long SQLite waits for a lock another process holds before the
/// open fails (another agent on the same state directory).
const BUSY: Duration = Duration::from_millis(200);

/// Creates a new spool at `path`: written whole under a temporary name,
/// synced, then renamed, so a crash never leaves an empty or half-made
/// file under the real name (which would be refused as damaged).
pub(super) fn create(path: &Path) -> Result<(), String> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    {
        let conn = Connection::open(&temporary).map_err(|e| format!("cannot create it: {e}"))?;
        conn.execute_batch(&format!(
            "PRAGMA page_size = {PAGE}; PRAGMA journal_mode = DELETE; \
             PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION}; \
             BEGIN; {SCHEMA} COMMIT;"
        ))
        .map_err(|e| format!("cannot create it: {e}"))?;
    }
    let synced = std::fs::File::open(&temporary).and_then(|f| f.sync_all());
    synced.map_err(|e| format!("cannot sync it: {e}"))?;
    std::fs::rename(&temporary, path).map_err(|e| format!("cannot create it: {e}"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename itself is durable once the directory is synced.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Opens an existing spool, checks it, and takes it for this agent alone.
pub(super) fn open_existing(path: &Path, config: &AgentConfig) -> Result<Connection, SpoolError> {
    let damaged = |detail: String| SpoolError::Damaged {
        path: path.to_owned(),
        detail,
    };
    let open_error = |detail: String| SpoolError::Open {
        path: path.to_owned(),
        detail,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| open_error(e.to_string()))?
        .len();
    if size == 0 {
        // SQLite would take an empty file for a new database: it is one
        // that lost everything (a spool is never created empty).
        return Err(damaged("the file is empty".into()));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(e.to_string()))?;
    // Exclusive before the first read, and so before WAL is used: no
    // shared-memory file, and the lock (shared at the first read, exclusive
    // from the first write below) is held until the agent exits, so a
    // second agent of the same name is refused rather than sharing it.
    conn.busy_timeout(BUSY)
        .and_then(|()| conn.execute_batch("PRAGMA locking_mode = EXCLUSIVE"))
        .map_err(|e| open_error(e.to_string()))?;
    // Held by another process (it takes the lock for good at its start).
    let refused = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            open_error(
                "another agent is using it: agents on one host need distinct agent.name \
                 (or agent.state_dir)"
                    .into(),
            )
        }
        _ => damaged(e.to_string()),
    };
    let read = |sql: &str| -> Result<i64, SpoolError> {
        conn.query_row(sql, [], |row| row.get(0)).map_err(refused)
    };
    let application_id = read("PRAGMA application_id")?;
    if application_id != i64::from(APPLICATION_ID) {
        return Err(damaged(format!(
            "application_id is {application_id:#x}, not a contactd agent spool's"
        )));
    }
    let version = read("PRAGMA user_version")?;
    if version != i64::from(SCHEMA_VERSION) {
        return Err(damaged(format!(
            "schema version {version}, this contactd reads {SCHEMA_VERSION} (written by another \
             version?)"
        )));
    }
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(refused)?;
    if check != "ok" {
        return Err(damaged(format!("quick_check: {check}")));
    }
    let sync = match config.spool_sync {
        StoreSync::Normal => "NORMAL",
        StoreSync::Full => "FULL",
    };
    let max_pages = (config.spool_max_size.as_u64() / PAGE).max(16);
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; \
         PRAGMA synchronous = {sync}; PRAGMA journal_size_limit = {WAL_LIMIT}; \
         PRAGMA max_page_count = {max_pages}; BEGIN IMMEDIATE; COMMIT;"
    ))
    .map_err(refused)?;
    Ok(conn)
}

/// Reads what the spool kept, oldest first; marks started tasks done as
/// interrupted.
pub(super) fn recover(conn: &mut Connection, path: &Path) -> Result<Recovered, SpoolError> {
    let damaged = |e: rusqlite::Error| SpoolError::Damaged {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let tx = conn.transaction().map_err(damaged)?;
    let mut recovered = Recovered::default();
    let mut interrupted = Vec::new();
    {
        let mut rows = tx
            .prepare("SELECT id, key, epoch, state, outcome, ret FROM tasks ORDER BY seq")
            .map_err(damaged)?;
        let mut rows = rows.query([]).map_err(damaged)?;
        while let Some(row) = rows.next().map_err(damaged)? {
            let id = u64::from_ne_bytes(row.get::<_, i64>(0).map_err(damaged)?.to_ne_bytes());
            let text = u64::from_ne_bytes(row.get::<_, i64>(1).map_err(damaged)?.to_ne_bytes());
            let epoch = u64::from_ne_bytes(row.get::<_, i64>(2).map_err(damaged)?.to_ne_bytes());
            let state: i64 = row.get(3).map_err(damaged)?;
            let key = TaskKey { id, text };
            let ack = if state == STARTED {
                let ack = interrupted_ack(id, epoch);
                interrupted.push((key, ack.clone()));
                recovered.interrupted.push(id);
                ack
            } else {
                ResultMsg {
                    ret: row.get(5).map_err(damaged)?,
                    task_id: id,
                    outcome: row.get(4).map_err(damaged)?,
                    epoch,
                }
            };
            if state != DELIVERED {
                recovered.undelivered.push((key, ack.clone()));
            }
            recovered.handled.push((key, ack));
        }
    }
    for (key, ack) in &interrupted {
        write_done(&tx, *key, ack).map_err(damaged)?;
    }
    tx.commit().map_err(damaged)?;
    Ok(recovered)
}

pub(super) fn column(n: u64) -> i64 {
    i64::from_ne_bytes(n.to_ne_bytes())
}

pub(super) fn write_done(
    conn: &Connection,
    key: TaskKey,
    ack: &ResultMsg,
) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE tasks SET state = ?3, outcome = ?4, ret = ?5 WHERE id = ?1 AND key = ?2",
        params![column(key.id), column(key.text), DONE, ack.outcome, ack.ret],
    )
}
