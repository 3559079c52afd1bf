//! # outbox-relay: publishes committed outbox rows to a broker
//!
//! The relay claims rows that committed transactions wrote to the outbox table, publishes
//! each to the broker, and deletes it once the broker confirms it (RabbitMQ publisher
//! confirms with `mandatory`). Nothing is marked delivered without a confirm, so delivery
//! is **at least once**: a relay that dies between the confirm and the delete publishes the
//! message again after its lease expires, and consumers deduplicate on the message id.
//!
//! Layout: [`store`] holds every SQL statement (and knows no broker), [`publish`] holds one
//! folder per broker, each with its settings (and knows no SQL), `pipeline` streams rows from
//! one to the other (read → dispatch → settle, all under way at once, one `Worker::step` at a time), and [`relay`] runs the
//! pipelines as tasks beside the partition leases (`leases`), the wake-ups (`wake`) and the
//! chores (`chores`: purge, held-back sweep, gauges), and drains them on shutdown. The suspect
//! rule is in `suspects`, what a failed publish comes to in `verdict`, and why a relay stops
//! in [`error`].
#![deny(missing_docs)]

mod checks;
mod chores;
pub mod cli;
pub mod config;
pub mod dead;
pub mod envelope;
pub mod error;
pub mod health;
pub mod http;
mod leases;
pub mod metrics;
mod pipeline;
pub mod publish;
pub mod reconcile;
pub mod relay;
pub mod replay;
pub mod retry;
pub mod route;
mod secrets;
pub mod startup;
pub mod status;
pub mod store;
mod suspects;
pub mod telemetry;
mod verdict;
mod wake;
