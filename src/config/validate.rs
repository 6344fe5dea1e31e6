//! What every section's `check` is built from: the [`Checks`] collector
//! and its range helpers, the documented [`ranges`] of the server's values
//! with the unit constants they are written in, and the checks that span
//! sections (the warnings about unsafe combinations).

use std::{ops::RangeInclusive, time::Duration};

use bytesize::ByteSize;

use super::{Config, StoreKind, store, units};

/// The largest response the seed's clients accept by default (gRPC's 4 MiB).
const CLIENT_MAX_MESSAGE: u64 = 4 * 1024 * 1024;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// The documented range of every numeric value, as `check-config` enforces
/// it (and README.md and config/*.toml list it). The bounds are what the
/// server was shown to survive, with room: beyond them a value only made
/// a panic, a spinning thread or unbounded memory possible.
pub mod ranges {
    use std::{ops::RangeInclusive, time::Duration};

    use super::*;

    pub const BACKLOG: RangeInclusive<u64> = 1..=65_535;
    pub const ACCEPT_RATE: RangeInclusive<u64> = 1..=1_000_000;
    pub const ACCEPT_BURST: RangeInclusive<u64> = 1..=1_000_000;
    pub const MAX_CONNECTIONS: RangeInclusive<u64> = 1..=1_000_000;
    pub const MAX_MESSAGE_SIZE: RangeInclusive<u64> = KIB..=64 * MIB;
    pub const MAX_CONCURRENT_STREAMS: RangeInclusive<u64> = 1..=4096;
    pub const KEEPALIVE_INTERVAL: RangeInclusive<Duration> = SEC..=Duration::from_secs(2 * 3600);
    pub const KEEPALIVE_TIMEOUT: RangeInclusive<Duration> = SEC..=HOUR;
    pub const GRACE_PERIOD: RangeInclusive<Duration> = Duration::ZERO..=HOUR;
    pub const MAX_CALLERS: RangeInclusive<u64> = 1..=1_000_000;
    pub const MAX_STATUS_SIZE: RangeInclusive<u64> = 1..=MIB;
    pub const HANDSHAKE_TIMEOUT: RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(300);
    pub const MAX_HANDSHAKES: RangeInclusive<u64> = 1..=65_536;
    /// The least of `max_status_message`, `max_result_message` and
    /// `max_command_message`; the most is `max_message_size`.
    pub const CALL_MESSAGE_MIN: u64 = KIB;
    pub const MAX_BUFFERED: RangeInclusive<u64> = MIB..=64 * GIB;
    /// The least `max_connection_buffer`; the most is `max_buffered`.
    pub const CONNECTION_BUFFER_MIN: u64 = 64 * KIB;
    pub const MAX_UNSENT: RangeInclusive<u64> = MIB..=64 * GIB;
    /// `socket_send_buffer` (the kernel doubles it, and has a floor of its own).
    pub const SOCKET_BUFFER: RangeInclusive<u64> = 4 * KIB..=64 * MIB;
    /// The least `max_connection_unsent`; the most is `max_unsent`.
    pub const CONNECTION_UNSENT_MIN: u64 = 16 * KIB;
    /// `connection_window`, and `stream_window` (at most `connection_window`).
    pub const FLOW_WINDOW: RangeInclusive<u64> = 64 * KIB..=16 * MIB;

    pub const INTERVAL: RangeInclusive<Duration> = MS..=Duration::from_secs(7 * 86_400);
    pub const BATCH: RangeInclusive<u64> = 0..=10_000;
    pub const TEMPLATE_BYTES: RangeInclusive<u64> = 0..=64 * KIB;
    pub const RETAIN: RangeInclusive<u64> = 1..=1_000_000;
    pub const ACK_TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(10)..=DAY;
    pub const MAX_ATTEMPTS: RangeInclusive<u64> = 1..=1000;
    pub const WINDOW: RangeInclusive<u64> = 1..=10_000;
    pub const MAX_PENDING: RangeInclusive<u64> = 1..=10_000_000;
    pub const KEEP_FOR: RangeInclusive<Duration> = MINUTE..=Duration::from_secs(3650 * 86_400);
    pub const RETAIN_FINISHED: RangeInclusive<u64> = 1..=100_000_000;
    pub const MAX_RUNS: RangeInclusive<u64> = 1..=100_000;
    pub const WRITE_QUEUE: RangeInclusive<u64> = 1024..=4_194_304;
    pub const FORGET_AGENTS_AFTER: RangeInclusive<Duration> =
        HOUR..=Duration::from_secs(3650 * 86_400);
    /// `store.max_size`, when not 0 (no limit).
    pub const STORE_MAX_SIZE: RangeInclusive<u64> = MIB..=1024 * 1024 * GIB;
    pub const STORE_CONNECT_TIMEOUT: RangeInclusive<Duration> =
        Duration::from_secs(1)..=Duration::from_secs(300);
    pub const STORE_POOL_SIZE: RangeInclusive<u64> = 1..=64;
    pub const STORE_POLL_INTERVAL: RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(60);

    pub const CMD_TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(10)..=DAY;
    pub const MAX_CONCURRENT: RangeInclusive<u64> = 1..=1024;
    pub const MAX_QUEUED: RangeInclusive<u64> = 0..=65_536;
    /// So a response fits a gRPC client's default 4MiB message limit.
    pub const MAX_OUTPUT: RangeInclusive<u64> = 1..=CLIENT_MAX_MESSAGE - KIB;

    pub const LOG_MAX_SIZE: RangeInclusive<u64> = KIB..=64 * GIB;
    pub const LOG_BACKUPS: RangeInclusive<u64> = 0..=1000;
    pub const LOG_KEEP: RangeInclusive<u64> = 1..=1000;
    pub const BUFFER_LINES: RangeInclusive<u64> = 1..=262_144;
}

/// Collects semantic problems as (dotted key, message) pairs.
#[derive(Default)]
pub(crate) struct Checks(pub(crate) Vec<(String, String)>);

impl Checks {
    pub(crate) fn check(&mut self, ok: bool, key: &str, message: impl Into<String>) {
        if !ok {
            self.0.push((key.to_owned(), message.into()));
        }
    }

    /// A count within `range`.
    pub(crate) fn count(&mut self, key: &str, value: u64, range: RangeInclusive<u64>) {
        let message = || {
            format!(
                "{value} is out of range: expected from {} to {}",
                range.start(),
                range.end()
            )
        };
        if !range.contains(&value) {
            self.0.push((key.to_owned(), message()));
        }
    }

    /// A duration within `range`.
    pub(crate) fn duration(&mut self, key: &str, value: Duration, range: RangeInclusive<Duration>) {
        if !range.contains(&value) {
            let f = humantime::format_duration;
            self.0.push((
                key.to_owned(),
                format!(
                    "\"{}\" is out of range: expected from \"{}\" to \"{}\"",
                    f(value),
                    f(*range.start()),
                    f(*range.end())
                ),
            ));
        }
    }

    /// A byte size within `range`.
    pub(crate) fn size(&mut self, key: &str, value: ByteSize, range: RangeInclusive<u64>) {
        if !range.contains(&value.as_u64()) {
            let f = |n| units::size::format(ByteSize(n));
            self.0.push((
                key.to_owned(),
                format!(
                    "\"{}\" is out of range: expected from \"{}\" to \"{}\"",
                    f(value.as_u64()),
                    f(*range.start()),
                    f(*range.end())
                ),
            ));
        }
    }

    /// A byte size from `min` up to `max`, the value of another key,
    /// `max_key`, which the message names so the operator sees which
    /// setting bounds this one.
    pub(crate) fn size_between(
        &mut self,
        key: &str,
        value: ByteSize,
        min: u64,
        max_key: &str,
        max: ByteSize,
    ) {
        if !(min..=max.as_u64()).contains(&value.as_u64()) {
            let f = units::size::format;
            self.0.push((
                key.to_owned(),
                format!(
                    "{} is out of range: expected from \"{}\" to {max_key} ({})",
                    f(value),
                    f(ByteSize(min)),
                    f(max)
                ),
            ));
        }
    }
}

impl Config {
    /// What is valid but unsafe, for the start-up log and `check-config`.
    /// These look at several sections together (the listener with the
    /// identity mechanism, the store's URL, the metrics listener), so they
    /// belong to no one section's `check`.
    pub(super) fn unsafe_settings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let listen = self.server.listen.ip();
        if !listen.is_loopback() && !self.has_identities() {
            warnings.push(format!(
                "server.listen = {} is beyond loopback with no identity mechanism: agent names \
                 are taken from a header anyone can set{}; configure server.tls with client_ca, \
                 or server.tokens_file",
                self.server.listen,
                if self.server.tls.is_none() {
                    " and traffic is plaintext"
                } else {
                    ""
                }
            ));
        }
        if self.store.kind == StoreKind::Postgres
            && self.store.url.as_deref().is_some_and(store::has_password)
        {
            warnings.push(
                "store.url holds a password, readable by anyone who can read this file: put \
                 the URL in store.url_file (mode 0600) instead"
                    .to_owned(),
            );
        }
        if let Some(listen) = self.metrics.listen
            && !listen.ip().is_loopback()
        {
            warnings.push(format!(
                "metrics.listen = {listen} is beyond loopback: the metrics have no \
                 authentication, so anyone who can reach the port reads them; keep it on a \
                 management network"
            ));
        }
        warnings
    }
}
