//! The fault proxy: a userspace TCP proxy between agents and servers (this
//! kernel has no netem). One route per listening port; an agent (or a group
//! of in-process agents) is given its route's port as its server, so a
//! fault can hit a chosen set of agents. Each route can add latency and
//! jitter, cap bandwidth, reset its connections, blackhole them (bytes
//! vanish, sockets stay open: half-open connections) and be partitioned
//! (new connections accepted and left silent, as a SYN that is never
//! answered would leave them; existing ones blackholed). The upstream
//! address can change (a server restarted on a new port).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

/// Largest chunk moved at once (latency and bandwidth apply per chunk).
const CHUNK: usize = 16 * 1024;
/// Longest an upstream connect may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);
/// Connections one route holds at most (bounds the proxy like the servers).
const MAX_CONNS: usize = 4096;

/// Faults in force on a route.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    pub latency: Duration,
    pub jitter: Duration,
    /// Bytes per second per direction and connection; 0: no cap.
    pub bandwidth: u64,
    /// New connections are accepted and left silent.
    pub partitioned: bool,
}

struct Conn {
    /// Cancelled to reset the connection (RST to both sides).
    reset: CancellationToken,
    /// Set to blackhole this connection for good (it stays half-open).
    dead: Arc<std::sync::atomic::AtomicBool>,
}

/// One proxied port.
pub struct Route {
    pub addr: SocketAddr,
    /// The loopback address its upstream connections come from: each route
    /// is a host of its own to the server (whose limits are per address).
    source: std::net::IpAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    faults: Mutex<Faults>,
    conns: Mutex<Vec<Conn>>,
    /// Bytes moved, both directions.
    pub bytes: AtomicU64,
    seed: AtomicU64,
}

impl Route {
    /// Binds a route on a loopback port of its own, forwarding to whatever
    /// `upstream` holds at each connection; runs until `stop`.
    pub async fn start(
        upstream: Arc<Mutex<SocketAddr>>,
        source: std::net::IpAddr,
        seed: u64,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Route>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let route = Arc::new(Route {
            addr: listener.local_addr()?,
            source,
            upstream,
            faults: Mutex::new(Faults::default()),
            conns: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            seed: AtomicU64::new(seed | 1),
        });
        let accepting = Arc::clone(&route);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((down, _)) = accepted else { continue };
                let route = Arc::clone(&accepting);
                let stop = stop.clone();
                tokio::spawn(async move { route.serve(down, stop).await });
            }
            accepting.reset_all();
        });
        Ok(route)
    }

    pub fn set(&self, faults: Faults) {
        *self.faults.lock() = faults;
    }

    pub fn faults(&self) -> Faults {
        *self.faults.lock()
    }

    /// Resets every open connection (RST both ways).
    pub fn reset_all(&self) {
        for conn in self.conns.lock().drain(..) {
            conn.reset.cancel();
        }
    }

    /// Blackholes every open connection for good: from now on their bytes
    /// vanish both ways and neither end is told (half-open).
    pub fn blackhole_open(&self) {
        for conn in self.conns.lock().iter() {
            conn.dead.store(true, Ordering::Relaxed);
        }
    }

    /// A pseudo-random delay up to `jitter` (xorshift, seeded per route).
    fn jitter(&self, jitter: Duration) -> Duration {
        if jitter.is_zero() {
            return Duration::ZERO;
        }
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        Duration::from_micros(x % (jitter.as_micros() as u64 + 1))
    }

    async fn serve(self: Arc<Self>, down: TcpStream, stop: CancellationToken) {
        let reset = CancellationToken::new();
        let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let mut conns = self.conns.lock();
            conns.retain(|c| !c.reset.is_cancelled());
            if conns.len() >= MAX_CONNS {
                return;
            }
            conns.push(Conn {
                reset: reset.clone(),
                dead: Arc::clone(&dead),
            });
        }
        let _ = down.set_nodelay(true);
        if self.faults().partitioned {
            // Accepted but never answered: the agent's connect (its HTTP/2
            // or TLS handshake) times out, as behind a partition.
            dead.store(true, Ordering::Relaxed);
        }
        let target = *self.upstream.lock();
        let up = if dead.load(Ordering::Relaxed) {
            None
        } else {
            let connect = async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(self.source, 0))?;
                socket.connect(target).await
            };
            match tokio::time::timeout(CONNECT_LIMIT, connect).await {
                Ok(Ok(up)) => Some(up),
                // The server is away: the agent sees its connection reset.
                _ => {
                    rst_on_close(&down);
                    reset.cancel();
                    return;
                }
            }
        };
        let Some(up) = up else {
            // Partitioned: hold the socket silently until reset or stop.
            let mut down = down;
            let mut sink = vec![0u8; CHUNK];
            loop {
                tokio::select! {
                    () = reset.cancelled() => break,
                    () = stop.cancelled() => break,
                    read = down.read(&mut sink) => if matches!(read, Ok(0) | Err(_)) { return },
                }
            }
            rst_on_close(&down);
            return;
        };
        let _ = up.set_nodelay(true);
        rst_on_close(&up);
        rst_on_close(&down);
        let (down_r, down_w) = down.into_split();
        let (up_r, up_w) = up.into_split();
        let a = self.pump(down_r, up_w, &dead);
        let b = self.pump(up_r, down_w, &dead);
        tokio::select! {
            () = reset.cancelled() => {}
            () = stop.cancelled() => {}
            // Both write halves are held until both directions ended: a
            // dropped write half would send a FIN the peer must not see.
            halves = async { tokio::join!(a, b) } => drop(halves),
        }
        reset.cancel();
    }

    /// Copies one direction with the route's faults, until EOF or an error.
    /// A blackholed connection swallows what it reads, and its end is not
    /// passed on: the write half is handed back, to be closed only when
    /// both directions are over (half-open).
    async fn pump(
        &self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        dead: &std::sync::atomic::AtomicBool,
    ) -> Option<tokio::net::tcp::OwnedWriteHalf> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    if dead.load(Ordering::Relaxed) {
                        return Some(to);
                    }
                    let _ = to.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            };
            if dead.load(Ordering::Relaxed) {
                continue;
            }
            let faults = self.faults();
            let mut delay = faults.latency + self.jitter(faults.jitter);
            if faults.bandwidth > 0 {
                delay += Duration::from_secs_f64(n as f64 / faults.bandwidth as f64);
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return None;
            }
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Makes closing `stream` send a RST rather than a FIN (SO_LINGER zero:
/// nothing is waited for, so the close does not block).
fn rst_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
