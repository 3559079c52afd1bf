//! The relay's guarantees against real PostgreSQL, RabbitMQ and Kafka: each guarantee test
//! runs once per broker (`rabbitmq::…`, `kafka::…`).

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use outbox::{Message, Outbox};
use outbox_relay::config::DeadKeyPolicy;
use outbox_tests::{
    assert_per_key_order, first_arrivals_by_key, for_each_broker, settings, start_relay, topic,
    with_policy, Broker, Consumer, TestDb,
};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

async fn committed_messages_arrive_once_intact_and_rolled_back_ones_never(b: Broker) {
    let db = TestDb::new().await;
    let t = topic("intact");
    let consumer = b.consumer().await;
    consumer.queue(&t).await;

    let binary: Vec<u8> = (0..=255u8).rev().collect(); // not UTF-8
    let committed = vec![
        Message::new(&t, binary.clone())
            .unwrap()
            .with_key("k1")
            .unwrap()
            .with_header("traceparent", "00-abc-def-01")
            .unwrap(),
        Message::json(&t, &serde_json::json!({"n": 2})).unwrap(),
        Message::new(&t, Vec::new())
            .unwrap()
            .with_key("k1")
            .unwrap()
            .with_content_type("text/plain")
            .unwrap(),
    ];
    let rolled_back = [
        Message::new(&t, b"never".to_vec()).unwrap(),
        Message::new(&t, b"never".to_vec()).unwrap(),
    ];

    let mut tx = db.pool.begin().await.unwrap();
    for m in &rolled_back {
        outbox::enqueue(&mut *tx, m).await.unwrap();
    }
    tx.rollback().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    Outbox::default()
        .enqueue_batch(&mut *tx, &committed)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = start_relay(&b.settings(&db)).await;
    consumer.wait_for(committed.len(), WAIT).await;
    let got = consumer.settle(Duration::from_millis(500)).await;
    relay.stop().await;

    assert_eq!(
        got.len(),
        committed.len(),
        "each committed message once, nothing else: {got:#?}"
    );
    for m in &committed {
        let r = got
            .iter()
            .find(|r| r.id == m.id())
            .unwrap_or_else(|| panic!("message {} never arrived", m.id()));
        assert_eq!(r.payload, m.payload(), "payload of {}", m.id());
        assert_eq!(r.key.as_deref(), m.key(), "key of {}", m.id());
        assert_eq!(
            r.message_id,
            Some(m.id().to_string()),
            "message-id property of {}",
            m.id()
        );
        assert_eq!(
            r.content_type.as_deref(),
            m.content_type(),
            "content type of {}",
            m.id()
        );
        assert_eq!(r.topic, t);
        if b == Broker::RabbitMq {
            assert_eq!(
                r.delivery_mode,
                Some(2),
                "persistent delivery of {}",
                m.id()
            );
        }
        for (name, value) in m.headers() {
            assert_eq!(
                r.headers.get(name),
                Some(value),
                "header {name} of {}",
                m.id()
            );
        }
    }
    let rolled: HashSet<Uuid> = rolled_back.iter().map(Message::id).collect();
    assert!(
        got.iter().all(|r| !rolled.contains(&r.id)),
        "a rolled-back message arrived"
    );
    assert_eq!(db.count("pending").await, 0, "delivered rows are deleted");
}

async fn a_lower_seq_that_commits_later_is_still_delivered(b: Broker) {
    let db = TestDb::new().await;
    let t = topic("late");
    let consumer = b.consumer().await;
    consumer.queue(&t).await;
    let relay = start_relay(&b.settings(&db)).await;

    let early = Message::new(&t, b"A".to_vec()).unwrap();
    let late = Message::new(&t, b"B".to_vec()).unwrap();
    let mut tx_a = db.pool.begin().await.unwrap();
    let a = outbox::enqueue(&mut *tx_a, &early).await.unwrap();
    let mut tx_b = db.pool.begin().await.unwrap();
    let b = outbox::enqueue(&mut *tx_b, &late).await.unwrap();
    assert!(a.seq < b.seq);
    tx_b.commit().await.unwrap();
    let got = consumer.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].id,
        late.id(),
        "B (seq {}) should be relayed while A is open",
        b.seq
    );

    tx_a.commit().await.unwrap();
    let got = consumer.wait_for(2, WAIT).await;
    relay.stop().await;
    assert_eq!(
        got[1].id,
        early.id(),
        "A (seq {}) committed after B (seq {}) and must still arrive",
        a.seq,
        b.seq
    );
}

async fn per_key_order_holds_under_a_steady_interleaved_stream_with_two_relays(b: Broker) {
    const KEYS: usize = 24;
    const PER_KEY: usize = 40;
    let db = TestDb::new().await;
    let t = topic("order");
    let consumer = b.consumer().await;
    consumer.queue(&t).await;
    let mut s = b.settings(&db);
    s.relay.batch_size = 25;
    let relays = [start_relay(&s).await, start_relay(&s).await];

    // Four producers, each owning six keys and writing them interleaved, one message per
    // transaction; a key's writes are serialised by its producer.
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (pool, t) = (db.pool.clone(), t.clone());
            tokio::spawn(async move {
                for i in 0..PER_KEY {
                    for k in (p..KEYS).step_by(4) {
                        let msg = Message::new(&t, format!("{k}:{i}").into_bytes())
                            .unwrap()
                            .with_key(format!("key-{k}"))
                            .unwrap();
                        let mut tx = pool.begin().await.unwrap();
                        outbox::enqueue(&mut *tx, &msg).await.unwrap();
                        tx.commit().await.unwrap();
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    // Two relays may both publish a message while partitions change hands at start-up:
    // count distinct messages, not arrivals.
    let got = consumer
        .wait_for_distinct(KEYS * PER_KEY, Duration::from_secs(60))
        .await;
    for r in relays {
        r.stop().await;
    }
    assert_per_key_order(&got);
    let by_key = first_arrivals_by_key(&got);
    assert_eq!(by_key.len(), KEYS);
    for (key, seqs) in by_key {
        assert_eq!(seqs.len(), PER_KEY, "key {key} is missing messages");
    }
    // The payload says which write of its key it was: check it against arrival order too.
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = HashSet::new();
    for r in got.iter().filter(|r| seen.insert(r.id)) {
        let text = String::from_utf8(r.payload.clone()).unwrap();
        let i: usize = text.split(':').nth(1).unwrap().parse().unwrap();
        let expected = next.entry(r.key.clone().unwrap()).or_default();
        assert_eq!(
            i, *expected,
            "key {:?}: write {i} arrived when write {expected} was due",
            r.key
        );
        *expected += 1;
    }
}

/// A message the broker refuses (RabbitMQ: unroutable, retried with backoff; Kafka: too
/// large, permanent) ends dead with the broker's reason, while other keys keep flowing and a
/// later message of its key waits behind it (`block` policy).
async fn a_poison_message_dies_with_the_brokers_reason_while_others_flow_and_its_key_waits(
    b: Broker,
) {
    let db = TestDb::new().await;
    let good = topic("good");
    let consumer = b.consumer().await;
    consumer.queue(&good).await;
    let mut s = b.settings(&db);
    s.retry.initial_delay = Duration::from_millis(200);
    s.retry.factor = 2.0;
    s.retry.max_delay = Duration::from_secs(1);
    s.retry.max_attempts = 3;

    let (poison, reason) = b.poison("stuck");
    if b == Broker::Kafka {
        consumer.queue(poison.topic()).await; // the topic exists; the message is what is wrong
    }
    let behind = Message::new(&good, b"behind".to_vec())
        .unwrap()
        .with_key("stuck")
        .unwrap();
    let others: Vec<Message> = (0..20)
        .map(|i| {
            Message::new(&good, vec![i])
                .unwrap()
                .with_key(format!("free-{i}"))
                .unwrap()
        })
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &poison).await.unwrap();
    outbox::enqueue(&mut *tx, &behind).await.unwrap();
    Outbox::default()
        .enqueue_batch(&mut *tx, &others)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let started = Instant::now();
    let relay = start_relay(&s).await;
    let got = consumer.wait_for(others.len(), WAIT).await;
    assert!(
        got.iter().all(|r| r.id != behind.id()),
        "a message overtook its key's failing head"
    );

    let died_after = loop {
        let row: (String, i32, Option<String>) = sqlx::query_as(
            "SELECT status, attempts, last_error FROM outbox.messages WHERE id = $1",
        )
        .bind(poison.id())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if row.0 == "dead" {
            assert_eq!(row.1, b.poison_attempts(3), "attempts when it died");
            let err = row.2.unwrap();
            assert!(
                err.contains(reason) && err.contains(poison.topic()),
                "last_error should carry the broker's reason ({reason}) and the destination: {err}"
            );
            break started.elapsed();
        }
        assert!(
            started.elapsed() < WAIT,
            "poison message never died: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if b == Broker::RabbitMq {
        // Three attempts with 200 ms and 400 ms of backoff between them.
        assert!(
            died_after >= Duration::from_millis(600),
            "retries must back off (died after {died_after:?})"
        );
    }

    let got = consumer.settle(Duration::from_millis(800)).await;
    relay.stop().await;
    assert!(
        got.iter()
            .all(|r| r.id != behind.id() && r.id != poison.id()),
        "with dead_key_policy=block, the key's next message must wait"
    );
    assert_eq!(db.count("dead").await, 1);
    assert_eq!(
        db.count("pending").await,
        1,
        "the blocked message is still pending"
    );
}

async fn with_skip_policy_a_key_moves_past_its_dead_message(b: Broker) {
    let db = TestDb::new().await;
    let good = topic("good");
    let consumer = b.consumer().await;
    consumer.queue(&good).await;
    let mut s = with_policy(b.settings(&db), DeadKeyPolicy::Skip);
    s.retry.max_attempts = 2;
    let (poison, _) = b.poison("k");
    if b == Broker::Kafka {
        consumer.queue(poison.topic()).await;
    }
    let behind = Message::new(&good, b"behind".to_vec())
        .unwrap()
        .with_key("k")
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &poison).await.unwrap();
    outbox::enqueue(&mut *tx, &behind).await.unwrap();
    tx.commit().await.unwrap();

    let relay = start_relay(&s).await;
    let got = consumer.wait_for(1, WAIT).await;
    relay.stop().await;
    assert_eq!(got[0].id, behind.id());
    let status: String = sqlx::query_scalar("SELECT status FROM outbox.messages WHERE id = $1")
        .bind(poison.id())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        status, "dead",
        "the message behind may only pass once its head is dead"
    );
}

/// The documented plain-SQL insert, read from the README, is relayed like a library write.
async fn the_documented_plain_sql_insert_is_relayed(b: Broker) {
    let sql = outbox_tests::readme_sql("insert");
    let sql = sql.as_str();

    let db = TestDb::new().await;
    let t = topic("plain");
    let consumer = b.consumer().await;
    consumer.queue(&t).await;
    let id = Uuid::new_v4();
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(sql)
        .bind(id)
        .bind(&t)
        .bind("order-7")
        .bind(br#"{"order":7}"#.to_vec())
        .bind(r#"{"traceparent":"00-1-2-01"}"#)
        .bind("application/json")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = start_relay(&b.settings(&db)).await;
    let got = consumer.wait_for(1, WAIT).await;
    relay.stop().await;
    let r = &got[0];
    assert_eq!(
        (r.id, r.key.as_deref(), r.payload.as_slice()),
        (id, Some("order-7"), br#"{"order":7}"#.as_slice())
    );
    assert_eq!(
        r.headers.get("traceparent").map(String::as_str),
        Some("00-1-2-01")
    );
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
}

/// A plain-SQL writer can put the relay's own header names in `headers` (the Rust API
/// refuses them). The wire carries exactly one of each, with the relay's value: a consumer
/// never deduplicates on a forged id, and Kafka, which keeps duplicate names, gets none.
async fn reserved_headers_written_in_sql_are_the_relays_on_the_wire(b: Broker) {
    let db = TestDb::new().await;
    let t = topic("forged");
    let consumer = b.consumer().await;
    consumer.queue(&t).await;
    let forged = Uuid::new_v4();
    let id = Uuid::new_v4();
    let headers = serde_json::json!({
        "outbox-id": forged.to_string(),
        "outbox-key": "someone-else",
        "outbox-topic": "elsewhere",
        "Outbox-Seq": "1",
        "content-type": "text/forged",
        "traceparent": "00-1-2-01",
    });
    sqlx::query(&outbox_tests::readme_sql("insert"))
        .bind(id)
        .bind(&t)
        .bind("order-9")
        .bind(b"x".to_vec())
        .bind(headers.to_string())
        .bind("application/json")
        .execute(&db.pool)
        .await
        .unwrap();
    let relay = start_relay(&b.settings(&db)).await;
    let got = consumer.wait_for(1, WAIT).await;
    relay.stop().await;
    let r = &got[0];
    assert_eq!(
        (r.id, r.key.as_deref(), r.topic.as_str()),
        (id, Some("order-9"), t.as_str()),
        "the relay's values, not the row's forged ones"
    );
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        r.headers.get("traceparent").map(String::as_str),
        Some("00-1-2-01")
    );
    let mut names: Vec<String> = r.header_names.iter().map(|n| n.to_lowercase()).collect();
    names.sort();
    let mut once = names.clone();
    once.dedup();
    assert_eq!(
        names, once,
        "a header name came twice: {:?}",
        r.header_names
    );
    for name in ["outbox-id", "outbox-key", "outbox-topic", "outbox-seq"] {
        assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
    }
}

/// Per-topic routes and the default templates decide the exchange and routing key.
#[tokio::test]
async fn routes_map_topics_to_exchanges_and_routing_keys() {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
    let db = TestDb::new().await;
    let exchange = format!("x.{}", Uuid::new_v4().simple());
    let queue = topic("routed");
    let consumer = Consumer::connect().await;
    consumer.queue(&queue).await;
    let ch = consumer.channel();
    ch.exchange_declare(
        &exchange,
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        &queue,
        &exchange,
        "invoice.#",
        QueueBindOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();

    let mut s = settings(&db);
    let route = outbox_relay::config::RouteSettings {
        exchange: exchange.clone(),
        routing_key: "invoice.{key}".into(),
    };
    s.rabbitmq.routes.insert("billing".into(), route);
    let msg = Message::new("billing", b"inv".to_vec())
        .unwrap()
        .with_key("c-9")
        .unwrap();
    outbox::enqueue(&db.pool, &msg).await.unwrap();
    let relay = start_relay(&s).await;
    let got = consumer.wait_for(1, WAIT).await;
    relay.stop().await;
    assert_eq!(got[0].id, msg.id());
    assert_eq!(got[0].routing_key, "invoice.c-9");
    assert_eq!(got[0].exchange, exchange);
}

/// An idle relay registers as a waiter; an insert then wakes it through NOTIFY long before
/// its poll interval.
#[tokio::test]
async fn an_idle_relay_is_woken_by_notify_not_by_polling() {
    let db = TestDb::new().await;
    let t = topic("wake");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let mut s = settings(&db);
    s.relay.poll_interval = Duration::from_secs(30);
    let relay = start_relay(&s).await;
    wait_for_waiter(&db).await;
    let sent = Instant::now();
    outbox::enqueue(&db.pool, &Message::new(&t, vec![]).unwrap())
        .await
        .unwrap();
    consumer.wait_for(1, Duration::from_secs(10)).await;
    let took = sent.elapsed();
    relay.stop().await;
    assert!(
        took < Duration::from_secs(5),
        "arrived after {took:?}: woken by the 30 s poll, not by NOTIFY"
    );
}

/// A relay that keeps finding rows does not register for wake-ups: it looks again within
/// milliseconds anyway, and while it is registered every producer's commit sends a NOTIFY,
/// which PostgreSQL serializes. Only a relay whose last read found nothing waits for one.
#[tokio::test]
async fn a_relay_busy_with_a_steady_stream_does_not_make_producers_notify() {
    let db = TestDb::new().await;
    let t = topic("steady");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let relay = start_relay(&settings(&db)).await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("outbox_wakeup_outbox").await.unwrap();

    // 4 producers, one commit every 10 ms each, staggered: one new row per 2.5 ms, so every
    // look the relay takes finds rows.
    const PRODUCERS: usize = 4;
    const EACH: usize = 150;
    let start = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (pool, t) = (db.pool.clone(), t.clone());
            tokio::spawn(async move {
                for i in 0..EACH {
                    let at = Duration::from_micros(2_500) * (p + PRODUCERS * i) as u32;
                    tokio::time::sleep_until((start + at).into()).await;
                    let m = Message::new(&t, vec![b'x'; 64])
                        .unwrap()
                        .with_key(format!("p{p}"))
                        .unwrap();
                    outbox::enqueue(&pool, &m).await.unwrap();
                }
            })
        })
        .collect();
    let mut notified = 0usize;
    let counting = async {
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(3), listener.recv()).await {
            notified += 1;
        }
    };
    let ((), ()) = tokio::join!(counting, async {
        for p in producers {
            p.await.unwrap();
        }
    });
    consumer.wait_for(PRODUCERS * EACH, WAIT).await;
    relay.stop().await;
    // The relay may be waiting when the stream starts, and a stalled commit (a slow disk
    // flush) can leave one read empty: a few wake-ups are fair, one per commit is not.
    assert!(
        notified <= PRODUCERS * EACH / 10,
        "{notified} of {} commits sent a NOTIFY while the relay was busy with them",
        PRODUCERS * EACH
    );
}

/// Inserts notify only while a relay waits, so busy systems do not pay NOTIFY's commit lock.
#[tokio::test]
async fn inserts_notify_only_while_a_relay_waits() {
    let db = TestDb::new().await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("outbox_wakeup_outbox").await.unwrap();
    outbox::enqueue(&db.pool, &Message::new("t", vec![]).unwrap())
        .await
        .unwrap();
    let none = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(
        none.is_err(),
        "an insert with no waiting relay sent a NOTIFY"
    );

    sqlx::query("INSERT INTO outbox.relay_waiters VALUES ($1, now() + interval '1 minute')")
        .bind(Uuid::new_v4())
        .execute(&db.pool)
        .await
        .unwrap();
    outbox::enqueue(&db.pool, &Message::new("t", vec![]).unwrap())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(
        matches!(got, Ok(Ok(_))),
        "an insert with a waiting relay sent no NOTIFY: {got:?}"
    );
}

/// The wake-up is decided at commit, not at insert: a relay that registers as idle while a
/// producer's transaction is open is still woken by that transaction's commit.
#[tokio::test]
async fn a_relay_that_registers_during_a_producers_transaction_is_woken_by_its_commit() {
    let db = TestDb::new().await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("outbox_wakeup_outbox").await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    for _ in 0..3 {
        outbox::Outbox::default()
            .enqueue(&mut *tx, &Message::new("t", vec![]).unwrap())
            .await
            .unwrap();
    }
    // No relay waits while the rows are inserted; one registers before the commit.
    sqlx::query("INSERT INTO outbox.relay_waiters VALUES ($1, now() + interval '1 minute')")
        .bind(Uuid::new_v4())
        .execute(&db.pool)
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(200), listener.recv()).await;
    assert!(early.is_err(), "nothing is sent before the commit");
    tx.commit().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(
        matches!(got, Ok(Ok(_))),
        "a commit after a relay registered sent no NOTIFY: {got:?}"
    );
}

/// A transaction's rows run the wake-up's commit-time decision once, not once per row
/// (schema version 6): the trigger queues its event for the first row only, however many rows
/// and statements follow. Counted by PostgreSQL's own per-transaction function statistics,
/// with the queued events run in the transaction by `SET CONSTRAINTS ... IMMEDIATE`.
#[tokio::test]
async fn a_transactions_rows_run_the_wake_up_once() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::raw_sql("SET LOCAL track_functions = 'pl'")
        .execute(&mut *tx)
        .await
        .unwrap();
    for _ in 0..50 {
        outbox::enqueue(&mut *tx, &Message::new("t", vec![]).unwrap())
            .await
            .unwrap();
    }
    sqlx::raw_sql(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT 't', 'k' || g, '\\x00' FROM generate_series(1, 50) g",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::raw_sql("SET CONSTRAINTS outbox.messages_wake_relays IMMEDIATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let calls: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_xact_user_functions
         WHERE schemaname = 'outbox' AND funcname = 'wake_relays'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        calls, 1,
        "100 rows in one transaction ran the wake-up trigger {calls} times"
    );
}

/// The first row's queued wake-up goes with its savepoint when that is rolled back, and the
/// transaction's next row queues it again: a waiting relay is still woken by the commit.
#[tokio::test]
async fn a_wake_up_rolled_back_with_its_savepoint_is_queued_by_the_next_row() {
    let db = TestDb::new().await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("outbox_wakeup_outbox").await.unwrap();
    sqlx::query("INSERT INTO outbox.relay_waiters VALUES ($1, now() + interval '1 minute')")
        .bind(Uuid::new_v4())
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::raw_sql("SAVEPOINT first")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox::enqueue(&mut *tx, &Message::new("t", vec![]).unwrap())
        .await
        .unwrap();
    sqlx::raw_sql("ROLLBACK TO SAVEPOINT first")
        .execute(&mut *tx)
        .await
        .unwrap();
    let kept = Message::new("t", vec![]).unwrap();
    outbox::enqueue(&mut *tx, &kept).await.unwrap();
    tx.commit().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(
        matches!(got, Ok(Ok(_))),
        "a commit whose first row was rolled back to a savepoint sent no NOTIFY: {got:?}"
    );
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(pending, 1, "only the row after the savepoint is committed");
}

for_each_broker!(
    committed_messages_arrive_once_intact_and_rolled_back_ones_never,
    a_lower_seq_that_commits_later_is_still_delivered,
    per_key_order_holds_under_a_steady_interleaved_stream_with_two_relays,
    a_poison_message_dies_with_the_brokers_reason_while_others_flow_and_its_key_waits,
    with_skip_policy_a_key_moves_past_its_dead_message,
    the_documented_plain_sql_insert_is_relayed,
    reserved_headers_written_in_sql_are_the_relays_on_the_wire,
);

/// Waits until a relay on `db` has gone idle and registered for wake-ups.
async fn wait_for_waiter(db: &TestDb) {
    let start = Instant::now();
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM outbox.relay_waiters WHERE expires_at > now()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
        == 0
    {
        assert!(
            start.elapsed() < WAIT,
            "the idle relay never registered as a waiter"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A producer under two-phase commit (an XA/JTA transaction manager) prepares its
/// transaction while a relay waits for wake-ups: PostgreSQL refuses to PREPARE a transaction
/// that ran NOTIFY, so the producer turns the wake-up off (`Outbox::skip_wakeup`, or
/// `SET LOCAL outbox.wakeup = 'off'` in plain SQL), and polling delivers the message once
/// `COMMIT PREPARED` makes it visible.
#[tokio::test]
async fn a_two_phase_commit_producer_can_write_while_a_relay_waits() {
    let db = TestDb::new().await;
    let t = topic("xa");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let relay = start_relay(&settings(&db)).await;
    wait_for_waiter(&db).await;

    let library = Message::new(&t, b"library".to_vec()).unwrap();
    let plain_sql = Message::new(&t, b"plain".to_vec()).unwrap();
    for (msg, how) in [(&library, "skip_wakeup"), (&plain_sql, "SET LOCAL")] {
        let gid = format!("outbox-test-{}", Uuid::new_v4().simple());
        let mut conn = db.pool.acquire().await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
        outbox::enqueue(&mut *conn, msg).await.unwrap();
        if how == "skip_wakeup" {
            Outbox::default().skip_wakeup(&mut *conn).await.unwrap();
        } else {
            sqlx::raw_sql("SET LOCAL outbox.wakeup = 'off'")
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        sqlx::raw_sql(&format!("PREPARE TRANSACTION '{gid}'"))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("PREPARE TRANSACTION with the wake-up off ({how}): {e}"));
        drop(conn);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            consumer.received().iter().all(|r| r.id != msg.id()),
            "a prepared, uncommitted message ({how}) was published"
        );
        sqlx::raw_sql(&format!("COMMIT PREPARED '{gid}'"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let got = consumer.wait_for(2, WAIT).await;
    relay.stop().await;
    let ids: HashSet<Uuid> = got.iter().map(|r| r.id).collect();
    assert_eq!(ids, HashSet::from([library.id(), plain_sql.id()]));
}
