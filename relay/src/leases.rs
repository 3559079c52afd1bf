//! The partition leases: renewed every third of a lease, and rebalanced toward a fair share
//! of the partitions; a partition given up is handed over only once its rows are settled.

use std::{sync::Arc, time::Duration};

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
    pub async fn rebalance(&self) -> Result<Vec<i16>, RelayError> {
        let busy: Vec<i16> = {
            let workers = self.busy.lock().expect("busy partitions");
            let mut all: Vec<i16> = workers.iter().flatten().copied().collect();
            all.sort_unstable();
            all.dedup();
            all
        };
        let draining = self.draining.lock().expect("draining partitions").clone();
        let share = self
            .store
            .rebalance_keeping(self.id, self.settings.lease, &busy, &draining)
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

    /// Renews the partition leases every third of a lease, and rebalances; once shutting
    /// down, only renews them, until the workers are `done`.
    pub(crate) async fn keep_partitions(
        self: Arc<Self>,
        shutdown: CancellationToken,
        done: CancellationToken,
    ) {
        let every = self.settings.lease / 3;
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
            self.heartbeats.beat(keeper_slot(&self.settings));
            let renewed = if shutdown.is_cancelled() {
                self.store
                    .renew(self.id, self.settings.lease)
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
