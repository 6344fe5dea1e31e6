//! Listening sockets bound by contactd itself, so that the listen backlog
//! is ours to choose: the standard library's 128 overflows when thousands of
//! agents reconnect at once after a restart; or adopted from whoever bound
//! them (systemd's socket activation). `http` is the accept loop, with its
//! bounds, of the two small HTTP listeners (metrics, web console).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub mod http;

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

/// Why the unix socket at `path` may not be trusted, if it may not: its
/// directory is writable by every user without the sticky bit (anyone may
/// replace the socket), or, in a shared sticky directory such as `/tmp`,
/// the socket is there and belongs to neither this user nor root (another
/// user may have bound it first, to read what operators send). The
/// server checks before it binds, the operator commands before they
/// connect.
#[must_use]
pub fn untrusted_socket(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let mode = std::fs::metadata(dir).ok()?.mode();
    let (others_write, sticky) = (mode & 0o002 != 0, mode & 0o1000 != 0);
    if others_write && !sticky {
        return Some(format!(
            "the directory {} is writable by every user (mode {:o}): another user could put \
             a socket there first; use a directory only contactd's user can write (such as \
             /run/contactd)",
            dir.display(),
            mode & 0o7777
        ));
    }
    if others_write {
        let owner = std::fs::symlink_metadata(path).ok()?.uid();
        let me = nix::unistd::geteuid().as_raw();
        if owner != me && owner != 0 {
            return Some(format!(
                "{} is owned by uid {owner}, neither this user (uid {me}) nor root, in a \
                 directory every user can write: another user may have bound it first; use a \
                 directory only contactd's user can write (such as /run/contactd)",
                path.display()
            ));
        }
    }
    None
}

/// Slots counted by source address, so that one peer cannot take every
/// slot of a listener (handshakes, open connections, metrics scrapes).
#[derive(Debug, Clone, Default)]
pub struct AddressSlots(Arc<parking_lot::Mutex<HashMap<IpAddr, usize>>>);

/// One slot of an address, given back on drop.
#[derive(Debug)]
pub struct AddressSlot {
    slots: AddressSlots,
    ip: IpAddr,
}

impl AddressSlots {
    /// A slot for `ip` if it holds fewer than `max`.
    #[must_use]
    pub fn take(&self, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut held = self.0.lock();
        let count = held.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.slots.0.lock();
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            // The map holds only addresses that hold slots.
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}
