//! The commands behind the CLI: `serve`, `check-config` and the operator
//! commands.
//!
//! `serve` follows the lifecycle in DESIGN.md: load the config, set up
//! logging, bind, serve; SIGHUP reloads, SIGTERM/SIGINT drain and stop, and
//! a second such signal during the drain exits at once. What it shares
//! with the `agent` command (start-up, signals, systemd, reloads, exit) is
//! [`daemon`]'s; the server's own part is its preflight,
//! store and listener, and saying it is ready only once they all answer.

pub mod agent;

use std::{path::PathBuf, sync::Arc};

use crate::{
    cli::{
        AdminArgs, AgentsArgs, ConfigArgs, JobCommand, JobsArgs, SubmitArgs, TaskIdArgs, TasksArgs,
        TlsInitArgs, TlsIssueArgs, TokenCreateArgs,
    },
    client::admin::{self as ctl, CtlError},
    config::{
        self, Config, ConfigError, ConfigFile, DEFAULT_PATH, LogConfig, MetricsConfig, Source,
        reload::Changes,
    },
    daemon::{self, DaemonConfig, DaemonError},
    server::{self, ServerError},
};

pub use crate::daemon::EX_CONFIG;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The config, logging, a port, signals, the runtime, or a forced stop
    /// (shared with the `agent` command).
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Serve(#[from] ServerError),
    #[error(transparent)]
    Ctl(#[from] CtlError),
    #[error(transparent)]
    Pki(#[from] crate::tls::pki::PkiError),
    #[error(transparent)]
    Token(#[from] crate::auth::TokenError),
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The command line (or the input it names) cannot be used: exit 2, as
    /// clap's own usage errors.
    #[error("{0}")]
    Usage(String),
    /// A followed run ended without succeeding (it printed how): exit 1.
    #[error("the run did not succeed")]
    RunFailed,
}

impl From<ConfigError> for AppError {
    fn from(e: ConfigError) -> AppError {
        AppError::Daemon(e.into())
    }
}

impl From<tokio::task::JoinError> for AppError {
    fn from(e: tokio::task::JoinError) -> AppError {
        AppError::Daemon(e.into())
    }
}

impl daemon::Failure for AppError {
    fn daemon(&self) -> Option<&DaemonError> {
        match self {
            AppError::Daemon(e) => Some(e),
            _ => None,
        }
    }

    fn exit_code(&self) -> u8 {
        match self {
            AppError::Daemon(e) => e.exit_code(),
            // A token or TLS file named by the config that cannot be used.
            AppError::Serve(e) if e.is_config() => EX_CONFIG,
            AppError::Store(e) if e.is_config() => EX_CONFIG,
            AppError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// The server's config, as the daemon harness sees it: the server follows
/// the whole file.
impl DaemonConfig for Config {
    type Live = Config;

    fn log(&self) -> &LogConfig {
        &self.log
    }

    fn metrics(&self) -> &MetricsConfig {
        &self.metrics
    }

    fn live(&self) -> Config {
        self.clone()
    }

    fn changes(old: &Config, new: &Config) -> Changes {
        Changes::server(old, new)
    }

    fn in_force(old: &Config, new: Config) -> Config {
        let (kept, held) = config::reload::hold_lowering(old, &new);
        if !held.is_empty() {
            tracing::warn!(
                held = ?held,
                "config reload would lower security (authentication, client certificates or \
                 the remote commands allowed): not applied, it takes effect after a restart; \
                 the rest of the reload applies now"
            );
        }
        kept
    }
}

/// The server config's source: `--config`/`$CONTACTD_CONFIG`, else the default.
fn server_source(args: &ConfigArgs) -> Source {
    Source::new(args.config.clone(), DEFAULT_PATH)
}

/// `check-config` for the server's config.
///
/// # Errors
/// Every problem in the file, as [`DaemonError::Config`].
pub fn check_config(args: &ConfigArgs) -> Result<(), AppError> {
    Ok(daemon::check::<Config>(&server_source(args))?)
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
    let rollout = (args.batch.is_some() || args.max_failed.is_some()).then(|| {
        (
            args.batch.as_deref().unwrap_or_default(),
            args.max_failed.as_deref().unwrap_or_default(),
        )
    });
    if rollout.is_some() && args.target.is_none() {
        return Err(AppError::Usage(
            "a rollout (--batch, --max-failed) is over the agents --target SELECTOR matches: \
             give one (`--target 'name=*'` for every agent)"
                .into(),
        ));
    }
    let succeeded = ctl::submit(
        &socket,
        &text,
        args.agent.as_deref(),
        args.target.as_ref(),
        rollout,
        args.admin.json,
    )?;
    if succeeded {
        Ok(())
    } else {
        Err(AppError::RunFailed)
    }
}

/// `jobs`.
///
/// # Errors
/// A bad config, an unreachable socket, or a refusal.
pub fn list_jobs(args: &JobsArgs) -> Result<(), AppError> {
    Ok(ctl::jobs(&admin_socket(&args.admin)?, args.admin.json)?)
}

/// `job run|show|pause|resume|halt`.
///
/// # Errors
/// A bad config, an unreachable socket, a refusal, or (`--wait`) a run that
/// did not succeed.
pub fn job(command: &JobCommand) -> Result<(), AppError> {
    match command {
        JobCommand::Run(args) => {
            let socket = admin_socket(&args.admin)?;
            if !ctl::run_job(&socket, &args.name, args.wait, args.admin.json)? {
                return Err(AppError::RunFailed);
            }
        }
        JobCommand::Show(args) => {
            ctl::show_run(&admin_socket(&args.admin)?, args.run, args.admin.json)?;
        }
        JobCommand::Pause(args) => {
            ctl::pause_job(
                &admin_socket(&args.admin)?,
                &args.name,
                true,
                args.admin.json,
            )?;
        }
        JobCommand::Resume(args) => {
            let socket = admin_socket(&args.admin)?;
            // Job names are never all digits: a number is a run.
            match args.what.parse::<u64>() {
                Ok(run) => {
                    if !ctl::resume_run(&socket, run, args.wait, args.admin.json)? {
                        return Err(AppError::RunFailed);
                    }
                }
                Err(_) => ctl::pause_job(&socket, &args.what, false, args.admin.json)?,
            }
        }
        JobCommand::Halt(args) => {
            ctl::halt_run(&admin_socket(&args.admin)?, args.run, args.admin.json)?;
        }
    }
    Ok(())
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
pub fn list_agents(args: &AgentsArgs) -> Result<(), AppError> {
    Ok(ctl::agents(
        &admin_socket(&args.admin)?,
        args.selector.as_ref(),
        args.admin.json,
    )?)
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
            let not_sqlite = match config.store.kind {
                crate::config::StoreKind::Sqlite => None,
                crate::config::StoreKind::Memory => {
                    Some("store.kind is \"memory\": there is nothing to back up")
                }
                crate::config::StoreKind::Postgres => Some(
                    "store.kind is \"postgres\": back the database up with PostgreSQL's own \
                     tools (pg_dump)",
                ),
            };
            if let Some(reason) = not_sqlite {
                return Err(crate::store::StoreError::Failed(reason.into()).into());
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
    crate::client::write_out(&crate::manual::completions(args.shell)).map_err(AppError::Output)
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
    crate::client::write_out(&list).map_err(AppError::Output)
}

/// Prints `wrote FILE` for each file `tls init` or `tls issue` made.
fn print_wrote(made: &crate::tls::pki::Made) -> Result<(), AppError> {
    let wrote: String = made
        .files
        .iter()
        .map(|file| format!("wrote {}\n", file.display()))
        .collect();
    crate::client::write_out(&wrote).map_err(AppError::Output)
}

/// `tls init`.
///
/// # Errors
/// Existing files without `--force`, or files that cannot be written.
pub fn tls_init(args: &TlsInitArgs) -> Result<(), AppError> {
    let made = crate::tls::pki::init(&args.dir, &args.dns, &args.ip, args.days, args.force)?;
    print_wrote(&made)
}

/// `tls issue`.
///
/// # Errors
/// No CA in the directory, an existing pair without `--force`, a bad name.
pub fn tls_issue(args: &TlsIssueArgs) -> Result<(), AppError> {
    let made = crate::tls::pki::issue(
        &args.dir,
        &args.name,
        args.days,
        args.force,
        args.group.as_deref(),
    )?;
    print_wrote(&made)
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
    // Not through `client::write_out`: a token nobody could read must not be
    // a quiet success.
    use std::io::Write;
    writeln!(std::io::stdout(), "{token}").map_err(AppError::Output)
}

/// `serve`: runs the server until a shutdown signal.
///
/// # Errors
/// A bad config, logging or bind failure, or a server error.
pub fn serve(args: &ConfigArgs) -> Result<(), AppError> {
    let (config, daemon) = daemon::start::<Config>(server_source(args))?;
    raise_fd_limit();
    daemon.run(|context| serve_until_signalled(context, config))
}

/// Every agent holds a connection: raise the soft limit on open files to
/// the hard limit, as most servers do. (The server sizes its connection
/// cap from the limit it then finds.)
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
    mut context: daemon::Context,
    config: Config,
) -> Result<(), AppError> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let policy = server::preflight(&config)?;
    // Before binding: a store that cannot be used stops the start, and
    // nothing is served without what it holds.
    let store = server::open_store(&config)?;
    let addr = config.server.listen;
    // systemd's socket under socket activation (contactd.socket), else
    // bound here.
    let listener = context.listener(daemon::CONTACT, addr, config.server.backlog)?;
    let local = listener
        .local_addr()
        .map_err(|source| DaemonError::Bind { addr, source })?;
    // The harness's `reload` applies the log settings; the rest the server
    // applies as its config channel changes (`server::reload::follow_config`; the
    // task generator reschedules itself).
    let (harness, launch) = context.harness(config, "contactd")?;
    let shutdown = launch.shutdown.clone();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let mut server = tokio::spawn(server::run(server::Serve {
        store: Some(store),
        policy: Some(policy),
        metrics: launch.metrics,
        started: Some(started_tx),
        ..server::Serve::new(listener, launch.config, launch.shutdown)
    }));
    // READY=1 once everything the server offers answers (the admin socket
    // too), not as soon as the server task is spawned: units ordered after
    // contactd, and scripts, must never have to poll for a socket.
    if started.await.is_err() {
        // It could not start: its error, logged by `daemon::Daemon::run`.
        return Ok((&mut server).await??);
    }
    let ready = format!("serving on {local}");
    harness.ready(&ready);
    tokio::spawn({
        let (logging, stop) = (Arc::clone(harness.logging()), shutdown);
        async move { logging.report_dropped(DROPPED_LOG_REPORT, stop).await }
    });
    Ok(harness.supervise(&mut server, &ready).await??)
}
