//! # outbox-consumer: idempotent handling of relayed messages
//!
//! The receiving half of the outbox pattern. Brokers deliver at least once, so a consumer
//! must make a second delivery of the same message a no-op. This crate will record
//! `(consumer group, message id)` in a dedup table in the same PostgreSQL transaction as the
//! handler's writes and acknowledge only after that transaction commits.
//!
//! Until then, consumers in any language can deduplicate on the `outbox-id` header that the
//! relay sets on every message (see the README's "What arrives at the broker").
#![deny(missing_docs)]

/// The header every relayed message carries its id in; deduplicate on it.
pub const MESSAGE_ID_HEADER: &str = "outbox-id";
