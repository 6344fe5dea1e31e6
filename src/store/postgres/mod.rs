//! The PostgreSQL backend: the same tables and semantics as SQLite's, in a
//! database that may live on another machine.
//!
//! It is driven from the store's writer thread, like SQLite, through a
//! runtime of its own: every statement of a group commit (`BEGIN`, the
//! writes, `COMMIT`) is sent down the connection before the first answer is
//! read, so a group costs one network round trip however many writes it
//! holds (`pipeline`).
//!
//! Several servers may share one database ([`Backend::shared`]): task ids
//! are the database's, reserved under a row lock held until commit, so
//! tasks become visible in id order across servers; each publish notifies
//! (`NOTIFY contactd_tasks`) and every server's [`Watcher`] listens, and
//! polls as the fallback, so the writer reads what others published. The
//! watcher also keeps this server's heartbeat in `servers` and holds the
//! generator's lease (a session advisory lock: released the moment its
//! connection dies). Each server's name is taken with an advisory lock
//! held by the writer's connection: two servers of one name are refused.
//!
//! The schema is versioned in `contactd_meta`; `MIGRATIONS` are applied
//! under a transaction-scoped advisory lock, so servers starting together
//! never race to migrate. A database with tables of another program (a
//! `tasks` table but no `contactd_meta`) is refused and left as it is.
//!
//! The files, by concern:
//!
//! - `connect.rs`: the backend's runtime, connecting (timeouts, TLS to the
//!   database), driving a connection, taking this server's name.
//! - `schema.rs`: `MIGRATIONS` and applying them ([`SCHEMA_VERSION`]).
//! - `write.rs`: the writer's prepared `Statements`, the calls of a group
//!   commit (`calls`, `write_calls`), and `pipeline`.
//! - `read.rs`: the [`Reader`] (the read pool), `task_record`, `fleet`, and
//!   rows turned into tasks and cursors.
//! - `watch.rs`: the [`Watcher`]: LISTEN/NOTIFY, polling, the heartbeat,
//!   the generator's lease.
//! - here: the [`Postgres`] backend and its [`Backend`] impl, and what the
//!   parts share (errors, ids, the advisory lock keys, the channel).

mod connect;
mod read;
mod schema;
mod watch;
mod write;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_postgres::{Client, NoTls, error::SqlState, types::ToSql};

use self::{
    connect::{Connector, Runtime, take},
    read::{RESULTS_OF, TASK_COLUMNS, saved_cursor, stored_task, task_by_id, task_record},
    schema::migrate,
    write::{Pending, Statements, calls, pipeline},
};
pub use self::{
    read::Reader,
    schema::SCHEMA_VERSION,
    watch::{Watcher, Watching},
};
use super::{
    Backend, Detail, JobRow, LostClaim, Op, Pruned, RelayedAck, Retention, RunRecord, RunRow,
    RunsNews, Snapshot, StoreError, StoredTask, TaskRecord,
};
use crate::{
    config::{
        StoreConfig,
        store::{Target, parse},
    },
    model::{SavedAgent, TaskState},
};

/// Advisory lock keys ("ctd1" and a number): migrating, and the task
/// generator's lease. (A server's name is locked by its hash.)
const MIGRATE_LOCK: i64 = 0x6374_6431_0000_0001;
const GENERATOR_LOCK: i64 = 0x6374_6431_0000_0002;

/// The channel publishes notify.
const CHANNEL: &str = "contactd_tasks";

/// Rows one housekeeping call deletes at most (a short transaction).
const PRUNE_BATCH: i64 = 2000;

/// An open contactd database in PostgreSQL.
pub struct Postgres {
    runtime: Runtime,
    client: Client,
    statements: Statements,
    target: Target,
    connect: Connector,
    /// This server's name among those sharing the database.
    server: Arc<str>,
    /// A transaction is open: [`Backend::reserve`] began it.
    in_transaction: bool,
    /// The claims the last apply lost, for [`Backend::lost_claims`].
    lost: Vec<(usize, LostClaim)>,
    /// The runs the last apply did not fire (see [`Backend::refused_runs`]).
    refused: Vec<u64>,
    /// After a failed reconnect: none is tried before this.
    retry_at: Option<Instant>,
    /// Round trips to the database and statements sent, over the
    /// backend's life (logged at close: what each task costs it).
    round_trips: u64,
    sent: u64,
    reconnects: crate::backoff::Backoff,
}

fn failed(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(code) if *code == SqlState::DISK_FULL || *code == SqlState::OUT_OF_MEMORY => {
            StoreError::full(e.to_string(), e)
        }
        // The connection went (the database restarted or is unreachable);
        // or the server is shutting down, or cannot take connections.
        Some(code)
            if *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS =>
        {
            StoreError::Unavailable(described("", e))
        }
        None if e.is_closed() => StoreError::Unavailable(described("", e)),
        _ => StoreError::Failed(described("", e)),
    }
}

/// The error with its server-side message and detail, when there are.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// [`describe`]'s text, after `context` unless it is empty, with the
/// error that text ends with as the source: the server's `DbError` or the
/// cause of a client-side error (`e` itself when it has none), so
/// `crate::error_chain` does not say it twice.
fn described(context: &str, e: tokio_postgres::Error) -> Detail {
    let text = match (context, describe(&e)) {
        ("", described) => described,
        (context, described) => format!("{context}: {described}"),
    };
    if std::error::Error::source(&e).is_none() {
        return Detail::new(text, e);
    }
    match e.into_source() {
        Some(cause) => Detail::new(text, cause),
        None => Detail::from(text),
    }
}

fn id(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Postgres {
    /// Connects to the database `config` names, migrates its schema to
    /// this version, and takes it for this server.
    ///
    /// # Errors
    /// [`StoreError::Open`] for a URL or CA file that cannot be used, or a
    /// database this contactd must not change; [`StoreError::Locked`] when
    /// another server has it; [`StoreError::Failed`] when it cannot be
    /// reached.
    pub fn open(config: &StoreConfig, server: &str) -> Result<Postgres, StoreError> {
        let url = config
            .postgres_url()
            .map_err(|reason| StoreError::Unusable(reason.into()))?;
        let target = parse(&url)
            .map_err(|reason| StoreError::Unusable(format!("store.url {reason}").into()))?;
        let connect = Connector {
            timeout: config.connect_timeout,
            ca_file: config.ca_file.clone(),
            poll: config.poll_interval,
        };
        let runtime = Runtime(Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| {
                    StoreError::failed(format!("cannot start the store's runtime: {e}"), e)
                })?,
        ));
        let client = runtime.block_on(connect.connect(&target, None))?;
        let statements = runtime.block_on(async {
            migrate(&client, &target.name).await?;
            take(&client, &target.name, server).await?;
            Statements::prepare(&client, server).await.map_err(failed)
        })?;
        tracing::info!(database = %target.name, tls = target.tls, server, "task store connected");
        Ok(Postgres {
            runtime,
            client,
            statements,
            target,
            connect,
            server: Arc::from(server),
            in_transaction: false,
            lost: Vec::new(),
            refused: Vec::new(),
            retry_at: None,
            round_trips: 0,
            sent: 0,
            reconnects: crate::backoff::Backoff::new(crate::config::BackoffConfig {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
                ..crate::config::BackoffConfig::default()
            }),
        })
    }

    /// A pool of at most `size` connections for reads (see [`Reader`]).
    ///
    /// # Errors
    /// The CA file cannot be used.
    pub fn reader(&self, size: usize) -> Result<Reader, StoreError> {
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let config = self.connect.config(&self.target);
        let manager = match self.connect.tls(&self.target)? {
            Some(make) => deadpool_postgres::Manager::from_config(config, make, manager_config),
            None => deadpool_postgres::Manager::from_config(config, NoTls, manager_config),
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(self.connect.timeout))
            .create_timeout(Some(self.connect.timeout))
            .build()
            .map_err(|e| StoreError::failed(format!("cannot make the read pool: {e}"), e))?;
        Ok(Reader {
            pool,
            name: self.target.name.clone(),
        })
    }

    /// What watches the database for this server (see [`Watcher`]).
    pub fn watcher(&self) -> Watcher {
        Watcher {
            target: self.target.clone(),
            connect: self.connect.clone(),
            server: Arc::clone(&self.server),
        }
    }

    /// Reconnects after the connection was lost, taking the database again.
    fn reconnect(&mut self) -> Result<(), StoreError> {
        let (target, connect) = (self.target.clone(), self.connect.clone());
        let server = Arc::clone(&self.server);
        self.in_transaction = false;
        let (client, statements) = self.runtime.block_on(async {
            let client = connect.connect(&target, None).await?;
            take(&client, &target.name, &server).await?;
            let statements = Statements::prepare(&client, &server)
                .await
                .map_err(failed)?;
            Ok::<_, StoreError>((client, statements))
        })?;
        tracing::info!(database = %target.name, "task store reconnected");
        self.client = client;
        self.statements = statements;
        Ok(())
    }

    /// Runs `work` on the connection, reconnecting first when it was lost.
    fn with_client<T>(
        &mut self,
        work: impl AsyncFnOnce(&Client, &Statements) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.client.is_closed() {
            // With backoff: while the database is down, every group commit
            // would otherwise try to connect.
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return Err(StoreError::Unavailable(
                    format!(
                        "the database {} is unreachable (reconnecting)",
                        self.target.name
                    )
                    .into(),
                ));
            }
            if let Err(e) = self.reconnect() {
                self.retry_at = Some(Instant::now() + self.reconnects.next_delay());
                return Err(e);
            }
            self.retry_at = None;
            self.reconnects.reset();
        }
        self.runtime.block_on(work(&self.client, &self.statements))
    }
}

impl Backend for Postgres {
    fn load(&mut self, ring: usize, queue_mode: bool) -> Result<Snapshot, StoreError> {
        let server = Arc::clone(&self.server);
        self.with_client(async |client, _| {
            let meta = client
                .query(
                    "SELECT (SELECT value FROM contactd_meta WHERE key = 'epoch'), \
                            (SELECT value FROM contactd_meta WHERE key = 'next_id'), \
                            (SELECT coalesce(max(id), 0) FROM tasks)",
                    &[],
                )
                .await
                .map_err(failed)?;
            let row = &meta[0];
            let epoch: i64 = row.get::<_, Option<i64>>(0).unwrap_or(1);
            let stored_next: i64 = row.get::<_, Option<i64>>(1).unwrap_or(1);
            let max_id: i64 = row.get(2);
            let next_id = u64::try_from(stored_next.max(max_id + 1)).unwrap_or(1);
            let first = id(next_id.saturating_sub(ring as u64));
            let mut tasks: Vec<StoredTask> = client
                .query(
                    &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id >= $1 ORDER BY id"),
                    &[&first],
                )
                .await
                .map_err(failed)?
                .iter()
                .map(stored_task)
                .collect();
            if queue_mode {
                let unfinished = client
                    .query(
                        &format!(
                            "SELECT {TASK_COLUMNS} FROM tasks WHERE state < 2 AND id < $1 \
                             ORDER BY id"
                        ),
                        &[&first],
                    )
                    .await
                    .map_err(failed)?;
                tasks.splice(0..0, unfinished.iter().map(stored_task));
            }
            // The tasks of unfinished runs, however old: their runs resume.
            let run_tasks = client
                .query(
                    &format!(
                        "SELECT {TASK_COLUMNS} FROM tasks WHERE id < $1 AND id IN \
                         (SELECT task_id FROM runs WHERE state < 2) ORDER BY id"
                    ),
                    &[&first],
                )
                .await
                .map_err(failed)?;
            for task in run_tasks.iter().map(stored_task) {
                if let Err(at) = tasks.binary_search_by_key(&task.id, |t| t.id) {
                    tasks.insert(at, task);
                }
            }
            let jobs = read::jobs(client).await?;
            // Its own runs resume; another's only once that server is gone
            // (`adopt`). Runs from before servers were recorded (schema 3)
            // go to the first server that starts.
            client
                .execute(
                    "UPDATE runs SET server = $1 WHERE state < 2 AND server IS NULL",
                    &[&&*server],
                )
                .await
                .map_err(failed)?;
            let unfinished: Vec<i64> = client
                .query(
                    "SELECT task_id FROM runs WHERE state < 2 AND server = $1 ORDER BY task_id",
                    &[&&*server],
                )
                .await
                .map_err(failed)?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut runs = Vec::with_capacity(unfinished.len());
            for task in unfinished {
                if let Some(run) = read::run(client, u64::try_from(task).unwrap_or(0)).await? {
                    runs.push(run);
                }
            }
            let cursors = client
                .query(
                    "SELECT agent, watermark, above, sent_up_to, seen_ms, since FROM cursors",
                    &[],
                )
                .await
                .map_err(failed)?
                .iter()
                .map(saved_cursor)
                .collect();
            let agents = client
                .query(
                    "SELECT name, first_ms, last_ms, delivered, acked, failed FROM agents \
                     ORDER BY last_ms DESC",
                    &[],
                )
                .await
                .map_err(failed)?
                .iter()
                .map(|row| {
                    let n = |i| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
                    SavedAgent {
                        name: Arc::from(row.get::<_, String>(0)),
                        first_ms: row.get(1),
                        last_ms: row.get(2),
                        delivered: n(3),
                        acked: n(4),
                        failed: n(5),
                    }
                })
                .collect();
            Ok(Snapshot {
                epoch: super::epoch_from_column(epoch),
                next_id,
                tasks,
                cursors,
                agents,
                jobs,
                runs,
            })
        })
    }

    fn apply(&mut self, ops: &[Op<'_>]) -> Result<(), StoreError> {
        let began = std::mem::take(&mut self.in_transaction);
        if began && self.client.is_closed() {
            return Err(StoreError::Unavailable(
                "the database connection was lost before the commit".into(),
            ));
        }
        let (lost, sent, refused) = self.with_client(async |client, statements| {
            let (calls, claims, fires) = calls(statements, ops);
            // BEGIN (unless reserve began it), the calls, COMMIT.
            let sent = calls.len() as u64 + 1 + u64::from(!began);
            let params: Vec<Vec<&(dyn ToSql + Sync)>> = calls
                .iter()
                .map(|(_, values)| values.iter().map(|v| &**v as &(dyn ToSql + Sync)).collect())
                .collect();
            let mut futures: Vec<Pending<'_>> = Vec::with_capacity(calls.len() + 2);
            if !began {
                futures.push(Box::pin(async {
                    client.batch_execute("BEGIN").await.map(|()| 0)
                }));
            }
            let first_call = futures.len();
            for ((statement, _), params) in calls.iter().zip(&params) {
                futures.push(Box::pin(client.execute(*statement, params)));
            }
            futures.push(Box::pin(async {
                client.batch_execute("COMMIT").await.map(|()| 0)
            }));
            // The first error is the cause; later statements only say the
            // transaction was aborted (and COMMIT then rolls it back).
            let results: Vec<u64> = match pipeline(futures).await.into_iter().collect() {
                Ok(counts) => counts,
                Err(e) => {
                    // After an error COMMIT has rolled back; after a lost
                    // connection there is nothing to roll back.
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(failed(e));
                }
            };
            // A fire that stored no task: its job's nominal time had a run.
            let refused: Vec<u64> = fires
                .iter()
                .filter(|(call, _)| results[first_call + call] == 0)
                .map(|(_, task)| *task)
                .collect();
            // A claim that changed no row lost to another server's (or
            // found the task finished): what the database says of it.
            let lost: Vec<(usize, i64)> = claims
                .iter()
                .filter(|(call, _, _)| results[first_call + call] == 0)
                .map(|(_, op, task)| (*op, *task))
                .collect();
            if lost.is_empty() {
                return Ok((Vec::new(), sent, refused));
            }
            let ids: Vec<i64> = lost.iter().map(|(_, task)| *task).collect();
            let rows = client
                .query(
                    "SELECT id, state, holder, deadline_ms FROM tasks WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(failed)?;
            let said: HashMap<i64, LostClaim> = rows
                .iter()
                .map(|row| {
                    let claim = LostClaim {
                        state: TaskState::from_u8(u8::try_from(row.get::<_, i16>(1)).unwrap_or(0)),
                        holder: row.get::<_, Option<String>>(2).map(Arc::from),
                        deadline_ms: row.get(3),
                    };
                    (row.get::<_, i64>(0), claim)
                })
                .collect();
            let lost = lost
                .into_iter()
                .map(|(op, task)| {
                    // Deleted meanwhile: finished as far as anyone knows.
                    let claim = said.get(&task).cloned().unwrap_or(LostClaim {
                        state: TaskState::Cancelled,
                        holder: None,
                        deadline_ms: None,
                    });
                    (op, claim)
                })
                .collect();
            // And the query of the lost claims.
            Ok((lost, sent + 1, refused))
        })?;
        self.refused = refused;
        self.round_trips += 1 + u64::from(!lost.is_empty());
        self.sent += sent;
        self.lost = lost;
        Ok(())
    }

    fn lost_claims(&mut self) -> Vec<(usize, LostClaim)> {
        std::mem::take(&mut self.lost)
    }

    fn refused_runs(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.refused)
    }

    fn jobs(&mut self) -> Result<Vec<JobRow>, StoreError> {
        self.with_client(async |client, _| read::jobs(client).await)
    }

    fn runs(&mut self, job: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError> {
        self.with_client(async |client, _| read::runs(client, job, limit).await)
    }

    fn run(&mut self, task: u64) -> Result<Option<RunRecord>, StoreError> {
        self.with_client(async |client, _| read::run(client, task).await)
    }

    fn runs_news(
        &mut self,
        mine: &[(u64, i64)],
        silent_before_ms: i64,
    ) -> Result<RunsNews, StoreError> {
        let server = Arc::clone(&self.server);
        self.with_client(async |client, _| {
            let ids: Vec<i64> = mine.iter().map(|(task, _)| id(*task)).collect();
            let since: Vec<i64> = mine.iter().map(|(_, since)| *since).collect();
            let relayed = client
                .query(
                    "SELECT r.task_id, r.agent, r.ok, r.at_ms FROM results r \
                     JOIN unnest($1::bigint[], $2::bigint[]) AS m(task_id, since) \
                     ON r.task_id = m.task_id AND r.at_ms >= m.since",
                    &[&ids, &since],
                )
                .await
                .map_err(failed)?
                .iter()
                .map(|row| RelayedAck {
                    task_id: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                    agent: Arc::from(row.get::<_, String>(1)),
                    ok: row.get(2),
                    at_ms: row.get(3),
                })
                .collect();
            let pairs = |rows: Vec<tokio_postgres::Row>| -> Vec<(u64, Arc<str>)> {
                rows.iter()
                    .map(|row| {
                        (
                            u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                            Arc::from(row.get::<_, Option<String>>(1).unwrap_or_default()),
                        )
                    })
                    .collect()
            };
            let taken = pairs(
                client
                    .query(
                        "SELECT task_id, server FROM runs WHERE task_id = ANY($1) \
                         AND server IS DISTINCT FROM $2",
                        &[&ids, &&*server],
                    )
                    .await
                    .map_err(failed)?,
            );
            let orphans = pairs(
                client
                    .query(
                        "SELECT r.task_id, r.server FROM runs r \
                         LEFT JOIN servers s ON s.name = r.server \
                         WHERE r.state < 2 AND r.server <> $1 \
                         AND (s.name IS NULL OR s.stopped OR s.heartbeat_ms < $2) \
                         ORDER BY r.task_id",
                        &[&&*server, &silent_before_ms],
                    )
                    .await
                    .map_err(failed)?,
            );
            Ok(RunsNews {
                relayed,
                taken,
                orphans,
            })
        })
    }

    fn adopt(&mut self, from: &str, runs: &[u64]) -> Result<Vec<RunRecord>, StoreError> {
        let server = Arc::clone(&self.server);
        self.with_client(async |client, _| {
            let ids: Vec<i64> = runs.iter().map(|task| id(*task)).collect();
            client.batch_execute("BEGIN").await.map_err(failed)?;
            let taken = async {
                // Held to the commit: a server of that name starting now
                // waits for it (`take` tries again), and then finds these
                // runs no longer its own; one running holds it, and keeps them.
                let free: bool = client
                    .query_one(
                        "SELECT pg_try_advisory_xact_lock(\
                         hashtextextended('contactd server ' || $1, 0))",
                        &[&from],
                    )
                    .await
                    .map_err(failed)?
                    .get(0);
                if !free {
                    return Ok(Vec::new());
                }
                Ok(client
                    .query(
                        "UPDATE runs SET server = $1 WHERE task_id = ANY($2) AND state < 2 \
                         AND server = $3 RETURNING task_id",
                        &[&&*server, &ids, &from],
                    )
                    .await
                    .map_err(failed)?
                    .iter()
                    .map(|row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
                    .collect::<Vec<u64>>())
            }
            .await;
            let end = if taken.is_ok() { "COMMIT" } else { "ROLLBACK" };
            client.batch_execute(end).await.map_err(failed)?;
            let mut records = Vec::new();
            for task in taken? {
                if let Some(run) = read::run(client, task).await? {
                    records.push(run);
                }
            }
            Ok(records)
        })
    }

    fn prune(&mut self, retention: &Retention) -> Result<Pruned, StoreError> {
        let r = *retention;
        self.with_client(async |client, _| {
            // Broadcast mode: every task is delivered from the ring only,
            // so every task counts as finished here.
            // The task of a run not finished is kept, whatever its age.
            let finished = if r.queue_mode {
                "state >= 2 AND id NOT IN (SELECT task_id FROM runs WHERE state < 2)"
            } else {
                "id NOT IN (SELECT task_id FROM runs WHERE state < 2)"
            };
            client.batch_execute("BEGIN").await.map_err(failed)?;
            let result = async {
                let mut ids: Vec<i64> = client
                    .query(
                        &format!(
                            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE \
                             {finished} AND created_ms < $1 ORDER BY id LIMIT $2) RETURNING id"
                        ),
                        &[&r.created_before_ms, &PRUNE_BATCH],
                    )
                    .await
                    .map_err(failed)?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                let kept: i64 = client
                    .query_one(&format!("SELECT count(*) FROM tasks WHERE {finished}"), &[])
                    .await
                    .map_err(failed)?
                    .get(0);
                let excess = (kept - i64::try_from(r.retain_finished).unwrap_or(i64::MAX))
                    .clamp(0, PRUNE_BATCH - ids.len() as i64);
                if excess > 0 {
                    let more = client
                        .query(
                            &format!(
                                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE \
                                 {finished} ORDER BY id LIMIT $1) RETURNING id"
                            ),
                            &[&excess],
                        )
                        .await
                        .map_err(failed)?;
                    ids.extend(more.iter().map(|row| row.get::<_, i64>(0)));
                }
                for table in ["results", "runs", "run_agents"] {
                    client
                        .execute(
                            &format!("DELETE FROM {table} WHERE task_id = ANY($1)"),
                            &[&ids],
                        )
                        .await
                        .map_err(failed)?;
                }
                let cursors = client
                    .execute(
                        "DELETE FROM cursors WHERE seen_ms < $1",
                        &[&r.forget_before_ms],
                    )
                    .await
                    .map_err(failed)?;
                let agents = client
                    .execute(
                        "DELETE FROM agents WHERE last_ms < $1",
                        &[&r.forget_before_ms],
                    )
                    .await
                    .map_err(failed)?;
                Ok(Pruned {
                    tasks: ids.len() as u64,
                    cursors,
                    agents,
                })
            }
            .await;
            let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
            client.batch_execute(end).await.map_err(failed)?;
            result
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn close(&mut self) {
        tracing::debug!(
            round_trips = self.round_trips,
            statements = self.sent,
            "task store closing"
        );
        // Lets go of this server's name now, not when PostgreSQL notices
        // the connection closed: a restart may take it at once.
        let _ = self.with_client(async |client, _| {
            client
                .batch_execute("SELECT pg_advisory_unlock_all()")
                .await
                .map_err(failed)
        });
    }

    fn reserve(&mut self, count: u64) -> Result<u64, StoreError> {
        let count = id(count);
        let first = self.with_client(async |client, s| {
            let params: [&(dyn ToSql + Sync); 1] = [&count];
            // One round trip for both.
            let (begun, row) = tokio::join!(
                client.batch_execute("BEGIN"),
                client.query_one(&s.reserve, &params),
            );
            match begun.and(row) {
                Ok(row) => Ok(row.get::<_, i64>(0)),
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    Err(failed(e))
                }
            }
        })?;
        self.round_trips += 1;
        self.sent += 2;
        self.in_transaction = true;
        Ok(u64::try_from(first).unwrap_or(0))
    }

    fn tasks_after(&mut self, after: u64, limit: usize) -> Result<Vec<StoredTask>, StoreError> {
        let (after, limit) = (id(after), i64::try_from(limit).unwrap_or(i64::MAX));
        self.round_trips += 1;
        self.sent += 1;
        self.with_client(async |client, s| {
            let rows = client
                .query(&s.after, &[&after, &limit])
                .await
                .map_err(failed)?;
            Ok(rows.iter().map(stored_task).collect())
        })
    }

    /// Not used while the server runs (its reads go through [`Reader`]).
    fn task(&mut self, task: u64) -> Result<Option<TaskRecord>, StoreError> {
        self.with_client(async |client, _| {
            let (by_id, results) = (task_by_id(), RESULTS_OF);
            let (by_id, results) = tokio::join!(client.prepare(&by_id), client.prepare(results));
            task_record(
                client,
                &by_id.map_err(failed)?,
                &results.map_err(failed)?,
                task,
            )
            .await
        })
    }
}
