//! Hostile input: caller text escaped and cut, messages over their limits,
//! config values the server survives (at the ends of every range, and
//! generated within them), reloads that fail closed, start-up config
//! failures exiting 78, globs that do not climb, nothing outliving a
//! command, and the operator commands' edges.
//! Real servers (in-process on 127.0.0.1:0) and the real binary, in the
//! seed's plaintext setup without identities (remoteCMD governed by
//! remote_cmd alone), as trust.rs covers the setups with them.

use crate::common;

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use common::{LIMIT, TestServer, daemon::Daemon, with_commands, within};
use contactd::{
    config::Config,
    proto::{
        admin::ListTasksRequest,
        contact::{ClientMsg, CmdRequest, Result as ResultMsg},
    },
};
use nix::sys::signal::Signal;
use tonic::{Code, transport::Channel};

fn cmd(line: &str, note: &str) -> CmdRequest {
    CmdRequest {
        index: 1,
        cmd_str: line.into(),
        log: note.into(),
    }
}

fn contactd(args: &[&str]) -> std::process::Output {
    common::contactd()
        .args(args)
        .output()
        .expect("run contactd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---- caller input is data, never format; messages over their limit are refused ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_command_lines_are_escaped_cut_and_rate_limited() {
    // The 3 MB command line below fits server.max_message_size (4MiB), not
    // the default server.max_command_message: raised to reach the matcher.
    let mut daemon = Daemon::start(
        "[server]\nmax_command_message = \"4MiB\"\n[tasks]\nbatch = 0\n\
         [remote_cmd]\nenabled = true\nallow = [\"echo *\"]\n",
    );
    let channel = within(
        "connect",
        Channel::from_shared(format!("http://{}", daemon.addr))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let mut client = contactd::proto::contact::contact_client::ContactClient::new(channel);
    let forged = format!(
        "rm\n2026-11-28T00:00:00Z  INFO contactd: FORGED\r\0{}",
        "x".repeat(3_000_000)
    );
    let err = client
        .remote_cmd(cmd(&forged, "note\nFORGED-NOTE"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let message = err.message();
    assert!(message.len() < 1024, "{} bytes", message.len());
    assert!(message.contains("rm\\n2026"), "{message}");
    let noted = format!("[{} bytes in all]", forged.len());
    assert!(
        message.contains(&noted),
        "the original length is noted: {message}"
    );
    assert!(!message.contains(['\n', '\r', '\0']), "{message}");
    for _ in 0..30 {
        let err = client.remote_cmd(cmd("rm -rf /", "x")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
    let log = &daemon.log;
    assert!(
        log.iter().all(|l| !l.starts_with("2026-11-28T00:00:00Z")
            && !l.starts_with("FORGED-NOTE")
            && !l.contains(['\r', '\0'])),
        "a forged line reached the log:\n{}",
        log.join("\n")
    );
    let refused: Vec<_> = log
        .iter()
        .filter(|l| l.contains("remote command refused"))
        .collect();
    assert_eq!(
        refused.len(),
        5,
        "5 a minute per caller:\n{}",
        log.join("\n")
    );
    assert!(
        refused[0].contains("rm\\n2026") && refused[0].len() < 2048,
        "{}",
        refused[0]
    );
}

#[tokio::test]
async fn send_status_answers_an_oversized_or_undecodable_message_with_an_error() {
    let mut config = Config::default();
    config.server.max_message_size = bytesize::ByteSize::kib(1);
    // sendStatus messages have their own limit, at most max_message_size.
    config.server.max_status_message = bytesize::ByteSize::kib(1);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let messages = vec![
        ClientMsg { msg: "fine".into() },
        ClientMsg {
            msg: "y".repeat(2000),
        },
    ];
    let mut replies = client
        .send_status(futures_util::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    let first = within("a reply", replies.message()).await.unwrap();
    assert_eq!(first.unwrap().ret, "server received: fine");
    let err = within("the error", replies.message()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Field 1 as a varint where ClientMsg has a string: cannot be decoded.
    #[derive(Clone, PartialEq, prost::Message)]
    struct NotAClientMsg {
        #[prost(uint64, tag = "1")]
        msg: u64,
    }
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<NotAClientMsg, ResultMsg>::default();
    let request = tonic::Request::new(futures_util::stream::iter(vec![NotAClientMsg { msg: 7 }]));
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/Contact/sendStatus");
    let mut replies = grpc
        .streaming(request, path, codec)
        .await
        .unwrap()
        .into_inner();
    let err = within("the error", replies.message()).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("decode"), "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn each_call_refuses_a_message_over_its_own_limit_with_resource_exhausted() {
    let mut config = with_commands(&["echo *"]);
    config.server.max_command_message = bytesize::ByteSize::kib(1);
    config.server.max_result_message = bytesize::ByteSize::kib(1);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    client.remote_cmd(cmd("echo fits", "")).await.unwrap();
    // remoteCMD is unary: tonic refuses it before any handler runs.
    let long = format!("echo {}", "x".repeat(2000));
    let err = client.remote_cmd(cmd(&long, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("server.max_command_message"),
        "{err:?}"
    );
    let results = vec![ResultMsg {
        ret: "y".repeat(2000),
        ..ResultMsg::default()
    }];
    let err = client
        .tell_result(futures_util::stream::iter(results))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("server.max_result_message"),
        "{err:?}"
    );
    // Nothing else on the connection suffered.
    client.remote_cmd(cmd("echo again", "")).await.unwrap();
    server.stop().await;
}

// ---- config values serve survives: every range's ends ----

#[test]
fn check_config_enforces_every_range_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[server]\nmax_connections = 0\nkeepalive_interval = \"99999years\"\n\
         max_message_size = \"99999EiB\"\n\
         [tasks]\nbatch = 4294967295\ninterval = \"100years\"\n\
         [remote_cmd]\nmax_concurrent = 9223372036854775807\nallow = [\"* *\"]\n\
         [log]\nlevel = \"chatty!!\"\nbackups = 100000000\nbuffer_lines = 100000000000\n",
    )
    .unwrap();
    let out = contactd(&["check-config", "-c", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = text(&out.stderr);
    let file = path.display().to_string();
    for needle in [
        format!(
            "{file}:2:19: server.max_connections: 0 is out of range: expected from 1 to 1000000"
        ),
        format!("{file}:3:22: server.keepalive_interval:"),
        format!("{file}:4:20: server.max_message_size: size \"99999EiB\" is too large"),
        format!("{file}:6:9: tasks.batch: 4294967295 is out of range"),
        format!("{file}:7:12: tasks.interval:"),
        format!("{file}:9:18: remote_cmd.max_concurrent: 9223372036854775807 is out of range"),
        format!("{file}:10:9: remote_cmd.allow: pattern \"* *\" lets any program run"),
        format!("{file}:12:9: log.level: invalid filter \"chatty!!\""),
        format!("{file}:13:11: log.backups:"),
        format!("{file}:14:16: log.buffer_lines:"),
    ] {
        assert!(stderr.contains(&needle), "missing {needle:?} in:\n{stderr}");
    }
    std::fs::write(&path, "[remote_cmd]\nallow = [\"*\"]\nallow_any = true\n").unwrap();
    let out = contactd(&["check-config", "-c", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The documented ranges' ends, all at once: the real binary starts with
/// the maxima, reloads to the minima, and back, answering health throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_and_reloads_at_the_ends_of_every_range() {
    let maxima = "[server]\nbacklog = 65535\nmax_connections = 1000000\n\
        max_message_size = \"64MiB\"\nmax_concurrent_streams = 4096\n\
        keepalive_interval = \"2h\"\nkeepalive_timeout = \"1h\"\ngrace_period = \"1h\"\n\
        max_callers = 1000000\nmax_status_size = \"1MiB\"\n\
        handshake_timeout = \"5m\"\nmax_handshakes = 65536\nmax_status_message = \"64MiB\"\n\
        max_result_message = \"64MiB\"\nmax_command_message = \"64MiB\"\n\
        max_connection_buffer = \"64GiB\"\nmax_buffered = \"64GiB\"\n\
        connection_window = \"16MiB\"\nstream_window = \"16MiB\"\n\
        accept_rate = 1000000\naccept_burst = 1000000\n\
        [tasks]\ninterval = \"7days\"\nbatch = 10000\nretain = 1000000\n\
        ack_timeout = \"1day\"\nmax_attempts = 1000\nwindow = 10000\nmax_pending = 10000000\n\
        [remote_cmd]\nenabled = true\nallow = [\"echo *\"]\ntimeout = \"1day\"\n\
        max_concurrent = 1024\nmax_queued = 65536\nmax_output = \"4095KiB\"\n\
        [log]\nlevel = \"info\"\nmax_size = \"64GiB\"\nbackups = 1000\nkeep = 1000\n\
        buffer_lines = 262144\n";
    let minima = "[server]\nbacklog = 1\nmax_connections = 1\nmax_message_size = \"1KiB\"\n\
        max_concurrent_streams = 1\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"\n\
        grace_period = \"0s\"\nmax_callers = 1\nmax_status_size = \"1B\"\n\
        handshake_timeout = \"100ms\"\nmax_handshakes = 1\nmax_status_message = \"1KiB\"\n\
        max_result_message = \"1KiB\"\nmax_command_message = \"1KiB\"\n\
        max_connection_buffer = \"64KiB\"\nmax_buffered = \"1MiB\"\n\
        connection_window = \"64KiB\"\nstream_window = \"64KiB\"\n\
        accept_rate = 1\naccept_burst = 1\n\
        [tasks]\ninterval = \"1ms\"\nbatch = 0\nretain = 1\nack_timeout = \"10ms\"\n\
        max_attempts = 1\nwindow = 1\nmax_pending = 1\n\
        [remote_cmd]\nenabled = true\nallow = [\"echo *\"]\ntimeout = \"10ms\"\n\
        max_concurrent = 1\nmax_queued = 0\nmax_output = \"1B\"\n\
        [log]\nlevel = \"info\"\nmax_size = \"1KiB\"\nbackups = 0\nkeep = 1\nbuffer_lines = 1\n";
    let mut daemon = Daemon::start(maxima);
    let admin = format!(
        "\n[admin]\nsocket = \"{}\"\n",
        daemon.dir.path().join("admin.sock").display()
    );
    for (i, config) in [minima, maxima, minima].into_iter().enumerate() {
        let config = config.replacen("[server]", "[server]\nlisten = \"127.0.0.1:0\"", 1);
        std::fs::write(daemon.config_path(), format!("{config}{admin}")).unwrap();
        let out = contactd(&["check-config", "-c", daemon.config_path().to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        daemon.signal(Signal::SIGHUP);
        daemon.wait_for_lines("config reloaded", i + 1);
        let probe = contactd(&["health", "--addr", &daemon.addr.to_string()]);
        assert_eq!(probe.status.code(), Some(0), "{}", text(&probe.stderr));
    }
    assert!(
        !daemon
            .log
            .iter()
            .any(|l| l.contains("panicked") || l.contains("a bug")),
        "{}",
        daemon.log.join("\n")
    );
    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(LIMIT).code(),
        Some(0),
        "{}",
        daemon.log.join("\n")
    );
}

// ---- a storm of new connections is paced ----

/// `count` connections made at once, each calling getTask: how each call
/// began.
async fn get_tasks_at_once(server: &TestServer, count: usize) -> Vec<Result<(), tonic::Status>> {
    let calls = (0..count).map(|_| async {
        let channel = server.channel().await;
        let mut client = contactd::proto::contact::contact_client::ContactClient::new(channel);
        within(
            "getTask",
            client.get_task(contactd::proto::contact::Empty {}),
        )
        .await
        .map(drop)
    });
    futures_util::future::join_all(calls).await
}

/// Above `server.accept_rate`, a plaintext connection is answered
/// UNAVAILABLE with gRPC's retry hint (its turn) and counted; an agent
/// turned away waits the hint (its failure backoff, an hour here, starts
/// over), then gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_above_the_accept_rate_are_told_when_to_come_back() {
    let mut config = Config::default();
    config.server.accept_rate = 1;
    config.server.accept_burst = 1;
    let server = TestServer::start(config).await;
    // Each admission moves the next turn a second on: of 4 connections made
    // at once, all but the first are turned away (unless this machine takes
    // a second to make them), each given a turn of its own, a second apart,
    // before the agent below.
    let (mut admitted, mut hint) = (0, None);
    for outcome in get_tasks_at_once(&server, 4).await {
        match outcome {
            Ok(()) => admitted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    status.message().contains("server.accept_rate"),
                    "{status:?}"
                );
                hint = Some(contactd::proto::retry_hint(&status).expect("a retry hint"));
            }
        }
    }
    let hint = hint.expect("a connection turned away");
    assert!(admitted >= 1);
    assert!(
        hint > Duration::ZERO && hint <= Duration::from_secs(60),
        "{hint:?}"
    );

    let mut agent_config = common::fleet::agent_config(server.addr, "patient");
    agent_config.backoff.initial = Duration::from_secs(3600);
    agent_config.backoff.max = Duration::from_secs(3600);
    agent_config.retry_hint_jitter = Duration::ZERO;
    let mut agent = common::fleet::TestAgent::start(agent_config);
    let delay = agent
        .wait_for("turned away", |e| match e.kind {
            contactd::agent::EventKind::Waiting { delay } => Some(delay),
            _ => None,
        })
        .await;
    assert!(delay < Duration::from_secs(3600), "{delay:?}");
    agent.wait_for("connected", common::fleet::connected).await;
    agent.stop().await;

    server.stop().await;
}

/// A storm above `server.accept_rate` larger than the answers the server
/// gives at once (`server.max_handshakes`, 2 here): every connection gets
/// in or gets an answer with a hint; none is closed unanswered (which sent
/// its agent into the failure backoff: about a thousand of the 10,000 in
/// the bench's restart storm). The excess waits in the backlog for a free
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_above_the_accept_rate_is_answered_not_closed() {
    let mut config = Config::default();
    config.server.accept_rate = 1;
    config.server.accept_burst = 1;
    config.server.max_handshakes = 2;
    config.server.max_handshakes_per_address = 2;
    let server = TestServer::start(config).await;
    let (mut admitted, mut hinted) = (0, 0);
    for outcome in get_tasks_at_once(&server, 24).await {
        match outcome {
            Ok(()) => admitted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    contactd::proto::retry_hint(&status).is_some(),
                    "turned away without a hint: {status:?}"
                );
                hinted += 1;
            }
        }
    }
    assert!(
        admitted >= 1 && hinted >= 20,
        "{admitted} in, {hinted} hinted"
    );
    server.stop().await;
}

/// At its open-files limit the server refuses the connection that does not
/// fit at once (closed, counted, logged) rather than leaving it in the
/// backlog, and goes on serving the connections it has; once one closes, a
/// new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_open_files_limit_new_connections_are_refused_and_the_rest_served() {
    let mut daemon = Daemon::start("[tasks]\nbatch = 0\n");
    let pid = daemon.process.child.id() as i32;
    // The limit: what the server has open now, and 8 more.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let limit = libc::rlimit {
        rlim_cur: open + 8,
        rlim_max: open + 8,
    };
    // SAFETY: prlimit(2) with a valid limit and no old-limit pointer.
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    let addr = daemon.addr;
    let connect = || async move {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await?;
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map_err(|status| status.to_string())
            .map_err(Into::<Box<dyn std::error::Error + Send + Sync>>::into)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(channel)
    };
    // Connections until one is refused (bounded: 8 fit at most).
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..32 {
        match within("a connection, or its refusal", connect()).await {
            Ok(channel) => held.push(channel),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert!(refused.is_some(), "no connection refused at the limit");
    assert!(!held.is_empty());
    tokio::task::block_in_place(|| daemon.wait_for_line("at its open-files limit"));
    // Those it has are served.
    for channel in &held {
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
    }
    // One leaves: a new one gets in.
    drop(held.pop());
    within("a connection after one closed", async {
        while connect().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}

// ---- reloads fail closed, and say what they open ----

/// getTask's answer to a call with `token` (none: no header).
async fn get_task_with(addr: std::net::SocketAddr, token: Option<&str>) -> Result<(), Code> {
    let channel = within(
        "connect",
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let mut request = tonic::Request::new(contactd::proto::contact::Empty {});
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    contactd::proto::contact::contact_client::ContactClient::new(channel)
        .get_task(request)
        .await
        .map(drop)
        .map_err(|status| status.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_credentials_they_cannot_read_and_warn_when_opening_up() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-secret\n").unwrap();
    let mut daemon = Daemon::start(&format!(
        "[server]\nauth_token_file = \"{}\"\n[tasks]\nbatch = 0\n",
        token.display()
    ));
    let addr = daemon.addr;
    let written = std::fs::read_to_string(daemon.config_path()).unwrap();
    assert_eq!(get_task_with(addr, None).await, Err(Code::Unauthenticated));
    assert_eq!(get_task_with(addr, Some("first-secret")).await, Ok(()));

    // Emptied, then missing: the token in force stays, and the log says so.
    std::fs::write(&token, "").unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_line("keeping the tokens in force");
    std::fs::remove_file(&token).unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_lines("keeping the tokens in force", 2);
    assert_eq!(get_task_with(addr, None).await, Err(Code::Unauthenticated));
    assert_eq!(get_task_with(addr, Some("first-secret")).await, Ok(()));

    // A config that no longer names the token file (a truncated edit) and
    // turns remote commands on: neither is applied by a reload; the reload
    // line names both as waiting for a restart.
    let opened = written
        .lines()
        .filter(|line| !line.starts_with("auth_token_file"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n[remote_cmd]\nenabled = true\nallow = [\"echo *\"]\n";
    std::fs::write(daemon.config_path(), opened).unwrap();
    daemon.signal(Signal::SIGHUP);
    let held = daemon.wait_for_line("would lower security");
    assert!(
        held.contains("WARN")
            && held.contains("server.auth_token_file")
            && held.contains("remote_cmd.enabled"),
        "{held}"
    );
    // (The earlier reloads' lines changed nothing that waits.)
    let reloaded = daemon.wait_for_line("restart=");
    let restart = common::daemon::field(&reloaded, "restart");
    assert!(
        restart.contains("server.auth_token_file") && restart.contains("remote_cmd.enabled"),
        "{reloaded}"
    );
    assert_eq!(get_task_with(addr, None).await, Err(Code::Unauthenticated));
    assert_eq!(get_task_with(addr, Some("first-secret")).await, Ok(()));
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_narrows_the_remote_commands_now_and_widens_them_only_at_a_restart() {
    let mut daemon = Daemon::start(
        "[tasks]\nbatch = 0\n[remote_cmd]\nenabled = true\nallow = [\"true\", \"false\"]\n",
    );
    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    std::fs::write(
        daemon.config_path(),
        config.replace("[\"true\", \"false\"]", "[\"true\", \"id\"]"),
    )
    .unwrap();
    daemon.signal(Signal::SIGHUP);
    let held = daemon.wait_for_line("would lower security");
    assert!(held.contains("remote_cmd.allow"), "{held}");
    daemon.wait_for_line("remote command rules updated");
    let client = contactd::proto::contact::contact_client::ContactClient::new(
        within(
            "connect",
            tonic::transport::Endpoint::from_shared(format!("http://{}", daemon.addr))
                .unwrap()
                .connect(),
        )
        .await
        .unwrap(),
    );
    let run = |line: &'static str| {
        let mut client = client.clone();
        async move {
            client
                .remote_cmd(cmd(line, ""))
                .await
                .map(|r| r.into_inner().success)
        }
    };
    assert!(run("true").await.unwrap());
    // Removed: refused at once. Added: refused until a restart.
    for refused in ["false", "id"] {
        let err = run(refused).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{refused}: {err:?}");
    }
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}

// ---- start-up config failures exit 78 ----

#[test]
fn an_unreadable_or_empty_token_file_at_start_up_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    for token in [empty, dir.path().join("missing-token")] {
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nauth_token_file = \"{}\"\n\
                 [admin]\nenabled = false\n",
                token.display()
            ),
        )
        .unwrap();
        let out = contactd(&["serve", "-c", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("auth_token_file"),
            "{}",
            text(&out.stderr)
        );
    }
}

// ---- globs do not climb ----

#[tokio::test]
async fn a_glob_in_the_allow_list_does_not_climb() {
    let server = TestServer::start(with_commands(&["ls /tmp/*"])).await;
    let mut client = server.client().await;
    for line in ["ls /tmp/..", "ls /tmp/.", "ls /tmp/", "ls /tmp/../etc"] {
        let err = client.remote_cmd(cmd(line, "")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{line}");
    }
    server.stop().await;
}

// ---- nothing outlives a command ----

/// Whether a process runs `sleep SECONDS` (with this exact argument).
fn sleeping(seconds: &str) -> bool {
    let wanted = format!("sleep\0{seconds}\0");
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| c == wanted.as_bytes())
    })
}

/// A number of seconds no other test sleeps for.
fn unique_seconds(salt: u32) -> String {
    (100_000 + (std::process::id() % 10_000) * 10 + salt).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_leaves_its_session_is_killed_at_its_timeout() {
    let seconds = unique_seconds(1);
    let mut daemon = Daemon::start(
        "[tasks]\nbatch = 0\n[remote_cmd]\nenabled = true\nallow = [\"setsid sleep *\"]\n\
         timeout = \"300ms\"\n",
    );
    let channel = Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = contactd::proto::contact::contact_client::ContactClient::new(channel);
    let reply = within(
        "the command",
        client.remote_cmd(cmd(&format!("setsid sleep {seconds}"), "")),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(
        reply.res.contains("killed after the 300ms timeout"),
        "{}",
        reply.res
    );
    assert!(!sleeping(&seconds), "setsid sleep outlived its command");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_still_kills_what_commands_left_outside_their_group() {
    let seconds = unique_seconds(2);
    let mut daemon = Daemon::start(
        "[server]\ngrace_period = \"1h\"\n[tasks]\nbatch = 0\n[remote_cmd]\nenabled = true\n\
         allow = [\"setsid sleep *\"]\ntimeout = \"1h\"\n",
    );
    let channel = Channel::from_shared(format!("http://{}", daemon.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = contactd::proto::contact::contact_client::ContactClient::new(channel);
    let line = format!("setsid sleep {seconds}");
    let call = tokio::spawn(async move { client.remote_cmd(cmd(&line, "")).await });
    within("the command to start", async {
        while !sleeping(&seconds) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    daemon.signal(Signal::SIGTERM);
    daemon.wait_for_line("waiting for in-flight calls");
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(1), "{}", daemon.log.join("\n"));
    assert!(!sleeping(&seconds), "setsid sleep outlived the server");
    assert!(
        daemon
            .log
            .iter()
            .any(|l| l.contains("second shutdown signal")),
        "{}",
        daemon.log.join("\n")
    );
    let _ = within("the call to end", call).await;
}

/// A script that forks the next generation of itself and exits at once,
/// every third generation from a new session (`setsid`), every third
/// clearing its run marker, until `$1` generations have passed (a bound, so
/// a survivor ends by itself); `$2` marks its processes.
const REFORKER: &str = "#!/bin/sh\n\
    n=$1\n\
    [ \"$n\" -gt 0 ] || exit 0\n\
    case $((n % 3)) in\n\
    0) setsid \"$0\" $((n - 1)) \"$2\" & ;;\n\
    1) env -u CONTACTD_RUN \"$0\" $((n - 1)) \"$2\" & ;;\n\
    *) \"$0\" $((n - 1)) \"$2\" & ;;\n\
    esac\n\
    exit 0\n";

/// The processes whose command line holds `token`.
fn marked(token: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let line = std::fs::read(entry.path().join("cmdline")).ok()?;
            let line = String::from_utf8_lossy(&line).into_owned();
            line.split('\0').any(|arg| arg == token).then_some(pid)
        })
        .collect()
}

/// Whether a process marked `token` is alive over several scans (a chain
/// always has one: each generation forks the next before it exits).
fn any_marked(token: &str) -> bool {
    (0..5).any(|_| {
        let found = !marked(token).is_empty();
        std::thread::sleep(Duration::from_millis(40));
        found
    })
}

/// Kills what is left of a chain marked `token` (after a failed check), so a
/// failing test leaves nothing running; bounded in rounds.
fn kill_marked(token: &str) {
    for _ in 0..1000 {
        let pids = marked(token);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_re_forker_dies_at_its_timeout_and_at_the_servers_exit() {
    use std::os::unix::fs::PermissionsExt;
    let scripts = tempfile::tempdir().unwrap();
    let script = scripts.path().join("reforker.sh");
    std::fs::write(&script, REFORKER).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = script.display().to_string();
    let start = |timeout: &str| {
        let mut daemon = Daemon::start(&format!(
            "[server]\ngrace_period = \"1h\"\n[tasks]\nbatch = 0\n[remote_cmd]\n\
             enabled = true\nallow = [\"{script} 20000 *\"]\ntimeout = \"{timeout}\"\n"
        ));
        daemon.wait_for_line("commands run in cgroups of their own");
        daemon
    };
    let connect = |daemon: &Daemon| {
        let channel = Channel::from_shared(format!("http://{}", daemon.addr))
            .unwrap()
            .connect_lazy();
        contactd::proto::contact::contact_client::ContactClient::new(channel)
    };
    let mut daemon = start("1s");
    let mut client = connect(&daemon);

    // At its timeout.
    let first = format!("contactd-reforker-{}-1", std::process::id());
    let reply = within(
        "the command",
        client.remote_cmd(cmd(&format!("{script} 20000 {first}"), "")),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(
        reply.res.contains("killed after the 1s timeout"),
        "{}",
        reply.res
    );
    let survived = any_marked(&first);
    kill_marked(&first);
    assert!(!survived, "the re-forker outlived its command's timeout");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));

    // At the server's exit (a second SIGTERM, not waiting for the command).
    let mut daemon = start("1h");
    let mut client = connect(&daemon);
    let second = format!("contactd-reforker-{}-2", std::process::id());
    let line = format!("{script} 20000 {second}");
    let call = tokio::spawn(async move { client.remote_cmd(cmd(&line, "")).await });
    let started = second.clone();
    within("the command to start", async move {
        while marked(&started).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    daemon.signal(Signal::SIGTERM);
    daemon.wait_for_line("waiting for in-flight calls");
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(LIMIT);
    let survived = any_marked(&second);
    kill_marked(&second);
    assert!(!survived, "the re-forker outlived the server");
    let _ = within("the call to end", call).await;
    assert!(
        !daemon
            .log
            .iter()
            .any(|l| l.contains("kept forking") || l.contains("cannot remove")),
        "{}",
        daemon.log.join("\n")
    );
}

// ---- the operator's edges: a replaced admin socket, a closed pipe ----

#[tokio::test]
async fn at_exit_the_server_leaves_an_admin_socket_that_is_not_its_own() {
    let server = TestServer::start(Config::default()).await;
    drop(server.admin().await);
    let path = server.admin_socket();
    // Another server (or an operator) replaced the socket meanwhile.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, "someone else's").unwrap();
    let dir_path = path.clone();
    let TestServer {
        shutdown,
        task,
        dir,
        ..
    } = server;
    shutdown.cancel();
    within("server exit", task).await.unwrap().unwrap();
    assert_eq!(
        std::fs::read_to_string(&dir_path).unwrap(),
        "someone else's"
    );
    drop(dir);

    // Its own socket it removes.
    let server = TestServer::start(Config::default()).await;
    drop(server.admin().await);
    let path = server.admin_socket();
    let TestServer {
        shutdown,
        task,
        dir,
        ..
    } = server;
    shutdown.cancel();
    within("server exit", task).await.unwrap().unwrap();
    assert!(!path.exists());
    drop(dir);
}

/// Thousands of retained tasks of 1 KiB each: more than gRPC's default 4 MiB
/// in one answer. `contactd tasks` pages through them all, and piped into a
/// reader that stops early it exits quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contactd_tasks_lists_thousands_and_stops_quietly_at_a_closed_pipe() {
    let mut config = Config::default();
    config.tasks.batch = 6000;
    config.tasks.retain = 6000;
    config.tasks.interval = Duration::from_secs(3600);
    config.tasks.template = format!("{}{{seq}}", "t".repeat(1024)).parse().unwrap();
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    // The first batch is listed once the store has committed it.
    within("the first batch committed", async {
        loop {
            let newest = admin
                .list_tasks(ListTasksRequest {
                    limit: 1,
                    ..ListTasksRequest::default()
                })
                .await
                .unwrap()
                .into_inner()
                .tasks;
            if newest.first().is_some_and(|t| t.id == 6000) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let socket = server.admin_socket();
    let socket_arg = socket.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        contactd(&["tasks", "--json", "--socket", &socket_arg])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tasks = listed["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 6000);
    assert_eq!(tasks[5999]["id"], 6000);

    let status = tokio::task::spawn_blocking(move || closed_pipe(&socket))
        .await
        .unwrap();
    assert_eq!(status.0, Some(0), "{}", status.1);
    assert!(!status.1.contains("panicked"), "{}", status.1);
    server.stop().await;
}

/// Runs `contactd tasks` with its stdout read for one line and then closed,
/// like `| head -1`.
fn closed_pipe(socket: &Path) -> (Option<i32>, String) {
    use std::io::{BufRead, BufReader, Read};
    let mut child = common::contactd()
        .args(["tasks", "--socket"])
        .arg(socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("ID"), "{first}");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "contactd tasks did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

// ---- config values serve survives: any config within the documented ranges ----

/// Generated configs within the documented ranges, from a fixed seed (so a
/// failing case repeats), a few cases only: each starts a real server.
mod configs {
    use std::{ops::RangeInclusive, sync::Arc, time::Duration};

    use bytesize::ByteSize;
    use contactd::config::{
        self, Config, DeliveryMode, Rotation, load,
        ranges::{self as r},
    };
    use contactd::proto::contact::contact_client::ContactClient;
    use tonic::{Code, transport::Channel};
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    use super::{cmd, common::TestServer, within};

    /// Cases, each a pair of configs: a server started on the first and
    /// reloaded to the second.
    const CASES: u32 = 6;

    /// The choices a config is built from, drawn from a list that proptest
    /// makes and shrinks (toward shorter lists and smaller numbers): a
    /// failing pair of configs shrinks toward each range's start, and
    /// toward the first of each pair of options. Past its end, every
    /// choice is 0.
    #[derive(Debug)]
    struct Draws {
        values: Vec<u64>,
        at: usize,
    }

    impl Draws {
        fn new(values: Vec<u64>) -> Draws {
            Draws { values, at: 0 }
        }

        fn next(&mut self) -> u64 {
            let value = self.values.get(self.at).copied().unwrap_or(0);
            self.at += 1;
            value
        }

        fn u64(&mut self, range: RangeInclusive<u64>) -> u64 {
            let (lo, hi) = (*range.start(), *range.end());
            match (hi - lo).checked_add(1) {
                Some(span) => lo + self.next() % span,
                None => self.next(),
            }
        }

        fn usize(&mut self, below: std::ops::RangeTo<usize>) -> usize {
            (self.next() % below.end as u64) as usize
        }

        fn bool(&mut self) -> bool {
            self.next() % 2 == 1
        }
    }

    /// A value in `range`: often one of its ends, else anywhere in it.
    fn count(rng: &mut Draws, range: RangeInclusive<u64>) -> u64 {
        match rng.usize(..3) {
            0 => *range.start(),
            1 => *range.end(),
            _ => rng.u64(range),
        }
    }

    fn duration(rng: &mut Draws, range: RangeInclusive<Duration>) -> Duration {
        let (lo, hi) = (
            range.start().as_millis() as u64,
            range.end().as_millis() as u64,
        );
        Duration::from_millis(count(rng, lo..=hi))
    }

    fn size(rng: &mut Draws, range: RangeInclusive<u64>) -> ByteSize {
        ByteSize(count(rng, range))
    }

    fn server_section(rng: &mut Draws) -> config::ServerConfig {
        let max_message_size = size(rng, r::MAX_MESSAGE_SIZE);
        let call_message = r::CALL_MESSAGE_MIN..=max_message_size.as_u64();
        let max_buffered = size(rng, r::MAX_BUFFERED);
        let connection_window = size(rng, r::FLOW_WINDOW);
        config::ServerConfig {
            backlog: count(rng, r::BACKLOG) as u32,
            max_connections: count(rng, r::MAX_CONNECTIONS) as usize,
            max_message_size,
            max_concurrent_streams: count(rng, r::MAX_CONCURRENT_STREAMS) as u32,
            keepalive_interval: duration(rng, r::KEEPALIVE_INTERVAL),
            keepalive_timeout: duration(rng, r::KEEPALIVE_TIMEOUT),
            grace_period: duration(rng, r::GRACE_PERIOD),
            max_callers: count(rng, r::MAX_CALLERS) as usize,
            max_status_size: size(rng, r::MAX_STATUS_SIZE),
            // From 1s, not the range's 100ms: this test's own connection
            // must get through its handshake on a loaded machine.
            handshake_timeout: duration(rng, Duration::from_secs(1)..=*r::HANDSHAKE_TIMEOUT.end()),
            max_handshakes: count(rng, r::MAX_HANDSHAKES) as usize,
            max_status_message: size(rng, call_message.clone()),
            max_result_message: size(rng, call_message.clone()),
            max_command_message: size(rng, call_message),
            max_connection_buffer: size(rng, r::CONNECTION_BUFFER_MIN..=max_buffered.as_u64()),
            max_buffered,
            connection_window,
            stream_window: size(rng, *r::FLOW_WINDOW.start()..=connection_window.as_u64()),
            ..config::ServerConfig::default()
        }
    }

    fn tasks_section(rng: &mut Draws) -> config::TasksConfig {
        config::TasksConfig {
            interval: duration(rng, r::INTERVAL),
            batch: count(rng, r::BATCH) as u32,
            retain: count(rng, r::RETAIN) as usize,
            mode: if rng.bool() {
                DeliveryMode::Queue
            } else {
                DeliveryMode::Broadcast
            },
            ack_timeout: duration(rng, r::ACK_TIMEOUT),
            max_attempts: count(rng, r::MAX_ATTEMPTS) as u32,
            window: count(rng, r::WINDOW) as usize,
            max_pending: count(rng, r::MAX_PENDING) as usize,
            keep_for: duration(rng, r::KEEP_FOR),
            retain_finished: count(rng, r::RETAIN_FINISHED) as usize,
            ..config::TasksConfig::default()
        }
    }

    fn store_section(rng: &mut Draws) -> config::StoreConfig {
        config::StoreConfig {
            sync: if rng.bool() {
                config::StoreSync::Full
            } else {
                config::StoreSync::Normal
            },
            write_queue: count(rng, r::WRITE_QUEUE) as usize,
            forget_agents_after: duration(rng, r::FORGET_AGENTS_AFTER),
            // 0 (no limit) or in its range; a small limit only makes
            // submits fail, which this test does not make.
            max_size: if rng.bool() {
                ByteSize(0)
            } else {
                size(rng, r::STORE_MAX_SIZE)
            },
            // TestServer puts the database in its temp dir.
            ..config::StoreConfig::default()
        }
    }

    fn remote_section(rng: &mut Draws) -> config::RemoteCmdConfig {
        config::RemoteCmdConfig {
            enabled: rng.bool(),
            allow: vec!["echo *".parse().unwrap()],
            timeout: duration(rng, r::CMD_TIMEOUT),
            max_concurrent: count(rng, r::MAX_CONCURRENT) as usize,
            max_queued: count(rng, r::MAX_QUEUED) as usize,
            max_output: size(rng, r::MAX_OUTPUT),
            ..config::RemoteCmdConfig::default()
        }
    }

    fn log_section(rng: &mut Draws) -> config::LogConfig {
        // Levels and target=level directives (the filter takes no spans).
        const LEVELS: [&str; 4] = [
            "info",
            "warn,contactd=debug",
            "off",
            "info,h2=error,contactd::server=trace",
        ];
        config::LogConfig {
            level: LEVELS[rng.usize(..LEVELS.len())].to_owned(),
            rotation: if rng.bool() {
                Rotation::Daily
            } else {
                Rotation::Size
            },
            max_size: size(rng, r::LOG_MAX_SIZE),
            backups: count(rng, r::LOG_BACKUPS) as usize,
            keep: count(rng, r::LOG_KEEP) as usize,
            buffer_lines: count(rng, r::BUFFER_LINES) as usize,
            ..config::LogConfig::default()
        }
    }

    fn any_config(rng: &mut Draws) -> Config {
        Config {
            server: server_section(rng),
            tasks: tasks_section(rng),
            remote_cmd: remote_section(rng),
            store: store_section(rng),
            log: log_section(rng),
            ..Config::default()
        }
    }

    /// Writes `config` as check-config would print it, and loads it back:
    /// it must pass every check.
    fn loads(config: &Config, dir: &std::path::Path) -> Config {
        let path = dir.join("generated.toml");
        std::fs::write(&path, config::to_toml(config)).unwrap();
        load::<Config>(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    async fn serving(channel: &Channel) {
        let mut health = HealthClient::new(channel.clone());
        let reply = within(
            "health",
            health.check(HealthCheckRequest {
                service: "Contact".into(),
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving);
    }

    /// Until the server follows the reload, remoteCMD answers by the old
    /// switch; waits (bounded) for the new one.
    async fn follows(channel: &Channel, enabled: bool) {
        let mut client = ContactClient::new(channel.clone());
        let want = if enabled {
            Code::PermissionDenied
        } else {
            Code::FailedPrecondition
        };
        within("the reload to apply", async {
            loop {
                let code = client
                    .remote_cmd(cmd("not-allowed", ""))
                    .await
                    .unwrap_err()
                    .code();
                if code == want {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: CASES,
            // A failure prints its shrunk configs; none is saved beside the
            // sources.
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        #[test]
        fn any_config_within_the_ranges_loads_serves_and_reloads(
            first in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..96),
            second in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..96),
        ) {
            let first = any_config(&mut Draws::new(first));
            let second = any_config(&mut Draws::new(second));
            // Shown with the failure (the test harness prints a failing
            // test's output).
            eprintln!("first: {first:#?}\nsecond: {second:#?}");
            let dir = tempfile::tempdir().unwrap();
            let first = loads(&first, dir.path());
            let second = loads(&second, dir.path());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let server = TestServer::start(first.clone()).await;
                // One connection: server.max_connections may be 1.
                let channel = server.channel().await;
                serving(&channel).await;
                follows(&channel, first.remote_cmd.enabled).await;
                let mut reloaded = second.clone();
                reloaded.server.listen = server.addr;
                reloaded.admin = server.config.borrow().admin.clone();
                server.config.send_replace(Arc::new(reloaded));
                follows(&channel, second.remote_cmd.enabled).await;
                serving(&channel).await;
                drop(channel);
                server.stop().await;
            });
        }
    }
}
