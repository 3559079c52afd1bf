//! The loop that joins the store and a publisher: claim → publish → settle.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::future::join_all;
use rand::Rng;
use tokio::{sync::Notify, task::JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::RelaySettings,
    envelope::Envelope,
    health::Heartbeats,
    publish::{PublishError, Publisher},
    retry::{Next, RetryPolicy},
    store::{Failure, Retention, Settlement, Store},
};

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The broker refused the relay itself (credentials, permissions).
    #[error("{0}")]
    Fatal(String),
    /// PostgreSQL failed; the loop retries these, [`Relay::relay_once`] returns them.
    #[error("PostgreSQL error while relaying")]
    Database(#[from] sqlx::Error),
    /// A relay task panicked: a bug. The relay stops (its partitions go to the others)
    /// and the process exits non-zero, so that it is restarted and the bug is seen.
    #[error("a relay task panicked: {0}")]
    Panicked(String),
}

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Confirmed by the broker and deleted.
    pub delivered: u64,
    /// Failed and scheduled for a later attempt.
    pub retried: u64,
    /// Failed for the last time (or malformed) and parked as dead.
    pub dead: u64,
    /// Left untouched for a later batch (not attempted, or the broker was unavailable).
    pub released: u64,
    /// Failures not recorded because another relay took the partition over meanwhile.
    pub not_owned: u64,
    /// Set when the broker could not be reached; the caller should back off.
    pub unavailable: Option<String>,
}

/// The outcome of one message within a batch.
#[derive(Debug)]
enum Outcome {
    Delivered,
    Failed(PublishError),
}

/// What a failed publish comes to.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A failed attempt to record.
    Failed(Failure),
    /// Nothing to record: the row is let go untouched (the broker was unavailable).
    Released(PublishError),
}

/// How often a relay with partitions draining checks whether it can hand them over.
const DRAINING_CHECK: Duration = Duration::from_millis(100);
/// How often rows waiting behind a dead row of their key are marked as held back (and
/// marks whose dead row is gone cleared).
const HOLD_BACK_EVERY: Duration = Duration::from_secs(1);

/// A relay: one store, one publisher, one policy.
pub struct Relay {
    pub(crate) store: Store,
    pub(crate) publisher: Arc<dyn Publisher>,
    policy: RetryPolicy,
    pub(crate) settings: RelaySettings,
    retention: Retention,
    pub(crate) id: Uuid,
    pub(crate) owned: tokio::sync::watch::Sender<Vec<i16>>,
    /// Per worker, the partitions it has rows of in hand or a read under way from: they
    /// change hands only once those are settled.
    pub(crate) busy: std::sync::Mutex<Vec<Vec<i16>>>,
    /// Partitions leased but no longer read, waiting for their rows to be settled.
    draining: std::sync::Mutex<Vec<i16>>,
    pub(crate) heartbeats: Heartbeats,
    observe: Observe,
    suspects: Suspects,
}

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
struct Suspects {
    seqs: Mutex<std::collections::HashSet<i64>>,
    /// Normal publishes hold it shared; a suspect holds it alone.
    alone: tokio::sync::RwLock<()>,
}

impl Suspects {
    /// Bound on remembered suspects (they are only an optimisation of who goes alone).
    const MAX: usize = 100_000;

    fn is_suspect(&self, seq: i64) -> bool {
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

/// Health and metrics options of a relay (see [`Relay::with_observe`]).
#[derive(Debug, Clone, Copy)]
pub struct Observe {
    /// How often the backlog gauges are read from PostgreSQL; `None` reads none.
    pub backlog_interval: Option<Duration>,
    /// A loop silent for longer than this makes the relay not live.
    pub stall_timeout: Duration,
}

impl Default for Observe {
    fn default() -> Self {
        Self {
            backlog_interval: None,
            stall_timeout: Duration::from_secs(300),
        }
    }
}

/// The heartbeat slot of the partition keeper; workers use slots `0..workers`.
fn keeper_slot(settings: &RelaySettings) -> usize {
    settings.workers as usize
}

impl Relay {
    /// A relay over `store` publishing with `publisher`.
    pub fn new(
        store: Store,
        publisher: Arc<dyn Publisher>,
        policy: RetryPolicy,
        settings: RelaySettings,
        retention: Retention,
    ) -> Self {
        let (owned, _) = tokio::sync::watch::channel(Vec::new());
        let busy = std::sync::Mutex::new(vec![Vec::new(); settings.workers as usize]);
        let mut loops: Vec<String> = (0..settings.workers)
            .map(|w| format!("worker {w}"))
            .collect();
        loops.push("partition keeper".to_owned());
        Self {
            store,
            publisher,
            policy,
            settings,
            retention,
            id: Uuid::new_v4(),
            owned,
            busy,
            draining: std::sync::Mutex::new(Vec::new()),
            heartbeats: Heartbeats::new(loops),
            observe: Observe::default(),
            suspects: Suspects::default(),
        }
    }

    /// Sets the health and metrics options.
    pub fn with_observe(mut self, observe: Observe) -> Self {
        self.observe = observe;
        self
    }

    /// `Ok` while every loop made progress within the stall timeout; otherwise the silent
    /// loops and for how long.
    pub fn liveness(&self) -> Result<(), String> {
        let stalled = self.heartbeats.stalled(self.observe.stall_timeout);
        if stalled.is_empty() {
            return Ok(());
        }
        Err(stalled
            .iter()
            .map(|(name, silent)| format!("{name} silent for {}s", silent.as_secs()))
            .collect::<Vec<_>>()
            .join(", "))
    }

    /// `Ok` when PostgreSQL answers a query and the broker connection is up; otherwise
    /// what is down.
    pub async fn readiness(&self) -> Result<(), Vec<String>> {
        let probe = Duration::from_secs(2);
        let (db, broker) = tokio::join!(
            tokio::time::timeout(probe, sqlx::query("SELECT 1").execute(self.store.pool())),
            self.publisher.health()
        );
        let mut problems = Vec::new();
        match db {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("PostgreSQL: {}", error_chain(&e))),
            Err(_) => problems.push(format!("PostgreSQL: no answer within {probe:?}")),
        }
        crate::metrics::broker_up(broker.is_ok());
        if let Err(e) = broker {
            problems.push(e);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// This relay instance's id (its partition leases and wake-up registration use it).
    pub fn id(&self) -> Uuid {
        self.id
    }

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

    /// Claims, publishes and settles one batch from `partitions` (as far as this relay holds
    /// them). Publishing stops early, leaving unconfirmed rows for later, if `abort` fires.
    pub async fn relay_once(
        &self,
        partitions: &[i16],
        abort: &CancellationToken,
    ) -> Result<BatchReport, RelayError> {
        self.batch(partitions, abort, &|| {}).await
    }

    /// [`Relay::relay_once`], calling `progress` at each message's outcome.
    async fn batch(
        &self,
        partitions: &[i16],
        abort: &CancellationToken,
        progress: &(dyn Fn() + Sync),
    ) -> Result<BatchReport, RelayError> {
        match self.publisher.ready().await {
            Ok(()) => {}
            Err(PublishError::Fatal(e)) => return Err(RelayError::Fatal(e)),
            Err(e) => {
                return Ok(BatchReport {
                    unavailable: Some(e.to_string()),
                    ..Default::default()
                })
            }
        }
        let started = std::time::Instant::now();
        let claim = self
            .store
            .claim(self.id, partitions, self.settings.batch_size, &[])
            .await?;
        if claim.is_empty() {
            return Ok(BatchReport::default());
        }
        let claimed = started.elapsed();
        let outcomes = self.publish_all(&claim.envelopes, abort, progress).await;
        let published = started.elapsed();
        let (settlement, mut report) = self.decide(&claim, &outcomes);
        let settled = self.settle_with_retries(&settlement).await?;
        crate::metrics::batch(
            report.claimed,
            claimed,
            started.elapsed().saturating_sub(published),
        );
        report.delivered = settled.delivered;
        report.not_owned = settlement.failed.len() as u64 - settled.failed;
        if report.not_owned > 0 {
            tracing::warn!(
                rows = report.not_owned,
                "partition taken over before failures were recorded; the new owner retries them"
            );
        }
        tracing::debug!(
            rows = report.claimed,
            delivered = report.delivered,
            claim_ms = claimed.as_secs_f64() * 1e3,
            publish_ms = (published - claimed).as_secs_f64() * 1e3,
            settle_ms = (started.elapsed() - published).as_secs_f64() * 1e3,
            "batch settled"
        );
        Ok(report)
    }

    /// Turns publish outcomes into a settlement: delivered, retried or dead (by the retry
    /// policy), or released.
    fn decide(
        &self,
        claim: &crate::store::Claim,
        outcomes: &BTreeMap<i64, Outcome>,
    ) -> (Settlement, BatchReport) {
        let mut report = BatchReport {
            claimed: claim.len(),
            ..Default::default()
        };
        let mut settlement = Settlement::default();
        for env in &claim.envelopes {
            match outcomes.get(&env.seq) {
                Some(Outcome::Delivered) => settlement.delivered.push(env.seq),
                Some(Outcome::Failed(e)) => match self.judge(env, e) {
                    Verdict::Failed(failure) => settlement.failed.push(failure),
                    Verdict::Released(e) => {
                        report.unavailable.get_or_insert_with(|| e.to_string());
                        report.released += 1;
                    }
                },
                None => report.released += 1,
            }
        }
        for m in &claim.malformed {
            settlement.failed.push(self.malformed(m));
        }
        report.retried = settlement
            .failed
            .iter()
            .filter(|f| f.retry_after.is_some())
            .count() as u64;
        report.dead = settlement.failed.len() as u64 - report.retried;
        (settlement, report)
    }

    /// What a failed publish of `env` comes to: a failure to record (retried later or dead,
    /// by the retry policy), or nothing to record (the broker was unavailable).
    pub(crate) fn judge(&self, env: &Envelope, error: &PublishError) -> Verdict {
        match error {
            PublishError::Rejected(error) => {
                let failures = env.attempts + 1;
                let retry_after = match self.policy.next(failures, &mut rand::rng()) {
                    Next::RetryAfter(d) => Some(d),
                    Next::Dead => None,
                };
                crate::metrics::failed(&env.topic, "rejected");
                match retry_after {
                    Some(_) => crate::metrics::retried(&env.topic),
                    None => crate::metrics::dead(&env.topic),
                }
                log_failure(env, failures, error, retry_after);
                Verdict::Failed(Failure {
                    seq: env.seq,
                    error: error.clone(),
                    retry_after,
                })
            }
            e @ (PublishError::Permanent(error) | PublishError::TooLarge(error)) => {
                let reason = match e {
                    PublishError::TooLarge(_) => "too_large",
                    _ => "permanent",
                };
                crate::metrics::failed(&env.topic, reason);
                crate::metrics::dead(&env.topic);
                log_failure(env, env.attempts + 1, error, None);
                Verdict::Failed(Failure {
                    seq: env.seq,
                    error: error.clone(),
                    retry_after: None,
                })
            }
            e @ (PublishError::Unavailable(_)
            | PublishError::Disconnected(_)
            | PublishError::Fatal(_)) => {
                crate::metrics::failed(&env.topic, "unavailable");
                Verdict::Released(e.clone())
            }
        }
    }

    /// The dead-letter record of a row that cannot be read (or whose payload is over
    /// `relay.max_payload`).
    pub(crate) fn malformed(&self, m: &crate::store::Malformed) -> Failure {
        crate::metrics::dead(&m.topic);
        let error = if let Some(reason) = m.error.strip_prefix(crate::store::TOO_LARGE) {
            crate::metrics::failed(&m.topic, "too_large");
            tracing::error!(seq = m.seq, topic = %m.topic, error = %reason, "outbox row too large; parking it as dead");
            format!("too large: {reason}")
        } else {
            crate::metrics::failed(&m.topic, "malformed");
            tracing::error!(seq = m.seq, topic = %m.topic, error = %m.error, "malformed outbox row; parking it as dead");
            format!("malformed row: {}", m.error)
        };
        Failure {
            seq: m.seq,
            error,
            retry_after: None,
        }
    }

    /// Publishes a batch: one chain per key (a message starts only after the previous one
    /// of its key is confirmed; a chain stops at its first failure), all chains at once.
    async fn publish_all(
        &self,
        envelopes: &[Envelope],
        abort: &CancellationToken,
        progress: &(dyn Fn() + Sync),
    ) -> BTreeMap<i64, Outcome> {
        let mut chains: BTreeMap<&str, Vec<&Envelope>> = BTreeMap::new();
        let mut unkeyed = Vec::new();
        for env in envelopes {
            match &env.key {
                Some(k) => chains.entry(k.as_str()).or_default().push(env),
                None => unkeyed.push(vec![env]),
            }
        }
        let outcomes = Mutex::new(BTreeMap::new());
        let record = |seq, outcome| {
            outcomes.lock().expect("lock poisoned").insert(seq, outcome);
        };
        let run = chains.into_values().chain(unkeyed).map(|chain| {
            let record = &record;
            async move {
                for env in chain {
                    let result = self.publish_one(env).await;
                    progress();
                    match result {
                        Ok(sent) => {
                            crate::metrics::published(&env.topic, sent, env.age());
                            record(env.seq, Outcome::Delivered)
                        }
                        Err(e) => {
                            record(env.seq, Outcome::Failed(e));
                            break;
                        }
                    }
                }
            }
        });
        tokio::select! {
            _ = join_all(run) => {}
            _ = abort.cancelled() => {
                tracing::warn!("shutdown grace period over; releasing unconfirmed messages");
            }
        }
        outcomes.into_inner().expect("lock poisoned")
    }

    /// True when `seq` is a suspect (see [`Suspects`]): it is to be published alone.
    pub(crate) fn is_suspect(&self, seq: i64) -> bool {
        self.suspects.is_suspect(seq)
    }

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
                    self.suspects.clear(seq);
                }
                Ok(done)
            }
            Err(PublishError::Disconnected(e)) if alone => Err(PublishError::Rejected(format!(
                "the broker failed this message while it was the only one in flight: {e}"
            ))),
            Err(PublishError::Disconnected(e)) => {
                self.suspects.suspect(seq);
                Err(PublishError::Disconnected(e))
            }
            Err(e) => {
                if alone && matches!(e, PublishError::Permanent(_) | PublishError::TooLarge(_)) {
                    self.suspects.clear(seq);
                }
                Err(e)
            }
        }
    }

    /// Publishes one message under the suspect rule (see [`Suspects`]); returns how long
    /// the broker took to confirm it.
    pub(crate) async fn publish_one(&self, env: &Envelope) -> Result<Duration, PublishError> {
        let suspect = self.suspects.is_suspect(env.seq);
        let (result, sent) = if suspect {
            let _alone = self.suspects.alone.write().await;
            tracing::info!(seq = env.seq, message_id = %env.id, "publishing a suspect message alone");
            let sent = std::time::Instant::now();
            (self.publisher.publish(env).await, sent.elapsed())
        } else {
            let _shared = self.suspects.alone.read().await;
            let sent = std::time::Instant::now();
            (self.publisher.publish(env).await, sent.elapsed())
        };
        self.under_suspicion(env.seq, suspect, result.map(|()| sent))
    }

    /// Settles, retrying while PostgreSQL is unreachable for up to one lease (after which
    /// the rows are another relay's to publish again).
    pub(crate) async fn settle_with_retries(
        &self,
        settlement: &Settlement,
    ) -> Result<crate::store::Settled, RelayError> {
        let deadline = tokio::time::Instant::now() + self.settings.lease;
        let mut backoff = Backoff::new(self.settings.reconnect_max_delay);
        loop {
            match self.store.settle(self.id, settlement).await {
                Ok(done) => return Ok(done),
                Err(e) if tokio::time::Instant::now() + backoff.peek() < deadline => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "settle failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs `workers` batch loops until `shutdown` fires, then lets in-flight batches
    /// finish for up to `shutdown_grace` and returns.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), RelayError> {
        let abort = CancellationToken::new();
        let wake = Arc::new(Wake::default());
        let mut tasks = JoinSet::new();
        if self.settings.listen {
            let waker = self.clone().wake_on_notify(wake.clone(), shutdown.clone());
            tasks.spawn(async move {
                waker.await;
                Ok(())
            });
        }
        // The leases are renewed until the workers have settled their last messages.
        let workers_done = CancellationToken::new();
        {
            let relay = self.clone();
            let (shutdown, done) = (shutdown.clone(), workers_done.clone());
            tasks.spawn(async move {
                relay.keep_partitions(shutdown, done).await;
                Ok(())
            });
        }
        {
            let relay = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                relay.purge_expired(shutdown).await;
                Ok(())
            });
        }
        {
            let relay = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                relay.keep_held_back(shutdown).await;
                Ok(())
            });
        }
        if let Some(every) = self.observe.backlog_interval {
            let relay = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                relay.observe_backlog(every, shutdown).await;
                Ok(())
            });
        }
        let running = Arc::new(AtomicUsize::new(self.settings.workers as usize));
        for worker in 0..self.settings.workers {
            let relay = self.clone();
            let (wake, shutdown, abort) = (wake.clone(), shutdown.clone(), abort.clone());
            let (running, done) = (running.clone(), workers_done.clone());
            tasks.spawn(async move {
                let result = crate::pipeline::run(&relay, worker, &wake, shutdown, abort).await;
                if running.fetch_sub(1, Ordering::SeqCst) == 1 {
                    done.cancel();
                }
                result
            });
        }
        tracing::info!(relay_id = %self.id, workers = self.settings.workers, "relay running");

        let grace = self.settings.shutdown_grace;
        let mut result = Ok(());
        let mut grace_timer = std::pin::pin!(async {
            shutdown.cancelled().await;
            tracing::info!(grace = ?grace, "shutting down: no new claims, waiting for in-flight publishes");
            tokio::time::sleep(grace).await;
        });
        let mut grace_over = false;
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        result = Err(e);
                        shutdown.cancel();
                        abort.cancel();
                    }
                    Some(Err(join)) => {
                        let what = panic_message(join);
                        tracing::error!(error = %what, "relay task panicked; stopping");
                        if result.is_ok() {
                            result = Err(RelayError::Panicked(what));
                        }
                        shutdown.cancel();
                        // A worker that panicked never says it is done.
                        workers_done.cancel();
                    }
                },
                _ = &mut grace_timer, if !grace_over => {
                    grace_over = true;
                    abort.cancel();
                }
            }
        }
        self.publisher.close().await;
        match self.store.release_all(self.id).await {
            Ok(()) => tracing::info!("relay stopped; partitions released"),
            Err(e) => {
                tracing::warn!(error = %e, "relay stopped; partitions not released, they expire after relay.lease")
            }
        }
        result
    }

    /// Purges `delivered` and `discarded` records past their retention windows once;
    /// returns how many of each went.
    pub async fn purge(&self) -> Result<(u64, u64), RelayError> {
        Ok(self.store.purge(self.retention).await?)
    }

    /// Purges expired `delivered` and `discarded` records every `retention.purge_interval`.
    async fn purge_expired(self: Arc<Self>, shutdown: CancellationToken) {
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
    async fn keep_held_back(self: Arc<Self>, shutdown: CancellationToken) {
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
    async fn observe_backlog(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
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

    /// Renews the partition leases every third of a lease, and rebalances; once shutting
    /// down, only renews them, until the workers are `done`.
    async fn keep_partitions(
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

    /// LISTENs for inserts. While a worker is idle this relay is registered in
    /// `relay_waiters`, so producers' inserts send a NOTIFY; while all are busy it is not,
    /// so producers' commits do not pay for NOTIFY.
    async fn wake_on_notify(self: Arc<Self>, wake: Arc<Wake>, shutdown: CancellationToken) {
        /// After registering, how soon the workers look once more.
        const RECHECK: Duration = Duration::from_millis(50);
        let channel = self.store.schema().wakeup_channel();
        let mut backoff = Backoff::new(self.settings.reconnect_max_delay);
        let ttl = self.settings.poll_interval * 3;
        'connect: while !shutdown.is_cancelled() {
            let mut listener = match sqlx::postgres::PgListener::connect_with(self.store.pool())
                .await
            {
                Ok(l) => l,
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot LISTEN for wake-ups; polling meanwhile");
                    tokio::select! { _ = tokio::time::sleep(wait) => continue, _ = shutdown.cancelled() => break }
                }
            };
            if let Err(e) = listener.listen(&channel).await {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "cannot LISTEN for wake-ups; polling meanwhile");
                tokio::select! { _ = tokio::time::sleep(wait) => continue, _ = shutdown.cancelled() => break }
            }
            backoff.reset();
            let mut registered = false;
            let mut recheck: Option<tokio::time::Instant> = None;
            let mut tick = tokio::time::interval(self.settings.poll_interval);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'connect,
                    received = listener.try_recv() => match received {
                        Ok(Some(_)) => {
                            wake.notify.notify_waiters();
                            if registered && self.store.remove_waiter(self.id).await.is_ok() {
                                registered = false;
                            }
                        }
                        Ok(None) | Err(_) => {
                            // Connection lost: anything may have been missed.
                            wake.notify.notify_waiters();
                            continue 'connect;
                        }
                    },
                    _ = wake.some_idle.notified(), if !registered => {
                        if self.store.register_waiter(self.id, ttl).await.is_ok() {
                            registered = true;
                            // Rows committed before the registration sent no NOTIFY; nor did
                            // a commit whose trigger ran just before it and was still being
                            // flushed: look again now, and once more shortly.
                            wake.notify.notify_waiters();
                            recheck = Some(tokio::time::Instant::now() + RECHECK);
                        }
                    }
                    _ = tokio::time::sleep_until(recheck.unwrap_or_else(tokio::time::Instant::now)), if recheck.is_some() => {
                        recheck = None;
                        wake.notify.notify_waiters();
                    }
                    _ = tick.tick() => {
                        if registered {
                            let refreshed = if wake.is_any_idle() {
                                self.store.register_waiter(self.id, ttl).await
                            } else {
                                self.store.remove_waiter(self.id).await.map(|()| registered = false)
                            };
                            if let Err(e) = refreshed {
                                tracing::debug!(error = %e, "wake-up registration not refreshed");
                            }
                        }
                    }
                }
            }
        }
        let _ = self.store.remove_waiter(self.id).await;
    }
}

/// Wake-up plumbing between the workers and the LISTEN task. The relay is registered for
/// wake-ups while any of its workers is idle, so an idle worker is woken within
/// milliseconds even while the others are busy.
#[derive(Default)]
pub(crate) struct Wake {
    pub(crate) notify: Notify,
    some_idle: Notify,
    idle: AtomicUsize,
}

impl Wake {
    pub(crate) fn went_idle(&self) {
        if self.idle.fetch_add(1, Ordering::SeqCst) == 0 {
            self.some_idle.notify_one();
        }
    }

    pub(crate) fn busy(&self) {
        self.idle.fetch_sub(1, Ordering::SeqCst);
    }

    fn is_any_idle(&self) -> bool {
        self.idle.load(Ordering::SeqCst) > 0
    }
}

fn log_failure(env: &Envelope, failures: u32, error: &str, retry_after: Option<Duration>) {
    match retry_after {
        Some(d) => tracing::warn!(
            seq = env.seq, message_id = %env.id, topic = %env.topic, key = ?env.key,
            attempts = failures, retry_in = ?d, error = %error, "publish failed; will retry"
        ),
        None => tracing::error!(
            seq = env.seq, message_id = %env.id, topic = %env.topic, key = ?env.key,
            attempts = failures, error = %error, "publish failed; message is dead"
        ),
    }
}

/// What a panicked task said, if it said it with a string.
fn panic_message(join: tokio::task::JoinError) -> String {
    if !join.is_panic() {
        return join.to_string();
    }
    let payload = join.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// An error and its sources on one line; a source whose text the line already holds (many
/// errors repeat their source's message in their own) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Capped exponential backoff with full jitter for reconnect loops.
#[derive(Debug)]
pub struct Backoff {
    current: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(100);

    /// Starts at 100 ms and doubles up to `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            current: Self::START.min(max),
            max,
        }
    }

    /// The next ceiling without advancing.
    pub fn peek(&self) -> Duration {
        self.current
    }

    /// A delay between half the current ceiling and the ceiling; then doubles the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the start after a success.
    pub fn reset(&mut self) {
        self.current = Self::START.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("invalid peer certificate: UnknownIssuer")]
        struct Verdict;
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Repeats(#[source] Verdict);
        #[derive(Debug, thiserror::Error)]
        #[error("TLS handshake failed")]
        struct Context(#[source] Repeats);
        assert_eq!(
            error_chain(&Repeats(Verdict)),
            "invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(
            error_chain(&Context(Repeats(Verdict))),
            "TLS handshake failed: invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let waits: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(waits[0] <= Duration::from_millis(100));
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(1)),
            "{waits:?}"
        );
        assert!(
            waits[9] >= Duration::from_millis(500),
            "capped delays stay near the cap: {waits:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
