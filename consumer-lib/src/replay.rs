//! Replaying dead letters through the dedup step, so that a replay never applies an effect
//! twice.
//!
//! One replay is one transaction that
//!
//! 1. locks the letter (`FOR UPDATE SKIP LOCKED`: two consumers of a group never replay one
//!    letter at once, and a discard waits for it);
//! 2. claims the message's dedup row: a row that dead-lettering wrote is turned into a handled
//!    one, a missing row (purged) is inserted; a row that a committed handler wrote means the
//!    message was handled already — the letter settles as `duplicate` and the handler does not
//!    run;
//! 3. runs the handler (inside a savepoint) with the parked payload and headers;
//! 4. on success moves the letter to `settled_letters` as `replayed` and commits, together
//!    with the handler's writes; on failure rolls the handler back to the savepoint and
//!    leaves the letter parked with the new error, one more attempt, and no pending request.
//!
//! A message parked without an id (see [`crate::MissingId`]) is deduplicated on the id derived
//! from its content, as [`crate::MissingId::DeriveFromContent`] would have.

use std::collections::BTreeMap;

use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    dedup::derived_id,
    letters::{bind, LetterFilter, WHERE},
    ConsumerError, Deduplicator, Handler, Incoming,
};

/// What a replay of one letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The letter's number.
    pub letter: i64,
    /// The message id (`None` for a message that carried none).
    pub message_id: Option<Uuid>,
    /// What happened.
    pub outcome: ReplayOutcome,
}

/// What happened to a replayed letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// The handler ran and its writes committed with the dedup row; the letter is settled as
    /// `replayed`.
    Processed,
    /// The message had been handled already; the handler did not run again, and the letter
    /// is settled as `duplicate`.
    Duplicate,
    /// The handler failed again: the letter stays parked with this error.
    Failed {
        /// The handler's error.
        error: String,
    },
}

#[derive(sqlx::FromRow)]
struct LetterRow {
    message_id: Option<Uuid>,
    source: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: String,
}

impl Deduplicator {
    /// Replays this group's dead letters that match `filter`, now, one at a time in letter
    /// order, through the dedup step (see the module docs of `replay.rs`): the effect of a
    /// message happens once however often it is replayed. A letter being replayed by someone
    /// else at this moment is skipped. Refuses an unnarrowed filter without `all`; a filter
    /// naming another group matches nothing.
    pub async fn replay_dead_letters<H: Handler + ?Sized>(
        &self,
        filter: &LetterFilter,
        handler: &H,
    ) -> Result<Vec<Replay>, ConsumerError> {
        filter.check_selection()?;
        if filter.group.as_deref().is_some_and(|g| g != self.group) {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id FROM {}.dead_letters WHERE {WHERE} AND consumer_group = $9 ORDER BY id",
            self.schema
        );
        let ids: Vec<(i64,)> = bind(sqlx::query_as(&sql), filter)
            .bind(&self.group)
            .fetch_all(&self.pool)
            .await?;
        let mut done = Vec::with_capacity(ids.len());
        for (id,) in ids {
            if let Some(r) = self.replay_letter(id, false, handler).await? {
                done.push(r);
            }
        }
        Ok(done)
    }

    /// Replays every letter of this group that an operator asked to replay
    /// (`outbox-consumer dead replay`, [`crate::DeadLetters::request_replay`]), as
    /// [`Deduplicator::replay_dead_letters`] does. Returns what it did.
    pub async fn replay_requested<H: Handler + ?Sized>(
        &self,
        handler: &H,
    ) -> Result<Vec<Replay>, ConsumerError> {
        let sql = format!(
            "SELECT id FROM {}.dead_letters
             WHERE consumer_group = $1 AND replay_requested_at IS NOT NULL AND id > $2
             ORDER BY id LIMIT 100",
            self.schema
        );
        let mut done = Vec::new();
        let mut after = 0i64;
        loop {
            let ids: Vec<(i64,)> = sqlx::query_as(&sql)
                .bind(&self.group)
                .bind(after)
                .fetch_all(&self.pool)
                .await?;
            let Some(&(last,)) = ids.last() else {
                return Ok(done);
            };
            for (id,) in ids {
                if let Some(r) = self.replay_letter(id, true, handler).await? {
                    done.push(r);
                }
            }
            after = last;
        }
    }

    /// Replays requested letters every [`Deduplicator::with_replay_interval`] until `stop`
    /// fires (a replay under way is finished first). The RabbitMQ and Kafka sources run this
    /// next to their lanes; a service with its own broker client runs it itself. Database
    /// errors are logged and tried again at the next interval. Returns at once when the
    /// interval is zero.
    pub async fn serve_replays<H: Handler + ?Sized>(&self, handler: &H, stop: CancellationToken) {
        let every = self.replay_interval;
        if every.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = self.replay_requested(handler).await {
                tracing::warn!(
                    group = %self.group, error = %crate::error::chain(&e), retry_in = ?every,
                    "looking for dead letters to replay failed (is the consumer schema at version {}?)",
                    crate::CONSUMER_SCHEMA_VERSION
                );
            }
        }
    }

    /// Spawns [`Deduplicator::serve_replays`] for a source, unless the interval is zero.
    #[cfg(any(feature = "rabbitmq", feature = "kafka"))]
    pub(crate) fn spawn_replays<H: Handler + 'static>(
        &self,
        handler: std::sync::Arc<H>,
        stop: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.replay_interval.is_zero() {
            return None;
        }
        let dedup = self.clone();
        Some(tokio::spawn(async move {
            dedup.serve_replays(handler.as_ref(), stop).await
        }))
    }

    /// Replays letter `id` of this group if it is there and not locked by another replay
    /// (and, with `requested`, only if a replay was asked for). `None` when it was skipped.
    async fn replay_letter<H: Handler + ?Sized>(
        &self,
        id: i64,
        requested: bool,
        handler: &H,
    ) -> Result<Option<Replay>, ConsumerError> {
        let span = tracing::info_span!(
            "replay",
            group = %self.group,
            letter = id,
            message_id = tracing::field::Empty
        );
        async {
            let s = &self.schema;
            let mut tx = self.pool.begin().await?;
            let row: Option<LetterRow> = sqlx::query_as(&format!(
                "SELECT message_id, source, key, payload, headers::text AS headers
                 FROM {s}.dead_letters
                 WHERE id = $1 AND consumer_group = $2 AND (NOT $3 OR replay_requested_at IS NOT NULL)
                 FOR UPDATE SKIP LOCKED"
            ))
            .bind(id)
            .bind(&self.group)
            .bind(requested)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                tx.rollback().await?;
                return Ok(None);
            };
            let message = incoming(&row);
            let done = |outcome| {
                Ok(Some(Replay {
                    letter: id,
                    message_id: row.message_id,
                    outcome,
                }))
            };
            let dedup_id = row.message_id.unwrap_or_else(|| derived_id(&message));
            tracing::Span::current().record("message_id", tracing::field::display(dedup_id));

            let mut attempt = tx.begin().await?;
            let claimed = sqlx::query(&format!(
                "UPDATE {s}.processed SET dead_lettered = false, processed_at = now()
                 WHERE consumer_group = $1 AND message_id = $2 AND dead_lettered"
            ))
            .bind(&self.group)
            .bind(dedup_id)
            .execute(&mut *attempt)
            .await?
            .rows_affected()
                == 1
                || sqlx::query(&format!(
                    "INSERT INTO {s}.processed (consumer_group, message_id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING"
                ))
                .bind(&self.group)
                .bind(dedup_id)
                .execute(&mut *attempt)
                .await?
                .rows_affected()
                    == 1;
            if !claimed {
                attempt.rollback().await?;
                settle(&mut tx, s, id, "duplicate").await?;
                tx.commit().await?;
                tracing::info!("replay skipped: the message had been handled already");
                return done(ReplayOutcome::Duplicate);
            }
            match handler.handle(&mut attempt, &message).await {
                Ok(()) => {
                    sqlx::query(&format!(
                        "DELETE FROM {s}.attempts WHERE consumer_group = $1 AND message_id = $2"
                    ))
                    .bind(&self.group)
                    .bind(dedup_id)
                    .execute(&mut *attempt)
                    .await?;
                    attempt.commit().await?;
                    settle(&mut tx, s, id, "replayed").await?;
                    tx.commit().await?;
                    self.counters
                        .replayed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!("dead letter replayed");
                    done(ReplayOutcome::Processed)
                }
                Err(e) => {
                    attempt.rollback().await?;
                    let error = e.to_string();
                    sqlx::query(&format!(
                        "UPDATE {s}.dead_letters
                         SET error = $2, attempts = attempts + 1, replay_requested_at = NULL,
                             last_replay_at = now()
                         WHERE id = $1"
                    ))
                    .bind(id)
                    .bind(&error)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    tracing::warn!(error = %error, "replay failed; the letter stays parked");
                    done(ReplayOutcome::Failed { error })
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// The parked message as the handler saw it.
fn incoming(row: &LetterRow) -> Incoming {
    let headers: BTreeMap<String, String> = match serde_json::from_str(&row.headers) {
        Ok(h) => h,
        // Written by this library, always a map of strings; be lenient all the same.
        Err(_) => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&row.headers)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
    };
    let mut m = Incoming::new(row.source.clone(), row.payload.clone(), headers);
    m.message_id = row.message_id;
    m.key = row.key.clone();
    m
}

/// Moves letter `id` from `dead_letters` to `settled_letters` with `outcome`.
async fn settle(
    tx: &mut sqlx::PgConnection,
    s: &outbox::Schema,
    id: i64,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "WITH gone AS (DELETE FROM {s}.dead_letters WHERE id = $1 RETURNING *)
         INSERT INTO {s}.settled_letters (id, consumer_group, message_id, source, key, payload,
                                          headers, error, attempts, dead_at, outcome)
         SELECT id, consumer_group, message_id, source, key, payload, headers, error, attempts,
                dead_at, $2
         FROM gone"
    ))
    .bind(id)
    .bind(outcome)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
