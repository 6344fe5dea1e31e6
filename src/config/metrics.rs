//! `[metrics]` (server) and `[agent.metrics]` (agent): the Prometheus
//! endpoint, off unless `listen` is set, and the bounds of its small HTTP
//! server. The listener is meant for a scraper on a trusted network: it
//! serves nothing but counters, and every peer it admits is bounded in
//! number, time and header bytes.

use std::{net::SocketAddr, ops::RangeInclusive, time::Duration};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use super::{Checks, units};

/// The metrics endpoint's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served; absent: no metrics listener.
    #[serde(
        with = "units::optional_socket_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub listen: Option<SocketAddr>,
    /// Connections open at once; more are closed at once (a scraper needs one).
    pub max_connections: usize,
    /// Connections open at once from one address (at most
    /// `max_connections`), so that one peer cannot hold every slot.
    pub max_connections_per_address: usize,
    /// Longest a peer may take to send a request's headers.
    #[serde(with = "units::duration")]
    pub header_timeout: Duration,
    /// Longest a connection may stay open, request and response together
    /// (each connection serves one request).
    #[serde(with = "units::duration")]
    pub timeout: Duration,
    /// Largest request head (request line and headers) read.
    #[serde(with = "units::size")]
    pub max_header_size: ByteSize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            max_connections: 8,
            max_connections_per_address: 2,
            header_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            max_header_size: ByteSize::kib(16),
        }
    }
}

/// The documented ranges.
pub mod ranges {
    use super::*;

    pub const MAX_CONNECTIONS: RangeInclusive<u64> = 1..=1024;
    pub const HEADER_TIMEOUT: RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(60);
    pub const TIMEOUT: RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(300);
    /// hyper reads at least 8KiB at a time.
    pub const MAX_HEADER_SIZE: RangeInclusive<u64> = 8 * 1024..=1024 * 1024;
}

/// The connection bounds of a small HTTP listener (`[metrics]`,
/// `[agent.metrics]`, `[web]`) under `prefix`: `max_connections` and
/// `max_connections_per_address` (given in that order) each in `range`, and
/// no more from one address than in all.
pub(crate) fn check_connections(
    prefix: &str,
    (max, per_address): (usize, usize),
    range: RangeInclusive<u64>,
    c: &mut Checks,
) {
    let key = |name: &str| format!("{prefix}.{name}");
    c.count(&key("max_connections"), max as u64, range.clone());
    c.count(
        &key("max_connections_per_address"),
        per_address as u64,
        range,
    );
    c.check(
        per_address <= max,
        &key("max_connections_per_address"),
        format!("is above {prefix}.max_connections ({max})"),
    );
}

impl MetricsConfig {
    /// Range checks, under `prefix` (`metrics` or `agent.metrics`).
    pub(crate) fn check(&self, prefix: &str, c: &mut Checks) {
        use ranges::*;
        let key = |name: &str| format!("{prefix}.{name}");
        check_connections(
            prefix,
            (self.max_connections, self.max_connections_per_address),
            MAX_CONNECTIONS,
            c,
        );
        c.duration(&key("header_timeout"), self.header_timeout, HEADER_TIMEOUT);
        c.duration(&key("timeout"), self.timeout, TIMEOUT);
        c.check(
            self.header_timeout <= self.timeout,
            &key("header_timeout"),
            format!(
                "is longer than {prefix}.timeout ({}), which bounds the whole connection",
                humantime::format_duration(self.timeout)
            ),
        );
        c.size(
            &key("max_header_size"),
            self.max_header_size,
            MAX_HEADER_SIZE,
        );
    }
}
