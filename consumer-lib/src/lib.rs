//! # outbox-consumer: exactly-once effects from at-least-once delivery
//!
//! Brokers deliver at least once: after a crash, a rebalance or a lost ack, a message comes
//! again. This crate makes the second delivery a no-op. [`Deduplicator::handle`] opens a
//! PostgreSQL transaction, records `(consumer group, message id)` in the `processed` table,
//! runs your [`Handler`] **in that same transaction**, and commits; only then does the
//! source acknowledge the message (RabbitMQ ack, Kafka offset). A delivery whose id is
//! already recorded is acknowledged and skipped.
//!
//! So the *effects* of a message happen once, as long as they are writes in the handler's
//! transaction. Effects outside the database (an e-mail, an HTTP call) are not covered: make
//! those idempotent themselves, or write them to an outbox in the same transaction.
//!
//! - **Failures**: a handler returns [`HandlerError::Retryable`] (rolled back, tried again
//!   with capped backoff) or [`HandlerError::Permanent`]. After `max_attempts` retryable
//!   failures, or at once for a permanent one, the message is parked in `dead_letters`
//!   (payload, headers, error, attempts), marked processed and acknowledged, so one poison
//!   message does not block its queue or partition.
//! - **Order**: the sources handle messages of one key (RabbitMQ) or one partition (Kafka)
//!   one at a time, retrying in place, so effects of a key follow the relay's `seq` order.
//!   A parked message is skipped: the key's later messages go on without it.
//! - **Message ids** come from the relay's `outbox-id` header (or the AMQP `message-id`
//!   property). A message without one is dead-lettered by default, or keyed by a hash of
//!   its topic, key and payload ([`MissingId::DeriveFromContent`]); it is never handled
//!   without dedup.
//! - **Tracing**: each delivery is handled in a `handle` span (group, source, message id).
//!   With the `opentelemetry` feature, the producer's W3C `traceparent` header becomes that
//!   span's OpenTelemetry parent (for a subscriber with a `tracing-opentelemetry` layer).
//! - **Operators** replay or discard dead letters ([`DeadLetters`], the `outbox-consumer`
//!   command of the `cli` feature). A replay runs the handler again through the dedup step
//!   ([`Deduplicator::replay_dead_letters`]; the sources pick up replays an operator asked
//!   for, [`Deduplicator::serve_replays`]), so it never applies an effect twice: a message
//!   that was handled meanwhile is settled as a duplicate without running the handler.
//! - **Audits** read a consumer schema without changing it: [`DedupRecords`] (the groups and
//!   what each handled) and [`DeadLetters::summaries`] (a group's letters without payloads),
//!   what `outbox-relay reconcile` compares with the outbox.
//! - **Retention**: [`Deduplicator::purge`] deletes `processed` rows older than a window in
//!   bounded batches. The window must exceed the longest time a broker may redeliver a
//!   message (unacked redelivery, Kafka retention for a consumer that rewinds); a delivery
//!   older than the window would be handled again.
#![deny(missing_docs)]

#[cfg(feature = "cli")]
pub mod cli;
mod dedup;
mod error;
mod incoming;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(any(feature = "rabbitmq", feature = "kafka"))]
mod lane;
pub mod letters;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
mod replay;
#[cfg(feature = "opentelemetry")]
mod trace;

pub use dedup::{
    migrate, DedupRecords, Deduplicator, Handler, MissingId, Outcome, RetryPolicy, Stats,
    CONSUMER_SCHEMA_VERSION,
};
pub use error::{ConsumerError, HandlerError};
pub use incoming::Incoming;
pub use letters::{DeadLetter, DeadLetters, LetterFilter, LetterSummary};
pub use replay::{Replay, ReplayOutcome};

/// The header every relayed message carries its id in; deduplicate on it.
pub const MESSAGE_ID_HEADER: &str = outbox::wire::HEADER_ID;
