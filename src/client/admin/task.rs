//! `contactd task show|cancel|retry ID`: one task, with a row per agent it
//! concerns, and the operator's two changes to it.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::{
    CtlError, TaskRow, ago, block_on, connect, last_line, print, print_json, render, rfc3339,
    short, task_table,
};
use tonic::transport::Channel;

use crate::proto::admin::{self as pb, AgentTaskState, TaskIdRequest, admin_client::AdminClient};

/// One agent's row, as `contactd task show --json` prints it.
#[derive(Debug, Serialize)]
struct AgentRow {
    agent: String,
    state: &'static str,
    result: String,
    result_ms: i64,
    result_at: Option<String>,
    deadline_ms: i64,
    deadline_at: Option<String>,
}

/// `contactd task show --json`.
#[derive(Debug, Serialize)]
struct Shown {
    mode: String,
    attempts: u32,
    retries: u32,
    task: TaskRow,
    agents: Vec<AgentRow>,
}

fn agent_state_name(state: AgentTaskState) -> &'static str {
    match state {
        AgentTaskState::Unspecified => "unknown",
        AgentTaskState::Owed => "owed",
        AgentTaskState::Delivered => "delivered",
        AgentTaskState::Acked => "acked",
        AgentTaskState::Failed => "failed",
        AgentTaskState::Missed => "missed",
        AgentTaskState::Cancelled => "cancelled",
    }
}

/// `contactd task show`: the task as `contactd tasks` prints it, then one
/// row per agent.
///
/// # Errors
/// The socket cannot be reached, or the server refuses (an unknown id).
pub fn show(socket: &Path, id: u64, json: bool) -> Result<(), CtlError> {
    let reply = block_on(async {
        Ok(connect(socket)
            .await?
            .show_task(TaskIdRequest { id })
            .await?
            .into_inner())
    })?;
    let task = TaskRow::from(&reply.task.unwrap_or_default());
    let agents: Vec<AgentRow> = reply
        .agents
        .iter()
        .map(|a| AgentRow {
            agent: a.agent.clone(),
            state: agent_state_name(a.state()),
            result: a.result.clone(),
            result_ms: a.result_ms,
            result_at: rfc3339(a.result_ms),
            deadline_ms: a.deadline_ms,
            deadline_at: rfc3339(a.deadline_ms),
        })
        .collect();
    let shown = Shown {
        mode: reply.mode,
        attempts: reply.attempts,
        retries: reply.retries,
        task,
        agents,
    };
    if json {
        return print_json(&shown);
    }
    print(&show_text(&shown, SystemTime::now()))
}

fn show_text(shown: &Shown, now: SystemTime) -> String {
    let mut text = task_table(std::slice::from_ref(&shown.task), now);
    let _ = write!(text, "mode {}", shown.mode);
    if shown.mode == "queue" {
        let _ = write!(
            text,
            ": {} attempts, {} retries",
            shown.attempts, shown.retries
        );
    }
    text.push_str("\n\n");
    if shown.agents.is_empty() {
        text.push_str("no agent has had it or is owed it\n");
        return text;
    }
    let rows: Vec<Vec<String>> = shown
        .agents
        .iter()
        .map(|a| {
            let when = if a.deadline_ms > 0 {
                format!("ack due in {}", until(now, a.deadline_ms))
            } else if a.result_ms > 0 {
                format!("{} ago", ago(now, a.result_ms))
            } else {
                "-".to_owned()
            };
            let result = match last_line(&a.result) {
                "" => "-".to_owned(),
                line => short(line, 60),
            };
            vec![a.agent.clone(), a.state.to_owned(), when, result]
        })
        .collect();
    text.push_str(&render(&["AGENT", "STATE", "WHEN", "RESULT"], &rows));
    text
}

/// How long after `now` a Unix-milliseconds time is, to the second.
fn until(now: SystemTime, unix_ms: i64) -> String {
    let then = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    let secs = then.duration_since(now).unwrap_or_default().as_secs();
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// `contactd task cancel`.
///
/// # Errors
/// The socket cannot be reached, or the server refuses (an unknown id, a
/// finished task).
pub fn cancel(socket: &Path, id: u64, json: bool) -> Result<(), CtlError> {
    let what = format!(
        "cancelled task {id}: it is not sent any more (an agent that already has it still runs \
         it; its ack is ignored)"
    );
    change(socket, id, json, &what, |mut admin, request| async move {
        admin.cancel_task(request).await
    })
}

/// `contactd task retry`.
///
/// # Errors
/// The socket cannot be reached, or the server refuses (an unknown id, a
/// task that is not failed or dead, broadcast mode).
pub fn retry(socket: &Path, id: u64, json: bool) -> Result<(), CtlError> {
    let what = format!("task {id} is pending again: the queue delivers it anew");
    change(socket, id, json, &what, |mut admin, request| async move {
        admin.retry_task(request).await
    })
}

/// Calls `call` with task `id` and prints the task it changed.
fn change<F: Future<Output = Result<tonic::Response<pb::Task>, tonic::Status>>>(
    socket: &Path,
    id: u64,
    json: bool,
    what: &str,
    call: impl FnOnce(AdminClient<Channel>, TaskIdRequest) -> F,
) -> Result<(), CtlError> {
    let task = block_on(async {
        let admin = connect(socket).await?;
        Ok(call(admin, TaskIdRequest { id }).await?.into_inner())
    })?;
    changed(&task, json, what)
}

/// Prints a task the server changed: JSON, or `what` and its table row.
fn changed(task: &pb::Task, json: bool, what: &str) -> Result<(), CtlError> {
    let row = TaskRow::from(task);
    if json {
        return print_json(&serde_json::json!({ "task": row }));
    }
    print(&format!(
        "{what}\n{}",
        task_table(&[row], SystemTime::now())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_prints_the_task_then_a_row_per_agent() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let task = pb::Task {
            id: 7,
            text: "uptime".into(),
            state: pb::TaskState::Delivered as i32,
            created_ms: 990_000,
            delivered: 1,
            ..pb::Task::default()
        };
        let shown = Shown {
            mode: "queue".into(),
            attempts: 1,
            retries: 2,
            task: TaskRow::from(&task),
            agents: vec![
                AgentRow {
                    agent: "web1".into(),
                    state: "failed",
                    result: "exit status 1\nno disk\n".into(),
                    result_ms: 995_000,
                    result_at: None,
                    deadline_ms: 0,
                    deadline_at: None,
                },
                AgentRow {
                    agent: "web2".into(),
                    state: "delivered",
                    result: String::new(),
                    result_ms: 0,
                    result_at: None,
                    deadline_ms: 1_030_000,
                    deadline_at: None,
                },
            ],
        };
        let text = show_text(&shown, now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("7   delivered  *    10s"), "{text}");
        assert_eq!(lines[2], "mode queue: 1 attempts, 2 retries");
        assert_eq!(lines[4], "AGENT  STATE      WHEN            RESULT");
        assert_eq!(lines[5], "web1   failed     5s ago          no disk");
        assert_eq!(lines[6], "web2   delivered  ack due in 30s  -");
    }
}
