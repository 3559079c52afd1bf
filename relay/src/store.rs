//! Claim and settle: all the SQL the relay loop runs against the outbox. Knows nothing of
//! brokers.
//!
//! ## How claims stay safe with several relays
//!
//! - A claim leases rows (`lease_until`, `claim_token`) in a short transaction and commits;
//!   no lock is held while the broker is asked. Settles are fenced by the claim token, so a
//!   relay whose lease expired cannot overwrite the result of the relay that took over.
//! - Rows are claimed by status, never by a `seq` cursor, so a row whose transaction
//!   committed after a later `seq` was seen is still found.
//! - Per-key order: a row is claimable only if every earlier row of its key is claimable
//!   too (and, being earlier, is then in the same claim). A key whose head is leased by
//!   another relay, waiting in backoff, or dead (with the `block` policy) is skipped whole.
//! - Claims run one at a time across relays (a transaction-scoped advisory lock taken
//!   before the claim's snapshot), so two relays never judge the same key's head at once.
//!   Settles that make rows unclaimable (backoff, dead) take the same lock in shared mode,
//!   so a claim never sees a head as claimable that a concurrent settle is parking.

use std::{collections::BTreeMap, time::Duration};

use outbox::Schema;
use sqlx::{postgres::PgRow, PgPool, Row};
use uuid::Uuid;

use crate::{config::DeadKeyPolicy, envelope::Envelope};

/// A batch of leased rows.
#[derive(Debug)]
pub struct Claim {
    /// Fences this batch's settle.
    pub token: Uuid,
    /// Rows ready to publish, in `seq` order.
    pub envelopes: Vec<Envelope>,
    /// Rows that cannot be published as stored (`seq`, what is wrong). They are dead-lettered.
    pub malformed: Vec<(i64, u32, String)>,
}

impl Claim {
    /// Rows in this claim.
    pub fn len(&self) -> usize {
        self.envelopes.len() + self.malformed.len()
    }

    /// True when nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A failed attempt to record.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The row.
    pub seq: i64,
    /// Why it failed, as the broker or the relay put it.
    pub error: String,
    /// `None`: dead now; `Some(d)`: retry after `d`.
    pub retry_after: Option<Duration>,
}

/// The outcome of one claimed batch.
#[derive(Debug, Default)]
pub struct Settlement {
    /// Confirmed by the broker: deleted.
    pub delivered: Vec<i64>,
    /// Failed attempts: retried later or dead.
    pub failed: Vec<Failure>,
    /// Not attempted, or not this message's fault: back to claimable, attempts unchanged.
    pub released: Vec<i64>,
}

/// Rows each part of a settle actually changed (fewer than asked means the lease was lost).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Rows deleted as delivered.
    pub delivered: u64,
    /// Rows put back with a delay or parked as dead.
    pub failed: u64,
    /// Rows released.
    pub released: u64,
}

/// The outbox tables of one schema.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    schema: Schema,
    lock_key: String,
    claim_sql: String,
    delete_sql: String,
    fail_sql: String,
    release_sql: String,
}

impl Store {
    /// A store over `schema`, claiming under `policy`.
    pub fn new(pool: PgPool, schema: Schema, policy: DeadKeyPolicy) -> Self {
        let s = &schema;
        // An earlier row of the same key blocks a row unless it is itself claimable.
        let blocking = match policy {
            DeadKeyPolicy::Block => {
                "NOT (e.status = 'pending' AND e.available_at <= now() \
                                      AND (e.lease_until IS NULL OR e.lease_until <= now()))"
            }
            DeadKeyPolicy::Skip => {
                "e.status = 'pending' AND (e.available_at > now() \
                                     OR e.lease_until > now())"
            }
        };
        let claim_sql = format!(
            "WITH claimable AS (
                 SELECT m.seq FROM {s}.messages m
                 WHERE m.status = 'pending'
                   AND m.available_at <= now()
                   AND (m.lease_until IS NULL OR m.lease_until <= now())
                   AND (m.key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM {s}.messages e
                        WHERE e.key = m.key AND e.seq < m.seq AND {blocking}))
                 ORDER BY m.seq
                 LIMIT $1
                 FOR UPDATE OF m
             )
             UPDATE {s}.messages m
             SET lease_until = now() + make_interval(secs => $2), claim_token = $3
             FROM claimable c
             WHERE m.seq = c.seq
             RETURNING m.seq, m.id, m.topic, m.key, m.payload, m.headers, m.content_type,
                       floor(extract(epoch FROM m.created_at))::bigint AS created_at_unix,
                       m.attempts"
        );
        let delete_sql =
            format!("DELETE FROM {s}.messages WHERE seq = ANY($1) AND claim_token = $2");
        let fail_sql = format!(
            "UPDATE {s}.messages m
             SET attempts = m.attempts + 1,
                 status = CASE WHEN f.dead THEN 'dead' ELSE 'pending' END,
                 dead_at = CASE WHEN f.dead THEN now() END,
                 available_at = CASE WHEN f.dead THEN m.available_at
                                     ELSE now() + make_interval(secs => f.delay) END,
                 last_error = f.error,
                 lease_until = NULL,
                 claim_token = NULL
             FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[])
                  AS f(seq, error, delay, dead)
             WHERE m.seq = f.seq AND m.claim_token = $5 AND m.lease_until > now()"
        );
        let release_sql = format!(
            "UPDATE {s}.messages SET lease_until = NULL, claim_token = NULL
             WHERE seq = ANY($1) AND claim_token = $2"
        );
        Self {
            pool,
            lock_key: format!("outbox-claim:{s}"),
            schema,
            claim_sql,
            delete_sql,
            fail_sql,
            release_sql,
        }
    }

    /// The pool this store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema this store reads.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Leases up to `limit` rows for `lease`.
    #[tracing::instrument(skip_all, fields(limit), err)]
    pub async fn claim(&self, limit: u32, lease: Duration) -> Result<Claim, sqlx::Error> {
        let token = Uuid::new_v4();
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&self.lock_key)
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(&self.claim_sql)
            .bind(i64::from(limit))
            .bind(lease.as_secs_f64())
            .bind(token)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;

        let mut claim = Claim {
            token,
            envelopes: Vec::with_capacity(rows.len()),
            malformed: Vec::new(),
        };
        for row in rows {
            match envelope(&row) {
                Ok(env) => claim.envelopes.push(env),
                Err(e) => {
                    let seq: i64 = row.try_get("seq")?;
                    let attempts: i32 = row.try_get("attempts")?;
                    claim.malformed.push((seq, attempts.max(0) as u32, e));
                }
            }
        }
        // RETURNING does not promise an order; publishing relies on seq order.
        claim.envelopes.sort_unstable_by_key(|e| e.seq);
        Ok(claim)
    }

    /// Records a batch's outcome, fenced by its claim token.
    #[tracing::instrument(skip_all, err)]
    pub async fn settle(&self, token: Uuid, s: &Settlement) -> Result<Settled, sqlx::Error> {
        let mut done = Settled::default();
        let mut tx = self.pool.begin().await?;
        if !s.failed.is_empty() {
            sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtext($1))")
                .bind(&self.lock_key)
                .execute(&mut *tx)
                .await?;
            let seqs: Vec<i64> = s.failed.iter().map(|f| f.seq).collect();
            let errors: Vec<&str> = s.failed.iter().map(|f| f.error.as_str()).collect();
            let delays: Vec<f64> = s
                .failed
                .iter()
                .map(|f| f.retry_after.map_or(0.0, |d| d.as_secs_f64()))
                .collect();
            let dead: Vec<bool> = s.failed.iter().map(|f| f.retry_after.is_none()).collect();
            done.failed = sqlx::query(&self.fail_sql)
                .bind(&seqs)
                .bind(&errors)
                .bind(&delays)
                .bind(&dead)
                .bind(token)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if !s.delivered.is_empty() {
            done.delivered = sqlx::query(&self.delete_sql)
                .bind(&s.delivered)
                .bind(token)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if !s.released.is_empty() {
            done.released = sqlx::query(&self.release_sql)
                .bind(&s.released)
                .bind(token)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Marks this relay as idle, so that inserts send a NOTIFY until `ttl` passes.
    pub async fn register_waiter(&self, relay_id: Uuid, ttl: Duration) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {}.relay_waiters (relay_id, expires_at)
             VALUES ($1, now() + make_interval(secs => $2))
             ON CONFLICT (relay_id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
            self.schema
        ))
        .bind(relay_id)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks this relay as busy again, and clears waiters that expired long ago.
    pub async fn remove_waiter(&self, relay_id: Uuid) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "DELETE FROM {}.relay_waiters
             WHERE relay_id = $1 OR expires_at < now() - interval '1 minute'",
            self.schema
        ))
        .bind(relay_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

fn envelope(row: &PgRow) -> Result<Envelope, String> {
    let get_err = |e: sqlx::Error| format!("row could not be read: {e}");
    let headers: serde_json::Value = row.try_get("headers").map_err(get_err)?;
    let headers = match headers {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k, s)),
                other => Err(format!("header {k:?} is not a string (found {other})")),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?,
        other => return Err(format!("headers are not a JSON object (found {other})")),
    };
    let attempts: i32 = row.try_get("attempts").map_err(get_err)?;
    Ok(Envelope {
        seq: row.try_get("seq").map_err(get_err)?,
        id: row.try_get("id").map_err(get_err)?,
        topic: row.try_get("topic").map_err(get_err)?,
        key: row.try_get("key").map_err(get_err)?,
        payload: row.try_get("payload").map_err(get_err)?,
        headers,
        content_type: row.try_get("content_type").map_err(get_err)?,
        created_at_unix: row.try_get("created_at_unix").map_err(get_err)?,
        attempts: attempts.max(0) as u32,
    })
}
