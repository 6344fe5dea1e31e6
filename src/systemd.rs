//! systemd's notify protocol: readiness, reloads, stopping, status lines and
//! watchdog pings. Every call is a no-op when `NOTIFY_SOCKET` is unset, so
//! callers never check whether they run under systemd. And socket
//! activation: the listening sockets systemd passes ([`listen_sockets`]).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// `READY=1` with a status line: start-up (or a reload) is complete.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` in the same datagram, as
/// `Type=notify-reload` requires; follow with [`ready`].
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!("cannot read the monotonic clock for systemd: {e}"),
    }
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// A `STATUS=` line, shown by `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Pings the watchdog at half its interval until `stop` is cancelled. This
/// runs as a task on the runtime, so a wedged runtime stops the pings and
/// systemd restarts the service.
pub async fn watchdog(interval: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(interval / 2);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while stop.run_until_cancelled(ticks.tick()).await.is_some() {
        send(&[NotifyState::Watchdog]);
    }
}

/// Variables a child process must not inherit: they would let it speak to
/// systemd as if it were contactd.
pub const CHILD_ENV_REMOVE: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// A listening TCP socket systemd passed (socket activation), with the
/// name its socket unit gave it (`FileDescriptorName=`, by default the
/// socket unit's name).
#[derive(Debug)]
pub struct Passed {
    pub name: String,
    pub listener: std::net::TcpListener,
}

/// The listening sockets systemd passed to this process, by sd_listen_fds'
/// rules: `LISTEN_PID` must be this process (else they were meant for
/// another, and none is taken), `LISTEN_FDS` of them from fd 3, named by
/// `LISTEN_FDNAMES` (`unknown` without it). Empty without socket
/// activation. Each is checked to be a TCP socket and made close-on-exec,
/// so no command the daemon runs inherits it.
///
/// Call it before any other thread starts: it unsets `LISTEN_FDS` and
/// `LISTEN_PID`.
///
/// # Errors
/// Malformed variables, or a passed descriptor that is not a TCP socket.
pub fn listen_sockets() -> std::io::Result<Vec<Passed>> {
    use std::io::{Error, ErrorKind};
    // sd-notify applies sd_listen_fds' rules (LISTEN_PID first); listenfd
    // then takes each descriptor after checking its type, so that no
    // `unsafe` is needed here to own a raw descriptor. The count first:
    // sd-notify 0.5 reads the names even when LISTEN_PID is another
    // process's, and then finds them one too many.
    if sd_notify::listen_fds()?.len() == 0 {
        return Ok(Vec::new());
    }
    let names: Vec<String> = sd_notify::listen_fds_with_names()?
        .map(|(_, name)| name)
        .collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() != names.len() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "LISTEN_FDS says {} sockets, but {} can be taken",
                names.len(),
                fds.len()
            ),
        ));
    }
    names
        .into_iter()
        .enumerate()
        .map(|(index, name)| {
            let listener = fds
                .take_tcp_listener(index)
                .map_err(|e| {
                    Error::new(
                        e.kind(),
                        format!("socket {index} ({name}) from systemd: {e} (ListenStream= makes TCP sockets)"),
                    )
                })?
                .ok_or_else(|| Error::other(format!("socket {index} ({name}) was already taken")))?;
            Ok(Passed { name, listener })
        })
        .collect()
}
