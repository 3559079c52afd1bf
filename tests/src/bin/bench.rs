//! The benchmark: the relay against the raw ceilings of the same servers, measured in one
//! run on one machine (disk flush latency drifts during a day: compare only figures of one
//! run). Not a test: it prints figures.
//!
//! - Raw ceilings: RabbitMQ publish with confirms and 1 / 100 / 1,000 outstanding; Kafka's
//!   idempotent producer (`acks=all`), pipelined; PostgreSQL claim + delete with the relay's
//!   own SQL (`Store::claim`, `Store::settle`).
//! - Relay drain of a pre-written backlog of 200-byte messages to each broker, with 1, 100
//!   and 1,000 keys and without keys: msg/s, the ratio to the broker's ceiling, relay CPU
//!   seconds per 10,000 messages and peak RSS (the relay runs as its own process).
//! - What each drain costs the database: the outbox cluster's CPU per message and its query
//!   time per message from `pg_stat_statements`, split into reads, settles, leases, sweeps
//!   and gauges, against a reference loop (a plain indexed read by partition in `seq` order
//!   and a batched delete, over the same backlog); and the relay's CPU against the raw
//!   client's (the lapin and rdkafka ceiling loops).
//! - Steady-state latency commit → consumer at fixed rates, p50/p95/p99/max (RabbitMQ).
//! - Producer: messages/s and commit latency through the `outbox` crate from 8 connections,
//!   one and 100 messages per transaction, without the wake-up trigger, with it and no relay
//!   waiting, and with a relay waiting (every commit sends a NOTIFY).
//! - Consumer library: messages/s handled through dedup with a one-row handler, from each
//!   source, against PostgreSQL's ceiling of 8 connections committing one-row transactions.
//! - Claim cost: the relay's read with and without a dead key holding 100,000 rows back
//!   (`block`) ahead of the other keys' rows.
//! - Peak RSS of a relay draining a 1,000,000-row backlog, and draining 1 MiB (RabbitMQ) and
//!   512 KiB (Kafka) payloads with the default `relay.window_bytes` and a 4 MiB one, beside
//!   the same with 200-byte rows (full mode only).
//!
//! Runs against the stack of `scripts/stack.sh` (`DATABASE_URL`, `AMQP_URL`,
//! `KAFKA_BROKERS`); `scripts/bench.sh` builds in release mode and runs it.
//!
//! Usage: `outbox-bench [--quick] [--json] [--relay-bin PATH] [--only rabbitmq|kafka|claim|consumer|latency|producer|memory]`

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{stream::FuturesUnordered, StreamExt};
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Connection, ConnectionProperties,
};
use outbox::Schema;
use outbox_relay::{
    config::DeadKeyPolicy,
    store::{Archive, Settlement, Store},
};
use serde::Serialize;
use sqlx::{postgres::PgPoolOptions, PgPool};
use uuid::Uuid;

#[path = "bench/statements.rs"]
mod statements;

use statements::QueryTime;

const PAYLOAD: usize = 200;

#[derive(Debug, Serialize)]
struct Row {
    section: &'static str,
    what: String,
    value: f64,
    unit: &'static str,
    note: String,
}

struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn add(
        &mut self,
        section: &'static str,
        what: impl Into<String>,
        value: f64,
        unit: &'static str,
        note: impl Into<String>,
    ) {
        let row = Row {
            section,
            what: what.into(),
            value,
            unit,
            note: note.into(),
        };
        eprintln!(
            "  {:<12} {:<58} {:>12.1} {:<8} {}",
            row.section, row.what, row.value, row.unit, row.note
        );
        self.rows.push(row);
    }
}

struct Env {
    db_url: String,
    amqp_url: String,
    kafka: String,
    relay_bin: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args.iter().any(|a| a == "--json");
    // `--only rabbitmq|kafka|claim|consumer|latency|producer|memory|archive`: that broker's
    // ceiling and drains, or the claim costs, the consumer library, the latencies, the
    // producers' commits, the peak RSS with large payloads or the archive's cost, nothing
    // else (for tuning).
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => Some(
            args.get(i + 1)
                .context(
                    "--only needs rabbitmq, kafka, claim, consumer, latency, producer, memory or archive",
                )?
                .clone(),
        ),
        None => None,
    };
    let runs = |what: &str| only.as_deref().is_none_or(|o| o == what);
    let relay_bin = match args.iter().position(|a| a == "--relay-bin") {
        Some(i) => PathBuf::from(args.get(i + 1).context("--relay-bin needs a path")?),
        None => std::env::current_exe()?.with_file_name("outbox-relay"),
    };
    anyhow::ensure!(
        relay_bin.is_file(),
        "relay binary {} not found (build it, or pass --relay-bin)",
        relay_bin.display()
    );
    let env = Env {
        db_url: std::env::var("DATABASE_URL")
            .context("DATABASE_URL (run through scripts/bench.sh)")?,
        amqp_url: std::env::var("AMQP_URL").context("AMQP_URL")?,
        kafka: std::env::var("KAFKA_BROKERS").context("KAFKA_BROKERS")?,
        relay_bin,
    };
    let mut report = Report { rows: Vec::new() };
    eprintln!(
        "outbox-bench ({} mode), relay {}",
        if quick { "quick" } else { "full" },
        env.relay_bin.display()
    );

    let n_raw = if quick { 3_000 } else { 40_000 };
    let mut rabbit_1000 = 0.0;
    // The ceilings with as many messages outstanding as a drain over 1 and 100 keys can
    // have: a key has one message at RabbitMQ at a time (per-key order).
    let (mut rabbit_1, mut rabbit_100) = (0.0, 0.0);
    // The same ceilings for messages shaped like the relay's.
    let (mut shaped_100, mut shaped_1000) = (0.0, 0.0);
    // The raw clients' CPU seconds per 10,000 messages: lapin at 1,000 outstanding with the
    // relay's headers, rdkafka pipelined.
    let (mut rabbit_client, mut kafka_client) = (0.0, 0.0);
    if runs("rabbitmq") {
        rabbit_1 = rabbit_ceiling(&env, n_raw / 10, 1).await?;
        report.add(
            "ceiling",
            "RabbitMQ publish+confirm, 1 outstanding (wait for each)",
            rabbit_1,
            "msg/s",
            "",
        );
        rabbit_100 = rabbit_ceiling(&env, n_raw, 100).await?;
        report.add(
            "ceiling",
            "RabbitMQ publish+confirm, 100 outstanding",
            rabbit_100,
            "msg/s",
            "",
        );
        rabbit_1000 = rabbit_ceiling(&env, n_raw, 1000).await?;
        report.add(
            "ceiling",
            "RabbitMQ publish+confirm, 1,000 outstanding",
            rabbit_1000,
            "msg/s",
            "",
        );
        // The same with the properties and headers the relay puts on each message: RabbitMQ
        // parses and stores them too, and they cost it about as much as the 200-byte body.
        for (outstanding, ceiling) in [(100, &mut shaped_100), (1000, &mut shaped_1000)] {
            let cpu = own_cpu();
            *ceiling =
                rabbit_ceiling_with(&env, n_raw, outstanding, |i| relay_shaped("bench.raw", i))
                    .await?;
            rabbit_client = (own_cpu() - cpu) / n_raw as f64 * 10_000.0;
            report.add(
                "ceiling",
                format!(
                    "RabbitMQ publish+confirm, {} outstanding, the relay's properties and headers",
                    if outstanding == 1000 {
                        "1,000".to_owned()
                    } else {
                        outstanding.to_string()
                    }
                ),
                *ceiling,
                "msg/s",
                format!("client CPU {rabbit_client:.2} s/10k"),
            );
        }
        for channels in [100, 500] {
            let rate = rabbit_channels_ceiling(&env, n_raw, channels).await?;
            report.add(
                "ceiling",
                format!("RabbitMQ publish+confirm, {channels} channels × 1 outstanding"),
                rate,
                "msg/s",
                "",
            );
        }
    }
    let mut kafka = 0.0;
    if runs("kafka") {
        let n = if quick { 2_000 } else { 20_000 };
        let cpu = own_cpu();
        kafka = kafka_ceiling(&env, n).await?;
        kafka_client = (own_cpu() - cpu) / n as f64 * 10_000.0;
        report.add(
            "ceiling",
            "Kafka idempotent acks=all, pipelined",
            kafka,
            "msg/s",
            format!("client CPU {kafka_client:.2} s/10k"),
        );
    }
    if only.is_none() {
        let pool = fresh_db(&env.db_url, "bench_ceiling").await?;
        let pg = pg_ceiling(&pool, n_raw).await?;
        report.add(
            "ceiling",
            "PostgreSQL claim+delete (relay SQL, batch 1,000)",
            pg,
            "msg/s",
            "",
        );
        pool.close().await;
    }

    let n_drain = if quick { 2_000 } else { 40_000 };
    let mut references = BTreeMap::new();
    if runs("rabbitmq") || runs("kafka") {
        for keys in [100, 1000] {
            let r = reference(&env, n_drain, Some(keys)).await?;
            report.add(
                "database",
                format!(
                    "reference loop (indexed read by partition, batched delete), {n_drain} msgs, \
                     {keys} keys: PostgreSQL CPU"
                ),
                r.pg_us,
                "µs/msg",
                query_note(r.query.as_ref(), n_drain),
            );
            references.insert(keys, r);
        }
    }
    for broker in ["rabbitmq", "kafka"].into_iter().filter(|b| runs(b)) {
        let ceiling = if broker == "rabbitmq" {
            rabbit_1000
        } else {
            kafka
        };
        for keys in [Some(1), Some(100), Some(1000), None] {
            // One key moves at one broker round trip per message: a smaller backlog.
            let n = if keys == Some(1) {
                n_drain / 10
            } else {
                n_drain
            };
            let d = drain(&env, broker, n, keys).await?;
            let label = match keys {
                Some(k) => format!("relay drain → {broker}, {n} msgs, {k} key(s)"),
                None => format!("relay drain → {broker}, {n} msgs, no keys"),
            };
            // For RabbitMQ with few keys, also the ratio to the ceiling with as many
            // outstanding as those keys allow.
            // And, for RabbitMQ, the ratio to the ceiling for messages like the relay's.
            let same_outstanding = match (broker, keys) {
                ("rabbitmq", Some(1)) => {
                    format!(" ({:.2}× the 1-outstanding ceiling)", d.rate / rabbit_1)
                }
                ("rabbitmq", Some(100)) => format!(
                    " ({:.2}× the 100-outstanding ceiling; {:.2}× it with the relay's headers)",
                    d.rate / rabbit_100,
                    d.rate / shaped_100
                ),
                ("rabbitmq", _) => format!(
                    " ({:.2}× the ceiling with the relay's headers)",
                    d.rate / shaped_1000
                ),
                _ => String::new(),
            };
            report.add(
                "drain",
                label.clone(),
                d.rate,
                "msg/s",
                format!(
                    "{:.2}× ceiling{same_outstanding}; CPU {:.2} s/10k; peak RSS {:.1} MiB; \
                     PostgreSQL {:.2} s/10k, broker {:.2} s/10k, machine {:.0}% busy",
                    d.rate / ceiling,
                    d.cpu_per_10k,
                    d.peak_rss_mib,
                    d.pg_per_10k,
                    d.broker_per_10k,
                    d.busy * 100.0
                ),
            );
            let client = if broker == "rabbitmq" {
                rabbit_client
            } else {
                kafka_client
            };
            let reference = keys.and_then(|k| references.get(&k));
            report.add(
                "database",
                format!("{label}: PostgreSQL CPU"),
                d.pg_per_10k * 100.0,
                "µs/msg",
                database_note(&d, reference, n, client),
            );
        }
    }

    let rates: &[(u32, u64)] = if only.as_deref() == Some("latency") {
        &[(50, 10), (2_000, 10)]
    } else if only.is_some() {
        &[]
    } else if quick {
        &[(50, 2)]
    } else {
        &[(50, 10), (2_000, 10)]
    };
    for &(rate, secs) in rates {
        let l = latency(&env, rate, secs).await?;
        report.add(
            "latency",
            format!(
                "commit → consumer at {rate} msg/s (achieved {:.0})",
                l.achieved
            ),
            l.p50,
            "ms p50",
            format!(
                "p95 {:.1}  p99 {:.1}  max {:.1} ms; {} of the commits sent a wake-up; \
                 cores: PostgreSQL {:.2}, RabbitMQ {:.2}, relay {:.2}, machine {:.0}% busy",
                l.p95,
                l.p99,
                l.max,
                l.notified,
                l.cores.postgres,
                l.cores.broker,
                l.cores.relay,
                l.cores.busy * 100.0
            ),
        );
        // The relay's histogram starts at the row's `created_at` (its transaction's start,
        // before the commit), so these bounds hold for commit → confirm too.
        let c = &l.confirm;
        report.add(
            "latency",
            format!("commit → confirm at {rate} msg/s (the relay's histogram)"),
            c.at_most_ms(0.99),
            "ms p99 at most",
            format!(
                "p50 ≤ {} ms; within 5 ms {:.1}%, within 25 ms {:.1}% of {} confirms \
                 (bucket bounds, timed from the row's created_at: the transaction's start, \
                 a median {:.1} ms before its commit returned)",
                c.at_most_ms(0.50),
                c.share_within(0.005) * 100.0,
                c.share_within(0.025) * 100.0,
                c.count,
                l.tx_p50
            ),
        );
    }

    if runs("producer") {
        let n_commits = if quick { 800 } else { 8_000 };
        for wake in [Wake::NoTrigger, Wake::NobodyWaiting, Wake::RelayWaiting] {
            for batch in [1, 100] {
                let n = if batch == 1 {
                    n_commits
                } else {
                    n_commits * 10
                };
                let c = producer_commits(&env, wake, n, batch).await?;
                report.add(
                    "producer",
                    format!("{n} msgs, {batch} per tx, 8 connections, {}", wake.label()),
                    c.rate,
                    "msg/s",
                    format!("commit p50 {:.1} ms, p99 {:.1} ms", c.p50, c.p99),
                );
            }
        }
    }

    if runs("consumer") {
        let n_consumer = if quick { 1_000 } else { 20_000 };
        let one_row = pg_one_row_ceiling(&env, n_consumer).await?;
        report.add(
            "ceiling",
            "PostgreSQL one-row transactions, 8 connections",
            one_row,
            "msg/s",
            "",
        );
        for broker in ["rabbitmq", "kafka"] {
            for batch in [1, 32] {
                let (rate, raw) = consumer_rate(&env, broker, n_consumer, batch).await?;
                if let Some(raw) = raw {
                    report.add(
                        "ceiling",
                        format!("Kafka consume, {n_consumer} msgs, a plain rdkafka consumer, no handler"),
                        raw,
                        "msg/s",
                        "",
                    );
                }
                let how = if batch == 1 {
                    "one message per transaction".to_owned()
                } else {
                    format!("up to {batch} waiting messages per transaction")
                };
                let lanes = if broker == "kafka" {
                    format!("{KAFKA_KEY_LANES} key lanes × 3 partitions")
                } else {
                    "8 key lanes".to_owned()
                };
                report.add(
                    "consumer",
                    format!(
                        "consumer library ← {broker}, {n_consumer} msgs, {lanes}, one-row handler, {how}"
                    ),
                    rate,
                    "msg/s",
                    format!("{:.2}× the one-row ceiling", rate / one_row),
                );
            }
        }
    }

    if runs("claim") {
        let behind = if quick { 10_000 } else { 100_000 };
        let reads = if quick { 20 } else { 100 };
        let clear = claim_cost(&env, 0, reads, false).await?;
        report.add(
            "claim",
            "read of 500 rows, 1,000 pending over 100 keys",
            clear.unmarked_ms,
            "ms",
            format!("{} rows per read", clear.rows),
        );
        let stuck = claim_cost(&env, behind, reads, false).await?;
        report.add(
            "claim",
            format!(
                "the same behind a dead key with {behind} rows waiting (block), before the \
                 relay marks them"
            ),
            stuck.unmarked_ms,
            "ms",
            format!(
                "{} rows per read; {:.1}× the read without it",
                stuck.rows,
                stuck.unmarked_ms / clear.unmarked_ms
            ),
        );
        report.add(
            "claim",
            format!("the same once the {behind} rows are marked held back"),
            stuck.marked_ms,
            "ms",
            format!(
                "{} rows per read; {:.1}× the read without it",
                stuck.marked_rows,
                stuck.marked_ms / clear.unmarked_ms
            ),
        );
        report.add(
            "claim",
            format!("the relay's sweep marking the {behind} rows (once)"),
            stuck.mark_ms,
            "ms",
            String::new(),
        );
        report.add(
            "claim",
            "the relay's sweep (every second) with nothing new to mark",
            stuck.idle_sweep_ms,
            "ms",
            String::new(),
        );
        let retrying = claim_cost(&env, behind, reads, true).await?;
        report.add(
            "claim",
            format!(
                "the same behind a key waiting out a retry delay, {behind} rows waiting, \
                 before the relay marks them"
            ),
            retrying.unmarked_ms,
            "ms",
            format!(
                "{} rows per read; {:.1}× the read without it",
                retrying.rows,
                retrying.unmarked_ms / clear.unmarked_ms
            ),
        );
        report.add(
            "claim",
            format!("the same once the {behind} rows behind the retrying key are marked"),
            retrying.marked_ms,
            "ms",
            format!(
                "{} rows per read; {:.1}× the read without it (target ≤ 1.5×)",
                retrying.marked_rows,
                retrying.marked_ms / clear.unmarked_ms
            ),
        );
        let sweeps = if quick { 5 } else { 20 };
        for others in [behind / 10, behind] {
            let (first_ms, first_rows, idle_ms, idle_rows) =
                idle_sweep(&env, others, sweeps).await?;
            report.add(
                "claim",
                format!(
                    "sweep behind a dead key with {others} other keys' rows after it in its \
                     partition: first, then with nothing new"
                ),
                idle_ms,
                "ms",
                format!(
                    "first sweep {first_ms:.1} ms ({first_rows} rows looked at); then \
                     {idle_rows} rows looked at per sweep"
                ),
            );
        }
    }

    if !quick && runs("archive") {
        archive_rows(&env, &mut report).await?;
    }

    if !quick && runs("memory") {
        let rss = backlog_rss(&env, 1_000_000).await?;
        report.add(
            "memory",
            "relay peak RSS, 1,000,000-row backlog (first 20 s)",
            rss,
            "MiB",
            "",
        );
    }

    if !quick && runs("memory") {
        memory_rows(&env, &mut report).await?;
    }

    if json {
        println!("{}", serde_json::to_string_pretty(&report.rows)?);
    } else {
        println!("| section | what | value | unit | note |");
        println!("| --- | --- | ---: | --- | --- |");
        for r in &report.rows {
            println!(
                "| {} | {} | {:.1} | {} | {} |",
                r.section, r.what, r.value, r.unit, r.note
            );
        }
    }
    Ok(())
}

async fn amqp(url: &str) -> anyhow::Result<Connection> {
    Ok(Connection::connect(
        url,
        ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
    )
    .await?)
}

/// Declares a durable queue.
async fn declare_queue(ch: &lapin::Channel, name: &str) -> anyhow::Result<()> {
    ch.queue_declare(
        name,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Publishes `n` persistent 200-byte messages with `mandatory` to a durable queue, keeping
/// `window` unconfirmed: what the broker allows, without our code.
async fn rabbit_ceiling(env: &Env, n: usize, window: usize) -> anyhow::Result<f64> {
    rabbit_ceiling_with(env, n, window, |_| {
        BasicProperties::default().with_delivery_mode(2)
    })
    .await
}

/// The properties the relay gives a message of the drains' backlog (message id, timestamp,
/// app id, and the `outbox-id`, `outbox-topic`, `outbox-key` and `outbox-seq` headers), for
/// message `i` of a queue: the broker parses and stores them with every message.
fn relay_shaped(topic: &str, i: usize) -> BasicProperties {
    let id = Uuid::new_v4().to_string();
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("outbox-id", id.clone()),
        ("outbox-topic", topic.to_owned()),
        ("outbox-key", format!("k{}", i % 100)),
        ("outbox-seq", (i + 1).to_string()),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_timestamp(1_765_000_000)
        .with_app_id("outbox-relay".into())
        .with_headers(headers)
}

/// [`rabbit_ceiling`] with the properties `props(i)` on message `i`.
async fn rabbit_ceiling_with(
    env: &Env,
    n: usize,
    window: usize,
    props: impl Fn(usize) -> BasicProperties,
) -> anyhow::Result<f64> {
    let conn = amqp(&env.amqp_url).await?;
    let ch = conn.create_channel().await?;
    let q = format!("bench.raw.{}", Uuid::new_v4().simple());
    declare_queue(&ch, &q).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = vec![b'x'; PAYLOAD];
    let props: Vec<BasicProperties> = (0..n).map(props).collect();
    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    for props in props {
        if pending.len() >= window {
            pending.next().await.expect("pending")?;
        }
        let confirm = ch
            .basic_publish(
                "",
                &q,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                props,
            )
            .await?;
        pending.push(confirm);
    }
    while let Some(c) = pending.next().await {
        c?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    ch.queue_delete(&q, QueueDeleteOptions::default()).await?;
    let _ = conn.close(200, "bench").await;
    Ok(rate)
}

/// Publish with confirms over `channels` channels of one connection, each waiting for its
/// message's confirm before the next: the relay's own pattern (one unconfirmed message per
/// channel, one key per channel at a time).
async fn rabbit_channels_ceiling(env: &Env, n: usize, channels: usize) -> anyhow::Result<f64> {
    let conn = std::sync::Arc::new(amqp(&env.amqp_url).await?);
    let setup = conn.create_channel().await?;
    let q = format!("bench.raw.{}", Uuid::new_v4().simple());
    declare_queue(&setup, &q).await?;
    let body = std::sync::Arc::new(vec![b'x'; PAYLOAD]);
    let mut chans = Vec::with_capacity(channels);
    for _ in 0..channels {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        chans.push(ch);
    }
    let start = Instant::now();
    let each = n / channels;
    let mut tasks = tokio::task::JoinSet::new();
    for ch in chans {
        let (q, body) = (q.clone(), body.clone());
        tasks.spawn(async move {
            for _ in 0..each {
                ch.basic_publish(
                    "",
                    &q,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let rate = (each * channels) as f64 / start.elapsed().as_secs_f64();
    setup
        .queue_delete(&q, QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "bench").await;
    Ok(rate)
}

fn kafka_producer(env: &Env) -> anyhow::Result<rdkafka::producer::FutureProducer> {
    Ok(rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

async fn kafka_topic(env: &Env, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .create()?;
    admin
        .create_topics(
            &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    Ok(())
}

/// The idempotent producer, every message queued before any delivery report is awaited.
async fn kafka_ceiling(env: &Env, n: usize) -> anyhow::Result<f64> {
    use rdkafka::producer::FutureRecord;
    let topic = format!("bench.raw.{}", Uuid::new_v4().simple());
    kafka_topic(env, &topic).await?;
    let producer = kafka_producer(env)?;
    let body = vec![b'x'; PAYLOAD];
    // Warm up: metadata and the producer id.
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&topic)
                .payload(&body)
                .key("warm"),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    let start = Instant::now();
    let mut reports = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("k{}", i % 100);
        let record = FutureRecord::to(&topic).payload(&body[..]).key(&key);
        reports.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for r in reports {
        r.await?.map_err(|(e, _)| e)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// A fresh database with the outbox migrated.
async fn fresh_db(admin_url: &str, prefix: &str) -> anyhow::Result<PgPool> {
    let name = format!("{prefix}_{}", Uuid::new_v4().simple());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut url = url::Url::parse(admin_url)?;
    url.set_path(&name);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(url.as_str())
        .await?;
    outbox::migrate(&pool).await?;
    Ok(pool)
}

fn db_url_of(pool: &PgPool, admin_url: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(admin_url)?;
    url.set_path(pool.connect_options().get_database().unwrap_or("postgres"));
    Ok(url.to_string())
}

/// Writes `n` 200-byte rows for `topic`; keys `k0..k{keys}` or none. With `held`, they are
/// not due for an hour (see [`release`]).
async fn backlog(pool: &PgPool, topic: &str, n: usize, keys: Option<usize>) -> anyhow::Result<()> {
    backlog_held(pool, topic, n, keys, false).await
}

async fn backlog_held(
    pool: &PgPool,
    topic: &str,
    n: usize,
    keys: Option<usize>,
    held: bool,
) -> anyhow::Result<()> {
    let mut written = 0;
    while written < n {
        let chunk = (n - written).min(100_000);
        sqlx::query(
            "INSERT INTO outbox.messages (topic, key, payload, available_at)
             SELECT $1, CASE WHEN $3::int IS NULL THEN NULL ELSE 'k' || (i % $3::int) END,
                    convert_to(repeat('x', $4), 'UTF8'),
                    now() + CASE WHEN $6 THEN interval '1 hour' ELSE interval '0' END
             FROM generate_series($5::bigint, $5::bigint + $2::bigint - 1) i",
        )
        .bind(topic)
        .bind(chunk as i64)
        .bind(keys.map(|k| k as i32))
        .bind(PAYLOAD as i32)
        .bind(written as i64)
        .bind(held)
        .execute(pool)
        .await?;
        written += chunk;
    }
    Ok(())
}

/// A store on `pool` (`block` policy) and a relay id that holds all 64 partitions.
async fn store_owning_all(pool: &PgPool) -> anyhow::Result<(Store, Uuid, Vec<i16>)> {
    let store = Store::new(
        pool.clone(),
        Schema::parse("outbox")?,
        DeadKeyPolicy::Block,
        Archive::Off,
    );
    let me = Uuid::new_v4();
    let mut owned = Vec::new();
    while owned.len() < 64 {
        owned = store.rebalance(me, Duration::from_secs(60)).await?;
    }
    Ok((store, me, owned))
}

/// Rows per read: the relay's default `relay.batch_size`.
const BATCH: u32 = 1000;

/// The relay's own claim and delete, with nothing published: the database's ceiling.
async fn pg_ceiling(pool: &PgPool, n: usize) -> anyhow::Result<f64> {
    backlog(pool, "bench.pg", n, Some(100)).await?;
    let (store, me, owned) = store_owning_all(pool).await?;
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let claim = store.claim(me, &owned, BATCH, &[]).await?;
        anyhow::ensure!(
            !claim.is_empty(),
            "claimed nothing with {} rows left",
            n - done
        );
        let settlement = Settlement {
            delivered: claim.envelopes.iter().map(|e| e.seq).collect(),
            failed: Vec::new(),
        };
        done += store.settle(me, &settlement).await?.delivered as usize;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// CPU seconds (user + system) this process has used.
fn own_cpu() -> f64 {
    proc_usage(std::process::id()).map_or(0.0, |u| u.0)
}

fn query_note(query: Option<&QueryTime>, n: usize) -> String {
    match query {
        Some(q) => q.per_message(n),
        None => "query time not counted (pg_stat_statements is not loaded)".to_owned(),
    }
}

/// A drain's database row: its PostgreSQL CPU and query time against the reference loop's
/// over the same backlog, and the relay's CPU against the raw client's (`client`, s/10k).
fn database_note(d: &Drain, reference: Option<&Reference>, n: usize, client: f64) -> String {
    let mut note = String::new();
    if let Some(r) = reference {
        note += &format!(
            "{:.2}× the reference loop's CPU; ",
            d.pg_per_10k * 100.0 / r.pg_us
        );
    }
    note += &query_note(d.query.as_ref(), n);
    if let (Some(q), Some(rq)) = (&d.query, reference.and_then(|r| r.query.as_ref())) {
        note += &format!(
            "; {:.2}× the reference's query time",
            q.total_ms() / rq.total_ms()
        );
    }
    if client > 0.0 {
        note += &format!(
            "; relay CPU {:.2} s/10k, {:.2}× the raw client's ({client:.2} s/10k)",
            d.cpu_per_10k,
            d.cpu_per_10k / client
        );
    }
    note
}

/// The reference a polling relay's database cost is judged by: a plain indexed read of each
/// partition's oldest rows in `seq` order (as many rows per read as the relay's batch), then
/// one batched delete of them by `seq` (without waiting for the WAL flush, as the relay's),
/// over the same backlog as a drain's, with nothing published.
struct Reference {
    /// CPU microseconds of the outbox's PostgreSQL per message.
    pg_us: f64,
    query: Option<QueryTime>,
}

async fn reference(env: &Env, n: usize, keys: Option<usize>) -> anyhow::Result<Reference> {
    let pool = fresh_db(&env.db_url, "bench_reference").await?;
    backlog(&pool, "bench.reference", n, keys).await?;
    sqlx::query("VACUUM ANALYZE outbox.messages")
        .execute(&pool)
        .await?;
    let counted = statements::available(&pool).await;
    if counted {
        statements::reset(&pool).await?;
    }
    let partitions: Vec<i16> = (0..64).collect();
    let postmaster = postmaster_of(&pool).await?;
    let before = servers_cpu(postmaster).0;
    let mut done = 0;
    while done < n {
        let seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT r.seq FROM unnest($1::smallint[]) AS q(partition)
             CROSS JOIN LATERAL (
                 SELECT m.seq, m.id, m.topic, m.key, m.payload, m.headers, m.content_type,
                        m.created_at, m.attempts
                 FROM outbox.messages m
                 WHERE m.partition = q.partition AND m.status = 'pending' AND NOT m.held_back
                 ORDER BY m.seq LIMIT $2
             ) r",
        )
        .bind(&partitions)
        .bind(BATCH.div_ceil(64) as i32)
        .fetch_all(&pool)
        .await?;
        anyhow::ensure!(!seqs.is_empty(), "read nothing with {} rows left", n - done);
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        done += sqlx::query("DELETE FROM outbox.messages WHERE seq = ANY($1)")
            .bind(&seqs)
            .execute(&mut *tx)
            .await?
            .rows_affected() as usize;
        tx.commit().await?;
    }
    let pg = servers_cpu(postmaster).0 - before;
    let query = match counted {
        true => Some(statements::collect(&pool).await?),
        false => None,
    };
    pool.close().await;
    Ok(Reference {
        pg_us: pg / n as f64 * 1e6,
        query,
    })
}

struct Drain {
    rate: f64,
    cpu_per_10k: f64,
    peak_rss_mib: f64,
    /// CPU seconds per 10,000 messages of the outbox's PostgreSQL server, and of the broker
    /// (with, for Kafka, the PostgreSQL server that stores the broker's data).
    pg_per_10k: f64,
    broker_per_10k: f64,
    /// Share of the machine's CPU time that was busy during the drain.
    busy: f64,
    /// The outbox database's query time during the drain, when `pg_stat_statements` is
    /// loaded.
    query: Option<QueryTime>,
    /// Bytes of `outbox.delivered` (table, TOAST and indexes) per message drained.
    archive_bytes: f64,
}

/// CPU seconds (user + system) used so far by the outbox's PostgreSQL server (the processes
/// of `postmaster`), and by the broker: `beam.smp` for RabbitMQ, `tansu` and the PostgreSQL
/// server that stores its data for Kafka. From /proc.
fn servers_cpu(postmaster: u32) -> (f64, f64) {
    let (mut pg, mut broker) = (0.0, 0.0);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0.0, 0.0);
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        // From `state` on: state, ppid, …, utime (14th field of stat), stime (15th).
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let secs = (field(11) + field(12)) / 100.0;
        match comm {
            "postgres" if pid == postmaster || field(1) as u32 == postmaster => pg += secs,
            "postgres" | "beam.smp" | "tansu" => broker += secs,
            _ => {}
        }
    }
    (pg, broker)
}

/// The process id of the PostgreSQL server behind `pool`.
async fn postmaster_of(pool: &PgPool) -> anyhow::Result<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await?;
    let stat = std::fs::read_to_string(format!("/proc/{backend}/stat"))?;
    let after = &stat[stat.rfind(')').context("stat")? + 2..];
    Ok(after.split_whitespace().nth(1).context("ppid")?.parse()?)
}

/// Busy and total CPU ticks of the whole machine, from /proc/stat.
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let t: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = t.iter().sum();
    let idle = t.get(3).copied().unwrap_or(0.0) + t.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// CPU seconds (user + system) and peak RSS in MiB of a running process, from /proc.
fn proc_usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted from `state` as field 3.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = 100.0; // USER_HZ on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok((ticks / hz, hwm_kib / 1024.0))
}

fn spawn_relay(env: &Env, db_url: &str, broker: &str) -> anyhow::Result<tokio::process::Child> {
    spawn_relay_serving(env, db_url, broker, "127.0.0.1:0", &[])
}

/// [`spawn_relay`], serving its metrics on `listen`.
fn spawn_relay_serving(
    env: &Env,
    db_url: &str,
    broker: &str,
    listen: &str,
    settings: &[(&str, String)],
) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&env.relay_bin);
    cmd.arg("run")
        .env("OUTBOX__DATABASE__URL", db_url)
        .env("OUTBOX__BROKER", broker)
        .env("OUTBOX__RABBITMQ__URL", &env.amqp_url)
        .env("OUTBOX__KAFKA__BROKERS", &env.kafka)
        .env("OUTBOX__HTTP__LISTEN", listen)
        .env("OUTBOX__LOG__LEVEL", "warn")
        .envs(settings.iter().map(|(k, v)| (k, v)))
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    // `OUTBOX_BENCH_RELAY_LOG=FILE` keeps the relays' log (at `info`, appended), to see why
    // a figure is off.
    match std::env::var_os("OUTBOX_BENCH_RELAY_LOG") {
        Some(path) => {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("OUTBOX_BENCH_RELAY_LOG {}", path.to_string_lossy()))?;
            cmd.stdout(log).env("OUTBOX__LOG__LEVEL", "info");
        }
        None => {
            cmd.stdout(std::process::Stdio::null());
        }
    }
    Ok(cmd.spawn()?)
}

async fn stop(mut child: tokio::process::Child) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    Ok(())
}

/// Where one measurement's messages go: a fresh queue on RabbitMQ, a fresh topic on Kafka.
struct Destination {
    topic: String,
    conn: Connection,
    ch: lapin::Channel,
    rabbitmq: bool,
}

impl Destination {
    async fn open(env: &Env, broker: &str, prefix: &str) -> anyhow::Result<Self> {
        let topic = format!("bench.{prefix}.{}", Uuid::new_v4().simple());
        let conn = amqp(&env.amqp_url).await?;
        let ch = conn.create_channel().await?;
        let rabbitmq = broker == "rabbitmq";
        if rabbitmq {
            declare_queue(&ch, &topic).await?;
        } else {
            kafka_topic(env, &topic).await?;
        }
        Ok(Self {
            topic,
            conn,
            ch,
            rabbitmq,
        })
    }

    /// Deletes the queue (Kafka topics stay) and closes the connection.
    async fn close(self) -> anyhow::Result<()> {
        if self.rabbitmq {
            self.ch
                .queue_delete(&self.topic, QueueDeleteOptions::default())
                .await?;
        }
        let _ = self.conn.close(200, "bench").await;
        Ok(())
    }
}

/// A relay process drains `n` pre-written rows; timed from its start to an empty outbox.
async fn drain(env: &Env, broker: &str, n: usize, keys: Option<usize>) -> anyhow::Result<Drain> {
    drain_with(env, broker, n, keys, &[]).await
}

/// [`drain`] with a relay configured by `settings` (`OUTBOX__…` variables).
async fn drain_with(
    env: &Env,
    broker: &str,
    n: usize,
    keys: Option<usize>,
    settings: &[(&str, String)],
) -> anyhow::Result<Drain> {
    let pool = fresh_db(&env.db_url, "bench_drain").await?;
    let dest = Destination::open(env, broker, "drain").await?;
    let topic = dest.topic.clone();
    // The rows wait (not due) until the relay is up and holds every partition, so the
    // clock measures draining, not starting.
    backlog_held(&pool, &topic, n, keys, true).await?;
    let db_url = db_url_of(&pool, &env.db_url)?;
    let child = spawn_relay_serving(env, &db_url, broker, "127.0.0.1:0", settings)?;
    let pid = child.id().context("relay pid")?;
    let ready = Instant::now();
    loop {
        let owned: i64 = sqlx::query_scalar(&format!(
            "{}SELECT count(*) FROM outbox.partitions WHERE owner IS NOT NULL AND lease_until > now()",
            statements::OWN
        ))
        .fetch_one(&pool)
        .await?;
        if owned == 64 {
            break;
        }
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(30),
            "the relay took no partitions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The rows are released by one UPDATE, due in two seconds. It leaves a dead version of
    // each row behind, vacuumed meanwhile, so the relay reads a table like a producer's
    // (whose rows are inserted due), and neither the UPDATE's nor the VACUUM's work is
    // counted. The clock starts when the rows are due.
    const RELEASE: Duration = Duration::from_secs(2);
    sqlx::query(&format!(
        "{}UPDATE outbox.messages SET available_at = now() + make_interval(secs => $1)",
        statements::OWN
    ))
    .bind(RELEASE.as_secs_f64())
    .execute(&pool)
    .await?;
    let updated = Instant::now();
    sqlx::query(&format!("{}VACUUM outbox.messages", statements::OWN))
        .execute(&pool)
        .await?;
    let counted = statements::available(&pool).await;
    if counted {
        statements::reset(&pool).await?;
    }
    let postmaster = postmaster_of(&pool).await?;
    anyhow::ensure!(
        updated.elapsed() < RELEASE,
        "the VACUUM took longer than the release delay"
    );
    tokio::time::sleep_until((updated + RELEASE).into()).await;
    let cpu_before = proc_usage(pid)?.0;
    let servers_before = servers_cpu(postmaster);
    let machine_before = machine_ticks();
    let start = Instant::now();
    // What the insert trigger sends to an idle relay: wake up.
    sqlx::query(&format!(
        "{}SELECT pg_notify('outbox_wakeup_outbox', '')",
        statements::OWN
    ))
    .execute(&pool)
    .await?;
    let mut usage = (cpu_before, 0.0);
    let mut from = 0;
    loop {
        let left = rows_left(&pool, &mut from).await?;
        if let Ok(u) = proc_usage(pid) {
            usage = u;
        }
        if !left {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "drain to {broker} stalled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed();
    let servers = servers_cpu(postmaster);
    let machine = machine_ticks();
    let query = match counted {
        true => Some(statements::collect(&pool).await?),
        false => None,
    };
    let archived: i64 = sqlx::query_scalar(&format!(
        "{}SELECT pg_total_relation_size('outbox.delivered')",
        statements::OWN
    ))
    .fetch_one(&pool)
    .await?;
    stop(child).await?;
    dest.close().await?;
    pool.close().await;
    Ok(Drain {
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu_per_10k: (usage.0 - cpu_before) / n as f64 * 10_000.0,
        peak_rss_mib: usage.1,
        pg_per_10k: (servers.0 - servers_before.0) / n as f64 * 10_000.0,
        broker_per_10k: (servers.1 - servers_before.1) / n as f64 * 10_000.0,
        busy: (machine.0 - machine_before.0) / (machine.1 - machine_before.1).max(1.0),
        query,
        archive_bytes: archived as f64 / n as f64,
    })
}

/// What the archive of deliveries costs: the same Kafka drain (100 keys, 200-byte payloads)
/// with no archive, with slim records, and with messages kept whole
/// (`retention.delivered_payloads`, for replays): PostgreSQL CPU and query time per message,
/// and the archive's bytes per message.
async fn archive_rows(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    let n = 20_000;
    let hour = || ("OUTBOX__RETENTION__DELIVERED", "1h".to_owned());
    let variants: [(&str, Vec<(&str, String)>); 3] = [
        ("no archive", vec![]),
        ("slim records", vec![hour()]),
        (
            "messages kept whole",
            vec![
                hour(),
                ("OUTBOX__RETENTION__DELIVERED_PAYLOADS", "true".to_owned()),
            ],
        ),
    ];
    for (what, settings) in variants {
        let d = drain_with(env, "kafka", n, Some(100), &settings).await?;
        report.add(
            "archive",
            format!("relay drain → kafka, {n} msgs, 100 keys, {what}: PostgreSQL CPU"),
            d.pg_per_10k * 100.0,
            "µs/msg",
            format!(
                "{:.0} msg/s; archive {:.0} bytes/msg; {}",
                d.rate,
                d.archive_bytes,
                query_note(d.query.as_ref(), n)
            ),
        );
    }
    Ok(())
}

/// Cores in use while the producers ran, and how busy the machine was.
struct Cores {
    relay: f64,
    postgres: f64,
    broker: f64,
    busy: f64,
}

struct Latency {
    achieved: f64,
    /// Producer commits that sent a wake-up NOTIFY (the relay was registered as idle).
    notified: usize,
    cores: Cores,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    /// Row `created_at` → broker confirm, from the relay's own histogram.
    confirm: Histogram,
    /// Median time from a producer's `BEGIN` to its commit's return: `created_at` is the
    /// transaction's start, so the histogram includes it.
    tx_p50: f64,
}

/// A Prometheus histogram as the relay serves it: (bucket upper bound in seconds, how many
/// observations were at most that), ascending, and the total count.
#[derive(Debug, Default)]
struct Histogram {
    buckets: Vec<(f64, u64)>,
    count: u64,
}

impl Histogram {
    /// `name` (summed over its labels) in the text exposition format `text`.
    fn parse(text: &str, name: &str) -> Self {
        let mut buckets: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
        let mut count = 0;
        for line in text.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if series.starts_with(&format!("{name}_bucket{{")) {
                let le = series
                    .split("le=\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .and_then(|le| le.parse::<f64>().ok())
                    .unwrap_or(f64::INFINITY);
                let entry = buckets.entry(le.to_bits()).or_insert((le, 0));
                entry.1 += value as u64;
            } else if series.starts_with(&format!("{name}_count")) {
                count += value as u64;
            }
        }
        let mut buckets: Vec<(f64, u64)> = buckets.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self { buckets, count }
    }

    /// The share of observations at most `bound` seconds (a bucket bound).
    fn share_within(&self, bound: f64) -> f64 {
        let within = self
            .buckets
            .iter()
            .find(|(le, _)| (*le - bound).abs() < 1e-9)
            .map_or(0, |b| b.1);
        within as f64 / self.count.max(1) as f64
    }

    /// The smallest bucket bound, in ms, that holds at least the quantile `q`.
    fn at_most_ms(&self, q: f64) -> f64 {
        let need = (q * self.count as f64).ceil() as u64;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= need)
            .map_or(f64::INFINITY, |b| b.0 * 1e3)
    }
}

/// The relay's `/metrics` page at `address`.
async fn scrape(address: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut page = String::new();
    stream.read_to_string(&mut page).await?;
    Ok(page)
}

/// One producer commits single-message transactions at `rate` for `secs`; a RabbitMQ
/// consumer notes each arrival. Latency is arrival time minus the commit's return.
async fn latency(env: &Env, rate: u32, secs: u64) -> anyhow::Result<Latency> {
    let pool = fresh_db(&env.db_url, "bench_latency").await?;
    let topic = format!("bench.latency.{}", Uuid::new_v4().simple());
    let conn = amqp(&env.amqp_url).await?;
    let ch = conn.create_channel().await?;
    declare_queue(&ch, &topic).await?;
    let arrived: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let mut consumer = ch
        .basic_consume(
            &topic,
            "bench",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let sink = arrived.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let now = Instant::now();
            if let Some(id) = d
                .properties
                .message_id()
                .as_ref()
                .and_then(|m| m.as_str().parse().ok())
            {
                sink.lock().unwrap().entry(id).or_insert(now);
            }
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });
    let db_url = db_url_of(&pool, &env.db_url)?;
    let metrics_at = format!("127.0.0.1:{}", outbox_tests::free_port());
    let relay = spawn_relay_serving(env, &db_url, "rabbitmq", &metrics_at, &[])?;
    tokio::time::sleep(Duration::from_secs(2)).await; // partitions taken, idle, waiting
    let mut listener = sqlx::postgres::PgListener::connect(&db_url).await?;
    listener.listen("outbox_wakeup_outbox").await?;
    let notified = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counting = notified.clone();
    let notifies = tokio::spawn(async move {
        while listener.recv().await.is_ok() {
            counting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Several producers (one connection each), as one commit waits for the disk flush: a
    // single connection stops near 1 / fsync latency. Each owns its keys.
    let producers = (rate / 250).clamp(1, 8);
    let per_producer = rate as u64 * secs / producers as u64;
    let total = per_producer * producers as u64;
    let interval = Duration::from_secs_f64(producers as f64 / rate as f64);
    let relay_pid = relay.id().context("relay pid")?;
    let postmaster = postmaster_of(&pool).await?;
    let cpu_before = (
        proc_usage(relay_pid)?.0,
        servers_cpu(postmaster),
        machine_ticks(),
    );
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let (pool, topic) = (pool.clone(), topic.clone());
            tokio::spawn(async move {
                let outbox = outbox::Outbox::default();
                let mut committed = Vec::with_capacity(per_producer as usize);
                let mut took = Vec::with_capacity(per_producer as usize);
                for i in 0..per_producer {
                    // Staggered: together the producers commit at an even pace, not in
                    // bursts of one commit each.
                    let at = interval * i as u32 + interval * p / producers;
                    tokio::time::sleep_until((start + at).into()).await;
                    let m = outbox::Message::new(&topic, vec![b'x'; PAYLOAD])?
                        .with_key(format!("p{p}-k{}", i % 25))?;
                    let began = Instant::now();
                    let mut tx = pool.begin().await?;
                    outbox.enqueue(&mut *tx, &m).await?;
                    tx.commit().await?;
                    let done = Instant::now();
                    committed.push((m.id(), done));
                    took.push((done - began).as_secs_f64() * 1e3);
                }
                anyhow::Ok((committed, took))
            })
        })
        .collect();
    let mut committed: Vec<(Uuid, Instant)> = Vec::with_capacity(total as usize);
    let mut tx_ms: Vec<f64> = Vec::with_capacity(total as usize);
    for t in tasks {
        let (c, took) = t.await??;
        committed.extend(c);
        tx_ms.extend(took);
    }
    tx_ms.sort_by(f64::total_cmp);
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    let (relay_cpu, servers, machine) = (
        proc_usage(relay_pid)?.0,
        servers_cpu(postmaster),
        machine_ticks(),
    );
    let secs = start.elapsed().as_secs_f64();
    let cores = Cores {
        relay: (relay_cpu - cpu_before.0) / secs,
        postgres: (servers.0 - cpu_before.1 .0) / secs,
        broker: (servers.1 - cpu_before.1 .1) / secs,
        busy: (machine.0 - cpu_before.2 .0) / (machine.1 - cpu_before.2 .1).max(1.0),
    };
    notifies.abort();
    let notified = notified.load(std::sync::atomic::Ordering::Relaxed);
    let wait = Instant::now();
    while arrived.lock().unwrap().len() < committed.len() {
        anyhow::ensure!(
            wait.elapsed() < Duration::from_secs(60),
            "not every message arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let confirm = Histogram::parse(
        &scrape(&metrics_at).await?,
        "outbox_commit_to_confirm_seconds",
    );
    anyhow::ensure!(
        confirm.count >= committed.len() as u64,
        "the relay's histogram counts {} confirms of {} messages",
        confirm.count,
        committed.len()
    );
    stop(relay).await?;
    reader.abort();
    let arrived = std::mem::take(&mut *arrived.lock().unwrap());
    let mut ms: Vec<f64> = committed
        .iter()
        .map(|(id, at)| arrived[id].saturating_duration_since(*at).as_secs_f64() * 1e3)
        .collect();
    ms.sort_by(f64::total_cmp);
    let _ = ch.queue_delete(&topic, QueueDeleteOptions::default()).await;
    Ok(Latency {
        achieved,
        notified,
        cores,
        p50: percentile(&ms, 0.50),
        p95: percentile(&ms, 0.95),
        p99: percentile(&ms, 0.99),
        max: *ms.last().unwrap(),
        confirm,
        tx_p50: percentile(&tx_ms, 0.50),
    })
}

/// Peak RSS of a relay that starts on a backlog of `n` rows and drains for 20 s.
async fn backlog_rss(env: &Env, n: usize) -> anyhow::Result<f64> {
    let pool = fresh_db(&env.db_url, "bench_backlog").await?;
    let topic = format!("bench.backlog.{}", Uuid::new_v4().simple());
    let conn = amqp(&env.amqp_url).await?;
    let ch = conn.create_channel().await?;
    declare_queue(&ch, &topic).await?;
    backlog(&pool, &topic, n, Some(1000)).await?;
    let db_url = db_url_of(&pool, &env.db_url)?;
    let child = spawn_relay(env, &db_url, "rabbitmq")?;
    let pid = child.id().context("relay pid")?;
    let mut peak: f64 = 0.0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok((_, rss)) = proc_usage(pid) {
            peak = peak.max(rss);
        }
    }
    stop(child).await?;
    ch.queue_delete(&topic, QueueDeleteOptions::default())
        .await?;
    Ok(peak)
}

/// Peak RSS draining large payloads, with the default `relay.window_bytes` (16 MiB) and a
/// 4 MiB one, beside the same with 200-byte rows: RabbitMQ with 1 MiB payloads, Kafka with
/// 512 KiB (under its default `message.max.bytes`).
async fn memory_rows(env: &Env, report: &mut Report) -> anyhow::Result<()> {
    const ROWS: usize = 300;
    for (broker, payload, shown) in [
        ("rabbitmq", 1 << 20, "1 MiB"),
        ("kafka", 512 << 10, "512 KiB"),
    ] {
        let base = payload_rss(env, broker, ROWS, PAYLOAD, None).await?;
        for (window, named) in [(None, "16 MiB (default)"), (Some(4 << 20), "4 MiB")] {
            let peak = payload_rss(env, broker, ROWS, payload, window).await?;
            report.add(
                "memory",
                format!("relay peak RSS → {broker}, {ROWS} rows of {shown}, window_bytes {named}"),
                peak,
                "MiB",
                format!(
                    "{:.1} MiB over the {base:.1} MiB with 200-byte rows: {:.2}× window_bytes",
                    peak - base,
                    (peak - base) / (window.unwrap_or(16 << 20) as f64 / 1048576.0)
                ),
            );
        }
    }
    Ok(())
}

/// Peak RSS (MiB) of a relay draining `rows` rows of `payload` bytes over 10 keys to
/// `broker`, with `relay.window_bytes` set to `window_bytes` when given (the default
/// otherwise). Sampled every 20 ms until the outbox is empty.
async fn payload_rss(
    env: &Env,
    broker: &str,
    rows: usize,
    payload: usize,
    window_bytes: Option<u64>,
) -> anyhow::Result<f64> {
    let pool = fresh_db(&env.db_url, "bench_payload").await?;
    let dest = Destination::open(env, broker, "payload").await?;
    let topic = dest.topic.clone();
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT $1, 'k' || (i % 10), convert_to(repeat('x', $2), 'UTF8')
         FROM generate_series(1, $3) i",
    )
    .bind(&topic)
    .bind(payload as i32)
    .bind(rows as i32)
    .execute(&pool)
    .await?;
    let settings: Vec<(&str, String)> = window_bytes
        .map(|b| ("OUTBOX__RELAY__WINDOW_BYTES", b.to_string()))
        .into_iter()
        .collect();
    let db_url = db_url_of(&pool, &env.db_url)?;
    let child = spawn_relay_serving(env, &db_url, broker, "127.0.0.1:0", &settings)?;
    let pid = child.id().context("relay pid")?;
    let (start, mut peak, mut from) = (Instant::now(), 0.0_f64, 0);
    while rows_left(&pool, &mut from).await? {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(300),
            "the drain of {payload}-byte rows to {broker} stalled"
        );
        if let Ok((_, rss)) = proc_usage(pid) {
            peak = peak.max(rss);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Ok((_, rss)) = proc_usage(pid) {
        peak = peak.max(rss);
    }
    stop(child).await?;
    dest.close().await?;
    pool.close().await;
    Ok(peak)
}

/// What the wake-up trigger meets at commit.
#[derive(Clone, Copy)]
enum Wake {
    /// The trigger is disabled.
    NoTrigger,
    /// The trigger runs; no relay is waiting, so it sends nothing.
    NobodyWaiting,
    /// A relay is waiting: every commit sends a NOTIFY.
    RelayWaiting,
}

impl Wake {
    fn label(self) -> &'static str {
        match self {
            Wake::NoTrigger => "without the wake-up trigger",
            Wake::NobodyWaiting => "trigger, no relay waiting",
            Wake::RelayWaiting => "trigger, a relay waiting (NOTIFY)",
        }
    }
}

struct Commits {
    rate: f64,
    p50: f64,
    p99: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The producer's side: `n` messages in transactions of `batch`, written through the
/// `outbox` crate from 8 connections as fast as they commit; messages/s and the commit
/// latency (begin to commit) of each transaction.
async fn producer_commits(
    env: &Env,
    wake: Wake,
    n: usize,
    batch: usize,
) -> anyhow::Result<Commits> {
    const CONNECTIONS: usize = 8;
    let pool = fresh_db(&env.db_url, "bench_producer").await?;
    match wake {
        Wake::NoTrigger => {
            sqlx::query("ALTER TABLE outbox.messages DISABLE TRIGGER messages_wake_relays")
                .execute(&pool)
                .await?;
        }
        Wake::NobodyWaiting => {}
        Wake::RelayWaiting => {
            sqlx::query(
                "INSERT INTO outbox.relay_waiters (relay_id, expires_at)
                 VALUES ($1, now() + interval '1 hour')",
            )
            .bind(Uuid::new_v4())
            .execute(&pool)
            .await?;
        }
    }
    let per_task = n / batch / CONNECTIONS;
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|t| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let outbox = outbox::Outbox::default();
                let mut latencies = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let msgs = (0..batch)
                        .map(|j| {
                            outbox::Message::new("bench.producer", vec![b'x'; PAYLOAD])?
                                .with_key(format!("k{}", (t * per_task + i + j) % 100))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let began = Instant::now();
                    let mut tx = pool.begin().await?;
                    outbox.enqueue_batch(&mut *tx, &msgs).await?;
                    tx.commit().await?;
                    latencies.push(began.elapsed().as_secs_f64() * 1000.0);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = start.elapsed();
    pool.close().await;
    latencies.sort_by(f64::total_cmp);
    Ok(Commits {
        rate: (per_task * batch * CONNECTIONS) as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    })
}

/// PostgreSQL's ceiling for a consumer: 8 connections committing one-row transactions (an
/// insert into a table keyed by a uuid), as fast as they go.
async fn pg_one_row_ceiling(env: &Env, n: usize) -> anyhow::Result<f64> {
    const CONNECTIONS: usize = 8;
    let pool = fresh_db(&env.db_url, "bench_one_row").await?;
    sqlx::query("CREATE TABLE one_row (id uuid PRIMARY KEY)")
        .execute(&pool)
        .await?;
    let per_task = n / CONNECTIONS;
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let mut tx = pool.begin().await?;
                    sqlx::query("INSERT INTO one_row (id) VALUES ($1)")
                        .bind(Uuid::new_v4())
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let rate = (per_task * CONNECTIONS) as f64 / start.elapsed().as_secs_f64();
    pool.close().await;
    Ok(rate)
}

/// The one-row handler of the consumer benchmark.
struct OneRow;

impl outbox_consumer::Handler for OneRow {
    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        m: &'a outbox_consumer::Incoming,
    ) -> futures::future::BoxFuture<'a, Result<(), outbox_consumer::HandlerError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO one_row (id) VALUES ($1)")
                .bind(m.message_id)
                .execute(&mut *tx)
                .await
                .map_err(outbox_consumer::HandlerError::retryable)?;
            Ok(())
        })
    }
}

/// How fast a plain rdkafka consumer (a group of its own, nothing handled) reads the `n`
/// messages of `topic`, from the first message to the last.
async fn kafka_consume_ceiling(env: &Env, topic: &str, n: usize) -> anyhow::Result<f64> {
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .set("group.id", format!("bench-raw-{}", Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut first = None;
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .context("the plain Kafka consumer stalled")??;
        first.get_or_insert_with(Instant::now);
    }
    let first = first.context("nothing to consume")?;
    Ok((n - 1) as f64 / first.elapsed().as_secs_f64().max(1e-3))
}

/// The consumer library: the relay publishes `n` messages over 100 keys, then the library's
/// source for `broker` handles them through dedup with a one-row handler, up to `batch`
/// waiting messages per transaction. Messages/s from
/// the first effect to the last (a Kafka group's join is not counted).
/// Key lanes per partition of the Kafka consumer: with the topic's 3 partitions, about as
/// many transactions at once as the RabbitMQ consumer's 8 lanes and the ceiling's 8
/// connections.
const KAFKA_KEY_LANES: usize = 3;

/// Whether any outbox row is left, looking from `*from` (the first row seen last time, which
/// it moves on). Polled every 50 ms while a drain runs, so it must cost PostgreSQL next to
/// nothing: an index scan that starts past the rows deleted before the last poll, instead
/// of walking over all of them (a sequential scan for any row, or one from the first key,
/// spent milliseconds of CPU a poll once tens of thousands were gone: a few percent of a
/// core taken from the servers being measured).
async fn rows_left(pool: &PgPool, from: &mut i64) -> anyhow::Result<bool> {
    let first: Option<i64> = sqlx::query_scalar(&format!(
        "{}SELECT seq FROM outbox.messages WHERE seq >= $1 ORDER BY seq LIMIT 1",
        statements::OWN
    ))
    .bind(*from)
    .fetch_optional(pool)
    .await?;
    if let Some(seq) = first {
        *from = seq;
    }
    Ok(first.is_some())
}

async fn consumer_rate(
    env: &Env,
    broker: &str,
    n: usize,
    batch: usize,
) -> anyhow::Result<(f64, Option<f64>)> {
    let pool = fresh_db(&env.db_url, "bench_consumer").await?;
    sqlx::query("CREATE TABLE one_row (id uuid PRIMARY KEY)")
        .execute(&pool)
        .await?;
    let dest = Destination::open(env, broker, "consumer").await?;
    let topic = dest.topic.clone();
    backlog(&pool, &topic, n, Some(100)).await?;
    let relay = spawn_relay(env, &db_url_of(&pool, &env.db_url)?, broker)?;
    let started = Instant::now();
    let mut from = 0;
    loop {
        if !rows_left(&pool, &mut from).await? {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the relay did not publish the consumer's backlog to {broker}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(relay).await?;
    // What the broker gives a plain consumer of the same topic (once per run).
    let raw = if broker == "kafka" && batch == 1 {
        Some(kafka_consume_ceiling(env, &topic, n).await?)
    } else {
        None
    };

    // Handlers run on their own pool, as in a service: 8 lanes, 8 connections and spare.
    let handlers = PgPoolOptions::new()
        .max_connections(12)
        .connect(&db_url_of(&pool, &env.db_url)?)
        .await?;
    let dedup = outbox_consumer::Deduplicator::new(handlers.clone(), "bench")?.with_batch(batch);
    dedup.migrate().await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop_source = shutdown.clone();
    let task = if broker == "rabbitmq" {
        let source = outbox_consumer::rabbitmq::RabbitMqSource::new(env.amqp_url.clone(), &topic)
            .with_prefetch(200)
            .with_concurrency(8);
        tokio::spawn(async move { source.run(dedup, Arc::new(OneRow), stop_source).await })
    } else {
        let group = format!("bench-{topic}");
        let source = outbox_consumer::kafka::KafkaSource::new(&env.kafka, &group, &[&topic])
            .with_concurrency(KAFKA_KEY_LANES);
        tokio::spawn(async move { source.run(dedup, Arc::new(OneRow), stop_source).await })
    };
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM one_row")
            .fetch_one(&pool)
            .await
    };
    let waited = Instant::now();
    let (first, from) = loop {
        let c = count().await?;
        if c > 0 {
            break (Instant::now(), c);
        }
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(60),
            "the {broker} consumer handled nothing in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut last = (first, from);
    loop {
        let c = count().await?;
        if c > last.1 {
            last = (Instant::now(), c);
        }
        if c >= n as i64 {
            break;
        }
        anyhow::ensure!(
            last.0.elapsed() < Duration::from_secs(60),
            "the {broker} consumer stalled at {c} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(30), task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => anyhow::bail!("the {broker} consumer failed: {e}"),
        Ok(Err(e)) => anyhow::bail!("the {broker} consumer task: {e}"),
        Err(_) => anyhow::bail!("the {broker} consumer did not stop within 30 s"),
    }
    dest.close().await?;
    handlers.close().await;
    pool.close().await;
    let rate = (n as i64 - from) as f64 / last.0.duration_since(first).as_secs_f64().max(1e-3);
    Ok((rate, raw))
}

/// The held-back sweep behind a dead key whose partition holds `others` pending rows of
/// other keys after it: the first sweep (which walks them), then the mean of `sweeps` sweeps
/// with nothing new to mark, in ms, with the rows each looked at.
async fn idle_sweep(
    env: &Env,
    others: usize,
    sweeps: usize,
) -> anyhow::Result<(f64, u64, f64, u64)> {
    let pool = fresh_db(&env.db_url, "bench_sweep").await?;
    // The dead head, then `others` rows of keys that share its partition.
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload, status, attempts, last_error, dead_at)
         VALUES ('bench.sweep', 'stuck', '\\x00', 'dead', 1, 'bench', now())",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT 'bench.sweep', k, convert_to(repeat('x', $2), 'UTF8')
         FROM (SELECT 'o' || i AS k FROM generate_series(1, $1 * 80) i) keys
         WHERE (hashtext(k) & 63) = (hashtext('stuck') & 63)
         LIMIT $1",
    )
    .bind(others as i64)
    .bind(PAYLOAD as i32)
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox.messages")
        .execute(&pool)
        .await?;
    let (store, me, _) = store_owning_all(&pool).await?;
    let start = Instant::now();
    let first = store.hold_back(me).await?;
    let first_ms = start.elapsed().as_secs_f64() * 1000.0;
    let start = Instant::now();
    let mut walked = 0;
    for _ in 0..sweeps {
        walked += store.hold_back(me).await?.walked;
    }
    let idle_ms = start.elapsed().as_secs_f64() * 1000.0 / sweeps as f64;
    pool.close().await;
    Ok((first_ms, first.walked, idle_ms, walked / sweeps as u64))
}

/// What reads cost behind a blocked key.
struct ClaimCost {
    /// Mean read time before the relay's sweep marked the waiting rows, and rows per read.
    unmarked_ms: f64,
    rows: usize,
    /// The same once they are marked held back.
    marked_ms: f64,
    marked_rows: usize,
    /// The sweep that marked them, and one with nothing to do.
    mark_ms: f64,
    idle_sweep_ms: f64,
}

/// What a read costs behind a blocked key: a head row with `behind` rows of its key after it
/// (`block` policy), dead or (`retrying`) waiting out a retry delay of an hour, then 1,000
/// rows over 100 other keys. Mean time of the relay's
/// read (`Store::claim`, 500 rows over all 64 partitions; nothing settled, so every read
/// finds the same rows) over `reads` reads, before and after the relay's sweep
/// (`Store::hold_back`) marked the waiting rows.
async fn claim_cost(
    env: &Env,
    behind: usize,
    reads: usize,
    retrying: bool,
) -> anyhow::Result<ClaimCost> {
    let pool = fresh_db(&env.db_url, "bench_claim").await?;
    if behind > 0 {
        sqlx::query(
            "INSERT INTO outbox.messages (topic, key, payload)
             SELECT 'bench.claim', 'stuck', convert_to(repeat('x', $2), 'UTF8')
             FROM generate_series(0, $1)",
        )
        .bind(behind as i64)
        .bind(PAYLOAD as i32)
        .execute(&pool)
        .await?;
        let head = if retrying {
            "UPDATE outbox.messages SET attempts = 1, last_error = 'bench',
                    available_at = now() + interval '1 hour'
             WHERE seq = (SELECT min(seq) FROM outbox.messages)"
        } else {
            "UPDATE outbox.messages SET status = 'dead', attempts = 1, last_error = 'bench',
                    dead_at = now()
             WHERE seq = (SELECT min(seq) FROM outbox.messages)"
        };
        sqlx::query(head).execute(&pool).await?;
    }
    backlog(&pool, "bench.claim", 1_000, Some(100)).await?;
    sqlx::query("VACUUM ANALYZE outbox.messages")
        .execute(&pool)
        .await?;
    let (store, me, owned) = store_owning_all(&pool).await?;
    let mean_read = |store: Store| {
        let owned = owned.clone();
        async move {
            let rows = store.claim(me, &owned, 500, &[]).await?.len();
            let start = Instant::now();
            for _ in 0..reads {
                store.claim(me, &owned, 500, &[]).await?;
            }
            anyhow::Ok((start.elapsed().as_secs_f64() * 1000.0 / reads as f64, rows))
        }
    };
    let (unmarked_ms, rows) = mean_read(store.clone()).await?;
    let start = Instant::now();
    let marked = store.hold_back(me).await?.marked;
    let mark_ms = start.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        marked == behind as u64,
        "the sweep marked {marked} rows, not the {behind} behind the blocked one"
    );
    let start = Instant::now();
    store.hold_back(me).await?;
    let idle_sweep_ms = start.elapsed().as_secs_f64() * 1000.0;
    let (marked_ms, marked_rows) = mean_read(store).await?;
    pool.close().await;
    Ok(ClaimCost {
        unmarked_ms,
        rows,
        marked_ms,
        marked_rows,
        mark_ms,
        idle_sweep_ms,
    })
}

#[cfg(test)]
mod batch {
    #[test]
    fn the_benchmark_reads_in_the_relays_default_batch() {
        assert_eq!(
            super::BATCH,
            outbox_relay::config::RelaySettings::default().batch_size
        );
    }
}
