//! Dead letters as an operator sees them: list them, ask for a replay, discard them.
//!
//! These are plain SQL over the consumer schema and need no handler, so a command-line tool
//! can run them (`outbox-consumer dead …`). A replay is different: only the service has the
//! handler, so [`DeadLetters::request_replay`] just marks the letters, and the group's running
//! consumer ([`crate::Deduplicator::serve_replays`], which the sources run) handles each one
//! through the dedup step and settles it. A service can also replay at once, itself, with
//! [`crate::Deduplicator::replay_dead_letters`].
//!
//! Settled letters (replayed, found already processed, or discarded with a reason) move to
//! `settled_letters`, with their payload, for the record; [`DeadLetters::purge_settled`]
//! removes old ones.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outbox::Schema;
use sqlx::{postgres::PgArguments, query::QueryAs, PgPool, Postgres};
use uuid::Uuid;

use crate::ConsumerError;

/// Which dead letters an operator action applies to. Criteria combine with AND; the letter
/// numbers and message ids together name a set (a letter matches either).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LetterFilter {
    /// Only these letters (their number in `dead_letters`, as listed).
    pub letters: Vec<i64>,
    /// Only letters of these message ids.
    pub message_ids: Vec<Uuid>,
    /// Only this consumer group.
    pub group: Option<String>,
    /// Only this source (the RabbitMQ queue or Kafka topic it came from).
    pub source: Option<String>,
    /// Only this key.
    pub key: Option<String>,
    /// Only letters parked for longer than this.
    pub older_than: Option<Duration>,
    /// Only letters parked before this moment.
    pub before: Option<SystemTime>,
    /// Only letters parked at or after this moment.
    pub after: Option<SystemTime>,
    /// Explicitly every letter: required by the actions that change letters when nothing
    /// else narrows the selection.
    pub all: bool,
}

impl LetterFilter {
    /// Every letter, explicitly.
    pub fn every() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// Just these letters.
    pub fn letters(letters: impl IntoIterator<Item = i64>) -> Self {
        Self {
            letters: letters.into_iter().collect(),
            ..Self::default()
        }
    }

    /// True when at least one criterion narrows the selection.
    pub fn is_narrowed(&self) -> bool {
        !self.letters.is_empty()
            || !self.message_ids.is_empty()
            || self.group.is_some()
            || self.source.is_some()
            || self.key.is_some()
            || self.older_than.is_some()
            || self.before.is_some()
            || self.after.is_some()
    }

    /// `Ok` when an action that changes letters may run on this selection.
    pub(crate) fn check_selection(&self) -> Result<(), ConsumerError> {
        if self.is_narrowed() || self.all {
            Ok(())
        } else {
            Err(ConsumerError::NoSelection)
        }
    }
}

/// A parked message, as an operator sees it (the payload is left out; its size is shown).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeadLetter {
    /// The letter's number: name it with `--id` (or [`LetterFilter::letters`]).
    pub letter: i64,
    /// The consumer group that parked it.
    pub group: String,
    /// The message id (`None` for a message that carried none).
    pub message_id: Option<Uuid>,
    /// Where it came from (RabbitMQ queue or Kafka topic).
    pub source: String,
    /// Its key.
    pub key: Option<String>,
    /// Failed attempts, including failed replays.
    pub attempts: i32,
    /// The last failure.
    pub error: String,
    /// When it was parked (UTC, RFC 3339).
    pub dead_at: String,
    /// When an operator asked for a replay that has not happened yet (UTC, RFC 3339).
    pub replay_requested_at: Option<String>,
    /// When it was last replayed, unsuccessfully (UTC, RFC 3339).
    pub last_replay_at: Option<String>,
    /// Payload size in bytes.
    pub payload_bytes: i32,
}

/// A parked message in brief: no payload and no replay state, so that it reads under grants
/// that leave those columns out (an auditor's), and from a version 1 schema.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LetterSummary {
    /// The consumer group that parked it.
    #[sqlx(default)]
    pub group: String,
    /// The letter's number (`outbox-consumer dead list`).
    pub letter: i64,
    /// The message id (`None` for a message that carried none).
    pub message_id: Option<Uuid>,
    /// Where it came from (RabbitMQ queue or Kafka topic).
    pub source: String,
    /// Its key.
    pub key: Option<String>,
    /// Failed attempts.
    pub attempts: i32,
    /// The last failure.
    pub error: String,
    /// When it was parked (UTC, RFC 3339).
    pub dead_at: String,
}

/// A letter that left `dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SettledLetter {
    /// The letter's number.
    pub letter: i64,
    /// The consumer group that parked it.
    pub group: String,
    /// The message id.
    pub message_id: Option<Uuid>,
    /// Where it came from.
    pub source: String,
    /// Its key.
    pub key: Option<String>,
    /// Failed attempts before it settled.
    pub attempts: i32,
    /// The last failure before it settled.
    pub error: String,
    /// When it was parked (UTC, RFC 3339).
    pub dead_at: String,
    /// When it settled (UTC, RFC 3339).
    pub settled_at: String,
    /// `replayed`, `duplicate` or `discarded`.
    pub outcome: String,
    /// Why it was discarded.
    pub reason: Option<String>,
}

/// Where a replay an operator asked for stands.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ReplayStatus {
    /// The letter's number.
    pub letter: i64,
    /// The consumer group (unknown once the letter is gone without a record).
    pub group: Option<String>,
    /// The message id.
    pub message_id: Option<Uuid>,
    /// Where it came from.
    pub source: Option<String>,
    /// Its key.
    pub key: Option<String>,
    /// `waiting` (no consumer of the group has picked it up yet), `replayed` (handled and
    /// committed), `duplicate` (the message had been handled already; the handler did not run
    /// again), `failed` (handled, failed again, parked again; see `error`), `discarded` (an
    /// operator discarded it meanwhile) or `gone` (no longer known).
    pub state: String,
    /// The replay's failure, for `failed`.
    pub error: Option<String>,
}

const TIME: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'";

pub(crate) fn utc(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', {TIME})")
}

fn columns() -> String {
    format!(
        "id AS letter, consumer_group AS \"group\", message_id, source, key, attempts, error,
         {} AS dead_at, {} AS replay_requested_at, {} AS last_replay_at,
         octet_length(payload) AS payload_bytes",
        utc("dead_at"),
        utc("replay_requested_at"),
        utc("last_replay_at")
    )
}

fn settled_columns() -> String {
    format!(
        "id AS letter, consumer_group AS \"group\", message_id, source, key, attempts, error,
         {} AS dead_at, {} AS settled_at, outcome, reason",
        utc("dead_at"),
        utc("settled_at")
    )
}

/// The filter's condition over `dead_letters`; it takes parameters `$1` to `$8`.
pub(crate) const WHERE: &str = "
    ((cardinality($1::int8[]) = 0 AND cardinality($2::uuid[]) = 0)
        OR id = ANY($1) OR message_id = ANY($2))
    AND ($3::text IS NULL OR consumer_group = $3)
    AND ($4::text IS NULL OR source = $4)
    AND ($5::text IS NULL OR key = $5)
    AND ($6::float8 IS NULL OR dead_at < now() - make_interval(secs => $6))
    AND ($7::float8 IS NULL OR dead_at < to_timestamp($7))
    AND ($8::float8 IS NULL OR dead_at >= to_timestamp($8))";

fn epoch(t: Option<SystemTime>) -> Option<f64> {
    t.map(|t| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    })
}

/// Binds `f` as `$1` to `$8` of [`WHERE`] (`all` is the caller's to check).
pub(crate) fn bind<'q, O>(
    q: QueryAs<'q, Postgres, O, PgArguments>,
    f: &'q LetterFilter,
) -> QueryAs<'q, Postgres, O, PgArguments> {
    q.bind(&f.letters)
        .bind(&f.message_ids)
        .bind(f.group.as_deref())
        .bind(f.source.as_deref())
        .bind(f.key.as_deref())
        .bind(f.older_than.map(|d| d.as_secs_f64()))
        .bind(epoch(f.before))
        .bind(epoch(f.after))
}

/// Operator actions on the dead letters of every group in one consumer schema.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    pool: PgPool,
    schema: Schema,
}

impl DeadLetters {
    /// The dead letters in `schema` (the consumers' `with_schema`, by default
    /// `outbox_consumer`).
    pub fn new(pool: PgPool, schema: Schema) -> Self {
        Self { pool, schema }
    }

    /// Letters matching `filter`, oldest first, at most `limit`.
    pub async fn list(
        &self,
        filter: &LetterFilter,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, ConsumerError> {
        let sql = format!(
            "SELECT {} FROM {}.dead_letters WHERE {WHERE} ORDER BY id LIMIT $9",
            columns(),
            self.schema
        );
        Ok(bind(sqlx::query_as(&sql), filter)
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await?)
    }

    /// Every letter of `group`, oldest first, in brief: it reads only the columns of
    /// [`LetterSummary`].
    pub async fn summaries(&self, group: &str) -> Result<Vec<LetterSummary>, ConsumerError> {
        let sql = format!(
            "SELECT id AS letter, message_id, source, key, attempts, error, {} AS dead_at
             FROM {}.dead_letters WHERE consumer_group = $1 ORDER BY id",
            utc("dead_at"),
            self.schema
        );
        let mut letters: Vec<LetterSummary> = sqlx::query_as(&sql)
            .bind(group)
            .fetch_all(&self.pool)
            .await?;
        for letter in &mut letters {
            letter.group = group.to_owned();
        }
        Ok(letters)
    }

    /// Asks for a replay of the letters matching `filter`: each group's running consumer
    /// picks its letters up within its replay interval and handles them through the dedup
    /// step. Returns the letters marked. Refuses an unnarrowed filter without `all`.
    pub async fn request_replay(
        &self,
        filter: &LetterFilter,
    ) -> Result<Vec<DeadLetter>, ConsumerError> {
        filter.check_selection()?;
        let sql = format!(
            "UPDATE {}.dead_letters SET replay_requested_at = now() WHERE {WHERE} RETURNING {}",
            self.schema,
            columns()
        );
        let mut rows: Vec<DeadLetter> = bind(sqlx::query_as(&sql), filter)
            .fetch_all(&self.pool)
            .await?;
        rows.sort_by_key(|r| r.letter);
        Ok(rows)
    }

    /// Where the replays of `letters` stand (see [`ReplayStatus::state`]).
    pub async fn replay_status(&self, letters: &[i64]) -> Result<Vec<ReplayStatus>, ConsumerError> {
        let s = &self.schema;
        let sql = format!(
            "SELECT r.id AS letter,
                    coalesce(t.consumer_group, d.consumer_group) AS \"group\",
                    coalesce(t.message_id, d.message_id) AS message_id,
                    coalesce(t.source, d.source) AS source,
                    coalesce(t.key, d.key) AS key,
                    CASE WHEN t.id IS NOT NULL THEN t.outcome
                         WHEN d.id IS NULL THEN 'gone'
                         WHEN d.replay_requested_at IS NOT NULL THEN 'waiting'
                         ELSE 'failed' END AS state,
                    CASE WHEN t.id IS NULL AND d.replay_requested_at IS NULL THEN d.error END AS error
             FROM unnest($1::int8[]) AS r(id)
             LEFT JOIN {s}.settled_letters t ON t.id = r.id
             LEFT JOIN {s}.dead_letters d ON d.id = r.id
             ORDER BY r.id"
        );
        Ok(sqlx::query_as(&sql)
            .bind(letters)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Discards the letters matching `filter`: they leave `dead_letters` for
    /// `settled_letters` with outcome `discarded` and `reason`. Returns what was discarded.
    /// Refuses an unnarrowed filter without `all`, and an empty reason.
    pub async fn discard(
        &self,
        filter: &LetterFilter,
        reason: &str,
    ) -> Result<Vec<SettledLetter>, ConsumerError> {
        filter.check_selection()?;
        if reason.trim().is_empty() {
            return Err(ConsumerError::MissingReason);
        }
        let s = &self.schema;
        let sql = format!(
            "WITH gone AS (
                 DELETE FROM {s}.dead_letters WHERE {WHERE}
                 RETURNING id, consumer_group, message_id, source, key, payload, headers, error,
                           attempts, dead_at
             ), kept AS (
                 INSERT INTO {s}.settled_letters (id, consumer_group, message_id, source, key,
                                                  payload, headers, error, attempts, dead_at,
                                                  outcome, reason)
                 SELECT id, consumer_group, message_id, source, key, payload, headers, error,
                        attempts, dead_at, 'discarded', $9
                 FROM gone
                 RETURNING *
             )
             SELECT {} FROM kept ORDER BY id",
            settled_columns()
        );
        Ok(bind(sqlx::query_as(&sql), filter)
            .bind(reason)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Settled letters of `group` (all groups when `None`), newest first, at most `limit`.
    pub async fn settled(
        &self,
        group: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SettledLetter>, ConsumerError> {
        let sql = format!(
            "SELECT {} FROM {}.settled_letters
             WHERE $1::text IS NULL OR consumer_group = $1
             ORDER BY settled_at DESC, id DESC LIMIT $2",
            settled_columns(),
            self.schema
        );
        Ok(sqlx::query_as(&sql)
            .bind(group)
            .bind(limit.max(0))
            .fetch_all(&self.pool)
            .await?)
    }

    /// Deletes settled letters older than `older_than`, `batch` rows per statement. Returns
    /// how many went.
    pub async fn purge_settled(
        &self,
        older_than: Duration,
        batch: u32,
    ) -> Result<u64, ConsumerError> {
        let sql = format!(
            "DELETE FROM {s}.settled_letters WHERE id IN (
                 SELECT id FROM {s}.settled_letters
                 WHERE settled_at < now() - make_interval(secs => $1)
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
            s = self.schema
        );
        let batch = u64::from(batch.max(1));
        let mut total = 0;
        loop {
            let n = sqlx::query(&sql)
                .bind(older_than.as_secs_f64())
                .bind(batch as i64)
                .execute(&self.pool)
                .await?
                .rows_affected();
            total += n;
            if n < batch {
                return Ok(total);
            }
        }
    }
}

/// A table of dead letters for people.
pub fn table(rows: &[DeadLetter]) -> String {
    let mut out = format!(
        "{:<7} {:<16} {:<36} {:<24} {:<14} {:>8} {:<20} {:<9} {}\n",
        "LETTER", "GROUP", "MESSAGE ID", "SOURCE", "KEY", "ATTEMPTS", "DEAD AT", "STATE", "ERROR"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<7} {:<16} {:<36} {:<24} {:<14} {:>8} {:<20} {:<9} {}\n",
            r.letter,
            r.group,
            r.message_id
                .map(|id| id.to_string())
                .as_deref()
                .unwrap_or("-"),
            r.source,
            r.key.as_deref().unwrap_or("-"),
            r.attempts,
            r.dead_at,
            if r.replay_requested_at.is_some() {
                "replaying"
            } else {
                "parked"
            },
            r.error
        ));
    }
    out
}

/// A table of settled letters for people.
pub fn settled_table(rows: &[SettledLetter]) -> String {
    let mut out = format!(
        "{:<7} {:<16} {:<36} {:<24} {:<14} {:<10} {}\n",
        "LETTER", "GROUP", "MESSAGE ID", "SOURCE", "KEY", "OUTCOME", "REASON"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<7} {:<16} {:<36} {:<24} {:<14} {:<10} {}\n",
            r.letter,
            r.group,
            r.message_id
                .map(|id| id.to_string())
                .as_deref()
                .unwrap_or("-"),
            r.source,
            r.key.as_deref().unwrap_or("-"),
            r.outcome,
            r.reason.as_deref().unwrap_or("-")
        ));
    }
    out
}

/// A table of replay states for people.
pub fn replay_table(rows: &[ReplayStatus]) -> String {
    let mut out = format!(
        "{:<7} {:<16} {:<36} {:<24} {:<14} {:<10} {}\n",
        "LETTER", "GROUP", "MESSAGE ID", "SOURCE", "KEY", "STATE", "ERROR"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<7} {:<16} {:<36} {:<24} {:<14} {:<10} {}\n",
            r.letter,
            r.group.as_deref().unwrap_or("-"),
            r.message_id
                .map(|id| id.to_string())
                .as_deref()
                .unwrap_or("-"),
            r.source.as_deref().unwrap_or("-"),
            r.key.as_deref().unwrap_or("-"),
            r.state,
            r.error.as_deref().unwrap_or("-")
        ));
    }
    out
}
