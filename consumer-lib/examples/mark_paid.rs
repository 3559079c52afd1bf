//! A complete consumer service: marks invoices paid when `orders.paid` messages arrive,
//! once per message however often RabbitMQ delivers it, until Ctrl-C or SIGTERM.
//!
//! ```sh
//! DATABASE_URL=postgres://app:secret@localhost/app AMQP_URL=amqp://guest:guest@localhost:5672/%2f \
//!   cargo run -p outbox-consumer --features rabbitmq --example mark_paid
//! ```

use std::sync::Arc;

use anyhow::Context;
use futures::future::BoxFuture;
use outbox_consumer::{rabbitmq::RabbitMqSource, Deduplicator, Handler, HandlerError, Incoming};
use sqlx::{postgres::PgPoolOptions, PgConnection};
use tokio_util::sync::CancellationToken;

struct MarkPaid;

impl Handler for MarkPaid {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            // A payload that can never be handled is parked at once, not retried.
            let order: serde_json::Value =
                serde_json::from_slice(&m.payload).map_err(HandlerError::permanent)?;
            let order_id = order["order"]
                .as_i64()
                .ok_or_else(|| HandlerError::permanent("payload has no \"order\" number"))?;
            // Same transaction as the dedup row: both commit, or neither.
            sqlx::query("UPDATE invoices SET paid = true WHERE order_id = $1")
                .bind(order_id)
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?; // rolled back, tried again with backoff
            Ok(())
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&std::env::var("DATABASE_URL").context("DATABASE_URL")?)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query("CREATE TABLE IF NOT EXISTS invoices (order_id bigint PRIMARY KEY, paid boolean NOT NULL DEFAULT false)")
        .execute(&pool)
        .await?;
    let dedup = Deduplicator::new(pool, "billing")?; // the consumer group
    dedup.migrate().await?; // schema outbox_consumer

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel(); // lanes finish the message in hand, ack it, and stop
        }
    });

    RabbitMqSource::new(
        std::env::var("AMQP_URL").context("AMQP_URL")?,
        "orders.paid",
    )
    .with_prefetch(100)
    .with_concurrency(8) // lanes; one key stays in one lane, so its effects keep seq order
    .run(dedup.clone(), Arc::new(MarkPaid), shutdown)
    .await?;
    let stats = dedup.stats();
    println!(
        "processed {}, duplicates skipped {}, dead-lettered {}",
        stats.processed, stats.duplicates, stats.dead_lettered
    );
    Ok(())
}
