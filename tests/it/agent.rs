//! The agent against real servers: in-process agents observed through their
//! events, `contactd agent` as a process, a real `contactd serve` killed and
//! restarted, and a scripted Contact server for what the real one does not
//! (yet) do on demand, such as delivering a task again. It covers connecting
//! (before the server is up, after a restart, backing off), running handlers
//! (timeouts, concurrency), a task delivered again or running across a
//! reconnect, and the process's signals and config check.

use crate::common;

use std::{
    ffi::OsStr,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    process::Command,
    sync::{Arc, mpsc as std_mpsc},
    time::{Duration, Instant},
};

use common::{
    LIMIT,
    daemon::{Daemon, Process},
    fleet::{TestAgent, agent_config, connected, failed, handled, reserve_port},
    within,
};
use contactd::{
    agent::EventKind,
    config::Config,
    proto::{
        AGENT_HEADER,
        admin::{AgentTaskState, TaskIdRequest},
        contact::{
            ClientMsg, CmdRequest, CmdResponse, Empty, Outcome, Result as ResultMsg, ServerMsg,
            contact_server::{Contact, ContactServer},
        },
    },
    server,
};
use futures_util::{Stream, StreamExt, stream};
use nix::sys::signal::Signal;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// A server config generating one task every 100ms, with texts that differ
/// between server runs.
fn busy_server() -> Config {
    let mut config = Config::default();
    // Started with `server::run` directly, outside TestServer's temp dir.
    config.store.kind = contactd::config::StoreKind::Memory;
    config.tasks.interval = Duration::from_millis(100);
    config.tasks.batch = 1;
    config.tasks.template = "job-{seq}-{rand:1-1000000000}".parse().unwrap();
    config
}

/// A Contact server that delivers a fixed list of tasks on each getTask
/// call, ends the stream when told, and records acks, statuses and the
/// agent header of every call.
#[derive(Clone)]
struct Scripted {
    tasks: Vec<ServerMsg>,
    /// Fail every getTask stream right after it opened.
    drop_sessions: bool,
    /// Ends the open getTask streams (the agent then reconnects).
    cut: Arc<Notify>,
    seen: mpsc::UnboundedSender<Seen>,
}

#[derive(Debug)]
enum Seen {
    Call(&'static str, Option<String>),
    Ack(ResultMsg),
    Status(String),
}

impl Scripted {
    fn record<T>(&self, call: &'static str, request: &Request<T>) {
        let header = request
            .metadata()
            .get(AGENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let _ = self.seen.send(Seen::Call(call, header));
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Contact for Scripted {
    type sendStatusStream = Boxed<ResultMsg>;
    type getTaskStream = Boxed<ServerMsg>;

    async fn send_status(
        &self,
        request: Request<Streaming<ClientMsg>>,
    ) -> Result<Response<Self::sendStatusStream>, Status> {
        self.record("sendStatus", &request);
        let seen = self.seen.clone();
        let replies = request.into_inner().map(move |msg| {
            let msg = msg?;
            let _ = seen.send(Seen::Status(msg.msg.clone()));
            Ok(ResultMsg {
                ret: msg.msg,
                ..ResultMsg::default()
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn get_task(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::getTaskStream>, Status> {
        self.record("getTask", &request);
        if self.drop_sessions {
            let reset = Status::unknown("connection reset");
            return Ok(Response::new(Box::pin(stream::once(async { Err(reset) }))));
        }
        let cut = Arc::clone(&self.cut);
        let tasks = stream::iter(self.tasks.clone().into_iter().map(Ok)).chain(
            stream::once(async move { cut.notified().await }).filter_map(|()| async { None }),
        );
        Ok(Response::new(Box::pin(tasks)))
    }

    async fn tell_result(
        &self,
        request: Request<Streaming<ResultMsg>>,
    ) -> Result<Response<Empty>, Status> {
        self.record("tellResult", &request);
        let mut inbound = request.into_inner();
        while let Some(result) = inbound.message().await? {
            let _ = self.seen.send(Seen::Ack(result));
        }
        Ok(Response::new(Empty {}))
    }

    async fn remote_cmd(
        &self,
        _request: Request<CmdRequest>,
    ) -> Result<Response<CmdResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves `contact` on a free loopback port until the returned token is cancelled.
async fn serve_scripted(contact: Scripted) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(ContactServer::new(contact))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
        }
    });
    (addr, stop)
}

async fn next_ack(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    calls: &mut Vec<(&'static str, Option<String>)>,
    statuses: &mut Vec<String>,
) -> ResultMsg {
    within("an ack", async {
        loop {
            match seen.recv().await.expect("the server is running") {
                Seen::Ack(ack) => return ack,
                Seen::Call(call, header) => calls.push((call, header)),
                Seen::Status(status) => statuses.push(status),
            }
        }
    })
    .await
}

// ---- connecting: before the server is up, after a restart, backing off ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_its_server_connects_once_it_comes_up() {
    let addr = reserve_port();
    let mut agent = TestAgent::start(agent_config(addr, "early"));
    // It tries and fails while nothing listens.
    agent.wait_for("a failed attempt", failed).await;
    agent.wait_for("a second failed attempt", failed).await;

    let listener = contactd::net::bind(addr, 128).expect("bind the reserved port");
    let (_config, rx) = watch::channel(Arc::new(busy_server()));
    let stop = CancellationToken::new();
    let server = tokio::spawn(server::run(server::Serve::new(listener, rx, stop.clone())));
    let up = Instant::now();
    let at = agent.wait_for("connected", connected).await;
    // The backoff is at most 500ms + 20%, plus connecting.
    assert!(
        at.duration_since(up) < Duration::from_secs(5),
        "{:?}",
        at - up
    );
    let (_, outcome) = agent.wait_for("a handled task", handled).await;
    assert_eq!(outcome, Outcome::Ok);
    agent.stop().await;
    stop.cancel();
    within("server exit", server).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_server_is_killed_and_restarted_the_agent_reconnects_and_work_continues() {
    let server_config = "[tasks]\ninterval = \"100ms\"\nbatch = 1\n\
                         template = \"job-{seq}-{rand:1-1000000000}\"\n";
    let mut daemon = Daemon::start(server_config);
    let addr = daemon.addr;
    let config = agent_config(addr, "survivor");
    let bound = contactd::backoff::Backoff::new(config.backoff.clone()).bound();
    let mut agent = TestAgent::start(config);
    agent.wait_for("connected", connected).await;
    agent.wait_for("a handled task", handled).await;

    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(LIMIT);
    agent.wait_for("the session to fail", failed).await;
    // Several attempts fail while the server is down.
    agent.wait_for("a failed attempt", failed).await;

    let restarted = Daemon::start(&format!("[server]\nlisten = \"{addr}\"\n{server_config}"));
    let up = Instant::now();
    let at = agent.wait_for("reconnected", connected).await;
    let took = at.saturating_duration_since(up);
    // Connecting on loopback takes milliseconds; allow for a loaded machine.
    assert!(
        took <= bound + Duration::from_secs(3),
        "reconnected {took:?} after the restart; the backoff bound is {bound:?}"
    );
    let (_, outcome) = agent.wait_for("a task from the new server", handled).await;
    assert_eq!(outcome, Outcome::Ok);
    agent.stop().await;
    drop(restarted);
}

/// A server shutting down ends the streams with a retry hint of 0: the
/// agent comes back within its `retry_hint_jitter`, its failure backoff
/// (here 1 hour) started over, not waited out. The listening socket is
/// held across the two servers, as systemd's socket unit holds it, so the
/// new connection waits in its backlog until the next server takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_shuts_down_is_reconnected_to_at_once_not_after_a_backoff() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let serve = |listener: &std::net::TcpListener| {
        let listener = contactd::net::adopt(listener.try_clone().unwrap()).unwrap();
        let (config, rx) = watch::channel(Arc::new(busy_server()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::run(server::Serve::new(listener, rx, stop.clone())));
        (config, stop, task)
    };
    let (_config, stop, first) = serve(&held);
    let mut config = agent_config(addr, "returning");
    config.healthy_after = Duration::from_secs(3600);
    config.backoff.initial = Duration::from_secs(3600);
    config.backoff.max = Duration::from_secs(3600);
    config.retry_hint_jitter = Duration::from_millis(200);
    let mut agent = TestAgent::start(config);
    agent.wait_for("connected", connected).await;

    stop.cancel();
    within("the first server's exit", first)
        .await
        .unwrap()
        .unwrap();
    let delay = agent
        .wait_for("a delay", |e| match e.kind {
            EventKind::Waiting { delay } => Some(delay),
            _ => None,
        })
        .await;
    assert!(delay <= Duration::from_millis(200), "{delay:?}");

    let (_config, stop, second) = serve(&held);
    agent.wait_for("reconnected", connected).await;
    let (_, outcome) = agent.wait_for("a task from the new server", handled).await;
    assert_eq!(outcome, Outcome::Ok);
    agent.stop().await;
    stop.cancel();
    within("the second server's exit", second)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_drops_every_session_gets_backed_off_not_stormed() {
    let (seen, _seen) = mpsc::unbounded_channel();
    let scripted = Scripted {
        tasks: Vec::new(),
        drop_sessions: true,
        cut: Arc::new(Notify::new()),
        seen,
    };
    let (addr, stop) = serve_scripted(scripted).await;
    let mut agent = TestAgent::start(agent_config(addr, "stormy"));
    let mut delays = Vec::new();
    for _ in 0..6 {
        agent.wait_for("a session", connected).await;
        let delay = agent
            .wait_for("a delay", |e| match e.kind {
                EventKind::Waiting { delay } => Some(delay),
                _ => None,
            })
            .await;
        delays.push(delay);
    }
    // Each session was up (connected) but for less than healthy_after, so
    // the backoff kept growing: 50ms, 80ms, ... 327ms (±20%). (On a slow
    // machine a first connection attempt can fail before the first session
    // counted here: then the first delay seen is the second step, 80ms.)
    assert!(delays[0] <= Duration::from_millis(96), "{delays:?}");
    assert!(delays[5] >= Duration::from_millis(260), "{delays:?}");
    agent.stop().await;
    stop.cancel();
}

// ---- handlers: killed at their timeout, at most handler_concurrency at once ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_handler_is_killed_at_its_timeout_and_acked_as_failed() {
    let daemon = Daemon::start("[tasks]\ninterval = \"1h\"\nbatch = 1\n");
    let mut config = agent_config(daemon.addr, "hangs");
    config.handler = vec!["sh".into(), "-c".into(), "sleep 30 & sleep 30".into()];
    config.handler_timeout = Duration::from_millis(300);
    let mut agent = TestAgent::start(config);
    let started = Instant::now();
    let (task_id, outcome) = agent.wait_for("the task handled", handled).await;
    assert_eq!(outcome, Outcome::Failed);
    assert!(started.elapsed() < Duration::from_secs(10));
    // The server recorded the failed ack, with the handler's fate as its result.
    let admin = daemon.admin().await;
    let shown = common::until(
        "the failed ack recorded",
        || {
            let mut admin = admin.clone();
            async move {
                let request = TaskIdRequest { id: task_id };
                admin.show_task(request).await.unwrap().into_inner()
            }
        },
        |shown| {
            shown
                .agents
                .iter()
                .any(|a| a.agent == "hangs" && a.state() == AgentTaskState::Failed)
        },
    )
    .await;
    let row = shown.agents.iter().find(|a| a.agent == "hangs").unwrap();
    assert!(
        row.result.contains("killed after the 300ms timeout"),
        "{row:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_run_at_most_handler_concurrency_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let scripted = Scripted {
        tasks: (1..=6)
            .map(|id| ServerMsg {
                task: format!("task {id}"),
                id,
                attempt: 1,
                epoch: 7,
                retry: 0,
            })
            .collect(),
        drop_sessions: false,
        cut: Arc::new(Notify::new()),
        seen: seen_tx,
    };
    let (addr, stop) = serve_scripted(scripted).await;
    let mut config = agent_config(addr, "limited");
    config.handler_concurrency = 2;
    // Each handler counts the handlers running (itself included) while it runs.
    let script = format!(
        "cd {}; touch running.$CONTACTD_TASK_ID; ls | grep -c running >> counts; sleep 0.2; rm running.$CONTACTD_TASK_ID",
        dir.path().display()
    );
    config.handler = vec!["sh".into(), "-c".into(), script];
    let agent = TestAgent::start(config);
    let (mut calls, mut statuses) = (Vec::new(), Vec::new());
    let mut acked = Vec::new();
    for _ in 0..6 {
        let ack = next_ack(&mut seen, &mut calls, &mut statuses).await;
        assert_eq!(ack.outcome(), Outcome::Ok, "{ack:?}");
        acked.push(ack.task_id);
    }
    acked.sort_unstable();
    assert_eq!(acked, [1, 2, 3, 4, 5, 6]);
    let counts = std::fs::read_to_string(dir.path().join("counts")).unwrap();
    let counts: Vec<u32> = counts.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(counts.len(), 6);
    assert!(counts.iter().all(|&n| (1..=2).contains(&n)), "{counts:?}");
    agent.stop().await;
    stop.cancel();
}

// ---- a task delivered again is not run twice; across a reconnect, acked once ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_task_is_acked_again_but_not_run_twice() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let cut = Arc::new(Notify::new());
    let scripted = Scripted {
        tasks: vec![ServerMsg {
            task: "the task".into(),
            id: 41,
            attempt: 1,
            epoch: 7,
            retry: 0,
        }],
        drop_sessions: false,
        cut: Arc::clone(&cut),
        seen: seen_tx,
    };
    let (addr, stop) = serve_scripted(scripted).await;
    let mut config = agent_config(addr, "dedup-agent");
    config.handler = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "cat > /dev/null; echo \"$CONTACTD_TASK_ID $CONTACTD_TASK_ATTEMPT $CONTACTD_AGENT\" >> {}; echo done",
            runs.display()
        ),
    ];
    let mut agent = TestAgent::start(config);
    let (mut calls, mut statuses) = (Vec::new(), Vec::new());
    let first = next_ack(&mut seen, &mut calls, &mut statuses).await;
    assert_eq!(
        (first.task_id, first.outcome(), first.ret.as_str()),
        (41, Outcome::Ok, "ok")
    );

    // A clean end of the task stream is a reason to reconnect; the new
    // session delivers task 41 again.
    cut.notify_waiters();
    agent.wait_for("the session to end", failed).await;
    agent.wait_for("reconnected", connected).await;
    let again = next_ack(&mut seen, &mut calls, &mut statuses).await;
    assert_eq!(again, first);
    agent
        .wait_for("the re-ack", |e| {
            matches!(e.kind, EventKind::Reacked { task_id: 41 }).then_some(())
        })
        .await;
    agent.stop().await;
    stop.cancel();

    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "41 1 dedup-agent\n"
    );
    while let Ok(event) = seen.try_recv() {
        if let Seen::Call(call, header) = event {
            calls.push((call, header));
        }
    }
    for call in ["getTask", "tellResult", "sendStatus"] {
        assert!(
            calls.iter().filter(|(c, _)| *c == call).count() >= 2,
            "{call} once per session: {calls:?}"
        );
    }
    assert!(
        calls
            .iter()
            .all(|(_, header)| header.as_deref() == Some("dedup-agent")),
        "{calls:?}"
    );
    assert!(
        statuses
            .iter()
            .any(|s| s.starts_with("agent=dedup-agent host=")),
        "{statuses:?}"
    );
}

/// Reads a fifo in a thread, failing the test if nothing comes within [`LIMIT`].
async fn read_fifo(path: &Path) -> String {
    let path = path.to_owned();
    let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(path).unwrap());
    within("the fifo", read).await.unwrap()
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_running_across_a_reconnect_is_acked_once_on_the_new_session() {
    let dir = tempfile::tempdir().unwrap();
    let (started, release) = (dir.path().join("started"), dir.path().join("release"));
    mkfifo(&started);
    mkfifo(&release);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let cut = Arc::new(Notify::new());
    let scripted = Scripted {
        tasks: vec![ServerMsg {
            task: "slow".into(),
            id: 7,
            attempt: 1,
            epoch: 7,
            retry: 0,
        }],
        drop_sessions: false,
        cut: Arc::clone(&cut),
        seen: seen_tx,
    };
    let (addr, stop) = serve_scripted(scripted).await;
    let mut config = agent_config(addr, "patient");
    // The handler says it started, then waits for the test to release it.
    let runs = dir.path().join("runs");
    let script = format!(
        "echo started > {}; read line < {}; echo run >> {}",
        started.display(),
        release.display(),
        runs.display()
    );
    config.handler = vec!["sh".into(), "-c".into(), script];
    let mut agent = TestAgent::start(config);
    assert_eq!(read_fifo(&started).await, "started\n");
    // The session ends while the handler runs; the next one delivers task 7
    // again: in flight, or (if the handler was quicker) handled, so it is
    // not run twice, and any second ack is the same.
    cut.notify_waiters();
    agent.wait_for("the session to end", failed).await;
    agent.wait_for("reconnected", connected).await;
    let release = release.clone();
    tokio::task::spawn_blocking(move || std::fs::write(release, "go\n").unwrap());
    let (mut calls, mut statuses) = (Vec::new(), Vec::new());
    let ack = next_ack(&mut seen, &mut calls, &mut statuses).await;
    assert_eq!((ack.task_id, ack.outcome()), (7, Outcome::Ok));
    agent.stop().await;
    stop.cancel();
    for event in std::iter::from_fn(|| seen.try_recv().ok()) {
        if let Seen::Ack(again) = event {
            assert_eq!(again, ack);
        }
    }
    assert_eq!(std::fs::read_to_string(runs).unwrap(), "run\n");
}

// ---- `contactd agent` as a process: SIGTERM, check-config --agent, SIGHUP ----

#[test]
fn sigterm_lets_a_running_handler_finish_acks_it_and_exits_0() {
    let daemon = Daemon::start("[tasks]\ninterval = \"1h\"\nbatch = 1\n");
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("started");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let config = dir.path().join("agent.toml");
    // The handler says it started (through the fifo), then takes a while.
    std::fs::write(
        &config,
        format!(
            "[agent]\nservers = [\"http://{}\"]\nname = \"graceful\"\nstate_dir = \"{}\"\n\
             handler = [\"sh\", \"-c\", \"echo started > {}; sleep 1; echo finished\"]\n\
             [log]\nlevel = \"debug\"\n",
            daemon.addr,
            dir.path().display(),
            fifo.display()
        ),
    )
    .unwrap();
    let mut agent = Process::spawn(
        &[OsStr::new("agent"), OsStr::new("-c"), config.as_os_str()],
        &[],
    );
    agent.wait_for_line("connected to");
    // Reading blocks until the handler writes the fifo: then it is running.
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn({
        let fifo = fifo.clone();
        move || tx.send(std::fs::read_to_string(fifo).unwrap())
    });
    let started = rx.recv_timeout(LIMIT).expect("the handler starts");
    assert_eq!(started, "started\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let acked = runtime()
        .block_on(daemon.agent_until("graceful", "the handler's ack", |a| a.acked + a.failed > 0));
    assert_eq!((acked.acked, acked.failed), (1, 0), "{acked:?}");
    let status = agent.wait_exit(LIMIT);
    assert!(status.success(), "{status:?}");
    agent.wait_for_line("agent stopped");
}

fn contactd(args: &[&str]) -> std::process::Output {
    common::contactd()
        .args(args)
        .output()
        .expect("run contactd")
}

#[test]
fn check_config_agent_prints_the_example_and_reports_every_problem() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/contactd-agent.toml");
    let out = contactd(&["check-config", "--agent", "-c", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: contactd::config::AgentFile =
        contactd::config::parse(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let example: contactd::config::AgentFile = contactd::config::load(Path::new(example)).unwrap();
    assert_eq!(effective, example);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[agent]\nservers = []\nhandler_concurrency = 0\n\n[agent.backoff]\ninitial = \"never\"\n",
    )
    .unwrap();
    let out = contactd(&["check-config", "--agent", "-c", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = bad.display().to_string();
    for needle in [
        format!("{file}:2:11: agent.servers: is empty"),
        format!(
            "{file}:3:23: agent.handler_concurrency: 0 is out of range: expected from 1 to 1024"
        ),
        format!("{file}:6:11: agent.backoff.initial: invalid duration \"never\""),
    ] {
        assert!(stderr.contains(&needle), "missing {needle:?} in:\n{stderr}");
    }
    // The same file is not a valid server config: --agent decides.
    let out = contactd(&["check-config", "-c", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn sighup_reloads_the_agent_config() {
    let daemon = Daemon::start(
        "[tasks]\ninterval = \"100ms\"\nbatch = 1\ntemplate = \"job-{seq}-{rand:1-1000000000}\"\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let addr = daemon.addr;
    let write = |handler: &str| {
        std::fs::write(
            &config,
            format!(
                "[agent]\nservers = [\"http://{addr}\"]\nname = \"reloads\"\nhandler = [\"{handler}\"]\n\
                 state_dir = \"{}\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
    };
    write("true");
    let mut agent = Process::spawn(
        &[OsStr::new("agent"), OsStr::new("-c"), config.as_os_str()],
        &[],
    );
    agent.wait_for_line("connected to");
    let runtime = runtime();
    let before = runtime.block_on(daemon.agent_until("reloads", "an ok ack", |a| a.acked > 0));
    assert_eq!(before.failed, 0, "{before:?}");
    write("false");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    agent.wait_for_line("config reloaded");
    runtime.block_on(daemon.agent_until("reloads", "a failed ack", |a| a.failed > 0));
}

/// A runtime for the admin API calls of the tests that drive processes.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
