//! The operator commands `contactd task submit`, `contactd agents` and
//! `contactd tasks` (and, in `task`, `contactd task show|cancel|retry`):
//! clients of the admin API on its unix socket, printing a table for people
//! or JSON for scripts.

mod jobs;
mod task;

pub use jobs::{halt_run, jobs, pause as pause_job, resume_run, run as run_job, show as show_run};
pub use task::{cancel, retry, show};

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    proto::admin::{
        self as pb, ListAgentsRequest, ListTasksRequest, SubmitTaskRequest,
        admin_client::AdminClient,
    },
    selector::Selector,
};

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{}", connect_message(.path, .source))]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the server refused: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
    /// The socket is where another user may have put it.
    #[error("{0}")]
    Untrusted(String),
}

/// Why the admin socket could not be reached, with what to do about it.
fn connect_message(path: &Path, error: &tonic::transport::Error) -> String {
    use std::io::ErrorKind;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut kind = None;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kind = Some(io.kind());
            break;
        }
        source = e.source();
    }
    match kind {
        Some(ErrorKind::PermissionDenied) => format!(
            "cannot open the admin socket {}: permission denied: add your user to group \
             contactd (or run as root)",
            path.display()
        ),
        Some(ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            format!("no socket at {}: is contactd running?", path.display())
        }
        _ => format!(
            "cannot reach the admin socket {}: {}",
            path.display(),
            crate::error_chain(error)
        ),
    }
}

fn print(text: &str) -> Result<(), CtlError> {
    super::write_out(text).map_err(CtlError::Output)
}

/// Prints `--json` output: one object per command (`{"agents": [...]}`,
/// `{"task": {...}}`), so a field can be added without breaking a script.
fn print_json(value: &impl Serialize) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(value).expect("JSON output serializes");
    print(&format!("{text}\n"))
}

/// The largest admin response accepted: `tasks` pages its answers, but a
/// single task (or the agents list) can be larger than gRPC's default 4 MiB.
const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// How long a command waits for the server.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the admin API on `socket`.
///
/// # Errors
/// [`CtlError::Connect`] when the socket cannot be reached.
pub async fn connect(socket: &Path) -> Result<AdminClient<Channel>, CtlError> {
    if let Some(why) = crate::net::untrusted_socket(socket) {
        return Err(CtlError::Untrusted(format!(
            "not using the admin socket {}: {why}",
            socket.display()
        )));
    }
    let path = socket.to_owned();
    // The URI is required by the API but unused: the connector opens the socket.
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| CtlError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    Ok(AdminClient::new(channel).max_decoding_message_size(MAX_RESPONSE))
}

fn block_on<T>(future: impl Future<Output = Result<T, CtlError>>) -> Result<T, CtlError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CtlError::Runtime)?
        .block_on(future)
}

/// `contactd task submit`: prints the new task's id.
///
/// # Errors
/// The socket cannot be reached, or the server refuses.
pub fn submit(
    socket: &Path,
    text: &str,
    agent: Option<&str>,
    target: Option<&Selector>,
    rollout: Option<(&str, &str)>,
    json: bool,
) -> Result<bool, CtlError> {
    block_on(async {
        let mut client = connect(socket).await?;
        if let Some(agent) = agent {
            warn_if_unknown(&mut client, agent).await?;
        }
        let (batch, max_failed) = rollout.unwrap_or_default();
        let request = SubmitTaskRequest {
            text: text.to_owned(),
            agent: agent.unwrap_or_default().to_owned(),
            selector: target.map(ToString::to_string).unwrap_or_default(),
            batch: batch.to_owned(),
            max_failed: max_failed.to_owned(),
        };
        let reply = client.submit_task(request).await?.into_inner();
        if reply.run != 0 {
            if !json {
                print(&format!(
                    "started rollout {} (task {})\n",
                    reply.run, reply.id
                ))?;
            }
            return jobs::follow(&mut client, reply.run, json).await;
        }
        if json {
            print_json(&serde_json::json!({ "id": reply.id }))?;
        } else {
            print(&format!("submitted task {}\n", reply.id))?;
        }
        Ok(true)
    })
}

/// Warns on stderr when the server has never seen `agent`: a typo would
/// otherwise leave the task waiting, unnoticed, for an agent that never comes.
async fn warn_if_unknown(client: &mut AdminClient<Channel>, agent: &str) -> Result<(), CtlError> {
    let agents = client
        .list_agents(ListAgentsRequest::default())
        .await?
        .into_inner()
        .agents;
    if !agents.iter().any(|a| a.name == agent) {
        eprintln!(
            "warning: no agent named {agent:?} has connected to this server: the task waits \
             until one does (check the name with `contactd agents`)"
        );
    }
    Ok(())
}

/// A time of the admin API (Unix milliseconds) as RFC 3339, UTC, to the
/// millisecond (`2026-12-04T20:41:02.123Z`), printed by `--json` beside the
/// number as `NAME_at` next to `NAME_ms`: people and `jq` read it, scripts
/// that compute keep the number. `None` (null) for 0, the API's "never".
fn rfc3339(unix_ms: i64) -> Option<String> {
    let ms = u64::try_from(unix_ms).ok().filter(|&ms| ms > 0)?;
    let time = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    Some(humantime::format_rfc3339_millis(time).to_string())
}

/// One agent, as `contactd agents --json` prints it.
#[derive(Debug, Serialize)]
struct AgentRow {
    name: String,
    named: bool,
    address: String,
    connected: bool,
    connected_since_ms: i64,
    connected_since_at: Option<String>,
    last_status: String,
    last_status_ms: i64,
    last_status_at: Option<String>,
    delivered: u64,
    acked: u64,
    failed: u64,
    missed: u64,
    in_flight: u64,
    refused_acks: u64,
    first_seen_ms: i64,
    first_seen_at: Option<String>,
    last_seen_ms: i64,
    last_seen_at: Option<String>,
    /// Several servers sharing one store: the one it is (or was last)
    /// connected to.
    #[serde(skip_serializing_if = "String::is_empty")]
    server: String,
    /// Its labels in force, by key.
    labels: std::collections::BTreeMap<String, String>,
}

/// A server sharing the store, as `contactd agents --json` prints it.
#[derive(Debug, Serialize)]
struct ServerRow {
    name: String,
    alive: bool,
    stopped: bool,
    this: bool,
    started_ms: i64,
    started_at: Option<String>,
    heartbeat_ms: i64,
    heartbeat_at: Option<String>,
}

/// `contactd agents`.
///
/// # Errors
/// The socket cannot be reached, or the server refuses.
pub fn agents(socket: &Path, selector: Option<&Selector>, json: bool) -> Result<(), CtlError> {
    let request = ListAgentsRequest {
        selector: selector.map(ToString::to_string).unwrap_or_default(),
    };
    let listed = block_on(async {
        Ok(connect(socket)
            .await?
            .list_agents(request)
            .await?
            .into_inner())
    })?;
    let servers: Vec<ServerRow> = listed
        .servers
        .into_iter()
        .map(|s| ServerRow {
            started_at: rfc3339(s.started_ms),
            heartbeat_at: rfc3339(s.heartbeat_ms),
            name: s.name,
            alive: s.alive,
            stopped: s.stopped,
            this: s.this,
            started_ms: s.started_ms,
            heartbeat_ms: s.heartbeat_ms,
        })
        .collect();
    let rows: Vec<AgentRow> = listed
        .agents
        .into_iter()
        .map(|a| AgentRow {
            name: a.name,
            named: a.named,
            address: a.address,
            connected: a.connected,
            connected_since_ms: a.connected_since_ms,
            connected_since_at: rfc3339(a.connected_since_ms),
            last_status: a.last_status,
            last_status_ms: a.last_status_ms,
            last_status_at: rfc3339(a.last_status_ms),
            delivered: a.delivered,
            acked: a.acked,
            failed: a.failed,
            missed: a.missed,
            in_flight: a.in_flight,
            refused_acks: a.refused_acks,
            first_seen_ms: a.first_seen_ms,
            first_seen_at: rfc3339(a.first_seen_ms),
            last_seen_ms: a.last_seen_ms,
            last_seen_at: rfc3339(a.last_seen_ms),
            server: a.server,
            labels: a.labels.into_iter().collect(),
        })
        .collect();
    if json {
        if servers.is_empty() {
            return print_json(&serde_json::json!({ "agents": rows }));
        }
        return print_json(&serde_json::json!({ "agents": rows, "servers": servers }));
    }
    let shared = !servers.is_empty();
    let now = SystemTime::now();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|a| {
            vec![
                if a.named {
                    a.name.clone()
                } else {
                    format!("({})", a.name)
                },
                a.address.clone(),
                match (a.connected, shared && !a.server.is_empty()) {
                    (true, false) => format!("up {}", ago(now, a.connected_since_ms)),
                    (true, true) if a.connected_since_ms == 0 => format!("up, on {}", a.server),
                    (true, true) => {
                        format!("up {}, on {}", ago(now, a.connected_since_ms), a.server)
                    }
                    (false, false) => format!("down, seen {} ago", ago(now, a.last_seen_ms)),
                    (false, true) => format!(
                        "down, seen {} ago on {}",
                        ago(now, a.last_seen_ms),
                        a.server
                    ),
                },
                a.delivered.to_string(),
                a.acked.to_string(),
                a.failed.to_string(),
                a.missed.to_string(),
                labels_column(&a.labels),
                if a.last_status_ms == 0 {
                    "-".to_owned()
                } else {
                    format!("{} ago: {}", ago(now, a.last_status_ms), a.last_status)
                },
            ]
        })
        .collect();
    let mut text = render(
        &[
            "AGENT",
            "ADDRESS",
            "CONNECTED",
            "DELIVERED",
            "ACKED",
            "FAILED",
            "MISSED",
            "LABELS",
            "LAST STATUS",
        ],
        &table,
    );
    if shared {
        let table: Vec<Vec<String>> = servers
            .iter()
            .map(|s| {
                let name = if s.this {
                    format!("{} (this one)", s.name)
                } else {
                    s.name.clone()
                };
                let state = match (s.alive, s.stopped) {
                    (true, _) => "up",
                    (false, true) => "stopped",
                    (false, false) => "NO HEARTBEAT",
                };
                vec![
                    name,
                    state.to_owned(),
                    format!("{} ago", ago(now, s.heartbeat_ms)),
                    format!("{} ago", ago(now, s.started_ms)),
                ]
            })
            .collect();
        text.push('\n');
        text.push_str(&render(
            &["SERVER", "STATE", "HEARTBEAT", "STARTED"],
            &table,
        ));
    }
    print(&text)
}

/// One task, as `contactd tasks --json` prints it.
#[derive(Debug, Serialize)]
struct TaskRow {
    id: u64,
    state: &'static str,
    target: String,
    created_ms: i64,
    created_at: Option<String>,
    delivered: u32,
    acked: u32,
    failed: u32,
    text: String,
    last_agent: String,
    last_result: String,
    /// Submitted for a label selector: it.
    #[serde(skip_serializing_if = "String::is_empty")]
    selector: String,
}

fn state_name(state: pb::TaskState) -> &'static str {
    match state {
        pb::TaskState::Unspecified => "unknown",
        pb::TaskState::Pending => "pending",
        pb::TaskState::Delivered => "delivered",
        pb::TaskState::Acked => "acked",
        pb::TaskState::Failed => "failed",
        pb::TaskState::Dead => "dead",
        pb::TaskState::Cancelled => "cancelled",
    }
}

/// The labels an operator set, `role=web,region=eu`; the facts every
/// agent reports (os, arch, ...) are left to `--json`, or "-" for none.
fn labels_column(labels: &std::collections::BTreeMap<String, String>) -> String {
    let set: Vec<String> = labels
        .iter()
        .filter(|(key, _)| !crate::labels::FACTS.contains(&key.as_str()))
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    if set.is_empty() {
        "-".to_owned()
    } else {
        set.join(",")
    }
}

/// `contactd tasks`.
///
/// # Errors
/// The socket cannot be reached, or the server refuses.
pub fn tasks(
    socket: &Path,
    state: Option<pb::TaskState>,
    limit: u32,
    json: bool,
) -> Result<(), CtlError> {
    let mut request = ListTasksRequest {
        state: state.unwrap_or(pb::TaskState::Unspecified) as i32,
        limit,
        after_id: 0,
    };
    // Page by page: the server answers with about 1 MiB at a time.
    let reply = block_on(async {
        let mut client = connect(socket).await?;
        let mut all = Vec::new();
        loop {
            let mut page = client
                .list_tasks(ListTasksRequest { ..request })
                .await?
                .into_inner();
            all.append(&mut page.tasks);
            match all.last() {
                Some(last) if page.more => request.after_id = last.id,
                _ => {
                    page.tasks = all;
                    return Ok(page);
                }
            }
        }
    })?;
    let rows: Vec<TaskRow> = reply.tasks.iter().map(TaskRow::from).collect();
    if json {
        let out = serde_json::json!({
            "mode": reply.mode,
            "redelivered": reply.redelivered,
            "dropped": reply.dropped,
            "dead": reply.dead,
            "duplicate_acks": reply.duplicate_acks,
            "cancelled_acks": reply.cancelled_acks,
            "tasks": rows,
        });
        return print_json(&out);
    }
    let mut text = task_table(&rows, SystemTime::now());
    let _ = writeln!(
        text,
        "mode {}: {} tasks listed, {} redelivered, {} dropped, {} dead, {} duplicate acks, \
         {} acks of cancelled tasks",
        reply.mode,
        rows.len(),
        reply.redelivered,
        reply.dropped,
        reply.dead,
        reply.duplicate_acks,
        reply.cancelled_acks
    );
    print(&text)
}

impl From<&pb::Task> for TaskRow {
    fn from(t: &pb::Task) -> TaskRow {
        TaskRow {
            id: t.id,
            state: state_name(t.state()),
            target: t.target.clone(),
            created_ms: t.created_ms,
            created_at: rfc3339(t.created_ms),
            delivered: t.delivered,
            acked: t.acked,
            failed: t.failed,
            text: t.text.clone(),
            last_agent: t.last_agent.clone(),
            last_result: t.last_result.clone(),
            selector: t.selector.clone(),
        }
    }
}

/// Tasks as `contactd tasks` prints them, their ages as of `now`.
fn task_table(rows: &[TaskRow], now: SystemTime) -> String {
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.state.to_owned(),
                match (t.target.is_empty(), t.selector.is_empty()) {
                    (true, true) => "*".to_owned(),
                    (true, false) => t.selector.clone(),
                    (false, _) => t.target.clone(),
                },
                ago(now, t.created_ms),
                t.delivered.to_string(),
                t.acked.to_string(),
                t.failed.to_string(),
                last_result(t),
                t.text.clone(),
            ]
        })
        .collect();
    render(
        &[
            "ID",
            "STATE",
            "FOR",
            "AGE",
            "DELIVERED",
            "ACKED",
            "FAILED",
            "LAST RESULT",
            "TEXT",
        ],
        &table,
    )
}

/// The latest ack in one short line: `agent: last line of its text`.
fn last_result(task: &TaskRow) -> String {
    if task.last_agent.is_empty() {
        return "-".to_owned();
    }
    short(
        &format!("{}: {}", task.last_agent, last_line(&task.last_result)),
        40,
    )
}

/// The last line of `text` that is not blank, trimmed.
fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
}

/// `text` cut to `width` characters, marked with `…` when cut.
fn short(text: &str, width: usize) -> String {
    if text.chars().count() > width {
        text.chars().take(width - 1).chain(['…']).collect()
    } else {
        text.to_owned()
    }
}

/// How long before `now` a Unix-milliseconds time was, to the second.
fn ago(now: SystemTime, unix_ms: i64) -> String {
    let then = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// Left-aligned columns separated by two spaces. (Hand-written: a table
/// crate would be a dependency for twenty lines.)
///
/// Cells are escaped ([`crate::untrusted::escaped`]): agents write status
/// and result texts, and a newline or an escape sequence in one must not
/// forge a row or rewrite the operator's terminal.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|cell| crate::untrusted::escaped(cell).into_owned())
                .collect()
        })
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_to_the_millisecond_and_never_is_null() {
        assert_eq!(
            rfc3339(1_796_416_862_123).as_deref(),
            Some("2026-12-04T20:41:02.123Z")
        );
        assert_eq!(rfc3339(1_000).as_deref(), Some("1970-01-01T00:00:01.000Z"));
        assert_eq!(rfc3339(0), None);
        assert_eq!(rfc3339(-5), None);
    }

    #[test]
    fn tables_align() {
        let rows = vec![vec![
            "a".to_owned(),
            "long value".to_owned(),
            "x".to_owned(),
        ]];
        assert_eq!(
            render(&["NAME", "V", "LAST"], &rows),
            "NAME  V           LAST\na     long value  x\n"
        );
    }
}
