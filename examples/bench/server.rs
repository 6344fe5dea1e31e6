//! The servers under test as child processes: contactd (the real binary at a
//! temp config) or the baseline (this binary's `baseline-server` mode),
//! pinned to the server CPU, started and stopped on events (the `addr=` line
//! on stderr, process exit), never on sleeps.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// Longest a server may take to print its address.
const START_LIMIT: Duration = Duration::from_secs(10);
/// Longest a server may take to exit after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// Stderr lines kept for error reports.
const KEEP_LINES: usize = 20;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Contactd,
    Baseline,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Contactd => "contactd",
            Kind::Baseline => "baseline",
        }
    }
}

/// How to start the servers.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The `contactd` binary.
    pub contactd: PathBuf,
    /// This binary, for `baseline-server` and `spawn-loop`.
    pub bench: PathBuf,
    /// TOML appended to every contactd config (`--contactd-toml`), e.g. to
    /// compare the store kinds.
    pub contactd_toml: String,
    /// CPU the servers are pinned to (with taskset), if pinning.
    pub cpu: Option<usize>,
}

/// What a scenario needs from the server beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Keys added to contactd's `[server]` table (such as its name).
    pub server_toml: String,
    /// TOML appended to contactd's config (after `[server] listen`).
    pub contactd_toml: String,
    /// Arguments for `bench baseline-server`.
    pub baseline_args: Vec<String>,
    /// contactd's `[server] listen` (default 127.0.0.1:0): a server started
    /// again on its predecessor's port.
    pub listen: Option<SocketAddr>,
    /// A listening socket contactd is given as systemd gives its socket
    /// unit's (fd 3, `LISTEN_FDS`, `LISTEN_PID`), held here across servers.
    pub passed: Option<Arc<std::net::TcpListener>>,
}

/// A running server.
pub struct Server {
    child: Child,
    pub pid: i32,
    pub addr: SocketAddr,
    /// When the process was spawned, and when it printed its address.
    pub spawned: Instant,
    pub listening: Instant,
    /// contactd's admin socket (in its temp dir).
    pub admin: PathBuf,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Holds contactd's config file.
    _dir: tempfile::TempDir,
}

impl Launcher {
    /// A command for `program`, pinned to the server CPU if pinning.
    pub fn command(&self, program: &Path) -> Command {
        let mut command = match self.cpu {
            Some(cpu) => {
                // taskset execs the program, so the child's pid is the server's.
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(program);
                c
            }
            None => Command::new(program),
        };
        command.kill_on_drop(true).stdin(Stdio::null());
        command
    }

    /// A command for contactd with `passed` as its socket-activated
    /// listener: a shell sets `LISTEN_PID` to its own pid and execs
    /// contactd (keeping the pid) with the socket on fd 3.
    fn activated(&self, passed: &std::net::TcpListener) -> anyhow::Result<Command> {
        use std::os::fd::AsRawFd;
        let mut c = self.command(Path::new("/bin/sh"));
        c.arg("-c")
            .arg("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=contact exec \"$0\" \"$@\"")
            .arg(&self.contactd);
        let fd = passed.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; nothing else runs between fork
        // and exec. The copy on fd 3 is not close-on-exec.
        unsafe {
            c.pre_exec(move || {
                let listener = std::os::fd::BorrowedFd::borrow_raw(fd);
                let copy = nix::unistd::dup2_raw(listener, 3)?;
                let _ = std::os::fd::IntoRawFd::into_raw_fd(copy);
                Ok(())
            });
        }
        Ok(c)
    }

    /// Starts `kind` with `setup` and waits until it prints its address.
    pub async fn start(&self, kind: Kind, setup: &Setup) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let admin = dir.path().join("admin.sock");
        let mut command = match kind {
            Kind::Contactd => {
                let path = dir.path().join("contactd.toml");
                // The default config, plus only what the scenario needs (and
                // the admin socket in the temp dir).
                let listen = match (&setup.passed, setup.listen) {
                    (Some(passed), _) => passed.local_addr()?,
                    (None, Some(listen)) => listen,
                    (None, None) => SocketAddr::from(([127, 0, 0, 1], 0)),
                };
                let toml = format!(
                    "[server]\nlisten = \"{listen}\"\n{}\n[admin]\nsocket = {:?}\n{}\n{}",
                    setup.server_toml,
                    admin.to_str().context("a UTF-8 temp dir")?,
                    setup.contactd_toml,
                    self.contactd_toml
                );
                std::fs::write(&path, toml)?;
                let mut c = match &setup.passed {
                    Some(passed) => self.activated(passed)?,
                    None => self.command(&self.contactd),
                };
                c.arg("serve").arg("-c").arg(&path);
                c.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET");
                // Its task store (SQLite, the default) in the temp dir.
                c.env("STATE_DIRECTORY", dir.path());
                c
            }
            Kind::Baseline => {
                let mut c = self.command(&self.bench);
                c.arg("baseline-server").args(&setup.baseline_args);
                c
            }
        };
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", kind.name()))?;
        let pid = child.id().context("no pid")? as i32;
        let mut lines = BufReader::new(child.stderr.take().context("no stderr")?).lines();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let found = tokio::time::timeout(START_LIMIT, async {
            while let Some(line) = lines.next_line().await? {
                let addr = line
                    .contains("serving")
                    .then(|| field(&line, "addr"))
                    .flatten();
                keep(&log, line.clone());
                if let Some(addr) = addr {
                    return Ok::<_, anyhow::Error>(Some(addr.parse::<SocketAddr>()?));
                }
            }
            Ok(None)
        })
        .await;
        let listening = Instant::now();
        let addr = match found {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => bail!("{} exited before serving: {}", kind.name(), tail(&log)),
            Ok(Err(e)) => bail!("reading {}'s stderr: {e}", kind.name()),
            Err(_) => bail!("{} did not serve within {START_LIMIT:?}", kind.name()),
        };
        // Keep draining stderr, or a full pipe would block the server's logging.
        let drain_log = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep(&drain_log, line);
            }
        });
        Ok(Server {
            child,
            pid,
            addr,
            spawned,
            listening,
            admin,
            log,
            _dir: dir,
        })
    }
}

impl Server {
    /// Resident memory now, in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        rss_of(self.pid)
    }

    /// CPU time (user + system) the server has used so far, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(self.pid)
    }

    /// The address of its metrics endpoint (`[metrics] listen`), from the
    /// line it logs just after the `serving` one (bounded: [`START_LIMIT`]).
    pub async fn metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let found = self.log.lock().iter().find_map(|line| {
                line.contains("metrics endpoint listening")
                    .then(|| field(line, "addr"))
                    .flatten()
                    .map(str::to_owned)
            });
            if let Some(addr) = found {
                return Ok(addr.parse()?);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no metrics endpoint logged within {START_LIMIT:?}: {}",
                self.log_tail()
            );
            // Polling the kept lines: the drain task has no event to await.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The kept stderr lines, readable after the server is stopped.
    pub fn log_handle(&self) -> Arc<Mutex<VecDeque<String>>> {
        Arc::clone(&self.log)
    }

    /// The last stderr lines, for error reports.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// Sends `signal` and waits for the exit (bounded); returns how long
    /// it took.
    pub async fn end_with(mut self, signal: Signal) -> anyhow::Result<Duration> {
        let sent = Instant::now();
        nix::sys::signal::kill(Pid::from_raw(self.pid), signal)?;
        match tokio::time::timeout(STOP_LIMIT, self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(sent.elapsed())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("did not exit within {STOP_LIMIT:?} of {signal}")
            }
        }
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took.
    pub async fn stop(mut self) -> anyhow::Result<Duration> {
        let sent = Instant::now();
        nix::sys::signal::kill(Pid::from_raw(self.pid), Signal::SIGTERM)?;
        match tokio::time::timeout(STOP_LIMIT, self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(sent.elapsed())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("did not exit within {STOP_LIMIT:?} of SIGTERM")
            }
        }
    }
}

/// Resident memory of process `pid` now, in bytes (`VmRSS` in
/// `/proc/PID/status`).
pub fn rss_of(pid: i32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

/// CPU time (user + system) process `pid` has used so far, in seconds.
pub fn cpu_seconds_of(pid: i32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // USER_HZ is 100 on every Linux this runs on.
    Ok(ticks as f64 / 100.0)
}

fn keep(log: &Mutex<VecDeque<String>>, line: String) {
    let mut log = log.lock();
    if log.len() == KEEP_LINES {
        log.pop_front();
    }
    log.push_back(line);
}

pub fn tail(log: &Mutex<VecDeque<String>>) -> String {
    log.lock().iter().cloned().collect::<Vec<_>>().join(" | ")
}

/// The value of `name=` in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}
