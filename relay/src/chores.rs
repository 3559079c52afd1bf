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

/// The backlog gauges wait at least this many times as long as their last read took beyond
/// [`GAUGE_FREE`].
const GAUGE_SHARE: u32 = 100;
/// A gauge read this quick (an outbox of ordinary size) keeps `http.backlog_interval`.
const GAUGE_FREE: Duration = Duration::from_millis(50);

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
                Ok(s) if s.marked == 0 && s.cleared == 0 => {}
                Ok(s) => tracing::info!(
                    marked = s.marked,
                    cleared = s.cleared,
                    "rows held back behind earlier rows of their keys updated"
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

    /// Reads the backlog gauges (and the broker's state) every `every`, or less often when
    /// the read is slow: the gauges count the whole outbox, so a large backlog makes them
    /// cost more, and the wait after each read is at least [`GAUGE_SHARE`] times what it
    /// took beyond [`GAUGE_FREE`] (the shorter of the last two reads). Their share of one PostgreSQL backend stays near
    /// 1 / `GAUGE_SHARE` however large the backlog grows.
    pub(crate) async fn observe_backlog(
        self: Arc<Self>,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut topics = Vec::new();
        let mut last_took = Duration::ZERO;
        while !shutdown.is_cancelled() {
            let started = tokio::time::Instant::now();
            match crate::status::read(self.store.pool(), self.store.schema()).await {
                Ok(status) => crate::metrics::backlog(&status, &mut topics),
                Err(e) => tracing::debug!(error = %e, "backlog not read"),
            }
            // Two slow reads in a row: one (a new connection, a busy moment) is not a trend.
            let took = started.elapsed();
            let slow = took.min(last_took).saturating_sub(GAUGE_FREE);
            last_took = took;
            let wait = every.max(slow * GAUGE_SHARE);
            crate::metrics::broker_up(self.publisher.health().await.is_ok());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}
