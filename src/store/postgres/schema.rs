//! The schema: `MIGRATIONS`, the version they bring a database to, and
//! applying them (one server at a time, never to another program's tables).

use tokio_postgres::Client;

use super::{MIGRATE_LOCK, described};
use crate::store::{StoreError, epoch_column, new_epoch};

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
    // 2: the label selector a broadcast task was submitted for.
    "ALTER TABLE tasks ADD COLUMN selector TEXT;",
    // 3: jobs, their runs (one per job and nominal time at most, whichever
    // server fires it) and each agent's state in a run; the job a task is
    // the run of.
    "ALTER TABLE tasks ADD COLUMN job TEXT;
     ALTER TABLE tasks ADD COLUMN direct BOOLEAN NOT NULL DEFAULT FALSE;
     CREATE TABLE jobs (
         name TEXT PRIMARY KEY,
         last_nominal_ms BIGINT NOT NULL,
         paused BOOLEAN NOT NULL DEFAULT FALSE,
         last_success_ms BIGINT NOT NULL DEFAULT 0
     );
     CREATE TABLE runs (
         task_id BIGINT PRIMARY KEY,
         job TEXT NOT NULL,
         nominal_ms BIGINT,
         mode TEXT NOT NULL,
         state SMALLINT NOT NULL,
         target TEXT NOT NULL,
         targets INTEGER NOT NULL,
         batch INTEGER NOT NULL,
         max_failed INTEGER NOT NULL,
         wait_ms BIGINT NOT NULL,
         retries INTEGER NOT NULL,
         started_ms BIGINT NOT NULL,
         deadline_ms BIGINT NOT NULL,
         finished_ms BIGINT NOT NULL,
         acked INTEGER NOT NULL,
         failed INTEGER NOT NULL,
         missed INTEGER NOT NULL,
         UNIQUE (job, nominal_ms)
     );
     CREATE INDEX runs_unfinished ON runs (task_id) WHERE state < 2;
     CREATE TABLE run_agents (
         task_id BIGINT NOT NULL,
         agent TEXT NOT NULL,
         state SMALLINT NOT NULL,
         tries INTEGER NOT NULL,
         at_ms BIGINT NOT NULL,
         PRIMARY KEY (task_id, agent)
     );",
    // 4: the server that carries out each run (a server resumes its own
    // runs, and another's only once that server is gone).
    "ALTER TABLE runs ADD COLUMN server TEXT;",
];

/// The schema version this contactd writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema to [`SCHEMA_VERSION`], one server at a time.
pub(super) async fn migrate(client: &Client, name: &str) -> Result<(), StoreError> {
    let open = |reason: String| StoreError::Unusable(format!("store.url {name}: {reason}").into());
    let context = format!("store.url {name}");
    let f = |e| StoreError::Unusable(described(&context, e));
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
            let epoch = new_epoch();
            client
                .execute(
                    "INSERT INTO contactd_meta (key, value) VALUES ('epoch', $1), ('next_id', 1)",
                    &[&epoch_column(epoch)],
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
