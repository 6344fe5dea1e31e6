//! The `restart` scenarios (contactd only): N agents connected and
//! subscribed, then the server stopped (SIGTERM, or SIGKILL) and started
//! again at once on the same port; the figures are the time until every
//! agent is subscribed again (from the signal, and from the new process's
//! start), the connections refused meanwhile, the agents turned away with a
//! retry hint, the new server's CPU until then, and its peak RSS during the
//! storm against the old server's steady state.
//!
//! The agents are light (one HTTP/2 connection and a getTask stream each,
//! as in `hold`), each from a loopback address of its own (as on hosts of
//! their own), with contactd's agent's reconnect rules: a stream ended
//! with a retry hint (a server shutting down says 0) or a connection
//! turned away with one is tried again after the hint plus a random part of
//! up to a second (`agent.retry_hint_jitter`); any other failure after
//! gRPC's backoff (1 s, × 1.6, ± 20 %). With `--restart-legacy-agents` they
//! ignore hints, as agents did before (the "before" figures).
//!
//! By default the port is held by this process and passed to each server
//! as systemd's socket unit passes it (socket activation): connections
//! made while no server runs wait in its backlog. `--restart-rebind` lets
//! each server bind the port itself, as before socket activation.
//!
//! The fleet (its agents and their reconnect rules) and the restart itself
//! serve the scale scenarios too (`scale.rs`), whose agents are spread over
//! several load processes.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use contactd::{backoff::Backoff, config::BackoffConfig};
use nix::sys::signal::Signal;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use crate::{
    load,
    report::Outcome,
    server::{Kind, Launcher, Server, Setup, rss_of},
};

/// Longest the fleet may take to connect at first, and to come back.
const FLEET_LIMIT: Duration = Duration::from_secs(120);
/// How often the new server's RSS is sampled during the storm.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// The agents' `retry_hint_jitter` (contactd's default).
const HINT_JITTER: Duration = Duration::from_secs(1);

/// How the restart scenarios run.
#[derive(Debug, Clone)]
pub struct Options {
    pub agents: usize,
    /// The server binds its port itself (no socket activation).
    pub rebind: bool,
    /// The agents ignore retry hints.
    pub legacy_agents: bool,
    /// Agents connecting at once at the start.
    pub parallel: usize,
    /// The held socket's listen backlog (as `Backlog=` in contactd.socket;
    /// the kernel caps it at `net.core.somaxconn`).
    pub backlog: u32,
}

/// What the agents share: each one's state, and the counts.
pub struct Fleet {
    /// Per agent: subscribed since the restart.
    back: Vec<AtomicBool>,
    /// Agents subscribed now, and subscribed again since the restart.
    pub subscribed: AtomicU64,
    pub resubscribed: AtomicU64,
    /// Set when the server is signalled.
    pub restarted: AtomicBool,
    /// Counted after the restart only.
    pub refused: AtomicU64,
    pub turned_away: AtomicU64,
    pub other_errors: AtomicU64,
    pub first_error: parking_lot::Mutex<Option<String>>,
    /// Set before a task is published whose delivery is timed (the scale
    /// scenarios): each agent then notes when its next message arrives.
    armed: AtomicBool,
    /// Per agent: when it received its first message since `armed`, in
    /// Unix nanoseconds (0: not yet); and how many agents have.
    pub received_at: Vec<AtomicU64>,
    pub received: AtomicU64,
    pub stop: CancellationToken,
}

impl Fleet {
    /// The shared state of `n` agents, none connected yet.
    pub fn new(n: usize) -> Arc<Fleet> {
        Arc::new(Fleet {
            back: (0..n).map(|_| AtomicBool::new(false)).collect(),
            subscribed: AtomicU64::new(0),
            resubscribed: AtomicU64::new(0),
            restarted: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            turned_away: AtomicU64::new(0),
            other_errors: AtomicU64::new(0),
            first_error: parking_lot::Mutex::new(None),
            armed: AtomicBool::new(false),
            received_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicU64::new(0),
            stop: CancellationToken::new(),
        })
    }

    /// Agents in the fleet.
    pub fn size(&self) -> usize {
        self.back.len()
    }

    /// Starts the agents, the first connections in waves of `parallel` (as
    /// a fleet that starts over minutes would: the storm measured is the
    /// restart's), and waits until every one is subscribed. Agent `i` comes
    /// from the loopback address of agent `first + i` of the whole fleet,
    /// over TLS if `tls(i)` gives a config.
    pub async fn launch(
        self: &Arc<Self>,
        addr: SocketAddr,
        first: usize,
        tls: impl Fn(usize) -> Option<(Arc<ClientConfig>, ServerName<'static>)>,
        legacy: bool,
        parallel: usize,
    ) -> anyhow::Result<()> {
        let n = self.size();
        let parallel = parallel.max(1);
        for i in 0..n {
            tokio::spawn(agent(
                i,
                addr,
                source(first + i),
                tls(i),
                Arc::clone(self),
                legacy,
            ));
            if i % parallel == parallel - 1 {
                let first_ones = i as u64 + 1;
                wait_for(
                    &self.subscribed,
                    first_ones,
                    FLEET_LIMIT,
                    "the first agents",
                )
                .await?;
            }
        }
        wait_for(
            &self.subscribed,
            n as u64,
            FLEET_LIMIT,
            "every agent subscribed",
        )
        .await
    }

    /// From now on, each agent notes when its next message arrives.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Agent `i` received a message.
    fn note_message(&self, i: usize) {
        if self.armed.load(Ordering::Relaxed)
            && self.received_at[i]
                .compare_exchange(0, unix_ns(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.received.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Now, in nanoseconds since the Unix epoch: the one clock the processes
/// of a scale run share (they run on the same machine).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The port held across servers, as systemd's socket unit holds it: bound
/// once on 127.0.0.1 with `backlog` (by contactd's own bind), and passed
/// to each server, so connections made while no server runs wait in its
/// backlog.
pub fn held_listener(backlog: u32) -> anyhow::Result<Arc<std::net::TcpListener>> {
    let listener = contactd::net::bind("127.0.0.1:0".parse()?, backlog)?.into_std()?;
    Ok(Arc::new(listener))
}

/// Runs one restart scenario: `signal` stops the server.
pub async fn run(
    launcher: &Launcher,
    mut setup: Setup,
    tls: Option<&crate::tls::ClientTls>,
    signal: Signal,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let held = if options.rebind {
        let free = std::net::TcpListener::bind("127.0.0.1:0")?;
        setup.listen = Some(free.local_addr()?);
        None
    } else {
        Some(held_listener(options.backlog)?)
    };
    setup.passed.clone_from(&held);
    let server = launcher.start(Kind::Contactd, &setup).await?;
    let n = options.agents;
    let fleet = Fleet::new(n);
    let _stop = fleet.stop.clone().drop_guard();
    let started = Instant::now();
    let agent_tls = |i| tls.map(|tls| (tls.agent(i), tls.name.clone()));
    let legacy = options.legacy_agents;
    fleet
        .launch(server.addr, 0, agent_tls, legacy, options.parallel)
        .await?;
    let established = started.elapsed();
    // Steady state: settled after a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let steady = server.rss()?;

    fleet.restarted.store(true, Ordering::SeqCst);
    let back = wait_for(
        &fleet.resubscribed,
        n as u64,
        FLEET_LIMIT,
        "every agent back",
    );
    let restarted = restart(launcher, &setup, server, signal, back).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = restarted.next.rss()?;

    let mut outcome = Outcome::default();
    let back = &restarted.back;
    outcome.check(back.is_ok(), || format!("{back:?}"));
    let mib = |b: u64| b as f64 / 1_048_576.0;
    outcome.figures.extend([
        ("all_back_s", restarted.all_back.as_secs_f64()),
        ("back_after_start_s", restarted.from_start.as_secs_f64()),
        ("exit_s", restarted.exit.as_secs_f64()),
        ("refused", fleet.refused.load(Ordering::Relaxed) as f64),
        (
            "turned_away",
            fleet.turned_away.load(Ordering::Relaxed) as f64,
        ),
        (
            "other_errors",
            fleet.other_errors.load(Ordering::Relaxed) as f64,
        ),
        ("server_cpu_s", restarted.cpu),
        ("rss_steady_mib", mib(steady)),
        ("rss_peak_mib", mib(restarted.peak)),
        (
            "peak_over_steady",
            restarted.peak as f64 / steady.max(1) as f64,
        ),
        ("rss_after_mib", mib(after)),
        ("agents", n as f64),
        ("establish_s", established.as_secs_f64()),
    ]);
    if let Some(error) = fleet.first_error.lock().clone() {
        eprintln!("bench: restart: first agent error after the restart: {error}");
    }
    fleet.stop.cancel();
    let next = restarted.next;
    let log = next.log_tail();
    if std::env::var_os("BENCH_SHOW_LOG").is_some() {
        eprintln!("{}", log.replace(" | ", "\n"));
    }
    let stopped = next.stop().await;
    outcome.check(stopped.is_ok(), || {
        format!("stopping the server: {stopped:?}; log: {log}")
    });
    drop(held);
    Ok(outcome)
}

/// A restart as measured: the new server, and what it took.
pub struct Restarted {
    pub next: Server,
    /// The old server's exit after the signal.
    pub exit: Duration,
    /// Until the fleet was back, from the signal and from the new start.
    pub all_back: Duration,
    pub from_start: Duration,
    /// Whether the fleet came back (within its limit).
    pub back: anyhow::Result<()>,
    /// The new server's CPU seconds until then, and its peak RSS.
    pub cpu: f64,
    pub peak: u64,
}

/// Stops `server` with `signal`, starts the next one with `setup` at once,
/// and waits for `back` (the fleet subscribed again), sampling the new
/// server's RSS meanwhile.
pub async fn restart(
    launcher: &Launcher,
    setup: &Setup,
    server: Server,
    signal: Signal,
    back: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Restarted> {
    let signalled = Instant::now();
    let old_log = server.log_handle();
    let exit = server.end_with(signal).await?;
    if std::env::var_os("BENCH_SHOW_LOG").is_some() {
        eprintln!("{}", crate::server::tail(&old_log).replace(" | ", "\n"));
    }
    let next = launcher.start(Kind::Contactd, setup).await?;
    let cpu_start = next.cpu_seconds()?;
    let sampler = PeakRss::start(next.pid);
    let back = back.await;
    let all_back = signalled.elapsed();
    let from_start = next.spawned.elapsed();
    let cpu = next.cpu_seconds()? - cpu_start;
    let peak = sampler.stop().await.max(next.rss()?);
    Ok(Restarted {
        next,
        exit,
        all_back,
        from_start,
        back,
        cpu,
        peak,
    })
}

/// The peak RSS of a process, sampled every [`SAMPLE_EVERY`] until stopped.
struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    fn start(pid: i32) -> PeakRss {
        let peak = Arc::new(AtomicU64::new(rss_of(pid).unwrap_or(0)));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (peak, stop) = (Arc::clone(&peak), stop.clone());
            async move {
                while stop
                    .run_until_cancelled(tokio::time::sleep(SAMPLE_EVERY))
                    .await
                    .is_some()
                {
                    if let Ok(rss) = rss_of(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                }
            }
        });
        PeakRss { peak, stop, task }
    }

    /// The peak seen, in bytes.
    async fn stop(self) -> u64 {
        self.stop.cancel();
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// Waits (polling every 10 ms, at most `limit`) until `count` reaches `n`.
pub async fn wait_for(
    count: &AtomicU64,
    n: u64,
    limit: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while count.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: {} of {n} within {limit:?}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Agent `i`'s own loopback address, 127.1.0.1 on: a fleet's agents are
/// on hosts of their own (one address for all would hit
/// `server.max_handshakes_per_address`, meant for one abusive peer).
fn source(i: usize) -> std::net::IpAddr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8).into()
}

/// The retry hint on `status`, as contactd's agent reads it (a server
/// shutting down without one is taken to say 0).
fn hint(status: &tonic::Status) -> Option<Duration> {
    contactd::proto::retry_hint(status).or_else(|| {
        (status.code() == tonic::Code::Unavailable && status.message() == "server shutting down")
            .then_some(Duration::ZERO)
    })
}

/// One agent (`i` in `fleet`, from the loopback address `source`):
/// subscribe, hold the stream, and after it ends come back as contactd's
/// agent does; until the fleet stops.
async fn agent(
    i: usize,
    addr: SocketAddr,
    source: std::net::IpAddr,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    fleet: Arc<Fleet>,
    legacy: bool,
) {
    let mut backoff = Backoff::new(BackoffConfig::default());
    loop {
        let attempt = tokio::select! {
            attempt = load::subscribe_counting_from(addr, Some(source), tls.clone()) => attempt,
            () = fleet.stop.cancelled() => return,
        };
        let after_restart = fleet.restarted.load(Ordering::SeqCst);
        let told = match attempt {
            Ok((_client, mut stream, _driver)) => {
                fleet.subscribed.fetch_add(1, Ordering::Relaxed);
                if after_restart && !fleet.back[i].swap(true, Ordering::Relaxed) {
                    fleet.resubscribed.fetch_add(1, Ordering::Relaxed);
                }
                let end = loop {
                    tokio::select! {
                        message = stream.message() => match message {
                            Ok(Some(())) => fleet.note_message(i),
                            Ok(None) => break None,
                            Err(status) => break Some(status),
                        },
                        () = fleet.stop.cancelled() => return,
                    }
                };
                fleet.subscribed.fetch_sub(1, Ordering::Relaxed);
                end.as_ref().and_then(hint)
            }
            Err(e) => {
                let status = e.downcast_ref::<tonic::Status>();
                let refused = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
                });
                let told = status.and_then(hint);
                if after_restart {
                    if refused {
                        fleet.refused.fetch_add(1, Ordering::Relaxed);
                    } else if told.is_some() {
                        fleet.turned_away.fetch_add(1, Ordering::Relaxed);
                    } else {
                        fleet.other_errors.fetch_add(1, Ordering::Relaxed);
                        fleet
                            .first_error
                            .lock()
                            .get_or_insert_with(|| format!("{e:#}"));
                    }
                }
                told
            }
        };
        let delay = match told {
            Some(after) if !legacy => {
                backoff.reset();
                after + HINT_JITTER.max(after).mul_f64(fastrand::f64())
            }
            _ => backoff.next_delay(),
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = fleet.stop.cancelled() => return,
        }
    }
}
