//! `outbox-relay status`: what is pending, how old, what is dead.

use outbox::Schema;
use serde::Serialize;
use sqlx::PgPool;

/// Counts for one topic (or for all, in [`Status::total`]).
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow, PartialEq)]
pub struct TopicStatus {
    /// The outbox topic (`*` in the total).
    pub topic: String,
    /// Rows not yet delivered and not dead (including in-flight and retrying ones).
    pub pending: i64,
    /// Pending rows that failed at least once.
    pub retrying: i64,
    /// Pending rows waiting behind a dead row of their key (`block`), marked by the relay:
    /// they move once that row is retried or discarded.
    pub held_back: i64,
    /// Rows parked as dead.
    pub dead: i64,
    /// Age of the oldest pending row, in seconds.
    pub oldest_pending_secs: Option<f64>,
}

/// The outbox at a glance.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The schema read.
    pub schema: String,
    /// Sums over every topic.
    pub total: TopicStatus,
    /// One entry per topic that has rows.
    pub topics: Vec<TopicStatus>,
    /// Relays that heartbeated within their lease, with the partitions they hold.
    pub relays: Vec<RelayStatus>,
    /// Partitions no live relay holds (their rows wait until one takes them).
    pub unowned_partitions: i64,
}

/// One live relay.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct RelayStatus {
    /// The relay's instance id.
    pub relay_id: uuid::Uuid,
    /// Partitions it holds a live lease on.
    pub partitions: i64,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: f64,
}

/// Reads the outbox's counts.
pub async fn read(pool: &PgPool, schema: &Schema) -> Result<Status, sqlx::Error> {
    let topics: Vec<TopicStatus> = sqlx::query_as(&format!(
        "SELECT topic,
                count(*) FILTER (WHERE status = 'pending') AS pending,
                count(*) FILTER (WHERE status = 'pending' AND attempts > 0) AS retrying,
                count(*) FILTER (WHERE status = 'pending' AND held_back) AS held_back,
                count(*) FILTER (WHERE status = 'dead') AS dead,
                extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending'))::float8
                    AS oldest_pending_secs
         FROM {schema}.messages
         GROUP BY topic
         ORDER BY topic"
    ))
    .fetch_all(pool)
    .await?;
    let mut total = TopicStatus {
        topic: "*".to_owned(),
        ..Default::default()
    };
    for t in &topics {
        total.pending += t.pending;
        total.retrying += t.retrying;
        total.held_back += t.held_back;
        total.dead += t.dead;
        total.oldest_pending_secs = match (total.oldest_pending_secs, t.oldest_pending_secs) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    let relays: Vec<RelayStatus> = sqlx::query_as(&format!(
        "SELECT r.relay_id,
                (SELECT count(*) FROM {schema}.partitions p
                 WHERE p.owner = r.relay_id AND p.lease_until > now()) AS partitions,
                extract(epoch FROM now() - r.heartbeat_at)::float8 AS heartbeat_age_secs
         FROM {schema}.relays r
         WHERE EXISTS (SELECT 1 FROM {schema}.partitions p
                       WHERE p.owner = r.relay_id AND p.lease_until > now())
         ORDER BY r.started_at"
    ))
    .fetch_all(pool)
    .await?;
    let unowned_partitions: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.partitions WHERE owner IS NULL OR lease_until <= now()"
    ))
    .fetch_one(pool)
    .await?;
    Ok(Status {
        schema: schema.to_string(),
        total,
        topics,
        relays,
        unowned_partitions,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let age = |s: Option<f64>| match s {
            None => "-".to_owned(),
            Some(s) => {
                humantime::format_duration(std::time::Duration::from_secs(s.max(0.0) as u64))
                    .to_string()
            }
        };
        let width = self
            .topics
            .iter()
            .map(|t| t.topic.len())
            .max()
            .unwrap_or(0)
            .max(5);
        writeln!(f, "outbox schema {:?}", self.schema)?;
        writeln!(
            f,
            "{:<width$}  {:>9}  {:>9}  {:>9}  {:>9}  OLDEST PENDING",
            "TOPIC", "PENDING", "RETRYING", "HELD BACK", "DEAD"
        )?;
        for t in self.topics.iter().chain(std::iter::once(&self.total)) {
            let name = if t.topic == "*" { "TOTAL" } else { &t.topic };
            writeln!(
                f,
                "{name:<width$}  {:>9}  {:>9}  {:>9}  {:>9}  {}",
                t.pending,
                t.retrying,
                t.held_back,
                t.dead,
                age(t.oldest_pending_secs)
            )?;
        }
        writeln!(f)?;
        if self.relays.is_empty() {
            writeln!(f, "no live relay holds a partition")?;
        }
        for r in &self.relays {
            writeln!(
                f,
                "relay {}  {:>2} partitions  heartbeat {:.1}s ago",
                r.relay_id, r.partitions, r.heartbeat_age_secs
            )?;
        }
        if self.unowned_partitions > 0 {
            writeln!(
                f,
                "{} of 64 partitions have no live owner",
                self.unowned_partitions
            )?;
        }
        Ok(())
    }
}
