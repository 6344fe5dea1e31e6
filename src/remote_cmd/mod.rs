//! Remote commands: allow-list matching and bounded execution (the
//! process work is [`process`](crate::process)'s).
//!
//! A command line is split into words shell-style and run directly, never
//! through a shell, only if an allow-list pattern matches it. Each command
//! runs in its own process group, so a timeout (or the end of the grace
//! period at shutdown) kills everything it started. At most
//! `max_concurrent` run at once, at most `max_queued` wait for a slot, and
//! at most `max_output` bytes of their combined output are kept.
//!
//! A command gets none of the daemon's environment (a unit's variables
//! may hold secrets, and `env` is an easy command to allow): it starts
//! from [`BASE_ENV`], with `remote_cmd.env` added over it, and the
//! process runner's `CONTACTD_RUN`.

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use crate::process::CmdOutput;
// Parsed with the config, which owns the type; re-exported where it is used.
pub use crate::config::pattern::{CommandPattern, split_words};

use crate::{config::RemoteCmdConfig, untrusted::shown};

/// The environment every remote command starts from, before
/// `remote_cmd.env` (which may replace either). The `PATH` is fixed, not
/// the daemon's, so where a command is found does not depend on how the
/// daemon was started.
pub const BASE_ENV: [(&str, &str); 2] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
];

/// Why a command was not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "remote commands are disabled on this server: set `enabled = true` and list the \
         allowed command lines in `allow` under [remote_cmd] in its config, then reload it"
    )]
    Disabled,
    /// The command line, already [`crate::untrusted::shown`].
    #[error("command not allowed: \"{0}\" matches no pattern in remote_cmd.allow")]
    NotAllowed(String),
    #[error("bad command line: {0}")]
    BadCommand(String),
    #[error(
        "too many remote commands: {running} running and {queued} waiting \
         (remote_cmd.max_concurrent, remote_cmd.max_queued); retry later"
    )]
    Busy { running: usize, queued: usize },
}

/// Runs remote commands under one config's rules and limits.
///
/// A config reload builds a new runner; calls already admitted finish under
/// the runner that admitted them.
#[derive(Debug)]
pub struct Runner {
    config: RemoteCmdConfig,
    /// Each command's whole environment: [`BASE_ENV`] with the config's
    /// `env` over it, in name order.
    env: Vec<(String, String)>,
    /// One permit per command allowed to run at once.
    slots: Arc<Semaphore>,
    /// One permit per call allowed in the building: running or waiting.
    admission: Arc<Semaphore>,
}

impl Runner {
    /// A runner enforcing `config`.
    pub fn new(config: RemoteCmdConfig) -> Runner {
        let mut env: BTreeMap<String, String> = BASE_ENV
            .iter()
            .map(|&(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        env.extend(config.env.clone());
        Runner {
            slots: Arc::new(Semaphore::new(config.max_concurrent)),
            admission: Arc::new(Semaphore::new(config.max_concurrent + config.max_queued)),
            env: env.into_iter().collect(),
            config,
        }
    }

    /// The rules and limits this runner enforces.
    pub fn config(&self) -> &RemoteCmdConfig {
        &self.config
    }

    /// Checks a command line against the switch and the allow-list,
    /// returning its words.
    ///
    /// # Errors
    /// [`Refusal::Disabled`], [`Refusal::BadCommand`] or [`Refusal::NotAllowed`].
    pub fn check(&self, line: &str) -> Result<Vec<String>, Refusal> {
        if !self.config.enabled {
            return Err(Refusal::Disabled);
        }
        let argv = split_words(line).map_err(Refusal::BadCommand)?;
        if self.config.allow.iter().any(|p| p.matches(&argv)) {
            Ok(argv)
        } else {
            Err(Refusal::NotAllowed(shown(line).to_string()))
        }
    }

    /// Runs `line` if allowed, waiting for a free slot. `kill` ends the
    /// command early (used when the shutdown grace period is over).
    ///
    /// # Errors
    /// A [`Refusal`] when the command is not run at all; a command that runs
    /// and fails, times out or cannot start is an `Ok` with `success: false`.
    pub async fn run(&self, line: &str, kill: &CancellationToken) -> Result<CmdOutput, Refusal> {
        let argv = self.check(line)?;
        let _admitted = Arc::clone(&self.admission)
            .try_acquire_owned()
            .map_err(|_| {
                let running = self.config.max_concurrent - self.slots.available_permits();
                Refusal::Busy {
                    running,
                    queued: self.config.max_concurrent + self.config.max_queued
                        - running
                        - self.admission.available_permits(),
                }
            })?;
        // The semaphore is never closed, so acquiring only waits.
        let _slot = Arc::clone(&self.slots).acquire_owned().await.ok();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        Ok(crate::process::execute(
            &argv,
            &env,
            self.config.timeout,
            self.config.max_output.as_u64() as usize,
            kill,
        )
        .await)
    }
}
