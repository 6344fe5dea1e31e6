//! Commands contained in a cgroup of their own, which they cannot leave.
//!
//! A process group is left by `setsid`, and the [`reaper`](super::reaper)'s
//! sweep is a race: a command that forks and exits every millisecond (half
//! its generations calling `setsid`) outran it, and one that clears its
//! marker variable lived until no command ran. A cgroup v2 child of the
//! daemon's own cgroup has neither hole: whatever a command forks, however
//! fast, and whatever session it moves to, is born in it, and writing `1` to
//! its `cgroup.kill` (Linux 5.14) kills all of it at once.
//!
//! Where the daemon may make child cgroups (root, or a systemd service with
//! `Delegate=yes`), each command runs in `contactd-cmd-RUN` under the
//! daemon's cgroup, entered between fork and exec, and killed and removed
//! when the command ends. Where it may not (an unprivileged `cargo run`, a
//! cgroup v1 host), commands run as before, contained by their process group
//! and the sweep; the choice is logged once, at the first command.

use std::{
    io::Write,
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The name of every command's cgroup starts with this, then its run id
/// (`PID.N`, the daemon's pid first).
const PREFIX: &str = "contactd-cmd-";
/// How long a killed cgroup may take to empty before it is given up on (its
/// directory is then left, and removed at the daemon's next start).
const EMPTY_WAIT: Duration = Duration::from_secs(2);

/// The daemon's own cgroup directory, when it may make children in it.
static BASE: OnceLock<Option<PathBuf>> = OnceLock::new();
/// Set when a command could not be placed in its cgroup: the rest run
/// without one.
static OFF: AtomicBool = AtomicBool::new(false);

/// One command's cgroup, from before its spawn until it is killed and
/// removed (on drop).
#[derive(Debug)]
pub(crate) struct Cgroup {
    dir: PathBuf,
    /// Its `cgroup.procs`, opened before the fork: the child writes `0` to
    /// it (itself) before exec, where opening a file is not safe.
    procs: std::fs::File,
}

impl Cgroup {
    /// A new cgroup for the command with run id `run`, or `None` where
    /// commands cannot be given one.
    pub(crate) fn create(run: &str) -> Option<Cgroup> {
        if OFF.load(Ordering::Relaxed) {
            return None;
        }
        let base = base()?;
        let dir = base.join(format!("{PREFIX}{run}"));
        let made = std::fs::create_dir(&dir).and_then(|()| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
        });
        match made {
            Ok(procs) => Some(Cgroup { dir, procs }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                give_up(&format!("cannot make {}: {e}", dir.display()));
                None
            }
        }
    }

    /// Makes `command`'s process join this cgroup between fork and exec;
    /// its spawn fails if it cannot.
    pub(crate) fn enter(&self, command: &mut tokio::process::Command) {
        let fd = self.procs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec, and
        // makes one write(2) (async-signal-safe) to a descriptor the parent
        // keeps open until the spawn has returned (`self` outlives it).
        unsafe {
            command.pre_exec(move || {
                let procs = BorrowedFd::borrow_raw(fd);
                nix::unistd::write(procs, b"0")
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
    }

    /// Kills every process in the cgroup (not waiting for them).
    pub(crate) fn kill(&self) {
        kill_all_in(&self.dir);
    }
}

impl Drop for Cgroup {
    /// Kills what is left in the cgroup, waits (briefly) for it to empty,
    /// and removes it. Its processes are not reaped here: the command's
    /// leader by its caller, the rest (orphans, given to the daemon as
    /// subreaper) by the reaper's sweep.
    fn drop(&mut self) {
        remove(&self.dir);
    }
}

/// A command could not be given a cgroup: says so once, and runs the rest
/// without.
pub(crate) fn give_up(why: &str) {
    if !OFF.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "commands run without a cgroup of their own ({why}): what a command forks is \
             killed by its process group and by sweeps, which a fast re-forker can outrun"
        );
    }
}

/// The daemon's cgroup v2 directory, if it may make children in it (tried
/// once, by making and removing one), logged at the first call.
fn base() -> Option<&'static Path> {
    BASE.get_or_init(|| {
        let dir = match own_dir() {
            Some(dir) => dir,
            None => {
                tracing::info!(
                    "no cgroup v2 hierarchy: commands are contained by their process group \
                     and by sweeps"
                );
                return None;
            }
        };
        let probe = dir.join(format!("{PREFIX}{}.probe", std::process::id()));
        match std::fs::create_dir(&probe).and_then(|()| std::fs::remove_dir(&probe)) {
            Ok(()) => {
                tracing::info!(cgroup = %dir.display(), "commands run in cgroups of their own");
                Some(dir)
            }
            Err(e) => {
                tracing::info!(
                    cgroup = %dir.display(),
                    "cannot make cgroups ({e}): commands are contained by their process \
                     group and by sweeps (a systemd service needs Delegate=yes)"
                );
                None
            }
        }
    })
    .as_deref()
}

/// This process's cgroup v2 directory: its `0::` line in /proc/self/cgroup
/// under the cgroup2 mount in /proc/self/mountinfo.
fn own_dir() -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // "id parent major:minor root mount-point options ... - fstype source ...".
    let (root, point) = mounts.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        if rest.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = fields.split_whitespace().skip(3);
        Some((fields.next()?, fields.next()?))
    })?;
    let own = own.strip_prefix(root.trim_end_matches('/')).unwrap_or(own);
    Some(Path::new(point).join(own.trim_start_matches('/')))
}

/// Kills everything in the cgroup at `dir`: by `cgroup.kill`, or, before
/// Linux 5.14, by killing the pids it lists until none is left (bounded:
/// nothing can leave, so each round only finds what the last one's victims
/// forked before they died).
fn kill_all_in(dir: &Path) {
    let killed = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut file| file.write_all(b"1"));
    if killed.is_ok() {
        return;
    }
    let deadline = Instant::now() + EMPTY_WAIT;
    while Instant::now() < deadline {
        let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
            return;
        };
        let pids: Vec<i32> = pids.lines().filter_map(|p| p.parse().ok()).collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Whether the cgroup at `dir` has no live process (or is gone).
fn empty(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 0"))
        .unwrap_or(true)
}

/// Kills the cgroup at `dir`, waits up to [`EMPTY_WAIT`] for it to empty,
/// and removes it.
fn remove(dir: &Path) {
    kill_all_in(dir);
    let deadline = Instant::now() + EMPTY_WAIT;
    while !empty(dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Err(e) = std::fs::remove_dir(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(cgroup = %dir.display(), "cannot remove a command's cgroup: {e}");
    }
}

/// The command cgroups under this daemon's cgroup: all of them, or those of
/// daemons no longer running (left by a crash).
fn ours(only_dead: bool) -> Vec<PathBuf> {
    let Some(base) = BASE.get().and_then(Option::as_deref) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|run| run.split('.').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                return false;
            };
            if only_dead {
                pid != me && !Path::new(&format!("/proc/{pid}")).exists()
            } else {
                pid == me
            }
        })
        .map(|entry| entry.path())
        .collect()
}

/// At a daemon's start: finds its cgroup, and kills and removes the command
/// cgroups a crashed predecessor left.
pub fn start() {
    if base().is_some() {
        for dir in ours(true) {
            remove(&dir);
        }
    }
}

/// At a daemon's exit: kills and removes every command cgroup it made.
pub fn end() {
    for dir in ours(false) {
        remove(&dir);
    }
}
