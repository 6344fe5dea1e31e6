//! `[server]` and `[server.tls]`: the Contact listener, its per-connection
//! limits and its TLS, with their defaults and their checks.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::{Checks, ranges, units};
use crate::labels::Labels;

/// `server.max_connections` when the file does not set it: more than one
/// box holds (see [`ServerConfig::connection_cap`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;

/// Open files the daemon keeps for itself besides connections and
/// handshakes: the store and its side files, log files, the admin and
/// metrics sockets and their clients.
const OWN_FILES: u64 = 64;

/// What [`ServerConfig::connection_cap`] makes of `server.max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionCap {
    /// As configured: within the open-files limit (or it is unknown).
    AsSet(usize),
    /// The default, lowered to what the open-files limit leaves.
    Sized { max: usize, open_files: u64 },
    /// Set above the open-files limit: connections beyond it fail to be
    /// accepted.
    AboveLimit { max: usize, open_files: u64 },
}

/// `[server]`: the listener and per-connection limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// This server's name among several sharing one PostgreSQL store
    /// (the fleet view, logs); empty: the host's name.
    pub name: String,
    /// Address the Contact service listens on.
    #[serde(with = "units::socket_addr")]
    pub listen: SocketAddr,
    /// Listen backlog: connections the kernel queues before `accept`.
    pub backlog: u32,
    /// Connections open at once; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Largest message accepted from a client, and sent to one: a task
    /// whose message would be larger is refused at submit.
    #[serde(with = "units::size")]
    pub max_message_size: ByteSize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 pings that detect dead peers.
    #[serde(with = "units::duration")]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[serde(with = "units::duration")]
    pub keepalive_timeout: Duration,
    /// How long in-flight calls may run on after shutdown starts.
    #[serde(with = "units::duration")]
    pub grace_period: Duration,
    /// Callers (agents and seed clients) whose last status is remembered.
    pub max_callers: usize,
    /// Longest status text kept per caller; longer ones are truncated.
    #[serde(with = "units::size")]
    pub max_status_size: ByteSize,
    /// A file holding the token every Contact call must carry
    /// (`authorization: Bearer <token>`); absent: no token is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token_file: Option<PathBuf>,
    /// Named tokens (`contactd token create`): each gives its holder an
    /// identity and a role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// A connection must finish its TLS handshake and the HTTP/2 preface
    /// within this long, or it is closed.
    #[serde(with = "units::duration")]
    pub handshake_timeout: Duration,
    /// Connections still in their handshake at once; they do not count
    /// against `max_connections`, so they cannot lock out agents.
    pub max_handshakes: usize,
    /// Of those, from one source address at once (`max_handshakes` if
    /// larger): one peer holding stalled connections cannot take every
    /// handshake slot.
    pub max_handshakes_per_address: usize,
    /// Open connections from one source address at once; unset: three
    /// quarters of the connection cap in force, so one address (a peer, or
    /// a NAT in front of many agents) cannot take every connection from
    /// the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_address: Option<usize>,
    /// New connections admitted into their handshake per second, over
    /// `accept_burst`: a fleet reconnecting at once (after a restart) is
    /// taken at this pace. Beyond it, a plaintext connection is answered
    /// UNAVAILABLE with a retry hint (its turn), and a TLS one waits for
    /// its turn before its handshake (within `handshake_timeout`).
    pub accept_rate: u32,
    /// Connections admitted at once above `accept_rate` after a quiet time.
    pub accept_burst: u32,
    /// Largest sendStatus message (one status report).
    #[serde(with = "units::size")]
    pub max_status_message: ByteSize,
    /// Largest tellResult message (one result).
    #[serde(with = "units::size")]
    pub max_result_message: ByteSize,
    /// Largest remoteCMD request (a command line and its note).
    #[serde(with = "units::size")]
    pub max_command_message: ByteSize,
    /// Bytes of unfinished messages one connection may make the server hold.
    #[serde(with = "units::size")]
    pub max_connection_buffer: ByteSize,
    /// Bytes of unfinished messages all connections together may make the
    /// server hold; beyond, the calls adding to it are refused.
    #[serde(with = "units::size")]
    pub max_buffered: ByteSize,
    /// Bytes of replies and queue-mode tasks the server may hold for one
    /// connection, produced and not yet written out (its peer does not
    /// read); beyond, its streams wait.
    #[serde(with = "units::size")]
    pub max_connection_unsent: ByteSize,
    /// The same, for all connections together: beyond, every connection
    /// holding unsent bytes waits until it has written them out.
    #[serde(with = "units::size")]
    pub max_unsent: ByteSize,
    /// The kernel's send buffer of each connection (SO_SNDBUF); unset: the
    /// kernel sizes it (up to `net.ipv4.tcp_wmem`'s maximum, 4 MiB on
    /// Debian), which is what a peer that stops reading makes the kernel
    /// hold for it before `max_connection_unsent` applies.
    #[serde(default, with = "units::optional_size")]
    pub socket_send_buffer: Option<ByteSize>,
    /// HTTP/2 flow-control window of one connection and of one stream: how
    /// much a peer may send before the server reads it.
    #[serde(with = "units::size")]
    pub connection_window: ByteSize,
    #[serde(with = "units::size")]
    pub stream_window: ByteSize,
    /// TLS on the Contact port; absent: plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsConfig>,
    /// `[[server.agents]]`: labels pinned by agent name, over what the
    /// agents say of themselves.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentPin>,
}

/// `[[server.agents]]`: labels the server pins for the agents whose name
/// matches `name`. A pinned label is in force whatever the agent claims; a
/// claim that differs is logged and ignored, so that with tokens or mTLS a
/// machine cannot make itself a target it is not. Blocks apply in file
/// order: where two match one name, the later one's label wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPin {
    /// An agent name, or a glob of names (`web-*`, `db-[0-9]`).
    pub name: String,
    /// The labels pinned for them.
    pub labels: Labels,
}

/// `[server.tls]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA certificates that sign client certificates (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Whether clients must present a certificate; default `require` with
    /// a `client_ca`, else `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_auth: Option<ClientAuth>,
}

impl ServerTlsConfig {
    /// `client_auth`, with its default.
    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth.unwrap_or(if self.client_ca.is_some() {
            ClientAuth::Require
        } else {
            ClientAuth::None
        })
    }
}

/// `server.tls.client_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificates are asked for.
    None,
    /// Asked for and verified when given; callers without one are anonymous.
    Request,
    /// Every connection needs a certificate signed by `client_ca`.
    Require,
}

impl ServerConfig {
    /// The connection cap in force with `open_files` as the limit on open
    /// files. The default is sized from the limit (less the handshakes, up
    /// to a quarter of it, and the daemon's own files), so a default
    /// config never promises more connections than the process can open;
    /// a value the file sets is kept, and reported when above the limit.
    #[must_use]
    pub fn connection_cap(&self, open_files: Option<u64>) -> ConnectionCap {
        let Some(limit) = open_files else {
            return ConnectionCap::AsSet(self.max_connections);
        };
        let reserve = (self.max_handshakes as u64).min(limit / 4) + OWN_FILES;
        let room = usize::try_from(limit.saturating_sub(reserve).max(1)).unwrap_or(usize::MAX);
        if self.max_connections <= room {
            ConnectionCap::AsSet(self.max_connections)
        } else if self.max_connections == DEFAULT_MAX_CONNECTIONS {
            ConnectionCap::Sized {
                max: room,
                open_files: limit,
            }
        } else {
            ConnectionCap::AboveLimit {
                max: self.max_connections,
                open_files: limit,
            }
        }
    }

    /// `name`, or else the host's name.
    pub fn resolved_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        super::host_name().unwrap_or_else(|| "contactd".into())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 55555)),
            backlog: 4096,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_message_size: ByteSize::mib(4),
            max_concurrent_streams: 256,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            grace_period: Duration::from_secs(10),
            max_callers: 10_000,
            max_status_size: ByteSize::kib(4),
            auth_token_file: None,
            tokens_file: None,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            max_handshakes_per_address: 256,
            max_connections_per_address: None,
            accept_rate: 5000,
            accept_burst: 1000,
            max_status_message: ByteSize::kib(64),
            max_result_message: ByteSize::kib(256),
            max_command_message: ByteSize::kib(64),
            max_connection_buffer: ByteSize::mib(4),
            max_buffered: ByteSize::mib(128),
            max_connection_unsent: ByteSize::kib(32),
            max_unsent: ByteSize::mib(128),
            socket_send_buffer: None,
            connection_window: ByteSize::kib(256),
            stream_window: ByteSize::kib(64),
            tls: None,
            agents: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// Range checks, and the limits bounded by other `[server]` keys.
    pub(crate) fn check(&self, c: &mut Checks) {
        use ranges::*;
        c.check(
            self.name.len() <= 255 && !self.name.chars().any(char::is_control),
            "server.name",
            "is longer than 255 bytes or holds control characters",
        );
        c.count("server.backlog", self.backlog.into(), BACKLOG);
        c.count(
            "server.max_connections",
            self.max_connections as u64,
            MAX_CONNECTIONS,
        );
        c.size(
            "server.max_message_size",
            self.max_message_size,
            MAX_MESSAGE_SIZE,
        );
        c.count(
            "server.max_concurrent_streams",
            self.max_concurrent_streams.into(),
            MAX_CONCURRENT_STREAMS,
        );
        c.duration(
            "server.keepalive_interval",
            self.keepalive_interval,
            KEEPALIVE_INTERVAL,
        );
        c.duration(
            "server.keepalive_timeout",
            self.keepalive_timeout,
            KEEPALIVE_TIMEOUT,
        );
        c.duration("server.grace_period", self.grace_period, GRACE_PERIOD);
        c.count("server.max_callers", self.max_callers as u64, MAX_CALLERS);
        c.size(
            "server.max_status_size",
            self.max_status_size,
            MAX_STATUS_SIZE,
        );
        // Unlike `Checks::duration` and `Checks::count`, these two messages
        // do not show the value: `check-config`'s output stays what
        // operators (and scripts) already see.
        let f = humantime::format_duration;
        c.check(
            HANDSHAKE_TIMEOUT.contains(&self.handshake_timeout),
            "server.handshake_timeout",
            format!(
                "is out of range: expected from \"{}\" to \"{}\"",
                f(*HANDSHAKE_TIMEOUT.start()),
                f(*HANDSHAKE_TIMEOUT.end())
            ),
        );
        c.check(
            MAX_HANDSHAKES.contains(&(self.max_handshakes as u64)),
            "server.max_handshakes",
            format!(
                "is out of range: expected from {} to {}",
                MAX_HANDSHAKES.start(),
                MAX_HANDSHAKES.end()
            ),
        );
        c.check(
            MAX_HANDSHAKES.contains(&(self.max_handshakes_per_address as u64)),
            "server.max_handshakes_per_address",
            format!(
                "is out of range: expected from {} to {} (above server.max_handshakes, that \
                 is the bound)",
                MAX_HANDSHAKES.start(),
                MAX_HANDSHAKES.end()
            ),
        );
        if let Some(per_address) = self.max_connections_per_address {
            c.check(
                (1..=self.max_connections).contains(&per_address),
                "server.max_connections_per_address",
                format!(
                    "{per_address} is out of range: expected from 1 to server.max_connections \
                     ({})",
                    self.max_connections
                ),
            );
        }
        c.count("server.accept_rate", self.accept_rate.into(), ACCEPT_RATE);
        c.count(
            "server.accept_burst",
            self.accept_burst.into(),
            ACCEPT_BURST,
        );
        for (size, key) in [
            (self.max_status_message, "server.max_status_message"),
            (self.max_result_message, "server.max_result_message"),
            (self.max_command_message, "server.max_command_message"),
        ] {
            c.size_between(
                key,
                size,
                CALL_MESSAGE_MIN,
                "server.max_message_size",
                self.max_message_size,
            );
        }
        c.size_between(
            "server.max_connection_buffer",
            self.max_connection_buffer,
            CONNECTION_BUFFER_MIN,
            "server.max_buffered",
            self.max_buffered,
        );
        if let Some(size) = self.socket_send_buffer {
            c.size("server.socket_send_buffer", size, SOCKET_BUFFER);
        }
        c.size_between(
            "server.max_connection_unsent",
            self.max_connection_unsent,
            CONNECTION_UNSENT_MIN,
            "server.max_unsent",
            self.max_unsent,
        );
        // Unlike `Checks::size`, these messages show the value unquoted,
        // so they are written out here to keep `check-config`'s output as it is.
        let f = units::size::format;
        for (size, key, range) in [
            (self.max_buffered, "server.max_buffered", MAX_BUFFERED),
            (self.max_unsent, "server.max_unsent", MAX_UNSENT),
            (
                self.connection_window,
                "server.connection_window",
                FLOW_WINDOW,
            ),
            (self.stream_window, "server.stream_window", FLOW_WINDOW),
        ] {
            c.check(
                range.contains(&size.as_u64()),
                key,
                format!(
                    "{} is out of range: expected from \"{}\" to \"{}\"",
                    f(size),
                    f(ByteSize(*range.start())),
                    f(ByteSize(*range.end()))
                ),
            );
        }
        c.check(
            self.stream_window <= self.connection_window,
            "server.stream_window",
            "is larger than server.connection_window, which bounds every stream",
        );
        if let Some(tls) = &self.tls {
            tls.check(c);
        }
        for pin in &self.agents {
            if let Err(e) = glob::Pattern::new(&pin.name) {
                c.check(
                    false,
                    "server.agents",
                    format!(
                        "name {:?} is not a valid glob ({e}): expected an agent name or a \
                         pattern such as \"web-*\"",
                        crate::untrusted::shown(&pin.name)
                    ),
                );
            }
        }
    }
}

impl ServerTlsConfig {
    /// `client_ca` and `client_auth` must agree.
    pub(crate) fn check(&self, c: &mut Checks) {
        c.check(
            self.client_ca.is_some() || self.client_auth() == ClientAuth::None,
            "server.tls.client_auth",
            "needs server.tls.client_ca, the CA that signs client certificates",
        );
        c.check(
            self.client_ca.is_none() || self.client_auth() != ClientAuth::None,
            "server.tls.client_ca",
            "is set but client_auth = \"none\": remove it, or set client_auth = \"request\" or \"require\"",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_cap_is_sized_from_the_open_files_limit() {
        let default = ServerConfig::default();
        // This machine's hard limit: the handshakes and the daemon's own
        // files are left their room.
        assert_eq!(
            default.connection_cap(Some(20_000)),
            ConnectionCap::Sized {
                max: 20_000 - 1024 - OWN_FILES as usize,
                open_files: 20_000
            }
        );
        // A small limit: handshakes take at most a quarter of it.
        assert_eq!(
            default.connection_cap(Some(1024)),
            ConnectionCap::Sized {
                max: 1024 - 256 - OWN_FILES as usize,
                open_files: 1024
            }
        );
        assert_eq!(
            default.connection_cap(Some(1_048_576)),
            ConnectionCap::AsSet(DEFAULT_MAX_CONNECTIONS)
        );
        assert_eq!(
            default.connection_cap(None),
            ConnectionCap::AsSet(DEFAULT_MAX_CONNECTIONS)
        );
        // A value the file sets is kept, and reported when above the limit.
        let set = ServerConfig {
            max_connections: 30_000,
            ..ServerConfig::default()
        };
        assert_eq!(
            set.connection_cap(Some(20_000)),
            ConnectionCap::AboveLimit {
                max: 30_000,
                open_files: 20_000
            }
        );
        let within = ServerConfig {
            max_connections: 5_000,
            ..ServerConfig::default()
        };
        assert_eq!(
            within.connection_cap(Some(20_000)),
            ConnectionCap::AsSet(5_000)
        );
    }
}
