//! The checker: reads a whole run's history ([`History`]) and lists every
//! broken guarantee. Pure: no I/O, so its tests feed it histories with
//! defects put in on purpose (tests/it/soak_check.rs).

use std::collections::{BTreeMap, BTreeSet};

use super::history::{Event, History, Owed, kind_of};

/// What the checker allows. Every bound is printed with the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// A task run this long before its agent's SIGKILL counts as in flight
    /// at the kill (its ack may not have left): handler time plus the ack's
    /// way out.
    pub kill_window_ms: i64,
    /// After a fault ends (plus its detection time), every agent it cut off
    /// tries to connect again within this: the agents' backoff bound (max
    /// delay with jitter, plus the retry hint's jitter) plus a connection
    /// attempt's timeout (a real agent's attempt shows when it ends).
    pub reconnect_ms: i64,
    /// ... and is connected again within this: what the server takes to
    /// accept a fleet reconnecting at once (a capacity figure, larger).
    pub back_ms: i64,
    /// An ERROR line this long after a fault (or during it) is put down to it.
    pub error_window_ms: i64,
    /// Largest slope over the second half of the run, per minute, of each
    /// process's RSS (bytes), open fds, threads, and of the store's size.
    pub rss_per_min: f64,
    pub fds_per_min: f64,
    pub threads_per_min: f64,
    pub store_per_min: f64,
    /// A process incarnation must be sampled this long in the second half
    /// for its slope to be judged.
    pub min_span_ms: i64,
    /// Samples this soon after a process started, or after a fault that cut
    /// off the whole fleet ended, are its return, not growth: 2,000 agents
    /// take up to minutes to reconnect to a debug build.
    pub settle_ms: i64,
    /// An agent never runs a task twice across its own restarts (the agent
    /// spool). Off: such runs are listed apart (`known`), not as violations.
    pub spool: bool,
    /// A queue task is not handed to another agent while the agent running
    /// it has only lost its connection (it will ack when back). Off: such
    /// runs are listed apart (`known`), not as violations.
    pub keep_claims: bool,
    /// The servers' `tasks.ack_timeout`: a queue task whose earlier runs
    /// each began at least this long before the next is at-least-once
    /// delivery as designed (its agent did not ack in time: cut off for
    /// longer, say), counted and listed, not a violation.
    pub ack_timeout_ms: i64,
}

/// One broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    /// `disappeared`, `unfinished`, `acked-without-run`, `ran-not-acked`,
    /// `handled-twice`, `rerun-after-restart`, `redelivered-after-disconnect`,
    /// `no-retry`, `not-back`, `growth`,
    /// `error-log`, `refused`, `cmd-failed`, `harness-check`.
    pub check: &'static str,
    pub detail: String,
}

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    /// Tasks run twice because their first agent was killed before its
    /// ack could leave: allowed, counted and listed.
    pub in_flight_at_kill: Vec<u64>,
    /// Queue tasks handed to another agent at their ack timeout (each
    /// earlier run began at least `ack_timeout` before the next): allowed,
    /// counted and listed.
    pub redelivered_at_timeout: Vec<u64>,
    /// Broken guarantees that are known and not yet fixed (with `spool`
    /// off: a task run again by an agent after its own restart).
    pub known: Vec<Violation>,
    /// Tasks the server reported `missed`, `dead` or `cancelled` (per agent
    /// for tasks owed to several): accounted for, not lost.
    pub reported: usize,
    pub tasks: usize,
    pub runs: usize,
    /// Delivery latency (created to handler start), ms, sorted.
    pub latencies: Vec<i64>,
    /// Time from a fault's end to each cut-off agent's return, ms, sorted.
    pub reconnects: Vec<i64>,
    /// (agent, fault) pairs not judged because another fault was still on.
    pub overlapped: usize,
    /// Per process kind and metric: the largest slope per minute judged.
    pub slopes: BTreeMap<String, f64>,
    /// Process incarnations sampled too briefly in the second half to judge.
    pub unjudged: usize,
}

/// How late the harness may stamp an in-process agent's run or
/// connection change under load (seen: 300 ms for a disconnect, 2,000
/// agents' events in one queue).
const HARNESS_LAG_MS: i64 = 1_000;

/// Checks `history` against `bounds`.
pub fn check(history: &History, bounds: &Bounds) -> Verdict {
    let mut verdict = Verdict {
        tasks: history.view.tasks.len(),
        runs: history.runs.len(),
        ..Verdict::default()
    };
    tasks(history, bounds, &mut verdict);
    reconnects(history, bounds, &mut verdict);
    growth(history, bounds, &mut verdict);
    errors(history, bounds, &mut verdict);
    verdict.violations.sort();
    verdict.known.sort();
    verdict.in_flight_at_kill.sort_unstable();
    verdict.redelivered_at_timeout.sort_unstable();
    verdict.latencies.sort_unstable();
    verdict.reconnects.sort_unstable();
    verdict
}

fn faults(history: &History) -> impl Iterator<Item = (&str, &[String], i64, i64)> {
    history.events.iter().filter_map(|e| match e {
        Event::Fault {
            kind,
            agents,
            start_ms,
            end_ms,
            detect_ms,
            ..
        } => Some((
            kind.as_str(),
            agents.as_slice(),
            *start_ms,
            end_ms + detect_ms,
        )),
        _ => None,
    })
}

fn during_fault(history: &History, at_ms: i64, slack_ms: i64) -> bool {
    faults(history).any(|(_, _, start, end)| at_ms >= start - 1000 && at_ms <= end + slack_ms)
}

/// Nothing lost, queue tasks run once, acks match runs, no agent runs a
/// task twice; and refusals only under faults.
fn tasks(history: &History, bounds: &Bounds, verdict: &mut Verdict) {
    let mut runs: BTreeMap<u64, Vec<&super::history::Run>> = BTreeMap::new();
    for run in &history.runs {
        runs.entry(run.id).or_default().push(run);
    }
    let mut kills: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for event in &history.events {
        if let Event::Kill { agent, at_ms } = event {
            kills.entry(agent.as_str()).or_default().push(*at_ms);
        }
    }
    // A run at `at` by `agent` whose agent was killed before its ack left.
    let killed_after = |agent: &str, at: i64| {
        kills.get(agent).is_some_and(|k| {
            k.iter()
                .any(|&t| t >= at && t - at <= bounds.kill_window_ms)
        })
    };
    let killed_between = |agent: &str, from: i64, to: i64| {
        kills
            .get(agent)
            .is_some_and(|k| k.iter().any(|&t| t >= from && t <= to))
    };
    // A task whose handler its agent had started when it was killed is
    // acked FAILED as interrupted after the restart, and may never have
    // reached the journal (the documented exception): failed by an agent
    // killed within `ack_timeout` of the task's creation.
    let interrupted = |agent: &str, created_ms: i64| {
        killed_between(agent, created_ms, created_ms + bounds.ack_timeout_ms)
    };
    let timeline = timeline(history);
    // Its connection seen dropping (`cut_off` without the faults: a full
    // disk or a SIGHUP storm cuts no agent off).
    let dropped = |agent: &str, from: i64, to: i64| {
        let (from, to) = (from - HARNESS_LAG_MS, to + HARNESS_LAG_MS);
        timeline
            .get(agent)
            .is_some_and(|c| c.iter().any(|&(t, up)| !up && t >= from && t <= to))
    };
    // Whether `agent` lost its connection, or a fault on it was under way,
    // between `from` and `to`, give or take the harness's lag: an
    // in-process agent's run and its
    // disconnect are stamped when the harness reads them, and under load
    // a run can be stamped after the reset that cut its agent off (which
    // then held the task before the reset: a reconnect takes a backoff's
    // 500 ms at least).
    let cut_off = |agent: &str, from: i64, to: i64| {
        dropped(agent, from, to)
            || faults(history).any(|(_, agents, start, end)| {
                (agents.is_empty() || agents.iter().any(|a| a == agent))
                    && start <= to + HARNESS_LAG_MS
                    && end >= from - HARNESS_LAG_MS
            })
    };
    let by_id: BTreeMap<u64, &super::history::FinalTask> =
        history.view.tasks.iter().map(|t| (t.id, t)).collect();
    let mut violation = |check, detail| verdict.violations.push(Violation { check, detail });

    for event in &history.events {
        match event {
            Event::Accepted { id, kind, .. } if !by_id.contains_key(id) => violation(
                "disappeared",
                format!("task {id} ({kind}) was accepted but the server does not know it"),
            ),
            Event::Refused { kind, at_ms, error }
                if !during_fault(history, *at_ms, bounds.error_window_ms) =>
            {
                violation(
                    "refused",
                    format!("a {kind} submit at {at_ms} was refused outside any fault: {error}"),
                )
            }
            Event::Cmd {
                ok: false, at_ms, ..
            } if !during_fault(history, *at_ms, bounds.error_window_ms) => violation(
                "cmd-failed",
                format!("a remote command at {at_ms} failed outside any fault"),
            ),
            Event::Check {
                what,
                ok: false,
                at_ms,
            } => violation("harness-check", format!("at {at_ms}: not true: {what}")),
            _ => {}
        }
    }

    for task in &history.view.tasks {
        let (kind, owed) = kind_of(&task.text);
        let id = task.id;
        let mine: &[&super::history::Run] = runs.get(&id).map_or(&[], Vec::as_slice);
        if let Some(&first) = mine.iter().map(|r| &r.at_ms).min() {
            verdict.latencies.push(first - task.created_ms);
        }
        // The same agent running the same task twice.
        let mut per_agent: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for run in mine {
            per_agent.entry(&run.agent).or_default().push(run.at_ms);
        }
        for (agent, times) in &mut per_agent {
            times.sort_unstable();
            for pair in times.windows(2) {
                let detail = format!(
                    "task {id} ({kind}) ran twice at {agent} ({} and {} ms)",
                    pair[0], pair[1]
                );
                if killed_between(agent, pair[0], pair[1]) {
                    let v = Violation {
                        check: "rerun-after-restart",
                        detail: format!("{detail}, across its restart"),
                    };
                    if bounds.spool {
                        verdict.violations.push(v);
                    } else {
                        verdict.known.push(v);
                    }
                } else {
                    verdict.violations.push(Violation {
                        check: "handled-twice",
                        detail,
                    });
                }
            }
        }
        let mut violation = |check, detail| verdict.violations.push(Violation { check, detail });
        match owed {
            Owed::One | Owed::Direct => {
                let target = (owed == Owed::Direct)
                    .then(|| task.text.split(':').nth(1))
                    .flatten();
                match task.state.as_str() {
                    "pending" | "delivered" => violation(
                        "unfinished",
                        format!("task {id} ({kind}) is still {} after the drain", task.state),
                    ),
                    // Failed by no agent: contactd failed it itself (a job
                    // run that matched no connected agent), and says so.
                    "failed" if target.is_none() && task.last_agent.is_empty() => {
                        verdict.reported += 1;
                    }
                    "acked" | "failed" => {
                        let by = target.unwrap_or(&task.last_agent);
                        let ran = per_agent.contains_key(by);
                        if !ran && task.state == "failed" && interrupted(by, task.created_ms) {
                            verdict.reported += 1;
                        } else if !ran {
                            violation(
                                "acked-without-run",
                                format!(
                                    "task {id} ({kind}) is {} by {by}, whose journal never ran it",
                                    task.state
                                ),
                            );
                        }
                    }
                    _ => {
                        verdict.reported += 1;
                        for run in mine.iter().filter(|r| !killed_after(&r.agent, r.at_ms)) {
                            violation(
                                "ran-not-acked",
                                format!(
                                    "task {id} ({kind}) ran at {} but the server reports it {}",
                                    run.agent, task.state
                                ),
                            );
                        }
                    }
                }
                if let Some(target) = target {
                    for agent in per_agent.keys().filter(|a| **a != target) {
                        violation(
                            "handled-twice",
                            format!("task {id} (direct to {target}) ran at {agent}"),
                        );
                    }
                }
                if owed == Owed::One && per_agent.len() > 1 {
                    // Every run but the last must have been cut short by a kill.
                    let last = mine
                        .iter()
                        .max_by_key(|r| r.at_ms)
                        .map(|r| r.agent.as_str());
                    let unexcused: Vec<&str> = mine
                        .iter()
                        .filter(|r| Some(r.agent.as_str()) != last)
                        .filter(|r| !killed_after(&r.agent, r.at_ms))
                        .map(|r| r.agent.as_str())
                        .collect();
                    let next_after = |at: i64| {
                        mine.iter()
                            .map(|r| r.at_ms)
                            .filter(|t| *t > at)
                            .min()
                            .unwrap_or(at)
                    };
                    let disconnected = mine
                        .iter()
                        .filter(|r| Some(r.agent.as_str()) != last)
                        .filter(|r| !killed_after(&r.agent, r.at_ms))
                        .all(|r| cut_off(&r.agent, r.at_ms, next_after(r.at_ms)));
                    let timed_out = mine
                        .iter()
                        .filter(|r| Some(r.agent.as_str()) != last)
                        .filter(|r| !killed_after(&r.agent, r.at_ms))
                        .all(|r| {
                            // And cut off while its claim ran (its ack could
                            // not reach the server): one that ran it, stayed
                            // connected and lost it later was not timed out
                            // (defect 8's pattern).
                            next_after(r.at_ms) - r.at_ms >= bounds.ack_timeout_ms - HARNESS_LAG_MS
                                && dropped(&r.agent, r.at_ms, r.at_ms + bounds.ack_timeout_ms)
                        });
                    if unexcused.is_empty() {
                        verdict.in_flight_at_kill.push(id);
                    } else if timed_out {
                        verdict.redelivered_at_timeout.push(id);
                    } else if disconnected {
                        let agents: BTreeSet<&str> = per_agent.keys().copied().collect();
                        let v = Violation {
                            check: "redelivered-after-disconnect",
                            detail: format!(
                                "queue task {id} ({kind}) ran at {agents:?}: handed out again when its agent's connection dropped"
                            ),
                        };
                        if bounds.keep_claims {
                            verdict.violations.push(v);
                        } else {
                            verdict.known.push(v);
                        }
                    } else {
                        let agents: BTreeSet<&str> = per_agent.keys().copied().collect();
                        violation(
                            "handled-twice",
                            format!("queue task {id} ({kind}) ran at {agents:?}"),
                        );
                    }
                }
            }
            Owed::Each => {
                for (agent, state) in &task.agents {
                    match state.as_str() {
                        "owed" | "delivered" => violation(
                            "unfinished",
                            format!(
                                "task {id} ({kind}) is still {state} at {agent} after the drain"
                            ),
                        ),
                        "failed"
                            if !per_agent.contains_key(agent.as_str())
                                && interrupted(agent, task.created_ms) =>
                        {
                            verdict.reported += 1;
                        }
                        "acked" | "failed" if !per_agent.contains_key(agent.as_str()) => violation(
                            "acked-without-run",
                            format!(
                                "task {id} ({kind}) is {state} by {agent}, whose journal never ran it"
                            ),
                        ),
                        "acked" | "failed" => {}
                        _ => verdict.reported += 1,
                    }
                }
            }
        }
    }
}

/// Each agent's connection changes, in time order; attempts count as
/// "down" for the timeline's state but are kept apart for the retry bound.
fn timeline(history: &History) -> BTreeMap<&str, Vec<(i64, bool)>> {
    let mut timeline: BTreeMap<&str, Vec<(i64, bool)>> = BTreeMap::new();
    for event in &history.events {
        if let Event::Conn { agent, up, at_ms } = event {
            timeline
                .entry(agent.as_str())
                .or_default()
                .push((*at_ms, *up));
        }
    }
    for changes in timeline.values_mut() {
        changes.sort_unstable();
    }
    timeline
}

/// Every agent a fault cut off tries again within the backoff bound and
/// is connected again within the capacity bound.
fn reconnects(history: &History, bounds: &Bounds, verdict: &mut Verdict) {
    let timeline = timeline(history);
    // Every attempt's start (true) and every connection change (false).
    let mut attempts: BTreeMap<&str, Vec<(i64, bool)>> = BTreeMap::new();
    for event in &history.events {
        match event {
            Event::Attempt { agent, at_ms } => {
                attempts
                    .entry(agent.as_str())
                    .or_default()
                    .push((*at_ms, true));
            }
            Event::Conn { agent, at_ms, .. } => {
                attempts
                    .entry(agent.as_str())
                    .or_default()
                    .push((*at_ms, false));
            }
            _ => {}
        }
    }
    for times in attempts.values_mut() {
        times.sort_unstable();
    }
    let all: Vec<&str> = timeline.keys().copied().collect();
    let windows: Vec<(&str, &[String], i64, i64)> = faults(history).collect();
    for &(kind, agents, start, end) in &windows {
        let cut: Vec<&str> = if agents.is_empty() {
            all.clone()
        } else {
            agents.iter().map(String::as_str).collect()
        };
        for agent in cut {
            let affects = |a: &[String]| a.is_empty() || a.iter().any(|x| x == agent);
            let overlapped = windows
                .iter()
                .any(|&(_, a, s, e)| affects(a) && s <= end && e > end && (s, e) != (start, end));
            if overlapped {
                verdict.overlapped += 1;
                continue;
            }
            let Some(changes) = timeline.get(agent) else {
                verdict.violations.push(Violation {
                    check: "not-back",
                    detail: format!("{agent} never connected ({kind} fault at {start})"),
                });
                continue;
            };
            let up_at_end = changes
                .iter()
                .take_while(|(t, _)| *t <= end)
                .last()
                .is_some_and(|(_, up)| *up);
            if up_at_end {
                verdict.reconnects.push(0);
                continue;
            }
            // An attempt still under way at the end counts as trying.
            let tried = attempts.get(agent).and_then(|t| {
                let under_way = t
                    .iter()
                    .take_while(|(at, _)| *at <= end)
                    .last()
                    .is_some_and(|(_, attempt)| *attempt);
                if under_way {
                    Some(end)
                } else {
                    t.iter().map(|(at, _)| *at).find(|at| *at > end)
                }
            });
            // Judged only where attempts are seen as they start (the
            // in-process agents): a real agent's attempt shows in its log
            // only when it ends, which under a storm is long after.
            let seen = attempts
                .get(agent)
                .is_some_and(|t| t.iter().any(|(_, attempt)| *attempt));
            if seen && tried.is_none_or(|t| t - end > bounds.reconnect_ms) {
                verdict.violations.push(Violation {
                    check: "no-retry",
                    detail: format!(
                        "{agent} did not try to connect within {} ms of the {kind} fault's end at {end}",
                        bounds.reconnect_ms
                    ),
                });
            }
            match changes.iter().find(|(t, up)| *t > end && *up) {
                Some((t, _)) if t - end <= bounds.back_ms => verdict.reconnects.push(t - end),
                Some((t, _)) => verdict.violations.push(Violation {
                    check: "not-back",
                    detail: format!(
                        "{agent} came back {} ms after the {kind} fault ended (bound {} ms)",
                        t - end,
                        bounds.back_ms
                    ),
                }),
                None => verdict.violations.push(Violation {
                    check: "not-back",
                    detail: format!(
                        "{agent} never came back after the {kind} fault ending at {end}"
                    ),
                }),
            }
        }
    }
}

/// Least-squares slope of `points` (ms, value), per minute.
/// Each point's value as the least within `FLOOR` samples either side:
/// descriptors and threads are counted at an instant, and a handler's
/// pipes or a connection being made lift single samples (an agent's 15
/// descriptors sampled at 19 or 31), which late in a run read as growth;
/// a leak lifts the floor too.
fn floor(points: &[(i64, f64)]) -> Vec<(i64, f64)> {
    const FLOOR: usize = 5;
    (0..points.len())
        .map(|i| {
            let window = &points[i.saturating_sub(FLOOR)..(i + FLOOR + 1).min(points.len())];
            let least = window.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
            (points[i].0, least)
        })
        .collect()
}

fn slope(points: &[(i64, f64)]) -> f64 {
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0 as f64).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, v) in points {
        let dt = t as f64 - mean_t;
        num += dt * (v - mean_v);
        den += dt * dt;
    }
    if den == 0.0 {
        0.0
    } else {
        num / den * 60_000.0
    }
}

/// A metric's name, its bound per minute, and how to read it.
type Metric = (&'static str, f64, fn(&super::history::Sample) -> f64);

/// RSS, fds, threads and the store's size are flat over the second half.
fn growth(history: &History, bounds: &Bounds, verdict: &mut Verdict) {
    let half = history.start_ms + (history.end_ms - history.start_ms) / 2;
    // Settled samples only: none taken during a fault or while the fleet
    // comes back from one (reconnecting is not a leak), nor in an
    // incarnation's first `settle_ms` (start-up). After a fault that cut
    // off the whole fleet that is `settle_ms`; after one that cut off some
    // agents, until the last of them is connected again (at most the
    // longer of `settle_ms` and `back_ms`: one not back by then is
    // reported): until then the server holds fewer connections.
    // An agent a fault cut off is back at its first connection after its
    // first disconnection since the fault began; a killed agent's first
    // event is its new connection (its log has no disconnection). One
    // whose first event comes later than `LAG` after the fault was not cut
    // off by it (a reset's disconnections are seen a moment after it).
    const LAG: i64 = 5_000;
    let timeline = timeline(history);
    let back = |agent: &str, start: i64, end: i64| {
        let Some(changes) = timeline.get(agent) else {
            return end;
        };
        let mut after = changes.iter().skip_while(|(t, _)| *t < start);
        match after.next() {
            Some(&(t, _)) if t > end + LAG => end,
            Some(&(t, true)) => t,
            Some(_) => after.find(|(_, up)| *up).map_or(i64::MAX, |(t, _)| *t),
            None => end,
        }
    };
    let windows: Vec<(i64, i64)> = faults(history)
        .map(|(_, agents, s, e)| {
            let settled = if agents.is_empty() {
                e + bounds.settle_ms
            } else {
                let last = agents.iter().map(|a| back(a, s, e)).max().unwrap_or(e);
                last.clamp(e, e + bounds.settle_ms.max(bounds.back_ms))
            };
            (s, settled)
        })
        .collect();
    let mut born: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for sample in &history.samples {
        born.entry((&sample.proc, sample.pid))
            .or_insert(sample.at_ms);
    }
    let settled = |s: &&super::history::Sample| {
        s.at_ms >= half
            && s.at_ms - born[&(s.proc.as_str(), s.pid)] >= bounds.settle_ms
            && !windows
                .iter()
                .any(|&(start, end)| s.at_ms >= start && s.at_ms <= end)
    };
    // Several servers (`server-a`, `server-b`) are judged together, summed
    // at each tick where all were sampled settled: agents move between them
    // after a fault and stay (an agent changes servers only on a failure),
    // so one's descriptors and memory step up as the other's step down,
    // which is no leak. A leak in either still shows in the sum.
    let servers: BTreeSet<&str> = history
        .samples
        .iter()
        .filter(|s| s.proc.starts_with("server-"))
        .map(|s| s.proc.as_str())
        .collect();
    let pooled = |s: &super::history::Sample| servers.len() > 1 && s.proc.starts_with("server-");
    let mut series: BTreeMap<(&str, i32), Vec<super::history::Sample>> = BTreeMap::new();
    let mut ticks: BTreeMap<i64, Vec<&super::history::Sample>> = BTreeMap::new();
    for sample in history.samples.iter().filter(settled) {
        if pooled(sample) {
            ticks.entry(sample.at_ms).or_default().push(sample);
            continue;
        }
        series
            .entry((&sample.proc, sample.pid))
            .or_default()
            .push(sample.clone());
    }
    for (at_ms, at) in ticks {
        if at.len() == servers.len() {
            series
                .entry(("servers", 0))
                .or_default()
                .push(super::history::Sample {
                    at_ms,
                    proc: "servers".to_owned(),
                    pid: 0,
                    rss: at.iter().map(|s| s.rss).sum(),
                    fds: at.iter().map(|s| s.fds).sum(),
                    threads: at.iter().map(|s| s.threads).sum(),
                });
        }
    }
    for ((proc, pid), samples) in series {
        let span = samples.last().map_or(0, |l| l.at_ms) - samples.first().map_or(0, |f| f.at_ms);
        if span < bounds.min_span_ms || samples.len() < 5 {
            verdict.unjudged += 1;
            continue;
        }
        let group = proc.split('-').next().unwrap_or(proc);
        let metrics: [Metric; 3] = if proc == "store" {
            [
                ("size", bounds.store_per_min, |s| s.rss as f64),
                ("", f64::INFINITY, |_| 0.0),
                ("", f64::INFINITY, |_| 0.0),
            ]
        } else {
            [
                ("rss", bounds.rss_per_min, |s| s.rss as f64),
                ("fds", bounds.fds_per_min, |s| s.fds as f64),
                ("threads", bounds.threads_per_min, |s| s.threads as f64),
            ]
        };
        for (metric, bound, value) in metrics {
            if metric.is_empty() {
                continue;
            }
            let mut points: Vec<(i64, f64)> = samples.iter().map(|s| (s.at_ms, value(s))).collect();
            if metric != "rss" && metric != "size" {
                points = floor(&points);
            }
            let per_min = slope(&points);
            let key = format!("{group} {metric}");
            let worst = verdict.slopes.entry(key).or_insert(f64::MIN);
            *worst = worst.max(per_min);
            // The harness is the tool, not the system under test: its
            // slopes are reported, never judged.
            if per_min > bound && group != "harness" {
                verdict.violations.push(Violation {
                    check: "growth",
                    detail: format!(
                        "{} {metric} grew {per_min:.1}/min over the second half (bound {bound:.1}/min)",
                        if proc == "servers" {
                            let names: Vec<&str> = servers.iter().copied().collect();
                            format!("{} together", names.join(" + "))
                        } else {
                            format!("{proc} (pid {pid})")
                        }
                    ),
                });
            }
        }
    }
}

/// The fault kinds that can make a server's task store fail: its database
/// stopped, its disk full, or the server itself stopped in the middle of
/// its writes.
pub const STORE_FAULTS: [&str; 4] = [
    "postgres-restart",
    "disk-full",
    "server-sigterm",
    "server-sigkill",
];

/// Whether an ERROR line says the task store failed: its writes (target
/// `contactd::store…`), or what it refused because of them (a submit, the
/// generator's tasks, the jobs' runs).
pub fn store_error(line: &str) -> bool {
    [
        "\"target\":\"contactd::store",
        "task not accepted",
        "generated tasks not published",
        "job runs not fired",
    ]
    .iter()
    .any(|p| line.contains(p))
}

/// Every ERROR line is explained by a fault around it; one saying that
/// the task store failed only by a fault that can make it fail (a store
/// failing during a network fault is a defect: the soak's first PostgreSQL
/// run found one that way).
fn errors(history: &History, bounds: &Bounds, verdict: &mut Verdict) {
    for error in &history.errors {
        let store = store_error(&error.line);
        let explained = faults(history).any(|(kind, _, start, end)| {
            (!store || STORE_FAULTS.contains(&kind))
                && error.at_ms >= start - 1000
                && error.at_ms <= end + bounds.error_window_ms
        });
        if !explained {
            verdict.violations.push(Violation {
                check: "error-log",
                detail: format!("{} at {}: {}", error.file, error.at_ms, error.line),
            });
        }
    }
}
