//! Shared test helpers: a real server in-process on 127.0.0.1:0, real
//! clients, and bounded waits.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

pub mod daemon;
pub mod fleet;
pub mod pg_programs;
pub mod postgres;

use contactd::{
    config::Config,
    proto::{
        admin::{Agent, ListAgentsRequest, SubmitTaskRequest, admin_client::AdminClient},
        contact::contact_client::ContactClient,
    },
    server,
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Every wait in a test is bounded by this: generous, because it only catches
/// hangs (a busy CI machine can stall for seconds), never measures speed.
pub const LIMIT: Duration = Duration::from_secs(60);

/// `contactd` (the real binary) to be run by a test, deaf to the caller's
/// shell: none of the variables that pick its config files
/// (`CONTACTD_CONFIG`, `CONTACTD_AGENT_CONFIG`), its log filter
/// (`RUST_LOG`) or a deliberate defect (`CONTACTD_TEST_DEFECT`, in test
/// builds: src/defects.rs), so that what a test checks does not depend on who runs it.
/// A test that wants one of them sets it on the returned command.
pub fn contactd() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_contactd"));
    command
        .env_remove("CONTACTD_CONFIG")
        .env_remove("CONTACTD_AGENT_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("CONTACTD_TEST_DEFECT");
    command
}

/// Awaits `future`, failing the test if it takes longer than [`LIMIT`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    within_for(LIMIT, what, future).await
}

/// Awaits `future`, failing the test if it takes longer than `limit`: for
/// the few waits on hundreds of real child processes, which a slow machine
/// (seen: 20x slower than usual) stretches beyond [`LIMIT`].
pub async fn within_for<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub config: watch::Sender<Arc<Config>>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), server::ServerError>>,
    /// Holds the admin socket.
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with `config` on a free loopback port, its admin
    /// socket in a temp dir.
    pub async fn start(mut config: Config) -> TestServer {
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        config.admin.socket = dir.path().join("admin.sock");
        // The real store, in the test's own directory (unless the test
        // chose one).
        if config.store.path.is_none() {
            config.store.path = Some(dir.path().join("contactd.db"));
        }
        let listener = contactd::net::bind(config.server.listen, 128).expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (config, rx) = watch::channel(Arc::new(config));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::run(server::Serve::new(
            listener,
            rx,
            shutdown.clone(),
        )));
        TestServer {
            addr,
            config,
            shutdown,
            task,
            dir,
        }
    }

    /// A client on a new connection.
    pub async fn client(&self) -> ContactClient<Channel> {
        ContactClient::new(self.channel().await)
    }

    /// The admin socket's path.
    pub fn admin_socket(&self) -> std::path::PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// A client of the admin API, once the server has bound its socket.
    pub async fn admin(&self) -> AdminClient<Channel> {
        let path = self.admin_socket();
        // The server binds its admin socket as it starts, in its own task;
        // the file exists from bind(2), before listen(2): until then a
        // connection is refused.
        within("the admin socket accepting", async {
            loop {
                if path.exists() {
                    match contactd::client::admin::connect(&path).await {
                        Ok(client) => return client,
                        Err(contactd::client::admin::CtlError::Connect { .. }) => {}
                        Err(e) => panic!("admin connect: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    /// A new connection.
    pub async fn channel(&self) -> Channel {
        within(
            "connect",
            Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect(),
        )
        .await
        .expect("connect to the test server")
    }

    /// Shuts the server down and waits for it to return.
    /// Reloads the server: the config in force (with its real listen
    /// address, so that only `change` differs), changed by `change`.
    pub fn reload(&self, change: impl FnOnce(&mut Config)) {
        let mut config = self.config.borrow().as_ref().clone();
        config.server.listen = self.addr;
        change(&mut config);
        self.config.send_replace(Arc::new(config));
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        within("server exit", self.task).await.unwrap().unwrap();
    }
}

/// Submits a task through the admin API, returning its id.
pub async fn submit(admin: &mut AdminClient<Channel>, text: &str, agent: &str) -> u64 {
    let request = SubmitTaskRequest {
        text: text.into(),
        agent: agent.into(),
        ..Default::default()
    };
    admin.submit_task(request).await.unwrap().into_inner().id
}

/// Asks the server with `ask` until `done` holds for its answer, every
/// 20 ms within [`LIMIT`], and returns that answer. The oracle for what a
/// server records (acks, results) is its admin API, not its debug log lines:
/// a reworded or re-levelled log line must not pass or break a test.
pub async fn until<T, F: Future<Output = T>>(
    what: &str,
    mut ask: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    within(what, async {
        loop {
            let answer = ask().await;
            if done(&answer) {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Every caller the server knows, as `contactd agents` lists them.
pub async fn agents(admin: &mut AdminClient<Channel>) -> Vec<Agent> {
    let reply = admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap();
    reply.into_inner().agents
}

/// The caller `name`, which the server must know.
pub async fn agent(admin: &mut AdminClient<Channel>, name: &str) -> Agent {
    let agents = agents(admin).await;
    agents
        .into_iter()
        .find(|a| a.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

/// Every task was acked exactly once (counted by the server), none failed.
pub fn assert_each_acked_once(tasks: &[contactd::proto::admin::Task]) {
    use contactd::proto::admin::TaskState;
    for task in tasks {
        assert_eq!(
            (task.acked, task.state()),
            (1, TaskState::Acked),
            "{task:?}"
        );
    }
}

/// A config with the given remote-command allow-list enabled.
pub fn with_commands(allow: &[&str]) -> Config {
    let mut config = Config::default();
    config.remote_cmd.enabled = true;
    config.remote_cmd.allow = allow.iter().map(|p| p.parse().unwrap()).collect();
    config
}
