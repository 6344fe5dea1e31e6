//! The spool's thread, the only user of its connection: writes that come
//! together are committed in one transaction (group commit), and a task
//! starts only with room for the results of every running handler.

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use super::{
    Op, SpoolError, Written,
    file::{DELIVERED, DONE, PAGE, STARTED, column, write_done},
};
use crate::proto::contact::Result as ResultMsg;

/// Room kept per running handler beyond its `max_output`: the row, its
/// index entries and the pages' slack.
const ROW_ROOM: u64 = 1024;
/// Delivered entries pruned per step when making room.
const PRUNE_STEP: i64 = 256;
/// Writes committed together, at most.
const GROUP: usize = 512;

/// The spool's thread: takes writes as they come, commits those that came
/// together in one transaction, then answers them.
pub(super) fn writer(mut conn: Connection, mut queue: mpsc::Receiver<Op>) {
    let mut running = started_count(&conn);
    while let Some(first) = queue.blocking_recv() {
        let mut ops = vec![first];
        while ops.len() < GROUP {
            match queue.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let outcomes = commit(&mut conn, &ops, &mut running).unwrap_or_else(|e| {
            // The group failed whole (I/O, or a result bigger than the room
            // kept): each write alone, so one cannot fail the others.
            tracing::debug!("spool group commit failed ({e}): writing one by one");
            ops.iter()
                .map(|op| {
                    commit(&mut conn, std::slice::from_ref(op), &mut running)
                        .map_err(write_error)
                        .and_then(|mut one| one.pop().expect("one outcome per write"))
                })
                .collect()
        });
        for (op, outcome) in ops.into_iter().zip(outcomes) {
            match op {
                Op::Start { reply, .. } | Op::Done { reply, .. } => {
                    let _ = reply.send(outcome);
                }
                Op::Flush(reply) => {
                    let _ = reply.send(());
                }
                Op::Delivered { .. } => {}
            }
        }
    }
}

fn write_error(e: rusqlite::Error) -> SpoolError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => {
            SpoolError::Full(format!("{e} (agent.spool_max_size, or the disk)"))
        }
        _ => SpoolError::Write(e.to_string()),
    }
}

fn started_count(conn: &Connection) -> u64 {
    conn.query_row(
        "SELECT count(*) FROM tasks WHERE state = ?1",
        [STARTED],
        |row| row.get::<_, i64>(0),
    )
    .map_or(0, |n| u64::try_from(n).unwrap_or(0))
}

/// Applies `ops` in one transaction: the outcome of each, or the error
/// that failed the transaction (nothing applied).
fn commit(conn: &mut Connection, ops: &[Op], running: &mut u64) -> rusqlite::Result<Vec<Written>> {
    let before = *running;
    let tx = conn.transaction()?;
    let mut outcomes = Vec::with_capacity(ops.len());
    let applied = (|| {
        for op in ops {
            outcomes.push(apply(&tx, op, running)?);
        }
        tx.commit()
    })();
    if let Err(e) = applied {
        *running = before;
        return Err(e);
    }
    Ok(outcomes)
}

fn apply(conn: &Connection, op: &Op, running: &mut u64) -> rusqlite::Result<Written> {
    match op {
        Op::Start {
            key, epoch, room, ..
        } => {
            let known: Option<(i64, i32, String)> = conn
                .query_row(
                    "SELECT state, outcome, ret FROM tasks WHERE id = ?1 AND key = ?2",
                    params![column(key.id), column(key.text)],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()?;
            if let Some((state, outcome, ret)) = known
                && state != STARTED
            {
                return Ok(Ok(Some(ResultMsg {
                    ret,
                    task_id: key.id,
                    outcome,
                    epoch: *epoch,
                })));
            }
            let needed = (*running + 1) * (room + ROW_ROOM);
            if let Err(full) = make_room(conn, needed)? {
                return Ok(Err(full));
            }
            let inserted = conn.execute(
                "INSERT OR IGNORE INTO tasks (id, key, epoch, state) VALUES (?1, ?2, ?3, ?4)",
                params![column(key.id), column(key.text), column(*epoch), STARTED],
            )?;
            *running += inserted as u64;
        }
        Op::Done { key, ack, .. } => {
            // Its room was kept when it started; what a delivered mark
            // took since is made again.
            let _ = make_room(conn, ack.ret.len() as u64 + ROW_ROOM)?;
            let was_started: Option<i64> = conn
                .query_row(
                    "SELECT state FROM tasks WHERE id = ?1 AND key = ?2",
                    params![column(key.id), column(key.text)],
                    |row| row.get(0),
                )
                .optional()?;
            write_done(conn, *key, ack)?;
            if was_started == Some(STARTED) {
                *running = running.saturating_sub(1);
            }
        }
        Op::Delivered { keys, keep } => {
            // A mark moves index entries, which may take a page or two; a
            // full file frees them from the oldest delivered entries.
            let _ = make_room(conn, 4 * PAGE)?;
            let mut mark = conn.prepare_cached(
                "UPDATE tasks SET state = ?3 WHERE id = ?1 AND key = ?2 AND state = ?4",
            )?;
            for key in keys {
                mark.execute(params![column(key.id), column(key.text), DELIVERED, DONE])?;
            }
            conn.execute(
                "DELETE FROM tasks WHERE state = ?1 AND seq <= (SELECT seq FROM tasks \
                 WHERE state = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                params![DELIVERED, i64::try_from(*keep).unwrap_or(i64::MAX)],
            )?;
        }
        Op::Flush(_) => {}
    }
    Ok(Ok(None))
}

/// Makes `needed` bytes free within `max_page_count`, pruning the oldest
/// delivered entries; `Err` if they are not enough.
fn make_room(conn: &Connection, needed: u64) -> rusqlite::Result<Result<(), SpoolError>> {
    loop {
        let free = free_bytes(conn)?;
        if free >= needed {
            return Ok(Ok(()));
        }
        let pruned = conn.execute(
            "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE state = ?1 \
             ORDER BY seq LIMIT ?2)",
            params![DELIVERED, PRUNE_STEP],
        )?;
        if pruned == 0 {
            return Ok(Err(SpoolError::Full(format!(
                "{free} bytes free, {needed} needed for the running handlers' results, and \
                 every entry left is a result not yet delivered"
            ))));
        }
    }
}

/// Bytes the file may still grow by, or reuse, within `max_page_count`.
fn free_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let read = |pragma: &str| -> rusqlite::Result<u64> {
        conn.query_row(&format!("PRAGMA {pragma}"), [], |row| row.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
    };
    let (max, count, free, page) = (
        read("max_page_count")?,
        read("page_count")?,
        read("freelist_count")?,
        read("page_size")?,
    );
    Ok((max.saturating_sub(count) + free) * page)
}
