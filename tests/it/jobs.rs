//! Jobs and their runs against the real server: a rollout over 200 agents
//! (its window, its halt at exactly max_failed + 1 failures, its resume and
//! end), `any` and `broadcast` runs, a rollout that survives a SIGKILL of
//! the server with no agent running it twice, schedules that fire once per
//! period across a restart and a SIGKILL, jobs changed by a reload, and the
//! operator commands (`contactd jobs`, `job run|show|pause|resume`,
//! `task submit --batch`).

use crate::common;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::Duration,
};

use common::{
    LIMIT, TestServer,
    daemon::Daemon,
    fleet::{TestAgent, agent_config, connected, handled},
    until, within,
};
use contactd::{
    config::{Config, JobConfig, JobMode},
    labels::LABELS_HEADER,
    proto::{
        AGENT_HEADER,
        admin::{
            JobNameRequest, ListJobsRequest, PauseJobRequest, RunIdRequest, ShowRunResponse,
            SubmitTaskRequest, TaskIdRequest, TaskState, admin_client::AdminClient,
        },
        contact::{Empty, Outcome, Result as ResultMsg, ServerMsg, contact_client::ContactClient},
    },
};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

/// An agent's name and labels on every call.
#[derive(Clone)]
struct Named(String, String);

impl Interceptor for Named {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(AGENT_HEADER, self.0.parse().unwrap());
        metadata.insert(LABELS_HEADER, self.1.parse().unwrap());
        Ok(request)
    }
}

/// Agents played by gRPC clients, as many as a test needs: every task any
/// of them receives comes out of one channel with the agent's name, and
/// the test acks it when it chooses (until then the agent is running it).
/// An agent may move to another server (postgres.rs: several servers).
#[derive(Default)]
pub(crate) struct Fleet {
    /// Where every agent's tasks come out (the sender is cloned for each).
    #[allow(clippy::type_complexity)]
    sender: Option<(
        mpsc::UnboundedSender<(String, ServerMsg)>,
        mpsc::UnboundedReceiver<(String, ServerMsg)>,
    )>,
    acks: HashMap<String, mpsc::Sender<ResultMsg>>,
    /// Each agent's two calls (getTask's reader, tellResult), to end them.
    calls: HashMap<String, [tokio::task::AbortHandle; 2]>,
}

impl Fleet {
    /// `count` agents `{prefix}-{n}` with `labels`, each subscribed.
    pub(crate) async fn connect(
        server: &TestServer,
        prefix: &str,
        count: usize,
        labels: &str,
    ) -> Fleet {
        let mut fleet = Fleet::default();
        for n in 0..count {
            fleet
                .join(server, &format!("{prefix}-{n:03}"), labels)
                .await;
        }
        fleet
    }

    /// Agent `name` with `labels` subscribes to `server` (after it left
    /// another one, say).
    pub(crate) async fn join(&mut self, server: &TestServer, name: &str, labels: &str) {
        let (tx, _) = self.sender.get_or_insert_with(mpsc::unbounded_channel);
        let tx = tx.clone();
        let mut client: ContactClient<InterceptedService<Channel, Named>> =
            ContactClient::with_interceptor(
                server.channel().await,
                Named(name.into(), labels.into()),
            );
        // Once getTask answers, the server has the agent's mailbox.
        let mut tasks = within("getTask", client.get_task(Empty {}))
            .await
            .unwrap()
            .into_inner();
        let (ack_tx, ack_rx) = mpsc::channel(64);
        let telling =
            tokio::spawn(async move { client.tell_result(ReceiverStream::new(ack_rx)).await });
        let agent = name.to_owned();
        let reading = tokio::spawn(async move {
            while let Ok(Some(msg)) = tasks.message().await {
                if tx.send((agent.clone(), msg)).is_err() {
                    return;
                }
            }
        });
        self.calls.insert(
            name.into(),
            [telling.abort_handle(), reading.abort_handle()],
        );
        self.acks.insert(name.into(), ack_tx);
    }

    /// `agent` goes away: its calls end (it may `join` again).
    pub(crate) fn leave(&mut self, agent: &str) {
        for call in self.calls.remove(agent).unwrap() {
            call.abort();
        }
        self.acks.remove(agent);
    }

    /// No task has reached an agent since the last `next`.
    pub(crate) fn received_nothing(&mut self) -> bool {
        self.sender
            .as_mut()
            .is_none_or(|(_, received)| received.try_recv().is_err())
    }

    pub(crate) async fn next(&mut self) -> (String, ServerMsg) {
        let (_, received) = self.sender.as_mut().expect("agents subscribed");
        within("a task reaching an agent", received.recv())
            .await
            .expect("agents subscribed")
    }

    pub(crate) async fn ack(&self, agent: &str, task: &ServerMsg, ok: bool) {
        let outcome = if ok { Outcome::Ok } else { Outcome::Failed };
        self.acks[agent]
            .send(ResultMsg {
                ret: if ok {
                    "done".into()
                } else {
                    "exit status 1".into()
                },
                task_id: task.id,
                outcome: outcome as i32,
                epoch: task.epoch,
            })
            .await
            .unwrap();
    }
}

pub(crate) async fn show(admin: &mut AdminClient<Channel>, run: u64) -> ShowRunResponse {
    admin
        .show_run(RunIdRequest { run })
        .await
        .unwrap()
        .into_inner()
}

/// Run `run` once `done` holds for it (asked every 20 ms, bounded).
pub(crate) async fn run_until(
    admin: &AdminClient<Channel>,
    run: u64,
    what: &str,
    done: impl Fn(&contactd::proto::admin::Run) -> bool,
) -> ShowRunResponse {
    until(
        what,
        || {
            let mut admin = admin.clone();
            async move { show(&mut admin, run).await }
        },
        |reply| reply.run.as_ref().is_some_and(&done),
    )
    .await
}

/// Runs the job `name` now (`contactd job run`); its run's id.
pub(crate) async fn run_job(admin: &mut AdminClient<Channel>, name: &str) -> u64 {
    admin
        .run_job(JobNameRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .run
}

/// Submits an ad hoc rollout (`task submit --batch`) and returns its run.
async fn rollout(
    admin: &mut AdminClient<Channel>,
    text: &str,
    selector: &str,
    batch: &str,
    max_failed: &str,
) -> u64 {
    let reply = admin
        .submit_task(SubmitTaskRequest {
            text: text.into(),
            selector: selector.into(),
            batch: batch.into(),
            max_failed: max_failed.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.run, reply.id, "a run's id is its task's");
    reply.run
}

fn quiet() -> Config {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_over_200_agents_keeps_its_window_halts_at_max_failed_plus_one_and_resumes() {
    const AGENTS: usize = 200;
    let server = TestServer::start(quiet()).await;
    let mut admin = server.admin().await;
    let mut fleet = Fleet::connect(&server, "web", AGENTS, "role=web").await;
    // One agent the selector does not match.
    let mut other = Fleet::connect(&server, "db", 1, "role=db").await;

    let run = rollout(&mut admin, "apt-get -y upgrade", "role=web", "10%", "2").await;

    // The window fills: 20 agents (10% of 200) run it, no more.
    let mut running: Vec<(String, ServerMsg)> = Vec::new();
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let (agent, task) = fleet.next().await;
        assert_eq!(task.id, run);
        assert!(seen.insert(agent.clone()), "{agent} was sent it twice");
        running.push((agent, task));
    }
    let shown = show(&mut admin, run).await.run.unwrap();
    assert_eq!((shown.targets, shown.batch, shown.running), (200, 20, 20));

    // Three failures, one at a time: each frees a slot that is refilled,
    // until the third (max_failed + 1) halts the run.
    for failure in 1..=3 {
        let (agent, task) = running.remove(0);
        fleet.ack(&agent, &task, false).await;
        if failure < 3 {
            let (agent, task) = fleet.next().await;
            assert!(seen.insert(agent.clone()), "{agent} was sent it twice");
            running.push((agent, task));
            assert!(running.len() <= 20);
        }
    }
    let halted = run_until(&admin, run, "the run halted", |r| r.state == "halted").await;
    let r = halted.run.unwrap();
    assert_eq!((r.failed, r.max_failed), (3, 2), "halted at max_failed + 1");
    // The agents already running it finish; nothing more is sent.
    for (agent, task) in running.drain(..) {
        fleet.ack(&agent, &task, true).await;
    }
    let r = run_until(&admin, run, "the running agents' acks", |r| r.acked == 19)
        .await
        .run
        .unwrap();
    assert_eq!((r.state.as_str(), r.running, r.owed), ("halted", 0, 178));
    let failed: Vec<_> = show(&mut admin, run)
        .await
        .agents
        .into_iter()
        .filter(|a| a.state == "failed")
        .collect();
    assert_eq!(failed.len(), 3);
    assert!(
        failed.iter().all(|a| a.result == "exit status 1"),
        "{failed:?}"
    );

    // Resumed, it completes with at most 20 running at any time.
    admin.resume_run(RunIdRequest { run }).await.unwrap();
    let mut done = 22;
    while done < AGENTS {
        while running.len() < 20 && done + running.len() < AGENTS {
            let (agent, task) = fleet.next().await;
            assert!(seen.insert(agent.clone()), "{agent} was sent it twice");
            running.push((agent, task));
        }
        let (agent, task) = running.remove(0);
        fleet.ack(&agent, &task, true).await;
        done += 1;
    }
    let end = run_until(&admin, run, "the run ended", |r| r.state != "running").await;
    let r = end.run.unwrap();
    assert_eq!(
        (r.state.as_str(), r.acked, r.failed, r.missed),
        ("failed", 197, 3, 0)
    );
    assert_eq!(end.agents.len(), AGENTS);
    assert!(
        other.received_nothing(),
        "the role=db agent was sent the rollout"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_any_job_runs_on_one_matching_agent_and_moves_on_after_a_failure() {
    let mut config = quiet();
    config.jobs.push(JobConfig {
        mode: JobMode::Any,
        retries: 1,
        ..job("once", "every", "366days")
    });
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let mut fleet = Fleet::connect(&server, "web", 3, "role=web").await;
    let run = run_job(&mut admin, "once").await;
    let (first, task) = fleet.next().await;
    fleet.ack(&first, &task, false).await;
    let (second, task) = fleet.next().await;
    assert_ne!(first, second, "an any run tried the failed agent again");
    fleet.ack(&second, &task, true).await;
    let end = run_until(&admin, run, "the run ended", |r| r.state != "running").await;
    let r = end.run.unwrap();
    assert_eq!((r.state.as_str(), r.acked, r.failed), ("succeeded", 1, 1));
    assert!(fleet.received_nothing(), "a third agent ran it");
    // A run's task is its run's: not cancelled or retried on its own.
    let refused = admin
        .cancel_task(contactd::proto::admin::TaskIdRequest { id: run })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("job show"), "{refused:?}");
    server.stop().await;
}

/// RELIABILITY.md's defect 7: an `any` run whose agent went away while
/// running its task (with several servers, it may have moved to another
/// one and never come back here) hands the task on after
/// `tasks.ack_timeout`, counting that agent missed, instead of waiting for
/// it until the run's timeout.
#[tokio::test]
async fn an_any_run_whose_agent_stays_away_hands_its_task_on_after_the_ack_timeout() {
    let mut config = quiet();
    config.tasks.ack_timeout = Duration::from_millis(300);
    config.jobs.push(JobConfig {
        mode: JobMode::Any,
        ..job("once", "every", "366days")
    });
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let mut fleet = Fleet::connect(&server, "web", 2, "role=web").await;
    let run = run_job(&mut admin, "once").await;
    let (first, _) = fleet.next().await;
    fleet.leave(&first);
    let (second, task) = fleet.next().await;
    assert_ne!(first, second, "sent again to the agent that left");
    fleet.ack(&second, &task, true).await;
    let end = run_until(&admin, run, "the run ended", |r| r.state != "running").await;
    let r = end.run.unwrap();
    assert_eq!(
        (r.state.as_str(), r.acked, r.failed, r.missed),
        ("succeeded", 1, 0, 1)
    );
    server.stop().await;
}

/// A job named `name` whose schedule key `key` is `value`.
pub(crate) fn job(name: &str, key: &str, value: &str) -> JobConfig {
    let text = format!("[[jobs]]\nname = \"{name}\"\ntext = \"run {name}\"\n{key} = \"{value}\"\n");
    contactd::config::parse::<Config>(&text)
        .unwrap()
        .jobs
        .remove(0)
}

#[tokio::test]
async fn jobs_added_changed_paused_and_removed_by_a_reload_apply_live() {
    let server = TestServer::start(quiet()).await;
    let mut admin = server.admin().await;
    let list = |admin: &AdminClient<Channel>| {
        let mut admin = admin.clone();
        async move {
            admin
                .list_jobs(ListJobsRequest {})
                .await
                .unwrap()
                .into_inner()
                .jobs
        }
    };
    assert!(list(&admin).await.is_empty());
    server.reload(|c| {
        c.jobs.push(JobConfig {
            mode: JobMode::Broadcast,
            ..job("tick", "every", "1s")
        });
    });
    // It fires on its own within a period or two.
    let jobs = until(
        "tick fired",
        || list(&admin),
        |jobs| jobs.first().is_some_and(|j| j.last_run != 0),
    )
    .await;
    assert_eq!(jobs[0].schedule, "every 1s");
    assert!(jobs[0].last_success_ms > 0);

    let paused = admin
        .pause_job(PauseJobRequest {
            name: "tick".into(),
            paused: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(paused.paused);
    let unknown = admin
        .run_job(JobNameRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    server.reload(|c| {
        c.jobs[0].every = Some("2h".into());
    });
    let jobs = until(
        "tick rescheduled",
        || list(&admin),
        |jobs| jobs.first().is_some_and(|j| j.schedule == "every 2h"),
    )
    .await;
    assert!(jobs[0].paused, "a reload unpaused the job");
    server.reload(|c| c.jobs.clear());
    until("tick removed", || list(&admin), Vec::is_empty).await;
    server.stop().await;
}

/// The runs of `job` the SQLite store at `path` keeps: (nominal, task id),
/// and the tasks it keeps for that job.
fn stored_runs(path: &Path, job: &str) -> (Vec<(i64, i64)>, i64) {
    let db = rusqlite::Connection::open(path).unwrap();
    let runs = db
        .prepare("SELECT nominal_ms, task_id FROM runs WHERE job = ?1 ORDER BY nominal_ms")
        .unwrap()
        .query_map([job], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<(i64, i64)>, _>>()
        .unwrap();
    let tasks: i64 = db
        .query_row("SELECT count(*) FROM tasks WHERE job = ?1", [job], |row| {
            row.get(0)
        })
        .unwrap();
    (runs, tasks)
}

/// `serve` on port `port` (0: any) with its store in `state` and a
/// broadcast job `tick` every second.
fn ticking(state: &Path, port: u16) -> Daemon {
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[tasks]\nbatch = 0\n\
         [[jobs]]\nname = \"tick\"\ntext = \"tick\"\nevery = \"1s\"\nmode = \"broadcast\"\n"
    );
    Daemon::start_with(&config, &[("STATE_DIRECTORY", state.to_str().unwrap())])
}

/// Waits until the server has fired `count` more runs of `tick`.
async fn ticks(server: &Daemon, count: u64) {
    let admin = server.admin().await;
    let last = || {
        let mut admin = admin.clone();
        async move {
            admin
                .list_jobs(ListJobsRequest {})
                .await
                .unwrap()
                .into_inner()
                .jobs
                .first()
                .map_or(0, |j| j.last_run)
        }
    };
    let first = until("tick's first run here", last, |run| *run != 0).await;
    // Run ids are task ids; with nothing else published, consecutive.
    until("more runs of tick", last, |run| *run >= first + count).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_once_per_period_across_a_restart_and_a_sigkill() {
    let state = tempfile::tempdir().unwrap();
    let db = state.path().join("contactd.db");
    let mut server = ticking(state.path(), 0);
    ticks(&server, 2).await;
    server.signal(Signal::SIGTERM);
    server.wait_exit(LIMIT);
    let mut server = ticking(state.path(), 0);
    ticks(&server, 2).await;
    server.signal(Signal::SIGKILL);
    server.wait_exit(LIMIT);
    // Down for over two periods: one catch-up run, the rest skipped and
    // logged.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut server = ticking(state.path(), 0);
    let line = server.wait_for_line("job runs skipped");
    ticks(&server, 1).await;
    server.signal(Signal::SIGTERM);
    server.wait_exit(LIMIT);

    let (runs, tasks) = stored_runs(&db, "tick");
    assert_eq!(tasks, runs.len() as i64, "a run without its task, or twice");
    let nominals: Vec<i64> = runs.iter().map(|(n, _)| *n).collect();
    let unique: HashSet<i64> = nominals.iter().copied().collect();
    assert_eq!(
        unique.len(),
        nominals.len(),
        "a period fired twice: {nominals:?}"
    );
    assert!(nominals.iter().all(|n| n % 1000 == 0), "{nominals:?}");
    // Every gap between two runs is a restart: the SIGKILL's is logged.
    let gaps: Vec<i64> = nominals
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|gap| *gap > 1000)
        .collect();
    assert!(
        !gaps.is_empty() && gaps.len() <= 2,
        "{gaps:?} in {nominals:?}"
    );
    let skipped = common::daemon::field(&line, "count");
    assert!(
        skipped.parse::<i64>().unwrap() >= 1,
        "skipped runs not counted: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_resumes_after_a_sigkill_and_no_agent_runs_it_twice() {
    const AGENTS: usize = 12;
    let state = tempfile::tempdir().unwrap();
    let start = |port: u16| {
        let config = format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[tasks]\nbatch = 0\n");
        Daemon::start_with(
            &config,
            &[("STATE_DIRECTORY", state.path().to_str().unwrap())],
        )
    };
    let mut server = start(0);
    let port = server.addr.port();
    let mut agents: Vec<TestAgent> = (0..AGENTS)
        .map(|n| {
            let mut config = agent_config(server.addr, &format!("web-{n:02}"));
            config.labels = contactd::labels::Labels::from_header("role=web").unwrap();
            config.handler = vec!["sh".into(), "-c".into(), "sleep 0.2".into()];
            TestAgent::start(config)
        })
        .collect();
    for agent in &mut agents {
        agent.wait_for("connected", connected).await;
    }
    let mut admin = server.admin().await;
    let connected_agents = until(
        "every agent subscribed",
        || {
            let mut admin = admin.clone();
            async move { common::agents(&mut admin).await }
        },
        |listed| listed.iter().filter(|a| a.connected).count() == AGENTS,
    )
    .await;
    assert_eq!(connected_agents.len(), AGENTS);
    let run = rollout(&mut admin, "deploy", "role=web", "3", "").await;
    run_until(&admin, run, "some agents acked", |r| r.acked >= 4).await;
    server.signal(Signal::SIGKILL);
    server.wait_exit(LIMIT);

    let server = start(port);
    let admin = server.admin().await;
    let end = within_run_end(&admin, run).await;
    let r = end.run.unwrap();
    assert_eq!(
        (r.state.as_str(), r.acked, r.failed, r.missed),
        ("succeeded", AGENTS as u32, 0, 0),
        "{:?}",
        end.agents
    );
    // Each agent's handler ran the task once: a resend after the restart
    // was answered from the agent's memory.
    for mut agent in agents {
        let mut runs = 0;
        while let Ok(event) = agent.events.try_recv() {
            if handled(&event).is_some_and(|(id, outcome)| id == run && outcome == Outcome::Ok) {
                runs += 1;
            }
        }
        assert_eq!(runs, 1, "an agent ran the rollout {runs} times");
        agent.stop().await;
    }
}

async fn within_run_end(admin: &AdminClient<Channel>, run: u64) -> ShowRunResponse {
    run_until(admin, run, "the run ended", |r| r.state != "running").await
}

#[tokio::test]
async fn the_job_commands_list_run_show_pause_and_resume() {
    let config = "[tasks]\nbatch = 0\n\
                  [[jobs]]\nname = \"nightly\"\ntext = \"echo nightly\"\n\
                  cron = \"0 3 * * *\"\ntime_zone = \"Europe/Berlin\"\ntarget = \"role=web\"\n\
                  rollout = { batch = \"50%\", max_failed = 0 }\n";
    let server = Daemon::start(config);
    let path = server.config_path();
    // The command blocks: off the runtime, which runs the agent.
    let ctl = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let path = path.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                common::contactd()
                    .args(&args)
                    .arg("-c")
                    .arg(&path)
                    .output()
                    .unwrap()
            });
            let out = within("the command", out).await.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, out, _) = ctl(&["jobs"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("nightly") && out.contains("cron 0 3 * * * Europe/Berlin"),
        "{out}"
    );
    assert!(out.contains("role=web") && out.contains("active"), "{out}");
    let (_, json, _) = ctl(&["jobs", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let next = listed["jobs"][0]["next_ms"].as_i64().unwrap();
    // The next 03:00 in Berlin is 01:00 or 02:00 UTC.
    let hour = (next / 3_600_000) % 24;
    assert!(
        hour == 1 || hour == 2,
        "next run at {next} (UTC hour {hour})"
    );

    // Run now, with one agent: it succeeds.
    let mut web = {
        let mut config = agent_config(server.addr, "web1");
        config.labels = contactd::labels::Labels::from_header("role=web").unwrap();
        // The task's text is the script: `exit 1` fails.
        config.handler = vec!["sh".into()];
        TestAgent::start(config)
    };
    web.wait_for("connected", connected).await;
    let (code, out, err) = ctl(&["job", "run", "nightly", "--wait"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("succeeded"), "{out}");
    let run: u64 = out
        .split_whitespace()
        .nth(2)
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no run id in {out}"));
    let (code, out, _) = ctl(&["job", "show", &run.to_string()]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("web1") && out.contains("acked"), "{out}");
    let (_, json, _) = ctl(&["job", "show", &run.to_string(), "--json"]).await;
    let shown: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(shown["run"]["state"], "succeeded");
    assert_eq!(shown["agents"][0]["agent"], "web1");

    assert_eq!(ctl(&["job", "pause", "nightly"]).await.0, Some(0));
    assert!(ctl(&["jobs"]).await.1.contains("paused"));
    assert_eq!(ctl(&["job", "resume", "nightly"]).await.0, Some(0));
    assert!(ctl(&["jobs"]).await.1.contains("active"));
    let (code, _, err) = ctl(&["job", "resume", &run.to_string()]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("only a halted run can be resumed"), "{err}");
    let (code, _, err) = ctl(&["job", "show", "999999"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no run 999999"), "{err}");

    // An ad hoc rollout whose only agent fails halts (max_failed 0), and
    // the command says so and exits 1.
    let (code, out, _) = ctl(&[
        "task",
        "submit",
        "exit 1",
        "--target",
        "role=web",
        "--batch",
        "1",
        "--max-failed",
        "0",
    ])
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("halted") || out.contains("failed"), "{out}");
    let (code, _, err) = ctl(&["task", "submit", "x", "--batch", "1"]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("--target"), "{err}");

    // A rollout whose agent is still running it is halted by hand, and
    // only a running rollout can be: a second halt is refused.
    let mut admin = server.admin().await;
    let run = rollout(&mut admin, "sleep 30", "role=web", "1", "").await;
    run_until(&admin, run, "the rollout's agent running it", |r| {
        r.running == 1
    })
    .await;
    let (code, out, err) = ctl(&["job", "halt", &run.to_string()]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("halted"), "{out}");
    let (_, json, _) = ctl(&["job", "show", &run.to_string(), "--json"]).await;
    let shown: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(shown["run"]["state"], "halted");
    let (code, _, err) = ctl(&["job", "halt", &run.to_string()]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("only a running rollout (mode each) can be halted"),
        "{err}"
    );
    let (code, _, err) = ctl(&["job", "halt", "999999"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no run 999999"), "{err}");
    web.stop().await;
}

#[tokio::test]
async fn an_agent_that_fails_is_sent_it_again_and_one_that_never_answers_is_missed() {
    let mut config = quiet();
    config.jobs.push(JobConfig {
        retries: 1,
        timeout: Duration::from_secs(2),
        ..job("flaky", "every", "366days")
    });
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let mut fleet = Fleet::connect(&server, "web", 2, "role=web").await;
    let run = run_job(&mut admin, "flaky").await;
    let mut first = HashMap::new();
    for _ in 0..2 {
        let (agent, task) = fleet.next().await;
        assert_eq!(task.retry, 0);
        first.insert(agent, task);
    }
    // web-000 fails and is sent it again, as a retry (so an agent that
    // remembers the first try runs it again); web-001 never answers.
    fleet.ack("web-000", &first["web-000"], false).await;
    let (agent, again) = fleet.next().await;
    assert_eq!((agent.as_str(), again.id, again.retry), ("web-000", run, 1));
    fleet.ack("web-000", &again, true).await;
    let end = run_until(&admin, run, "the run timed out", |r| r.state != "running").await;
    let r = end.run.unwrap();
    assert_eq!(
        (r.state.as_str(), r.acked, r.failed, r.missed),
        ("timed_out", 1, 0, 1)
    );
    let states: Vec<(String, String, u32)> = end
        .agents
        .into_iter()
        .map(|a| (a.agent, a.state, a.tries))
        .collect();
    assert_eq!(
        states,
        [
            ("web-000".into(), "acked".into(), 2),
            ("web-001".into(), "missed".into(), 1)
        ]
    );
    // A late answer changes nothing.
    fleet.ack("web-001", &first["web-001"], true).await;
    let r = show(&mut admin, run).await.run.unwrap();
    assert_eq!((r.state.as_str(), r.missed), ("timed_out", 1));
    server.stop().await;
}

/// CPU time (user + system) process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn the_scheduler_sleeps_between_fires_when_the_lease_cannot_move() {
    // SQLite (the default store): nothing moves the generator lease, whose
    // watch channel is closed from the start. Awaiting it made the
    // scheduler's loop spin: 60-100 % of a core with or without jobs.
    let mut config = String::from("[tasks]\nbatch = 0\n");
    for n in 0..10 {
        config.push_str(&format!(
            "[[jobs]]\nname = \"tick-{n}\"\ntext = \"true\"\nevery = \"1s\"\nmode = \"broadcast\"\n"
        ));
    }
    let server = Daemon::start(&config);
    let pid = server.process.child.id();
    let before = cpu_ticks(pid);
    // The measurement window itself, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    // 100 ticks per CPU-second: the spin used 120 to 200 of these 200.
    assert!(
        used < 40,
        "the server used {used} CPU ticks in 2 s with 10 jobs and no agent"
    );
}

/// Found by the soak (RELIABILITY.md): a run that matched no connected agent
/// ended as failed, but its task stayed `pending` for ever (nothing would
/// ever send it, and `contactd tasks --state pending` listed it).
#[tokio::test]
async fn a_run_that_matches_no_agent_fails_and_so_does_its_task() {
    let server = TestServer::start(quiet()).await;
    let mut admin = server.admin().await;
    let run = rollout(&mut admin, "nobody", "role=none", "1", "").await;
    let end = run_until(&admin, run, "the run ended", |r| r.state != "running").await;
    assert_eq!(end.run.unwrap().state, "failed");
    let shown = admin
        .show_task(TaskIdRequest { id: run })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shown.task.unwrap().state,
        TaskState::Failed as i32,
        "its task is failed too, not left pending"
    );
    server.stop().await;
}

#[tokio::test]
async fn with_the_memory_store_an_ended_run_is_still_shown() {
    let mut config = quiet();
    config.store.kind = contactd::config::StoreKind::Memory;
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let mut fleet = Fleet::connect(&server, "web", 1, "role=web").await;
    let run = rollout(&mut admin, "once", "role=web", "1", "").await;
    let (agent, task) = fleet.next().await;
    fleet.ack(&agent, &task, true).await;
    let end = run_until(&admin, run, "the run ended", |r| r.state != "running").await;
    let r = end.run.unwrap();
    assert_eq!((r.state.as_str(), r.acked), ("succeeded", 1));
    assert_eq!(end.agents.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_queue_mode_a_run_restored_after_a_restart_is_still_its_runs_to_send() {
    let store = tempfile::tempdir().unwrap();
    let mut config = quiet();
    config.tasks.mode = contactd::config::DeliveryMode::Queue;
    config.store.path = Some(store.path().join("contactd.db"));
    let server = TestServer::start(config.clone()).await;
    let mut admin = server.admin().await;
    let mut web = Fleet::connect(&server, "web", 1, "role=web").await;
    let run = rollout(&mut admin, "deploy", "role=web", "1", "").await;
    let (_, task) = web.next().await;
    assert_eq!(task.id, run);
    // Stopped before the agent answers: the run is restored at the start.
    server.stop().await;
    drop(web);

    let server = TestServer::start(config).await;
    let admin = server.admin().await;
    // Another agent first: the queue must not hand it the run's task.
    let mut db = Fleet::connect(&server, "db", 1, "role=db").await;
    let mut web = Fleet::connect(&server, "web", 1, "role=web").await;
    let (agent, again) = web.next().await;
    assert_eq!((agent.as_str(), again.id, again.retry), ("web-000", run, 0));
    web.ack(&agent, &again, true).await;
    let end = run_until(&admin, run, "the run ended", |r| r.state != "running").await;
    assert_eq!(end.run.unwrap().state, "succeeded");
    assert!(
        db.received_nothing(),
        "the queue handed the run's task to an agent it was not for"
    );
    server.stop().await;
}
