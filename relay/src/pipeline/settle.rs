//! The settle stage's buffer: the outcomes that arrived while the previous settle ran,
//! committed together in one round trip (deletes and failure updates), as a group commit.

use super::lanes::LaneId;
use crate::store::{Failure, Settlement};

#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) settlement: Settlement,
    /// Rows let go once this is committed: the queued rows of a failed key.
    pub(crate) release: Vec<i64>,
    /// Keys blocked by a failure in this settlement.
    pub(crate) unblock: Vec<LaneId>,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.settlement.delivered.is_empty() && self.settlement.failed.is_empty()
    }

    /// Rows (in this buffer).
    pub(crate) fn len(&self) -> usize {
        self.settlement.delivered.len() + self.settlement.failed.len()
    }

    pub(crate) fn delivered(&mut self, seq: i64) {
        self.settlement.delivered.push(seq);
    }

    /// A failure to record; `id`'s lane is blocked until it is, and `dropped` rows of it are
    /// let go then.
    pub(crate) fn failed(&mut self, failure: Failure, id: LaneId, dropped: Vec<i64>) {
        self.settlement.failed.push(failure);
        self.release.extend(dropped);
        self.unblock.push(id);
    }

    /// Every row this buffer holds, to forget once it is settled.
    pub(crate) fn rows(&self) -> impl Iterator<Item = i64> + '_ {
        self.settlement
            .delivered
            .iter()
            .copied()
            .chain(self.settlement.failed.iter().map(|f| f.seq))
            .chain(self.release.iter().copied())
    }
}
