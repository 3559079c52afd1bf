//! The consumer's counts as metrics (cargo feature `metrics`), through the `metrics`
//! facade: install any recorder (e.g. `metrics-exporter-prometheus`) in your service and
//! they appear next to your own.
//!
//! - `outbox_consumer_messages_total{group, outcome}`: deliveries by outcome, `processed`,
//!   `duplicate`, `dead_lettered` or `retry` (a retryable failure, rolled back).
//! - `outbox_consumer_handle_duration_seconds{group}`: one delivery's dedup step, handler and
//!   commit, whatever the outcome.

use std::time::Duration;

use crate::Outcome;

/// Deliveries by outcome.
pub const MESSAGES: &str = "outbox_consumer_messages_total";
/// Time to handle one delivery.
pub const HANDLE_DURATION: &str = "outbox_consumer_handle_duration_seconds";

pub(crate) fn record(group: &str, outcome: &Outcome, took: Duration) {
    let outcome = match outcome {
        Outcome::Processed => "processed",
        Outcome::Duplicate => "duplicate",
        Outcome::DeadLettered { .. } => "dead_lettered",
        Outcome::Retry { .. } => "retry",
    };
    metrics::counter!(MESSAGES, "group" => group.to_owned(), "outcome" => outcome).increment(1);
    metrics::histogram!(HANDLE_DURATION, "group" => group.to_owned()).record(took);
}
