//! The `scale` scenarios (contactd only): the largest fleets this machine
//! allows. Every process here may hold at most 20,000 open files (a hard
//! limit root cannot raise), so the agents are spread over load processes,
//! this binary's hidden `scale-load` command, each holding its share
//! (`--scale-per-process`) of light agents: restart.rs's fleet, one HTTP/2
//! connection and a getTask stream each, each from a loopback address of
//! its own, with contactd's agent's reconnect rules. For each fleet size
//! (`--scale-agents`) a run measures
//! - the server's RSS per idle agent: with every agent subscribed and a
//!   second settled, less the RSS before any connected, over the agents;
//! - the time to connect and subscribe them all, and the server's CPU for it;
//! - the delivery latency of one broadcast task to all of them, each agent
//!   noting when it arrived;
//! - a SIGKILL and a new server at once on the same port, which this
//!   process holds and passes to each server as systemd's socket unit does
//!   (restart.rs): the time until every agent is subscribed again, and the
//!   new server's peak RSS over the old one's steady state.
//!
//! The parent and its load processes talk in lines of at most [`MAX_LINE`]
//! bytes. Parent to load: `connect`, `arm`, `sent <unix ns>`, `restart`,
//! `stats`. Load to parent: `ready`, `subscribed`, `armed`, `lat <µs> …`
//! lines then `delivered <received> <agents>`, `restarting` then `back`,
//! `stats <refused> <turned away> <other errors>`; or `error <text>`. A load
//! process (scale_load.rs) ends when its stdin closes, and is killed if its
//! parent dies.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use contactd::proto::admin::SubmitTaskRequest;
use nix::sys::signal::Signal;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, ChildStdout, Command},
};

use crate::{
    load,
    report::Outcome,
    restart::{self, unix_ns},
    server::{Kind, Launcher, Setup, cpu_seconds_of},
    store,
};

/// Connections contactd is configured for in these scenarios: the largest
/// fleet is 19,000 agents, and the server's 20,000 open files hold this many
/// besides its handshakes and its own files (see `SERVER_TOML`).
pub const MAX_AGENTS: usize = 19_400;

/// What the fleet needs from `[server]` beyond the defaults, and why:
/// - `max_connections`: the default (50,000) is lowered to what the open
///   files leave after the handshakes' share (`max_handshakes`, 1,024) and
///   the daemon's own 64, i.e. 18,912 at 20,000 files, below 19,000 agents;
///   set explicitly, within what the files hold;
/// - `max_handshakes = 512`: so that they do (19,424 left), still hundreds
///   of connections in handshake at once (more wait in the backlog);
/// - `max_callers = 20000`: every agent is a caller (anonymous ones by their
///   address, mTLS ones by name); beyond the default 10,000 they are served
///   but not remembered, with a warning.
///
/// The per-address caps hold (each agent has an address of its own), and
/// `accept_rate` keeps its default (5,000 a second over a burst of 1,000):
/// the product's pace, part of what `connect_s` and `back_s` measure.
const SERVER_TOML: &str = "max_connections = 19400\nmax_handshakes = 512\nmax_callers = 20000\n";

/// Longest a load process may take to say `ready` (mTLS: it makes a
/// certificate for each of its agents first) or to answer a command.
const REPLY_LIMIT: Duration = Duration::from_secs(60);
/// Longest the fleet may take to connect, or to come back after the
/// restart (as restart.rs's fleets).
pub const FLEET_LIMIT: Duration = Duration::from_secs(120);
/// Longest one scale run may take: every step at its limit.
pub const RUN_LIMIT: Duration = Duration::from_secs(600);
/// Longest the broadcast task may take to reach every agent.
pub const DELIVERY_LIMIT: Duration = Duration::from_secs(30);
/// Longest a load process may take to exit once its stdin is closed.
const EXIT_LIMIT: Duration = Duration::from_secs(10);
/// Longest line of the protocol.
pub const MAX_LINE: usize = 16 * 1024;

/// How the scale scenarios run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The fleet sizes, one run each.
    pub sizes: Vec<usize>,
    /// The size of this run (one of `sizes`).
    pub agents: usize,
    /// Agents per load process.
    pub per_process: usize,
    /// Agents connecting at once, per load process.
    pub parallel: usize,
    /// The held socket's listen backlog.
    pub backlog: u32,
}

impl Options {
    /// The sizes and the share of each load process fit this machine's
    /// open-file limit.
    pub fn check(&self, open_files: u64) -> anyhow::Result<()> {
        for &size in &self.sizes {
            anyhow::ensure!(
                (1..=MAX_AGENTS).contains(&size),
                "--scale-agents {size}: from 1 to {MAX_AGENTS} (the server's open files)"
            );
        }
        anyhow::ensure!(
            self.per_process >= 1 && self.per_process as u64 + 100 <= open_files,
            "--scale-per-process {}: from 1 to {} (a load process's open files)",
            self.per_process,
            open_files.saturating_sub(100)
        );
        Ok(())
    }
}

/// contactd's config in the scale scenarios (`[server]` keys, the rest):
/// only submitted tasks, so the one broadcast is the only message.
pub fn setup() -> Setup {
    Setup {
        server_toml: SERVER_TOML.into(),
        contactd_toml: "[tasks]\nbatch = 0\n".into(),
        ..Setup::default()
    }
}

/// One scale run of `options.agents` agents (in mTLS with a certificate
/// each, signed by the CA in `pki`).
pub async fn run(
    launcher: &Launcher,
    mut setup: Setup,
    pki: Option<&Path>,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let n = options.agents;
    let held = restart::held_listener(options.backlog)?;
    setup.passed = Some(Arc::clone(&held));
    let server = launcher.start(Kind::Contactd, &setup).await?;
    let before = server.rss()?;
    let mut loads = Loads::spawn(launcher, server.addr, pki, options).await?;

    let cpu_before = server.cpu_seconds()?;
    let started = Instant::now();
    loads.tell("connect").await?;
    loads.expect("subscribed", FLEET_LIMIT).await?;
    let connect = started.elapsed();
    let connect_cpu = server.cpu_seconds()? - cpu_before;
    // Steady state: settled after a second, as in hold and restart.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let steady = server.rss()?;

    let delivery = deliver(&mut loads, &server.admin).await?;

    loads.tell("restart").await?;
    loads.expect("restarting", REPLY_LIMIT).await?;
    let back = async { loads.expect("back", FLEET_LIMIT).await.map(drop) };
    let restarted = restart::restart(launcher, &setup, server, Signal::SIGKILL, back).await?;
    loads.tell("stats").await?;
    let stats = loads.expect("stats", REPLY_LIMIT).await?;
    let load_cpu = loads.cpu_seconds();
    let loads_ended = loads.stop().await;

    let mut outcome = Outcome::default();
    let kib = |bytes: u64| bytes as f64 / 1024.0;
    outcome.figures.extend([
        ("agents", n as f64),
        (
            "rss_per_agent_kib",
            kib(steady.saturating_sub(before)) / n as f64,
        ),
        ("connect_s", connect.as_secs_f64()),
        ("server_cpu_per_connect_us", connect_cpu * 1e6 / n as f64),
    ]);
    delivery.figures(&mut outcome);
    let mib = |bytes: u64| bytes as f64 / 1_048_576.0;
    outcome.figures.extend([
        ("back_s", restarted.all_back.as_secs_f64()),
        ("back_after_start_s", restarted.from_start.as_secs_f64()),
        ("server_cpu_back_s", restarted.cpu),
        ("rss_steady_mib", mib(steady)),
        ("rss_peak_mib", mib(restarted.peak)),
        (
            "peak_over_steady",
            restarted.peak as f64 / steady.max(1) as f64,
        ),
    ]);
    stats_figures(&stats, &mut outcome)?;
    outcome.figures.extend([
        ("load_processes", stats.len() as f64),
        ("load_cpu_s", load_cpu),
    ]);
    outcome.check(delivery.received == n as u64, || {
        format!("{} of {n} agents received the broadcast", delivery.received)
    });
    let back = &restarted.back;
    outcome.check(back.is_ok(), || format!("{back:?}"));
    outcome.check(loads_ended.is_ok(), || format!("{loads_ended:?}"));
    let next = restarted.next;
    let log = next.log_tail();
    let stopped = next.stop().await;
    outcome.check(stopped.is_ok(), || {
        format!("stopping the server: {stopped:?}; log: {log}")
    });
    drop(held);
    Ok(outcome)
}

/// The broadcast's delivery to every agent.
struct Delivery {
    /// Submit to arrival at each agent, in nanoseconds.
    latency: hdrhistogram::Histogram<u64>,
    /// Agents it reached.
    received: u64,
    /// How long the submit call took (it returns once the task is
    /// committed).
    submit: Duration,
}

impl Delivery {
    fn figures(&self, outcome: &mut Outcome) {
        let ms = |ns: u64| ns as f64 / 1e6;
        outcome.figures.extend([
            ("delivery_p50_ms", ms(self.latency.value_at_quantile(0.5))),
            ("delivery_p99_ms", ms(self.latency.value_at_quantile(0.99))),
            ("delivery_max_ms", ms(self.latency.max())),
            ("submit_ms", self.submit.as_secs_f64() * 1000.0),
        ]);
    }
}

/// Publishes one broadcast task and gathers when each agent received it.
///
/// The agents time it from the submit time taken here, just before the
/// submit call: a task on the wire (`ServerMsg`, proto/contact.proto)
/// carries no creation time, and the admin API's `created_ms` is in whole
/// milliseconds. The figure so includes the submit's own path and commit.
async fn deliver(loads: &mut Loads, admin: &Path) -> anyhow::Result<Delivery> {
    let mut admin = store::admin(admin).await?;
    loads.tell("arm").await?;
    loads.expect("armed", REPLY_LIMIT).await?;
    let sent = unix_ns();
    let started = Instant::now();
    let request = SubmitTaskRequest {
        text: "bench scale: one broadcast".into(),
        ..Default::default()
    };
    admin.submit_task(request).await?;
    let submit = started.elapsed();
    loads.tell(&format!("sent {sent}")).await?;
    let mut latency = load::histogram();
    let mut received = 0;
    for process in &mut loads.processes {
        received += process.latencies(&mut latency).await?;
    }
    Ok(Delivery {
        latency,
        received,
        submit,
    })
}

/// Adds the load processes' counts after the restart (connections refused,
/// turned away with a retry hint, failed otherwise), summed.
fn stats_figures(stats: &[String], outcome: &mut Outcome) -> anyhow::Result<()> {
    let mut sums = [0u64; 3];
    for line in stats {
        let counts: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("stats {line:?}"))?;
        anyhow::ensure!(counts.len() == 3, "stats {line:?}: 3 counts expected");
        for (sum, count) in sums.iter_mut().zip(counts) {
            *sum += count;
        }
    }
    let [refused, turned_away, other_errors] = sums.map(|s| s as f64);
    outcome.figures.extend([
        ("refused", refused),
        ("turned_away", turned_away),
        ("other_errors", other_errors),
    ]);
    Ok(())
}

/// The load processes of one run.
struct Loads {
    processes: Vec<LoadProcess>,
}

/// One load process: the child and both ends of its pipes.
struct LoadProcess {
    child: Child,
    pid: i32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Its first agent, for error messages.
    first: usize,
}

impl Loads {
    /// Starts enough load processes for `options.agents` agents, at most
    /// `options.per_process` each, and waits until each is ready.
    async fn spawn(
        launcher: &Launcher,
        addr: SocketAddr,
        pki: Option<&Path>,
        options: &Options,
    ) -> anyhow::Result<Loads> {
        let mut processes = Vec::new();
        let per_process = options.per_process.max(1);
        for first in (0..options.agents).step_by(per_process) {
            let count = per_process.min(options.agents - first);
            let mut command = Command::new(&launcher.bench);
            command
                .arg("scale-load")
                .arg(format!("--addr={addr}"))
                .arg(format!("--first={first}"))
                .arg(format!("--count={count}"))
                .arg(format!("--parallel={}", options.parallel));
            if let Some(pki) = pki {
                command.arg("--pki").arg(pki);
            }
            // Not pinned by taskset: it inherits this process's CPU (the
            // load CPU) when pinning.
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true);
            processes.push(LoadProcess::start(command, first)?);
        }
        let mut loads = Loads { processes };
        loads.expect("ready", REPLY_LIMIT).await?;
        Ok(loads)
    }

    /// Sends `command` to every load process.
    async fn tell(&mut self, command: &str) -> anyhow::Result<()> {
        for process in &mut self.processes {
            process.tell(command).await?;
        }
        Ok(())
    }

    /// The reply `word` from every load process (what follows it on each
    /// line); read in turn, so the last arrives when all have.
    async fn expect(&mut self, word: &str, limit: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + limit;
        let mut replies = Vec::new();
        for process in &mut self.processes {
            replies.push(process.expect(word, deadline).await?);
        }
        Ok(replies)
    }

    /// CPU seconds the load processes have used so far.
    fn cpu_seconds(&self) -> f64 {
        self.processes
            .iter()
            .filter_map(|p| cpu_seconds_of(p.pid).ok())
            .sum()
    }

    /// Closes their stdin and waits for their exit (bounded; then killed).
    async fn stop(self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        for process in self.processes {
            let first = process.first;
            let LoadProcess {
                mut child, stdin, ..
            } = process;
            drop(stdin);
            match tokio::time::timeout(EXIT_LIMIT, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(status) => failed.push(format!("load process from agent {first}: {status:?}")),
                Err(_) => {
                    let _ = child.kill().await;
                    failed.push(format!("load process from agent {first}: killed"));
                }
            }
        }
        anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
        Ok(())
    }
}

impl LoadProcess {
    fn start(mut command: Command, first: usize) -> anyhow::Result<LoadProcess> {
        let mut child = command.spawn().context("starting a load process")?;
        let pid = child.id().context("no pid")? as i32;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(LoadProcess {
            child,
            pid,
            stdin,
            stdout,
            first,
        })
    }

    async fn tell(&mut self, command: &str) -> anyhow::Result<()> {
        self.stdin.write_all(command.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Its next line, by `deadline`.
    async fn line(&mut self, deadline: Instant) -> anyhow::Result<String> {
        let first = self.first;
        let line = tokio::time::timeout_at(deadline.into(), read_line(&mut self.stdout))
            .await
            .with_context(|| format!("load process from agent {first}: no answer in time"))??;
        let line = line.with_context(|| format!("load process from agent {first} ended"))?;
        if let Some(error) = line.strip_prefix("error ") {
            bail!("load process from agent {first}: {error}");
        }
        Ok(line)
    }

    /// The reply `word`, by `deadline`: what follows it on its line.
    async fn expect(&mut self, word: &str, deadline: Instant) -> anyhow::Result<String> {
        let line = self.line(deadline).await?;
        let (got, rest) = line.split_once(' ').unwrap_or((&line, ""));
        anyhow::ensure!(
            got == word,
            "load process from agent {}: {word:?} expected, got {line:?}",
            self.first
        );
        Ok(rest.to_owned())
    }

    /// Reads its `lat` lines into `latency` (in ns) until `delivered`;
    /// returns how many of its agents received the task.
    async fn latencies(
        &mut self,
        latency: &mut hdrhistogram::Histogram<u64>,
    ) -> anyhow::Result<u64> {
        let deadline = Instant::now() + DELIVERY_LIMIT + REPLY_LIMIT;
        // Bounded by the deadline and by the agents' count: one line each
        // at most.
        loop {
            let line = self.line(deadline).await?;
            match line.split_once(' ') {
                Some(("lat", values)) => {
                    for value in values.split_whitespace() {
                        let us: u64 = value.parse().with_context(|| format!("lat {value:?}"))?;
                        latency.saturating_record(us.saturating_mul(1000).max(1));
                    }
                }
                Some(("delivered", counts)) => {
                    let received = counts.split_whitespace().next().unwrap_or("");
                    return received
                        .parse()
                        .with_context(|| format!("delivered {counts:?}"));
                }
                _ => bail!("load process from agent {}: {line:?}", self.first),
            }
        }
    }
}

/// One line of at most [`MAX_LINE`] bytes, without its newline; `None` at
/// the end of input.
async fn read_line(reader: &mut (impl AsyncBufRead + Unpin)) -> anyhow::Result<Option<String>> {
    let mut line = Vec::new();
    (&mut *reader)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    line_read(line)
}

/// A line as read up to its newline (at most [`MAX_LINE`] + 1 bytes: one
/// more is too long), without the newline; `None` when empty (the end of
/// input). Both sides of the protocol read with this.
pub fn line_read(mut line: Vec<u8>) -> anyhow::Result<Option<String>> {
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    anyhow::ensure!(
        line.len() <= MAX_LINE,
        "a line longer than {MAX_LINE} bytes"
    );
    Ok(Some(String::from_utf8(line)?))
}
