//! The chaos suite: proves no loss, per-key order and exactly-once effects while relays are
//! killed and the servers restart under a stream of writes.
//!
//! Runs against the stack of `scripts/stack.sh` (reads `DATABASE_URL`, `AMQP_URL` and
//! `OUTBOX_STACK_DIR`, and restarts servers through `scripts/stack.sh restart`). It creates a
//! database of its own, starts `--relays` relay processes, and from several producers writes
//! `--messages` messages over `--keys` keys, each in a transaction with a business row, some
//! rolled back on purpose. Meanwhile it kills relays with SIGKILL (and restarts them),
//! restarts the broker and PostgreSQL. Then it drains and checks what reached the broker:
//!
//! - every committed message arrived (the business rows say which committed: a message
//!   exists iff its transaction committed, so the `chaos_orders` table is the ground truth,
//!   even for commits whose outcome the producer never learned);
//! - no rolled-back message arrived;
//! - for every key, first arrivals are in `seq` order;
//! - duplicates are counted (at-least-once delivery allows them);
//!
//! and what the consumer library made of it: one effect per committed message (none lost,
//! none doubled), in each key's `seq` order, with the duplicates dedup absorbed. The effects
//! come from the library's sources, `--consumers` of them: members of one Kafka consumer
//! group (`KafkaSource`), or consumers of one single-active-consumer RabbitMQ queue
//! (`RabbitMqSource`; the relay publishes to a fanout exchange that also feeds the arrivals
//! reader's queue). They are restarted `--consumer-restarts` times mid-stream, every other
//! time killed (the task aborted wherever it is) instead of stopped, so work moves between
//! them while messages are being handled. `--consumer-lanes N` gives each Kafka consumer N
//! key lanes per partition (`KafkaSource::with_concurrency`; default 1).
//!
//! Prints a summary table and exits 1 on any loss, phantom, double effect or order violation.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Connection, ConnectionProperties,
};
use outbox::{Message, Outbox};
use rand::{Rng, SeedableRng};
use sqlx::{postgres::PgPoolOptions, PgPool};
use tokio::process::{Child, Command};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct Options {
    messages: usize,
    keys: usize,
    producers: usize,
    relays: usize,
    kills: usize,
    broker_restarts: usize,
    db_restarts: usize,
    rate: f64,
    seed: u64,
    kafka: bool,
    consumers: usize,
    consumer_restarts: usize,
    /// Kafka: key lanes per partition in each consumer (`KafkaSource::with_concurrency`).
    consumer_lanes: usize,
}

impl Options {
    /// How long the writes are spread over; faults are scheduled within it.
    fn planned(&self) -> Duration {
        Duration::from_secs_f64(self.messages as f64 / self.rate)
    }
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut o = Options {
            messages: 50_000,
            keys: 200,
            producers: 4,
            relays: 3,
            kills: 10,
            broker_restarts: 2,
            db_restarts: 1,
            rate: 1000.0,
            seed: rand::random(),
            kafka: false,
            consumers: 2,
            consumer_restarts: 4,
            consumer_lanes: 1,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            let n = || {
                value
                    .parse::<usize>()
                    .with_context(|| format!("{flag}: {value:?} is not a number"))
            };
            match flag.as_str() {
                "--messages" => o.messages = n()?,
                "--keys" => o.keys = n()?,
                "--producers" => o.producers = n()?,
                "--relays" => o.relays = n()?,
                "--kills" => o.kills = n()?,
                "--broker-restarts" => o.broker_restarts = n()?,
                "--db-restarts" => o.db_restarts = n()?,
                "--consumers" => o.consumers = n()?,
                "--consumer-restarts" => o.consumer_restarts = n()?,
                "--consumer-lanes" => o.consumer_lanes = n()?,
                "--rate" => o.rate = value.parse().context("--rate")?,
                "--seed" => o.seed = value.parse().context("--seed")?,
                "--broker" => {
                    o.kafka = match value.as_str() {
                        "rabbitmq" => false,
                        "kafka" => true,
                        other => bail!("--broker: {other:?} is neither rabbitmq nor kafka"),
                    }
                }
                other => bail!(
                    "unknown option {other}; use --messages --keys --producers --relays --kills \
                     --broker-restarts --db-restarts --consumers --consumer-restarts \
                     --consumer-lanes --rate --seed --broker"
                ),
            }
        }
        if !(o.rate.is_finite() && o.rate > 0.0) {
            bail!("--rate must be a positive number of messages per second");
        }
        if o.keys < o.producers || o.producers == 0 || o.relays == 0 {
            bail!("need at least one producer, one relay, and as many keys as producers");
        }
        if o.consumers == 0 {
            bail!("--consumers: the effects need at least one consumer");
        }
        Ok(o)
    }
}

/// One arrival at the consumer.
struct Arrival {
    id: Uuid,
    key: String,
    seq: i64,
}

#[derive(Default)]
struct Counters {
    committed_known: AtomicU64,
    rolled_back: AtomicU64,
    unknown: AtomicU64,
    written: AtomicU64,
}

#[tokio::main]
async fn main() -> ExitCode {
    // The in-process consumers' logs, on request (`RUST_LOG=outbox_consumer=info`).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> anyhow::Result<bool> {
    let o = Options::parse()?;
    let admin_url =
        std::env::var("DATABASE_URL").context("DATABASE_URL (run through scripts/chaos.sh)")?;
    let amqp_url = std::env::var("AMQP_URL").context("AMQP_URL")?;
    let stack_dir = std::env::var("OUTBOX_STACK_DIR").context("OUTBOX_STACK_DIR")?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let relay_bin = std::env::current_exe()?.with_file_name("outbox-relay");
    if !relay_bin.exists() {
        bail!(
            "{} not found: build the workspace first",
            relay_bin.display()
        );
    }
    let broker_name = if o.kafka { "Kafka" } else { "RabbitMQ" };
    println!(
        "chaos ({broker_name}): {} messages over {} keys from {} producers at {} msg/s (~{:.0} s); {} \
         relays; {} relay kills, {} broker restarts, {} PostgreSQL restarts; seed {}",
        o.messages,
        o.keys,
        o.producers,
        o.rate,
        o.planned().as_secs_f64(),
        o.relays,
        o.kills,
        o.broker_restarts,
        o.db_restarts,
        o.seed
    );

    // A database and a queue of our own.
    let name = format!("chaos_{}", Uuid::new_v4().simple());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_url)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut db_url = url::Url::parse(&admin_url)?;
    db_url.set_path(&name);
    let db_url = db_url.to_string();
    let pool = PgPoolOptions::new()
        .max_connections(o.producers as u32 + 2)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&db_url)
        .await?;
    outbox::migrate(&pool).await?;
    sqlx::query("CREATE TABLE chaos_orders (id uuid PRIMARY KEY, key text NOT NULL)")
        .execute(&pool)
        .await?;
    // `member` and `at` say which consumer wrote an effect and when, for a violation's
    // report.
    sqlx::query("CREATE TABLE chaos_effects (n bigserial PRIMARY KEY, message_id uuid NOT NULL, key text, seq bigint, member integer, at timestamptz NOT NULL DEFAULT clock_timestamp())")
        .execute(&pool)
        .await?;
    let dedup = outbox_consumer::Deduplicator::new(pool.clone(), "chaos")?.with_retry(
        outbox_consumer::RetryPolicy {
            max_attempts: u32::MAX,
            ..Default::default()
        },
    );
    dedup.migrate().await?;
    let queue = format!("chaos.{}", Uuid::new_v4().simple());
    // RabbitMQ: the relay publishes to a fanout exchange feeding two queues, one read by the
    // arrivals reader, one by the consumer library (a single-active-consumer queue, so that
    // its members fail over to each other and keep per-key order).
    let exchange = format!("{queue}.fanout");
    let effects_queue = format!("{queue}.effects");

    let arrivals = Arc::new(Mutex::new(Vec::<Arrival>::new()));
    let consumer_stop = Arc::new(AtomicBool::new(false));
    let kafka_brokers = std::env::var("KAFKA_BROKERS").unwrap_or_default();
    let consumer = if o.kafka {
        create_topic(&kafka_brokers, &queue).await?;
        tokio::spawn(consume_kafka(
            kafka_brokers.clone(),
            queue.clone(),
            arrivals.clone(),
            consumer_stop.clone(),
        ))
    } else {
        // The queues must exist before anything is published to them.
        let declared = Instant::now();
        while let Err(e) = declare_fanout(&amqp_url, &exchange, &queue, &effects_queue).await {
            if declared.elapsed() > Duration::from_secs(30) {
                bail!("could not declare exchange {exchange} and its queues: {e}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::spawn(consume(
            amqp_url.clone(),
            queue.clone(),
            arrivals.clone(),
            consumer_stop.clone(),
        ))
    };

    // The effects come from the library's sources: members of one Kafka consumer group, or
    // consumers of one single-active-consumer RabbitMQ queue; restarted (killed or stopped)
    // mid-stream, so work moves between them while messages are being handled.
    let member = Member::factory(
        &o,
        &kafka_brokers,
        &amqp_url,
        &queue,
        &effects_queue,
        &dedup,
    );
    let mut members: Vec<Member> = (0..o.consumers).map(|_| member()).collect();

    let mut relay_env = vec![
        ("OUTBOX__DATABASE__URL", db_url.clone()),
        ("OUTBOX__RABBITMQ__URL", amqp_url.clone()),
        ("OUTBOX__RELAY__LEASE", "2s".to_owned()),
        ("OUTBOX__RELAY__POLL_INTERVAL", "200ms".to_owned()),
        ("OUTBOX__RELAY__RECONNECT_MAX_DELAY", "1s".to_owned()),
        ("OUTBOX__RABBITMQ__CONFIRM_TIMEOUT", "5s".to_owned()),
        ("OUTBOX__LOG__LEVEL", "warn".to_owned()),
        // Several relays on one machine: each its own HTTP port.
        ("OUTBOX__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    if o.kafka {
        relay_env.push(("OUTBOX__BROKER", "kafka".to_owned()));
        relay_env.push(("OUTBOX__KAFKA__BROKERS", kafka_brokers.clone()));
    } else {
        relay_env.push(("OUTBOX__RABBITMQ__EXCHANGE", exchange.clone()));
    }
    let log_dir = PathBuf::from(&stack_dir).join(format!("chaos-logs-{name}"));
    std::fs::create_dir_all(&log_dir)?;
    let mut relays = Vec::new();
    for i in 0..o.relays {
        relays.push(spawn_relay(&relay_bin, &relay_env, &log_dir, i, 0)?);
    }

    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let rolled_back_ids = Arc::new(Mutex::new(HashSet::new()));
    let producers: Vec<_> = (0..o.producers)
        .map(|p| {
            tokio::spawn(produce(
                p,
                o.clone(),
                pool.clone(),
                queue.clone(),
                counters.clone(),
                rolled_back_ids.clone(),
            ))
        })
        .collect();

    // Faults, spread over the time the producers need. The schedule is drawn up front so a
    // run with the same seed injects the same faults in the same order.
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let mut events: Vec<(f64, Fault)> = Vec::new();
    for _ in 0..o.kills {
        events.push((
            rng.random_range(0.05..0.95),
            Fault::KillRelay(rng.random_range(0..o.relays)),
        ));
    }
    for i in 0..o.broker_restarts {
        events.push((
            (i as f64 + 1.0) / (o.broker_restarts as f64 + 1.0),
            Fault::RestartBroker,
        ));
    }
    for n in 0..o.consumer_restarts {
        events.push((
            rng.random_range(0.05..0.95),
            Fault::RestartConsumer {
                member: rng.random_range(0..o.consumers),
                kill: n % 2 == 0,
            },
        ));
    }
    for i in 0..o.db_restarts {
        events.push((
            (i as f64 + 0.5) / (o.db_restarts as f64 + 0.5) * 0.9,
            Fault::RestartDb,
        ));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));

    let (mut kills, mut broker_restarts, mut db_restarts) = (0, 0, 0);
    let (mut consumers_killed, mut consumers_stopped) = (0, 0);
    // Consumers restarted because the effects stalled (see the effects wait below).
    let mut group_nudges = 0usize;
    let total = o.messages as u64;
    let planned = o.planned().as_secs_f64();
    let mut next_progress = Instant::now();
    let mut pending_events = events.into_iter().peekable();
    loop {
        let progress = started.elapsed().as_secs_f64() / planned;
        while let Some((at, _)) = pending_events.peek() {
            if progress < *at {
                break;
            }
            let (_, fault) = pending_events.next().unwrap();
            match fault {
                Fault::KillRelay(i) => {
                    relays[i].start_kill().ok();
                    let _ = bounded(
                        &format!("relay {i}, killed with SIGKILL, exiting"),
                        Duration::from_secs(30),
                        relays[i].wait(),
                    )
                    .await?;
                    kills += 1;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
                    relays[i] = spawn_relay(&relay_bin, &relay_env, &log_dir, i, kills)?;
                    println!(
                        "[{:>6.1}s] killed relay {i} with SIGKILL and restarted it",
                        started.elapsed().as_secs_f64()
                    );
                }
                Fault::RestartBroker => {
                    bounded(
                        &format!("restarting {broker_name}"),
                        Duration::from_secs(180),
                        stack(&root, if o.kafka { "kafka" } else { "rabbitmq" }),
                    )
                    .await??;
                    broker_restarts += 1;
                    println!(
                        "[{:>6.1}s] restarted {broker_name}",
                        started.elapsed().as_secs_f64()
                    );
                }
                Fault::RestartConsumer { member: i, kill } => {
                    let old = std::mem::replace(&mut members[i], member());
                    let what = format!(
                        "consumer {i}, {}, ending",
                        if kill { "killed" } else { "asked to stop" }
                    );
                    if kill {
                        bounded(&what, Duration::from_secs(60), old.kill()).await?;
                        consumers_killed += 1;
                    } else {
                        bounded(&what, Duration::from_secs(60), old.stop()).await?;
                        consumers_stopped += 1;
                    }
                    println!(
                        "[{:>6.1}s] {} consumer {i} and started a new one",
                        started.elapsed().as_secs_f64(),
                        if kill {
                            "killed (task aborted)"
                        } else {
                            "stopped"
                        }
                    );
                }
                Fault::RestartDb => {
                    bounded(
                        "restarting PostgreSQL",
                        Duration::from_secs(180),
                        stack(&root, "postgres"),
                    )
                    .await??;
                    db_restarts += 1;
                    println!(
                        "[{:>6.1}s] restarted PostgreSQL",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
        if producers.iter().all(|p| p.is_finished()) && pending_events.peek().is_none() {
            break;
        }
        if Instant::now() >= next_progress {
            next_progress = Instant::now() + Duration::from_secs(5);
            // Effects read with a short timeout: PostgreSQL may be restarting.
            let effects = tokio::time::timeout(
                Duration::from_secs(1),
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM chaos_effects").fetch_one(&pool),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map_or_else(|| "?".to_owned(), |n| n.to_string());
            println!(
                "[{:>6.1}s] committed {}/{total}, arrivals {}, effects {effects}",
                started.elapsed().as_secs_f64(),
                counters.written.load(Ordering::Relaxed),
                arrivals.lock().unwrap().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, p) in producers.into_iter().enumerate() {
        bounded(
            &format!("producer {i} finishing"),
            Duration::from_secs(120),
            p,
        )
        .await???;
    }

    // Ground truth: which messages committed.
    let committed: HashSet<Uuid> = loop {
        match sqlx::query_scalar::<_, Uuid>("SELECT id FROM chaos_orders")
            .fetch_all(&pool)
            .await
        {
            Ok(ids) => break ids.into_iter().collect(),
            Err(e) => {
                eprintln!("reading chaos_orders: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };

    // Drain: wait until every committed message arrived, or give up after a quiet spell.
    let drain_started = Instant::now();
    let mut last_count = 0;
    let mut last_change = Instant::now();
    loop {
        let arrived: HashSet<Uuid> = arrivals.lock().unwrap().iter().map(|a| a.id).collect();
        if committed.is_subset(&arrived) {
            break;
        }
        if arrived.len() != last_count {
            last_count = arrived.len();
            last_change = Instant::now();
        }
        if last_change.elapsed() > Duration::from_secs(60) {
            println!("no new arrivals for 60 s; stopping the drain");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = drain_started.elapsed();
    // Late duplicates.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Effects trail arrivals by one transaction each; wait for them too. A consumer group
    // held in a rebalance (a killed member is waited for until `max.poll.interval.ms`)
    // applies nothing for a while, then catches up: wait while the effects still grow, and
    // give up after 45 s without progress (or 3 minutes in all).
    //
    // The local Kafka-protocol broker can also leave a partition with no owner for good:
    // after a broker restart, a member that joins a generation late may be handed a stale
    // assignment by SyncGroup (seen: the leader assigned [0, 1] and [2]; the late member was
    // given [1]), and with every member heartbeating in that generation no rebalance
    // follows. A real broker hands out the leader's assignment. So when the effects stall
    // for 10 s, one consumer is restarted, which makes the group rebalance; the summary
    // counts these restarts.
    let effects_started = Instant::now();
    let mut effects_seen = 0;
    let mut effects_changed = Instant::now();
    let mut last_nudge = Instant::now();
    loop {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT message_id FROM chaos_effects")
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
        let ids: HashSet<Uuid> = ids.into_iter().collect();
        if committed.is_subset(&ids) {
            break;
        }
        if ids.len() != effects_seen {
            effects_seen = ids.len();
            effects_changed = Instant::now();
        }
        let stalled = effects_changed.elapsed().min(last_nudge.elapsed());
        if o.kafka && stalled > Duration::from_secs(10) && group_nudges < 3 {
            let i = group_nudges % members.len();
            let old = std::mem::replace(&mut members[i], member());
            bounded(
                &format!("consumer {i}, asked to stop, ending"),
                Duration::from_secs(60),
                old.stop(),
            )
            .await?;
            group_nudges += 1;
            last_nudge = Instant::now();
            println!(
                "[{:>6.1}s] effects stalled at {} of {} for 10 s: restarted consumer {i} to \
                 make the group rebalance",
                started.elapsed().as_secs_f64(),
                ids.len(),
                committed.len()
            );
        }
        if effects_changed.elapsed() > Duration::from_secs(45)
            || effects_started.elapsed() > Duration::from_secs(180)
        {
            println!(
                "effects stopped at {effects_seen} of {}; stopping the wait",
                committed.len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for r in &mut relays {
        if let Some(pid) = r.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for r in &mut relays {
        let _ = tokio::time::timeout(Duration::from_secs(30), r.wait()).await;
    }
    consumer_stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), consumer).await;
    // A consumer asked to stop must stop: one that hangs is a failure, not a hung run.
    let mut stuck_consumers = 0;
    for (i, m) in members.into_iter().enumerate() {
        if tokio::time::timeout(Duration::from_secs(60), m.stop())
            .await
            .is_err()
        {
            println!("consumer {i} did not stop within 60 s of being asked to");
            stuck_consumers += 1;
        }
    }
    let wall = started.elapsed();

    // Verdict.
    let effect_rows: Vec<EffectRow> = sqlx::query_as(
        "SELECT message_id, key, seq, n, member,
                    to_char(at AT TIME ZONE 'UTC', 'HH24:MI:SS.MS')
             FROM chaos_effects ORDER BY n",
    )
    .fetch_all(&pool)
    .await?;
    let left_in_outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE status = 'pending'")
            .fetch_one(&pool)
            .await?;
    let arrivals = arrivals.lock().unwrap();
    let mut first: HashSet<Uuid> = HashSet::new();
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    let mut violations = Vec::new();
    for a in arrivals.iter() {
        if first.insert(a.id) {
            let last = last_seq.entry(&a.key).or_insert(i64::MIN);
            if a.seq < *last {
                violations.push(format!(
                    "key {}: seq {} arrived after seq {}",
                    a.key, a.seq, last
                ));
            }
            *last = (*last).max(a.seq);
        }
    }
    let lost: Vec<&Uuid> = committed.iter().filter(|id| !first.contains(id)).collect();
    let rolled_back = rolled_back_ids.lock().unwrap();
    let phantoms: Vec<&Uuid> = first.iter().filter(|id| !committed.contains(id)).collect();
    let phantom_rolled_back = phantoms
        .iter()
        .filter(|id| rolled_back.contains(**id))
        .count();
    let duplicates = arrivals.len() - first.len();

    let rows: BTreeMap<usize, (&str, String)> = [
        (0, ("committed", committed.len().to_string())),
        (
            1,
            (
                "rolled back (on purpose)",
                counters.rolled_back.load(Ordering::Relaxed).to_string(),
            ),
        ),
        (
            2,
            (
                "commit outcome unknown to producer",
                counters.unknown.load(Ordering::Relaxed).to_string(),
            ),
        ),
        (3, ("arrived (distinct)", first.len().to_string())),
        (4, ("lost", lost.len().to_string())),
        (
            5,
            (
                "arrived but never committed",
                format!(
                    "{} ({} rolled back on purpose)",
                    phantoms.len(),
                    phantom_rolled_back
                ),
            ),
        ),
        (6, ("duplicates at the broker", duplicates.to_string())),
        (
            7,
            ("per-key order violations", violations.len().to_string()),
        ),
        (8, ("relay kills (SIGKILL)", kills.to_string())),
        (
            9,
            (
                if o.kafka {
                    "Kafka broker restarts"
                } else {
                    "RabbitMQ restarts"
                },
                broker_restarts.to_string(),
            ),
        ),
        (10, ("PostgreSQL restarts", db_restarts.to_string())),
        (
            11,
            (
                "consumers killed / stopped",
                format!(
                    "{consumers_killed} / {consumers_stopped} (of {})",
                    o.consumers
                ),
            ),
        ),
        (
            12,
            (
                "drain after last write",
                format!("{:.1} s", drain.as_secs_f64()),
            ),
        ),
        (13, ("wall time", format!("{:.1} s", wall.as_secs_f64()))),
    ]
    .into_iter()
    .collect();
    println!();
    println!("| {:<36} | {:>30} |", "chaos summary", "");
    println!("|{:-<38}|{:->32}|", "", "");
    for (label, value) in rows.values() {
        println!("| {label:<36} | {value:>30} |");
    }
    for v in violations.iter().take(10) {
        println!("order violation: {v}");
    }
    for id in lost.iter().take(10) {
        println!("lost: {id}");
    }
    // The consumer's view: one effect per committed message, in each key's seq order.
    let effect_ids: HashSet<Uuid> = effect_rows.iter().map(|r| r.0).collect();
    let double_effects = effect_rows.len() - effect_ids.len();
    let effects_lost = committed
        .iter()
        .filter(|id| !effect_ids.contains(id))
        .count();
    // Per key, the effect with the highest seq so far; an effect below it is a violation,
    // reported with both effects' writers and times.
    let mut effect_last: HashMap<&str, &EffectRow> = HashMap::new();
    let mut effect_violations = 0;
    for row in &effect_rows {
        let (Some(key), Some(seq)) = (&row.1, row.2) else {
            continue;
        };
        match effect_last.get(key.as_str()) {
            Some(last) if last.2.unwrap_or(i64::MIN) > seq => {
                effect_violations += 1;
                if effect_violations <= 10 {
                    println!(
                        "effect order violation: key {key}: seq {seq} (message {}, n {}, member {:?}, at {}) after seq {} (message {}, n {}, member {:?}, at {})",
                        row.0, row.3, row.4, row.5,
                        last.2.unwrap_or_default(), last.0, last.3, last.4, last.5
                    );
                }
            }
            _ => {
                effect_last.insert(key, row);
            }
        }
    }
    println!(
        "| {:<36} | {:>30} |",
        "left in the outbox (undelivered)", left_in_outbox
    );
    println!(
        "| {:<36} | {:>30} |",
        "effects (distinct)",
        effect_ids.len()
    );
    println!("| {:<36} | {:>30} |", "effects lost", effects_lost);
    println!("| {:<36} | {:>30} |", "double effects", double_effects);
    println!(
        "| {:<36} | {:>30} |",
        "duplicates absorbed by dedup",
        dedup.stats().duplicates
    );
    println!(
        "| {:<36} | {:>30} |",
        "per-key effect order violations", effect_violations
    );
    println!(
        "| {:<36} | {:>30} |",
        "consumer restarts (effects stalled)", group_nudges
    );
    println!(
        "| {:<36} | {:>30} |",
        "consumers that did not stop", stuck_consumers
    );
    let ok = lost.is_empty()
        && stuck_consumers == 0
        && phantoms.is_empty()
        && violations.is_empty()
        && effects_lost == 0
        && double_effects == 0
        && effect_violations == 0;
    println!("{}", if ok { "chaos: PASSED" } else { "chaos: FAILED" });
    if ok {
        let _ = std::fs::remove_dir_all(&log_dir);
    } else {
        println!("relay logs: {}", log_dir.display());
    }
    Ok(ok)
}

/// An effect as recorded: message id, key, seq, its position (`n`), the member that wrote
/// it, and when (UTC, to the millisecond).
type EffectRow = (Uuid, Option<String>, Option<i64>, i64, Option<i32>, String);

/// The consumer side's handler: one effect row per message, in the transaction that also
/// records the message as processed, with the number of the member that wrote it.
struct EffectWriter(u32);

impl outbox_consumer::Handler for EffectWriter {
    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        m: &'a outbox_consumer::Incoming,
    ) -> futures::future::BoxFuture<'a, Result<(), outbox_consumer::HandlerError>> {
        Box::pin(async move {
            let seq: Option<i64> = m.headers.get("outbox-seq").and_then(|s| s.parse().ok());
            sqlx::query(
                "INSERT INTO chaos_effects (message_id, key, seq, member) VALUES ($1, $2, $3, $4)",
            )
            .bind(m.message_id)
            .bind(m.key.as_deref())
            .bind(seq)
            .bind(self.0 as i32)
            .execute(&mut *tx)
            .await
            .map_err(outbox_consumer::HandlerError::retryable)?;
            Ok(())
        })
    }
}

/// One consumer applying the effects through the library's source for the broker.
struct Member {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), outbox_consumer::ConsumerError>>,
}

impl Member {
    /// A function starting a new member: a KafkaSource in one consumer group, or a
    /// RabbitMqSource on the effects queue.
    fn factory(
        o: &Options,
        brokers: &str,
        amqp_url: &str,
        topic: &str,
        effects_queue: &str,
        dedup: &outbox_consumer::Deduplicator,
    ) -> impl Fn() -> Member {
        let (kafka, lanes) = (o.kafka, o.consumer_lanes);
        let group = format!("chaos-effects-{topic}");
        let (brokers, amqp_url, topic, effects_queue, dedup) = (
            brokers.to_owned(),
            amqp_url.to_owned(),
            topic.to_owned(),
            effects_queue.to_owned(),
            dedup.clone(),
        );
        let members = std::sync::atomic::AtomicU32::new(0);
        move || {
            let member = members.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let shutdown = tokio_util::sync::CancellationToken::new();
            let (dedup, stop) = (dedup.clone(), shutdown.clone());
            let task = if kafka {
                let source = outbox_consumer::kafka::KafkaSource::new(&brokers, &group, &[&topic])
                    .with_property("session.timeout.ms", "6000")
                    // Also the rebalance timeout: the local broker holds a rebalance that
                    // waits for a killed member until it runs out (see the README).
                    .with_property("max.poll.interval.ms", "15000")
                    .with_property("heartbeat.interval.ms", "500")
                    .with_property("auto.commit.interval.ms", "500")
                    .with_concurrency(lanes);
                tokio::spawn(async move {
                    source
                        .run(dedup, Arc::new(EffectWriter(member)), stop)
                        .await
                })
            } else {
                let source = outbox_consumer::rabbitmq::RabbitMqSource::new(
                    amqp_url.clone(),
                    &effects_queue,
                )
                .with_prefetch(200)
                .with_concurrency(8);
                tokio::spawn(async move {
                    source
                        .run(dedup, Arc::new(EffectWriter(member)), stop)
                        .await
                })
            };
            Member { shutdown, task }
        }
    }

    /// Stops it as a deployment would (SIGTERM): the message in hand is finished and
    /// acknowledged (offset committed), the rest is left for redelivery.
    async fn stop(self) {
        self.shutdown.cancel();
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("consumer: {e}"),
            Err(e) => eprintln!("consumer task: {e}"),
        }
    }

    /// Kills it mid-flight: its task is aborted wherever it is (a handler's transaction is
    /// rolled back, a commit may have happened without its ack).
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

enum Fault {
    KillRelay(usize),
    RestartConsumer { member: usize, kill: bool },
    RestartBroker,
    RestartDb,
}

fn spawn_relay(
    bin: &PathBuf,
    env: &[(&str, String)],
    log_dir: &std::path::Path,
    i: usize,
    generation: usize,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log_dir.join(format!("relay-{i}-{generation}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.spawn()?)
}

/// `fut`, or an error naming `what` once `limit` passed: a step of the run that hangs fails
/// it, saying which step, instead of holding it (and the test suite) for good.
async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => Ok(v),
        Err(_) => bail!(
            "{what} took over {} s; giving up on the run",
            limit.as_secs()
        ),
    }
}

async fn stack(root: &std::path::Path, server: &str) -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg(root.join("scripts/stack.sh"))
        .args(["restart", server])
        .status()
        .await?;
    if !status.success() {
        bail!("scripts/stack.sh restart {server} failed");
    }
    Ok(())
}

/// Producer `p` owns the keys `k ≡ p (mod producers)` and writes them round-robin, one
/// transaction at a time, so each key's writes are serialised.
async fn produce(
    p: usize,
    o: Options,
    pool: PgPool,
    topic: String,
    counters: Arc<Counters>,
    rolled_back_ids: Arc<Mutex<HashSet<Uuid>>>,
) -> anyhow::Result<()> {
    let mine: Vec<usize> = (p..o.keys).step_by(o.producers).collect();
    let quota = o.messages / o.producers + usize::from(p < o.messages % o.producers);
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed ^ (p as u64 + 1));
    let outbox = Outbox::default();
    let per_producer_rate = o.rate / o.producers as f64;
    let start = tokio::time::Instant::now();
    let mut done = 0;
    let mut tx_no = 0usize;
    while done < quota {
        // Keep to the planned rate so the writes span the fault schedule.
        tokio::time::sleep_until(start + Duration::from_secs_f64(done as f64 / per_producer_rate))
            .await;
        tx_no += 1;
        let key = format!("key-{}", mine[tx_no % mine.len()]);
        let n = rng.random_range(1..=3).min(quota - done);
        let msgs: Vec<Message> = (0..n)
            .map(|i| {
                Message::new(&topic, format!("{key}/{tx_no}/{i}").into_bytes())
                    .unwrap()
                    .with_key(&key)
                    .unwrap()
            })
            .collect();
        let rollback = tx_no % 10 == 0;
        let attempt = async {
            let mut tx = pool.begin().await?;
            for m in &msgs {
                sqlx::query("INSERT INTO chaos_orders (id, key) VALUES ($1, $2)")
                    .bind(m.id())
                    .bind(&key)
                    .execute(&mut *tx)
                    .await?;
            }
            outbox.enqueue_batch(&mut *tx, &msgs).await?;
            if rollback {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
            }
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) if rollback => {
                counters.rolled_back.fetch_add(n as u64, Ordering::Relaxed);
                rolled_back_ids
                    .lock()
                    .unwrap()
                    .extend(msgs.iter().map(Message::id));
            }
            Ok(()) => {
                counters
                    .committed_known
                    .fetch_add(n as u64, Ordering::Relaxed);
                counters.written.fetch_add(n as u64, Ordering::Relaxed);
                done += n;
            }
            Err(_) => {
                // The database went away mid-transaction: the outcome may be either. The
                // chaos_orders table decides at the end; the key's order stays serialised
                // because the next write waits for this one to have failed.
                counters.unknown.fetch_add(n as u64, Ordering::Relaxed);
                if rollback {
                    rolled_back_ids
                        .lock()
                        .unwrap()
                        .extend(msgs.iter().map(Message::id));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Ok(())
}

async fn amqp(url: &str) -> Result<Connection, lapin::Error> {
    Connection::connect(
        url,
        ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
    )
    .await
}

/// Declares the durable fanout `exchange` with two durable queues bound to it: `arrivals`,
/// and `effects` with a single active consumer.
async fn declare_fanout(
    url: &str,
    exchange: &str,
    arrivals: &str,
    effects: &str,
) -> Result<(), lapin::Error> {
    let conn = amqp(url).await?;
    let ch = conn.create_channel().await?;
    let durable = || QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        exchange,
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(arrivals, durable(), FieldTable::default())
        .await?;
    let mut single_active = FieldTable::default();
    single_active.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    ch.queue_declare(effects, durable(), single_active).await?;
    for q in [arrivals, effects] {
        ch.queue_bind(
            q,
            exchange,
            "",
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let _ = conn.close(200, "declared").await;
    Ok(())
}

/// Consumes `queue` until told to stop, reconnecting after broker restarts. Acks after
/// recording, so a message lost in a restart is redelivered (and counted as a duplicate).
async fn consume(
    url: String,
    queue: String,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let session = async {
            let conn = amqp(&url).await?;
            let ch = conn.create_channel().await?;
            ch.queue_declare(
                &queue,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            ch.basic_qos(500, BasicQosOptions::default()).await?;
            let mut deliveries = ch
                .basic_consume(
                    &queue,
                    "chaos",
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            loop {
                let next =
                    tokio::time::timeout(Duration::from_millis(200), deliveries.next()).await;
                if stop.load(Ordering::Relaxed) {
                    return Ok::<(), lapin::Error>(());
                }
                let Ok(next) = next else { continue };
                let Some(delivery) = next else { return Ok(()) };
                let d = delivery?;
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
                let arrival = Arrival {
                    id: header("outbox-id")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_default(),
                    key: header("outbox-key").unwrap_or_default(),
                    seq: header("outbox-seq")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_default(),
                };
                arrivals.lock().unwrap().push(arrival);
                d.ack(BasicAckOptions::default()).await?;
            }
        };
        if let Err(e) = session.await {
            if !stop.load(Ordering::Relaxed) {
                eprintln!("consumer: {e}; reconnecting");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::{
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
        ClientConfig,
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

/// Reads every partition of `topic` from the beginning until told to stop; librdkafka
/// reconnects by itself after a broker restart.
async fn consume_kafka(
    brokers: String,
    topic: String,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<AtomicBool>,
) {
    use rdkafka::{
        consumer::{Consumer as _, StreamConsumer},
        message::{Headers, Message as _},
        ClientConfig, Offset, TopicPartitionList,
    };
    // Where to read each partition from next. A reader that has seen nothing for a while
    // is replaced by a new one resuming from here: after a restart of the test broker a
    // surviving reader can stall, while a new one reads on.
    let mut next: [i64; 3] = [0; 3];
    while !stop.load(Ordering::Relaxed) {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("chaos-{topic}"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("kafka consumer");
        let mut assignment = TopicPartitionList::new();
        for (p, offset) in next.iter().enumerate() {
            assignment
                .add_partition_offset(&topic, p as i32, Offset::Offset(*offset))
                .expect("partition");
        }
        consumer.assign(&assignment).expect("assign");
        let mut last_message = Instant::now();
        while !stop.load(Ordering::Relaxed) && last_message.elapsed() < Duration::from_secs(10) {
            let Ok(received) =
                tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
            else {
                continue;
            };
            let m = match received {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("kafka consumer: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            last_message = Instant::now();
            let header = |name: &str| {
                m.headers().and_then(|h| {
                    h.iter()
                        .find(|x| x.key == name)
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
            };
            let arrival = Arrival {
                id: header("outbox-id")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default(),
                key: header("outbox-key").unwrap_or_default(),
                seq: header("outbox-seq")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default(),
            };
            arrivals.lock().unwrap().push(arrival);
            if let Some(slot) = next.get_mut(m.partition() as usize) {
                *slot = m.offset() + 1;
            }
        }
    }
}
