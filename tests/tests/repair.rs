//! Replays and repairs end to end on both brokers, with the consumer library deduplicating:
//! what a group already processed has no second effect, what it lost has exactly one.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use outbox::Message;
use outbox_consumer::{
    kafka::KafkaSource, rabbitmq::RabbitMqSource, Deduplicator, Handler, HandlerError, Incoming,
};
use outbox_tests::{
    amqp_url, enqueue_all, for_each_broker, kafka_brokers, start_relay, topic, Broker,
    RelayProcess, TestDb,
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Records one effect per message.
struct Effect;

impl Handler for Effect {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO effects (message_id, replay) VALUES ($1, $2)")
                .bind(m.message_id)
                .bind(m.is_replay())
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
            Ok(())
        })
    }
}

/// A consumer of `topic` for group `billing`, running until stopped.
struct Source {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), outbox_consumer::ConsumerError>>,
    dedup: Deduplicator,
}

impl Source {
    fn start(broker: Broker, db: &TestDb, topic: &str, kafka_group: &str) -> Self {
        let dedup = Deduplicator::new(db.pool.clone(), "billing").unwrap();
        let stop = CancellationToken::new();
        let (d, s) = (dedup.clone(), stop.clone());
        let task = match broker {
            Broker::RabbitMq => {
                let source = RabbitMqSource::new(amqp_url(), topic);
                tokio::spawn(async move { source.run(d, Arc::new(Effect), s).await })
            }
            Broker::Kafka => {
                let source = KafkaSource::new(&kafka_brokers(), kafka_group, &[topic]);
                tokio::spawn(async move { source.run(d, Arc::new(Effect), s).await })
            }
        };
        Self { stop, task, dedup }
    }

    async fn stop(self) -> Deduplicator {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self.dedup
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn wait_for(pool: &PgPool, sql: &str, n: i64) {
    let start = Instant::now();
    loop {
        let got = count(pool, sql).await;
        if got >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{sql}: {got} of {n} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn cli(db: &TestDb, broker: Broker, args: &[&str]) -> (Option<i32>, String) {
    let mut p = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        args,
        &broker.env(db),
    );
    let status = p.exit(Duration::from_secs(60)).await;
    (status.code(), p.output())
}

/// A relay keeping its delivered messages whole, a topic, and a group that processed the
/// first `processed` of `total` messages and lost the rest (a purged queue on RabbitMQ,
/// offsets committed past them unprocessed on Kafka). Returns the topic, the Kafka group and the relay.
async fn half_lost(
    broker: Broker,
    db: &TestDb,
    processed: usize,
    total: usize,
) -> (String, String, outbox_tests::RunningRelay) {
    sqlx::query("CREATE TABLE effects (message_id uuid, replay boolean)")
        .execute(&db.pool)
        .await
        .unwrap();
    Deduplicator::new(db.pool.clone(), "billing")
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let t = topic("billing");
    let group = format!("billing-{}", Uuid::new_v4().simple());
    broker.consumer().await.declare(&t).await;
    let mut s = broker.settings(db);
    s.retention.delivered = Duration::from_secs(3600);
    s.retention.delivered_payloads = true;
    s.validate(true).unwrap();
    let relay = start_relay(&s).await;
    let msgs: Vec<Message> = (0..total)
        .map(|i| {
            Message::new(&t, format!("invoice {i}").into_bytes())
                .unwrap()
                .with_key(format!("customer-{}", i % 20))
                .unwrap()
        })
        .collect();
    let source = Source::start(broker, db, &t, &group);
    enqueue_all(db, &msgs[..processed]).await;
    wait_for(&db.pool, "SELECT count(*) FROM effects", processed as i64).await;
    source.stop().await;
    enqueue_all(db, &msgs[processed..]).await;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM outbox.delivered",
        total as i64,
    )
    .await;
    let lost = broker.lose(&t, &group).await;
    assert_eq!(lost, (total - processed) as u64, "the rest was lost");
    (t, group, relay)
}

/// 1,000 archived messages, 500 of them processed and 500 lost: a replay of all of them
/// gives exactly 500 new effects and no second one, the 500 others skipped as duplicates.
async fn replaying_a_thousand_of_which_half_were_processed_gives_the_other_half_once(
    broker: Broker,
) {
    let db = TestDb::new().await;
    let (t, group, relay) = half_lost(broker, &db, 500, 1000).await;
    let (code, out) = cli(&db, broker, &["replay", "--topic", &t]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replayed 1000 messages"), "{out}");
    let source = Source::start(broker, &db, &t, &group);
    wait_for(&db.pool, "SELECT count(*) FROM effects", 1000).await;
    wait_for(
        &db.pool,
        "SELECT count(*) FROM outbox_consumer.processed",
        1000,
    )
    .await;
    // Every replay is delivered and handled (as a duplicate or not) before counting.
    let start = Instant::now();
    while source.dedup.stats().processed + source.dedup.stats().duplicates < 1000 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{:?}",
            source.dedup.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dedup = source.stop().await;
    let stats = dedup.stats();
    assert_eq!(
        (stats.processed, stats.duplicates),
        (500, 500),
        "500 new effects, 500 skipped"
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM effects").await, 1000);
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT message_id) FROM effects").await,
        1000,
        "no message has two effects"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM effects WHERE replay").await,
        500,
        "the new effects came from the replay"
    );
    relay.stop().await;
}

/// The loss found by reconcile, repaired by `reconcile --repair`, and reconcile then clean.
async fn a_loss_is_found_repaired_and_then_reconciles_clean(broker: Broker) {
    let db = TestDb::new().await;
    let (t, group, relay) = half_lost(broker, &db, 30, 50).await;
    let group_arg = format!("billing={t}");
    let args = [
        "reconcile",
        "--group",
        &group_arg,
        "--max-lag",
        "0s",
        "--json",
    ];
    let (code, out) = cli(&db, broker, &[&args[..], &["--repair"]].concat()).await;
    assert_eq!(code, Some(1), "{out}");
    let report: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..])
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["unprocessed"]["count"], 20, "{report:#}");
    assert_eq!(
        report["repair"]["messages"].as_array().map(Vec::len),
        Some(20),
        "{report:#}"
    );
    let source = Source::start(broker, &db, &t, &group);
    wait_for(&db.pool, "SELECT count(*) FROM effects", 50).await;
    let (code, out) = cli(&db, broker, &args).await;
    assert_eq!(code, Some(0), "clean after the repair: {out}");
    source.stop().await;
    assert_eq!(
        count(&db.pool, "SELECT count(DISTINCT message_id) FROM effects").await,
        50
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM effects").await, 50);
    relay.stop().await;
}

for_each_broker!(
    replaying_a_thousand_of_which_half_were_processed_gives_the_other_half_once,
    a_loss_is_found_repaired_and_then_reconciles_clean,
);
