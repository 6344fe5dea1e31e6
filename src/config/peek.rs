//! The few keys of the server's config that client commands need, read
//! leniently: a client must work against a config that `serve` would
//! refuse for some unrelated key (one written for a newer contactd, or
//! being edited), so only the keys asked for are checked.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use super::{AdminConfig, ConfigFile, ServerConfig, units};

/// `[admin] socket` alone, for the operator commands (`contactd tasks -c`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AdminView {
    pub admin: SocketOnly,
}

/// `[admin]`, only `socket`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct SocketOnly {
    pub socket: PathBuf,
}

impl Default for SocketOnly {
    fn default() -> Self {
        SocketOnly {
            socket: AdminConfig::default().socket,
        }
    }
}

impl ConfigFile for AdminView {
    fn validate(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// `[server] listen` and whether it speaks TLS, for `contactd cmd -c`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListenView {
    pub server: ListenOnly,
}

/// `[server]`, only `listen` and `[server.tls] client_ca`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct ListenOnly {
    #[serde(with = "units::socket_addr")]
    pub listen: SocketAddr,
    /// Present when the port speaks TLS.
    pub tls: Option<TlsOnly>,
}

/// `[server.tls]`, only `client_ca`: the package's CA, which also signed
/// the server's certificate (`contactd tls init`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TlsOnly {
    pub client_ca: Option<PathBuf>,
}

impl Default for ListenOnly {
    fn default() -> Self {
        ListenOnly {
            listen: ServerConfig::default().listen,
            tls: None,
        }
    }
}

impl ConfigFile for ListenView {
    fn validate(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

impl ListenView {
    /// Where a client on this host reaches the server: a wildcard listen
    /// address (`0.0.0.0`, `::`) means the loopback of its family.
    pub fn client_addr(&self) -> SocketAddr {
        let mut addr = self.server.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    #[test]
    fn only_listen_is_read_and_a_wildcard_means_loopback() {
        let view: ListenView =
            parse("[server]\nlisten = \"0.0.0.0:7000\"\nbogus = 1\n[tasks]\ninterval = \"x\"\n")
                .unwrap();
        assert_eq!(view.client_addr(), "127.0.0.1:7000".parse().unwrap());
        let view: ListenView = parse("[server]\nlisten = \"[::]:7000\"\n").unwrap();
        assert_eq!(view.client_addr(), "[::1]:7000".parse().unwrap());
        let view: ListenView = parse("").unwrap();
        assert_eq!(view.client_addr(), "127.0.0.1:55555".parse().unwrap());
    }

    #[test]
    fn only_the_admin_socket_is_read() {
        let view: AdminView = parse(
            "[server]\nlisten = \"nowhere\"\n[admin]\nsocket = \"/tmp/a.sock\"\nenabled = 3\n\
             [newer]\nx = 1\n",
        )
        .unwrap();
        assert_eq!(view.admin.socket, PathBuf::from("/tmp/a.sock"));
        let view: AdminView = parse("").unwrap();
        assert_eq!(view.admin.socket, AdminConfig::default().socket);
        let problems = parse::<AdminView>("[admin]\nsocket = 3\n").unwrap_err();
        assert_eq!(problems[0].key.as_deref(), Some("admin.socket"));
    }
}
