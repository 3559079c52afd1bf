//! The partition leases: renewed every third of a lease, and rebalanced toward a fair share
//! of the partitions; a partition given up is handed over only once its rows are settled.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use outbox::Backoff;
use tokio_util::sync::CancellationToken;

use crate::{
    error::{error_chain, RelayError},
    relay::{keeper_slot, Relay},
};

/// How often a relay with partitions draining checks whether it can hand them over.
const DRAINING_CHECK: Duration = Duration::from_millis(100);

impl Relay {
    /// Renews this relay's partition leases and takes or gives up partitions towards its
    /// fair share; returns the partitions it holds now.
    ///
    /// A partition this relay has to give up while it has rows of it in hand is not read
    /// any more, but handed over only once those rows are settled (a later call), so that
    /// scaling up publishes no duplicates.
    ///
    /// No read of this relay starts while partitions change hands (the handover gate):
    /// otherwise a read could start after the partitions in hand were
    /// looked at and before the release committed, see the partition as still owned (its
    /// snapshot predates the commit), and return rows that the next owner reads too. If the
    /// reads under way do not finish within a third of a lease, this call only renews the
    /// leases, and hands nothing over.
    pub async fn rebalance(&self) -> Result<Vec<i16>, RelayError> {
        let Ok(_no_reads) =
            tokio::time::timeout(self.options.lease() / 3, self.handover.write()).await
        else {
            tracing::warn!(relay_id = %self.id, "reads under way for a third of a lease; renewing the leases without rebalancing");
            self.store.renew(self.id, self.options.lease()).await?;
            return Ok(self.owned.borrow().clone());
        };
        let busy: Vec<i16> = {
            let workers = self.busy.lock().expect("busy partitions");
            let mut all: Vec<i16> = workers.iter().flatten().copied().collect();
            all.sort_unstable();
            all.dedup();
            all
        };
        let draining = self.draining.lock().expect("draining partitions").clone();
        let delay = Duration::from_millis(self.handover_delay.load(Ordering::Relaxed));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let share = self
            .store
            .rebalance_keeping(self.id, self.options.lease(), &busy, &draining)
            .await?;
        if share.draining != draining {
            tracing::info!(relay_id = %self.id, partitions = ?share.draining, "partitions draining before they are handed over");
        }
        *self.draining.lock().expect("draining partitions") = share.draining;
        let owned = share.owned;
        self.owned.send_if_modified(|current| {
            let changed = *current != owned;
            if changed {
                tracing::info!(relay_id = %self.id, partitions = owned.len(), "partition share changed");
                current.clone_from(&owned);
            }
            changed
        });
        crate::metrics::partitions_owned(owned.len());
        Ok(owned)
    }

    /// Fault injection for tests: each rebalance waits `delay` between looking at the
    /// partitions in hand and handing partitions over. Nothing else uses it.
    #[doc(hidden)]
    pub fn inject_handover_delay(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.handover_delay.store(millis, Ordering::Relaxed);
    }

    /// Renews the partition leases every third of a lease, and rebalances; once shutting
    /// down, only renews them, until the workers are `done`.
    pub(crate) async fn keep_partitions(
        self: Arc<Self>,
        shutdown: CancellationToken,
        done: CancellationToken,
    ) {
        let every = self.options.lease() / 3;
        let mut backoff = Backoff::new(every);
        while !done.is_cancelled() {
            // Partitions draining are handed over as soon as their rows are settled.
            let every = if self
                .draining
                .lock()
                .expect("draining partitions")
                .is_empty()
            {
                every
            } else {
                every.min(DRAINING_CHECK)
            };
            self.heartbeats.beat(keeper_slot(&self.options));
            let renewed = if shutdown.is_cancelled() {
                self.store
                    .renew(self.id, self.options.lease())
                    .await
                    .map_err(RelayError::from)
            } else {
                self.rebalance().await.map(|_| ())
            };
            let wait = match renewed {
                Ok(()) => {
                    backoff.reset();
                    every
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %error_chain(&e), retry_in = ?wait, "cannot renew partition leases");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
                _ = done.cancelled() => {}
            }
        }
    }
}
