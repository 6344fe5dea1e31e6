//! Agents and server together: real in-process agents (`agent::run`)
//! against a real in-process server, through faults.

use crate::common;

use std::{collections::HashSet, time::Duration};

use common::{
    TestServer,
    fleet::{TestAgent, agent_config, handled},
    submit, within,
};
use contactd::{
    agent::EventKind,
    config::{Config, DeliveryMode},
    proto::{
        admin::{ListTasksRequest, TaskState},
        contact::{Empty, Outcome, contact_client::ContactClient},
    },
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn manual(mode: DeliveryMode) -> Config {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.tasks.mode = mode;
    config
}

/// Waits for `count` handled tasks, returning their ids in order (handlers
/// run concurrently, so they finish in any order).
async fn handled_ids(agent: &mut TestAgent, count: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < count {
        let (id, outcome) = agent.wait_for("a handled task", handled).await;
        assert_eq!(outcome, Outcome::Ok);
        ids.push(id);
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_an_agent_away_for_a_while_gets_what_it_missed() {
    let server = TestServer::start(manual(DeliveryMode::Broadcast)).await;
    let mut admin = server.admin().await;
    let mut agent = TestAgent::start(agent_config(server.addr, "web1"));
    for i in 1..=3 {
        submit(&mut admin, &format!("before {i}"), "").await;
    }
    assert_eq!(handled_ids(&mut agent, 3).await, [1, 2, 3]);
    agent.stop().await;
    for i in 4..=6 {
        submit(&mut admin, &format!("while away {i}"), "").await;
    }
    let mut back = TestAgent::start(agent_config(server.addr, "web1"));
    assert_eq!(
        handled_ids(&mut back, 3).await,
        [4, 5, 6],
        "only what it missed"
    );
    // Stopping drains: its acks reach the server before it exits.
    back.stop().await;
    let tasks = admin
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(tasks.iter().all(|t| t.acked == 1), "{tasks:?}");
    assert!(
        tasks
            .iter()
            .all(|t| t.last_agent == "web1" && t.last_result == "ok"),
        "{tasks:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_mode_tasks_over_3_agents_one_killed_mid_run() {
    // Each task spawns a handler process: a few per second per core on a busy
    // CI machine, so the count is kept modest.
    const TASKS: usize = 90;
    let mut config = manual(DeliveryMode::Queue);
    config.tasks.window = 4;
    // c's claims stand until their deadline (a lost connection alone might
    // be an agent still running them), then go to a and b.
    config.tasks.ack_timeout = Duration::from_secs(2);
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    // Queued before any agent connects: they wait, then keep every agent's
    // window full, so the killed agent surely has tasks in flight.
    for i in 0..TASKS {
        submit(&mut admin, &format!("job {i}"), "").await;
    }
    let agents: Vec<TestAgent> = ["a", "b", "c"]
        .into_iter()
        .map(|name| {
            let mut config = agent_config(server.addr, name);
            config.handler = ["sh", "-c", "sleep 0.02"].map(String::from).to_vec();
            config.handler_concurrency = 2;
            TestAgent::start(config)
        })
        .collect();
    let [mut a, mut b, mut c] = agents.try_into().ok().unwrap();
    for agent in [&mut a, &mut b, &mut c] {
        agent.wait_for("connected", common::fleet::connected).await;
    }
    // Kill c (abruptly: no drain, no acks) once it has work in flight.
    handled_ids(&mut c, 5).await;
    c.task.abort();
    let _ = c.task.await;

    let mut done: HashSet<u64> = HashSet::new();
    within("every task acked", async {
        loop {
            let request = ListTasksRequest {
                state: TaskState::Acked as i32,
                limit: 0,
                after_id: 0,
            };
            let acked = admin.list_tasks(request).await.unwrap().into_inner().tasks;
            if acked.len() == TASKS {
                done.extend(acked.iter().map(|t| t.id));
                return;
            }
            // Look again at the next handled task, or shortly: an agent
            // reports a task handled as it queues the ack, so the last acks
            // reach the server after the last events.
            tokio::select! {
                _ = a.wait_for("a task", handled) => {}
                _ = b.wait_for("a task", handled) => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
    .await;
    assert_eq!(done.len(), TASKS);
    let reply = admin
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    common::assert_each_acked_once(&reply.tasks);
    assert!(
        reply.redelivered >= 1,
        "c's unacked tasks were redelivered: {} redelivered, {} duplicate acks",
        reply.redelivered,
        reply.duplicate_acks
    );
    let c_row = common::agent(&mut admin, "c").await;
    assert!(!c_row.connected && c_row.in_flight == 0, "{c_row:?}");
    a.stop().await;
    b.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_reconnecting_after_a_restart_spread_their_attempts() {
    let server = TestServer::start(manual(DeliveryMode::Broadcast)).await;
    let addr = server.addr;
    let mut agents: Vec<TestAgent> = (0..50)
        .map(|i| {
            let mut config = agent_config(addr, &format!("agent-{i}"));
            config.backoff.initial = Duration::from_secs(1);
            config.backoff.max = Duration::from_secs(5);
            TestAgent::start(config)
        })
        .collect();
    for agent in &mut agents {
        agent.wait_for("connected", common::fleet::connected).await;
    }
    // The server goes away: every session ends at once, told to come back.
    server.stop().await;
    // Each agent's first backoff wait, as the agent drew it, then its next
    // attempt. The drawn delays are what spreads the attempts; the clock
    // times they fire at are not compared, because a stalled machine (a busy
    // CI host) fires every overdue timer at once whatever the delays were.
    let mut delays = Vec::new();
    for agent in &mut agents {
        let delay = agent
            .wait_for("a backoff wait", |e| match e.kind {
                EventKind::Waiting { delay } => Some(delay),
                _ => None,
            })
            .await;
        agent
            .wait_for("the next attempt", |e| {
                matches!(e.kind, EventKind::Connecting { .. }).then_some(())
            })
            .await;
        delays.push(delay);
    }
    delays.sort();
    // The server said it was shutting down (a retry hint of 0): each agent
    // comes back within agent.retry_hint_jitter (1s), not after its
    // failure backoff (1s ± 20 %), and the attempts cover that window,
    // not one instant.
    assert!(
        delays[49] < Duration::from_secs(1),
        "a failure backoff after a shutdown: {delays:?}"
    );
    let span = delays[49] - delays[0];
    assert!(
        span >= Duration::from_millis(150),
        "attempts within {span:?}: {delays:?}"
    );
    let busiest = delays
        .iter()
        .map(|start| {
            delays
                .iter()
                .filter(|t| **t >= *start && **t < *start + Duration::from_millis(20))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        busiest <= 15,
        "{busiest} of 50 attempts within 20ms: {delays:?}"
    );
    for agent in agents {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_contact_calls_and_agents_present_it() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first-secret\n").unwrap();
    let mut config = manual(DeliveryMode::Broadcast);
    config.server.auth_token_file = Some(token_file.clone());
    let server = TestServer::start(config.clone()).await;

    // A client without the token is refused; health needs none.
    let refused = server.client().await.get_task(Empty {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut health = HealthClient::new(server.channel().await);
    let request = HealthCheckRequest {
        service: "Contact".into(),
    };
    assert!(health.check(request).await.is_ok());

    // An agent with the token file works.
    let mut agent_config = agent_config(server.addr, "holder");
    agent_config.token_file = Some(token_file.clone());
    let mut agent = TestAgent::start(agent_config);
    let mut admin = server.admin().await;
    submit(&mut admin, "guarded", "").await;
    assert_eq!(handled_ids(&mut agent, 1).await, [1]);
    agent.stop().await;

    // A rotated token applies on reload; the old one is refused from then on.
    std::fs::write(&token_file, "second-secret").unwrap();
    server.config.send_replace(std::sync::Arc::new(config));
    let old = Bearer("first-secret");
    let mut client = ContactClient::with_interceptor(server.channel().await, old);
    // The server applies the reload in its own task, a moment later.
    within("the new token in force", async {
        loop {
            match client.get_task(Empty {}).await {
                Err(e) if e.code() == Code::Unauthenticated => return,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    let mut client =
        ContactClient::with_interceptor(server.channel().await, Bearer("second-secret"));
    assert!(client.get_task(Empty {}).await.is_ok());
    server.stop().await;
}

#[derive(Clone)]
struct Bearer(&'static str);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = contactd::auth::bearer(self.0).parse().unwrap();
        request.metadata_mut().insert(contactd::auth::HEADER, value);
        Ok(request)
    }
}
