//! The consumer library: one effect per message however often it is delivered, retries and
//! dead letters, and the RabbitMQ and Kafka sources end to end (outbox → relay → broker →
//! consumer).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use outbox::{Message, Outbox};
use outbox_consumer::{
    Deduplicator, Handler, HandlerError, Incoming, MissingId, Outcome, RetryPolicy,
};
use outbox_tests::{
    amqp_url, enqueue_all, kafka_brokers, keyed_messages, start_relay, topic, Broker, Consumer,
    TestDb,
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Records each message's effect as a row; fails on demand.
#[derive(Default)]
struct Recorder {
    /// Retryable failures still to inject.
    flaky: AtomicU32,
    /// How long to hold the transaction open.
    hold: Duration,
    /// Which consumer recorded the effect.
    name: &'static str,
}

impl Handler for Recorder {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if m.payload == b"poison" {
                return Err(HandlerError::permanent("payload is not an order"));
            }
            if self
                .flaky
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(HandlerError::retryable("inventory service unavailable"));
            }
            let seq: Option<i64> = m.headers.get("outbox-seq").and_then(|s| s.parse().ok());
            sqlx::query(
                "INSERT INTO effects (message_id, key, seq, consumer) VALUES ($1, $2, $3, $4)",
            )
            .bind(m.message_id)
            .bind(m.key.as_deref())
            .bind(seq)
            .bind(self.name)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retryable)?;
            if !self.hold.is_zero() {
                tokio::time::sleep(self.hold).await;
            }
            Ok(())
        })
    }
}

async fn setup(db: &TestDb, group: &str) -> Deduplicator {
    sqlx::query("CREATE TABLE IF NOT EXISTS effects (n bigserial PRIMARY KEY, message_id uuid, key text, seq bigint, consumer text)")
        .execute(&db.pool)
        .await
        .unwrap();
    let dedup = Deduplicator::new(db.pool.clone(), group)
        .unwrap()
        .with_retry(RetryPolicy {
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            ..Default::default()
        });
    dedup.migrate().await.unwrap();
    dedup
}

async fn effects(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every one of `n` messages has exactly one effect, and each key's effects are in `seq`
/// order; a failure names the message, the key and the sequence numbers.
async fn assert_one_effect_each_in_key_order(pool: &PgPool, n: usize) {
    let rows: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT message_id, key, seq FROM effects ORDER BY n")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut seen = std::collections::HashSet::new();
    for (id, key, seq) in &rows {
        assert!(
            seen.insert(*id),
            "message {id} (key {key}, seq {seq}) had two effects"
        );
    }
    assert_eq!(rows.len(), n, "one effect per message");
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for (id, key, seq) in &rows {
        let prev = last.insert(key, *seq).unwrap_or(i64::MIN);
        assert!(
            *seq > prev,
            "key {key}: effect of seq {seq} (message {id}) after seq {prev}"
        );
    }
}

async fn effect_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until `done` holds, polling every 100 ms; panics with `what` after `timeout`.
async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn incoming(id: Uuid, payload: &[u8]) -> Incoming {
    Incoming::new(
        "orders",
        payload.to_vec(),
        BTreeMap::from([("outbox-id".to_owned(), id.to_string())]),
    )
}

#[tokio::test]
async fn the_same_message_delivered_three_times_and_concurrently_has_one_effect() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let handler = Recorder::default();
    let m = incoming(Uuid::new_v4(), b"order 1");
    let outcomes = [
        dedup.handle(&m, &handler).await.unwrap(),
        dedup.handle(&m, &handler).await.unwrap(),
        dedup.handle(&m, &handler).await.unwrap(),
    ];
    assert_eq!(
        outcomes,
        [Outcome::Processed, Outcome::Duplicate, Outcome::Duplicate]
    );
    assert_eq!(effects(&db.pool, m.message_id.unwrap()).await, 1);
    let stats = dedup.clone().stats();
    assert_eq!(
        (stats.processed, stats.duplicates),
        (1, 2),
        "clones share the totals: {stats:?}"
    );

    // Two consumers at once: the second waits on the first's dedup row, then skips.
    let slow = Recorder {
        hold: Duration::from_millis(300),
        ..Default::default()
    };
    let m = incoming(Uuid::new_v4(), b"order 2");
    let other = Deduplicator::new(db.pool.clone(), "billing").unwrap();
    let (a, b) = tokio::join!(dedup.handle(&m, &slow), other.handle(&m, &slow));
    let mut both = [a.unwrap(), b.unwrap()];
    both.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(both, [Outcome::Duplicate, Outcome::Processed]);
    assert_eq!(
        effects(&db.pool, m.message_id.unwrap()).await,
        1,
        "two concurrent deliveries, one effect"
    );

    // Another group handles the same message on its own.
    let shipping = Deduplicator::new(db.pool.clone(), "shipping").unwrap();
    assert_eq!(
        shipping.handle(&m, &handler).await.unwrap(),
        Outcome::Processed
    );
}

/// Records the effect and writes a reply into the service's own outbox, in the transaction
/// it is given; fails after writing the reply on demand.
struct Replier {
    outbox: Outbox,
    /// Retryable failures after the reply is written, still to inject.
    fail_after_reply: AtomicU32,
    /// Fail for good after writing the reply.
    refuse: bool,
    hold: Duration,
}

impl Handler for Replier {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO effects (message_id, consumer) VALUES ($1, 'replier')")
                .bind(m.message_id)
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
            let reply = Message::new("replies", m.payload.clone())
                .map_err(HandlerError::permanent)?
                .with_header("in-reply-to", m.message_id.unwrap().to_string())
                .map_err(HandlerError::permanent)?;
            self.outbox
                .enqueue(&mut *tx, &reply)
                .await
                .map_err(HandlerError::retryable)?;
            if !self.hold.is_zero() {
                tokio::time::sleep(self.hold).await;
            }
            if self.refuse {
                return Err(HandlerError::permanent("refused after replying"));
            }
            if self
                .fail_after_reply
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(HandlerError::retryable("failed after replying"));
            }
            Ok(())
        })
    }
}

/// A handler that replies through its service's outbox, in the transaction it is given:
/// delivered three times in a row, twice at once, or failing once after writing its reply,
/// a message has one effect and one reply; a handler that fails for good after writing it
/// leaves neither.
#[tokio::test]
async fn a_reply_written_in_the_handlers_transaction_is_one_per_effect_and_none_after_a_rollback() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "warehouse").await;
    let replies = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM outbox.messages WHERE topic = 'replies' AND headers->>'in-reply-to' = $1",
            )
            .bind(id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let replier = |fail_after_reply: u32, refuse: bool, hold: Duration| Replier {
        outbox: Outbox::default(),
        fail_after_reply: AtomicU32::new(fail_after_reply),
        refuse,
        hold,
    };

    // Delivered three times in a row.
    let handler = replier(0, false, Duration::ZERO);
    let m = incoming(Uuid::new_v4(), b"ship 1");
    for _ in 0..3 {
        dedup.handle(&m, &handler).await.unwrap();
    }
    let id = m.message_id.unwrap();
    assert_eq!((effects(&db.pool, id).await, replies(id).await), (1, 1));

    // Delivered twice at once, to two consumers of the group.
    let slow = replier(0, false, Duration::from_millis(300));
    let m = incoming(Uuid::new_v4(), b"ship 2");
    let other = Deduplicator::new(db.pool.clone(), "warehouse").unwrap();
    let (a, b) = tokio::join!(dedup.handle(&m, &slow), other.handle(&m, &slow));
    let mut both = [a.unwrap(), b.unwrap()];
    both.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(both, [Outcome::Duplicate, Outcome::Processed]);
    let id = m.message_id.unwrap();
    assert_eq!((effects(&db.pool, id).await, replies(id).await), (1, 1));

    // Failing once after writing the reply: rolled back, tried again, one of each.
    let flaky = replier(1, false, Duration::ZERO);
    let m = incoming(Uuid::new_v4(), b"ship 3");
    let first = dedup.handle(&m, &flaky).await.unwrap();
    assert!(matches!(first, Outcome::Retry { .. }), "{first:?}");
    assert_eq!(
        replies(m.message_id.unwrap()).await,
        0,
        "rolled back with the failure"
    );
    assert_eq!(dedup.handle(&m, &flaky).await.unwrap(), Outcome::Processed);
    let id = m.message_id.unwrap();
    assert_eq!((effects(&db.pool, id).await, replies(id).await), (1, 1));

    // Failing for good after writing it: dead-lettered, no effect, no reply.
    let refusing = replier(0, true, Duration::ZERO);
    let m = incoming(Uuid::new_v4(), b"ship 4");
    let outcome = dedup.handle(&m, &refusing).await.unwrap();
    assert!(
        matches!(outcome, Outcome::DeadLettered { .. }),
        "{outcome:?}"
    );
    let id = m.message_id.unwrap();
    assert_eq!((effects(&db.pool, id).await, replies(id).await), (0, 0));
}

#[tokio::test]
async fn retryable_failures_then_success_and_permanent_failures_dead_letter() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let handler = Recorder {
        flaky: AtomicU32::new(2),
        ..Default::default()
    };
    let m = incoming(Uuid::new_v4(), b"order");
    let first = dedup.handle(&m, &handler).await.unwrap();
    assert!(
        matches!(first, Outcome::Retry { attempts: 1, .. }),
        "{first:?}"
    );
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM outbox_consumer.attempts WHERE message_id = $1")
            .bind(m.message_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 1, "the failed attempt is recorded");
    assert!(matches!(
        dedup.handle(&m, &handler).await.unwrap(),
        Outcome::Retry { attempts: 2, .. }
    ));
    assert_eq!(
        dedup.handle(&m, &handler).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(
        effects(&db.pool, m.message_id.unwrap()).await,
        1,
        "failed attempts left no effect"
    );
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_consumer.attempts WHERE message_id = $1")
            .bind(m.message_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, 0, "a success clears the message's failed attempts");
    let stats = dedup.stats();
    assert_eq!((stats.retries, stats.processed), (2, 1), "{stats:?}");

    let poison = incoming(Uuid::new_v4(), b"poison");
    let out = dedup.handle(&poison, &handler).await.unwrap();
    assert_eq!(
        out,
        Outcome::DeadLettered {
            error: "permanent: payload is not an order".into()
        }
    );
    let (error, payload): (String, Vec<u8>) = sqlx::query_as(
        "SELECT error, payload FROM outbox_consumer.dead_letters WHERE message_id = $1",
    )
    .bind(poison.message_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (error.as_str(), payload.as_slice()),
        ("permanent: payload is not an order", b"poison".as_slice())
    );
    assert_eq!(
        dedup.handle(&poison, &handler).await.unwrap(),
        Outcome::Duplicate,
        "a parked message is settled"
    );

    // Retryable failures past max_attempts are parked too.
    let always = Recorder {
        flaky: AtomicU32::new(u32::MAX),
        ..Default::default()
    };
    let stubborn = incoming(Uuid::new_v4(), b"order");
    let policy = dedup.retry_policy();
    let dedup = dedup.with_retry(RetryPolicy {
        max_attempts: 3,
        ..policy
    });
    let outcomes: Vec<Outcome> = vec![
        dedup.handle(&stubborn, &always).await.unwrap(),
        dedup.handle(&stubborn, &always).await.unwrap(),
        dedup.handle(&stubborn, &always).await.unwrap(),
    ];
    assert!(
        matches!(outcomes[2], Outcome::DeadLettered { .. }),
        "{outcomes:?}"
    );
}

/// A batch is one transaction: all its effects commit together, duplicates in it are
/// skipped; one failure rolls the whole batch back and leaves no trace, for the messages to
/// be handled one at a time.
#[tokio::test]
async fn a_batch_commits_together_and_a_failure_in_it_changes_nothing() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "batch").await.with_batch(8);
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    let handler = Recorder::default();
    let first: Vec<Incoming> = ids[..4].iter().map(|&id| incoming(id, b"x")).collect();
    let outcomes = dedup.handle_batch(&first, &handler).await.unwrap().unwrap();
    assert_eq!(outcomes, vec![Outcome::Processed; 4]);
    let transactions: i64 = sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM effects")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((effect_count(&db.pool).await, transactions), (4, 1));

    // A redelivered message in the next batch is a duplicate; the new one is handled.
    let second = vec![incoming(ids[0], b"x"), incoming(ids[4], b"x")];
    let outcomes = dedup
        .handle_batch(&second, &handler)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcomes, vec![Outcome::Duplicate, Outcome::Processed]);
    assert_eq!(effect_count(&db.pool).await, 5);

    // A failure anywhere in a batch: nothing of it stays, not even the failed attempt.
    let flaky = Recorder {
        flaky: AtomicU32::new(1),
        ..Default::default()
    };
    let third = vec![incoming(ids[5], b"x"), incoming(Uuid::new_v4(), b"y")];
    let failing = Recorder {
        flaky: AtomicU32::new(0),
        ..Default::default()
    };
    let poison = vec![incoming(ids[5], b"x"), incoming(Uuid::new_v4(), b"poison")];
    assert_eq!(dedup.handle_batch(&poison, &failing).await.unwrap(), None);
    assert_eq!(dedup.handle_batch(&third, &flaky).await.unwrap(), None);
    assert_eq!(effect_count(&db.pool).await, 5, "rolled back");
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_consumer.attempts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        attempts, 0,
        "a batch records no attempt; one at a time does"
    );
    // One at a time, each settles on its own.
    assert_eq!(
        dedup.handle_until_settled(&third[0], &flaky).await,
        Outcome::Processed
    );
    assert_eq!(effects(&db.pool, ids[5]).await, 1);
    // A message without an id (to be dead-lettered) is never batched.
    let no_id = Incoming::new("orders", b"z".to_vec(), BTreeMap::new());
    assert_eq!(
        dedup
            .handle_batch(&[incoming(Uuid::new_v4(), b"x"), no_id], &handler)
            .await
            .unwrap(),
        None
    );
    assert_eq!(effect_count(&db.pool).await, 6);
}

#[tokio::test]
async fn a_message_without_an_id_is_dead_lettered_or_keyed_by_content() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let handler = Recorder::default();
    let anonymous = Incoming::new("orders", b"no id".to_vec(), BTreeMap::new());
    let out = dedup.handle(&anonymous, &handler).await.unwrap();
    assert!(
        matches!(&out, Outcome::DeadLettered { error } if error.contains("has no outbox-id header")),
        "{out:?}"
    );
    let derived = dedup.clone().with_missing_id(MissingId::DeriveFromContent);
    assert_eq!(
        derived.handle(&anonymous, &handler).await.unwrap(),
        Outcome::Processed
    );
    assert_eq!(
        derived.handle(&anonymous, &handler).await.unwrap(),
        Outcome::Duplicate
    );
}

#[tokio::test]
async fn purge_removes_only_dedup_rows_past_the_window() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    sqlx::query(
        "INSERT INTO outbox_consumer.processed (consumer_group, message_id, processed_at)
         SELECT g, gen_random_uuid(), now() - i * interval '1 hour'
         FROM generate_series(0, 9) i, (VALUES ('billing'), ('shipping')) v(g)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Rows 0..9 hours old per group; keep 4.5 hours: billing loses 5, shipping none.
    let purged = dedup
        .purge(Duration::from_secs(4 * 3600 + 1800), 2)
        .await
        .unwrap();
    assert_eq!(purged, 5);
    let left: Vec<(String, i64)> = sqlx::query_as(
        "SELECT consumer_group, count(*) FROM outbox_consumer.processed GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        [("billing".to_owned(), 5), ("shipping".to_owned(), 10)]
    );
}

/// A consumer that dies after its commit but before its ack: the broker redelivers, the
/// next consumer skips it and acks.
/// A broker that accepts the connection and then says nothing (a node wedged mid-start, a
/// proxy whose upstream is gone): the consumer gives up on the attempt after its connect
/// timeout and tries again, and it stops when asked even while an attempt hangs. An
/// in-process listener stands in for that broker, since a real one cannot be made to hang
/// like that.
#[tokio::test]
async fn rabbitmq_consumer_retries_a_broker_that_never_answers_and_still_stops_when_asked() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "silent").await;
    let silent = outbox_tests::SilentServer::start().await;
    let shutdown = CancellationToken::new();
    let source = outbox_consumer::rabbitmq::RabbitMqSource::new(
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", silent.port),
        "never",
    )
    .with_connect_timeout(Duration::from_millis(300));
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            source
                .run(dedup, Arc::new(Recorder::default()), shutdown)
                .await
        }
    });
    wait_until(
        Duration::from_secs(10),
        "a second connection attempt",
        || {
            let accepted = silent.accepted();
            async move { accepted >= 2 }
        },
    )
    .await;
    // An attempt that timed out closed its connection: nothing (no socket, no thread of
    // lapin's driving it) is left behind per attempt.
    wait_until(
        Duration::from_secs(5),
        "the timed-out attempt's connection closed",
        || {
            let closed = silent.closed();
            async move { closed >= 1 }
        },
    )
    .await;
    // Asked to stop while an attempt hangs (or while it waits to retry).
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), running).await;
    assert!(
        stopped.is_ok(),
        "the consumer did not stop within 5 s of being asked, connecting to a silent broker"
    );
    let (accepted, closed) = silent.wait_all_closed(Duration::from_secs(5)).await;
    assert_eq!(
        closed, accepted,
        "connections to the silent broker left open after the consumer stopped"
    );
}

/// Holds the first message it is given until dropped; records every effect with its seq.
struct HoldFirst {
    held: tokio::sync::Notify,
    holding: std::sync::atomic::AtomicBool,
}

impl Handler for HoldFirst {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if !self.holding.swap(true, Ordering::SeqCst) {
                self.held.notify_one();
                std::future::pending::<()>().await;
            }
            Recorder::default().handle(tx, m).await
        })
    }
}

/// The active consumer of a single-active-consumer queue is dropped mid-message (its task
/// aborted), holding deliveries of a key while a later one of the key waits in the queue:
/// the next consumer gets the held ones again first, so the key's effects stay in order.
/// (Had the dropped consumer cancelled its subscription before its connection went, the
/// queue would hand the waiting message to the next consumer before requeueing the held
/// ones.)
#[tokio::test]
async fn a_consumer_dropped_mid_message_hands_its_key_over_in_order() {
    use lapin::{options::BasicPublishOptions, types::AMQPValue, BasicProperties};
    let db = TestDb::new().await;
    setup(&db, "billing").await;
    let q = topic("handover");
    let broker = Consumer::connect().await;
    let mut single_active = lapin::types::FieldTable::default();
    single_active.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    broker
        .channel()
        .queue_declare(
            &q,
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            single_active,
        )
        .await
        .unwrap();
    // The first consumer, on a pool of its own, takes two deliveries at a time and holds
    // the first.
    let own_pool = PgPool::connect(&db.url).await.unwrap();
    let first = Arc::new(HoldFirst {
        held: tokio::sync::Notify::new(),
        holding: Default::default(),
    });
    let a = tokio::spawn({
        let (handler, q) = (first.clone(), q.clone());
        async move {
            let dedup = Deduplicator::new(own_pool, "billing").unwrap();
            outbox_consumer::rabbitmq::RabbitMqSource::new(amqp_url(), q)
                .with_prefetch(2)
                .run(dedup, handler, CancellationToken::new())
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The second waits, inactive.
    let shutdown = CancellationToken::new();
    let b = tokio::spawn({
        let (dedup, shutdown, q) = (
            Deduplicator::new(db.pool.clone(), "billing").unwrap(),
            shutdown.clone(),
            q.clone(),
        );
        async move {
            outbox_consumer::rabbitmq::RabbitMqSource::new(amqp_url(), q)
                .run(dedup, Arc::new(Recorder::default()), shutdown)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for seq in 1..=3 {
        let mut headers = lapin::types::FieldTable::default();
        for (name, value) in [
            ("outbox-id", Uuid::new_v4().to_string()),
            ("outbox-key", "k".to_owned()),
            ("outbox-seq", seq.to_string()),
        ] {
            headers.insert(name.into(), AMQPValue::LongString(value.into()));
        }
        broker
            .channel()
            .basic_publish(
                "",
                &q,
                BasicPublishOptions::default(),
                format!("order {seq}").as_bytes(),
                BasicProperties::default().with_headers(headers),
            )
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), first.held.notified())
        .await
        .expect("the first consumer took the first message");
    a.abort();
    let _ = a.await;
    wait_until(Duration::from_secs(30), "three effects", || async {
        effect_count(&db.pool).await == 3
    })
    .await;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM effects ORDER BY n")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(seqs, vec![1, 2, 3], "the key's effects in seq order");
    shutdown.cancel();
    b.await.unwrap().unwrap();
}

/// A TCP proxy to RabbitMQ that reads the AMQP method frames the client sends (class id,
/// method id) as they pass: observation a real broker cannot give the test.
async fn amqp_watching_proxy() -> (u16, Arc<std::sync::Mutex<Vec<(u16, u16)>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let broker = url::Url::parse(&amqp_url()).unwrap();
    let upstream = format!(
        "{}:{}",
        broker.host_str().unwrap(),
        broker.port().unwrap_or(5672)
    );
    let methods = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn({
        let methods = methods.clone();
        async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                    let _ = client_tx.shutdown().await;
                });
                let methods = methods.clone();
                tokio::spawn(async move {
                    // The 8-byte protocol header, then frames: type, channel, size, payload,
                    // end octet; a method frame's payload starts with class and method ids.
                    let mut seen: Vec<u8> = Vec::new();
                    let mut buf = [0u8; 8192];
                    let mut at = 8;
                    while let Ok(n) = client_rx.read(&mut buf).await {
                        if n == 0 || server_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while seen.len() >= at + 7 {
                            let size = u32::from_be_bytes(seen[at + 3..at + 7].try_into().unwrap())
                                as usize;
                            if seen.len() < at + 7 + size + 1 {
                                break;
                            }
                            if seen[at] == 1 && size >= 4 {
                                let p = at + 7;
                                let class = u16::from_be_bytes([seen[p], seen[p + 1]]);
                                let method = u16::from_be_bytes([seen[p + 2], seen[p + 3]]);
                                methods.lock().unwrap().push((class, method));
                            }
                            at += 7 + size + 1;
                        }
                    }
                    let _ = server_tx.shutdown().await;
                });
            }
        }
    });
    (port, methods)
}

/// Dropped midway (its task aborted) while it holds a delivery, the RabbitMQ source ends its
/// connection at once, sending nothing on its way out: no `basic.cancel` (class 60, method
/// 30), on which a single-active-consumer queue would hand the next messages to a standby
/// before requeueing the held ones.
#[tokio::test]
async fn a_rabbitmq_source_dropped_midway_sends_no_cancel_before_its_connection_ends() {
    use lapin::{options::BasicPublishOptions, BasicProperties};
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let q = topic("dropped");
    let broker = Consumer::connect().await;
    broker.declare(&q).await;
    let (port, methods) = amqp_watching_proxy().await;
    let mut through = url::Url::parse(&amqp_url()).unwrap();
    through.set_port(Some(port)).unwrap();
    let hold = Arc::new(HoldFirst {
        held: tokio::sync::Notify::new(),
        holding: Default::default(),
    });
    let source = tokio::spawn({
        let (hold, q, url) = (hold.clone(), q.clone(), through.to_string());
        async move {
            outbox_consumer::rabbitmq::RabbitMqSource::new(url, q)
                .run(dedup, hold, CancellationToken::new())
                .await
        }
    });
    broker
        .channel()
        .basic_publish(
            "",
            &q,
            BasicPublishOptions::default(),
            b"held",
            BasicProperties::default().with_message_id(Uuid::new_v4().to_string().into()),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), hold.held.notified())
        .await
        .expect("the source took the message");
    let before = methods.lock().unwrap().len();
    assert!(
        methods.lock().unwrap().contains(&(60, 20)),
        "the proxy saw the basic.consume: {:?}",
        methods.lock().unwrap()
    );
    source.abort();
    let _ = source.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<(u16, u16)> = methods.lock().unwrap()[before..].to_vec();
    assert!(
        !after.contains(&(60, 30)),
        "no basic.cancel after the drop; the client sent {after:?}"
    );
}

#[tokio::test]
async fn rabbitmq_crash_between_commit_and_ack_is_skipped_on_redelivery() {
    use lapin::options::BasicGetOptions;
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let q = topic("crash");
    Consumer::connect().await.declare(&q).await;
    let msg = Message::new(&q, b"order".to_vec())
        .unwrap()
        .with_key("k")
        .unwrap();
    outbox::enqueue(&db.pool, &msg).await.unwrap();
    let relay = start_relay(&Broker::RabbitMq.settings(&db)).await;

    // First consumer: get, handle (commit), then "crash": close without ack.
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let start = Instant::now();
    let delivery = loop {
        if let Some(d) = ch.basic_get(&q, BasicGetOptions::default()).await.unwrap() {
            break d.delivery;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the message never reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let first = dedup
        .handle(
            &outbox_consumer::rabbitmq::incoming(&q, &delivery),
            &Recorder::default(),
        )
        .await
        .unwrap();
    assert_eq!(first, Outcome::Processed);
    conn.close(320, "crashed before ack").await.unwrap();

    // Second consumer: the redelivery is a duplicate, acked, and the queue drains.
    let shutdown = CancellationToken::new();
    let source = outbox_consumer::rabbitmq::RabbitMqSource::new(amqp_url(), q.clone());
    let running = tokio::spawn({
        let (dedup, shutdown) = (dedup.clone(), shutdown.clone());
        async move {
            source
                .run(dedup, Arc::new(Recorder::default()), shutdown)
                .await
        }
    });
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let start = Instant::now();
    loop {
        let q_state = ch
            .queue_declare(
                &q,
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        if q_state.message_count() == 0 && start.elapsed() > Duration::from_millis(500) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the redelivery was never acked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    relay.stop().await;
    assert_eq!(
        effects(&db.pool, msg.id()).await,
        1,
        "handled once, skipped on redelivery"
    );
}

/// Producer outbox → relay → broker → consumer source: one effect per message, in each
/// key's `seq` order; a poison message is parked and the rest flow.
async fn end_to_end_effects_are_exactly_once_in_key_order(b: Broker) {
    const N: usize = 600;
    let db = TestDb::new().await;
    // Deliveries waiting together are handled in one transaction, falling back to one at a
    // time around the poison message and the injected failures.
    let dedup = setup(&db, "e2e").await.with_batch(32);
    let t = topic("e2e");
    b.consumer().await.declare(&t).await;
    let mut msgs = keyed_messages(&t, 0..N, 12);
    msgs.insert(
        N / 2,
        Message::new(&t, b"poison".to_vec())
            .unwrap()
            .with_key("k3")
            .unwrap(),
    );
    enqueue_all(&db, &msgs).await;
    // The relay publishes everything; then a second relay run republishes a few (as after a
    // crash between confirm and delete) to exercise dedup across deliveries.
    let relay = start_relay(&b.settings(&db)).await;

    let shutdown = CancellationToken::new();
    let handler = Arc::new(Recorder {
        flaky: AtomicU32::new(3),
        ..Default::default()
    });
    let running = {
        let (dedup, shutdown, handler, t) =
            (dedup.clone(), shutdown.clone(), handler.clone(), t.clone());
        tokio::spawn(async move {
            match b {
                Broker::RabbitMq => {
                    let source = outbox_consumer::rabbitmq::RabbitMqSource::new(amqp_url(), t)
                        .with_concurrency(4);
                    source.run(dedup, handler, shutdown).await
                }
                Broker::Kafka => {
                    let source = outbox_consumer::kafka::KafkaSource::new(
                        &kafka_brokers(),
                        &format!("e2e-{t}"),
                        &[&t],
                    );
                    source.run(dedup, handler, shutdown).await
                }
            }
        })
    };
    let duplicates: Vec<Message> = msgs[..50].to_vec();
    let start = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if n >= N as i64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {n} of {N} effects"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Deliver the first 50 again (new outbox rows with the same ids cannot exist, so use a
    // second outbox schema writing the same ids to the same destination).
    let again = Outbox::new(outbox::Schema::parse("replay").unwrap());
    again.migrate(&db.pool).await.unwrap();
    again.enqueue_batch(&db.pool, &duplicates).await.unwrap();
    let mut replay = b.settings(&db);
    replay.database.schema = "replay".into();
    let replayer = start_relay(&replay).await;
    let start = Instant::now();
    loop {
        let processed: i64 = sqlx::query_scalar("SELECT count(*) FROM replay.messages")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if processed == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replay not published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // let the consumer see the replays
    shutdown.cancel();
    running.await.unwrap().unwrap();
    replayer.stop().await;
    relay.stop().await;

    assert_one_effect_each_in_key_order(&db.pool, N).await;
    if b == Broker::Kafka {
        // A partition's waiting messages share transactions (the effects' xmin).
        let transactions: i64 =
            sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM effects")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert!(
            transactions < N as i64 / 2,
            "{N} effects in {transactions} transactions: no batching"
        );
    }
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_consumer.dead_letters WHERE error LIKE '%not an order%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(dead, 1, "the poison message is parked");
}

outbox_tests::for_each_broker!(end_to_end_effects_are_exactly_once_in_key_order);

/// A Kafka consumer in `group` on `t`, with timings short enough for a test to see
/// rebalances within seconds.
fn kafka_source(group: &str, t: &str) -> outbox_consumer::kafka::KafkaSource {
    outbox_consumer::kafka::KafkaSource::new(&kafka_brokers(), group, &[t])
        .with_property("session.timeout.ms", "6000")
        .with_property("heartbeat.interval.ms", "500")
        .with_property("auto.commit.interval.ms", "200")
}

/// Runs `source` with a recorder named `name` until the returned token is cancelled.
fn spawn_kafka_consumer(
    source: outbox_consumer::kafka::KafkaSource,
    dedup: &Deduplicator,
    name: &'static str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), outbox_consumer::ConsumerError>>,
) {
    let shutdown = CancellationToken::new();
    let handler = Arc::new(Recorder {
        hold: Duration::from_millis(15),
        name,
        ..Default::default()
    });
    let running = tokio::spawn({
        let (dedup, shutdown) = (dedup.clone(), shutdown.clone());
        async move { source.run(dedup, handler, shutdown).await }
    });
    (shutdown, running)
}

async fn effects_by(pool: &PgPool, name: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE consumer = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Kafka: a second consumer joins the group mid-stream, then the first leaves. The
/// partitions move between them twice while messages are being handled; still every
/// message has exactly one effect, in each key's `seq` order, and both consumers did part of
/// the work (so the partitions really moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_rebalance_mid_stream_loses_nothing_and_applies_nothing_twice() {
    rebalance_mid_stream(1).await;
}

/// The same with four key lanes per partition: a partition moves with messages of several
/// keys in hand and settled out of offset order; its offset never passes one not settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_rebalance_mid_stream_with_key_lanes_loses_nothing_and_applies_nothing_twice() {
    rebalance_mid_stream(4).await;
}

async fn rebalance_mid_stream(concurrency: usize) {
    const N: usize = 1200;
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
    let db = TestDb::new().await;
    let dedup = setup(&db, "rebalance").await;
    let t = topic("rebalance");
    Broker::Kafka.consumer().await.declare(&t).await;
    enqueue_all(&db, &keyed_messages(&t, 0..N, 24)).await;
    let relay = start_relay(&Broker::Kafka.settings(&db)).await;
    let group = format!("rebalance-{t}");

    let source = || kafka_source(&group, &t).with_concurrency(concurrency);
    let (stop_a, a) = spawn_kafka_consumer(source(), &dedup, "a");
    wait_until(
        Duration::from_secs(60),
        "consumer a handles a quarter",
        || {
            let pool = db.pool.clone();
            async move { effect_count(&pool).await >= (N / 4) as i64 }
        },
    )
    .await;

    let (stop_b, b) = spawn_kafka_consumer(source(), &dedup, "b");
    wait_until(
        Duration::from_secs(60),
        "consumer b gets partitions and handles messages",
        || {
            let pool = db.pool.clone();
            async move { effects_by(&pool, "b").await > 0 }
        },
    )
    .await;
    let a_before_leaving = effects_by(&db.pool, "a").await;
    assert!(
        (a_before_leaving as usize) < N,
        "consumer a finished everything before the rebalance; the test proves nothing"
    );

    stop_a.cancel();
    a.await.unwrap().unwrap();
    let start = Instant::now();
    loop {
        let n = effect_count(&db.pool).await;
        if n >= N as i64 {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let by_key: Vec<(String, i64)> =
                sqlx::query_as("SELECT key, count(*) FROM effects GROUP BY key ORDER BY key")
                    .fetch_all(&db.pool)
                    .await
                    .unwrap();
            panic!(
                "{n} of {N} effects 120 s after consumer a left (a: {}, b: {}); by key: {by_key:?}",
                effects_by(&db.pool, "a").await,
                effects_by(&db.pool, "b").await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Whatever is still in flight or redelivered must be absorbed, not applied again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_b.cancel();
    b.await.unwrap().unwrap();
    relay.stop().await;

    assert_one_effect_each_in_key_order(&db.pool, N).await;
    let (by_a, by_b) = (
        effects_by(&db.pool, "a").await,
        effects_by(&db.pool, "b").await,
    );
    assert!(
        by_a > 0 && by_b > 0 && by_a + by_b == N as i64,
        "effects by a: {by_a}, by b: {by_b}"
    );
}

/// Writes `(partition, key, seq)` records to Kafka topic `t` as the relay would (the key
/// as the Kafka key; `outbox-id`, `outbox-key` and `outbox-seq` headers), each to the
/// partition given, and waits until Kafka has them all.
async fn produce_outbox_records<'a>(
    t: &str,
    records: impl IntoIterator<Item = (i32, &'a str, usize)>,
) {
    use rdkafka::{
        message::{Header, OwnedHeaders},
        producer::{FutureProducer, FutureRecord},
        ClientConfig,
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut sent = Vec::new();
    for (partition, key, seq) in records {
        let (id, seq) = (Uuid::new_v4().to_string(), seq.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "outbox-id",
                value: Some(&id),
            })
            .insert(Header {
                key: "outbox-key",
                value: Some(key),
            })
            .insert(Header {
                key: "outbox-seq",
                value: Some(&seq),
            });
        let record = FutureRecord::to(t)
            .partition(partition)
            .key(key)
            .payload("order")
            .headers(headers);
        sent.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for delivery in sent {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

async fn effects_of_key(pool: &PgPool, key: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE key = $1")
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Records like [`Recorder`], but holds every message of `stuck_key` until `open` is set.
struct Gate {
    open: Arc<std::sync::atomic::AtomicBool>,
    stuck_key: &'static str,
    inner: Recorder,
}

impl Handler for Gate {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            while m.key.as_deref() == Some(self.stuck_key) && !self.open.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.inner.handle(tx, m).await
        })
    }
}

/// Kafka: a partition whose handler is stuck holds back only itself. Its lane fills (it has
/// far more messages than a lane holds) while the other partitions are handled to the end;
/// once it is unstuck, every message of all three has exactly one effect, in order: nothing
/// that waited was dropped or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_stuck_partition_holds_back_only_itself() {
    const PER_PARTITION: usize = 1500;
    let db = TestDb::new().await;
    let dedup = setup(&db, "stuck").await;
    let t = topic("stuck");
    Broker::Kafka.consumer().await.declare(&t).await;
    let keys = ["p0", "p1", "p2"];
    produce_outbox_records(
        &t,
        (0..3).flat_map(|p| (0..PER_PARTITION).map(move |seq| (p, keys[p as usize], seq))),
    )
    .await;

    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = Arc::new(Gate {
        open: open.clone(),
        stuck_key: "p0",
        inner: Recorder::default(),
    });
    let shutdown = CancellationToken::new();
    let source = kafka_source(&format!("stuck-{t}"), &t);
    let running = tokio::spawn({
        let (dedup, shutdown) = (dedup.clone(), shutdown.clone());
        async move { source.run(dedup, handler, shutdown).await }
    });
    let effects_of = |key: &'static str| effects_of_key(&db.pool, key);
    wait_until(
        Duration::from_secs(120),
        "partitions 1 and 2 handled to the end while partition 0 is stuck",
        || async { effects_of("p1").await + effects_of("p2").await == 2 * PER_PARTITION as i64 },
    )
    .await;
    assert_eq!(effects_of("p0").await, 0, "the stuck partition had effects");

    open.store(true, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(120),
        "the unstuck partition handled to the end",
        || async { effects_of("p0").await == PER_PARTITION as i64 },
    )
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_one_effect_each_in_key_order(&db.pool, 3 * PER_PARTITION).await;
}

/// Fails every message of `failing_key` (retryably); records the rest.
struct FailKey {
    failing_key: &'static str,
    inner: Recorder,
}

impl Handler for FailKey {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if m.key.as_deref() == Some(self.failing_key) {
                return Err(HandlerError::retryable("downstream refuses this key"));
            }
            self.inner.handle(tx, m).await
        })
    }
}

/// Kafka with key lanes: in one partition, a key whose handler keeps failing holds back only
/// itself; the other keys' messages, behind it in the partition, are all handled. The
/// partition's offset stays at the failing key's first message, so a consumer that stops
/// meanwhile leaves it to the group's next consumer, which applies the held key's messages
/// and skips the rest as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_with_key_lanes_a_failing_key_holds_back_only_itself() {
    const PER_KEY: usize = 150;
    const KEYS: [&str; 4] = ["held", "k1", "k2", "k3"];
    let db = TestDb::new().await;
    // Retries without end: the held key is never dead-lettered while the test runs.
    let dedup = setup(&db, "keylanes").await.with_retry(RetryPolicy {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_attempts: u32::MAX,
        ..Default::default()
    });
    let t = topic("keylanes");
    Broker::Kafka.consumer().await.declare(&t).await;
    // All in partition 0, the keys interleaved, the held key's first message first.
    produce_outbox_records(
        &t,
        (0..PER_KEY).flat_map(|seq| KEYS.map(|key| (0, key, seq))),
    )
    .await;
    let effects_of = |key: &'static str| effects_of_key(&db.pool, key);

    let group = format!("keylanes-{t}");
    let shutdown = CancellationToken::new();
    let handler = Arc::new(FailKey {
        failing_key: "held",
        inner: Recorder {
            name: "a",
            ..Default::default()
        },
    });
    let running = tokio::spawn({
        let (dedup, shutdown) = (dedup.clone(), shutdown.clone());
        let source = kafka_source(&group, &t).with_concurrency(4);
        async move { source.run(dedup, handler, shutdown).await }
    });
    wait_until(
        Duration::from_secs(60),
        "the other keys of the partition handled while one key fails",
        || async {
            effects_of("k1").await + effects_of("k2").await + effects_of("k3").await
                == 3 * PER_KEY as i64
        },
    )
    .await;
    assert_eq!(effects_of("held").await, 0);
    // Long enough for the periodic offset commit (200 ms here) to have run several times.
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    let (stop_b, b) = spawn_kafka_consumer(kafka_source(&group, &t), &dedup, "b");
    wait_until(
        Duration::from_secs(60),
        "the next consumer handles the held key from its first message",
        || async { effects_of("held").await == PER_KEY as i64 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_b.cancel();
    b.await.unwrap().unwrap();
    assert_one_effect_each_in_key_order(&db.pool, KEYS.len() * PER_KEY).await;
    assert_eq!(effects_by(&db.pool, "b").await, PER_KEY as i64);
}

/// Kafka: a consumer that dies after its transaction committed but before its offset was
/// committed. The group's next consumer gets the message again, skips it as a duplicate and
/// commits its offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_crash_between_commit_and_offset_commit_is_skipped_on_redelivery() {
    use rdkafka::{
        consumer::{Consumer as _, StreamConsumer},
        ClientConfig, Message as _, Offset, TopicPartitionList,
    };
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let t = topic("crash");
    Broker::Kafka.consumer().await.declare(&t).await;
    let msg = Message::new(&t, b"order".to_vec())
        .unwrap()
        .with_key("k")
        .unwrap();
    outbox::enqueue(&db.pool, &msg).await.unwrap();
    let relay = start_relay(&Broker::Kafka.settings(&db)).await;
    let group = format!("crash-{t}");

    // First consumer: read, handle (commit), and "crash": gone without committing an offset.
    let partition = {
        let crashing: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        crashing.subscribe(&[&t]).unwrap();
        let m = tokio::time::timeout(Duration::from_secs(30), crashing.recv())
            .await
            .expect("the message never reached the topic")
            .unwrap()
            .detach();
        let first = dedup
            .handle(&outbox_consumer::kafka::incoming(&m), &Recorder::default())
            .await
            .unwrap();
        assert_eq!(first, Outcome::Processed);
        m.partition()
    };
    relay.stop().await;

    // Second consumer in the same group: the message comes again, is skipped, and the group's
    // offset moves past it.
    let (stop, running) = spawn_kafka_consumer(kafka_source(&group, &t), &dedup, "second");
    let offsets: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(&t, partition);
    wait_until(
        Duration::from_secs(30),
        "the redelivery's offset is committed",
        || {
            let committed = offsets
                .committed_offsets(wanted.clone(), Duration::from_secs(5))
                .ok()
                .and_then(|list| list.find_partition(&t, partition).map(|e| e.offset()));
            async move { matches!(committed, Some(Offset::Offset(n)) if n >= 1) }
        },
    )
    .await;
    let committed = offsets
        .committed_offsets(wanted.clone(), Duration::from_secs(5))
        .unwrap()
        .find_partition(&t, partition)
        .map(|e| e.offset());
    assert_eq!(
        committed,
        Some(Offset::Offset(1)),
        "the committed offset is the next one to read (the message was at 0), not beyond it"
    );
    stop.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(
        effects(&db.pool, msg.id()).await,
        1,
        "handled once, skipped on redelivery"
    );
    assert_eq!(
        effects_by(&db.pool, "second").await,
        0,
        "the second consumer applied nothing"
    );
}

/// The README's consumer service is the compiled example, word for word.
#[test]
fn the_readme_shows_the_compiled_consumer_example() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("consumer-lib/examples/mark_paid.rs")).unwrap();
    let body = &example[example.find("use std::sync::Arc;").unwrap()..];
    assert!(
        readme.contains(body),
        "README.md's consumer example differs from consumer-lib/examples/mark_paid.rs"
    );
}

/// Kafka: a partition revoked and assigned back to the same consumer while messages wait
/// behind its full lane (fewer than the reader holds before pausing, so the partition is
/// still fetched). The waiting messages belong to the old lane, which drops them when it
/// closes; the re-assigned partition's messages must start a new lane, not join them, or
/// they are dropped too and later offsets are committed over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_partition_assigned_back_while_its_lane_is_full_loses_nothing() {
    const N: usize = 1000;
    let db = TestDb::new().await;
    let dedup = setup(&db, "reassigned").await;
    let t = topic("reassigned");
    let other = topic("reassigned-other");
    let declaring = Broker::Kafka.consumer().await;
    declaring.declare(&t).await;
    declaring.declare(&other).await;
    produce_outbox_records(&t, (0..N).map(|seq| (0, "p0", seq))).await;

    // The first message is held, so the lane fills and the rest wait in the reader.
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = Arc::new(Gate {
        open: open.clone(),
        stuck_key: "p0",
        inner: Recorder::default(),
    });
    let group = format!("reassigned-{t}");
    let shutdown = CancellationToken::new();
    let source = kafka_source(&group, &t);
    let running = tokio::spawn({
        let (dedup, shutdown) = (dedup.clone(), shutdown.clone());
        async move { source.run(dedup, handler, shutdown).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A member of the same group reading another topic: the group rebalances, and the first
    // consumer, the only one reading `t`, gets partition 0 back while its old lane still
    // holds the gated message.
    let (stop_other, other_member) =
        spawn_kafka_consumer(kafka_source(&group, &other), &dedup, "o");
    tokio::time::sleep(Duration::from_secs(8)).await;
    open.store(true, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(60),
        "every message of the re-assigned partition handled",
        || {
            let pool = db.pool.clone();
            async move { effect_count(&pool).await >= N as i64 }
        },
    )
    .await;
    stop_other.cancel();
    other_member.await.unwrap().unwrap();
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_one_effect_each_in_key_order(&db.pool, N).await;
}
