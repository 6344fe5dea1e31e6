//! Descendants that left their command's process group: found and killed.
//!
//! Killing a command's process group misses whatever called `setsid` (or
//! `setpgid`) on the way: `setsid sleep 77` outlived both the command's
//! timeout and the server. On Linux the daemon makes itself a child
//! subreaper ([`become_subreaper`]), so such a process, once its parent has
//! died, becomes the daemon's child instead of init's. Every command runs
//! with [`ENV_RUN`] set to an id of its own; when the command ends (exits,
//! times out, is killed or dropped), `sweep` kills the daemon's children
//! that carry that id, and those that are not a running command's leader
//! once no command runs, and reaps them. At exit, [`sweep_all`] kills every
//! child left. (Under systemd, the unit's cgroup is the last net: it also
//! catches what a SIGKILL of the daemon leaves behind.)
//!
//! Without the subreaper (tests run servers inside the test process, whose
//! other children are none of this module's business) sweeping does nothing.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{Signal, kill, killpg},
        wait::{WaitPidFlag, waitpid},
    },
    unistd::Pid,
};
use parking_lot::Mutex;

/// The environment variable carrying a command's run id; its descendants
/// inherit it.
pub const ENV_RUN: &str = "CONTACTD_RUN";

/// Whether this process is a child subreaper (set once, at start-up).
static SUBREAPER: AtomicBool = AtomicBool::new(false);
/// Process ids of the commands running now (their group leaders): never
/// swept while they run. Held while a command is spawned, so a sweep never
/// sees a new command before it is listed.
static LEADERS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static NEXT_RUN: AtomicU64 = AtomicU64::new(1);

/// How long a sweep may go on killing and rescanning: each round can uncover
/// the children its victims forked before they died, so a sweep ends when a
/// round kills nothing, or at this bound (a command without a cgroup that
/// re-forks without end can outrun it).
const SWEEP_LIMIT: Duration = Duration::from_secs(5);
/// How long a killed process may take to become reapable.
const REAP_WAIT: Duration = Duration::from_secs(1);

/// Makes this process the child subreaper of its descendants (Linux).
///
/// # Errors
/// When the kernel refuses (or on other systems).
pub fn become_subreaper() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_child_subreaper(true)?;
        SUBREAPER.store(true, Ordering::Relaxed);
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    Err(std::io::Error::other(
        "child subreapers exist on Linux only",
    ))
}

/// A new run id for a command, for [`ENV_RUN`].
pub(crate) fn new_run() -> String {
    format!(
        "{}.{}",
        std::process::id(),
        NEXT_RUN.fetch_add(1, Ordering::Relaxed)
    )
}

/// Spawns `command`, listing its process as a running command's leader.
pub(crate) fn spawn(
    command: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let mut leaders = LEADERS.lock();
    let child = command.spawn()?;
    if let Some(id) = child.id() {
        leaders.push(id as i32);
    }
    Ok(child)
}

/// A command has ended (or is being dropped): takes its leader `pgid` off
/// the list, and kills what is left of its process group (background jobs).
///
/// Once the leader has been reaped its pid may be reused, by a new command
/// that leads a group of the same number: that one is listed (spawning
/// holds the list), so its group is left alone.
pub(crate) fn end(pgid: Pid) {
    let mut leaders = LEADERS.lock();
    if let Some(i) = leaders.iter().position(|&p| p == pgid.as_raw()) {
        leaders.swap_remove(i);
    }
    if !leaders.contains(&pgid.as_raw()) {
        // The group may already be gone; nothing to do then.
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

/// Whether sweeping does anything in this process.
pub(crate) fn active() -> bool {
    SUBREAPER.load(Ordering::Relaxed)
}

/// Kills and reaps the daemon's children that carry the run id `run`
/// (descendants of that command that left its group), and, when no command
/// is running, every child left; reaps children that already ended.
pub(crate) fn sweep(run: &str) {
    if active() {
        sweep_where(|pid, none_running| none_running || carries(pid, run));
    }
}

/// Kills and reaps every child of the daemon (at exit).
pub fn sweep_all() {
    if active() {
        sweep_where(|_, _| true);
    }
}

fn sweep_where(doomed: impl Fn(i32, bool) -> bool) {
    let me = std::process::id() as i32;
    let deadline = Instant::now() + SWEEP_LIMIT;
    // One line per sweep, however many rounds a re-forker makes it take.
    let mut total = 0usize;
    let mut first = None;
    let mut outrun = true;
    while Instant::now() < deadline {
        let mut killed = Vec::new();
        let mut ended = Vec::new();
        {
            let leaders = LEADERS.lock();
            // Running commands' leaders are skipped before their stat is
            // read: with 32 commands running, that was 32 reads per end.
            for child in children_of(me, &leaders) {
                if child.zombie {
                    ended.push(child.pid);
                } else if doomed(child.pid, leaders.is_empty()) {
                    let pid = Pid::from_raw(child.pid);
                    let _ = kill(pid, Signal::SIGKILL);
                    // It may lead a group (or session) of its own.
                    if child.pgid == child.pid {
                        let _ = killpg(pid, Signal::SIGKILL);
                    }
                    first.get_or_insert((child.pid, child.name));
                    killed.push(child.pid);
                }
            }
        }
        for pid in ended {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
        if killed.is_empty() {
            outrun = false;
            break;
        }
        total += killed.len();
        for pid in killed {
            reap(Pid::from_raw(pid));
        }
    }
    if let Some((pid, name)) = first {
        tracing::warn!(
            pid,
            command = %crate::untrusted::shown(&name),
            killed = total,
            "killed processes a command left behind outside its process group"
        );
    }
    if outrun {
        tracing::error!(
            "a command's descendants kept forking for {}: some may still run",
            humantime::format_duration(SWEEP_LIMIT)
        );
    }
}

/// Waits (briefly) for a killed child to end, and reaps it.
fn reap(pid: Pid) {
    let deadline = Instant::now() + REAP_WAIT;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            _ => return,
        }
    }
}

struct ChildProcess {
    pid: i32,
    pgid: i32,
    zombie: bool,
    name: String,
}

/// The processes whose parent is `parent`, but for those in `skip`, from
/// /proc.
fn children_of(parent: i32, skip: &[i32]) -> Vec<ChildProcess> {
    let pids = match child_pids(parent) {
        Some(pids) => pids,
        None => all_pids(),
    };
    pids.into_iter()
        .filter(|pid| !skip.contains(pid))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid pgrp ...": comm may hold anything, so
            // the fields are read after its last ')'.
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(').map(|(_, n)| n.to_owned())?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let ppid: i32 = fields.next()?.parse().ok()?;
            let pgid: i32 = fields.next()?.parse().ok()?;
            (ppid == parent).then(|| ChildProcess {
                pid,
                pgid,
                zombie: state == "Z",
                name,
            })
        })
        .collect()
}

/// The children of `parent`, from the `children` files of its threads
/// (a few short reads, where scanning /proc reads a file per process on
/// the host, at every command's end); `None` without them (a kernel built
/// without `CONFIG_PROC_CHILDREN`). Each child's stat is read after.
///
/// Orphans are given to a subreaper's first live thread, its main thread
/// in the daemon (which lives as long as the process), and commands are
/// running leaders, skipped anyway: so the main thread's file is read, and
/// every thread's only when the main thread is gone.
fn child_pids(parent: i32) -> Option<Vec<i32>> {
    let parse = |text: String| -> Vec<i32> {
        text.split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect()
    };
    let main = format!("/proc/{parent}/task/{parent}/children");
    match std::fs::read_to_string(&main) {
        Ok(text) => return Some(parse(text)),
        // No such file in a thread that exists: the kernel lacks them.
        Err(_) if std::path::Path::new(&format!("/proc/{parent}/task/{parent}")).exists() => {
            return None;
        }
        Err(_) => {}
    }
    let mut pids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{parent}/task"))
        .ok()?
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(parse(text));
        }
    }
    Some(pids)
}

/// Every process id on the host.
fn all_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Whether process `pid` has `ENV_RUN=run` in its environment.
fn carries(pid: i32, run: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("{ENV_RUN}={run}");
    environ
        .split(|&b| b == 0)
        .any(|entry| entry == wanted.as_bytes())
}
