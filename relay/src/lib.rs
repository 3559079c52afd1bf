//! # outbox-relay: publishes committed outbox rows to a broker
//!
//! The relay claims rows that committed transactions wrote to the outbox table, publishes
//! each to the broker, and deletes it once the broker confirms it (RabbitMQ publisher
//! confirms with `mandatory`). Nothing is marked delivered without a confirm, so delivery
//! is **at least once**: a relay that dies between the confirm and the delete publishes the
//! message again after its lease expires, and consumers deduplicate on the message id.
//!
//! Layout: [`store`] holds every SQL statement (and knows no broker), [`publish`] holds one
//! folder per broker (and knows no SQL), `pipeline` streams rows from one to the other
//! (read → publish → settle, all under way at once), and [`relay`] runs the pipelines with
//! the partition leases, wake-ups and shutdown around them. A single batch step,
//! [`relay::Relay::relay_once`], is public for embedding and tests.
#![deny(missing_docs)]

pub mod cli;
pub mod config;
pub mod dead;
pub mod envelope;
pub mod health;
pub mod http;
pub mod metrics;
mod pipeline;
pub mod publish;
pub mod reconcile;
pub mod relay;
pub mod retry;
pub mod route;
pub mod status;
pub mod store;
pub mod telemetry;
