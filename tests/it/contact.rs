//! The Contact service's four RPCs against a real in-process server.

use crate::common;

use std::time::Duration;

use common::{TestServer, with_commands, within};
use contactd::{
    config::Config,
    proto::contact::{
        ClientMsg, CmdRequest, Empty, Outcome, Result as ResultMsg, ServerMsg,
        contact_client::ContactClient,
    },
};
use futures_util::future::{join_all, select_all};
use tonic::{Code, Streaming};

async fn next(stream: &mut Streaming<ServerMsg>) -> ServerMsg {
    within("a task", stream.message())
        .await
        .unwrap()
        .expect("the stream stays open")
}

#[tokio::test]
async fn send_status_answers_every_message_in_order() {
    let server = TestServer::start(Config::default()).await;
    let mut client = server.client().await;
    let messages = (0..100).map(|i| ClientMsg {
        msg: format!("status {i}"),
    });
    let mut replies = client
        .send_status(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    for i in 0..100 {
        let reply = within("a reply", replies.message()).await.unwrap().unwrap();
        assert_eq!(reply.ret, format!("server received: status {i}"));
    }
    assert!(
        within("the end", replies.message())
            .await
            .unwrap()
            .is_none()
    );
    server.stop().await;
}

#[tokio::test]
async fn tell_result_accepts_results_with_and_without_ids() {
    let server = TestServer::start(Config::default()).await;
    let mut client = server.client().await;
    let results = vec![
        ResultMsg {
            ret: "seed-style free text".into(),
            ..Default::default()
        },
        ResultMsg {
            ret: "ok".into(),
            task_id: 1,
            outcome: Outcome::Ok as i32,
            ..Default::default()
        },
        ResultMsg {
            ret: "exit 1".into(),
            task_id: 2,
            outcome: Outcome::Failed as i32,
            ..Default::default()
        },
    ];
    let reply = within(
        "tellResult",
        client.tell_result(tokio_stream::iter(results)),
    )
    .await;
    assert_eq!(reply.unwrap().into_inner(), Empty {});
    server.stop().await;
}

fn fast_tasks(interval_ms: u64, batch: u32, retain: usize) -> Config {
    let mut config = Config::default();
    config.tasks.interval = Duration::from_millis(interval_ms);
    config.tasks.batch = batch;
    config.tasks.retain = retain;
    config.tasks.template = "job {seq}".parse().unwrap();
    config
}

#[tokio::test]
async fn every_stream_gets_every_task_in_order_and_late_streams_get_the_replay() {
    // One batch at start-up, then nothing for an hour: the backlog is fixed.
    let server = TestServer::start(fast_tasks(3_600_000, 10, 100)).await;
    let (mut a, mut b) = (server.client().await, server.client().await);
    let mut first = a.get_task(Empty {}).await.unwrap().into_inner();
    let mut second = b.get_task(Empty {}).await.unwrap().into_inner();
    for id in 1..=10 {
        let (x, y) = (next(&mut first).await, next(&mut second).await);
        assert_eq!((x.id, x.task.as_str()), (id, format!("job {id}").as_str()));
        assert_eq!(x, y);
    }
    let mut late = a.get_task(Empty {}).await.unwrap().into_inner();
    assert_eq!(
        next(&mut late).await.id,
        1,
        "replay starts with the oldest retained task"
    );
    server.stop().await;
}

#[tokio::test]
async fn without_replay_a_stream_starts_with_new_tasks() {
    let mut config = fast_tasks(50, 1, 100);
    config.tasks.replay = false;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut watcher = client.get_task(Empty {}).await.unwrap().into_inner();
    let seen = next(&mut watcher).await.id;
    let mut late = client.get_task(Empty {}).await.unwrap().into_inner();
    assert!(next(&mut late).await.id > seen, "no replay of task {seen}");
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_stream_is_skipped_ahead_not_buffered() {
    let server = TestServer::start(fast_tasks(1, 100, 200)).await;
    // A small receive window, so what is in flight to the stalled client is
    // bounded by flow control (tonic's default stream window is 2MiB).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(64 * 1024))
        .initial_connection_window_size(Some(64 * 1024))
        .connect()
        .await
        .unwrap();
    let mut stalled = ContactClient::new(channel)
        .get_task(Empty {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stalled).await.id;
    // 15,000 tasks: far more than flow control lets through (~3,000 of these
    // small tasks fit in 64KiB) plus the ring (200). A debug build on a busy
    // 2-core machine publishes a few thousand a second, so this wait has its
    // own, wider bound: it is about behaviour, not speed.
    let target = first + 15_000;
    // A second, reading stream shows when 15,000 more tasks were published.
    let mut reader = server
        .client()
        .await
        .get_task(Empty {})
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    let published = tokio::time::timeout(common::LIMIT, async {
        while seen < target {
            seen = next(&mut reader).await.id;
        }
    })
    .await;
    assert!(published.is_ok(), "only {seen} of {target} tasks published");
    // The stalled stream holds at most what flow control let through before
    // it stalled, plus the ring; then it jumps ahead instead of replaying all.
    let (mut received, mut previous, mut widest_gap) = (0, first, 0);
    within("the stalled stream to catch up", async {
        while previous < target {
            let task = next(&mut stalled).await;
            received += 1;
            widest_gap = widest_gap.max(task.id - previous - 1);
            previous = task.id;
        }
    })
    .await;
    assert!(widest_gap > 5_000, "widest gap only {widest_gap}");
    assert!(
        received < 8_000,
        "{received} tasks were buffered for a stalled stream"
    );
    server.stop().await;
}

#[tokio::test]
async fn remote_commands_are_off_by_default() {
    let server = TestServer::start(Config::default()).await;
    let err = server
        .client()
        .await
        .remote_cmd(cmd(1, "true"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("enabled = true"),
        "{}",
        err.message()
    );
    server.stop().await;
}

fn cmd(index: i32, line: &str) -> CmdRequest {
    CmdRequest {
        index,
        cmd_str: line.into(),
        log: format!("test {index}"),
    }
}

#[tokio::test]
async fn only_allow_listed_commands_run() {
    let server = TestServer::start(with_commands(&["echo *", "true"])).await;
    let mut client = server.client().await;
    let ok = client
        .remote_cmd(cmd(7, "echo 'two words'"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ok.index, ok.success, ok.res.as_str()),
        (7, true, "two words\n")
    );
    for denied in ["true --now", "rm -rf /", "sh -c 'echo hi'"] {
        let err = client.remote_cmd(cmd(1, denied)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{denied}");
        assert!(err.message().contains(denied), "{}", err.message());
    }
    let err = client
        .remote_cmd(cmd(1, "echo 'unbalanced"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn many_concurrent_commands_all_answer_with_their_index() {
    let mut config = with_commands(&["echo *"]);
    config.remote_cmd.max_concurrent = 8;
    config.remote_cmd.max_queued = 100;
    let server = TestServer::start(config).await;
    let client = server.client().await;
    let calls = (0..64).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move { client.remote_cmd(cmd(i, &format!("echo {i}"))).await })
    });
    for (i, call) in calls.enumerate() {
        let reply = within("a command", call)
            .await
            .unwrap()
            .unwrap()
            .into_inner();
        assert_eq!((reply.index, reply.success), (i as i32, true));
        assert_eq!(reply.res, format!("{i}\n"));
    }
    server.stop().await;
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted() {
    // Each call blocks reading its own fifo until the test writes to it.
    let dir = tempfile::tempdir().unwrap();
    let fifos: Vec<_> = (0..5)
        .map(|i| dir.path().join(format!("release-{i}")))
        .collect();
    for fifo in &fifos {
        assert!(
            std::process::Command::new("mkfifo")
                .arg(fifo)
                .status()
                .unwrap()
                .success()
        );
    }
    let mut config = with_commands(&["cat *"]);
    config.remote_cmd.max_concurrent = 1;
    config.remote_cmd.max_queued = 1;
    let server = TestServer::start(config).await;
    let client = server.client().await;
    let mut calls: Vec<_> = fifos
        .iter()
        .enumerate()
        .map(|(i, fifo)| {
            let (mut client, line) = (client.clone(), format!("cat {}", fifo.display()));
            Box::pin(async move { (i, client.remote_cmd(cmd(i as i32, &line)).await) })
        })
        .collect();
    // One runs, one waits for its slot, three are turned away at once.
    let mut admitted: Vec<usize> = (0..fifos.len()).collect();
    for _ in 0..3 {
        let ((i, refused), _, rest) = within("a refusal", select_all(calls)).await;
        let err = refused.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.message().contains("max_queued"), "{}", err.message());
        admitted.retain(|&a| a != i);
        calls = rest;
    }
    // Release both admitted commands; each write waits for its reader.
    let writers: Vec<_> = admitted
        .iter()
        .map(|&i| {
            let fifo = fifos[i].clone();
            tokio::task::spawn_blocking(move || std::fs::write(fifo, "done\n").unwrap())
        })
        .collect();
    for (i, reply) in within("the released commands", join_all(calls)).await {
        let reply = reply.unwrap().into_inner();
        assert_eq!(
            (reply.index, reply.success, reply.res.as_str()),
            (i as i32, true, "done\n")
        );
    }
    for writer in writers {
        within("a writer", writer).await.unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn a_command_past_its_timeout_is_killed_and_says_so() {
    let mut config = with_commands(&["sleep *", "/nonexistent/tool"]);
    config.remote_cmd.timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let reply = within("a timed-out command", client.remote_cmd(cmd(3, "sleep 30")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.index, reply.success), (3, false));
    assert!(
        reply.res.contains("killed after the 300ms timeout"),
        "{}",
        reply.res
    );
    let missing = client
        .remote_cmd(cmd(4, "/nonexistent/tool"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !missing.success && missing.res.contains("cannot start"),
        "{missing:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let server = TestServer::start(fast_tasks(3_600_000, 1, 10)).await;
    let mut client = server.client().await;
    let mut tasks = client.get_task(Empty {}).await.unwrap().into_inner();
    next(&mut tasks).await;
    let (_keep_open, statuses) = tokio::sync::mpsc::channel::<ClientMsg>(1);
    let mut replies = client
        .send_status(tokio_stream::wrappers::ReceiverStream::new(statuses))
        .await
        .unwrap()
        .into_inner();
    server.shutdown.cancel();
    let end = within("the task stream's end", tasks.message())
        .await
        .unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    let end = within("the status stream's end", replies.message())
        .await
        .unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    within("server exit", server.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn reflection_lists_every_service_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = TestServer::start(Config::default()).await;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = within("v1 reflection", replies.message())
        .await
        .unwrap()
        .unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("{reply:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    // Not the admin service: it is served on the admin socket only.
    assert_eq!(
        names,
        [
            "Contact",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection"
        ]
    );

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        within("v1alpha reflection", replies.message())
            .await
            .unwrap()
            .is_some()
    );
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_and_slots_come_back() {
    let mut config = Config::default();
    config.server.max_connections = 2;
    let server = TestServer::start(config).await;
    let (mut a, mut b) = (server.client().await, server.client().await);
    // Both connections carry a call, so both are surely open.
    let held = (
        a.get_task(Empty {}).await.unwrap().into_inner(),
        b.get_task(Empty {}).await.unwrap().into_inner(),
    );
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr)).unwrap();
    let third = match endpoint.connect().await {
        Err(_) => None,
        Ok(channel) => Some(ContactClient::new(channel).get_task(Empty {}).await),
    };
    // Closed at once: the client sees a failed connection or call.
    if let Some(result) = third {
        let code = result.unwrap_err().code();
        assert!(
            matches!(code, Code::Unavailable | Code::Cancelled | Code::Unknown),
            "{code:?}"
        );
    }
    // Once a connection closes, its slot serves a new one.
    drop((a, b, held));
    within("a free slot", async {
        loop {
            if let Ok(channel) = endpoint.connect().await
                && ContactClient::new(channel).get_task(Empty {}).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    server.stop().await;
}
