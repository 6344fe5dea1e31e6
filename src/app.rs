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
        AdminArgs, ConfigArgs, SubmitArgs, TaskIdArgs, TasksArgs, TlsInitArgs, TlsIssueArgs,
        TokenCreateArgs,
    },
    config::{
        self, Config, ConfigError, ConfigFile, DEFAULT_PATH, LogConfig, Source, reload::Changes,
    },
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
    #[error("a second {0} stopped the drain short: what still ran was killed")]
    Forced(&'static str),
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The command line (or the input it names) cannot be used: exit 2, as
    /// clap's own usage errors.
    #[error("{0}")]
    Usage(String),
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
            // Restarting will not help with these: systemd's
            // RestartPreventExitStatus=78 stops the restart loop.
            AppError::Config(_)
            | AppError::Agent(_)
            | AppError::Logging(LogError::Filter { .. } | LogError::File { .. }) => EX_CONFIG,
            // A token or TLS file named by the config that cannot be used.
            AppError::Serve(e) if e.is_config() => EX_CONFIG,
            AppError::Store(e) if e.is_config() => EX_CONFIG,
            // A port the daemon may never bind (below 1024 without the
            // capability) is the config's to change.
            AppError::Bind { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                EX_CONFIG
            }
            AppError::Usage(_) => 2,
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
    ctl::write_out(&config::to_toml(&config)).map_err(AppError::Output)
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
    adopt_orphans();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    Ok((logging, runtime))
}

/// The admin socket: `--socket`, else the server config's `[admin] socket`,
/// the only key read: a problem elsewhere in the file (a key from a newer
/// contactd, a value being edited) is the server's to report, not a reason
/// to refuse an operator.
fn admin_socket(args: &AdminArgs) -> Result<PathBuf, AppError> {
    if let Some(socket) = &args.socket {
        return Ok(socket.clone());
    }
    let source = Source::new(args.config.clone(), DEFAULT_PATH);
    let (view, _) = source.load_or_default::<config::peek::AdminView>()?;
    Ok(view.admin.socket)
}

/// `task submit`.
///
/// # Errors
/// A bad config, an unreachable socket, or a refusal.
pub fn submit_task(args: &SubmitArgs) -> Result<(), AppError> {
    let text = task_text(args)?;
    let socket = admin_socket(&args.admin)?;
    Ok(ctl::submit(
        &socket,
        &text,
        args.agent.as_deref(),
        args.admin.json,
    )?)
}

/// The text of `task submit`: the argument, stdin for `-`, or `--file`'s
/// content, without the final newlines a file or `echo` adds.
fn task_text(args: &SubmitArgs) -> Result<String, AppError> {
    use std::io::Read;
    let (text, from) = match (&args.text, &args.file) {
        (Some(text), _) if text != "-" => (text.clone(), "the argument"),
        (_, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| AppError::Usage(format!("cannot read {}: {e}", path.display())))?;
            (text, "the file")
        }
        _ => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| AppError::Usage(format!("cannot read stdin: {e}")))?;
            (text, "stdin")
        }
    };
    let text = text.trim_end_matches(['\n', '\r']);
    if text.trim().is_empty() {
        return Err(AppError::Usage(format!(
            "the task's text from {from} is empty: give the text, `-` for stdin, or --file PATH"
        )));
    }
    Ok(text.to_owned())
}

/// `task show`.
///
/// # Errors
/// A bad config, an unreachable socket, or a refusal (an unknown id).
pub fn show_task(args: &TaskIdArgs) -> Result<(), AppError> {
    let socket = admin_socket(&args.admin)?;
    Ok(ctl::show(&socket, args.id, args.admin.json)?)
}

/// `task cancel`.
///
/// # Errors
/// A bad config, an unreachable socket, or a refusal (an unknown id, a
/// finished task).
pub fn cancel_task(args: &TaskIdArgs) -> Result<(), AppError> {
    let socket = admin_socket(&args.admin)?;
    Ok(ctl::cancel(&socket, args.id, args.admin.json)?)
}

/// `task retry`.
///
/// # Errors
/// A bad config, an unreachable socket, or a refusal (an unknown id, a task
/// that is not failed or dead).
pub fn retry_task(args: &TaskIdArgs) -> Result<(), AppError> {
    let socket = admin_socket(&args.admin)?;
    Ok(ctl::retry(&socket, args.id, args.admin.json)?)
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

/// `store backup`.
///
/// # Errors
/// A bad config, a store that is not SQLite, or a failed copy.
pub fn store_backup(args: &crate::cli::StoreBackupArgs) -> Result<(), AppError> {
    let db = match &args.db {
        Some(db) => db.clone(),
        None => {
            let (config, _) = server_source(&args.config).load_or_default::<Config>()?;
            if config.store.kind != crate::config::StoreKind::Sqlite {
                return Err(crate::store::StoreError::Failed(
                    "store.kind is \"memory\": there is nothing to back up".into(),
                )
                .into());
            }
            config.store.resolved_path()
        }
    };
    crate::store::sqlite::backup(&db, &args.file)?;
    eprintln!("backed up {} to {}", db.display(), args.file.display());
    Ok(())
}

/// `completions SHELL`: the script on stdout.
///
/// # Errors
/// stdout cannot be written (a closed pipe is not an error).
pub fn completions(args: &crate::cli::CompletionsArgs) -> Result<(), AppError> {
    ctl::write_out(&crate::manual::completions(args.shell)).map_err(AppError::Output)
}

/// `man DIR`: the pages written, one path a line on stdout.
///
/// # Errors
/// DIR or a page cannot be written.
pub fn man_pages(args: &crate::cli::ManArgs) -> Result<(), AppError> {
    let written = crate::manual::man_pages(&args.dir).map_err(|e| {
        AppError::Output(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", args.dir.display()),
        ))
    })?;
    let list: String = written
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    ctl::write_out(&list).map_err(AppError::Output)
}

/// `tls init`.
///
/// # Errors
/// Existing files without `--force`, or files that cannot be written.
pub fn tls_init(args: &TlsInitArgs) -> Result<(), AppError> {
    let made = crate::tls::pki::init(&args.dir, &args.dns, &args.ip, args.days, args.force)?;
    let wrote: String = made
        .files
        .iter()
        .map(|file| format!("wrote {}\n", file.display()))
        .collect();
    ctl::write_out(&wrote).map_err(AppError::Output)
}

/// `tls issue`.
///
/// # Errors
/// No CA in the directory, an existing pair without `--force`, a bad name.
pub fn tls_issue(args: &TlsIssueArgs) -> Result<(), AppError> {
    let made = crate::tls::pki::issue(&args.dir, &args.name, args.days, args.force)?;
    let wrote: String = made
        .files
        .iter()
        .map(|file| format!("wrote {}\n", file.display()))
        .collect();
    ctl::write_out(&wrote).map_err(AppError::Output)
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
    // Not through `ctl::write_out`: a token nobody could read must not be
    // a quiet success.
    use std::io::Write;
    writeln!(std::io::stdout(), "{token}").map_err(AppError::Output)
}

/// `serve`: runs the server until a shutdown signal.
///
/// # Errors
/// A bad config, logging or bind failure, or a server error.
pub fn serve(args: &ConfigArgs) -> Result<(), AppError> {
    let source = server_source(args);
    let (config, found) = source.load_or_default::<Config>()?;
    let (logging, runtime) = start_daemon(&source, &config.log, found)?;
    raise_fd_limit(config.server.max_connections);
    let result = runtime.block_on(serve_until_signalled(source, config, Arc::clone(&logging)));
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    stop_runtime(runtime, &result);
    // Logs are flushed after this, when `logging` is dropped.
    result
}

/// Makes the daemon the child subreaper of the commands it runs, so what
/// they leave outside their process group can still be killed.
fn adopt_orphans() {
    if let Err(e) = crate::process::reaper::become_subreaper() {
        tracing::warn!(
            "cannot become a child subreaper ({e}): processes a command starts outside \
             its process group may outlive it"
        );
    }
}

/// Ends the runtime at exit, then kills any process a command left behind.
pub(crate) fn stop_runtime(runtime: Runtime, result: &Result<(), AppError>) {
    if let Err(AppError::Forced(_)) = result {
        // Drops every task now, so the commands' guards kill their groups.
        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    } else {
        // Dropping thousands of closed connections one by one (freeing
        // their buffers) took 0.4 s at exit with 5,000 agents; the kernel
        // releases it all at once when the process exits.
        runtime.shutdown_background();
    }
    crate::process::reaper::sweep_all();
}

/// Every agent holds a connection: raise the soft limit on open files to
/// the hard limit, as most servers do.
fn raise_fd_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the open-files limit");
                hard
            }
            Err(e) => {
                tracing::warn!(soft, hard, "cannot raise the open-files limit: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("cannot read the open-files limit: {e}");
            return;
        }
    };
    // Not fatal: the cap still bounds connections, accept errors pause.
    if max_connections as u64 >= limit {
        tracing::warn!(
            max_connections,
            open_files = limit,
            "server.max_connections is above the open-files limit: connections beyond it \
             fail to be accepted (raise LimitNOFILE, or lower server.max_connections)"
        );
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
    // Before binding: a store that cannot be used stops the start, and
    // nothing is served without what it holds.
    let store = server::open_store(&config)?;
    let addr = config.server.listen;
    let listener = server::bind(addr, config.server.backlog)
        .map_err(|source| AppError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AppError::Bind { addr, source })?;
    let reloads = crate::metrics::Reloads::default();
    let metrics = metrics_endpoint(&config.metrics, "contactd", &logging, &reloads)?;
    let mut signals = Signals::install().map_err(AppError::Signals)?;
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let mut server = tokio::spawn(server::run_with_metrics(
        listener,
        metrics,
        config_rx,
        shutdown.clone(),
        store,
        started_tx,
    ));
    // READY=1 once everything the server offers answers (the admin socket
    // too), not as soon as the server task is spawned: units ordered after
    // contactd, and scripts, must never have to poll for a socket.
    if started.await.is_err() {
        // It could not start: its error, logged by `serve`.
        return Ok((&mut server).await??);
    }
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
        reload(&source, &config_tx, &logging, &reloads);
    });
    match stopped.await? {
        shutdown::Ended::Done(result) => Ok(result?),
        shutdown::Ended::Forced(signal) => Err(AppError::Forced(signal)),
    }
}

/// Binds the metrics listener `config` names, if any, before the daemon
/// says it is ready (a port that cannot be had stops the start), with the
/// process' series registered under `prefix`. Its address is logged by
/// who serves it, after the daemon's main `serving … addr=` line (tools
/// such as examples/bench take the first `addr=` they see).
///
/// # Errors
/// [`AppError::Bind`].
pub(crate) fn metrics_endpoint(
    config: &crate::config::MetricsConfig,
    prefix: &str,
    logging: &Arc<Logging>,
    reloads: &crate::metrics::Reloads,
) -> Result<Option<crate::metrics::Endpoint>, AppError> {
    let Some(addr) = config.listen else {
        return Ok(None);
    };
    let listener =
        crate::metrics::http::bind(addr).map_err(|source| AppError::Bind { addr, source })?;
    let mut registry = crate::metrics::registry(prefix, Some(Arc::clone(logging)));
    reloads.register(&mut registry);
    Ok(Some(crate::metrics::Endpoint { listener, registry }))
}

/// Re-reads the config and applies it: the log settings here, the rest by
/// the server as `config_tx` changes (`server::follow_config`; the task
/// generator reschedules itself). What changed, and what of it waits for a
/// restart, is [`Changes`]'s to say, logged here once. An invalid file
/// leaves the current config in force.
fn reload(
    source: &Source,
    config_tx: &watch::Sender<Arc<Config>>,
    logging: &Logging,
    reloads: &crate::metrics::Reloads,
) {
    let Some(new) = source.reload::<Config>() else {
        reloads.failed.inc();
        return;
    };
    reloads.applied.inc();
    let changes = Changes::server(&config_tx.borrow(), &new);
    if let Err(e) = logging.apply(&new.log) {
        tracing::error!("config reload: {e}; keeping the current log settings");
    }
    config_tx.send_replace(Arc::new(new));
    changes.log(source.path());
}
