//! `[web]`: the operators' web console, off unless `listen` is set, and
//! every bound of its small HTTP server. Whoever can reach the port is a
//! stranger until they log in: what a stranger can make the server hold
//! (connections, header and body bytes, sessions, event streams) is capped
//! here, each by a named value that check-config keeps within its range.

use std::{net::SocketAddr, ops::RangeInclusive, time::Duration};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::{Checks, units};

/// The web console's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Where the console is served; absent: no console.
    #[serde(
        with = "units::optional_socket_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub listen: Option<SocketAddr>,
    /// Serve HTTPS with `[server.tls]`'s certificate (and its client CA,
    /// whose certificates then log operators in). Required for an address
    /// beyond loopback: a token or session cookie must not cross a network
    /// in clear.
    pub tls: bool,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Connections open at once from one address (at most
    /// `max_connections`), so that one peer cannot hold every slot.
    pub max_connections_per_address: usize,
    /// Event streams (`/events`) open at once, within `max_connections`.
    pub max_event_streams: usize,
    /// Sessions kept at once; a login beyond it ends the oldest.
    pub max_sessions: usize,
    /// A session ends this long after its login.
    #[serde(with = "units::duration")]
    pub session_ttl: Duration,
    /// Rows on one page of a list.
    pub page_size: usize,
    /// Longest a peer may take to send a request's headers.
    #[serde(with = "units::duration")]
    pub header_timeout: Duration,
    /// Longest a request (other than an event stream) may take, body and
    /// answer included.
    #[serde(with = "units::duration")]
    pub timeout: Duration,
    /// Largest request head (request line and headers) read.
    #[serde(with = "units::size")]
    pub max_header_size: ByteSize,
    /// Largest form body read (a submitted task's text is in it).
    #[serde(with = "units::size")]
    pub max_body_size: ByteSize,
    /// How often the console looks for changes to push to event streams.
    #[serde(with = "units::duration")]
    pub event_interval: Duration,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: None,
            tls: false,
            max_connections: 64,
            max_connections_per_address: 16,
            max_event_streams: 32,
            max_sessions: 64,
            session_ttl: Duration::from_secs(12 * 3600),
            page_size: 100,
            header_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            max_header_size: ByteSize::kib(16),
            max_body_size: ByteSize::kib(256),
            event_interval: Duration::from_secs(1),
        }
    }
}

/// The documented ranges.
pub mod ranges {
    use super::*;

    pub const MAX_CONNECTIONS: RangeInclusive<u64> = 1..=4096;
    pub const MAX_EVENT_STREAMS: RangeInclusive<u64> = 1..=4096;
    pub const MAX_SESSIONS: RangeInclusive<u64> = 1..=10_000;
    pub const SESSION_TTL: RangeInclusive<Duration> =
        Duration::from_secs(60)..=Duration::from_secs(7 * 24 * 3600);
    pub const PAGE_SIZE: RangeInclusive<u64> = 10..=1000;
    pub use super::super::metrics::ranges::{HEADER_TIMEOUT, MAX_HEADER_SIZE};
    pub const TIMEOUT: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(300);
    pub const MAX_BODY_SIZE: RangeInclusive<u64> = 1024..=64 * 1024 * 1024;
    pub const EVENT_INTERVAL: RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(60);
}

impl WebConfig {
    /// Range checks, and TLS for an address beyond loopback; `server_tls`
    /// says whether `[server.tls]` (whose certificate the console uses) is
    /// set.
    pub(crate) fn check(&self, server_tls: bool, c: &mut Checks) {
        use ranges::*;
        super::metrics::check_connections(
            "web",
            (self.max_connections, self.max_connections_per_address),
            MAX_CONNECTIONS,
            c,
        );
        c.count(
            "web.max_event_streams",
            self.max_event_streams as u64,
            MAX_EVENT_STREAMS,
        );
        c.check(
            self.max_event_streams <= self.max_connections,
            "web.max_event_streams",
            format!(
                "is above web.max_connections ({}): each stream holds a connection",
                self.max_connections
            ),
        );
        c.count("web.max_sessions", self.max_sessions as u64, MAX_SESSIONS);
        c.duration("web.session_ttl", self.session_ttl, SESSION_TTL);
        c.count("web.page_size", self.page_size as u64, PAGE_SIZE);
        c.duration("web.header_timeout", self.header_timeout, HEADER_TIMEOUT);
        c.duration("web.timeout", self.timeout, TIMEOUT);
        c.size("web.max_header_size", self.max_header_size, MAX_HEADER_SIZE);
        c.size("web.max_body_size", self.max_body_size, MAX_BODY_SIZE);
        c.duration("web.event_interval", self.event_interval, EVENT_INTERVAL);
        c.check(
            !self.tls || server_tls,
            "web.tls",
            "needs [server.tls]: the console serves HTTPS with its certificate",
        );
        if let Some(listen) = self.listen {
            c.check(
                self.tls || listen.ip().is_loopback(),
                "web.listen",
                format!(
                    "is {listen}, beyond loopback, without TLS: tokens and session cookies \
                     would cross the network in clear; set web.tls = true (with [server.tls]) \
                     or listen on 127.0.0.1"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(config: &WebConfig, server_tls: bool) -> Vec<(String, String)> {
        let mut c = Checks::default();
        config.check(server_tls, &mut c);
        c.0
    }

    #[test]
    fn beyond_loopback_needs_tls() {
        let open = WebConfig {
            listen: Some("0.0.0.0:8443".parse().unwrap()),
            ..WebConfig::default()
        };
        let found = problems(&open, true);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "web.listen");
        let tls = WebConfig { tls: true, ..open };
        assert!(problems(&tls, true).is_empty());
        assert_eq!(problems(&tls, false)[0].0, "web.tls");
        let local = WebConfig {
            listen: Some("127.0.0.1:8080".parse().unwrap()),
            ..WebConfig::default()
        };
        assert!(problems(&local, false).is_empty());
    }

    #[test]
    fn every_bound_is_range_checked() {
        let zero = WebConfig {
            max_connections: 0,
            max_connections_per_address: 0,
            max_event_streams: 0,
            max_sessions: 0,
            session_ttl: Duration::ZERO,
            page_size: 0,
            header_timeout: Duration::ZERO,
            timeout: Duration::ZERO,
            max_header_size: ByteSize::b(0),
            max_body_size: ByteSize::b(0),
            event_interval: Duration::ZERO,
            ..WebConfig::default()
        };
        let keys: Vec<String> = problems(&zero, false).into_iter().map(|p| p.0).collect();
        for key in [
            "web.max_connections",
            "web.max_connections_per_address",
            "web.max_event_streams",
            "web.max_sessions",
            "web.session_ttl",
            "web.page_size",
            "web.header_timeout",
            "web.timeout",
            "web.max_header_size",
            "web.max_body_size",
            "web.event_interval",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} not checked: {keys:?}");
        }
    }
}
