//! The queue's hot writes of one group commit, as multi-row statements.
//!
//! Queue mode makes four writes per task on its way (the task, its claim,
//! its ack, its result), each a statement of its own until now. Profiled at
//! the queue's ceiling (BENCHMARKS.md, "The queue's ceiling, profiled"),
//! about a quarter of each statement's cost was the statement and not its
//! row: the cached statement looked up by its text, its cursors opened and
//! closed, the halt. Here the new tasks, claims and acks of a group are
//! gathered and written [`ROWS`] at a time (an `INSERT` of many rows, an
//! `UPDATE … FROM (VALUES …)`). Measured after: the claims and both inserts
//! cost 10–40 % less; the acks' `UPDATE` of their tasks as an `UPDATE …
//! FROM` cost what a statement per row did (SQLite runs it in two passes,
//! the join into a temporary table and then each row sought again), so it
//! is a statement per row, prepared once per batch; a claim alone is a
//! plain `UPDATE` too.
//!
//! A statement that writes many rows would keep a statement journal, a copy
//! of every page it changes, to undo itself alone when it fails half way
//! (measured: a third of the acks' cost, written to a temporary file). These
//! need none: a failure fails the whole group's transaction, which is rolled
//! back. So those of many rows say `OR FAIL` (a failing statement keeps its earlier rows,
//! and the transaction goes), and the acks' results, an upsert, which keeps
//! its journal whatever it says, keep it in memory (`temp_store`).
//!
//! Gathering reorders the group's changes, which is safe only between
//! changes of different tasks (their rows are disjoint, and the transaction
//! is all or none). So no task is gathered twice: a change of a task
//! already gathered writes out everything gathered first, and every other
//! kind of change (cancel, retry, cursors, jobs, …) is applied in its
//! place after everything gathered before it is written.

use std::collections::HashSet;

use rusqlite::{ToSql, Transaction, params};

use crate::model::{Task, TaskState};

/// Rows one statement writes at most. A group holds up to a few thousand
/// changes; what is left over is written in statements of the powers of two
/// below this, so that every statement's text is one of a few, each
/// prepared once (the connection caches them).
pub(super) const ROWS: usize = 64;

/// Statements [`Batches`] may keep prepared: the task inserts, claims and
/// results, one per power of two up to [`ROWS`], and the acks' update.
pub(super) const STATEMENTS: usize = 3 * (ROWS.trailing_zeros() as usize + 1) + 1;

/// A claim, as `Write::Claimed` says it.
struct Claim<'a> {
    id: i64,
    attempt: u32,
    holder: &'a str,
    deadline_ms: i64,
}

/// An ack, as `Write::Acked` says it.
struct Ack<'a> {
    id: i64,
    agent: &'a str,
    ok: bool,
    text: &'a str,
    at_ms: i64,
}

/// The changes gathered so far, none of the same task as another.
#[derive(Default)]
pub(super) struct Batches<'a> {
    tasks: Vec<&'a Task>,
    claims: Vec<Claim<'a>>,
    acks: Vec<Ack<'a>>,
    /// The tasks of every change gathered.
    ids: HashSet<i64>,
}

impl<'a> Batches<'a> {
    /// Gathers a new task.
    pub(super) fn task(&mut self, tx: &Transaction<'_>, task: &'a Task) -> rusqlite::Result<()> {
        self.make_room(tx, super::id(task.id))?;
        self.tasks.push(task);
        if self.tasks.len() == ROWS {
            self.write_tasks(tx)?;
        }
        Ok(())
    }

    /// Gathers a claim of attempt `attempt` by `holder`.
    pub(super) fn claim(
        &mut self,
        tx: &Transaction<'_>,
        id: u64,
        attempt: u32,
        holder: &'a str,
        deadline_ms: i64,
    ) -> rusqlite::Result<()> {
        let id = super::id(id);
        self.make_room(tx, id)?;
        self.claims.push(Claim {
            id,
            attempt,
            holder,
            deadline_ms,
        });
        if self.claims.len() == ROWS {
            self.write_claims(tx)?;
        }
        Ok(())
    }

    /// Gathers an ack by `agent` and its result.
    pub(super) fn ack(
        &mut self,
        tx: &Transaction<'_>,
        id: u64,
        agent: &'a str,
        ok: bool,
        text: &'a str,
        at_ms: i64,
    ) -> rusqlite::Result<()> {
        let id = super::id(id);
        self.make_room(tx, id)?;
        self.acks.push(Ack {
            id,
            agent,
            ok,
            text,
            at_ms,
        });
        if self.acks.len() == ROWS {
            self.write_acks(tx)?;
        }
        Ok(())
    }

    /// Writes everything gathered (before a change applied on its own, and
    /// at the end of the group).
    pub(super) fn flush(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        self.write_tasks(tx)?;
        self.write_claims(tx)?;
        self.write_acks(tx)?;
        self.ids.clear();
        Ok(())
    }

    /// A change of task `id` is next: if one of it is gathered already,
    /// everything gathered is written first (its changes stay in order).
    fn make_room(&mut self, tx: &Transaction<'_>, id: i64) -> rusqlite::Result<()> {
        if !self.ids.insert(id) {
            self.flush(tx)?;
            self.ids.insert(id);
        }
        Ok(())
    }

    fn write_tasks(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        for chunk in chunks(self.tasks.len()) {
            let rows: Vec<_> = self.tasks.drain(..chunk).collect();
            let created: Vec<i64> = rows
                .iter()
                .map(|t| crate::clock::unix_ms(t.created))
                .collect();
            let selectors: Vec<Option<String>> = rows
                .iter()
                .map(|t| t.selector.as_ref().map(ToString::to_string))
                .collect();
            let ids: Vec<i64> = rows.iter().map(|t| super::id(t.id)).collect();
            let targets: Vec<Option<&str>> = rows.iter().map(|t| t.target.as_deref()).collect();
            let jobs: Vec<Option<&str>> = rows.iter().map(|t| t.job.as_deref()).collect();
            let mut params: Vec<&dyn ToSql> = Vec::with_capacity(chunk * 7);
            for (at, task) in rows.iter().enumerate() {
                params.extend_from_slice(&[
                    &ids[at] as &dyn ToSql,
                    &task.text,
                    &targets[at],
                    &created[at],
                    &selectors[at],
                    &jobs[at],
                    &task.direct,
                ]);
            }
            self.forget(&ids);
            tx.prepare_cached(&values(
                "INSERT OR FAIL INTO tasks (id, text, target, created_ms, selector, job, direct) VALUES ",
                7,
                chunk,
                "",
            ))?
            .execute(&*params)?;
        }
        Ok(())
    }

    fn write_claims(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        for chunk in chunks(self.claims.len()) {
            let rows: Vec<Claim<'_>> = self.claims.drain(..chunk).collect();
            let mut params: Vec<&dyn ToSql> = Vec::with_capacity(chunk * 4);
            for claim in &rows {
                params.extend_from_slice(&[
                    &claim.id as &dyn ToSql,
                    &claim.attempt,
                    &claim.holder,
                    &claim.deadline_ms,
                ]);
            }
            // One claim alone (an operator's change in between, say): a
            // plain UPDATE, which SQLite does in one pass.
            let sql = if chunk == 1 {
                "UPDATE tasks SET delivered = delivered + 1, attempts = ?2, holder = ?3, \
                 deadline_ms = ?4, state = CASE WHEN state < 2 THEN 1 ELSE state END \
                 WHERE id = ?1"
                    .to_owned()
            } else {
                values(
                    "UPDATE OR FAIL tasks SET delivered = delivered + 1, attempts = c.column2, \
                     holder = c.column3, deadline_ms = c.column4, \
                     state = CASE WHEN tasks.state < 2 THEN 1 ELSE tasks.state END \
                     FROM (VALUES ",
                    4,
                    chunk,
                    ") AS c WHERE tasks.id = c.column1",
                )
            };
            tx.prepare_cached(&sql)?.execute(&*params)?;
            let ids: Vec<i64> = rows.iter().map(|c| c.id).collect();
            self.forget(&ids);
        }
        Ok(())
    }

    fn write_acks(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        for chunk in chunks(self.acks.len()) {
            let rows: Vec<Ack<'_>> = self.acks.drain(..chunk).collect();
            let mut params: Vec<&dyn ToSql> = Vec::with_capacity(chunk * 5);
            for ack in &rows {
                params.extend_from_slice(&[
                    &ack.id as &dyn ToSql,
                    &ack.agent,
                    &ack.ok,
                    &ack.text,
                    &ack.at_ms,
                ]);
            }
            tx.prepare_cached(&values(
                "INSERT INTO results (task_id, agent, ok, text, at_ms) VALUES ",
                5,
                chunk,
                " ON CONFLICT (task_id, agent) DO UPDATE SET \
                 ok = excluded.ok, text = excluded.text, at_ms = excluded.at_ms",
            ))?
            .execute(&*params)?;
            // One statement per row, prepared once: an `UPDATE … FROM` of
            // many rows measured no cheaper (see the module's header).
            let mut update = tx.prepare_cached(
                "UPDATE tasks SET acked = acked + ?2, failed = failed + ?3, last_agent = ?4, \
                 last_result = ?5, holder = NULL, deadline_ms = NULL, \
                 state = CASE WHEN state < 2 THEN ?6 ELSE state END WHERE id = ?1",
            )?;
            for ack in &rows {
                let state = if ack.ok {
                    TaskState::Acked
                } else {
                    TaskState::Failed
                };
                update.execute(params![
                    ack.id,
                    i64::from(ack.ok),
                    i64::from(!ack.ok),
                    ack.agent,
                    ack.text,
                    state as u8
                ])?;
            }
            let ids: Vec<i64> = rows.iter().map(|a| a.id).collect();
            self.forget(&ids);
        }
        Ok(())
    }

    /// Tasks whose changes were written: no longer gathered.
    fn forget(&mut self, ids: &[i64]) {
        for id in ids {
            self.ids.remove(id);
        }
    }
}

/// The statement sizes that write `rows` rows: [`ROWS`] while that many
/// are left, then the powers of two of what remains, largest first.
fn chunks(rows: usize) -> impl Iterator<Item = usize> {
    let full = std::iter::repeat_n(ROWS, rows / ROWS);
    let rest = rows % ROWS;
    let parts = (0..ROWS.trailing_zeros())
        .rev()
        .map(|bit| 1 << bit)
        .filter(move |size| rest & size != 0);
    full.chain(parts)
}

/// `head`, `rows` groups of `columns` parameters, `tail`.
fn values(head: &str, columns: usize, rows: usize, tail: &str) -> String {
    let row = format!("({})", vec!["?"; columns].join(","));
    let mut sql = String::with_capacity(head.len() + rows * (row.len() + 1) + tail.len());
    sql.push_str(head);
    for at in 0..rows {
        if at > 0 {
            sql.push(',');
        }
        sql.push_str(&row);
    }
    sql.push_str(tail);
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_full_statements_then_powers_of_two() {
        let sizes = |rows| chunks(rows).collect::<Vec<_>>();
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(ROWS), [ROWS]);
        assert_eq!(sizes(2 * ROWS + 13), [ROWS, ROWS, 8, 4, 1]);
        assert_eq!(sizes(ROWS - 1).iter().sum::<usize>(), ROWS - 1);
        assert!(
            sizes(ROWS - 1)
                .iter()
                .all(|s| s.is_power_of_two() && *s < ROWS)
        );
    }

    #[test]
    fn values_lists_one_group_per_row() {
        assert_eq!(values("V ", 2, 3, " T"), "V (?,?),(?,?),(?,?) T");
    }
}
