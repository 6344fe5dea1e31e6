//! contactd: a gRPC daemon that pushes tasks to a fleet of agents and
//! collects their status and results.
//!
//! Map of the modules:
//!
//! - [`cli`]: the command line (clap), no logic.
//! - [`config`]: typed config, loading with every problem at once, defaults.
//! - [`logging`]: the tracing subscriber, rotating log files, reload handle.
//! - [`metrics`]: Prometheus metrics and the small HTTP server of `/metrics`.
//! - [`shutdown`]: signals turned into shutdown and reload events.
//! - [`proto`]: generated gRPC code and the reflection descriptors.
//! - [`auth`]: tokens on Contact calls: a shared secret, or named tokens
//!   that give an identity and a role.
//! - [`tls`]: TLS configs from PEM files, certificate identities, and the
//!   `tls init`/`tls issue` PKI.
//! - [`server`]: `run(listener, config, shutdown)`: the Contact service,
//!   health, reflection, the caller registry, and the gate that identifies
//!   callers before any body is read.
//! - [`tasks`]: task templates, the hub that fans tasks out, the generator.
//! - [`untrusted`]: caller input escaped and cut for logs and statuses;
//!   log budgets.
//! - [`remote_cmd`]: remoteCMD's allow-list and limits.
//! - [`process`]: running a command bounded (own process group, output
//!   cap, timeout, kill) and reaping what it leaves; for remoteCMD and the
//!   agent's handlers.
//! - [`systemd`]: sd-notify readiness, reload, stopping, watchdog.
//! - [`probe`]: the `health` command (grpc_health_probe's exit codes).
//! - [`cmd`]: the `cmd` command: remoteCMD calls, several at once.
//! - [`ctl`]: `task submit`, `agents`, `tasks`: admin API clients.
//! - [`manual`]: shell completions and man pages from the clap definitions.
//! - [`daemon`]: the harness `serve` and `agent` share: start-up, signals,
//!   systemd readiness and watchdog, reloads, the metrics endpoint, exit.
//! - [`app`]: the commands behind the CLI, wiring the above.
//! - [`agent`]: `run(config, shutdown)`: the agent's reconnect loop,
//!   sessions, task handlers, dedup; and the `agent` command.

pub mod agent;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod logging;
pub mod manual;
pub mod metrics;
pub mod model;
pub mod net;
pub mod probe;
pub mod process;
pub mod proto;
pub mod remote_cmd;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod systemd;
pub mod tasks;
pub mod tls;
pub mod untrusted;

/// `N` bytes from the operating system's random source, for what must not
/// be guessed (tokens, the server's epoch). Like `rand::random`, it panics
/// only if the kernel has no random source at all.
#[must_use]
pub fn secret_random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out)
        .expect("the operating system's random source failed");
    out
}

/// An error and its sources on one line, `outer: inner: cause` (tonic's
/// transport errors say only "transport error" by themselves). A source
/// whose text the line already ends with is not repeated.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}
