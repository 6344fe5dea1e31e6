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

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement, error::SqlState, types::ToSql};

use super::{
    AgentResult, Backend, Fleet, FleetAgent, LostClaim, Op, Pruned, Retention, ServerRow, Snapshot,
    StoreError, StoredTask, TaskRecord, Write, cursor_from_parts, cursor_parts,
};
use crate::{
    config::{
        StoreConfig,
        store::{Target, parse},
    },
    model::{Saved, SavedAgent, TaskState},
};

/// Schema migrations: `MIGRATIONS[n]` brings version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: what SQLite's schema 2 holds: tasks, per-agent results, broadcast
    // cursors, the agent roster, counters.
    "CREATE TABLE contactd_meta (
         key TEXT PRIMARY KEY,
         value BIGINT NOT NULL
     );
     CREATE TABLE tasks (
         id BIGINT PRIMARY KEY,
         text TEXT NOT NULL,
         target TEXT,
         created_ms BIGINT NOT NULL,
         state SMALLINT NOT NULL DEFAULT 0,
         attempts INTEGER NOT NULL DEFAULT 0,
         holder TEXT,
         deadline_ms BIGINT,
         delivered INTEGER NOT NULL DEFAULT 0,
         acked INTEGER NOT NULL DEFAULT 0,
         failed INTEGER NOT NULL DEFAULT 0,
         last_agent TEXT,
         last_result TEXT,
         retries INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX tasks_unfinished ON tasks (id) WHERE state < 2;
     CREATE INDEX tasks_finished ON tasks (id) WHERE state >= 2;
     CREATE TABLE results (
         task_id BIGINT NOT NULL,
         agent TEXT NOT NULL,
         ok BOOLEAN NOT NULL,
         text TEXT NOT NULL,
         at_ms BIGINT NOT NULL,
         PRIMARY KEY (task_id, agent)
     );
     CREATE TABLE cursors (
         agent TEXT PRIMARY KEY,
         watermark BIGINT NOT NULL,
         above BYTEA NOT NULL,
         sent_up_to BIGINT NOT NULL,
         seen_ms BIGINT NOT NULL,
         since BIGINT NOT NULL DEFAULT 0
     );
     CREATE TABLE agents (
         name TEXT PRIMARY KEY,
         first_ms BIGINT NOT NULL,
         last_ms BIGINT NOT NULL,
         delivered BIGINT NOT NULL,
         acked BIGINT NOT NULL,
         failed BIGINT NOT NULL,
         server TEXT,
         connected BOOLEAN NOT NULL DEFAULT FALSE,
         address TEXT
     );
     CREATE TABLE servers (
         name TEXT PRIMARY KEY,
         started_ms BIGINT NOT NULL,
         heartbeat_ms BIGINT NOT NULL,
         stopped BOOLEAN NOT NULL DEFAULT FALSE
     );",
];

/// The schema version this contactd writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Advisory lock keys ("ctd1" and a number): migrating, and the task
/// generator's lease. (A server's name is locked by its hash.)
const MIGRATE_LOCK: i64 = 0x6374_6431_0000_0001;
const GENERATOR_LOCK: i64 = 0x6374_6431_0000_0002;

/// How long a server waits for its name to be free at start-up.
const TAKE_TRIES: u32 = 50;
const TAKE_WAIT: Duration = Duration::from_millis(100);

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
    /// After a failed reconnect: none is tried before this.
    retry_at: Option<Instant>,
    /// Round trips to the database and statements sent, over the
    /// backend's life (logged at close: what each task costs it).
    round_trips: u64,
    sent: u64,
    reconnects: crate::backoff::Backoff,
}

/// The backend's own runtime, dropped without blocking: a backend opened
/// but not started (another start-up check failed) is dropped in async
/// code, where dropping a runtime the usual way panics.
struct Runtime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Runtime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0
            .as_ref()
            .expect("the runtime lives as long as the backend")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// What (re)connecting needs.
#[derive(Clone)]
struct Connector {
    timeout: Duration,
    ca_file: Option<PathBuf>,
    poll: Duration,
}

fn failed(e: &tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(code) if *code == SqlState::DISK_FULL || *code == SqlState::OUT_OF_MEMORY => {
            StoreError::Full(e.to_string())
        }
        // The connection went (the database restarted or is unreachable);
        // or the server is shutting down, or cannot take connections.
        Some(code)
            if *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS =>
        {
            StoreError::Unavailable(describe(e))
        }
        None if e.is_closed() => StoreError::Unavailable(describe(e)),
        _ => StoreError::Failed(describe(e)),
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

fn id(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn state_code(state: TaskState) -> i16 {
    i16::from(state as u8)
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
        let url = config.postgres_url().map_err(StoreError::Unusable)?;
        let target =
            parse(&url).map_err(|reason| StoreError::Unusable(format!("store.url {reason}")))?;
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
                    StoreError::Failed(format!("cannot start the store's runtime: {e}"))
                })?,
        ));
        let client = runtime.block_on(connect.connect(&target, None))?;
        let statements = runtime.block_on(async {
            migrate(&client, &target.name).await?;
            take(&client, &target.name, server).await?;
            Statements::prepare(&client).await.map_err(|e| failed(&e))
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
            .map_err(|e| StoreError::Failed(format!("cannot make the read pool: {e}")))?;
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
            let statements = Statements::prepare(&client).await.map_err(|e| failed(&e))?;
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
                return Err(StoreError::Unavailable(format!(
                    "the database {} is unreachable (reconnecting)",
                    self.target.name
                )));
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

impl Connector {
    /// `target`'s settings with this server's timeouts.
    fn config(&self, target: &Target) -> tokio_postgres::Config {
        let mut config = target.config.clone();
        config.connect_timeout(self.timeout);
        // A database host that vanished (no reset) is noticed in about a
        // minute, not at the kernel's default of hours.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .tcp_user_timeout(Duration::from_secs(60));
        config
    }

    /// The TLS connector when `target` asks for TLS.
    fn tls(
        &self,
        target: &Target,
    ) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
        if !target.tls {
            return Ok(None);
        }
        let tls = crate::tls::ClientTls {
            ca: self.ca_file.clone(),
            ..Default::default()
        }
        .config()
        .map_err(|e| StoreError::Unusable(format!("store.ca_file: {e}")))?;
        // No ALPN: the agents' "h2" means nothing to PostgreSQL (and
        // PostgreSQL 17 refuses a protocol it does not know).
        let mut tls = Arc::unwrap_or_clone(tls);
        tls.alpn_protocols.clear();
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)))
    }

    /// Connects, sending a `()` on `notices` for each notification.
    async fn connect(
        &self,
        target: &Target,
        notices: Option<mpsc::UnboundedSender<()>>,
    ) -> Result<Client, StoreError> {
        let config = self.config(target);
        let unreachable = |e: &tokio_postgres::Error| {
            StoreError::Unavailable(format!(
                "cannot connect to the database {}: {}",
                target.name,
                describe(e)
            ))
        };
        let started = Instant::now();
        let client = if let Some(make) = self.tls(target)? {
            let (client, connection) = tokio::time::timeout(self.timeout, config.connect(make))
                .await
                .map_err(|_| timed_out(target, started))?
                .map_err(|e| unreachable(&e))?;
            tokio::spawn(drive(connection, notices));
            client
        } else {
            let (client, connection) = tokio::time::timeout(self.timeout, config.connect(NoTls))
                .await
                .map_err(|_| timed_out(target, started))?
                .map_err(|e| unreachable(&e))?;
            tokio::spawn(drive(connection, notices));
            client
        };
        Ok(client)
    }
}

/// Reads for the server's async code (the fleet view, `task show`, an
/// agent's acks when it connects) on a bounded pool of connections of
/// their own: they neither wait behind the writer's group commits nor hold
/// it up. [`Store`](super::Store) asks the writer for a barrier first, so a
/// read still sees every write sent before it.
pub struct Reader {
    pool: deadpool_postgres::Pool,
    name: String,
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
            deadpool_postgres::PoolError::Backend(e) => failed(&e),
            other => StoreError::Unavailable(format!(
                "no connection to the database {} for a read: {other}",
                self.name
            )),
        })
    }

    /// A named agent's broadcast cursor.
    pub async fn cursor(&self, agent: &str) -> Result<Option<Saved>, StoreError> {
        let client = self.client().await?;
        let f = |e: tokio_postgres::Error| failed(&e);
        let statement = client.prepare_cached(CURSOR_OF).await.map_err(f)?;
        let row = client.query_opt(&statement, &[&agent]).await.map_err(f)?;
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
        let f = |e: tokio_postgres::Error| failed(&e);
        let ids: Vec<i64> = ids.iter().map(|n| id(*n)).collect();
        let by_ids = tasks_by_ids();
        let statement = client.prepare_cached(&by_ids).await.map_err(f)?;
        let rows = client.query(&statement, &[&ids]).await.map_err(f)?;
        Ok(rows.iter().map(stored_task).collect())
    }

    /// One task and its per-agent results.
    pub async fn task(&self, task: u64) -> Result<Option<TaskRecord>, StoreError> {
        let client = self.client().await?;
        let f = |e: tokio_postgres::Error| failed(&e);
        let by_id = task_by_id();
        let (one, results) = tokio::join!(
            client.prepare_cached(&by_id),
            client.prepare_cached(RESULTS_OF),
        );
        task_record(&client, &one.map_err(f)?, &results.map_err(f)?, task).await
    }
}

fn timed_out(target: &Target, started: Instant) -> StoreError {
    StoreError::Unavailable(format!(
        "cannot connect to the database {}: no answer in {}",
        target.name,
        humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64))
    ))
}

/// Reads the connection until it closes: answers go to their queries,
/// notifications to `notices`.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notices: Option<mpsc::UnboundedSender<()>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ended = std::future::poll_fn(|cx| {
        loop {
            match connection.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notification(_)))) => {
                    if let Some(notices) = &notices {
                        let _ = notices.send(());
                    }
                }
                // The server's notices (warnings): nothing to act on.
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    if let Err(e) = ended {
        // Its next use says what that means (the server logs the database
        // unreachable once, and a failed write is logged where it failed).
        tracing::debug!(
            "the task store's database connection ended: {}",
            describe(&e)
        );
    }
}

/// Brings the schema to [`SCHEMA_VERSION`], one server at a time.
async fn migrate(client: &Client, name: &str) -> Result<(), StoreError> {
    let open = |reason: String| StoreError::Unusable(format!("store.url {name}: {reason}"));
    let f = |e: tokio_postgres::Error| open(describe(&e));
    client.batch_execute("BEGIN").await.map_err(f)?;
    let result = async {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(f)?;
        let row = client
            .query_one(
                "SELECT to_regclass('contactd_meta') IS NOT NULL, \
                        to_regclass('tasks') IS NOT NULL",
                &[],
            )
            .await
            .map_err(f)?;
        let (ours, theirs): (bool, bool) = (row.get(0), row.get(1));
        let version: i64 = if ours {
            client
                .query_opt("SELECT value FROM contactd_meta WHERE key = 'schema'", &[])
                .await
                .map_err(f)?
                .map_or(0, |row| row.get(0))
        } else if theirs {
            return Err(open(
                "has a tasks table but is not a contactd database: not changed (give \
                 contactd a database of its own)"
                    .into(),
            ));
        } else {
            0
        };
        if version > SCHEMA_VERSION {
            return Err(open(format!(
                "was written by a newer contactd (schema {version}; this one knows up to \
                 {SCHEMA_VERSION}): not changed, run that version or a newer one"
            )));
        }
        for (at, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            client.batch_execute(sql).await.map_err(f)?;
            tracing::info!(
                database = name,
                version = at + 1,
                "task store schema migrated"
            );
        }
        if version == 0 {
            let epoch = super::new_epoch();
            client
                .execute(
                    "INSERT INTO contactd_meta (key, value) VALUES ('epoch', $1), ('next_id', 1)",
                    &[&super::epoch_column(epoch)],
                )
                .await
                .map_err(f)?;
        }
        if version < SCHEMA_VERSION {
            client
                .execute(
                    "INSERT INTO contactd_meta (key, value) VALUES ('schema', $1) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(f)?;
        }
        Ok(())
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    client.batch_execute(end).await.map_err(f)?;
    result
}

/// Takes this server's name (until the connection closes) and says it
/// started: two servers of one name would mix up their agents' rows.
async fn take(client: &Client, database: &str, server: &str) -> Result<(), StoreError> {
    let f = |e: tokio_postgres::Error| failed(&e);
    // A server of this name that was just killed holds the name until
    // PostgreSQL sees its connection close: a restart waits that long.
    let mut taken = false;
    for _ in 0..TAKE_TRIES {
        taken = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('contactd server ' || $1, 0))",
                &[&server],
            )
            .await
            .map_err(f)?
            .get(0);
        if taken {
            break;
        }
        tokio::time::sleep(TAKE_WAIT).await;
    }
    if !taken {
        return Err(StoreError::Locked {
            path: database.into(),
            reason: format!(
                "a contactd server named {server:?} is already using this database: give \
                 each server its own server.name"
            ),
        });
    }
    let now = crate::clock::now_ms();
    client
        .execute(
            "INSERT INTO servers (name, started_ms, heartbeat_ms) VALUES ($1, $2, $2) \
             ON CONFLICT (name) DO UPDATE SET started_ms = $2, heartbeat_ms = $2, \
             stopped = FALSE",
            &[&server, &now],
        )
        .await
        .map_err(f)?;
    Ok(())
}

/// Every statement the writer runs, prepared once per connection.
struct Statements {
    insert_task: Statement,
    notify: Statement,
    reserve: Statement,
    after: Statement,
    delivered: Statement,
    claimed: Statement,
    state: Statement,
    cancelled: Statement,
    retried: Statement,
    result: Statement,
    acked: Statement,
    acked_claim: Statement,
    cursor: Statement,
    agent: Statement,
    presence: Statement,
}

const TASK_COLUMNS: &str = "id, text, target, created_ms, state, attempts, holder, deadline_ms, \
                            delivered, acked, failed, last_agent, last_result, retries";

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            insert_task: client
                .prepare(
                    "INSERT INTO tasks (id, text, target, created_ms) \
                     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[])",
                )
                .await?,
            notify: client
                .prepare(&format!("SELECT pg_notify('{CHANNEL}', '')"))
                .await?,
            // The row stays locked until commit: the next server's
            // reservation waits, so tasks are committed in id order.
            reserve: client
                .prepare(
                    "UPDATE contactd_meta SET value = value + $1 WHERE key = 'next_id' \
                     RETURNING value - $1",
                )
                .await?,
            after: client
                .prepare(&format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE id > $1 ORDER BY id LIMIT $2"
                ))
                .await?,
            delivered: client
                .prepare(
                    "UPDATE tasks SET delivered = delivered + 1, \
                     state = CASE WHEN state = 0 THEN 1 ELSE state END WHERE id = $1",
                )
                .await?,
            // Only if no other agent's claim is in force: servers sharing
            // the database race for tasks, and exactly one wins each.
            claimed: client
                .prepare(
                    "UPDATE tasks SET delivered = delivered + 1, \
                     attempts = greatest(attempts + 1, $2), holder = $3, deadline_ms = $4, \
                     state = 1 \
                     WHERE id = $1 AND state < 2 \
                     AND (holder IS NULL OR holder = $3 OR deadline_ms < $5)",
                )
                .await?,
            state: client
                .prepare(
                    "UPDATE tasks SET state = $2, holder = NULL, deadline_ms = NULL \
                     WHERE id = $1 AND holder IS NOT DISTINCT FROM $3 \
                     AND deadline_ms IS NOT DISTINCT FROM $4",
                )
                .await?,
            cancelled: client
                .prepare(
                    "UPDATE tasks SET state = $2, \
                     holder = CASE WHEN $3 THEN holder END, \
                     deadline_ms = CASE WHEN $3 THEN deadline_ms END WHERE id = $1",
                )
                .await?,
            retried: client
                .prepare(
                    "UPDATE tasks SET state = $2, attempts = 0, holder = NULL, \
                     deadline_ms = NULL, retries = retries + 1 WHERE id = $1",
                )
                .await?,
            result: client
                .prepare(
                    "INSERT INTO results (task_id, agent, ok, text, at_ms) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (task_id, agent) DO UPDATE SET \
                     ok = excluded.ok, text = excluded.text, at_ms = excluded.at_ms",
                )
                .await?,
            // Queue mode: only from the agent holding the claim, and only
            // then its result is kept.
            acked_claim: client
                .prepare(
                    "WITH task AS (UPDATE tasks SET acked = acked + $2, failed = failed + $3, \
                     last_agent = $4, last_result = $5, holder = NULL, deadline_ms = NULL, \
                     state = $6 WHERE id = $1 AND state < 2 AND holder = $4 RETURNING id) \
                     INSERT INTO results (task_id, agent, ok, text, at_ms) \
                     SELECT id, $4, $7, $5, $8 FROM task \
                     ON CONFLICT (task_id, agent) DO UPDATE SET \
                     ok = excluded.ok, text = excluded.text, at_ms = excluded.at_ms",
                )
                .await?,
            acked: client
                .prepare(
                    "UPDATE tasks SET acked = acked + $2, failed = failed + $3, \
                     last_agent = $4, last_result = $5, holder = NULL, deadline_ms = NULL, \
                     state = CASE WHEN state < 2 THEN $6 ELSE state END WHERE id = $1",
                )
                .await?,
            cursor: client
                .prepare(
                    "INSERT INTO cursors (agent, watermark, above, sent_up_to, seen_ms, since) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (agent) DO UPDATE SET watermark = excluded.watermark, \
                     above = excluded.above, sent_up_to = excluded.sent_up_to, \
                     seen_ms = excluded.seen_ms, since = excluded.since \
                     WHERE cursors.seen_ms <= excluded.seen_ms",
                )
                .await?,
            agent: client
                .prepare(
                    "INSERT INTO agents (name, first_ms, last_ms, delivered, acked, failed) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (name) DO UPDATE SET \
                     first_ms = least(agents.first_ms, excluded.first_ms), \
                     last_ms = greatest(agents.last_ms, excluded.last_ms), \
                     delivered = excluded.delivered, acked = excluded.acked, \
                     failed = excluded.failed",
                )
                .await?,

            // A disconnect seen late by the server the agent left must not
            // undo its connect to another.
            presence: client
                .prepare(
                    "INSERT INTO agents (name, first_ms, last_ms, delivered, acked, failed, \
                     server, connected, address) VALUES ($1, $5, $5, 0, 0, 0, $2, $3, $4) \
                     ON CONFLICT (name) DO UPDATE SET \
                     last_ms = greatest(agents.last_ms, $5), \
                     server = CASE WHEN $3 THEN $2 ELSE agents.server END, \
                     address = CASE WHEN $3 THEN $4 ELSE agents.address END, \
                     connected = CASE WHEN $3 THEN TRUE \
                                      WHEN agents.server = $2 THEN FALSE \
                                      ELSE agents.connected END",
                )
                .await?,
        })
    }
}

fn stored_task(row: &tokio_postgres::Row) -> StoredTask {
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
    }
}

/// A cursor row (agent, watermark, above, sent_up_to, seen_ms, since).
fn saved_cursor(row: &tokio_postgres::Row) -> Saved {
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

/// One statement with its parameters, owned until it has run.
type Call<'a> = (&'a Statement, Vec<Box<dyn ToSql + Sync + Send>>);

/// The statements that apply `ops`, in order.
/// The statements that apply `ops`, in order, and which of them are
/// queue claims: (its index among the calls, the op's index, the task).
fn calls<'a>(s: &'a Statements, ops: &[Op<'_>]) -> (Vec<Call<'a>>, Vec<(usize, usize, i64)>) {
    let mut calls: Vec<Call<'a>> = Vec::with_capacity(ops.len() + 1);
    let mut claims = Vec::new();
    let mut published = false;
    for (at, op) in ops.iter().enumerate() {
        match op {
            Op::Publish(tasks) => {
                let ids: Vec<i64> = tasks.iter().map(|t| id(t.id)).collect();
                let texts: Vec<String> = tasks.iter().map(|t| t.text.to_string()).collect();
                let targets: Vec<Option<String>> = tasks
                    .iter()
                    .map(|t| t.target.as_deref().map(str::to_owned))
                    .collect();
                let created: Vec<i64> = tasks
                    .iter()
                    .map(|t| crate::clock::unix_ms(t.created))
                    .collect();
                published = true;
                calls.push((
                    &s.insert_task,
                    vec![
                        Box::new(ids),
                        Box::new(texts),
                        Box::new(targets),
                        Box::new(created),
                    ],
                ));
            }
            Op::Write(write) => {
                if let Write::Claimed { id: task, .. } = write {
                    claims.push((calls.len(), at, id(*task)));
                }
                calls.extend(write_calls(s, write));
            }
        }
    }
    if published {
        // Sent at commit: every server reads the new tasks.
        calls.push((&s.notify, Vec::new()));
    }
    (calls, claims)
}

fn write_calls<'a>(s: &'a Statements, write: &Write) -> Vec<Call<'a>> {
    match write {
        Write::Delivered { ids } => ids
            .iter()
            .map(|task| -> Call<'a> { (&s.delivered, vec![Box::new(id(*task))]) })
            .collect(),
        Write::Claimed {
            id: task,
            attempt,
            holder,
            deadline_ms,
        } => vec![(
            &s.claimed,
            vec![
                Box::new(id(*task)),
                Box::new(i32::try_from(*attempt).unwrap_or(i32::MAX)),
                Box::new(holder.to_string()),
                Box::new(*deadline_ms),
                Box::new(crate::clock::now_ms()),
            ],
        )],
        Write::State {
            id: task,
            state,
            claim,
        } => vec![(
            &s.state,
            vec![
                Box::new(id(*task)),
                Box::new(state_code(*state)),
                Box::new(claim.as_ref().map(|(holder, _)| holder.to_string())),
                Box::new(claim.as_ref().map(|(_, deadline)| *deadline)),
            ],
        )],
        Write::Cancelled { id: task, held } => vec![(
            &s.cancelled,
            vec![
                Box::new(id(*task)),
                Box::new(state_code(TaskState::Cancelled)),
                Box::new(*held),
            ],
        )],
        Write::Retried { id: task } => vec![(
            &s.retried,
            vec![
                Box::new(id(*task)),
                Box::new(state_code(TaskState::Pending)),
            ],
        )],
        Write::Acked {
            id: task,
            agent,
            ok,
            text,
            at_ms,
            claimed,
        } => {
            let state = if *ok {
                TaskState::Acked
            } else {
                TaskState::Failed
            };
            if *claimed {
                return vec![(
                    &s.acked_claim,
                    vec![
                        Box::new(id(*task)),
                        Box::new(i32::from(*ok)),
                        Box::new(i32::from(!*ok)),
                        Box::new(agent.to_string()),
                        Box::new(text.clone()),
                        Box::new(state_code(state)),
                        Box::new(*ok),
                        Box::new(*at_ms),
                    ],
                )];
            }
            vec![
                (
                    &s.result,
                    vec![
                        Box::new(id(*task)),
                        Box::new(agent.to_string()),
                        Box::new(*ok),
                        Box::new(text.clone()),
                        Box::new(*at_ms),
                    ],
                ),
                (
                    &s.acked,
                    vec![
                        Box::new(id(*task)),
                        Box::new(i32::from(*ok)),
                        Box::new(i32::from(!*ok)),
                        Box::new(agent.to_string()),
                        Box::new(text.clone()),
                        Box::new(state_code(state)),
                    ],
                ),
            ]
        }
        Write::Cursor(saved) => {
            let (watermark, above) = cursor_parts(&saved.cursor);
            vec![(
                &s.cursor,
                vec![
                    Box::new(saved.agent.to_string()),
                    Box::new(id(watermark)),
                    Box::new(above),
                    Box::new(id(saved.sent_up_to)),
                    Box::new(saved.seen_ms),
                    Box::new(id(saved.since)),
                ],
            )]
        }
        Write::Presence {
            name,
            server,
            connected,
            address,
            at_ms,
        } => vec![(
            &s.presence,
            vec![
                Box::new(name.to_string()),
                Box::new(server.to_string()),
                Box::new(*connected),
                Box::new(address.clone()),
                Box::new(*at_ms),
            ],
        )],
        Write::Agent(agent) => vec![(
            &s.agent,
            vec![
                Box::new(agent.name.to_string()),
                Box::new(agent.first_ms),
                Box::new(agent.last_ms),
                Box::new(id(agent.delivered)),
                Box::new(id(agent.acked)),
                Box::new(id(agent.failed)),
            ],
        )],
    }
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Runs `futures` to the end, first polling each once in order.
///
/// tokio-postgres sends a statement when its future is first polled and
/// the connection answers in the order it was sent, so every statement
/// goes out before the first answer is awaited: one round trip for all.
/// (`join_all` would do the same for a few, but over 30 futures it does
/// not promise the order it first polls them in.) After the first pass,
/// each wake-up polls from the first unfinished future on and stops at
/// the first still waiting: answers come in order.
async fn pipeline(mut futures: Vec<Pending<'_>>) -> Vec<Result<u64, tokio_postgres::Error>> {
    let mut results: Vec<Option<Result<u64, tokio_postgres::Error>>> =
        std::iter::repeat_with(|| None)
            .take(futures.len())
            .collect();
    let mut first_pass = true;
    let mut done = 0;
    std::future::poll_fn(|cx| {
        for (at, future) in futures.iter_mut().enumerate().skip(done) {
            if results[at].is_some() {
                continue;
            }
            match future.as_mut().poll(cx) {
                Poll::Ready(result) => results[at] = Some(result),
                Poll::Pending if first_pass => {}
                Poll::Pending => break,
            }
        }
        first_pass = false;
        while done < results.len() && results[done].is_some() {
            done += 1;
        }
        if done == results.len() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    results.into_iter().map(Option::unwrap).collect()
}

impl Backend for Postgres {
    fn load(&mut self, ring: usize, queue_mode: bool) -> Result<Snapshot, StoreError> {
        self.with_client(async |client, _| {
            let f = |e: tokio_postgres::Error| failed(&e);
            let meta = client
                .query(
                    "SELECT (SELECT value FROM contactd_meta WHERE key = 'epoch'), \
                            (SELECT value FROM contactd_meta WHERE key = 'next_id'), \
                            (SELECT coalesce(max(id), 0) FROM tasks)",
                    &[],
                )
                .await
                .map_err(f)?;
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
                .map_err(f)?
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
                    .map_err(f)?;
                tasks.splice(0..0, unfinished.iter().map(stored_task));
            }
            let cursors = client
                .query(
                    "SELECT agent, watermark, above, sent_up_to, seen_ms, since FROM cursors",
                    &[],
                )
                .await
                .map_err(f)?
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
                .map_err(f)?
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
        let (lost, sent) = self.with_client(async |client, statements| {
            let (calls, claims) = calls(statements, ops);
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
            let results = pipeline(futures).await;
            // The first error is the cause; later statements only say the
            // transaction was aborted (and COMMIT then rolls it back).
            if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
                // After an error COMMIT has rolled back; after a lost
                // connection there is nothing to roll back.
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(failed(e));
            }
            // A claim that changed no row lost to another server's (or
            // found the task finished): what the database says of it.
            let lost: Vec<(usize, i64)> = claims
                .iter()
                .filter(|(call, _, _)| matches!(results[first_call + call], Ok(0)))
                .map(|(_, op, task)| (*op, *task))
                .collect();
            if lost.is_empty() {
                return Ok((Vec::new(), sent));
            }
            let ids: Vec<i64> = lost.iter().map(|(_, task)| *task).collect();
            let rows = client
                .query(
                    "SELECT id, state, holder, deadline_ms FROM tasks WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(|e| failed(&e))?;
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
            Ok((lost, sent + 1))
        })?;
        self.round_trips += 1 + u64::from(!lost.is_empty());
        self.sent += sent;
        self.lost = lost;
        Ok(())
    }

    fn lost_claims(&mut self) -> Vec<(usize, LostClaim)> {
        std::mem::take(&mut self.lost)
    }

    fn prune(&mut self, retention: &Retention) -> Result<Pruned, StoreError> {
        let r = *retention;
        self.with_client(async |client, _| {
            let f = |e: tokio_postgres::Error| failed(&e);
            // Broadcast mode: every task is delivered from the ring only,
            // so every task counts as finished here.
            let finished = if r.queue_mode { "state >= 2" } else { "TRUE" };
            client.batch_execute("BEGIN").await.map_err(f)?;
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
                    .map_err(f)?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                let kept: i64 = client
                    .query_one(&format!("SELECT count(*) FROM tasks WHERE {finished}"), &[])
                    .await
                    .map_err(f)?
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
                        .map_err(f)?;
                    ids.extend(more.iter().map(|row| row.get::<_, i64>(0)));
                }
                client
                    .execute("DELETE FROM results WHERE task_id = ANY($1)", &[&ids])
                    .await
                    .map_err(f)?;
                let cursors = client
                    .execute(
                        "DELETE FROM cursors WHERE seen_ms < $1",
                        &[&r.forget_before_ms],
                    )
                    .await
                    .map_err(f)?;
                let agents = client
                    .execute(
                        "DELETE FROM agents WHERE last_ms < $1",
                        &[&r.forget_before_ms],
                    )
                    .await
                    .map_err(f)?;
                Ok(Pruned {
                    tasks: ids.len() as u64,
                    cursors,
                    agents,
                })
            }
            .await;
            let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
            client.batch_execute(end).await.map_err(f)?;
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
                .map_err(|e| failed(&e))
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
                    Err(failed(&e))
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
                .map_err(|e| failed(&e))?;
            Ok(rows.iter().map(stored_task).collect())
        })
    }

    /// Not used while the server runs (its reads go through [`Reader`]).
    fn task(&mut self, task: u64) -> Result<Option<TaskRecord>, StoreError> {
        self.with_client(async |client, _| {
            let f = |e: tokio_postgres::Error| failed(&e);
            let (by_id, results) = (task_by_id(), RESULTS_OF);
            let (by_id, results) = tokio::join!(client.prepare(&by_id), client.prepare(results));
            task_record(client, &by_id.map_err(f)?, &results.map_err(f)?, task).await
        })
    }
}

const CURSOR_OF: &str = "SELECT agent, watermark, above, sent_up_to, seen_ms, since FROM cursors \
                         WHERE agent = $1";
const RESULTS_OF: &str =
    "SELECT agent, ok, text, at_ms FROM results WHERE task_id = $1 ORDER BY agent";

fn task_by_id() -> String {
    format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1")
}

fn tasks_by_ids() -> String {
    format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ANY($1)")
}

/// One task and its per-agent results, with the statements `by_id` and
/// `results` ([`task_by_id`], [`RESULTS_OF`]).
async fn task_record(
    client: &Client,
    by_id: &Statement,
    results: &Statement,
    task: u64,
) -> Result<Option<TaskRecord>, StoreError> {
    let f = |e: tokio_postgres::Error| failed(&e);
    let task = id(task);
    let params: [&(dyn ToSql + Sync); 1] = [&task];
    // Both sent at once: one round trip.
    let (stored, results) = tokio::join!(
        client.query_opt(by_id, &params),
        client.query(results, &params),
    );
    let Some(stored) = stored.map_err(f)? else {
        return Ok(None);
    };
    let results = results
        .map_err(f)?
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
    let f = |e: tokio_postgres::Error| failed(&e);
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
        .map_err(f)?
        .iter()
        .map(|row| ServerRow {
            name: row.get(0),
            started_ms: row.get(1),
            heartbeat_ms: row.get(2),
            stopped: row.get(3),
        })
        .collect();
    let agents = agents
        .map_err(f)?
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

/// Watches a shared database for this server, on a thread of its own:
/// listens for the other servers' publishes (and polls every
/// `store.poll_interval`, in case a notification was lost while
/// reconnecting), keeps this server's heartbeat, and holds the task
/// generator's lease when it can.
pub struct Watcher {
    target: Target,
    connect: Connector,
    server: Arc<str>,
}

/// A running [`Watcher`].
#[derive(Debug)]
pub struct Watching {
    stop: tokio_util::sync::CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl Watching {
    /// Stops watching: the heartbeat says stopped, the lease is let go.
    pub async fn stop(self) {
        self.stop.cancel();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

impl Watcher {
    /// Starts watching: `follow` is called on each notice or poll, and
    /// `leader` says whether this server holds the generator's lease.
    ///
    /// # Panics
    /// The thread cannot be started.
    pub fn start(
        self,
        follow: Box<dyn Fn() + Send>,
        leader: watch::Sender<bool>,
        reachable: watch::Sender<bool>,
    ) -> Watching {
        let stop = tokio_util::sync::CancellationToken::new();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("contactd-store-watch".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => {
                            runtime.block_on(self.run(&*follow, &leader, &reachable, &stop));
                        }
                        Err(e) => tracing::error!("cannot watch the task store: {e}"),
                    }
                })
                .expect("spawn the store's watcher thread")
        };
        Watching { stop, thread }
    }

    async fn run(
        &self,
        follow: &(dyn Fn() + Send),
        leader: &watch::Sender<bool>,
        reachable: &watch::Sender<bool>,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        let mut backoff = crate::backoff::Backoff::new(crate::config::BackoffConfig {
            initial: Duration::from_millis(100),
            max: self.connect.poll.max(Duration::from_secs(5)),
            ..crate::config::BackoffConfig::default()
        });
        let mut failures = 0u32;
        loop {
            let (notices, mut noticed) = mpsc::unbounded_channel();
            let watched = match self.connect.connect(&self.target, Some(notices)).await {
                Ok(client) => {
                    failures = 0;
                    backoff.reset();
                    self.watch(&client, &mut noticed, follow, leader, reachable, stop)
                        .await
                }
                Err(e) => Err(e),
            };
            if watched.is_err() {
                // The server logs the change (and what it does about it).
                reachable.send_if_modified(|up| std::mem::replace(up, false));
            }
            if leader.send_replace(false) {
                tracing::warn!(server = %self.server, "this server no longer runs the task generator (its lease went with the database connection)");
            }
            match watched {
                Ok(()) => return,
                Err(e) => {
                    // The server says the database is unreachable, once.
                    failures += 1;
                    tracing::debug!(failures, "cannot watch the task store: {e}");
                }
            }
            let wait = backoff.next_delay();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Watches on `client` until stopped (`Ok`) or the connection fails.
    async fn watch(
        &self,
        client: &Client,
        noticed: &mut mpsc::UnboundedReceiver<()>,
        follow: &(dyn Fn() + Send),
        leader: &watch::Sender<bool>,
        reachable: &watch::Sender<bool>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), StoreError> {
        let f = |e: tokio_postgres::Error| failed(&e);
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(f)?;
        reachable.send_if_modified(|up| !std::mem::replace(up, true));
        // What was published while not listening.
        follow();
        let server: &str = &self.server;
        let mut tick = tokio::time::interval(self.connect.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    client
                        .execute(
                            "UPDATE servers SET heartbeat_ms = $2, stopped = TRUE WHERE name = $1",
                            &[&server, &crate::clock::now_ms()],
                        )
                        .await
                        .map_err(f)?;
                    // The lease goes now: another server takes it at its
                    // next poll.
                    client
                        .batch_execute("SELECT pg_advisory_unlock_all()")
                        .await
                        .map_err(f)?;
                    return Ok(());
                }
                notice = noticed.recv() => match notice {
                    Some(()) => follow(),
                    None => return Err(StoreError::Failed("the database connection ended".into())),
                },
                _ = tick.tick() => {
                    // The fallback: a notification sent while this
                    // connection was down is never received.
                    follow();
                    client
                        .execute(
                            "UPDATE servers SET heartbeat_ms = $2, stopped = FALSE WHERE name = $1",
                            &[&server, &crate::clock::now_ms()],
                        )
                        .await
                        .map_err(f)?;
                    if !*leader.borrow() {
                        let taken: bool = client
                            .query_one("SELECT pg_try_advisory_lock($1)", &[&GENERATOR_LOCK])
                            .await
                            .map_err(f)?
                            .get(0);
                        if taken {
                            tracing::info!(server, "this server runs the task generator (it took the lease)");
                            leader.send_replace(true);
                        }
                    }
                }
            }
        }
    }
}
