//! Signals, turned into events: SIGTERM and SIGINT ask for shutdown, SIGHUP
//! for a config reload.

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Stop (the name of the signal that asked).
    Shutdown(&'static str),
    /// Re-read the config.
    Reload,
}

/// The process's signal handlers, installed once.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs handlers for SIGTERM, SIGINT and SIGHUP. From then on these
    /// signals no longer kill the process; they are delivered here.
    ///
    /// # Errors
    /// When a handler cannot be installed.
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next event.
    pub async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Shutdown("SIGTERM"),
            _ = self.int.recv() => Event::Shutdown("SIGINT"),
            _ = self.hup.recv() => Event::Reload,
        }
    }
}

/// How a supervised task ended.
#[derive(Debug)]
pub enum Ended<T> {
    /// It returned this.
    Done(T),
    /// A second shutdown signal (its name) came during the drain: the task
    /// is abandoned. The caller drops the runtime, so every task's guards
    /// run (commands' process groups are killed), then exits with status 1.
    Forced(&'static str),
}

/// Runs a daemon's main task under the process's signals until it ends:
/// SIGHUP calls `reload` between systemd's `RELOADING=1` and `READY=1`
/// (with `status`); SIGTERM or SIGINT notify `STOPPING=1` and cancel
/// `shutdown`, then the task drains; a second such signal returns
/// [`Ended::Forced`] at once. (Not `process::exit`, which would run no
/// destructor: commands would outlive the daemon and logs go unflushed.)
///
/// A panic in `reload` is logged and the config in force stays: the next
/// SIGHUP tries again.
///
/// # Errors
/// The task's panic or cancellation.
pub async fn supervise<T>(
    task: &mut tokio::task::JoinHandle<T>,
    signals: &mut Signals,
    shutdown: &tokio_util::sync::CancellationToken,
    status: &str,
    mut reload: impl FnMut(),
) -> Result<Ended<T>, tokio::task::JoinError> {
    loop {
        tokio::select! {
            result = &mut *task => return result.map(Ended::Done),
            event = signals.next() => match event {
                Event::Reload => {
                    crate::systemd::reloading();
                    let reloaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut reload));
                    if reloaded.is_err() {
                        tracing::error!(
                            "config reload failed (a bug: please report it); the config in force \
                             stays, and the next reload tries again"
                        );
                    }
                    crate::systemd::ready(status);
                }
                Event::Shutdown(signal) => {
                    tracing::info!(signal, "shutdown requested");
                    crate::systemd::stopping();
                    shutdown.cancel();
                    break;
                }
            },
        }
    }
    loop {
        tokio::select! {
            result = &mut *task => return result.map(Ended::Done),
            event = signals.next() => if let Event::Shutdown(signal) = event {
                tracing::warn!(signal, "second shutdown signal: stopping now, killing what still runs");
                return Ok(Ended::Forced(signal));
            },
        }
    }
}
