//! The agent's configuration (`contactd agent`): `[agent]` and `[log]`,
//! loaded by the same [`load`](super::load) as the server's, with every
//! problem reported at once.
//!
//! Where the file comes from: `--config`, else `$CONTACTD_AGENT_CONFIG`,
//! else [`AGENT_DEFAULT_PATH`]; only a missing *default* file means
//! built-in defaults.

use std::{path::PathBuf, time::Duration};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::{Checks, ConfigFile, LogConfig, units};
use crate::labels::{self, Labels};

/// Where `agent` and `check-config --agent` look when no path is given.
pub const AGENT_DEFAULT_PATH: &str = "/etc/contactd-agent.toml";

/// The environment variable naming the agent's config file.
pub const AGENT_CONFIG_ENV: &str = "CONTACTD_AGENT_CONFIG";

/// The whole agent config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentFile {
    pub agent: AgentConfig,
    pub log: LogConfig,
}

/// `[agent]`: where to connect, how to handle tasks, how to retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Server URLs, tried in turn: after a failure the agent moves to the next.
    pub servers: Vec<String>,
    /// The name sent in the `x-contactd-agent` header on every call.
    pub name: String,
    /// What this agent is (`{ role = "web", region = "eu" }`), sent with
    /// the built-in facts (`os`, `arch`, `hostname`, `kernel`,
    /// `contactd_version`) when it connects; selectors target agents by
    /// them. The server may pin labels by name, over what is said here.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Time between two status reports.
    #[serde(with = "units::duration")]
    pub status_interval: Duration,
    /// A program whose output is the status text; empty: the built-in line
    /// (host, uptime, load, tasks handled).
    pub status_command: Vec<String>,
    /// The program run per task (argv, no shell); empty: log the task and ack it.
    pub handler: Vec<String>,
    /// Longest a handler may run before its process group is killed.
    #[serde(with = "units::duration")]
    pub handler_timeout: Duration,
    /// Handlers running at once; further tasks wait in a bounded queue.
    pub handler_concurrency: usize,
    /// Output kept from a failed handler (its tail) for the ack.
    #[serde(with = "units::size")]
    pub max_output: ByteSize,
    /// Recently handled task ids remembered, so a redelivered task is
    /// acked again rather than run twice (in memory and in the spool).
    pub remember: usize,
    /// Where the agent keeps its spool (`agent-spool-NAME.db`: the tasks it
    /// started and the results not yet delivered, across restarts); unset:
    /// `$STATE_DIRECTORY` (systemd's `StateDirectory=`), else the working
    /// directory. See [`resolved_state_dir`](Self::resolved_state_dir).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// The most the spool's database may hold; beyond, the oldest
    /// delivered results are forgotten first, and when only undelivered
    /// ones are left a new task is not started (it is delivered again).
    #[serde(with = "units::size")]
    pub spool_max_size: ByteSize,
    /// `"normal"`: the spool survives a crash or kill of the agent;
    /// `"full"`: a power loss too (an fsync per commit).
    pub spool_sync: super::StoreSync,
    /// How long a session must stay up before the backoff starts over.
    #[serde(with = "units::duration")]
    pub healthy_after: Duration,
    /// Longest a connection attempt may take (gRPC's minimum is 20s).
    #[serde(with = "units::duration")]
    pub connect_timeout: Duration,
    /// When the server asks the agent to come back (it is shutting down, or
    /// too busy to take the connection now: gRPC's
    /// `grpc-retry-pushback-ms`), the agent waits what it names plus a
    /// random part of up to this long (or of what it names, if longer),
    /// instead of its failure backoff, which starts over.
    #[serde(with = "units::duration")]
    pub retry_hint_jitter: Duration,
    /// At shutdown, how long running handlers may go on before they are killed.
    #[serde(with = "units::duration")]
    pub shutdown_grace: Duration,
    /// A file holding the token the server requires (its
    /// `server.auth_token_file`); read at every connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Delays between reconnection attempts.
    pub backoff: BackoffConfig,
    /// TLS to `https://` servers; files are read at every connection.
    pub tls: AgentTlsConfig,
    /// `[agent.metrics]`: the agent's Prometheus endpoint (off by default).
    pub metrics: super::MetricsConfig,
}

/// `[agent.tls]`: what the agent trusts and presents on `https://` servers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentTlsConfig {
    /// CA certificates (PEM) that sign the server's certificate; absent:
    /// the system's CA store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The agent's certificate (PEM), for servers that require one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Name the server's certificate must carry (and SNI), instead of the
    /// URL's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            servers: vec!["http://127.0.0.1:55555".to_owned()],
            name: super::host_name().unwrap_or_else(|| "localhost".to_owned()),
            labels: Labels::new(),
            status_interval: Duration::from_secs(60),
            status_command: Vec::new(),
            handler: Vec::new(),
            handler_timeout: Duration::from_secs(5 * 60),
            handler_concurrency: 4,
            max_output: ByteSize::kib(4),
            remember: 10_000,
            state_dir: None,
            spool_max_size: ByteSize::mib(64),
            spool_sync: super::StoreSync::Normal,
            healthy_after: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(20),
            retry_hint_jitter: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            token_file: None,
            backoff: BackoffConfig::default(),
            tls: AgentTlsConfig::default(),
            metrics: super::MetricsConfig::default(),
        }
    }
}

/// `[agent.backoff]`: gRPC's connection-backoff parameters, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// The first delay.
    #[serde(with = "units::duration")]
    pub initial: Duration,
    /// The largest delay, before jitter.
    #[serde(with = "units::duration")]
    pub max: Duration,
    /// Each delay is the previous one times this.
    pub multiplier: f64,
    /// Each delay is moved at random by up to this fraction, either way.
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(120),
            multiplier: 1.6,
            jitter: 0.2,
        }
    }
}

/// Why a server URL is unusable, or `None` if it is fine.
fn url_problem(url: &str) -> Option<String> {
    let expected =
        "expected a URL such as \"http://127.0.0.1:55555\" or \"https://server.example:55555\"";
    let uri: tonic::codegen::http::Uri = match url.parse() {
        Ok(uri) => uri,
        Err(e) => return Some(format!("invalid URL {url:?} ({e}): {expected}")),
    };
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(authority)) if authority.port_u16().is_some() => None,
        (Some("http" | "https"), Some(_)) => Some(format!("{url:?} has no port: {expected}")),
        _ => Some(format!("invalid URL {url:?}: {expected}")),
    }
}

impl ConfigFile for AgentFile {
    fn validate(&self) -> Vec<(String, String)> {
        let mut c = Checks::default();
        self.agent.check(&mut c);
        // The [log] section is checked as the server's.
        self.log.check(&mut c);
        c.0
    }
}

/// The documented ranges of the agent's numeric values.
pub mod ranges {
    use std::{ops::RangeInclusive, time::Duration};

    const MS: Duration = Duration::from_millis(1);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    pub const STATUS_INTERVAL: RangeInclusive<Duration> = Duration::from_millis(100)..=DAY;
    pub const HANDLER_TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(10)..=DAY;
    pub const HANDLER_CONCURRENCY: RangeInclusive<u64> = 1..=1024;
    /// So an ack fits gRPC's default 4MiB message limit.
    pub const MAX_OUTPUT: RangeInclusive<u64> = 1..=4095 * 1024;
    pub const REMEMBER: RangeInclusive<u64> = 1..=1_000_000;
    pub const SPOOL_MAX_SIZE: RangeInclusive<u64> = 1024 * 1024..=64 * 1024 * 1024 * 1024;
    pub const HEALTHY_AFTER: RangeInclusive<Duration> = MS..=DAY;
    pub const CONNECT_TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(100)..=HOUR;
    pub const RETRY_HINT_JITTER: RangeInclusive<Duration> = Duration::ZERO..=HOUR;
    pub const SHUTDOWN_GRACE: RangeInclusive<Duration> = Duration::ZERO..=HOUR;
    pub const BACKOFF_INITIAL: RangeInclusive<Duration> = MS..=HOUR;
    pub const BACKOFF_MAX: RangeInclusive<Duration> = MS..=HOUR;
    pub const MULTIPLIER: RangeInclusive<f64> = 1.0..=100.0;
    /// Below 1.0: jitter of 100% would allow a delay of zero.
    pub const JITTER_BELOW: f64 = 1.0;
}

impl AgentConfig {
    /// The agent's state directory: `state_dir`, else `$STATE_DIRECTORY`
    /// (systemd's `StateDirectory=`; the first one when it lists several),
    /// else the working directory.
    pub fn resolved_state_dir(&self) -> PathBuf {
        if let Some(dir) = &self.state_dir {
            return dir.clone();
        }
        let state = std::env::var_os("STATE_DIRECTORY").and_then(|dirs| {
            std::env::split_paths(&dirs)
                .next()
                .filter(|d| !d.as_os_str().is_empty())
        });
        state.unwrap_or_default()
    }

    /// The labels, the servers, the name and the programs, then the ranges
    /// (in this order, which is the order problems are reported in).
    pub(crate) fn check(&self, c: &mut Checks) {
        use ranges::*;
        for fact in labels::FACTS {
            c.check(
                self.labels.get(fact).is_none(),
                "agent.labels",
                format!(
                    "{fact} is a fact every agent reports itself: remove it from agent.labels \
                     (the server can pin it with [[server.agents]] if it must differ)"
                ),
            );
        }
        // With room for the facts (five short keys, values of at most
        // `MAX_NAME`): a larger header is refused by every server.
        let facts_room = labels::FACTS.len() * (labels::MAX_NAME + 20);
        let header = self.labels.to_header().len();
        c.check(
            header + facts_room <= labels::MAX_HEADER,
            "agent.labels",
            format!(
                "take {header} bytes as a header: with the facts they must fit in {} \
                 (shorter keys and values, or fewer labels)",
                labels::MAX_HEADER - facts_room
            ),
        );
        c.check(
            self.labels.len() + labels::FACTS.len() <= labels::MAX_LABELS,
            "agent.labels",
            format!(
                "has {} labels: with the {} facts an agent may carry at most {}",
                self.labels.len(),
                labels::FACTS.len(),
                labels::MAX_LABELS
            ),
        );
        c.check(
            !self.servers.is_empty(),
            "agent.servers",
            "is empty: list at least one server, such as [\"http://127.0.0.1:55555\"]",
        );
        for url in &self.servers {
            if let Some(message) = url_problem(url) {
                c.check(false, "agent.servers", message);
            }
        }
        c.check(
            !self.name.is_empty()
                && self.name.len() <= 253
                && self.name.bytes().all(|b| b.is_ascii_graphic()),
            "agent.name",
            format!(
                "invalid name {:?}: expected 1 to 253 visible ASCII characters without spaces \
                 (it is sent in a gRPC header)",
                self.name
            ),
        );
        for (argv, key) in [
            (&self.handler, "agent.handler"),
            (&self.status_command, "agent.status_command"),
        ] {
            c.check(
                argv.first().is_none_or(|program| !program.is_empty()),
                key,
                "the program (first word) is empty: give a program and its arguments, \
                 such as [\"/usr/local/bin/handle-task\", \"--verbose\"], or [] for none",
            );
        }
        c.check(
            self.tls.cert.is_some() == self.tls.key.is_some(),
            "agent.tls.cert",
            "agent.tls.cert and agent.tls.key go together: set both, or neither",
        );
        c.duration(
            "agent.status_interval",
            self.status_interval,
            STATUS_INTERVAL,
        );
        c.duration(
            "agent.handler_timeout",
            self.handler_timeout,
            HANDLER_TIMEOUT,
        );
        c.count(
            "agent.handler_concurrency",
            self.handler_concurrency as u64,
            HANDLER_CONCURRENCY,
        );
        c.size("agent.max_output", self.max_output, MAX_OUTPUT);
        c.count("agent.remember", self.remember as u64, REMEMBER);
        c.size("agent.spool_max_size", self.spool_max_size, SPOOL_MAX_SIZE);
        // Room for every handler's result at once, twice over: a result
        // that finds no room is not kept across a restart.
        let needed = 2 * self.handler_concurrency as u64 * (self.max_output.as_u64() + 1024);
        c.check(
            self.spool_max_size.as_u64() >= needed,
            "agent.spool_max_size",
            format!(
                "\"{}\" cannot hold the results of handler_concurrency ({}) handlers of \
                 max_output (\"{}\") twice over: make it at least \"{}\"",
                units::size::format(self.spool_max_size),
                self.handler_concurrency,
                units::size::format(self.max_output),
                units::size::format(ByteSize(needed))
            ),
        );
        if let Some(dir) = &self.state_dir {
            c.check(
                !dir.as_os_str().is_empty(),
                "agent.state_dir",
                "is empty: name a directory, such as \"/var/lib/contactd-agent\", or leave it \
                 unset for $STATE_DIRECTORY (else the working directory)",
            );
            c.check(
                !dir.exists() || dir.is_dir(),
                "agent.state_dir",
                format!("{} exists and is not a directory", dir.display()),
            );
        }
        c.duration("agent.healthy_after", self.healthy_after, HEALTHY_AFTER);
        c.duration(
            "agent.retry_hint_jitter",
            self.retry_hint_jitter,
            RETRY_HINT_JITTER,
        );
        c.duration(
            "agent.connect_timeout",
            self.connect_timeout,
            CONNECT_TIMEOUT,
        );
        c.duration("agent.shutdown_grace", self.shutdown_grace, SHUTDOWN_GRACE);
        let b = &self.backoff;
        c.duration("agent.backoff.initial", b.initial, BACKOFF_INITIAL);
        c.duration("agent.backoff.max", b.max, BACKOFF_MAX);
        c.check(
            b.max >= b.initial,
            "agent.backoff.max",
            format!(
                "{} is less than agent.backoff.initial ({})",
                humantime::format_duration(b.max),
                humantime::format_duration(b.initial)
            ),
        );
        // Between the backoff's durations and its factors: the order
        // problems have always been reported in.
        self.metrics.check("agent.metrics", c);
        // `{:?}` prints a whole f64 as "1.0", as the messages always said.
        c.check(
            b.multiplier.is_finite() && MULTIPLIER.contains(&b.multiplier),
            "agent.backoff.multiplier",
            format!(
                "{} is out of range: expected from {:?} to {:?} (gRPC uses 1.6)",
                b.multiplier,
                MULTIPLIER.start(),
                MULTIPLIER.end()
            ),
        );
        c.check(
            b.jitter.is_finite() && (0.0..JITTER_BELOW).contains(&b.jitter),
            "agent.backoff.jitter",
            format!(
                "{} is out of range: expected from 0.0 to below {JITTER_BELOW:?} (gRPC uses 0.2)",
                b.jitter
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let config = AgentFile::default();
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let again: AgentFile = parse(&crate::config::to_toml(&config)).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/contactd-agent.toml");
        let example: AgentFile = crate::config::load(std::path::Path::new(path)).unwrap();
        assert_eq!(example.agent.servers, ["http://127.0.0.1:55555"]);
        assert_eq!(example.agent.backoff, BackoffConfig::default());
    }

    #[test]
    fn every_problem_is_reported() {
        let text = "[agent]\nservers = [\"localhost\", \"http://a:1\"]\nname = \"a b\"\n\
                    handler_timeout = \"soon\"\nbogus = 1\n\
                    [agent.backoff]\nmultiplier = 0.5\njitter = 1.5\n[log]\nlevel = \"=\"\n";
        let problems = parse::<AgentFile>(text).unwrap_err();
        let keys: Vec<_> = problems.iter().filter_map(|p| p.key.as_deref()).collect();
        assert_eq!(
            keys,
            [
                "agent.servers",
                "agent.name",
                "agent.handler_timeout",
                "agent.bogus",
                "agent.backoff.multiplier",
                "agent.backoff.jitter",
                "log.level",
            ],
            "{problems:#?}"
        );
        assert!(
            problems[0].message.contains("\"localhost\""),
            "{problems:#?}"
        );
    }

    #[test]
    fn the_spool_must_hold_every_handlers_result_and_its_directory_be_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let text = format!(
            "[agent]\nhandler_concurrency = 64\nmax_output = \"1MiB\"\n\
             spool_max_size = \"100MiB\"\nstate_dir = \"{}\"\n",
            file.display()
        );
        let problems = parse::<AgentFile>(&text).unwrap_err();
        let messages: Vec<_> = problems
            .iter()
            .map(|p| format!("{}: {}", p.key.as_deref().unwrap_or(""), p.message))
            .collect();
        assert!(
            messages[0].starts_with("agent.spool_max_size: \"100MiB\" cannot hold")
                && messages[0].ends_with("make it at least \"131200KiB\""),
            "{messages:#?}"
        );
        assert!(
            messages[1].starts_with("agent.state_dir:") && messages[1].contains("not a directory"),
            "{messages:#?}"
        );
        assert_eq!(messages.len(), 2, "{messages:#?}");
        let small = parse::<AgentFile>("[agent]\nspool_max_size = \"64KiB\"\n").unwrap_err();
        assert!(small[0].message.contains("out of range"), "{small:#?}");
        // The default: systemd's StateDirectory=, else the working directory.
        let config = AgentConfig {
            state_dir: Some(dir.path().to_owned()),
            ..AgentConfig::default()
        };
        assert_eq!(config.resolved_state_dir(), dir.path());
    }

    #[test]
    fn labels_leave_room_for_the_facts_in_one_header() {
        let messages = |labels: &str| -> Vec<String> {
            let text = format!("[agent]\nlabels = {{ {labels} }}\n");
            match parse::<AgentFile>(&text) {
                Ok(_) => Vec::new(),
                Err(problems) => problems.into_iter().map(|p| p.message).collect(),
            }
        };
        assert!(messages(r#"role = "web", region = "eu""#).is_empty());
        let fact = messages(r#"os = "plan9""#);
        assert!(fact[0].contains("a fact every agent reports"), "{fact:?}");
        let long: Vec<String> = (0..40)
            .map(|i| format!("key{i:02}{} = \"{}\"", "k".repeat(50), "v".repeat(63)))
            .collect();
        let big = messages(&long.join(", "));
        assert!(big.iter().any(|m| m.contains("as a header")), "{big:?}");
    }
}
