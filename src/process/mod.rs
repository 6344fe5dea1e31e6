//! Running one command: no shell, its own process group and, where the
//! daemon may make one, its own cgroup ([`cgroup`]); combined output
//! captured up to a bound; killed as a group (and cgroup) on timeout or on
//! request. When it ends, whatever is left of its group and cgroup, and
//! what it started outside the group ([`reaper`]), is killed too: nothing
//! outlives it.
//!
//! Neither the server's nor the agent's: remoteCMD (`remote_cmd`, after its
//! allow-list) uses `execute`, which starts the command from an empty
//! environment plus the variables it is given; the agent's task handlers
//! and its status command use `execute_with`, which adds stdin, passes on
//! the daemon's environment (less [`CHILD_ENV_REMOVE`]) with variables of
//! their own, and keeps the *end* of the output.
//!
//! [`CHILD_ENV_REMOVE`]: crate::systemd::CHILD_ENV_REMOVE

pub mod cgroup;
pub mod reaper;

use std::{pin::pin, process::Stdio, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    process::Command,
};
use tokio_util::sync::CancellationToken;

/// How a command ended, as remoteCMD reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdOutput {
    /// True only when the command ran and exited with status 0.
    pub success: bool,
    /// Killed because it ran past its timeout (for the metrics' outcome).
    pub timed_out: bool,
    /// Combined stdout and stderr (at most the configured bound), followed by
    /// a `[contactd: ...]` line when the command failed, was killed or its
    /// output was cut.
    pub output: String,
}

/// After killing a group, how long to keep reading output already written.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(1);

enum End {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Killed,
}

/// What a command gets besides its argv, and how its output is kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Input<'a> {
    /// Written to the command's stdin, which is then closed; `None`: /dev/null.
    pub stdin: Option<&'a [u8]>,
    /// Environment variables added to the daemon's (for `execute`: the
    /// whole environment).
    pub env: &'a [(&'a str, &'a str)],
    /// Keep the last `max_output` bytes instead of the first.
    pub keep_tail: bool,
    /// The note added when `kill` ends the command.
    pub killed: &'a str,
}

impl Default for Input<'_> {
    fn default() -> Self {
        Input {
            stdin: None,
            env: &[],
            keep_tail: false,
            killed: "killed: the server is shutting down",
        }
    }
}

/// Where a command's environment starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// The daemon's own, less [`crate::systemd::CHILD_ENV_REMOVE`].
    Daemon,
    /// Nothing: only [`Input::env`] (and [`reaper::ENV_RUN`]).
    Empty,
}

/// Runs `argv` with no input, keeping the start of its output, as
/// [`execute_with`], but with exactly `env` as its environment (and
/// [`reaper::ENV_RUN`], which the reaper needs): nothing of the daemon's,
/// whose variables may hold secrets. A program named without a `/` is
/// looked up in `env`'s `PATH`.
pub(crate) async fn execute(
    argv: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
    max_output: usize,
    kill: &CancellationToken,
) -> CmdOutput {
    let input = Input {
        env,
        ..Input::default()
    };
    run(argv, input, Base::Empty, timeout, max_output, kill).await
}

/// Runs `argv` with `input`, its variables added to the daemon's
/// environment, killing its group after `timeout` or when `kill` is
/// cancelled. `argv` must not be empty.
pub(crate) async fn execute_with(
    argv: &[String],
    input: Input<'_>,
    timeout: Duration,
    max_output: usize,
    kill: &CancellationToken,
) -> CmdOutput {
    run(argv, input, Base::Daemon, timeout, max_output, kill).await
}

async fn run(
    argv: &[String],
    input: Input<'_>,
    base: Base,
    timeout: Duration,
    max_output: usize,
    kill: &CancellationToken,
) -> CmdOutput {
    let run = reaper::new_run();
    let build = |cgroup: Option<&cgroup::Cgroup>| {
        let mut command = Command::new(&argv[0]);
        if base == Base::Empty {
            command.env_clear();
        }
        command
            .args(&argv[1..])
            .envs(input.env.iter().copied())
            .stdin(if input.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if base == Base::Daemon {
            for name in crate::systemd::CHILD_ENV_REMOVE {
                command.env_remove(name);
            }
        }
        command.env(reaper::ENV_RUN, &run);
        if let Some(cgroup) = cgroup {
            cgroup.enter(&mut command);
        }
        command
    };
    let mut cgroup = cgroup::Cgroup::create(&run);
    let mut spawned = reaper::spawn(&mut build(cgroup.as_ref()));
    if let (Err(e), Some(_)) = (&spawned, &cgroup) {
        // Entering the cgroup, or the command itself, failed: without the
        // cgroup it tells which.
        let why = format!("a command could not enter its cgroup: {e}");
        cgroup = None;
        spawned = reaper::spawn(&mut build(None));
        if spawned.is_ok() {
            cgroup::give_up(&why);
        }
    }
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return CmdOutput {
                success: false,
                timed_out: false,
                output: format!("[contactd: cannot start {:?}: {e}]", argv[0]),
            };
        }
    };
    // If the call is dropped midway (the client went away), the guard kills
    // the whole group, not only the direct child.
    let group = GroupGuard {
        pgid: child.id().map(|id| Pid::from_raw(id as i32)),
        run,
        cgroup,
    };
    let mut capture = Capture::new(max_output, input.keep_tail);
    let stdin = child.stdin.take();
    let feed = async move {
        if let (Some(mut pipe), Some(bytes)) = (stdin, input.stdin) {
            // A command that does not read its input is not an error.
            let _ = pipe.write_all(bytes).await;
        }
    };
    let end = {
        let mut collect = pin!(capture.collect(child.stdout.take(), child.stderr.take()));
        let end = tokio::select! {
            (_, _, status) = async { tokio::join!(feed, collect.as_mut(), child.wait()) } => End::Exited(status),
            () = tokio::time::sleep(timeout) => End::TimedOut,
            () = kill.cancelled() => End::Killed,
        };
        if !matches!(end, End::Exited(_)) {
            group.kill();
            let _ = child.wait().await;
            // What left the group may hold the pipes open.
            group.sweep().await;
            let _ = tokio::time::timeout(DRAIN_AFTER_KILL, collect).await;
        }
        end
    };
    group.finish().await;
    let timed_out = matches!(end, End::TimedOut);
    let (success, note) = match end {
        End::Exited(Ok(status)) if status.success() => (true, None),
        End::Exited(Ok(status)) => (false, Some(describe(status))),
        End::Exited(Err(e)) => (false, Some(format!("cannot wait for the command: {e}"))),
        End::TimedOut => (
            false,
            Some(format!(
                "killed after the {} timeout",
                humantime::format_duration(timeout)
            )),
        ),
        End::Killed => (false, Some(input.killed.to_owned())),
    };
    CmdOutput {
        success,
        timed_out,
        output: capture.finish(note),
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("ended: {status}"),
    }
}

/// The command's process group, cgroup and run id, from its start to its
/// end.
struct GroupGuard {
    /// Its process group, which is also its leader's pid; `None` once done.
    pgid: Option<Pid>,
    /// Its [`reaper::ENV_RUN`] id.
    run: String,
    /// Its cgroup, where it has one: killed and removed when dropped.
    cgroup: Option<cgroup::Cgroup>,
}

impl GroupGuard {
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // The group may already be gone; nothing to do then.
            let _ = nix::sys::signal::killpg(pgid, Signal::SIGKILL);
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill();
        }
    }

    /// Kills what the command left outside its group (a blocking scan of
    /// /proc, so on the blocking pool).
    async fn sweep(&self) {
        if reaper::active() {
            let run = self.run.clone();
            let _ = tokio::task::spawn_blocking(move || reaper::sweep(&run)).await;
        }
    }

    /// The command has ended and been reaped: what is left of its group
    /// (background jobs) and what it left outside the group are killed.
    async fn finish(mut self) {
        if let Some(pgid) = self.pgid.take() {
            reaper::end(pgid);
        }
        if let Some(cgroup) = self.cgroup.take() {
            // Waits (briefly) for the cgroup to empty.
            let _ = tokio::task::spawn_blocking(move || drop(cgroup)).await;
        }
        self.sweep().await;
    }
}

impl Drop for GroupGuard {
    /// The call was dropped midway (the client went away, or the runtime is
    /// shutting down after a second signal).
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            reaper::end(pgid);
            drop(self.cgroup.take());
            reaper::sweep(&self.run);
        }
    }
}

/// Combined output, kept up to a bound (its start, or its end); the rest is
/// read and counted.
struct Capture {
    kept: Vec<u8>,
    max: usize,
    dropped: u64,
    tail: bool,
}

impl Capture {
    fn new(max: usize, tail: bool) -> Capture {
        Capture {
            kept: Vec::new(),
            max,
            dropped: 0,
            tail,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.tail {
            self.kept.extend_from_slice(bytes);
            // Trim in batches, so the copy is amortised.
            if self.kept.len() > self.max.saturating_mul(2).max(8192) {
                self.trim_front();
            }
            return;
        }
        let room = self.max.saturating_sub(self.kept.len());
        let take = room.min(bytes.len());
        self.kept.extend_from_slice(&bytes[..take]);
        self.dropped += (bytes.len() - take) as u64;
    }

    /// Reads both pipes to their end, interleaved as the data arrives.
    async fn collect(
        &mut self,
        mut out: Option<impl AsyncRead + Unpin>,
        mut err: Option<impl AsyncRead + Unpin>,
    ) {
        let mut out_buf = [0u8; 4096];
        let mut err_buf = [0u8; 4096];
        while out.is_some() || err.is_some() {
            tokio::select! {
                n = read(&mut out, &mut out_buf), if out.is_some() => match n {
                    Some(n) => self.push(&out_buf[..n]),
                    None => out = None,
                },
                n = read(&mut err, &mut err_buf), if err.is_some() => match n {
                    Some(n) => self.push(&err_buf[..n]),
                    None => err = None,
                },
            }
        }
    }

    fn trim_front(&mut self) {
        let extra = self.kept.len().saturating_sub(self.max);
        self.kept.drain(..extra);
        self.dropped += extra as u64;
    }

    fn finish(mut self, note: Option<String>) -> String {
        if self.tail {
            self.trim_front();
        }
        let text = String::from_utf8_lossy(&self.kept);
        // Replacement characters can make the text longer than the bytes.
        let (text, dropped) = if self.tail {
            let start = text.ceil_char_boundary(text.len().saturating_sub(self.max));
            (&text[start..], "earlier")
        } else {
            (&text[..text.floor_char_boundary(self.max)], "more")
        };
        let dropped = (self.dropped > 0)
            .then(|| format!("output truncated: {} {dropped} bytes dropped", self.dropped));
        let mut out = String::new();
        // The tail says first that its beginning is missing; the head says last.
        if self.tail
            && let Some(dropped) = &dropped
        {
            out.push_str(&format!("[contactd: {dropped}]\n"));
        }
        out.push_str(text);
        let trailing = if self.tail { None } else { dropped };
        for note in trailing.into_iter().chain(note) {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("[contactd: {note}]"));
        }
        out
    }
}

async fn read(pipe: &mut Option<impl AsyncRead + Unpin>, buf: &mut [u8]) -> Option<usize> {
    match pipe.as_mut()?.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        crate::config::pattern::split_words(line).unwrap()
    }

    const PATH: (&str, &str) = ("PATH", "/usr/bin:/bin");

    async fn run(line: &str, timeout: Duration, max: usize) -> CmdOutput {
        execute(
            &argv(line),
            &[PATH],
            timeout,
            max,
            &CancellationToken::new(),
        )
        .await
    }

    #[tokio::test]
    async fn execute_passes_only_the_given_environment() {
        let env = [PATH, ("CONTACTD_TEST", "a=b c")];
        let out = execute(
            &argv("env"),
            &env,
            Duration::from_secs(10),
            4096,
            &CancellationToken::new(),
        )
        .await;
        assert!(out.success, "{out:?}");
        let mut names: Vec<&str> = out
            .output
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, _)| n)
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["CONTACTD_RUN", "CONTACTD_TEST", "PATH"], "{out:?}");
        assert!(
            out.output.lines().any(|l| l == "CONTACTD_TEST=a=b c"),
            "{out:?}"
        );
    }

    #[test]
    fn the_config_may_not_set_the_run_id() {
        let text = format!("[remote_cmd]\nenv = {{ {} = \"1\" }}\n", reaper::ENV_RUN);
        let problems = crate::config::parse::<crate::config::Config>(&text).unwrap_err();
        assert!(
            problems[0].message.contains("set by contactd"),
            "{problems:?}"
        );
    }

    #[tokio::test]
    async fn captures_combined_output_and_status() {
        let out = run(
            "sh -c 'echo out; echo err >&2; exit 3'",
            Duration::from_secs(10),
            1024,
        )
        .await;
        assert!(!out.success);
        assert!(
            out.output.contains("out\n") && out.output.contains("err\n"),
            "{out:?}"
        );
        assert!(out.output.ends_with("[contactd: exit status 3]"), "{out:?}");
        let ok = run("echo hello", Duration::from_secs(10), 1024).await;
        assert_eq!(
            ok,
            CmdOutput {
                success: true,
                timed_out: false,
                output: "hello\n".into()
            }
        );
    }

    #[tokio::test]
    async fn output_is_bounded() {
        let out = run("head -c 100000 /dev/zero", Duration::from_secs(10), 1000).await;
        assert!(out.success);
        assert!(out.output.starts_with(&"\0".repeat(1000)));
        assert!(
            out.output
                .ends_with("[contactd: output truncated: 99000 more bytes dropped]"),
            "{:?}",
            &out.output[1000..]
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_a_failure_not_a_crash() {
        let out = run("/nonexistent/contactd-test", Duration::from_secs(10), 1024).await;
        assert!(!out.success);
        assert!(out.output.contains("cannot start"), "{out:?}");
    }

    #[tokio::test]
    async fn stdin_env_and_the_output_tail() {
        let input = Input {
            stdin: Some(b"the task"),
            env: &[("CONTACTD_TEST", "yes")],
            keep_tail: true,
            ..Input::default()
        };
        let argv = argv("sh -c 'head -c 3000 /dev/zero; cat; echo \" $CONTACTD_TEST\"; exit 2'");
        let out = execute_with(
            &argv,
            input,
            Duration::from_secs(10),
            100,
            &CancellationToken::new(),
        )
        .await;
        assert!(!out.success);
        assert!(
            out.output
                .starts_with("[contactd: output truncated: 2913 earlier bytes dropped]\n"),
            "{out:?}"
        );
        assert!(
            out.output
                .ends_with("the task yes\n[contactd: exit status 2]"),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        // The grandchild `sleep` holds the pipes open: only a group kill ends it.
        let out = run(
            "sh -c 'sleep 30 & sleep 30; echo never'",
            Duration::from_millis(200),
            1024,
        )
        .await;
        assert!(!out.success);
        assert!(
            out.output.contains("killed after the 200ms timeout"),
            "{out:?}"
        );
        assert!(!out.output.contains("never"));
    }
}
