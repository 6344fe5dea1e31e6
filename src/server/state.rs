//! What every handler of the server shares: the broker (task state), the
//! callers (connection bookkeeping), the policy (who may do what), the
//! config in force, the shutdown tokens and the counters.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{callers::Callers, counters::Counters, policy::Policy};
use crate::{config::Config, tasks::Broker};

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct State {
    /// The one owner of task state: delivery, acks, the store.
    pub(crate) broker: Arc<Broker>,
    /// Who is calling and what they last reported.
    pub(crate) callers: Callers,
    /// Remote command rules, tokens and the TLS config: read at start and
    /// re-read on reload.
    pub(crate) policy: Policy,
    /// The config in force.
    pub(crate) config: watch::Receiver<Arc<Config>>,
    /// Cancelled once health says NOT_SERVING: streams end, accepting stops.
    pub(crate) closing: CancellationToken,
    /// Cancelled when the grace period is over: running commands are killed.
    pub(crate) kill: CancellationToken,
    /// Counts of rare events, for the metrics (shared with the listener).
    pub(crate) counters: Arc<Counters>,
}
