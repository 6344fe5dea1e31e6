//! The `agent` and `check-config --agent` commands: load the agent config,
//! set up logging, run the agent under the process's signals and systemd.
//!
//! SIGHUP reloads the config (log settings, handler, limits and intervals
//! apply at once; `servers` and `name` at the next reconnection); SIGTERM or
//! SIGINT drain and stop (exit 0); a second one exits at once.

use std::{path::PathBuf, sync::Arc};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    app::AppError,
    config::{AGENT_DEFAULT_PATH, AgentConfig, AgentFile, ConfigError, Source},
    logging::{self, Logging},
    shutdown::{Event, Signals},
    systemd,
};

fn load(path: Option<PathBuf>) -> Result<(Source, AgentFile, bool), ConfigError> {
    let source = Source::new(path, AGENT_DEFAULT_PATH);
    let loaded = source.load::<AgentFile>()?;
    let found = loaded.is_some();
    Ok((source, loaded.unwrap_or_default(), found))
}

/// `check-config --agent`: prints the effective agent config to stdout.
///
/// # Errors
/// Every problem in the file, as [`AppError::Config`].
pub fn check_config(path: Option<PathBuf>) -> Result<(), AppError> {
    let (source, config, found) = load(path)?;
    if !found {
        eprintln!(
            "no config file at {}: these are the built-in defaults",
            source.path().display()
        );
    }
    print!("{}", config.to_toml());
    Ok(())
}

/// `agent`: runs the agent until a shutdown signal.
///
/// # Errors
/// A bad config, a logging failure, or a fatal agent error.
pub fn agent(path: Option<PathBuf>) -> Result<(), AppError> {
    let (source, config, found) = load(path)?;
    let logging = Arc::new(logging::init(&config.log)?);
    if found {
        tracing::info!(path = %source.path().display(), "loaded config");
    } else {
        tracing::info!(path = %source.path().display(), "no config file: using built-in defaults");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    let result = runtime.block_on(run_until_signalled(source, config, logging));
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    // Handlers still running (after a second signal) must not keep the
    // process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn run_until_signalled(
    source: Source,
    config: AgentFile,
    logging: Arc<Logging>,
) -> Result<(), AppError> {
    let mut signals = Signals::install().map_err(AppError::Signals)?;
    let (config_tx, config_rx) = watch::channel(Arc::new(config.agent));
    let shutdown = CancellationToken::new();
    let mut agent = tokio::spawn(super::run_with(config_rx, shutdown.clone(), None));
    systemd::ready("starting");
    let stop_watchdog = CancellationToken::new();
    let _stop_watchdog = stop_watchdog.clone().drop_guard();
    if let Some(interval) = systemd::watchdog_interval() {
        tokio::spawn(systemd::watchdog(interval, stop_watchdog));
    }
    loop {
        tokio::select! {
            result = &mut agent => return Ok(result??),
            event = signals.next() => match event {
                Event::Reload => {
                    systemd::reloading();
                    reload(&source, &config_tx, &logging);
                    systemd::ready("config reloaded");
                }
                Event::Shutdown(signal) => {
                    tracing::info!(signal, "shutdown requested");
                    shutdown.cancel();
                    break;
                }
            },
        }
    }
    loop {
        tokio::select! {
            result = &mut agent => return Ok(result??),
            event = signals.next() => if let Event::Shutdown(signal) = event {
                tracing::warn!(signal, "second shutdown signal: exiting now");
                std::process::exit(1);
            },
        }
    }
}

/// Re-reads the config and applies it; an invalid file leaves the current
/// config in force.
fn reload(source: &Source, config_tx: &watch::Sender<Arc<AgentConfig>>, logging: &Logging) {
    let new = match source.load::<AgentFile>() {
        Ok(loaded) => loaded.unwrap_or_default(),
        Err(e) => {
            for (i, line) in e.to_string().lines().enumerate() {
                if i == 0 {
                    tracing::error!("config reload failed, keeping the current config: {line}");
                } else {
                    tracing::error!("{line}");
                }
            }
            return;
        }
    };
    let old = Arc::clone(&config_tx.borrow());
    if old.servers != new.agent.servers || old.name != new.agent.name {
        tracing::info!("agent.servers and agent.name changes apply at the next reconnection");
    }
    if let Err(e) = logging.apply(&new.log) {
        tracing::error!("config reload: {e}; keeping the current log settings");
    }
    config_tx.send_replace(Arc::new(new.agent));
    tracing::info!(path = %source.path().display(), "config reloaded");
}
