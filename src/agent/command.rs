//! The `agent` and `check-config --agent` commands: load the agent config,
//! set up logging, run the agent under the process's signals and systemd.
//!
//! SIGHUP reloads the config (the log level, format and exclusions,
//! handler, limits and intervals apply at once; what a session reads when it
//! connects, such as `servers` and `name`, at the next connection: see
//! [`config::reload`](crate::config::reload)); SIGTERM or
//! SIGINT drain and stop (exit 0); a second one stops at once (exit 1),
//! killing the handlers still running.

use std::{path::PathBuf, sync::Arc};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    app::{self, AppError},
    config::{AGENT_DEFAULT_PATH, AgentConfig, AgentFile, LogConfig, Source, reload::Changes},
    logging::Logging,
    shutdown::{self, Signals},
    systemd,
};

fn source(path: Option<PathBuf>) -> Source {
    Source::new(path, AGENT_DEFAULT_PATH)
}

/// `check-config --agent`: prints the effective agent config to stdout.
///
/// # Errors
/// Every problem in the file, as [`AppError::Config`].
pub fn check_config(path: Option<PathBuf>) -> Result<(), AppError> {
    app::check::<AgentFile>(&source(path))
}

/// `agent`: runs the agent until a shutdown signal.
///
/// # Errors
/// A bad config, a logging failure, or a fatal agent error.
pub fn agent(path: Option<PathBuf>) -> Result<(), AppError> {
    let source = source(path);
    let (config, found) = source.load_or_default::<AgentFile>()?;
    let (logging, runtime) = app::start_daemon(&source, &config.log, found)?;
    let result = runtime.block_on(run_until_signalled(source, config, logging));
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    // After a second signal, dropping the runtime kills the handlers still
    // running (their guards), and what they left outside their groups.
    app::stop_runtime(runtime, &result);
    result
}

async fn run_until_signalled(
    source: Source,
    config: AgentFile,
    logging: Arc<Logging>,
) -> Result<(), AppError> {
    let reloads = crate::metrics::Reloads::default();
    let metrics =
        app::metrics_endpoint(&config.agent.metrics, "contactd_agent", &logging, &reloads)?;
    let mut signals = Signals::install().map_err(AppError::Signals)?;
    // The log settings in force, for the next reload to compare with (the
    // agent's own settings are in `config_tx`).
    let mut log = config.log.clone();
    let (config_tx, config_rx) = watch::channel(Arc::new(config.agent));
    let shutdown = CancellationToken::new();
    let mut agent = tokio::spawn(super::run_with_metrics(
        config_rx,
        shutdown.clone(),
        None,
        metrics,
    ));
    systemd::ready("starting");
    let stop_watchdog = CancellationToken::new();
    let _stop_watchdog = stop_watchdog.clone().drop_guard();
    if let Some(interval) = systemd::watchdog_interval() {
        tokio::spawn(systemd::watchdog(interval, stop_watchdog));
    }
    let stopped = shutdown::supervise(
        &mut agent,
        &mut signals,
        &shutdown,
        "config reloaded",
        || {
            reload(&source, &config_tx, &mut log, &logging, &reloads);
        },
    );
    match stopped.await? {
        shutdown::Ended::Done(result) => Ok(result?),
        shutdown::Ended::Forced(signal) => Err(AppError::Forced(signal)),
    }
}

/// Re-reads the config and applies it: the log settings here, the rest by
/// the agent as `config_tx` changes (what a session reads when it connects,
/// at its next connection). What changed, and when each change applies, is
/// [`Changes`]'s to say, logged here once. An invalid file leaves the
/// current config in force.
fn reload(
    source: &Source,
    config_tx: &watch::Sender<Arc<AgentConfig>>,
    log: &mut LogConfig,
    logging: &Logging,
    reloads: &crate::metrics::Reloads,
) {
    let Some(new) = source.reload::<AgentFile>() else {
        reloads.failed.inc();
        return;
    };
    reloads.applied.inc();
    let old = AgentFile {
        agent: AgentConfig::clone(&config_tx.borrow()),
        log: log.clone(),
    };
    let changes = Changes::agent(&old, &new);
    if let Err(e) = logging.apply(&new.log) {
        tracing::error!("config reload: {e}; keeping the current log settings");
    }
    log.clone_from(&new.log);
    config_tx.send_replace(Arc::new(new.agent));
    changes.log(source.path());
}
