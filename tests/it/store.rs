//! The task store: what the real server keeps across a SIGKILL,
//! a restart, churn of anonymous callers, and files it must not touch.

use crate::common;

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{
    LIMIT, TestServer,
    daemon::Daemon,
    fleet::{TestAgent, agent_config, connected, handled},
    submit, within, within_for,
};
use contactd::{
    config::{Config, DeliveryMode},
    proto::{
        admin::{ListTasksRequest, SubmitTaskRequest, TaskState, admin_client::AdminClient},
        contact::{ClientMsg, contact_client::ContactClient},
    },
};
use nix::sys::signal::Signal;
use tonic::transport::Channel;

/// A server on `port` (0: any) with its store in `state` (the same
/// directory across restarts, as systemd's StateDirectory=), or as
/// `store` says (a `[store]` section, or nothing for SQLite in `state`).
fn daemon(state: &Path, port: u16, tasks: &str, store: &str) -> Daemon {
    let config =
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[tasks]\nbatch = 0\n{tasks}\n{store}");
    Daemon::start_with(&config, &[("STATE_DIRECTORY", state.to_str().unwrap())])
}

async fn admin(daemon: &Daemon) -> AdminClient<Channel> {
    let socket = daemon.dir.path().join("admin.sock");
    within("admin connect", contactd::client::admin::connect(&socket))
        .await
        .unwrap()
}

async fn list(
    admin: &mut AdminClient<Channel>,
    state: TaskState,
) -> Vec<contactd::proto::admin::Task> {
    let request = ListTasksRequest {
        state: state as i32,
        limit: 0,
        after_id: 0,
    };
    admin.list_tasks(request).await.unwrap().into_inner().tasks
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits (bounded) until `path` has at least `count` lines.
async fn wait_for_lines(path: &Path, count: usize) {
    within_for(5 * LIMIT, "handled tasks", async {
        while lines(path).len() < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_mode_after_a_sigkill_every_task_is_handled_exactly_once() {
    after_a_sigkill_every_task_is_handled_exactly_once("").await;
}

/// The queue-mode SIGKILL test with the store `store` names (a `[store]`
/// section; empty: SQLite).
pub async fn after_a_sigkill_every_task_is_handled_exactly_once(store: &str) {
    const TASKS: usize = 500;
    let state = tempfile::tempdir().unwrap();
    let queue = "mode = \"queue\"\nwindow = 4\nack_timeout = \"30s\"\n";
    let mut server = daemon(state.path(), 0, queue, store);
    let port = server.addr.port();
    let mut admin_client = admin(&server).await;
    for i in 0..TASKS {
        submit(&mut admin_client, &format!("job-{i}"), "").await;
    }
    // Each handler appends its task's text to one file (one write per line).
    let record: PathBuf = state.path().join("handled.txt");
    let agents: Vec<TestAgent> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let mut config = agent_config(server.addr, name);
            config.handler = vec![
                "sh".into(),
                "-c".into(),
                "sleep 0.01; printf '%s\\n' \"$(cat)\" >> \"$0\"".into(),
                record.to_str().unwrap().into(),
            ];
            config.handler_concurrency = 4;
            TestAgent::start(config)
        })
        .collect();

    // Tasks acked a while before the kill are acked after it.
    wait_for_lines(&record, 100).await;
    let acked_before: HashSet<u64> = list(&mut admin_client, TaskState::Acked)
        .await
        .iter()
        .map(|t| t.id)
        .collect();
    assert!(!acked_before.is_empty());
    wait_for_lines(&record, 250).await;
    server.signal(Signal::SIGKILL);
    server.wait_exit(LIMIT);
    let at_kill = lines(&record).len();
    assert!(at_kill < TASKS, "the kill came too late to test anything");

    let restarted = daemon(state.path(), port, queue, store);
    let mut admin_client = admin(&restarted).await;
    let acked_after: HashSet<u64> = list(&mut admin_client, TaskState::Acked)
        .await
        .iter()
        .map(|t| t.id)
        .collect();
    assert!(
        acked_before.is_subset(&acked_after),
        "acked before the kill, not after: {:?}",
        acked_before.difference(&acked_after).collect::<Vec<_>>()
    );
    // Hundreds of handler processes: bounded, generously.
    within_for(5 * LIMIT, "every task acked", async {
        while list(&mut admin_client, TaskState::Acked).await.len() < TASKS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for agent in agents {
        agent.stop().await;
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in lines(&record) {
        *counts.entry(line).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert_eq!(counts.len(), TASKS, "every task handled");
    let all = list(&mut admin_client, TaskState::Unspecified).await;
    common::assert_each_acked_once(&all);
    // Ids never repeat: the next task's id is above every earlier one.
    let next = submit(&mut admin_client, "after the restart", "").await;
    assert_eq!(next, TASKS as u64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_agent_away_across_a_restart_gets_what_it_missed_not_what_it_acked() {
    away_across_a_restart_gets_what_it_missed_not_what_it_acked("").await;
}

/// The broadcast restart test with the store `store` names.
pub async fn away_across_a_restart_gets_what_it_missed_not_what_it_acked(store: &str) {
    let state = tempfile::tempdir().unwrap();
    let mut server = daemon(state.path(), 0, "", store);
    let addr = server.addr;
    let mut admin_client = admin(&server).await;
    let mut agent = TestAgent::start(agent_config(addr, "web1"));
    agent.wait_for("connected", connected).await;
    for i in 1..=3 {
        submit(&mut admin_client, &format!("before {i}"), "").await;
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(agent.wait_for("a handled task", handled).await.0);
    }
    within("3 acks", async {
        while list(&mut admin_client, TaskState::Acked).await.len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    agent.stop().await;
    // Until the server has seen web1's stream end, a task submitted now
    // could still be sent into it (and counted delivered).
    within("web1 seen gone", async {
        while common::agent(&mut admin_client, "web1").await.connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for i in 4..=5 {
        submit(&mut admin_client, &format!("missed {i}"), "").await;
    }
    // A clean stop (systemctl restart): what was acked is committed.
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(LIMIT).success());

    let restarted = daemon(state.path(), addr.port(), "", store);
    let mut admin_client = admin(&restarted).await;
    // The roster came back: web1, away, with what it did before.
    let agents = common::agents(&mut admin_client).await;
    let [web1] = &agents[..] else {
        panic!("the roster is web1 alone: {agents:?}")
    };
    assert_eq!(
        (
            &*web1.name,
            web1.named,
            web1.connected,
            web1.delivered,
            web1.acked
        ),
        ("web1", true, false, 3, 3)
    );
    assert!(0 < web1.first_seen_ms && web1.first_seen_ms <= web1.last_seen_ms);
    assert_eq!(submit(&mut admin_client, "after 6", "").await, 6);
    // A new agent process under the same name: it remembers nothing, so
    // anything sent again would be handled again.
    let mut agent = TestAgent::start(agent_config(addr, "web1"));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(agent.wait_for("a handled task", handled).await.0);
    }
    // (The agent runs handlers side by side: they may finish in any order.)
    got.sort_unstable();
    assert_eq!(got, [4, 5, 6], "resumed after its acks (1..=3)");
    agent.stop().await;
}

/// Connections of seed clients in the churn test (the figure):
/// 1,000 times its registry's bound (`server.max_callers = 10`). About 5 s
/// of a debug build on 2 quiet cores.
const ANONYMOUS_CONNECTIONS: usize = 10_000;

async fn anonymous_status(addr: SocketAddr) {
    // A new connection: a new caller (keyed by its address).
    let channel = within(
        "connect",
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let mut client = ContactClient::new(channel);
    let message = ClientMsg { msg: "seed".into() };
    within(
        "sendStatus",
        client.send_status(tokio_stream::iter([message])),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_callers_do_not_evict_a_named_agents_acks() {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.server.max_callers = 10;
    let server = TestServer::start(config).await;
    let mut admin_client = server.admin().await;
    let mut agent = TestAgent::start(agent_config(server.addr, "web1"));
    agent.wait_for("connected", connected).await;
    submit(&mut admin_client, "one", "").await;
    submit(&mut admin_client, "two", "").await;
    for _ in 0..2 {
        agent.wait_for("a handled task", handled).await;
    }
    within("2 acks", async {
        while list(&mut admin_client, TaskState::Acked).await.len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    agent.stop().await;
    // 1,000 times more anonymous connections than the registry holds (each
    // from a new port, as seed clients reconnect), 100 at a time.
    let mut calls = tokio::task::JoinSet::new();
    // Bounded only against a hang (each connection has its own bound): a
    // CI machine 50 times slower than a quiet one still gets through.
    within_for(20 * LIMIT, "the anonymous connections", async {
        for _ in 0..ANONYMOUS_CONNECTIONS {
            if calls.len() >= 100 {
                calls.join_next().await.unwrap().unwrap();
            }
            calls.spawn(anonymous_status(server.addr));
        }
        while let Some(call) = calls.join_next().await {
            call.unwrap();
        }
    })
    .await;
    // Seed clients are known by IP: one entry for all of them, and web1's
    // (disconnected, the longest idle) was not evicted to make room.
    let agents = common::agents(&mut admin_client).await;
    let names: Vec<(&str, bool)> = agents.iter().map(|a| (&*a.name, a.named)).collect();
    assert_eq!(names, [("web1", true), ("127.0.0.1", false)]);
    submit(&mut admin_client, "three", "").await;
    let mut agent = TestAgent::start(agent_config(server.addr, "web1"));
    let (id, _) = agent.wait_for("a handled task", handled).await;
    assert_eq!(id, 3, "tasks 1 and 2 were acked: not sent again");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_mode_loses_nothing_when_a_batch_is_larger_than_retain() {
    let mut config = Config::default();
    config.tasks.mode = DeliveryMode::Queue;
    config.tasks.batch = 300;
    config.tasks.retain = 100;
    config.tasks.interval = Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    let mut agent = TestAgent::start(agent_config(server.addr, "worker"));
    let mut ids = HashSet::new();
    within_for(5 * LIMIT, "300 handled tasks", async {
        while ids.len() < 300 {
            ids.insert(agent.wait_for("a handled task", handled).await.0);
        }
    })
    .await;
    let mut admin_client = server.admin().await;
    let reply = admin_client
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.dropped, reply.dead), (0, 0));
    agent.stop().await;
    server.stop().await;
}

#[test]
fn a_database_that_is_not_ours_stops_the_start_with_exit_78_and_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("contactd.db");
    let bytes = b"precious data that is not a database\n".repeat(200);
    std::fs::write(&db, &bytes).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nenabled = false\n",
    )
    .unwrap();
    let out = common::contactd()
        .args(["serve", "-c", config.to_str().unwrap()])
        .env("STATE_DIRECTORY", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!("store.path {}", db.display()))
            && stderr.contains("not a database"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), bytes, "the file was changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_running_server_holds_its_tasks() {
    let state = tempfile::tempdir().unwrap();
    let server = daemon(state.path(), 0, "", "");
    let mut admin_client = admin(&server).await;
    for i in 0..20 {
        submit(&mut admin_client, &format!("kept {i}"), "").await;
    }
    let copy = state.path().join("backup.db");
    let out = common::contactd()
        .args(["store", "backup", copy.to_str().unwrap(), "--db"])
        .arg(state.path().join("contactd.db"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The copy is a database a server starts from.
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.store.path = Some(copy);
    let from_copy = TestServer::start(config).await;
    let mut copy_admin = from_copy.admin().await;
    let tasks = list(&mut copy_admin, TaskState::Unspecified).await;
    assert_eq!(tasks.len(), 20);
    assert_eq!(tasks[19].text, "kept 19");
    assert_eq!(submit(&mut copy_admin, "next", "").await, 21);
    from_copy.stop().await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_submits_with_resource_exhausted_and_delivers_what_it_holds() {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.store.max_size = bytesize::ByteSize::mib(1);
    let server = TestServer::start(config).await;
    let mut admin_client = server.admin().await;
    let mut agent = TestAgent::start(agent_config(server.addr, "web1"));
    agent.wait_for("connected", connected).await;
    // 16 KiB tasks: a 1 MiB database holds fewer than 64 of them.
    let text = "x".repeat(16 * 1024);
    let mut accepted = Vec::new();
    let refusal = loop {
        assert!(accepted.len() < 200, "1 MiB never filled up");
        let request = SubmitTaskRequest {
            text: format!("{} {text}", accepted.len()),
            agent: String::new(),
            ..Default::default()
        };
        match admin_client.submit_task(request).await {
            Ok(reply) => accepted.push(reply.into_inner().id),
            Err(status) => break status,
        }
    };
    assert_eq!(
        refusal.code(),
        tonic::Code::ResourceExhausted,
        "{refusal:?}"
    );
    assert!(refusal.message().contains("full"), "{refusal:?}");
    assert!(accepted.len() >= 10, "only {} tasks fit", accepted.len());
    // Everything accepted is delivered and acked, and the server serves on.
    let mut done = HashSet::new();
    within_for(5 * LIMIT, "the accepted tasks handled", async {
        while done.len() < accepted.len() {
            done.insert(agent.wait_for("a handled task", handled).await.0);
        }
    })
    .await;
    assert_eq!(done, accepted.iter().copied().collect::<HashSet<_>>());
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        serving,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    anonymous_status(server.addr).await;
    agent.stop().await;
    server.stop().await;
}
