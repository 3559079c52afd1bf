//! Operator actions on dead messages: list, retry, discard. All SQL; no broker involved.

use std::time::Duration;

use outbox::Schema;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// Which dead messages an action applies to. Criteria combine with AND.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    /// Only these ids.
    pub ids: Vec<Uuid>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this key.
    pub key: Option<String>,
    /// Only messages dead for longer than this.
    pub older_than: Option<Duration>,
    /// Explicitly every dead message (required when no other criterion is given, for the
    /// actions that change something).
    pub all: bool,
}

impl DeadFilter {
    /// True when at least one criterion narrows the selection.
    pub fn is_narrowed(&self) -> bool {
        !self.ids.is_empty()
            || self.topic.is_some()
            || self.key.is_some()
            || self.older_than.is_some()
    }
}

/// A dead message as an operator sees it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct DeadMessage {
    /// Position in the outbox.
    pub seq: i64,
    /// Message id.
    pub id: Uuid,
    /// Topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Failed attempts.
    pub attempts: i32,
    /// The last failure, as the broker or the relay put it.
    pub last_error: Option<String>,
    /// When it was written (UTC, RFC 3339).
    pub created_at: String,
    /// When it died (UTC, RFC 3339).
    pub dead_at: Option<String>,
    /// Payload size in bytes.
    pub payload_bytes: i32,
}

const COLUMNS: &str = "seq, id, topic, key, attempts, last_error,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS created_at,
    to_char(dead_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS dead_at,
    octet_length(payload) AS payload_bytes";

const WHERE: &str = "status = 'dead'
    AND (cardinality($1::uuid[]) = 0 OR id = ANY($1))
    AND ($2::text IS NULL OR topic = $2)
    AND ($3::text IS NULL OR key = $3)
    AND ($4::float8 IS NULL OR dead_at < now() - make_interval(secs => $4))";

fn bind<'q>(
    q: sqlx::query::QueryAs<'q, sqlx::Postgres, DeadMessage, sqlx::postgres::PgArguments>,
    f: &'q DeadFilter,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, DeadMessage, sqlx::postgres::PgArguments> {
    q.bind(&f.ids)
        .bind(f.topic.as_deref())
        .bind(f.key.as_deref())
        .bind(f.older_than.map(|d| d.as_secs_f64()))
}

/// Dead messages matching `filter`, oldest first, at most `limit`.
pub async fn list(
    pool: &PgPool,
    schema: &Schema,
    filter: &DeadFilter,
    limit: i64,
) -> Result<Vec<DeadMessage>, sqlx::Error> {
    let sql =
        format!("SELECT {COLUMNS} FROM {schema}.messages WHERE {WHERE} ORDER BY seq LIMIT $5");
    bind(sqlx::query_as(&sql), filter)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// Puts matching dead messages back in the queue with their attempts reset. They keep their
/// `seq`, so each is again the head of its key and later messages of the key still wait
/// behind it. Returns what was re-queued.
pub async fn retry(
    pool: &PgPool,
    schema: &Schema,
    filter: &DeadFilter,
) -> Result<Vec<DeadMessage>, sqlx::Error> {
    let sql = format!(
        "UPDATE {schema}.messages
         SET status = 'pending', attempts = 0, available_at = '-infinity', dead_at = NULL
         WHERE {WHERE}
         RETURNING {COLUMNS}"
    );
    let mut tx = pool.begin().await?;
    let mut rows = bind(sqlx::query_as(&sql), filter)
        .fetch_all(&mut *tx)
        .await?;
    release_keys(&mut tx, schema, &rows).await?;
    tx.commit().await?;
    rows.sort_by_key(|r| r.seq);
    Ok(rows)
}

/// The rows of the keys of `rows` that were held back behind them can be read again (the
/// relay would clear their marks within a second anyway).
async fn release_keys(
    tx: &mut sqlx::PgConnection,
    schema: &Schema,
    rows: &[DeadMessage],
) -> Result<(), sqlx::Error> {
    let mut keys: Vec<String> = rows.iter().filter_map(|r| r.key.clone()).collect();
    keys.sort_unstable();
    keys.dedup();
    crate::store::release_held(tx, schema, crate::config::DeadKeyPolicy::Block, &keys).await?;
    Ok(())
}

/// Removes matching dead messages from the queue into `discarded`, with `reason`. Returns
/// what was discarded.
pub async fn discard(
    pool: &PgPool,
    schema: &Schema,
    filter: &DeadFilter,
    reason: &str,
) -> Result<Vec<DeadMessage>, sqlx::Error> {
    let sql = format!(
        "WITH gone AS (
             DELETE FROM {schema}.messages WHERE {WHERE}
             RETURNING seq, id, topic, key, payload, headers, content_type, created_at,
                       attempts, last_error, dead_at
         ), kept AS (
             INSERT INTO {schema}.discarded (seq, id, topic, key, payload, headers, content_type,
                                             created_at, attempts, last_error, dead_at, reason)
             SELECT seq, id, topic, key, payload, headers, content_type, created_at,
                    attempts, last_error, dead_at, $5
             FROM gone
             RETURNING *
         )
         SELECT {COLUMNS} FROM kept"
    );
    let mut tx = pool.begin().await?;
    let mut rows = bind(sqlx::query_as(&sql), filter)
        .bind(reason)
        .fetch_all(&mut *tx)
        .await?;
    release_keys(&mut tx, schema, &rows).await?;
    tx.commit().await?;
    rows.sort_by_key(|r| r.seq);
    Ok(rows)
}

/// A table of dead messages for people.
pub fn table(rows: &[DeadMessage]) -> String {
    let mut out = format!(
        "{:<10} {:<36} {:<20} {:<16} {:>8} {:<20} {}\n",
        "SEQ", "ID", "TOPIC", "KEY", "ATTEMPTS", "DEAD AT", "LAST ERROR"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<10} {:<36} {:<20} {:<16} {:>8} {:<20} {}\n",
            r.seq,
            r.id,
            r.topic,
            r.key.as_deref().unwrap_or("-"),
            r.attempts,
            r.dead_at.as_deref().unwrap_or("-"),
            r.last_error.as_deref().unwrap_or("-")
        ));
    }
    out
}
