//! The harness both daemons (`serve` and `agent`) run in: loading the
//! config, logging and the runtime; the sockets systemd passes
//! (`sockets.rs`); the metrics endpoint; signals, READY=1
//! and the systemd watchdog; SIGHUP reloads (counted for the metrics);
//! and, at exit, stopping the runtime and killing what commands left
//! behind. `check-config` is here too: it loads a config as the daemon
//! would.
//!
//! A daemon keeps only what is its own: the server its preflight, store
//! and listener, the agent its config channel's contents. `daemon` depends
//! on neither: each implements [`DaemonConfig`] for its config file and
//! wraps [`DaemonError`] in its own error.
//!
//! The life of a daemon: [`start`] (config, logging, runtime), then
//! [`Daemon::run`] its main future, which makes a [`Harness`] (metrics,
//! signals, the config channel), spawns the daemon's task with what
//! [`Launch`] hands it, calls [`Harness::ready`] once the task serves, and
//! ends in [`Harness::supervise`].

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, runtime::Runtime, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{self, ConfigError, ConfigFile, LogConfig, MetricsConfig, Source, reload::Changes},
    logging::{self, LogError, Logging},
    metrics::{Endpoint, Reloads},
    process::{cgroup, reaper},
    shutdown::{self, Signals},
    systemd,
};

mod sockets;

pub use sockets::{CONTACT, Listen, METRICS, Sockets};

/// sysexits' EX_CONFIG: the config is wrong; restarting will not help.
pub const EX_CONFIG: u8 = 78;

/// Why a daemon could not start or run, whichever daemon it is.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
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
    #[error("the server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("a second {0} stopped the drain short: what still ran was killed")]
    Forced(&'static str),
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
    #[error("cannot take the sockets systemd passed (socket activation): {0}")]
    Passed(#[source] std::io::Error),
    #[error(
        "the socket unit and the config disagree: systemd passed the socket {name:?} on \
         {passed}, but {key} is {configured}: make ListenStream= in contactd.socket and \
         {key} name the same address"
    )]
    SocketMismatch {
        key: &'static str,
        name: String,
        passed: SocketAddr,
        configured: SocketAddr,
    },
    #[error(
        "the socket unit and the config disagree: systemd passed {passed}, but none listens \
         on {configured}, which {key} names: add ListenStream={configured} to contactd.socket, \
         or make {key} one of those"
    )]
    SocketMissing {
        key: &'static str,
        configured: SocketAddr,
        passed: String,
    },
    #[error(
        "the socket unit and the config disagree: systemd passed the socket {name:?} on {addr}, \
         but no listen address in the config names it ({keys}): remove its ListenStream= from \
         contactd.socket, or set the config's address to it"
    )]
    SocketUnused {
        name: String,
        addr: SocketAddr,
        keys: String,
    },
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

impl DaemonError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            // Restarting will not help with these: systemd's
            // RestartPreventExitStatus=78 stops the restart loop.
            DaemonError::Config(_)
            | DaemonError::Logging(LogError::Filter { .. } | LogError::File { .. })
            | DaemonError::SocketMismatch { .. }
            | DaemonError::SocketMissing { .. }
            | DaemonError::SocketUnused { .. } => EX_CONFIG,
            // A port the daemon may never bind (below 1024 without the
            // capability) is the config's to change.
            DaemonError::Bind { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                EX_CONFIG
            }
            _ => 1,
        }
    }
}

/// A command's error, which may carry the harness's: what `main` and
/// [`Daemon::run`] need of it.
pub trait Failure: std::fmt::Display + From<DaemonError> {
    /// The harness's error, if this is one.
    fn daemon(&self) -> Option<&DaemonError>;
    /// The process exit code for this error.
    fn exit_code(&self) -> u8;
}

/// What the harness needs of a daemon's config file.
pub trait DaemonConfig: ConfigFile + std::fmt::Debug + Send + Sync + 'static {
    /// What the daemon's task follows: sent on its config channel at the
    /// start and after each reload.
    type Live: std::fmt::Debug + Send + Sync + 'static;
    /// The log settings.
    fn log(&self) -> &LogConfig;
    /// The metrics endpoint's settings.
    fn metrics(&self) -> &MetricsConfig;
    /// What the daemon's task is sent.
    fn live(&self) -> Self::Live;
    /// What a reload from `old` to `new` changes, and when each applies.
    fn changes(old: &Self, new: &Self) -> Changes;
    /// What of `new` a reload from `old` puts in force (all of it, unless
    /// the daemon holds some of it back until a restart).
    fn in_force(old: &Self, new: Self) -> Self
    where
        Self: Sized,
    {
        let _ = old;
        new
    }
}

/// `check-config`: prints the effective config of type `T` to stdout.
///
/// # Errors
/// Every problem in the file, as [`DaemonError::Config`].
pub fn check<T: ConfigFile + serde::Serialize>(source: &Source) -> Result<(), DaemonError> {
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
    crate::client::write_out(&config::to_toml(&config)).map_err(DaemonError::Output)
}

/// A daemon started: its logging and its runtime.
#[derive(Debug)]
pub struct Daemon {
    source: Source,
    logging: Arc<Logging>,
    runtime: Runtime,
    sockets: Sockets,
}

/// A daemon's start: its config from `source`, logging as that config
/// says, a line saying where the config came from, and the runtime to run
/// on.
///
/// # Errors
/// A config, logging or runtime failure.
pub fn start<T: DaemonConfig>(source: Source) -> Result<(T, Daemon), DaemonError> {
    // First, while this is the only thread: taking them unsets LISTEN_FDS.
    let sockets = Sockets::from_systemd()?;
    let (config, found) = source.load_or_default::<T>()?;
    let logging = Arc::new(logging::init(config.log())?);
    if found {
        tracing::info!(path = %source.path().display(), "loaded config");
    } else {
        tracing::info!(path = %source.path().display(), "no config file: using built-in defaults");
    }
    adopt_orphans();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let daemon = Daemon {
        source,
        logging,
        runtime,
        sockets,
    };
    Ok((config, daemon))
}

/// Makes the daemon the child subreaper of the commands it runs, so what
/// they leave outside their process group can still be killed, and finds
/// the cgroup its commands' cgroups go under (removing those a crash left).
fn adopt_orphans() {
    cgroup::start();
    if let Err(e) = reaper::become_subreaper() {
        tracing::warn!(
            "cannot become a child subreaper ({e}): processes a command starts outside \
             its process group may outlive it"
        );
    }
}

/// What a daemon's main future is given: where its config came from and
/// its logging, to make its [`Harness`] with.
#[derive(Debug)]
pub struct Context {
    source: Source,
    logging: Arc<Logging>,
    sockets: Sockets,
}

impl Daemon {
    /// Runs `main` on the runtime until it ends, logs its error, then stops
    /// the runtime. Logs are flushed after this, when the logging is
    /// dropped.
    ///
    /// # Errors
    /// `main`'s.
    pub fn run<E, F>(self, main: impl FnOnce(Context) -> F) -> Result<(), E>
    where
        E: Failure,
        F: Future<Output = Result<(), E>>,
    {
        let Daemon {
            source,
            logging,
            runtime,
            sockets,
        } = self;
        let result = runtime.block_on(main(Context {
            source,
            logging: Arc::clone(&logging),
            sockets,
        }));
        let forced = match &result {
            Err(e) => {
                tracing::error!("{e}");
                matches!(e.daemon(), Some(DaemonError::Forced(_)))
            }
            Ok(()) => false,
        };
        stop_runtime(runtime, forced);
        drop(logging);
        result
    }
}

/// Ends the runtime at exit, then kills any process a command left behind.
fn stop_runtime(runtime: Runtime, forced: bool) {
    if forced {
        // Drops every task now, so the commands' guards kill their groups
        // (the server's commands, the agent's handlers).
        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    } else {
        // Dropping thousands of closed connections one by one (freeing
        // their buffers) took 0.4 s at exit with 5,000 agents; the kernel
        // releases it all at once when the process exits.
        runtime.shutdown_background();
    }
    cgroup::end();
    reaper::sweep_all();
}

/// What the harness hands the daemon's task.
#[derive(Debug)]
pub struct Launch<L> {
    /// The config in force, replaced on each reload.
    pub config: watch::Receiver<Arc<L>>,
    /// Cancelled by the first SIGTERM or SIGINT: drain and stop.
    pub shutdown: CancellationToken,
    /// The metrics listener, if the config names one.
    pub metrics: Option<Endpoint>,
}

/// A running daemon's signals, config channel and reloads.
#[derive(Debug)]
pub struct Harness<T: DaemonConfig> {
    reloader: Reloader<T>,
    signals: Signals,
    shutdown: CancellationToken,
    /// Cancelled when the harness is done: stops the watchdog's pings.
    stop_watchdog: CancellationToken,
}

/// What a reload needs: where the config comes from, what is in force, and
/// where each part of a new one goes.
#[derive(Debug)]
struct Reloader<T: DaemonConfig> {
    source: Source,
    logging: Arc<Logging>,
    reloads: Reloads,
    /// The whole file in force, for the next reload to compare with.
    in_force: T,
    config_tx: watch::Sender<Arc<T::Live>>,
}

impl Context {
    /// The daemon's main listener, `key` in the config, at `addr`: the
    /// socket systemd passed for it under socket activation, else bound
    /// here with `backlog`.
    ///
    /// # Errors
    /// [`DaemonError::Bind`]; under socket activation, a socket unit that
    /// disagrees with the config ([`DaemonError::SocketMismatch`],
    /// [`DaemonError::SocketMissing`]).
    pub fn listener(
        &mut self,
        key: Listen,
        addr: SocketAddr,
        backlog: u32,
    ) -> Result<TcpListener, DaemonError> {
        match self.sockets.take(key, addr)? {
            Some(listener) => Ok(listener),
            None => {
                crate::net::bind(addr, backlog).map_err(|source| DaemonError::Bind { addr, source })
            }
        }
    }

    /// Binds the metrics endpoint `config` names (its series under
    /// `prefix`), installs the signal handlers and puts `config` on the
    /// channel the daemon's task follows. Under socket activation, every
    /// socket systemd passed must have been taken by then.
    ///
    /// # Errors
    /// [`DaemonError::Bind`] for the metrics port, [`DaemonError::Signals`],
    /// a socket unit that disagrees with the config.
    pub fn harness<T: DaemonConfig>(
        mut self,
        config: T,
        prefix: &str,
    ) -> Result<(Harness<T>, Launch<T::Live>), DaemonError> {
        let reloads = Reloads::default();
        let metrics = metrics_endpoint(
            config.metrics(),
            prefix,
            &self.logging,
            &reloads,
            &mut self.sockets,
        )?;
        self.sockets.finish()?;
        let signals = Signals::install().map_err(DaemonError::Signals)?;
        let (config_tx, config_rx) = watch::channel(Arc::new(config.live()));
        let shutdown = CancellationToken::new();
        let harness = Harness {
            reloader: Reloader {
                source: self.source,
                logging: self.logging,
                reloads,
                in_force: config,
                config_tx,
            },
            signals,
            shutdown: shutdown.clone(),
            stop_watchdog: CancellationToken::new(),
        };
        let launch = Launch {
            config: config_rx,
            shutdown,
            metrics,
        };
        Ok((harness, launch))
    }
}

/// Binds the metrics listener `config` names, if any, before the daemon
/// says it is ready (a port that cannot be had stops the start), with the
/// process' series registered under `prefix`. Its address is logged by
/// who serves it, after the daemon's main `serving … addr=` line (tools
/// such as examples/bench take the first `addr=` they see).
fn metrics_endpoint(
    config: &MetricsConfig,
    prefix: &str,
    logging: &Arc<Logging>,
    reloads: &Reloads,
    sockets: &mut Sockets,
) -> Result<Option<Endpoint>, DaemonError> {
    let Some(addr) = config.listen else {
        return Ok(None);
    };
    let listener = match sockets.take(METRICS, addr)? {
        Some(listener) => listener,
        None => {
            crate::metrics::http::bind(addr).map_err(|source| DaemonError::Bind { addr, source })?
        }
    };
    let mut registry = crate::metrics::registry(prefix, Some(Arc::clone(logging)));
    reloads.register(&mut registry);
    Ok(Some(Endpoint { listener, registry }))
}

impl<T: DaemonConfig> Harness<T> {
    /// The daemon's logging.
    pub fn logging(&self) -> &Arc<Logging> {
        &self.reloader.logging
    }

    /// Tells systemd the daemon is ready (`READY=1` with `status`), and
    /// starts the watchdog's pings if systemd asked for them; they go on
    /// until [`supervise`](Harness::supervise) returns.
    pub fn ready(&self, status: &str) {
        systemd::ready(status);
        if let Some(interval) = systemd::watchdog_interval() {
            tracing::info!(interval = %humantime::format_duration(interval), "systemd watchdog enabled");
            tokio::spawn(systemd::watchdog(interval, self.stop_watchdog.clone()));
        }
    }

    /// Runs the daemon's `task` under the process's signals until it ends
    /// ([`shutdown::supervise`]): SIGHUP reloads the config, then `READY=1`
    /// with `status`.
    ///
    /// # Errors
    /// [`DaemonError::Forced`] after a second shutdown signal,
    /// [`DaemonError::Join`] if the task panicked.
    pub async fn supervise<R>(
        self,
        task: &mut JoinHandle<R>,
        status: &str,
    ) -> Result<R, DaemonError> {
        let Harness {
            mut reloader,
            mut signals,
            shutdown,
            stop_watchdog,
        } = self;
        let _stop_watchdog = stop_watchdog.drop_guard();
        let stopped = shutdown::supervise(task, &mut signals, &shutdown, status, || {
            reloader.reload();
        });
        match stopped.await? {
            shutdown::Ended::Done(result) => Ok(result),
            shutdown::Ended::Forced(signal) => Err(DaemonError::Forced(signal)),
        }
    }
}

impl<T: DaemonConfig> Reloader<T> {
    /// Re-reads the config and applies it: the log settings here, the rest
    /// by the daemon's task as its channel changes. What changed, and what
    /// of it waits for a restart (or the agent's next connection), is
    /// [`Changes`]'s to say, logged here once. An invalid file leaves the
    /// current config in force.
    fn reload(&mut self) {
        let Some(new) = self.source.reload::<T>() else {
            self.reloads.failed.inc();
            return;
        };
        self.reloads.applied.inc();
        let changes = T::changes(&self.in_force, &new);
        let new = T::in_force(&self.in_force, new);
        if let Err(e) = self.logging.apply(new.log()) {
            tracing::error!("config reload: {e}; keeping the current log settings");
        }
        self.config_tx.send_replace(Arc::new(new.live()));
        self.in_force = new;
        changes.log(self.source.path());
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Error, ErrorKind};

    use super::*;

    /// 78 is for what only the config can fix: systemd's
    /// RestartPreventExitStatus=78 must not stop a restart that could help.
    #[test]
    fn only_what_the_config_must_fix_exits_78() {
        let bind = |kind| DaemonError::Bind {
            addr: "127.0.0.1:80".parse().unwrap(),
            source: Error::from(kind),
        };
        assert_eq!(bind(ErrorKind::PermissionDenied).exit_code(), EX_CONFIG);
        assert_eq!(bind(ErrorKind::AddrInUse).exit_code(), 1);
        assert_eq!(DaemonError::Forced("SIGTERM").exit_code(), 1);
        assert_eq!(DaemonError::Signals(Error::other("x")).exit_code(), 1);
        assert_eq!(DaemonError::Runtime(Error::other("x")).exit_code(), 1);
    }
}
