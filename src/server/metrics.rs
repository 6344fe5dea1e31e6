//! The server's metrics (`contactd_*`), read at scrape time: per-task
//! counts from the callers' own counters (the ones `contactd agents`
//! shows) and the queue's, gauges from the state they describe; only cold
//! events (refused connections and calls, Contact calls, remote commands)
//! have counters here, all plain atomics indexed by a fixed label set, so
//! no label is looked up while serving. Jobs' series come from the
//! broker's jobs at each scrape, labelled `job_name` (not `job`, which
//! Prometheus sets to the scrape job's name and would rename to
//! `exported_job`): a few series per configured job, bounded by the
//! config's cap on jobs.

use std::{
    collections::HashMap,
    sync::{Arc, Weak, atomic::Ordering::Relaxed},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::{
    counters::{CMD_OUTCOMES, CODES, Counters, METHODS, REFUSALS},
    state::State,
};
use crate::{
    clock::now_ms,
    metrics::{counter, gauge, labelled_counter, labelled_gauge},
    schedule::Schedule,
    tasks::jobs::{AD_HOC, JobStats},
};

/// The `job_name` of ad hoc rollouts (`task submit --batch`), which have
/// no job: not a job name (those have no parentheses or spaces).
const AD_HOC_LABEL: &str = "(ad hoc)";

/// The outcomes of a job's runs, each exposed from 0 for every configured
/// job (so `increase` sees a job's first failure).
const RUN_OUTCOMES: [&str; 4] = ["succeeded", "failed", "timed_out", "skipped"];

impl Counters {
    /// `grpc_requests_total`: the codes seen, and OK for every method.
    fn encode_calls(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = e.encode_descriptor(
            "grpc_requests",
            "Contact calls by method and gRPC status code: unary and client-stream calls when \
             they end, server and bidi streams when they open (OK) or are refused",
            None,
            MetricType::Counter,
        )?;
        for (method, codes) in METHODS.iter().zip(&self.calls) {
            for (code, count) in CODES.iter().zip(codes) {
                let count = count.load(Relaxed);
                // Only the codes seen: 85 series of zeros say nothing.
                if count > 0 || *code == "OK" {
                    ConstCounter::new(count)
                        .encode(m.encode_family(&[("method", *method), ("code", *code)])?)?;
                }
            }
        }
        Ok(())
    }
}

/// Reads the server's state at each scrape. Weak: the registry outlives
/// nothing, but a scrape racing the shutdown must not keep the state.
#[derive(Debug)]
pub(super) struct ServerCollector {
    state: Weak<State>,
    /// The id the next published task gets, at start: published tasks
    /// are counted from there.
    first_id: u64,
}

impl ServerCollector {
    pub(super) fn new(state: &Arc<State>) -> ServerCollector {
        ServerCollector {
            state: Arc::downgrade(state),
            first_id: state.broker.stats().next_id,
        }
    }
}

impl Collector for ServerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        let closing = state.closing.is_cancelled();
        gauge(
            &mut e,
            "serving",
            "1 while the server serves (health SERVING), 0 once it is shutting down",
            u64::from(!closing),
        )?;
        let callers = state.callers.totals();
        let stats = state.broker.stats();
        labelled_gauge(
            &mut e,
            "agents_connected",
            "Callers with a call open now: named agents, and anonymous (seed) clients by IP address",
            "kind",
            &[
                ("named", callers.connected_named),
                ("anonymous", callers.connected_anonymous),
            ],
        )?;
        labelled_counter(
            &mut e,
            "agent_connections",
            "Times a caller went from no open call to one: a named agent's connection, or an \
             anonymous (seed) client's call",
            "kind",
            &[
                ("named", callers.connections[0]),
                ("anonymous", callers.connections[1]),
            ],
        )?;
        counter(
            &mut e,
            "tasks_published",
            "Tasks published (generated or submitted) since the start",
            stats.next_id.saturating_sub(self.first_id),
        )?;
        counter(
            &mut e,
            "tasks_delivered",
            "Tasks sent to agents (each delivery of a task to each agent, redeliveries included)",
            callers.counts.delivered,
        )?;
        labelled_counter(
            &mut e,
            "tasks_acked",
            "Results applied, by the outcome the agent reported",
            "outcome",
            &[
                ("ok", callers.counts.acked),
                ("failed", callers.counts.failed),
            ],
        )?;
        counter(
            &mut e,
            "tasks_skipped",
            "Broadcast: tasks an agent never got because they left retention first (a slow or absent subscriber)",
            callers.counts.missed,
        )?;
        let (counters, depths) = (stats.queue, stats.depths);
        counter(
            &mut e,
            "tasks_redelivered",
            "Queue mode: deliveries after the first: after an ack timeout, or again to the agent that held the task when it reconnects",
            counters.redelivered,
        )?;
        counter(
            &mut e,
            "tasks_dead",
            "Queue mode: tasks parked as dead after tasks.max_attempts deliveries",
            counters.dead,
        )?;
        labelled_counter(
            &mut e,
            "tasks_dropped",
            "Queue mode: tasks dropped unsent, by reason (max_pending: the queue was full)",
            "reason",
            &[("max_pending", counters.dropped)],
        )?;
        gauge(
            &mut e,
            "tasks_pending",
            "Queue mode: tasks waiting for an agent (not yet sent)",
            depths.waiting as u64,
        )?;
        gauge(
            &mut e,
            "tasks_in_flight",
            "Queue mode: tasks sent and waiting for their ack",
            depths.in_flight as u64,
        )?;
        gauge(
            &mut e,
            "tasks_dead_retained",
            "Queue mode: dead tasks kept for `contactd task retry` (at most tasks.retain)",
            depths.dead as u64,
        )?;
        labelled_counter(
            &mut e,
            "acks_refused",
            "Acks that changed nothing, by reason: not_delivered (the task was not sent to the caller), \
             cancelled (an operator cancelled it), duplicate (queue mode: late or repeated)",
            "reason",
            &[
                ("not_delivered", callers.counts.refused_acks),
                ("cancelled", stats.cancelled_acks),
                ("duplicate", counters.duplicate_acks),
            ],
        )?;
        let c = &state.counters;
        c.encode_calls(&mut e)?;
        gauge(
            &mut e,
            "unsent_bytes",
            "Bytes of replies and queue-mode tasks produced for peers and not yet written out \
             (at most server.max_unsent, plus a message per connection)",
            c.unsent.load(Relaxed) as u64,
        )?;
        counter(
            &mut e,
            "sends_paused",
            "Times a response stream waited because its peer was not reading \
             (server.max_connection_unsent or server.max_unsent reached)",
            c.sends_paused.load(Relaxed),
        )?;
        c.unary_seconds.encode(e.encode_descriptor(
            "grpc_request_duration_seconds",
            "How long unary Contact calls (remoteCMD) took, request headers to response trailers",
            None,
            MetricType::Histogram,
        )?)?;
        let refused: Vec<(&str, u64)> = CODES
            .iter()
            .zip(&c.refused_calls)
            .map(|(code, n)| (*code, n.load(Relaxed)))
            .filter(|(code, n)| {
                *n > 0 || *code == "UNAUTHENTICATED" || *code == "PERMISSION_DENIED"
            })
            .collect();
        labelled_counter(
            &mut e,
            "calls_refused",
            "Contact calls refused on their headers, before any body was read, by gRPC status code",
            "code",
            &refused,
        )?;
        let refused: Vec<(&str, u64)> = REFUSALS
            .iter()
            .zip(&c.refused_connections)
            .map(|(why, n)| (*why, n.load(Relaxed)))
            .collect();
        labelled_counter(
            &mut e,
            "connections_refused",
            "Connections closed before they were served, by reason",
            "reason",
            &refused,
        )?;
        let commands: Vec<(&str, u64)> = CMD_OUTCOMES
            .iter()
            .zip(&c.commands)
            .map(|(outcome, n)| (*outcome, n.load(Relaxed)))
            .collect();
        labelled_counter(
            &mut e,
            "remote_commands",
            "remoteCMD calls, by outcome: ok, failed, denied (not allowed), timeout, exhausted (too many at once)",
            "outcome",
            &commands,
        )?;
        c.command_seconds.encode(e.encode_descriptor(
            "remote_command_duration_seconds",
            "How long remote commands took, refused ones included",
            None,
            MetricType::Histogram,
        )?)?;
        encode_jobs(&mut e, &state.broker.jobs().stats(), now_ms())
    }
}

/// The jobs' series (README "Server metrics").
fn encode_jobs(
    e: &mut DescriptorEncoder,
    stats: &JobStats,
    now: i64,
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(
        "job_runs",
        "Job runs ended since the start, by job ([[jobs]] name; \"(ad hoc)\" for task submit \
         --batch) and outcome: succeeded, failed, timed_out, or skipped (its time came while the \
         previous run ran or tasks.max_runs were running); halted runs count when they end",
        None,
        MetricType::Counter,
    )?;
    let counts: HashMap<(&str, &str), u64> = stats
        .outcomes
        .iter()
        .map(|(job, outcome, n)| ((&**job, *outcome), *n))
        .collect();
    for (job, _) in &stats.last_success {
        for outcome in RUN_OUTCOMES {
            let count = counts.get(&(&**job, outcome)).copied().unwrap_or(0);
            ConstCounter::new(count)
                .encode(m.encode_family(&[("job_name", &**job), ("outcome", outcome)])?)?;
        }
    }
    // Ad hoc rollouts, by the outcomes seen (runs of jobs removed from the
    // config since are not shown: the label set stays that of the config).
    for (job, outcome, n) in &stats.outcomes {
        if &**job == AD_HOC {
            ConstCounter::new(*n)
                .encode(m.encode_family(&[("job_name", AD_HOC_LABEL), ("outcome", *outcome)])?)?;
        }
    }
    let mut m = e.encode_descriptor(
        "job_last_success_timestamp_seconds",
        "When the job's latest successful run started (Unix time), as the task store keeps it \
         across restarts; absent while the job never succeeded",
        None,
        MetricType::Gauge,
    )?;
    for (job, ms) in &stats.last_success {
        if *ms > 0 {
            ConstGauge::new(seconds(*ms)).encode(m.encode_family(&[("job_name", &**job)])?)?;
        }
    }
    let mut m = e.encode_descriptor(
        "job_scheduled_since_timestamp_seconds",
        "When this server began scheduling the job (Unix time): its start, or the reload that \
         added the job; what a job that never succeeded is judged from",
        None,
        MetricType::Gauge,
    )?;
    for job in &stats.schedules {
        ConstGauge::new(seconds(job.since_ms))
            .encode(m.encode_family(&[("job_name", &*job.name)])?)?;
    }
    let mut m = e.encode_descriptor(
        "job_period_seconds",
        "The job's period: every's, or for cron the longer of the gaps before and after its \
         latest fire time; absent while the job is paused",
        None,
        MetricType::Gauge,
    )?;
    for job in &stats.schedules {
        if job.paused {
            continue;
        }
        if let Some(period) = period(&job.schedule, now) {
            ConstGauge::new(period).encode(m.encode_family(&[("job_name", &*job.name)])?)?;
        }
    }
    gauge(
        e,
        "job_runs_running",
        "Job runs in progress (each and any runs; a broadcast run ends as it starts)",
        stats.running as u64,
    )?;
    gauge(
        e,
        "job_runs_halted",
        "Job runs halted by their rollout's max_failed, waiting for `contactd job resume RUN`",
        stats.halted as u64,
    )
}

/// Unix ms as seconds.
fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// The period `schedule` is judged by at `now` (seconds): `every`'s, or
/// for a cron pattern the longer of the gaps before and after its latest
/// fire time. With that, `age of the last success > 2 periods` never holds
/// before two fire times passed since the success (the gap after the latest
/// fire time is longer than the time since it), whatever the pattern's
/// uneven gaps (`0 3 * * 1-5`: the weekend's); for uneven patterns it may
/// hold a period later than two.
fn period(schedule: &Schedule, now: i64) -> Option<f64> {
    match schedule {
        Schedule::Every(period) => Some(period.as_secs_f64()),
        Schedule::Cron(_) => {
            let last = schedule.at_or_before(now)?;
            let next = schedule.next_after(now)?;
            let before = schedule.at_or_before(last - 1)?;
            Some(seconds((next - last).max(last - before)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    /// `age of the last success > 2 periods` holds only once two fire times
    /// passed since the success, for even and uneven patterns.
    #[test]
    fn two_periods_never_pass_before_two_fire_times() {
        // Monday 2026-01-05 00:00 UTC.
        let monday = 1_767_571_200_000;
        for (cron, even) in [("0 3 * * *", 24), ("0 3 * * 1-5", 0), ("0 9,17 * * *", 0)] {
            let schedule = Schedule::parse(None, Some(cron), None).unwrap();
            if even > 0 {
                assert_eq!(period(&schedule, monday), Some((even * 3600) as f64));
            }
            // Successes at each fire time over a week, judged every hour over
            // the two weeks after.
            let mut success = schedule.next_after(monday).unwrap();
            while success < monday + 7 * 24 * HOUR {
                let mut now = success;
                while now < success + 14 * 24 * HOUR {
                    let alert =
                        (now - success) as f64 / 1000.0 > 2.0 * period(&schedule, now).unwrap();
                    let first = schedule.next_after(success).unwrap();
                    let second = schedule.next_after(first).unwrap();
                    assert!(
                        !alert || second <= now,
                        "{cron}: success {success}, now {now}"
                    );
                    now += HOUR;
                }
                success = schedule.next_after(success).unwrap();
            }
        }
        let every = Schedule::parse(Some("90s"), None, None).unwrap();
        assert_eq!(period(&every, monday), Some(90.0));
    }
}
