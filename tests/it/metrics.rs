//! The metrics endpoints (README "Monitoring"): a real server and real
//! agents move tasks, and the values are read back over real HTTP from
//! the listener on 127.0.0.1:0; the listener's bounds are tried with raw
//! sockets; the real binary logs the address, counts reloads and checks
//! the bounds in check-config. With `CONTACTD_METRICS_OUT=DIR` set, the
//! scrapes are written there for `promtool check metrics` (.ci/run).

use crate::common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::{
    LIMIT, TestServer,
    daemon::{Daemon, field},
    fleet::{TestAgent, agent_config, connected, handled},
    submit, with_commands, within,
};
use contactd::{
    config::{AgentConfig, Config, MetricsConfig},
    metrics::{Endpoint, Reloads},
    proto::contact::{CmdRequest, Outcome},
    server,
};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{broadcast, watch},
};
use tokio_util::sync::CancellationToken;

/// A response: status, content type, body.
struct Scraped {
    status: u16,
    content_type: String,
    body: String,
}

/// One request to `addr` over a new HTTP/1 connection.
async fn request(addr: SocketAddr, method: &str, path: &str, accept: Option<&str>) -> Scraped {
    within("a metrics request", async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let request = request
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Scraped {
            status,
            content_type,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    })
    .await
}

/// `GET /metrics` in the Prometheus text format.
pub(crate) async fn scrape(addr: SocketAddr) -> String {
    let scraped = request(addr, "GET", "/metrics", None).await;
    assert_eq!(scraped.status, 200, "{}", scraped.body);
    scraped.body
}

/// The value of the sample `series` (name and labels, as exposed).
pub(crate) fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// Scrapes until `series` has the value `want` (bounded by [`LIMIT`];
/// the counters move as the server and agents work, in their own tasks).
async fn scrape_until(addr: SocketAddr, series: &str, want: f64) -> String {
    let mut last = String::new();
    let reached = tokio::time::timeout(LIMIT, async {
        loop {
            last = scrape(addr).await;
            if value(&last, series) == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    if reached.is_err() {
        panic!("{series} did not reach {want} within {LIMIT:?}; last scrape:\n{last}");
    }
    last
}

/// Saves a scrape for .ci/run's `promtool check metrics`.
fn save(name: &str, text: &str) {
    if let Some(dir) = std::env::var_os("CONTACTD_METRICS_OUT") {
        std::fs::write(std::path::Path::new(&dir).join(name), text).unwrap();
    }
}

/// A metrics config on a free loopback port.
fn on_loopback() -> MetricsConfig {
    MetricsConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..MetricsConfig::default()
    }
}

/// An endpoint bound on 127.0.0.1:0, with the process' series.
fn endpoint(prefix: &str) -> (Endpoint, SocketAddr) {
    let listener = contactd::metrics::http::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut registry = contactd::metrics::registry(prefix, None);
    Reloads::default().register(&mut registry);
    (Endpoint { listener, registry }, addr)
}

/// A server in this process with its metrics endpoint; returns the
/// endpoint's address.
async fn start_server(mut config: Config) -> (TestServer, SocketAddr) {
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.metrics = on_loopback();
    let dir = tempfile::tempdir().unwrap();
    config.admin.socket = dir.path().join("admin.sock");
    config.store.path = Some(dir.path().join("contactd.db"));
    let listener = contactd::net::bind(config.server.listen, 128).unwrap();
    let addr = listener.local_addr().unwrap();
    let (endpoint, metrics) = endpoint("contactd");
    let (config, rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let opened = server::open_store(&rx.borrow()).unwrap();
    // Started: the metrics listener answers once it says so (a scrape
    // sooner would only wait in its backlog).
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(server::run(server::Serve {
        store: Some(opened),
        metrics: Some(endpoint),
        started: Some(started_tx),
        ..server::Serve::new(listener, rx, shutdown.clone())
    }));
    started.await.expect("the server started");
    let server = TestServer {
        addr,
        config,
        shutdown,
        task,
        dir,
    };
    (server, metrics)
}

/// An in-process agent with its metrics endpoint.
fn start_agent(mut config: AgentConfig) -> (TestAgent, SocketAddr) {
    config.metrics = on_loopback();
    let (endpoint, metrics) = endpoint("contactd_agent");
    let (tx, events) = broadcast::channel(4096);
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(contactd::agent::run(contactd::agent::Run {
        events: Some(tx),
        metrics: Some(endpoint),
        ..contactd::agent::Run::new(config_rx, shutdown.clone())
    }));
    (
        TestAgent::from_parts(events, shutdown, task, config_tx),
        metrics,
    )
}

// ---- the server's series: agents, tasks, calls, commands, queue mode ----

fn manual() -> Config {
    let mut config = with_commands(&["true", "sleep *"]);
    config.remote_cmd.timeout = Duration::from_millis(200);
    config.tasks.batch = 0;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_counts_agents_tasks_calls_and_commands() {
    const AGENTS: usize = 3;
    const TASKS: usize = 5;
    let (server, metrics) = start_server(manual()).await;
    let before = scrape(metrics).await;
    assert_eq!(value(&before, "contactd_tasks_published_total"), Some(0.0));
    assert_eq!(value(&before, "contactd_serving"), Some(1.0));
    let mut agents: Vec<TestAgent> = (0..AGENTS)
        .map(|i| TestAgent::start(agent_config(server.addr, &format!("web{i}"))))
        .collect();
    for agent in &mut agents {
        agent.wait_for("connected", connected).await;
    }
    scrape_until(
        metrics,
        "contactd_agents_connected{kind=\"named\"}",
        AGENTS as f64,
    )
    .await;

    let mut admin = server.admin().await;
    for i in 0..TASKS {
        submit(&mut admin, &format!("task {i}"), "").await;
    }
    for agent in &mut agents {
        for _ in 0..TASKS {
            let (_, outcome) = agent.wait_for("a handled task", handled).await;
            assert_eq!(outcome, Outcome::Ok);
        }
    }
    // Every agent handled every task: the acks reach the server.
    let all = (AGENTS * TASKS) as f64;
    let text = scrape_until(metrics, "contactd_tasks_acked_total{outcome=\"ok\"}", all).await;
    assert_eq!(
        value(&text, "contactd_tasks_acked_total{outcome=\"failed\"}"),
        Some(0.0)
    );
    assert_eq!(value(&text, "contactd_tasks_delivered_total"), Some(all));
    assert_eq!(
        value(&text, "contactd_tasks_published_total"),
        Some(TASKS as f64)
    );
    assert_eq!(
        value(&text, "contactd_agent_connections_total{kind=\"named\"}"),
        Some(AGENTS as f64)
    );
    // Streams are counted as they open (tellResult, a client stream, when
    // it ends: its response comes then).
    for method in ["getTask", "sendStatus"] {
        assert_eq!(
            value(
                &text,
                &format!("contactd_grpc_requests_total{{method=\"{method}\",code=\"OK\"}}")
            ),
            Some(AGENTS as f64),
            "{method}:\n{text}"
        );
    }

    // Remote commands: one runs, one is not allowed, one times out.
    let mut client = server.client().await;
    let run = |cmd: &str| CmdRequest {
        index: 1,
        cmd_str: cmd.into(),
        log: String::new(),
    };
    assert!(
        client
            .remote_cmd(run("true"))
            .await
            .unwrap()
            .into_inner()
            .success
    );
    let denied = client.remote_cmd(run("rm -rf /")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let slow = client
        .remote_cmd(run("sleep 30"))
        .await
        .unwrap()
        .into_inner();
    assert!(!slow.success);
    let text = scrape_until(metrics, "contactd_grpc_request_duration_seconds_count", 3.0).await;
    for (outcome, count) in [
        ("ok", 1.0),
        ("denied", 1.0),
        ("timeout", 1.0),
        ("failed", 0.0),
    ] {
        assert_eq!(
            value(
                &text,
                &format!("contactd_remote_commands_total{{outcome=\"{outcome}\"}}")
            ),
            Some(count),
            "{outcome}:\n{text}"
        );
    }
    assert_eq!(
        value(
            &text,
            "contactd_grpc_requests_total{method=\"remoteCMD\",code=\"OK\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &text,
            "contactd_grpc_requests_total{method=\"remoteCMD\",code=\"PERMISSION_DENIED\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "contactd_remote_command_duration_seconds_count"),
        Some(3.0)
    );
    assert!(
        text.contains("contactd_build_info{version=\""),
        "build info:\n{text}"
    );
    save("server.prom", &text);

    // The OpenMetrics format, when asked for.
    let open = request(
        metrics,
        "GET",
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .await;
    assert_eq!(open.status, 200);
    assert!(
        open.content_type
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "{}",
        open.content_type
    );
    assert!(open.body.ends_with("# EOF\n"), "{}", open.body);
    assert!(open.body.contains("# TYPE contactd_tasks_acked counter\n"));
    let plain = request(metrics, "GET", "/metrics", None).await;
    assert!(
        plain.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        plain.content_type
    );

    // Only GET /metrics.
    assert_eq!(request(metrics, "GET", "/", None).await.status, 404);
    assert_eq!(request(metrics, "GET", "/metricsx", None).await.status, 404);
    assert_eq!(request(metrics, "POST", "/metrics", None).await.status, 405);

    for agent in agents {
        agent.stop().await;
    }
    scrape_until(metrics, "contactd_agents_connected{kind=\"named\"}", 0.0).await;
    server.stop().await;
    assert!(
        TcpStream::connect(metrics).await.is_err(),
        "the metrics listener closes with the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_mode_counts_pending_redelivered_and_dead_tasks() {
    let mut config = manual();
    config.tasks.mode = contactd::config::DeliveryMode::Queue;
    config.tasks.max_attempts = 1;
    config.tasks.ack_timeout = Duration::from_millis(100);
    let (server, metrics) = start_server(config).await;
    let mut admin = server.admin().await;
    // No agent: the tasks wait.
    for i in 0..4 {
        submit(&mut admin, &format!("task {i}"), "").await;
    }
    scrape_until(metrics, "contactd_tasks_pending", 4.0).await;
    // A client that takes tasks and never acks: each is parked as dead
    // after its one attempt.
    let mut client = server.client().await;
    let mut stream = client
        .get_task(contactd::proto::contact::Empty {})
        .await
        .unwrap()
        .into_inner();
    within("a task", stream.message()).await.unwrap().unwrap();
    let text = scrape_until(metrics, "contactd_tasks_dead_total", 4.0).await;
    assert_eq!(value(&text, "contactd_tasks_pending"), Some(0.0));
    assert_eq!(value(&text, "contactd_tasks_dead_retained"), Some(4.0));
    assert_eq!(value(&text, "contactd_tasks_redelivered_total"), Some(0.0));
    drop(stream);
    server.stop().await;
}

// ---- jobs: runs by outcome, last success, periods, running and halted ----

/// A `[[jobs]]` entry as the config file writes it.
fn job(toml: &str) -> contactd::config::JobConfig {
    toml::from_str(toml).unwrap()
}

/// A job's sample: `series{job_name="job"[,outcome="outcome"]}`.
fn of_job(series: &str, job: &str, outcome: Option<&str>) -> String {
    match outcome {
        Some(outcome) => format!("{series}{{job_name=\"{job}\",outcome=\"{outcome}\"}}"),
        None => format!("{series}{{job_name=\"{job}\"}}"),
    }
}

/// An ad hoc rollout of `text` over the agents `selector` matches, one at
/// a time, halting at the first failure.
async fn rollout(server: &TestServer, text: &str, selector: &str) -> u64 {
    let request = contactd::proto::admin::SubmitTaskRequest {
        text: text.into(),
        selector: selector.into(),
        batch: "1".into(),
        max_failed: "0".into(),
        ..Default::default()
    };
    let response = server.admin().await.submit_task(request).await.unwrap();
    let run = response.into_inner().run;
    assert_ne!(run, 0, "a rollout has a run");
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_count_runs_by_outcome_and_export_last_success_and_periods() {
    let mut config = manual();
    config.jobs = vec![
        // Broadcast: succeeds as it starts, with or without agents.
        job("name = \"tick\"\ntext = \"tick {seq}\"\nevery = \"1s\"\nmode = \"broadcast\"\n"),
        // Never due during the test; uneven gaps (8 h, 16 h): its period is
        // the longer.
        job("name = \"twice\"\ntext = \"x\"\ncron = \"0 9,17 * * *\"\n"),
    ];
    let started = contactd::clock::now_ms() as f64 / 1000.0;
    let (server, metrics) = start_server(config).await;
    let runs = "contactd_job_runs_total";
    let succeeded = of_job(runs, "tick", Some("succeeded"));
    let text = common::until(
        "tick's first success",
        || scrape(metrics),
        |text| value(text, &succeeded).is_some_and(|n| n >= 1.0),
    )
    .await;
    let now = contactd::clock::now_ms() as f64 / 1000.0;
    assert!(
        text.contains("# TYPE contactd_job_runs_total counter\n"),
        "{text}"
    );
    // Every configured job has every outcome, from 0.
    for outcome in ["failed", "timed_out", "skipped"] {
        assert_eq!(
            value(&text, &of_job(runs, "tick", Some(outcome))),
            Some(0.0),
            "{text}"
        );
    }
    for outcome in ["succeeded", "failed", "timed_out", "skipped"] {
        assert_eq!(
            value(&text, &of_job(runs, "twice", Some(outcome))),
            Some(0.0),
            "{text}"
        );
    }
    let last = "contactd_job_last_success_timestamp_seconds";
    let since = "contactd_job_scheduled_since_timestamp_seconds";
    let period = "contactd_job_period_seconds";
    let tick_since = value(&text, &of_job(since, "tick", None)).unwrap();
    assert!(
        (started..=now).contains(&tick_since),
        "{started} {tick_since} {now}"
    );
    let tick_last = value(&text, &of_job(last, "tick", None)).unwrap();
    assert!(
        (tick_since..=now).contains(&tick_last),
        "{tick_since} {tick_last} {now}"
    );
    assert_eq!(value(&text, &of_job(period, "tick", None)), Some(1.0));
    // Never succeeded: no last success, judged from when it was scheduled.
    assert_eq!(value(&text, &of_job(last, "twice", None)), None, "{text}");
    assert!(
        value(&text, &of_job(since, "twice", None)).is_some(),
        "{text}"
    );
    assert_eq!(
        value(&text, &of_job(period, "twice", None)),
        Some(16.0 * 3600.0)
    );
    // Paused, a job has no period (no run is expected: the alert leaves it
    // alone); resumed, it has one again. The admin call answers once the
    // change is in force.
    let pause = |paused| contactd::proto::admin::PauseJobRequest {
        name: "twice".into(),
        paused,
    };
    let mut admin = server.admin().await;
    admin.pause_job(pause(true)).await.unwrap();
    let text = scrape(metrics).await;
    assert_eq!(value(&text, &of_job(period, "twice", None)), None, "{text}");
    assert!(
        value(&text, &of_job(since, "twice", None)).is_some(),
        "{text}"
    );
    admin.pause_job(pause(false)).await.unwrap();
    let text = scrape(metrics).await;
    assert_eq!(
        value(&text, &of_job(period, "twice", None)),
        Some(16.0 * 3600.0)
    );
    // The scrape job's `job` label is Prometheus' own: no series sets it.
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("contactd_job") && l.contains("{job=\"")),
        "{text}"
    );

    // Ad hoc rollouts, by the outcomes seen; a halted run is counted as
    // halted until it ends.
    let mut ok = TestAgent::start(agent_config(server.addr, "ok1"));
    let mut bad = TestAgent::start(AgentConfig {
        handler: vec!["false".into()],
        ..agent_config(server.addr, "bad1")
    });
    ok.wait_for("connected", connected).await;
    bad.wait_for("connected", connected).await;
    rollout(&server, "fine", "name=ok1").await;
    let ad_hoc = of_job(runs, "(ad hoc)", Some("succeeded"));
    scrape_until(metrics, &ad_hoc, 1.0).await;
    rollout(&server, "broken", "name=bad1").await;
    let text = scrape_until(metrics, "contactd_job_runs_halted", 1.0).await;
    assert_eq!(
        value(&text, "contactd_job_runs_running"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &of_job(runs, "(ad hoc)", Some("failed"))),
        None,
        "{text}"
    );
    assert_eq!(value(&text, &ad_hoc), Some(1.0), "{text}");
    save("jobs.prom", &text);
    ok.stop().await;
    bad.stop().await;
    server.stop().await;
}

// ---- the listener's bounds: connections, slow and large headers, bodies ----

/// A raw connection that has read everything until the server closed it;
/// what it read.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    // A reset (the server closed with unread input) ends it too.
    let _ = within(
        "the server closing the connection",
        stream.read_to_end(&mut out),
    )
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `request` on new connections until one is answered (with the
/// only slot taken, a connection is closed unanswered: the previous one
/// may not have been released yet); the answer.
async fn answered(addr: SocketAddr, request: &[u8]) -> String {
    within("an answered request", async {
        loop {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // The server may close before reading it all (a refusal, 431).
            let _ = stream.write_all(request).await;
            let answer = read_to_close(&mut stream).await;
            if !answer.is_empty() {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_bounds_connections_slow_headers_large_headers_and_bodies() {
    // The bounds as `[metrics]` gives them (MetricsConfig -> Limits), on
    // an endpoint of its own.
    let limits = contactd::metrics::http::Limits::from(&MetricsConfig {
        max_connections: 1,
        header_timeout: Duration::from_millis(300),
        ..MetricsConfig::default()
    });
    let listener = contactd::metrics::http::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let registry = Arc::new(contactd::metrics::registry("contactd", None));
    let serving = tokio::spawn(contactd::metrics::http::serve(
        listener,
        limits,
        registry,
        stop.clone(),
    ));

    // A slowloris: connects, sends half a request line, then nothing. It
    // holds the one slot...
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metr").await.unwrap();
    // ...so another connection is closed at once, unanswered (the slot is
    // taken once the first is accepted: retried until then).
    within("a refused connection", async {
        loop {
            let mut other = TcpStream::connect(addr).await.unwrap();
            other
                .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .ok();
            if read_to_close(&mut other).await.is_empty() {
                return;
            }
        }
    })
    .await;
    // The slow one is closed at the header timeout (hyper answers 408).
    let started = std::time::Instant::now();
    let answer = read_to_close(&mut slow).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));

    // Its slot is free again (once the server has finished with it): a
    // scrape is served.
    let answer = answered(addr, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("contactd_build_info"), "{answer}");

    // A head larger than max_header_size is refused unread.
    let padding = "x".repeat(32 * 1024);
    let head = format!("GET /metrics HTTP/1.1\r\nhost: x\r\nx-padding: {padding}\r\n\r\n");
    let answer = answered(addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    // A request with a body is refused, the body unread.
    let answer = answered(
        addr,
        b"GET /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");

    stop.cancel();
    within("the metrics server to stop", serving).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_connections_open_does_not_keep_a_scraper_out() {
    let limits = contactd::metrics::http::Limits::from(&MetricsConfig::default());
    assert_eq!(
        (limits.max_connections, limits.max_connections_per_address),
        (8, 2)
    );
    let listener = contactd::metrics::http::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let registry = Arc::new(contactd::metrics::registry("contactd", None));
    let serving = tokio::spawn(contactd::metrics::http::serve(
        listener,
        limits,
        registry,
        stop.clone(),
    ));
    // 100 half-sent requests from 127.0.0.1, each reopened as it is closed.
    let mut holders = Vec::new();
    for _ in 0..100 {
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let _ = slow.write_all(b"GET /metr").await;
        holders.push(slow);
    }
    // A scraper on another loopback address is answered, at once.
    let scraper = async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        read_to_close(&mut stream).await
    };
    let answer = within("a scrape from another address", scraper).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // Of the 100, the address's two are held, the rest closed unanswered.
    let mut closed = 0;
    for holder in &mut holders[2..] {
        if read_to_close(holder).await.is_empty() {
            closed += 1;
        }
    }
    assert_eq!(closed, 98);
    stop.cancel();
    within("the metrics server to stop", serving).await.unwrap();
}

// ---- the agent's series: its session and tasks ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_counts_its_session_and_tasks() {
    const TASKS: usize = 4;
    let server = TestServer::start({
        let mut config = Config::default();
        config.tasks.batch = 0;
        config
    })
    .await;
    let (mut agent, metrics) = start_agent(agent_config(server.addr, "web1"));
    agent.wait_for("connected", connected).await;
    let text = scrape_until(metrics, "contactd_agent_connected", 1.0).await;
    assert_eq!(value(&text, "contactd_agent_sessions_total"), Some(1.0));
    assert!(
        value(&text, "contactd_agent_last_connected_timestamp_seconds").unwrap() > 1.0e9,
        "{text}"
    );
    let mut admin = server.admin().await;
    for i in 0..TASKS {
        submit(&mut admin, &format!("task {i}"), "web1").await;
    }
    for _ in 0..TASKS {
        agent.wait_for("a handled task", handled).await;
    }
    let text = scrape_until(
        metrics,
        "contactd_agent_tasks_handled_total{outcome=\"ok\"}",
        TASKS as f64,
    )
    .await;
    assert_eq!(
        value(&text, "contactd_agent_handler_duration_seconds_count"),
        Some(TASKS as f64)
    );
    assert_eq!(value(&text, "contactd_agent_tasks_queued"), Some(0.0));
    assert_eq!(value(&text, "contactd_agent_acks_dropped_total"), Some(0.0));
    assert!(text.contains("contactd_agent_build_info{"), "{text}");
    save("agent.prom", &text);

    // The server goes away: the agent says it is disconnected.
    server.stop().await;
    let text = scrape_until(metrics, "contactd_agent_connected", 0.0).await;
    assert!(
        value(&text, "contactd_agent_connect_failures_total").unwrap() >= 1.0,
        "{text}"
    );
    agent.stop().await;
}

// ---- the real binary: its address logged, reloads counted, bounds checked ----

#[test]
fn the_daemon_logs_its_metrics_address_and_counts_reloads() {
    // Both listeners on free ports (a config naming a `listen` gets no
    // [server] listen added by Daemon).
    let mut daemon = Daemon::start(
        "[server]\nlisten = \"127.0.0.1:0\"\n[tasks]\nbatch = 0\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let line = daemon.wait_for_line("metrics endpoint listening");
    let addr: SocketAddr = field(&line, "addr").parse().unwrap();
    assert_ne!(addr.port(), 0, "the bound port is logged");
    assert_ne!(addr, daemon.addr);
    // Tools that take the first `addr=` line (examples/bench) find Contact's.
    let position = |needle: &str| daemon.log.iter().position(|l| l.contains(needle));
    assert!(
        position("serving Contact") < position("metrics endpoint listening"),
        "{:#?}",
        daemon.log
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = runtime.block_on(scrape(addr));
    assert_eq!(
        value(&text, "contactd_config_reloads_total{result=\"applied\"}"),
        Some(0.0),
        "{text}"
    );
    assert!(value(&text, "contactd_start_time_seconds").unwrap() > 1.0e9);
    assert_eq!(value(&text, "contactd_log_lines_dropped_total"), Some(0.0));
    // A changed [metrics] is applied at the next start, and says so.
    let path = daemon.config_path();
    let config = std::fs::read_to_string(&path).unwrap();
    let changed = config.replace("[metrics]\n", "[metrics]\nmax_connections = 4\n");
    std::fs::write(&path, &changed).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let warning = daemon.wait_for_line("apply after a restart");
    assert!(
        warning.contains("restart=\"metrics.max_connections\""),
        "{warning}"
    );
    runtime.block_on(scrape_until(
        addr,
        "contactd_config_reloads_total{result=\"applied\"}",
        1.0,
    ));
    // An invalid file is counted as a failed reload.
    std::fs::write(
        &path,
        changed.replace("max_connections = 4", "max_connections = 0"),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_for_line("config reload failed");
    runtime.block_on(scrape_until(
        addr,
        "contactd_config_reloads_total{result=\"failed\"}",
        1.0,
    ));
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(LIMIT).success());
}

#[test]
fn check_config_names_every_metrics_bound_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("contactd.toml");
    std::fs::write(
        &path,
        "[metrics]\nlisten = \"127.0.0.1:9466\"\nmax_connections = 0\nheader_timeout = \"2m\"\n\
         timeout = \"1m\"\nmax_header_size = \"1KiB\"\n\
         [agent.metrics]\n",
    )
    .unwrap();
    let out = common::contactd()
        .args(["check-config", "-c", path.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    for needle in [
        "metrics.max_connections: 0 is out of range: expected from 1 to 1024",
        "metrics.header_timeout: \"2m\" is out of range",
        "metrics.header_timeout: is longer than metrics.timeout",
        "metrics.max_header_size: \"1KiB\" is out of range",
        "agent: unknown field",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }

    // The packaged configs: the server's on loopback, the agent's off.
    let root = env!("CARGO_MANIFEST_DIR");
    let server: Config =
        contactd::config::load(&std::path::Path::new(root).join("config/contactd.toml")).unwrap();
    assert_eq!(
        server.metrics.listen,
        Some("127.0.0.1:9466".parse().unwrap())
    );
    assert_eq!(Config::default().metrics.listen, None, "off by default");
    let agent: contactd::config::AgentFile =
        contactd::config::load(&std::path::Path::new(root).join("config/contactd-agent.toml"))
            .unwrap();
    assert_eq!(agent.agent.metrics, MetricsConfig::default());
}
