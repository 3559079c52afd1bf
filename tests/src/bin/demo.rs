//! The end-to-end demo: producers write orders and their messages in one transaction each
//! (some roll back), a running `outbox-relay` publishes them, and a RabbitMQ consumer checks
//! what arrives. Prints progress every second and a summary; exits non-zero if a committed
//! message was lost, a rolled-back one arrived, or a key's order broke.
//!
//! Reads `DATABASE_URL`, and `AMQP_URL` or (with `DEMO_BROKER=kafka`) `KAFKA_BROKERS`.
//! Usage: `outbox-demo [MESSAGES] [KEYS]`.

use std::{
    collections::{HashMap, HashSet},
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
        QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable},
    Connection, ConnectionProperties,
};
use outbox::{Message, Outbox};
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const TOPIC: &str = "demo.orders";
const PRODUCERS: usize = 4;
const PER_TX: usize = 5;
const ROLLBACK_EVERY: usize = 20;

#[derive(Default)]
struct Seen {
    ids: HashSet<Uuid>,
    duplicates: u64,
    last_seq: HashMap<String, i64>,
    order_violations: u64,
    latencies_ms: Vec<f64>,
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let mut args = std::env::args().skip(1);
    let total: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let keys: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let db_url = std::env::var("DATABASE_URL")?;
    let amqp_url = std::env::var("AMQP_URL").unwrap_or_default();

    let pool = PgPoolOptions::new()
        .max_connections(PRODUCERS as u32 + 2)
        .connect(&db_url)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS demo_orders (id uuid PRIMARY KEY, customer text NOT NULL, amount int NOT NULL)")
        .execute(&pool)
        .await?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let rolled_back_ids = Arc::new(Mutex::new(HashSet::new()));
    let kafka = std::env::var("DEMO_BROKER").is_ok_and(|b| b == "kafka");
    if kafka {
        consume_kafka(&std::env::var("KAFKA_BROKERS")?, seen.clone()).await?;
    } else {
        consume_rabbitmq(&amqp_url, seen.clone()).await?;
    }

    println!("writing {total} messages over {keys} keys from {PRODUCERS} producers, {PER_TX} per transaction, every {ROLLBACK_EVERY}th transaction rolled back");
    let written = Arc::new(AtomicU64::new(0));
    let rolled = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (pool, written, rolled, rolled_back_ids) =
                (pool.clone(), written.clone(), rolled.clone(), rolled_back_ids.clone());
            tokio::spawn(async move {
                let outbox = Outbox::default();
                let mine = total / PRODUCERS + usize::from(p < total % PRODUCERS);
                let mut done = 0;
                let mut tx_no = 0;
                while done < mine {
                    tx_no += 1;
                    let mut tx = pool.begin().await?;
                    let mut batch = Vec::new();
                    for i in 0..PER_TX.min(mine - done) {
                        // Each producer owns the keys congruent to it, so a key's writes are
                        // serialised: that is what makes their order meaningful.
                        let key = format!("customer-{}", (p + PRODUCERS * ((done + i) % (keys / PRODUCERS).max(1))) % keys);
                        let order = Uuid::now_v7();
                        sqlx::query("INSERT INTO demo_orders (id, customer, amount) VALUES ($1, $2, $3)")
                            .bind(order)
                            .bind(&key)
                            .bind((done + i) as i32)
                            .execute(&mut *tx)
                            .await?;
                        let body = serde_json::json!({ "order": order, "customer": key, "written_ms": now_ms() });
                        batch.push(Message::json(TOPIC, &body)?.with_key(key)?);
                    }
                    outbox.enqueue_batch(&mut *tx, &batch).await?;
                    if tx_no % ROLLBACK_EVERY == 0 {
                        tx.rollback().await?;
                        rolled.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        rolled_back_ids.lock().unwrap().extend(batch.iter().map(Message::id));
                    } else {
                        tx.commit().await?;
                        written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        done += batch.len();
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();

    let mut producers_done = false;
    let mut producers = futures::future::join_all(producers);
    let mut last_progress = Instant::now();
    let quiet_deadline = Duration::from_secs(120);
    loop {
        if !producers_done {
            if let Ok(results) =
                tokio::time::timeout(Duration::from_millis(100), &mut producers).await
            {
                for r in results {
                    r??;
                }
                producers_done = true;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let arrived = seen.lock().unwrap().ids.len() as u64;
        let committed = written.load(Ordering::Relaxed);
        if last_progress.elapsed() >= Duration::from_secs(1)
            || (producers_done && arrived >= committed)
        {
            last_progress = Instant::now();
            println!(
                "[{:>5.1}s] committed {committed:>7}/{total}  rolled back {:>5}  arrived {arrived:>7}  in outbox {:>7}",
                start.elapsed().as_secs_f64(),
                rolled.load(Ordering::Relaxed),
                committed.saturating_sub(arrived),
            );
        }
        if producers_done && arrived >= committed {
            break;
        }
        if start.elapsed() > quiet_deadline {
            println!("gave up waiting after {quiet_deadline:?}");
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await; // anything extra would show up now
    let s = seen.lock().unwrap();
    let committed = written.load(Ordering::Relaxed);
    let rolled_arrived = rolled_back_ids.lock().unwrap().intersection(&s.ids).count();
    let lost = committed.saturating_sub(s.ids.len() as u64 - rolled_arrived as u64);
    let mut lat = s.latencies_ms.clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!();
    println!("committed               {committed}");
    println!("rolled back             {}", rolled.load(Ordering::Relaxed));
    println!("arrived (distinct)      {}", s.ids.len());
    println!("rolled back but arrived {rolled_arrived}");
    println!("lost                    {lost}");
    println!("duplicates              {}", s.duplicates);
    println!("per-key order breaks    {}", s.order_violations);
    println!(
        "wall time               {elapsed:.2} s ({:.0} msg/s end to end)",
        committed as f64 / elapsed
    );
    println!(
        "commit→consumer latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    let ok = lost == 0 && rolled_arrived == 0 && s.order_violations == 0;
    println!("{}", if ok { "OK" } else { "FAILED" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

impl Seen {
    /// Records one delivery: first arrivals per key must come in `seq` order.
    fn record(&mut self, id: Uuid, key: String, seq: i64, body: &[u8]) {
        let body: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let written = body["written_ms"].as_f64().unwrap_or(0.0);
        if self.ids.insert(id) {
            self.latencies_ms.push(now_ms() - written);
            let last = self.last_seq.entry(key).or_insert(i64::MIN);
            if seq < *last {
                self.order_violations += 1;
            }
            *last = seq.max(*last);
        } else {
            self.duplicates += 1;
        }
    }
}

fn parse<T: std::str::FromStr + Default>(value: Option<String>) -> T {
    value.and_then(|s| s.parse().ok()).unwrap_or_default()
}

async fn consume_rabbitmq(amqp_url: &str, seen: Arc<Mutex<Seen>>) -> anyhow::Result<()> {
    let conn = Connection::connect(
        amqp_url,
        ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
    )
    .await?;
    let channel = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(TOPIC, durable, FieldTable::default())
        .await?;
    channel
        .queue_purge(TOPIC, QueuePurgeOptions::default())
        .await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            TOPIC,
            "outbox-demo",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(Ok(d)) = deliveries.next().await {
            let header = |name: &str| {
                d.properties
                    .headers()
                    .as_ref()
                    .and_then(|h| match h.inner().get(name) {
                        Some(AMQPValue::LongString(s)) => {
                            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                        }
                        _ => None,
                    })
            };
            let (id, seq, key) = (
                parse(header("outbox-id")),
                parse(header("outbox-seq")),
                parse(header("outbox-key")),
            );
            seen.lock().unwrap().record(id, key, seq, &d.data);
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });
    Ok(())
}

/// Creates the demo topic (3 partitions) and reads it from the beginning (the local stack is
/// new for every demo run, so the topic holds only this run).
async fn consume_kafka(brokers: &str, seen: Arc<Mutex<Seen>>) -> anyhow::Result<()> {
    use rdkafka::{
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
        consumer::{Consumer as _, StreamConsumer},
        message::{Headers, Message as _},
        ClientConfig, Offset, TopicPartitionList,
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    // An existing topic is fine: the demo reads only what it writes from here on.
    let _ = admin
        .create_topics(
            &[NewTopic::new(TOPIC, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-demo")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..3 {
        assignment.add_partition_offset(TOPIC, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    tokio::spawn(async move {
        loop {
            let Ok(m) = consumer.recv().await else {
                continue;
            };
            let header = |name: &str| {
                m.headers().and_then(|h| {
                    h.iter()
                        .find(|x| x.key == name)
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
            };
            let (id, seq, key) = (
                parse(header("outbox-id")),
                parse(header("outbox-seq")),
                parse(header("outbox-key")),
            );
            seen.lock()
                .unwrap()
                .record(id, key, seq, m.payload().unwrap_or_default());
        }
    });
    Ok(())
}
