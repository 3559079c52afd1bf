//! The settle stage: the outcomes that arrived while the previous settle ran are committed
//! together in one round trip (deletes and failure updates), as a group commit, so settles
//! never wait for each other and never hold up a publish.

use std::time::Duration;

use outbox::Backoff;
use tokio::time::Instant;

use super::{context::Context, lanes::LaneId, Boxed};
use crate::{
    error::RelayError,
    store::{Failure, Settled, Settlement},
};

/// How long outcomes wait to be settled together (unless there are many, or the window is
/// full): one round trip per few milliseconds instead of one per confirm.
pub(super) const SETTLE_LINGER: Duration = Duration::from_millis(3);
/// Outcomes that are settled at once without waiting for more.
pub(super) const SETTLE_BATCH: usize = 500;

/// A settle's outcome, with the buffer it committed.
pub(super) type Committed = (Pending, Result<Settled, RelayError>);

/// The outcomes waiting to be settled, and the settle under way.
#[derive(Default)]
pub(super) struct Settler<'a> {
    pub(super) pending: Pending,
    pub(super) under_way: Option<Boxed<'a, Committed>>,
    /// When the oldest outcome in `pending` arrived.
    since: Option<Instant>,
}

impl<'a> Settler<'a> {
    /// An outcome joined `pending`.
    pub(super) fn arrived(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }

    /// Nothing waits to be settled and no settle is under way.
    pub(super) fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.under_way.is_none()
    }

    /// Whether what is pending is to be settled now: it lingered [`SETTLE_LINGER`], or there
    /// is much of it, or the worker needs the room (`held` rows against `window`), or is
    /// `stopping`.
    pub(super) fn due(&self, now: Instant, held: usize, window: u32, stopping: bool) -> bool {
        !self.pending.is_empty()
            && (self.since.is_some_and(|t| now >= t + SETTLE_LINGER)
                || self.pending.len() >= SETTLE_BATCH
                || held >= window as usize
                || stopping)
    }

    /// Starts a settle of everything pending, if one is due and none is under way.
    pub(super) fn start_if_due(
        &mut self,
        ctx: Context<'a>,
        now: Instant,
        held: usize,
        stopping: bool,
    ) {
        if self.pending.is_empty() {
            self.since = None;
        }
        if self.under_way.is_some() || !self.due(now, held, ctx.options.window, stopping) {
            return;
        }
        self.since = None;
        let batch = std::mem::take(&mut self.pending);
        self.under_way = Some(Box::pin(async move {
            let started = std::time::Instant::now();
            let result = settle_with_retries(ctx, &batch.settlement).await;
            crate::metrics::settle(started.elapsed());
            (batch, result)
        }));
    }

    /// When what is pending will have lingered long enough, while no settle is under way.
    pub(super) fn linger_until(&self) -> Option<Instant> {
        self.since
            .filter(|_| self.under_way.is_none())
            .map(|t| t + SETTLE_LINGER)
    }
}

/// Settles, retrying while PostgreSQL is unreachable for up to one lease (after which the
/// rows are another relay's to publish again).
async fn settle_with_retries(
    ctx: Context<'_>,
    settlement: &Settlement,
) -> Result<Settled, RelayError> {
    let deadline = Instant::now() + ctx.options.lease;
    let mut backoff = Backoff::new(ctx.options.reconnect_max_delay);
    loop {
        match ctx.store.settle(ctx.relay_id, settlement).await {
            Ok(done) => return Ok(done),
            Err(e) if Instant::now() + backoff.peek() < deadline => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "settle failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn outcomes_linger_before_they_are_settled_unless_many_or_the_window_is_full() {
        let mut s = Settler::default();
        assert!(
            !s.due(Instant::now(), 2000, 2000, true),
            "nothing to settle"
        );
        s.pending.delivered(1);
        s.arrived();
        let t0 = Instant::now();
        assert!(!s.due(t0, 10, 2000, false));
        assert_eq!(s.linger_until(), Some(t0 + SETTLE_LINGER));
        tokio::time::advance(SETTLE_LINGER - Duration::from_millis(1)).await;
        assert!(!s.due(Instant::now(), 10, 2000, false));
        // A later outcome does not push the first one's deadline back.
        s.pending.delivered(2);
        s.arrived();
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(s.due(Instant::now(), 10, 2000, false));
        // At once: a full window, a stopping worker, or a full batch.
        let mut s = Settler::default();
        s.pending.delivered(1);
        s.arrived();
        assert!(s.due(Instant::now(), 2000, 2000, false));
        assert!(s.due(Instant::now(), 10, 2000, true));
        for seq in 2..=SETTLE_BATCH as i64 {
            s.pending.delivered(seq);
        }
        assert!(s.due(Instant::now(), 10, 2000, false));
    }
}
