//! Tasks: their templates, the hub that retains and fans them out, and the
//! generator that feeds it on a schedule.

pub mod cursor;
pub mod generator;
pub mod hub;
pub mod queue;

pub use cursor::{Cursors, Tracked};
pub use hub::{Delivery, Hub, Start, Subscription};
// Parsed with the config, which owns the type; re-exported where it is used.
pub use crate::config::template::{self, TaskTemplate};
