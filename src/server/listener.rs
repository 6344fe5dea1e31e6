//! The listening socket and the connections it accepts: bound here so the
//! listen backlog is ours to choose (the standard library's 128 overflows
//! when thousands of agents reconnect at once after a restart), and accepted
//! here so open connections are bounded and accept errors do not spin.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_util::{Stream, stream};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Binds `addr` with a listen queue of `backlog` connections (the kernel
/// caps it at `net.core.somaxconn`). An IPv6 wildcard also accepts IPv4.
///
/// Must be called inside a tokio runtime.
///
/// # Errors
/// The socket calls' errors, such as `AddrInUse`.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restarted server bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// A connection counted against `server.max_connections` until it closes.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// After an accept error such as EMFILE, how long to wait before the next
/// accept (retrying at once would spin while the condition lasts).
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// How often refusals and accept errors are logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    /// Refused or failed accepts since the last warning, and when it was.
    unreported: u64,
    warned: Option<Instant>,
}

impl Acceptor {
    fn warn(&mut self, what: impl FnOnce(u64)) {
        self.unreported += 1;
        if self.warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            what(self.unreported);
            self.unreported = 0;
            self.warned = Some(Instant::now());
        }
    }
}

/// The connections `listener` accepts, with TCP_NODELAY, at most `max`
/// open at once: beyond that a new connection is closed at once (and
/// counted in a warning) instead of running the process out of file
/// descriptors.
pub fn incoming(listener: TcpListener, max: usize) -> impl Stream<Item = io::Result<Counted>> {
    let acceptor = Acceptor {
        listener,
        slots: Arc::new(Semaphore::new(max)),
        max,
        unreported: 0,
        warned: None,
    };
    stream::unfold(acceptor, |mut acceptor| async move {
        loop {
            match acceptor.listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    match Arc::clone(&acceptor.slots).try_acquire_owned() {
                        Ok(slot) => {
                            return Some((
                                Ok(Counted {
                                    stream,
                                    _slot: slot,
                                }),
                                acceptor,
                            ));
                        }
                        Err(_) => {
                            drop(stream);
                            let max = acceptor.max;
                            acceptor.warn(|n| {
                                tracing::warn!(
                                    refused = n,
                                    max_connections = max,
                                    "connections refused: server.max_connections are open"
                                );
                            });
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    acceptor
                        .warn(|n| tracing::warn!(errors = n, "accepting connections failed: {e}"));
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            }
        }
    })
}
