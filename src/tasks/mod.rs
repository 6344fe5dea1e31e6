//! Tasks: their templates, the hub that retains and fans them out, and the
//! generator that feeds it on a schedule.

pub mod generator;
pub mod hub;
pub mod template;

pub use hub::{Delivery, Hub, Start, Subscription, Task};
pub use template::TaskTemplate;
