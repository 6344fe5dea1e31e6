//! What makes the console live: one watcher task that looks for change
//! every `web.event_interval` and bumps a generation that every event stream
//! waits on, and the per-minute counts behind the fleet's throughput.
//!
//! Nothing here is on the delivery path: the watcher reads the same
//! counters the metrics read at a scrape (one pass over the callers), so an
//! open console costs fan-out nothing, however many streams are open; the
//! streams themselves only wait on a `watch` channel and write a few bytes
//! per change. A browser told of a change fetches its page again: the
//! server, not the browser, decides when there is something new.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::super::state::State;

/// Minutes of throughput kept: the fleet page shows the last hour.
pub(super) const MINUTES: usize = 60;

/// Results (acks and failures) counted per minute.
#[derive(Debug, Default)]
pub(super) struct Throughput {
    /// (minute since the epoch, results counted by the end of the minute
    /// before it), oldest first; at most [`MINUTES`] + 1 entries.
    marks: Mutex<VecDeque<(u64, u64)>>,
}

impl Throughput {
    /// Records that `total` results had been counted at `minute`.
    pub(super) fn sample(&self, minute: u64, total: u64) {
        let mut marks = self.marks.lock();
        if marks.back().is_none_or(|(m, _)| *m < minute) {
            marks.push_back((minute, total));
        }
        while marks.len() > MINUTES + 1 {
            marks.pop_front();
        }
    }

    /// Results per minute over the last hour, oldest first, each with its
    /// minute; the last is the minute in progress, counted up to `total`.
    pub(super) fn minutes(&self, total: u64) -> Vec<(u64, u64)> {
        let marks = self.marks.lock();
        let mut out: Vec<(u64, u64)> = marks
            .iter()
            .zip(marks.iter().skip(1))
            .map(|((m, a), (_, b))| (*m, b.saturating_sub(*a)))
            .collect();
        if let Some((m, a)) = marks.back() {
            out.push((*m, total.saturating_sub(*a)));
        }
        let skip = out.len().saturating_sub(MINUTES);
        out.drain(..skip);
        out
    }
}

/// What the console's pages and streams share about change.
#[derive(Debug)]
pub(super) struct Live {
    /// Bumped when anything shown may have changed.
    pub(super) generation: watch::Receiver<u64>,
    pub(super) throughput: Throughput,
}

/// Everything a page may show, folded into one number: when it moves,
/// pages are told to fetch again. One pass over the callers, as a scrape.
fn fingerprint(state: &State) -> (u64, u64) {
    use std::hash::{Hash, Hasher};
    let mut hash = std::collections::hash_map::DefaultHasher::new();
    let totals = state.callers.totals();
    let results = totals.counts.acked + totals.counts.failed;
    (
        totals.counts.delivered,
        results,
        totals.counts.missed,
        totals.connected_named,
        totals.connected_anonymous,
    )
        .hash(&mut hash);
    for caller in state.callers.list() {
        // A new status text from an agent: its time moves.
        if let Some((_, at)) = caller.status() {
            at.hash(&mut hash);
        }
    }
    let stats = state.broker.stats();
    stats.next_id.hash(&mut hash);
    let jobs = state.broker.jobs().stats();
    let ended: u64 = jobs.outcomes.iter().map(|(_, _, n)| n).sum();
    (jobs.running, jobs.halted, ended).hash(&mut hash);
    (hash.finish(), results)
}

/// The minute since the epoch now.
fn minute_now() -> u64 {
    u64::try_from(crate::clock::unix_ms(std::time::SystemTime::now())).unwrap_or(0) / 60_000
}

impl Live {
    /// Starts the watcher; it ends with `stop`.
    pub(super) fn start(
        state: &Arc<State>,
        interval: Duration,
        stop: CancellationToken,
    ) -> Arc<Live> {
        let (tx, generation) = watch::channel(0u64);
        let live = Arc::new(Live {
            generation,
            throughput: Throughput::default(),
        });
        let (state, watched) = (Arc::clone(state), Arc::clone(&live));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return,
                }
                let (print, results) = fingerprint(&state);
                watched.throughput.sample(minute_now(), results);
                if print != last {
                    last = print;
                    tx.send_modify(|g| *g += 1);
                }
            }
        });
        live
    }

    /// The results counted so far (acks and failures), for the minute in
    /// progress.
    pub(super) fn results_now(state: &State) -> u64 {
        let counts = state.callers.totals().counts;
        counts.acked + counts.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_per_minute_and_an_hour_long() {
        let t = Throughput::default();
        t.sample(10, 0);
        t.sample(10, 5); // the same minute: its first mark stays
        t.sample(11, 7);
        t.sample(13, 20);
        assert_eq!(t.minutes(26), vec![(10, 7), (11, 13), (13, 6)]);
        for m in 100..200 {
            t.sample(m, m);
        }
        let minutes = t.minutes(200);
        assert_eq!(minutes.len(), MINUTES);
        assert_eq!(minutes.last(), Some(&(199, 1)));
    }
}
