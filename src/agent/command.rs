//! The `agent` and `check-config --agent` commands: load the agent config,
//! set up logging, run the agent under the process's signals and systemd.
//!
//! SIGHUP reloads the config (log settings, handler, limits and intervals
//! apply at once; `servers` and `name` at the next reconnection); SIGTERM or
//! SIGINT drain and stop (exit 0); a second one stops at once (exit 1),
//! killing the handlers still running.

use std::{path::PathBuf, sync::Arc};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    app::{self, AppError},
    config::{AGENT_DEFAULT_PATH, AgentConfig, AgentFile, Source},
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
            reload(&source, &config_tx, &logging, &reloads);
        },
    );
    match stopped.await? {
        shutdown::Ended::Done(result) => Ok(result?),
        shutdown::Ended::Forced(signal) => Err(AppError::Forced(signal)),
    }
}

/// Re-reads the config and applies it; an invalid file leaves the current
/// config in force.
fn reload(
    source: &Source,
    config_tx: &watch::Sender<Arc<AgentConfig>>,
    logging: &Logging,
    reloads: &crate::metrics::Reloads,
) {
    let Some(new) = source.reload::<AgentFile>() else {
        reloads.failed.inc();
        return;
    };
    reloads.applied.inc();
    let old = Arc::clone(&config_tx.borrow());
    if old.metrics != new.agent.metrics {
        tracing::warn!("agent.metrics changes take effect after a restart");
    }
    if old.servers != new.agent.servers || old.name != new.agent.name {
        tracing::info!("agent.servers and agent.name changes apply at the next reconnection");
    }
    if let Err(e) = logging.apply(&new.log) {
        tracing::error!("config reload: {e}; keeping the current log settings");
    }
    let changed: Vec<String> = crate::config::changed_keys(&*old, &new.agent)
        .into_iter()
        .map(|key| format!("agent.{key}"))
        .collect();
    config_tx.send_replace(Arc::new(new.agent));
    tracing::info!(
        path = %source.path().display(),
        changed = %crate::config::shown_keys(&changed),
        "config reloaded"
    );
}
