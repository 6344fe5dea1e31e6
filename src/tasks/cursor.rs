//! An agent's acknowledgement cursor in broadcast mode: which tasks it has
//! acked, so that after a reconnect it is sent what it missed and not what
//! it already handled.
//!
//! The cursor is a watermark (every task up to it is acked) plus the acked
//! ids above it, which arrive out of order when an agent handles several
//! tasks at once. The set is bounded: past the bound its lowest ids are
//! forgotten (those tasks may be sent again; the agent dedups them).

use std::collections::BTreeSet;

/// Acks of one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckCursor {
    /// Every task id up to this one is acked (0: none yet).
    watermark: u64,
    /// Acked ids above `watermark + 1`.
    above: BTreeSet<u64>,
}

impl AckCursor {
    /// A cursor for an agent that has seen every task up to `id`.
    pub fn at(id: u64) -> AckCursor {
        AckCursor {
            watermark: id,
            above: BTreeSet::new(),
        }
    }

    /// Records an ack of task `id`, keeping at most `bound` out-of-order ids.
    pub fn ack(&mut self, id: u64, bound: usize) {
        if id <= self.watermark {
            return;
        }
        if id == self.watermark + 1 {
            self.watermark = id;
            while self.above.remove(&(self.watermark + 1)) {
                self.watermark += 1;
            }
            return;
        }
        self.above.insert(id);
        while self.above.len() > bound.max(1) {
            self.above.pop_first();
        }
    }

    /// Tasks before this id need no redelivery: resume after the watermark.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Whether task `id` was acked.
    pub fn is_acked(&self, id: u64) -> bool {
        id <= self.watermark || self.above.contains(&id)
    }

    /// Skips the watermark past tasks that can no longer be delivered (they
    /// left retention): returns how many unacked ones that drops.
    pub fn skip_to(&mut self, first_retained: u64) -> u64 {
        if first_retained <= self.watermark + 1 {
            return 0;
        }
        let acked_gone = self.above.range(..first_retained).count() as u64;
        let missed = first_retained - 1 - self.watermark - acked_gone;
        self.above = self.above.split_off(&first_retained);
        self.watermark = first_retained - 1;
        while self.above.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
        missed
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
    fn the_out_of_order_set_is_bounded() {
        let mut c = AckCursor::default();
        for id in (10..20).rev() {
            c.ack(id, 3);
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
