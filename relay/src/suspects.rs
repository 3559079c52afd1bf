//! The suspect rule: a message lost with the connection is published again alone before it
//! is charged (see [`Suspects`]).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    envelope::Envelope,
    publish::{PublishError, Publisher},
};

/// Messages that were in flight when a broker connection closed under them.
///
/// The rule: a message in flight at a connection loss becomes a suspect and costs no
/// attempt. A suspect is published again **alone**, with nothing else of this relay in
/// flight. If the connection closes while it is alone, the message is the cause: the loss
/// counts as a failed attempt, so a message that always kills the connection goes dead
/// after `retry.max_attempts` (its key waiting behind it, per the dead-key policy), while
/// the messages that were merely in flight with it are never charged. A suspect that is
/// confirmed is cleared.
#[derive(Default)]
pub(crate) struct Suspects {
    seqs: Mutex<std::collections::HashSet<i64>>,
    /// Normal publishes hold it shared; a suspect holds it alone.
    pub(crate) alone: tokio::sync::RwLock<()>,
}

impl Suspects {
    /// Bound on remembered suspects (they are only an optimisation of who goes alone).
    const MAX: usize = 100_000;

    /// True when `seq` is a suspect: it is to be published alone.
    pub(crate) fn is_suspect(&self, seq: i64) -> bool {
        self.seqs.lock().expect("lock poisoned").contains(&seq)
    }

    fn suspect(&self, seq: i64) {
        let mut seqs = self.seqs.lock().expect("lock poisoned");
        if seqs.len() >= Self::MAX {
            seqs.clear();
        }
        seqs.insert(seq);
    }

    fn clear(&self, seq: i64) {
        self.seqs.lock().expect("lock poisoned").remove(&seq);
    }
}

impl Suspects {
    /// What the suspect rule (see [`Suspects`]) makes of `seq`'s outcome. `alone`: it went
    /// out as a suspect, with nothing else in flight. Lost with others, it becomes a suspect
    /// (no attempt); lost alone, the loss is its own (a failed attempt); confirmed, or dead
    /// for a reason of its own, it is a suspect no more.
    pub(crate) fn under_suspicion<T>(
        &self,
        seq: i64,
        alone: bool,
        result: Result<T, PublishError>,
    ) -> Result<T, PublishError> {
        match result {
            Ok(done) => {
                if alone {
                    self.clear(seq);
                }
                Ok(done)
            }
            Err(PublishError::Disconnected(e)) if alone => Err(PublishError::Rejected(format!(
                "the broker failed this message while it was the only one in flight: {e}"
            ))),
            Err(PublishError::Disconnected(e)) => {
                self.suspect(seq);
                Err(PublishError::Disconnected(e))
            }
            Err(e) => {
                if alone && matches!(e, PublishError::Permanent(_) | PublishError::TooLarge(_)) {
                    self.clear(seq);
                }
                Err(e)
            }
        }
    }

    /// Publishes one message under the suspect rule (see [`Suspects`]); returns how long
    /// the broker took to confirm it.
    pub(crate) async fn publish_one(
        &self,
        publisher: &dyn Publisher,
        env: &Envelope,
    ) -> Result<Duration, PublishError> {
        let suspect = self.is_suspect(env.seq);
        let (result, sent) = if suspect {
            let _alone = self.alone.write().await;
            tracing::info!(seq = env.seq, message_id = %env.id, "publishing a suspect message alone");
            let sent = std::time::Instant::now();
            (publisher.publish(env).await, sent.elapsed())
        } else {
            let _shared = self.alone.read().await;
            let sent = std::time::Instant::now();
            (publisher.publish(env).await, sent.elapsed())
        };
        self.under_suspicion(env.seq, suspect, result.map(|()| sent))
    }
}

/// The suspect rule's "alone", relay-wide, for a pipelining publisher that the workers share
/// (Kafka: one producer, whose produce requests mix every worker's messages). A suspect goes
/// alone only when no worker has anything out; while one waits to, no worker starts more;
/// while one is out alone, no worker starts anything.
#[derive(Default)]
pub(crate) struct SharedAlone {
    /// Messages handed over by all workers whose outcome is not taken in yet.
    out: AtomicUsize,
    /// Workers with a suspect set aside, waiting to go alone.
    waiting: AtomicUsize,
    /// A suspect is out alone.
    alone: AtomicBool,
    /// Told whenever `out` reaches 0, a wait ends, or an alone suspect comes back.
    pub(crate) changed: Notify,
}

impl SharedAlone {
    /// A message was handed over.
    pub(crate) fn handed(&self) {
        self.out.fetch_add(1, Ordering::SeqCst);
    }

    /// `n` outcomes were taken in (or given up).
    pub(crate) fn returned(&self, n: usize) {
        if n > 0 && self.out.fetch_sub(n, Ordering::SeqCst) == n {
            self.changed.notify_waiters();
        }
    }

    /// Whether a worker may start its messages now.
    pub(crate) fn may_start(&self) -> bool {
        !self.alone.load(Ordering::SeqCst) && self.waiting.load(Ordering::SeqCst) == 0
    }

    /// A worker set a suspect aside (`true`) or no longer has one (`false`).
    pub(crate) fn waiting(&self, waits: bool) {
        if waits {
            self.waiting.fetch_add(1, Ordering::SeqCst);
        } else {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.changed.notify_waiters();
        }
    }

    /// Takes the relay-wide "alone" for a suspect, if nothing of any worker is out and no
    /// other suspect is out alone.
    pub(crate) fn go_alone(&self) -> bool {
        self.out.load(Ordering::SeqCst) == 0
            && self
                .alone
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    /// The suspect out alone came back (or was given up).
    pub(crate) fn alone_done(&self) {
        self.alone.store(false, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}
