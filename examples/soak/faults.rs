//! The fault schedule: a seeded order of every fault kind, again and again
//! until the run's end, one at a time with seeded gaps and durations; and
//! beside it, agent SIGKILLs on a seeded schedule of their own (so faults
//! overlap). Each fault is logged with its window and the agents it cut
//! off, which is what the checker judges reconnections and ERROR lines by.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::{
    Rng,
    fleet::{Fleet, KEEPALIVE_DETECT, real_name, write_atomic},
    history::Event,
    now_ms,
    postgres::Stop,
    proxy::Faults,
};

/// Every kind the schedule cycles through on SQLite. On PostgreSQL,
/// `postgres-restart` takes `disk-full`'s place (see [`kinds`]).
pub const KINDS: [&str; 10] = [
    "latency",
    "bandwidth",
    "reset",
    "blackhole",
    "partition",
    "server-sigterm",
    "server-sigkill",
    "sighup-storm",
    "cert-rotation",
    "disk-full",
];

/// The kinds for this run: on PostgreSQL the cluster is stopped and
/// started instead of a disk filled (in the same place in the order, so
/// that a seed gives the same schedule otherwise).
pub fn kinds(postgres: bool) -> Vec<&'static str> {
    KINDS
        .iter()
        .map(|&k| {
            if postgres && k == "disk-full" {
                "postgres-restart"
            } else {
                k
            }
        })
        .collect()
}

/// Time before the first fault, and kept free of new faults at the end.
const MARGIN: Duration = Duration::from_secs(10);

/// Runs the schedule until `deadline`, with gaps between faults of a third
/// of `gap` up to `gap`, each fault lasting 40 % of `longest` up to it;
/// with `all`, fails unless every kind ran at least once.
pub async fn run(
    fleet: Arc<Fleet>,
    mut rng: Rng,
    deadline: Instant,
    gap: Duration,
    longest: Duration,
    all: bool,
) -> anyhow::Result<()> {
    tokio::time::sleep(MARGIN).await;
    let mut done = std::collections::BTreeSet::new();
    let kinds = kinds(fleet.postgres.is_some());
    // Bounded: each round takes at least a second.
    'rounds: for _ in 0..100_000 {
        let mut order: Vec<&str> = kinds.clone();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for kind in order {
            if Instant::now() + MARGIN >= deadline {
                break 'rounds;
            }
            let length = rng.between(longest * 2 / 5, longest);
            if inject(&fleet, &mut rng, kind, length).await? {
                done.insert(kind);
            }
            tokio::time::sleep(rng.between(gap / 3, gap)).await;
        }
    }
    let missing: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| !done.contains(k))
        .collect();
    if all && !missing.is_empty() {
        bail!("fault kinds never injected: {missing:?} (a longer run, or root for disk-full)");
    }
    Ok(())
}

/// Agent SIGKILLs, each followed by a restart, every 10 to 25 s until the
/// deadline.
pub async fn kills(fleet: Arc<Fleet>, mut rng: Rng, deadline: Instant) -> anyhow::Result<()> {
    if fleet.real == 0 {
        return Ok(());
    }
    for _ in 0..100_000 {
        tokio::time::sleep(rng.between(Duration::from_secs(10), Duration::from_secs(25))).await;
        if Instant::now() + MARGIN >= deadline {
            break;
        }
        let i = rng.below(fleet.real as u64) as usize;
        let agent = real_name(i);
        let start_ms = now_ms();
        if let Some(proc) = fleet.take_agent(i).await {
            proc.end(Signal::SIGKILL).await?;
        }
        fleet.note(Event::Kill {
            agent: agent.clone(),
            at_ms: start_ms,
        });
        fleet.start_agent(i).await?;
        fleet.note(Event::Fault {
            kind: "agent-sigkill".to_owned(),
            detail: format!("{agent} killed and started again"),
            agents: vec![agent],
            start_ms,
            end_ms: now_ms(),
            detect_ms: 0,
        });
    }
    Ok(())
}

/// One of the servers (with one, always it: no draw from the seed).
fn pick_server(fleet: &Fleet, rng: &mut Rng) -> usize {
    match fleet.servers.len() {
        1 => 0,
        n => rng.below(n as u64) as usize,
    }
}

/// Some routes (at least one, up to half), and their agents.
fn pick_routes(fleet: &Fleet, rng: &mut Rng) -> (Vec<usize>, Vec<String>) {
    let total = fleet.fault_routes();
    let count = 1 + rng.below((total / 2).max(1) as u64) as usize;
    let mut routes: Vec<usize> = (0..total).collect();
    for i in (1..routes.len()).rev() {
        routes.swap(i, rng.below(i as u64 + 1) as usize);
    }
    routes.truncate(count);
    routes.sort_unstable();
    let agents = routes.iter().flat_map(|&r| fleet.route_agents(r)).collect();
    (routes, agents)
}

/// Injects one fault of `kind` for about `length`; false when it cannot
/// be injected here (disk-full without a tmpfs).
async fn inject(
    fleet: &Fleet,
    rng: &mut Rng,
    kind: &str,
    length: Duration,
) -> anyhow::Result<bool> {
    let start_ms = now_ms();
    let mut agents = Vec::new();
    let mut detect = Duration::ZERO;
    let detail;
    match kind {
        "latency" | "bandwidth" => {
            let (routes, cut) = pick_routes(fleet, rng);
            let faults = if kind == "latency" {
                Faults {
                    latency: Duration::from_millis(200),
                    jitter: Duration::from_millis(300),
                    ..Faults::default()
                }
            } else {
                Faults {
                    bandwidth: 8 * 1024,
                    ..Faults::default()
                }
            };
            for &r in &routes {
                fleet.routes[r].set(faults);
            }
            tokio::time::sleep(length).await;
            for &r in &routes {
                fleet.routes[r].set(Faults::default());
            }
            detail = format!("{faults:?} on routes {routes:?}");
            // Slowed, not cut off: no reconnection is owed, but the agents
            // must still be connected at the end.
            agents = cut;
        }
        "reset" => {
            let (routes, cut) = pick_routes(fleet, rng);
            for &r in &routes {
                fleet.routes[r].reset_all();
            }
            detail = format!("connections reset on routes {routes:?}");
            agents = cut;
        }
        "blackhole" | "partition" => {
            let (routes, cut) = pick_routes(fleet, rng);
            for &r in &routes {
                if kind == "partition" {
                    let mut faults = fleet.routes[r].faults();
                    faults.partitioned = true;
                    fleet.routes[r].set(faults);
                }
                fleet.routes[r].blackhole_open();
            }
            tokio::time::sleep(length).await;
            for &r in &routes {
                fleet.routes[r].set(Faults::default());
            }
            // Connections blackholed stay half-open: their agents find out
            // by keepalive, at most KEEPALIVE_DETECT after the start.
            detect = KEEPALIVE_DETECT.saturating_sub(length);
            detail = format!("{kind} of routes {routes:?} ({} agents)", cut.len());
            agents = cut;
        }
        "server-sigterm" | "server-sigkill" => {
            let signal = if kind == "server-sigterm" {
                Signal::SIGTERM
            } else {
                Signal::SIGKILL
            };
            let i = pick_server(fleet, rng);
            fleet.stop_server(i, signal).await?;
            fleet.start_server(i).await?;
            detail = format!(
                "{} stopped with {signal} and started again",
                fleet.servers[i].name
            );
        }
        "sighup-storm" => {
            let i = pick_server(fleet, rng);
            for _ in 0..20 {
                fleet.signal_server(i, Signal::SIGHUP).await?;
                for a in 0..fleet.real.min(5) {
                    fleet.signal_agent(a, Signal::SIGHUP).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            detail = format!(
                "20 SIGHUPs to {} and 5 agents, 50 ms apart",
                fleet.servers[i].name
            );
        }
        "postgres-restart" => {
            let Some(postgres) = &fleet.postgres else {
                return Ok(false);
            };
            // Half the stops are PostgreSQL's crash (immediate: recovery
            // from the WAL at the start), half an orderly fast stop.
            let how = if rng.below(2) == 0 {
                Stop::Fast
            } else {
                Stop::Immediate
            };
            postgres.lock().await.stop(how).await?;
            tokio::time::sleep(length).await;
            postgres.lock().await.start_again().await?;
            detail = format!(
                "PostgreSQL stopped ({how:?}), down for {length:?}, started again (ready after {} ms)",
                now_ms() - start_ms - length.as_millis() as i64
            );
        }
        "cert-rotation" => {
            detail = rotate(fleet).await?;
        }
        "disk-full" => {
            if fleet.tmpfs.is_none() {
                return Ok(false);
            }
            let filler = fleet.store_dir.join("filler");
            let written = fill(&filler)?;
            tokio::time::sleep(length).await;
            std::fs::remove_file(&filler)?;
            detail = format!("the store's disk filled ({} MiB written)", written >> 20);
        }
        other => bail!("unknown fault kind {other}"),
    }
    fleet.note(Event::Fault {
        kind: kind.to_owned(),
        detail,
        agents,
        start_ms,
        end_ms: now_ms(),
        detect_ms: detect.as_millis() as i64,
    });
    Ok(true)
}

/// Fills the filesystem holding `path` (bounded by 64 GiB of 1 MiB writes).
fn fill(path: &std::path::Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for _ in 0..65_536 {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let _ = file.flush();
    Ok(written)
}

/// A CA rotation, as an operator does it: the new CA is added to the
/// agents' bundle, the server gets a certificate from the new CA (SIGHUP),
/// every connection is reset so that each agent handshakes again; then the
/// server must present the new certificate (checked with the new CA only).
async fn rotate(fleet: &Fleet) -> anyhow::Result<String> {
    let next = fleet.tls_dir.join("next");
    let _ = std::fs::remove_dir_all(&next);
    contactd::tls::pki::init(&next, &[], &[], 30, false)?;
    let mut bundle = std::fs::read(fleet.ca_bundle())?;
    bundle.extend(std::fs::read(next.join("ca.pem"))?);
    write_atomic(&fleet.ca_bundle(), &bundle)?;
    write_atomic(
        &fleet.tls_dir.join("server.key"),
        &std::fs::read(next.join("server.key"))?,
    )?;
    write_atomic(
        &fleet.tls_dir.join("server.pem"),
        &std::fs::read(next.join("server.pem"))?,
    )?;
    for i in 0..fleet.servers.len() {
        fleet.signal_server(i, Signal::SIGHUP).await?;
    }
    // The reload is applied at once; a reset makes every agent use it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for route in &fleet.routes {
        route.reset_all();
    }
    let mut ok = true;
    for server in &fleet.servers {
        let addr = *server.upstream.lock();
        ok &= serves_rotated(fleet, addr, &next).await?;
    }
    fleet.note(Event::Check {
        what: "every server presents the rotated certificate".to_owned(),
        ok,
        at_ms: now_ms(),
    });
    Ok(format!(
        "CA and server certificate rotated (new certificate served: {ok})"
    ))
}

/// Whether the server at `addr` presents a certificate of the CA in `next`.
async fn serves_rotated(
    fleet: &Fleet,
    addr: std::net::SocketAddr,
    next: &std::path::Path,
) -> anyhow::Result<bool> {
    let status = tokio::process::Command::new(&fleet.contactd)
        .arg("health")
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--tls")
        .arg("--tls-ca-cert")
        .arg(next.join("ca.pem"))
        .arg("--timeout")
        .arg("10s")
        .arg("--wait")
        .arg("60s")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .context("running contactd health")?;
    Ok(status.success())
}
