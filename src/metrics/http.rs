//! The metrics listener: HTTP/1.1, one request per connection, `GET
//! /metrics` only (404 for another path, 405 for another method, 413 for
//! a request with a body). Whoever can reach the port is a stranger: at
//! most `max_connections` are served at once, at most
//! `max_connections_per_address` from one address (the accept loop of
//! `net::http`, shared with the web console), a request's head must arrive
//! within `header_timeout` and fit `max_header_size`, and a connection is
//! closed `timeout` after it was accepted, whatever it is doing (a slow
//! reader included).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Body as _;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Format;
use crate::config::MetricsConfig;

/// The response body type: the whole exposition at once.
type Full = http_body_util::Full<Bytes>;

/// The listener's bounds, from [`MetricsConfig`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub header_timeout: Duration,
    pub timeout: Duration,
    pub max_header_size: usize,
}

impl From<&MetricsConfig> for Limits {
    fn from(c: &MetricsConfig) -> Limits {
        Limits {
            max_connections: c.max_connections,
            max_connections_per_address: c.max_connections_per_address,
            header_timeout: c.header_timeout,
            timeout: c.timeout,
            max_header_size: usize::try_from(c.max_header_size.as_u64()).unwrap_or(usize::MAX),
        }
    }
}

/// Serves `registry` on `listener` until `stop` is cancelled; open
/// connections are then closed (a scrape holds nothing worth waiting for).
pub async fn serve(
    listener: TcpListener,
    limits: Limits,
    registry: Arc<Registry>,
    stop: CancellationToken,
) {
    let names = crate::net::http::Names {
        what: "metrics",
        section: "metrics",
    };
    let bounds = crate::net::http::Bounds {
        max_connections: limits.max_connections,
        max_connections_per_address: limits.max_connections_per_address,
    };
    let serve = |stream, peer| {
        let (registry, stop) = (Arc::clone(&registry), stop.clone());
        async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(false)
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_size)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |request| {
                        let registry = Arc::clone(&registry);
                        async move { Ok::<_, Infallible>(respond(&registry, &request)) }
                    }),
                );
            tokio::select! {
                served = tokio::time::timeout(limits.timeout, connection) => match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, "metrics connection: {e}"),
                    Err(_) => tracing::debug!(%peer, "metrics connection closed: open longer than its timeout"),
                },
                () = stop.cancelled() => {}
            }
        }
    };
    crate::net::http::accept(listener, names, bounds, stop.clone(), serve).await;
}

/// The response to one request; its body is never read.
fn respond(registry: &Registry, request: &Request<Incoming>) -> Response<Full> {
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if !request.body().is_end_stream() {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "a metrics request has no body\n",
        );
    }
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    match super::render(registry, format) {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            response
        }
        Err(_) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be encoded\n",
        ),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Binds the metrics listener at `addr` (port 0: any free port).
///
/// # Errors
/// The bind's error.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::net::bind(addr, 128)
}
