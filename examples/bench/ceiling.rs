//! The `queue-ceiling` scenario (contactd only): queue mode on the default
//! durable store (SQLite, `[store] sync` at its default `normal`: WAL,
//! committed tasks survive a crash of contactd, not a power loss; no fsync
//! per commit), offered more than contactd can do, so that what it does is
//! its ceiling. The generator offers [`OFFERED`] tasks a second, above the
//! target of 100,000; many named agents (`--ceiling-agents`) ack each task
//! as soon as it arrives, as in `queue` (store.rs); a few admin clients
//! submit probe tasks carrying their submit time, whose agents record
//! submit → ack. The server's own counters (its metrics endpoint, read at
//! both ends of the window) say what it committed, sent and applied.
//!
//! With the offer above capacity the queue fills to `tasks.max_pending`
//! (100,000 by default) and drops the oldest, so the latencies are mostly
//! the time through a full queue: about `max_pending` over the offered rate.

use std::{collections::HashMap, net::SocketAddr, path::Path, time::Duration, time::Instant};

use anyhow::Context;
use contactd::proto::admin::SubmitTaskRequest;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};

use crate::{
    report::Outcome,
    restart::unix_ns,
    server::{Server, cpu_seconds_of},
    store::{self, PROBE, QueueAgents},
};

/// Server CPU, in % of one core over the window, at which the server is
/// taken to be the bound (its own generator included).
const SATURATED_PCT: f64 = 90.0;

/// Tasks offered a second: twice the target of 100,000, and more
/// than twice what the `queue` scenario measured.
pub const OFFERED: u32 = 200_000;
/// The generator's interval; the batch makes [`OFFERED`].
const INTERVAL_MS: u32 = 10;
/// Admin clients submitting probes, each the next once the last committed.
const PROBE_CLIENTS: usize = 4;
/// Longest one probe's submit may take.
const SUBMIT_LIMIT: Duration = Duration::from_secs(10);
/// Longest a scrape of the metrics may take, and the most it may read.
const SCRAPE_LIMIT: Duration = Duration::from_secs(5);
const MAX_SCRAPE: u64 = 4 * 1024 * 1024;

/// contactd's config: queue mode, the generator offering [`OFFERED`], at
/// most 64 tasks in flight per agent (as `queue`), and the metrics endpoint
/// on a free loopback port. The store is left at its defaults (SQLite,
/// `sync = "normal"`), so that `--contactd-toml` may set `[store]`.
pub fn contactd_toml() -> String {
    let batch = OFFERED / (1000 / INTERVAL_MS);
    format!(
        "[tasks]\nmode = \"queue\"\ninterval = \"{INTERVAL_MS}ms\"\nbatch = {batch}\nwindow = 64\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n"
    )
}

/// Runs the scenario on `server` with `agents` agents for `duration`,
/// measured once every agent has had a task.
pub async fn run(server: &Server, agents: usize, duration: Duration) -> anyhow::Result<Outcome> {
    let metrics = server.metrics_addr().await?;
    let mut fleet = QueueAgents::start(&[server.addr], agents).await?;
    let probes = Probes::start(&server.admin).await?;
    let own = std::process::id() as i32;
    let before = Counters::read(metrics, fleet.acked()).await?;
    let (server_cpu, load_cpu) = (server.cpu_seconds()?, cpu_seconds_of(own)?);
    let started = Instant::now();
    // The measurement window itself, not a synchronisation.
    tokio::time::sleep(duration).await;
    let after = Counters::read(metrics, fleet.acked()).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = server.cpu_seconds()? - server_cpu;
    let load_cpu = cpu_seconds_of(own)? - load_cpu;
    let submitted = probes.stop().await?;

    let mut outcome = Outcome::default();
    let rate = |name: &str| (after.get(name) - before.get(name)) / elapsed;
    outcome.figures.extend([
        ("acked_per_s", rate(ACKED)),
        ("offered_per_s", f64::from(OFFERED)),
        ("committed_per_s", rate(PUBLISHED)),
        ("claimed_per_s", rate(DELIVERED)),
        ("handled_per_s", rate(HANDLED)),
        ("dropped_per_s", rate(DROPPED)),
        ("pending_end", after.get(PENDING)),
    ]);
    let latency = fleet.probes.lock().clone();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e6;
    outcome.figures.extend([
        ("submit_to_ack_p50_ms", ms(0.5)),
        ("submit_to_ack_p99_ms", ms(0.99)),
        ("submit_to_ack_max_ms", latency.max() as f64 / 1e6),
        ("probes_acked", latency.len() as f64),
        ("probes_submitted", submitted as f64),
        ("server_cpu_pct", server_cpu * 100.0 / elapsed),
        ("load_cpu_pct", load_cpu * 100.0 / elapsed),
        ("agents", agents as f64),
        // For server_cpu_ns_per_op: the acks in the window.
        ("count", after.get(ACKED) - before.get(ACKED)),
    ]);
    // Not a ceiling unless the offer went beyond it: tasks left waiting,
    // or the server busy for at least a whole core all along (the
    // generator runs inside the server, so a saturated server generates
    // only what it can commit and hand out: then nothing waits).
    let saturated = server_cpu * 100.0 / elapsed >= SATURATED_PCT;
    outcome.check(after.get(PENDING) > 0.0 || saturated, || {
        "no task waiting at the end and the server not saturated: the offer did not exceed \
         what contactd did"
            .into()
    });
    outcome.errors.extend(fleet.errors());
    Ok(outcome)
}

/// The series read: the server's (tasks published, sent, acks applied,
/// dropped from a full queue, waiting now) and one of the agents' (acks
/// sent, i.e. tasks handled).
const PUBLISHED: &str = "contactd_tasks_published_total";
const DELIVERED: &str = "contactd_tasks_delivered_total";
const ACKED: &str = "contactd_tasks_acked_total{outcome=\"ok\"}";
const DROPPED: &str = "contactd_tasks_dropped_total{reason=\"max_pending\"}";
const PENDING: &str = "contactd_tasks_pending";
const HANDLED: &str = "handled";

/// The counters at one moment.
struct Counters(HashMap<String, f64>);

impl Counters {
    /// The server's series (one scrape), and `handled`.
    async fn read(metrics: SocketAddr, handled: u64) -> anyhow::Result<Counters> {
        let mut series = scrape(metrics).await?;
        for name in [PUBLISHED, DELIVERED, ACKED, DROPPED, PENDING] {
            anyhow::ensure!(series.contains_key(name), "no {name} in the metrics");
        }
        series.insert(HANDLED.into(), handled as f64);
        Ok(Counters(series))
    }

    fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(f64::NAN)
    }
}

/// `GET /metrics` (HTTP/1.1, one request per connection, as the endpoint
/// serves it): each sample's series (name and labels) and value.
async fn scrape(addr: SocketAddr) -> anyhow::Result<HashMap<String, f64>> {
    let response = tokio::time::timeout(SCRAPE_LIMIT, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.take(MAX_SCRAPE).read_to_end(&mut response).await?;
        anyhow::Ok(response)
    })
    .await
    .context("scraping the metrics timed out")??;
    let response = String::from_utf8(response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("a metrics response without a body")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "metrics: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// The admin clients submitting probes until stopped.
struct Probes {
    set: JoinSet<anyhow::Result<u64>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Probes {
    async fn start(socket: &Path) -> anyhow::Result<Probes> {
        let stop = tokio_util::sync::CancellationToken::new();
        let mut set = JoinSet::new();
        for _ in 0..PROBE_CLIENTS {
            let mut admin = store::admin(socket).await?;
            let stop = stop.clone();
            set.spawn(async move {
                let mut submitted = 0;
                while !stop.is_cancelled() {
                    let request = SubmitTaskRequest {
                        text: format!("{PROBE}{}", unix_ns()),
                        ..Default::default()
                    };
                    tokio::time::timeout(SUBMIT_LIMIT, admin.submit_task(request))
                        .await
                        .with_context(|| {
                            format!("a probe's submit took over {SUBMIT_LIMIT:?}")
                        })??;
                    submitted += 1;
                }
                anyhow::Ok(submitted)
            });
        }
        Ok(Probes { set, stop })
    }

    /// Stops them; returns how many probes they submitted.
    async fn stop(mut self) -> anyhow::Result<u64> {
        self.stop.cancel();
        let mut submitted = 0;
        while let Some(done) = self.set.join_next().await {
            submitted += done??;
        }
        Ok(submitted)
    }
}
