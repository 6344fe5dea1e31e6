//! Queue mode: a claim's deadline measures handling, not waiting. An agent
//! announces how many tasks it runs at once (`handler_concurrency`, in the
//! `x-contactd-concurrency` header of its getTask call) and the server
//! assigns it no more, so tasks do not time out while they wait in the
//! agent's own queue (and get redelivered to an agent that already holds
//! them).

use crate::common;

use std::time::Duration;

use common::{TestServer, fleet::TestAgent, fleet::agent_config, submit, until};
use contactd::{
    config::{Config, DeliveryMode},
    proto::admin::{ListTasksRequest, TaskState},
};

/// 20 tasks, a 2 s handler, 4 at a time, `ack_timeout = "3s"`: before the
/// agent announced its concurrency, the server handed it 16 (its window) at
/// once and 24 redeliveries followed, of tasks the agent already held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_slow_tasks_at_four_at_once_are_not_redelivered() {
    let mut config = Config::default();
    config.tasks.mode = DeliveryMode::Queue;
    config.tasks.batch = 0; // only submitted tasks
    config.tasks.ack_timeout = Duration::from_secs(3);
    config.tasks.window = 16;
    config.tasks.max_attempts = 100;
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let mut agent = agent_config(server.addr, "slow-agent");
    agent.handler = vec!["sh".into(), "-c".into(), "cat >/dev/null; sleep 2".into()];
    agent.handler_concurrency = 4;
    let mut agent = TestAgent::start(agent);
    agent.wait_for("connected", common::fleet::connected).await;
    for i in 0..20 {
        submit(&mut admin, &format!("slow-{i}"), "").await;
    }
    let reply = until(
        "all 20 tasks acked (5 rounds of 2 s)",
        || {
            let mut admin = admin.clone();
            async move {
                admin
                    .list_tasks(ListTasksRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
            }
        },
        |reply| {
            reply.tasks.len() == 20 && reply.tasks.iter().all(|t| t.state() == TaskState::Acked)
        },
    )
    .await;
    assert_eq!(
        reply.redelivered, 0,
        "no task timed out while it waited in the agent"
    );
    assert_eq!(reply.duplicate_acks, 0);
    common::assert_each_acked_once(&reply.tasks);
    agent.stop().await;
    server.stop().await;
}
