//! The reconnect loop: a session, and after any failure a delay from the
//! backoff and the next server, forever (until the agent drains). One log
//! line per change of state; each attempt is a `debug` line and an event.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{AgentError, EventKind, Shared, session};
use crate::{backoff::Backoff, systemd};

/// Connects, runs a session, and after any failure waits (with backoff) and
/// connects again to the next server, until the agent drains.
pub(super) async fn connect_loop(shared: Arc<Shared>) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(shared.config().backoff.clone());
    let mut index = 0usize;
    // Failed attempts since the last session, and since when.
    let mut failures = 0u32;
    let mut down_since = Instant::now();
    loop {
        let config = shared.config();
        backoff.set_config(config.backoff.clone());
        let server = config.servers[index % config.servers.len()].clone();
        shared.emit(EventKind::Connecting {
            server: server.clone(),
        });
        tracing::debug!(%server, attempt = failures + 1, "connecting");
        let mut connected_at = None;
        let on_connected = |at: Instant| {
            if failures == 0 {
                tracing::info!(%server, "connected to {server}");
            } else {
                tracing::info!(
                    %server,
                    failed_attempts = failures,
                    down_for = %humantime::format_duration(Duration::from_secs(down_since.elapsed().as_secs())),
                    "connected to {server}"
                );
            }
            systemd::status(&format!("connected to {server}"));
            shared.emit(EventKind::Connected {
                server: server.clone(),
            });
            connected_at = Some(at);
        };
        let result = session::run(&shared, &config, &server, on_connected).await;
        let error = match result {
            Ok(()) => return Ok(()),
            Err(e) if !e.is_retryable() => return Err(e.into()),
            Err(e) => e,
        };
        shared.emit(EventKind::Failed {
            server: server.clone(),
            error: error.to_string(),
        });
        // The error may carry the server's own status text.
        let error = crate::untrusted::shown(&error.to_string()).to_string();
        if let Some(at) = connected_at {
            tracing::warn!(%server, "disconnected from {server}: {error}");
            if at.elapsed() >= config.healthy_after {
                backoff.reset();
            }
            failures = 1;
            down_since = Instant::now();
        } else {
            failures += 1;
            if failures == 1 {
                tracing::warn!(%server, "cannot connect to {server}: {error}; retrying with backoff");
            } else {
                tracing::debug!(%server, attempt = failures, "cannot connect: {error}");
            }
        }
        if shared.draining.is_cancelled() {
            return Ok(());
        }
        index = index.wrapping_add(1);
        let delay = backoff.next_delay();
        systemd::status(&format!("reconnecting in {:.1}s", delay.as_secs_f64()));
        shared.emit(EventKind::Waiting { delay });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.draining.cancelled() => return Ok(()),
        }
    }
}
