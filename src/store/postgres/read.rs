//! Reads: the [`Reader`] (the read pool the server's async code uses),
//! the queries it and the writer share (`task_record`, the task columns),
//! `fleet`, and turning rows into tasks and cursors.

use std::sync::Arc;

use tokio_postgres::{Client, Statement, types::ToSql};

use super::{failed, id};
use crate::{
    model::{RunAgentState, RunState, Saved, SavedAgent, TaskState},
    store::{
        AgentResult, Fleet, FleetAgent, JobRow, RunAgentRow, RunRecord, RunRow, ServerRow,
        StoreError, StoredTask, TaskRecord, cursor_from_parts,
    },
};

/// Reads for the server's async code (the fleet view, `task show`, an
/// agent's acks when it connects) on a bounded pool of connections of
/// their own: they neither wait behind the writer's group commits nor hold
/// it up. [`Store`](crate::store::Store) asks the writer for a barrier first, so a
/// read still sees every write sent before it.
pub struct Reader {
    pub(super) pool: deadpool_postgres::Pool,
    pub(super) name: String,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("database", &self.name)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Closes the pool's connections (at a clean stop).
    pub fn close(&self) {
        self.pool.close();
    }

    /// A client from the pool (waiting for one at most `connect_timeout`).
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => failed(e),
            other => StoreError::unavailable(
                format!(
                    "no connection to the database {} for a read: {other}",
                    self.name
                ),
                other,
            ),
        })
    }

    /// A named agent's broadcast cursor.
    pub async fn cursor(&self, agent: &str) -> Result<Option<Saved>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(CURSOR_OF).await.map_err(failed)?;
        let row = client
            .query_opt(&statement, &[&agent])
            .await
            .map_err(failed)?;
        Ok(row.as_ref().map(saved_cursor))
    }

    /// Every agent and server the database knows of.
    pub async fn fleet(&self) -> Result<Fleet, StoreError> {
        let client = self.client().await?;
        fleet(&client).await
    }

    /// The tasks with these ids.
    pub async fn tasks(&self, ids: &[u64]) -> Result<Vec<StoredTask>, StoreError> {
        let client = self.client().await?;
        let ids: Vec<i64> = ids.iter().map(|n| id(*n)).collect();
        let by_ids = tasks_by_ids();
        let statement = client.prepare_cached(&by_ids).await.map_err(failed)?;
        let rows = client.query(&statement, &[&ids]).await.map_err(failed)?;
        Ok(rows.iter().map(stored_task).collect())
    }

    /// One task and its per-agent results.
    pub async fn task(&self, task: u64) -> Result<Option<TaskRecord>, StoreError> {
        let client = self.client().await?;
        let by_id = task_by_id();
        let (one, results) = tokio::join!(
            client.prepare_cached(&by_id),
            client.prepare_cached(RESULTS_OF),
        );
        task_record(
            &client,
            &one.map_err(failed)?,
            &results.map_err(failed)?,
            task,
        )
        .await
    }
}

pub(super) const TASK_COLUMNS: &str = "id, text, target, created_ms, state, attempts, holder, deadline_ms, \
                            delivered, acked, failed, last_agent, last_result, retries, selector, \
                            job, direct";

const CURSOR_OF: &str = "SELECT agent, watermark, above, sent_up_to, seen_ms, since FROM cursors \
                         WHERE agent = $1";
pub(super) const RESULTS_OF: &str =
    "SELECT agent, ok, text, at_ms FROM results WHERE task_id = $1 ORDER BY agent";

pub(super) fn task_by_id() -> String {
    format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1")
}

fn tasks_by_ids() -> String {
    format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ANY($1)")
}

/// One task and its per-agent results, with the statements `by_id` and
/// `results` ([`task_by_id`], [`RESULTS_OF`]).
pub(super) async fn task_record(
    client: &Client,
    by_id: &Statement,
    results: &Statement,
    task: u64,
) -> Result<Option<TaskRecord>, StoreError> {
    let task = id(task);
    let params: [&(dyn ToSql + Sync); 1] = [&task];
    // Both sent at once: one round trip.
    let (stored, results) = tokio::join!(
        client.query_opt(by_id, &params),
        client.query(results, &params),
    );
    let Some(stored) = stored.map_err(failed)? else {
        return Ok(None);
    };
    let results = results
        .map_err(failed)?
        .iter()
        .map(|row| AgentResult {
            agent: Arc::from(row.get::<_, String>(0)),
            ok: row.get(1),
            text: row.get(2),
            at_ms: row.get(3),
        })
        .collect();
    Ok(Some(TaskRecord {
        task: stored_task(&stored),
        results,
    }))
}

/// Every server sharing the database and every named agent it knows of.
async fn fleet(client: &Client) -> Result<Fleet, StoreError> {
    let (servers, agents) = tokio::join!(
        client.query(
            "SELECT name, started_ms, heartbeat_ms, stopped FROM servers ORDER BY name",
            &[],
        ),
        client.query(
            "SELECT name, first_ms, last_ms, delivered, acked, failed, server, connected, \
             address FROM agents ORDER BY name",
            &[],
        ),
    );
    let servers = servers
        .map_err(failed)?
        .iter()
        .map(|row| ServerRow {
            name: row.get(0),
            started_ms: row.get(1),
            heartbeat_ms: row.get(2),
            stopped: row.get(3),
        })
        .collect();
    let agents = agents
        .map_err(failed)?
        .iter()
        .map(|row| {
            let n = |i| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
            FleetAgent {
                saved: SavedAgent {
                    name: Arc::from(row.get::<_, String>(0)),
                    first_ms: row.get(1),
                    last_ms: row.get(2),
                    delivered: n(3),
                    acked: n(4),
                    failed: n(5),
                },
                server: row.get(6),
                connected: row.get(7),
                address: row.get(8),
            }
        })
        .collect();
    Ok(Fleet { servers, agents })
}

pub(super) fn stored_task(row: &tokio_postgres::Row) -> StoredTask {
    let holder: Option<String> = row.get(6);
    let deadline: Option<i64> = row.get(7);
    let last_agent: Option<String> = row.get(11);
    let last_result: Option<String> = row.get(12);
    StoredTask {
        id: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        text: row.get(1),
        target: row.get::<_, Option<String>>(2).map(Arc::from),
        created_ms: row.get(3),
        state: TaskState::from_u8(u8::try_from(row.get::<_, i16>(4)).unwrap_or(0)),
        attempts: count(row.get(5)),
        claim: holder.zip(deadline).map(|(h, d)| (Arc::from(h), d)),
        delivered: count(row.get(8)),
        acked: count(row.get(9)),
        failed: count(row.get(10)),
        last_result: last_agent.map(|a| (Arc::from(a), last_result.unwrap_or_default())),
        retries: count(row.get(13)),
        selector: row.get(14),
        job: row.get(15),
        direct: row.get(16),
    }
}

/// The columns of a run, in [`run_row`]'s order.
pub(super) const RUN_COLUMNS: &str = "task_id, job, nominal_ms, mode, state, target, targets, \
                                      batch, max_failed, wait_ms, retries, started_ms, \
                                      deadline_ms, finished_ms, acked, failed, missed";

pub(super) fn run_row(row: &tokio_postgres::Row) -> RunRow {
    RunRow {
        task_id: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        job: Arc::from(row.get::<_, String>(1)),
        nominal_ms: row.get(2),
        mode: Arc::from(row.get::<_, String>(3)),
        state: RunState::from_u8(u8::try_from(row.get::<_, i16>(4)).unwrap_or(0)),
        target: Arc::from(row.get::<_, String>(5)),
        targets: count(row.get(6)),
        batch: count(row.get(7)),
        max_failed: count(row.get(8)),
        wait_ms: row.get(9),
        retries: count(row.get(10)),
        started_ms: row.get(11),
        deadline_ms: row.get(12),
        finished_ms: row.get(13),
        acked: count(row.get(14)),
        failed: count(row.get(15)),
        missed: count(row.get(16)),
    }
}

/// Every job, and one run with its agents, as the writer reads them.
pub(super) async fn jobs(client: &Client) -> Result<Vec<JobRow>, StoreError> {
    Ok(client
        .query(
            "SELECT name, last_nominal_ms, paused, last_success_ms FROM jobs",
            &[],
        )
        .await
        .map_err(failed)?
        .iter()
        .map(|row| JobRow {
            name: Arc::from(row.get::<_, String>(0)),
            last_nominal_ms: row.get(1),
            paused: row.get(2),
            last_success_ms: row.get(3),
        })
        .collect())
}

pub(super) async fn run(client: &Client, task: u64) -> Result<Option<RunRecord>, StoreError> {
    let Some(row) = client
        .query_opt(
            &format!("SELECT {RUN_COLUMNS} FROM runs WHERE task_id = $1"),
            &[&id(task)],
        )
        .await
        .map_err(failed)?
    else {
        return Ok(None);
    };
    let agents = client
        .query(
            "SELECT task_id, agent, state, tries, at_ms FROM run_agents WHERE task_id = $1 \
             ORDER BY agent",
            &[&id(task)],
        )
        .await
        .map_err(failed)?
        .iter()
        .map(|row| RunAgentRow {
            task_id: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            agent: Arc::from(row.get::<_, String>(1)),
            state: RunAgentState::from_u8(u8::try_from(row.get::<_, i16>(2)).unwrap_or(0)),
            tries: count(row.get(3)),
            at_ms: row.get(4),
        })
        .collect();
    Ok(Some(RunRecord {
        run: run_row(&row),
        agents,
    }))
}

pub(super) async fn runs(
    client: &Client,
    job: Option<&str>,
    limit: usize,
) -> Result<Vec<RunRow>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    Ok(client
        .query(
            &format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE $1::text IS NULL OR job = $1 \
                 ORDER BY task_id DESC LIMIT $2"
            ),
            &[&job, &limit],
        )
        .await
        .map_err(failed)?
        .iter()
        .map(run_row)
        .collect())
}

/// A cursor row (agent, watermark, above, sent_up_to, seen_ms, since).
pub(super) fn saved_cursor(row: &tokio_postgres::Row) -> Saved {
    Saved {
        agent: Arc::from(row.get::<_, String>(0)),
        cursor: cursor_from_parts(
            u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
            row.get::<_, &[u8]>(2),
        ),
        sent_up_to: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
        seen_ms: row.get(4),
        since: u64::try_from(row.get::<_, i64>(5)).unwrap_or(0),
    }
}

fn count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}
