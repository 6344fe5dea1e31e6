//! Tasks: their templates, the hub that retains and fans them out, and the
//! generator that feeds it on a schedule.

pub mod cursor;
pub mod generator;
pub mod hub;
pub mod queue;

pub use cursor::{AckCursor, Cursors, Tracked};
pub use hub::{Delivery, Hub, Progress, Start, Subscription, Task, TaskState};
// Parsed with the config, which owns the type; re-exported where it is used.
pub use crate::config::template::{self, TaskTemplate};
