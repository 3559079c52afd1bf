//! The held-back sweep: rows that wait behind an earlier row of their key leave the read
//! path, so that reads step over them instead of walking them.
//!
//! A key's **head** is its oldest row that holds the later ones back: a dead row (under
//! `block`), or a row waiting out a retry delay that has at least [`MARK_RETRYING_FOR`] left
//! to run. The sweep marks `held_back` the pending rows behind each head, and clears the
//! marks of keys whose head has gone (delivered, retried, discarded, or due again). A mark
//! only ever holds rows back, so a stale one delays a key and never reorders it; a row
//! that should be marked and is not is still never read out of order (every read checks
//! the rows before it), it only costs reads a look.
//!
//! **Bounded.** Finding the heads reads only failed rows (`messages_failed_heads_idx`).
//! Behind each head the sweep walks its partition's pending rows once: it remembers how far
//! it walked (per head, by the head's seq and the time of its last failure), and the next
//! sweep walks only the rows that arrived since. A sweep with nothing new to mark reads one
//! index entry per partition with a head, however long the backlog behind it. A row that
//! commits late with a `seq` below what was walked is not marked; reads pass it as before.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use outbox::Schema;
use sqlx::Row;
use uuid::Uuid;

use super::{DeadKeyPolicy, Store};

/// Rows one statement walks behind one head.
const WALK_BATCH: i64 = 10_000;

/// A retrying row's later rows are marked only while its delay has at least this long to
/// run: for a shorter wait, marking and clearing them costs more than reads stepping past
/// them until it is over.
const MARK_RETRYING_FOR: Duration = Duration::from_secs(2);

/// A head as the sweep remembers it: its key, its seq, and when it last failed (a head
/// that fails again, or dies again after a retry, is walked behind again from its seq).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Head {
    key: String,
    seq: i64,
    failed_at: i64,
}

/// How far each head has been walked behind (the highest seq looked at).
#[derive(Debug, Clone, Default)]
pub(super) struct Walked(Arc<Mutex<HashMap<Head, i64>>>);

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Rows marked held back.
    pub marked: u64,
    /// Rows whose mark was cleared.
    pub cleared: u64,
    /// Pending rows looked at behind the heads (of every key).
    pub walked: u64,
}

/// A head with the rows behind it still to walk: `(after, upto]` of its partition.
struct Walk {
    head: Head,
    partition: i16,
    after: i64,
    upto: i64,
}

/// Which earlier row of a key holds its later rows back, as a condition on the row `d`.
fn blocking(policy: DeadKeyPolicy, delay_left: &str) -> String {
    let retrying =
        format!("(d.status = 'pending' AND d.attempts > 0 AND d.available_at > now(){delay_left})");
    match policy {
        DeadKeyPolicy::Block => format!("(d.status = 'dead' OR {retrying})"),
        DeadKeyPolicy::Skip => retrying,
    }
}

impl Store {
    /// Keeps the `held_back` marks of the partitions `relay` leases true (see the module
    /// docs): marks the pending rows that arrived behind each head since the last sweep,
    /// and clears the marks of keys whose head has gone.
    #[tracing::instrument(skip_all, err)]
    pub async fn hold_back(&self, relay: Uuid) -> Result<Sweep, sqlx::Error> {
        let mut sweep = Sweep::default();
        let heads = self.heads(relay).await?;
        let mut walks = Vec::new();
        let mut walked: HashMap<Head, i64> = HashMap::with_capacity(heads.len());
        {
            let before = self.walked.0.lock().expect("sweep state");
            for (head, partition, upto) in heads {
                let after = before.get(&head).copied().unwrap_or(head.seq).max(head.seq);
                match upto {
                    Some(upto) if upto > after => walks.push(Walk {
                        head,
                        partition,
                        after,
                        upto,
                    }),
                    _ => {
                        walked.insert(head, after);
                    }
                }
            }
        }
        while !walks.is_empty() {
            let results = self.walk(&walks).await?;
            let mut next = Vec::new();
            for (mut w, (looked, marked, last)) in walks.into_iter().zip(results) {
                sweep.walked += looked;
                sweep.marked += marked;
                match last {
                    Some(last) if looked >= WALK_BATCH as u64 && last < w.upto => {
                        w.after = last;
                        next.push(w);
                    }
                    _ => {
                        walked.insert(w.head, w.upto);
                    }
                }
            }
            walks = next;
        }
        // Heads gone are forgotten.
        *self.walked.0.lock().expect("sweep state") = walked;
        sweep.cleared = self.clear_freed(relay).await?;
        Ok(sweep)
    }

    /// Each key's head in the partitions `relay` leases, with the highest seq of an unmarked
    /// pending row in its partition (`None`: there is none).
    async fn heads(&self, relay: Uuid) -> Result<Vec<(Head, i16, Option<i64>)>, sqlx::Error> {
        let s = &self.schema;
        let head = blocking(self.policy, " + make_interval(secs => $2)");
        let rows = sqlx::query(&format!(
            "SELECT h.key, h.partition, h.seq, h.failed_at,
                    (SELECT max(x.seq) FROM {s}.messages x
                     WHERE x.partition = h.partition AND x.status = 'pending' AND NOT x.held_back)
                        AS upto
             FROM (
                 SELECT DISTINCT ON (d.key) d.key, d.partition, d.seq,
                        (extract(epoch FROM coalesce(d.dead_at, d.available_at)) * 1000000)::bigint
                            AS failed_at
                 FROM {s}.messages d
                 WHERE d.key IS NOT NULL AND (d.status = 'dead' OR d.attempts > 0)
                   AND d.partition IN (SELECT partition FROM {s}.partitions
                                       WHERE owner = $1 AND lease_until > now())
                   AND {head}
                 ORDER BY d.key, d.seq
             ) h"
        ))
        .bind(relay)
        .bind(MARK_RETRYING_FOR.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let head = Head {
                    key: r.try_get("key")?,
                    seq: r.try_get("seq")?,
                    failed_at: r.try_get("failed_at")?,
                };
                Ok((head, r.try_get("partition")?, r.try_get("upto")?))
            })
            .collect()
    }

    /// One step of each walk: up to [`WALK_BATCH`] pending rows after `after` (up to
    /// `upto`) in the head's partition, of which those of the head's key are marked. Returns,
    /// per walk, the rows looked at, the rows marked and the last seq looked at.
    async fn walk(&self, walks: &[Walk]) -> Result<Vec<(u64, u64, Option<i64>)>, sqlx::Error> {
        let s = &self.schema;
        let keys: Vec<&str> = walks.iter().map(|w| w.head.key.as_str()).collect();
        let partitions: Vec<i16> = walks.iter().map(|w| w.partition).collect();
        let after: Vec<i64> = walks.iter().map(|w| w.after).collect();
        let upto: Vec<i64> = walks.iter().map(|w| w.upto).collect();
        let rows = sqlx::query(&format!(
            "WITH w AS (
                 SELECT * FROM unnest($1::text[], $2::smallint[], $3::bigint[], $4::bigint[])
                     WITH ORDINALITY AS w(key, partition, after, upto, i)
             ), looked AS (
                 SELECT w.i, w.key AS head_key, r.seq, r.key
                 FROM w CROSS JOIN LATERAL (
                     SELECT m.seq, m.key FROM {s}.messages m
                     WHERE m.partition = w.partition AND m.seq > w.after AND m.seq <= w.upto
                       AND m.status = 'pending' AND NOT m.held_back
                     ORDER BY m.seq
                     LIMIT $5
                 ) r
             ), marked AS (
                 UPDATE {s}.messages m SET held_back = true
                 FROM looked l
                 WHERE m.seq = l.seq AND l.key = l.head_key
                   AND m.status = 'pending' AND NOT m.held_back
                 RETURNING m.seq
             )
             SELECT l.i, count(*) AS looked,
                    count(*) FILTER (WHERE l.seq IN (SELECT seq FROM marked)) AS marked,
                    max(l.seq) AS last
             FROM looked l GROUP BY l.i"
        ))
        .bind(&keys)
        .bind(&partitions)
        .bind(&after)
        .bind(&upto)
        .bind(WALK_BATCH)
        .fetch_all(&self.pool)
        .await?;
        let mut out = vec![(0, 0, None); walks.len()];
        for r in rows {
            let i: i64 = r.try_get("i")?;
            let looked: i64 = r.try_get("looked")?;
            let marked: i64 = r.try_get("marked")?;
            if let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| out.get_mut(i)) {
                *slot = (looked as u64, marked as u64, r.try_get("last")?);
            }
        }
        Ok(out)
    }

    /// Clears the marks of the keys, in the partitions `relay` leases, whose first marked
    /// row no longer has a head before it. The keys with marks are found with one index
    /// probe each (a loose index scan).
    async fn clear_freed(&self, relay: Uuid) -> Result<u64, sqlx::Error> {
        let s = &self.schema;
        let head = blocking(self.policy, "");
        let keys: Vec<String> = sqlx::query_scalar(&format!(
            "WITH RECURSIVE held(key) AS (
                 (SELECT m.key FROM {s}.messages m
                  WHERE m.held_back AND m.key IS NOT NULL
                  ORDER BY m.key LIMIT 1)
                 UNION ALL
                 SELECT (SELECT m.key FROM {s}.messages m
                         WHERE m.held_back AND m.key > h.key
                         ORDER BY m.key LIMIT 1)
                 FROM held h WHERE h.key IS NOT NULL
             )
             SELECT h.key FROM held h
             WHERE h.key IS NOT NULL
               AND (hashtext(h.key) & 63)::smallint IN (
                   SELECT partition FROM {s}.partitions WHERE owner = $1 AND lease_until > now())
               AND NOT EXISTS (
                   SELECT 1 FROM {s}.messages d
                   WHERE d.key = h.key AND {head}
                     AND d.seq < (SELECT min(x.seq) FROM {s}.messages x
                                  WHERE x.key = h.key AND x.held_back))"
        ))
        .bind(relay)
        .fetch_all(&self.pool)
        .await?;
        release_held(&self.pool, s, self.policy, &keys).await
    }
}

/// Clears the `held_back` marks of `keys`' rows that no head of their key precedes (a dead
/// row under `block`, or a row waiting out a retry delay): after that row was retried,
/// discarded or delivered. Returns the rows cleared.
pub async fn release_held<'c, E>(
    db: E,
    schema: &Schema,
    policy: DeadKeyPolicy,
    keys: &[String],
) -> Result<u64, sqlx::Error>
where
    E: sqlx::PgExecutor<'c>,
{
    if keys.is_empty() {
        return Ok(0);
    }
    let head = blocking(policy, "");
    Ok(sqlx::query(&format!(
        "UPDATE {schema}.messages m SET held_back = false
         WHERE m.held_back AND m.key = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM {schema}.messages d
                           WHERE d.key = m.key AND d.seq < m.seq AND {head})"
    ))
    .bind(keys)
    .execute(db)
    .await?
    .rows_affected())
}
