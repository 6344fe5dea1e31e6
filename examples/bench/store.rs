//! The durable store's scenarios (issue 11), contactd only (the baseline
//! has neither an admin API nor a queue): `task submit` through the admin
//! socket, each returning once its task is committed to SQLite, and queue
//! mode end to end (generated, committed, claimed, delivered, acked).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use contactd::proto::{
    admin::SubmitTaskRequest,
    contact::{
        Empty, Outcome as TaskOutcome, Result as ResultMsg, ServerMsg,
        contact_client::ContactClient,
    },
};
use hdrhistogram::Histogram;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{load, report::Outcome};

/// `clients` admin connections, each submitting one task at a time (the
/// next once the last one's id came back, i.e. once it was committed).
pub async fn submits(socket: &Path, clients: usize, duration: Duration) -> anyhow::Result<Outcome> {
    let mut admins = Vec::new();
    for _ in 0..clients {
        admins.push(admin(socket).await?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for (n, mut admin) in admins.into_iter().enumerate() {
        set.spawn(async move {
            let mut hist = load::histogram();
            let mut count = 0u64;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let request = SubmitTaskRequest {
                    text: format!("bench task {n}-{count}: uptime"),
                    agent: String::new(),
                    ..Default::default()
                };
                admin.submit_task(request).await?;
                load::record(&mut hist, sent);
                count += 1;
            }
            Ok::<_, tonic::Status>((hist, count))
        });
    }
    load::join_workers(set, started).await
}

/// A client of the admin socket, once it accepts: the server binds it as it
/// starts, in its own task (bounded: 10 s).
pub async fn admin(
    socket: &Path,
) -> anyhow::Result<contactd::proto::admin::admin_client::AdminClient<tonic::transport::Channel>> {
    let started = Instant::now();
    loop {
        match contactd::client::admin::connect(socket).await {
            Ok(client) => return Ok(client),
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                bail!("admin socket {}: {e}", socket.display())
            }
            // Polling a socket file that is not there yet: no event to wait on.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Queue mode end to end: `agents` named agents, one connection each, each
/// acking every task as soon as it arrives (a handler that does nothing);
/// the figure is acks per second during `duration`, after every agent got
/// its first task.
pub async fn queue(addr: SocketAddr, agents: usize, duration: Duration) -> anyhow::Result<Outcome> {
    queue_on(&[addr], agents, duration).await
}

/// [`queue`] with the agents shared out among several servers (agent `n`
/// on `addrs[n % len]`).
pub async fn queue_on(
    addrs: &[SocketAddr],
    agents: usize,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let fleet = QueueAgents::start(addrs, agents).await?;
    let before = fleet.acked();
    let started = Instant::now();
    // The measurement window itself, not a synchronisation.
    tokio::time::sleep(duration).await;
    let count = fleet.acked() - before;
    let mut outcome = Outcome::default();
    outcome
        .figures
        .push(("rate", count as f64 / started.elapsed().as_secs_f64()));
    outcome.figures.push(("count", count as f64));
    outcome.figures.push(("agents", agents as f64));
    Ok(outcome)
}

/// The text of a probe task begins with this, then its submit time (Unix
/// ns): its agent records submit → ack.
pub const PROBE: &str = "bench probe ";

/// Named queue-mode agents, one connection each, each acking every task as
/// soon as it arrives (a handler that does nothing). Dropped, they stop.
pub struct QueueAgents {
    set: JoinSet<anyhow::Result<()>>,
    /// Acks sent: tasks handled.
    acked: Arc<AtomicU64>,
    /// Submit → ack of the probe tasks ([`PROBE`]), in ns.
    pub probes: Arc<parking_lot::Mutex<Histogram<u64>>>,
}

impl QueueAgents {
    /// Connects `agents` agents (agent `n` to `addrs[n % len]`) and waits
    /// until each has had a task (bounded: a queue that feeds only some
    /// agents is an error, not a hang).
    pub async fn start(addrs: &[SocketAddr], agents: usize) -> anyhow::Result<QueueAgents> {
        let acked = Arc::new(AtomicU64::new(0));
        let probes = Arc::new(parking_lot::Mutex::new(load::histogram()));
        let (first_tx, mut first_rx) = mpsc::channel::<()>(agents.max(1));
        let mut set = JoinSet::new();
        for n in 0..agents {
            let channel = load::connect(addrs[n % addrs.len()]).await?;
            let name = format!("bench-queue-{n:03}");
            let counts = (Arc::clone(&acked), Arc::clone(&probes));
            set.spawn(queue_agent(channel, name, counts, first_tx.clone()));
        }
        drop(first_tx);
        let mut ready = 0;
        let limit = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(limit);
        while ready < agents {
            tokio::select! {
                got = first_rx.recv() => match got {
                    Some(()) => ready += 1,
                    None => bail!("agents ended before each had a task ({ready} of {agents} had one)"),
                },
                () = &mut limit => bail!("only {ready} of {agents} agents got a task within 30 s"),
            }
        }
        Ok(QueueAgents { set, acked, probes })
    }

    /// Acks sent so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Agents that ended with an error so far (they end with the server).
    pub fn errors(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        while let Some(done) = self.set.try_join_next() {
            match done {
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(e) => errors.push(e.to_string()),
                Ok(Ok(())) => {}
            }
        }
        errors
    }
}

/// The acks sent by all agents, and the probes' latencies.
type Counts = (Arc<AtomicU64>, Arc<parking_lot::Mutex<Histogram<u64>>>);

/// One agent of [`QueueAgents`], named `name`: says when it got its first
/// task, acks every task at once, records a probe's submit → ack.
async fn queue_agent(
    channel: tonic::transport::Channel,
    name: String,
    (acked, probes): Counts,
    first: mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let mut client = ContactClient::new(channel);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acks = {
        let mut client = client.clone();
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(ack_rx));
        request.metadata_mut().insert(
            "x-contactd-agent",
            name.parse().context("agent name as metadata")?,
        );
        tokio::spawn(async move { client.tell_result(request).await })
    };
    let mut request = tonic::Request::new(Empty {});
    request.metadata_mut().insert(
        "x-contactd-agent",
        name.parse().context("agent name as metadata")?,
    );
    let mut tasks = client.get_task(request).await?.into_inner();
    let mut first = Some(first);
    // Ends when the server does (at the end of the run).
    while let Ok(Some(task)) = tasks.message().await {
        if let Some(first) = first.take() {
            let _ = first.send(()).await;
        }
        if ack_tx.send(ack_of(&task)).is_err() {
            break;
        }
        acked.fetch_add(1, Ordering::Relaxed);
        if let Some(submitted) = task.task.strip_prefix(PROBE) {
            let submitted: u64 = submitted.parse().context("a probe's submit time")?;
            let latency = crate::restart::unix_ns().saturating_sub(submitted);
            probes.lock().saturating_record(latency.max(1));
        }
    }
    drop(ack_tx);
    acks.abort();
    Ok(())
}

/// The ack of `task` as handled (by a handler that does nothing).
pub fn ack_of(task: &ServerMsg) -> ResultMsg {
    ResultMsg {
        ret: "ok".into(),
        task_id: task.id,
        outcome: TaskOutcome::Ok.into(),
        epoch: task.epoch,
    }
}
