//! Operating the real binary, in temp dirs: shutdown on SIGTERM, reload on
//! SIGHUP, the health probe, log file rotation, the systemd notify protocol,
//! and what the log lines say.

use crate::common;

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use common::{
    LIMIT,
    daemon::{Daemon, field},
    within,
};
use contactd::proto::contact::{ClientMsg, CmdRequest, Empty, contact_client::ContactClient};
use nix::sys::signal::Signal;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn channel(daemon: &Daemon) -> Channel {
    within(
        "connect",
        Channel::from_shared(format!("http://{}", daemon.addr))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap()
}

// ---- shutdown: SIGTERM drains streams, a running command finishes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_and_lets_a_running_command_finish() {
    let mut daemon = Daemon::start(
        "[server]\ngrace_period = \"10s\"\n[remote_cmd]\nenabled = true\nallow = [\"sleep *\"]\n",
    );
    let channel = channel(&daemon).await;
    let mut contact = ContactClient::new(channel.clone());
    let mut tasks = contact.get_task(Empty {}).await.unwrap().into_inner();
    within("first task", tasks.message())
        .await
        .unwrap()
        .unwrap();
    let (_status_tx, status_rx) = tokio::sync::mpsc::channel::<ClientMsg>(1);
    let mut statuses = contact
        .send_status(tokio_stream::wrappers::ReceiverStream::new(status_rx))
        .await
        .unwrap()
        .into_inner();
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = within("health", watch.message()).await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let command = tokio::spawn({
        let mut contact = contact.clone();
        async move {
            contact
                .remote_cmd(CmdRequest {
                    index: 1,
                    cmd_str: "sleep 1".into(),
                    log: String::new(),
                })
                .await
        }
    });
    daemon.wait_for_line("index=1");
    let started = Instant::now();
    daemon.signal(Signal::SIGTERM);

    let seen = within("NOT_SERVING", watch.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.status(), ServingStatus::NotServing);
    let end = within("the watch's end", watch.message())
        .await
        .unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
    // The first batch's other tasks may still be in flight before the end.
    let end = within("task stream end", async {
        for _ in 0..100 {
            if let Err(end) = tasks.message().await {
                return end;
            }
        }
        panic!("the task stream did not end");
    })
    .await;
    assert_eq!(end.code(), Code::Unavailable);
    let end = within("status stream end", statuses.message())
        .await
        .unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
    let reply = within("the command", command)
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert!(reply.success, "the in-flight command completes: {reply:?}");
    let status = daemon.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log.join("\n"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exit took {:?}",
        started.elapsed()
    );
}

// ---- reload: SIGHUP applies, says what waits, survives a broken file ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_interval_and_level_without_dropping_streams() {
    let base = "[tasks]\nbatch = 1\ntemplate = \"t{seq}\"\n";
    let mut daemon = Daemon::start(&format!(
        "{base}interval = \"1h\"\n[log]\nlevel = \"info\"\n"
    ));
    let mut contact = ContactClient::new(channel(&daemon).await);
    let mut tasks = contact.get_task(Empty {}).await.unwrap().into_inner();
    assert_eq!(
        within("task 1", tasks.message()).await.unwrap().unwrap().id,
        1
    );

    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    let faster = config
        .replace("interval = \"1h\"", "interval = \"50ms\"")
        .replace("\"info\"", "\"debug\"");
    std::fs::write(daemon.config_path(), faster).unwrap();
    daemon.signal(Signal::SIGHUP);
    let reloaded = daemon.wait_for_line("config reloaded");
    assert_eq!(field(&reloaded, "changed"), "log.level,tasks.interval");
    for id in 2..=4 {
        let task = within("a task at the new interval", tasks.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(task.id, id, "the same stream goes on");
    }
    daemon.wait_for_line("generated tasks"); // a debug line: the new level applies
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}

/// A reload is logged once: every key that changed, and which of them
/// wait for a restart; the rest applies (a task at the new interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_says_in_one_line_what_waits_for_a_restart() {
    let mut daemon = Daemon::start("[tasks]\nbatch = 1\ninterval = \"1h\"\n");
    let mut contact = ContactClient::new(channel(&daemon).await);
    let mut tasks = contact.get_task(Empty {}).await.unwrap().into_inner();
    assert!(within("task 1", tasks.message()).await.unwrap().is_some());

    let config = std::fs::read_to_string(daemon.config_path()).unwrap();
    let edited = config
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
        .replace("interval = \"1h\"", "interval = \"50ms\"")
        .replace(
            "[admin]",
            "[log]\nbackups = 3\n[store]\nsync = \"full\"\n[admin]",
        );
    std::fs::write(daemon.config_path(), edited).unwrap();
    daemon.signal(Signal::SIGHUP);
    let line = daemon.wait_for_line("config reloaded");
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(
        field(&line, "changed"),
        "log.backups,server.listen,store.sync,tasks.interval"
    );
    assert_eq!(
        field(&line, "restart"),
        "log.backups,server.listen,store.sync"
    );
    assert!(
        within("a task at the new interval", tasks.message())
            .await
            .unwrap()
            .is_some()
    );
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
    let restart_lines: Vec<&String> = daemon
        .log
        .iter()
        .filter(|l| l.contains("restart"))
        .collect();
    assert_eq!(restart_lines, [&line], "said once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_keeps_the_old_config_and_serves_on() {
    let mut daemon = Daemon::start("[tasks]\ninterval = \"1h\"\n");
    std::fs::write(daemon.config_path(), "[tasks]\ninterval = \"never\"\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_line("config reload failed");
    let line = daemon.wait_for_line("tasks.interval");
    assert!(
        line.contains("ERROR") && line.contains("contactd.toml:2:12"),
        "{line}"
    );
    let mut contact = ContactClient::new(channel(&daemon).await);
    let mut tasks = contact.get_task(Empty {}).await.unwrap().into_inner();
    assert!(within("a task", tasks.message()).await.unwrap().is_some());
    let out = probe(&daemon.addr.to_string(), &[]);
    assert_eq!(out.status.code(), Some(0));
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}

// ---- health: grpc_health_probe's exit codes, and --wait ----

fn probe(addr: &str, extra: &[&str]) -> std::process::Output {
    common::contactd()
        .args(["health", "--addr", addr, "--timeout", "5s"])
        .args(extra)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_probe_uses_grpc_health_probe_exit_codes() {
    let daemon = Daemon::start("");
    let addr = daemon.addr.to_string();
    let serving = probe(&addr, &[]);
    assert_eq!(serving.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&serving.stdout).trim(),
        "status: SERVING"
    );
    assert_eq!(
        probe(&addr, &["--service", "Contact"]).status.code(),
        Some(0)
    );
    assert_eq!(
        probe(&addr, &["--service", "NoSuchService"]).status.code(),
        Some(3)
    );
    assert_eq!(probe(&addr, &["--timeout", "soon"]).status.code(), Some(1));

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = probe(&closed.to_string(), &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A health server that says NOT_SERVING: exit 4.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let not_serving = listener.local_addr().unwrap();
    let reporter = tonic_health::server::HealthReporter::new();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter),
    );
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let out = tokio::task::spawn_blocking(move || probe(&not_serving.to_string(), &[]))
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.abort();
}

#[test]
fn health_wait_answers_once_the_server_serves_and_gives_up_after_the_wait() {
    // A free loopback port: bound, read, released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let health = |wait: &str| {
        let mut command = common::contactd();
        command.args([
            "health",
            "--addr",
            &addr,
            "--timeout",
            "200ms",
            "--wait",
            wait,
        ]);
        command
    };
    // Nothing listens: asked again until the wait is over, then the last
    // answer's code (grpc_health_probe's connection failure).
    let started = Instant::now();
    let out = health("300ms").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Started before the server: it answers once the server serves.
    let probe = health("30s")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut daemon = Daemon::start(&format!("[server]\nlisten = \"{addr}\"\n"));
    let out = probe.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "status: SERVING\n");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}

// ---- log files: rotation by size ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_rotation_keeps_backups_plus_one_files_none_over_the_limit() {
    let logs = tempfile::tempdir().unwrap();
    let file = logs.path().join("contactd.log");
    let mut daemon = Daemon::start(&format!(
        "[log]\nlevel = \"debug\"\nstderr = true\nfile = \"{}\"\nmax_size = \"2KiB\"\nbackups = 2\n",
        file.display()
    ));
    // Every status is a debug line: write until the second backup appears.
    let mut contact = ContactClient::new(channel(&daemon).await);
    let backup = logs.path().join("contactd.log.2");
    within("two rotations", async {
        for round in 0..1000 {
            if backup.exists() {
                return;
            }
            let msgs = (0..20).map(move |i| ClientMsg {
                msg: format!("round {round} status {i}"),
            });
            let mut replies = contact
                .send_status(tokio_stream::iter(msgs))
                .await
                .unwrap()
                .into_inner();
            while replies.message().await.unwrap().is_some() {}
        }
        panic!("no second backup after 1000 rounds");
    })
    .await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
    let mut files: Vec<_> = std::fs::read_dir(logs.path())
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    files.sort_by_key(|e| e.file_name());
    let names: Vec<_> = files
        .iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["contactd.log", "contactd.log.1", "contactd.log.2"]);
    let longest_line = files
        .iter()
        .flat_map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .lines()
                .map(str::len)
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap();
    for entry in &files {
        let len = entry.metadata().unwrap().len();
        assert!(
            len <= 2048 + longest_line as u64 + 1,
            "{:?} is {len} bytes",
            entry.file_name()
        );
    }
    // The last lines were flushed at shutdown: in the current file, or in
    // the first backup when the last line itself filled the file (rotation
    // follows the write that reaches max_size).
    let newest = std::fs::read_to_string(&file).unwrap()
        + &std::fs::read_to_string(logs.path().join("contactd.log.1")).unwrap();
    assert!(newest.contains("server stopped"));
}

// ---- systemd: the notify protocol, READY once the server answers ----

/// Receives notify datagrams until one contains `needle`, returning it.
fn expect_notify(socket: &UnixDatagram, needle: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + LIMIT;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {needle:?} from contactd; got {seen:?}");
        socket.set_read_timeout(Some(left)).unwrap();
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(message.clone());
        if message.contains(needle) {
            return message;
        }
    }
}

#[test]
fn sd_notify_messages_arrive_in_order_with_watchdog_pings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let mut daemon = Daemon::start_with(
        "",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen = Vec::new();
    let ready = expect_notify(&socket, "READY=1", &mut seen);
    assert!(
        ready.contains(&format!("STATUS=serving on {}", daemon.addr)),
        "{ready}"
    );
    expect_notify(&socket, "WATCHDOG=1", &mut seen);
    expect_notify(&socket, "WATCHDOG=1", &mut seen);

    daemon.signal(Signal::SIGHUP);
    let reloading = expect_notify(&socket, "RELOADING=1", &mut seen);
    let usec: u64 = field(&reloading.replace('\n', " "), "MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(usec > 0, "{reloading}");
    expect_notify(&socket, "READY=1", &mut seen);
    daemon.signal(Signal::SIGTERM);
    expect_notify(&socket, "STOPPING=1", &mut seen);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
    assert_eq!(
        seen.iter()
            .filter(|m| !m.contains("WATCHDOG=1"))
            .map(|m| m.lines().next().unwrap())
            .collect::<Vec<_>>(),
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    );
}

/// READY=1 means everything the server offers is up (README, "Both units
/// are Type=notify"): the moment it arrives, the admin socket is there and
/// answers, and health says SERVING, each asked once, without a retry.
#[test]
fn ready_comes_when_the_admin_socket_and_health_answer() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify).unwrap();
    let admin = dir.path().join("admin.sock");
    let config = dir.path().join("contactd.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nsocket = \"{}\"\n",
            admin.display()
        ),
    )
    .unwrap();
    // Not `Daemon::start`: it waits for the log line that says the server
    // serves, and READY=1 must be enough by itself.
    let mut server = common::daemon::Process::spawn(
        &[
            std::ffi::OsStr::new("serve"),
            "-c".as_ref(),
            config.as_os_str(),
        ],
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("STATE_DIRECTORY", dir.path().to_str().unwrap()),
        ],
    );
    let ready = expect_notify(&socket, "READY=1", &mut Vec::new());
    // First, at once: a caller that checks for the socket file finds it.
    let kind = std::fs::metadata(&admin).map(|m| m.file_type());
    assert!(
        kind.as_ref()
            .is_ok_and(std::os::unix::fs::FileTypeExt::is_socket),
        "no admin socket when READY=1 came: {kind:?}"
    );
    let addr = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=serving on "))
        .unwrap_or_else(|| panic!("{ready}"))
        .to_owned();
    let run = |args: &[&str]| common::contactd().args(args).output().unwrap();
    let agents = run(&["agents", "--json", "--socket", admin.to_str().unwrap()]);
    assert!(
        agents.status.success(),
        "{}",
        String::from_utf8_lossy(&agents.stderr)
    );
    let health = run(&["health", "--addr", &addr]);
    assert_eq!(
        health.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(LIMIT).code(), Some(0));
}

// ---- open files: the default connection cap fits the limit ----

/// `cargo run -- serve` on a default config never starts with a warning
/// that `server.max_connections` is above the open-files limit: at its
/// default the cap is sized from the limit the server finds (after raising
/// its soft limit to the hard one), and said once.
#[test]
fn the_default_connection_cap_is_sized_from_the_open_files_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("contactd.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nsocket = \"{}\"\n",
            dir.path().join("admin.sock").display()
        ),
    )
    .unwrap();
    let mut server = common::daemon::Process::spawn(
        &[
            std::ffi::OsStr::new("serve"),
            "-c".as_ref(),
            config.as_os_str(),
        ],
        &[("STATE_DIRECTORY", dir.path().to_str().unwrap())],
    );
    server.wait_for_line("serving Contact");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(common::LIMIT).success());
    let log = server.log.join("\n");
    assert!(
        !log.contains("above the open-files limit"),
        "a default config warned:\n{log}"
    );
    // What the server finds: its hard limit (it raises the soft one).
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let room = hard - (1024u64.min(hard / 4) + 64);
    if room < 50_000 {
        let line = server.wait_for_line("server.max_connections is at its default");
        assert!(line.contains(&format!("max_connections={room}")), "{line}");
    } else {
        assert!(
            !log.contains("server.max_connections is at its default"),
            "{log}"
        );
    }
}

// ---- log lines: JSON, excluded messages, fleet events, redeliveries ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_and_excluded_messages() {
    let mut daemon = Daemon::start(
        "[log]\nlevel = \"debug\"\nformat = \"json\"\nexclude = [\"status received\"]\n",
    );
    let mut contact = ContactClient::new(channel(&daemon).await);
    let msgs = (0..5).map(|i| ClientMsg {
        msg: format!("status {i}"),
    });
    let mut replies = contact
        .send_status(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    while within("replies", replies.message())
        .await
        .unwrap()
        .is_some()
    {}
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
    let events: Vec<serde_json::Value> = daemon
        .log
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let messages: Vec<&str> = events
        .iter()
        .filter_map(|e| e["fields"]["message"].as_str())
        .collect();
    assert!(messages.contains(&"server stopped"), "{messages:?}");
    assert!(
        messages.contains(&"generated tasks"),
        "debug events are logged: {messages:?}"
    );
    assert!(
        !messages.contains(&"status received"),
        "excluded: {messages:?}"
    );
}

/// A getTask stream of the agent `name` on `channel`.
async fn subscribe(
    channel: Channel,
    name: &str,
) -> tonic::Streaming<contactd::proto::contact::ServerMsg> {
    let mut request = tonic::Request::new(Empty {});
    request
        .metadata_mut()
        .insert(contactd::proto::AGENT_HEADER, name.parse().unwrap());
    let mut client = ContactClient::new(channel);
    within("getTask", client.get_task(request))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_events_are_logged_at_info_with_the_agents_name_and_address() {
    let mut daemon = Daemon::start("[tasks]\nbatch = 0\n");
    let first = subscribe(channel(&daemon).await, "web1").await;
    let connected = daemon.wait_for_line("agent connected");
    assert!(connected.contains("INFO"), "{connected}");
    assert_eq!(field(&connected, "agent"), "web1");
    let address = field(&connected, "address");
    assert!(address.starts_with("127.0.0.1:"), "{connected}");

    // The same name over a second connection, while the first is open.
    let second = subscribe(channel(&daemon).await, "web1").await;
    let clash = daemon.wait_for_line("a second connection uses the name");
    assert!(clash.contains("WARN"), "{clash}");
    assert_eq!(field(&clash, "other_address"), address);
    assert_ne!(field(&clash, "address"), address);

    drop((first, second));
    let gone = daemon.wait_for_line("agent disconnected");
    assert!(gone.contains("INFO"), "{gone}");
    assert_eq!(field(&gone, "agent"), "web1");
    assert!(!field(&gone, "connected_for").is_empty(), "{gone}");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_logged_at_info_with_the_agent_and_attempt() {
    let mut daemon = Daemon::start("[tasks]\nmode = \"queue\"\nbatch = 0\nack_timeout = \"1s\"\n");
    let socket = daemon.dir.path().join("admin.sock");
    let mut admin = within("admin", contactd::client::admin::connect(&socket))
        .await
        .unwrap();
    common::submit(&mut admin, "once", "").await;
    let mut first = subscribe(channel(&daemon).await, "w1").await;
    let task = within("the task", first.message()).await.unwrap().unwrap();
    assert_eq!(task.attempt, 1);
    // w1 goes away without acking: at its claim's deadline the task goes
    // to w2, as attempt 2.
    drop(first);
    daemon.wait_for_line("agent disconnected");
    let mut second = subscribe(channel(&daemon).await, "w2").await;
    let again = within("the task again", second.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.id, again.attempt), (task.id, 2));
    let line = daemon.wait_for_line("task redelivered");
    assert!(line.contains("INFO"), "{line}");
    assert_eq!(field(&line, "agent"), "w2");
    assert_eq!(field(&line, "attempt"), "2");
    drop(second);
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(LIMIT).code(), Some(0));
}
