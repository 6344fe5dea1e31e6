//! What the store keeps of jobs: each job's last nominal fire time and
//! whether it is paused ([`JobRow`]), each run ([`RunRow`], keyed by the id
//! of the task it sends) and each agent's state in it ([`RunAgentRow`]).
//!
//! A scheduled run is fired at most once: its row is unique by job and
//! nominal time, and it is written in the transaction that publishes its
//! task ([`Store::fire`](super::Store::fire)); a run whose row another
//! server (or an earlier life of this one) already wrote is not published.

use std::sync::Arc;

use crate::model::{Draft, RunAgentState, RunState};

/// One job as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub name: Arc<str>,
    /// The latest nominal time fired or skipped (or, before the first run,
    /// when the job was first scheduled): only later ones are due.
    pub last_nominal_ms: i64,
    pub paused: bool,
    /// When its latest run that succeeded started (0: none).
    pub last_success_ms: i64,
}

/// One run of a job, with the rollout it was started with (resolved to
/// counts when it started, so a restart resumes it as it was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRow {
    /// The id of the task the run sends: the run's id too.
    pub task_id: u64,
    /// Its job (`""`: an ad hoc rollout, `task submit --batch`).
    pub job: Arc<str>,
    /// The nominal fire time it is the run of (`None`: run by an operator).
    pub nominal_ms: Option<i64>,
    /// `each`, `any` or `broadcast`.
    pub mode: Arc<str>,
    pub state: RunState,
    /// The selector's canonical text.
    pub target: Arc<str>,
    /// Agents it targeted when it started.
    pub targets: u32,
    /// Agents running it at once at most.
    pub batch: u32,
    /// Failures it tolerates: one more halts it.
    pub max_failed: u32,
    pub wait_ms: i64,
    /// Times an agent (`each`) or the run (`any`) is tried again after a
    /// failure.
    pub retries: u32,
    pub started_ms: i64,
    /// When it ends at the latest: its agents still owed it are missed.
    pub deadline_ms: i64,
    /// When it finished (0: not yet).
    pub finished_ms: i64,
    pub acked: u32,
    pub failed: u32,
    pub missed: u32,
}

/// One agent's state in one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAgentRow {
    pub task_id: u64,
    pub agent: Arc<str>,
    pub state: RunAgentState,
    /// Times it was sent the run's task.
    pub tries: u32,
    pub at_ms: i64,
}

/// A run to fire: its task, and its row (whose `task_id` the store fills).
#[derive(Debug)]
pub struct Firing {
    pub draft: Draft,
    pub run: RunRow,
}

/// A run with its agents, as the store read it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub run: RunRow,
    pub agents: Vec<RunAgentRow>,
}

/// What a shared database says of a server's runs, read every few seconds
/// ([`Store::runs_news`](super::Store::runs_news)). A lone server has none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunsNews {
    /// Acks of its runs' tasks made through other servers (the agents
    /// moved there), at or after when each run last sent them.
    pub relayed: Vec<RelayedAck>,
    /// Its runs that another server carries out now (it took them over
    /// while this one could not reach the database): (run, that server).
    pub taken: Vec<(u64, Arc<str>)>,
    /// Unfinished runs of other servers that stopped, or whose heartbeat
    /// is older than asked: (run, its server). Candidates to take over
    /// ([`Store::adopt`](super::Store::adopt)).
    pub orphans: Vec<(u64, Arc<str>)>,
}

/// An agent's ack of a run's task, made through another server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedAck {
    pub task_id: u64,
    pub agent: Arc<str>,
    pub ok: bool,
    pub at_ms: i64,
}
