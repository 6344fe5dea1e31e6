//! The operators' web console (`[web] listen`): the fleet, agents, tasks,
//! job runs and jobs as HTML pages, live by server-sent events, with the
//! actions an on-call operator needs (submit, cancel, retry, pause and
//! resume a job, halt and resume a rollout). A translation, like the admin
//! API: every read and action goes through the admin service's own methods
//! or the broker, so the console decides nothing the admin API does not.
//!
//! Files: `mod.rs` (this: the listener's connections, TLS, the response
//! headers), `routes.rs` (what each path does, login, role and CSRF
//! checks), `actions.rs` (what each action does), `pages.rs` (the HTML),
//! `session.rs` (sessions and their cookies), `live.rs` (change detection,
//! event streams, throughput), `assets/` (the one stylesheet and script,
//! compiled in: no CDN, no build step).
//!
//! Whoever reaches the port is a stranger until they log in, and costs
//! little: at most `web.max_connections` connections (and
//! `web.max_connections_per_address` from one address), closed at accept
//! beyond that; a TLS handshake and a request head must each arrive within
//! `web.header_timeout` and fit `web.max_header_size`; a body is read only
//! on the two paths that take one and only up to `web.max_body_size`; and
//! before a login the console answers nothing but the login page, the two
//! assets and redirects. Every page carries a strict Content-Security-Policy
//! (scripts and styles from this origin only, nothing inline).

mod actions;
mod live;
mod pages;
mod routes;
mod session;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_util::task::TaskTracker;

use super::{admin::AdminService, state::State};
use crate::{config::WebConfig, untrusted::Budget};

/// Every response's body: a page at once, or an event stream.
pub(super) type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// How often refused logins are logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What every request of the console shares.
struct Web {
    state: Arc<State>,
    /// The admin API's own methods, called in-process.
    admin: AdminService,
    sessions: session::Sessions,
    live: Arc<live::Live>,
    /// The settings the listener was started with (a change takes a restart).
    config: WebConfig,
    /// Served over TLS: cookies are `Secure`.
    tls: bool,
    /// The TLS config new connections get (replaced by a reload).
    tls_config: super::listener::TlsConfig,
    /// Event streams open at once.
    streams: Arc<Semaphore>,
    /// Refused logins (and certificates a reload distrusted) are logged at
    /// most every [`WARN_EVERY`], with their count: a stranger trying tokens
    /// cannot flood the log.
    refused_logins: Budget,
}

/// One accepted connection, as a request sees it.
#[derive(Debug, Clone)]
struct Peer {
    address: SocketAddr,
    /// The name a verified client certificate carries.
    certificate: Option<Arc<str>>,
    /// The client certificate the connection presented, if any.
    presented: Option<Arc<Presented>>,
}

/// A client certificate presented at a connection's handshake. A reload
/// may change the client CA while the connection stays open (keep-alive):
/// whether the CA in force still trusts it is asked again at the first
/// request after each change of the TLS config, as the Contact port asks
/// of its agents' connections.
#[derive(Debug)]
struct Presented {
    /// End-entity first.
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The SHA-256 of the end-entity certificate (a certificate session is
    /// bound to it).
    fingerprint: [u8; 32],
    /// The TLS config it was last checked against, and the answer.
    checked: parking_lot::Mutex<(Arc<rustls::ServerConfig>, bool)>,
}

impl Web {
    /// Whether the client CA in force still trusts the certificate `presented`
    /// (fails closed: a CA that cannot be read trusts nothing).
    fn still_trusted(&self, presented: &Presented) -> bool {
        let Some(swap) = &self.tls_config else {
            return true;
        };
        if self
            .state
            .policy
            .distrusted
            .read()
            .contains(&presented.fingerprint)
        {
            return false;
        }
        let current = swap.load_full();
        let mut checked = presented.checked.lock();
        if !Arc::ptr_eq(&checked.0, &current) {
            // Out of the config's lock before the CA file is read.
            let tls = self.state.config.borrow().server.tls.clone();
            let trusted = match &tls {
                Some(tls) => crate::tls::client_trusted(tls, &presented.chain).unwrap_or_else(|e| {
                    tracing::error!("web console: cannot check a client certificate against the client CA: {e}");
                    false
                }),
                None => true,
            };
            *checked = (current, trusted);
        }
        checked.1
    }
}

/// Binds `[web] listen` (unless the caller bound it: tests bind port 0)
/// and serves the console on it until the server closes; returns the
/// address served, or `None` without `[web] listen`.
///
/// # Errors
/// The bind's error.
pub(super) fn start(
    config: &crate::config::Config,
    state: &Arc<State>,
    listener: Option<TcpListener>,
    tracker: &TaskTracker,
) -> std::io::Result<Option<SocketAddr>> {
    let web = &config.web;
    let listener = match (listener, web.listen) {
        (Some(listener), _) => listener,
        (None, Some(addr)) => crate::net::bind(addr, 128)?,
        (None, None) => return Ok(None),
    };
    let local = listener.local_addr()?;
    let tls = if web.tls {
        let Some(tls) = state.policy.tls.clone() else {
            // check-config refuses web.tls without [server.tls].
            return Err(std::io::Error::other(
                "web.tls needs [server.tls]: the console serves HTTPS with its certificate",
            ));
        };
        Some(tls)
    } else {
        None
    };
    let shared = Arc::new(Web {
        state: Arc::clone(state),
        admin: AdminService {
            state: Arc::clone(state),
        },
        sessions: session::Sessions::default(),
        live: live::Live::start(Arc::clone(state), web.event_interval, state.closing.clone()),
        config: web.clone(),
        tls: tls.is_some(),
        tls_config: tls.clone(),
        streams: Arc::new(Semaphore::new(web.max_event_streams)),
        refused_logins: Budget::every(WARN_EVERY),
    });
    tracing::info!(addr = %local, tls = tls.is_some(), "serving the web console");
    tracker.spawn(accept(listener, shared, tls));
    Ok(Some(local))
}

/// Accepts connections until the server closes, within the bounds (the
/// accept loop of `net::http`, shared with the metrics listener).
async fn accept(listener: TcpListener, web: Arc<Web>, tls: super::listener::TlsConfig) {
    let names = crate::net::http::Names {
        what: "web console",
        section: "web",
    };
    let bounds = crate::net::http::Bounds {
        max_connections: web.config.max_connections,
        max_connections_per_address: web.config.max_connections_per_address,
    };
    let closing = web.state.closing.clone();
    let serve = |stream, address| {
        let (web, tls, closing) = (Arc::clone(&web), tls.clone(), closing.clone());
        async move {
            tokio::select! {
                () = connection(stream, address, web, tls) => {}
                () = closing.cancelled() => {}
            }
        }
    };
    crate::net::http::accept(listener, names, bounds, closing.clone(), serve).await;
}

/// One accepted connection: its TLS handshake (within `web.header_timeout`)
/// when the console serves TLS, then its requests.
async fn connection(
    stream: tokio::net::TcpStream,
    address: SocketAddr,
    web: Arc<Web>,
    tls: super::listener::TlsConfig,
) {
    let Some(tls) = tls else {
        let peer = Peer {
            address,
            certificate: None,
            presented: None,
        };
        return serve(stream, peer, web).await;
    };
    // The console speaks HTTP/1.1: the server's certificate and client CA
    // as they are now, with its own ALPN.
    let now = tls.load_full();
    let mut config = rustls::ServerConfig::clone(&now);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let header_timeout = web.config.header_timeout;
    let stream = match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(peer = %address, "web console: TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %address, "web console: TLS handshake timed out");
            return;
        }
    };
    let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
    let certificate = chain.first().and_then(crate::tls::identity).map(Arc::from);
    let presented = chain.first().map(|end| {
        Arc::new(Presented {
            fingerprint: super::policy::fingerprint(end.as_ref()),
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            checked: parking_lot::Mutex::new((now, true)),
        })
    });
    let peer = Peer {
        address,
        certificate,
        presented,
    };
    serve(stream, peer, web).await;
}

/// Serves one connection's requests (keep-alive: a browser loads a page,
/// its two assets and its event stream on few connections).
async fn serve<I>(io: I, peer: Peer, web: Arc<Web>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max_buf = usize::try_from(web.config.max_header_size.as_u64()).unwrap_or(usize::MAX);
    let header_timeout = web.config.header_timeout;
    let address = peer.address;
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // A client that closes its end is gone, not half-closed: hyper then
        // reads for the end of the connection while an answer streams, so
        // an event stream whose browser went away ends (and gives back its
        // `web.max_event_streams` slot) at once, not at its next write.
        .half_close(false)
        .header_read_timeout(header_timeout)
        .max_buf_size(max_buf)
        .serve_connection(
            TokioIo::new(io),
            service_fn(move |request| {
                let (web, peer) = (Arc::clone(&web), peer.clone());
                async move { Ok::<_, Infallible>(routes::respond(&web, &peer, request).await) }
            }),
        );
    if let Err(e) = connection.await {
        tracing::debug!(peer = %address, "web console connection: {e}");
    }
}

/// The headers every answer carries: no script or style but this origin's
/// files, no framing, no sniffing, no referrer to other sites, no caching of pages.
fn secure(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        // Not "no-referrer": with it a browser sends `Origin: null` on the
        // console's own forms, and the origin check could not tell them
        // from another site's.
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// A body of `bytes`.
fn full(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into()).boxed()
}

/// An HTML answer.
fn html(status: StatusCode, markup: maud::Markup) -> Response<Body> {
    let mut response = Response::new(full(markup.into_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure(response)
}

/// A plain-text answer.
fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    secure(response)
}

/// A query's or form's field, or "".
fn field<'a>(fields: &'a std::collections::HashMap<String, String>, name: &str) -> &'a str {
    fields.get(name).map_or("", String::as_str)
}

/// "See other": where to go after a form, or to log in.
fn redirect(to: &str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    secure(response)
}
