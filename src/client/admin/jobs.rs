//! `contactd jobs`, `contactd job run|show|pause|resume`, and following a
//! rollout's progress (`task submit --batch`, `job run --wait`).

use std::{
    io::IsTerminal,
    path::Path,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tonic::transport::Channel;

use super::{
    CtlError, ago, block_on, connect, last_line, print, print_json, render, rfc3339, short,
};
use crate::proto::admin::{
    self as pb, JobNameRequest, ListJobsRequest, PauseJobRequest, RunIdRequest,
    admin_client::AdminClient,
};

/// How often a followed run is asked for its progress.
const POLL: Duration = Duration::from_millis(250);

/// One job, as `contactd jobs --json` prints it.
#[derive(Debug, Serialize)]
struct JobRow {
    name: String,
    schedule: String,
    target: String,
    mode: String,
    paused: bool,
    next_ms: i64,
    next_at: Option<String>,
    last_run: u64,
    last_state: String,
    last_started_ms: i64,
    last_started_at: Option<String>,
    last_success_ms: i64,
    last_success_at: Option<String>,
    running: u32,
    halted: u32,
}

impl From<&pb::Job> for JobRow {
    fn from(j: &pb::Job) -> JobRow {
        JobRow {
            name: j.name.clone(),
            schedule: j.schedule.clone(),
            target: j.target.clone(),
            mode: j.mode.clone(),
            paused: j.paused,
            next_ms: j.next_ms,
            next_at: rfc3339(j.next_ms),
            last_run: j.last_run,
            last_state: j.last_state.clone(),
            last_started_ms: j.last_started_ms,
            last_started_at: rfc3339(j.last_started_ms),
            last_success_ms: j.last_success_ms,
            last_success_at: rfc3339(j.last_success_ms),
            running: j.running,
            halted: j.halted,
        }
    }
}

/// A run, as `contactd job show --json` prints it.
#[derive(Debug, Serialize)]
struct RunRow {
    id: u64,
    job: String,
    nominal_ms: i64,
    nominal_at: Option<String>,
    mode: String,
    state: String,
    target: String,
    text: String,
    targets: u32,
    batch: u32,
    max_failed: u32,
    retries: u32,
    started_ms: i64,
    started_at: Option<String>,
    deadline_ms: i64,
    deadline_at: Option<String>,
    finished_ms: i64,
    finished_at: Option<String>,
    owed: u32,
    running: u32,
    acked: u32,
    failed: u32,
    missed: u32,
}

impl From<&pb::Run> for RunRow {
    fn from(r: &pb::Run) -> RunRow {
        RunRow {
            id: r.id,
            job: r.job.clone(),
            nominal_ms: r.nominal_ms,
            nominal_at: rfc3339(r.nominal_ms),
            mode: r.mode.clone(),
            state: r.state.clone(),
            target: r.target.clone(),
            text: r.text.clone(),
            targets: r.targets,
            batch: r.batch,
            max_failed: r.max_failed,
            retries: r.retries,
            started_ms: r.started_ms,
            started_at: rfc3339(r.started_ms),
            deadline_ms: r.deadline_ms,
            deadline_at: rfc3339(r.deadline_ms),
            finished_ms: r.finished_ms,
            finished_at: rfc3339(r.finished_ms),
            owed: r.owed,
            running: r.running,
            acked: r.acked,
            failed: r.failed,
            missed: r.missed,
        }
    }
}

/// One agent of a run, as `contactd job show --json` prints it.
#[derive(Debug, Serialize)]
struct RunAgentRow {
    agent: String,
    state: String,
    tries: u32,
    at_ms: i64,
    at: Option<String>,
    result: String,
}

/// `contactd jobs`: one row per configured job.
///
/// # Errors
/// The socket cannot be reached, or the server refuses.
pub fn jobs(socket: &Path, json: bool) -> Result<(), CtlError> {
    let jobs = block_on(async {
        Ok(connect(socket)
            .await?
            .list_jobs(ListJobsRequest {})
            .await?
            .into_inner()
            .jobs)
    })?;
    if json {
        let rows: Vec<JobRow> = jobs.iter().map(JobRow::from).collect();
        return print_json(&serde_json::json!({ "jobs": rows }));
    }
    if jobs.is_empty() {
        return print("no jobs: add [[jobs]] to the config (see the README's \"Jobs\")\n");
    }
    let now = SystemTime::now();
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.name.clone(),
                j.schedule.clone(),
                if j.target.is_empty() {
                    "(all)".into()
                } else {
                    j.target.clone()
                },
                j.mode.clone(),
                job_state(j),
                when(now, j.next_ms),
                if j.last_run == 0 {
                    "-".into()
                } else {
                    format!(
                        "{} {} ({} ago)",
                        j.last_run,
                        j.last_state,
                        ago(now, j.last_started_ms)
                    )
                },
                if j.last_success_ms == 0 {
                    "never".into()
                } else {
                    format!("{} ago", ago(now, j.last_success_ms))
                },
            ]
        })
        .collect();
    print(&render(
        &[
            "NAME",
            "SCHEDULE",
            "TARGET",
            "MODE",
            "STATE",
            "NEXT",
            "LAST RUN",
            "LAST SUCCESS",
        ],
        &rows,
    ))
}

fn job_state(j: &pb::Job) -> String {
    let mut state = if j.paused { "paused" } else { "active" }.to_owned();
    if j.running > 0 {
        state.push_str(&format!(", {} running", j.running));
    }
    if j.halted > 0 {
        state.push_str(&format!(", {} halted", j.halted));
    }
    state
}

/// A future time as "in 12s" (or the past's "12s ago"), "-" for none.
fn when(now: SystemTime, unix_ms: i64) -> String {
    let Ok(ms) = u64::try_from(unix_ms) else {
        return "-".into();
    };
    if ms == 0 {
        return "-".into();
    }
    let then = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    match then.duration_since(now) {
        Ok(d) => format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(d.as_secs()))
        ),
        Err(_) => format!("{} ago", ago(now, unix_ms)),
    }
}

/// `contactd job run NAME`: fires the job now; with `wait`, follows the
/// run until it ends or halts.
///
/// # Errors
/// The socket cannot be reached, or the server refuses (no such job).
pub fn run(socket: &Path, name: &str, wait: bool, json: bool) -> Result<bool, CtlError> {
    block_on(async {
        let mut client = connect(socket).await?;
        let run = client
            .run_job(JobNameRequest {
                name: name.to_owned(),
            })
            .await?
            .into_inner()
            .run;
        if !wait {
            if json {
                print_json(&serde_json::json!({ "run": run }))?;
            } else {
                print(&format!("started run {run} of job {name}\n"))?;
            }
            return Ok(true);
        }
        if !json {
            print(&format!("started run {run} of job {name}\n"))?;
        }
        follow(&mut client, run, json).await
    })
}

/// Follows run `run`, printing its progress (a line rewritten in place on
/// a terminal, a line per change otherwise), until it ends or halts;
/// whether it succeeded.
pub(super) async fn follow(
    client: &mut AdminClient<Channel>,
    run: u64,
    json: bool,
) -> Result<bool, CtlError> {
    let terminal = !json && std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let reply = client.show_run(RunIdRequest { run }).await?.into_inner();
        let r = reply.run.clone().unwrap_or_default();
        let line = progress(&r);
        let ended = r.state != "running";
        if !json && line != last {
            if terminal {
                print(&format!("\r\x1b[2K{line}"))?;
            } else {
                print(&format!("{line}\n"))?;
            }
            last = line;
        }
        if ended {
            if terminal {
                print("\n")?;
            }
            if json {
                print_json(&shown(&reply))?;
            } else if r.state == "halted" {
                print(&format!(
                    "run {run} halted: {} agents failed, more than max_failed ({}); see \
                     `contactd job show {run}`, then `contactd job resume {run}` to go on\n",
                    r.failed, r.max_failed
                ))?;
            }
            return Ok(r.state == "succeeded");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn progress(r: &pb::Run) -> String {
    format!(
        "run {}: {} of {} done ({} acked, {} failed, {} missed), {} running, {} owed: {}",
        r.id,
        r.acked + r.failed + r.missed,
        r.targets
            .max(r.acked + r.failed + r.missed + r.running + r.owed),
        r.acked,
        r.failed,
        r.missed,
        r.running,
        r.owed,
        r.state
    )
}

fn shown(reply: &pb::ShowRunResponse) -> serde_json::Value {
    let run = reply.run.as_ref().map(RunRow::from);
    let agents: Vec<RunAgentRow> = reply
        .agents
        .iter()
        .map(|a| RunAgentRow {
            agent: a.agent.clone(),
            state: a.state.clone(),
            tries: a.tries,
            at_ms: a.at_ms,
            at: rfc3339(a.at_ms),
            result: a.result.clone(),
        })
        .collect();
    serde_json::json!({ "run": run, "agents": agents })
}

/// `contactd job show RUN`: the run, then one row per agent.
///
/// # Errors
/// The socket cannot be reached, or the server refuses (an unknown run).
pub fn show(socket: &Path, run: u64, json: bool) -> Result<(), CtlError> {
    let reply = block_on(async {
        Ok(connect(socket)
            .await?
            .show_run(RunIdRequest { run })
            .await?
            .into_inner())
    })?;
    print_run(&reply, json)
}

fn print_run(reply: &pb::ShowRunResponse, json: bool) -> Result<(), CtlError> {
    if json {
        return print_json(&shown(reply));
    }
    let r = reply.run.clone().unwrap_or_default();
    let now = SystemTime::now();
    let mut out = format!(
        "run {} of {} ({}), {}: {}\n  target {}, {} agents, batch {}, max_failed {}\n  \
         started {} ago{}; {} acked, {} failed, {} missed, {} running, {} owed\n",
        r.id,
        if r.job.is_empty() {
            "an ad hoc rollout".to_owned()
        } else {
            format!("job {}", r.job)
        },
        r.mode,
        r.state,
        short(&r.text, 60),
        if r.target.is_empty() {
            "(all)"
        } else {
            &r.target
        },
        r.targets,
        r.batch,
        r.max_failed,
        ago(now, r.started_ms),
        if r.finished_ms > 0 {
            format!(", ended {} ago", ago(now, r.finished_ms))
        } else {
            String::new()
        },
        r.acked,
        r.failed,
        r.missed,
        r.running,
        r.owed,
    );
    if !reply.agents.is_empty() {
        let rows: Vec<Vec<String>> = reply
            .agents
            .iter()
            .map(|a| {
                vec![
                    a.agent.clone(),
                    a.state.clone(),
                    a.tries.to_string(),
                    format!("{} ago", ago(now, a.at_ms)),
                    short(last_line(&a.result), 60),
                ]
            })
            .collect();
        out.push_str(&render(
            &["AGENT", "STATE", "TRIES", "SINCE", "RESULT"],
            &rows,
        ));
    }
    print(&out)
}

/// `contactd job pause|resume NAME`.
///
/// # Errors
/// The socket cannot be reached, or the server refuses (no such job).
pub fn pause(socket: &Path, name: &str, paused: bool, json: bool) -> Result<(), CtlError> {
    let job = block_on(async {
        Ok(connect(socket)
            .await?
            .pause_job(PauseJobRequest {
                name: name.to_owned(),
                paused,
            })
            .await?
            .into_inner())
    })?;
    if json {
        return print_json(&serde_json::json!({ "job": JobRow::from(&job) }));
    }
    print(&format!(
        "job {} {}\n",
        job.name,
        if paused { "paused" } else { "resumed" }
    ))
}

/// `contactd job halt RUN`: a running rollout sends nothing more until it
/// is resumed.
///
/// # Errors
/// The socket cannot be reached, or the server refuses (not a running
/// rollout).
pub fn halt_run(socket: &Path, run: u64, json: bool) -> Result<(), CtlError> {
    let reply = block_on(async {
        Ok(connect(socket)
            .await?
            .halt_run(RunIdRequest { run })
            .await?
            .into_inner())
    })?;
    print_run(&reply, json)
}

/// `contactd job resume RUN`: a halted run goes on; with `wait`, followed.
///
/// # Errors
/// The socket cannot be reached, or the server refuses (not halted).
pub fn resume_run(socket: &Path, run: u64, wait: bool, json: bool) -> Result<bool, CtlError> {
    block_on(async {
        let mut client = connect(socket).await?;
        let reply = client.resume_run(RunIdRequest { run }).await?.into_inner();
        if wait {
            return follow(&mut client, run, json).await;
        }
        print_run(&reply, json)?;
        Ok(true)
    })
}
