//! Watching a shared database for this server: the [`Watcher`] listens
//! for the other servers' publishes (LISTEN/NOTIFY, polling as the
//! fallback), keeps the heartbeat, and holds the generator's lease.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use super::{CHANNEL, GENERATOR_LOCK, connect::Connector, failed};
use crate::{config::store::Target, store::StoreError};

/// Watches a shared database for this server, on a thread of its own:
/// listens for the other servers' publishes (and polls every
/// `store.poll_interval`, in case a notification was lost while
/// reconnecting), keeps this server's heartbeat, and holds the task
/// generator's lease when it can.
pub struct Watcher {
    pub(super) target: Target,
    pub(super) connect: Connector,
    pub(super) server: Arc<str>,
}

/// A running [`Watcher`].
#[derive(Debug)]
pub struct Watching {
    stop: tokio_util::sync::CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl Watching {
    /// Stops watching: the heartbeat says stopped, the lease is let go.
    pub async fn stop(self) {
        self.stop.cancel();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

impl Watcher {
    /// Starts watching: `follow` is called on each notice or poll, and
    /// `leader` says whether this server holds the generator's lease.
    ///
    /// # Panics
    /// The thread cannot be started.
    pub fn start(
        self,
        follow: Box<dyn Fn() + Send>,
        leader: watch::Sender<bool>,
        reachable: watch::Sender<bool>,
    ) -> Watching {
        let stop = tokio_util::sync::CancellationToken::new();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("contactd-store-watch".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => {
                            runtime.block_on(self.run(&*follow, &leader, &reachable, &stop));
                        }
                        Err(e) => tracing::error!("cannot watch the task store: {e}"),
                    }
                })
                .expect("spawn the store's watcher thread")
        };
        Watching { stop, thread }
    }

    async fn run(
        &self,
        follow: &(dyn Fn() + Send),
        leader: &watch::Sender<bool>,
        reachable: &watch::Sender<bool>,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        let mut backoff = crate::backoff::Backoff::new(crate::config::BackoffConfig {
            initial: Duration::from_millis(100),
            max: self.connect.poll.max(Duration::from_secs(5)),
            ..crate::config::BackoffConfig::default()
        });
        let mut failures = 0u32;
        loop {
            let (notices, mut noticed) = mpsc::unbounded_channel();
            let watched = match self.connect.connect(&self.target, Some(notices)).await {
                Ok(client) => {
                    failures = 0;
                    backoff.reset();
                    self.watch(&client, &mut noticed, follow, leader, reachable, stop)
                        .await
                }
                Err(e) => Err(e),
            };
            if watched.is_err() {
                // The server logs the change (and what it does about it).
                reachable.send_if_modified(|up| std::mem::replace(up, false));
            }
            if leader.send_replace(false) {
                tracing::warn!(server = %self.server, "this server no longer runs the task generator (its lease went with the database connection)");
            }
            match watched {
                Ok(()) => return,
                Err(e) => {
                    // The server says the database is unreachable, once.
                    failures += 1;
                    tracing::debug!(failures, "cannot watch the task store: {e}");
                }
            }
            let wait = backoff.next_delay();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Watches on `client` until stopped (`Ok`) or the connection fails.
    async fn watch(
        &self,
        client: &Client,
        noticed: &mut mpsc::UnboundedReceiver<()>,
        follow: &(dyn Fn() + Send),
        leader: &watch::Sender<bool>,
        reachable: &watch::Sender<bool>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), StoreError> {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(failed)?;
        reachable.send_if_modified(|up| !std::mem::replace(up, true));
        // What was published while not listening.
        follow();
        let server: &str = &self.server;
        let mut tick = tokio::time::interval(self.connect.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    client
                        .execute(
                            "UPDATE servers SET heartbeat_ms = $2, stopped = TRUE WHERE name = $1",
                            &[&server, &crate::clock::now_ms()],
                        )
                        .await
                        .map_err(failed)?;
                    // The lease goes now: another server takes it at its
                    // next poll.
                    client
                        .batch_execute("SELECT pg_advisory_unlock_all()")
                        .await
                        .map_err(failed)?;
                    return Ok(());
                }
                notice = noticed.recv() => match notice {
                    Some(()) => follow(),
                    None => return Err(StoreError::Failed("the database connection ended".into())),
                },
                _ = tick.tick() => {
                    // The fallback: a notification sent while this
                    // connection was down is never received.
                    follow();
                    client
                        .execute(
                            "UPDATE servers SET heartbeat_ms = $2, stopped = FALSE WHERE name = $1",
                            &[&server, &crate::clock::now_ms()],
                        )
                        .await
                        .map_err(failed)?;
                    if !*leader.borrow() {
                        let taken: bool = client
                            .query_one("SELECT pg_try_advisory_lock($1)", &[&GENERATOR_LOCK])
                            .await
                            .map_err(failed)?
                            .get(0);
                        if taken {
                            tracing::info!(server, "this server runs the task generator (it took the lease)");
                            leader.send_replace(true);
                        }
                    }
                }
            }
        }
    }
}
