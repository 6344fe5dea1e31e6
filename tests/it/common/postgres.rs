//! A throwaway PostgreSQL cluster for one test: `initdb` in a temporary
//! directory, `postgres` on a free loopback port, as a non-root user,
//! stopped when dropped.
//!
//! Without PostgreSQL installed, [`Cluster::start`] says the test was
//! skipped and returns `None`; under CI (`CI=true`) a missing PostgreSQL
//! fails the test instead, since `.ci/run` installs it.

use std::{
    ffi::OsStr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::pg_programs::{bin_dir, run_as};
use nix::{
    sys::signal::{Signal, kill},
    unistd::{Pid, User, chown},
};

/// Longest a cluster may take to come up (initdb and start, 2 cores).
const START_LIMIT: Duration = Duration::from_secs(60);

pub struct Cluster {
    /// The data directory and the socket: removed after the server stops.
    dir: tempfile::TempDir,
    server: Child,
    pub port: u16,
    bin: PathBuf,
    user: Option<User>,
    /// Extra `-c` settings (TLS).
    settings: Vec<String>,
}

fn command(bin: &Path, program: &str, user: Option<&User>) -> Command {
    let mut command = Command::new(bin.join(program));
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    command
}

impl Cluster {
    /// Starts a cluster, or says why the test is skipped (`None`).
    ///
    /// # Panics
    /// PostgreSQL is missing under CI, or the cluster does not come up.
    pub fn start(test: &str) -> Option<Cluster> {
        Cluster::start_with(test, None)
    }

    /// A cluster that also takes TLS, with this certificate and key (PEM).
    pub fn start_tls(test: &str, cert: &Path, key: &Path) -> Option<Cluster> {
        Cluster::start_with(test, Some((cert, key)))
    }

    fn start_with(test: &str, tls: Option<(&Path, &Path)>) -> Option<Cluster> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "PostgreSQL is not installed, and CI=true: .ci/run installs it"
            );
            eprintln!(
                "SKIPPED {test}: PostgreSQL is not installed (apt-get install postgresql, \
                 or set CONTACTD_TEST_PG_BIN to its bin directory)"
            );
            return None;
        };
        let user = run_as();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if let Some(user) = &user {
            chown(dir.path(), Some(user.uid), Some(user.gid)).unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let initdb = command(&bin, "initdb", user.as_ref())
            .args([
                OsStr::new("--pgdata"),
                data.as_os_str(),
                OsStr::new("--username=postgres"),
                OsStr::new("--auth=trust"),
                OsStr::new("--encoding=UTF8"),
                OsStr::new("--no-sync"),
            ])
            .current_dir(dir.path())
            .output()
            .expect("run initdb");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let mut settings = Vec::new();
        if let Some((cert, key)) = tls {
            // PostgreSQL wants its key its own and unreadable by others.
            for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
                let to = dir.path().join(name);
                std::fs::copy(from, &to).unwrap();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
                if let Some(user) = &user {
                    chown(&to, Some(user.uid), Some(user.gid)).unwrap();
                }
                let key = if name == "server.crt" {
                    "ssl_cert_file"
                } else {
                    "ssl_key_file"
                };
                settings.push(format!("{key}={}", to.display()));
            }
            settings.push("ssl=on".to_owned());
        }
        // The port is free when chosen and may be taken before postgres
        // binds it: then another one, a few times.
        for attempt in 1..=3 {
            let port = free_port();
            let mut server = spawn(&bin, user.as_ref(), dir.path(), &data, port, &settings);
            match wait_ready(&dir.path().join("postgres.log")) {
                Ok(()) => {
                    return Some(Cluster {
                        dir,
                        server,
                        port,
                        bin,
                        user,
                        settings,
                    });
                }
                Err(log) if attempt < 3 && log.contains("could not bind") => {
                    let _ = server.wait();
                }
                Err(log) => {
                    let _ = server.kill();
                    panic!("postgres did not start:\n{log}");
                }
            }
        }
        unreachable!("the loop returns or panics")
    }
}

fn spawn(
    bin: &Path,
    user: Option<&User>,
    dir: &Path,
    data: &Path,
    port: u16,
    settings: &[String],
) -> Child {
    let log = dir.join("postgres.log");
    let log_file = std::fs::File::create(&log).unwrap();
    if let Some(user) = user {
        chown(&log, Some(user.uid), Some(user.gid)).unwrap();
    }
    let mut server = command(bin, "postgres", user);
    server
        .arg("-D")
        .arg(data)
        .arg("-k")
        .arg(dir)
        .args(["-p", &port.to_string()])
        // A test database: nothing needs to survive a power loss.
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
        .args(["-c", "max_connections=50"])
        .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    // Its own process group: a ^C of the test run does not reach it
    // before Drop does.
    server.process_group(0);
    server.spawn().expect("start postgres")
}

/// Waits for the log line that says the server accepts connections; the
/// log when it stopped or did not come up in time.
fn wait_ready(log: &Path) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("database system is ready to accept connections") {
            return Ok(());
        }
        // A client that connects while the server starts (a contactd
        // reconnecting to it) is refused with a FATAL line of its own
        // backend: not the server's failure.
        let failed = text.lines().any(|line| {
            line.contains("FATAL") && !line.contains("the database system is starting up")
        });
        if failed || started.elapsed() > START_LIMIT {
            return Err(text);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Cluster {
    /// Stops the server (fast shutdown: sessions end at once).
    pub fn stop(&mut self) {
        let _ = kill(Pid::from_raw(self.server.id() as i32), Signal::SIGINT);
        let _ = self.server.wait();
    }

    /// Starts the server again, on the same port and data.
    ///
    /// # Panics
    /// It does not come up.
    pub fn start_again(&mut self) {
        let data = self.dir.path().join("data");
        self.server = spawn(
            &self.bin,
            self.user.as_ref(),
            self.dir.path(),
            &data,
            self.port,
            &self.settings,
        );
        if let Err(log) = wait_ready(&self.dir.path().join("postgres.log")) {
            panic!("postgres did not start again:\n{log}");
        }
    }

    /// A URL for database `name` as the superuser.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` in database `db` (simple protocol, several statements).
    pub async fn execute(&self, db: &str, sql: &str) {
        let (client, connection) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
        let connection = tokio::spawn(connection);
        client.batch_execute(sql).await.expect(sql);
        drop(client);
        let _ = connection.await;
    }

    /// Makes an empty database `name`, returning its URL.
    pub async fn database(&self, name: &str) -> String {
        self.execute("postgres", &format!("CREATE DATABASE {name}"))
            .await;
        self.url(name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}
