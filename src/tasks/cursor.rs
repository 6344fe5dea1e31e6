//! An agent's acknowledgement cursor in broadcast mode: which tasks it has
//! acked, so that after a reconnect it is sent what it missed and not what
//! it already handled.
//!
//! The cursor is a watermark (every task up to it is acked) plus the acked
//! ids above it, which arrive out of order when an agent handles several
//! tasks at once. The set is bounded: past the bound its lowest ids are
//! forgotten (those tasks may be sent again; the agent dedups them).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;

use crate::model::{AckCursor, Saved};

/// Every named agent's broadcast cursor, by name: owned here, not by the
/// caller registry (whose entries come and go with connections), and kept
/// by the store. Bounded by time: agents not seen for
/// `store.forget_agents_after` are forgotten.
#[derive(Debug, Default)]
pub struct Cursors {
    map: Mutex<HashMap<Arc<str>, Arc<Tracked>>>,
}

/// One agent's cursor, with what the store needs to know about it.
#[derive(Debug)]
pub struct Tracked {
    pub cursor: Mutex<AckCursor>,
    /// The first task id meant for the agent: the cursor began just below
    /// it, so earlier tasks were never owed to it (0: not known, for a
    /// cursor saved by an older contactd).
    pub since: u64,
    /// The highest task id sent to the agent: its acks up to this one are
    /// taken after a server restart too.
    pub sent_up_to: AtomicU64,
    /// Changed since the store last saved it.
    dirty: AtomicBool,
    /// When the agent last opened a stream or acked (unix ms).
    seen_ms: AtomicI64,
}

impl Tracked {
    fn new(cursor: AckCursor, since: u64, sent_up_to: u64, seen_ms: i64) -> Arc<Tracked> {
        Arc::new(Tracked {
            cursor: Mutex::new(cursor),
            since,
            sent_up_to: AtomicU64::new(sent_up_to),
            dirty: AtomicBool::new(true),
            seen_ms: AtomicI64::new(seen_ms),
        })
    }

    /// Marks the cursor changed (to be saved) and its agent seen now.
    pub fn touch(&self) {
        self.dirty.store(true, Ordering::Relaxed);
        self.seen_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }
}

impl Cursors {
    /// The cursors a store kept.
    pub fn restored(saved: Vec<Saved>) -> Cursors {
        let map = saved
            .into_iter()
            .map(|saved| {
                let tracked =
                    Tracked::new(saved.cursor, saved.since, saved.sent_up_to, saved.seen_ms);
                tracked.dirty.store(false, Ordering::Relaxed);
                (saved.agent, tracked)
            })
            .collect();
        Cursors {
            map: Mutex::new(map),
        }
    }

    /// `name`'s cursor, made by `make` if it has none (the agent is then
    /// owed the tasks above the new cursor's watermark).
    pub fn get_or_insert(&self, name: &Arc<str>, make: impl FnOnce() -> AckCursor) -> Arc<Tracked> {
        let mut map = self.map.lock();
        let tracked = map.entry(Arc::clone(name)).or_insert_with(|| {
            let cursor = make();
            let since = cursor.watermark() + 1;
            Tracked::new(cursor, since, 0, crate::clock::now_ms())
        });
        tracked.touch();
        Arc::clone(tracked)
    }

    /// Takes in `saved`, the agent's cursor as a shared store keeps it
    /// (another server may have moved it since this one last did).
    pub fn merge(&self, saved: Saved) {
        let mut map = self.map.lock();
        match map.get(&saved.agent) {
            Some(tracked) => {
                tracked.cursor.lock().merge(&saved.cursor);
                tracked
                    .sent_up_to
                    .fetch_max(saved.sent_up_to, Ordering::Relaxed);
            }
            None => {
                let tracked =
                    Tracked::new(saved.cursor, saved.since, saved.sent_up_to, saved.seen_ms);
                tracked.dirty.store(false, Ordering::Relaxed);
                map.insert(saved.agent, tracked);
            }
        }
    }

    /// `name`'s cursor, if it has one.
    pub fn get(&self, name: &str) -> Option<Arc<Tracked>> {
        self.map.lock().get(name).cloned()
    }

    /// Every agent's cursor, by name (for `task show`).
    pub fn all(&self) -> Vec<(Arc<str>, Arc<Tracked>)> {
        let map = self.map.lock();
        map.iter()
            .map(|(name, t)| (Arc::clone(name), Arc::clone(t)))
            .collect()
    }

    /// Notes that `name` is still around (connected), without a save.
    pub fn seen(&self, name: &str) {
        if let Some(t) = self.map.lock().get(name) {
            t.seen_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
        }
    }

    /// Whether `name` has a cursor.
    pub fn contains(&self, name: &str) -> bool {
        self.map.lock().contains_key(name)
    }

    /// The cursors changed since the last call.
    pub fn take_dirty(&self) -> Vec<Saved> {
        let map = self.map.lock();
        map.iter()
            .filter(|(_, t)| t.dirty.swap(false, Ordering::Relaxed))
            .map(|(name, t)| Saved {
                agent: Arc::clone(name),
                cursor: t.cursor.lock().clone(),
                since: t.since,
                sent_up_to: t.sent_up_to.load(Ordering::Relaxed),
                seen_ms: t.seen_ms.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Forgets the agents last seen before `before_ms`; returns how many.
    pub fn forget_before(&self, before_ms: i64) -> usize {
        let mut map = self.map.lock();
        let len = map.len();
        // An agent with a stream open keeps touching its cursor.
        map.retain(|_, t| t.seen_ms.load(Ordering::Relaxed) >= before_ms);
        len - map.len()
    }

    /// How many agents have a cursor.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether no agent has a cursor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_out_of_order_acks_advance_the_watermark() {
        let mut c = AckCursor::default();
        c.ack(1, 100);
        c.ack(3, 100);
        c.ack(4, 100);
        assert_eq!(c.watermark(), 1);
        assert!(c.is_acked(3) && !c.is_acked(2));
        c.ack(2, 100);
        assert_eq!(c.watermark(), 4);
        c.ack(2, 100);
        assert_eq!(c.watermark(), 4);
    }

    #[test]
    fn merging_keeps_every_ack_of_both() {
        let mut here = AckCursor::at(3);
        here.ack(6, 100);
        let mut there = AckCursor::at(4);
        there.ack(7, 100);
        there.ack(9, 100);
        here.merge(&there);
        // 1..=4 (there), 5 neither, 6 (here), 7 and 9 (there).
        assert_eq!(here.watermark(), 4);
        assert!(here.is_acked(6) && here.is_acked(7) && here.is_acked(9));
        assert!(!here.is_acked(5) && !here.is_acked(8));
        here.merge(&AckCursor::at(5));
        assert_eq!(here.watermark(), 7, "5 closes the gap up to 7");
        let before = here.clone();
        here.merge(&AckCursor::default());
        assert_eq!(here, before, "an older cursor takes nothing away");
    }

    #[test]
    fn the_out_of_order_set_is_bounded() {
        let mut c = AckCursor::default();
        for id in (10..20).rev() {
            let _ = c.ack(id, 3);
        }
        assert!(c.is_acked(17) && c.is_acked(18) && c.is_acked(19));
        assert!(!c.is_acked(16), "only the 3 highest ids are kept: {c:?}");
    }

    #[test]
    fn skipping_counts_the_unacked_tasks_lost() {
        let mut c = AckCursor::at(5);
        c.ack(8, 100);
        c.ack(11, 100);
        // Tasks 6..=9 left retention: 6, 7 and 9 were never acked.
        assert_eq!(c.skip_to(10), 3);
        assert_eq!(c.watermark(), 9);
        assert!(c.is_acked(11));
        assert_eq!(c.skip_to(5), 0);
    }
}
