//! The relay's background chores: purging expired records, marking rows held back behind a
//! dead row of their key, and reading the backlog gauges.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    error::{error_chain, RelayError},
    relay::Relay,
};

/// How often rows waiting behind a dead row of their key are marked as held back (and
/// marks whose dead row is gone cleared).
const HOLD_BACK_EVERY: Duration = Duration::from_secs(1);

impl Relay {
    /// Purges `delivered` and `discarded` records past their retention windows once;
    /// returns how many of each went.
    pub async fn purge(&self) -> Result<(u64, u64), RelayError> {
        Ok(self.store.purge(self.retention).await?)
    }

    /// Purges expired `delivered` and `discarded` records every `retention.purge_interval`.
    pub(crate) async fn purge_expired(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match self.purge().await {
                Ok((0, 0)) => {}
                Ok((delivered, discarded)) => {
                    tracing::info!(delivered, discarded, "purged expired records")
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "purge failed; trying again later")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.retention.interval) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    /// Every [`HOLD_BACK_EVERY`], marks the rows that wait behind a dead row of their key
    /// so that reads step over them, and clears the marks of keys whose dead row is gone
    /// (see [`crate::store::Store::hold_back`]).
    pub(crate) async fn keep_held_back(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match self.store.hold_back(self.id).await {
                Ok((0, 0)) => {}
                Ok((marked, cleared)) => tracing::info!(
                    marked,
                    cleared,
                    "rows held back behind dead rows of their keys updated"
                ),
                Err(e) => {
                    tracing::debug!(error = %error_chain(&e), "held-back rows not updated; trying again later")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(HOLD_BACK_EVERY) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    /// Reads the backlog gauges (and the broker's state) every `every`.
    pub(crate) async fn observe_backlog(
        self: Arc<Self>,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut topics = Vec::new();
        while !shutdown.is_cancelled() {
            match crate::status::read(self.store.pool(), self.store.schema()).await {
                Ok(status) => crate::metrics::backlog(&status, &mut topics),
                Err(e) => tracing::debug!(error = %e, "backlog not read"),
            }
            crate::metrics::broker_up(self.publisher.health().await.is_ok());
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}
