//! Delivery modes, agent identity and the admin API against a real
//! in-process server, with agents played by real gRPC clients: broadcast
//! (what an agent missed, not what it acked), tasks for one agent and the
//! agent header, queue mode (each task acked once, limits on reload), acks
//! from an earlier server run, and how tasks go out on the wire.

use crate::common;

use std::{collections::HashMap, time::Duration};

use common::{TestServer, submit, within};
use contactd::{
    config::{Config, DeliveryMode},
    proto::{
        AGENT_HEADER,
        admin::{ListTasksRequest, TaskState},
        contact::{Empty, Outcome, Result as ResultMsg, ServerMsg, contact_client::ContactClient},
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Request, Status, Streaming,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

#[derive(Clone)]
struct Named(String);

impl Interceptor for Named {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AGENT_HEADER, self.0.parse().unwrap());
        Ok(request)
    }
}

type AgentClient = ContactClient<InterceptedService<Channel, Named>>;

/// A fake agent: its own connection, its name on every call, an ack stream.
struct Agent {
    tasks: Streaming<ServerMsg>,
    acks: mpsc::Sender<ResultMsg>,
    ack_call: tokio::task::JoinHandle<Result<tonic::Response<Empty>, Status>>,
}

impl Agent {
    async fn connect(server: &TestServer, name: &str) -> Agent {
        let mut client: AgentClient =
            ContactClient::with_interceptor(server.channel().await, Named(name.into()));
        let tasks = within("getTask", client.get_task(Empty {}))
            .await
            .unwrap()
            .into_inner();
        let (acks, rx) = mpsc::channel(1000);
        let ack_call =
            tokio::spawn(async move { client.tell_result(ReceiverStream::new(rx)).await });
        Agent {
            tasks,
            acks,
            ack_call,
        }
    }

    async fn next(&mut self) -> ServerMsg {
        within("a task", self.tasks.message())
            .await
            .unwrap()
            .expect("stream open")
    }

    async fn ack(&self, task: &ServerMsg, ok: bool) {
        let outcome = if ok { Outcome::Ok } else { Outcome::Failed };
        let result = ResultMsg {
            ret: "done".into(),
            task_id: task.id,
            outcome: outcome as i32,
            epoch: task.epoch,
        };
        self.acks.send(result).await.unwrap();
    }

    /// Half-closes the ack stream and waits until the server has them all.
    async fn finish(self) {
        drop(self.acks);
        within("acks accepted", self.ack_call)
            .await
            .unwrap()
            .unwrap();
    }
}

fn manual_tasks(mode: DeliveryMode) -> Config {
    let mut config = Config::default();
    config.tasks.batch = 0; // only submitted tasks
    config.tasks.mode = mode;
    config
}

// ---- broadcast: what an agent missed while away, not what it acked ----

#[tokio::test]
async fn broadcast_agents_get_what_they_missed_and_not_what_they_acked() {
    let server = TestServer::start(manual_tasks(DeliveryMode::Broadcast)).await;
    let mut admin = server.admin().await;
    let mut agent = Agent::connect(&server, "a1").await;
    for i in 1..=4 {
        submit(&mut admin, &format!("job {i}"), "").await;
    }
    for id in 1..=4 {
        let task = agent.next().await;
        assert_eq!(task.id, id);
        if id <= 2 {
            agent.ack(&task, true).await;
        }
    }
    agent.finish().await; // away, having acked 1 and 2 only
    for i in 5..=6 {
        submit(&mut admin, &format!("job {i}"), "").await;
    }
    let mut back = Agent::connect(&server, "a1").await;
    for id in 3..=6 {
        assert_eq!(
            back.next().await.id,
            id,
            "unacked and missed tasks, in order"
        );
    }
    // A seed-style client (no header) gets the replay as before.
    let mut seed = server
        .client()
        .await
        .get_task(Empty {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within("seed task", seed.message())
            .await
            .unwrap()
            .unwrap()
            .id,
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn broadcast_counts_what_left_retention_while_an_agent_was_away() {
    let mut config = manual_tasks(DeliveryMode::Broadcast);
    config.tasks.retain = 5;
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let mut agent = Agent::connect(&server, "a1").await;
    let first = submit(&mut admin, "first", "").await;
    let task = agent.next().await;
    agent.ack(&task, true).await;
    agent.finish().await;
    for i in 0..20 {
        submit(&mut admin, &format!("while away {i}"), "").await;
    }
    let mut back = Agent::connect(&server, "a1").await;
    assert_eq!(
        back.next().await.id,
        first + 16,
        "resumes at the oldest retained"
    );
    let a1 = common::agent(&mut admin, "a1").await;
    assert!(a1.named && a1.connected);
    assert_eq!(a1.missed, 15, "{a1:?}");
    server.stop().await;
}

// ---- tasks for one agent, and the agent header ----

#[tokio::test]
async fn a_task_for_one_agent_reaches_only_that_agent() {
    let server = TestServer::start(manual_tasks(DeliveryMode::Broadcast)).await;
    let mut admin = server.admin().await;
    let mut a = Agent::connect(&server, "a").await;
    let mut b = Agent::connect(&server, "b").await;
    let for_b = submit(&mut admin, "only b", "b").await;
    let all = submit(&mut admin, "everyone", "").await;
    assert_eq!(b.next().await.id, for_b);
    assert_eq!(b.next().await.id, all);
    assert_eq!(a.next().await.id, all, "a skips the task for b");
    server.stop().await;
}

#[tokio::test]
async fn a_task_for_another_agent_is_not_counted_as_missed_when_it_leaves_retention() {
    let mut config = manual_tasks(DeliveryMode::Broadcast);
    config.tasks.retain = 3;
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let mut a = Agent::connect(&server, "a").await;
    submit(&mut admin, "only b", "b").await;
    let all = submit(&mut admin, "everyone", "").await;
    let task = a.next().await;
    assert_eq!(task.id, all);
    a.ack(&task, true).await;
    a.finish().await;
    for i in 0..3 {
        submit(&mut admin, &format!("while away {i}"), "").await;
    }
    // Tasks 1 and 2 left retention: a acked one, the other was not for it.
    let mut back = Agent::connect(&server, "a").await;
    assert_eq!(back.next().await.id, all + 1);
    let a = common::agent(&mut admin, "a").await;
    assert_eq!(a.missed, 0, "{a:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_bad_agent_header_is_invalid_argument() {
    let server = TestServer::start(Config::default()).await;
    let mut client =
        ContactClient::with_interceptor(server.channel().await, Named("two words".into()));
    let err = client.get_task(Empty {}).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains(AGENT_HEADER), "{}", err.message());
    server.stop().await;
}

// ---- queue mode: each task acked once though an agent dies; limits follow reloads ----

#[tokio::test]
async fn queue_mode_acks_every_task_once_while_an_agent_dies_mid_run() {
    let mut config = manual_tasks(DeliveryMode::Queue);
    config.tasks.window = 4;
    // The dead agent's claims stand until their deadline (its connection
    // alone is gone: it might be running them), then go to the others.
    config.tasks.ack_timeout = Duration::from_secs(1);
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    for i in 0..200 {
        submit(&mut admin, &format!("job {i}"), "").await;
    }
    // Two agents work through the queue; a third takes tasks and dies
    // without acking them.
    let mut dying = Agent::connect(&server, "dying").await;
    let mut taken = Vec::new();
    for _ in 0..4 {
        taken.push(dying.next().await.id);
    }
    let workers: Vec<_> = ["w1", "w2"]
        .into_iter()
        .map(|name| {
            let server_addr = server.addr;
            tokio::spawn(async move {
                let channel = Endpoint::from_shared(format!("http://{server_addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut client = ContactClient::with_interceptor(channel, Named(name.into()));
                let mut tasks = client.get_task(Empty {}).await.unwrap().into_inner();
                let (acks, rx) = mpsc::channel(1000);
                let ack_call =
                    tokio::spawn(async move { client.tell_result(ReceiverStream::new(rx)).await });
                let mut handled = Vec::new();
                while let Ok(Some(task)) = tasks.message().await {
                    handled.push(task.id);
                    let ack = ResultMsg {
                        ret: "ok".into(),
                        task_id: task.id,
                        outcome: Outcome::Ok as i32,
                        epoch: task.epoch,
                    };
                    if acks.send(ack).await.is_err() {
                        break;
                    }
                }
                drop(acks);
                let _ = ack_call.await;
                handled
            })
        })
        .collect();
    drop(dying); // killed: its 4 unacked tasks go to the others at their deadline

    let mut admin2 = admin.clone();
    within("every task acked", async move {
        loop {
            let request = ListTasksRequest {
                state: TaskState::Acked as i32,
                limit: 0,
                after_id: 0,
            };
            let acked = admin2
                .list_tasks(request)
                .await
                .unwrap()
                .into_inner()
                .tasks
                .len();
            if acked == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let reply = admin
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.mode, "queue");
    assert_eq!(reply.tasks.len(), 200);
    common::assert_each_acked_once(&reply.tasks);
    assert_eq!(
        reply.redelivered, 4,
        "the dead agent's tasks were redelivered"
    );
    assert_eq!(reply.duplicate_acks, 0);
    server.shutdown.cancel();
    let mut by_worker = HashMap::new();
    for (i, worker) in workers.into_iter().enumerate() {
        let handled = within("worker end", worker).await.unwrap();
        by_worker.insert(i, handled);
    }
    let mut all: Vec<u64> = by_worker.values().flatten().copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 200, "every task reached a live worker");
    for id in taken {
        assert!(
            all.contains(&id),
            "task {id} taken by the dead agent was redelivered"
        );
    }
    within("server exit", server.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn queue_limits_follow_a_reload() {
    let mut config = manual_tasks(DeliveryMode::Queue);
    config.tasks.window = 1;
    let server = TestServer::start(config.clone()).await;
    let mut admin = server.admin().await;
    for i in 0..3 {
        submit(&mut admin, &format!("job {i}"), "").await;
    }
    let mut agent = Agent::connect(&server, "a1").await;
    assert_eq!(
        agent.next().await.id,
        1,
        "a window of one: one task at a time"
    );
    let request = ListTasksRequest {
        state: TaskState::Pending as i32,
        limit: 0,
        after_id: 0,
    };
    let pending = admin.list_tasks(request).await.unwrap().into_inner().tasks;
    assert_eq!(pending.iter().map(|t| t.id).collect::<Vec<_>>(), [2, 3]);
    config.tasks.window = 3;
    server.config.send_replace(std::sync::Arc::new(config));
    // Without any ack, the wider window lets the other two through.
    assert_eq!(agent.next().await.id, 2);
    assert_eq!(agent.next().await.id, 3);
    server.stop().await;
}

// ---- acks from an earlier server run are ignored ----

#[tokio::test]
async fn an_ack_from_an_earlier_server_run_is_ignored() {
    let server = TestServer::start(manual_tasks(DeliveryMode::Broadcast)).await;
    let mut admin = server.admin().await;
    let mut agent = Agent::connect(&server, "a1").await;
    submit(&mut admin, "one", "").await;
    submit(&mut admin, "two", "").await;
    let (one, two) = (agent.next().await, agent.next().await);
    assert_ne!(one.epoch, 0);
    let mut stale = two.clone();
    stale.epoch = one.epoch.wrapping_add(1).max(1);
    agent.ack(&one, true).await;
    agent.ack(&stale, true).await;
    agent.finish().await;
    let tasks = admin
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let acked: Vec<u32> = tasks.iter().map(|t| t.acked).collect();
    assert_eq!(acked, [1, 0], "{tasks:?}");
    server.stop().await;
}

// ---- on the wire: tasks encoded once, in few DATA frames; too large, refused ----

/// Opens getTask as `name` on a raw HTTP/2 connection and reads DATA
/// frames until `count` tasks came; returns each frame's tasks (a frame
/// holds whole messages only) and the bytes of all.
async fn task_frames(
    server: &TestServer,
    name: &str,
    count: usize,
) -> (Vec<Vec<ServerMsg>>, Vec<u8>) {
    use prost::Message;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Windows larger than all the test sends: only the server's framing
    // decides where frames end.
    let (sender, connection): (h2::client::SendRequest<bytes::Bytes>, _) =
        h2::client::Builder::new()
            .initial_window_size(8 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake(tcp)
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut sender = within("stream capacity", sender.ready()).await.unwrap();
    let request = http::Request::post(format!("http://{}/Contact/getTask", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(AGENT_HEADER, name)
        .body(())
        .unwrap();
    let (response, mut body) = sender.send_request(request, false).unwrap();
    // The request: one empty message.
    body.send_data(vec![0u8; 5].into(), true).unwrap();
    let response = within("getTask's headers", response).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let mut data = response.into_body();
    let (mut frames, mut all, mut tasks) = (Vec::new(), Vec::new(), 0);
    while tasks < count {
        let frame = within("a DATA frame", data.data()).await.unwrap().unwrap();
        let _ = data.flow_control().release_capacity(frame.len());
        all.extend_from_slice(&frame);
        let mut rest = &frame[..];
        let mut messages = Vec::new();
        while !rest.is_empty() {
            assert_eq!(rest[0], 0, "uncompressed");
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            messages.push(ServerMsg::decode(&rest[5..5 + len]).unwrap());
            rest = &rest[5 + len..];
        }
        tasks += messages.len();
        frames.push(messages);
    }
    (frames, all)
}

#[tokio::test]
async fn ready_tasks_go_out_encoded_once_as_whole_messages_in_few_data_frames() {
    let store = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.store.path = Some(store.path().join("contactd.db"));
    // One batch of 300 at once, and no other for the test's length.
    config.tasks.batch = 300;
    config.tasks.interval = Duration::from_secs(3600);
    let server = TestServer::start(config.clone()).await;
    let mut admin = server.admin().await;
    let ids_of = |frames: &[Vec<ServerMsg>]| -> Vec<Vec<u64>> {
        frames
            .iter()
            .map(|f| f.iter().map(|t| t.id).collect())
            .collect()
    };
    common::until(
        "the batch",
        || {
            let mut admin = admin.clone();
            async move {
                let request = ListTasksRequest {
                    state: 0,
                    limit: 0,
                    after_id: 0,
                };
                admin
                    .list_tasks(request)
                    .await
                    .unwrap()
                    .into_inner()
                    .tasks
                    .len()
            }
        },
        |n| *n == 300,
    )
    .await;
    // The batch is one block: ~9 KiB, so one run, one DATA frame.
    let (frames, first_bytes) = task_frames(&server, "a", 300).await;
    assert_eq!(ids_of(&frames), vec![(1..=300).collect::<Vec<u64>>()]);
    let epoch = frames[0][0].epoch;
    assert_ne!(epoch, 0);
    assert!(
        frames[0]
            .iter()
            .all(|t| t.attempt == 1 && t.epoch == epoch && t.task.starts_with("task:"))
    );
    // Another agent gets the same bytes.
    let (_, again) = task_frames(&server, "b", 300).await;
    assert_eq!(again, first_bytes);
    // The same tasks through tonic's client, as an agent sees them.
    let mut agent = Agent::connect(&server, "c").await;
    for id in 1..=300 {
        assert_eq!(agent.next().await, frames[0][id - 1]);
    }

    // A task for another agent between two for all: the stream skips it,
    // and the tasks either side do not share a frame. After a restart the
    // retained tasks are one block.
    assert_eq!(submit(&mut admin, "for z", "z").await, 301);
    assert_eq!(submit(&mut admin, "for all", "").await, 302);
    server.stop().await;
    config.tasks.batch = 0;
    let server = TestServer::start(config.clone()).await;
    let (frames, _) = task_frames(&server, "d", 301).await;
    let mut expected: Vec<Vec<u64>> = vec![(1..=300).collect()];
    expected.push(vec![302]);
    assert_eq!(ids_of(&frames), expected);
    assert_eq!(frames[1][0].task, "for all");
    let (frames, _) = task_frames(&server, "z", 302).await;
    assert_eq!(ids_of(&frames), vec![(1..=302).collect::<Vec<u64>>()]);

    // Tasks published apart (each submitted alone) are blocks of their
    // own: a frame each, however many wait. After a restart they are one
    // block again, sent in full frames of up to 16 KiB. 600 tasks of 1 KiB
    // (each message: 1,000 bytes of text, 24 of the rest).
    let text = "y".repeat(1000);
    let mut admin = server.admin().await;
    for id in 303..=902 {
        assert_eq!(submit(&mut admin, &text, "").await, id);
    }
    let expected: Vec<u64> = (1..=300).chain(302..=902).collect();
    let (frames, _) = task_frames(&server, "e", 901).await;
    assert_eq!(frames.len(), 2 + 600);
    assert_eq!(ids_of(&frames).concat(), expected);
    server.stop().await;
    let server = TestServer::start(config).await;
    let (frames, _) = task_frames(&server, "f", 901).await;
    let bytes = |frame: &[ServerMsg]| -> usize {
        use prost::Message;
        frame.iter().map(|t| 5 + t.encoded_len()).sum()
    };
    let sizes: Vec<usize> = frames.iter().map(|f| bytes(f)).collect();
    assert!(frames.len() <= 2 + 600 / 15, "{sizes:?}");
    for (i, frame) in frames.iter().enumerate() {
        assert!(sizes[i] <= 16 * 1024, "{sizes:?}");
        // Full, unless the next task does not follow it (301 is skipped):
        // the next task did not fit.
        let last = frame.last().unwrap().id;
        if let Some(next) = frames.get(i + 1).filter(|next| next[0].id == last + 1) {
            assert!(sizes[i] + bytes(&next[..1]) > 16 * 1024, "{sizes:?}");
        }
    }
    assert_eq!(ids_of(&frames).concat(), expected);
    server.stop().await;
}

#[tokio::test]
async fn a_task_too_large_to_send_is_refused_at_submit() {
    let mut config = manual_tasks(DeliveryMode::Broadcast);
    config.server.max_message_size = bytesize::ByteSize::kib(1);
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let refused = admin
        .submit_task(contactd::proto::admin::SubmitTaskRequest {
            text: "x".repeat(961),
            agent: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("server.max_message_size (1KiB)"),
        "{refused:?}"
    );
    // The largest that fits goes through, and out to an agent.
    let text = "x".repeat(960);
    assert_eq!(submit(&mut admin, &text, "").await, 1);
    let mut agent = Agent::connect(&server, "a").await;
    assert_eq!(agent.next().await.task, text);
    server.stop().await;
}
