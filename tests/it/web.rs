//! The web console, in a real headless browser (Debian's chromium, driven
//! by chromedriver over WebDriver), against a live server with 50 real
//! gRPC agents: log in with an operator token, see the 50 agents, filter
//! them by a selector, submit a task to the selector and see its results
//! arrive on the open page by server-sent events (no reload), open the task
//! from the list, and see an agent's hostile status shown as text. The
//! same browser then takes every action against the real binary with a
//! real agent (cancel, retry, pause and resume a job, halt and resume a
//! rollout), each checked in its log for who did it, and a demoted
//! operator's session is refused; on each page it visits there it checks
//! the basics of accessibility (labels, Tab order, states in words).
//!
//! Without chromium and chromedriver the browser test is skipped, unless
//! `CI=true` (where `.ci/run` installs them) fails it. With
//! `CONTACTD_WEB_SCREENSHOTS=DIR` it saves the pages it visits there as
//! PNG (README's pictures come from it).
//!
//! The HTTP-level tests (no browser) check what a stranger gets: nothing
//! but the login page and redirects, refused forms without a session,
//! CSRF token or from another origin, and the security headers.

use crate::common;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use common::{LIMIT, daemon::Daemon, until, within};
use contactd::{
    auth::{Role, create_token},
    config::Config,
    labels::LABELS_HEADER,
    proto::{
        AGENT_HEADER,
        admin::{ListAgentsRequest, admin_client::AdminClient},
        contact::{
            ClientMsg, Empty, Outcome, Result as ResultMsg, ServerMsg,
            contact_client::ContactClient,
        },
    },
    server,
};
use fantoccini::{Client, ClientBuilder, Locator};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

/// What an agent's status may hold: markup and script that must show as
/// text, never run.
const HOSTILE: &str = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script><b>bold</b>";

/// A server with the console on 127.0.0.1:0 and named tokens.
struct Console {
    addr: std::net::SocketAddr,
    web: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), server::ServerError>>,
    dir: tempfile::TempDir,
    /// The operator's token, and each agent's by name.
    operator: String,
    tokens: HashMap<String, String>,
    /// Sending a config here reloads it.
    config: watch::Sender<Arc<Config>>,
}

impl Console {
    async fn start(agents: usize) -> Console {
        Console::start_with(agents, |_| {}).await
    }

    /// With `change` made to the config after the console's own settings.
    async fn start_with(agents: usize, change: impl FnOnce(&mut Config)) -> Console {
        let dir = tempfile::tempdir().unwrap();
        let tokens_file = dir.path().join("tokens");
        let operator = create_token(&tokens_file, "ops", Role::Operator, false).unwrap();
        // The agents' tokens written at once (`create_token` rewrites the
        // file for each, too slow for 10,000).
        let tokens: HashMap<String, String> = (0..agents)
            .map(|n| (format!("agent-{n:03}"), format!("ctd_test_agent_{n}")))
            .collect();
        let mut lines = std::fs::read_to_string(&tokens_file).unwrap();
        for (name, token) in &tokens {
            let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            lines.push_str(&format!("{name} agent sha256:{hex}\n"));
        }
        std::fs::write(&tokens_file, lines).unwrap();
        let mut config = Config::default();
        config.tasks.batch = 0;
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.server.tokens_file = Some(tokens_file);
        config.admin.socket = dir.path().join("admin.sock");
        config.store.path = Some(dir.path().join("contactd.db"));
        config.web.listen = Some("127.0.0.1:0".parse().unwrap());
        config.web.event_interval = Duration::from_millis(200);
        config.server.max_callers = 20_000;
        change(&mut config);
        let listener = contactd::net::bind(config.server.listen, 128).unwrap();
        let web = contactd::net::bind(config.web.listen.unwrap(), 128).unwrap();
        let (addr, web_addr) = (listener.local_addr().unwrap(), web.local_addr().unwrap());
        let (config_tx, rx) = watch::channel(Arc::new(config));
        let shutdown = CancellationToken::new();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server::run(server::Serve {
            web: Some(web),
            started: Some(started_tx),
            ..server::Serve::new(listener, rx, shutdown.clone())
        }));
        within("the server started", started).await.unwrap();
        Console {
            addr,
            web: web_addr,
            shutdown,
            task,
            dir,
            operator,
            tokens,
            config: config_tx,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.web)
    }

    async fn admin(&self) -> AdminClient<Channel> {
        contactd::client::admin::connect(&self.dir.path().join("admin.sock"))
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        within("server exit", self.task).await.unwrap().unwrap();
    }
}

/// An agent's token, name and labels on every call.
#[derive(Clone)]
struct Agent {
    token: String,
    name: String,
    labels: String,
}

impl Interceptor for Agent {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        metadata.insert(AGENT_HEADER, self.name.parse().unwrap());
        metadata.insert(LABELS_HEADER, self.labels.parse().unwrap());
        Ok(request)
    }
}

/// The fleet: every task any agent receives comes out of one channel with
/// the agent's name; acks go back on each agent's own stream.
struct Fleet {
    received: mpsc::UnboundedReceiver<(String, ServerMsg)>,
    acks: HashMap<String, mpsc::Sender<ResultMsg>>,
    /// Each agent's status stream, held open.
    _status: Vec<mpsc::Sender<ClientMsg>>,
}

impl Fleet {
    /// The console's agents, even ones `role=web`, odd ones `role=db`; each
    /// reports a status (agent-007 a hostile one).
    async fn connect(console: &Console) -> Fleet {
        Fleet::connect_to(console.addr, &console.tokens).await
    }

    /// The agents `tokens` names, of the server at `addr`.
    async fn connect_to(addr: std::net::SocketAddr, tokens: &HashMap<String, String>) -> Fleet {
        let (tx, received) = mpsc::unbounded_channel();
        let (mut acks, mut status) = (HashMap::new(), Vec::new());
        let mut names: Vec<&String> = tokens.keys().collect();
        names.sort();
        for (n, name) in names.into_iter().enumerate() {
            let agent = Agent {
                token: tokens[name].clone(),
                name: name.clone(),
                labels: format!(
                    "role={},zone=z{}",
                    if n.is_multiple_of(2) { "web" } else { "db" },
                    n % 3
                ),
            };
            let channel = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client: ContactClient<InterceptedService<Channel, Agent>> =
                ContactClient::with_interceptor(channel, agent);
            let mut tasks = within("getTask", client.get_task(Empty {}))
                .await
                .unwrap()
                .into_inner();
            let (ack_tx, ack_rx) = mpsc::channel(64);
            let mut acker = client.clone();
            tokio::spawn(async move { acker.tell_result(ReceiverStream::new(ack_rx)).await });
            let (status_tx, status_rx) = mpsc::channel(4);
            let text = if name == "agent-007" {
                HOSTILE.to_owned()
            } else {
                format!("load 0.{n:02}, all well")
            };
            status_tx.send(ClientMsg { msg: text }).await.unwrap();
            let mut replies = within(
                "sendStatus",
                client.send_status(ReceiverStream::new(status_rx)),
            )
            .await
            .unwrap()
            .into_inner();
            within("the status reply", replies.message()).await.unwrap();
            tokio::spawn(async move { while let Ok(Some(_)) = replies.message().await {} });
            let (tx, agent) = (tx.clone(), name.clone());
            tokio::spawn(async move {
                while let Ok(Some(msg)) = tasks.message().await {
                    if tx.send((agent.clone(), msg)).is_err() {
                        return;
                    }
                }
            });
            acks.insert(name.clone(), ack_tx);
            status.push(status_tx);
        }
        Fleet {
            received,
            acks,
            _status: status,
        }
    }

    async fn ack(&self, agent: &str, task: &ServerMsg, result: &str) {
        self.answer(agent, task, result, Outcome::Ok).await;
    }

    async fn answer(&self, agent: &str, task: &ServerMsg, result: &str, outcome: Outcome) {
        self.acks[agent]
            .send(ResultMsg {
                ret: result.into(),
                task_id: task.id,
                outcome: outcome as i32,
                epoch: task.epoch,
            })
            .await
            .unwrap();
    }

    /// The next task any agent receives whose id is `id`.
    async fn next_of(&mut self, id: u64, what: &str) -> (String, ServerMsg) {
        within(what, async {
            loop {
                let (agent, msg) = self.received.recv().await.expect("the agents run");
                if msg.id == id {
                    return (agent, msg);
                }
            }
        })
        .await
    }
}

/// chromedriver, and a WebDriver session of headless chromium on it.
struct Browser {
    driver: Child,
    client: Client,
}

impl Browser {
    /// The browser, or `None` (test skipped) when chromium or chromedriver
    /// is missing outside CI.
    async fn start(test: &str) -> Option<Browser> {
        let chromium = ["/usr/bin/chromium", "/usr/lib/chromium/chromium"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "chromium or chromedriver is not installed, and CI=true: .ci/run installs them"
            );
            eprintln!(
                "SKIPPED {test}: chromium and chromedriver are not installed \
                 (apt-get install chromium chromium-driver)"
            );
            return None;
        };
        // A free loopback port for chromedriver (it cannot be told port 0).
        // Another process may take the port between our probe and its
        // bind (the machine is shared): then it says so and exits, and it
        // is started again on another port, three times at most.
        let mut tries = Vec::new();
        let (driver, port) = loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            // In a process group of its own, with the browser it starts:
            // a test that fails ends both (`Drop`).
            let mut driver = Command::new(&driver)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("start chromedriver");
            // It says when it listens: wait for that line, not for a time.
            let stdout = driver.stdout.take().unwrap();
            let ready = tokio::task::spawn_blocking(move || {
                let mut lines = BufReader::new(stdout).lines();
                let mut said = Vec::new();
                for line in lines.by_ref().take(100).map_while(Result::ok) {
                    if line.contains("started successfully") {
                        // Keep draining, so chromedriver never blocks on a
                        // full pipe.
                        std::thread::spawn(move || lines.for_each(drop));
                        return Ok(());
                    }
                    said.push(line);
                }
                Err(said.join("\n"))
            });
            match within("chromedriver to listen", ready).await.unwrap() {
                Ok(()) => break (driver, port),
                Err(said) => {
                    let _ = driver.kill();
                    let _ = driver.wait();
                    tries.push(format!("port {port}: {said}"));
                    assert!(tries.len() < 3, "chromedriver did not start: {tries:#?}");
                }
            }
        };
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         "--no-first-run", "--disable-extensions"],
            }),
        );
        let client = within(
            "a WebDriver session",
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("chromedriver session");
        Some(Browser { driver, client })
    }

    /// Saves the page as `name`.png when screenshots are asked for.
    async fn picture(&self, name: &str) {
        let Some(dir) = std::env::var_os("CONTACTD_WEB_SCREENSHOTS") else {
            return;
        };
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }

    /// The text of the element `css` finds, once it is there (found again
    /// if a live update swapped it out between finding and reading).
    async fn text(&self, css: &str) -> String {
        for _ in 0..10 {
            let element = self
                .client
                .wait()
                .at_most(LIMIT)
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css}: {e}"));
            if let Ok(text) = element.text().await {
                return text;
            }
        }
        panic!("{css} was swapped out ten times over while being read");
    }

    /// Waits until the element `css` finds holds `wanted` in its text.
    async fn until_text(&self, css: &str, wanted: &str) {
        let client = &self.client;
        within(&format!("{css} to show {wanted:?}"), async {
            client
                .wait()
                .at_most(LIMIT)
                .every(Duration::from_millis(50))
                .for_element(Locator::Css(css))
                .await
                .unwrap();
            loop {
                let shown = match client.find(Locator::Css(css)).await {
                    Ok(element) => element.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                if shown.contains(wanted) {
                    return;
                }
                // The DOM has no event to wait for over WebDriver: a short
                // poll, bounded by `within`.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }

    /// Clicks the button whose text or `aria-label` is `name`.
    async fn press(&self, name: &str) {
        self.client
            .wait()
            .at_most(LIMIT)
            .for_element(Locator::XPath(&format!(
                "//button[normalize-space(text())='{name}' or @aria-label='{name}']"
            )))
            .await
            .unwrap_or_else(|e| panic!("no button {name:?}: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// Fills the fields (`css`, value) of the page's form and submits it
    /// with the button `#submit`.
    async fn fill_and_submit(&self, fields: &[(&str, &str)]) {
        for (css, value) in fields {
            self.client
                .find(Locator::Css(css))
                .await
                .unwrap()
                .send_keys(value)
                .await
                .unwrap();
        }
        self.client
            .find(Locator::Css("#submit"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// The id at the end of the page's address (`/tasks/ID`).
    async fn id_in_address(&self) -> u64 {
        let url = self.client.current_url().await.unwrap();
        url.path()
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("not a task's page: {url}"))
    }

    /// Logs in at `base` with `token` (the login page is where any page
    /// sends a stranger).
    async fn log_in(&self, base: &str, token: &str) {
        self.client.goto(&format!("{base}/")).await.unwrap();
        self.client
            .wait()
            .at_most(LIMIT)
            .for_element(Locator::Css("#token"))
            .await
            .unwrap()
            .send_keys(token)
            .await
            .unwrap();
        self.client
            .find(Locator::Css("main form button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.until_text("h1", "Fleet").await;
    }

    /// Checks the page the browser shows (`what`) for the basics of
    /// accessibility: every form control has a label (`label[for]`,
    /// `aria-label` or `aria-labelledby`) and every button a name; no
    /// positive `tabindex`; every state shown in a colour of its own
    /// (anything not in the text's, the links' or the muted colour) says
    /// itself in words too; and Tab, pressed from the top, reaches every
    /// link, button and control on the page.
    async fn accessible(&self, what: &str) {
        let problems = self
            .client
            .execute(
                r##"
                const bad = [];
                const named = (el) => {
                    const by = (el.getAttribute("aria-labelledby") || "").trim();
                    return (el.id && document.querySelector(`label[for="${CSS.escape(el.id)}"]`))
                        || (el.getAttribute("aria-label") || "").trim()
                        || (by && by.split(/\s+/).every((id) => document.getElementById(id)));
                };
                for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea")) {
                    if (!named(el)) bad.push("no label: " + el.outerHTML);
                }
                for (const el of document.querySelectorAll("button")) {
                    if (!el.textContent.trim() && !named(el)) bad.push("no name: " + el.outerHTML);
                }
                for (const el of document.querySelectorAll("[tabindex]")) {
                    if (parseInt(el.getAttribute("tabindex"), 10) > 0) bad.push("positive tabindex: " + el.outerHTML);
                }
                const colour = (make) => {
                    const probe = make();
                    document.body.appendChild(probe);
                    const c = getComputedStyle(probe).color;
                    probe.remove();
                    return c;
                };
                const neutral = new Set([
                    getComputedStyle(document.body).color,
                    colour(() => Object.assign(document.createElement("a"), { href: "#" })),
                    colour(() => Object.assign(document.createElement("span"), { className: "hint" })),
                    colour(() => document.createElement("dt")),
                    colour(() => document.createElement("footer")),
                ]);
                for (const el of document.querySelectorAll("body *")) {
                    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
                    if (!own || neutral.has(getComputedStyle(el).color)) continue;
                    if (!/[A-Za-z]{2,}/.test(el.textContent)) bad.push("a state by colour alone: " + el.outerHTML);
                }
                // What Tab must reach, marked.
                const targets = [...document.querySelectorAll(
                    "a[href], button, input:not([type=hidden]), select, textarea, summary"
                )].filter((el) => el.getClientRects().length > 0 || el.classList.contains("skip"));
                targets.forEach((el, i) => el.setAttribute("data-a11y", String(i)));
                document.activeElement && document.activeElement.blur();
                window.scrollTo(0, 0);
                return { bad, targets: targets.length };
                "##,
                vec![],
            )
            .await
            .unwrap();
        let bad: Vec<String> = serde_json::from_value(problems["bad"].clone()).unwrap();
        assert!(bad.is_empty(), "{what}: {bad:#?}");
        let targets = problems["targets"].as_u64().unwrap() as usize;
        assert!(targets > 0, "{what}: nothing to reach");
        // Tab from the top of the page, at most twice round.
        let mut reached = std::collections::BTreeSet::new();
        for _ in 0..2 * targets + 4 {
            use fantoccini::actions::{InputSource, KeyAction, KeyActions};
            let tab = KeyActions::new("keyboard".into())
                .then(KeyAction::Down { value: '\u{E004}' })
                .then(KeyAction::Up { value: '\u{E004}' });
            self.client.perform_actions(tab).await.unwrap();
            let at = self
                .client
                .execute(
                    "return document.activeElement && document.activeElement.getAttribute('data-a11y');",
                    vec![],
                )
                .await
                .unwrap();
            if let Some(i) = at.as_str().and_then(|i| i.parse::<usize>().ok()) {
                reached.insert(i);
            }
            if reached.len() == targets {
                break;
            }
        }
        if reached.len() < targets {
            let missed = self
                .client
                .execute(
                    "return [...document.querySelectorAll('[data-a11y]')]\
                     .filter((el) => !arguments[0].includes(Number(el.getAttribute('data-a11y'))))\
                     .map((el) => el.outerHTML);",
                    vec![serde_json::json!(reached.iter().collect::<Vec<_>>())],
                )
                .await
                .unwrap();
            panic!("{what}: Tab does not reach {missed:#}");
        }
    }

    async fn rows(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.unwrap().len()
    }

    /// Ends the browser's session (it quits), then chromedriver.
    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    /// chromedriver and the browser it started, ended together (a test
    /// that failed never reached `close`).
    fn drop(&mut self) {
        if let Ok(group) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_the_fleet_filters_submits_and_watches_results_arrive_in_a_browser() {
    let Some(browser) = Browser::start("web console in a browser").await else {
        return;
    };
    let console = Console::start(50).await;
    let mut fleet = Fleet::connect(&console).await;
    let admin = console.admin().await;
    until(
        "50 agents connected, agent-007's status kept",
        || {
            let mut admin = admin.clone();
            async move {
                admin
                    .list_agents(ListAgentsRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .agents
            }
        },
        |agents| {
            agents.iter().filter(|a| a.connected).count() == 50
                && agents.iter().any(|a| a.last_status == HOSTILE)
        },
    )
    .await;
    let b = &browser;

    // Log in: the fleet page with its counts.
    b.log_in(&console.url(""), &console.operator).await;
    b.until_text("#connected", "50").await;
    assert_eq!(b.text("#down").await, "0");

    // The agents: all 50 on one page, agent-007's status as text.
    b.client.goto(&console.url("/agents")).await.unwrap();
    b.until_text("#matching", "50 agents match").await;
    assert_eq!(b.rows("#agents tr.agent").await, 50);
    let cells = b
        .client
        .find_all(Locator::Css("#agents td.status"))
        .await
        .unwrap();
    let mut shown = Vec::new();
    for cell in cells {
        shown.push(cell.text().await.unwrap());
    }
    assert!(
        shown.iter().any(|text| text == HOSTILE),
        "the hostile status is not shown as its text: {shown:?}"
    );
    assert_eq!(
        b.rows("#agents td.status img, #agents td.status script, #agents td.status b")
            .await,
        0,
        "the status became markup"
    );
    assert_ne!(
        b.client.title().await.unwrap(),
        "pwned",
        "the status ran as script"
    );
    b.picture("agents").await;

    // Filter by a selector, with the form (keyboard: type, Enter).
    let selector = b.client.find(Locator::Css("#selector")).await.unwrap();
    selector.send_keys("role=web").await.unwrap();
    selector.send_keys("\u{E007}").await.unwrap(); // Enter
    b.until_text("#matching", "25 agents match").await;
    assert_eq!(b.rows("#agents tr.agent").await, 25);

    // Submit a task to the selector: the page of the new task opens.
    b.client.goto(&console.url("/tasks")).await.unwrap();
    b.fill_and_submit(&[("#text", "restart web-console-test"), ("#to", "role=web")])
        .await;
    b.until_text("h1", "Task ").await;
    let id = b.id_in_address().await;
    // The page stays open: a mark on its window proves it is not reloaded.
    b.client
        .execute("window.stayed = 'yes'; return 1;", vec![])
        .await
        .unwrap();
    // Wait for the event stream to be open before the results come.
    within("the event stream open", async {
        loop {
            let live = b
                .client
                .execute("return document.body.getAttribute('data-live');", vec![])
                .await
                .unwrap();
            if live == serde_json::json!("on") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // The 25 web agents get it and answer; the open page shows each result.
    let mut got = Vec::new();
    while got.len() < 25 {
        let (agent, msg) = within("the task at the web agents", fleet.received.recv())
            .await
            .unwrap();
        if msg.id == id {
            got.push((agent, msg));
        }
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        got.iter()
            .all(|(agent, _)| { agent[6..].parse::<usize>().unwrap() % 2 == 0 })
    );
    for (agent, msg) in &got {
        fleet
            .ack(agent, msg, &format!("restarted on {agent}"))
            .await;
    }
    b.until_text("#results", "restarted on agent-000").await;
    b.until_text("#results", "restarted on agent-048").await;
    b.until_text("#task-state", "acked").await;
    assert_eq!(
        b.client
            .execute("return window.stayed;", vec![])
            .await
            .unwrap(),
        serde_json::json!("yes"),
        "the page was reloaded: the results did not arrive live"
    );
    b.picture("task").await;

    // The fleet page counts them in the last hour's results.
    b.client.goto(&console.url("/")).await.unwrap();
    b.until_text("#live", "25 results").await;
    b.picture("fleet").await;

    // Open the task from the list.
    b.client.goto(&console.url("/tasks")).await.unwrap();
    b.client
        .wait()
        .at_most(LIMIT)
        .for_element(Locator::LinkText(&format!("#{id}")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.until_text("h1", &format!("Task {id}")).await;
    b.until_text("#results", "restarted on agent-024").await;
    b.picture("tasks").await;

    console.stop().await;

    // The same browser, at the real binary (its log says who did what).
    actions_in_the_real_binary(b).await;
    browser.close().await;
}

/// A `contactd serve` in queue mode with a job, one agent and two
/// operators, for the actions: the web console's port, its log, the
/// operators' tokens and the tokens file.
struct Served {
    server: Daemon,
    web: String,
    operator: String,
    second: String,
    tokens_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start() -> (Served, HashMap<String, String>) {
        let dir = tempfile::tempdir().unwrap();
        let tokens_file = dir.path().join("tokens");
        let operator = create_token(&tokens_file, "ops", Role::Operator, false).unwrap();
        let second = create_token(&tokens_file, "ops2", Role::Operator, false).unwrap();
        let agent = create_token(&tokens_file, "agent-000", Role::Agent, false).unwrap();
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntokens_file = {:?}\n\
             [tasks]\nbatch = 0\nmode = \"queue\"\nmax_attempts = 1\n\
             [web]\nlisten = \"127.0.0.1:0\"\nevent_interval = \"200ms\"\n\
             [[jobs]]\nname = \"nightly\"\ntext = \"echo nightly\"\ncron = \"0 3 * * *\"\n\
             target = \"role=web\"\n",
            tokens_file
        );
        let mut server = Daemon::start(&config);
        let line = server.wait_for_line("serving the web console");
        let web = format!("http://{}", common::daemon::field(&line, "addr"));
        let tokens = HashMap::from([("agent-000".to_owned(), agent)]);
        let served = Served {
            server,
            web,
            operator,
            second,
            tokens_file,
            _dir: dir,
        };
        (served, tokens)
    }

    /// Waits for the log line holding `message`, and checks that it names
    /// the operator `ops`, logged in by token.
    fn logged(&mut self, message: &str) {
        let line = self.server.wait_for_line(message);
        assert!(
            line.contains("operator=ops ") && line.contains("by=\"token\""),
            "{message}: who did it is not in {line:?}"
        );
    }
}

/// Each action from the page against the real binary, with a real agent:
/// cancel a task, retry a failed one, pause and resume a job, halt and
/// resume a rollout; each is logged with who did it. An operator whose
/// token is demoted to an agent's at a reload can act no more, and without
/// a session no action is taken.
async fn actions_in_the_real_binary(b: &Browser) {
    let (mut served, tokens) = Served::start();
    let mut fleet = Fleet::connect_to(served.server.addr, &tokens).await;
    b.client
        .goto(&format!("{}/login", served.web))
        .await
        .unwrap();
    b.until_text("h1", "Log in").await;
    b.accessible("the login page").await;
    b.log_in(&served.web, &served.operator).await;
    b.until_text("#connected", "1").await;
    b.accessible("the fleet page").await;

    // Cancel: the agent holds the task, unanswered.
    b.client
        .goto(&format!("{}/tasks", served.web))
        .await
        .unwrap();
    b.fill_and_submit(&[("#text", "cancel me")]).await;
    b.until_text("h1", "Task ").await;
    let id = b.id_in_address().await;
    fleet.next_of(id, "the task to cancel at the agent").await;
    b.until_text("#task-state", "delivered").await;
    b.accessible("a task's page").await;
    b.press("Cancel").await;
    b.until_text("#task-state", "cancelled").await;
    served.logged("web console: task cancel");

    // Retry: the agent fails it; retried, it is sent again and acked.
    b.client
        .goto(&format!("{}/tasks", served.web))
        .await
        .unwrap();
    b.fill_and_submit(&[("#text", "fail me once")]).await;
    b.until_text("h1", "Task ").await;
    let id = b.id_in_address().await;
    let (agent, msg) = fleet.next_of(id, "the task to fail at the agent").await;
    fleet
        .answer(&agent, &msg, "it broke", Outcome::Failed)
        .await;
    b.until_text("#task-state", "✗").await;
    b.press("Retry").await;
    let (agent, msg) = fleet.next_of(id, "the retried task at the agent").await;
    served.logged("web console: task retry");
    fleet.ack(&agent, &msg, "fixed").await;
    b.until_text("#task-state", "acked").await;
    b.until_text("#results", "fixed").await;

    // Pause and resume the job.
    b.client
        .goto(&format!("{}/agents", served.web))
        .await
        .unwrap();
    b.until_text("#matching", "1 agents match").await;
    b.accessible("the agents page").await;
    b.client
        .goto(&format!("{}/tasks", served.web))
        .await
        .unwrap();
    b.until_text("#tasks", "fail me once").await;
    b.accessible("the tasks page").await;
    b.client
        .goto(&format!("{}/jobs", served.web))
        .await
        .unwrap();
    b.until_text("#jobs", "nightly").await;
    b.accessible("the jobs page").await;
    b.press("pause job nightly").await;
    b.until_text("#jobs", "paused").await;
    served.logged("web console: job paused");
    b.press("resume job nightly").await;
    b.client
        .wait()
        .at_most(LIMIT)
        .for_element(Locator::Css("button[aria-label='pause job nightly']"))
        .await
        .unwrap();
    assert!(!b.text("#jobs").await.contains("paused"));
    served.logged("web console: job resumed");

    // A rollout, halted by hand while the agent holds it, then resumed.
    b.client
        .goto(&format!("{}/tasks", served.web))
        .await
        .unwrap();
    b.fill_and_submit(&[("#text", "migrate"), ("#to", "role=web"), ("#batch", "1")])
        .await;
    b.until_text("h1", "Run ").await;
    let run = b.id_in_address().await;
    let (agent, msg) = fleet.next_of(run, "the rollout at the agent").await;
    b.until_text("#run-state", "running").await;
    b.press("Halt the rollout").await;
    b.until_text("#run-state", "halted").await;
    b.accessible("a halted run's page").await;
    served.logged("web console: rollout halted");
    b.press("Resume the rollout").await;
    b.until_text("#run-state", "running").await;
    served.logged("web console: rollout resumed");
    fleet.ack(&agent, &msg, "migrated").await;
    b.until_text("#run-state", "succeeded").await;
    b.picture("run").await;

    refused_without_the_operator_role(&mut served, &tokens["agent-000"]).await;
    served.server.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(served.server.wait_exit(LIMIT).code(), Some(0));
}

/// No action is taken without an operator's session, and an agent's token
/// (`agent`) makes none; an operator whose token becomes an agent's at a
/// reload is refused at the next action (and logged), and their session
/// ends.
async fn refused_without_the_operator_role(served: &mut Served, agent: &str) {
    let web: std::net::SocketAddr = served.web["http://".len()..].parse().unwrap();
    let post = |path: &str, cookie: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{cookie}content-type: \
             application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let actions = [
        "/tasks",
        "/tasks/1/cancel",
        "/tasks/1/retry",
        "/jobs/nightly/pause",
        "/jobs/nightly/resume",
        "/runs/1/halt",
        "/runs/1/resume",
    ];
    for path in actions {
        let answer = exchange(web, &post(path, "", "text=x&csrf=x")).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
    }
    let answer = exchange(web, &post("/login", "", &format!("token={agent}"))).await;
    assert!(
        answer.starts_with("HTTP/1.1 401") && answer.contains("not an operator"),
        "an agent's token logged in: {answer}"
    );
    assert!(!answer.contains("set-cookie"), "{answer}");
    // The second operator logs in, then their token becomes an agent's.
    let login = format!("token={}", served.second);
    let answer = exchange(web, &post("/login", "", &login)).await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let session = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .map(|c| format!("cookie: {c}\r\n"))
        .expect("a session cookie");
    let page = exchange(
        web,
        &format!("GET /jobs HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{session}\r\n"),
    )
    .await;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token on the page")
        .to_owned();
    let tokens = std::fs::read_to_string(&served.tokens_file).unwrap();
    std::fs::write(
        &served.tokens_file,
        tokens.replace("ops2 operator ", "ops2 agent "),
    )
    .unwrap();
    served.server.signal(nix::sys::signal::Signal::SIGHUP);
    // In force once the token no longer logs in.
    until(
        "ops2's token demoted",
        || {
            let request = post("/login", "", &login);
            async move { exchange(web, &request).await }
        },
        |answer| answer.starts_with("HTTP/1.1 401"),
    )
    .await;
    let body = format!("csrf={csrf}");
    let answer = exchange(web, &post("/jobs/nightly/pause", &session, &body)).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("no longer hold the operator role"),
        "{answer}"
    );
    let line = served.server.wait_for_line("no longer an operator");
    assert!(
        line.contains("operator=ops2") && line.contains("no longer has role operator"),
        "{line}"
    );
    let answer = exchange(web, &post("/jobs/nightly/pause", &session, &body)).await;
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "the session ended: {answer}"
    );
    assert!(
        !served
            .server
            .log
            .iter()
            .any(|l| l.contains("web console: job paused") && l.contains("ops2")),
        "the job was paused by a demoted operator"
    );
}

/// The package's config turns the console on, on loopback; the built-in
/// default leaves it off.
#[test]
fn the_package_serves_the_console_on_loopback_and_the_default_not_at_all() {
    let root = env!("CARGO_MANIFEST_DIR");
    let packaged: Config =
        contactd::config::load(&Path::new(root).join("config/contactd.toml")).unwrap();
    let listen = packaged.web.listen.expect("the package enables [web]");
    assert!(listen.ip().is_loopback(), "{listen}");
    assert_eq!(Config::default().web.listen, None, "off by default");
}

/// A raw HTTP/1.1 exchange with the console: the status line, headers and
/// body as text.
pub(crate) async fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    within("the answer", stream.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_stranger_gets_the_login_page_and_nothing_else() {
    let console = Console::start(0).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    for path in ["/", "/agents", "/tasks", "/tasks/1", "/jobs"] {
        let answer = exchange(console.web, &get(path)).await;
        assert!(answer.starts_with("HTTP/1.1 303"), "{path}: {answer}");
        assert!(answer.contains("location: /login"), "{path}: {answer}");
    }
    let login = exchange(console.web, &get("/login")).await;
    assert!(login.starts_with("HTTP/1.1 200"), "{login}");
    assert!(login.contains("content-security-policy: default-src 'none'; script-src 'self'"));
    assert!(!login.contains("<script>"), "no inline script");
    let events = exchange(console.web, &get("/events")).await;
    assert!(events.starts_with("HTTP/1.1 401"), "{events}");
    // A form without a session, with a forged session, and a wrong token.
    let post = |path: &str, cookie: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{cookie}content-type: \
             application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let answer = exchange(console.web, &post("/tasks", "", "text=x")).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let forged = "cookie: contactd_session=00ff\r\n";
    let answer = exchange(console.web, &post("/tasks", forged, "text=x")).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answer = exchange(console.web, &post("/login", "", "token=ctd_wrong")).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(!answer.contains("set-cookie"), "{answer}");
    // A body over web.max_body_size is refused unread.
    let big = format!("token={}", "x".repeat(300 * 1024));
    let answer = exchange(console.web, &post("/login", "", &big)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{}", &answer[..80]);

    // Logged in: a form without the session's CSRF token, or from another
    // site, is refused; with it, it is done.
    let token = format!("token={}", console.operator);
    let answer = exchange(console.web, &post("/login", "", &token)).await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let cookie = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a session cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let session = format!("cookie: {}\r\n", cookie.split(';').next().unwrap());
    let page = exchange(
        console.web,
        &format!("GET /tasks HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{session}\r\n"),
    )
    .await;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token on the page");
    let answer = exchange(console.web, &post("/tasks", &session, "text=x&csrf=wrong")).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let cross = format!("{session}origin: http://evil.example\r\n");
    let body = format!("text=x&csrf={csrf}");
    let answer = exchange(console.web, &post("/tasks", &cross, &body)).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let answer = exchange(console.web, &post("/tasks", &session, &body)).await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    assert!(answer.contains("location: /tasks/"), "{answer}");
    console.stop().await;
}

/// Opens `GET /events` with `cookie`: the answer's head, and the
/// connection (open while the stream is).
async fn open_events(addr: std::net::SocketAddr, cookie: &str) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /events HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    // The head, and for an open stream its first event.
    while !(String::from_utf8_lossy(&seen).contains(": connected")
        || (seen.windows(4).any(|w| w == b"\r\n\r\n") && !seen.starts_with(b"HTTP/1.1 200")))
    {
        let n = within("the event stream's answer", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    (String::from_utf8_lossy(&seen).into_owned(), stream)
}

/// Logs in with the console's operator token over HTTP: the session's
/// `name=value` cookie.
async fn log_in(console: &Console) -> String {
    log_in_at(console.web, &console.operator).await
}

/// Logs in at the console on `web` with `token` over HTTP: the session's
/// `name=value` cookie.
pub(crate) async fn log_in_at(web: std::net::SocketAddr, token: &str) -> String {
    let body = format!("token={token}");
    let login = exchange(
        web,
        &format!(
            "POST /login HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: \
             application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    login
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

/// An event stream holds one of `web.max_event_streams` while it is open,
/// and gives it back as soon as its client goes: the server notices the
/// closed connection, well before it would next write to it (a comment
/// every 15 s; nothing changes here to write about).
#[tokio::test]
async fn a_closed_event_stream_gives_its_slot_back_at_once() {
    let console = Console::start_with(0, |config| {
        config.web.max_event_streams = 1;
    })
    .await;
    let cookie = log_in(&console).await;
    let opened = std::time::Instant::now();
    let (head, first) = open_events(console.web, &cookie).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = open_events(console.web, &cookie).await;
    assert!(head.starts_with("HTTP/1.1 503"), "one slot, taken: {head}");
    drop(first);
    // Asked again until the slot is back: at most 10 s after the first
    // stream opened, so not by its 15 s keep-alive write.
    let mut answer = String::new();
    for _ in 0..500 {
        let (head, _stream) = open_events(console.web, &cookie).await;
        answer = head;
        if answer.starts_with("HTTP/1.1 200") || opened.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the closed stream's slot was not given back within {:?}: {answer}",
        opened.elapsed()
    );
    console.stop().await;
}

/// The fleet page's cost with 10,000 connected agents (each a getTask
/// stream, 200 to a connection, with three labels, one of them unique):
/// the time from request to the last byte of the answer over loopback,
/// which bounds the server's time. A measurement (BENCHMARKS.md, "Web
/// console"), run by hand in release mode:
/// `cargo test --release --test it -- --ignored --nocapture web::fleet_page`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: 10,000 agents, run by hand in release mode"]
async fn fleet_page_with_10000_agents() {
    const AGENTS: usize = 10_000;
    const PER_CONNECTION: usize = 200;
    // Room for the 32 event streams below, all from 127.0.0.1, twice over
    // (a closed stream's slot comes back once the server has seen it go).
    let console = Console::start_with(AGENTS, |config| {
        config.web.max_connections = 128;
        config.web.max_connections_per_address = 128;
        config.web.max_event_streams = 64;
    })
    .await;
    let mut names: Vec<&String> = console.tokens.keys().collect();
    names.sort();
    let mut held = Vec::new();
    // Tasks received, by all agents together, and a wake-up for each.
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let arrived = Arc::new(tokio::sync::Notify::new());
    for chunk in names.chunks(PER_CONNECTION) {
        let channel = Channel::from_shared(format!("http://{}", console.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        for name in chunk {
            let n: usize = name[6..].parse().unwrap();
            let agent = Agent {
                token: console.tokens[*name].clone(),
                name: (*name).clone(),
                labels: format!(
                    "role={},zone=z{},host=h{n}",
                    if n.is_multiple_of(2) { "web" } else { "db" },
                    n % 10
                ),
            };
            let mut client = ContactClient::with_interceptor(channel.clone(), agent);
            let (received, arrived) = (Arc::clone(&received), Arc::clone(&arrived));
            held.push(tokio::spawn(async move {
                let mut tasks = client.get_task(Empty {}).await.unwrap().into_inner();
                while let Ok(Some(_)) = tasks.message().await {
                    received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    arrived.notify_one();
                }
            }));
        }
    }
    let admin = console.admin().await;
    until(
        "10,000 agents connected",
        || {
            let mut admin = admin.clone();
            async move {
                admin
                    .list_agents(ListAgentsRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .agents
            }
        },
        |agents| agents.iter().filter(|a| a.connected).count() == AGENTS,
    )
    .await;
    let body = format!("token={}", console.operator);
    let login = exchange(
        console.web,
        &format!(
            "POST /login HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: \
             application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    let cookie = login
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    let mut medians = Vec::new();
    for path in [
        "/",
        "/agents",
        "/agents?selector=role%3Dweb&state=connected&page=7",
    ] {
        let (mut times, mut server) = (Vec::new(), Vec::new());
        let mut size = 0;
        for _ in 0..21 {
            let started = std::time::Instant::now();
            let page = exchange(
                console.web,
                &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncookie: {cookie}\r\n\r\n"),
            )
            .await;
            times.push(started.elapsed());
            assert!(
                page.starts_with("HTTP/1.1 200"),
                "{}",
                &page[..200.min(page.len())]
            );
            let took: f64 = page
                .lines()
                .find_map(|l| l.strip_prefix("server-timing: page;dur="))
                .and_then(|ms| ms.trim().parse().ok())
                .expect("a server-timing header");
            server.push(Duration::from_secs_f64(took / 1000.0));
            size = page.len();
        }
        times.sort();
        server.sort();
        println!(
            "RESULT web {path}: {AGENTS} agents, {size} bytes; server time median {:.1} ms, \
             max {:.1} ms; request to last byte median {:.1} ms, max {:.1} ms (21 requests)",
            server[10].as_secs_f64() * 1000.0,
            server[20].as_secs_f64() * 1000.0,
            times[10].as_secs_f64() * 1000.0,
            times[20].as_secs_f64() * 1000.0
        );
        medians.push((path, server[10]));
    }

    // Fan-out of one broadcast task to the 10,000, with 32 event streams
    // open (each told of every change, every 200 ms) and with none,
    // alternately.
    for (path, median) in medians {
        assert!(
            median <= Duration::from_millis(100),
            "{path}: median {median:?}"
        );
    }
    let mut admin = admin;
    let mut fan_out = async |text: &str| {
        let before = received.load(std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        common::submit(&mut admin, text, "").await;
        within("the task at every agent", async {
            while received.load(std::sync::atomic::Ordering::Relaxed) < before + AGENTS {
                arrived.notified().await;
            }
        })
        .await;
        started.elapsed()
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..5u32 {
        // Which goes first alternates: a run's order alone moves its time
        // (PITFALLS.md, "This machine").
        if !round.is_multiple_of(2) {
            without.push(fan_out(&format!("without streams {round}")).await);
        }
        let mut streams = Vec::new();
        for _ in 0..32 {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(console.web).await.unwrap();
            let request = format!("GET /events HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            // Open once the stream's first event has come.
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains(": connected") {
                let n = within("the event stream", stream.read(&mut buf))
                    .await
                    .unwrap();
                assert!(
                    n > 0,
                    "event stream closed: {}",
                    String::from_utf8_lossy(&seen)
                );
                seen.extend_from_slice(&buf[..n]);
            }
            streams.push(tokio::spawn(async move {
                while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            }));
        }
        with.push(fan_out(&format!("with streams {round}")).await);
        for stream in streams {
            stream.abort();
        }
        if round.is_multiple_of(2) {
            without.push(fan_out(&format!("without streams {round}")).await);
        }
    }
    with.sort();
    without.sort();
    println!(
        "RESULT web fan-out to {AGENTS} agents: median {:.1} ms with 32 event streams open, \
         {:.1} ms without (5 rounds each, alternating, the first of each pair alternating too)",
        with[2].as_secs_f64() * 1000.0,
        without[2].as_secs_f64() * 1000.0
    );
    for agent in held {
        agent.abort();
    }
    console.stop().await;
}

/// An HTTP/1.1 exchange over TLS with `tls`'s client certificate (if any).
async fn tls_exchange(
    addr: std::net::SocketAddr,
    tls: &contactd::tls::ClientTls,
    request: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = rustls::ClientConfig::clone(&tls.config().unwrap());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = tls.server_name("localhost").unwrap();
    let mut stream = within("TLS handshake", connector.connect(name, tcp))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // The server may close without close_notify: what came is the answer.
    let _ = within("the answer", stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Over TLS (`web.tls`, with the server's certificate and client CA), an
/// operator whose certificate is named in `remote_cmd.callers` logs in with
/// it, and the session cookie is `Secure`; another certificate is refused.
#[tokio::test]
async fn an_operator_logs_in_with_a_client_certificate_over_tls() {
    let pki = tempfile::tempdir().unwrap();
    contactd::tls::pki::init(pki.path(), &[], &[], 30, false).unwrap();
    for name in ["ops", "stranger"] {
        contactd::tls::pki::issue(pki.path(), name, 30, false, None).unwrap();
    }
    let dir = pki.path().to_owned();
    let console = Console::start_with(0, move |config| {
        let tls = format!(
            "cert = {:?}\nkey = {:?}\nclient_ca = {:?}\nclient_auth = \"request\"\n",
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("ca.pem"),
        );
        config.server.tls = Some(toml::from_str(&tls).unwrap());
        config.web.tls = true;
        config.remote_cmd.callers = vec!["ops".into()];
    })
    .await;
    let client = |name: &str| contactd::tls::ClientTls {
        ca: Some(pki.path().join("ca.pem")),
        cert: Some(pki.path().join(format!("{name}.pem"))),
        key: Some(pki.path().join(format!("{name}.key"))),
        ..contactd::tls::ClientTls::default()
    };
    let (ops, stranger) = (client("ops"), client("stranger"));
    let page = tls_exchange(
        console.web,
        &ops,
        "GET /login HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        page.contains("Your client certificate names you <strong>ops</strong>"),
        "{page}"
    );
    let login = "POST /login HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: \
                 application/x-www-form-urlencoded\r\ncontent-length: 18\r\n\r\nmethod=certificate";
    let answer = tls_exchange(console.web, &ops, login).await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let cookie = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a session cookie");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let session = cookie.split(';').next().unwrap();
    let fleet = tls_exchange(
        console.web,
        &ops,
        &format!("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncookie: {session}\r\n\r\n"),
    )
    .await;
    assert!(
        fleet.contains("Signed in as <strong>ops</strong>"),
        "{fleet}"
    );
    let answer = tls_exchange(console.web, &stranger, login).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // Plaintext at a TLS port gets nothing.
    let plain = exchange(console.web, "GET /login HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(!plain.contains("HTTP/1.1 200"), "{plain}");
    console.stop().await;
}

/// One kept-alive TLS connection to the console, for several exchanges.
struct TlsConnection {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

impl TlsConnection {
    /// Connects with `tls`'s client certificate; the handshake's error as
    /// text.
    async fn open(
        addr: std::net::SocketAddr,
        tls: &contactd::tls::ClientTls,
    ) -> Result<TlsConnection, String> {
        use tokio::io::AsyncWriteExt;
        let mut config = rustls::ClientConfig::clone(&tls.config().unwrap());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = tls.server_name("localhost").unwrap();
        let mut stream = within("TLS handshake", connector.connect(name, tcp))
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3 tells a client its certificate was refused only after
        // the handshake: a first exchange finds out.
        stream
            .write_all(b"GET /assets/app.css HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut connection = TlsConnection { stream };
        let answer = connection.answer().await?;
        if !answer.starts_with("HTTP/1.1 200") {
            return Err(answer);
        }
        Ok(connection)
    }

    /// Reads one answer (its head and `content-length` bytes of body).
    async fn answer(&mut self) -> Result<String, String> {
        use tokio::io::AsyncReadExt;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&seen).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                if seen.len() >= end + 4 + length {
                    return Ok(text);
                }
            }
            let n = within("an answer", self.stream.read(&mut buf))
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("closed: {text}"));
            }
            seen.extend_from_slice(&buf[..n]);
        }
    }

    /// Sends `request` and reads its answer.
    async fn exchange(&mut self, request: &str) -> Result<String, String> {
        use tokio::io::AsyncWriteExt;
        self.stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        self.answer().await
    }
}

/// A reload that replaces the client CA: a connection opened before with a
/// certificate it no longer trusts is refused at its next request (as the
/// Contact port refuses such an agent's calls), new connections with it
/// fail, and a certificate's session is honoured only on a connection
/// presenting that certificate.
#[tokio::test]
async fn a_client_certificate_distrusted_by_a_reload_is_refused_on_an_open_connection() {
    let pki = tempfile::tempdir().unwrap();
    contactd::tls::pki::init(pki.path(), &[], &[], 30, false).unwrap();
    contactd::tls::pki::issue(pki.path(), "ops", 30, false, None).unwrap();
    let other = tempfile::tempdir().unwrap();
    contactd::tls::pki::init(other.path(), &[], &[], 30, false).unwrap();
    // The client CA in a file of its own, to be replaced.
    let client_ca = pki.path().join("client-ca.pem");
    std::fs::copy(pki.path().join("ca.pem"), &client_ca).unwrap();
    let dir = pki.path().to_owned();
    let ca = client_ca.clone();
    let console = Console::start_with(0, move |config| {
        let tls = format!(
            "cert = {:?}\nkey = {:?}\nclient_ca = {:?}\nclient_auth = \"request\"\n",
            dir.join("server.pem"),
            dir.join("server.key"),
            ca,
        );
        config.server.tls = Some(toml::from_str(&tls).unwrap());
        config.web.tls = true;
        config.remote_cmd.callers = vec!["ops".into()];
    })
    .await;
    let with_cert = contactd::tls::ClientTls {
        ca: Some(pki.path().join("ca.pem")),
        cert: Some(pki.path().join("ops.pem")),
        key: Some(pki.path().join("ops.key")),
        ..contactd::tls::ClientTls::default()
    };
    let without = contactd::tls::ClientTls {
        ca: Some(pki.path().join("ca.pem")),
        ..contactd::tls::ClientTls::default()
    };
    let mut open = TlsConnection::open(console.web, &with_cert).await.unwrap();
    let login = "POST /login HTTP/1.1\r\nhost: x\r\ncontent-type: \
                 application/x-www-form-urlencoded\r\ncontent-length: 18\r\n\r\nmethod=certificate";
    let answer = open.exchange(login).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let cookie = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned();
    let fleet = format!("GET / HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\n\r\n");
    let page = open.exchange(&fleet).await.unwrap();
    assert!(page.contains("Signed in as <strong>ops</strong>"), "{page}");
    // The cookie alone, on a connection without the certificate: no session.
    let mut bare = TlsConnection::open(console.web, &without).await.unwrap();
    let page = bare.exchange(&fleet).await.unwrap();
    assert!(
        page.starts_with("HTTP/1.1 303") && page.contains("location: /login"),
        "{page}"
    );

    // The client CA is replaced, and the config reloaded.
    std::fs::copy(other.path().join("ca.pem"), &client_ca).unwrap();
    let config = Config::clone(&console.config.borrow());
    console.config.send(Arc::new(config)).unwrap();
    // In force once a new connection with the certificate is refused.
    let refused_at_handshake = until(
        "the new client CA in force",
        || TlsConnection::open(console.web, &with_cert),
        Result::is_err,
    )
    .await;
    refused_at_handshake.err().unwrap();
    let refused = open.exchange(&fleet).await.unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("no longer trusted"), "{refused}");
    console.stop().await;
}
