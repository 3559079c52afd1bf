//! What a worker is given of its relay: the store and the publisher, the rules every worker
//! shares (retries, suspects), and where it tells the relay how it is doing.

use std::{sync::Mutex, time::Duration};

use tokio::sync::{watch, RwLock};
use uuid::Uuid;

use crate::{
    health::Heartbeats,
    publish::Publisher,
    retry::RetryPolicy,
    store::Store,
    suspects::{SharedAlone, Suspects},
    wake::Wake,
};

/// How a worker reads and holds rows (from `[relay]`).
#[derive(Debug, Clone, Copy)]
pub struct WorkerOptions {
    /// Most rows read in one claim.
    pub batch_size: u32,
    /// Most rows held at once: read and not yet settled.
    pub window: u32,
    /// Most payload bytes held at once (a read may pass it by one row).
    pub window_bytes: u64,
    /// How often an idle worker looks for rows without being woken.
    pub poll_interval: Duration,
    /// How long a partition lease lasts: a settle is retried for up to this long.
    pub lease: Duration,
    /// Longest wait between reconnect attempts to PostgreSQL or the broker.
    pub reconnect_max_delay: Duration,
}

/// One worker's view of its relay. Every part is shared with the relay and the other
/// workers; the worker's own state lives in [`super::Worker`].
#[derive(Clone, Copy)]
pub(crate) struct Context<'a> {
    /// This worker's number: it reads the partitions `p` with `p % workers == worker`.
    pub(crate) worker: u32,
    pub(crate) workers: u32,
    /// The relay's id, under which it holds its partition leases.
    pub(crate) relay_id: Uuid,
    pub(crate) options: &'a WorkerOptions,
    pub(crate) store: &'a Store,
    pub(crate) publisher: &'a dyn Publisher,
    pub(crate) policy: &'a RetryPolicy,
    pub(crate) suspects: &'a Suspects,
    /// The suspect rule's "alone" across the workers (for a pipelining publisher).
    pub(crate) shared_alone: &'a SharedAlone,
    pub(crate) heartbeats: &'a Heartbeats,
    /// Per worker, the partitions that must not change hands yet (see
    /// [`super::Worker::tell_busy`]).
    pub(crate) busy: &'a Mutex<Vec<Vec<i16>>>,
    /// The partitions the relay owns now.
    pub(crate) owned: &'a watch::Sender<Vec<i16>>,
    /// Held shared by a read while it runs; the partition keeper holds it alone while
    /// partitions change hands.
    pub(crate) handover: &'a RwLock<()>,
    pub(crate) wake: &'a Wake,
}

impl Context<'_> {
    /// Of `owned`, the partitions this worker reads.
    pub(crate) fn mine(&self, owned: &[i16]) -> Vec<i16> {
        let workers = self.workers.max(1) as i16;
        owned
            .iter()
            .copied()
            .filter(|p| p % workers == self.worker as i16)
            .collect()
    }

    /// The worker made progress (see [`Heartbeats`]).
    pub(crate) fn beat(&self) {
        self.heartbeats.beat(self.worker as usize);
    }

    /// Tells the relay that `busy` are the partitions this worker has rows of in hand.
    pub(crate) fn set_busy(&self, busy: &[i16]) {
        let mut all = self.busy.lock().expect("busy partitions");
        let slot = &mut all[self.worker as usize];
        slot.clear();
        slot.extend_from_slice(busy);
    }

    /// Whether the publisher keeps a key's order itself, so that a key's messages may be
    /// in flight together (Kafka).
    pub(crate) fn pipelined(&self) -> bool {
        self.publisher.key_depth() > 1
    }
}
