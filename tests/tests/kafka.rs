//! What is particular to Kafka: the outbox key is the Kafka message key, so a key lives in
//! one partition, in `seq` order; topics map through templates and routes.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{future::BoxFuture, FutureExt};
use outbox::Message;
use outbox_relay::{
    envelope::Envelope,
    publish::{kafka::KafkaPublisher, Confirm, PublishError, Publisher},
};
use outbox_tests::{
    assert_per_key_order, enqueue_all, keyed_messages, relay_with, run_relay, start_relay, topic,
    Broker, TestDb,
};

/// The `Publisher` methods a test publisher takes from the relay's Kafka publisher in its
/// `kafka` field; `publish` goes through the test publisher's own `send`.
macro_rules! around_kafka {
    () => {
        fn ready(&self) -> BoxFuture<'_, Result<(), PublishError>> {
            self.kafka.ready()
        }

        fn publish<'a>(
            &'a self,
            envelope: &'a Envelope,
        ) -> BoxFuture<'a, Result<(), PublishError>> {
            match self.send(envelope) {
                Ok(confirm) => confirm,
                Err(e) => async move { Err(e) }.boxed(),
            }
        }

        fn key_depth(&self) -> u32 {
            self.kafka.key_depth()
        }

        fn health(&self) -> BoxFuture<'_, Result<(), String>> {
            self.kafka.health()
        }

        fn close(&self) -> BoxFuture<'_, ()> {
            self.kafka.close()
        }
    };
}

/// The relay's Kafka publisher, counting the messages handed to it and the most it had out
/// at once; a message's confirm is held back until the gate is open.
struct Watched {
    kafka: KafkaPublisher,
    sent: Arc<AtomicU32>,
    out: Arc<AtomicU32>,
    most: Arc<AtomicU32>,
    gate: tokio::sync::watch::Receiver<bool>,
}

impl Watched {
    /// With its gate open, or shut until `true` is sent on the returned sender.
    fn new(
        s: &outbox_relay::config::Settings,
        open: bool,
    ) -> (Self, tokio::sync::watch::Sender<bool>) {
        let (opener, gate) = tokio::sync::watch::channel(open);
        let watched = Self {
            kafka: KafkaPublisher::new(&s.kafka).unwrap(),
            sent: Arc::default(),
            out: Arc::default(),
            most: Arc::default(),
            gate,
        };
        (watched, opener)
    }
}

impl Publisher for Watched {
    around_kafka!();

    fn send(&self, envelope: &Envelope) -> Result<Confirm, PublishError> {
        let confirm = self.kafka.send(envelope)?;
        self.sent.fetch_add(1, Ordering::SeqCst);
        let now = self.out.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let (out, mut gate) = (self.out.clone(), self.gate.clone());
        Ok(async move {
            let result = confirm.await;
            let _ = gate.wait_for(|open| *open).await;
            out.fetch_sub(1, Ordering::SeqCst);
            result
        }
        .boxed())
    }
}

/// One busy key is not held to one message per round trip: many of its messages are at
/// the broker at once, and they arrive complete and in order.
#[tokio::test]
async fn a_busy_keys_messages_are_pipelined_and_arrive_in_order() {
    let db = TestDb::new().await;
    let t = topic("pipelined");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&t).await;
    enqueue_all(&db, &keyed_messages(&t, 0..3000, 1)).await;
    let s = Broker::Kafka.settings(&db);
    let (publisher, _open) = Watched::new(&s, true);
    let most = publisher.most.clone();
    let relay = run_relay(relay_with(&s, Arc::new(publisher)).await);
    let got = consumer.wait_for(3000, Duration::from_secs(60)).await;
    relay.stop().await;
    assert_per_key_order(&got);
    let most = most.load(Ordering::SeqCst);
    assert!(
        most >= 20,
        "one key had at most {most} messages at the broker at once"
    );
    assert_eq!(db.count("pending").await, 0);
}

/// Messages go to the Kafka producer in rounds: rows read while a round is unconfirmed wait
/// in the relay (librdkafka would only queue them behind the partition's one produce
/// request, spinning meanwhile), and go out once the round is confirmed, or once it has
/// been out half a second, so a partition that stops answering does not hold up the rest.
#[tokio::test]
async fn messages_go_to_the_producer_in_rounds() {
    const ROUND_WAIT: Duration = Duration::from_millis(500);
    let db = TestDb::new().await;
    let t = topic("rounds");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&t).await;
    let s = Broker::Kafka.settings(&db);
    let (publisher, open) = Watched::new(&s, false);
    let sent = publisher.sent.clone();
    let sent_reaches = |n: u32, within: Duration| {
        let sent = sent.clone();
        async move {
            let start = tokio::time::Instant::now();
            while sent.load(Ordering::SeqCst) < n {
                assert!(
                    start.elapsed() < within,
                    "{} of {n} messages handed to the producer after {within:?}",
                    sent.load(Ordering::SeqCst)
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    enqueue_all(&db, &keyed_messages(&t, 0..10, 10)).await;
    let relay = run_relay(relay_with(&s, Arc::new(publisher)).await);
    sent_reaches(10, Duration::from_secs(20)).await;
    let first_round = tokio::time::Instant::now();

    // Read within milliseconds, but held while the first round is unconfirmed.
    enqueue_all(&db, &keyed_messages(&t, 10..20, 10)).await;
    tokio::time::sleep_until(first_round + ROUND_WAIT * 3 / 5).await;
    assert_eq!(
        sent.load(Ordering::SeqCst),
        10,
        "a new round went to the producer while the last one was unconfirmed"
    );
    // The first round never confirms (its gate is shut): the second goes anyway.
    sent_reaches(20, Duration::from_secs(10)).await;

    open.send(true).unwrap();
    let got = consumer.wait_for(20, Duration::from_secs(30)).await;
    relay.stop().await;
    assert_eq!(got.len(), 20);
    assert_per_key_order(&got);
    assert_eq!(db.count("pending").await, 0);
}

#[tokio::test]
async fn each_key_lives_in_one_partition_in_seq_order() {
    let db = TestDb::new().await;
    let t = topic("partitioned");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&t).await;
    enqueue_all(&db, &keyed_messages(&t, 0..300, 30)).await;
    let relay = start_relay(&Broker::Kafka.settings(&db)).await;
    let got = consumer.wait_for(300, Duration::from_secs(30)).await;
    relay.stop().await;

    // Per partition, messages come back in offset order.
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    let mut last_seq: BTreeMap<String, i64> = BTreeMap::new();
    for r in &got {
        let key = r.key.clone().unwrap();
        let p = r.partition.unwrap();
        let first = *partition_of.entry(key.clone()).or_insert(p);
        assert_eq!(first, p, "key {key} is in partitions {first} and {p}");
        let last = last_seq.entry(key.clone()).or_insert(i64::MIN);
        assert!(
            r.seq > *last,
            "key {key}: seq {} after {} in partition {p}",
            r.seq,
            last
        );
        *last = r.seq;
    }
    let used: std::collections::BTreeSet<i32> = partition_of.values().copied().collect();
    assert!(
        used.len() > 1,
        "30 keys should spread over the 3 partitions, used {used:?}"
    );
}

#[tokio::test]
async fn routes_and_templates_pick_the_kafka_topic() {
    let db = TestDb::new().await;
    let routed = topic("billing-events");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&routed).await;
    let mut s = Broker::Kafka.settings(&db);
    s.kafka.routes.insert(
        "billing".into(),
        outbox_relay::config::KafkaRouteSettings {
            topic: routed.clone(),
        },
    );
    let msg = Message::new("billing", b"invoice".to_vec())
        .unwrap()
        .with_key("c-1")
        .unwrap();
    outbox::enqueue(&db.pool, &msg).await.unwrap();
    let relay = start_relay(&s).await;
    let got = consumer.wait_for(1, Duration::from_secs(30)).await;
    relay.stop().await;
    assert_eq!(
        (
            got[0].id,
            got[0].routing_key.as_str(),
            got[0].topic.as_str()
        ),
        (msg.id(), routed.as_str(), "billing")
    );
}

/// Each codec librdkafka is built with: the broker confirms every message and the rows are
/// deleted; gzip, lz4 and zstd are also read back intact. (The local broker, tansu 0.6,
/// stores snappy batches but cannot serve them on fetch: `UnexpectedType("Snappy")`.)
#[tokio::test]
async fn every_compression_codec_delivers_end_to_end() {
    for (codec, read_back) in [
        ("gzip", true),
        ("snappy", false),
        ("lz4", true),
        ("zstd", true),
    ] {
        let db = TestDb::new().await;
        let t = topic(&format!("codec-{codec}"));
        let consumer = Broker::Kafka.consumer().await;
        if read_back {
            consumer.queue(&t).await;
        } else {
            consumer.declare(&t).await;
        }
        let msgs = keyed_messages(&t, 0..50, 5);
        enqueue_all(&db, &msgs).await;
        let mut s = Broker::Kafka.settings(&db);
        s.kafka
            .properties
            .insert("compression.type".into(), codec.into());
        s.validate(true).unwrap();
        let relay = start_relay(&s).await;
        let start = std::time::Instant::now();
        while db.count("pending").await > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{codec}: {} rows never confirmed",
                db.count("pending").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(db.count("dead").await, 0, "{codec}: a message failed");
        if read_back {
            let got = consumer
                .wait_for_distinct(50, Duration::from_secs(30))
                .await;
            let mut payloads: Vec<Vec<u8>> = got.iter().map(|r| r.payload.clone()).collect();
            payloads.sort();
            payloads.dedup();
            let mut sent: Vec<Vec<u8>> = msgs.iter().map(|m| m.payload().to_vec()).collect();
            sent.sort();
            assert_eq!(payloads, sent, "{codec}: payloads changed on the way");
        }
        relay.stop().await;
    }
}

/// Secured-cluster settings against a plaintext listener: the relay must get as far as
/// trying, and say the handshake or the login failed, never that the feature is missing
/// from the build.
#[tokio::test]
async fn tls_and_sasl_settings_fail_on_the_handshake_not_on_the_build() {
    let cases: [&[(&str, &str)]; 3] = [
        &[("security.protocol", "SSL")],
        &[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "app"),
            ("sasl.password", "secret-scram-password"),
        ],
        &[
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "OAUTHBEARER"),
            (
                "sasl.oauthbearer.config",
                "principal=app scope=outbox lifeSeconds=300",
            ),
            ("enable.sasl.oauthbearer.unsecure.jwt", "true"),
        ],
    ];
    for props in cases {
        let db = TestDb::new().await;
        let t = topic("secured");
        let dir = std::env::temp_dir().join(format!("outbox-kafka-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("relay.toml");
        // Fail a hung handshake fast (a plaintext listener never answers a TLS hello).
        let mut toml =
            String::from("[kafka.properties]\n\"socket.connection.setup.timeout.ms\" = \"1000\"\n");
        for (k, v) in props {
            toml.push_str(&format!("{k:?} = {v:?}\n"));
        }
        std::fs::write(&config, toml).unwrap();
        enqueue_all(&db, &keyed_messages(&t, 0..1, 1)).await;
        let mut env = Broker::Kafka.env(&db);
        env.push(("OUTBOX__KAFKA__DELIVERY_TIMEOUT", "4s".into()));
        let p = outbox_tests::RelayProcess::spawn(
            env!("CARGO_BIN_EXE_outbox-relay-under-test"),
            &["--config", config.to_str().unwrap(), "run"],
            &env,
        );
        // The "broker unavailable" line names librdkafka's cause.
        p.wait_for_line("last client error", 1, Duration::from_secs(30))
            .await;
        let out = p.output();
        let lower = out.to_lowercase();
        assert!(
            !lower.contains("not available at build time")
                && !lower.contains("not supported by this build")
                && !lower.contains("no such configuration property"),
            "{props:?}: librdkafka lacks a feature:\n{out}"
        );
        assert!(
            ["ssl", "tls", "handshake", "sasl", "authentication"]
                .iter()
                .any(|w| lower.contains(w)),
            "{props:?}: the failure should name the handshake or the login:\n{out}"
        );
        assert!(
            !out.contains("secret-scram-password"),
            "the SASL password leaked:\n{out}"
        );
        assert_eq!(
            db.count("pending").await,
            1,
            "{props:?}: the message must stay"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Keys land in the partition the Java client would choose: murmur2 of the key bytes,
/// `toPositive(h) % partitions`. The hashes are the test vectors of Apache Kafka's own
/// `UtilsTest.testMurmur2` (checked against an independent port of the Java code); the
/// expected partitions are those hashes modulo 3.
#[tokio::test]
async fn keys_land_in_the_partition_a_java_producer_would_choose() {
    let expected: &[(&str, i32, i32)] = &[
        ("21", -973_932_308, 0),
        ("foobar", -790_332_482, 0),
        ("a-little-bit-long-string", -985_981_536, 2),
        ("a-little-bit-longer-string", -1_486_304_829, 2),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
            2,
        ),
        ("abc", 479_470_107, 0),
        ("order-1", 1_221_710_326, 1),
        ("customer-7", -1_283_830_537, 1),
    ];
    for (key, hash, partition) in expected {
        assert_eq!(
            (hash & 0x7fff_ffff) % 3,
            *partition,
            "{key}: the table itself"
        );
    }
    let db = TestDb::new().await;
    let t = topic("java-partitions");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&t).await; // 3 partitions
    let msgs: Vec<Message> = expected
        .iter()
        .map(|(key, _, _)| {
            Message::new(&t, key.as_bytes().to_vec())
                .unwrap()
                .with_key(*key)
                .unwrap()
        })
        .collect();
    enqueue_all(&db, &msgs).await;
    let relay = start_relay(&Broker::Kafka.settings(&db)).await;
    let got = consumer
        .wait_for_distinct(msgs.len(), Duration::from_secs(30))
        .await;
    relay.stop().await;
    for (key, _, partition) in expected {
        let r = got.iter().find(|r| r.key.as_deref() == Some(*key)).unwrap();
        assert_eq!(r.partition, Some(*partition), "key {key:?}");
    }
}

/// Settings whose producer finds out quickly that a topic does not exist, and looks again
/// soon: librdkafka waits `topic.metadata.propagation.max.ms` (30 s by default) before it
/// calls a topic unknown.
fn quick_to_call_a_topic_unknown(db: &TestDb) -> outbox_relay::config::Settings {
    let mut s = Broker::Kafka.settings(db);
    for (name, value) in [
        ("topic.metadata.propagation.max.ms", "300"),
        ("topic.metadata.refresh.interval.ms", "500"),
    ] {
        s.kafka.properties.insert(name.into(), value.into());
    }
    s
}

/// The rows of `topic` still in the outbox: (status, attempts, last error).
async fn rows_of(db: &TestDb, topic: &str) -> Vec<(String, i32, Option<String>)> {
    sqlx::query_as(
        "SELECT status::text, attempts, last_error FROM outbox.messages WHERE topic = $1 ORDER BY seq",
    )
    .bind(topic)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// A topic that does not exist yet is not a dead end (a service deployed before its topic
/// was created): each message to it counts a failed attempt naming the unknown topic and is
/// retried under `retry.*`, so once the topic exists every message arrives, in key order,
/// and none is dead.
#[tokio::test]
async fn messages_to_a_topic_created_late_wait_for_it_and_arrive() {
    let db = TestDb::new().await;
    let late = topic("late");
    let mut s = quick_to_call_a_topic_unknown(&db);
    s.retry.max_attempts = 1_000;
    let msgs = keyed_messages(&late, 0..30, 3);
    enqueue_all(&db, &msgs).await;
    let relay = start_relay(&s).await;

    let started = std::time::Instant::now();
    let failed = loop {
        let rows = rows_of(&db, &late).await;
        if let Some(row) = rows.iter().find(|r| r.1 >= 2) {
            break row.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no message to the missing topic was retried within 60 s: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failed.0, "pending", "{failed:?}");
    let error = failed.2.unwrap_or_default();
    assert!(
        error.contains("UnknownTopic") && error.contains(&late),
        "the failed attempt should name the unknown topic: {error}"
    );
    assert_eq!(db.count("dead").await, 0, "a missing topic killed messages");

    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&late).await; // creates the topic
    let got = consumer
        .wait_for_distinct(msgs.len(), Duration::from_secs(90))
        .await;
    relay.stop().await;
    let ids: std::collections::HashSet<_> = got.iter().map(|r| r.id).collect();
    assert!(
        msgs.iter().all(|m| ids.contains(&m.id())),
        "{} of {} arrived",
        ids.len(),
        msgs.len()
    );
    assert_per_key_order(&got);
    assert!(rows_of(&db, &late).await.is_empty(), "rows left behind");
}

/// A topic that never comes is retried like any other refusal and then parked: dead after
/// `retry.max_attempts`, with the unknown topic as the reason, for an operator to retry
/// once it exists.
#[tokio::test]
async fn messages_to_a_topic_that_never_exists_are_dead_after_their_attempts() {
    let db = TestDb::new().await;
    let nowhere = topic("nowhere");
    let s = quick_to_call_a_topic_unknown(&db);
    let msg = Message::new(&nowhere, b"lost?".to_vec()).unwrap();
    outbox::enqueue(&db.pool, &msg).await.unwrap();
    let relay = start_relay(&s).await;
    let started = std::time::Instant::now();
    let row = loop {
        let rows = rows_of(&db, &nowhere).await;
        if rows.first().is_some_and(|r| r.0 == "dead") {
            break rows[0].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the message was not dead within 60 s: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    relay.stop().await;
    assert_eq!(row.1, s.retry.max_attempts as i32, "{row:?}");
    let error = row.2.unwrap_or_default();
    assert!(
        error.contains("UnknownTopic") && error.contains(&nowhere),
        "{error}"
    );
}

/// The relay's Kafka publisher behind a stand-in for a producer that hits a fatal error and
/// is replaced mid-round (fault injection: a real broker cannot be made to do this on cue).
/// The first `fail_at - 1` messages go to the "old producer", which holds them; the
/// `fail_at`-th send fails as the relay's publisher fails it then ("broker unavailable, the
/// producer was replaced"), and the old producer's messages are purged, unsent. Messages
/// sent after that go to the broker through the real publisher.
struct Replaced {
    kafka: KafkaPublisher,
    fail_at: u32,
    sends: AtomicU32,
    old: std::sync::Mutex<Option<Vec<tokio::sync::oneshot::Sender<()>>>>,
}

impl Publisher for Replaced {
    around_kafka!();

    fn send(&self, envelope: &Envelope) -> Result<Confirm, PublishError> {
        let n = self.sends.fetch_add(1, Ordering::SeqCst) + 1;
        let mut old = self.old.lock().unwrap();
        let Some(held) = old.as_mut() else {
            return self.kafka.send(envelope); // the new producer
        };
        if n == self.fail_at {
            old.take(); // purges what the old producer held
            return Err(PublishError::Unavailable(
                "Kafka producer fatal error (test): the producer was replaced".into(),
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        held.push(tx);
        Ok(async move {
            let _ = rx.await;
            Err(PublishError::Unavailable(
                "purged by the replaced producer (test)".into(),
            ))
        }
        .boxed())
    }
}

/// A producer replaced in the middle of handing over a round: a key's later messages must
/// not go to the new producer while its earlier ones, handed to the old one, are purged
/// and will be read again. Every message arrives, each key in `seq` order.
#[tokio::test]
async fn a_producer_replaced_mid_round_does_not_let_later_messages_overtake() {
    let db = TestDb::new().await;
    let t = topic("replaced");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&t).await;
    // Three keys, ten messages each: the first round hands over all thirty, key by key.
    let msgs = keyed_messages(&t, 0..30, 3);
    enqueue_all(&db, &msgs).await;
    let s = Broker::Kafka.settings(&db);
    let publisher = Replaced {
        kafka: KafkaPublisher::new(&s.kafka).unwrap(),
        fail_at: 5,
        sends: AtomicU32::new(0),
        old: std::sync::Mutex::new(Some(Vec::new())),
    };
    let relay = run_relay(relay_with(&s, Arc::new(publisher)).await);
    let got = consumer
        .wait_for_distinct(msgs.len(), Duration::from_secs(60))
        .await;
    relay.stop().await;
    assert_eq!(got.len(), msgs.len(), "duplicates or losses: {got:?}");
    assert_per_key_order(&got);
    assert_eq!(db.count("pending").await, 0);
}

/// A Kafka publisher shared by two workers whose producer is "replaced" (fault injection):
/// the first send of payload `trigger` bumps the generation as a fatal producer error would,
/// and the first send of `held` goes nowhere: its confirm fails as let go by the old producer
/// 1.5 s after the replacement. Everything else goes to the real broker.
struct ReplacedByAnother {
    kafka: KafkaPublisher,
    generation: AtomicU32,
    replaced: tokio::sync::watch::Sender<bool>,
    seen: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl ReplacedByAnother {
    fn seen(&self, payload: &[u8]) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.as_slice() == payload)
            .count()
    }
}

impl Publisher for ReplacedByAnother {
    around_kafka!();

    fn generation(&self) -> u64 {
        u64::from(self.generation.load(Ordering::SeqCst))
    }

    fn send_to(&self, envelope: &Envelope, generation: u64) -> Result<Confirm, PublishError> {
        if generation != self.generation() {
            return Err(PublishError::Unavailable(
                "test: the producer was replaced".into(),
            ));
        }
        self.send(envelope)
    }

    fn send(&self, envelope: &Envelope) -> Result<Confirm, PublishError> {
        let first = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(envelope.payload.clone());
            seen.iter().filter(|p| **p == envelope.payload).count() == 1
        };
        match (envelope.payload.as_slice(), first) {
            (b"trigger", true) => {
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.replaced.send_replace(true);
                Err(PublishError::Unavailable(
                    "test: fatal producer error; the producer was replaced".into(),
                ))
            }
            (b"held", true) => {
                let mut replaced = self.replaced.subscribe();
                Ok(async move {
                    let _ = replaced.wait_for(|r| *r).await;
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Err(PublishError::Unavailable(
                        "test: let go by the replaced producer".into(),
                    ))
                }
                .boxed())
            }
            _ => self.kafka.send(envelope),
        }
    }
}

/// With two workers sharing one producer, a replacement seen by one worker stops the
/// other's hand-overs too, until what the old producer held is back: a key's message n+1
/// never reaches the new producer while its message n, held by the old one, is still out.
#[tokio::test]
async fn a_producer_replaced_by_another_worker_does_not_let_a_key_overtake() {
    let db = TestDb::new().await;
    let t = topic("replaced-by-another");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&t).await;
    // A key of worker 1 (the held message and the one after it), one of worker 0 (the
    // message that replaces the producer): worker = partition % 2.
    let worker_of = |key: String| {
        let pool = db.pool.clone();
        async move {
            let w: i32 = sqlx::query_scalar("SELECT (hashtext($1) & 63) % 2")
                .bind(&key)
                .fetch_one(&pool)
                .await
                .unwrap();
            (key, w)
        }
    };
    let mut keys = [None, None];
    for i in 0..50 {
        let (key, w) = worker_of(format!("k{i}")).await;
        keys[w as usize].get_or_insert(key);
    }
    let [Some(other), Some(key)] = keys else {
        panic!("no keys for both workers")
    };
    let one = |payload: &[u8], key: &str| {
        Message::new(&t, payload.to_vec())
            .unwrap()
            .with_key(key)
            .unwrap()
    };
    let mut s = Broker::Kafka.settings(&db);
    s.relay.workers = 2;
    s.database.max_connections = 16;
    let publisher = Arc::new(ReplacedByAnother {
        kafka: KafkaPublisher::new(&s.kafka).unwrap(),
        generation: AtomicU32::new(0),
        replaced: tokio::sync::watch::channel(false).0,
        seen: std::sync::Mutex::default(),
    });
    let relay = run_relay(relay_with(&s, publisher.clone()).await);
    let wait_seen = |payload: &'static [u8]| {
        let publisher = publisher.clone();
        async move {
            let started = std::time::Instant::now();
            while publisher.seen(payload) == 0 {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "{payload:?} never sent"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let held = one(b"held", &key);
    enqueue_all(&db, std::slice::from_ref(&held)).await;
    wait_seen(b"held").await;
    enqueue_all(&db, &[one(b"trigger", &other)]).await;
    wait_seen(b"trigger").await;
    // Written after the replacement: with the old producer's message still out, it must
    // wait for it, not go to the new producer first.
    let after = one(b"after", &key);
    enqueue_all(&db, std::slice::from_ref(&after)).await;
    let got = consumer.wait_for_distinct(3, Duration::from_secs(60)).await;
    relay.stop().await;
    let order: Vec<uuid::Uuid> = got
        .iter()
        .filter(|r| r.key.as_deref() == Some(key.as_str()))
        .map(|r| r.id)
        .collect();
    assert_eq!(
        order.first(),
        Some(&held.id()),
        "key {key}: the message after the held one arrived first ({order:?}; held {}, after {})",
        held.id(),
        after.id()
    );
    assert_per_key_order(&got);
}

/// The relay's Kafka publisher shared by two workers, counting what is out across them: the
/// first send of payload `suspect` is lost with the connection (it becomes a suspect);
/// messages of payload `slow` are confirmed 300 ms late; every send of the suspect after its
/// first records how many messages were out then.
struct CountsOut {
    kafka: KafkaPublisher,
    out: Arc<AtomicU32>,
    suspect_sends: std::sync::Mutex<Vec<u32>>,
}

impl Publisher for CountsOut {
    around_kafka!();

    fn send(&self, envelope: &Envelope) -> Result<Confirm, PublishError> {
        if envelope.payload == b"suspect" {
            let mut sends = self.suspect_sends.lock().unwrap();
            if sends.is_empty() {
                sends.push(u32::MAX);
                return Ok(async {
                    Err(PublishError::Disconnected("test: connection lost".into()))
                }
                .boxed());
            }
            sends.push(self.out.load(Ordering::SeqCst));
        }
        let confirm = self.kafka.send(envelope)?;
        let slow = envelope.payload.starts_with(b"slow");
        let out = self.out.clone();
        out.fetch_add(1, Ordering::SeqCst);
        Ok(async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let result = confirm.await;
            out.fetch_sub(1, Ordering::SeqCst);
            result
        }
        .boxed())
    }
}

/// With two workers sharing one producer, a suspect goes alone relay-wide: the other
/// worker's messages stop starting while it waits, and it goes once none of them is out, so
/// no other worker's message shares its produce request (and a refusal of that request
/// cannot charge it an attempt it does not owe).
#[tokio::test]
async fn a_suspect_goes_alone_across_all_workers() {
    let db = TestDb::new().await;
    let t = topic("alone-across");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&t).await;
    let mut keys: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for i in 0..200 {
        let key = format!("k{i}");
        let w: i32 = sqlx::query_scalar("SELECT (hashtext($1) & 63) % 2")
            .bind(&key)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        keys[w as usize].push(key);
    }
    let one =
        |payload: Vec<u8>, key: &str| Message::new(&t, payload).unwrap().with_key(key).unwrap();
    let mut s = Broker::Kafka.settings(&db);
    s.relay.workers = 2;
    s.database.max_connections = 16;
    let publisher = Arc::new(CountsOut {
        kafka: KafkaPublisher::new(&s.kafka).unwrap(),
        out: Arc::default(),
        suspect_sends: std::sync::Mutex::default(),
    });
    let relay = run_relay(relay_with(&s, publisher.clone()).await);
    // Worker 0 keeps messages out throughout: a stream over its keys, each confirm late.
    let mut written = 1;
    let stream_keys = keys[0].clone();
    let pool = db.pool.clone();
    let stream_topic = t.clone();
    let stream = tokio::spawn(async move {
        let mut n = 0;
        for _ in 0..60 {
            let msgs: Vec<Message> = (0..10)
                .map(|i| {
                    let key = &stream_keys[(n + i) % stream_keys.len()];
                    Message::new(&stream_topic, format!("slow {}", n + i).into_bytes())
                        .unwrap()
                        .with_key(key)
                        .unwrap()
                })
                .collect();
            outbox::Outbox::default()
                .enqueue_batch(&pool, &msgs)
                .await
                .unwrap();
            n += 10;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    enqueue_all(&db, &[one(b"suspect".to_vec(), &keys[1][0])]).await;
    written += stream.await.unwrap();
    let got = consumer
        .wait_for_distinct(written, Duration::from_secs(60))
        .await;
    relay.stop().await;
    assert_per_key_order(&got);
    let sends = publisher.suspect_sends.lock().unwrap().clone();
    assert!(
        sends.len() >= 2,
        "the suspect was not published again: {sends:?}"
    );
    assert_eq!(
        sends[1], 0,
        "the suspect went 'alone' with {} messages of the other worker out",
        sends[1]
    );
}

/// A record the broker refuses for good, among others in one request (here the broker checks
/// the topic's records against a JSON schema, and one payload is not JSON: `INVALID_RECORD`).
/// librdkafka's gapless guarantee fails the whole producer over such a refusal, so the relay
/// cannot tell which message was refused: all of the request's messages become suspects and
/// go again one at a time. The refused one is then charged its attempts and ends dead with
/// the reason; none of the others is charged an attempt, and all of them arrive, in key
/// order.
#[tokio::test]
async fn a_record_the_broker_refuses_dies_alone_and_the_others_arrive() {
    let checked = topic("checked");
    let schemas = std::env::var("OUTBOX_TEST_KAFKA_SCHEMAS")
        .expect("OUTBOX_TEST_KAFKA_SCHEMAS: run with scripts/test.sh");
    std::fs::write(
        format!("{schemas}/{checked}.json"),
        r#"{"type": "object", "properties": {"value": {"type": "object"}}}"#,
    )
    .unwrap();
    let poison = Message::new(&checked, b"not json".to_vec())
        .unwrap()
        .with_key("bad")
        .unwrap();
    refused_alone_while_the_others_arrive(&checked, poison, "InvalidRecord").await;
}

/// A record the broker fails to store, and answers with an unknown error, every time it is
/// in a produce request (here its storage refuses the record's key; a record with a header
/// name twice did the same). librdkafka fails the whole producer each time; the relay
/// replaces it, and the request's messages become suspects: the record goes alone, is charged
/// each time it fails alone, and ends dead, while the rest of its partition keeps flowing and
/// no other message is charged.
#[tokio::test]
async fn a_record_that_fails_the_producer_every_time_dies_alone_and_its_partition_flows() {
    let storage = std::env::var("OUTBOX_TEST_KAFKA_STORAGE_URL")
        .expect("OUTBOX_TEST_KAFKA_STORAGE_URL: run with scripts/test.sh");
    let broker_db = sqlx::PgPool::connect(&storage).await.unwrap();
    // Fault injection in the broker's own storage: records keyed `refused-by-storage-…` fail.
    sqlx::raw_sql(
        "CREATE OR REPLACE FUNCTION outbox_test_refuse_record() RETURNS trigger
             LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.k IS NOT NULL
                AND position(convert_to('refused-by-storage-', 'UTF8') IN NEW.k) = 1 THEN
                 RAISE EXCEPTION 'outbox test: this record is refused by the storage';
             END IF;
             RETURN NEW;
         END $$;
         CREATE OR REPLACE TRIGGER outbox_test_refuse_record BEFORE INSERT ON record
             FOR EACH ROW EXECUTE FUNCTION outbox_test_refuse_record();",
    )
    .execute(&broker_db)
    .await
    .unwrap();
    let checked = topic("stored");
    let poison = Message::new(&checked, b"{}".to_vec())
        .unwrap()
        .with_key(format!(
            "refused-by-storage-{}",
            uuid::Uuid::new_v4().simple()
        ))
        .unwrap();
    refused_alone_while_the_others_arrive(&checked, poison, "").await;
}

/// Writes `poison` among 60 messages (40 of them to `checked`, a topic of one partition, so
/// that it shares produce requests with them), and checks that it ends dead after
/// `retry.max_attempts` with `reason` in its error, that every other message arrives in key
/// order, and that none of them was charged an attempt.
async fn refused_alone_while_the_others_arrive(checked: &str, poison: Message, reason: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let db = TestDb::new().await;
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", outbox_tests::kafka_brokers())
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(checked, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let other = topic("unchecked");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(checked).await;
    consumer.queue(&other).await;
    let mut msgs = Vec::new();
    for i in 0..60 {
        // Keys of one topic each: across two topics, arrival order says nothing.
        let (t, key) = if i % 3 == 0 {
            (other.as_str(), format!("o{}", i % 4))
        } else {
            (checked, format!("c{}", i % 4))
        };
        msgs.push(
            Message::new(t, format!("{{\"n\": {i}}}").into_bytes())
                .unwrap()
                .with_key(key)
                .unwrap(),
        );
    }
    let mut all = msgs.clone();
    all.insert(5, poison.clone());
    enqueue_all(&db, &all).await;
    let mut s = Broker::Kafka.settings(&db);
    s.retention.delivered = Duration::from_secs(3600); // keeps each delivery's attempts
    let relay = start_relay(&s).await;

    let started = std::time::Instant::now();
    let dead = loop {
        let row: Option<(String, i32, Option<String>)> = sqlx::query_as(
            "SELECT status::text, attempts, last_error FROM outbox.messages WHERE id = $1",
        )
        .bind(poison.id())
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        match row {
            Some(row) if row.0 == "dead" => break row,
            Some(row) => assert!(
                started.elapsed() < Duration::from_secs(60),
                "the refused message was not dead within 60 s: {row:?}"
            ),
            None => panic!("the refused message was deleted as if delivered"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let got = consumer
        .wait_for_distinct(msgs.len(), Duration::from_secs(60))
        .await;
    relay.stop().await;
    assert_eq!(dead.1, s.retry.max_attempts as i32, "{dead:?}");
    assert!(dead.2.as_deref().unwrap_or("").contains(reason), "{dead:?}");
    let ids: std::collections::HashSet<_> = got.iter().map(|r| r.id).collect();
    assert!(msgs.iter().all(|m| ids.contains(&m.id())));
    assert!(!ids.contains(&poison.id()), "the refused message arrived");
    assert_per_key_order(&got);
    let charged: Vec<(uuid::Uuid, i32)> =
        sqlx::query_as("SELECT id, attempts FROM outbox.delivered WHERE attempts > 0")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        charged.is_empty(),
        "messages refused only alongside the bad one were charged attempts: {charged:?}"
    );
}
