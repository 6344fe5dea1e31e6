//! The PostgreSQL store, for several servers sharing one fleet, against a
//! real PostgreSQL: a throwaway cluster per test (common::postgres). What
//! the store keeps, the databases it refuses or cannot reach, store.rs's
//! restart scenarios on it, servers sharing one fleet, a lost database, TLS
//! to the database, backups and the bounded read pool. Without PostgreSQL
//! these tests say SKIPPED and pass; under CI=true they fail instead.

use crate::common;

use std::sync::Arc;

use crate::jobs::Fleet;
use common::{
    LIMIT, TestServer,
    daemon::Process,
    fleet::{TestAgent, agent_config, connected, handled},
    postgres::Cluster,
};
use contactd::{
    auth::{Role, create_token},
    clock::now_ms,
    config::{Config, JobConfig, JobMode, StoreConfig, StoreKind},
    model::{AckCursor, Saved, SavedAgent, TaskState},
    proto::admin::{
        ListAgentsRequest, ListJobsRequest, ListTasksRequest, admin_client::AdminClient,
    },
    store::{self, Retention, StoreError, Write},
};
use nix::sys::signal::Signal;
use tonic::transport::Channel;

fn config(url: &str) -> StoreConfig {
    StoreConfig {
        kind: StoreKind::Postgres,
        url: Some(url.to_owned()),
        ..StoreConfig::default()
    }
}

/// Opens and starts the store off the test's runtime threads (connecting
/// and migrating block).
async fn open(
    config: &StoreConfig,
    queue_mode: bool,
) -> Result<(store::Store, store::Snapshot), StoreError> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        store::open(&config, "test", 10, queue_mode).map(store::Opened::start)
    })
    .await
    .unwrap()
}

// ---- what the store keeps: tasks, claims, acks, cursors, the roster ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_tasks_claims_acks_cursors_and_the_roster() {
    let Some(cluster) = Cluster::start("postgres store") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let config = config(&url);
    let (store, snapshot) = open(&config, true).await.unwrap();
    assert_eq!(snapshot.next_id, 1);
    let epoch = snapshot.epoch;
    assert_ne!(epoch, 0);

    let seen: Arc<parking_lot::Mutex<Vec<u64>>> = Arc::default();
    store.set_sink({
        let seen = Arc::clone(&seen);
        Arc::new(move |tasks| seen.lock().extend(tasks.iter().map(|t| t.id)))
    });
    let (a, b) = tokio::join!(
        store.publish(3, |id| (format!("job {id}"), None)),
        store.publish(1, |id| (format!("for web1 {id}"), Some("web1".into()))),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.count() + b.count(), 4);
    assert_eq!(*seen.lock(), [1, 2, 3, 4], "handed on in id order");

    let seq = store.claim(Write::Claimed {
        id: 1,
        attempt: 1,
        holder: "web1".into(),
        deadline_ms: now_ms() + 60_000,
    });
    let mut committed = store.committed();
    common::within("the claim commits", committed.wait_for(|c| *c >= seq))
        .await
        .unwrap();
    store.record(Write::Acked {
        id: 2,
        agent: "web2".into(),
        ok: false,
        text: "exit 1\nwith a second line".into(),
        at_ms: 7,
        claimed: false,
    });
    let mut cursor = AckCursor::at(1);
    cursor.ack(3, 64);
    store.record(Write::Cursor(Saved {
        agent: "web2".into(),
        cursor,
        since: 1,
        sent_up_to: 3,
        seen_ms: now_ms(),
    }));
    store.record(Write::Agent(contactd::model::SavedAgent {
        name: "web2".into(),
        first_ms: 5,
        last_ms: now_ms(),
        delivered: 3,
        acked: 2,
        failed: 1,
    }));
    // A read sees every write sent before it.
    let record = store.task(2).await.unwrap().expect("task 2 is kept");
    assert_eq!(record.task.state, TaskState::Failed);
    assert_eq!(record.results.len(), 1);
    assert_eq!(&*record.results[0].agent, "web2");
    assert_eq!(record.results[0].text, "exit 1\nwith a second line");
    store
        .write_now(Write::Retried { id: 2 })
        .committed()
        .await
        .unwrap();
    store
        .write_now(Write::Cancelled { id: 3, held: false })
        .committed()
        .await
        .unwrap();
    assert_eq!(store.task(99).await.unwrap(), None);

    // One server per database: a second one is refused while this one runs.
    let second = open(&config, true).await.map(|_| ());
    assert!(
        matches!(&second, Err(StoreError::Locked { .. })),
        "{second:?}"
    );
    store.close().await;

    let (store, snapshot) = open(&config, true).await.unwrap();
    assert_eq!(snapshot.epoch, epoch, "the epoch is the database's");
    assert_eq!(snapshot.next_id, 5, "ids never repeat");
    let by_id = |id: u64| snapshot.tasks.iter().find(|t| t.id == id).unwrap();
    assert_eq!(by_id(1).claim.as_ref().map(|c| &*c.0), Some("web1"));
    assert_eq!(by_id(1).attempts, 1);
    assert_eq!((by_id(2).state, by_id(2).retries), (TaskState::Pending, 1));
    assert_eq!(by_id(3).state, TaskState::Cancelled);
    assert_eq!(by_id(4).target.as_deref(), Some("web1"));
    let [saved] = &snapshot.cursors[..] else {
        panic!("one cursor: {:?}", snapshot.cursors)
    };
    assert_eq!(
        (&*saved.agent, saved.cursor.watermark(), saved.sent_up_to),
        ("web2", 1, 3)
    );
    assert!(saved.cursor.is_acked(3) && !saved.cursor.is_acked(2));
    assert_eq!(snapshot.agents.len(), 1);
    assert_eq!(
        (snapshot.agents[0].first_ms, snapshot.agents[0].failed),
        (5, 1)
    );

    // Housekeeping: finished tasks beyond `retain_finished` go, with
    // their results; unfinished ones stay.
    let pruned = store
        .housekeep(Retention {
            created_before_ms: 0,
            retain_finished: 0,
            queue_mode: true,
            forget_before_ms: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        pruned.tasks, 1,
        "task 3 (cancelled) is the only finished one"
    );
    assert_eq!(store.task(3).await.unwrap(), None);
    assert!(store.task(2).await.unwrap().is_some());
    store.close().await;
}

/// A job's schedule, pause and last success, as the scheduler writes
/// them: each a write of its own with the others left out (None). Every
/// one of these writes failed on PostgreSQL, and took down the group
/// commit it was in, until the statement said its parameters were BIGINT
/// (found by the soak: each job run that succeeded lost the acks committed
/// with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_schedule_pause_and_last_success_are_kept_each_written_alone() {
    let Some(cluster) = Cluster::start("postgres job rows") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let (store, _) = open(&config(&url), false).await.unwrap();
    let name: Arc<str> = Arc::from("nightly");
    let now = now_ms();
    for write in [
        Write::Job {
            name: Arc::clone(&name),
            last_nominal_ms: Some(now),
            paused: None,
            last_success_ms: None,
        },
        Write::Job {
            name: Arc::clone(&name),
            last_nominal_ms: None,
            paused: None,
            last_success_ms: Some(now + 1),
        },
        Write::Job {
            name: Arc::clone(&name),
            last_nominal_ms: None,
            paused: Some(true),
            last_success_ms: None,
        },
    ] {
        store.write_now(write).committed().await.unwrap();
    }
    let jobs = store.jobs().await.unwrap();
    let [job] = &jobs[..] else {
        panic!("one job: {jobs:?}")
    };
    assert_eq!(
        (
            &*job.name,
            job.last_nominal_ms,
            job.paused,
            job.last_success_ms
        ),
        ("nightly", now, true, now + 1)
    );
    store.close().await;
}

// ---- databases it must not use or cannot reach ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_another_program_or_a_newer_contactd_is_refused_and_left_alone() {
    let Some(cluster) = Cluster::start("postgres refusals") else {
        return;
    };
    let theirs = cluster.database("theirs").await;
    cluster
        .execute("theirs", "CREATE TABLE tasks (what TEXT)")
        .await;
    let e = open(&config(&theirs), false).await.map(|_| ()).unwrap_err();
    assert!(
        e.is_config() && e.to_string().contains("not a contactd database"),
        "{e}"
    );
    let newer = cluster.database("newer").await;
    let (store, _) = open(&config(&newer), false).await.unwrap();
    store.close().await;
    cluster
        .execute(
            "newer",
            "UPDATE contactd_meta SET value = 99 WHERE key = 'schema'",
        )
        .await;
    let e = open(&config(&newer), false).await.map(|_| ()).unwrap_err();
    assert!(
        e.is_config() && e.to_string().contains("newer contactd"),
        "{e}"
    );
    // Neither was changed.
    let (client, connection) = tokio_postgres::connect(&theirs, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "only their own table");
}

/// No PostgreSQL needed: nothing listens on the port.
#[test]
fn an_unreachable_database_stops_the_start_with_exit_1_and_says_which() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("contactd.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nsocket = \"{}/admin.sock\"\n\
             [store]\nkind = \"postgres\"\nurl = \"postgres://contactd:hunter2@127.0.0.1:{port}/fleet\"\n\
             connect_timeout = \"2s\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut server = Process::spawn(
        &[
            std::ffi::OsStr::new("serve"),
            "-c".as_ref(),
            path.as_os_str(),
        ],
        &[],
    );
    let status = server.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(1), "systemd restarts it");
    let line = server.wait_for_line("cannot connect to the database");
    assert!(
        line.contains(&format!("contactd@127.0.0.1:{port}/fleet")),
        "{line}"
    );
    assert!(!line.contains("hunter2"), "no password in logs: {line}");
}

// ---- store.rs's restart scenarios, on PostgreSQL ----

fn store_section(url: &str) -> String {
    format!("[store]\nkind = \"postgres\"\nurl = \"{url}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_mode_on_postgres_after_a_sigkill_every_task_is_handled_exactly_once() {
    let Some(cluster) = Cluster::start("postgres queue SIGKILL") else {
        return;
    };
    let url = cluster.database("fleet").await;
    crate::store::after_a_sigkill_every_task_is_handled_exactly_once(&store_section(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_agent_on_postgres_gets_what_it_missed_across_a_restart_not_what_it_acked() {
    let Some(cluster) = Cluster::start("postgres broadcast restart") else {
        return;
    };
    let url = cluster.database("fleet").await;
    crate::store::away_across_a_restart_gets_what_it_missed_not_what_it_acked(&store_section(&url))
        .await;
}

// ---- several servers, one fleet: broadcast, one generator, queue tasks once ----

/// A server named `name` on the shared database `url`.
fn shared_server(name: &str, url: &str, tasks: &str) -> common::daemon::Daemon {
    common::daemon::Daemon::start(&format!(
        "[server]\nname = \"{name}\"\n[tasks]\n{tasks}\n{}poll_interval = \"200ms\"\n",
        store_section(url)
    ))
}

async fn admin(server: &common::daemon::Daemon) -> AdminClient<Channel> {
    common::within(
        "admin connect",
        contactd::client::admin::connect(&server.dir.path().join("admin.sock")),
    )
    .await
    .unwrap()
}

/// Waits (bounded) until `agent`'s cursor in the database has acked
/// every task up to `id`.
async fn wait_for_cursor(url: &str, agent: &str, id: i64) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    common::within("the cursor in the database", async {
        loop {
            let row = client
                .query_opt("SELECT watermark FROM cursors WHERE agent = $1", &[&agent])
                .await
                .unwrap();
            if row.is_some_and(|row| row.get::<_, i64>(0) >= id) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn handled_ids(agent: &mut TestAgent, count: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(agent.wait_for("a handled task", handled).await.0);
    }
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_tasks_published_on_either_server_reach_agents_on_both_and_an_agent_that_moves() {
    let Some(cluster) = Cluster::start("postgres two servers, broadcast") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let a = shared_server("a", &url, "batch = 0");
    let b = shared_server("b", &url, "batch = 0");
    let (mut admin_a, mut admin_b) = (admin(&a).await, admin(&b).await);
    let mut web1 = TestAgent::start(agent_config(a.addr, "web1"));
    let mut web2 = TestAgent::start(agent_config(b.addr, "web2"));
    web1.wait_for("web1 connected", connected).await;
    web2.wait_for("web2 connected", connected).await;

    // Ids are the database's: one sequence for the fleet.
    let one = common::submit(&mut admin_a, "one", "").await;
    let two = common::submit(&mut admin_b, "two", "").await;
    let three = common::submit(&mut admin_a, "three", "").await;
    assert_eq!([one, two, three], [1, 2, 3]);
    assert_eq!(handled_ids(&mut web1, 3).await, [1, 2, 3]);
    assert_eq!(handled_ids(&mut web2, 3).await, [1, 2, 3]);

    // Either server shows the whole fleet: where each agent is, every
    // server, and each task's acks through both.
    common::within("the fleet view on a", async {
        loop {
            let fleet = admin_a
                .list_agents(ListAgentsRequest::default())
                .await
                .unwrap()
                .into_inner();
            let at = |name: &str| {
                fleet
                    .agents
                    .iter()
                    .find(|a| a.name == name)
                    .map(|a| (a.server.clone(), a.connected))
            };
            let servers: Vec<_> = fleet
                .servers
                .iter()
                .map(|s| (s.name.as_str(), s.alive, s.this))
                .collect();
            if at("web1") == Some(("a".into(), true))
                && at("web2") == Some(("b".into(), true))
                && servers == [("a", true, true), ("b", true, false)]
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    // As an operator sees it on b.
    let table = common::contactd()
        .args(["agents", "--socket"])
        .arg(b.dir.path().join("admin.sock"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let row = |start: &str| {
        table
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} row in:\n{table}"))
            .to_owned()
    };
    assert!(row("web1").contains("on a"), "{table}");
    assert!(row("web2").contains("on b"), "{table}");
    assert!(row("SERVER").contains("HEARTBEAT"), "{table}");
    assert!(row("a ").contains(" up "), "{table}");
    assert!(row("b (this one)").contains(" up "), "{table}");
    common::within("both acks of task 2 listed on a", async {
        loop {
            let tasks = admin_a
                .list_tasks(ListTasksRequest::default())
                .await
                .unwrap()
                .into_inner()
                .tasks;
            if tasks.iter().any(|t| t.id == 2 && t.acked == 2) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;

    // web1 moves to server b: it gets what it missed, not what it acked
    // through a (a new agent process: anything sent again would run again).
    wait_for_cursor(&url, "web1", 3).await;
    web1.stop().await;
    let four = common::submit(&mut admin_a, "four, while web1 moves", "").await;
    let mut web1 = TestAgent::start(agent_config(b.addr, "web1"));
    let five = common::submit(&mut admin_b, "five", "").await;
    assert_eq!(handled_ids(&mut web1, 2).await, [four, five]);
    assert_eq!(handled_ids(&mut web2, 2).await, [four, five]);
    web1.stop().await;
    web2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_generates_for_the_fleet_and_the_lease_moves_when_it_is_killed() {
    let Some(cluster) = Cluster::start("postgres generator lease") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let tasks = "batch = 1\ninterval = \"100ms\"\ntemplate = \"tick {seq}\"";
    let mut a = shared_server("a", &url, tasks);
    a.wait_for_line("runs the task generator");
    let mut b = shared_server("b", &url, tasks);
    let mut web2 = TestAgent::start(agent_config(b.addr, "web2"));
    web2.wait_for("web2 connected", connected).await;
    let before = web2.wait_for("a generated task", handled).await.0;
    assert!(
        !b.log.iter().any(|l| l.contains("runs the task generator")),
        "b took the lease while a holds it"
    );

    a.signal(Signal::SIGKILL);
    a.wait_exit(LIMIT);
    // The lease went with a's connection: b takes it at its next poll.
    b.wait_for_line("runs the task generator");
    // And b shows a as a server whose heartbeat stopped (not a clean stop).
    let mut admin_b = admin(&b).await;
    common::within("a shown without a heartbeat", async {
        loop {
            let servers = admin_b
                .list_agents(ListAgentsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .servers;
            if servers
                .iter()
                .any(|s| s.name == "a" && !s.alive && !s.stopped)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    // And b's agent gets tasks b generates now.
    common::within("tasks generated after the kill", async {
        loop {
            if web2.wait_for("a generated task", handled).await.0 > before + 20 {
                return;
            }
        }
    })
    .await;
    web2.stop().await;
}

/// Lines of `path` (none if it does not exist yet).
fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// How many tasks the database says are in `state`.
async fn count_in_state(url: &str, state: TaskState) -> i64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query_one(
            "SELECT count(*) FROM tasks WHERE state = $1",
            &[&i16::from(state as u8)],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_tasks_submitted_to_two_servers_are_each_handled_once_when_one_is_killed() {
    const TASKS: usize = 400;
    let Some(cluster) = Cluster::start("postgres two servers, queue, SIGKILL") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let queue = "mode = \"queue\"\nwindow = 4\nack_timeout = \"10s\"\nbatch = 0";
    let mut a = shared_server("a", &url, queue);
    let b = shared_server("b", &url, queue);
    let (mut admin_a, mut admin_b) = (admin(&a).await, admin(&b).await);
    for i in 0..TASKS {
        let admin = if i % 2 == 0 {
            &mut admin_a
        } else {
            &mut admin_b
        };
        common::submit(admin, &format!("job-{i}"), "").await;
    }
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("handled.txt");
    // Two agents on each server, each able to fail over to the other.
    let agents: Vec<TestAgent> = [
        ("a1", &a, &b),
        ("a2", &a, &b),
        ("b1", &b, &a),
        ("b2", &b, &a),
    ]
    .into_iter()
    .map(|(name, first, second)| {
        let mut config = agent_config(first.addr, name);
        config.servers.push(format!("http://{}", second.addr));
        config.handler = vec![
            "sh".into(),
            "-c".into(),
            "sleep 0.02; printf '%s\\n' \"$(cat)\" >> \"$0\"".into(),
            record.to_str().unwrap().into(),
        ];
        config.handler_concurrency = 2;
        TestAgent::start(config)
    })
    .collect();

    common::within_for(5 * LIMIT, "a third of the tasks handled", async {
        while lines(&record).len() < TASKS / 3 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    a.signal(Signal::SIGKILL);
    a.wait_exit(LIMIT);
    let at_kill = lines(&record).len();
    assert!(at_kill < TASKS, "the kill came too late to test anything");

    common::within_for(5 * LIMIT, "every task acked in the database", async {
        while count_in_state(&url, TaskState::Acked).await < TASKS as i64 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    for agent in agents {
        agent.stop().await;
    }
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for line in lines(&record) {
        *counts.entry(line).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert_eq!(counts.len(), TASKS, "every task handled");
    drop(b);
}

/// A claim whose commit failed (here: a trigger refuses every claim for a
/// while) is not sent; it is given out again after its deadline, once
/// claims commit again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_commit_failed_is_given_out_again_after_its_deadline() {
    let Some(cluster) = Cluster::start("postgres failed claim") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let mut server = shared_server(
        "a",
        &url,
        "mode = \"queue\"\nbatch = 0\nack_timeout = \"3s\"",
    );
    let mut admin_a = admin(&server).await;
    let mut web1 = TestAgent::start(agent_config(server.addr, "web1"));
    web1.wait_for("web1 connected", connected).await;
    cluster
        .execute(
            "fleet",
            "CREATE FUNCTION no_claims() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'no claims now'; END $$; \
             CREATE TRIGGER no_claims BEFORE UPDATE ON tasks FOR EACH ROW \
             WHEN (NEW.holder IS NOT NULL) EXECUTE FUNCTION no_claims();",
        )
        .await;
    let id = common::submit(&mut admin_a, "claimed when it can be", "").await;
    server.wait_for_line("the task store could not commit");
    cluster
        .execute("fleet", "DROP TRIGGER no_claims ON tasks")
        .await;
    assert_eq!(web1.wait_for("the task handled", handled).await.0, id);
    web1.stop().await;
}

/// The state the database keeps for task `id`.
async fn state_of(url: &str, id: u64) -> TaskState {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let id = i64::try_from(id).unwrap();
    let state: i16 = client
        .query_one("SELECT state FROM tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    TaskState::from_u8(u8::try_from(state).unwrap())
}

/// RELIABILITY.md's defect 6: an agent's ack that reached its server while
/// the database was down was lost with the group commit it was in. The
/// server counted the task acked and let it go, but the database kept it
/// claimed; the other server, restarted, restored that claim and put the
/// task back in line at its deadline, where it stayed `pending` for ever
/// (no agent was connected to that server, and the server the agents were
/// on no longer held it). Now the ack is applied once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_made_while_the_database_is_down_is_kept_and_the_task_is_not_put_back_in_line() {
    let Some(mut cluster) = Cluster::start("postgres ack during an outage") else {
        return;
    };
    let url = cluster.database("fleet").await;
    // Long enough that the ack is applied before the claim's deadline (the
    // writer reconnects with a backoff of at most 5 s).
    let queue = "mode = \"queue\"\nbatch = 0\nack_timeout = \"20s\"";
    let mut a = shared_server("a", &url, queue);
    let b = shared_server("b", &url, queue);
    let mut admin_b = admin(&b).await;
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    // The agent knows server b only, and runs the task for 2 s.
    let mut config = agent_config(b.addr, "web1");
    config.handler = vec![
        "sh".into(),
        "-c".into(),
        "touch \"$0\"; sleep 2".into(),
        started.to_str().unwrap().into(),
    ];
    let mut web1 = TestAgent::start(config);
    web1.wait_for("web1 connected", connected).await;
    let submitted = tokio::time::Instant::now();
    let id = common::submit(&mut admin_b, "acked while the database is down", "").await;
    // Sent, so its claim is committed: the database goes while it runs.
    common::within("the handler started", async {
        while !started.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    cluster.stop();
    assert_eq!(web1.wait_for("the task handled", handled).await.0, id);
    // The ack reaches server b, whose writer cannot commit it.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    cluster.start_again();
    // Server a restarts and reads the task as the database has it.
    a.signal(Signal::SIGTERM);
    a.wait_exit(LIMIT);
    let a = shared_server("a", &url, queue);
    let mut admin_a = admin(&a).await;
    // Past the claim's deadline, when a claim the ack did not end is let go.
    tokio::time::sleep_until(submitted + std::time::Duration::from_secs(22)).await;
    // (It was `pending` for good: at the deadline server a put it back in
    // line, with no agent to give it to, and server b no longer held it.)
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut state = state_of(&url, id).await;
    while state != TaskState::Acked && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        state = state_of(&url, id).await;
    }
    assert_eq!(state, TaskState::Acked, "the task in the database");
    for admin in [&mut admin_a, &mut admin_b] {
        let listed = admin
            .list_tasks(ListTasksRequest::default())
            .await
            .unwrap()
            .into_inner();
        let task = listed.tasks.iter().find(|t| t.id == id).expect("listed");
        assert_eq!(
            task.state(),
            contactd::proto::admin::TaskState::Acked,
            "{task:?}"
        );
    }
    web1.stop().await;
}

// ---- a lost database: queue mode stops serving, submits say unavailable ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_takes_queue_mode_to_not_serving_and_back_and_submits_say_unavailable() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let Some(mut cluster) = Cluster::start("postgres lost database") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let mut server = shared_server("a", &url, "mode = \"queue\"\nbatch = 0");
    let mut admin_a = admin(&server).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = async |health: &mut HealthClient<Channel>| {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        health.check(request).await.unwrap().into_inner().status()
    };
    assert_eq!(status(&mut health).await, ServingStatus::Serving);
    assert_eq!(common::submit(&mut admin_a, "before", "").await, 1);

    cluster.stop();
    server.wait_for_line("health is NOT_SERVING (queue mode");
    assert_eq!(status(&mut health).await, ServingStatus::NotServing);
    let refused = admin_a
        .submit_task(contactd::proto::admin::SubmitTaskRequest {
            text: "while it is down".into(),
            agent: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    cluster.start_again();
    server.wait_for_line("answers again: health is SERVING");
    assert_eq!(
        status(&mut health).await,
        ServingStatus::Serving,
        "{:#?}",
        server.log
    );
    // One line per change, not one per failed attempt.
    let lines = |needle: &str| server.log.iter().filter(|l| l.contains(needle)).count();
    // (Other lines may quote a failed write's error, which also says
    // "is unreachable": this is the one the change makes.)
    assert_eq!(
        lines("the task store's database is unreachable"),
        1,
        "{:#?}",
        server.log
    );
    // The writer reconnects (with backoff) on its own.
    common::within("a submit after the database came back", async {
        loop {
            let request = contactd::proto::admin::SubmitTaskRequest {
                text: "after".into(),
                agent: String::new(),
                ..Default::default()
            };
            match admin_a.submit_task(request).await {
                Ok(reply) => return assert_eq!(reply.into_inner().id, 2),
                Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

// ---- TLS to the database, verified against ca_file ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified_against_ca_file_and_refused_without_it() {
    let pki = tempfile::tempdir().unwrap();
    contactd::tls::pki::init(pki.path(), &[], &[], 30, false).unwrap();
    let Some(cluster) = Cluster::start_tls(
        "postgres TLS",
        &pki.path().join("server.pem"),
        &pki.path().join("server.key"),
    ) else {
        return;
    };
    let url = format!("{}?sslmode=verify-full", cluster.database("fleet").await);
    let mut tls = config(&url);
    tls.ca_file = Some(pki.path().join("ca.pem"));
    let (store, _) = open(&tls, false).await.unwrap();
    // The store's connections are TLS ones.
    let (client, connection) =
        tokio_postgres::connect(&cluster.url("fleet"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'contactd' AND ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "no TLS connection from contactd");
    store.close().await;

    // Without the CA, the system's roots do not vouch for this server.
    let e = open(&config(&url), false).await.map(|_| ()).unwrap_err();
    assert!(
        matches!(e, StoreError::Unavailable(_)) && e.to_string().contains("certificate"),
        "{e}"
    );
}

// ---- `store backup` points to pg_dump ----

/// No PostgreSQL needed: `store backup` is SQLite's, and says what to use.
#[test]
fn store_backup_of_a_postgres_store_points_to_pg_dump() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("contactd.toml");
    std::fs::write(
        &config,
        "[store]\nkind = \"postgres\"\nurl = \"postgres://contactd@127.0.0.1/fleet\"\n",
    )
    .unwrap();
    let out = common::contactd()
        .args(["store", "backup", "-c"])
        .arg(&config)
        .arg(dir.path().join("copy.db"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("pg_dump"), "{stderr}");
    assert!(!dir.path().join("copy.db").exists());
}

// ---- connections: reads on a bounded pool ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_share_a_bounded_pool_and_a_server_holds_at_most_pool_size_plus_two_connections() {
    let Some(cluster) = Cluster::start("postgres read pool") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let server = common::daemon::Daemon::start(&format!(
        "[server]\nname = \"a\"\n[tasks]\nbatch = 0\n{}pool_size = 2\n",
        store_section(&url)
    ));
    let admin_a = admin(&server).await;
    common::submit(&mut admin_a.clone(), "one", "").await;
    // 32 fleet views at once: they wait for one of the 2 read connections.
    let mut views = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let mut admin = admin_a.clone();
        views.spawn(async move {
            let agents = admin
                .list_agents(ListAgentsRequest::default())
                .await
                .unwrap();
            let tasks = admin.list_tasks(ListTasksRequest::default()).await.unwrap();
            (
                agents.into_inner().servers.len(),
                tasks.into_inner().tasks.len(),
            )
        });
    }
    while let Some(view) = common::within("32 fleet views", views.join_next()).await {
        assert_eq!(view.unwrap(), (1, 1));
    }
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let held: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'contactd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (3..=4).contains(&held),
        "the writer, the watcher and 1 or 2 readers: {held}"
    );
}

/// The runs of job `tick` in the database at `url`: their nominal times,
/// and the tasks the database keeps for the job.
async fn tick_runs(url: &str) -> (Vec<i64>, i64) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let nominals = client
        .query(
            "SELECT nominal_ms FROM runs WHERE job = 'tick' ORDER BY nominal_ms",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<_, i64>(0))
        .collect();
    let tasks: i64 = client
        .query_one("SELECT count(*) FROM tasks WHERE job = 'tick'", &[])
        .await
        .unwrap()
        .get(0);
    (nominals, tasks)
}

/// Waits until the database holds at least `count` runs of `tick`.
async fn wait_for_runs(url: &str, count: usize) -> Vec<i64> {
    common::within("runs of tick in the database", async {
        loop {
            let (nominals, _) = tick_runs(url).await;
            if nominals.len() >= count {
                return nominals;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_fires_once_per_period_fleet_wide_when_the_lease_moves_by_sigkill() {
    let Some(cluster) = Cluster::start("postgres job lease") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let tasks = "batch = 0\n[[jobs]]\nname = \"tick\"\ntext = \"tick\"\nevery = \"1s\"\n\
                 mode = \"broadcast\"\n";
    let mut a = shared_server("a", &url, tasks);
    a.wait_for_line("runs the task generator");
    let mut b = shared_server("b", &url, tasks);
    let before = wait_for_runs(&url, 3).await.len();
    a.signal(Signal::SIGKILL);
    a.wait_exit(LIMIT);
    b.wait_for_line("runs the task generator");
    let first_of_b = wait_for_runs(&url, before + 1).await;
    wait_for_runs(&url, first_of_b.len() + 2).await;
    b.signal(Signal::SIGTERM);
    b.wait_exit(LIMIT);

    let (nominals, tasks) = tick_runs(&url).await;
    assert_eq!(
        tasks,
        nominals.len() as i64,
        "a run without its task, or twice"
    );
    let unique: std::collections::HashSet<i64> = nominals.iter().copied().collect();
    assert_eq!(unique.len(), nominals.len(), "fired twice: {nominals:?}");
    // Every period fired once, but for those passed while no server held
    // the lease: b logged them as skipped when it took over.
    let missing: i64 = nominals.windows(2).map(|w| (w[1] - w[0]) / 1000 - 1).sum();
    let logged: i64 = b
        .log
        .iter()
        .filter(|l| l.contains("job runs skipped"))
        .map(|l| common::daemon::field(l, "count").parse::<i64>().unwrap())
        .sum();
    assert_eq!(missing, logged, "periods skipped silently: {nominals:?}");
}

/// The web console's fleet page, on either of two servers sharing the
/// database, lists both servers (alive, the one answering marked) and
/// counts the agents connected to each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_console_shows_both_servers_and_their_agents_on_either() {
    let Some(cluster) = Cluster::start("postgres two servers, web console") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let operator = create_token(&tokens, "ops", Role::Operator, false).unwrap();
    let server = |name: &str| {
        let mut server = common::daemon::Daemon::start(&format!(
            "[server]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\ntokens_file = {tokens:?}\n\
             [tasks]\nbatch = 0\n{}poll_interval = \"200ms\"\n\
             [web]\nlisten = \"127.0.0.1:0\"\n",
            store_section(&url)
        ));
        let line = server.wait_for_line("serving the web console");
        let web: std::net::SocketAddr = common::daemon::field(&line, "addr").parse().unwrap();
        (server, web)
    };
    let mut token_files = Vec::new();
    for name in ["web1", "web2"] {
        let token = create_token(&tokens, name, Role::Agent, false).unwrap();
        let token_file = dir.path().join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        token_files.push(token_file);
    }
    let ((a, web_a), (b, web_b)) = (server("a"), server("b"));
    let mut agents = Vec::new();
    for ((name, at), token_file) in [("web1", a.addr), ("web2", b.addr)]
        .into_iter()
        .zip(token_files)
    {
        let mut config = agent_config(at, name);
        config.token_file = Some(token_file);
        agents.push(TestAgent::start(config));
    }
    for agent in &mut agents {
        agent.wait_for("connected", connected).await;
    }
    for (web, this, other) in [(web_a, "a", "b"), (web_b, "b", "a")] {
        let cookie = crate::web::log_in_at(web, &operator).await;
        let request =
            format!("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncookie: {cookie}\r\n\r\n");
        let page = common::until(
            &format!("both servers and both agents on {this}'s fleet page"),
            || crate::web::exchange(web, &request),
            |page| {
                page.contains(&format!("<td>{this} (this one)</td><td>● alive</td>"))
                    && page.contains(&format!("<td>{other}</td><td>● alive</td>"))
                    && page.contains("<dd id=\"connected\">2</dd>")
            },
        )
        .await;
        assert!(page.contains("<dd id=\"down\">0</dd>"), "{page}");
    }
    for agent in agents {
        agent.stop().await;
    }
}

// ---- several servers: each carries out the job runs it fired ----

/// An in-process server `name` on the shared database `url` with an `any`
/// job `once` for agents labelled `role=web`, fired only by an operator.
async fn job_server(name: &str, url: &str, ack_timeout: std::time::Duration) -> TestServer {
    let mut config = Config::default();
    config.server.name = name.into();
    config.store = StoreConfig {
        poll_interval: std::time::Duration::from_millis(200),
        ..self::config(url)
    };
    config.tasks.batch = 0;
    config.tasks.ack_timeout = ack_timeout;
    config.jobs.push(JobConfig {
        mode: JobMode::Any,
        target: Some(contactd::selector::Selector::parse("role=web").unwrap()),
        ..crate::jobs::job("once", "every", "366days")
    });
    TestServer::start(config).await
}

/// The server the database says carries out run `run`.
async fn run_server(url: &str, run: u64) -> String {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query_one(
            "SELECT server FROM runs WHERE task_id = $1",
            &[&i64::try_from(run).unwrap()],
        )
        .await
        .unwrap()
        .get(0)
}

/// Two job servers `a` and `b` on a new database, an agent `web-000` on
/// `a` running the run of `once` that `a` fired: the cluster (kept alive),
/// the database, the servers, the fleet, the run and its task.
async fn a_run_on_a(
    what: &str,
    ack_timeout: std::time::Duration,
) -> Option<(
    Cluster,
    String,
    TestServer,
    TestServer,
    Fleet,
    u64,
    contactd::proto::contact::ServerMsg,
)> {
    let cluster = Cluster::start(what)?;
    let url = cluster.database("fleet").await;
    let a = job_server("a", &url, ack_timeout).await;
    let b = job_server("b", &url, ack_timeout).await;
    let mut fleet = Fleet::default();
    fleet.join(&a, "web-000", "role=web").await;
    let run = crate::jobs::run_job(&mut a.admin().await, "once").await;
    let (agent, task) = fleet.next().await;
    assert_eq!((agent.as_str(), task.id), ("web-000", run));
    Some((cluster, url, a, b, fleet, run, task))
}

async fn running_runs(admin: &mut AdminClient<Channel>) -> u32 {
    admin
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .iter()
        .map(|job| job.running)
        .sum()
}

/// Defect 9 (RELIABILITY.md): a restarted server resumed every unfinished
/// run in the database, the other server's too (which then ran twice, or
/// waited for its agent until the run's timeout), and an ack made through
/// the server an agent moved to changed nothing. Now a server resumes its
/// own runs only, and an ack through another server reaches the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_leaves_the_others_runs_alone_and_an_ack_through_it_reaches_the_run() {
    // Long enough that only the relayed ack can end the run in time.
    let ack_timeout = std::time::Duration::from_secs(300);
    let Some((_cluster, url, a, b, mut fleet, run, task)) =
        a_run_on_a("postgres runs, ack through another server", ack_timeout).await
    else {
        return;
    };
    let admin_a = a.admin().await;

    // b restarts while a's run is in progress: it does not take it.
    b.stop().await;
    let b = job_server("b", &url, ack_timeout).await;
    let mut admin_b = b.admin().await;
    assert_eq!(running_runs(&mut admin_b).await, 0, "b resumed a's run");
    assert_eq!(run_server(&url, run).await, "a");

    // The agent moves to b and acks there: a's run counts it.
    fleet.leave("web-000");
    fleet.join(&b, "web-000", "role=web").await;
    fleet.ack("web-000", &task, true).await;
    let end = crate::jobs::run_until(&admin_a, run, "the run ended on a", |r| {
        r.state != "running"
    })
    .await;
    let r = end.run.unwrap();
    assert_eq!(
        (r.state.as_str(), r.acked, r.failed, r.missed),
        ("succeeded", 1, 0, 0)
    );
    assert!(fleet.received_nothing(), "the task was sent again");
    assert_eq!(running_runs(&mut admin_b).await, 0);
    b.stop().await;
    a.stop().await;
}

/// A restarted server's `any` run whose agent went to the other server
/// and never answers is handed on after `tasks.ack_timeout` (not at the
/// run's timeout); a server stopped for good has its runs taken over by
/// the other, which carries them on for the agents connected to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_servers_runs_are_taken_over_and_a_restarted_one_hands_on_what_went_elsewhere() {
    let ack_timeout = std::time::Duration::from_secs(1);
    let Some((_cluster, url, a, b, mut fleet, run, _)) =
        a_run_on_a("postgres runs taken over", ack_timeout).await
    else {
        return;
    };

    // web-000 moves to b with the task and never answers; a restarts.
    fleet.leave("web-000");
    fleet.join(&b, "web-000", "role=web").await;
    a.stop().await;
    let a = job_server("a", &url, ack_timeout).await;
    let mut admin_a = a.admin().await;
    fleet.join(&a, "web-001", "role=web").await;
    let (agent, again) = fleet.next().await;
    assert_eq!((agent.as_str(), again.id), ("web-001", run));
    fleet.ack("web-001", &again, true).await;
    let end = crate::jobs::run_until(&admin_a, run, "the run ended", |r| r.state != "running")
        .await
        .run
        .unwrap();
    assert_eq!(
        (end.state.as_str(), end.acked, end.missed),
        ("succeeded", 1, 1)
    );

    // a fires a second run and stops for good; its agent moves to b.
    let second = crate::jobs::run_job(&mut admin_a, "once").await;
    let (agent, task) = fleet.next().await;
    assert_eq!((agent.as_str(), task.id), ("web-001", second));
    a.stop().await;
    fleet.leave("web-001");
    fleet.join(&b, "web-001", "role=web").await;
    // b takes the run over (a stopped, and stayed away for ack_timeout)
    // and sends its task again to the agent running it: the same id, so
    // a real agent dedupes it.
    let (agent, again) = fleet.next().await;
    assert_eq!((agent.as_str(), again.id), ("web-001", second));
    assert_eq!(run_server(&url, second).await, "b");
    fleet.ack("web-001", &again, true).await;
    let mut admin_b = b.admin().await;
    let end = crate::jobs::run_until(&admin_b, second, "the run ended on b", |r| {
        r.state != "running"
    })
    .await
    .run
    .unwrap();
    assert_eq!(
        (end.state.as_str(), end.acked, end.missed),
        ("succeeded", 1, 0)
    );
    assert_eq!(running_runs(&mut admin_b).await, 0);
    b.stop().await;
}

/// Two servers writing the roster rows of the same agents in opposite
/// orders, in group commits at the same time, never deadlock: the writer
/// takes roster rows in name order. (A 40-minute soak saw PostgreSQL abort
/// one server's group commit for such a deadlock when agents moved between
/// servers after a fault.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_writing_one_rosters_rows_in_opposite_orders_never_deadlock() {
    use contactd::store::{Backend, Op};
    let Some(cluster) = Cluster::start("postgres roster order") else {
        return;
    };
    let url = cluster.database("fleet").await;
    let run = |name: &'static str, reversed: bool| {
        let config = config(&url);
        std::thread::spawn(move || {
            let mut backend = store::postgres::Postgres::open(&config, name).unwrap();
            let mut names: Vec<Arc<str>> = (0..50)
                .map(|i| Arc::from(format!("agent-{i:02}")))
                .collect();
            if reversed {
                names.reverse();
            }
            let mut failures = Vec::new();
            for round in 0..100i64 {
                let writes: Vec<Write> = names
                    .iter()
                    .map(|name| {
                        Write::Agent(SavedAgent {
                            name: Arc::clone(name),
                            first_ms: 1,
                            last_ms: round,
                            delivered: round as u64,
                            acked: 0,
                            failed: 0,
                        })
                    })
                    .collect();
                let ops: Vec<Op<'_>> = writes.iter().map(Op::Write).collect();
                if let Err(e) = backend.apply(&ops) {
                    failures.push(e.to_string());
                }
            }
            failures
        })
    };
    let (a, b) = (run("a", false), run("b", true));
    let failures: Vec<String> = a
        .join()
        .unwrap()
        .into_iter()
        .chain(b.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures.first()
    );
}
