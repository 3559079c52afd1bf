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
    /// Pending rows currently leased by a relay.
    pub in_flight: i64,
    /// Pending rows that failed at least once.
    pub retrying: i64,
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
}

/// Reads the outbox's counts.
pub async fn read(pool: &PgPool, schema: &Schema) -> Result<Status, sqlx::Error> {
    let topics: Vec<TopicStatus> = sqlx::query_as(&format!(
        "SELECT topic,
                count(*) FILTER (WHERE status = 'pending') AS pending,
                count(*) FILTER (WHERE status = 'pending' AND lease_until > now()) AS in_flight,
                count(*) FILTER (WHERE status = 'pending' AND attempts > 0) AS retrying,
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
        total.in_flight += t.in_flight;
        total.retrying += t.retrying;
        total.dead += t.dead;
        total.oldest_pending_secs = match (total.oldest_pending_secs, t.oldest_pending_secs) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(Status {
        schema: schema.to_string(),
        total,
        topics,
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
            "TOPIC", "PENDING", "IN-FLIGHT", "RETRYING", "DEAD"
        )?;
        for t in self.topics.iter().chain(std::iter::once(&self.total)) {
            let name = if t.topic == "*" { "TOTAL" } else { &t.topic };
            writeln!(
                f,
                "{name:<width$}  {:>9}  {:>9}  {:>9}  {:>9}  {}",
                t.pending,
                t.in_flight,
                t.retrying,
                t.dead,
                age(t.oldest_pending_secs)
            )?;
        }
        Ok(())
    }
}
