//! The connections the listening socket accepts (bound by
//! [`crate::net::bind`] with a backlog of our choosing), accepted here so
//! that a connection costs almost nothing until it has proved it speaks our
//! protocol:
//!
//! - a new connection takes a *handshake* slot (`server.max_handshakes`;
//!   while none is free, new connections wait in the backlog,
//!   at most `server.max_handshakes_per_address` of them per source
//!   address, so one peer cannot hold them all), and must finish TLS (when
//!   enabled), then send the HTTP/2 preface and its SETTINGS, within
//!   `server.handshake_timeout`, or it is closed;
//! - only then does it take a *connection* slot (`server.max_connections`),
//!   so connections that never finish their handshake (slowloris) can never
//!   lock out agents;
//! - new connections are admitted at `server.accept_rate` (over
//!   `server.accept_burst`): above it, a plaintext one is answered
//!   UNAVAILABLE with a retry hint and a TLS one waits in the backlog
//!   (`admission.rs`);
//! - the TLS config is read anew for every handshake, so certificates
//!   reloaded on SIGHUP apply to new connections while open ones go on.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::{
    admission::{self, Pace, Turn},
    counters::{Counters, Refusal},
    outbox::Outbox,
};
use crate::{
    net::{AddressSlot, AddressSlots},
    untrusted::{Budget, WARN_EVERY},
};

/// What the handlers learn about a connection (tonic puts it in every
/// request's extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The identity in the client certificate, verified by TLS.
    pub peer_name: Option<Arc<str>>,
    /// That certificate's chain (end-entity first), checked again when a
    /// reload changes the client CA.
    pub peer_chain: Option<Arc<[rustls::pki_types::CertificateDer<'static>]>>,
    /// Bytes of unfinished messages this connection makes the server hold.
    pub buffered: Arc<AtomicUsize>,
    /// Whether the connection is known: its caller proved an identity, or
    /// it has sent a whole message. Unknown ones share half of
    /// `server.max_buffered` (the gate).
    pub known: Arc<AtomicBool>,
    /// What the server has produced for it and still holds.
    pub outbox: Arc<Outbox>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection, counted against `server.max_connections` until
/// it closes. What the handshake check read (the HTTP/2 preface and
/// SETTINGS) is replayed to the HTTP/2 server first.
pub struct Conn {
    io: Io,
    replay: Bytes,
    info: ConnInfo,
    _slot: (OwnedSemaphorePermit, AddressSlot),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("info", &self.info).finish()
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

macro_rules! io {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new(&mut **$io);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.replay.has_remaining() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay[..n]);
            self.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        io!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        io!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        io!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io!(self, io => io.poll_shutdown(cx))
    }
}

/// The connection limits, fixed at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    pub handshake_timeout: Duration,
    /// `server.accept_rate` and `server.accept_burst`.
    pub accept_rate: u32,
    pub accept_burst: u32,
    /// `server.socket_send_buffer`, in bytes.
    pub socket_send_buffer: Option<usize>,
}

/// The TLS config in force, replaced whole on reload; `None`: plaintext.
pub type TlsConfig = Option<Arc<ArcSwap<rustls::ServerConfig>>>;

/// After an accept error such as EMFILE, how long to wait before the next
/// accept (retrying at once would spin while the condition lasts).
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// Connections accepted and through their handshake, waiting for the HTTP/2
/// server to take them.
const READY_QUEUE: usize = 256;

/// One budget of log lines per kind of refusal: one line per
/// [`WARN_EVERY`], with the count of refusals since the last line.
struct Warnings {
    handshakes_full: Budget,
    connections_full: Budget,
    failed: Budget,
    accept_errors: Budget,
    paced: Budget,
    open_files: Budget,
}

impl Default for Warnings {
    fn default() -> Self {
        Warnings {
            paced: Budget::every(WARN_EVERY),
            handshakes_full: Budget::every(WARN_EVERY),
            connections_full: Budget::every(WARN_EVERY),
            failed: Budget::every(WARN_EVERY),
            accept_errors: Budget::every(WARN_EVERY),
            open_files: Budget::every(WARN_EVERY),
        }
    }
}

struct Acceptor {
    listener: TcpListener,
    limits: Limits,
    tls: TlsConfig,
    handshakes: Arc<Semaphore>,
    /// Connections in their handshake, by source address.
    by_address: AddressSlots,
    /// Open connections, by source address.
    open_by_address: AddressSlots,
    connections: Arc<Semaphore>,
    warnings: Arc<Warnings>,
    ready: mpsc::Sender<Conn>,
    stop: CancellationToken,
    /// Where refusals are counted.
    counters: Arc<Counters>,
    /// Admissions at `server.accept_rate`.
    pace: Pace,
    /// Plaintext connections being answered UNAVAILABLE with a hint.
    turning_away: Arc<Semaphore>,
    /// A file held open to be closed at the open-files limit, so that the
    /// connection waiting can be accepted and refused.
    spare: Option<std::fs::File>,
}

/// A file to keep spare (see [`Acceptor::refuse_at_the_file_limit`]).
fn spare_file() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Whether accepting failed for want of a file (this process's limit, or
/// the system's).
fn is_out_of_files(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The connections `listener` accepts, through their handshake, at most
/// `max_connections` open and `max_handshakes` in handshake at once; the
/// excess is closed at once and counted in a warning. Accepting stops when
/// `stop` is cancelled or the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    tls: TlsConfig,
    stop: CancellationToken,
    counters: Arc<Counters>,
) -> impl Stream<Item = io::Result<Conn>> {
    let (ready, rx) = mpsc::channel(READY_QUEUE);
    let acceptor = Acceptor {
        listener,
        handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
        by_address: AddressSlots::default(),
        open_by_address: AddressSlots::default(),
        connections: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
        tls,
        warnings: Arc::default(),
        ready,
        stop,
        counters,
        pace: Pace::new(limits.accept_rate, limits.accept_burst, Instant::now()),
        turning_away: Arc::new(Semaphore::new(limits.max_handshakes)),
        spare: spare_file(),
    };
    tokio::spawn(acceptor.run());
    futures_util::StreamExt::map(ReceiverStream::new(rx), Ok)
}

impl Acceptor {
    async fn run(mut self) {
        loop {
            // Above the pace, a connection waits in the listening socket's
            // backlog: over TLS for its turn (see `admission`); in
            // plaintext until its turn or a free answer slot (an answer
            // with a hint), whichever comes first. Accepting it only to
            // close it unanswered would send its agent into the failure
            // backoff: in a storm of 10,000 that was a thousand agents a
            // second late.
            let mut answer_slot = None;
            if let Turn::After(wait) = self.pace.turn(Instant::now()) {
                let turning_away = Arc::clone(&self.turning_away);
                let answer = async {
                    match self.tls {
                        None => turning_away.acquire_owned().await.ok(),
                        Some(_) => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    slot = answer => answer_slot = slot,
                    () = self.ready.closed() => return,
                    () = self.stop.cancelled() => return,
                }
            }
            // A handshake slot first: while every one is taken, new
            // connections wait in the backlog rather than being accepted
            // only to be closed (which sends agents into their failure
            // backoff).
            let permit = tokio::select! {
                biased;
                () = self.stop.cancelled() => return,
                () = self.ready.closed() => return,
                permit = Arc::clone(&self.handshakes).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                biased;
                () = self.stop.cancelled() => return,
                () = self.ready.closed() => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => self.admit(stream, peer, permit, answer_slot),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) if is_out_of_files(&e) => {
                    if !self.refuse_at_the_file_limit() {
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                    }
                }
                Err(e) => {
                    self.warnings
                        .accept_errors
                        .hit(|n| tracing::warn!(errors = n, "accepting connections failed: {e}"));
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            }
        }
    }

    /// At the open-files limit, `accept` fails and the connection would wait
    /// in the backlog until a file is freed: an agent waits out its connect
    /// timeout, and retries into the same wall. Instead, the file kept
    /// spare for this is given up, the connection accepted and closed at
    /// once (the agent backs off), and the spare taken again; counted and
    /// logged at most every [`WARN_EVERY`]. Whether one was refused.
    fn refuse_at_the_file_limit(&mut self) -> bool {
        self.counters.connection_refused(Refusal::OpenFiles);
        self.warnings.open_files.hit(|n| {
            tracing::warn!(
                refused = n,
                "connections refused: the server is at its open-files limit (raise \
                 LimitNOFILE, or lower server.max_connections so that it refuses them first)"
            );
        });
        let Some(spare) = self.spare.take() else {
            self.spare = spare_file();
            return false;
        };
        drop(spare);
        let refused = match futures_util::FutureExt::now_or_never(self.listener.accept()) {
            // Dropped: closed at once.
            Some(Ok(_)) => true,
            _ => false,
        };
        self.spare = spare_file();
        refused
    }

    /// Starts the handshake of a new connection (holding `permit`, its
    /// handshake slot), if it is within the pace and a slot is free for its
    /// source address; else answers it with a hint (in `answer_slot`, if
    /// one was taken for it).
    fn admit(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        answer_slot: Option<OwnedSemaphorePermit>,
    ) {
        // DEFECT, in test builds only and only when asked for (see
        // `crate::defects`): a few KiB leaked per accepted connection.
        #[cfg(all(feature = "test-defects", debug_assertions))]
        crate::defects::leak_per_connection();
        let _ = stream.set_nodelay(true);
        if let Some(size) = self.limits.socket_send_buffer {
            // Best effort: the kernel clamps it to its own bounds.
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(size);
        }
        let now = Instant::now();
        let plaintext = self.tls.is_none();
        if plaintext && self.pace.turn(now) != Turn::Now {
            self.counters.connection_refused(Refusal::AcceptRate);
            let rate = self.limits.accept_rate;
            self.warnings.paced.hit(|n| {
                tracing::warn!(
                    turned_away = n,
                    accept_rate = rate,
                    "new connections above server.accept_rate: answered UNAVAILABLE with a \
                     retry hint (agents come back at their turn)"
                );
            });
            drop(permit);
            self.turn_away(stream, now, answer_slot);
            return;
        }
        let Some(from_address) = self
            .by_address
            .take(peer.ip(), self.limits.max_handshakes_per_address)
        else {
            self.counters
                .connection_refused(Refusal::HandshakesPerAddress);
            let max = self.limits.max_handshakes_per_address;
            self.warnings.handshakes_full.hit(|n| {
                tracing::warn!(
                    refused = n,
                    address = %peer.ip(),
                    max_handshakes_per_address = max,
                    "connections refused: one address holds server.max_handshakes_per_address \
                     connections in their handshake"
                );
            });
            drop(permit);
            if plaintext {
                self.turn_away(stream, now, answer_slot);
            }
            return;
        };
        self.pace.admit(now);
        let tls = self.tls.as_ref().map(|tls| tls.load_full());
        let open_by_address = self.open_by_address.clone();
        let (limits, connections, warnings, ready, stop, counters) = (
            self.limits,
            Arc::clone(&self.connections),
            Arc::clone(&self.warnings),
            self.ready.clone(),
            self.stop.clone(),
            Arc::clone(&self.counters),
        );
        tokio::spawn(async move {
            let handshake = tokio::select! {
                r = tokio::time::timeout(
                    limits.handshake_timeout,
                    handshake(stream, peer, tls, Arc::clone(&counters.unsent)),
                ) => r,
                () = stop.cancelled() => return,
            };
            drop(permit);
            drop(from_address);
            let conn = match handshake {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    counters.connection_refused(Refusal::Handshake);
                    warnings.failed.hit(|n| {
                        tracing::warn!(%peer, failed = n, "connection handshake failed: {e}");
                    });
                    return;
                }
                Err(_) => {
                    counters.connection_refused(Refusal::HandshakeTimeout);
                    warnings.failed.hit(|n| {
                        tracing::warn!(%peer, failed = n, timeout = ?limits.handshake_timeout,
                            "connection closed: no TLS handshake and HTTP/2 preface within server.handshake_timeout");
                    });
                    return;
                }
            };
            let Ok(slot) = connections.try_acquire_owned() else {
                counters.connection_refused(Refusal::Connections);
                warnings.connections_full.hit(|n| {
                    tracing::warn!(
                        refused = n,
                        max_connections = limits.max_connections,
                        "connections refused: server.max_connections are open"
                    );
                });
                return;
            };
            let Some(open) = open_by_address.take(peer.ip(), limits.max_connections_per_address)
            else {
                counters.connection_refused(Refusal::ConnectionsPerAddress);
                warnings.connections_full.hit(|n| {
                    tracing::warn!(
                        refused = n,
                        address = %peer.ip(),
                        max_connections_per_address = limits.max_connections_per_address,
                        "connections refused: one address holds \
                         server.max_connections_per_address open connections"
                    );
                });
                return;
            };
            let (io, replay, info) = conn;
            let _ = ready
                .send(Conn {
                    io,
                    replay,
                    info,
                    _slot: (slot, open),
                })
                .await;
        });
    }
}

impl Acceptor {
    /// Answers a plaintext connection that cannot be taken now UNAVAILABLE
    /// with a retry hint (its turn at `server.accept_rate`), rather than
    /// closing it: the agent comes back then instead of after a failure
    /// backoff. Such answers hold no handshake slot; at most
    /// `server.max_handshakes` are under way at once: above the pace the
    /// acceptor waits for one (`slot`) before it accepts; one over its
    /// address's share without a free slot is closed.
    fn turn_away(&mut self, stream: TcpStream, now: Instant, slot: Option<OwnedSemaphorePermit>) {
        let Some(slot) = slot.or_else(|| Arc::clone(&self.turning_away).try_acquire_owned().ok())
        else {
            return;
        };
        let after = self.pace.hint(now);
        let limit = self
            .limits
            .handshake_timeout
            .min(admission::TURN_AWAY_LIMIT);
        tokio::spawn(async move {
            admission::turn_away(stream, after, limit).await;
            drop(slot);
        });
    }
}

/// The client connection preface every HTTP/2 connection starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest SETTINGS frame accepted in a handshake (the default frame size).
const MAX_SETTINGS: usize = 16_384;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("TLS: {}", crate::tls::explain(.0))]
    Tls(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(
        "not HTTP/2: the connection did not start with the HTTP/2 preface (is the client speaking {0}?)"
    )]
    NotHttp2(&'static str),
    #[error(
        "the client certificate carries no usable name (a DNS subjectAltName or CN of visible ASCII)"
    )]
    NoName,
}

async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    unsent: Arc<AtomicUsize>,
) -> Result<(Io, Bytes, ConnInfo), HandshakeError> {
    let (mut peer_name, mut peer_chain) = (None, None);
    let mut io = match tls {
        None => Io::Plain(stream),
        Some(config) => {
            let tls = tokio_rustls::TlsAcceptor::from(config)
                .accept(stream)
                .await
                .map_err(HandshakeError::Tls)?;
            if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                let name = crate::tls::identity(cert)
                    .filter(|n| crate::auth::valid_name(n))
                    .ok_or(HandshakeError::NoName)?;
                peer_name = Some(Arc::from(name));
                peer_chain = tls.get_ref().1.peer_certificates().map(|chain| {
                    chain
                        .iter()
                        .map(|c| c.clone().into_owned())
                        .collect::<Arc<[_]>>()
                });
            }
            Io::Tls(Box::new(tls))
        }
    };
    let replay = read_preface(&mut io).await?;
    let info = ConnInfo {
        remote: Some(peer),
        peer_name,
        peer_chain,
        buffered: Arc::default(),
        known: Arc::default(),
        outbox: Arc::new(Outbox::new(unsent)),
    };
    Ok((io, replay, info))
}

/// Reads the HTTP/2 preface and the SETTINGS frame that must follow it, and
/// returns the bytes read, to be replayed.
async fn read_preface(io: &mut Io) -> Result<Bytes, HandshakeError> {
    let mut buf = BytesMut::zeroed(PREFACE.len() + 9);
    read_exact(io, &mut buf).await?;
    if &buf[..PREFACE.len()] != PREFACE {
        let guess = if buf.starts_with(&[0x16, 0x03]) {
            "TLS to a plaintext port"
        } else if buf[..4].iter().all(u8::is_ascii_uppercase) {
            "HTTP/1"
        } else {
            "something else"
        };
        return Err(HandshakeError::NotHttp2(guess));
    }
    let header = &buf[PREFACE.len()..];
    let length =
        usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let (kind, flags) = (header[3], header[4]);
    // SETTINGS (type 4), not an ACK, each setting 6 bytes.
    if kind != 4 || flags & 1 != 0 || length % 6 != 0 || length > MAX_SETTINGS {
        return Err(HandshakeError::NotHttp2("HTTP/2 without SETTINGS first"));
    }
    let start = buf.len();
    buf.resize(start + length, 0);
    read_exact(io, &mut buf[start..]).await?;
    Ok(buf.freeze())
}

async fn read_exact(io: &mut Io, buf: &mut [u8]) -> io::Result<()> {
    match io {
        Io::Plain(io) => io.read_exact(buf).await.map(drop),
        Io::Tls(io) => io.read_exact(buf).await.map(drop),
    }
}
