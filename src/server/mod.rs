//! The server, a transport over the broker: it binds nothing itself (it
//! takes a bound listener; the web console's it binds only when not given
//! one), serves the Contact service behind its gate, health, reflection,
//! the admin API and the web console, translating calls into the
//! broker's terms ([`crate::tasks::Broker`] decides what happens to a task),
//! follows config reloads and shuts down in order when its token is
//! cancelled. Files: `state.rs` (what handlers share), `policy.rs` (rules,
//! tokens, TLS), `reload.rs`, `gate.rs` → `contact.rs`, `admin.rs`,
//! `callers.rs`, `listener.rs` (with `admission.rs`), `health.rs`, `metrics.rs`, `counters.rs`
//! and `web/` (the operators' web console, over the admin service).
//!
//! Shutdown order, one log line per phase: health NOT_SERVING → stop
//! accepting and end every open stream with UNAVAILABLE → let in-flight
//! calls finish within `server.grace_period` (once none is open, the
//! connections get a moment to flush and are closed, without waiting for
//! every client to acknowledge the GOAWAY) → kill remote commands still
//! running and wait briefly for their answers → return.

mod admin;
mod admin_conn;
mod admission;
mod callers;
mod contact;
mod counters;
mod gate;
mod health;
mod listener;
mod metrics;
mod outbox;
mod policy;
mod reload;
mod state;
mod web;

use std::{sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::Status;
use tonic_health::ServingStatus;

pub use callers::{CallGuard, Caller, Callers};
pub use listener::ConnInfo;
pub use policy::Policy;

use self::state::State;
use crate::{
    auth::TokenError,
    config::{Config, ConnectionCap, ServerConfig},
    proto::CONTACT_DESCRIPTOR_SET,
    store::{self, StoreError},
    tasks::Broker,
};

/// After the grace period, how long killed commands get to answer before
/// the remaining connections are dropped.
const AFTER_GRACE: Duration = Duration::from_secs(2);

/// Once no call is open at shutdown, how long connections get to flush what
/// they have (the streams' final UNAVAILABLE) before they are closed: into
/// the kernel's send buffers, which deliver it after the process exits. Not
/// longer: the next process (a restart) starts only once this one has
/// exited, and its agents are waiting (500 ms here was a third of the
/// restart scenario's exit with 10,000 agents).
const FLUSH_IDLE: Duration = Duration::from_millis(100);

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read the listener's address: {0}")]
    Listener(#[source] std::io::Error),
    #[error("reflection descriptors are invalid: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("serving failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("server.auth_token_file / server.tokens_file: {0}")]
    Token(#[source] TokenError),
    #[error("server.tls: {0}")]
    Tls(#[source] crate::tls::TlsError),
    #[error("{0}")]
    Store(#[source] StoreError),
    #[error("web.listen: {0}")]
    Web(#[source] std::io::Error),
}

impl ServerError {
    /// Whether the config (or a file it names) is at fault: restarting
    /// will not help until it is fixed.
    pub fn is_config(&self) -> bool {
        match self {
            ServerError::Token(_) | ServerError::Tls(_) => true,
            ServerError::Store(e) => e.is_config(),
            _ => false,
        }
    }
}

/// The status every stream ends with at shutdown, with a retry hint of 0:
/// the agents come back at once (with their jitter) rather than after a
/// failure backoff, to the next process (which, under socket activation,
/// finds their connections waiting in the socket's backlog).
fn shutting_down() -> Status {
    crate::proto::with_retry_hint(Status::unavailable("server shutting down"), Duration::ZERO)
}

/// Reads the credentials `config` names (token files, TLS files) as `run`
/// will, so that a problem with them stops the start before the server
/// says it is ready; hand the policy to [`run`] in [`Serve::policy`] so
/// that the files are read once.
///
/// # Errors
/// [`ServerError::Token`] or [`ServerError::Tls`].
pub fn preflight(config: &Config) -> Result<Policy, ServerError> {
    Policy::load(config)
}

/// Opens the task store `config` names and reads what it holds (before
/// the server says it is ready: a store that cannot be used stops the start).
///
/// # Errors
/// [`ServerError::Store`].
pub fn open_store(config: &Config) -> Result<store::Opened, ServerError> {
    Broker::open_store(config).map_err(ServerError::Store)
}

/// What [`run`] serves with. [`Serve::new`] gives the three a server
/// cannot do without; the rest it makes itself when they are `None`.
#[derive(Debug)]
pub struct Serve {
    /// The Contact port, bound by the caller (tests bind 127.0.0.1:0).
    pub listener: TcpListener,
    /// The config in force, and every reloaded one after it.
    pub config: watch::Receiver<Arc<Config>>,
    /// Cancelled to shut down (SIGTERM).
    pub shutdown: CancellationToken,
    /// The task store, opened by [`open_store`] (`None`: `run` opens it).
    pub store: Option<store::Opened>,
    /// The policy read by [`preflight`] (`None`: `run` reads it).
    pub policy: Option<Policy>,
    /// Serves `GET /metrics` too.
    pub metrics: Option<crate::metrics::Endpoint>,
    /// The web console's port, if bound by the caller (tests bind
    /// 127.0.0.1:0); `None`: `run` binds `[web] listen`, if set.
    pub web: Option<TcpListener>,
    /// Sent once everything the server offers is up: the admin socket
    /// bound, health SERVING, the listener served. `contactd serve` tells
    /// systemd READY=1 then, and not before, so that whatever is ordered
    /// after the unit (or a script that waited for it) finds every socket
    /// answering. If serving cannot start, it is dropped unsent and the
    /// error returned. Nobody needs to wait for it: connections wait in
    /// the listener's backlog until served.
    pub started: Option<oneshot::Sender<()>>,
}

impl Serve {
    /// Serving on `listener` with `config` until `shutdown`; the store
    /// opened and the policy read by `run`.
    pub fn new(
        listener: TcpListener,
        config: watch::Receiver<Arc<Config>>,
        shutdown: CancellationToken,
    ) -> Serve {
        Serve {
            listener,
            config,
            shutdown,
            store: None,
            policy: None,
            metrics: None,
            web: None,
            started: None,
        }
    }
}

/// Serves until `serve.shutdown` is cancelled, following the config sent
/// on `serve.config`, with the task store the config names.
///
/// # Errors
/// [`ServerError`] when serving cannot start or fails.
pub async fn run(serve: Serve) -> Result<(), ServerError> {
    let Serve {
        listener,
        config,
        shutdown,
        store,
        policy,
        metrics: endpoint,
        web,
        started,
    } = serve;
    let initial = Arc::clone(&config.borrow());
    let local = listener.local_addr().map_err(ServerError::Listener)?;
    let policy = match policy {
        Some(policy) => policy,
        None => Policy::load(&initial)?,
    };
    let opened = match store {
        Some(opened) => opened,
        None => open_store(&initial)?,
    };
    crate::proto::codec::use_small_buffers();
    let (broker, roster) = Broker::open(&initial, opened);
    let closing = CancellationToken::new();
    let state = Arc::new(State {
        broker: Arc::clone(&broker),
        callers: {
            let callers = Callers::new(
                initial.server.max_callers,
                initial.server.max_status_size.as_u64() as usize,
                closing.clone(),
            );
            callers.restore(roster);
            callers
        },
        policy,
        config: config.clone(),
        closing,
        kill: CancellationToken::new(),
        counters: Arc::default(),
    });
    if broker.is_shared() {
        // The fleet view of the other servers: who is connected here.
        let broker = Arc::clone(&broker);
        state
            .callers
            .set_presence(callers::Presence(Arc::new(move |caller, connected| {
                broker.record_presence(&caller.agent(), connected);
            })));
    }
    let tracker = TaskTracker::new();
    if let Some(reap) = broker.reap(shutdown.clone()) {
        tracker.spawn(reap);
    }
    let admin = admin::start(&initial.admin, &state, &tracker);
    web::start(&initial, &state, web, &tracker).map_err(ServerError::Web)?;
    tracker.spawn(restart_on_panic("the task generator", {
        let (broker, config, shutdown) = (Arc::clone(&broker), config.clone(), shutdown.clone());
        move || broker.generate(config.clone(), shutdown.clone())
    }));
    tracker.spawn(restart_on_panic("the job scheduler", {
        let (jobs, shutdown) = (Arc::clone(broker.jobs()), shutdown.clone());
        move || Arc::clone(&jobs).run(shutdown.clone())
    }));
    let housekeeping = tokio::spawn(housekeep(Arc::clone(&state), shutdown.clone()));
    tracker.spawn(restart_on_panic("applying config reloads", {
        let (state, config, shutdown) = (Arc::clone(&state), config.clone(), shutdown.clone());
        let built_from = Arc::clone(&initial);
        move || {
            reload::follow_config(
                Arc::clone(&state),
                config.clone(),
                Arc::clone(&built_from),
                shutdown.clone(),
            )
        }
    }));
    tracker.close();

    let reporter = tonic_health::server::HealthReporter::new();
    let router = router(&initial, &state, &reporter)?;
    let max_connections = connection_cap(&initial.server);
    let limits = listener::Limits {
        max_connections,
        max_connections_per_address: initial
            .server
            .max_connections_per_address
            // Three quarters: a quarter stays for the other addresses.
            .unwrap_or(max_connections - max_connections / 4)
            .min(max_connections),
        max_handshakes: initial.server.max_handshakes,
        max_handshakes_per_address: initial
            .server
            .max_handshakes_per_address
            .min(initial.server.max_handshakes),
        handshake_timeout: initial.server.handshake_timeout,
        accept_rate: initial.server.accept_rate,
        accept_burst: initial.server.accept_burst,
        socket_send_buffer: initial
            .server
            .socket_send_buffer
            .map(|size| usize::try_from(size.as_u64()).unwrap_or(usize::MAX)),
    };
    let incoming = listener::incoming(
        listener,
        limits,
        state.policy.tls.clone(),
        state.closing.clone(),
        Arc::clone(&state.counters),
    );
    let serve =
        router.serve_with_incoming_shutdown(incoming, state.closing.clone().cancelled_owned());
    tokio::pin!(serve);
    // Started: the admin socket is bound (above) and the Contact listener
    // (bound by the caller) is served from the first poll of `serve` below,
    // its early connections waiting in the backlog. Anything else the server
    // comes to offer (a metrics listener) is bound before this point, so that
    // health SERVING and READY=1 keep meaning "all of it answers".
    health::set_all(&reporter, ServingStatus::Serving).await;
    if broker.is_shared() {
        tokio::spawn(follow_database(
            Arc::clone(&broker),
            reporter.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(
        addr = %local,
        tls = state.policy.tls.is_some(),
        identities = initial.has_identities(),
        "serving Contact, health and reflection"
    );
    // After the line above (its addr= is the one tools look for). Served
    // through the drain (contactd_serving says 0 then), stopped only
    // before the last wait.
    let metrics_stop = CancellationToken::new();
    let _metrics_stop = metrics_stop.clone().drop_guard();
    if let Some(endpoint) = endpoint {
        let collector = metrics::ServerCollector::new(&state);
        tracker.spawn(endpoint.serve(&initial.metrics, collector, metrics_stop.clone()));
    }
    if let Some(started) = started {
        let _ = started.send(());
    }
    tokio::select! {
        result = &mut serve => return result.map_err(ServerError::Serve),
        () = shutdown.cancelled() => {}
    }
    tracing::info!("shutting down: health is NOT_SERVING");
    health::set_all(&reporter, ServingStatus::NotServing).await;
    // Before the streams end, or each end would hand its queue tasks to a
    // stream still open.
    state.broker.stop_handing_out();
    state.closing.cancel();
    let grace = state.config.borrow().server.grace_period;
    tracing::info!(grace = %humantime::format_duration(grace), "stopped accepting; ended open streams; waiting for in-flight calls");
    let result = tokio::select! {
        result = &mut serve => result,
        // Without this, the serve future waits for every client to answer
        // the GOAWAY's ping and close (with 5,000 agents that took over a
        // second, and a dead peer holds it for the whole grace period), when
        // there is nothing left to deliver but what is being flushed.
        () = state.callers.no_open_calls() => {
            match tokio::time::timeout(FLUSH_IDLE, &mut serve).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::info!("no call open: closing the remaining connections");
                    Ok(())
                }
            }
        }
        () = tokio::time::sleep(grace) => {
            tracing::warn!("grace period over: killing remote commands still running");
            state.kill.cancel();
            match tokio::time::timeout(AFTER_GRACE, &mut serve).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("connections still open after the grace period: closing them");
                    Ok(())
                }
            }
        }
    };
    metrics_stop.cancel();
    tracker.wait().await;
    admin::remove_socket(admin.as_ref());
    // After every stream ended: the last acks and cursors are committed.
    let _ = housekeeping.await;
    state.broker.close(state.callers.roster_changes()).await;
    tracing::info!("server stopped");
    result.map_err(ServerError::Serve)
}

/// A shared store: follows whether its database answers, one log line per
/// change. Queue mode cannot send a task without claiming it there, so its
/// health is NOT_SERVING while it does not; broadcast mode goes on
/// delivering the tasks it retains (new ones cannot be published).
async fn follow_database(
    broker: Arc<Broker>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut reachable = broker.reachable();
    let mut was_up = *reachable.borrow_and_update();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = reachable.changed() => if changed.is_err() { return },
        }
        let up = *reachable.borrow_and_update();
        if shutdown.is_cancelled() {
            return;
        }
        if std::mem::replace(&mut was_up, up) == up {
            continue;
        }
        match (broker.is_queue(), up) {
            (true, true) => {
                health::set_all(&reporter, ServingStatus::Serving).await;
                tracing::info!("the task store's database answers again: health is SERVING");
            }
            (true, false) => {
                health::set_all(&reporter, ServingStatus::NotServing).await;
                tracing::warn!(
                    "the task store's database is unreachable: health is NOT_SERVING (queue mode \
                     sends no task it cannot claim); reconnecting"
                );
            }
            (false, true) => {
                tracing::info!("the task store's database answers again: tasks can be published");
            }
            (false, false) => tracing::warn!(
                "the task store's database is unreachable: delivering the tasks held in memory, \
                 none can be published until it answers (health stays SERVING); reconnecting"
            ),
        }
    }
}

/// Largest health or reflection request: a service or symbol name.
const MAX_SMALL_MESSAGE: usize = 4096;

fn router(
    config: &Config,
    state: &Arc<State>,
    reporter: &tonic_health::server::HealthReporter,
) -> Result<tonic::transport::server::Router, ServerError> {
    let s = &config.server;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(CONTACT_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(ServerError::Reflection)?
        .max_decoding_message_size(MAX_SMALL_MESSAGE);
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServerError::Reflection)?
        .max_decoding_message_size(MAX_SMALL_MESSAGE);
    let window = |size: bytesize::ByteSize| u32::try_from(size.as_u64()).unwrap_or(u32::MAX);
    Ok(tonic::transport::Server::builder()
        .max_concurrent_streams(s.max_concurrent_streams)
        .initial_connection_window_size(window(s.connection_window))
        .initial_stream_window_size(window(s.stream_window))
        .http2_keepalive_interval(Some(s.keepalive_interval))
        .http2_keepalive_timeout(Some(s.keepalive_timeout))
        .add_service(gate::Gate::new(state))
        .add_service(
            health::service(reporter, state.closing.clone())
                .max_decoding_message_size(MAX_SMALL_MESSAGE),
        )
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

/// `server.max_connections` as the open-files limit allows, said once.
fn connection_cap(server: &ServerConfig) -> usize {
    match server.connection_cap(crate::net::open_files_limit()) {
        ConnectionCap::AsSet(max) => max,
        ConnectionCap::Sized { max, open_files } => {
            tracing::info!(
                max_connections = max,
                open_files,
                "server.max_connections is at its default: sized to the open-files limit, less \
                 handshakes and the daemon's own files (raise LimitNOFILE for more)"
            );
            max
        }
        ConnectionCap::AboveLimit { max, open_files } => {
            // Not fatal: the cap still bounds connections, accept errors pause.
            tracing::warn!(
                max_connections = max,
                open_files,
                "server.max_connections is above the open-files limit: connections beyond it \
                 fail to be accepted (raise LimitNOFILE, or lower server.max_connections)"
            );
            max
        }
    }
}

/// Saves changed cursors every second; deletes what retention no longer
/// keeps, and forgets agents long gone, every ten.
async fn housekeep(state: Arc<State>, shutdown: CancellationToken) {
    const EVERY: Duration = Duration::from_secs(1);
    const PRUNE_EVERY: u32 = 10;
    let mut ticks = 0u32;
    while shutdown
        .run_until_cancelled(tokio::time::sleep(EVERY))
        .await
        .is_some()
    {
        state.broker.save_cursors();
        ticks += 1;
        if !ticks.is_multiple_of(PRUNE_EVERY) {
            continue;
        }
        let connected: Vec<Arc<str>> = state
            .callers
            .list()
            .into_iter()
            .filter(|caller| caller.named && caller.connected())
            .map(|caller| Arc::clone(&caller.id))
            .collect();
        let forget_before_ms = state.broker.forget_before_ms();
        state.callers.forget_before(forget_before_ms);
        let roster = state.callers.roster_changes();
        state
            .broker
            .housekeep(&connected, roster, forget_before_ms)
            .await;
        let _ = tokio::task::spawn_blocking(release_freed_memory).await;
    }
}

/// Gives the heap glibc holds free back to the kernel.
///
/// glibc keeps what is freed in its arenas: after 2,000 streams of peers
/// that never read their replies had gone, 39 of the 43 MB they had cost
/// stayed resident for good (1.24 GB after a larger attack). `malloc_trim`
/// returns the free pages of every arena; every ten seconds it costs well
/// under a millisecond with nothing to return, and a few with hundreds of
/// megabytes. (A different allocator would return memory by itself, at the
/// price of a C build and of re-measuring every benchmark.)
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own arenas,
    // under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the task `make` builds, and a new one each time it panics: a
/// reload that cannot be applied must not end reloading (or generation)
/// for good, leaving "config reloaded" in the log while nothing applies.
async fn restart_on_panic<F, Fut>(what: &'static str, make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(make()).await {
            Err(e) if e.is_panic() => {
                tracing::error!("{what} failed (a bug: please report it): {e}; starting it again");
                // Not in a tight loop, should it fail again at once.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => return,
        }
    }
}
