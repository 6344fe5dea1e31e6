//! The accept loop of contactd's two small HTTP listeners, the metrics
//! endpoint and the web console: whoever reaches their port is a stranger,
//! so at most `max_connections` connections are served at once and at most
//! `max_connections_per_address` from one address (one peer holding
//! connections open cannot keep another address out); the excess is closed
//! at accept, and refusals are logged at most every ten seconds, with their
//! count. What each connection is served is the caller's.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::untrusted::Budget;

/// How often refused connections are logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A listener's bounds on the connections it serves at once.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_connections: usize,
    pub max_connections_per_address: usize,
}

/// How a listener is named in its log lines: `what` ("metrics", "web
/// console") and the config section of its bounds (`metrics`, `web`).
#[derive(Debug, Clone, Copy)]
pub struct Names {
    pub what: &'static str,
    pub section: &'static str,
}

/// Accepts on `listener` until `stop`, within `bounds`, and hands each
/// admitted connection (with its peer's address) to `serve`, run on a task
/// of its own that holds the connection's slots until it ends. At `stop`
/// it stops accepting and waits for the connections: each `serve` must end
/// on `stop` itself.
pub async fn accept<S, F>(
    listener: TcpListener,
    names: Names,
    bounds: Bounds,
    stop: CancellationToken,
    serve: S,
) where
    S: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let Names { what, section } = names;
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let per_address = super::AddressSlots::default();
    let refusals = Budget::every(WARN_EVERY);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                refusals.hit(|n| tracing::warn!(errors = n, "{what} listener: accept failed: {e}"));
                // Out of file descriptors, most likely: not in a tight loop.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(held) = per_address.take(peer.ip(), bounds.max_connections_per_address) else {
            refusals.hit(|n| {
                tracing::warn!(
                    refused = n,
                    %peer,
                    max_connections_per_address = bounds.max_connections_per_address,
                    "{what} connections refused: {section}.max_connections_per_address are \
                     open from one address"
                );
            });
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refusals.hit(|n| {
                tracing::warn!(
                    refused = n,
                    max_connections = bounds.max_connections,
                    "{what} connections refused: {section}.max_connections are open"
                );
            });
            continue;
        };
        let served = serve(stream, peer);
        connections.spawn(async move {
            let _slots = (slot, held);
            served.await;
        });
    }
    connections.close();
    connections.wait().await;
}
