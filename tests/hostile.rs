//! Hostile input (issue 9): caller text escaped and cut, config values the
//! server survives, globs that do not climb, nothing outliving a command,
//! start-up config failures exiting 78, and the operator commands' edges.
//! Real servers (in-process on 127.0.0.1:0) and the real binary.

mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{LIMIT, TestServer, daemon::Daemon, with_commands, within};
use contactd::{
    config::Config,
    proto::contact::{ClientMsg, CmdRequest, Result as ResultMsg},
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
    Command::new(env!("CARGO_BIN_EXE_contactd"))
        .args(args)
        .env_remove("CONTACTD_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run contactd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---- item 3: caller input is data, never format ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_command_lines_are_escaped_cut_and_rate_limited() {
    let mut daemon =
        Daemon::start("[tasks]\nbatch = 0\n[remote_cmd]\nenabled = true\nallow = [\"echo *\"]\n");
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

// ---- item 4: config values serve survives ----

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
        format!("{file}:12:9: log.level: \"chatty!!\""),
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
        [tasks]\ninterval = \"7days\"\nbatch = 10000\nretain = 1000000\n\
        ack_timeout = \"1day\"\nmax_attempts = 1000\nwindow = 10000\nmax_pending = 10000000\n\
        [remote_cmd]\nenabled = true\nallow = [\"echo *\"]\ntimeout = \"1day\"\n\
        max_concurrent = 1024\nmax_queued = 65536\nmax_output = \"4095KiB\"\n\
        [log]\nlevel = \"info\"\nmax_size = \"64GiB\"\nbackups = 1000\nkeep = 1000\n\
        buffer_lines = 262144\n";
    let minima = "[server]\nbacklog = 1\nmax_connections = 1\nmax_message_size = \"1KiB\"\n\
        max_concurrent_streams = 1\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"\n\
        grace_period = \"0s\"\nmax_callers = 1\nmax_status_size = \"1B\"\n\
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

// ---- item 6: start-up config failures exit 78 ----

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

// ---- item 7: globs do not climb ----

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

// ---- item 8: nothing outlives a command ----

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

// ---- item 9: the smaller ones ----

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
    drop(server.admin().await);
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_contactd"))
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

// ---- item 4: the property: within the documented ranges, serve survives ----

mod configs {
    use std::{ops::RangeInclusive, sync::Arc, time::Duration};

    use bytesize::ByteSize;
    use contactd::config::{
        self, Config, DeliveryMode, Rotation, load,
        ranges::{self as r},
    };
    use contactd::proto::contact::contact_client::ContactClient;
    use proptest::prelude::*;
    use tonic::{Code, transport::Channel};
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    use super::{cmd, common::TestServer, within};

    /// A value in `range`: often one of its ends, else anywhere in it.
    fn count(range: RangeInclusive<u64>) -> impl Strategy<Value = u64> {
        prop_oneof![Just(*range.start()), Just(*range.end()), range]
    }

    fn duration(range: RangeInclusive<Duration>) -> impl Strategy<Value = Duration> {
        let (lo, hi) = (
            range.start().as_millis() as u64,
            range.end().as_millis() as u64,
        );
        count(lo..=hi).prop_map(Duration::from_millis)
    }

    fn size(range: RangeInclusive<u64>) -> impl Strategy<Value = ByteSize> {
        count(range).prop_map(ByteSize)
    }

    prop_compose! {
        fn server_section()(
            backlog in count(r::BACKLOG),
            max_connections in count(r::MAX_CONNECTIONS),
            max_message_size in size(r::MAX_MESSAGE_SIZE),
            streams in count(r::MAX_CONCURRENT_STREAMS),
            keepalive_interval in duration(r::KEEPALIVE_INTERVAL),
            keepalive_timeout in duration(r::KEEPALIVE_TIMEOUT),
            grace_period in duration(r::GRACE_PERIOD),
            max_callers in count(r::MAX_CALLERS),
            max_status_size in size(r::MAX_STATUS_SIZE),
        ) -> config::ServerConfig {
            config::ServerConfig {
                backlog: backlog as u32,
                max_connections: max_connections as usize,
                max_message_size,
                max_concurrent_streams: streams as u32,
                keepalive_interval,
                keepalive_timeout,
                grace_period,
                max_callers: max_callers as usize,
                max_status_size,
                ..config::ServerConfig::default()
            }
        }
    }

    prop_compose! {
        fn tasks_section()(
            interval in duration(r::INTERVAL),
            batch in count(r::BATCH),
            retain in count(r::RETAIN),
            queue in any::<bool>(),
            ack_timeout in duration(r::ACK_TIMEOUT),
            max_attempts in count(r::MAX_ATTEMPTS),
            window in count(r::WINDOW),
            max_pending in count(r::MAX_PENDING),
        ) -> config::TasksConfig {
            config::TasksConfig {
                interval,
                batch: batch as u32,
                retain: retain as usize,
                mode: if queue { DeliveryMode::Queue } else { DeliveryMode::Broadcast },
                ack_timeout,
                max_attempts: max_attempts as u32,
                window: window as usize,
                max_pending: max_pending as usize,
                ..config::TasksConfig::default()
            }
        }
    }

    prop_compose! {
        fn remote_section()(
            enabled in any::<bool>(),
            timeout in duration(r::CMD_TIMEOUT),
            max_concurrent in count(r::MAX_CONCURRENT),
            max_queued in count(r::MAX_QUEUED),
            max_output in size(r::MAX_OUTPUT),
        ) -> config::RemoteCmdConfig {
            config::RemoteCmdConfig {
                enabled,
                allow: vec!["echo *".parse().unwrap()],
                timeout,
                max_concurrent: max_concurrent as usize,
                max_queued: max_queued as usize,
                max_output,
                ..config::RemoteCmdConfig::default()
            }
        }
    }

    prop_compose! {
        fn log_section()(
            level in prop_oneof![Just("info"), Just("warn,contactd=debug"), Just("off"),
                                 Just("info,h2=error,contactd::server[remoteCMD]=trace")],
            daily in any::<bool>(),
            max_size in size(r::LOG_MAX_SIZE),
            backups in count(r::LOG_BACKUPS),
            keep in count(r::LOG_KEEP),
            buffer_lines in count(r::BUFFER_LINES),
        ) -> config::LogConfig {
            config::LogConfig {
                level: level.to_owned(),
                rotation: if daily { Rotation::Daily } else { Rotation::Size },
                max_size,
                backups: backups as usize,
                keep: keep as usize,
                buffer_lines: buffer_lines as usize,
                ..config::LogConfig::default()
            }
        }
    }

    prop_compose! {
        fn any_config()(
            server in server_section(),
            tasks in tasks_section(),
            remote_cmd in remote_section(),
            log in log_section(),
        ) -> Config {
            Config { server, tasks, remote_cmd, log, ..Config::default() }
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

    proptest! {
        // Each case starts a real server: few cases, so the suite stays fast.
        #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

        #[test]
        fn any_config_within_the_ranges_loads_serves_and_reloads(
            first in any_config(),
            second in any_config(),
        ) {
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
