//! The server's configuration: typed sections with their defaults in one
//! place, loaded from TOML by [`load`](load::load) with every problem
//! reported at once.
//!
//! Where the file comes from: `--config`, else `$CONTACTD_CONFIG`, else
//! [`DEFAULT_PATH`]; only a missing *default* file means built-in defaults.

pub mod agent;
mod load;
pub mod log;
pub mod metrics;
pub mod pattern;
pub mod peek;
pub mod reload;
pub mod store;
pub mod template;
pub mod units;

use std::{
    net::SocketAddr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

pub use agent::{AGENT_DEFAULT_PATH, AgentConfig, AgentFile, AgentTlsConfig, BackoffConfig};
pub use load::{ConfigError, ConfigFile, Problem, load, parse};
pub use log::{LogConfig, LogFormat, Rotation};
pub use metrics::MetricsConfig;
pub use pattern::CommandPattern;
pub use store::{StoreConfig, StoreKind, StoreSync};
pub use template::TaskTemplate;

/// Where `serve` and `check-config` look when no path is given.
pub const DEFAULT_PATH: &str = "/etc/contactd.toml";

/// The whole server config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tasks: TasksConfig,
    pub remote_cmd: RemoteCmdConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
}

/// `[admin]`: the operators' API (submit tasks, list agents and tasks), on
/// a unix socket only, never on the public port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Whether to serve the admin API.
    pub enabled: bool,
    /// The socket's path; it is created with mode 0660.
    pub socket: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            socket: PathBuf::from("/run/contactd/admin.sock"),
        }
    }
}

/// `[server]`: the listener and per-connection limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// This server's name among several sharing one PostgreSQL store
    /// (the fleet view, logs); empty: the host's name.
    pub name: String,
    /// Address the Contact service listens on.
    #[serde(with = "units::socket_addr")]
    pub listen: SocketAddr,
    /// Listen backlog: connections the kernel queues before `accept`.
    pub backlog: u32,
    /// Connections open at once; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Largest message accepted from a client, and sent to one: a task
    /// whose message would be larger is refused at submit.
    #[serde(with = "units::size")]
    pub max_message_size: ByteSize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 pings that detect dead peers.
    #[serde(with = "units::duration")]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[serde(with = "units::duration")]
    pub keepalive_timeout: Duration,
    /// How long in-flight calls may run on after shutdown starts.
    #[serde(with = "units::duration")]
    pub grace_period: Duration,
    /// Callers (agents and seed clients) whose last status is remembered.
    pub max_callers: usize,
    /// Longest status text kept per caller; longer ones are truncated.
    #[serde(with = "units::size")]
    pub max_status_size: ByteSize,
    /// A file holding the token every Contact call must carry
    /// (`authorization: Bearer <token>`); absent: no token is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token_file: Option<PathBuf>,
    /// Named tokens (`contactd token create`): each gives its holder an
    /// identity and a role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// A connection must finish its TLS handshake and the HTTP/2 preface
    /// within this long, or it is closed.
    #[serde(with = "units::duration")]
    pub handshake_timeout: Duration,
    /// Connections still in their handshake at once; they do not count
    /// against `max_connections`, so they cannot lock out agents.
    pub max_handshakes: usize,
    /// Largest sendStatus message (one status report).
    #[serde(with = "units::size")]
    pub max_status_message: ByteSize,
    /// Largest tellResult message (one result).
    #[serde(with = "units::size")]
    pub max_result_message: ByteSize,
    /// Largest remoteCMD request (a command line and its note).
    #[serde(with = "units::size")]
    pub max_command_message: ByteSize,
    /// Bytes of unfinished messages one connection may make the server hold.
    #[serde(with = "units::size")]
    pub max_connection_buffer: ByteSize,
    /// Bytes of unfinished messages all connections together may make the
    /// server hold; beyond, the calls adding to it are refused.
    #[serde(with = "units::size")]
    pub max_buffered: ByteSize,
    /// HTTP/2 flow-control window of one connection and of one stream: how
    /// much a peer may send before the server reads it.
    #[serde(with = "units::size")]
    pub connection_window: ByteSize,
    #[serde(with = "units::size")]
    pub stream_window: ByteSize,
    /// TLS on the Contact port; absent: plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsConfig>,
}

/// `[server.tls]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA certificates that sign client certificates (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Whether clients must present a certificate; default `require` with
    /// a `client_ca`, else `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_auth: Option<ClientAuth>,
}

impl ServerTlsConfig {
    /// `client_auth`, with its default.
    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth.unwrap_or(if self.client_ca.is_some() {
            ClientAuth::Require
        } else {
            ClientAuth::None
        })
    }
}

/// `server.tls.client_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificates are asked for.
    None,
    /// Asked for and verified when given; callers without one are anonymous.
    Request,
    /// Every connection needs a certificate signed by `client_ca`.
    Require,
}

impl ServerConfig {
    /// `name`, or else the host's name.
    pub fn resolved_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "contactd".into())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 55555)),
            backlog: 4096,
            max_connections: 50_000,
            max_message_size: ByteSize::mib(4),
            max_concurrent_streams: 256,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            grace_period: Duration::from_secs(10),
            max_callers: 10_000,
            max_status_size: ByteSize::kib(4),
            auth_token_file: None,
            tokens_file: None,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            max_status_message: ByteSize::kib(64),
            max_result_message: ByteSize::kib(256),
            max_command_message: ByteSize::kib(64),
            max_connection_buffer: ByteSize::mib(4),
            max_buffered: ByteSize::mib(128),
            connection_window: ByteSize::kib(256),
            stream_window: ByteSize::kib(64),
            tls: None,
        }
    }
}

/// `[tasks]`: generation and retention of tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// Time between two generated batches.
    #[serde(with = "units::duration")]
    pub interval: Duration,
    /// Tasks per generated batch; 0 turns generation off.
    pub batch: u32,
    /// Text of a generated task.
    pub template: TaskTemplate,
    /// Tasks kept for replay and for slow subscribers.
    pub retain: usize,
    /// Whether a new subscriber first receives the retained tasks.
    pub replay: bool,
    /// Whether every agent gets every task, or each task goes to one agent.
    pub mode: DeliveryMode,
    /// Queue mode: how long an agent has to ack a task before it is
    /// redelivered.
    #[serde(with = "units::duration")]
    pub ack_timeout: Duration,
    /// Queue mode: deliveries of a task before it is parked as dead.
    pub max_attempts: u32,
    /// Queue mode: tasks assigned to one agent at once (sent or about to be).
    pub window: usize,
    /// Queue mode: tasks waiting for an agent; beyond, the oldest are
    /// dropped and counted.
    pub max_pending: usize,
    /// Finished tasks (and, in broadcast mode, every task) are deleted from
    /// the store this long after they were created...
    #[serde(with = "units::duration")]
    pub keep_for: Duration,
    /// ...and beyond this many, the oldest first.
    pub retain_finished: usize,
}

/// `tasks.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// Every agent gets every task (the seed's behaviour); a reconnecting
    /// agent gets what it missed while away, within `retain`.
    Broadcast,
    /// Each task goes to exactly one agent, redelivered until acked.
    Queue,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            interval: Duration::from_secs(40),
            batch: 10,
            template: TaskTemplate::default(),
            retain: 1000,
            replay: true,
            mode: DeliveryMode::Broadcast,
            ack_timeout: Duration::from_secs(60),
            max_attempts: 5,
            window: 16,
            max_pending: 100_000,
            keep_for: Duration::from_secs(7 * 86_400),
            retain_finished: 100_000,
        }
    }
}

/// `[remote_cmd]`: the remoteCMD RPC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteCmdConfig {
    /// Off by default: remoteCMD answers FAILED_PRECONDITION.
    pub enabled: bool,
    /// Command-line patterns that may run; nothing else does.
    pub allow: Vec<CommandPattern>,
    /// Whether patterns that let any program run (`"*"`, `"* *"`) are
    /// accepted; off, such a pattern is a config error.
    pub allow_any: bool,
    /// Longest a command may run before its process group is killed.
    #[serde(with = "units::duration")]
    pub timeout: Duration,
    /// Commands running at once.
    pub max_concurrent: usize,
    /// Calls waiting for a free slot; further calls get RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// Combined stdout and stderr kept per command; the rest is dropped.
    #[serde(with = "units::size")]
    pub max_output: ByteSize,
    /// Certificate names given the operator role (remoteCMD) with mTLS.
    pub callers: Vec<String>,
}

impl Default for RemoteCmdConfig {
    fn default() -> Self {
        RemoteCmdConfig {
            enabled: false,
            allow: Vec::new(),
            allow_any: false,
            timeout: Duration::from_secs(30),
            max_concurrent: 16,
            max_queued: 64,
            max_output: ByteSize::kib(64),
            callers: Vec::new(),
        }
    }
}

/// The largest response the seed's clients accept by default (gRPC's 4 MiB).
const CLIENT_MAX_MESSAGE: u64 = 4 * 1024 * 1024;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// The longest admin socket path a unix socket address holds (108 bytes
/// with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The documented range of every numeric value, as `check-config` enforces
/// it (and README.md and config/*.toml list it). The bounds are what the
/// server was shown to survive, with room: beyond them a value only made
/// a panic, a spinning thread or unbounded memory possible.
pub mod ranges {
    use std::{ops::RangeInclusive, time::Duration};

    use super::*;

    pub const BACKLOG: RangeInclusive<u64> = 1..=65_535;
    pub const MAX_CONNECTIONS: RangeInclusive<u64> = 1..=1_000_000;
    pub const MAX_MESSAGE_SIZE: RangeInclusive<u64> = KIB..=64 * MIB;
    pub const MAX_CONCURRENT_STREAMS: RangeInclusive<u64> = 1..=4096;
    pub const KEEPALIVE_INTERVAL: RangeInclusive<Duration> = SEC..=Duration::from_secs(2 * 3600);
    pub const KEEPALIVE_TIMEOUT: RangeInclusive<Duration> = SEC..=HOUR;
    pub const GRACE_PERIOD: RangeInclusive<Duration> = Duration::ZERO..=HOUR;
    pub const MAX_CALLERS: RangeInclusive<u64> = 1..=1_000_000;
    pub const MAX_STATUS_SIZE: RangeInclusive<u64> = 1..=MIB;
    pub const HANDSHAKE_TIMEOUT: RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(300);
    pub const MAX_HANDSHAKES: RangeInclusive<u64> = 1..=65_536;
    /// The least of `max_status_message`, `max_result_message` and
    /// `max_command_message`; the most is `max_message_size`.
    pub const CALL_MESSAGE_MIN: u64 = KIB;
    pub const MAX_BUFFERED: RangeInclusive<u64> = MIB..=64 * GIB;
    /// The least `max_connection_buffer`; the most is `max_buffered`.
    pub const CONNECTION_BUFFER_MIN: u64 = 64 * KIB;
    /// `connection_window`, and `stream_window` (at most `connection_window`).
    pub const FLOW_WINDOW: RangeInclusive<u64> = 64 * KIB..=16 * MIB;

    pub const INTERVAL: RangeInclusive<Duration> = MS..=Duration::from_secs(7 * 86_400);
    pub const BATCH: RangeInclusive<u64> = 0..=10_000;
    pub const TEMPLATE_BYTES: RangeInclusive<u64> = 0..=64 * KIB;
    pub const RETAIN: RangeInclusive<u64> = 1..=1_000_000;
    pub const ACK_TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(10)..=DAY;
    pub const MAX_ATTEMPTS: RangeInclusive<u64> = 1..=1000;
    pub const WINDOW: RangeInclusive<u64> = 1..=10_000;
    pub const MAX_PENDING: RangeInclusive<u64> = 1..=10_000_000;
    pub const KEEP_FOR: RangeInclusive<Duration> = MINUTE..=Duration::from_secs(3650 * 86_400);
    pub const RETAIN_FINISHED: RangeInclusive<u64> = 1..=100_000_000;
    pub const WRITE_QUEUE: RangeInclusive<u64> = 1024..=4_194_304;
    pub const FORGET_AGENTS_AFTER: RangeInclusive<Duration> =
        HOUR..=Duration::from_secs(3650 * 86_400);
    /// `store.max_size`, when not 0 (no limit).
    pub const STORE_MAX_SIZE: RangeInclusive<u64> = MIB..=1024 * 1024 * GIB;
    pub const STORE_CONNECT_TIMEOUT: RangeInclusive<Duration> =
        Duration::from_secs(1)..=Duration::from_secs(300);
    pub const STORE_POOL_SIZE: RangeInclusive<u64> = 1..=64;
    pub const STORE_POLL_INTERVAL: RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(60);

    pub const CMD_TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(10)..=DAY;
    pub const MAX_CONCURRENT: RangeInclusive<u64> = 1..=1024;
    pub const MAX_QUEUED: RangeInclusive<u64> = 0..=65_536;
    /// So a response fits a gRPC client's default 4MiB message limit.
    pub const MAX_OUTPUT: RangeInclusive<u64> = 1..=CLIENT_MAX_MESSAGE - KIB;

    pub const LOG_MAX_SIZE: RangeInclusive<u64> = KIB..=64 * GIB;
    pub const LOG_BACKUPS: RangeInclusive<u64> = 0..=1000;
    pub const LOG_KEEP: RangeInclusive<u64> = 1..=1000;
    pub const BUFFER_LINES: RangeInclusive<u64> = 1..=262_144;
}

/// Collects semantic problems as (dotted key, message) pairs.
#[derive(Default)]
pub(crate) struct Checks(pub(crate) Vec<(String, String)>);

impl Checks {
    pub(crate) fn check(&mut self, ok: bool, key: &str, message: impl Into<String>) {
        if !ok {
            self.0.push((key.to_owned(), message.into()));
        }
    }

    /// A count within `range`.
    pub(crate) fn count(&mut self, key: &str, value: u64, range: RangeInclusive<u64>) {
        let message = || {
            format!(
                "{value} is out of range: expected from {} to {}",
                range.start(),
                range.end()
            )
        };
        if !range.contains(&value) {
            self.0.push((key.to_owned(), message()));
        }
    }

    /// A duration within `range`.
    pub(crate) fn duration(&mut self, key: &str, value: Duration, range: RangeInclusive<Duration>) {
        if !range.contains(&value) {
            let f = humantime::format_duration;
            self.0.push((
                key.to_owned(),
                format!(
                    "\"{}\" is out of range: expected from \"{}\" to \"{}\"",
                    f(value),
                    f(*range.start()),
                    f(*range.end())
                ),
            ));
        }
    }

    /// A byte size within `range`.
    pub(crate) fn size(&mut self, key: &str, value: ByteSize, range: RangeInclusive<u64>) {
        if !range.contains(&value.as_u64()) {
            let f = |n| units::size::format(ByteSize(n));
            self.0.push((
                key.to_owned(),
                format!(
                    "\"{}\" is out of range: expected from \"{}\" to \"{}\"",
                    f(value.as_u64()),
                    f(*range.start()),
                    f(*range.end())
                ),
            ));
        }
    }

    /// The `[log]` section, shared by the server's and the agent's files.
    pub(crate) fn log(&mut self, l: &LogConfig) {
        use ranges::*;
        self.check(
            l.stderr || l.file.is_some(),
            "log.stderr",
            "is false and no log.file is set: nothing would be logged",
        );
        self.size("log.max_size", l.max_size, LOG_MAX_SIZE);
        self.count("log.backups", l.backups as u64, LOG_BACKUPS);
        self.count("log.keep", l.keep as u64, LOG_KEEP);
        self.count("log.buffer_lines", l.buffer_lines as u64, BUFFER_LINES);
        if let Some(problem) = log::filter_problem(&l.level) {
            self.check(false, "log.level", problem);
        }
    }
}

impl ConfigFile for Config {
    fn warnings(&self) -> Vec<String> {
        self.unsafe_settings()
    }

    fn validate(&self) -> Vec<(String, String)> {
        use ranges::*;
        let mut c = Checks::default();
        let s = &self.server;
        c.check(
            s.name.len() <= 255 && !s.name.chars().any(char::is_control),
            "server.name",
            "is longer than 255 bytes or holds control characters",
        );
        c.count("server.backlog", s.backlog.into(), BACKLOG);
        c.count(
            "server.max_connections",
            s.max_connections as u64,
            MAX_CONNECTIONS,
        );
        c.size(
            "server.max_message_size",
            s.max_message_size,
            MAX_MESSAGE_SIZE,
        );
        c.count(
            "server.max_concurrent_streams",
            s.max_concurrent_streams.into(),
            MAX_CONCURRENT_STREAMS,
        );
        c.duration(
            "server.keepalive_interval",
            s.keepalive_interval,
            KEEPALIVE_INTERVAL,
        );
        c.duration(
            "server.keepalive_timeout",
            s.keepalive_timeout,
            KEEPALIVE_TIMEOUT,
        );
        c.duration("server.grace_period", s.grace_period, GRACE_PERIOD);
        c.count("server.max_callers", s.max_callers as u64, MAX_CALLERS);
        c.size("server.max_status_size", s.max_status_size, MAX_STATUS_SIZE);
        c.check(
            HANDSHAKE_TIMEOUT.contains(&s.handshake_timeout),
            "server.handshake_timeout",
            "is out of range: expected from \"100ms\" to \"5m\"",
        );
        c.check(
            MAX_HANDSHAKES.contains(&(s.max_handshakes as u64)),
            "server.max_handshakes",
            "is out of range: expected from 1 to 65536",
        );
        let max_message = s.max_message_size.as_u64();
        for (size, key) in [
            (s.max_status_message, "server.max_status_message"),
            (s.max_result_message, "server.max_result_message"),
            (s.max_command_message, "server.max_command_message"),
        ] {
            c.check(
                (CALL_MESSAGE_MIN..=max_message).contains(&size.as_u64()),
                key,
                format!(
                    "{} is out of range: expected from \"1KiB\" to server.max_message_size ({})",
                    units::size::format(size),
                    units::size::format(s.max_message_size)
                ),
            );
        }
        c.check(
            (CONNECTION_BUFFER_MIN..=s.max_buffered.as_u64())
                .contains(&s.max_connection_buffer.as_u64()),
            "server.max_connection_buffer",
            format!(
                "{} is out of range: expected from \"64KiB\" to server.max_buffered ({})",
                units::size::format(s.max_connection_buffer),
                units::size::format(s.max_buffered)
            ),
        );
        c.check(
            MAX_BUFFERED.contains(&s.max_buffered.as_u64()),
            "server.max_buffered",
            format!(
                "{} is out of range: expected from \"1MiB\" to \"64GiB\"",
                units::size::format(s.max_buffered)
            ),
        );
        for (size, key) in [
            (s.connection_window, "server.connection_window"),
            (s.stream_window, "server.stream_window"),
        ] {
            c.check(
                FLOW_WINDOW.contains(&size.as_u64()),
                key,
                format!(
                    "{} is out of range: expected from \"64KiB\" to \"16MiB\"",
                    units::size::format(size)
                ),
            );
        }
        c.check(
            s.stream_window <= s.connection_window,
            "server.stream_window",
            "is larger than server.connection_window, which bounds every stream",
        );
        if let Some(tls) = &s.tls {
            c.check(
                tls.client_ca.is_some() || tls.client_auth() == ClientAuth::None,
                "server.tls.client_auth",
                "needs server.tls.client_ca, the CA that signs client certificates",
            );
            c.check(
                tls.client_ca.is_none() || tls.client_auth() != ClientAuth::None,
                "server.tls.client_ca",
                "is set but client_auth = \"none\": remove it, or set client_auth = \"request\" or \"require\"",
            );
        }
        let t = &self.tasks;
        if !INTERVAL.contains(&t.interval) {
            c.duration("tasks.interval", t.interval, INTERVAL);
            c.0.last_mut()
                .expect("just pushed")
                .1
                .push_str(" (set tasks.batch = 0 to turn generation off)");
        }
        c.count("tasks.batch", t.batch.into(), BATCH);
        c.count(
            "tasks.template",
            t.template.to_string().len() as u64,
            TEMPLATE_BYTES,
        );
        c.count("tasks.retain", t.retain as u64, RETAIN);
        c.duration("tasks.ack_timeout", t.ack_timeout, ACK_TIMEOUT);
        c.count("tasks.max_attempts", t.max_attempts.into(), MAX_ATTEMPTS);
        c.count("tasks.window", t.window as u64, WINDOW);
        c.count("tasks.max_pending", t.max_pending as u64, MAX_PENDING);
        c.duration("tasks.keep_for", t.keep_for, KEEP_FOR);
        c.count(
            "tasks.retain_finished",
            t.retain_finished as u64,
            RETAIN_FINISHED,
        );
        let st = &self.store;
        c.count("store.write_queue", st.write_queue as u64, WRITE_QUEUE);
        c.duration(
            "store.forget_agents_after",
            st.forget_agents_after,
            FORGET_AGENTS_AFTER,
        );
        if st.max_size.as_u64() != 0 {
            c.size("store.max_size", st.max_size, STORE_MAX_SIZE);
        }
        c.duration(
            "store.connect_timeout",
            st.connect_timeout,
            STORE_CONNECT_TIMEOUT,
        );
        c.duration("store.poll_interval", st.poll_interval, STORE_POLL_INTERVAL);
        if st.kind == StoreKind::Postgres {
            c.check(
                st.url.is_some() != st.url_file.is_some(),
                "store.url",
                "set exactly one of store.url and store.url_file for kind = \"postgres\"",
            );
            if let Some(url) = &st.url
                && let Err(problem) = store::check_url(url)
            {
                c.check(false, "store.url", problem);
            }
            c.check(
                st.path.is_none(),
                "store.path",
                "names an SQLite file, but store.kind is \"postgres\": remove it",
            );
            c.check(
                st.max_size.as_u64() == 0,
                "store.max_size",
                "applies to SQLite only: limit the database in PostgreSQL (a tablespace \
                 or quota) instead",
            );
        } else {
            c.check(
                st.url.is_none() && st.url_file.is_none() && st.ca_file.is_none(),
                "store.url",
                "store.url, url_file and ca_file are for kind = \"postgres\" only",
            );
        }
        c.check(
            st.kind != StoreKind::Sqlite
                || st
                    .path
                    .as_ref()
                    .is_none_or(|p| !p.as_os_str().is_empty() && p.file_name().is_some()),
            "store.path",
            "is not a file path: name the database file, such as \"/var/lib/contactd/contactd.db\"",
        );
        let a = &self.admin;
        c.check(
            !a.enabled || !a.socket.as_os_str().is_empty(),
            "admin.socket",
            "is empty: set a path, or admin.enabled = false",
        );
        c.check(
            a.socket.as_os_str().len() <= MAX_SOCKET_PATH,
            "admin.socket",
            format!(
                "is {} bytes long: a unix socket path holds at most {MAX_SOCKET_PATH}",
                a.socket.as_os_str().len()
            ),
        );
        let r = &self.remote_cmd;
        c.duration("remote_cmd.timeout", r.timeout, CMD_TIMEOUT);
        c.count(
            "remote_cmd.max_concurrent",
            r.max_concurrent as u64,
            MAX_CONCURRENT,
        );
        c.count("remote_cmd.max_queued", r.max_queued as u64, MAX_QUEUED);
        c.size("remote_cmd.max_output", r.max_output, MAX_OUTPUT);
        if !r.allow_any {
            for pattern in r.allow.iter().filter(|p| p.matches_any_program()) {
                c.check(
                    false,
                    "remote_cmd.allow",
                    format!(
                        "pattern {:?} lets any program run: name the programs \
                         (such as \"ip link add *\"), or set remote_cmd.allow_any = true \
                         if that is really meant",
                        pattern.to_string()
                    ),
                );
            }
        }
        self.metrics.check("metrics", &mut c);
        c.log(&self.log);
        c.0
    }
}

impl Config {
    /// Whether callers are identified by something they cannot choose: a
    /// client certificate or a named token.
    pub fn has_identities(&self) -> bool {
        self.server.tokens_file.is_some()
            || self
                .server
                .tls
                .as_ref()
                .is_some_and(|tls| tls.client_auth() != ClientAuth::None)
    }

    /// What is valid but unsafe, for the start-up log and `check-config`.
    fn unsafe_settings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let listen = self.server.listen.ip();
        if !listen.is_loopback() && !self.has_identities() {
            warnings.push(format!(
                "server.listen = {} is beyond loopback with no identity mechanism: agent names \
                 are taken from a header anyone can set{}; configure server.tls with client_ca, \
                 or server.tokens_file",
                self.server.listen,
                if self.server.tls.is_none() {
                    " and traffic is plaintext"
                } else {
                    ""
                }
            ));
        }
        if self.store.kind == StoreKind::Postgres
            && self.store.url.as_deref().is_some_and(store::has_password)
        {
            warnings.push(
                "store.url holds a password, readable by anyone who can read this file: put \
                 the URL in store.url_file (mode 0600) instead"
                    .to_owned(),
            );
        }
        if let Some(listen) = self.metrics.listen
            && !listen.ip().is_loopback()
        {
            warnings.push(format!(
                "metrics.listen = {listen} is beyond loopback: the metrics have no \
                 authentication, so anyone who can reach the port reads them; keep it on a \
                 management network"
            ));
        }
        warnings
    }
}

/// Where a config comes from, which decides whether a missing file is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Named by `--config` or `$CONTACTD_CONFIG`: it must exist.
    Given(PathBuf),
    /// The default path: if it is absent, built-in defaults are used.
    Default(PathBuf),
}

impl Source {
    /// `given` if set, else `default`.
    pub fn new(given: Option<PathBuf>, default: &str) -> Source {
        given.map_or_else(|| Source::Default(PathBuf::from(default)), Source::Given)
    }

    /// The path this source names.
    pub fn path(&self) -> &Path {
        match self {
            Source::Given(path) | Source::Default(path) => path,
        }
    }

    /// Loads the config; `Ok(None)` means the default file is absent and
    /// built-in defaults apply.
    ///
    /// # Errors
    /// A file that cannot be read, or has problems.
    pub fn load<T: ConfigFile>(&self) -> Result<Option<T>, ConfigError> {
        match (self, load(self.path())) {
            (Source::Default(_), Err(ConfigError::Read { source, .. }))
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            (_, result) => result.map(Some),
        }
    }

    /// Loads the config, or the built-in defaults if the default file is
    /// absent; the flag says whether a file was read.
    ///
    /// # Errors
    /// A file that cannot be read, or has problems.
    pub fn load_or_default<T: ConfigFile>(&self) -> Result<(T, bool), ConfigError> {
        let loaded = self.load::<T>()?;
        let found = loaded.is_some();
        Ok((loaded.unwrap_or_default(), found))
    }

    /// Loads the config for a reload: on problems, logs each on its own
    /// line (one journal entry each) and returns `None`, so the config in
    /// force stays.
    pub fn reload<T: ConfigFile>(&self) -> Option<T> {
        match self.load_or_default::<T>() {
            Ok((config, _)) => Some(config),
            Err(e) => {
                for (i, line) in e.to_string().lines().enumerate() {
                    if i == 0 {
                        tracing::error!("config reload failed, keeping the current config: {line}");
                    } else {
                        tracing::error!("{line}");
                    }
                }
                None
            }
        }
    }
}

/// The dotted keys whose values differ between `old` and `new`, sorted
/// (a key on one side only counts as changed): what a reload's log line
/// names. Values are not shown (a token file path is harmless, but the
/// line is about which settings moved).
pub fn changed_keys<T: Serialize>(old: &T, new: &T) -> Vec<String> {
    fn diff(prefix: &str, old: &toml::Value, new: &toml::Value, keys: &mut Vec<String>) {
        match (old, new) {
            (toml::Value::Table(a), toml::Value::Table(b)) => {
                let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for name in names {
                    let key = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    match (a.get(name), b.get(name)) {
                        (Some(x), Some(y)) => diff(&key, x, y, keys),
                        _ => keys.push(key),
                    }
                }
            }
            _ if old != new => keys.push(prefix.to_owned()),
            _ => {}
        }
    }
    let (Ok(old), Ok(new)) = (toml::Value::try_from(old), toml::Value::try_from(new)) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    diff("", &old, &new, &mut keys);
    keys
}

/// [`changed_keys`] for a log field: comma-separated, or `none`.
pub fn shown_keys(keys: &[String]) -> String {
    if keys.is_empty() {
        "none".to_owned()
    } else {
        keys.join(",")
    }
}

/// A config as TOML, as `check-config` prints it.
pub fn to_toml<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).expect("configs serialize to TOML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_name_what_moved_and_nothing_else() {
        let old = Config::default();
        assert!(changed_keys(&old, &old).is_empty());
        let mut new = old.clone();
        new.tasks.batch += 1;
        new.log.level = "debug".into();
        new.store.path = Some("/tmp/x.db".into());
        assert_eq!(
            changed_keys(&old, &new),
            ["log.level", "store.path", "tasks.batch"]
        );
        assert_eq!(
            shown_keys(&changed_keys(&old, &new)),
            "log.level,store.path,tasks.batch"
        );
        assert_eq!(shown_keys(&[]), "none");
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let config = Config::default();
        assert!(config.validate().is_empty());
        let again: Config = parse(&to_toml(&config)).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn every_problem_is_reported() {
        let text = "[server]\nlisten = \"nowhere\"\n[tasks]\ninterval = \"4x\"\nbogus = true\nretain = 0\n[remote_cmd]\nallow = [\"'x\"]\n";
        let problems = parse::<Config>(text).unwrap_err();
        let keys: Vec<_> = problems.iter().filter_map(|p| p.key.clone()).collect();
        assert_eq!(
            keys,
            [
                "server.listen",
                "tasks.interval",
                "tasks.bogus",
                "tasks.retain",
                "remote_cmd.allow"
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn a_postgres_store_needs_one_url_that_asks_for_tls_or_none_and_no_sqlite_keys() {
        let keys = |store: &str| -> Vec<String> {
            let text = format!("[store]\nkind = \"postgres\"\n{store}");
            match parse::<Config>(&text) {
                Ok(_) => Vec::new(),
                Err(problems) => problems.iter().filter_map(|p| p.key.clone()).collect(),
            }
        };
        assert!(keys("url = \"postgres://c@db1/fleet?sslmode=require\"").is_empty());
        assert!(keys("url_file = \"/etc/contactd/db-url\"").is_empty());
        assert_eq!(keys(""), ["store.url"]);
        assert_eq!(
            keys("url = \"postgres://c@db1/f\"\nurl_file = \"/x\""),
            ["store.url"]
        );
        assert_eq!(
            keys("url = \"postgres://c@db1/f?sslmode=prefer\""),
            ["store.url"]
        );
        assert_eq!(
            keys("url = \"postgres://c@db1/f\"\npath = \"/x.db\"\nmax_size = \"1GiB\""),
            ["store.path", "store.max_size"]
        );
        assert_eq!(
            keys("url = \"postgres://c@db1/f\"\npoll_interval = \"10ms\""),
            ["store.poll_interval"]
        );
        let sqlite = parse::<Config>("[store]\nurl = \"postgres://c@db1/f\"\n").unwrap_err();
        assert_eq!(sqlite[0].key.as_deref(), Some("store.url"), "{sqlite:#?}");
    }
}
