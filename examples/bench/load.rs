//! The client side: connections, latency histograms, and fleets of getTask
//! agents (one HTTP/2 connection each).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tonic::codegen::http;

use contactd::proto::contact::{Empty, contact_client::ContactClient};
use futures_util::{StreamExt, stream};
use hdrhistogram::Histogram;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::task::{JoinHandle, JoinSet};
use tonic::transport::{Channel, Endpoint};

use crate::tls::ClientTls;

/// Joins workers that each return their latency histogram and operation
/// count (or an error) into one outcome: the rate since `started`, the
/// latency percentiles and the count.
pub async fn join_workers<E: std::fmt::Display + Send + 'static>(
    mut set: JoinSet<Result<(Histogram<u64>, u64), E>>,
    started: Instant,
) -> anyhow::Result<crate::report::Outcome> {
    let mut hist = histogram();
    let mut count = 0u64;
    let mut outcome = crate::report::Outcome::default();
    while let Some(done) = set.join_next().await {
        match done? {
            Ok((h, n)) => {
                hist.add(&h).context("merging histograms")?;
                count += n;
            }
            Err(e) => outcome.errors.push(format!("{e:#}")),
        }
    }
    outcome
        .figures
        .push(("rate", count as f64 / started.elapsed().as_secs_f64()));
    crate::report::percentiles(&mut outcome, &hist);
    outcome.figures.push(("count", count as f64));
    Ok(outcome)
}

/// Longest one connection attempt may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// A new HTTP/2 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    connect_with(addr, None).await
}

/// A new HTTP/2 connection to `addr`, over TLS with `tls` (the way
/// contactd's own agent and probe connect: `contactd::tls::connect`).
pub async fn connect_with(addr: SocketAddr, tls: Option<&ClientTls>) -> anyhow::Result<Channel> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(CONNECT_LIMIT)
        .tcp_nodelay(true);
    let tls = tls.map(|tls| (Arc::clone(&tls.shared), tls.name.clone()));
    Ok(contactd::tls::connect(endpoint, tls).await?)
}

/// An agent's own HTTP/2 connection, without tonic's `Channel`: its buffer
/// task and reconnect machinery made the single loader CPU, not the server,
/// the limit on how fast 10,000 agents connect. Still tonic's client (the
/// generated one, or the fleet's counting one), over hyper's HTTP/2 client,
/// one connection per agent.
#[derive(Debug, Clone)]
pub struct Conn(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

type ConnFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, hyper::Error>> + Send>>;

impl tower_service::Service<http::Request<tonic::body::Body>> for Conn {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = ConnFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> ConnFuture {
        Box::pin(self.0.send_request(request))
    }
}

/// A new light HTTP/2 connection to `addr`, over TLS with `tls` (a full
/// handshake: the configs disable resumption), and a Contact client on it;
/// and the task driving the connection (it ends when the connection closes;
/// aborting it closes the socket).
pub async fn connect_agent(
    addr: SocketAddr,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
) -> anyhow::Result<(ContactClient<Conn>, JoinHandle<()>)> {
    let (conn, origin, driver) = connect_conn(addr, tls).await?;
    Ok((ContactClient::with_origin(conn, origin), driver))
}

/// The connection under [`connect_agent`]: the connection, its origin and
/// its driving task.
async fn connect_conn(
    addr: SocketAddr,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
) -> anyhow::Result<(Conn, http::Uri, JoinHandle<()>)> {
    connect_conn_from(addr, None, tls).await
}

/// [`connect_conn`] from the loopback address `source`, as an agent on a
/// host of its own.
async fn connect_conn_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
) -> anyhow::Result<(Conn, http::Uri, JoinHandle<()>)> {
    let connect = async {
        match source {
            None => TcpStream::connect(addr).await,
            Some(source) => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(source, 0))?;
                socket.connect(addr).await
            }
        }
    };
    let tcp = tokio::time::timeout(CONNECT_LIMIT, connect)
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    let (send, driver, scheme) = match tls {
        None => {
            let (send, connection) = h2_builder().handshake(TokioIo::new(tcp)).await?;
            // Its error, if any, surfaces in the calls.
            let driver = tokio::spawn(async move {
                let _ = connection.await;
            });
            (send, driver, "http")
        }
        Some((config, name)) => {
            let stream = tokio::time::timeout(
                CONNECT_LIMIT,
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .context("TLS handshake timed out")?
            .map_err(|e| anyhow::anyhow!("TLS: {}", contactd::tls::explain(&e)))?;
            let (send, connection) = h2_builder().handshake(TokioIo::new(stream)).await?;
            let driver = tokio::spawn(async move {
                let _ = connection.await;
            });
            (send, driver, "https")
        }
    };
    let origin = http::Uri::try_from(format!("{scheme}://{addr}"))?;
    Ok((Conn(send), origin, driver))
}

/// HTTP/2 for the load's agents: the protocol's own initial windows
/// (64 KiB) rather than hyper's client defaults (2 MiB per stream, 5 MiB per
/// connection). One load CPU reads for up to 10,000 agents; when it falls
/// behind, a server could otherwise fill 2 MiB of every agent's window, and
/// the load generator held 23 GB before the kernel killed it.
fn h2_builder() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535);
    builder
}

/// An agent of a fleet: its own connection (its client, kept for as long as
/// the stream) and a getTask stream on it whose messages are counted, not
/// decoded. tonic reads each message's gRPC frame as for any client; its
/// bytes are then skipped. Real agents decode on hosts of their own, while
/// here one load CPU reads for 1,000 or 10,000 agents, and decoding (prost,
/// a `String` per task) was most of its work: what the fan-out figures
/// measured was that CPU.
async fn subscribe_counting(
    addr: SocketAddr,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
) -> anyhow::Result<(
    tonic::client::Grpc<Conn>,
    tonic::Streaming<()>,
    JoinHandle<()>,
)> {
    subscribe_counting_from(addr, None, tls).await
}

/// [`subscribe_counting`] from the loopback address `source`.
pub async fn subscribe_counting_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
) -> anyhow::Result<(
    tonic::client::Grpc<Conn>,
    tonic::Streaming<()>,
    JoinHandle<()>,
)> {
    let (conn, origin, driver) = connect_conn_from(addr, source, tls).await?;
    let mut grpc = tonic::client::Grpc::with_origin(conn, origin);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/Contact/getTask");
    let stream = grpc
        .server_streaming(tonic::Request::new(Empty {}), path, Counting)
        .await?
        .into_inner();
    Ok((grpc, stream, driver))
}

/// The codec of [`subscribe_counting`]: prost's encoder for the request,
/// and a decoder that yields `()` for each message and skips its bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Counting;

impl tonic::codec::Codec for Counting {
    type Encode = Empty;
    type Decode = ();
    type Encoder = tonic_prost::ProstEncoder<Empty>;
    type Decoder = Counting;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Counting
    }
}

impl tonic::codec::Decoder for Counting {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf;
        buf.advance(buf.remaining());
        Ok(Some(()))
    }
}

/// Aborts a connection's task when dropped, which closes its socket.
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A histogram of latencies in nanoseconds (1 ns to 60 s, 3 digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Records `since`'s elapsed time.
pub fn record(hist: &mut Histogram<u64>, since: Instant) {
    // Saturates at the upper bound rather than failing.
    hist.saturating_record(since.elapsed().as_nanos() as u64);
}

/// How an agent's getTask stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum End {
    /// Clean end of stream.
    Clean,
    /// An error status with this code.
    Status(tonic::Code),
}

/// N agents, each on its own connection with an open getTask stream, each
/// counting the tasks it receives.
pub struct Fleet {
    /// Tasks received, per agent.
    pub received: Arc<Vec<AtomicU64>>,
    /// Streams that have ended (they should stay open until closed).
    ended: Arc<AtomicU64>,
    /// The readers; each returns how its stream ended.
    pub readers: JoinSet<End>,
    /// Time from the first connect to the last stream established.
    pub established_in: Duration,
    /// Agents that could not connect or subscribe, with the first error.
    pub failed: usize,
    pub first_error: Option<String>,
}

impl Fleet {
    /// Connects `n` agents, at most `parallel` connecting at once, over TLS
    /// with `tls` (agent `i` with its own certificate, in mTLS).
    pub async fn connect(
        addr: SocketAddr,
        n: usize,
        parallel: usize,
        tls: Option<&ClientTls>,
    ) -> Fleet {
        let received: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let started = Instant::now();
        let results: Vec<_> = stream::iter(0..n)
            .map(|i| {
                let tls = tls.map(|tls| (tls.agent(i), tls.name.clone()));
                async move {
                    let (client, stream, driver) = subscribe_counting(addr, tls).await?;
                    anyhow::Ok((i, client, driver, stream))
                }
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        let established_in = started.elapsed();
        let mut readers = JoinSet::new();
        let ended = Arc::new(AtomicU64::new(0));
        let mut failed = 0;
        let mut first_error = None;
        for result in results {
            match result {
                // The connection's task is left to end with the connection,
                // as before the TLS variants.
                Ok((i, client, _driver, mut stream)) => {
                    let received = Arc::clone(&received);
                    let ended = Arc::clone(&ended);
                    readers.spawn(async move {
                        // The connection lives as long as its reader.
                        let _client = client;
                        let end = loop {
                            match stream.message().await {
                                Ok(Some(_)) => {
                                    received[i].fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(None) => break End::Clean,
                                Err(status) => break End::Status(status.code()),
                            }
                        };
                        ended.fetch_add(1, Ordering::Relaxed);
                        end
                    });
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        Fleet {
            received,
            ended,
            readers,
            established_in,
            failed,
            first_error,
        }
    }

    /// Each agent's count now.
    pub fn snapshot(&self) -> Vec<u64> {
        self.received
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Streams that already ended (they should all still be open).
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    /// Closes every connection.
    pub async fn close(mut self) {
        self.readers.shutdown().await;
    }

    /// Waits (at most `limit`) for every stream to end, counting how.
    pub async fn ends(mut self, limit: Duration) -> Vec<(End, usize)> {
        let mut counts = std::collections::HashMap::new();
        let _ = tokio::time::timeout(limit, async {
            while let Some(end) = self.readers.join_next().await {
                if let Ok(end) = end {
                    *counts.entry(end).or_insert(0) += 1;
                }
            }
        })
        .await;
        self.readers.shutdown().await;
        counts.into_iter().collect()
    }
}
