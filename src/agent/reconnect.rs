//! The reconnect loop: a session, and after any failure a delay from the
//! backoff and the next server, forever (until the agent drains). One log
//! line per change of state; each attempt is a `debug` line and an event.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{AgentError, EventKind, Shared, session};

/// Longest retry hint honoured: a server asking for more is waited for
/// this long (a hint is advice, and an agent must not vanish for hours).
const MAX_HINT: Duration = Duration::from_secs(600);
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
        let retry = error.retry_after();
        shared.emit(EventKind::Failed {
            server: server.clone(),
            error: error.to_string(),
        });
        // The error may carry the server's own status text.
        let error = crate::untrusted::shown(&error.to_string()).to_string();
        let hint =
            retry.map(|after| hinted_delay(after, config.retry_hint_jitter, fastrand::f64()));
        if let Some(at) = connected_at {
            if retry.is_some() {
                // Asked to come back: the server is restarting (or
                // busy), not failing.
                tracing::info!(%server, "disconnected from {server}: {error}; reconnecting as it asks");
            } else {
                tracing::warn!(%server, "disconnected from {server}: {error}");
            }
            if retry.is_some() || at.elapsed() >= config.healthy_after {
                backoff.reset();
            }
            failures = 1;
            down_since = Instant::now();
        } else if retry.is_some() {
            // Turned away with a hint: not a failure of the server's.
            backoff.reset();
            failures += 1;
            tracing::debug!(%server, attempt = failures, "server busy: {error}");
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
        let delay = hint.unwrap_or_else(|| backoff.next_delay());
        systemd::status(&format!("reconnecting in {:.1}s", delay.as_secs_f64()));
        shared.emit(EventKind::Waiting { delay });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.draining.cancelled() => return Ok(()),
        }
    }
}

/// The wait a retry hint of `after` asks for: `after` (at most
/// [`MAX_HINT`]) plus `unit` (random in `[0, 1)`) of `jitter`, or of
/// `after` if longer, so that a fleet told the same thing at once does not
/// come back at once.
fn hinted_delay(after: Duration, jitter: Duration, unit: f64) -> Duration {
    let after = after.min(MAX_HINT);
    after + jitter.max(after).mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_is_waited_for_with_jitter() {
        let s = Duration::from_secs;
        assert_eq!(hinted_delay(s(0), s(1), 0.0), s(0));
        assert_eq!(hinted_delay(s(0), s(1), 0.5), Duration::from_millis(500));
        assert_eq!(hinted_delay(s(4), s(1), 0.5), s(6));
        assert_eq!(hinted_delay(s(0), s(0), 0.9), s(0));
        assert_eq!(hinted_delay(s(100_000), s(1), 0.0), MAX_HINT);
    }
}
