//! The gate in front of the Contact service. On the request's headers,
//! before any body is read, it decides who is calling and whether they may
//! make this call; then it hands the call to a Contact server whose message
//! limit fits the method, with a body that counts the bytes of unfinished
//! messages against the connection's and the server's budgets.
//!
//! Who is calling (DESIGN.md, trust model):
//! - a client certificate's name (mTLS) or a named token's name is an
//!   identity: the `x-contactd-agent` header may repeat it, never contradict it;
//! - with neither configured (the seed's setup, or only a shared secret), the
//!   header's name is taken at its word, as a label;
//! - otherwise the caller is anonymous: it may make no Contact call (unless
//!   it holds the shared secret: then it receives tasks but acks nothing).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use tonic::{Status, body::Body, server::NamedService};
use tower::Service;

use super::{
    contact::{ContactService, Handoff},
    listener::ConnInfo,
    outbox::{self, Outbound, Pauses},
    state::State,
};
use crate::{
    auth::{Credential, HEADER, Principal, Role, Who},
    labels::{LABELS_HEADER, Labels},
    proto::{AGENT_HEADER, contact::contact_server::ContactServer},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    SendStatus = 0,
    GetTask = 1,
    TellResult = 2,
    RemoteCmd = 3,
    Other = 4,
}

impl Method {
    /// Its index in the metrics' `method` label ([`super::metrics::METHODS`]).
    fn index(self) -> usize {
        self as usize
    }

    fn of(path: &str) -> Method {
        match path {
            "/Contact/sendStatus" => Method::SendStatus,
            "/Contact/getTask" => Method::GetTask,
            "/Contact/tellResult" => Method::TellResult,
            "/Contact/remoteCMD" => Method::RemoteCmd,
            _ => Method::Other,
        }
    }
}

/// Largest getTask request: an `Empty`.
const MAX_EMPTY_MESSAGE: usize = 1024;

/// The Contact service behind its gate.
#[derive(Clone)]
pub(super) struct Gate {
    state: Arc<State>,
    /// One Contact server per message limit: status, result, command, other.
    servers: [ContactServer<ContactService>; 4],
    budget: Budget,
    /// `server.max_connection_unsent` and `server.max_unsent`.
    pauses: Arc<Pauses>,
}

impl NamedService for Gate {
    const NAME: &'static str = "Contact";
}

/// The bytes of unfinished messages peers may make the server hold.
///
/// Half of the global budget is kept for known connections (see
/// [`ConnInfo::known`]): unknown ones count against `anonymous` too, and
/// are refused once it holds half, so anonymous peers filling the budget
/// cannot starve a known agent's message.
#[derive(Debug, Clone)]
struct Budget {
    global: Arc<AtomicUsize>,
    anonymous: Arc<AtomicUsize>,
    max_global: usize,
    max_connection: usize,
}

impl Budget {
    /// What unknown connections may hold together.
    fn max_anonymous(&self) -> usize {
        self.max_global / 2
    }
}

fn usize_of(size: bytesize::ByteSize) -> usize {
    usize::try_from(size.as_u64()).unwrap_or(usize::MAX)
}

impl Gate {
    pub(super) fn new(state: &Arc<State>) -> Gate {
        let config = Arc::clone(&state.config.borrow());
        let s = &config.server;
        let max_encoding = usize_of(s.max_message_size);
        let server = |max_decoding: usize| {
            ContactServer::new(ContactService::new(Arc::clone(state)))
                .max_decoding_message_size(max_decoding)
                .max_encoding_message_size(max_encoding)
        };
        Gate {
            state: Arc::clone(state),
            servers: [
                server(usize_of(s.max_status_message)),
                server(usize_of(s.max_result_message)),
                server(usize_of(s.max_command_message)),
                server(MAX_EMPTY_MESSAGE),
            ],
            budget: Budget {
                global: Arc::default(),
                anonymous: Arc::default(),
                max_global: usize_of(s.max_buffered),
                max_connection: usize_of(s.max_connection_buffer),
            },
            pauses: Arc::new(Pauses::new(outbox::Limits {
                connection: usize_of(s.max_connection_unsent),
                global: usize_of(s.max_unsent),
            })),
        }
    }
}

type GateFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl Service<http::Request<Body>> for Gate {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = GateFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> GateFuture {
        let method = Method::of(request.uri().path());
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let principal = match authorize(&self.state, request.headers(), conn.as_ref(), method) {
            Ok(principal) => principal,
            Err(status) => {
                self.state.counters.call_refused(status.code());
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        let (mut parts, body) = request.into_parts();
        if let (Some(conn), Who::Verified(_)) = (&conn, &principal.who) {
            conn.known.store(true, Ordering::Relaxed);
        }
        parts.extensions.insert(principal);
        let body = match &conn {
            Some(conn) => Body::new(Metered::new(body, &self.budget, conn)),
            None => body,
        };
        let request = http::Request::from_parts(parts, body);
        let call = match method {
            Method::SendStatus => self.servers[0].call(request),
            Method::TellResult => self.servers[1].call(request),
            // A unary call's request is decoded before the handler runs, so
            // its size refusal is rewritten here (streams: in the handlers).
            Method::RemoteCmd => {
                let call = self.servers[2].call(request);
                Box::pin(async move {
                    let mut response = call.await?;
                    too_large_is_exhausted(response.headers_mut(), "server.max_command_message");
                    Ok(response)
                })
            }
            Method::GetTask | Method::Other => self.servers[3].call(request),
        };
        let (state, started) = (Arc::clone(&self.state), std::time::Instant::now());
        let pauses = Arc::clone(&self.pauses);
        Box::pin(async move {
            let mut response = call.await?;
            if method == Method::GetTask
                && let Some(handoff) = response.extensions_mut().remove::<Handoff>()
                && let Some(frames) = handoff.take()
            {
                // Broadcast frames are shared: not counted as unsent.
                response = response.map(|_empty| Body::new(frames));
            } else if let (Method::SendStatus | Method::GetTask, Some(conn)) = (method, conn) {
                // Status replies and queue-mode tasks: this peer's alone.
                response = response.map(|body| {
                    Body::new(Outbound::new(
                        body,
                        conn.outbox,
                        pauses,
                        Arc::clone(&state.counters),
                        conn.remote,
                    ))
                });
            }
            Ok(counted(response, state, method, started))
        })
    }
}

/// Counts a Contact call by its status code: an error before any message
/// (trailers-only) at once; a unary call's outcome from its trailers, with
/// its duration. A stream is counted as it opens (code OK) rather than by
/// its end: its messages pass through no counting wrapper, which would
/// cost fan-out a poll per message.
fn counted(
    response: http::Response<Body>,
    state: Arc<State>,
    method: Method,
    started: std::time::Instant,
) -> http::Response<Body> {
    let unary = method == Method::RemoteCmd;
    if let Some(code) = response.headers().get("grpc-status") {
        let took = unary.then(|| started.elapsed());
        let code = tonic::Code::from_bytes(code.as_bytes());
        state.counters.call_ended(method.index(), code, took);
        return response;
    }
    if !unary {
        state
            .counters
            .call_ended(method.index(), tonic::Code::Ok, None);
        return response;
    }
    response.map(|inner| {
        Body::new(CountedBody {
            inner,
            state: Some(state),
            method,
            started,
        })
    })
}

/// A unary response's body, counted once its trailers (or its end) pass.
struct CountedBody {
    inner: Body,
    /// Taken when counted.
    state: Option<Arc<State>>,
    method: Method,
    started: std::time::Instant,
}

impl CountedBody {
    fn count(&mut self, code: tonic::Code) {
        if let Some(state) = self.state.take() {
            let took = self.started.elapsed();
            state
                .counters
                .call_ended(self.method.index(), code, Some(took));
        }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        // Dropped before its trailers: the client went away.
        self.count(tonic::Code::Cancelled);
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    self.count(tonic::Code::from_bytes(code.as_bytes()));
                }
            }
            Some(Err(status)) => self.count(status.code()),
            None => self.count(tonic::Code::Unknown),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A message over a call's limit (`limit`, the config key) is refused with
/// RESOURCE_EXHAUSTED, as gRPC's status-code table says; tonic says
/// OUT_OF_RANGE. Rewrites a trailers-only response's status in `headers`.
fn too_large_is_exhausted(headers: &mut http::HeaderMap, limit: &str) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if status.code() == tonic::Code::OutOfRange {
        let exhausted = super::contact::too_large(&status, limit);
        // Only fails for a message that cannot be a header; ours can.
        let _ = exhausted.add_header(headers);
    }
}

/// Who is calling and whether they may make this call; on the headers only.
fn authorize(
    state: &State,
    headers: &http::HeaderMap,
    conn: Option<&ConnInfo>,
    method: Method,
) -> Result<Principal, Status> {
    let verifier = state.policy.auth.read();
    let credential = verifier.credential(headers.get(HEADER).map(|v| v.as_bytes()))?;
    if verifier.requires_shared() && credential == Credential::None {
        return Err(Status::unauthenticated(
            "missing token: this server requires `authorization: Bearer <token>` \
             (server.auth_token_file; agents set agent.token_file)",
        ));
    }
    if let Some(end) = conn
        .and_then(|c| c.peer_chain.as_deref())
        .and_then(<[_]>::first)
        && !state.policy.distrusted.read().is_empty()
        && state
            .policy
            .distrusted
            .read()
            .contains(&super::policy::fingerprint(end.as_ref()))
    {
        return Err(Status::unauthenticated(
            "the client certificate is no longer trusted: a reload changed server.tls.client_ca \
             (reconnect with a certificate it trusts)",
        ));
    }
    let config = state.config.borrow();
    let identities = config.has_identities();
    let cert = conn.and_then(|c| c.peer_name.clone());
    let principal = match (cert, credential) {
        (Some(name), Credential::Named(holder)) if holder.name != name => {
            return Err(Status::permission_denied(format!(
                "the token belongs to {:?} but the client certificate to {name:?}",
                holder.name
            )));
        }
        (Some(name), credential) => Principal {
            operator: config.remote_cmd.callers.iter().any(|c| **c == *name)
                || matches!(&credential, Credential::Named(h) if h.role == Role::Operator),
            who: Who::Verified(name),
            agent: true,
            labels: None,
        },
        (None, Credential::Named(holder)) => Principal {
            who: Who::Verified(holder.name),
            agent: holder.role == Role::Agent,
            operator: holder.role == Role::Operator,
            labels: None,
        },
        (None, Credential::None) if verifier.has_tokens() => {
            return Err(Status::unauthenticated(
                "missing token: this server identifies callers by named token \
                 (`authorization: Bearer <token>`; agents set agent.token_file) \
                 or client certificate",
            ));
        }
        // With identities configured, a caller that proves none may call
        // Contact only with the shared secret (an existing setup's agents).
        (None, credential) if identities => Principal {
            who: Who::Anonymous,
            agent: credential == Credential::Shared,
            operator: false,
            labels: None,
        },
        (None, _) => Principal {
            who: Who::Anonymous,
            agent: true,
            // The seed's setup: remoteCMD stays governed by remote_cmd alone.
            operator: true,
            labels: None,
        },
    };
    let principal = with_label(principal, headers, identities)?;
    let allowed = match method {
        Method::SendStatus | Method::GetTask | Method::TellResult => principal.agent,
        Method::RemoteCmd => principal.operator,
        Method::Other => true,
    };
    if !allowed {
        let needs = if method == Method::RemoteCmd {
            "remoteCMD needs the operator role: a named token with role operator, or a \
             certificate name listed in remote_cmd.callers"
        } else {
            "this call needs the agent role: a client certificate or a named token with \
             role agent"
        };
        return Err(Status::permission_denied(needs));
    }
    let mut principal = principal;
    if matches!(method, Method::GetTask | Method::SendStatus)
        && let Some(value) = headers.get(LABELS_HEADER)
    {
        let labels = value
            .to_str()
            .map_err(|_| "holds characters that are not visible ASCII".to_owned())
            .and_then(|text| Labels::from_header(text).map_err(|e| e.to_string()))
            .map_err(|problem| {
                Status::invalid_argument(format!("bad {LABELS_HEADER} header: {problem}"))
            })?;
        principal.labels = Some(Arc::new(labels));
    }
    Ok(principal)
}

/// Longest agent name accepted.
const MAX_AGENT_NAME: usize = crate::auth::MAX_NAME;

/// Applies the `x-contactd-agent` header: a label without identities, a
/// repetition of a verified name, and refused when it contradicts one or
/// claims a name for a caller that proved none.
fn with_label(
    mut principal: Principal,
    headers: &http::HeaderMap,
    identities: bool,
) -> Result<Principal, Status> {
    let Some(value) = headers.get(AGENT_HEADER) else {
        return Ok(principal);
    };
    let label = value
        .to_str()
        .ok()
        .filter(|n| crate::auth::valid_name(n))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "bad {AGENT_HEADER} header: expected an agent name of 1 to {MAX_AGENT_NAME} \
                 visible ASCII characters"
            ))
        })?;
    match &principal.who {
        Who::Verified(name) if **name == *label => {}
        Who::Verified(name) => {
            return Err(Status::permission_denied(format!(
                "{AGENT_HEADER} says {label:?} but the caller is {name:?} (by its certificate \
                 or token): an agent's name is its identity"
            )));
        }
        Who::Anonymous if identities => {
            return Err(Status::permission_denied(format!(
                "{AGENT_HEADER} says {label:?} but the call carries no client certificate or \
                 named token proving it"
            )));
        }
        Who::Anonymous | Who::Label(_) => principal.who = Who::Label(Arc::from(label)),
    }
    Ok(principal)
}

/// A request body that counts the bytes of its unfinished gRPC message
/// against the connection's and the server's budgets, and fails the call
/// with RESOURCE_EXHAUSTED when either is spent. A message that arrives
/// whole in one frame is never counted: it is decoded at once.
struct Metered {
    inner: Body,
    budget: Budget,
    connection: Arc<AtomicUsize>,
    /// The connection's [`ConnInfo::known`].
    known: Arc<AtomicBool>,
    /// Whether what is held for the current message counts against the
    /// anonymous share (decided at its first held byte).
    held_anonymous: bool,
    /// The 5-byte gRPC message header, as far as it has arrived.
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    /// Bytes counted against the budgets for the current message.
    held: usize,
}

impl Metered {
    fn new(inner: Body, budget: &Budget, conn: &ConnInfo) -> Metered {
        Metered {
            inner,
            budget: budget.clone(),
            connection: Arc::clone(&conn.buffered),
            known: Arc::clone(&conn.known),
            held_anonymous: false,
            header: [0; 5],
            header_len: 0,
            remaining: 0,
            held: 0,
        }
    }

    fn release(&mut self) {
        if self.held > 0 {
            self.connection.fetch_sub(self.held, Ordering::Relaxed);
            self.budget.global.fetch_sub(self.held, Ordering::Relaxed);
            if self.held_anonymous {
                self.budget
                    .anonymous
                    .fetch_sub(self.held, Ordering::Relaxed);
            }
            self.held = 0;
        }
    }

    fn reserve(&mut self, n: usize) -> Result<(), Status> {
        if self.held == 0 {
            self.held_anonymous = !self.known.load(Ordering::Relaxed);
        }
        let connection = self.connection.fetch_add(n, Ordering::Relaxed) + n;
        let global = self.budget.global.fetch_add(n, Ordering::Relaxed) + n;
        self.held += n;
        if self.held_anonymous {
            let anonymous = self.budget.anonymous.fetch_add(n, Ordering::Relaxed) + n;
            if anonymous > self.budget.max_anonymous() {
                return Err(Status::resource_exhausted(
                    "unknown connections hold too many unfinished messages (half of \
                     server.max_buffered is kept for known agents): message refused, try \
                     again later",
                ));
            }
        }
        if connection > self.budget.max_connection {
            return Err(Status::resource_exhausted(
                "this connection holds too many unfinished messages \
                 (server.max_connection_buffer): message refused",
            ));
        }
        if global > self.budget.max_global {
            return Err(Status::resource_exhausted(
                "the server holds too many unfinished messages (server.max_buffered): \
                 message refused, try again later",
            ));
        }
        Ok(())
    }

    /// Follows the gRPC framing through `data`.
    fn account(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining == 0 {
                let take = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                data = &data[take..];
                if self.header_len == 5 {
                    self.header_len = 0;
                    let length = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    self.remaining = length as usize;
                }
                continue;
            }
            let take = self.remaining.min(data.len());
            self.remaining -= take;
            data = &data[take..];
            if self.remaining == 0 {
                self.release();
                // A whole message: the connection is known from now on.
                if !self.known.load(Ordering::Relaxed) {
                    self.known.store(true, Ordering::Relaxed);
                }
            } else {
                self.reserve(take)?;
            }
        }
        Ok(())
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.release();
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Err(status) = self.account(data)
        {
            self.release();
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
