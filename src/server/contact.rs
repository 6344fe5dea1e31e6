//! The seed's Contact service: status reports, task subscriptions, results
//! and remote commands.
//!
//! Streaming responses are plain streams polled by the connection, with no
//! task or channel per call: a client that goes away drops its stream, and
//! with it everything the call held. Every stream also ends, with
//! UNAVAILABLE, when the server starts shutting down.

use std::{net::SocketAddr, pin::Pin, sync::Arc};

use futures_util::{Stream, stream};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};
use tracing::Instrument;

use super::{
    State,
    callers::CallGuard,
    delivery::{self, Feed},
    shutting_down,
};
use crate::{
    proto::{
        AGENT_HEADER,
        contact::{
            ClientMsg, CmdRequest, CmdResponse, Empty, Result as ResultMsg, ServerMsg,
            contact_server::Contact,
        },
    },
    remote_cmd::Refusal,
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

    /// Identifies the caller and registers the call with the registry.
    fn enter<T>(&self, request: &Request<T>) -> Result<CallGuard, Status> {
        let peer = request.remote_addr();
        let (id, named) = identify(request.metadata(), peer)?;
        Ok(self.state.callers.enter(&id, named, peer))
    }
}

/// Longest agent name accepted.
const MAX_AGENT_NAME: usize = 253;

/// An agent by the name in its header, anyone else by peer address.
fn identify(metadata: &MetadataMap, peer: Option<SocketAddr>) -> Result<(String, bool), Status> {
    let Some(value) = metadata.get(AGENT_HEADER) else {
        return Ok((
            peer.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            false,
        ));
    };
    let name = value.to_str().ok().filter(|n| {
        (1..=MAX_AGENT_NAME).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_graphic())
    });
    match name {
        Some(name) => Ok((name.to_owned(), true)),
        None => Err(Status::invalid_argument(format!(
            "bad {AGENT_HEADER} header: expected an agent name of 1 to {MAX_AGENT_NAME} \
             visible ASCII characters"
        ))),
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
        let caller = self.enter(&request)?;
        let span = tracing::info_span!("sendStatus", peer = %caller.id);
        let closing = self.state.closing.clone();
        let state = (request.into_inner(), caller, span);
        let replies = stream::unfold(Some(state), move |state| {
            let closing = closing.clone();
            async move {
                let (mut inbound, caller, span) = state?;
                let next = tokio::select! {
                    biased;
                    () = closing.cancelled() => return Some((Err(shutting_down()), None)),
                    next = inbound.message() => next,
                };
                match next {
                    Ok(Some(msg)) => {
                        span.in_scope(|| tracing::debug!(status = %msg.msg, "status received"));
                        caller.record_status(&msg.msg);
                        let reply = ResultMsg {
                            ret: format!("server received: {}", msg.msg),
                            ..ResultMsg::default()
                        };
                        Some((Ok(reply), Some((inbound, caller, span))))
                    }
                    Ok(None) => None,
                    Err(status) => {
                        span.in_scope(
                            || tracing::debug!(%status, "status stream ended by the client"),
                        );
                        None
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    type getTaskStream = ResponseStream<ServerMsg>;

    async fn get_task(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::getTaskStream>, Status> {
        let caller = self.enter(&request)?;
        let span = tracing::info_span!("getTask", peer = %caller.id);
        let feed = Feed::open(&self.state, &caller);
        span.in_scope(|| tracing::debug!("subscribed to tasks"));
        let closing = self.state.closing.clone();
        let tasks = stream::unfold(Some((feed, caller, span)), move |state| {
            let closing = closing.clone();
            async move {
                let (mut feed, caller, span) = state?;
                let task = tokio::select! {
                    biased;
                    () = closing.cancelled() => return Some((Err(shutting_down()), None)),
                    task = feed.next(&caller).instrument(span.clone()) => task,
                };
                Some((Ok(task), Some((feed, caller, span))))
            }
        });
        Ok(Response::new(Box::pin(tasks)))
    }

    async fn tell_result(
        &self,
        request: Request<Streaming<ResultMsg>>,
    ) -> Result<Response<Empty>, Status> {
        let caller = self.enter(&request)?;
        let span = tracing::info_span!("tellResult", peer = %caller.id);
        let mut inbound = request.into_inner();
        async {
            loop {
                let next = tokio::select! {
                    biased;
                    () = self.state.closing.cancelled() => return Err(shutting_down()),
                    next = inbound.message() => next,
                };
                let Some(result) = next? else {
                    return Ok(Response::new(Empty {}));
                };
                delivery::record_result(&self.state, &caller, &result);
            }
        }
        .instrument(span)
        .await
    }

    async fn remote_cmd(
        &self,
        request: Request<CmdRequest>,
    ) -> Result<Response<CmdResponse>, Status> {
        let caller = self.enter(&request)?;
        let request = request.into_inner();
        let span = tracing::info_span!("remoteCMD", peer = %caller.id, index = request.index);
        async {
            let runner = self.state.runner();
            let started = std::time::Instant::now();
            let outcome = runner.run(&request.cmd_str, &self.state.kill).await;
            match &outcome {
                Ok(out) => tracing::info!(
                    cmd = %request.cmd_str,
                    note = %request.log,
                    success = out.success,
                    elapsed = ?started.elapsed(),
                    "remote command finished"
                ),
                Err(refusal) => tracing::warn!(cmd = %request.cmd_str, note = %request.log, %refusal, "remote command refused"),
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
