//! contactd: a gRPC daemon that pushes tasks to a fleet of agents and
//! collects their status and results.
//!
//! The modules, in layers: each imports only from its own layer and the
//! ones below it, never in a circle (`tests/it/layers.rs` fences this, and
//! README's "How the code is laid out" says the same).
//!
//! 0. **Leaves**, importing nothing of ours:
//!    [`clock`] (unix milliseconds), [`net`] (listening sockets with our
//!    backlog; the small HTTP listeners' bounded accept loop), [`proto`]
//!    (generated gRPC code, the broadcast wire frames),
//!    [`untrusted`] (caller input escaped and cut; log budgets),
//!    [`systemd`] (sd-notify, socket activation), [`model`] (a task and its state, ack
//!    cursors, the records the store keeps), [`labels`] (what an agent
//!    is), [`selector`] (Kubernetes-style label selectors), [`schedule`]
//!    (job schedules: `every` and `cron` in a zone, what is due when);
//!    `defects` (deliberate defects for tests, only in debug builds with
//!    the `test-defects` feature).
//! 1. **Settings and identities**: [`config`] (typed config, every problem
//!    at once, the reload rule table), [`auth`] (tokens, who is calling).
//! 2. **Infrastructure**: [`backoff`] (reconnect delays), [`tls`] (configs
//!    from PEM files, identities, the `tls` PKI), [`logging`] (rotating
//!    files, reloadable filter), [`metrics`] (Prometheus and `/metrics`),
//!    [`process`] (bounded child processes), [`remote_cmd`] (remoteCMD's
//!    allow-list), [`shutdown`] (signals as events).
//! 3. **Durable state**: [`store`] (SQLite, PostgreSQL or memory, behind
//!    one trait; group commit on a writer thread).
//! 4. **The core, and the agent**: [`tasks`] (the [`Broker`](tasks::Broker)
//!    that owns task state, the hub, the queue, cursors, a stream's feed,
//!    the generator); [`agent`] (the reconnect loop, sessions, handlers).
//! 5. **Transport**: [`server`] (the Contact service behind its gate,
//!    health, reflection, the admin API, the web console, callers,
//!    listener, metrics).
//! 6. **Commands**: [`cli`] (clap, no logic), [`client`] (`cmd`, `health`
//!    and the admin commands), [`daemon`] (the harness `serve` and `agent`
//!    share), [`app`] (the commands behind the CLI), [`manual`]
//!    (completions and man pages).

pub mod agent;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
#[cfg(all(feature = "test-defects", debug_assertions))]
pub mod defects;
pub mod labels;
pub mod logging;
pub mod manual;
pub mod metrics;
pub mod model;
pub mod net;
pub mod process;
pub mod proto;
pub mod remote_cmd;
pub mod schedule;
pub mod selector;
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
