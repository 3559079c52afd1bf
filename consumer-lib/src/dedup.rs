//! The handling step: dedup row and handler writes in one transaction.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{
    future::BoxFuture,
    stream::{BoxStream, StreamExt, TryStreamExt},
};
use outbox::{migrate::Migration, Schema};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{ConsumerError, HandlerError, Incoming};

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_consumer.sql",
        sql: include_str!("../migrations/0001_consumer.sql"),
    },
    Migration {
        version: 2,
        name: "0002_replay.sql",
        sql: include_str!("../migrations/0002_replay.sql"),
    },
];

/// The newest consumer schema version this library ships.
pub const CONSUMER_SCHEMA_VERSION: i32 = 2;

/// Creates the consumer schema `schema` and applies pending migrations (version
/// [`CONSUMER_SCHEMA_VERSION`]); what [`Deduplicator::migrate`] does, without a group.
/// Returns the versions applied by this call.
pub async fn migrate(pool: &PgPool, schema: &Schema) -> Result<Vec<i32>, ConsumerError> {
    let mut conn = pool.acquire().await?;
    Ok(outbox::migrate::apply(&mut conn, schema, MIGRATIONS).await?)
}

/// Namespace of the ids derived from content ([`MissingId::DeriveFromContent`]).
const DERIVED_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f75_7462_6f78_2d63_6f6e_7375_6d65_7200);

/// A message handler. It receives the open transaction: write the message's effects through
/// it (`&mut *tx`), and they commit together with the dedup row, or not at all.
pub trait Handler: Send + Sync {
    /// Handles one message inside `tx`.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// What to do with a message that carries no message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingId {
    /// Park it in `dead_letters` and acknowledge it (the default): it is never handled
    /// without dedup.
    #[default]
    DeadLetter,
    /// Dedup on a UUIDv5 of its source, key and payload: two deliveries of the same bytes
    /// count as one message (so two genuinely different messages with the same bytes do too).
    DeriveFromContent,
}

/// Retries of retryable handler failures: `initial × factor^(n-1)`, capped, then dead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failure. Default 200 ms.
    pub initial_delay: Duration,
    /// Growth per failure. Default 2.
    pub factor: f64,
    /// Cap on the delay. Default 30 s.
    pub max_delay: Duration,
    /// Failed attempts after which the message is dead-lettered. Default 5.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(200),
            factor: 2.0,
            max_delay: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// The delay after `failures` failed attempts (≥ 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let secs = self.initial_delay.as_secs_f64()
            * self
                .factor
                .powi(failures.saturating_sub(1).min(1024) as i32);
        Duration::from_secs_f64(secs.min(self.max_delay.as_secs_f64()))
    }
}

/// What happened to one delivery. Every outcome but [`Outcome::Retry`] means "acknowledge".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and its writes committed with the dedup row.
    Processed,
    /// Already processed by this group: skipped.
    Duplicate,
    /// Parked in `dead_letters` with this error.
    DeadLettered {
        /// Why.
        error: String,
    },
    /// A retryable failure: handle it again after `delay`.
    Retry {
        /// Failed attempts so far.
        attempts: u32,
        /// How long to wait.
        delay: Duration,
        /// The handler's error.
        error: String,
    },
}

impl Outcome {
    /// True when the delivery may be acknowledged.
    pub fn is_settled(&self) -> bool {
        !matches!(self, Outcome::Retry { .. })
    }
}

/// Running totals of what a [`Deduplicator`] and its clones did, for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Deliveries whose handler ran and committed.
    pub processed: u64,
    /// Deliveries skipped as already processed (redeliveries absorbed).
    pub duplicates: u64,
    /// Messages parked in `dead_letters`.
    pub dead_lettered: u64,
    /// Retryable handler failures (each one rolled back and to be tried again).
    pub retries: u64,
    /// Dead letters replayed: the handler ran again and committed.
    pub replayed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    processed: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    retries: AtomicU64,
    pub(crate) replayed: AtomicU64,
}

impl Counters {
    fn count(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Processed => &self.processed,
            Outcome::Duplicate => &self.duplicates,
            Outcome::DeadLettered { .. } => &self.dead_lettered,
            Outcome::Retry { .. } => &self.retries,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Handles messages for one consumer group with dedup. Cheap to clone; clones share their
/// [`Stats`].
#[derive(Debug, Clone)]
pub struct Deduplicator {
    pub(crate) pool: PgPool,
    pub(crate) schema: Schema,
    pub(crate) group: String,
    missing_id: MissingId,
    retry: RetryPolicy,
    pub(crate) replay_interval: Duration,
    pub(crate) counters: Arc<Counters>,
    batch: usize,
}

impl Deduplicator {
    /// A deduplicator for `group` with its tables in the schema `outbox_consumer`.
    pub fn new(pool: PgPool, group: impl Into<String>) -> Result<Self, ConsumerError> {
        let group = group.into();
        if group.is_empty() || group.len() > 255 {
            return Err(ConsumerError::InvalidGroup(group));
        }
        Ok(Self {
            pool,
            schema: Schema::parse("outbox_consumer").expect("a valid name"),
            group,
            missing_id: MissingId::default(),
            retry: RetryPolicy::default(),
            replay_interval: Duration::from_secs(5),
            counters: Arc::default(),
            batch: 1,
        })
    }

    /// Lets the sources handle up to `max` deliveries of one lane (a RabbitMQ key, a Kafka
    /// partition) that are already waiting in one transaction, with one commit: see
    /// [`Deduplicator::handle_batch`]. Default 1 (each delivery its own transaction). Only
    /// for handlers whose effects all go through the transaction: when one message of a
    /// batch fails, the batch is rolled back and its messages are handled one at a time, so
    /// the others' handlers run again.
    pub fn with_batch(mut self, max: usize) -> Self {
        self.batch = max.max(1);
        self
    }

    /// The most deliveries handled in one transaction ([`Deduplicator::with_batch`]).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Keeps the tables in `schema` instead of `outbox_consumer`.
    pub fn with_schema(mut self, schema: Schema) -> Self {
        self.schema = schema;
        self
    }

    /// What to do with messages without an id (default: dead-letter them).
    pub fn with_missing_id(mut self, policy: MissingId) -> Self {
        self.missing_id = policy;
        self
    }

    /// Retries of retryable failures (default: [`RetryPolicy::default`]).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How often a running source ([`Deduplicator::serve_replays`]) looks for dead letters an
    /// operator asked to replay. Default 5 s; zero turns the search off (then replay with
    /// [`Deduplicator::replay_requested`] or [`Deduplicator::replay_dead_letters`] yourself).
    pub fn with_replay_interval(mut self, every: Duration) -> Self {
        self.replay_interval = every;
        self
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// What this deduplicator and its clones did so far.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            processed: c.processed.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
        }
    }

    /// Creates the consumer schema and applies pending migrations (version
    /// [`CONSUMER_SCHEMA_VERSION`]).
    pub async fn migrate(&self) -> Result<Vec<i32>, ConsumerError> {
        migrate(&self.pool, &self.schema).await
    }

    /// Handles one delivery: records the id, runs `handler` in the same transaction,
    /// commits. Acknowledge the delivery only when the outcome [`Outcome::is_settled`]; a
    /// database error means "do not acknowledge".
    ///
    /// Two concurrent deliveries of one message serialise on the dedup row: the second
    /// waits for the first transaction and then sees a duplicate (or, if the first rolled
    /// back, handles it).
    pub async fn handle<H: Handler + ?Sized>(
        &self,
        message: &Incoming,
        handler: &H,
    ) -> Result<Outcome, ConsumerError> {
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "handle",
            group = %self.group,
            source = %message.source,
            message_id = tracing::field::Empty,
            traceparent = message.traceparent().unwrap_or(""),
        );
        #[cfg(feature = "opentelemetry")]
        crate::trace::adopt_remote_parent(&span, &message.headers);
        async {
            let id = match (message.message_id, self.missing_id) {
                (Some(id), _) => id,
                (None, MissingId::DeriveFromContent) => derived_id(message),
                (None, MissingId::DeadLetter) => {
                    let error = format!(
                        "message from {} has no {} header; dead-lettered instead of handled without dedup",
                        message.source,
                        crate::MESSAGE_ID_HEADER
                    );
                    self.dead_letter(message, None, &error, 0).await?;
                    return Ok(Outcome::DeadLettered { error });
                }
            };
            tracing::Span::current().record("message_id", tracing::field::display(id));
            let mut tx = self.pool.begin().await?;
            if !self.claim(&mut tx, id).await? {
                tx.rollback().await?;
                tracing::debug!("duplicate delivery skipped");
                return Ok(Outcome::Duplicate);
            }
            match handler.handle(&mut tx, message).await {
                Ok(()) => {
                    tx.commit().await?;
                    Ok(Outcome::Processed)
                }
                Err(e) => {
                    tx.rollback().await?;
                    let error = e.to_string();
                    let attempts = self.record_attempt(id, &error).await?;
                    match e {
                        HandlerError::Retryable(_) if attempts < self.retry.max_attempts => {
                            let delay = self.retry.delay(attempts);
                            tracing::warn!(attempts, retry_in = ?delay, error = %error, "handler failed; will retry");
                            Ok(Outcome::Retry { attempts, delay, error })
                        }
                        _ => {
                            tracing::error!(attempts, error = %error, "handler failed; dead-lettering the message");
                            self.dead_letter(message, Some(id), &error, attempts).await?;
                            Ok(Outcome::DeadLettered { error })
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
        .inspect(|outcome| {
            self.counters.count(outcome);
            #[cfg(feature = "metrics")]
            crate::metrics::record(&self.group, outcome, started.elapsed());
        })
    }

    /// Handles several deliveries, in order, in one transaction: each is claimed as in
    /// [`Deduplicator::handle`] (a duplicate is skipped) and its handler runs; one commit
    /// settles them all, and the outcomes are in the order given. Returns `None`, with
    /// nothing changed, when one of them cannot be handled this way (it has no id and is to
    /// be dead-lettered, or its handler failed, or the database refused the batch): handle
    /// them one at a time then, with [`Deduplicator::handle_until_settled`], so that a
    /// failure is retried and counted for its own message only.
    pub async fn handle_batch<H: Handler + ?Sized>(
        &self,
        messages: &[Incoming],
        handler: &H,
    ) -> Result<Option<Vec<Outcome>>, ConsumerError> {
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let mut ids = Vec::with_capacity(messages.len());
        for m in messages {
            match (m.message_id, self.missing_id) {
                (Some(id), _) => ids.push(id),
                (None, MissingId::DeriveFromContent) => ids.push(derived_id(m)),
                (None, MissingId::DeadLetter) => return Ok(None),
            }
        }
        let span =
            tracing::info_span!("handle_batch", group = %self.group, messages = messages.len());
        let outcomes = async {
            let mut tx = self.pool.begin().await?;
            let mut outcomes = Vec::with_capacity(messages.len());
            for (message, id) in messages.iter().zip(&ids) {
                if !self.claim(&mut tx, *id).await? {
                    outcomes.push(Outcome::Duplicate);
                    continue;
                }
                let span = tracing::info_span!(
                    "handle",
                    group = %self.group,
                    source = %message.source,
                    message_id = %id,
                    traceparent = message.traceparent().unwrap_or(""),
                );
                #[cfg(feature = "opentelemetry")]
                crate::trace::adopt_remote_parent(&span, &message.headers);
                if let Err(e) = handler.handle(&mut tx, message).instrument(span).await {
                    tracing::debug!(message_id = %id, error = %e, "handler failed in a batch; handling the batch one message at a time");
                    tx.rollback().await?;
                    return Ok::<_, sqlx::Error>(None);
                }
                outcomes.push(Outcome::Processed);
            }
            tx.commit().await?;
            Ok(Some(outcomes))
        }
        .instrument(span)
        .await;
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::debug!(error = %e, "batch refused by the database; handling it one message at a time");
                None
            }
        };
        for outcome in outcomes.iter().flatten() {
            self.counters.count(outcome);
            #[cfg(feature = "metrics")]
            crate::metrics::record(&self.group, outcome, started.elapsed());
        }
        Ok(outcomes)
    }

    /// Handles one delivery until it is settled: retryable failures are retried in place
    /// after their backoff, database errors after a capped backoff of their own (the
    /// database may be restarting). Returns the settled outcome; acknowledge then. This is
    /// what the sources do for every delivery, and what a service with its own broker client
    /// can call.
    pub async fn handle_until_settled<H: Handler + ?Sized>(
        &self,
        message: &Incoming,
        handler: &H,
    ) -> Outcome {
        self.handle_until_settled_or_stopped(message, handler, &CancellationToken::new())
            .await
            .expect("a token nobody cancels never stops the loop")
    }

    /// [`Deduplicator::handle_until_settled`], but gives up while waiting to retry once
    /// `stop` fires (shutdown, a revoked partition): returns `None`, and the delivery must
    /// not be acknowledged, so the broker delivers it again. An attempt under way is always
    /// finished (committed or rolled back), never cut off.
    pub async fn handle_until_settled_or_stopped<H: Handler + ?Sized>(
        &self,
        message: &Incoming,
        handler: &H,
        stop: &CancellationToken,
    ) -> Option<Outcome> {
        let mut db_backoff = outbox::Backoff::new(Duration::from_secs(10));
        loop {
            let wait = match self.handle(message, handler).await {
                Ok(Outcome::Retry { delay, .. }) => delay,
                Ok(outcome) => return Some(outcome),
                Err(e) => {
                    let wait = db_backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "handling failed on the database; retrying");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return None,
            }
        }
    }

    /// Claims message `id` in `tx` and clears its earlier failed attempts, in one round
    /// trip: both stand only if the transaction commits. False: processed already.
    async fn claim(&self, tx: &mut PgConnection, id: Uuid) -> Result<bool, sqlx::Error> {
        let s = &self.schema;
        Ok(sqlx::query(&format!(
            "WITH cleared AS (
                 DELETE FROM {s}.attempts WHERE consumer_group = $1 AND message_id = $2
             )
             INSERT INTO {s}.processed (consumer_group, message_id) VALUES ($1, $2)
             ON CONFLICT DO NOTHING"
        ))
        .bind(&self.group)
        .bind(id)
        .execute(tx)
        .await?
        .rows_affected()
            == 1)
    }

    async fn record_attempt(&self, id: Uuid, error: &str) -> Result<u32, sqlx::Error> {
        let attempts: i32 = sqlx::query_scalar(&format!(
            "INSERT INTO {}.attempts (consumer_group, message_id, attempts, last_error) VALUES ($1, $2, 1, $3)
             ON CONFLICT (consumer_group, message_id)
             DO UPDATE SET attempts = attempts.attempts + 1, last_error = EXCLUDED.last_error, updated_at = now()
             RETURNING attempts",
            self.schema
        ))
        .bind(&self.group)
        .bind(id)
        .bind(error)
        .fetch_one(&self.pool)
        .await?;
        Ok(attempts.max(0) as u32)
    }

    /// Parks the message and marks it processed (as dead-lettered, which a replay may turn
    /// into handled), in one transaction.
    async fn dead_letter(
        &self,
        m: &Incoming,
        id: Option<Uuid>,
        error: &str,
        attempts: u32,
    ) -> Result<(), sqlx::Error> {
        let s = &self.schema;
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO {s}.dead_letters (consumer_group, message_id, source, key, payload, headers, error, attempts)
             VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)"
        ))
        .bind(&self.group)
        .bind(id)
        .bind(&m.source)
        .bind(m.key.as_deref())
        .bind(&m.payload)
        .bind(serde_json::to_string(&m.headers).expect("a map of strings serialises"))
        .bind(error)
        .bind(attempts as i32)
        .execute(&mut *tx)
        .await?;
        if let Some(id) = id {
            // A row already there stays as it is: if a handler committed it meanwhile (a
            // concurrent delivery), the message counts as handled, and a replay of this letter
            // finds it a duplicate.
            sqlx::query(&format!(
                "INSERT INTO {s}.processed (consumer_group, message_id, dead_lettered) VALUES ($1, $2, true)
                 ON CONFLICT DO NOTHING"
            ))
            .bind(&self.group)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "DELETE FROM {s}.attempts WHERE consumer_group = $1 AND message_id = $2"
            ))
            .bind(&self.group)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Deletes this group's `processed` rows older than `older_than`, `batch` rows per
    /// statement. Returns how many went. `older_than` must exceed the broker's redelivery
    /// horizon, or a late redelivery is handled again.
    pub async fn purge(&self, older_than: Duration, batch: u32) -> Result<u64, ConsumerError> {
        let sql = format!(
            "DELETE FROM {s}.processed WHERE (consumer_group, message_id) IN (
                 SELECT consumer_group, message_id FROM {s}.processed
                 WHERE consumer_group = $1 AND processed_at < now() - make_interval(secs => $2)
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)",
            s = self.schema
        );
        let mut total = 0;
        loop {
            let n = sqlx::query(&sql)
                .bind(&self.group)
                .bind(older_than.as_secs_f64())
                .bind(i64::from(batch.max(1)))
                .execute(&self.pool)
                .await?
                .rows_affected();
            total += n;
            if n < u64::from(batch.max(1)) {
                return Ok(total);
            }
        }
    }
}

/// The dedup rows and groups of one consumer schema, read only: what an auditor compares
/// with the producers' records (`outbox-relay reconcile` does). It reads `processed` and the
/// `consumer_group` column of `dead_letters`, and a version 1 schema as well as a newer one.
#[derive(Debug, Clone)]
pub struct DedupRecords {
    pool: PgPool,
    schema: Schema,
    /// A group's handled messages within a time of now; see [`DedupRecords::handled_since`].
    handled_since: String,
}

impl DedupRecords {
    /// The records of `schema` in `pool`'s database, or `None` when it holds no consumer
    /// schema of that name (no `processed` or no `dead_letters` table).
    pub async fn open(pool: PgPool, schema: Schema) -> Result<Option<Self>, ConsumerError> {
        let (present, v2): (bool, bool) = sqlx::query_as(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_attribute
                            WHERE attrelid = to_regclass($1) AND attname = 'dead_lettered'
                              AND NOT attisdropped)",
        )
        .bind(format!("{schema}.processed"))
        .bind(format!("{schema}.dead_letters"))
        .fetch_one(&pool)
        .await?;
        if !present {
            return Ok(None);
        }
        // Version 1 schemas have no such column; their dedup rows all count.
        let handled = if v2 { "NOT dead_lettered" } else { "true" };
        let handled_since = format!(
            "SELECT message_id, {} FROM {schema}.processed
             WHERE consumer_group = $1 AND processed_at >= now() - make_interval(secs => $2)
               AND {handled}",
            crate::letters::utc("processed_at"),
        );
        Ok(Some(Self {
            pool,
            schema,
            handled_since,
        }))
    }

    /// The consumer schema read.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Every group with a dedup row (found with one index probe per group) or a dead
    /// letter, in name order.
    pub async fn groups(&self) -> Result<Vec<String>, ConsumerError> {
        let schema = &self.schema;
        Ok(sqlx::query_scalar(&format!(
            "WITH RECURSIVE g AS (
                 (SELECT consumer_group FROM {schema}.processed ORDER BY consumer_group LIMIT 1)
                 UNION ALL
                 SELECT (SELECT p.consumer_group FROM {schema}.processed p
                         WHERE p.consumer_group > g.consumer_group
                         ORDER BY p.consumer_group LIMIT 1)
                 FROM g WHERE g.consumer_group IS NOT NULL
             )
             SELECT consumer_group FROM g WHERE consumer_group IS NOT NULL
             UNION
             SELECT DISTINCT consumer_group FROM {schema}.dead_letters
             ORDER BY 1"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// The messages `group` handled within `since` of now (not those it dead-lettered), as
    /// they are read: each message id, and when its dedup row was written (UTC, RFC 3339).
    pub fn handled_since<'a>(
        &'a self,
        group: &'a str,
        since: Duration,
    ) -> BoxStream<'a, Result<(Uuid, String), ConsumerError>> {
        sqlx::query_as(&self.handled_since)
            .bind(group)
            .bind(since.as_secs_f64())
            .fetch(&self.pool)
            .map_err(ConsumerError::from)
            .boxed()
    }

    /// Those of `ids` that `group` has no dedup row for: neither handled nor dead-lettered.
    pub async fn without_row(&self, group: &str, ids: &[Uuid]) -> Result<Vec<Uuid>, ConsumerError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT u.id FROM unnest($1::uuid[]) AS u(id)
             WHERE NOT EXISTS (SELECT 1 FROM {}.processed p
                               WHERE p.consumer_group = $2 AND p.message_id = u.id)",
            self.schema
        ))
        .bind(ids)
        .bind(group)
        .fetch_all(&self.pool)
        .await?)
    }
}

pub(crate) fn derived_id(m: &Incoming) -> Uuid {
    let mut name = Vec::with_capacity(m.source.len() + m.payload.len() + 64);
    name.extend_from_slice(m.source.as_bytes());
    name.push(0);
    name.extend_from_slice(m.key.as_deref().unwrap_or("").as_bytes());
    name.push(0);
    name.extend_from_slice(&m.payload);
    Uuid::new_v5(&DERIVED_ID_NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_cap() {
        let p = RetryPolicy {
            initial_delay: Duration::from_millis(100),
            factor: 2.0,
            max_delay: Duration::from_millis(350),
            max_attempts: 9,
        };
        let d: Vec<u128> = (1..=4).map(|n| p.delay(n).as_millis()).collect();
        assert_eq!(d, [100, 200, 350, 350]);
    }

    #[test]
    fn derived_ids_depend_on_content_only() {
        let m = |p: &[u8]| Incoming::new("q", p.to_vec(), Default::default());
        assert_eq!(derived_id(&m(b"a")), derived_id(&m(b"a")));
        assert_ne!(derived_id(&m(b"a")), derived_id(&m(b"b")));
    }
}
