//! Connecting to the database: the backend's own runtime, the connector
//! (timeouts, keepalives, TLS to the database), the task that drives each
//! connection, and taking this server's name on the writer's connection.

use std::{
    path::PathBuf,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::{describe, described, failed};
use crate::{config::store::Target, store::StoreError};

/// How long a server waits for its name to be free at start-up.
const TAKE_TRIES: u32 = 50;
const TAKE_WAIT: Duration = Duration::from_millis(100);

/// The backend's own runtime, dropped without blocking: a backend opened
/// but not started (another start-up check failed) is dropped in async
/// code, where dropping a runtime the usual way panics.
pub(super) struct Runtime(pub(super) Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Runtime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0
            .as_ref()
            .expect("the runtime lives as long as the backend")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// What (re)connecting needs.
#[derive(Clone)]
pub(super) struct Connector {
    pub(super) timeout: Duration,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) poll: Duration,
}

impl Connector {
    /// `target`'s settings with this server's timeouts.
    pub(super) fn config(&self, target: &Target) -> tokio_postgres::Config {
        let mut config = target.config.clone();
        config.connect_timeout(self.timeout);
        // A database host that vanished (no reset) is noticed in about a
        // minute, not at the kernel's default of hours.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .tcp_user_timeout(Duration::from_secs(60));
        config
    }

    /// The TLS connector when `target` asks for TLS.
    pub(super) fn tls(
        &self,
        target: &Target,
    ) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
        if !target.tls {
            return Ok(None);
        }
        let tls = crate::tls::ClientTls {
            ca: self.ca_file.clone(),
            ..Default::default()
        }
        .config()
        .map_err(|e| StoreError::unusable(format!("store.ca_file: {e}"), e))?;
        // No ALPN: the agents' "h2" means nothing to PostgreSQL (and
        // PostgreSQL 17 refuses a protocol it does not know).
        let mut tls = Arc::unwrap_or_clone(tls);
        tls.alpn_protocols.clear();
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)))
    }

    /// Connects, sending a `()` on `notices` for each notification.
    pub(super) async fn connect(
        &self,
        target: &Target,
        notices: Option<mpsc::UnboundedSender<()>>,
    ) -> Result<Client, StoreError> {
        let config = self.config(target);
        let context = format!("cannot connect to the database {}", target.name);
        let unreachable = |e| StoreError::Unavailable(described(&context, e));
        let started = Instant::now();
        let client = if let Some(make) = self.tls(target)? {
            let (client, connection) = tokio::time::timeout(self.timeout, config.connect(make))
                .await
                .map_err(|_| timed_out(target, started))?
                .map_err(unreachable)?;
            tokio::spawn(drive(connection, notices));
            client
        } else {
            let (client, connection) = tokio::time::timeout(self.timeout, config.connect(NoTls))
                .await
                .map_err(|_| timed_out(target, started))?
                .map_err(unreachable)?;
            tokio::spawn(drive(connection, notices));
            client
        };
        Ok(client)
    }
}

fn timed_out(target: &Target, started: Instant) -> StoreError {
    StoreError::Unavailable(
        format!(
            "cannot connect to the database {}: no answer in {}",
            target.name,
            humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64))
        )
        .into(),
    )
}

/// Reads the connection until it closes: answers go to their queries,
/// notifications to `notices`.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notices: Option<mpsc::UnboundedSender<()>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ended = std::future::poll_fn(|cx| {
        loop {
            match connection.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notification(_)))) => {
                    if let Some(notices) = &notices {
                        let _ = notices.send(());
                    }
                }
                // The server's notices (warnings): nothing to act on.
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    if let Err(e) = ended {
        // Its next use says what that means (the server logs the database
        // unreachable once, and a failed write is logged where it failed).
        tracing::debug!(
            "the task store's database connection ended: {}",
            describe(&e)
        );
    }
}

/// Takes this server's name (until the connection closes) and says it
/// started: two servers of one name would mix up their agents' rows.
pub(super) async fn take(client: &Client, database: &str, server: &str) -> Result<(), StoreError> {
    // A server of this name that was just killed holds the name until
    // PostgreSQL sees its connection close: a restart waits that long.
    let mut taken = false;
    for _ in 0..TAKE_TRIES {
        taken = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('contactd server ' || $1, 0))",
                &[&server],
            )
            .await
            .map_err(failed)?
            .get(0);
        if taken {
            break;
        }
        tokio::time::sleep(TAKE_WAIT).await;
    }
    if !taken {
        return Err(StoreError::Locked {
            path: database.into(),
            reason: format!(
                "a contactd server named {server:?} is already using this database: give \
                 each server its own server.name"
            ),
        });
    }
    let now = crate::clock::now_ms();
    client
        .execute(
            "INSERT INTO servers (name, started_ms, heartbeat_ms) VALUES ($1, $2, $2) \
             ON CONFLICT (name) DO UPDATE SET started_ms = $2, heartbeat_ms = $2, \
             stopped = FALSE",
            &[&server, &now],
        )
        .await
        .map_err(failed)?;
    Ok(())
}
