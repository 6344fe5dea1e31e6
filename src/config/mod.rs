//! The server's configuration: typed sections with their defaults in one
//! place, loaded from TOML by [`load`](load::load) with every problem
//! reported at once.
//!
//! Where the file comes from: `--config`, else `$CONTACTD_CONFIG`, else
//! [`DEFAULT_PATH`]; only a missing *default* file means built-in defaults.
//!
//! One file per section, each with its type, its defaults and its
//! `check`; this file holds [`Config`], which calls them in turn:
//! - `server.rs`: `[server]` and `[server.tls]` ([`ServerConfig`],
//!   [`ServerTlsConfig`], [`ClientAuth`]);
//! - `tasks.rs`: `[tasks]` ([`TasksConfig`], [`DeliveryMode`]);
//! - `jobs.rs`: `[[jobs]]` ([`JobConfig`], [`JobMode`], [`Rollout`]);
//! - `remote_cmd.rs`: `[remote_cmd]` ([`RemoteCmdConfig`]);
//! - `admin.rs`: `[admin]` ([`AdminConfig`]);
//! - `metrics.rs`, `store.rs`, `log.rs`: `[metrics]`, `[store]`, `[log]`;
//! - `web.rs`: `[web]`, the operators' web console ([`WebConfig`]);
//! - `validate.rs`: what the checks are built from (`Checks`, [`ranges`],
//!   the unit constants) and the warnings that span sections;
//! - `source.rs`: where a file comes from ([`Source`]) and how a config is
//!   shown ([`changed_keys`], [`shown_keys`], [`to_toml`]);
//! - `load.rs`: reading and parsing a file, with each problem's position;
//! - `agent.rs`: the agent's own file (`[agent]` and `[log]`);
//! - `pattern.rs`, `template.rs`, `units.rs`: the value types and units;
//! - `peek.rs`, `reload.rs`: partial reads and what a reload may change.

mod admin;
pub mod agent;
pub mod jobs;
mod load;
pub mod log;
pub mod metrics;
pub mod pattern;
pub mod peek;
pub mod reload;
mod remote_cmd;
mod server;
mod source;
pub mod store;
mod tasks;
pub mod template;
pub mod units;
mod validate;
pub mod web;

use serde::{Deserialize, Serialize};

pub use admin::AdminConfig;
pub use agent::{AGENT_DEFAULT_PATH, AgentConfig, AgentFile, AgentTlsConfig, BackoffConfig};
pub use jobs::{Amount, JobConfig, JobMode, Overlap, Rollout};
pub use load::{ConfigError, ConfigFile, Problem, load, parse};
pub use log::{LogConfig, LogFormat, Rotation};
pub use metrics::MetricsConfig;
pub use pattern::CommandPattern;
pub use remote_cmd::RemoteCmdConfig;
pub use server::{
    AgentPin, ClientAuth, ConnectionCap, DEFAULT_MAX_CONNECTIONS, ServerConfig, ServerTlsConfig,
};
pub use source::{Source, changed_keys, shown_keys, to_toml};
pub use store::{StoreConfig, StoreKind, StoreSync};
pub use tasks::{DeliveryMode, TasksConfig};
pub use template::TaskTemplate;
pub(crate) use validate::Checks;
pub use validate::ranges;
pub use web::WebConfig;

/// This machine's host name, if it can be read and is not empty. Each
/// caller says what stands in for it: `"localhost"` for an agent's name,
/// `"contactd"` for a server's.
#[must_use]
pub fn host_name() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
}

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
    pub web: WebConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    /// `[[jobs]]`: named, scheduled tasks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobConfig>,
}

impl ConfigFile for Config {
    fn warnings(&self) -> Vec<String> {
        self.unsafe_settings()
    }

    /// Each section's checks, in the order its problems are reported.
    /// No problem spans sections: the settings that are only unsafe
    /// together are warnings (`unsafe_settings`, in `validate.rs`).
    fn validate(&self) -> Vec<(String, String)> {
        let mut c = Checks::default();
        self.server.check(&mut c);
        self.tasks.check(&mut c);
        self.store.check(&mut c);
        self.admin.check(&mut c);
        self.remote_cmd.check(&mut c);
        self.metrics.check("metrics", &mut c);
        self.web.check(self.server.tls.is_some(), &mut c);
        self.log.check(&mut c);
        jobs::check(&self.jobs, self.tasks.mode == DeliveryMode::Queue, &mut c);
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
