//! The soak's throwaway PostgreSQL cluster (`--postgres`): `initdb` in a
//! directory of its own, `postgres` on a free loopback port, stopped and
//! started again by the `postgres-restart` fault, stopped at the end and
//! its directory removed. As tests/it/common/postgres.rs does it, with the
//! harness's rules: the postmaster dies with the harness
//! (`PR_SET_PDEATHSIG`), is signalled by PID, and is waited for on events
//! (a query that answers, the process's exit), each wait bounded.
//!
//! PostgreSQL refuses to run as root. As root the cluster belongs to the
//! `postgres` user (Debian's package makes it) or else `nobody`, and its
//! directory is a fresh one under the system's temporary directory rather
//! than in the run's directory: the run's directory may sit under a
//! directory only root can enter (`mktemp -d` makes them 0700), which
//! `postgres` could then not reach. Its log goes to the run's directory
//! all the same (`postgres.log`, opened by the harness and handed over as
//! stderr).

use std::{
    ffi::OsStr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use crate::pg_programs::{bin_dir, run_as};
use anyhow::{Context, bail};
use nix::{
    sys::signal::Signal,
    unistd::{Pid, User, chown},
};
use tokio::process::Child;

/// Longest initdb, or a start (crash recovery after an immediate stop
/// included), may take on 2 shared cores.
const START_LIMIT: Duration = Duration::from_secs(60);
/// Longest a stop may take before the postmaster is killed.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// The database the servers share.
pub const DATABASE: &str = "contactd";

/// How the `postgres-restart` fault stops the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT: sessions are ended, a checkpoint is written (what
    /// `pg_ctl stop -m fast` sends). SIGTERM would be PostgreSQL's "smart"
    /// stop, which waits for every client to leave: contactd never does.
    Fast,
    /// SIGQUIT: every process exits at once, and the next start recovers
    /// from the WAL, as after a crash (`pg_ctl stop -m immediate`).
    Immediate,
}

impl Stop {
    fn signal(self) -> Signal {
        match self {
            Stop::Fast => Signal::SIGINT,
            Stop::Immediate => Signal::SIGQUIT,
        }
    }
}

/// A running (or stopped, between a fault's stop and start) cluster.
pub struct Postgres {
    /// Removed when dropped, after the server stopped.
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<User>,
    pub port: u16,
    log: PathBuf,
    server: Option<Child>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Postgres {
    /// Makes the cluster, starts it, and creates the servers' database.
    ///
    /// # Errors
    /// PostgreSQL is not installed, or initdb or the start fails.
    pub async fn start(log: &Path) -> anyhow::Result<Postgres> {
        let bin = bin_dir().context(
            "--postgres: PostgreSQL's server programs are not installed \
             (apt-get install postgresql, or set CONTACTD_TEST_PG_BIN)",
        )?;
        let user = run_as();
        let dir = tempfile::Builder::new()
            .prefix("contactd-soak-pg-")
            .tempdir()?;
        if let Some(user) = &user {
            chown(dir.path(), Some(user.uid), Some(user.gid))?;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        }
        let initdb = crate::procs::command(&bin.join("initdb"), user.as_ref())
            .args([
                OsStr::new("--pgdata"),
                dir.path().join("data").as_os_str(),
                OsStr::new("--username=postgres"),
                OsStr::new("--auth=trust"),
                OsStr::new("--encoding=UTF8"),
                OsStr::new("--no-sync"),
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        let initdb = tokio::time::timeout(START_LIMIT, initdb)
            .await
            .context("initdb took too long")??;
        if !initdb.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        }
        let mut cluster = Postgres {
            dir,
            bin,
            user,
            port: 0,
            log: log.to_owned(),
            server: None,
        };
        // A free port may be taken before postgres binds it: another one,
        // a few times.
        for attempt in 1..=3 {
            cluster.port = free_port()?;
            match cluster.start_again().await {
                Ok(()) => break,
                Err(e) if attempt < 3 => eprintln!("soak: postgres: {e:#}; another port"),
                Err(e) => return Err(e),
            }
        }
        let (client, connection) =
            tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await?;
        drop(client);
        let _ = connection.await;
        Ok(cluster)
    }

    /// A URL for database `name`, as the superuser (trust, no password).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub fn pid(&self) -> Option<i32> {
        self.server.as_ref()?.id().map(|pid| pid as i32)
    }

    /// Starts the postmaster on the cluster's port and waits until a query
    /// answers (or it exits, or START_LIMIT passes).
    ///
    /// # Errors
    /// It did not come up: the end of its log says why.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut server = crate::procs::command(&self.bin.join("postgres"), self.user.as_ref());
        server
            .arg("-D")
            .arg(self.data_dir())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Throwaway: nothing needs to survive a power loss, and the
            // harness's processes get the cores.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=50"])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = server.spawn().context("cannot start postgres")?;
        let url = self.url("postgres");
        let started = Instant::now();
        // Bounded by START_LIMIT; a query is tried every 100 ms.
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("postgres exited with {status}: {}", self.log_tail());
            }
            if let Ok(Ok((client, connection))) = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_postgres::connect(&url, tokio_postgres::NoTls),
            )
            .await
            {
                let connection = tokio::spawn(connection);
                let answered = client.simple_query("SELECT 1").await.is_ok();
                drop(client);
                let _ = connection.await;
                if answered {
                    break;
                }
            }
            if started.elapsed() > START_LIMIT {
                let _ = child.kill().await;
                bail!(
                    "postgres did not answer within {START_LIMIT:?}: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.server = Some(child);
        Ok(())
    }

    /// Stops the postmaster (by PID) and waits for its exit; kills it past
    /// STOP_LIMIT and says so.
    ///
    /// # Errors
    /// It was not running, or did not stop in time.
    pub async fn stop(&mut self, how: Stop) -> anyhow::Result<()> {
        let mut child = self.server.take().context("postgres is not running")?;
        let pid = child.id().context("postgres already reaped")? as i32;
        nix::sys::signal::kill(Pid::from_raw(pid), how.signal())?;
        match tokio::time::timeout(STOP_LIMIT, child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => {
                let _ = child.kill().await;
                bail!("postgres did not stop within {STOP_LIMIT:?} of {how:?}")
            }
        }
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// A cluster's size on disk without its WAL (`pg_wal`), which PostgreSQL
/// recycles at checkpoints on its own schedule: what the store's tables
/// and indexes take.
pub fn data_size(data: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![data.to_owned()];
    // Bounded: a cluster holds a few thousand files in a few hundred
    // directories.
    for _ in 0..100_000 {
        let Some(dir) = dirs.pop() else { break };
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if entry.path() != data.join("pg_wal") {
                    dirs.push(entry.path());
                }
            } else {
                total += meta.len();
            }
        }
    }
    total
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A fast stop, so that the directory is removed after the server
        // let go of it (bounded: a killed one exits at once).
        if let Some(mut child) = self.server.take() {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGINT);
            }
            let deadline = Instant::now() + STOP_LIMIT;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.start_kill();
        }
    }
}
