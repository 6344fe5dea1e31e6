//! Tasks: the broker that owns their state, the hub that retains and fans
//! them out, the queue that hands each to one agent, the cursors of named
//! agents, the feed of one stream, and the generator that publishes them on
//! a schedule; `[[jobs]]` and their runs, and the mailboxes runs send
//! through.

pub mod broker;
mod caller;
pub mod cursor;
pub mod direct;
pub mod feed;
pub mod generator;
pub mod hub;
pub mod jobs;
pub mod queue;

pub use broker::{Acked, Agent, AgentRow, AgentState, Broker, Refused, Stats, TaskView};
pub use cursor::{Cursors, Tracked};
pub use feed::Feed;
pub use hub::{Delivery, Hub, Start, Subscription};
