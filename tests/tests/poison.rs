//! Poison messages can never wedge a key or cost other messages an attempt: rows over
//! AMQP's limits die at once without being sent, a row that cannot be read holds its key
//! back, a payload over `relay.max_payload` dies unread, a message that keeps killing the
//! connection goes dead alone, and a panic in a relay task stops the relay with an error.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, FutureExt};
use outbox::{Message, Outbox};
use outbox_relay::{
    config::DeadKeyPolicy,
    envelope::Envelope,
    publish::{PublishError, Publisher},
    relay::{Relay, RelayError},
};
use outbox_tests::{
    enqueue_all, keyed_messages, settings, start_relay, topic, with_policy, Consumer, TestDb,
};
use sqlx::PgPool;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

/// Writes a row through the documented plain-SQL insert, as a non-Rust producer would.
async fn insert_sql(pool: &PgPool, topic: &str, key: &str, headers: serde_json::Value) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO outbox.messages (id, topic, key, payload, headers, content_type) \
         VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
    )
    .bind(id)
    .bind(topic)
    .bind(key)
    .bind(b"poison".to_vec())
    .bind(headers)
    .bind(None::<String>)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn row(pool: &PgPool, id: Uuid) -> Option<(String, i32, Option<String>)> {
    sqlx::query_as("SELECT status, attempts, last_error FROM outbox.messages WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn wait_dead(pool: &PgPool, id: Uuid, what: &str) -> (i32, String) {
    let start = Instant::now();
    loop {
        if let Some((status, attempts, err)) = row(pool, id).await {
            if status == "dead" {
                return (attempts, err.unwrap_or_default());
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "{what} never died: {:?}",
            row(pool, id).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Delivered messages that were charged failed attempts (kept by `retention.delivered`).
async fn charged_deliveries(pool: &PgPool) -> BTreeMap<Uuid, i32> {
    sqlx::query_as("SELECT id, attempts FROM outbox.delivered WHERE attempts > 0")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Rows that break AMQP 0-9-1's limits, written with plain SQL: RabbitMQ would close the
/// whole connection over some of them. Each dies on its first attempt with the limit
/// named, without being sent; other keys flow with no failed attempt; the key's later
/// message waits (`block`) or goes (`skip`).
#[tokio::test]
async fn rows_over_amqp_limits_die_at_once_naming_the_limit_and_cost_others_nothing() {
    for policy in [DeadKeyPolicy::Block, DeadKeyPolicy::Skip] {
        let db = TestDb::new().await;
        let q = topic("limits");
        let consumer = Consumer::connect().await;
        consumer.queue(&q).await;
        let long_name = "h".repeat(300);
        let big = "v".repeat(60 * 1024);
        let cases = [
            (
                "long-header-name",
                serde_json::json!({ long_name.clone(): "x" }),
                "AMQP allows at most 255",
            ),
            (
                "huge-headers",
                serde_json::json!({ "a": big, "b": big, "c": big }),
                "frame_max",
            ),
        ];
        let mut poisons = Vec::new();
        let mut behind = Vec::new();
        for (key, headers, reason) in &cases {
            poisons.push((
                insert_sql(&db.pool, &q, key, headers.clone()).await,
                *reason,
            ));
            let m = Message::new(&q, b"behind".to_vec())
                .unwrap()
                .with_key(*key)
                .unwrap();
            outbox::enqueue(&db.pool, &m).await.unwrap();
            behind.push(m.id());
        }
        let others: Vec<Message> = (0..30)
            .map(|i| {
                Message::new(&q, vec![i])
                    .unwrap()
                    .with_key(format!("free-{}", i % 10))
                    .unwrap()
            })
            .collect();
        Outbox::default()
            .enqueue_batch(&db.pool, &others)
            .await
            .unwrap();

        let mut s = with_policy(settings(&db), policy);
        s.retention.delivered = Duration::from_secs(3600);
        let relay = start_relay(&s).await;
        for (id, reason) in &poisons {
            let (attempts, err) = wait_dead(&db.pool, *id, reason).await;
            assert_eq!(attempts, 1, "{reason}: dead at once, not retried ({err})");
            assert!(
                err.contains(reason),
                "last_error should name {reason:?}: {err}"
            );
        }
        let expected = others.len() + if policy == DeadKeyPolicy::Skip { 2 } else { 0 };
        consumer.wait_for_distinct(expected, WAIT).await;
        let got = consumer.settle(Duration::from_millis(800)).await;
        relay.stop().await;
        for (id, _) in &poisons {
            assert!(got.iter().all(|r| r.id != *id), "a poison row was sent");
        }
        for id in &behind {
            let arrived = got.iter().any(|r| r.id == *id);
            match policy {
                DeadKeyPolicy::Block => {
                    assert!(!arrived, "under block, a key's later message waits");
                    assert_eq!(row(&db.pool, *id).await.unwrap().1, 0);
                }
                DeadKeyPolicy::Skip => assert!(arrived, "under skip, it goes"),
            }
        }
        let charged = charged_deliveries(&db.pool).await;
        assert!(
            charged.is_empty(),
            "{policy:?}: innocent messages charged: {charged:?}"
        );
    }
}

/// A routing key that a template makes longer than AMQP allows dies at once, naming it.
#[tokio::test]
async fn a_routing_key_over_255_bytes_dies_at_once() {
    let db = TestDb::new().await;
    let mut s = settings(&db);
    s.rabbitmq.routing_key = "{topic}.{key}.{key}".into();
    s.validate(true).unwrap();
    let m = Message::new(topic("rk"), b"x".to_vec())
        .unwrap()
        .with_key("k".repeat(200))
        .unwrap();
    outbox::enqueue(&db.pool, &m).await.unwrap();
    let relay = start_relay(&s).await;
    let (attempts, err) = wait_dead(&db.pool, m.id(), "long routing key").await;
    relay.stop().await;
    assert_eq!(attempts, 1);
    assert!(
        err.contains("the routing key is") && err.contains("255"),
        "{err}"
    );
}

/// A row that cannot be read (its headers hold a number, written while the check
/// constraint was off) is dead with the reason, and under `block` its key's next row waits.
#[tokio::test]
async fn a_malformed_row_holds_back_its_key_under_block() {
    let db = TestDb::new().await;
    let q = topic("malformed");
    let consumer = Consumer::connect().await;
    consumer.queue(&q).await;
    sqlx::query("ALTER TABLE outbox.messages DROP CONSTRAINT messages_header_values_check")
        .execute(&db.pool)
        .await
        .unwrap();
    let bad = insert_sql(&db.pool, &q, "m", serde_json::json!({ "n": 1 })).await;
    let next = Message::new(&q, b"next".to_vec())
        .unwrap()
        .with_key("m")
        .unwrap();
    let other = Message::new(&q, b"other".to_vec())
        .unwrap()
        .with_key("o")
        .unwrap();
    Outbox::default()
        .enqueue_batch(&db.pool, &[next.clone(), other.clone()])
        .await
        .unwrap();
    let relay = start_relay(&settings(&db)).await;
    let (_, err) = wait_dead(&db.pool, bad, "the malformed row").await;
    assert!(
        err.contains("malformed row") && err.contains("header \"n\" is not a string"),
        "{err}"
    );
    consumer.wait_for(1, WAIT).await;
    let got = consumer.settle(Duration::from_millis(800)).await;
    relay.stop().await;
    assert!(got.iter().any(|r| r.id == other.id()), "other keys flow");
    assert!(
        got.iter().all(|r| r.id != next.id()),
        "the key's next row must wait behind the malformed one"
    );
    assert_eq!(row(&db.pool, next.id()).await.unwrap().0, "pending");
}

/// A payload over `relay.max_payload` is parked as dead with the reason without being read
/// or sent, and its key's next message waits behind it; rows larger than the worker's byte
/// window still move (one per read at least), whole and in order.
#[tokio::test]
async fn a_payload_over_max_payload_dies_unread_and_rows_over_the_byte_window_still_flow() {
    let db = TestDb::new().await;
    let q = topic("max-payload");
    let consumer = Consumer::connect().await;
    consumer.queue(&q).await;
    let mut s = settings(&db);
    s.relay.max_payload = 64 * 1024;
    s.relay.window_bytes = 48 * 1024;
    let keyed =
        |payload: Vec<u8>, key: &str| Message::new(&q, payload).unwrap().with_key(key).unwrap();
    let big = keyed(vec![b'x'; 200 * 1024], "b");
    let after_big = keyed(b"after".to_vec(), "b");
    let large: Vec<Message> = (0..20u8).map(|i| keyed(vec![i; 60 * 1024], "l")).collect();
    let mut all = vec![big.clone(), after_big.clone()];
    all.extend(large.iter().cloned());
    Outbox::default()
        .enqueue_batch(&db.pool, &all)
        .await
        .unwrap();
    let relay = start_relay(&s).await;
    let (attempts, err) = wait_dead(&db.pool, big.id(), "the oversize row").await;
    assert_eq!(attempts, 1, "dead at once");
    assert!(
        err.contains("too large")
            && err.contains("204800 bytes")
            && err.contains("relay.max_payload (65536)"),
        "{err}"
    );
    consumer.wait_for(large.len(), WAIT).await;
    let got = consumer.settle(Duration::from_millis(800)).await;
    relay.stop().await;
    let order: Vec<Uuid> = got
        .iter()
        .filter(|r| r.key.as_deref() == Some("l"))
        .map(|r| r.id)
        .collect();
    let want: Vec<Uuid> = large.iter().map(Message::id).collect();
    assert_eq!(
        order, want,
        "rows over the byte window arrive once each, in order"
    );
    assert!(got
        .iter()
        .filter(|r| r.key.as_deref() == Some("l"))
        .all(|r| r.payload.len() == 60 * 1024));
    assert!(got.iter().all(|r| r.id != big.id()), "never sent");
    assert!(
        got.iter().all(|r| r.id != after_big.id()),
        "the key's next row waits behind the dead one"
    );
    assert_eq!(row(&db.pool, after_big.id()).await.unwrap().0, "pending");
}

/// A broker that closes the whole connection whenever one message is in flight, taking
/// every other in-flight publish down with it: fault injection no real broker gives on
/// demand.
struct ConnectionKiller {
    poison: Uuid,
    delivered: Mutex<Vec<Uuid>>,
    lost: tokio::sync::Notify,
}

impl Publisher for ConnectionKiller {
    fn ready(&self) -> BoxFuture<'_, Result<(), PublishError>> {
        async { Ok(()) }.boxed()
    }

    fn publish<'a>(&'a self, env: &'a Envelope) -> BoxFuture<'a, Result<(), PublishError>> {
        async move {
            let lost = self.lost.notified();
            tokio::pin!(lost);
            lost.as_mut().enable();
            if env.id == self.poison {
                tokio::time::sleep(Duration::from_millis(2)).await;
                self.lost.notify_waiters();
                return Err(PublishError::Disconnected(
                    "connection reset by the broker (fault injection)".into(),
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(15)) => {
                    self.delivered.lock().unwrap().push(env.id);
                    Ok(())
                }
                _ = lost => Err(PublishError::Disconnected(
                    "connection reset by the broker (fault injection)".into(),
                )),
            }
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, Result<(), String>> {
        async { Ok(()) }.boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}

fn relay_with(db: &TestDb, s: &outbox_relay::config::Settings, p: Arc<dyn Publisher>) -> Relay {
    outbox_relay::startup::relay(s, db.pool.clone(), p)
}

#[tokio::test]
async fn a_message_that_keeps_killing_the_connection_dies_alone_and_costs_the_others_nothing() {
    let db = TestDb::new().await;
    let q = topic("killer");
    let poison = Message::new(&q, b"kills".to_vec())
        .unwrap()
        .with_key("stuck")
        .unwrap();
    let behind = Message::new(&q, b"behind".to_vec())
        .unwrap()
        .with_key("stuck")
        .unwrap();
    let others: Vec<Message> = (0..300)
        .map(|i| {
            Message::new(&q, vec![1])
                .unwrap()
                .with_key(format!("k{}", i % 30))
                .unwrap()
        })
        .collect();
    let mut all = vec![poison.clone(), behind.clone()];
    all.extend(others.iter().cloned());
    Outbox::default()
        .enqueue_batch(&db.pool, &all)
        .await
        .unwrap();

    let mut s = settings(&db);
    s.retention.delivered = Duration::from_secs(3600);
    s.retry.max_attempts = 3;
    let killer = Arc::new(ConnectionKiller {
        poison: poison.id(),
        delivered: Mutex::default(),
        lost: tokio::sync::Notify::new(),
    });
    let relay = Arc::new(relay_with(&db, &s, killer.clone()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));

    let (attempts, err) = wait_dead(&db.pool, poison.id(), "the connection killer").await;
    assert_eq!(
        attempts, 3,
        "dead after retry.max_attempts failed attempts: {err}"
    );
    assert!(err.contains("only one in flight"), "{err}");
    let start = Instant::now();
    while killer.delivered.lock().unwrap().len() < others.len() {
        assert!(
            start.elapsed() < WAIT,
            "the other messages did not all go through"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let charged = charged_deliveries(&db.pool).await;
    assert!(
        charged.is_empty(),
        "innocent messages charged attempts: {charged:?}"
    );
    assert!(
        !killer.delivered.lock().unwrap().contains(&behind.id()),
        "the key's next message must wait behind its dead head"
    );
    assert_eq!(
        row(&db.pool, behind.id()).await.unwrap(),
        ("pending".into(), 0, None)
    );
}

/// A publisher with a bug.
struct Panics;

impl Publisher for Panics {
    fn ready(&self) -> BoxFuture<'_, Result<(), PublishError>> {
        async { Ok(()) }.boxed()
    }
    fn publish<'a>(&'a self, _: &'a Envelope) -> BoxFuture<'a, Result<(), PublishError>> {
        async { panic!("publisher bug (fault injection)") }.boxed()
    }
    fn health(&self) -> BoxFuture<'_, Result<(), String>> {
        async { Ok(()) }.boxed()
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}

#[tokio::test]
async fn a_panic_in_a_relay_task_stops_the_relay_with_an_error() {
    let db = TestDb::new().await;
    let m = Message::new(topic("panic"), b"x".to_vec()).unwrap();
    outbox::enqueue(&db.pool, &m).await.unwrap();
    let s = settings(&db);
    let relay = Arc::new(relay_with(&db, &s, Arc::new(Panics)));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let result = tokio::time::timeout(WAIT, relay.run(shutdown))
        .await
        .expect("the relay stops by itself after a panic");
    match result {
        Err(RelayError::Panicked(what)) => assert!(what.contains("publisher bug"), "{what}"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(
        row(&db.pool, m.id()).await.unwrap().0,
        "pending",
        "the message stays for the next relay"
    );
}

fn envelope(seq: i64, topic: &str, key: String) -> Envelope {
    Envelope {
        seq,
        partition: 0,
        id: Uuid::new_v4(),
        topic: topic.to_owned(),
        key: Some(key),
        payload: b"windowed".to_vec(),
        headers: BTreeMap::new(),
        content_type: None,
        created_at_unix: 0,
        created_at_micros: 0,
        attempts: 0,
        replay_of: None,
    }
}

/// Many messages in one channel's confirm window, every third one unroutable: RabbitMQ
/// acknowledges them several at a time and lapin hands each return to any one confirm of an
/// ack, so each outcome must come from the return's `message-id`. Every unroutable message is
/// rejected, every routed one confirmed and enqueued, none the other way round. (The routed
/// queue is not durable, so RabbitMQ confirms routed and unroutable messages alike without
/// waiting for a disk, and acknowledges runs of both with one `basic.ack`.)
#[tokio::test]
async fn returns_in_a_confirm_window_are_matched_to_their_own_messages() {
    let db = TestDb::new().await;
    let routed = topic("window");
    let consumer = Consumer::connect().await;
    let declare = |passive| {
        consumer.channel().queue_declare(
            &routed,
            lapin::options::QueueDeclareOptions {
                passive,
                auto_delete: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
    };
    declare(false).await.expect("queue_declare");
    let unroutable = topic("window-nowhere");
    let mut s = settings(&db);
    s.rabbitmq.channels = 1;
    s.rabbitmq.channel_window = 500;
    let publisher =
        outbox_relay::publish::rabbitmq::RabbitMqPublisher::new(&s.rabbitmq).expect("publisher");
    publisher.ready().await.expect("RabbitMQ is up");

    let mut confirmed = 0u32;
    for round in 0..10 {
        let envelopes: Vec<Envelope> = (0..300)
            .map(|i| {
                let to = if i % 3 == 0 { &unroutable } else { &routed };
                envelope(round * 1000 + i, to, format!("k{i}"))
            })
            .collect();
        // All queued before the channel's worker runs: they share one window.
        let outcomes =
            futures::future::join_all(envelopes.iter().map(|e| publisher.publish(e))).await;
        for (env, outcome) in envelopes.iter().zip(outcomes) {
            if env.topic == unroutable {
                match outcome {
                    Err(PublishError::Rejected(why)) => {
                        assert!(why.contains("NO_ROUTE"), "seq {}: {why}", env.seq)
                    }
                    other => panic!(
                        "seq {} ({}) was returned by RabbitMQ but came out as {other:?}",
                        env.seq, env.id
                    ),
                }
            } else {
                assert_eq!(
                    outcome,
                    Ok(()),
                    "seq {} ({}) was routed but not confirmed",
                    env.seq,
                    env.id
                );
                confirmed += 1;
            }
        }
    }
    let queue = declare(true).await.expect("passive queue_declare");
    assert_eq!(
        queue.message_count(),
        confirmed,
        "routed messages in the queue"
    );
    publisher.close().await;
}

/// A message to an exchange that does not exist makes RabbitMQ close its channel, which takes
/// every message of the channel's window with it. None of the others is charged: they are
/// published again alone, go through, and only the message at fault dies.
#[tokio::test]
async fn a_message_that_closes_its_channel_dies_alone_and_costs_its_window_nothing() {
    let db = TestDb::new().await;
    let q = topic("chanclose");
    let bad_topic = topic("to-missing-exchange");
    let consumer = Consumer::connect().await;
    consumer.queue(&q).await;
    let bad = Message::new(&bad_topic, b"x".to_vec())
        .unwrap()
        .with_key("bad")
        .unwrap();
    let mut all = vec![bad.clone()];
    all.extend(keyed_messages(&q, 0..300, 100));
    enqueue_all(&db, &all).await;

    let mut s = settings(&db);
    s.retention.delivered = Duration::from_secs(3600);
    s.retry.max_attempts = 2;
    s.rabbitmq.channels = 1;
    s.rabbitmq.routes.insert(
        bad_topic.clone(),
        outbox_relay::config::RouteSettings {
            exchange: format!("{bad_topic}.missing"),
            routing_key: "{topic}".into(),
        },
    );
    let relay = start_relay(&s).await;
    let (attempts, err) = wait_dead(&db.pool, bad.id(), "the channel closer").await;
    assert_eq!(attempts, 2, "{err}");
    assert!(err.contains("NOT_FOUND"), "{err}");
    consumer.wait_for_distinct(300, WAIT).await;
    relay.stop().await;
    let charged = charged_deliveries(&db.pool).await;
    assert!(
        charged.is_empty(),
        "messages that shared a window with it were charged attempts: {charged:?}"
    );
}
