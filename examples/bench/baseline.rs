//! The bare baseline: the same generated Contact service with nothing but
//! the calls themselves. No config, no logging, no bookkeeping, no shutdown
//! handling (SIGTERM's default action ends it). The bench runs it as its own
//! process (`bench baseline-server`) so it is measured exactly like contactd.
//!
//! With `--tls FILE` (the TLS variants) it terminates TLS with the rustls
//! server config contactd builds from the same `[server.tls]` table
//! (`contactd::tls::server_config`: same certificate, same client
//! verification, ALPN h2), in the barest accept loop: one task per
//! connection doing the handshake, then straight to tonic. No handshake
//! limits, no peeking at the HTTP/2 preface, no identity.

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use contactd::config::ServerTlsConfig;
use contactd::proto::contact::{
    ClientMsg, CmdRequest, CmdResponse, Empty, Result as ResultMsg, ServerMsg,
    contact_server::{Contact, ContactServer},
};
use futures_util::{Stream, StreamExt, stream};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    transport::server::{Connected, TcpIncoming},
};

/// `bench baseline-server`: what the baseline serves.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 picks a free one. The address is printed
    /// on stderr as `serving addr=IP:PORT`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Time between two generated task batches (contactd's default: 40s).
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Tasks per batch (contactd's default: 10).
    #[arg(long, default_value_t = 10)]
    batch: u32,
    /// Capacity of the task broadcast channel (contactd's `tasks.retain`).
    #[arg(long, default_value_t = 1000)]
    retain: usize,
    /// Serve TLS as contactd's `[server.tls]` table in this TOML file says.
    #[arg(long, value_name = "FILE")]
    tls: Option<PathBuf>,
}

/// Longest a TLS handshake may take (contactd's default
/// `server.handshake_timeout`).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// An accepted TLS connection, as tonic wants it.
struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The connections `listener` accepts, each through its TLS handshake.
fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                // A failed accept is skipped; one that would fail again at
                // once (out of files) is not retried in a tight loop.
                Err(e) => {
                    if e.kind() != io::ErrorKind::ConnectionAborted {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(Ok(tls)) =
                    tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(tcp)).await
                {
                    let _ = tx.send(Ok(TlsConn(tls))).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct Bare {
    tasks: broadcast::Sender<ServerMsg>,
    results: AtomicU64,
}

#[tonic::async_trait]
impl Contact for Bare {
    type sendStatusStream = ResponseStream<ResultMsg>;

    async fn send_status(
        &self,
        request: Request<Streaming<ClientMsg>>,
    ) -> Result<Response<Self::sendStatusStream>, Status> {
        // The same reply text as contactd, so both put the same bytes on the wire.
        let replies = request.into_inner().map(|msg| {
            msg.map(|msg| ResultMsg {
                ret: format!("server received: {}", msg.msg),
                ..ResultMsg::default()
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }

    type getTaskStream = ResponseStream<ServerMsg>;

    async fn get_task(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::getTaskStream>, Status> {
        let tasks = stream::unfold(self.tasks.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(task) => return Some((Ok(task), rx)),
                    // A slow subscriber skips ahead, as contactd's do.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(tasks)))
    }

    async fn tell_result(
        &self,
        request: Request<Streaming<ResultMsg>>,
    ) -> Result<Response<Empty>, Status> {
        let mut inbound = request.into_inner();
        while inbound.message().await?.is_some() {
            self.results.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(Empty {}))
    }

    async fn remote_cmd(
        &self,
        request: Request<CmdRequest>,
    ) -> Result<Response<CmdResponse>, Status> {
        // Runs the command as contactd does (no shell, output captured), but
        // with no allow-list, no limits, no process group and no timeout.
        let request = request.into_inner();
        let mut words = request.cmd_str.split_whitespace();
        let program = words
            .next()
            .ok_or_else(|| Status::invalid_argument("empty command"))?;
        let output = tokio::process::Command::new(program)
            .args(words)
            .stdin(Stdio::null())
            .output()
            .await;
        let (success, res) = match output {
            Ok(out) => {
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                (out.status.success(), text)
            }
            Err(e) => (false, e.to_string()),
        };
        Ok(Response::new(CmdResponse {
            index: request.index,
            success,
            res,
        }))
    }
}

/// Publishes `batch` tasks every `interval`, the first batch at once.
async fn generate(tasks: broadcast::Sender<ServerMsg>, interval: Duration, batch: u32) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut id = 0u64;
    // A server run's id drawn like contactd's (a random u64), so each task
    // is the same size on the wire as contactd's: about 9 bytes of the ~31
    // (it was 1, and contactd's agents read ~35 % more bytes per task).
    let epoch = u64::from_ne_bytes(contactd::secret_random::<8>()).max(1);
    loop {
        ticks.tick().await;
        for _ in 0..batch {
            id += 1;
            // Like contactd's default template "task:{rand}" (100..=200).
            let task = format!("task:{}", 100 + id % 101);
            // No subscriber is not an error for a broadcast.
            let _ = tasks.send(ServerMsg {
                task,
                id,
                attempt: 1,
                epoch,
                retry: 0,
            });
        }
    }
}

/// Serves until the process is killed.
pub fn serve(args: &Args) -> anyhow::Result<()> {
    // The same runtime contactd builds.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Read before serving, like contactd's config.
    let tls = match &args.tls {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let table: ServerTlsConfig =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            Some(contactd::tls::server_config(&table)?)
        }
        None => None,
    };
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen).await?;
        let addr = listener.local_addr()?;
        let (tasks, _) = broadcast::channel(args.retain.max(1));
        if args.batch > 0 {
            tokio::spawn(generate(tasks.clone(), args.interval, args.batch));
        }
        let service = ContactServer::new(Bare {
            tasks,
            results: AtomicU64::new(0),
        });
        eprintln!("serving addr={addr}");
        let server = tonic::transport::Server::builder().add_service(service);
        match tls {
            Some(config) => {
                server
                    .serve_with_incoming(tls_incoming(listener, config))
                    .await?;
            }
            None => {
                server
                    .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
                    .await?;
            }
        }
        Ok(())
    })
}
