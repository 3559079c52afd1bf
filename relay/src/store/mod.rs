//! Claim and settle: all the SQL the relay loop runs against the outbox. Knows nothing of
//! brokers.
//!
//! ## How several relays share one outbox
//!
//! Every row belongs to one of [`PARTITIONS`] partitions, a hash of its key (of its id when it
//! has none), so all rows of a key share a partition. Each partition is leased to at most one
//! relay at a time (`partitions.owner`, `lease_until`), and relays share the partitions out
//! evenly ([`Store::rebalance`]). Only a partition's owner reads its rows, so no two relays
//! ever publish the same key at once in steady state, and claims need no row locks and no
//! writes: a claim is a plain `SELECT`. Within a relay, each worker serves a fixed subset of
//! the partitions, so workers never share a key either.
//!
//! - **No lock across broker I/O.** Reading takes no lock; a confirmed row is deleted; a
//!   failed one is updated, fenced by the partition lease (`FOR SHARE` on the partition row,
//!   so a takeover waits for the settle or the settle sees the new owner).
//! - **Commit order.** Rows are read by status, never by a `seq` cursor, so a row whose
//!   transaction committed after a later `seq` was seen is still found.
//! - **Per-key order.** A row is read only if no earlier row of its key is waiting in
//!   backoff or (with the `block` policy) dead; the relay publishes a key's rows in `seq`
//!   order, each after the previous one's confirm.
//! - **Takeover.** A relay that dies stops renewing; its partitions expire after
//!   `relay.lease` and the others take them. A relay that is merely slow may still publish
//!   rows it read before losing a partition: those arrive twice, never out of order, since
//!   both relays publish each key from its oldest undelivered row onwards.

use std::{collections::BTreeMap, time::Duration};

use outbox::Schema;
use sqlx::{postgres::PgRow, PgPool, Row};
use uuid::Uuid;

use serde::Deserialize;

use crate::envelope::Envelope;

mod held_back;

pub use held_back::{release_held, Sweep};

/// What later messages of a key do once an earlier message of that key is dead.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum DeadKeyPolicy {
    /// Wait until an operator retries or discards the dead message (keeps per-key order).
    #[default]
    Block,
    /// Publish them anyway; the dead message stays parked for an operator.
    Skip,
}

/// Number of partitions; fixed by the schema (`partition = hashtext(key) & 63`).
pub const PARTITIONS: i16 = 64;

/// A batch of rows read for publishing.
#[derive(Debug, Default)]
pub struct Claim {
    /// Rows ready to publish, in `seq` order.
    pub envelopes: Vec<Envelope>,
    /// Rows that cannot be published as stored. They are dead-lettered.
    pub malformed: Vec<Malformed>,
    /// The partitions that gave as many rows as they were asked for (they may have more).
    pub full: Vec<i16>,
}

/// How [`Malformed::error`] starts for a row whose payload is over `relay.max_payload`.
pub const TOO_LARGE: &str = "too large: ";

/// A row that cannot be read as a message.
#[derive(Debug)]
pub struct Malformed {
    /// Its position in the outbox.
    pub seq: i64,
    /// Its outbox partition.
    pub partition: i16,
    /// Its topic, when even that cannot be read: empty.
    pub topic: String,
    /// Its key, when it has one and it can be read.
    pub key: Option<String>,
    /// What is wrong with it.
    pub error: String,
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

/// The outcome of one claimed batch. Rows in neither list stay as they were.
#[derive(Debug, Default)]
pub struct Settlement {
    /// Confirmed by the broker: deleted.
    pub delivered: Vec<i64>,
    /// Failed attempts: retried later or dead.
    pub failed: Vec<Failure>,
}

/// Rows each part of a settle actually changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Rows deleted as delivered (fewer than asked if another relay deleted some first).
    pub delivered: u64,
    /// Failures recorded (fewer than asked if the partition was lost meanwhile).
    pub failed: u64,
}

/// The outbox tables of one schema.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    schema: Schema,
    policy: DeadKeyPolicy,
    max_payload: u64,
    claim_sql: String,
    delete_sql: String,
    fail_sql: String,
    /// How far the held-back sweep has walked behind each head (see [`Store::hold_back`]).
    walked: held_back::Walked,
}

/// What a relay holds after [`Store::rebalance_keeping`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Share {
    /// Partitions to read, in order.
    pub owned: Vec<i16>,
    /// Partitions leased but no longer to be read: they go once their rows are settled.
    pub draining: Vec<i16>,
}

/// What a delivered row leaves behind in `delivered` (`retention.delivered` and
/// `retention.delivered_payloads`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Archive {
    /// Nothing: the row is deleted.
    #[default]
    Off,
    /// A slim record (id, seq, topic, key, times, attempts), for reconciliation.
    Records,
    /// The record with the payload, headers and content type, so that the message can be
    /// replayed.
    Whole,
}

/// Retention windows for [`Store::purge`].
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// How long `delivered` records are kept (zero: none are written).
    pub delivered: Duration,
    /// How long `discarded` messages are kept.
    pub discarded: Duration,
    /// Rows per purge statement.
    pub batch: u32,
    /// Time between purges.
    pub interval: Duration,
}

impl Store {
    /// A store over `schema`, reading under `policy`; each delivered row leaves in
    /// `delivered` what `archive` says.
    pub fn new(pool: PgPool, schema: Schema, policy: DeadKeyPolicy, archive: Archive) -> Self {
        let s = &schema;
        // Which earlier rows of the same key hold a row back: one waiting out a retry
        // delay, one marked held back (whatever the policy: it is older and undelivered),
        // and under `block` a dead one.
        let blocking = match policy {
            DeadKeyPolicy::Block => "(e.status = 'dead' OR e.held_back OR e.available_at > now())",
            DeadKeyPolicy::Skip => {
                "(e.held_back OR (e.status = 'pending' AND e.available_at > now()))"
            }
        };
        // Per partition, the oldest rows that are due and not held back, up to a row limit;
        // only from partitions this relay holds a live lease on. Then, in `seq` order, those
        // that start within the byte budget (the first always does) are `taken`; the others
        // come back without their payload, so the relay can tell which partitions had more.
        // A payload over the largest allowed is not read at all: its size stands in for it.
        // (Counting the rows in the query instead, with window functions, took about a
        // fifth of a read's time.)
        let claim_sql = format!(
            "SELECT w.seq, w.partition, w.id, w.topic, w.key,
                    CASE WHEN w.taken THEN w.payload END AS payload,
                    w.size, w.headers, w.content_type, w.created_at_micros, w.attempts, w.taken,
                    w.replay_of
             FROM (
                 SELECT r.*,
                        sum(r.loaded) OVER (ORDER BY r.seq) - r.loaded < greatest($5, 1) AS taken
                 FROM unnest($1::smallint[], $3::int[]) AS q(partition, lim)
                 JOIN {s}.partitions p ON p.partition = q.partition
                 CROSS JOIN LATERAL (
                     SELECT m.seq, m.partition, m.id, m.topic, m.key,
                            CASE WHEN octet_length(m.payload) <= $6 THEN m.payload END AS payload,
                            octet_length(m.payload)::bigint AS size,
                            CASE WHEN octet_length(m.payload) <= $6
                                 THEN octet_length(m.payload) ELSE 0 END::bigint AS loaded,
                            m.headers, m.content_type,
                            (extract(epoch FROM m.created_at) * 1000000)::bigint AS created_at_micros,
                            m.attempts, m.replay_of
                     FROM {s}.messages m
                     WHERE m.partition = p.partition
                       AND m.status = 'pending' AND NOT m.held_back
                       AND m.available_at <= now()
                       AND m.seq NOT IN (SELECT unnest($4::bigint[]))
                       AND (m.key IS NULL OR NOT EXISTS (
                            SELECT 1 FROM {s}.messages e
                            WHERE e.key = m.key AND e.seq < m.seq AND e.key IS NOT NULL
                              AND (e.status = 'dead' OR e.attempts > 0 OR e.held_back)
                              AND {blocking}))
                     ORDER BY m.seq
                     LIMIT q.lim
                 ) r
                 WHERE p.owner = $2 AND p.lease_until > now()
             ) w"
        );
        // Deletes commit without waiting for the WAL flush (`synchronous_commit = off` for
        // that one statement): a delete lost in a PostgreSQL crash leaves a confirmed row
        // pending, which is published again, a duplicate the consumers' dedup absorbs.
        // Failure updates stay synchronous: a lost dead-marking could let a key's message
        // reappear after later ones had moved past it.
        // A replayed message's record already exists (its first delivery's): it is kept as
        // it was, with the topic the message was first written with.
        let kept = match archive {
            Archive::Off => None,
            Archive::Records => Some("id, seq, topic, key, created_at, attempts"),
            Archive::Whole => {
                Some("id, seq, topic, key, created_at, attempts, payload, headers, content_type")
            }
        };
        let delete_sql = match kept {
            Some(columns) => format!(
                "WITH lazy AS (SELECT set_config('synchronous_commit', 'off', true) AS v),
                 gone AS (
                     DELETE FROM {s}.messages
                     WHERE seq = ANY($1) AND (SELECT v FROM lazy) IS NOT NULL
                     RETURNING {columns}
                 ), kept AS (
                     INSERT INTO {s}.delivered ({columns})
                     SELECT {columns} FROM gone
                     ON CONFLICT (id) DO NOTHING
                 )
                 SELECT count(*) FROM gone"
            ),
            None => format!(
                "WITH lazy AS (SELECT set_config('synchronous_commit', 'off', true) AS v),
                 gone AS (
                     DELETE FROM {s}.messages
                     WHERE seq = ANY($1) AND (SELECT v FROM lazy) IS NOT NULL
                     RETURNING 1
                 )
                 SELECT count(*) FROM gone"
            ),
        };
        let fail_sql = format!(
            "WITH owned AS (
                 SELECT partition FROM {s}.partitions
                 WHERE owner = $5 AND lease_until > now()
                 FOR SHARE
             )
             UPDATE {s}.messages m
             SET attempts = m.attempts + 1,
                 status = CASE WHEN f.dead THEN 'dead' ELSE 'pending' END,
                 dead_at = CASE WHEN f.dead THEN now() END,
                 available_at = CASE WHEN f.dead THEN m.available_at
                                     ELSE now() + make_interval(secs => f.delay) END,
                 last_error = f.error
             FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[])
                  AS f(seq, error, delay, dead)
             WHERE m.seq = f.seq AND m.status = 'pending'
               AND m.partition IN (SELECT partition FROM owned)"
        );
        Self {
            pool,
            schema,
            policy,
            max_payload: u64::from(u32::MAX),
            claim_sql,
            delete_sql,
            fail_sql,
            walked: held_back::Walked::default(),
        }
    }

    /// Rows with a larger payload are not read: they come back as [`Malformed`] (too large),
    /// to be parked as dead, without their payload ever leaving PostgreSQL.
    pub fn with_max_payload(mut self, bytes: u64) -> Self {
        self.max_payload = bytes;
        self
    }

    /// The pool this store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema this store reads.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Reads up to about `limit` publishable rows from `partitions`, as far as `relay` holds
    /// their leases, sharing the limit evenly between the partitions; rows in `held` (the
    /// caller has them already) are passed over.
    pub async fn claim(
        &self,
        relay: Uuid,
        partitions: &[i16],
        limit: u32,
        held: &[i64],
    ) -> Result<Claim, sqlx::Error> {
        let n = partitions.len().max(1) as u32;
        let each = limit.div_ceil(n).max(1);
        let limits: Vec<(i16, u32)> = partitions.iter().map(|&p| (p, each)).collect();
        self.claim_from(relay, &limits, u64::MAX, held).await
    }

    /// Reads, from each partition of `limits` that `relay` holds a lease on, the oldest
    /// publishable rows up to its row limit, passing over the rows in `held`; of those, as
    /// many (in `seq` order) as start within `bytes` of payload, and always the first.
    #[tracing::instrument(skip_all, fields(partitions = limits.len(), held = held.len()), err)]
    pub async fn claim_from(
        &self,
        relay: Uuid,
        limits: &[(i16, u32)],
        bytes: u64,
        held: &[i64],
    ) -> Result<Claim, sqlx::Error> {
        if limits.is_empty() {
            return Ok(Claim::default());
        }
        let partitions: Vec<i16> = limits.iter().map(|l| l.0).collect();
        let lims: Vec<i32> = limits
            .iter()
            .map(|l| i32::try_from(l.1).unwrap_or(i32::MAX))
            .collect();
        let rows = sqlx::query(&self.claim_sql)
            .bind(&partitions)
            .bind(relay)
            .bind(&lims)
            .bind(held)
            .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
            .bind(i64::try_from(self.max_payload).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        let mut claim = Claim {
            envelopes: Vec::with_capacity(rows.len()),
            malformed: Vec::new(),
            full: Vec::new(),
        };
        // Rows each partition had before the byte budget cut the read short; then only the
        // rows within the budget are kept.
        let mut found: BTreeMap<i16, i64> = BTreeMap::new();
        let mut cut = false;
        for row in &rows {
            *found.entry(row.try_get("partition")?).or_default() += 1;
            cut |= !row.try_get::<bool, _>("taken")?;
        }
        claim.full = limits
            .iter()
            .filter(|(p, lim)| found.get(p).is_some_and(|&n| cut || n >= i64::from(*lim)))
            .map(|l| l.0)
            .collect();
        let rows = rows
            .into_iter()
            .filter(|row| row.try_get::<bool, _>("taken").unwrap_or(false));
        // Under `block`, a malformed row is about to be dead: its key's later rows wait
        // behind it, as they would behind any dead row (they are read again next time, and
        // the claim query then holds them back).
        let mut stopped: BTreeMap<String, i64> = BTreeMap::new();
        for row in rows {
            match envelope(&row, self.max_payload) {
                Ok(env) => claim.envelopes.push(env),
                Err(e) => {
                    let seq: i64 = row.try_get("seq")?;
                    let key = row.try_get::<Option<String>, _>("key").ok().flatten();
                    if self.policy == DeadKeyPolicy::Block {
                        if let Some(key) = &key {
                            let first = stopped.entry(key.clone()).or_insert(seq);
                            *first = (*first).min(seq);
                        }
                    }
                    claim.malformed.push(Malformed {
                        seq,
                        partition: row.try_get("partition")?,
                        topic: row.try_get("topic").unwrap_or_default(),
                        key,
                        error: e,
                    });
                }
            }
        }
        if !stopped.is_empty() {
            claim.envelopes.retain(|env| {
                env.key
                    .as_ref()
                    .and_then(|k| stopped.get(k))
                    .is_none_or(|&dead_seq| env.seq < dead_seq)
            });
        }
        claim.envelopes.sort_unstable_by_key(|e| e.seq);
        Ok(claim)
    }

    /// How many outbox rows a read like [`Store::claim_from`] looks at, returned or passed
    /// over, by PostgreSQL's `EXPLAIN ANALYZE` of the same statement: what a read costs,
    /// counted in rows rather than timed.
    #[doc(hidden)]
    pub async fn rows_examined_by_claim(
        &self,
        relay: Uuid,
        limits: &[(i16, u32)],
        held: &[i64],
    ) -> Result<u64, sqlx::Error> {
        let partitions: Vec<i16> = limits.iter().map(|l| l.0).collect();
        let lims: Vec<i32> = limits.iter().map(|l| l.1 as i32).collect();
        let plan: serde_json::Value = sqlx::query_scalar(&format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) {}",
            self.claim_sql
        ))
        .bind(&partitions)
        .bind(relay)
        .bind(&lims)
        .bind(held)
        .bind(i64::MAX)
        .bind(i64::try_from(self.max_payload).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await?;
        fn examined(node: &serde_json::Value) -> f64 {
            let n = |k: &str| {
                node.get(k)
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0)
            };
            let own = if node.get("Alias").and_then(|a| a.as_str()) == Some("m") {
                (n("Actual Rows") + n("Rows Removed by Filter")) * n("Actual Loops")
            } else {
                0.0
            };
            let children = node.get("Plans").and_then(|p| p.as_array());
            own + children.into_iter().flatten().map(examined).sum::<f64>()
        }
        Ok(examined(&plan[0]["Plan"]) as u64)
    }

    /// Records a batch's outcome: deletes what was delivered; records failures only in
    /// partitions `relay` still holds.
    #[tracing::instrument(skip_all, err)]
    pub async fn settle(&self, relay: Uuid, s: &Settlement) -> Result<Settled, sqlx::Error> {
        let mut done = Settled::default();
        if !s.delivered.is_empty() {
            let deleted: i64 = sqlx::query_scalar(&self.delete_sql)
                .bind(&s.delivered)
                .fetch_one(&self.pool)
                .await?;
            done.delivered = deleted as u64;
        }
        if !s.failed.is_empty() {
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
                .bind(relay)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(done)
    }

    /// Heartbeats `relay`, renews its partition leases for `lease`, and moves it towards its
    /// fair share (all partitions divided by the live relays, rounded up): releases extra
    /// partitions, takes free or expired ones. Returns the partitions it holds now.
    pub async fn rebalance(&self, relay: Uuid, lease: Duration) -> Result<Vec<i16>, sqlx::Error> {
        Ok(self.rebalance_keeping(relay, lease, &[], &[]).await?.owned)
    }

    /// [`Store::rebalance`], for a relay with rows of the `busy` partitions in hand: an extra
    /// partition that is busy is not released but kept, leased and returned as draining,
    /// to be read no more and released once its rows are settled, so that no other relay
    /// reads them meanwhile. The partitions it keeps are, first, those it reads (not
    /// `draining` since the last call) and busy, then the others it reads; partitions
    /// draining already are the first to go.
    #[tracing::instrument(skip_all, err)]
    pub async fn rebalance_keeping(
        &self,
        relay: Uuid,
        lease: Duration,
        busy: &[i16],
        draining: &[i16],
    ) -> Result<Share, sqlx::Error> {
        let s = &self.schema;
        let lease_secs = lease.as_secs_f64();
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO {s}.relays (relay_id) VALUES ($1)
             ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now()"
        ))
        .bind(relay)
        .execute(&mut *tx)
        .await?;
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {s}.relays WHERE heartbeat_at > now() - make_interval(secs => $1)"
        ))
        .bind(lease_secs)
        .fetch_one(&mut *tx)
        .await?;
        let live = live.max(1);
        let share = (i64::from(PARTITIONS) + live - 1) / live;
        let mut owned: Vec<i16> = sqlx::query_scalar(&format!(
            "UPDATE {s}.partitions SET lease_until = now() + make_interval(secs => $2)
             WHERE owner = $1 RETURNING partition"
        ))
        .bind(relay)
        .bind(lease_secs)
        .fetch_all(&mut *tx)
        .await?;
        // Partitions draining already go first; of the others, busy ones stay first, so
        // that as few as possible have to drain.
        owned.sort_unstable_by_key(|p| (draining.contains(p), !busy.contains(p), *p));
        let have = owned.len() as i64;
        let mut draining = Vec::new();
        if have > share {
            let extra = owned.split_off(share as usize);
            let (busy_extra, idle_extra): (Vec<i16>, Vec<i16>) =
                extra.into_iter().partition(|p| busy.contains(p));
            draining = busy_extra;
            sqlx::query(&format!(
                "UPDATE {s}.partitions SET owner = NULL, lease_until = '-infinity'
                 WHERE partition = ANY($1) AND owner = $2"
            ))
            .bind(&idle_extra)
            .bind(relay)
            .execute(&mut *tx)
            .await?;
        } else if have < share {
            let taken: Vec<i16> = sqlx::query_scalar(&format!(
                "UPDATE {s}.partitions SET owner = $1, lease_until = now() + make_interval(secs => $2)
                 WHERE partition IN (
                     SELECT partition FROM {s}.partitions
                     WHERE owner IS NULL OR lease_until < now()
                     ORDER BY partition
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED)
                 RETURNING partition"
            ))
            .bind(relay)
            .bind(lease_secs)
            .bind(share - have)
            .fetch_all(&mut *tx)
            .await?;
            owned.extend(taken);
        }
        owned.sort_unstable();
        sqlx::query(&format!(
            "DELETE FROM {s}.relays WHERE heartbeat_at < now() - make_interval(secs => $1)"
        ))
        .bind(lease_secs * 10.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Share { owned, draining })
    }

    /// Renews the leases `relay` holds, taking and giving up none (while it shuts down, so
    /// that no partition changes hands before its in-flight messages are settled).
    pub async fn renew(&self, relay: Uuid, lease: Duration) -> Result<(), sqlx::Error> {
        let s = &self.schema;
        sqlx::query(&format!(
            "UPDATE {s}.partitions SET lease_until = now() + make_interval(secs => $2)
             WHERE owner = $1 AND lease_until > now()"
        ))
        .bind(relay)
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Gives up every partition `relay` holds and forgets the relay (on shutdown), so the
    /// others take over at once instead of after the lease.
    pub async fn release_all(&self, relay: Uuid) -> Result<(), sqlx::Error> {
        let s = &self.schema;
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "UPDATE {s}.partitions SET owner = NULL, lease_until = '-infinity' WHERE owner = $1"
        ))
        .bind(relay)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!("DELETE FROM {s}.relays WHERE relay_id = $1"))
            .bind(relay)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Deletes `delivered` and `discarded` records older than their windows, `batch` rows
    /// per statement (each its own short transaction, skipping rows another purger holds).
    /// Returns how many of each were deleted.
    pub async fn purge(&self, r: Retention) -> Result<(u64, u64), sqlx::Error> {
        let mut counts = [0u64; 2];
        for (i, (table, column, window)) in [
            ("delivered", "delivered_at", r.delivered),
            ("discarded", "discarded_at", r.discarded),
        ]
        .into_iter()
        .enumerate()
        {
            let sql = format!(
                "DELETE FROM {s}.{table} WHERE id IN (
                     SELECT id FROM {s}.{table}
                     WHERE {column} < now() - make_interval(secs => $1)
                     ORDER BY {column}
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED)",
                s = self.schema
            );
            loop {
                let n = sqlx::query(&sql)
                    .bind(window.as_secs_f64())
                    .bind(i64::from(r.batch))
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                counts[i] += n;
                if n < u64::from(r.batch) {
                    break;
                }
            }
        }
        Ok((counts[0], counts[1]))
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

/// What `outbox-relay run` does to each table of the outbox schema; the README's "Least
/// privilege" grants give exactly this.
pub const RELAY_PRIVILEGES: &[(&str, &[&str])] = &[
    ("messages", &["SELECT", "UPDATE", "DELETE"]),
    ("partitions", &["SELECT", "UPDATE"]),
    ("relays", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    ("relay_waiters", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    ("delivered", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    ("discarded", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
];

/// The privileges of [`RELAY_PRIVILEGES`] (and `USAGE` on the schema) that the connected
/// role lacks, as `"DELETE on outbox.messages"`.
pub async fn missing_privileges(
    pool: &PgPool,
    schema: &Schema,
) -> Result<Vec<String>, sqlx::Error> {
    let usage: bool = sqlx::query_scalar("SELECT has_schema_privilege($1, 'USAGE')")
        .bind(schema.to_string())
        .fetch_one(pool)
        .await?;
    if !usage {
        return Ok(vec![format!("USAGE on schema {schema}")]);
    }
    let (tables, privileges): (Vec<String>, Vec<&str>) = RELAY_PRIVILEGES
        .iter()
        .flat_map(|(table, privileges)| {
            privileges
                .iter()
                .map(move |p| (format!("{schema}.{table}"), *p))
        })
        .unzip();
    sqlx::query_scalar(
        "SELECT p || ' on ' || t FROM unnest($1::text[], $2::text[]) AS g(t, p)
         WHERE NOT has_table_privilege(t, p)",
    )
    .bind(&tables)
    .bind(&privileges)
    .fetch_all(pool)
    .await
}

fn envelope(row: &PgRow, max_payload: u64) -> Result<Envelope, String> {
    let get_err = |e: sqlx::Error| format!("row could not be read: {e}");
    let size: i64 = row.try_get("size").map_err(get_err)?;
    if size as u64 > max_payload {
        return Err(format!(
            "{TOO_LARGE}the payload is {size} bytes, over relay.max_payload ({max_payload})"
        ));
    }
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
    let micros: i64 = row.try_get("created_at_micros").map_err(get_err)?;
    Ok(Envelope {
        seq: row.try_get("seq").map_err(get_err)?,
        partition: row.try_get("partition").map_err(get_err)?,
        id: row.try_get("id").map_err(get_err)?,
        topic: row.try_get("topic").map_err(get_err)?,
        key: row.try_get("key").map_err(get_err)?,
        payload: row.try_get("payload").map_err(get_err)?,
        headers,
        content_type: row.try_get("content_type").map_err(get_err)?,
        created_at_unix: micros.div_euclid(1_000_000),
        created_at_micros: micros,
        attempts: attempts.max(0) as u32,
        replay_of: row.try_get("replay_of").map_err(get_err)?,
    })
}
