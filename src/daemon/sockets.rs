//! The listening sockets systemd passes (socket activation), matched to
//! the config's listen addresses as the daemon asks for them.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use super::DaemonError;
use crate::systemd;

/// A listen address of the config, as socket activation matches it: its
/// key (for messages) and the `FileDescriptorName=` that names it.
#[derive(Debug, Clone, Copy)]
pub struct Listen {
    pub key: &'static str,
    pub name: &'static str,
}

/// The Contact port: `[server] listen`.
pub const CONTACT: Listen = Listen {
    key: "[server] listen",
    name: "contact",
};

/// The metrics endpoint: `[metrics] listen`.
pub const METRICS: Listen = Listen {
    key: "[metrics] listen",
    name: "metrics",
};

/// The listening sockets systemd passed (socket activation), matched to
/// the config's listen addresses as the daemon asks for them: by name
/// when the socket unit names them (`FileDescriptorName=contact` or
/// `metrics`), else by address. Under socket activation every listen
/// address must have its socket and every socket its address: the daemon
/// binds nothing itself then, since the point is that the socket stays
/// open (and queues connections) while the daemon restarts.
#[derive(Debug, Default)]
pub struct Sockets {
    /// What has not been taken yet.
    passed: Vec<(String, SocketAddr, std::net::TcpListener)>,
    /// Whether systemd passed any.
    activated: bool,
    /// The addresses asked for so far, for the messages.
    asked: Vec<(Listen, SocketAddr)>,
}

impl Sockets {
    /// The sockets systemd passed to this process, if any.
    ///
    /// # Errors
    /// [`DaemonError::Passed`].
    pub fn from_systemd() -> Result<Sockets, DaemonError> {
        let passed = systemd::listen_sockets().map_err(DaemonError::Passed)?;
        let passed = passed
            .into_iter()
            .map(|p| {
                let addr = p.listener.local_addr().map_err(DaemonError::Passed)?;
                Ok((p.name, addr, p.listener))
            })
            .collect::<Result<Vec<_>, DaemonError>>()?;
        Ok(Sockets {
            activated: !passed.is_empty(),
            passed,
            asked: Vec::new(),
        })
    }

    /// The socket systemd passed for `listen`, at `addr`; `None` without
    /// socket activation (the caller binds it).
    ///
    /// # Errors
    /// [`DaemonError::SocketMismatch`]: the socket named for it listens
    /// elsewhere; [`DaemonError::SocketMissing`]: none is for it.
    pub fn take(
        &mut self,
        listen: Listen,
        addr: SocketAddr,
    ) -> Result<Option<TcpListener>, DaemonError> {
        if !self.activated {
            return Ok(None);
        }
        self.asked.push((listen, addr));
        let named = self
            .passed
            .iter()
            .position(|(name, ..)| name == listen.name);
        let index = match named {
            Some(index) => {
                let (name, passed, _) = &self.passed[index];
                if *passed != addr {
                    return Err(DaemonError::SocketMismatch {
                        key: listen.key,
                        name: name.clone(),
                        passed: *passed,
                        configured: addr,
                    });
                }
                index
            }
            None => self
                .passed
                .iter()
                .position(|(name, passed, _)| {
                    *passed == addr && name != CONTACT.name && name != METRICS.name
                })
                .ok_or_else(|| DaemonError::SocketMissing {
                    key: listen.key,
                    configured: addr,
                    passed: self.describe(),
                })?,
        };
        let (name, passed, listener) = self.passed.remove(index);
        let listener =
            crate::net::adopt(listener).map_err(|source| DaemonError::Bind { addr, source })?;
        tracing::info!(%passed, %name, "listening on a socket passed by systemd ({})", listen.key);
        Ok(Some(listener))
    }

    /// Every socket systemd passed has been taken.
    ///
    /// # Errors
    /// [`DaemonError::SocketUnused`] for the first that was not.
    pub fn finish(&mut self) -> Result<(), DaemonError> {
        let Some((name, addr, _)) = self.passed.first() else {
            return Ok(());
        };
        let keys = self
            .asked
            .iter()
            .map(|(listen, addr)| format!("{} = {addr}", listen.key))
            .collect::<Vec<_>>();
        Err(DaemonError::SocketUnused {
            name: name.clone(),
            addr: *addr,
            keys: if keys.is_empty() {
                "it names none".into()
            } else {
                keys.join(", ")
            },
        })
    }

    /// What was passed and not taken, for a message.
    fn describe(&self) -> String {
        let all = self
            .passed
            .iter()
            .map(|(name, addr, _)| format!("{name:?} on {addr}"))
            .collect::<Vec<_>>();
        if all.is_empty() {
            "no other socket".into()
        } else {
            format!("the sockets {}", all.join(", "))
        }
    }
}
