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
    /// Bumped when anything shown may have changed; each open event stream
    /// holds a receiver ([`Live::watch`]), and with none the watcher does
    /// not look.
    generation: watch::Sender<u64>,
    /// Told when a stream opens: the watcher takes its first look at once.
    opened: tokio::sync::Notify,
    pub(super) throughput: Throughput,
}

/// What the watcher reads: the server's state (a test's stand-in in the
/// unit tests).
pub(super) trait Watched: Send + Sync + 'static {
    /// The results counted so far (acks and failures).
    fn results(&self) -> u64;
    /// Everything a page may show, folded into one number: when it moves,
    /// pages are told to fetch again. A pass over the callers, as a scrape.
    fn fingerprint(&self) -> u64;
}

impl Watched for State {
    fn results(&self) -> u64 {
        let counts = self.callers.totals().counts;
        counts.acked + counts.failed
    }

    fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hash = std::collections::hash_map::DefaultHasher::new();
        let totals = self.callers.totals();
        (
            totals.counts.delivered,
            totals.counts.acked + totals.counts.failed,
            totals.counts.missed,
            totals.connected_named,
            totals.connected_anonymous,
        )
            .hash(&mut hash);
        for caller in self.callers.list() {
            // A new status text from an agent: its time moves.
            if let Some((_, at)) = caller.status() {
                at.hash(&mut hash);
            }
        }
        let stats = self.broker.stats();
        stats.next_id.hash(&mut hash);
        let jobs = self.broker.jobs().stats();
        let ended: u64 = jobs.outcomes.iter().map(|(_, _, n)| n).sum();
        (jobs.running, jobs.halted, ended).hash(&mut hash);
        hash.finish()
    }
}

/// The minute since the epoch now.
fn minute_now() -> u64 {
    u64::try_from(crate::clock::unix_ms(std::time::SystemTime::now())).unwrap_or(0) / 60_000
}

impl Live {
    /// Starts the watcher over `watched`: every `interval` it samples the
    /// throughput once a minute and, while an event stream is open, looks
    /// for change. It ends with `stop`.
    pub(super) fn start<W: Watched>(
        watched: Arc<W>,
        interval: Duration,
        stop: CancellationToken,
    ) -> Arc<Live> {
        let live = Arc::new(Live {
            generation: watch::Sender::new(0),
            opened: tokio::sync::Notify::new(),
            throughput: Throughput::default(),
        });
        let shared = Arc::clone(&live);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut last, mut sampled, mut watching) = (0, None, false);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shared.opened.notified() => {}
                    () = stop.cancelled() => return,
                }
                let minute = minute_now();
                if sampled != Some(minute) {
                    sampled = Some(minute);
                    shared.throughput.sample(minute, watched.results());
                }
                // No browser watches: no pass over the callers.
                if shared.generation.receiver_count() == 0 {
                    watching = false;
                    continue;
                }
                let print = watched.fingerprint();
                if !watching {
                    // The first look since no one watched, as the first
                    // stream opens: what it finds is what its page showed
                    // (rendered just before), not a change to tell.
                    watching = true;
                    last = print;
                } else if print != last {
                    last = print;
                    shared.generation.send_modify(|g| *g += 1);
                }
            }
        });
        live
    }

    /// A new event stream's view of the generation, marked seen; the
    /// watcher is told, to look at once.
    pub(super) fn watch(&self) -> watch::Receiver<u64> {
        let receiver = self.generation.subscribe();
        self.opened.notify_one();
        receiver
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    use super::*;

    /// A stand-in for the state: its fingerprint is the test's to set,
    /// and its looks are counted.
    #[derive(Debug, Default)]
    struct Fake {
        print: AtomicU64,
        looks: AtomicU64,
        looked: tokio::sync::Notify,
    }

    impl Watched for Fake {
        fn results(&self) -> u64 {
            0
        }

        fn fingerprint(&self) -> u64 {
            self.looks.fetch_add(1, SeqCst);
            self.looked.notify_one();
            self.print.load(SeqCst)
        }
    }

    /// On a paused clock, which moves only when every task waits: after
    /// `sleep(10 s)` the watcher has had each of its ten ticks.
    #[tokio::test(start_paused = true)]
    async fn the_watcher_looks_only_while_a_stream_watches() {
        let fake = Arc::new(Fake::default());
        let stop = CancellationToken::new();
        let live = Live::start(Arc::clone(&fake), Duration::from_secs(1), stop.clone());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(fake.looks.load(SeqCst), 0, "no stream, yet it looked");

        // A stream opens: the watcher looks at once (what it finds then is
        // what the page showed), and a change after reaches the stream.
        let mut stream = live.watch();
        fake.looked.notified().await;
        assert_eq!(*stream.borrow(), 0, "no change to tell yet");
        fake.print.store(7, SeqCst);
        stream.changed().await.unwrap();
        fake.print.store(8, SeqCst);
        stream.changed().await.unwrap();

        // It goes: the looks stop.
        drop(stream);
        let looked = fake.looks.load(SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(fake.looks.load(SeqCst), looked, "it looked for no one");
        stop.cancel();
    }

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
