//! The words every layer shares: a task and where it stands, an agent's
//! broadcast ack cursor, and the records the store keeps of them. Plain
//! values with their own rules; nothing here knows how tasks are delivered
//! or stored.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering},
    },
    time::SystemTime,
};

use crate::selector::Selector;

/// A task as the hub keeps it: its content is immutable once published;
/// only its delivery counters change.
#[derive(Debug)]
pub struct Task {
    /// Position in the hub's sequence, starting at 1.
    pub id: u64,
    /// What the agents receive.
    pub text: String,
    /// When it was published.
    pub created: SystemTime,
    /// The one agent it is for (submitted with `--agent`), or every agent.
    pub target: Option<Arc<str>>,
    /// Broadcast: only the agents this selector matches receive it
    /// (submitted with `--target`).
    pub selector: Option<Arc<Selector>>,
    /// How its deliveries went.
    pub progress: Progress,
    /// The job whose run it is (`""` for an ad hoc rollout), if any.
    pub job: Option<Arc<str>>,
    /// Delivered by its run to the agents the run admits (a job of mode
    /// `each` or `any`), never by the ring or the queue.
    pub direct: bool,
    /// A placeholder for an id whose task could not be stored: it keeps
    /// the ring's ids contiguous and is never delivered or listed.
    pub void: bool,
    /// Broadcast mode: the task as every agent receives it, encoded once
    /// (with the batch it was published in) and shared by every stream.
    pub wire: std::sync::OnceLock<crate::proto::wire::Framed>,
}

/// What a task to publish is, before it has an id.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub text: String,
    /// [`Task::target`].
    pub target: Option<Arc<str>>,
    /// [`Task::selector`].
    pub selector: Option<Arc<Selector>>,
    /// [`Task::job`].
    pub job: Option<Arc<str>>,
    /// [`Task::direct`].
    pub direct: bool,
}

/// A text for one agent (`Some`) or every agent.
impl From<(String, Option<Arc<str>>)> for Draft {
    fn from((text, target): (String, Option<Arc<str>>)) -> Draft {
        Draft {
            text,
            target,
            ..Draft::default()
        }
    }
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TaskState {
    /// Not sent to any agent yet.
    Pending = 0,
    /// Sent, no ack yet.
    Delivered = 1,
    /// Acked as handled.
    Acked = 2,
    /// Acked as failed.
    Failed = 3,
    /// Queue mode: not acked after `max_attempts` deliveries; parked.
    Dead = 4,
    /// Cancelled by an operator before it finished: not sent any more, and
    /// acks of it are ignored.
    Cancelled = 5,
}

impl TaskState {
    /// Finished: acked, failed, dead or cancelled.
    pub fn is_finished(self) -> bool {
        self >= TaskState::Acked
    }

    /// The state numbered `n` (as stored); unknown numbers are pending.
    pub fn from_u8(n: u8) -> TaskState {
        match n {
            1 => TaskState::Delivered,
            2 => TaskState::Acked,
            3 => TaskState::Failed,
            4 => TaskState::Dead,
            5 => TaskState::Cancelled,
            _ => TaskState::Pending,
        }
    }

    /// The state's name, as operators see it.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Delivered => "delivered",
            TaskState::Acked => "acked",
            TaskState::Failed => "failed",
            TaskState::Dead => "dead",
            TaskState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a job's run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum RunState {
    /// Agents are being sent it, or it waits for their answers.
    Running = 0,
    /// More agents failed than its rollout tolerates: nothing more is sent
    /// until an operator resumes it.
    Halted = 1,
    /// Every agent it was for answered, and none failed.
    Succeeded = 2,
    /// Every agent it was for answered (or was missed), and some failed.
    Failed = 3,
    /// Its timeout passed with agents still owed it or running it.
    TimedOut = 4,
}

impl RunState {
    /// Finished: it sends nothing more.
    pub fn is_finished(self) -> bool {
        self >= RunState::Succeeded
    }

    /// The state numbered `n` (as stored); unknown numbers are running.
    pub fn from_u8(n: u8) -> RunState {
        match n {
            1 => RunState::Halted,
            2 => RunState::Succeeded,
            3 => RunState::Failed,
            4 => RunState::TimedOut,
            _ => RunState::Running,
        }
    }

    /// The state's name, as operators (and the metrics' `outcome`) see it.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Halted => "halted",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::TimedOut => "timed_out",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where one agent stands with one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum RunAgentState {
    /// Matched, not sent yet (waiting for a slot in the window, or for the
    /// agent to connect).
    Owed = 0,
    /// Sent, no answer yet.
    Running = 1,
    Acked = 2,
    /// Answered with a failure after its retries.
    Failed = 3,
    /// Still owed (or running) when the run ended; in an `any` run, also
    /// an agent away for `tasks.ack_timeout` while it ran the task.
    Missed = 4,
}

impl RunAgentState {
    /// Done with: it is sent nothing more by this run.
    pub fn is_finished(self) -> bool {
        self >= RunAgentState::Acked
    }

    /// The state numbered `n` (as stored); unknown numbers are owed.
    pub fn from_u8(n: u8) -> RunAgentState {
        match n {
            1 => RunAgentState::Running,
            2 => RunAgentState::Acked,
            3 => RunAgentState::Failed,
            4 => RunAgentState::Missed,
            _ => RunAgentState::Owed,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RunAgentState::Owed => "owed",
            RunAgentState::Running => "running",
            RunAgentState::Acked => "acked",
            RunAgentState::Failed => "failed",
            RunAgentState::Missed => "missed",
        }
    }
}

/// Delivery counters of one task.
#[derive(Debug, Default)]
pub struct Progress {
    state: AtomicU8,
    /// Times it was sent to an agent.
    pub delivered: AtomicU32,
    /// Acks saying it was handled successfully (or with no outcome said).
    pub acked: AtomicU32,
    /// Acks saying handling failed.
    pub failed: AtomicU32,
    /// The latest ack's agent and text (truncated by the server).
    last_result: parking_lot::Mutex<Option<(Arc<str>, String)>>,
    /// Whether the latest ack said the task was handled (for `task show`
    /// with the memory store, which keeps no per-agent results).
    last_ok: AtomicBool,
    /// Times an operator sent it back to the queue (`task retry`): sent
    /// with it, so that agents run it again rather than repeat their ack.
    retries: AtomicU32,
}

impl Task {
    /// A task as published, pending.
    pub fn new(id: u64, text: String, created: SystemTime, target: Option<Arc<str>>) -> Task {
        Task {
            id,
            text,
            created,
            target,
            selector: None,
            job: None,
            direct: false,
            progress: Progress::default(),
            void: false,
            wire: std::sync::OnceLock::new(),
        }
    }

    /// The task `draft` describes, as published with id `id`.
    pub fn from_draft(id: u64, draft: Draft, created: SystemTime) -> Task {
        Task {
            selector: draft.selector,
            job: draft.job,
            direct: draft.direct,
            ..Task::new(id, draft.text, created, draft.target)
        }
    }

    /// The placeholder of an id that was given out but never stored.
    pub fn void(id: u64) -> Task {
        Task {
            void: true,
            ..Task::new(id, String::new(), SystemTime::UNIX_EPOCH, None)
        }
    }
}

impl Progress {
    /// Counters and state as a store kept them.
    pub fn restored(
        state: TaskState,
        [delivered, acked, failed, retries]: [u32; 4],
        last_result: Option<(Arc<str>, String)>,
    ) -> Progress {
        Progress {
            state: AtomicU8::new(state as u8),
            delivered: AtomicU32::new(delivered),
            acked: AtomicU32::new(acked),
            failed: AtomicU32::new(failed),
            last_result: parking_lot::Mutex::new(last_result),
            // Only read with the memory store, which restores nothing.
            last_ok: AtomicBool::new(true),
            retries: AtomicU32::new(retries),
        }
    }

    /// Records a delivery to an agent; true for the task's first one.
    pub fn record_delivery(&self) -> bool {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        // Only a pending task becomes delivered; an acked one stays acked.
        // (Read first: fan-out asks once per agent, and only the first
        // finds it pending; a read is cheaper than a failed exchange.)
        self.state.load(Ordering::Relaxed) == TaskState::Pending as u8
            && self
                .state
                .compare_exchange(
                    TaskState::Pending as u8,
                    TaskState::Delivered as u8,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// The latest ack's agent and text.
    pub fn last_result(&self) -> Option<(Arc<str>, String)> {
        self.last_result.lock().clone()
    }

    /// Records an ack from `agent` with its text: `ok` false for a
    /// failure. The first ack decides the state.
    pub fn record_ack(&self, ok: bool, agent: &Arc<str>, text: String) {
        {
            let mut last = self.last_result.lock();
            *last = Some((Arc::clone(agent), text));
            self.last_ok.store(ok, Ordering::Relaxed);
        }
        let (counter, state) = if ok {
            (&self.acked, TaskState::Acked)
        } else {
            (&self.failed, TaskState::Failed)
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s < TaskState::Acked as u8).then_some(state as u8)
            });
    }

    /// The latest ack's agent, whether it said handled, and its text.
    pub fn last_outcome(&self) -> Option<(Arc<str>, bool, String)> {
        let last = self.last_result.lock();
        let ok = self.last_ok.load(Ordering::Relaxed);
        last.as_ref()
            .map(|(agent, text)| (Arc::clone(agent), ok, text.clone()))
    }

    /// Sets the state (queue mode moves tasks back to pending and to dead).
    pub fn set_state(&self, state: TaskState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Cancels the task if it is pending or delivered; otherwise returns
    /// the state it is in (unchanged).
    ///
    /// # Errors
    /// The task is finished already.
    pub fn cancel(&self) -> Result<(), TaskState> {
        self.state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s < TaskState::Acked as u8).then_some(TaskState::Cancelled as u8)
            })
            .map(drop)
            .map_err(TaskState::from_u8)
    }

    /// Whether an operator cancelled the task.
    pub fn is_cancelled(&self) -> bool {
        self.state() == TaskState::Cancelled
    }

    /// Times an operator retried the task.
    pub fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Puts a failed or dead task back to pending, counting the retry;
    /// otherwise returns the state it is in (unchanged).
    ///
    /// # Errors
    /// The task is neither failed nor dead.
    pub fn retry(&self) -> Result<u32, TaskState> {
        self.state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                let s = TaskState::from_u8(s);
                matches!(s, TaskState::Failed | TaskState::Dead).then_some(TaskState::Pending as u8)
            })
            .map_err(TaskState::from_u8)?;
        Ok(self.retries.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Where the task stands.
    pub fn state(&self) -> TaskState {
        TaskState::from_u8(self.state.load(Ordering::Relaxed))
    }
}

/// Acks of one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckCursor {
    /// Every task id up to this one is acked (0: none yet).
    watermark: u64,
    /// Acked ids above `watermark + 1`.
    above: BTreeSet<u64>,
}

impl AckCursor {
    /// A cursor for an agent that has seen every task up to `id`.
    pub fn at(id: u64) -> AckCursor {
        AckCursor {
            watermark: id,
            above: BTreeSet::new(),
        }
    }

    /// A cursor as a store kept it.
    pub fn from_parts(watermark: u64, above: impl IntoIterator<Item = u64>) -> AckCursor {
        AckCursor {
            watermark,
            above: above.into_iter().filter(|id| *id > watermark).collect(),
        }
    }

    /// The acked ids above the watermark, lowest first.
    pub fn above(&self) -> impl Iterator<Item = u64> + '_ {
        self.above.iter().copied()
    }

    /// Records an ack of task `id`, keeping at most `bound` out-of-order
    /// ids; `false` when it was acked already (a repeated ack).
    pub fn ack(&mut self, id: u64, bound: usize) -> bool {
        if id <= self.watermark {
            return false;
        }
        if id == self.watermark + 1 {
            self.watermark = id;
            while self.above.remove(&(self.watermark + 1)) {
                self.watermark += 1;
            }
            return true;
        }
        if !self.above.insert(id) {
            return false;
        }
        while self.above.len() > bound.max(1) {
            self.above.pop_first();
        }
        true
    }

    /// Takes in the acks `other` records too (the same agent's cursor as
    /// another server kept it): acks only ever accumulate.
    pub fn merge(&mut self, other: &AckCursor) {
        if other.watermark > self.watermark {
            self.watermark = other.watermark;
            self.above = self.above.split_off(&(self.watermark + 1));
        }
        self.above
            .extend(other.above.range(self.watermark + 1..).copied());
        while self.above.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
    }

    /// Tasks before this id need no redelivery: resume after the watermark.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Whether task `id` was acked.
    pub fn is_acked(&self, id: u64) -> bool {
        id <= self.watermark || self.above.contains(&id)
    }

    /// Skips the watermark past tasks that can no longer be delivered (they
    /// left retention): returns how many unacked ones that drops.
    pub fn skip_to(&mut self, first_retained: u64) -> u64 {
        if first_retained <= self.watermark + 1 {
            return 0;
        }
        let acked_gone = self.above.range(..first_retained).count() as u64;
        let missed = first_retained - 1 - self.watermark - acked_gone;
        self.above = self.above.split_off(&first_retained);
        self.watermark = first_retained - 1;
        while self.above.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
        missed
    }
}

/// A cursor as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub agent: Arc<str>,
    pub cursor: AckCursor,
    /// The first task id meant for the agent (see `tasks::Tracked::since`).
    pub since: u64,
    pub sent_up_to: u64,
    /// When the agent was last seen (unix ms).
    pub seen_ms: i64,
}

/// A named agent as the roster keeps it: when it was first and last seen,
/// and its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedAgent {
    pub name: Arc<str>,
    /// Unix milliseconds.
    pub first_ms: i64,
    pub last_ms: i64,
    pub delivered: u64,
    pub acked: u64,
    pub failed: u64,
}
