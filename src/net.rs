//! Listening sockets bound by contactd itself, so that the listen backlog
//! is ours to choose: the standard library's 128 overflows when thousands of
//! agents reconnect at once after a restart; or adopted from whoever bound
//! them (systemd's socket activation).

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

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

/// A listening socket bound by someone else (systemd's socket activation)
/// made ready for tokio: non-blocking, then registered with the runtime.
/// Its backlog is whoever bound it's (`Backlog=` in a socket unit).
///
/// Must be called inside a tokio runtime.
///
/// # Errors
/// The socket calls' errors.
pub fn adopt(listener: std::net::TcpListener) -> io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// A peer address for a log line (`-`: unknown, as over a unix socket).
#[must_use]
pub fn shown_address(address: Option<SocketAddr>) -> String {
    address.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

/// The soft limit on this process's open files (every connection is one),
/// if it can be read.
#[must_use]
pub fn open_files_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}
