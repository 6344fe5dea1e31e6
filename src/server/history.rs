//! The admin API's commands on one task: `ShowTask` (the task with a row
//! per agent it concerns), `CancelTask` and `RetryTask`.
//!
//! What the server knows about a task is split: its state and counters live
//! in memory (the hub's ring, the queue), each agent's latest result in the
//! store's `results` table, and whether a broadcast agent got it in that
//! agent's ack cursor. `show` reads the store first (through its writer, so
//! it sees every write sent before) and memory after, which is the fresher.

use std::{collections::BTreeMap, sync::Arc, sync::atomic::Ordering::Relaxed};

use tonic::Status;

use super::{
    State,
    admin::{mode, store_status, task_message},
};
use crate::{
    model::{Task, TaskState},
    proto::admin::{self as pb, AgentTaskState},
    store::{TaskRecord, Write},
    tasks::queue::{Place, Refusal},
};

fn not_found(id: u64) -> Status {
    Status::not_found(format!(
        "no task {id}: never submitted, or deleted since (tasks.keep_for, tasks.retain_finished)"
    ))
}

fn cannot_cancel(id: u64, state: TaskState) -> Status {
    Status::failed_precondition(format!(
        "task {id} is {state}: only a pending or delivered task can be cancelled"
    ))
}

fn cannot_retry(id: u64, state: TaskState) -> Status {
    Status::failed_precondition(format!(
        "task {id} is {state}: only a failed or dead task can be retried"
    ))
}

/// The task as memory holds it: in the hub's ring, or in the queue.
fn live(state: &State, id: u64) -> Option<Arc<Task>> {
    state
        .hub
        .get(id)
        .filter(|t| !t.void)
        .or_else(|| state.queue.as_ref()?.find(id).map(|(task, ..)| task))
}

async fn stored(state: &State, id: u64) -> Result<Option<TaskRecord>, Status> {
    state.store.task(id).await.map_err(|e| store_status(&e))
}

/// The task from memory, else from the store.
async fn find(state: &State, id: u64) -> Result<Arc<Task>, Status> {
    if let Some(task) = live(state, id) {
        return Ok(task);
    }
    let record = stored(state, id).await?.ok_or_else(|| not_found(id))?;
    Ok(Arc::new(record.task.to_task()))
}

fn row(agent: &Arc<str>, state: AgentTaskState) -> pb::TaskAgent {
    pb::TaskAgent {
        agent: agent.to_string(),
        state: state as i32,
        ..pb::TaskAgent::default()
    }
}

/// An agent's state for a task it acked: `ok` or failed.
fn outcome(ok: bool) -> AgentTaskState {
    if ok {
        AgentTaskState::Acked
    } else {
        AgentTaskState::Failed
    }
}

/// `ShowTask`.
///
/// # Errors
/// `NOT_FOUND` for a task neither in memory nor in the store.
pub(super) async fn show(state: &State, id: u64) -> Result<pb::ShowTaskResponse, Status> {
    let record = stored(state, id).await?;
    let held = state.queue.as_ref().and_then(|q| q.find(id));
    // The queue's, the ring's, else the store's (the queue was asked once).
    let task = held
        .as_ref()
        .map(|(task, ..)| Arc::clone(task))
        .or_else(|| state.hub.get(id).filter(|t| !t.void))
        .or_else(|| record.as_ref().map(|r| Arc::new(r.task.to_task())))
        .ok_or_else(|| not_found(id))?;
    // Every agent's latest result: the store keeps them all; the memory
    // store only the latest ack's.
    let mut rows: BTreeMap<Arc<str>, pb::TaskAgent> = BTreeMap::new();
    match &record {
        Some(record) => {
            for result in &record.results {
                let mut r = row(&result.agent, outcome(result.ok));
                r.result.clone_from(&result.text);
                r.result_ms = result.at_ms;
                rows.insert(Arc::clone(&result.agent), r);
            }
        }
        None => {
            if let Some((agent, ok, text)) = task.progress.last_outcome() {
                let mut r = row(&agent, outcome(ok));
                r.result = text;
                rows.insert(agent, r);
            }
        }
    }
    if state.queue.is_some() {
        queue_rows(
            &mut rows,
            held.as_ref().map(|(_, place, _)| place),
            &task,
            record.as_ref(),
        );
    } else {
        broadcast_rows(state, &mut rows, &task);
    }
    let attempts = held
        .as_ref()
        .map(|(_, _, attempts)| *attempts)
        .or(record.as_ref().map(|r| r.task.attempts))
        .unwrap_or(0);
    Ok(pb::ShowTaskResponse {
        task: Some(task_message(&task)),
        mode: mode(state).to_owned(),
        attempts,
        retries: task.progress.retries(),
        agents: rows.into_values().collect(),
    })
}

/// Queue mode: the agent holding the task (or owed it), over its result.
fn queue_rows(
    rows: &mut BTreeMap<Arc<str>, pb::TaskAgent>,
    place: Option<&Place>,
    task: &Task,
    record: Option<&TaskRecord>,
) {
    let (agent, agent_state, deadline_ms) = match place {
        Some(Place::Waiting(Some(agent)) | Place::Assigned(agent)) => {
            (Arc::clone(agent), AgentTaskState::Owed, 0)
        }
        Some(Place::InFlight {
            holder,
            deadline_ms,
        }) => (Arc::clone(holder), AgentTaskState::Delivered, *deadline_ms),
        // Cancelled while an agent held it: that agent may still run it.
        Some(Place::Cancelled(Some(holder))) => (Arc::clone(holder), AgentTaskState::Delivered, 0),
        None if task.progress.is_cancelled() => match record.and_then(|r| r.task.claim.as_ref()) {
            Some((holder, _)) => (Arc::clone(holder), AgentTaskState::Delivered, 0),
            None => return,
        },
        _ => return,
    };
    let r = rows
        .entry(Arc::clone(&agent))
        .or_insert_with(|| row(&agent, agent_state));
    r.state = agent_state as i32;
    r.deadline_ms = deadline_ms;
}

/// Broadcast mode: every named agent the task was meant for (the target,
/// or every agent with a cursor that began at or before the task), by what
/// its cursor says; agents with a result keep it.
fn broadcast_rows(state: &State, rows: &mut BTreeMap<Arc<str>, pb::TaskAgent>, task: &Task) {
    let id = task.id;
    let retained = state.hub.get(id).is_some_and(|t| !t.void);
    let cancelled = task.progress.is_cancelled();
    let durable = state.store.is_durable();
    let agents = match &task.target {
        Some(target) => vec![(Arc::clone(target), state.cursors.get(target))],
        None => state
            .cursors
            .all()
            .into_iter()
            .map(|(name, tracked)| (name, Some(tracked)))
            .collect(),
    };
    for (agent, tracked) in agents {
        if rows.contains_key(&agent) {
            continue;
        }
        let agent_state = match tracked {
            // The target has never connected.
            None if cancelled => AgentTaskState::Cancelled,
            None if !retained => AgentTaskState::Missed,
            None => AgentTaskState::Owed,
            Some(tracked) => {
                if tracked.since > id {
                    // It first connected after the task was published
                    // (tasks.replay off, or the task left retention first).
                    continue;
                }
                let acked = tracked.cursor.lock().is_acked(id);
                let sent = tracked.sent_up_to.load(Relaxed) >= id;
                if cancelled {
                    AgentTaskState::Cancelled
                } else if acked {
                    // Every ack leaves a result in a durable store: a cursor
                    // past the task without one skipped it, as it had left
                    // retention. The memory store keeps only the latest
                    // ack's outcome: the others show as acked.
                    if durable || (!retained && !sent) {
                        AgentTaskState::Missed
                    } else {
                        AgentTaskState::Acked
                    }
                } else if !retained {
                    AgentTaskState::Missed
                } else if sent {
                    AgentTaskState::Delivered
                } else {
                    AgentTaskState::Owed
                }
            }
        };
        rows.insert(Arc::clone(&agent), row(&agent, agent_state));
    }
}

/// The state of task `id`, wherever it is known.
async fn state_of(state: &State, id: u64) -> Result<TaskState, Status> {
    Ok(find(state, id).await?.progress.state())
}

/// `CancelTask`.
///
/// # Errors
/// `NOT_FOUND` for an unknown task; `FAILED_PRECONDITION` for one that is
/// finished, or (broadcast) no longer retained.
pub(super) async fn cancel(state: &State, id: u64) -> Result<pb::Task, Status> {
    let (task, commit) = match &state.queue {
        Some(queue) => match queue.cancel(id) {
            Ok(cancelled) => cancelled,
            Err(Refusal::State(s)) => return Err(cannot_cancel(id, s)),
            Err(Refusal::NotHeld) => return Err(cannot_cancel(id, state_of(state, id).await?)),
        },
        None => {
            let Some(task) = state.hub.get(id).filter(|t| !t.void) else {
                stored(state, id).await?.ok_or_else(|| not_found(id))?;
                return Err(Status::failed_precondition(format!(
                    "task {id} is no longer retained (tasks.retain): it is not sent to anyone \
                     any more"
                )));
            };
            task.progress.cancel().map_err(|s| cannot_cancel(id, s))?;
            let commit = state.store.write_now(Write::Cancelled { id, held: false });
            (task, commit)
        }
    };
    commit.committed().await.map_err(|e| store_status(&e))?;
    tracing::info!(task_id = id, "task cancelled");
    Ok(task_message(&task))
}

/// `RetryTask`.
///
/// # Errors
/// `NOT_FOUND` for an unknown task; `FAILED_PRECONDITION` for one that is
/// not failed or dead, or in broadcast mode.
pub(super) async fn retry(state: &State, id: u64) -> Result<pb::Task, Status> {
    let task = find(state, id).await?;
    let Some(queue) = &state.queue else {
        // Re-sending to the agents whose result failed would need their
        // cursors to forget the ack: submitting again is simpler and clear.
        return Err(Status::failed_precondition(format!(
            "task {id} is a broadcast task ({}): only queue mode retries tasks; to run it \
             again, submit it again (with --agent NAME for one agent)",
            task.progress.state()
        )));
    };
    let commit = queue.retry(&task).map_err(|refusal| match refusal {
        Refusal::State(s) => cannot_retry(id, s),
        Refusal::NotHeld => cannot_retry(id, task.progress.state()),
    })?;
    commit.committed().await.map_err(|e| store_status(&e))?;
    let task = queue.find(id).map_or(task, |(task, ..)| task);
    tracing::info!(
        task_id = id,
        retry = task.progress.retries(),
        "task retried: pending again"
    );
    Ok(task_message(&task))
}
