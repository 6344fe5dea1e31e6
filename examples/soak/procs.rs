//! The real processes of a soak: `contactd serve` and `contactd agent`,
//! each with its config and JSON log file in the run's directory, started
//! and waited for on events (the server's `serving` line, the process's
//! exit), signalled by PID. Every child is killed when its handle is
//! dropped, and by the kernel if the harness dies (`PR_SET_PDEATHSIG`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// Longest a server may take to serve after it is started (it checks its
/// store first, on a machine shared with compilers).
const START_LIMIT: Duration = Duration::from_secs(60);
/// Longest a process may take to exit after a signal before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// A running child.
pub struct Proc {
    pub name: String,
    pub pid: i32,
    child: Child,
}

/// A command for `program` that dies with the harness, run as `user` when
/// given (PostgreSQL, which refuses root).
pub fn command(program: &Path, user: Option<&nix::unistd::User>) -> Command {
    let mut command = Command::new(program);
    command.kill_on_drop(true).stdin(Stdio::null());
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec. (std runs this after switching to `user`, so the change of
    // credentials does not clear it.)
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    command
}

impl Proc {
    /// Starts `contactd serve -c config` and waits for its `serving` line
    /// on stderr (its JSON log); returns it with its address.
    pub async fn server(
        contactd: &Path,
        name: &str,
        config: &Path,
    ) -> anyhow::Result<(Proc, SocketAddr)> {
        let mut command = command(contactd, None);
        command
            .arg("serve")
            .arg("-c")
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("cannot start contactd serve")?;
        let pid = child.id().context("no pid")? as i32;
        let mut lines = BufReader::new(child.stderr.take().context("no stderr")?).lines();
        let mut last = String::new();
        let found = tokio::time::timeout(START_LIMIT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = serving_addr(&line) {
                    return Ok::<_, anyhow::Error>(Some(addr));
                }
                last = line;
            }
            Ok(None)
        })
        .await;
        let addr = match found {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => bail!("{name} exited before serving: {last}"),
            Ok(Err(e)) => bail!("reading {name}'s stderr: {e}"),
            Err(_) => bail!("{name} did not serve within {START_LIMIT:?}: {last}"),
        };
        // The log file has every line; stderr is drained so that a full
        // pipe never blocks the server's logging.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((
            Proc {
                name: name.to_owned(),
                pid,
                child,
            },
            addr,
        ))
    }

    /// Starts `contactd agent -c config` (its log goes to its file).
    pub fn agent(contactd: &Path, name: &str, config: &Path) -> anyhow::Result<Proc> {
        let mut command = command(contactd, None);
        command
            .arg("agent")
            .arg("-c")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().context("cannot start contactd agent")?;
        Ok(Proc {
            name: name.to_owned(),
            pid: child.id().context("no pid")? as i32,
            child,
        })
    }

    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        nix::sys::signal::kill(Pid::from_raw(self.pid), signal)
            .with_context(|| format!("{signal} to {} ({})", self.name, self.pid))
    }

    /// Sends `signal` and waits (bounded) for the exit; kills it past the
    /// bound and says so.
    pub async fn end(mut self, signal: Signal) -> anyhow::Result<()> {
        self.signal(signal)?;
        match tokio::time::timeout(STOP_LIMIT, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if signal != Signal::SIGKILL && !status.success() {
                    bail!("{} exited with {status} after {signal}", self.name);
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "{} did not exit within {STOP_LIMIT:?} of {signal}",
                    self.name
                )
            }
        }
    }
}

/// The address in contactd's `serving Contact, health and reflection` line
/// (JSON log format: `fields.addr`).
fn serving_addr(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = value.pointer("/fields/message")?.as_str()?;
    if !message.starts_with("serving Contact") {
        return None;
    }
    value.pointer("/fields/addr")?.as_str()?.parse().ok()
}

/// Resident set, open fds and threads of `pid` (None once it is gone).
pub fn usage(pid: i32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    let rss = field("VmRSS:")? * 1024;
    let threads = field("Threads:")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds, threads))
}

/// Total size of the files in `dir` (the store and its -wal, -shm).
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A tmpfs of `size` MiB mounted on `dir` (the store's disk, to fill it),
/// unmounted on drop. None when mounting is not allowed here.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size_mib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m,mode=0750"))
            .arg("tmpfs")
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Tmpfs {
            dir: dir.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}
