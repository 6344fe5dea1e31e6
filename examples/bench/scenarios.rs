//! The scenarios: each starts its own server process, loads it over
//! loopback for a bounded time, stops it, and returns its figures.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use contactd::proto::contact::{
    ClientMsg, Outcome as TaskOutcome, Result as ResultMsg, contact_client::ContactClient,
};
use futures_util::stream;
use hdrhistogram::Histogram;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    cmd,
    load::{self, End, Fleet},
    report::{Outcome, Target, percentiles},
    server::{Kind, Launcher, Setup},
};

/// A status report as an agent sends it.
const STATUS: &str = "agent-0001 load=0.42 mem=37% tasks=12";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    StatusPingpong,
    StatusPipelined,
    Ingest,
    Fanout,
    Hold,
    Cmd,
    Startup,
    Shutdown,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::StatusPingpong,
        Scenario::StatusPipelined,
        Scenario::Ingest,
        Scenario::Fanout,
        Scenario::Hold,
        Scenario::Cmd,
        Scenario::Startup,
        Scenario::Shutdown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::StatusPingpong => "status-pingpong",
            Scenario::StatusPipelined => "status-pipelined",
            Scenario::Ingest => "ingest",
            Scenario::Fanout => "fanout",
            Scenario::Hold => "hold",
            Scenario::Cmd => "cmd",
            Scenario::Startup => "startup",
            Scenario::Shutdown => "shutdown",
        }
    }

    /// What the servers need beyond their defaults.
    fn setup(self) -> Setup {
        match self {
            // 10,000 tasks/s offered: batch 100 every 10 ms.
            Scenario::Fanout => Setup {
                contactd_toml: "[tasks]\ninterval = \"10ms\"\nbatch = 100\n",
                baseline_args: &["--interval", "10ms", "--batch", "100"],
            },
            Scenario::Cmd => Setup {
                contactd_toml: "[remote_cmd]\nenabled = true\nallow = [\"true\"]\n",
                baseline_args: &[],
            },
            _ => Setup::default(),
        }
    }

    /// Whether contactd's figure is compared with the baseline's (a higher
    /// value is better), and the target for the ratio.
    pub fn ratio_target(self) -> Option<Target> {
        let limit = match self {
            Scenario::StatusPingpong => 0.9,
            Scenario::StatusPipelined | Scenario::Ingest => 0.8,
            Scenario::Fanout => 0.7,
            _ => return None,
        };
        Some(Target {
            what: "ratio_vs_baseline",
            limit,
            at_least: true,
        })
    }

    /// Targets on contactd's own figures: (figure name, target).
    pub fn absolute_targets(self) -> Vec<(&'static str, Target)> {
        let at_most = |what, limit| Target {
            what,
            limit,
            at_least: false,
        };
        match self {
            Scenario::Hold => vec![
                ("rss_per_agent_kib", at_most("rss_per_agent_kib", 32.0)),
                ("establish_s", at_most("establish_s", 3.0)),
            ],
            Scenario::Startup => vec![("ready_ms", at_most("ready_ms", 50.0))],
            Scenario::Shutdown => vec![("exit_s", at_most("exit_s", 1.0))],
            _ => Vec::new(),
        }
    }
}

/// Sizes and durations of a run.
#[derive(Debug, Clone)]
pub struct Params {
    pub duration: Duration,
    pub fanout_agents: usize,
    pub hold_agents: usize,
    pub shutdown_streams: usize,
    pub startups: usize,
    pub cmd_in_flight: usize,
    /// Agents connecting at once.
    pub connect_parallel: usize,
}

/// Runs `scenario` against a fresh `kind` server.
pub async fn run(
    scenario: Scenario,
    kind: Kind,
    launcher: &Launcher,
    params: &Params,
) -> anyhow::Result<Outcome> {
    if scenario == Scenario::Startup {
        return startup(kind, launcher, params.startups).await;
    }
    let server = launcher.start(kind, &scenario.setup()).await?;
    let addr = server.addr;
    let cpu_before = server.cpu_seconds()?;
    let d = params.duration;
    let mut outcome = match scenario {
        Scenario::StatusPingpong => status(addr, 1, 1, 1, d).await?,
        Scenario::StatusPipelined => status(addr, 4, 16, 64, d).await?,
        Scenario::Ingest => ingest(addr, 4, d).await?,
        Scenario::Fanout => fanout(addr, params.fanout_agents, params.connect_parallel, d).await,
        Scenario::Hold => {
            let before = server.rss()?;
            hold(
                addr,
                params.hold_agents,
                params.connect_parallel,
                d,
                || server.rss(),
                before,
            )
            .await?
        }
        Scenario::Cmd => cmd::calls(addr, params.cmd_in_flight, d).await?,
        Scenario::Shutdown => {
            let fleet =
                Fleet::connect(addr, params.shutdown_streams, params.connect_parallel).await;
            let mut outcome = Outcome::default();
            fleet_errors(&fleet, &mut outcome);
            let log = server.log_handle();
            let exit = server.stop().await?;
            if std::env::var_os("BENCH_SHOW_LOG").is_some() {
                eprintln!("{}", crate::server::tail(&log).replace(" | ", "\n"));
            }
            let ends = fleet.ends(Duration::from_secs(5)).await;
            outcome.figures.push(("exit_s", exit.as_secs_f64()));
            outcome
                .figures
                .push(("streams", params.shutdown_streams as f64));
            for (end, count) in ends {
                let name = match end {
                    End::Clean => "ended_clean",
                    End::Status(tonic::Code::Unavailable) => "ended_unavailable",
                    End::Status(_) => "ended_other_status",
                };
                outcome.figures.push((name, count as f64));
            }
            return Ok(outcome);
        }
        Scenario::Startup => unreachable!("handled above"),
    };
    // Server CPU per operation: steadier than the rate when neither side
    // saturates its CPU (whole run, so connection set-up is included).
    let cpu = server.cpu_seconds()? - cpu_before;
    if let Some(count) = outcome.figure("count").or(outcome.figure("delivered")) {
        outcome
            .figures
            .push(("server_cpu_ns_per_op", cpu * 1e9 / count.max(1.0)));
    }
    let log = server.log_tail();
    let stopped = server.stop().await;
    outcome.check(stopped.is_ok(), || {
        format!("stopping the server: {stopped:?}; log: {log}")
    });
    Ok(outcome)
}

/// sendStatus: `conns` connections × `streams` streams, each with up to
/// `window` status messages in flight.
async fn status(
    addr: SocketAddr,
    conns: usize,
    streams: usize,
    window: usize,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let mut channels = Vec::new();
    for _ in 0..conns {
        channels.push(load::connect(addr).await?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for channel in &channels {
        for _ in 0..streams {
            set.spawn(status_stream(
                ContactClient::new(channel.clone()),
                window,
                deadline,
            ));
        }
    }
    let mut hist = load::histogram();
    let mut count = 0u64;
    let mut outcome = Outcome::default();
    while let Some(done) = set.join_next().await {
        match done? {
            Ok((h, n)) => {
                hist.add(&h).context("merging histograms")?;
                count += n;
            }
            Err(e) => outcome.errors.push(format!("{e:#}")),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    outcome.figures.push(("rate", count as f64 / elapsed));
    percentiles(&mut outcome, &hist);
    outcome.figures.push(("count", count as f64));
    Ok(outcome)
}

async fn status_stream(
    mut client: ContactClient<Channel>,
    window: usize,
    deadline: Instant,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    // The channel never holds more than `window` messages: at most that
    // many are in flight.
    let (tx, rx) = mpsc::channel(window);
    let mut replies = client
        .send_status(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut hist = load::histogram();
    let mut in_flight = VecDeque::with_capacity(window);
    let mut count = 0;
    loop {
        while in_flight.len() < window && Instant::now() < deadline {
            tx.try_send(ClientMsg { msg: STATUS.into() })
                .map_err(|e| anyhow::anyhow!("queueing a status: {e}"))?;
            in_flight.push_back(Instant::now());
        }
        let Some(sent) = in_flight.pop_front() else {
            break;
        };
        match replies.message().await? {
            Some(_) => {
                load::record(&mut hist, sent);
                count += 1;
            }
            None => bail!("the status stream ended early"),
        }
    }
    drop(tx);
    if replies.message().await?.is_some() {
        bail!("a reply without a status");
    }
    Ok((hist, count))
}

/// tellResult: one connection, `streams` streams sending results as fast as
/// flow control lets them.
async fn ingest(addr: SocketAddr, streams: usize, duration: Duration) -> anyhow::Result<Outcome> {
    let channel = load::connect(addr).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for _ in 0..streams {
        let mut client = ContactClient::new(channel.clone());
        let sent = Arc::clone(&sent);
        let mut id = 0;
        let results = stream::poll_fn(move |_| {
            if Instant::now() >= deadline {
                return Poll::Ready(None);
            }
            id += 1;
            sent.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Some(ResultMsg {
                ret: "done: exit 0".into(),
                task_id: id,
                outcome: TaskOutcome::Ok.into(),
                epoch: 0,
            }))
        });
        set.spawn(async move { client.tell_result(results).await });
    }
    let mut outcome = Outcome::default();
    while let Some(done) = set.join_next().await {
        if let Err(status) = done? {
            outcome.errors.push(status.to_string());
        }
    }
    let count = sent.load(Ordering::Relaxed);
    outcome
        .figures
        .push(("rate", count as f64 / started.elapsed().as_secs_f64()));
    outcome.figures.push(("count", count as f64));
    Ok(outcome)
}

fn fleet_errors(fleet: &Fleet, outcome: &mut Outcome) {
    outcome.check(fleet.failed == 0, || {
        format!(
            "{} agents failed to subscribe: {}",
            fleet.failed,
            fleet.first_error.as_deref().unwrap_or("")
        )
    });
}

/// getTask fan-out: `agents` agents, one connection each, while the server
/// generates tasks; counts what arrives during `duration`.
async fn fanout(addr: SocketAddr, agents: usize, parallel: usize, duration: Duration) -> Outcome {
    let fleet = Fleet::connect(addr, agents, parallel).await;
    let mut outcome = Outcome::default();
    fleet_errors(&fleet, &mut outcome);
    let before = fleet.snapshot();
    let started = Instant::now();
    // The measurement window itself, not a synchronisation.
    tokio::time::sleep(duration).await;
    let after = fleet.snapshot();
    let elapsed = started.elapsed().as_secs_f64();
    let delivered: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
    let receiving = before.iter().zip(&after).filter(|(b, a)| a > b).count();
    outcome.figures.push(("rate", delivered as f64 / elapsed));
    outcome.figures.push(("agents", agents as f64));
    outcome.figures.push(("agents_receiving", receiving as f64));
    outcome.figures.push(("delivered", delivered as f64));
    outcome.figures.push(("offered_per_agent", 10_000.0));
    outcome.check(fleet.ended() == 0, || {
        format!("{} getTask streams ended early", fleet.ended())
    });
    outcome.check(receiving == agents, || {
        format!("{} of {agents} agents received no task", agents - receiving)
    });
    fleet.close().await;
    outcome
}

/// Idle getTask agents, one connection each: time to establish them all and
/// the server's memory per agent.
async fn hold(
    addr: SocketAddr,
    agents: usize,
    parallel: usize,
    duration: Duration,
    rss: impl Fn() -> anyhow::Result<u64>,
    before: u64,
) -> anyhow::Result<Outcome> {
    let fleet = Fleet::connect(addr, agents, parallel).await;
    let established = rss()?;
    // Then idle for the run's duration (a measurement window: memory that
    // grows while agents sit idle counts too).
    tokio::time::sleep(duration).await;
    let settled = rss()?;
    let mut outcome = Outcome::default();
    fleet_errors(&fleet, &mut outcome);
    let grown = established.max(settled).saturating_sub(before);
    outcome
        .figures
        .push(("rss_per_agent_kib", grown as f64 / 1024.0 / agents as f64));
    outcome
        .figures
        .push(("establish_s", fleet.established_in.as_secs_f64()));
    outcome.figures.push(("agents", agents as f64));
    outcome
        .figures
        .push(("rss_before_mib", before as f64 / 1048576.0));
    outcome
        .figures
        .push(("rss_after_mib", established.max(settled) as f64 / 1048576.0));
    outcome.check(fleet.ended() == 0, || {
        format!("{} getTask streams ended early", fleet.ended())
    });
    fleet.close().await;
    Ok(outcome)
}

/// Spawn to ready, `times` times: contactd's ready is a health check
/// answering SERVING; the baseline's (it has no health service) the first
/// successful HTTP/2 connect.
async fn startup(kind: Kind, launcher: &Launcher, times: usize) -> anyhow::Result<Outcome> {
    let mut ready = Vec::new();
    let mut listening = Vec::new();
    let mut outcome = Outcome::default();
    for _ in 0..times.max(1) {
        let server = launcher.start(kind, &Setup::default()).await?;
        let channel = load::connect(server.addr).await?;
        if kind == Kind::Contactd {
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            outcome.check(answer.status == ServingStatus::Serving as i32, || {
                format!("health answered {:?}, not SERVING", answer.status)
            });
        }
        ready.push(server.spawned.elapsed().as_secs_f64() * 1000.0);
        listening.push((server.listening - server.spawned).as_secs_f64() * 1000.0);
        server.stop().await?;
    }
    outcome
        .figures
        .push(("ready_ms", crate::report::median(&ready)));
    outcome.figures.push((
        "ready_max_ms",
        ready.iter().copied().fold(f64::NAN, f64::max),
    ));
    outcome
        .figures
        .push(("listening_ms", crate::report::median(&listening)));
    outcome.figures.push(("runs", ready.len() as f64));
    Ok(outcome)
}
