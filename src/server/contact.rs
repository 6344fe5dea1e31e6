//! The seed's Contact service: status reports, task subscriptions, results
//! and remote commands.
//!
//! Streaming responses are plain streams polled by the connection, with no
//! task or channel per call: a client that goes away drops its stream, and
//! with it everything the call held. Every stream also ends, with
//! UNAVAILABLE, when the server starts shutting down.

use std::{
    future::{self, Future},
    pin::Pin,
    sync::{Arc, atomic::Ordering::Relaxed},
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{Stream, stream};
use http_body::Frame;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{
    callers::{CallGuard, Caller},
    counters::CmdOutcome,
    listener::ConnInfo,
    shutting_down,
    state::State,
};
use crate::{
    auth::Principal,
    proto::contact::{
        ClientMsg, CmdRequest, CmdResponse, Empty, Result as ResultMsg, ServerMsg,
        contact_server::Contact,
    },
    remote_cmd::Refusal,
    tasks::{Acked, Feed},
    untrusted::shown,
};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Contact service over the server's shared state.
#[derive(Debug, Clone)]
pub struct ContactService {
    state: Arc<State>,
}

impl ContactService {
    pub(super) fn new(state: Arc<State>) -> ContactService {
        ContactService { state }
    }

    /// Registers the call of the caller the gate identified; for the
    /// streams an agent opens when it connects (`labels`), with the labels
    /// it says it has.
    fn enter<T>(&self, request: &Request<T>, labels: bool) -> Result<CallGuard, Status> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .ok_or_else(|| Status::internal("call did not pass the gate"))?;
        let conn = request.extensions().get::<ConnInfo>();
        let peer = conn.and_then(|conn| conn.remote);
        Ok(match principal.who.name() {
            Some(name) => {
                let caller = self.state.callers.enter(name, true, peer);
                caller.set_chain(conn.and_then(|c| c.peer_chain.clone()));
                if labels {
                    let claimed = principal.labels.clone().unwrap_or_default();
                    let policy = &self.state.policy;
                    caller.claim(claimed, |name, claimed| policy.labels_for(name, claimed));
                }
                caller
            }
            // By IP, not IP and port: each reconnect of a seed client comes
            // from a new port, and would otherwise be a new entry.
            None => {
                let id = peer.map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
                self.state.callers.enter(&id, false, peer)
            }
        })
    }
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Status {
        let message = refusal.to_string();
        match refusal {
            Refusal::Disabled => Status::failed_precondition(message),
            Refusal::NotAllowed(_) => Status::permission_denied(message),
            Refusal::BadCommand(_) => Status::invalid_argument(message),
            Refusal::Busy { .. } => Status::resource_exhausted(message),
        }
    }
}

#[tonic::async_trait]
impl Contact for ContactService {
    type sendStatusStream = ResponseStream<ResultMsg>;

    async fn send_status(
        &self,
        request: Request<Streaming<ClientMsg>>,
    ) -> Result<Response<Self::sendStatusStream>, Status> {
        let caller = self.enter(&request, true)?;
        // DEBUG, as the only lines logged under it: a stream's span lives as
        // long as the stream, and at the default level an INFO one held
        // about 330 bytes per agent for nothing shown.
        let span = tracing::debug_span!("sendStatus", peer = %caller.id);
        let closing = caller.stream_token();
        let replies = StatusReplies {
            inbound: request.into_inner(),
            caller,
            span,
            cancelled: Box::pin(closing.clone().cancelled_owned()),
            closing,
            done: false,
        };
        Ok(Response::new(Box::pin(replies)))
    }

    type getTaskStream = ResponseStream<ServerMsg>;

    async fn get_task(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::getTaskStream>, Status> {
        let caller = self.enter(&request, true)?;
        // DEBUG, as sendStatus's.
        let span = tracing::debug_span!("getTask", peer = %caller.id);
        // The tasks it runs at once, if it said (queue mode hands it no more).
        let cap = crate::proto::announced_concurrency(request.metadata());
        let (feed, missed) = self.state.broker.subscribe(caller.agent(), cap).await;
        caller.missed.fetch_add(missed, Relaxed);
        tracing::debug!(parent: &span, "subscribed to tasks");
        let closing = caller.stream_token();
        if feed.is_broadcast() {
            let body = TaskFrames {
                feed,
                caller,
                _span: span,
                closing,
                idle: None,
                done: false,
            };
            // The stream tonic gets is empty: the gate sends `body` instead.
            let mut response = Response::new(Box::pin(stream::empty()) as Self::getTaskStream);
            response
                .extensions_mut()
                .insert(Handoff(Arc::new(parking_lot::Mutex::new(Some(body)))));
            return Ok(response);
        }
        // Queue mode. Boxed: unfold moves its state into each message's
        // future and out again.
        let state = Box::new((feed, caller, span, Closing::new(closing)));
        let tasks = stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            let (feed, caller, _, closing) = &mut *state;
            let Some(task) = unless_closing(closing, feed.next(), || {}).await else {
                return Some((Err(ended(caller)), None));
            };
            caller.delivered.fetch_add(1, Relaxed);
            Some((Ok(task), Some(state)))
        });
        Ok(Response::new(Box::pin(tasks)))
    }

    async fn tell_result(
        &self,
        request: Request<Streaming<ResultMsg>>,
    ) -> Result<Response<Empty>, Status> {
        let caller = self.enter(&request, false)?;
        let span = tracing::info_span!("tellResult", peer = %caller.id);
        let mut inbound = request.into_inner();
        let mut closing = Closing::new(caller.stream_token());
        let mut cancelled = std::pin::pin!(closing.token.clone().cancelled_owned());
        let agent = caller.agent();
        let mut tally = Tally::new(&caller);
        // One poll takes every result that is there, with no future made
        // per result: awaiting `message()` through `unless_closing` moved
        // each result (in a Status-sized slot) through four futures, a
        // fifth of ingest's CPU. The token's future is polled only when
        // no result is there (and its flag every `CHECK_EVERY` results).
        let taken = future::poll_fn(|cx| {
            loop {
                let result = match Pin::new(&mut inbound).poll_next(cx) {
                    Poll::Ready(Some(Ok(result))) => result,
                    Poll::Ready(Some(Err(status))) => {
                        return Poll::Ready(Err(inbound_error(
                            status,
                            "server.max_result_message",
                        )));
                    }
                    Poll::Ready(None) => return Poll::Ready(Ok(Response::new(Empty {}))),
                    Poll::Pending => {
                        tally.flush();
                        return match cancelled.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(Err(ended(&caller))),
                            Poll::Pending => Poll::Pending,
                        };
                    }
                };
                if closing.seen() {
                    return Poll::Ready(Err(ended(&caller)));
                }
                let kept = caller.kept(&result.ret);
                tally.count(
                    &self.state.broker.ack(&agent, &result, kept),
                    result.task_id,
                );
            }
        });
        taken.instrument(span).await
    }

    async fn remote_cmd(
        &self,
        request: Request<CmdRequest>,
    ) -> Result<Response<CmdResponse>, Status> {
        let caller = self.enter(&request, false)?;
        let request = request.into_inner();
        let span = tracing::info_span!("remoteCMD", peer = %caller.id, index = request.index);
        async {
            let runner = self.state.policy.runner();
            let started = std::time::Instant::now();
            let outcome = runner.run(&request.cmd_str, &self.state.kill).await;
            self.state
                .counters
                .command(cmd_outcome(&outcome), started.elapsed());
            match &outcome {
                Ok(out) => tracing::info!(
                    cmd = %shown(&request.cmd_str),
                    note = %shown(&request.log),
                    success = out.success,
                    elapsed = ?started.elapsed(),
                    "remote command finished"
                ),
                // A caller can send refusals as fast as the network allows:
                // only a few per caller (and overall) reach the log.
                Err(refusal) => {
                    if let Some(left_out) = self.state.callers.admit_refusal(&caller) {
                        tracing::warn!(
                            cmd = %shown(&request.cmd_str),
                            note = %shown(&request.log),
                            %refusal,
                            left_out,
                            "remote command refused"
                        );
                    }
                }
            }
            let out = outcome?;
            Ok(Response::new(CmdResponse {
                index: request.index,
                success: out.success,
                res: out.output,
            }))
        }
        .instrument(span)
        .await
    }
}

/// How a remote command ended, for the metrics.
fn cmd_outcome(outcome: &Result<crate::remote_cmd::CmdOutput, Refusal>) -> CmdOutcome {
    match outcome {
        Ok(out) if out.success => CmdOutcome::Ok,
        Ok(out) if out.timed_out => CmdOutcome::Timeout,
        Ok(_) => CmdOutcome::Failed,
        Err(Refusal::Busy { .. }) => CmdOutcome::Exhausted,
        Err(Refusal::Disabled | Refusal::NotAllowed(_) | Refusal::BadCommand(_)) => {
            CmdOutcome::Denied
        }
    }
}

/// The most a broadcast stream sends in one DATA frame: HTTP/2's smallest
/// allowed `SETTINGS_MAX_FRAME_SIZE`, so h2 never splits one for its size.
const MAX_FRAME: usize = 16 * 1024;

/// A broadcast `getTask` response body: the feed's ready tasks as DATA
/// frames of shared bytes ([`crate::proto::wire`]); trailers
/// with UNAVAILABLE when the server closes. It is what tonic's encoder
/// would send for the same messages, without a stream of messages, an
/// encode buffer or a copy per agent. No future is made while tasks are
/// ready; only an idle stream holds one.
pub(super) struct TaskFrames {
    feed: Feed,
    caller: CallGuard,
    /// The call's span, kept for as long as the stream.
    _span: tracing::Span,
    closing: CancellationToken,
    /// Set while no task is ready: resolves `true` on a publish, `false`
    /// when the server closes.
    idle: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
    done: bool,
}

impl TaskFrames {
    /// Ends the stream with `status` in its trailers.
    fn end(&mut self, status: &Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        // Fails only for a message that cannot be a header; ours can.
        let _ = status.add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl http_body::Body for TaskFrames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(idle) = &mut this.idle {
                let published = std::task::ready!(idle.as_mut().poll(cx));
                this.idle = None;
                if !published {
                    return this.end(&ended(&this.caller));
                }
            }
            if this.closing.is_cancelled() {
                return this.end(&ended(&this.caller));
            }
            let frame = this.feed.try_next_frame(MAX_FRAME);
            let missed = this.feed.take_missed();
            if missed > 0 {
                this.caller.missed.fetch_add(missed, Relaxed);
            }
            if let Some((data, count)) = frame {
                this.caller.delivered.fetch_add(count, Relaxed);
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let Some(wait) = this.feed.published_or_closing(this.closing.clone()) else {
                // Not a broadcast feed (never made so): end, not spin.
                return this.end(&Status::internal("not a broadcast stream"));
            };
            this.idle = Some(Box::pin(wait));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A broadcast `getTask` stream's body, handed from the handler to the
/// gate in the response's extensions. The generated code can only send a
/// stream of messages, each encoded into the stream's own buffer; the gate
/// sends this body in its place, with the headers tonic made.
#[derive(Clone)]
pub(super) struct Handoff(Arc<parking_lot::Mutex<Option<TaskFrames>>>);

impl Handoff {
    /// The body, once.
    pub(super) fn take(&self) -> Option<TaskFrames> {
        self.0.lock().take()
    }
}

/// sendStatus's replies: one per status report, in order, until the client
/// ends its stream (or fails), or the server starts shutting down (then one
/// UNAVAILABLE).
///
/// Written by hand rather than with `stream::unfold`: the call's state stays
/// in place and no future is built per message. The unfold version moved the
/// whole state in and out of a new future for every status, and cost ~35 %
/// more server CPU per status than a bare tonic echo (status-pipelined).
struct StatusReplies {
    inbound: Streaming<ClientMsg>,
    caller: CallGuard,
    span: tracing::Span,
    /// This stream's own child of the server's closing token.
    closing: CancellationToken,
    /// Registered on `closing` the first time the stream has to wait, and
    /// kept: polled only when no status is ready.
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl Stream for StatusReplies {
    type Item = Result<ResultMsg, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.closing.is_cancelled() {
            this.done = true;
            return Poll::Ready(Some(Err(ended(&this.caller))));
        }
        match Pin::new(&mut this.inbound).poll_next(cx) {
            Poll::Ready(Some(Ok(msg))) => {
                // `parent:` rather than entering the span: entering and
                // leaving it cost more per message than the reply itself,
                // even with the event disabled.
                tracing::debug!(parent: &this.span, status = %shown(&msg.msg), "status received");
                this.caller.record_status(&msg.msg);
                Poll::Ready(Some(Ok(ResultMsg {
                    ret: format!("server received: {}", msg.msg),
                    ..ResultMsg::default()
                })))
            }
            Poll::Ready(Some(Err(status))) => {
                tracing::debug!(parent: &this.span, %status, "status stream ended by the client");
                this.done = true;
                // A message that cannot be decoded, or is too large, gets a
                // status that says so (a reset stream never reads it).
                Poll::Ready(Some(Err(inbound_error(
                    status,
                    "server.max_status_message",
                ))))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => match this.cancelled.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.done = true;
                    Poll::Ready(Some(Err(ended(&this.caller))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// The status a call ends with when reading the client's next message
/// failed. An undecodable message stays INTERNAL (gRPC's status-code table
/// says so for parse errors); one over the call's size limit (`limit`, the
/// config key), which tonic reports as OUT_OF_RANGE, is RESOURCE_EXHAUSTED,
/// as the table says.
fn inbound_error(status: Status, limit: &str) -> Status {
    match status.code() {
        tonic::Code::OutOfRange => too_large(&status, limit),
        _ => status,
    }
}

/// RESOURCE_EXHAUSTED for tonic's OUT_OF_RANGE `status` about a message
/// over the limit `limit` (its config key).
pub(super) fn too_large(status: &Status, limit: &str) -> Status {
    Status::resource_exhausted(format!("message too large: {} ({limit})", status.message()))
}

/// How a stream ends when its token is cancelled: UNAVAILABLE when the
/// server shuts down (agents reconnect), UNAUTHENTICATED when a reload
/// revoked the caller's credential.
fn ended(caller: &Caller) -> Status {
    if caller.is_revoked() {
        Status::unauthenticated(
            "the caller's credential was revoked (a reload removed its token): its streams \
             are ended",
        )
    } else {
        shutting_down()
    }
}

/// A stream's closing token, checked cheaply: while its messages come
/// without a pause, on the first and then every [`CHECK_EVERY`]th (each
/// check takes the token's lock); whenever the stream waits, through the
/// token's future (see [`unless_closing`]).
struct Closing {
    token: CancellationToken,
    calls: u32,
}

/// Messages that come without a pause between two checks of a stream's
/// closing token.
const CHECK_EVERY: u32 = 64;

impl Closing {
    fn new(token: CancellationToken) -> Closing {
        Closing { token, calls: 0 }
    }

    /// Whether the token is cancelled, if it is due to be checked.
    fn seen(&mut self) -> bool {
        self.calls = self.calls.wrapping_add(1);
        self.calls % CHECK_EVERY == 1 && self.token.is_cancelled()
    }
}

/// `next`'s output, or `None` once `closing` is cancelled; `before_wait`
/// runs when `next` is not ready.
///
/// `next` is polled first, so a message or task that is already there costs
/// a counter (and every [`CHECK_EVERY`]th a flag check), and a waiter is
/// registered on the token (a lock, a list insert and removal) only when
/// `next` has to wait: polling the token first on every message took ~15 %
/// of the server's CPU in the fanout benchmark, and its flag check on every
/// message 7 % in ingest. The checks up front still end a stream whose
/// `next` is always ready. Each stream passes its own child token, so these
/// locks are not shared.
async fn unless_closing<T>(
    closing: &mut Closing,
    next: impl Future<Output = T>,
    before_wait: impl FnOnce(),
) -> Option<T> {
    if closing.seen() {
        return None;
    }
    let mut next = std::pin::pin!(next);
    // The common case: `next` is ready, and no cancellation future is made.
    if let Poll::Ready(value) = future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await {
        return Some(value);
    }
    before_wait();
    tokio::select! {
        biased;
        value = next => Some(value),
        () = closing.token.cancelled() => None,
    }
}

/// The results of one tellResult stream, added to its caller's counts in
/// batches: at most [`TALLY_EVERY`] messages apart, whenever the stream
/// waits for more (so a quiet agent's counts are current) and when it
/// ends. A connection's streams share those counts: an atomic add per
/// message on a cache line two cores share was 4 % of ingest's CPU.
struct Tally<'a> {
    caller: &'a Caller,
    acked: u64,
    failed: u64,
    refused: u64,
    /// The latest ack refused, and why (for the log).
    refusal: (u64, &'static str),
    unflushed: u32,
}

/// Most results counted on a stream before its caller's counts are
/// brought up to date.
const TALLY_EVERY: u32 = 256;

impl<'a> Tally<'a> {
    fn new(caller: &'a Caller) -> Tally<'a> {
        Tally {
            caller,
            acked: 0,
            failed: 0,
            refused: 0,
            refusal: (0, ""),
            unflushed: 0,
        }
    }

    /// Counts what the broker made of the result for `task_id`.
    fn count(&mut self, acked: &Acked, task_id: u64) {
        match *acked {
            Acked::Counted { ok: true } => self.acked += 1,
            Acked::Counted { ok: false } => self.failed += 1,
            Acked::Refused(reason) => {
                self.refused += 1;
                self.refusal = (task_id, reason);
            }
            Acked::Ignored => {}
        }
        self.unflushed += 1;
        if self.unflushed >= TALLY_EVERY {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.unflushed = 0;
        for (count, total) in [
            (&mut self.acked, &self.caller.acked),
            (&mut self.failed, &self.caller.failed),
        ] {
            if *count > 0 {
                total.fetch_add(std::mem::take(count), Relaxed);
            }
        }
        if self.refused > 0 {
            let (task_id, reason) = self.refusal;
            self.caller
                .refuse_acks(std::mem::take(&mut self.refused), task_id, reason);
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
