//! The scenarios: each starts its own server process, loads it over
//! loopback for a bounded time, stops it, and returns its figures.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use contactd::proto::contact::{
    ClientMsg, Empty, Outcome as TaskOutcome, Result as ResultMsg, contact_client::ContactClient,
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
    ceiling, cmd, jobs,
    load::{self, AbortOnDrop, End, Fleet},
    report::{Outcome, Target, percentiles},
    scale,
    server::{Kind, Launcher, Setup},
    store,
    tls::{ClientTls, Mode, Pki},
};

/// A status report as an agent sends it.
const STATUS: &str = "agent-0001 load=0.42 mem=37% tasks=12";

/// Longest one agent of the handshakes scenario may take to connect and
/// subscribe.
const AGENT_LIMIT: Duration = Duration::from_secs(20);

/// Errors after which a handshakes worker stops.
const MAX_ERRORS: usize = 10;

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
    /// New connections per second, each a new agent subscribing (plaintext:
    /// the reference for the TLS variants).
    Handshakes,
    // The TLS variants (issue 8): the same load over TLS. `-mtls`: client
    // certificates required, one per agent; `-tls`: server certificate only.
    StatusPingpongMtls,
    StatusPipelinedMtls,
    FanoutMtls,
    HoldMtls,
    HoldTls,
    HandshakesMtls,
    HandshakesTls,
    // The durable store (issue 11), contactd only: `task submit` with one
    // client and with 16 at once, and queue mode end to end.
    Submit,
    #[value(name = "submit-16")]
    Submit16,
    Queue,
    // Restarts (contactd only, restart.rs): the fleet back after SIGTERM
    // or SIGKILL and a new process on the same port.
    RestartTerm,
    RestartKill,
    RestartTermMtls,
    // Jobs (issue 23), contactd only: an ad hoc rollout over every agent,
    // all at once and with a window of 10 %; and `[[jobs]]` firing every
    // second with no agent (the scheduler's own cost).
    Rollout,
    #[value(name = "rollout-10pct")]
    Rollout10Pct,
    Jobs,
    // The largest fleets (issue 26, scale.rs), contactd only: 5,000 to
    // 19,000 agents over several load processes, plaintext and mTLS.
    Scale,
    ScaleMtls,
    // The queue's durable ceiling (issue 26, ceiling.rs), contactd only.
    QueueCeiling,
}

impl Scenario {
    pub const ALL: [Scenario; 28] = [
        Scenario::StatusPingpong,
        Scenario::StatusPipelined,
        Scenario::Ingest,
        Scenario::Fanout,
        Scenario::Hold,
        Scenario::Cmd,
        Scenario::Startup,
        Scenario::Shutdown,
        Scenario::Handshakes,
        Scenario::StatusPingpongMtls,
        Scenario::StatusPipelinedMtls,
        Scenario::FanoutMtls,
        Scenario::HoldMtls,
        Scenario::HoldTls,
        Scenario::HandshakesMtls,
        Scenario::HandshakesTls,
        Scenario::Submit,
        Scenario::Submit16,
        Scenario::Queue,
        Scenario::RestartTerm,
        Scenario::RestartKill,
        Scenario::RestartTermMtls,
        Scenario::Rollout,
        Scenario::Rollout10Pct,
        Scenario::Jobs,
        Scenario::Scale,
        Scenario::ScaleMtls,
        Scenario::QueueCeiling,
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
            Scenario::Handshakes => "handshakes",
            Scenario::StatusPingpongMtls => "status-pingpong-mtls",
            Scenario::StatusPipelinedMtls => "status-pipelined-mtls",
            Scenario::FanoutMtls => "fanout-mtls",
            Scenario::HoldMtls => "hold-mtls",
            Scenario::HoldTls => "hold-tls",
            Scenario::HandshakesMtls => "handshakes-mtls",
            Scenario::HandshakesTls => "handshakes-tls",
            Scenario::Submit => "submit",
            Scenario::Submit16 => "submit-16",
            Scenario::Queue => "queue",
            Scenario::RestartTerm => "restart-term",
            Scenario::RestartKill => "restart-kill",
            Scenario::RestartTermMtls => "restart-term-mtls",
            Scenario::Rollout => "rollout",
            Scenario::Rollout10Pct => "rollout-10pct",
            Scenario::Jobs => "jobs",
            Scenario::Scale => "scale",
            Scenario::ScaleMtls => "scale-mtls",
            Scenario::QueueCeiling => "queue-ceiling",
        }
    }

    /// Whether only contactd runs it (the baseline has no admin API, no
    /// queue and no jobs).
    pub fn contactd_only(self) -> bool {
        matches!(
            self,
            Scenario::Submit
                | Scenario::Submit16
                | Scenario::Queue
                | Scenario::RestartTerm
                | Scenario::RestartKill
                | Scenario::RestartTermMtls
                | Scenario::Rollout
                | Scenario::Rollout10Pct
                | Scenario::Jobs
                | Scenario::Scale
                | Scenario::ScaleMtls
                | Scenario::QueueCeiling
        )
    }

    /// The plaintext scenario whose load a TLS variant runs.
    pub fn base(self) -> Scenario {
        match self {
            Scenario::StatusPingpongMtls => Scenario::StatusPingpong,
            Scenario::StatusPipelinedMtls => Scenario::StatusPipelined,
            Scenario::FanoutMtls => Scenario::Fanout,
            Scenario::HoldMtls | Scenario::HoldTls => Scenario::Hold,
            Scenario::HandshakesMtls | Scenario::HandshakesTls => Scenario::Handshakes,
            Scenario::RestartTermMtls => Scenario::RestartTerm,
            Scenario::ScaleMtls => Scenario::Scale,
            plain => plain,
        }
    }

    /// The TLS setup of a TLS variant.
    pub fn tls(self) -> Option<Mode> {
        match self {
            Scenario::StatusPingpongMtls
            | Scenario::StatusPipelinedMtls
            | Scenario::FanoutMtls
            | Scenario::HoldMtls
            | Scenario::HandshakesMtls
            | Scenario::RestartTermMtls
            | Scenario::ScaleMtls => Some(Mode::Mutual),
            Scenario::HoldTls | Scenario::HandshakesTls => Some(Mode::ServerAuth),
            _ => None,
        }
    }

    /// What the servers need beyond their defaults: the base scenario's
    /// needs, and for a TLS variant the same `[server.tls]` for both.
    fn setup(self, pki: Option<&Pki>, params: &Params) -> anyhow::Result<Setup> {
        let mut setup = match self.base() {
            // 10,000 tasks/s offered: batch 100 every 10 ms.
            Scenario::Fanout => Setup {
                contactd_toml: "[tasks]\ninterval = \"10ms\"\nbatch = 100\n".into(),
                baseline_args: ["--interval", "10ms", "--batch", "100"]
                    .map(String::from)
                    .into(),
                ..Setup::default()
            },
            Scenario::Cmd => Setup {
                contactd_toml: "[remote_cmd]\nenabled = true\nallow = [\"true\"]\n".into(),
                baseline_args: Vec::new(),
                ..Setup::default()
            },
            // Only submitted tasks (a rollout's).
            Scenario::Submit | Scenario::Submit16 | Scenario::Rollout | Scenario::Rollout10Pct => {
                Setup {
                    contactd_toml: "[tasks]\nbatch = 0\n".into(),
                    baseline_args: Vec::new(),
                    ..Setup::default()
                }
            }
            // 50,000 tasks/s offered (batch 500 every 10 ms: more than it
            // handles, so the figure is its capacity), at most 64 in flight
            // per agent, the rest waiting in the queue.
            Scenario::Queue => Setup {
                contactd_toml: "[tasks]\nmode = \"queue\"\ninterval = \"10ms\"\nbatch = 500\n\
                                window = 64\n"
                    .into(),
                baseline_args: Vec::new(),
                ..Setup::default()
            },
            Scenario::Jobs => Setup {
                contactd_toml: jobs::jobs_toml(params.jobs),
                ..Setup::default()
            },
            Scenario::Scale => scale::setup(),
            Scenario::QueueCeiling => Setup {
                contactd_toml: ceiling::contactd_toml(),
                ..Setup::default()
            },
            _ => Setup::default(),
        };
        if let Some(mode) = self.tls() {
            let pki = pki.context("a TLS variant without certificates")?;
            setup.contactd_toml.push_str("[server.tls]\n");
            setup.contactd_toml.push_str(&pki.server_table(mode)?);
            setup.baseline_args.push("--tls".into());
            setup.baseline_args.push(pki.server_table_file(mode));
        }
        Ok(setup)
    }

    /// Whether contactd's figure is compared with the baseline's (a higher
    /// value is better), and the target for the ratio. A TLS variant has its
    /// plaintext scenario's target (issue 8: "within the plaintext targets").
    pub fn ratio_target(self) -> Option<Target> {
        let limit = match self.base() {
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
        let at_least = |what, limit| Target {
            what,
            limit,
            at_least: true,
        };
        match self {
            Scenario::Hold => vec![
                ("rss_per_agent_kib", at_most("rss_per_agent_kib", 32.0)),
                ("establish_s", at_most("establish_s", 3.0)),
            ],
            // Issue 8: at 10,000 agents, 48 KiB each, all in 10 s.
            Scenario::HoldMtls | Scenario::HoldTls => vec![
                ("rss_per_agent_kib", at_most("rss_per_agent_kib", 48.0)),
                ("establish_s", at_most("establish_s", 10.0)),
            ],
            Scenario::Startup => vec![("ready_ms", at_most("ready_ms", 50.0))],
            // Issue 11: durable submits with 16 clients, queue mode end to end.
            Scenario::Submit16 => vec![("rate", at_least("rate", 20_000.0))],
            Scenario::Queue => vec![("rate", at_least("rate", 10_000.0))],
            Scenario::Shutdown => vec![("exit_s", at_most("exit_s", 1.0))],
            // Restarts: the fleet back within 5 s (10 s in mTLS) of the
            // signal, the peak RSS within 1.2 x the steady state.
            Scenario::RestartTerm => vec![
                ("all_back_s", at_most("all_back_s", 5.0)),
                ("peak_over_steady", at_most("peak_over_steady", 1.2)),
            ],
            Scenario::RestartTermMtls => vec![
                ("all_back_s", at_most("all_back_s", 10.0)),
                ("peak_over_steady", at_most("peak_over_steady", 1.2)),
            ],
            // Issue 23: a rollout over 10,000 agents dispatches at least
            // 5,000 agents/s; 1,000 jobs every second take at most 5 % of
            // one core.
            Scenario::Rollout => vec![("rate", at_least("rate", 5000.0))],
            Scenario::Jobs => vec![("cpu_pct_of_core", at_most("cpu_pct_of_core", 5.0))],
            // Issue 26, at 19,000 agents: 24 KiB per plaintext agent (40 in
            // mTLS), all connected within 10 s, the broadcast's p99 within
            // 250 ms, all back within 20 s of a restart with a peak RSS
            // within 1.2 x the steady state; the queue's ceiling at least
            // 100,000 tasks/s.
            Scenario::Scale | Scenario::ScaleMtls => vec![
                (
                    "rss_per_agent_kib",
                    at_most(
                        "rss_per_agent_kib",
                        if self == Scenario::Scale { 24.0 } else { 40.0 },
                    ),
                ),
                ("connect_s", at_most("connect_s", 10.0)),
                ("delivery_p99_ms", at_most("delivery_p99_ms", 250.0)),
                ("back_s", at_most("back_s", 20.0)),
                ("peak_over_steady", at_most("peak_over_steady", 1.2)),
            ],
            Scenario::QueueCeiling => vec![("acked_per_s", at_least("acked_per_s", 100_000.0))],
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
    pub queue_agents: usize,
    /// Agents in the rollout scenarios.
    pub rollout_agents: usize,
    /// `[[jobs]]` in the jobs scenario.
    pub jobs: usize,
    /// Agents connecting at once.
    pub connect_parallel: usize,
    /// The restart scenarios.
    pub restart: crate::restart::Options,
    /// The scale scenarios.
    pub scale: crate::scale::Options,
    /// Agents in queue-ceiling.
    pub ceiling_agents: usize,
}

impl Params {
    /// The runs' parameters for `scenario`: one per fleet size for the
    /// scale scenarios, else these.
    pub fn for_scenario(&self, scenario: Scenario) -> Vec<Params> {
        if scenario.base() != Scenario::Scale {
            return vec![self.clone()];
        }
        self.scale
            .sizes
            .iter()
            .map(|&agents| {
                let mut params = self.clone();
                params.scale.agents = agents;
                params
            })
            .collect()
    }
}

/// Runs `scenario` against a fresh `kind` server (a TLS variant with the
/// certificates in `pki`).
pub async fn run(
    scenario: Scenario,
    kind: Kind,
    launcher: &Launcher,
    params: &Params,
    pki: Option<&Pki>,
) -> anyhow::Result<Outcome> {
    if scenario == Scenario::Startup {
        return startup(kind, launcher, params.startups).await;
    }
    if let Some(signal) = match scenario.base() {
        Scenario::RestartTerm => Some(nix::sys::signal::Signal::SIGTERM),
        Scenario::RestartKill => Some(nix::sys::signal::Signal::SIGKILL),
        _ => None,
    } {
        let tls = match (scenario.tls(), pki) {
            (Some(mode), Some(pki)) => Some(pki.client(mode)),
            _ => None,
        };
        let setup = scenario.setup(pki, params)?;
        return crate::restart::run(launcher, setup, tls, signal, &params.restart).await;
    }
    if scenario.base() == Scenario::Scale {
        let setup = scenario.setup(pki, params)?;
        let pki = pki.filter(|_| scenario.tls().is_some()).map(Pki::dir);
        return crate::scale::run(launcher, setup, pki.as_deref(), &params.scale).await;
    }
    let server = launcher.start(kind, &scenario.setup(pki, params)?).await?;
    let tls = match (scenario.tls(), pki) {
        (Some(mode), Some(pki)) => Some(pki.client(mode)),
        _ => None,
    };
    let addr = server.addr;
    let cpu_before = server.cpu_seconds()?;
    let d = params.duration;
    let parallel = params.connect_parallel;
    let mut outcome = match scenario.base() {
        Scenario::StatusPingpong => status(addr, tls, 1, 1, 1, d).await?,
        Scenario::StatusPipelined => status(addr, tls, 4, 16, 64, d).await?,
        Scenario::Ingest => ingest(addr, 4, d).await?,
        Scenario::Fanout => {
            let before = server.rss()?;
            let mut outcome = fanout(addr, tls, params.fanout_agents, parallel, d, || {
                server.rss()
            })
            .await;
            memory_growth(&mut outcome, before, params.fanout_agents);
            outcome
        }
        Scenario::Hold => {
            let before = server.rss()?;
            let fleet = Fleet::connect(addr, params.hold_agents, parallel, tls).await;
            hold(fleet, params.hold_agents, d, || server.rss(), before).await?
        }
        Scenario::Handshakes => handshakes(addr, tls, parallel, d).await,
        Scenario::Cmd => cmd::calls(addr, params.cmd_in_flight, d).await?,
        Scenario::Submit => store::submits(&server.admin, 1, d).await?,
        Scenario::Submit16 => store::submits(&server.admin, 16, d).await?,
        Scenario::Queue => store::queue(addr, params.queue_agents, d).await?,
        Scenario::Rollout => {
            jobs::rollout(addr, &server.admin, params.rollout_agents, parallel, "100%").await?
        }
        Scenario::Rollout10Pct => {
            jobs::rollout(addr, &server.admin, params.rollout_agents, parallel, "10%").await?
        }
        Scenario::Jobs => jobs::idle_jobs(&server, params.jobs, d).await?,
        Scenario::QueueCeiling => ceiling::run(&server, params.ceiling_agents, d).await?,
        Scenario::Shutdown => {
            let fleet = Fleet::connect(addr, params.shutdown_streams, parallel, None).await;
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
        Scenario::Startup | Scenario::RestartTerm | Scenario::RestartKill | Scenario::Scale => {
            unreachable!("handled above")
        }
        variant => unreachable!("{} is not a base scenario", variant.name()),
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
    tls: Option<&ClientTls>,
    conns: usize,
    streams: usize,
    window: usize,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let mut channels = Vec::new();
    for _ in 0..conns {
        channels.push(load::connect_with(addr, tls).await?);
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
    load::join_workers(set, started).await
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
async fn fanout(
    addr: SocketAddr,
    tls: Option<&ClientTls>,
    agents: usize,
    parallel: usize,
    duration: Duration,
    rss: impl Fn() -> anyhow::Result<u64>,
) -> Outcome {
    let fleet = Fleet::connect(addr, agents, parallel, tls).await;
    let mut outcome = Outcome::default();
    fleet_errors(&fleet, &mut outcome);
    let connected = rss().unwrap_or(0);
    let before = fleet.snapshot();
    let started = Instant::now();
    // The measurement window itself, not a synchronisation.
    tokio::time::sleep(duration).await;
    let after = fleet.snapshot();
    let finished = rss().unwrap_or(0);
    // Figures named here, computed by memory_growth once the rate is first.
    outcome.figures.push(("rss_connected", connected as f64));
    outcome.figures.push(("rss_finished", finished as f64));
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

/// Replaces fanout's raw RSS readings with the server's memory growth per
/// agent: from before the agents connected to the end of the run (issue
/// 15's figure), and during the run alone (what delivering added).
fn memory_growth(outcome: &mut Outcome, before: u64, agents: usize) {
    let connected = outcome.figure("rss_connected").unwrap_or(0.0);
    let finished = outcome.figure("rss_finished").unwrap_or(0.0);
    outcome
        .figures
        .retain(|(name, _)| *name != "rss_connected" && *name != "rss_finished");
    let per_agent_kib = |bytes: f64| bytes.max(0.0) / 1024.0 / agents.max(1) as f64;
    outcome.figures.push((
        "rss_growth_per_agent_kib",
        per_agent_kib(finished - before as f64),
    ));
    outcome.figures.push((
        "rss_growth_in_run_per_agent_kib",
        per_agent_kib(finished - connected),
    ));
}

/// Idle getTask agents, one connection each (`fleet`, just connected): time
/// to establish them all and the server's memory per agent.
async fn hold(
    fleet: Fleet,
    agents: usize,
    duration: Duration,
    rss: impl Fn() -> anyhow::Result<u64>,
    before: u64,
) -> anyhow::Result<Outcome> {
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

/// New connections per second, `parallel` connecting at once for
/// `duration`: each is a new agent (in mTLS with its own certificate) doing
/// TCP connect, a full TLS handshake (no resumption), the HTTP/2 handshake
/// and a getTask call up to its response headers, then closing. The latency
/// is of that whole sequence.
async fn handshakes(
    addr: SocketAddr,
    tls: Option<&ClientTls>,
    parallel: usize,
    duration: Duration,
) -> Outcome {
    let started = Instant::now();
    let deadline = started + duration;
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..parallel.max(1) {
        let (tls, next) = (tls.cloned(), Arc::clone(&next));
        set.spawn(async move {
            let mut hist = load::histogram();
            let mut count = 0u64;
            let mut errors = Vec::new();
            while Instant::now() < deadline && errors.len() < MAX_ERRORS {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let tls = tls.as_ref().map(|tls| (tls.agent(i), tls.name.clone()));
                let sent = Instant::now();
                let agent = tokio::time::timeout(AGENT_LIMIT, async {
                    let (mut client, driver) = load::connect_agent(addr, tls).await?;
                    let driver = AbortOnDrop(driver);
                    client.get_task(Empty {}).await?;
                    anyhow::Ok(driver)
                })
                .await;
                match agent {
                    // Dropping the driver closes the connection.
                    Ok(Ok(_driver)) => {
                        load::record(&mut hist, sent);
                        count += 1;
                    }
                    Ok(Err(e)) => errors.push(format!("{e:#}")),
                    Err(_) => errors.push(format!("an agent took over {AGENT_LIMIT:?}")),
                }
            }
            (hist, count, errors)
        });
    }
    let mut hist = load::histogram();
    let mut count = 0u64;
    let mut outcome = Outcome::default();
    while let Some(done) = set.join_next().await {
        match done {
            Ok((h, n, errors)) => {
                let _ = hist.add(&h);
                count += n;
                outcome.errors.extend(errors);
            }
            Err(e) => outcome.errors.push(e.to_string()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    outcome.figures.push(("rate", count as f64 / elapsed));
    percentiles(&mut outcome, &hist);
    outcome.figures.push(("count", count as f64));
    outcome
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
