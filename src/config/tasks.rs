//! `[tasks]`: generation, delivery mode and retention of tasks, with their
//! defaults and their checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Checks, TaskTemplate, ranges, units};

/// `[tasks]`: generation and retention of tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// Time between two generated batches.
    #[serde(with = "units::duration")]
    pub interval: Duration,
    /// Tasks per generated batch; 0 turns generation off.
    pub batch: u32,
    /// Text of a generated task.
    pub template: TaskTemplate,
    /// Tasks kept for replay and for slow subscribers.
    pub retain: usize,
    /// Whether a new subscriber first receives the retained tasks.
    pub replay: bool,
    /// Whether every agent gets every task, or each task goes to one agent.
    pub mode: DeliveryMode,
    /// Queue mode: how long an agent has to ack a task before it is
    /// redelivered.
    #[serde(with = "units::duration")]
    pub ack_timeout: Duration,
    /// Queue mode: deliveries of a task before it is parked as dead.
    pub max_attempts: u32,
    /// Queue mode: tasks assigned to one agent at once (sent or about to be).
    pub window: usize,
    /// Queue mode: tasks waiting for an agent; beyond, the oldest are
    /// dropped and counted.
    pub max_pending: usize,
    /// Finished tasks (and, in broadcast mode, every task) are deleted from
    /// the store this long after they were created...
    #[serde(with = "units::duration")]
    pub keep_for: Duration,
    /// ...and beyond this many, the oldest first.
    pub retain_finished: usize,
    /// Runs of `each` and `any` jobs (and ad hoc rollouts) in progress or
    /// halted at once; beyond, a job's period is skipped (and logged) and
    /// an operator's run is refused. Each holds a row per agent it targets.
    pub max_runs: usize,
}

/// `tasks.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// Every agent gets every task (the seed's behaviour); a reconnecting
    /// agent gets what it missed while away, within `retain`.
    Broadcast,
    /// Each task goes to exactly one agent, redelivered until acked.
    Queue,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            interval: Duration::from_secs(40),
            batch: 10,
            template: TaskTemplate::default(),
            retain: 1000,
            replay: true,
            mode: DeliveryMode::Broadcast,
            ack_timeout: Duration::from_secs(60),
            max_attempts: 5,
            window: 16,
            max_pending: 100_000,
            keep_for: Duration::from_secs(7 * 86_400),
            retain_finished: 100_000,
            max_runs: 256,
        }
    }
}

impl TasksConfig {
    /// Range checks.
    pub(crate) fn check(&self, c: &mut Checks) {
        use ranges::*;
        if !INTERVAL.contains(&self.interval) {
            c.duration("tasks.interval", self.interval, INTERVAL);
            c.0.last_mut()
                .expect("just pushed")
                .1
                .push_str(" (set tasks.batch = 0 to turn generation off)");
        }
        c.count("tasks.batch", self.batch.into(), BATCH);
        c.count(
            "tasks.template",
            self.template.to_string().len() as u64,
            TEMPLATE_BYTES,
        );
        c.count("tasks.retain", self.retain as u64, RETAIN);
        c.duration("tasks.ack_timeout", self.ack_timeout, ACK_TIMEOUT);
        c.count("tasks.max_attempts", self.max_attempts.into(), MAX_ATTEMPTS);
        c.count("tasks.window", self.window as u64, WINDOW);
        c.count("tasks.max_pending", self.max_pending as u64, MAX_PENDING);
        c.duration("tasks.keep_for", self.keep_for, KEEP_FOR);
        c.count(
            "tasks.retain_finished",
            self.retain_finished as u64,
            RETAIN_FINISHED,
        );
        c.count("tasks.max_runs", self.max_runs as u64, MAX_RUNS);
    }
}
