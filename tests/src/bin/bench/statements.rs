//! What the outbox's PostgreSQL spends its query time on, from `pg_stat_statements` (loaded by
//! `scripts/bench.sh` for the benchmark's cluster only), split by what each query is for.

use std::{collections::BTreeMap, fmt};

use sqlx::PgPool;

/// Leads every query the benchmark itself sends while it measures, so that it is counted
/// apart from the relay's.
pub const OWN: &str = "/* outbox-bench */ ";

/// What a query is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Reads,
    Settles,
    Leases,
    Sweeps,
    Gauges,
    /// Transaction control, LISTEN and the rest.
    Other,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Reads => "reads",
            Part::Settles => "settles",
            Part::Leases => "leases",
            Part::Sweeps => "sweeps and purges",
            Part::Gauges => "gauges",
            Part::Other => "other",
        })
    }
}

/// What one query is for, by its text; `None` for the benchmark's own.
fn part(query: &str) -> Option<Part> {
    let has = |s: &str| query.contains(s);
    Some(if query.starts_with(OWN.trim_end()) {
        return None;
    } else if has("LIMIT q.lim") || has("ORDER BY m.seq LIMIT") {
        Part::Reads
    } else if has("SET attempts = m.attempts + 1")
        || (has("DELETE FROM") && has(".messages") && has("seq = ANY"))
    {
        Part::Settles
    } else if has("oldest_pending_secs") || has("r.relay_id,") || has("owner IS NULL OR") {
        Part::Gauges
    } else if has("held_back") || has(".delivered") || has(".discarded") {
        Part::Sweeps
    } else if has(".partitions") || has(".relays") || has("relay_waiters") {
        Part::Leases
    } else {
        Part::Other
    })
}

/// Query time (ms, as `pg_stat_statements` counts it: execution, not planning) and calls,
/// by part, of one database.
#[derive(Debug, Default, Clone)]
pub struct QueryTime {
    pub ms: BTreeMap<Part, f64>,
    pub calls: BTreeMap<Part, i64>,
}

impl QueryTime {
    pub fn total_ms(&self) -> f64 {
        self.ms.values().sum()
    }

    /// Microseconds per message of `n`, in all and by part, for a report's note.
    pub fn per_message(&self, n: usize) -> String {
        let us = |ms: f64| ms * 1000.0 / n as f64;
        let parts: Vec<String> = self
            .ms
            .iter()
            .map(|(part, &ms)| format!("{part} {:.1} ({} calls)", us(ms), self.calls[part]))
            .collect();
        format!(
            "query time {:.1} µs/msg: {}",
            us(self.total_ms()),
            parts.join(", ")
        )
    }
}

/// Whether `pg_stat_statements` is loaded in the cluster of `pool`; creates the extension in
/// its database when it is.
pub async fn available(pool: &PgPool) -> bool {
    let loaded: Option<String> = sqlx::query_scalar(
        "SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'",
    )
    .fetch_optional(pool)
    .await
    .ok()
    .flatten();
    if !loaded.is_some_and(|l| l.contains("pg_stat_statements")) {
        return false;
    }
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await
        .is_ok()
}

/// Forgets what was counted so far, in the whole cluster.
pub async fn reset(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(&format!("{OWN}SELECT pg_stat_statements_reset()"))
        .execute(pool)
        .await?;
    Ok(())
}

/// What was counted since the last [`reset`] in the database of `pool`.
pub async fn collect(pool: &PgPool) -> anyhow::Result<QueryTime> {
    let rows: Vec<(String, f64, i64)> = sqlx::query_as(&format!(
        "{OWN}SELECT query, total_exec_time, calls FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
    ))
    .fetch_all(pool)
    .await?;
    let mut t = QueryTime::default();
    for (query, ms, calls) in rows {
        if let Some(p) = part(&query) {
            *t.ms.entry(p).or_default() += ms;
            *t.calls.entry(p).or_default() += calls;
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relays_queries_are_told_apart_and_the_benchmarks_left_out() {
        let read = "SELECT w.seq FROM (SELECT r.* FROM unnest($1) CROSS JOIN LATERAL \
                    (SELECT m.seq FROM outbox.messages m WHERE NOT m.held_back LIMIT q.lim) r) w";
        assert_eq!(part(read), Some(Part::Reads));
        let delete = "WITH gone AS (DELETE FROM outbox.messages WHERE seq = ANY($1)) SELECT 1";
        assert_eq!(part(delete), Some(Part::Settles));
        assert_eq!(
            part("UPDATE outbox.messages m SET held_back = true"),
            Some(Part::Sweeps)
        );
        assert_eq!(
            part("UPDATE outbox.partitions SET lease_until = now()"),
            Some(Part::Leases)
        );
        assert_eq!(
            part("SELECT count(*) FROM outbox.partitions WHERE owner IS NULL OR lease_until <= now()"),
            Some(Part::Gauges)
        );
        assert_eq!(part("COMMIT"), Some(Part::Other));
        assert_eq!(
            part(&format!("{OWN}SELECT count(*) FROM outbox.partitions")),
            None
        );
    }
}
