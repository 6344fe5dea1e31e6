//! The commands behind the CLI: `serve` and `check-config`.
//!
//! `serve` follows the lifecycle in DESIGN.md: load the config, set up
//! logging, bind, serve; SIGHUP reloads, SIGTERM/SIGINT drain and stop, and
//! a second such signal during the drain exits at once.

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    cli::ConfigArgs,
    config::{Config, ConfigError, DEFAULT_PATH, Source},
    logging::{self, LogError, Logging},
    server::{self, ServerError},
    shutdown::{Event, Signals},
};

/// sysexits' EX_CONFIG: the config is wrong; restarting will not help.
pub const EX_CONFIG: u8 = 78;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Logging(#[from] LogError),
    #[error("cannot listen on {addr}: {source}{}", bind_hint(.source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Serve(#[from] ServerError),
    #[error("the server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process holds this port: is contactd already running?)"
        }
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        std::io::ErrorKind::AddrNotAvailable => " (no local interface has this address)",
        _ => "",
    }
}

impl AppError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) => EX_CONFIG,
            _ => 1,
        }
    }
}

/// Loads the config `args` name; `None` in the second place means "the
/// default file is absent, built-in defaults apply".
fn load(args: &ConfigArgs) -> Result<(Source, Config, bool), ConfigError> {
    let source = Source::new(args.config.clone(), DEFAULT_PATH);
    let loaded = source.load::<Config>()?;
    let found = loaded.is_some();
    Ok((source, loaded.unwrap_or_default(), found))
}

/// `check-config`: prints the effective config to stdout.
///
/// # Errors
/// Every problem in the file, as [`AppError::Config`].
pub fn check_config(args: &ConfigArgs) -> Result<(), AppError> {
    let (source, config, found) = load(args)?;
    if !found {
        eprintln!(
            "no config file at {}: these are the built-in defaults",
            source.path().display()
        );
    }
    print!("{}", config.to_toml());
    Ok(())
}

/// `serve`: runs the server until a shutdown signal.
///
/// # Errors
/// A bad config, logging or bind failure, or a server error.
pub fn serve(args: &ConfigArgs) -> Result<(), AppError> {
    let (source, config, found) = load(args)?;
    let logging = logging::init(&config.log)?;
    if found {
        tracing::info!(path = %source.path().display(), "loaded config");
    } else {
        tracing::info!(path = %source.path().display(), "no config file: using built-in defaults");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    let result = runtime.block_on(serve_until_signalled(source, config, logging));
    // Dropping thousands of closed connections one by one (freeing their
    // buffers) took 0.4 s at exit with 5,000 agents; the kernel releases it
    // all at once when the process exits.
    runtime.shutdown_background();
    result
}

async fn serve_until_signalled(
    source: Source,
    config: Config,
    logging: Logging,
) -> Result<(), AppError> {
    let addr = config.server.listen;
    let listener = server::bind(addr, config.server.backlog)
        .map_err(|source| AppError::Bind { addr, source })?;
    let mut signals = Signals::install().map_err(AppError::Signals)?;
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let mut server = tokio::spawn(server::run(listener, config_rx, shutdown.clone()));
    loop {
        tokio::select! {
            result = &mut server => return Ok(result??),
            event = signals.next() => match event {
                Event::Reload => reload(&source, &config_tx, &logging),
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
            result = &mut server => return Ok(result??),
            event = signals.next() => if let Event::Shutdown(signal) = event {
                tracing::warn!(signal, "second shutdown signal: exiting now");
                std::process::exit(1);
            },
        }
    }
}

/// Re-reads the config and applies it; an invalid file leaves the current
/// config in force.
fn reload(source: &Source, config_tx: &watch::Sender<Arc<Config>>, logging: &Logging) {
    let new = match source.load::<Config>() {
        Ok(loaded) => loaded.unwrap_or_default(),
        Err(e) => {
            tracing::error!("config reload failed, keeping the current config: {e}");
            return;
        }
    };
    let old = Arc::clone(&config_tx.borrow());
    if new.server != old.server {
        tracing::warn!(
            "changes under [server] take effect after a restart (listen {} → {})",
            old.server.listen,
            new.server.listen
        );
    }
    if let Err(e) = logging.apply(&new.log) {
        tracing::error!("config reload: {e}; keeping the current log settings");
    }
    config_tx.send_replace(Arc::new(new));
    tracing::info!(path = %source.path().display(), "config reloaded");
}
