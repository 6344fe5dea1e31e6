//! The commands behind the CLI: `serve`, `check-config` and the operator
//! commands; start-up pieces shared with the `agent` command.
//!
//! `serve` follows the lifecycle in DESIGN.md: load the config, set up
//! logging, bind, serve; SIGHUP reloads, SIGTERM/SIGINT drain and stop, and
//! a second such signal during the drain exits at once.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use serde::Serialize;
use tokio::{runtime::Runtime, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    cli::{
        AdminArgs, ConfigArgs, SubmitArgs, TasksArgs, TlsInitArgs, TlsIssueArgs, TokenCreateArgs,
    },
    config::{self, Config, ConfigError, ConfigFile, DEFAULT_PATH, LogConfig, Source},
    ctl::{self, CtlError},
    logging::{self, LogError, Logging},
    server::{self, ServerError},
    shutdown::{self, Signals},
    systemd,
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
    #[error(transparent)]
    Ctl(#[from] CtlError),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error(transparent)]
    Pki(#[from] crate::tls::pki::PkiError),
    #[error(transparent)]
    Token(#[from] crate::auth::TokenError),
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
            AppError::Config(_) | AppError::Agent(_) => EX_CONFIG,
            AppError::Serve(e) if e.is_config() => EX_CONFIG,
            _ => 1,
        }
    }
}

/// The server config's source: `--config`/`$CONTACTD_CONFIG`, else the default.
fn server_source(args: &ConfigArgs) -> Source {
    Source::new(args.config.clone(), DEFAULT_PATH)
}

/// `check-config`: prints the effective config of type `T` to stdout.
///
/// # Errors
/// Every problem in the file, as [`AppError::Config`].
pub fn check<T: ConfigFile + Serialize>(source: &Source) -> Result<(), AppError> {
    let (config, found) = source.load_or_default::<T>()?;
    if !found {
        eprintln!(
            "no config file at {}: these are the built-in defaults",
            source.path().display()
        );
    }
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    print!("{}", config::to_toml(&config));
    Ok(())
}

/// `check-config` for the server's config.
///
/// # Errors
/// Every problem in the file, as [`AppError::Config`].
pub fn check_config(args: &ConfigArgs) -> Result<(), AppError> {
    check::<Config>(&server_source(args))
}

/// A daemon's start: logging as its config says, a line saying where that
/// config came from, and the runtime to run on.
///
/// # Errors
/// A logging or runtime failure.
pub fn start_daemon(
    source: &Source,
    log: &LogConfig,
    found: bool,
) -> Result<(Arc<Logging>, Runtime), AppError> {
    let logging = Arc::new(logging::init(log)?);
    if found {
        tracing::info!(path = %source.path().display(), "loaded config");
    } else {
        tracing::info!(path = %source.path().display(), "no config file: using built-in defaults");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    Ok((logging, runtime))
}

/// The admin socket: `--socket`, else the server config's `[admin] socket`.
fn admin_socket(args: &AdminArgs) -> Result<PathBuf, AppError> {
    if let Some(socket) = &args.socket {
        return Ok(socket.clone());
    }
    let source = Source::new(args.config.clone(), DEFAULT_PATH);
    let (config, _) = source.load_or_default::<Config>()?;
    Ok(config.admin.socket)
}

/// `task submit`.
///
/// # Errors
/// A bad config, an unreachable socket, or a refusal.
pub fn submit_task(args: &SubmitArgs) -> Result<(), AppError> {
    let socket = admin_socket(&args.admin)?;
    Ok(ctl::submit(
        &socket,
        &args.text,
        args.agent.as_deref(),
        args.admin.json,
    )?)
}

/// `agents`.
///
/// # Errors
/// A bad config, an unreachable socket, or a refusal.
pub fn list_agents(args: &AdminArgs) -> Result<(), AppError> {
    Ok(ctl::agents(&admin_socket(args)?, args.json)?)
}

/// `tasks`.
///
/// # Errors
/// A bad config, an unreachable socket, or a refusal.
pub fn list_tasks(args: &TasksArgs) -> Result<(), AppError> {
    Ok(ctl::tasks(
        &admin_socket(&args.admin)?,
        args.state,
        args.limit,
        args.admin.json,
    )?)
}

/// `tls init`.
///
/// # Errors
/// Existing files without `--force`, or files that cannot be written.
pub fn tls_init(args: &TlsInitArgs) -> Result<(), AppError> {
    let made = crate::tls::pki::init(&args.dir, &args.dns, &args.ip, args.days, args.force)?;
    for file in made.files {
        println!("wrote {}", file.display());
    }
    Ok(())
}

/// `tls issue`.
///
/// # Errors
/// No CA in the directory, an existing pair without `--force`, a bad name.
pub fn tls_issue(args: &TlsIssueArgs) -> Result<(), AppError> {
    let made = crate::tls::pki::issue(&args.dir, &args.name, args.days, args.force)?;
    for file in made.files {
        println!("wrote {}", file.display());
    }
    Ok(())
}

/// `token create`: prints the new token on stdout, the rest on stderr.
///
/// # Errors
/// A bad name, a name that has a token (without `--force`), an unwritable file.
pub fn token_create(args: &TokenCreateArgs) -> Result<(), AppError> {
    let token = crate::auth::create_token(&args.file, &args.name, args.role, args.force)?;
    eprintln!(
        "added {} ({}) to {}; the token is shown only now (reload the server to apply):",
        args.name,
        args.role,
        args.file.display()
    );
    println!("{token}");
    Ok(())
}

/// `serve`: runs the server until a shutdown signal.
///
/// # Errors
/// A bad config, logging or bind failure, or a server error.
pub fn serve(args: &ConfigArgs) -> Result<(), AppError> {
    let source = server_source(args);
    let (config, found) = source.load_or_default::<Config>()?;
    let (logging, runtime) = start_daemon(&source, &config.log, found)?;
    raise_fd_limit();
    let result = runtime.block_on(serve_until_signalled(source, config, Arc::clone(&logging)));
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    // Dropping thousands of closed connections one by one (freeing their
    // buffers) took 0.4 s at exit with 5,000 agents; the kernel releases it
    // all at once when the process exits. (Logs are flushed after this,
    // when `logging` is dropped.)
    runtime.shutdown_background();
    result
}

/// Every agent holds a connection: raise the soft limit on open files to
/// the hard limit, as most servers do.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(soft, hard, "cannot raise the open-files limit: {e}"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-files limit: {e}"),
    }
}

/// How often dropped log lines are reported.
const DROPPED_LOG_REPORT: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve_until_signalled(
    source: Source,
    config: Config,
    logging: Arc<Logging>,
) -> Result<(), AppError> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    server::preflight(&config)?;
    let addr = config.server.listen;
    let listener = server::bind(addr, config.server.backlog)
        .map_err(|source| AppError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AppError::Bind { addr, source })?;
    let mut signals = Signals::install().map_err(AppError::Signals)?;
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let mut server = tokio::spawn(server::run(listener, config_rx, shutdown.clone()));
    let ready = format!("serving on {local}");
    systemd::ready(&ready);
    if let Some(interval) = systemd::watchdog_interval() {
        tracing::info!(interval = %humantime::format_duration(interval), "systemd watchdog enabled");
        tokio::spawn(systemd::watchdog(interval, shutdown.clone()));
    }
    tokio::spawn({
        let (logging, stop) = (Arc::clone(&logging), shutdown.clone());
        async move { logging.report_dropped(DROPPED_LOG_REPORT, stop).await }
    });
    let stopped = shutdown::supervise(&mut server, &mut signals, &shutdown, &ready, || {
        reload(&source, &config_tx, &logging);
    });
    Ok(stopped.await??)
}

/// Re-reads the config and applies it; an invalid file leaves the current
/// config in force.
fn reload(source: &Source, config_tx: &watch::Sender<Arc<Config>>, logging: &Logging) {
    let Some(new) = source.reload::<Config>() else {
        return;
    };
    let old = Arc::clone(&config_tx.borrow());
    let restart = old.server.restart_needed(&new.server);
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "these changes take effect after a restart; the rest applies now");
    }
    if let Err(e) = logging.apply(&new.log) {
        tracing::error!("config reload: {e}; keeping the current log settings");
    }
    config_tx.send_replace(Arc::new(new));
    tracing::info!(path = %source.path().display(), "config reloaded");
}
