//! One session with a server: connect, subscribe with getTask (announcing
//! the agent's `handler_concurrency`), send acks with tellResult (one call
//! per batch, whose answer confirms them) and status reports with
//! sendStatus, all carrying the agent's name in the `x-contactd-agent`
//! header. The session ends at the
//! first failure of any of them (every failure is retryable except a bad
//! URL or name), or, at shutdown, once the last ack is sent.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use super::{Pending, Shared, status};
use crate::{
    config::AgentConfig,
    proto::{
        AGENT_HEADER,
        contact::{
            ClientMsg, Empty, Result as ResultMsg, ServerMsg, contact_client::ContactClient,
        },
    },
};

/// HTTP/2 pings that notice a server gone without a word (a network cut).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// After one call of a session fails without the server's retry hint, how
/// long the others may take to end with theirs (then the first failure
/// ends the session).
const LINGER: Duration = Duration::from_millis(250);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Fatal: the URL cannot be used at all.
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// Fatal: the name cannot be sent in a header.
    #[error("invalid agent name {0:?}: it must be visible ASCII without spaces")]
    BadName(String),
    /// The connection could not be made.
    #[error("{0}")]
    Connect(String),
    /// The token file cannot be used (retried: it may be fixed meanwhile).
    #[error("agent.token_file: {0}")]
    Token(#[from] crate::auth::TokenError),
    /// The TLS files cannot be used (retried: they may be fixed meanwhile).
    #[error("agent.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A step took longer than `connect_timeout`.
    #[error("{0} timed out after {1:?}")]
    Timeout(&'static str, Duration),
    /// A call failed (Unavailable, Unknown "connection reset", Internal,
    /// Cancelled, ...).
    #[error("{call}: {code:?}: {message}")]
    Rpc {
        call: &'static str,
        code: tonic::Code,
        message: String,
        /// The server's retry hint: come back after this long.
        retry_after: Option<Duration>,
    },
    /// The server ended a stream that should stay open.
    #[error("the server ended the {0} stream")]
    Ended(&'static str),
}

impl SessionError {
    /// Whether connecting again may help: everything but a bad URL or name.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SessionError::BadUrl { .. } | SessionError::BadName(_))
    }

    /// When the server asked to be called again: its retry hint. A server
    /// that ends its streams to shut down without one (an older contactd)
    /// is taken to say "at once" too.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SessionError::Rpc {
                retry_after: Some(after),
                ..
            } => Some(*after),
            SessionError::Rpc { code, message, .. }
                if *code == tonic::Code::Unavailable && message == "server shutting down" =>
            {
                Some(Duration::ZERO)
            }
            _ => None,
        }
    }

    fn rpc(call: &'static str) -> impl FnOnce(Status) -> SessionError {
        move |status| SessionError::Rpc {
            call,
            code: status.code(),
            message: status.message().to_owned(),
            retry_after: crate::proto::retry_hint(&status),
        }
    }
}

async fn timed<T>(
    what: &'static str,
    limit: Duration,
    future: impl Future<Output = T>,
) -> Result<T, SessionError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| SessionError::Timeout(what, limit))
}

/// Runs one session with `server`; calls `on_connected` once it is up.
/// `Ok` only when the agent drains: at shutdown before connecting, or after
/// the last ack was sent.
pub(super) async fn run(
    shared: &Arc<Shared>,
    config: &AgentConfig,
    server: &str,
    on_connected: impl FnOnce(Instant),
) -> Result<(), SessionError> {
    let endpoint = Endpoint::from_shared(server.to_owned()).map_err(|e| SessionError::BadUrl {
        url: server.to_owned(),
        reason: crate::error_chain(&e),
    })?;
    // Read at every connection, so rotated files are picked up.
    let tls = crate::tls::for_url(endpoint.uri(), &(&config.tls).into())?;
    let endpoint = endpoint
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let name: MetadataValue<_> = config
        .name
        .parse()
        .map_err(|_| SessionError::BadName(config.name.clone()))?;
    // Read at every connection (facts too: a host renamed shows at once).
    let labels: MetadataValue<_> = super::facts::labels(config)
        .to_header()
        .parse()
        .expect("labels are visible ASCII");
    // Read at every connection, so a rotated token is picked up.
    let token: Option<MetadataValue<_>> = match &config.token_file {
        Some(path) => {
            let token = crate::auth::read_token(path)?;
            Some(
                crate::auth::bearer(&token)
                    .parse()
                    .expect("a token is visible ASCII"),
            )
        }
        None => None,
    };
    // How many tasks it runs at once, so a queue-mode server hands it no
    // more (read at every connection: a reloaded value applies at the next).
    let concurrency = MetadataValue::from(config.handler_concurrency as u64);
    let limit = config.connect_timeout;
    let channel: Channel = tokio::select! {
        biased;
        () = shared.draining.cancelled() => return Ok(()),
        channel = timed("connecting", limit, crate::tls::connect(endpoint, tls)) => {
            channel?.map_err(|e| SessionError::Connect(crate::error_chain(&e)))?
        }
    };
    let mut client = ContactClient::with_interceptor(
        channel,
        Headers {
            name,
            labels,
            token,
        },
    );
    let mut subscribe = Request::new(Empty {});
    subscribe
        .metadata_mut()
        .insert(crate::proto::CONCURRENCY_HEADER, concurrency);
    let tasks = timed("getTask", limit, client.get_task(subscribe))
        .await?
        .map_err(SessionError::rpc("getTask"))?
        .into_inner();
    let (status_tx, status_rx) = mpsc::channel::<ClientMsg>(1);
    let mut replies = timed(
        "sendStatus",
        limit,
        client.send_status(ReceiverStream::new(status_rx)),
    )
    .await?
    .map_err(SessionError::rpc("sendStatus"))?
    .into_inner();
    // Dropped with this session, whatever the reason: the acks of a call
    // not answered yet go back to the outbox for the next session.
    let acks = send_acks(Arc::clone(shared), client.clone());
    tokio::pin!(acks);
    on_connected(Instant::now());

    let status_loop = report_status(shared, status_tx);
    tokio::pin!(status_loop);
    let mut tasks = Some(tasks);
    let (mut status_done, mut acks_done, mut replies_done) = (false, false, false);
    // A call that failed without the server's retry hint, while the others
    // are given a moment: a shutdown ends every call at once, and the
    // first one seen may have lost its status with the connection.
    let mut failed: Option<SessionError> = None;
    let mut linger = Box::pin(tokio::time::sleep(Duration::MAX));
    loop {
        let error = tokio::select! {
            task = next_task(&mut tasks) => match task {
                Ok(Some(task)) => {
                    shared.intake(task).await;
                    continue;
                }
                Ok(None) => SessionError::Ended("getTask"),
                Err(status) => SessionError::rpc("getTask")(status),
            },
            () = shared.draining.cancelled(), if tasks.is_some() && failed.is_none() => {
                // Dropping the stream cancels the call: no more tasks.
                tasks = None;
                tracing::debug!("stopped taking tasks");
                continue;
            }
            result = &mut acks, if !acks_done => {
                acks_done = true;
                match result {
                    // Only once the agent has finished and every ack is sent.
                    Ok(()) => return Ok(()),
                    Err(status) => SessionError::rpc("tellResult")(status),
                }
            }
            reply = replies.message(), if !replies_done => match reply {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    replies_done = true;
                    SessionError::Ended("sendStatus")
                }
                Err(status) => {
                    replies_done = true;
                    SessionError::rpc("sendStatus")(status)
                }
            },
            // The call is over (its request stream was dropped): its
            // answer, which may carry the server's retry hint, follows on
            // `replies`, so the session ends there.
            () = &mut status_loop, if !status_done => {
                status_done = true;
                continue;
            }
            () = &mut linger => return Err(failed.take().expect("set with the linger")),
        };
        if error.retry_after().is_some() {
            return Err(error);
        }
        if matches!(
            error,
            SessionError::Ended("getTask")
                | SessionError::Rpc {
                    call: "getTask",
                    ..
                }
        ) {
            tasks = None;
        }
        if failed.is_none() {
            tracing::debug!("a call failed ({error}): waiting briefly for the others' statuses");
            failed = Some(error);
            linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
        }
        if tasks.is_none() && acks_done && replies_done {
            // Every call has ended, none with a hint.
            return Err(failed.take().expect("set above"));
        }
    }
}

async fn next_task(
    tasks: &mut Option<tonic::Streaming<ServerMsg>>,
) -> Result<Option<ServerMsg>, Status> {
    match tasks {
        Some(tasks) => tasks.message().await,
        None => std::future::pending().await,
    }
}

/// Sends a status report now and every `status_interval` (re-read after
/// each report, so a reload applies); returns if the stream is gone.
async fn report_status(shared: &Shared, reports: mpsc::Sender<ClientMsg>) {
    loop {
        let config = shared.config();
        let msg = status::text(
            &config.status_command,
            &config.name,
            shared.succeeded.load(std::sync::atomic::Ordering::Relaxed),
            shared.failed.load(std::sync::atomic::Ordering::Relaxed),
        )
        .await;
        if reports.send(ClientMsg { msg }).await.is_err() {
            return;
        }
        tokio::time::sleep(config.status_interval).await;
    }
}

/// What every call of a session carries: the agent's name, its labels, and
/// its token if it has one.
#[derive(Clone)]
struct Headers {
    name: MetadataValue<Ascii>,
    labels: MetadataValue<Ascii>,
    token: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Headers {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(AGENT_HEADER, self.name.clone());
        metadata.insert(crate::labels::LABELS_HEADER, self.labels.clone());
        if let Some(token) = &self.token {
            metadata.insert(crate::auth::HEADER, token.clone());
        }
        Ok(request)
    }
}

type Client = ContactClient<InterceptedService<Channel, Headers>>;

/// Acks sent in one tellResult call, at most.
const ACK_BATCH: usize = 256;

/// Acks taken from the outbox for a call: put back (first in line) unless
/// the call answered, so a session that ends meanwhile loses none.
struct Taken {
    shared: Arc<Shared>,
    acks: Vec<Pending>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        let acks = std::mem::take(&mut self.acks);
        for dropped in self.shared.outbox.put_back(acks) {
            self.shared.dropped_ack(&dropped);
        }
    }
}

/// Sends the acks as the outbox gets them, those waiting together in one
/// tellResult call each: its answer is the server's word that it has them
/// (a stream that stays open would say nothing of what arrived), and only
/// then are they marked delivered in the spool. Returns once the agent has
/// finished and the outbox is empty; fails with the first failed call.
async fn send_acks(shared: Arc<Shared>, mut client: Client) -> Result<(), Status> {
    loop {
        let first = tokio::select! {
            biased;
            ack = shared.outbox.next() => ack,
            () = shared.finished.cancelled() => match shared.outbox.pop() {
                Some(ack) => ack,
                None => return Ok(()),
            },
        };
        let mut taken = Taken {
            shared: Arc::clone(&shared),
            acks: vec![first],
        };
        while taken.acks.len() < ACK_BATCH {
            match shared.outbox.pop() {
                Some(ack) => taken.acks.push(ack),
                None => break,
            }
        }
        let batch: Vec<ResultMsg> = taken.acks.iter().map(|(_, ack)| ack.clone()).collect();
        tracing::debug!(
            acks = batch.len(),
            first_task_id = batch[0].task_id,
            "sending acks"
        );
        client.tell_result(stream::iter(batch)).await?;
        let acks = std::mem::take(&mut taken.acks);
        if let Some(spool) = &shared.spool {
            let keys = acks.into_iter().filter_map(|(key, _)| key).collect();
            spool.delivered(keys, shared.config().remember).await;
            // Tasks waiting for room in a full spool look again (their
            // next write comes after this mark).
            shared.room.notify_waiters();
        }
    }
}
