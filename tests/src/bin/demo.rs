//! The end-to-end demo: producers write orders and their messages in one transaction each
//! (some roll back), a running `outbox-relay` publishes them, and a RabbitMQ consumer checks
//! what arrives. Prints progress every second and a summary; exits non-zero if a committed
//! message was lost, a rolled-back one arrived, or a key's order broke.
//!
//! Reads `DATABASE_URL` and `AMQP_URL`. Usage: `outbox-demo [MESSAGES] [KEYS]`.

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
    let amqp_url = std::env::var("AMQP_URL")?;

    let pool = PgPoolOptions::new()
        .max_connections(PRODUCERS as u32 + 2)
        .connect(&db_url)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS demo_orders (id uuid PRIMARY KEY, customer text NOT NULL, amount int NOT NULL)")
        .execute(&pool)
        .await?;

    let conn = Connection::connect(
        &amqp_url,
        ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
    )
    .await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            TOPIC,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
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

    let seen = Arc::new(Mutex::new(Seen::default()));
    let rolled_back_ids = Arc::new(Mutex::new(HashSet::new()));
    {
        let seen = seen.clone();
        tokio::spawn(async move {
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
                let id: Uuid = header("outbox-id")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default();
                let seq: i64 = header("outbox-seq")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default();
                let key = header("outbox-key").unwrap_or_default();
                let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
                let written = body["written_ms"].as_f64().unwrap_or(0.0);
                {
                    let mut guard = seen.lock().unwrap();
                    let s = &mut *guard;
                    if s.ids.insert(id) {
                        s.latencies_ms.push(now_ms() - written);
                        let last = s.last_seq.entry(key).or_insert(i64::MIN);
                        if seq < *last {
                            s.order_violations += 1;
                        }
                        *last = seq.max(*last);
                    } else {
                        s.duplicates += 1;
                    }
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
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
