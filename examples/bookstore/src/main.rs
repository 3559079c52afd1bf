//! `outbox-bookstore`: the bookstore saga on a running stack (see `scripts/demo.sh`).
//!
//! Reads `DATABASE_URL` (a role that may create roles and schemas), and `AMQP_URL` or, with
//! `--kafka`, `KAFKA_BROKERS`. Exits 0 when the story ended as it must, 1 otherwise.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use outbox_bookstore::{Broker, Config};

/// The bookstore saga: account, warehouse and merchant services joined by their outboxes,
/// relay sidecars and the consumer library; replies that move each order's steps; a parked
/// shipment replayed by an operator; a loss after delivery repaired by `reconcile --repair`;
/// reconciliation; and a check of the final state.
#[derive(Debug, Parser)]
#[command(name = "outbox-bookstore")]
struct Args {
    /// Use Kafka (KAFKA_BROKERS) instead of RabbitMQ (AMQP_URL).
    #[arg(long)]
    kafka: bool,
    /// Orders to place.
    #[arg(long, default_value_t = 10)]
    orders: usize,
    /// PostgreSQL URL of a role that may create roles and schemas.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// The `outbox-relay` binary (default: next to this one).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The `outbox-consumer` binary (default: next to this one).
    #[arg(long)]
    consumer_bin: Option<PathBuf>,
    /// Where the account relay's log goes (the warehouse's and the merchant's: FILE.warehouse,
    /// FILE.merchant).
    #[arg(long)]
    relay_log: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
    let broker = if args.kafka {
        match args.kafka_brokers {
            Some(brokers) => Broker::Kafka { brokers },
            None => return usage("--kafka needs KAFKA_BROKERS (or --kafka-brokers)"),
        }
    } else {
        match args.amqp_url {
            Some(url) => Broker::RabbitMq { url },
            None => return usage("set AMQP_URL (or --amqp-url), or pass --kafka"),
        }
    };
    let mut cfg = Config::new(
        args.database_url,
        broker,
        args.relay_bin.unwrap_or_else(|| here.join("outbox-relay")),
        args.consumer_bin
            .unwrap_or_else(|| here.join("outbox-consumer")),
    );
    cfg.orders = args.orders;
    cfg.relay_log = args.relay_log;
    if args.kafka {
        // Kafka keeps what earlier runs published: topics of this run's own.
        cfg.namespace = format!(
            "bookstore-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
    }
    match outbox_bookstore::run(&cfg).await {
        Ok(summary) if summary.ok() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("outbox-bookstore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("outbox-bookstore: {message}");
    ExitCode::from(2)
}
