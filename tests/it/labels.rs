//! Agent labels and selectors against the real server with real agents:
//! what agents say of themselves (their labels and facts) is listed and
//! selected on, the server's pins are in force over any claim (also after a
//! reload), and a task submitted for a selector reaches only the agents it
//! matches.

use contactd::{
    agent::AgentEvent,
    config::{AgentPin, Config},
    labels::{FACTS, Labels},
    proto::{
        admin::{ListAgentsRequest, SubmitTaskRequest, admin_client::AdminClient},
        contact::Outcome,
    },
};
use tonic::{Code, transport::Channel};

use crate::common::{
    TestServer,
    fleet::{TestAgent, agent_config, handled},
    until,
};

fn labels(header: &str) -> Labels {
    Labels::from_header(header).unwrap()
}

fn pin(name: &str, header: &str) -> AgentPin {
    AgentPin {
        name: name.into(),
        labels: labels(header),
    }
}

/// A server that generates no tasks.
fn quiet(pins: Vec<AgentPin>) -> Config {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.server.agents = pins;
    config
}

fn agent(server: &TestServer, name: &str, claims: &str) -> TestAgent {
    let mut config = agent_config(server.addr, name);
    config.labels = labels(claims);
    TestAgent::start(config)
}

/// The names the server lists for `selector`, sorted.
async fn selected(admin: &mut AdminClient<Channel>, selector: &str) -> Vec<String> {
    let request = ListAgentsRequest {
        selector: selector.into(),
    };
    let mut names: Vec<String> = admin
        .list_agents(request)
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .map(|a| a.name)
        .collect();
    names.sort();
    names
}

/// Waits until the server lists `selector`'s agents as `want`.
async fn until_selected(admin: &AdminClient<Channel>, selector: &str, want: &[&str]) {
    until(
        &format!("agents {want:?} for {selector:?}"),
        || {
            let mut admin = admin.clone();
            async move { selected(&mut admin, selector).await }
        },
        |names| names.iter().map(String::as_str).eq(want.iter().copied()),
    )
    .await;
}

/// Picks the event of task `id` handled.
fn ran(id: u64) -> impl FnMut(&AgentEvent) -> Option<(u64, Outcome)> {
    move |event| handled(event).filter(|(task, _)| *task == id)
}

async fn submit_for(admin: &mut AdminClient<Channel>, text: &str, selector: &str) -> u64 {
    let request = SubmitTaskRequest {
        text: text.into(),
        selector: selector.into(),
        ..Default::default()
    };
    admin.submit_task(request).await.unwrap().into_inner().id
}

#[tokio::test]
async fn agents_report_their_labels_and_facts_and_selectors_pick_them() {
    let server = TestServer::start(quiet(Vec::new())).await;
    let mut admin = server.admin().await;
    let web = agent(&server, "web1", "role=web,region=eu");
    let db = agent(&server, "db1", "role=db,region=us");
    until_selected(&admin, "", &["db1", "web1"]).await;

    let listed = admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let web1 = listed.iter().find(|a| a.name == "web1").unwrap();
    assert_eq!(web1.labels.get("role").map(String::as_str), Some("web"));
    for fact in FACTS {
        assert!(
            web1.labels.get(fact).is_some_and(|v| !v.is_empty()),
            "{fact} missing from {:?}",
            web1.labels
        );
    }
    assert_eq!(
        web1.labels.get("os").map(String::as_str),
        Some(std::env::consts::OS)
    );

    assert_eq!(selected(&mut admin, "role=web").await, ["web1"]);
    assert_eq!(selected(&mut admin, "region!=eu").await, ["db1"]);
    assert_eq!(
        selected(&mut admin, "role in (web,db),!canary").await,
        ["db1", "web1"]
    );
    assert_eq!(selected(&mut admin, "name=db*").await, ["db1"]);
    assert!(selected(&mut admin, "role=cache").await.is_empty());

    let bad = admin
        .list_agents(ListAgentsRequest {
            selector: "role in (web".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("column"), "{}", bad.message());

    web.stop().await;
    db.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_task_for_a_selector_reaches_only_the_agents_it_matches() {
    let server = TestServer::start(quiet(Vec::new())).await;
    let mut admin = server.admin().await;
    let mut web = agent(&server, "web1", "role=web");
    let mut db = agent(&server, "db1", "role=db");
    until_selected(&admin, "", &["db1", "web1"]).await;

    let for_web = submit_for(&mut admin, "web only", "role=web").await;
    let for_all = crate::common::submit(&mut admin, "everyone", "").await;
    web.wait_for("web1 runs the web task", ran(for_web)).await;
    web.wait_for("web1 runs the task for all", ran(for_all))
        .await;
    // Tasks reach a stream in id order: db1's first is the one for all.
    let (db_first, _) = db.wait_for("db1 runs a task", handled).await;
    assert_eq!(db_first, for_all, "db1 ran the task meant for role=web");

    let tasks = admin
        .list_tasks(contactd::proto::admin::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let listed = tasks.iter().find(|t| t.id == for_web).unwrap();
    assert_eq!(listed.selector, "role=web");

    let both = admin
        .submit_task(SubmitTaskRequest {
            text: "x".into(),
            agent: "web1".into(),
            selector: "role=web".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(both.code(), Code::InvalidArgument);

    web.stop().await;
    db.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_claim_cannot_override_a_pinned_label_and_a_reload_repins_live() {
    let server = TestServer::start(quiet(vec![pin("web-*", "role=web")])).await;
    let mut admin = server.admin().await;
    // It claims to be a database server; the server pins it as web.
    let mut impostor = agent(&server, "web-1", "role=db,region=eu");
    until_selected(&admin, "role=web", &["web-1"]).await;
    assert!(selected(&mut admin, "role=db").await.is_empty());
    // Unpinned claims stand.
    assert_eq!(selected(&mut admin, "region=eu").await, ["web-1"]);

    let for_db = submit_for(&mut admin, "db only", "role=db").await;
    let for_web = submit_for(&mut admin, "web only", "role=web").await;
    let (first, _) = impostor.wait_for("web-1 runs a task", handled).await;
    assert_eq!(first, for_web, "the claim made web-1 a target of role=db");
    assert!(for_db < for_web);

    // A reload pins it elsewhere: in force for the connected agent at once.
    server.reload(|config| config.server.agents = vec![pin("web-*", "role=cache")]);
    until_selected(&admin, "role=cache", &["web-1"]).await;
    assert!(selected(&mut admin, "role=web").await.is_empty());

    impostor.stop().await;
    server.stop().await;
}
