//! The server: binds nothing itself (it takes a bound listener), serves the
//! Contact service with health and reflection, follows config reloads and
//! shuts down in order when its token is cancelled.
//!
//! Shutdown order, one log line per phase: health NOT_SERVING → stop
//! accepting and end every open stream with UNAVAILABLE → let in-flight
//! calls finish within `server.grace_period` (once none is open, the
//! connections get a moment to flush and are closed, without waiting for
//! every client to acknowledge the GOAWAY) → kill remote commands still
//! running and wait briefly for their answers → return.

mod admin;
mod callers;
mod contact;
mod delivery;
mod gate;
mod health;
mod history;
mod listener;
mod metrics;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use parking_lot::RwLock;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::Status;
use tonic_health::ServingStatus;

pub use callers::{CallGuard, Caller, Callers};
pub use listener::ConnInfo;

use crate::{
    auth::{TokenError, Verifier},
    config::{Config, DeliveryMode, ServerConfig, TasksConfig, reload::Changes},
    proto::CONTACT_DESCRIPTOR_SET,
    remote_cmd::Runner,
    store::{self, Store, StoreError},
    tasks::{
        Cursors, Hub, generator,
        queue::{self, Queue},
    },
};

/// After the grace period, how long killed commands get to answer before
/// the remaining connections are dropped.
const AFTER_GRACE: Duration = Duration::from_secs(2);

/// Once no call is open at shutdown, how long connections get to flush what
/// they have (the streams' final UNAVAILABLE) before they are closed.
const FLUSH_IDLE: Duration = Duration::from_millis(500);

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

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct State {
    /// The tasks agents receive.
    pub(crate) hub: Arc<Hub>,
    /// The store's random id (kept across restarts by a durable store; new
    /// at each start with the memory store), sent with every task (`ServerMsg.epoch`)
    /// so acks of tasks from an earlier run can be told apart.
    pub(crate) epoch: u64,
    /// Queue mode's dispatcher; `None` in broadcast mode.
    pub(crate) queue: Option<Arc<Queue>>,
    /// Where tasks, claims, acks and cursors are kept.
    pub(crate) store: Store,
    /// Broadcast mode: every named agent's ack cursor.
    pub(crate) cursors: Cursors,
    /// Who is calling and what they last reported.
    pub(crate) callers: Callers,
    /// Acks of cancelled tasks (from agents that had them), ignored.
    pub(crate) cancelled_acks: std::sync::atomic::AtomicU64,
    /// Counts of rare events, for the metrics.
    pub(crate) counters: metrics::Counters,
    /// Remote command rules; replaced whole on reload.
    runner: RwLock<Arc<Runner>>,
    /// The tokens Contact calls may carry; re-read on reload.
    pub(crate) auth: RwLock<Verifier>,
    /// The TLS config new connections get; re-read on reload.
    tls: listener::TlsConfig,
    /// The config in force.
    pub(crate) config: watch::Receiver<Arc<Config>>,
    /// Cancelled once health says NOT_SERVING: streams end, accepting stops.
    pub(crate) closing: CancellationToken,
    /// Cancelled when the grace period is over: running commands are killed.
    pub(crate) kill: CancellationToken,
}

impl State {
    fn runner(&self) -> Arc<Runner> {
        Arc::clone(&self.runner.read())
    }
}

/// The status every stream ends with at shutdown.
fn shutting_down() -> Status {
    Status::unavailable("server shutting down")
}

/// Reads the credentials `config` names (token files, TLS files) as `run`
/// will, so that a problem with them stops the start before the server
/// says it is ready.
///
/// # Errors
/// [`ServerError::Token`] or [`ServerError::Tls`].
pub fn preflight(config: &Config) -> Result<(), ServerError> {
    verifier(&config.server).map_err(ServerError::Token)?;
    if let Some(tls) = &config.server.tls {
        crate::tls::server_config(tls).map_err(ServerError::Tls)?;
    }
    Ok(())
}

/// Opens the task store `config` names and reads what it holds (before
/// the server says it is ready: a store that cannot be used stops the start).
///
/// # Errors
/// [`ServerError::Store`].
pub fn open_store(config: &Config) -> Result<store::Opened, ServerError> {
    let queue_mode = config.tasks.mode == DeliveryMode::Queue;
    let opened = store::open(
        &config.store,
        &config.server.resolved_name(),
        config.tasks.retain,
        queue_mode,
    )
    .map_err(ServerError::Store)?;
    if opened.snapshot.next_id > 1 {
        tracing::info!(
            path = %config.store.resolved_path().display(),
            tasks = opened.snapshot.tasks.len(),
            next_id = opened.snapshot.next_id,
            cursors = opened.snapshot.cursors.len(),
            "task store opened"
        );
    }
    Ok(opened)
}

/// Serves on `listener` until `shutdown` is cancelled, following the config
/// sent on `config`, with the task store the config names.
///
/// # Errors
/// [`ServerError`] when serving cannot start or fails.
pub async fn run(
    listener: TcpListener,
    config: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let opened = open_store(&config.borrow())?;
    // Nobody waits for the start here: a caller of `run` has its listener
    // bound already, and connections wait in its backlog until served.
    let (started, _) = oneshot::channel();
    run_with(listener, config, shutdown, opened, started).await
}

/// [`run`] with a store opened by [`open_store`], sending on `started` once
/// everything the server offers is up: the admin socket bound, health
/// SERVING, the listener served. `contactd serve` tells systemd READY=1
/// then, and not before, so that whatever is ordered after the unit (or a
/// script that waited for it) finds every socket answering. If serving
/// cannot start, `started` is dropped unsent and the error returned.
///
/// # Errors
/// [`ServerError`] when serving cannot start or fails.
pub async fn run_with(
    listener: TcpListener,
    config: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
    opened: store::Opened,
    started: oneshot::Sender<()>,
) -> Result<(), ServerError> {
    run_with_metrics(listener, None, config, shutdown, opened, started).await
}

/// [`run_with`], serving `GET /metrics` on `endpoint` too (if given).
///
/// # Errors
/// [`ServerError`] when serving cannot start or fails.
pub async fn run_with_metrics(
    listener: TcpListener,
    endpoint: Option<crate::metrics::Endpoint>,
    config: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
    opened: store::Opened,
    started: oneshot::Sender<()>,
) -> Result<(), ServerError> {
    let initial = Arc::clone(&config.borrow());
    let local = listener.local_addr().map_err(ServerError::Listener)?;
    crate::proto::codec::use_small_buffers();
    let (store, snapshot) = opened.start();
    let queue = (initial.tasks.mode == DeliveryMode::Queue)
        .then(|| Queue::new(queue_limits(&initial.tasks), store.clone()));
    let (hub, restored) = restore(&initial, snapshot.next_id, snapshot.tasks);
    if let Some(queue) = &queue {
        queue.restore(restored);
    }
    let epoch = snapshot.epoch;
    if queue.is_none() {
        delivery::encode_broadcast(&hub.retained_tasks(), epoch);
    }
    store.set_sink({
        let (hub, queue) = (Arc::clone(&hub), queue.clone());
        Arc::new(move |tasks| {
            if queue.is_none() {
                // Encoded once, here on the store's thread, for every stream.
                delivery::encode_broadcast(tasks, epoch);
            }
            hub.append_tasks(tasks);
            if let Some(queue) = &queue {
                queue.push_all(tasks);
            }
        })
    });
    let state = Arc::new(State {
        hub,
        queue: queue.clone(),
        store,
        cursors: Cursors::restored(snapshot.cursors),
        epoch: snapshot.epoch,
        callers: {
            let callers = Callers::new(
                initial.server.max_callers,
                initial.server.max_status_size.as_u64() as usize,
            );
            callers.restore(snapshot.agents);
            callers
        },
        cancelled_acks: std::sync::atomic::AtomicU64::new(0),
        counters: metrics::Counters::default(),
        runner: RwLock::new(Arc::new(Runner::new(initial.remote_cmd.clone()))),
        auth: RwLock::new(verifier(&initial.server).map_err(ServerError::Token)?),
        tls: match &initial.server.tls {
            Some(tls) => Some(Arc::new(ArcSwap::new(
                crate::tls::server_config(tls).map_err(ServerError::Tls)?,
            ))),
            None => None,
        },
        config: config.clone(),
        closing: CancellationToken::new(),
        kill: CancellationToken::new(),
    });
    if state.store.is_shared() {
        // The fleet view of the other servers: who is connected here.
        let (store, server) = (
            state.store.clone(),
            Arc::<str>::from(initial.server.resolved_name()),
        );
        state
            .callers
            .set_presence(callers::Presence(Arc::new(move |caller, connected| {
                store.record(store::Write::Presence {
                    name: Arc::clone(&caller.id),
                    server: Arc::clone(&server),
                    connected,
                    address: caller.address().map(|a| a.to_string()),
                    at_ms: crate::clock::now_ms(),
                });
            })));
    }
    let tracker = TaskTracker::new();
    if let Some(queue) = queue {
        tracker.spawn(queue.reap(shutdown.clone()));
    }
    let admin = admin::start(&initial.admin, &state, &tracker);
    tracker.spawn(restart_on_panic("the task generator", {
        let (hub, store, config, shutdown) = (
            Arc::clone(&state.hub),
            state.store.clone(),
            config.clone(),
            shutdown.clone(),
        );
        move || {
            generator::run(
                Arc::clone(&hub),
                store.clone(),
                config.clone(),
                shutdown.clone(),
            )
        }
    }));
    let housekeeping = tokio::spawn(housekeep(Arc::clone(&state), shutdown.clone()));
    tracker.spawn(restart_on_panic("applying config reloads", {
        let (state, config, shutdown) = (Arc::clone(&state), config.clone(), shutdown.clone());
        move || follow_config(Arc::clone(&state), config.clone(), shutdown.clone())
    }));
    tracker.close();

    let reporter = tonic_health::server::HealthReporter::new();
    let router = router(&initial, &state, &reporter)?;
    let limits = listener::Limits {
        max_connections: initial.server.max_connections,
        max_handshakes: initial.server.max_handshakes,
        handshake_timeout: initial.server.handshake_timeout,
    };
    let incoming = listener::incoming(
        listener,
        limits,
        state.tls.clone(),
        state.closing.clone(),
        Arc::clone(&state),
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
    if state.store.is_shared() {
        tokio::spawn(follow_database(
            Arc::clone(&state),
            reporter.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(
        addr = %local,
        tls = state.tls.is_some(),
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
    let _ = started.send(());

    tokio::select! {
        result = &mut serve => return result.map_err(ServerError::Serve),
        () = shutdown.cancelled() => {}
    }
    tracing::info!("shutting down: health is NOT_SERVING");
    health::set_all(&reporter, ServingStatus::NotServing).await;
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
    save_cursors(&state);
    save_roster(&state);
    state.store.close().await;
    tracing::info!("server stopped");
    result.map_err(ServerError::Serve)
}

/// A shared store: follows whether its database answers, one log line per
/// change. Queue mode cannot send a task without claiming it there, so its
/// health is NOT_SERVING while it does not; broadcast mode goes on
/// delivering the tasks it retains (new ones cannot be published).
async fn follow_database(
    state: Arc<State>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut reachable = state.store.reachable();
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
        match (state.queue.is_some(), up) {
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

/// The hub (the last `tasks.retain` tasks) and, in queue mode, the
/// unfinished tasks for the queue, from what the store kept.
fn restore(
    config: &Config,
    next_id: u64,
    stored: Vec<store::StoredTask>,
) -> (Arc<Hub>, Vec<queue::Restored>) {
    let retain = config.tasks.retain;
    let first_in_ring = next_id.saturating_sub(retain as u64);
    let mut ring = Vec::new();
    let mut queued = Vec::new();
    for stored in stored {
        let task = Arc::new(stored.to_task());
        if config.tasks.mode == DeliveryMode::Queue && !stored.state.is_finished() {
            queued.push(queue::Restored {
                task: Arc::clone(&task),
                attempts: stored.attempts,
                claim: stored.claim.clone(),
            });
        }
        if task.id >= first_in_ring {
            ring.push(task);
        }
    }
    (Hub::restored(retain, next_id, ring), queued)
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
        save_cursors(&state);
        ticks += 1;
        if !ticks.is_multiple_of(PRUNE_EVERY) {
            continue;
        }
        let config = Arc::clone(&state.config.borrow());
        for caller in state.callers.list() {
            if caller.named && caller.connected() {
                state.cursors.seen(&caller.id);
            }
        }
        let now = crate::clock::now_ms();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let forget_before_ms = now.saturating_sub(ms(config.store.forget_agents_after));
        let forgotten = state.cursors.forget_before(forget_before_ms);
        state.callers.forget_before(forget_before_ms);
        save_roster(&state);
        let retention = store::Retention {
            created_before_ms: now.saturating_sub(ms(config.tasks.keep_for)),
            retain_finished: config.tasks.retain_finished,
            queue_mode: state.queue.is_some(),
            forget_before_ms,
        };
        match state.store.housekeep(retention).await {
            Ok(pruned) => {
                if pruned.tasks > 0 {
                    tracing::debug!(
                        tasks = pruned.tasks,
                        "deleted tasks past tasks.keep_for or tasks.retain_finished"
                    );
                }
                if forgotten > 0 || pruned.cursors > 0 || pruned.agents > 0 {
                    tracing::info!(
                        agents = forgotten.max(pruned.cursors.max(pruned.agents) as usize),
                        after = %humantime::format_duration(config.store.forget_agents_after),
                        "forgot the agents (roster entries and broadcast cursors) not seen for store.forget_agents_after"
                    );
                }
            }
            Err(e) => tracing::warn!("task store housekeeping failed: {e}"),
        }
    }
}

fn save_cursors(state: &State) {
    if !state.store.is_durable() {
        return;
    }
    for saved in state.cursors.take_dirty() {
        state.store.record(store::Write::Cursor(saved));
    }
}

/// Writes the named agents whose roster entry changed.
fn save_roster(state: &State) {
    if !state.store.is_durable() {
        return;
    }
    for agent in state.callers.roster_changes() {
        state.store.record(store::Write::Agent(agent));
    }
}

fn verifier(server: &ServerConfig) -> Result<Verifier, TokenError> {
    Verifier::load(
        server.auth_token_file.as_deref(),
        server.tokens_file.as_deref(),
    )
}

fn queue_limits(tasks: &TasksConfig) -> queue::Limits {
    queue::Limits {
        ack_timeout: tasks.ack_timeout,
        max_attempts: tasks.max_attempts,
        window: tasks.window,
        max_pending: tasks.max_pending,
        max_dead: tasks.retain,
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

/// Applies reloaded settings that can change live.
async fn follow_config(
    state: Arc<State>,
    mut config: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
) {
    let mut current = Arc::clone(&config.borrow_and_update());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = config.changed() => if changed.is_err() { return },
        }
        let new = Arc::clone(&config.borrow_and_update());
        // What waits for a restart is logged by whoever sent the config
        // (`contactd serve`'s reload, once); here, the state that follows
        // the config, changed only where the config did.
        let changes = Changes::server(&current, &new);
        if changes.touches("remote_cmd") {
            warn_if_widened(&current.remote_cmd, &new.remote_cmd);
            *state.runner.write() = Arc::new(Runner::new(new.remote_cmd.clone()));
            tracing::info!(
                enabled = new.remote_cmd.enabled,
                patterns = new.remote_cmd.allow.len(),
                "remote command rules updated"
            );
        }
        if changes.touches("server.max_callers") || changes.touches("server.max_status_size") {
            state.callers.set_limits(
                new.server.max_callers,
                new.server.max_status_size.as_u64() as usize,
            );
        }
        if changes.touches("tasks.retain") {
            state.hub.set_retain(new.tasks.retain);
        }
        if let Some(queue) = &state.queue
            && changes.touches("tasks")
        {
            queue.set_limits(queue_limits(&new.tasks));
        }
        // Unconditional: a rotated token or certificate file keeps its path.
        reload_credentials(&state, &current, &new);
        current = new;
    }
}

/// Re-reads the token files and TLS files (so rotated ones apply on SIGHUP).
/// Fails closed: a file that cannot be used keeps the credentials in force;
/// a change that turns authentication off is applied, with a WARN naming it.
fn reload_credentials(state: &State, old: &Config, new: &Config) {
    match verifier(&new.server) {
        Ok(verifier) => {
            let was = state.auth.read().requires_shared() || state.auth.read().has_tokens();
            if was && !verifier.requires_shared() && !verifier.has_tokens() {
                tracing::warn!(
                    "config reload turns token authentication OFF: server.auth_token_file and \
                     server.tokens_file are no longer set; Contact calls need no token now"
                );
            }
            *state.auth.write() = verifier;
        }
        Err(e) => tracing::error!("{}; keeping the tokens in force", ServerError::Token(e)),
    }
    if old.has_identities() && !new.has_identities() {
        tracing::warn!(
            "config reload turns caller identities OFF: agent names are now taken from a header"
        );
    }
    if let (Some(swap), Some(tls)) = (&state.tls, &new.server.tls) {
        match crate::tls::server_config(tls) {
            Ok(config) => {
                swap.store(config);
                tracing::info!(cert = %tls.cert.display(), "TLS certificate and keys re-read: new connections use them");
            }
            Err(e) => tracing::error!(
                "{}; new connections keep the certificate in force",
                ServerError::Tls(e)
            ),
        }
    } else if state.tls.is_some() {
        tracing::warn!(
            "config reload removes [server.tls]: the port stays TLS with the certificate in \
             force until a restart"
        );
    }
}

/// Warns when a reload lets more commands run.
fn warn_if_widened(old: &crate::config::RemoteCmdConfig, new: &crate::config::RemoteCmdConfig) {
    let before: std::collections::HashSet<String> =
        old.allow.iter().map(ToString::to_string).collect();
    let added: Vec<String> = new
        .allow
        .iter()
        .map(ToString::to_string)
        .filter(|p| !before.contains(p))
        .collect();
    if new.enabled && (!old.enabled || !added.is_empty()) {
        tracing::warn!(
            turned_on = !old.enabled,
            added = ?added,
            "config reload widens remote_cmd: more commands may run now"
        );
    }
    let callers: Vec<&String> = new
        .callers
        .iter()
        .filter(|c| !old.callers.contains(c))
        .collect();
    if !callers.is_empty() {
        tracing::warn!(added = ?callers, "config reload gives more certificate names the operator role (remote_cmd.callers)");
    }
}
