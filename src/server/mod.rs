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
mod health;
mod listener;

use std::{sync::Arc, time::Duration};

use parking_lot::RwLock;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::Status;
use tonic_health::ServingStatus;

pub use callers::{CallGuard, Caller, Callers};
pub use listener::bind;

use crate::{
    auth::{TokenError, Verifier},
    config::Config,
    config::{DeliveryMode, TasksConfig},
    proto::{CONTACT_DESCRIPTOR_SET, contact::contact_server::ContactServer},
    remote_cmd::Runner,
    tasks::{
        Hub, generator,
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
    #[error("server.auth_token_file: {0}")]
    Token(#[source] TokenError),
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct State {
    /// The tasks agents receive.
    pub(crate) hub: Arc<Hub>,
    /// This server run's random id, sent with every task (`ServerMsg.epoch`)
    /// so acks of tasks from an earlier run can be told apart.
    pub(crate) epoch: u64,
    /// Queue mode's dispatcher; `None` in broadcast mode.
    pub(crate) queue: Option<Arc<Queue>>,
    /// Who is calling and what they last reported.
    pub(crate) callers: Callers,
    /// Remote command rules; replaced whole on reload.
    runner: RwLock<Arc<Runner>>,
    /// The token Contact calls must carry, if any; re-read on reload.
    pub(crate) auth: RwLock<Verifier>,
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

/// Serves on `listener` until `shutdown` is cancelled, following the config
/// sent on `config`.
///
/// # Errors
/// [`ServerError`] when serving cannot start or fails.
pub async fn run(
    listener: TcpListener,
    config: watch::Receiver<Arc<Config>>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let initial = Arc::clone(&config.borrow());
    let local = listener.local_addr().map_err(ServerError::Listener)?;
    let queue = (initial.tasks.mode == DeliveryMode::Queue)
        .then(|| Queue::new(queue_limits(&initial.tasks)));
    let state = Arc::new(State {
        hub: Hub::new(initial.tasks.retain),
        queue: queue.clone(),
        // Never 0, which means "not said" in an ack.
        epoch: rand::random::<u64>().max(1),
        callers: Callers::new(
            initial.server.max_callers,
            initial.server.max_status_size.as_u64() as usize,
        ),
        runner: RwLock::new(Arc::new(Runner::new(initial.remote_cmd.clone()))),
        auth: RwLock::new(
            Verifier::from_file(initial.server.auth_token_file.as_deref())
                .map_err(ServerError::Token)?,
        ),
        config: config.clone(),
        closing: CancellationToken::new(),
        kill: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    if let Some(queue) = queue {
        tracker.spawn(Arc::clone(&queue).pump(Arc::clone(&state.hub), shutdown.clone()));
        tracker.spawn(queue.reap(shutdown.clone()));
    }
    let admin = admin::start(&initial.admin, &state, &tracker);
    tracker.spawn(restart_on_panic("the task generator", {
        let (hub, config, shutdown) = (Arc::clone(&state.hub), config.clone(), shutdown.clone());
        move || generator::run(Arc::clone(&hub), config.clone(), shutdown.clone())
    }));
    tracker.spawn(restart_on_panic("applying config reloads", {
        let (state, config, shutdown) = (Arc::clone(&state), config.clone(), shutdown.clone());
        move || follow_config(Arc::clone(&state), config.clone(), shutdown.clone())
    }));
    tracker.close();

    let reporter = tonic_health::server::HealthReporter::new();
    health::set_all(&reporter, ServingStatus::Serving).await;
    let router = router(&initial, &state, &reporter)?;
    let incoming = listener::incoming(listener, initial.server.max_connections);
    let serve =
        router.serve_with_incoming_shutdown(incoming, state.closing.clone().cancelled_owned());
    tokio::pin!(serve);
    tracing::info!(addr = %local, "serving Contact, health and reflection");

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
    tracker.wait().await;
    admin::remove_socket(admin.as_ref());
    tracing::info!("server stopped");
    result.map_err(ServerError::Serve)
}

fn router(
    config: &Config,
    state: &Arc<State>,
    reporter: &tonic_health::server::HealthReporter,
) -> Result<tonic::transport::server::Router, ServerError> {
    let s = &config.server;
    let max_message = usize::try_from(s.max_message_size.as_u64()).unwrap_or(usize::MAX);
    let contact = ContactServer::new(contact::ContactService::new(Arc::clone(state)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(CONTACT_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(ServerError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServerError::Reflection)?;
    Ok(tonic::transport::Server::builder()
        .max_concurrent_streams(s.max_concurrent_streams)
        .http2_keepalive_interval(Some(s.keepalive_interval))
        .http2_keepalive_timeout(Some(s.keepalive_timeout))
        .add_service(contact)
        .add_service(health::service(reporter, state.closing.clone()))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
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
        if new.remote_cmd != current.remote_cmd {
            *state.runner.write() = Arc::new(Runner::new(new.remote_cmd.clone()));
            tracing::info!(
                enabled = new.remote_cmd.enabled,
                patterns = new.remote_cmd.allow.len(),
                "remote command rules updated"
            );
        }
        state.callers.set_limits(
            new.server.max_callers,
            new.server.max_status_size.as_u64() as usize,
        );
        if let Some(queue) = &state.queue {
            queue.set_limits(queue_limits(&new.tasks));
        }
        if new.tasks.mode != current.tasks.mode || new.admin != current.admin {
            tracing::warn!("changes to tasks.mode and [admin] take effect after a restart");
        }
        // Re-read on every reload, so a rotated token applies on SIGHUP.
        match Verifier::from_file(new.server.auth_token_file.as_deref()) {
            Ok(verifier) => *state.auth.write() = verifier,
            Err(e) => tracing::error!("server.auth_token_file: {e}; keeping the current token"),
        }
        current = new;
    }
}
