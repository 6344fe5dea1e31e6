//! The jobs' scenarios (issue 23), contactd only (the baseline has no
//! jobs): an ad hoc rollout over a fleet of named agents that ack each task
//! as soon as they decode it, and the idle cost of many scheduled jobs.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use contactd::proto::{
    admin::{
        ListAgentsRequest, ListTasksRequest, RunIdRequest, SubmitTaskRequest,
        admin_client::AdminClient,
    },
    contact::Empty,
};
use futures_util::{StreamExt, stream};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinSet,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use crate::{
    load::{self, AbortOnDrop},
    report::Outcome,
    server::Server,
    store,
};

/// Longest the fleet may take to show up in `agents`, and a rollout to end.
const ROLLOUT_LIMIT: Duration = Duration::from_secs(60);

/// Longest the jobs scenario waits for the first fire.
const FIRST_FIRE_LIMIT: Duration = Duration::from_secs(5);

/// The jobs scenario's window starts this long after a fire.
const PHASE: Duration = Duration::from_millis(500);

/// Between two looks at the server's state (agents connected, a run's
/// end): polling an admin API that has no event to wait on.
const POLL: Duration = Duration::from_millis(10);

/// The names of the rollout's agents: `bench-roll-00000`, ...
const AGENT_PREFIX: &str = "bench-roll-";

/// The config of the jobs scenario: `count` jobs, each `every = "1s"` in
/// broadcast mode (and no generated tasks, so every task is a job run's).
pub fn jobs_toml(count: usize) -> String {
    let mut toml = String::from("[tasks]\nbatch = 0\n");
    for n in 0..count {
        toml.push_str(&format!(
            "[[jobs]]\nname = \"bench-{n:04}\"\ntext = \"uptime {n}\"\nevery = \"1s\"\n\
             mode = \"broadcast\"\n"
        ));
    }
    toml
}

/// A rollout's agents: each its own connection (one socket here and one in
/// the server: 10,000 agents stay under the 20,000 open files of each
/// process) with a getTask stream and a tellResult stream on it, named by
/// `x-contactd-agent`; each decodes its tasks (tonic's generated client)
/// and acks each at once.
struct Fleet {
    /// The agents' tasks (connection drivers, readers, ack streams).
    tasks: JoinSet<()>,
    /// Acks sent so far, and a wake for each.
    acked: Arc<AtomicU64>,
    ack_sent: Arc<Notify>,
    failed: usize,
    first_error: Option<String>,
    established_in: Duration,
}

impl Fleet {
    async fn connect(addr: SocketAddr, agents: usize, parallel: usize) -> Fleet {
        let acked = Arc::new(AtomicU64::new(0));
        let ack_sent = Arc::new(Notify::new());
        let started = Instant::now();
        let results: Vec<_> = stream::iter(0..agents)
            .map(|n| {
                let (acked, ack_sent) = (Arc::clone(&acked), Arc::clone(&ack_sent));
                async move { agent(addr, n, acked, ack_sent).await }
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        let established_in = started.elapsed();
        let mut tasks = JoinSet::new();
        let mut failed = 0;
        let mut first_error = None;
        for result in results {
            match result {
                Ok(agent) => {
                    tasks.spawn(agent);
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        Fleet {
            tasks,
            acked,
            ack_sent,
            failed,
            first_error,
            established_in,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until `count` acks were sent, at most until `deadline`.
    async fn wait_acks(&self, count: u64, deadline: tokio::time::Instant) -> bool {
        loop {
            let sent = self.ack_sent.notified();
            if self.acked() >= count {
                return true;
            }
            if tokio::time::timeout_at(deadline, sent).await.is_err() {
                return self.acked() >= count;
            }
        }
    }

    async fn close(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Agent `n` connected and subscribed: the future that runs it (until its
/// stream ends or it is aborted).
async fn agent(
    addr: SocketAddr,
    n: usize,
    acked: Arc<AtomicU64>,
    ack_sent: Arc<Notify>,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let name: tonic::metadata::MetadataValue<_> = format!("{AGENT_PREFIX}{n:05}")
        .parse()
        .context("agent name as metadata")?;
    let (mut client, driver) = load::connect_agent(addr, None).await?;
    let driver = AbortOnDrop(driver);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let mut acks = tonic::Request::new(UnboundedReceiverStream::new(ack_rx));
    acks.metadata_mut()
        .insert(contactd::proto::AGENT_HEADER, name.clone());
    let mut request = tonic::Request::new(Empty {});
    request
        .metadata_mut()
        .insert(contactd::proto::AGENT_HEADER, name);
    let mut tasks = client.get_task(request).await?.into_inner();
    let acks = {
        let mut client = client.clone();
        AbortOnDrop(tokio::spawn(async move {
            let _ = client.tell_result(acks).await;
        }))
    };
    Ok(async move {
        // The connection and the ack stream live as long as the reader.
        let (_driver, _acks) = (driver, acks);
        while let Ok(Some(task)) = tasks.message().await {
            if ack_tx.send(store::ack_of(&task)).is_err() {
                break;
            }
            acked.fetch_add(1, Ordering::Relaxed);
            ack_sent.notify_one();
        }
    })
}

/// An ad hoc rollout (`task submit --batch BATCH`, every agent) over
/// `agents` named agents, connected and subscribed first. The figure is
/// agents per second from the submit (the load's clock) to the run's end
/// (its `finished_ms` in `ShowRun`, the server's clock: the same machine).
pub async fn rollout(
    addr: SocketAddr,
    socket: &Path,
    agents: usize,
    parallel: usize,
    batch: &str,
) -> anyhow::Result<Outcome> {
    let mut admin = store::admin(socket).await?;
    let fleet = Fleet::connect(addr, agents, parallel).await;
    let mut outcome = Outcome::default();
    outcome.check(fleet.failed == 0, || {
        format!(
            "{} agents failed to subscribe: {}",
            fleet.failed,
            fleet.first_error.as_deref().unwrap_or("")
        )
    });
    let deadline = tokio::time::Instant::now() + ROLLOUT_LIMIT;
    let present = connected(&mut admin, agents, deadline).await?;
    let submitted_ms = unix_ms();
    let submitted = Instant::now();
    let run = admin
        .submit_task(SubmitTaskRequest {
            text: "bench rollout: uptime".into(),
            batch: batch.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run;
    let submit_ms = submitted.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(run != 0, "the submit started no rollout");
    let all_acked = fleet.wait_acks(present as u64, deadline).await;
    let last_ack_ms = submitted.elapsed().as_secs_f64() * 1000.0;
    outcome.check(all_acked, || {
        format!("only {} of {present} agents acked", fleet.acked())
    });
    let shown = ended(&mut admin, run, deadline).await?;
    let total_ms = (shown.finished_ms - submitted_ms).max(1) as f64;
    outcome
        .figures
        .push(("rate", f64::from(shown.acked) * 1000.0 / total_ms));
    outcome.figures.push(("agents", agents as f64));
    outcome.figures.push(("targets", f64::from(shown.targets)));
    outcome.figures.push(("batch", f64::from(shown.batch)));
    outcome.figures.push(("run_ms", total_ms));
    outcome.figures.push(("submit_ms", submit_ms));
    outcome.figures.push(("last_ack_ms", last_ack_ms));
    outcome.figures.push((
        "server_run_ms",
        (shown.finished_ms - shown.started_ms) as f64,
    ));
    outcome
        .figures
        .push(("establish_s", fleet.established_in.as_secs_f64()));
    // The count for the server's CPU per operation (per agent).
    outcome.figures.push(("count", f64::from(shown.acked)));
    outcome.check(shown.state == "succeeded", || {
        format!("the run ended {}", shown.state)
    });
    outcome.check(shown.targets as usize == agents, || {
        format!("the run targeted {} of {agents} agents", shown.targets)
    });
    outcome.check(shown.acked as usize == agents, || {
        format!("{} of {agents} agents acked the run", shown.acked)
    });
    fleet.close().await;
    Ok(outcome)
}

/// Waits until `agents` of the fleet are connected (`contactd agents`).
async fn connected(
    admin: &mut AdminClient<Channel>,
    agents: usize,
    deadline: tokio::time::Instant,
) -> anyhow::Result<usize> {
    loop {
        let listed = admin
            .list_agents(ListAgentsRequest {
                selector: format!("name={AGENT_PREFIX}*"),
            })
            .await?
            .into_inner();
        let present = listed.agents.iter().filter(|a| a.connected).count();
        if present >= agents {
            return Ok(present);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("only {present} of {agents} agents connected within {ROLLOUT_LIMIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Run `run` once it is no longer running (after every ack was sent).
async fn ended(
    admin: &mut AdminClient<Channel>,
    run: u64,
    deadline: tokio::time::Instant,
) -> anyhow::Result<contactd::proto::admin::Run> {
    loop {
        let shown = admin
            .show_run(RunIdRequest { run })
            .await?
            .into_inner()
            .run
            .context("ShowRun without a run")?;
        if shown.state != "running" && shown.finished_ms != 0 {
            return Ok(shown);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("run {run} still {} after {ROLLOUT_LIMIT:?}", shown.state);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `[[jobs]]` on their schedules and no agent: the server's CPU over
/// `duration` (user + system, `/proc/PID/stat`) as a percentage of one
/// core, from the first fire on; and the runs fired meanwhile (every task
/// is a job run's: the newest task id moves by one per run).
pub async fn idle_jobs(
    server: &Server,
    jobs: usize,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let mut admin = store::admin(&server.admin).await?;
    let first = tokio::time::Instant::now() + FIRST_FIRE_LIMIT;
    loop {
        if newest_task(&mut admin).await? > 0 {
            break;
        }
        if tokio::time::Instant::now() >= first {
            bail!("no job fired within {FIRST_FIRE_LIMIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    // Every job fires on the second: a window that starts half a second
    // after a fire (and lasts whole seconds) holds one fire per second,
    // whatever a fire's commit takes up to that half second.
    tokio::time::sleep(PHASE).await;
    let (cpu_before, ids_before, started) = (
        server.cpu_seconds()?,
        newest_task(&mut admin).await?,
        Instant::now(),
    );
    // The measurement window itself, not a synchronisation.
    tokio::time::sleep(duration).await;
    let cpu = server.cpu_seconds()? - cpu_before;
    let elapsed = started.elapsed().as_secs_f64();
    let runs = newest_task(&mut admin).await? - ids_before;
    let mut outcome = Outcome::default();
    outcome
        .figures
        .push(("cpu_pct_of_core", cpu * 100.0 / elapsed));
    outcome.figures.push(("jobs", jobs as f64));
    outcome.figures.push(("runs_per_s", runs as f64 / elapsed));
    outcome.figures.push(("cpu_s", cpu));
    outcome.figures.push(("window_s", elapsed));
    outcome
        .figures
        .push(("rss_mib", server.rss()? as f64 / 1048576.0));
    if duration >= Duration::from_secs(1) {
        let expected = jobs as u64 * duration.as_secs();
        outcome.check(runs.abs_diff(expected) <= jobs as u64, || {
            format!("{runs} runs fired in {elapsed:.1} s, expected {expected}")
        });
    }
    Ok(outcome)
}

/// The newest task's id (0: none yet).
async fn newest_task(admin: &mut AdminClient<Channel>) -> anyhow::Result<u64> {
    let tasks = admin
        .list_tasks(ListTasksRequest {
            limit: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .tasks;
    Ok(tasks.first().map_or(0, |t| t.id))
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
