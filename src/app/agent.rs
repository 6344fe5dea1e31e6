//! The `agent` and `check-config --agent` commands: load the agent config,
//! set up logging, run the agent under the process's signals and systemd
//! (the [`daemon`] harness, shared with `serve`).
//!
//! SIGHUP reloads the config (the log level, format and exclusions,
//! handler, limits and intervals apply at once; what a session reads when it
//! connects, such as `servers` and `name`, at the next connection: see
//! [`config::reload`](crate::config::reload)); SIGTERM or
//! SIGINT drain and stop (exit 0); a second one stops at once (exit 1),
//! killing the handlers still running.

use std::path::PathBuf;

use crate::{
    agent::{self, AgentError, spool::Spool},
    config::{
        AGENT_DEFAULT_PATH, AgentConfig, AgentFile, LogConfig, MetricsConfig, Source,
        reload::Changes,
    },
    daemon::{self, DaemonConfig, DaemonError, EX_CONFIG},
};

/// Why the `agent` command (or `check-config --agent`) failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The config, logging, the metrics port, signals, the runtime, or a
    /// forced stop (shared with `serve`).
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The spool cannot be opened, or is damaged: the agent does not start.
    #[error(transparent)]
    Spool(#[from] crate::agent::spool::SpoolError),
}

impl daemon::Failure for CommandError {
    fn daemon(&self) -> Option<&DaemonError> {
        match self {
            CommandError::Daemon(e) => Some(e),
            CommandError::Agent(_) | CommandError::Spool(_) => None,
        }
    }

    fn exit_code(&self) -> u8 {
        match self {
            CommandError::Daemon(e) => e.exit_code(),
            // What retrying cannot fix is the config's (a bad URL or name,
            // no servers): systemd's RestartPreventExitStatus=78 stops the
            // restart loop. So is a spool that cannot be used (the server's
            // store is refused with the same code): an operator must act.
            CommandError::Agent(_) | CommandError::Spool(_) => EX_CONFIG,
        }
    }
}

impl From<tokio::task::JoinError> for CommandError {
    fn from(e: tokio::task::JoinError) -> CommandError {
        CommandError::Daemon(e.into())
    }
}

/// The agent's config file, as the daemon harness sees it: the agent
/// follows its `[agent]` section; `[log]` is the harness's.
impl DaemonConfig for AgentFile {
    type Live = AgentConfig;

    fn log(&self) -> &LogConfig {
        &self.log
    }

    fn metrics(&self) -> &MetricsConfig {
        &self.agent.metrics
    }

    fn live(&self) -> AgentConfig {
        self.agent.clone()
    }

    fn changes(old: &AgentFile, new: &AgentFile) -> Changes {
        Changes::agent(old, new)
    }
}

fn source(path: Option<PathBuf>) -> Source {
    Source::new(path, AGENT_DEFAULT_PATH)
}

/// `check-config --agent`: prints the effective agent config to stdout.
///
/// # Errors
/// Every problem in the file, as [`DaemonError::Config`].
pub fn check_config(path: Option<PathBuf>) -> Result<(), CommandError> {
    Ok(daemon::check::<AgentFile>(&source(path))?)
}

/// `agent`: runs the agent until a shutdown signal.
///
/// # Errors
/// A bad config, a logging failure, or a fatal agent error.
pub fn agent(path: Option<PathBuf>) -> Result<(), CommandError> {
    let (config, daemon) = daemon::start::<AgentFile>(source(path))?;
    // After a second signal, stopping the runtime kills the handlers still
    // running (their guards), and what they left outside their groups.
    daemon.run(|context| run_until_signalled(context, config))
}

/// The agent's own part: it is ready as soon as it runs (it serves nothing
/// and connects on its own), so READY=1 comes at once; reloads reach it
/// through its config channel (what a session reads when it connects, at
/// its next connection).
async fn run_until_signalled(
    context: daemon::Context,
    config: AgentFile,
) -> Result<(), CommandError> {
    // Before READY=1: an agent that cannot keep its spool does not start
    // (it would run tasks again after its next restart).
    let spool = tokio::task::block_in_place(|| Spool::open(&config.agent))?;
    let (harness, launch) = context.harness(config, "contactd_agent")?;
    let mut agent = tokio::spawn(agent::run(agent::Run {
        metrics: launch.metrics,
        spool: Some(spool),
        ..agent::Run::new(launch.config, launch.shutdown)
    }));
    harness.ready("starting");
    Ok(harness.supervise(&mut agent, "config reloaded").await??)
}
