//! Operator commands that need the task store's history: `contactd task
//! show`, `task cancel` and `task retry`, run as the real binary against a
//! real server with real agents running real handlers, and read again after
//! a restart on the same SQLite store.

use crate::common;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use common::{
    LIMIT, TestServer,
    daemon::Daemon,
    fleet::{TestAgent, agent_config, connected, handled},
    submit, within,
};
use contactd::{
    agent::EventKind,
    config::Config,
    proto::{
        admin::{
            AgentTaskState, ListTasksRequest, ShowTaskResponse, TaskIdRequest,
            admin_client::AdminClient,
        },
        contact::Outcome,
    },
};
use nix::sys::signal::Signal;
use serde_json::Value;
use tonic::transport::Channel;

/// `contactd ARGS --socket SOCKET`.
fn ctl(socket: &Path, args: &[&str]) -> Output {
    common::contactd()
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("run contactd")
}

/// `contactd ARGS --json --socket SOCKET`, which must succeed.
fn ctl_json(socket: &Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = ctl(socket, &args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Every `NAME_ms` of a `--json` object has `NAME_at` beside it: the same
/// time in RFC 3339 (UTC, milliseconds), or null for 0 ("never").
fn assert_times(object: &Value) {
    let fields = object.as_object().expect("an object");
    let mut times = 0;
    for (key, ms) in fields {
        let Some(name) = key.strip_suffix("_ms") else {
            continue;
        };
        let at = &fields[&format!("{name}_at")];
        let ms = ms.as_i64().expect("milliseconds");
        times += 1;
        if ms == 0 {
            assert!(at.is_null(), "{key} = 0 but {name}_at = {at}");
            continue;
        }
        let text = at.as_str().unwrap_or_else(|| panic!("{name}_at = {at}"));
        assert!(text.ends_with('Z') && text.len() == 24, "{text}");
        let parsed = humantime::parse_rfc3339(text).unwrap();
        let parsed_ms = parsed
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert_eq!(i64::try_from(parsed_ms).unwrap(), ms, "{key} vs {text}");
    }
    assert!(times > 0, "no time in {object}");
}

/// `contactd ARGS --socket SOCKET`, which must fail (exit 1) saying `needle`.
fn ctl_refused(socket: &Path, args: &[&str], needle: &str) {
    let out = ctl(socket, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

/// The rows of `contactd task show --json` as (agent, state, result).
fn agent_rows(shown: &Value) -> Vec<(String, String, String)> {
    shown["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap().to_owned();
            (s("agent"), s("state"), s("result"))
        })
        .collect()
}

async fn show(admin: &mut AdminClient<Channel>, id: u64) -> ShowTaskResponse {
    admin
        .show_task(TaskIdRequest { id })
        .await
        .unwrap()
        .into_inner()
}

/// Waits (bounded) until `ShowTask` of `id` satisfies `done`.
async fn shown_until(
    admin: &mut AdminClient<Channel>,
    id: u64,
    what: &str,
    done: impl Fn(&ShowTaskResponse) -> bool,
) -> ShowTaskResponse {
    within(what, async {
        loop {
            let shown = show(admin, id).await;
            if done(&shown) {
                return shown;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn agent_state(shown: &ShowTaskResponse, agent: &str) -> Option<AgentTaskState> {
    shown
        .agents
        .iter()
        .find(|a| a.agent == agent)
        .map(|a| a.state())
}

/// An agent running `sh -c SCRIPT ARGS...`, one task at a time (so it
/// handles tasks in the order it received them).
fn agent_running(
    server: std::net::SocketAddr,
    name: &str,
    script: &str,
    args: &[&Path],
) -> TestAgent {
    let mut config = agent_config(server, name);
    config.handler = ["sh", "-c", script].map(String::from).to_vec();
    config
        .handler
        .extend(args.iter().map(|p| p.to_str().unwrap().to_owned()));
    config.handler_concurrency = 1;
    TestAgent::start(config)
}

/// Waits until the agent has handled `id`, returning the other tasks it
/// handled first (in order) and how `id` went.
async fn handled_up_to(agent: &mut TestAgent, id: u64) -> (Vec<u64>, Outcome) {
    let mut before = Vec::new();
    loop {
        let (task, outcome) = agent.wait_for("a handled task", handled).await;
        if task == id {
            return (before, outcome);
        }
        before.push(task);
    }
}

/// Runs until `path` exists: a handler that holds its task until the test
/// lets it go.
const HOLD: &str = "while [ ! -e \"$0\" ]; do sleep 0.02; done; echo released";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_show_has_a_row_per_agent_and_a_cancelled_task_is_never_sent() {
    let mut config = Config::default();
    config.tasks.batch = 0;
    let server = TestServer::start(config).await;
    let socket = server.admin_socket();
    let mut admin = server.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let mut ok = agent_running(server.addr, "ok", "echo ran: $(cat)", &[]);
    let mut bad = agent_running(server.addr, "bad", "echo broke: $(cat); exit 3", &[]);
    let mut slow = agent_running(server.addr, "slow", HOLD, &[&release]);
    let mut away = agent_running(server.addr, "away", "cat", &[]);
    for agent in [&mut ok, &mut bad, &mut slow, &mut away] {
        agent.wait_for("connected", connected).await;
    }
    away.stop().await;

    let task = submit(&mut admin, "uptime", "").await;
    assert_eq!(
        ok.wait_for("ok handled", handled).await,
        (task, Outcome::Ok)
    );
    assert_eq!(
        bad.wait_for("bad handled", handled).await,
        (task, Outcome::Failed)
    );
    shown_until(&mut admin, task, "both results and the delivery", |s| {
        agent_state(s, "ok") == Some(AgentTaskState::Acked)
            && agent_state(s, "bad") == Some(AgentTaskState::Failed)
            && agent_state(s, "slow") == Some(AgentTaskState::Delivered)
    })
    .await;
    let shown = ctl_json(&socket, &["task", "show", &task.to_string()]);
    assert_eq!(shown["mode"], "broadcast");
    assert_eq!(shown["task"]["text"], "uptime");
    let rows = agent_rows(&shown);
    let states: Vec<(&str, &str)> = rows
        .iter()
        .map(|(agent, state, _)| (agent.as_str(), state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("away", "owed"),
            ("bad", "failed"),
            ("ok", "acked"),
            ("slow", "delivered")
        ],
        "{shown}"
    );
    assert!(rows[1].2.contains("broke: uptime"), "{shown}");
    assert_eq!(rows[2].2, "ok");
    let table =
        String::from_utf8(ctl(&socket, &["task", "show", &task.to_string()]).stdout).unwrap();
    assert!(table.starts_with("ID  STATE"), "{table}");
    assert!(table.contains("\nAGENT  STATE"), "{table}");

    // Finished for an agent: not cancelled; never retried in broadcast mode.
    std::fs::write(&release, "").unwrap();
    assert_eq!(
        slow.wait_for("slow handled", handled).await,
        (task, Outcome::Ok)
    );
    // (Acked or failed: the first of ok's and bad's acks decides.)
    ctl_refused(
        &socket,
        &["task", "cancel", &task.to_string()],
        "only a pending or delivered task can be cancelled",
    );
    ctl_refused(
        &socket,
        &["task", "retry", &task.to_string()],
        "only queue mode retries tasks",
    );
    ctl_refused(&socket, &["task", "show", "999"], "no task 999");

    // Submitted while no agent is connected, then cancelled: an agent that
    // comes back gets what it is owed, before and after, but not that.
    for agent in [ok, bad, slow] {
        agent.stop().await;
    }
    let cancelled = submit(&mut admin, "never run", "").await;
    let reply = ctl_json(&socket, &["task", "cancel", &cancelled.to_string()]);
    assert_eq!(reply["task"]["state"], "cancelled");
    ctl_refused(
        &socket,
        &["task", "cancel", &cancelled.to_string()],
        "is cancelled",
    );
    let later = submit(&mut admin, "after the cancel", "").await;
    let mut away = agent_running(server.addr, "away", "cat", &[]);
    let (before, outcome) = handled_up_to(&mut away, later).await;
    assert_eq!(outcome, Outcome::Ok);
    assert_eq!(
        before,
        [task],
        "owed the first task, never the cancelled one"
    );

    let shown = shown_until(&mut admin, later, "the later task acked", |s| {
        agent_state(s, "away") == Some(AgentTaskState::Acked)
    })
    .await;
    assert_eq!(shown.task.unwrap().acked, 1);
    let shown = ctl_json(&socket, &["task", "show", &later.to_string()]);
    assert_times(&shown["task"]);
    for row in shown["agents"].as_array().unwrap() {
        assert_times(row);
        if row["agent"] == "away" {
            assert!(row["result_at"].is_string(), "{row}");
        }
    }
    let agents = ctl_json(&socket, &["agents"]);
    let row = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "away")
        .unwrap_or_else(|| panic!("no agent away in {agents}"));
    assert_times(row);
    assert!(row["connected_since_at"].is_string(), "{row}");
    let shown = ctl_json(&socket, &["task", "show", &cancelled.to_string()]);
    assert_eq!(shown["task"]["state"], "cancelled");
    let rows = agent_rows(&shown);
    assert!(
        rows.iter().all(|(_, state, _)| state == "cancelled") && rows.len() == 4,
        "{shown}"
    );
    let listed = admin
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.cancelled_acks, 0);
    away.stop().await;
    server.stop().await;
}

/// A server on `port` (0: any) in queue mode, its store in `state` (the
/// same directory across restarts).
fn queue_daemon(state: &Path, port: u16) -> Daemon {
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[tasks]\nbatch = 0\nmode = \"queue\"\n\
         ack_timeout = \"60s\"\n"
    );
    Daemon::start_with(&config, &[("STATE_DIRECTORY", state.to_str().unwrap())])
}

async fn admin_of(daemon: &Daemon) -> AdminClient<Channel> {
    within(
        "admin connect",
        contactd::client::admin::connect(&daemon.dir.path().join("admin.sock")),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_retry_runs_a_failed_task_again_and_cancels_survive_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let mut daemon = queue_daemon(state.path(), 0);
    let socket: PathBuf = daemon.dir.path().join("admin.sock");
    let mut admin = admin_of(&daemon).await;
    let (fixed, release): (PathBuf, PathBuf) =
        (state.path().join("fixed"), state.path().join("release"));
    // Fails until `fixed` exists; a task "hold" waits for `release` first.
    let script = "task=$(cat); if [ \"$task\" = hold ]; then while [ ! -e \"$1\" ]; do \
                  sleep 0.02; done; fi; test -e \"$0\" || { echo not yet; exit 1; }; echo fixed";
    let mut worker = agent_running(daemon.addr, "w", script, &[&fixed, &release]);
    worker.wait_for("connected", connected).await;

    // Fails: then retried, it runs again (not acked from the agent's memory).
    let flaky = submit(&mut admin, "flaky", "").await;
    assert_eq!(handled_up_to(&mut worker, flaky).await.1, Outcome::Failed);
    let shown = shown_until(&mut admin, flaky, "the failure", |s| {
        agent_state(s, "w") == Some(AgentTaskState::Failed)
    })
    .await;
    assert_eq!((shown.attempts, shown.retries), (1, 0));
    let id = flaky.to_string();
    let shown = ctl_json(&socket, &["task", "show", &id]);
    assert_eq!(shown["task"]["state"], "failed");
    assert!(agent_rows(&shown)[0].2.contains("not yet"), "{shown}");
    std::fs::write(&fixed, "").unwrap();
    let reply = ctl_json(&socket, &["task", "retry", &id]);
    assert_eq!(reply["task"]["id"], flaky);
    assert_ne!(reply["task"]["state"], "failed");
    let ran_again = worker
        .wait_for("the retried task", |event| match event.kind {
            EventKind::Handled { task_id, outcome } if task_id == flaky => Some(outcome),
            EventKind::Reacked { task_id } if task_id == flaky => {
                panic!("the retried task was acked from memory, not run")
            }
            _ => None,
        })
        .await;
    assert_eq!(ran_again, Outcome::Ok);
    shown_until(&mut admin, flaky, "the retried task acked", |s| {
        agent_state(s, "w") == Some(AgentTaskState::Acked)
    })
    .await;
    let shown = ctl_json(&socket, &["task", "show", &id]);
    assert_eq!(shown["task"]["state"], "acked");
    assert_eq!(
        (shown["attempts"].as_u64(), shown["retries"].as_u64()),
        (Some(1), Some(1))
    );
    ctl_refused(
        &socket,
        &["task", "retry", &id],
        &format!("task {flaky} is acked: only a failed or dead task can be retried"),
    );

    // Cancelled while the agent runs it: the agent finishes, its ack is
    // ignored (and counted), and the task stays cancelled.
    let held = submit(&mut admin, "hold", "").await;
    let shown = shown_until(&mut admin, held, "the task in flight", |s| {
        agent_state(s, "w") == Some(AgentTaskState::Delivered)
    })
    .await;
    assert!(shown.agents[0].deadline_ms > 0, "{shown:?}");
    let reply = ctl_json(&socket, &["task", "cancel", &held.to_string()]);
    assert_eq!(reply["task"]["state"], "cancelled");
    std::fs::write(&release, "").unwrap();
    assert_eq!(handled_up_to(&mut worker, held).await.1, Outcome::Ok);
    within("the ignored ack counted", async {
        loop {
            let listed = admin
                .list_tasks(ListTasksRequest::default())
                .await
                .unwrap()
                .into_inner();
            if listed.cancelled_acks == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    worker.stop().await;
    // Until the server has seen w's stream end, a task submitted now could
    // still be sent into it: w would then hold it (its claim kept, as for
    // any agent whose connection ends) and it would not be pending.
    within("w seen gone", async {
        while common::agent(&mut admin, "w").await.connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Cancelled while pending: never handled, though a later task is.
    let pending = submit(&mut admin, "pending", "").await;
    let reply = ctl_json(&socket, &["task", "cancel", &pending.to_string()]);
    assert_eq!(reply["task"]["state"], "cancelled");
    let later = submit(&mut admin, "later", "").await;
    let mut worker = agent_running(daemon.addr, "w", script, &[&fixed, &release]);
    let (before, outcome) = handled_up_to(&mut worker, later).await;
    assert_eq!(
        (before, outcome),
        (vec![], Outcome::Ok),
        "the cancelled task was not sent"
    );
    shown_until(&mut admin, later, "the later task acked", |s| {
        agent_state(s, "w") == Some(AgentTaskState::Acked)
    })
    .await;
    worker.stop().await;

    // A restart on the same database: the history is all still there.
    let port = daemon.addr.port();
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(LIMIT).success());
    let daemon = queue_daemon(state.path(), port);
    let socket = daemon.dir.path().join("admin.sock");
    let states = |id: u64| {
        let shown = ctl_json(&socket, &["task", "show", &id.to_string()]);
        let rows: Vec<(String, String)> = agent_rows(&shown)
            .into_iter()
            .map(|(agent, state, _)| (agent, state))
            .collect();
        (shown["task"]["state"].as_str().unwrap().to_owned(), rows)
    };
    let w = |state: &str| vec![("w".to_owned(), state.to_owned())];
    assert_eq!(states(flaky), ("acked".to_owned(), w("acked")));
    assert_eq!(
        states(held),
        ("cancelled".to_owned(), w("delivered")),
        "who held it when it was cancelled"
    );
    assert_eq!(states(pending), ("cancelled".to_owned(), vec![]));
    assert_eq!(states(later), ("acked".to_owned(), w("acked")));
    let shown = ctl_json(&socket, &["task", "show", &flaky.to_string()]);
    assert_eq!(shown["retries"], 1);
    let listed: Value = ctl_json(&socket, &["tasks", "--state", "cancelled"]);
    let ids: HashSet<u64> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, HashSet::from([held, pending]));
    ctl_refused(&socket, &["task", "cancel", "999"], "no task 999");
}
