//! Who calls, and what an ack of theirs changed: the values the broker
//! and job runs take from and give to the transports.

use std::{net::SocketAddr, sync::Arc};

use crate::labels::LabelCell;

/// The caller of a transport, as the broker sees it.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Its name (an agent), or its peer's IP address (a seed client).
    pub name: Arc<str>,
    /// Whether `name` is an agent's name: only named agents have cursors
    /// and ack tasks.
    pub named: bool,
    /// Its peer address, for log lines.
    pub address: Option<SocketAddr>,
    /// Its labels in force (empty for seed clients), which task selectors
    /// are matched against.
    pub labels: LabelCell,
}

/// What an ack changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// A result applied (or a seed client's free-form result): counts as
    /// acked (`ok`) or failed.
    Counted { ok: bool },
    /// Not applied, for this reason: the task was not delivered to the
    /// caller. Counted and logged (rate-limited) by the transport.
    Refused(&'static str),
    /// Changes nothing and is not the caller's fault: late or repeated,
    /// from an earlier server run, or of a cancelled task.
    Ignored,
}
