//! What a soak run leaves behind, and how the checker reads it back: the
//! harness's own log of what it did and what was accepted (`events.jsonl`),
//! the agents' journals of every task they ran (`journal/*.log`), the
//! server's final view through its admin API (`final.json`), resource
//! samples (`samples.jsonl`) and every process's JSON log (`logs/*.log`).
//!
//! Shared by the harness (which writes it) and the checker's tests (which
//! build histories with defects in them).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One line of `events.jsonl`: something the harness did or saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// The run's bounds in time: traffic and faults from `start_ms`, the last
    /// fault ended by `faults_end_ms`, the final view taken at `end_ms`.
    Run {
        seed: u64,
        start_ms: i64,
        faults_end_ms: i64,
        end_ms: i64,
    },
    /// A task the server gave an id to (a submit, a job fired by the
    /// harness); `kind` as in [`kind_of`].
    Accepted { id: u64, kind: String, at_ms: i64 },
    /// A submit the server refused or that got no answer: no id, nothing owed.
    Refused {
        kind: String,
        at_ms: i64,
        error: String,
    },
    /// A fault, from its start to its end (both Unix ms); `agents` are the
    /// agents it cut off (empty: none directly, the fleet sees it through
    /// the server); `detect_ms` is added to the bound for agents to come
    /// back (a half-open connection is found only by keepalive).
    Fault {
        kind: String,
        detail: String,
        agents: Vec<String>,
        start_ms: i64,
        end_ms: i64,
        detect_ms: i64,
    },
    /// A real agent killed with SIGKILL (then restarted).
    Kill { agent: String, at_ms: i64 },
    /// An agent's connection came up or went down.
    Conn { agent: String, up: bool, at_ms: i64 },
    /// An agent began a connection attempt (in-process agents; a real
    /// agent's attempts show in its log only when they end).
    Attempt { agent: String, at_ms: i64 },
    /// A remote command: whether it succeeded and how long it took.
    Cmd { ok: bool, at_ms: i64, ms: u64 },
    /// Something the harness verified itself (a rotated certificate is
    /// served): a failure is a violation.
    Check { what: String, ok: bool, at_ms: i64 },
}

/// One task run, from an agent's journal (`AGENT ID ATTEMPT UNIX_MS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub agent: String,
    pub id: u64,
    pub attempt: u32,
    pub at_ms: i64,
}

/// A task as the server reports it at the end (admin `ListTasks` and, for
/// tasks owed to several agents, `ShowTask`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalTask {
    pub id: u64,
    pub text: String,
    /// `pending`, `delivered`, `acked`, `failed`, `dead`, `cancelled`.
    pub state: String,
    pub created_ms: i64,
    pub last_agent: String,
    /// Per agent the task concerns: (agent, `owed`/`delivered`/`acked`/
    /// `failed`/`missed`/`cancelled`); empty for queue tasks.
    pub agents: Vec<(String, String)>,
}

/// What the server held at the end, and the agents it knew.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalView {
    pub tasks: Vec<FinalTask>,
    /// Agent name → connected at the end.
    pub agents: BTreeMap<String, bool>,
}

/// A resource sample of one process (or of the store, `proc = "store"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub at_ms: i64,
    /// `server`, `agent-N`, `harness`, `store`.
    pub proc: String,
    pub pid: i32,
    pub rss: u64,
    pub fds: u64,
    pub threads: u64,
}

/// An ERROR line from a log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogError {
    pub file: String,
    pub at_ms: i64,
    pub line: String,
}

/// A whole run's history, as the checker reads it.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub seed: u64,
    pub start_ms: i64,
    pub faults_end_ms: i64,
    pub end_ms: i64,
    pub events: Vec<Event>,
    pub runs: Vec<Run>,
    pub view: FinalView,
    pub samples: Vec<Sample>,
    pub errors: Vec<LogError>,
}

/// How a task is owed, from its text (the harness names every task it makes
/// by its kind: `KIND:...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    /// Queue semantics: exactly one agent runs it (the servers run in queue
    /// mode, so the `broadcast` job's tasks too).
    One,
    /// To one named agent (`direct:AGENT:...`).
    Direct,
    /// To each agent a selector picked (rollouts, `each` jobs).
    Each,
}

/// The kind part of a task's text, and how it is owed.
pub fn kind_of(text: &str) -> (&str, Owed) {
    let kind = text.split(':').next().unwrap_or("");
    let owed = match kind {
        // A `broadcast` job publishes "through the server's delivery mode"
        // (README, Jobs): on the soak's queue-mode servers, to one agent.
        "gen" | "queue" | "job-any" | "job-broadcast" => Owed::One,
        "direct" => Owed::Direct,
        _ => Owed::Each,
    };
    (kind, owed)
}

impl History {
    /// Reads a run's directory back.
    ///
    /// # Errors
    /// A missing or malformed file.
    pub fn load(dir: &Path) -> anyhow::Result<History> {
        let mut history = History::default();
        for line in lines(&dir.join("events.jsonl"))? {
            let event: Event = serde_json::from_str(&line).with_context(|| line.clone())?;
            if let Event::Run {
                seed,
                start_ms,
                faults_end_ms,
                end_ms,
            } = event
            {
                history.seed = seed;
                history.start_ms = start_ms;
                history.faults_end_ms = faults_end_ms;
                history.end_ms = end_ms;
            }
            history.events.push(event);
        }
        for path in files(&dir.join("journal"))? {
            for line in lines(&path)? {
                history.runs.push(
                    parse_run(&line).with_context(|| {
                        format!("{}: bad journal line {line:?}", path.display())
                    })?,
                );
            }
        }
        history.view = serde_json::from_slice(&fs::read(dir.join("final.json"))?)?;
        for line in lines(&dir.join("samples.jsonl"))? {
            history.samples.push(serde_json::from_str(&line)?);
        }
        for path in files(&dir.join("logs"))? {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            for line in lines(&path)? {
                if let Some(error) = error_line(&file, &line) {
                    history.errors.push(error);
                }
                if let Some(conn) = conn_line(&file, &line) {
                    history.events.push(conn);
                }
            }
        }
        Ok(history)
    }
}

/// `AGENT ID ATTEMPT UNIX_MS`, as the real agents' handler writes it.
fn parse_run(line: &str) -> Option<Run> {
    let mut words = line.split_whitespace();
    let run = Run {
        agent: words.next()?.to_owned(),
        id: words.next()?.parse().ok()?,
        attempt: words.next()?.parse().ok()?,
        at_ms: words.next()?.parse().ok()?,
    };
    words.next().is_none().then_some(run)
}

fn lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                found.push(entry?.path());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    }
    found.sort();
    Ok(found)
}

/// A JSON log line's time (Unix ms), level and message.
fn log_fields(line: &str) -> Option<(i64, String, String)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let at: jiff::Timestamp = value.get("timestamp")?.as_str()?.parse().ok()?;
    let level = value.get("level")?.as_str()?.to_owned();
    let message = value
        .pointer("/fields/message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_owned();
    Some((at.as_millisecond(), level, message))
}

fn error_line(file: &str, line: &str) -> Option<LogError> {
    let (at_ms, level, _) = log_fields(line)?;
    (level == "ERROR").then(|| LogError {
        file: file.to_owned(),
        at_ms,
        line: line.to_owned(),
    })
}

/// A real agent's connection going up or down, from its log
/// (`logs/agent-NAME.log`: "connected to", "disconnected from",
/// "cannot connect to").
fn conn_line(file: &str, line: &str) -> Option<Event> {
    let agent = file.strip_prefix("agent-")?.strip_suffix(".log")?;
    let (at_ms, _, message) = log_fields(line)?;
    let up = if message.starts_with("connected to ") {
        true
    } else if message.starts_with("disconnected from ") || message.starts_with("cannot connect to ")
    {
        false
    } else {
        return None;
    };
    Some(Event::Conn {
        agent: agent.to_owned(),
        up,
        at_ms,
    })
}
