//! The admin socket's connections: at most `admin.max_connections` at
//! once (one more is closed at once, counted, and logged at the 1st, 2nd,
//! 4th … time), and each closed after `admin.idle_timeout` without a byte
//! either way, so idle clients cannot hold the socket's slots.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// One admin connection, holding its slot until it is dropped.
pub(super) struct Conn {
    io: UnixStream,
    _slot: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl Conn {
    fn touch(&mut self) {
        let deadline = Instant::now() + self.timeout;
        self.idle.as_mut().reset(deadline);
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                self.touch();
                Poll::Ready(result)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle for admin.idle_timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if written.is_ready() {
            self.touch();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// The connections `listener` accepts, within the cap.
pub(super) fn incoming(
    listener: UnixListener,
    max_connections: usize,
    idle_timeout: Duration,
) -> impl Stream<Item = io::Result<Conn>> {
    let slots = Arc::new(Semaphore::new(max_connections));
    let refused = Arc::new(AtomicU64::new(0));
    futures_util::stream::unfold(listener, move |listener| {
        let (slots, refused) = (Arc::clone(&slots), Arc::clone(&refused));
        async move {
            loop {
                let io = match listener.accept().await {
                    Ok((io, _)) => io,
                    Err(e) => {
                        // Out of file descriptors, say: not a reason to stop.
                        tracing::warn!("admin socket: cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    drop(io);
                    let n = refused.fetch_add(1, Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(
                            refused_total = n,
                            max_connections,
                            "admin socket: connection refused, admin.max_connections are open"
                        );
                    }
                    continue;
                };
                let conn = Conn {
                    io,
                    _slot: slot,
                    idle: Box::pin(tokio::time::sleep(idle_timeout)),
                    timeout: idle_timeout,
                };
                return Some((Ok(conn), listener));
            }
        }
    })
}
