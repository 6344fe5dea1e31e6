//! The server's configuration: typed sections with their defaults in one
//! place, loaded from TOML by [`load`](load::load) with every problem
//! reported at once.
//!
//! Where the file comes from: `--config`, else `$CONTACTD_CONFIG`, else
//! [`DEFAULT_PATH`]; only a missing *default* file means built-in defaults.

pub mod agent;
mod load;
pub mod units;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

pub use agent::{AGENT_DEFAULT_PATH, AgentConfig, AgentFile, AgentTlsConfig, BackoffConfig};
pub use load::{ConfigError, ConfigFile, Problem, load, parse};

use crate::{remote_cmd::CommandPattern, tasks::TaskTemplate};

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
    /// Address the Contact service listens on.
    #[serde(with = "units::socket_addr")]
    pub listen: SocketAddr,
    /// Listen backlog: connections the kernel queues before `accept`.
    pub backlog: u32,
    /// Connections open at once; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Largest message accepted from a client.
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

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
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

impl ServerConfig {
    /// The keys whose change only takes effect after a restart (they shape
    /// the listener and its connections), that differ between `self` and `new`.
    pub fn restart_needed(&self, new: &ServerConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut differs = |changed: bool, key| {
            if changed {
                keys.push(key);
            }
        };
        differs(self.listen != new.listen, "server.listen");
        differs(self.backlog != new.backlog, "server.backlog");
        differs(
            self.max_connections != new.max_connections,
            "server.max_connections",
        );
        differs(
            self.max_message_size != new.max_message_size,
            "server.max_message_size",
        );
        differs(
            self.max_concurrent_streams != new.max_concurrent_streams,
            "server.max_concurrent_streams",
        );
        differs(
            self.keepalive_interval != new.keepalive_interval,
            "server.keepalive_interval",
        );
        differs(
            self.keepalive_timeout != new.keepalive_timeout,
            "server.keepalive_timeout",
        );
        differs(
            self.handshake_timeout != new.handshake_timeout,
            "server.handshake_timeout",
        );
        differs(
            self.max_handshakes != new.max_handshakes,
            "server.max_handshakes",
        );
        for (old, new, key) in [
            (
                self.max_status_message,
                new.max_status_message,
                "server.max_status_message",
            ),
            (
                self.max_result_message,
                new.max_result_message,
                "server.max_result_message",
            ),
            (
                self.max_command_message,
                new.max_command_message,
                "server.max_command_message",
            ),
            (
                self.max_connection_buffer,
                new.max_connection_buffer,
                "server.max_connection_buffer",
            ),
            (self.max_buffered, new.max_buffered, "server.max_buffered"),
            (
                self.connection_window,
                new.connection_window,
                "server.connection_window",
            ),
            (
                self.stream_window,
                new.stream_window,
                "server.stream_window",
            ),
        ] {
            differs(old != new, key);
        }
        // TLS files are re-read on reload; turning TLS on or off changes
        // what the port speaks.
        differs(
            self.tls.is_some() != new.tls.is_some(),
            "server.tls (on or off)",
        );
        keys
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
            timeout: Duration::from_secs(30),
            max_concurrent: 16,
            max_queued: 64,
            max_output: ByteSize::kib(64),
            callers: Vec::new(),
        }
    }
}

/// `[log]`: what is logged and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A level and `target=level` directives (`"info"`, `"info,contactd::server=debug"`);
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// Line format.
    pub format: LogFormat,
    /// Whether to log to stderr (the journal, under systemd).
    pub stderr: bool,
    /// A log file, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// How the file rotates.
    pub rotation: Rotation,
    /// With `rotation = "size"`: the size at which the file rotates.
    #[serde(with = "units::size")]
    pub max_size: ByteSize,
    /// With `rotation = "size"`: rotated files kept (`.1` … `.N`).
    pub backups: usize,
    /// With `rotation = "daily"` or `"hourly"`: rotated files kept.
    pub keep: usize,
    /// Events whose message contains one of these substrings are dropped.
    pub exclude: Vec<String>,
    /// Lines each writer buffers; beyond, lines are dropped and counted
    /// rather than slowing the server down.
    pub buffer_lines: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
            stderr: true,
            file: None,
            rotation: Rotation::Size,
            max_size: ByteSize::mib(10),
            backups: 2,
            keep: 7,
            exclude: Vec::new(),
            buffer_lines: 16_384,
        }
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `log.rotation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    /// By size: `max_size`, `backups`.
    Size,
    /// At every UTC midnight: `keep`.
    Daily,
    /// At every UTC hour: `keep`.
    Hourly,
}

/// The largest response the seed's clients accept by default (gRPC's 4 MiB).
const CLIENT_MAX_MESSAGE: u64 = 4 * 1024 * 1024;

impl ConfigFile for Config {
    fn warnings(&self) -> Vec<String> {
        self.unsafe_settings()
    }

    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, key: &str, message: String| {
            if !ok {
                problems.push((key.to_owned(), message));
            }
        };
        let s = &self.server;
        check(
            s.backlog >= 1,
            "server.backlog",
            "must be at least 1".into(),
        );
        check(
            s.max_connections >= 1,
            "server.max_connections",
            "must be at least 1".into(),
        );
        check(
            s.max_message_size.as_u64() >= 1024,
            "server.max_message_size",
            format!(
                "{} is too small: expected at least \"1KiB\"",
                units::size::format(s.max_message_size)
            ),
        );
        check(
            s.max_concurrent_streams >= 1,
            "server.max_concurrent_streams",
            "must be at least 1".into(),
        );
        check(
            !s.keepalive_interval.is_zero(),
            "server.keepalive_interval",
            "must be more than 0s".into(),
        );
        check(
            !s.keepalive_timeout.is_zero(),
            "server.keepalive_timeout",
            "must be more than 0s".into(),
        );
        check(
            s.max_callers >= 1,
            "server.max_callers",
            "must be at least 1".into(),
        );
        check(
            (Duration::from_millis(100)..=Duration::from_secs(300)).contains(&s.handshake_timeout),
            "server.handshake_timeout",
            "is out of range: expected from \"100ms\" to \"5m\"".into(),
        );
        check(
            (1..=65_536).contains(&s.max_handshakes),
            "server.max_handshakes",
            "is out of range: expected from 1 to 65536".into(),
        );
        let max_message = s.max_message_size.as_u64();
        for (size, key) in [
            (s.max_status_message, "server.max_status_message"),
            (s.max_result_message, "server.max_result_message"),
            (s.max_command_message, "server.max_command_message"),
        ] {
            check(
                (1024..=max_message).contains(&size.as_u64()),
                key,
                format!(
                    "{} is out of range: expected from \"1KiB\" to server.max_message_size ({})",
                    units::size::format(size),
                    units::size::format(s.max_message_size)
                ),
            );
        }
        check(
            (64 * 1024..=s.max_buffered.as_u64()).contains(&s.max_connection_buffer.as_u64()),
            "server.max_connection_buffer",
            format!(
                "{} is out of range: expected from \"64KiB\" to server.max_buffered ({})",
                units::size::format(s.max_connection_buffer),
                units::size::format(s.max_buffered)
            ),
        );
        check(
            (1 << 20..=1 << 36).contains(&s.max_buffered.as_u64()),
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
            check(
                (64 * 1024..=16 << 20).contains(&size.as_u64()),
                key,
                format!(
                    "{} is out of range: expected from \"64KiB\" to \"16MiB\"",
                    units::size::format(size)
                ),
            );
        }
        check(
            s.stream_window <= s.connection_window,
            "server.stream_window",
            "is larger than server.connection_window, which bounds every stream".into(),
        );
        if let Some(tls) = &s.tls {
            check(
                tls.client_ca.is_some() || tls.client_auth() == ClientAuth::None,
                "server.tls.client_auth",
                "needs server.tls.client_ca, the CA that signs client certificates".into(),
            );
            check(
                tls.client_ca.is_none() || tls.client_auth() != ClientAuth::None,
                "server.tls.client_ca",
                "is set but client_auth = \"none\": remove it, or set client_auth = \"request\" or \"require\"".into(),
            );
        }
        let t = &self.tasks;
        check(
            t.interval >= Duration::from_millis(1),
            "tasks.interval",
            "must be at least \"1ms\" (set tasks.batch = 0 to turn generation off)".into(),
        );
        check(t.retain >= 1, "tasks.retain", "must be at least 1".into());
        check(
            !t.ack_timeout.is_zero(),
            "tasks.ack_timeout",
            "must be more than 0s".into(),
        );
        check(
            t.max_attempts >= 1,
            "tasks.max_attempts",
            "must be at least 1".into(),
        );
        check(t.window >= 1, "tasks.window", "must be at least 1".into());
        check(
            t.max_pending >= 1,
            "tasks.max_pending",
            "must be at least 1".into(),
        );
        check(
            !self.admin.enabled || !self.admin.socket.as_os_str().is_empty(),
            "admin.socket",
            "is empty: set a path, or admin.enabled = false".into(),
        );
        let r = &self.remote_cmd;
        check(
            !r.timeout.is_zero(),
            "remote_cmd.timeout",
            "must be more than 0s".into(),
        );
        check(
            r.max_concurrent >= 1,
            "remote_cmd.max_concurrent",
            "must be at least 1".into(),
        );
        check(
            (1..=CLIENT_MAX_MESSAGE - 1024).contains(&r.max_output.as_u64()),
            "remote_cmd.max_output",
            format!(
                "{} is out of range: expected from 1B to 4095KiB, so a response fits \
                 a gRPC client's default 4MiB message limit",
                units::size::format(r.max_output)
            ),
        );
        let l = &self.log;
        check(
            l.stderr || l.file.is_some(),
            "log.stderr",
            "is false and no log.file is set: nothing would be logged".into(),
        );
        check(
            l.max_size.as_u64() >= 1024,
            "log.max_size",
            format!(
                "{} is too small: expected at least \"1KiB\"",
                units::size::format(l.max_size)
            ),
        );
        check(l.keep >= 1, "log.keep", "must be at least 1".into());
        check(
            l.buffer_lines >= 1,
            "log.buffer_lines",
            "must be at least 1".into(),
        );
        if let Err(e) = crate::logging::parse_filter(&self.log.level) {
            check(
                false,
                "log.level",
                format!(
                    "invalid filter {:?} ({e}): expected directives such as \"info\" or \"warn,contactd=debug\"",
                    self.log.level
                ),
            );
        }
        problems
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

/// A config as TOML, as `check-config` prints it.
pub fn to_toml<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).expect("configs serialize to TOML")
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
