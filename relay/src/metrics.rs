//! The relay's metrics, recorded through the `metrics` facade so the loop knows nothing of
//! the exporter; the binary installs a Prometheus recorder and serves it on `/metrics`
//! ([`crate::http`]). Without a recorder (a library user, a test) recording is a no-op.
//!
//! Names follow Prometheus' guide; labels are of small, bounded cardinality (outbox topic,
//! failure class), never a message id or key.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

/// Messages the broker confirmed (and the relay then deleted), by `topic`.
pub const PUBLISHED: &str = "outbox_messages_published_total";
/// Failed publish attempts, by `topic` and `reason`: `rejected` (nack, return, channel
/// closed over the message; retried), `permanent` (can never be published: dead at once),
/// `too_large` (over the broker's limits, checked before sending), `malformed` (the row
/// cannot be read), `unavailable` (broker down; no attempt counted).
pub const FAILURES: &str = "outbox_publish_failures_total";
/// Messages parked as dead, by `topic`.
pub const DEAD: &str = "outbox_messages_dead_total";
/// Failed messages scheduled for another attempt, by `topic`.
pub const RETRIED: &str = "outbox_messages_retried_total";
/// Pending rows (not delivered, not dead), by `topic`; read every `http.backlog_interval`.
pub const BACKLOG: &str = "outbox_backlog_messages";
/// Dead rows waiting for an operator, by `topic`.
pub const DEAD_BACKLOG: &str = "outbox_dead_messages";
/// Pending rows held back behind a dead row of their key, by `topic`.
pub const HELD_BACK: &str = "outbox_held_back_messages";
/// Age of the oldest pending row, by `topic`, in seconds (0 when none is pending).
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
/// Partitions this relay holds a lease on.
pub const PARTITIONS_OWNED: &str = "outbox_partitions_owned";
/// Relays that heartbeated within their lease, this one included.
pub const RELAYS_LIVE: &str = "outbox_relays_live";
/// 1 while the broker connection is up, 0 otherwise.
pub const BROKER_UP: &str = "outbox_broker_up";
/// 1 while the broker holds publishing back (RabbitMQ's `connection.blocked`, sent on a
/// memory or disk alarm), 0 otherwise: an outage the relay waits out without reconnecting.
pub const BROKER_BLOCKED: &str = "outbox_broker_blocked";
/// New broker connections after the first (reconnects), and replaced Kafka producers.
pub const BROKER_RECONNECTS: &str = "outbox_broker_reconnects_total";
/// Time from sending a message to the broker's confirm, by `topic`.
pub const PUBLISH_DURATION: &str = "outbox_publish_duration_seconds";
/// Time from the row's `created_at` (the producer's transaction) to the broker's confirm,
/// by `topic`.
pub const COMMIT_TO_CONFIRM: &str = "outbox_commit_to_confirm_seconds";
/// Time to read one batch of rows.
pub const CLAIM_DURATION: &str = "outbox_claim_duration_seconds";
/// Time to record one batch's outcome (delete delivered, record failures).
pub const SETTLE_DURATION: &str = "outbox_settle_duration_seconds";
/// Rows per claimed batch.
pub const BATCH_SIZE: &str = "outbox_batch_size";

/// Bucket bounds of the latency histograms, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
/// Bucket bounds of [`BATCH_SIZE`].
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Registers help texts; call once after installing a recorder.
pub fn describe() {
    describe_counter!(PUBLISHED, "Messages the broker confirmed");
    describe_counter!(
        FAILURES,
        "Failed publish attempts, by reason (rejected, permanent, too_large, malformed, unavailable)"
    );
    describe_counter!(DEAD, "Messages parked as dead");
    describe_counter!(RETRIED, "Failed messages scheduled for another attempt");
    describe_gauge!(BACKLOG, "Pending outbox rows");
    describe_gauge!(DEAD_BACKLOG, "Dead outbox rows waiting for an operator");
    describe_gauge!(
        HELD_BACK,
        "Pending rows waiting behind a dead row of their key"
    );
    describe_gauge!(
        OLDEST_PENDING_AGE,
        metrics::Unit::Seconds,
        "Age of the oldest pending row"
    );
    describe_gauge!(PARTITIONS_OWNED, "Partitions this relay holds a lease on");
    describe_gauge!(RELAYS_LIVE, "Relays that heartbeated within their lease");
    describe_gauge!(BROKER_UP, "1 while the broker connection is up");
    describe_gauge!(
        BROKER_BLOCKED,
        "1 while the broker holds publishing back (RabbitMQ connection.blocked: a memory or disk alarm)"
    );
    describe_counter!(BROKER_RECONNECTS, "Broker reconnects");
    describe_histogram!(
        PUBLISH_DURATION,
        metrics::Unit::Seconds,
        "Send to broker confirm"
    );
    describe_histogram!(
        COMMIT_TO_CONFIRM,
        metrics::Unit::Seconds,
        "Row created_at to broker confirm"
    );
    describe_histogram!(
        CLAIM_DURATION,
        metrics::Unit::Seconds,
        "One read of the outbox"
    );
    describe_histogram!(
        SETTLE_DURATION,
        metrics::Unit::Seconds,
        "One settle: a group commit of outcomes"
    );
    describe_histogram!(BATCH_SIZE, "Rows per read");
    // A counter without labels is there from the start, at 0, so that `rate()` and
    // `increase()` see a relay that never reconnected rather than no series at all.
    counter!(BROKER_RECONNECTS).absolute(0);
}

/// One message confirmed: `sent` is the publish's duration, `since_commit` the time since
/// its row was written.
pub fn published(topic: &str, sent: Duration, since_commit: Option<Duration>) {
    counter!(PUBLISHED, "topic" => topic.to_owned()).increment(1);
    histogram!(PUBLISH_DURATION, "topic" => topic.to_owned()).record(sent);
    if let Some(d) = since_commit {
        histogram!(COMMIT_TO_CONFIRM, "topic" => topic.to_owned()).record(d);
    }
}

/// One failed attempt of class `reason`.
pub fn failed(topic: &str, reason: &'static str) {
    counter!(FAILURES, "topic" => topic.to_owned(), "reason" => reason).increment(1);
}

/// One message parked as dead.
pub fn dead(topic: &str) {
    counter!(DEAD, "topic" => topic.to_owned()).increment(1);
}

/// One failed message scheduled for another attempt.
pub fn retried(topic: &str) {
    counter!(RETRIED, "topic" => topic.to_owned()).increment(1);
}

/// One batch read and settled.
pub fn batch(rows: usize, claim: Duration, settle: Duration) {
    histogram!(BATCH_SIZE).record(rows as f64);
    histogram!(CLAIM_DURATION).record(claim);
    histogram!(SETTLE_DURATION).record(settle);
}

/// One read of the outbox, and the rows it brought.
pub fn claim(rows: usize, took: Duration) {
    histogram!(BATCH_SIZE).record(rows as f64);
    histogram!(CLAIM_DURATION).record(took);
}

/// One settle (a group commit of outcomes).
pub fn settle(took: Duration) {
    histogram!(SETTLE_DURATION).record(took);
}

/// The partitions this relay holds now.
pub fn partitions_owned(n: usize) {
    gauge!(PARTITIONS_OWNED).set(n as f64);
}

/// Whether the broker connection is up.
pub fn broker_up(up: bool) {
    gauge!(BROKER_UP).set(if up { 1.0 } else { 0.0 });
}

/// Whether the broker holds publishing back (see [`BROKER_BLOCKED`]).
pub fn broker_blocked(blocked: bool) {
    gauge!(BROKER_BLOCKED).set(if blocked { 1.0 } else { 0.0 });
}

/// A new broker connection after the first one.
pub fn broker_reconnected() {
    counter!(BROKER_RECONNECTS).increment(1);
}

/// The outbox as `status` sees it: backlog, dead rows and oldest age per topic, and the
/// live relays. Topics that emptied since the last reading are set to zero.
pub fn backlog(status: &crate::status::Status, previous: &mut Vec<String>) {
    let mut seen = Vec::with_capacity(status.topics.len());
    for t in &status.topics {
        gauge!(BACKLOG, "topic" => t.topic.clone()).set(t.pending as f64);
        gauge!(DEAD_BACKLOG, "topic" => t.topic.clone()).set(t.dead as f64);
        gauge!(HELD_BACK, "topic" => t.topic.clone()).set(t.held_back as f64);
        gauge!(OLDEST_PENDING_AGE, "topic" => t.topic.clone())
            .set(t.oldest_pending_secs.unwrap_or(0.0));
        seen.push(t.topic.clone());
    }
    for gone in previous.iter().filter(|t| !seen.contains(t)) {
        gauge!(BACKLOG, "topic" => gone.clone()).set(0.0);
        gauge!(DEAD_BACKLOG, "topic" => gone.clone()).set(0.0);
        gauge!(HELD_BACK, "topic" => gone.clone()).set(0.0);
        gauge!(OLDEST_PENDING_AGE, "topic" => gone.clone()).set(0.0);
    }
    *previous = seen;
    gauge!(RELAYS_LIVE).set(status.relays.len() as f64);
}
