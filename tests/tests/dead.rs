//! Operator commands for dead messages, through the binary: list, retry (keeping per-key
//! order), discard (keeping the reason).

use std::time::{Duration, Instant};

use outbox::Message;
use outbox_tests::{
    assert_per_key_order, settings, start_relay, topic, Consumer, RelayProcess, TestDb,
};

const WAIT: Duration = Duration::from_secs(20);

async fn cli(db: &TestDb, args: &[&str]) -> (Option<i32>, String) {
    let mut p = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        args,
        &[("OUTBOX__DATABASE__URL", db.url.clone())],
    );
    let status = p.exit(Duration::from_secs(15)).await;
    (status.code(), p.output())
}

async fn wait_dead(db: &TestDb, n: i64) {
    let start = Instant::now();
    while db.count("dead").await < n {
        assert!(start.elapsed() < WAIT, "expected {n} dead messages");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A message dies on a missing queue and blocks its key; once the queue exists, `dead
/// retry` re-queues it and the key's messages arrive in order.
#[tokio::test]
async fn dead_retry_requeues_at_the_head_of_its_key() {
    let db = TestDb::new().await;
    let late_queue = topic("late-queue");
    let good = topic("good");
    let consumer = Consumer::connect().await;
    consumer.queue(&good).await;
    let mut s = settings(&db);
    s.retry.max_attempts = 1;
    let head = Message::new(&late_queue, b"head".to_vec())
        .unwrap()
        .with_key("k")
        .unwrap();
    let behind: Vec<Message> = (0..3)
        .map(|i| Message::new(&good, vec![i]).unwrap().with_key("k").unwrap())
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    outbox::enqueue(&mut *tx, &head).await.unwrap();
    outbox::Outbox::default()
        .enqueue_batch(&mut *tx, &behind)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = start_relay(&s).await;
    wait_dead(&db, 1).await;
    // The relay marks the rows waiting behind the dead one, so its reads step over them.
    let start = Instant::now();
    while db.held_back().await < 3 {
        assert!(
            start.elapsed() < WAIT,
            "the rows behind the dead one were not marked held back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, out) = cli(&db, &["status", "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let status: serde_json::Value =
        serde_json::Deserializer::from_str(&out[out.find("{\n").expect("JSON in the output")..])
            .into_iter()
            .next()
            .unwrap()
            .unwrap();
    assert_eq!(status["total"]["held_back"], 3, "{status}");
    assert_eq!(status["total"]["dead"], 1, "{status}");

    let (code, out) = cli(&db, &["dead", "list", "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let listed: serde_json::Value = serde_json::from_str(&out[out.find('[').unwrap()..]).unwrap();
    assert_eq!(listed[0]["id"], head.id().to_string(), "{listed}");
    assert!(
        listed[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("NO_ROUTE"),
        "{listed}"
    );
    assert!(
        consumer.received().is_empty(),
        "the key's later messages must wait behind its dead head"
    );

    let (code, out) = cli(&db, &["dead", "retry"]).await;
    assert_eq!(
        code,
        Some(1),
        "retry without a selection must refuse: {out}"
    );
    assert!(out.contains("--all"), "{out}");

    consumer.queue(&late_queue).await;
    let (code, out) = cli(&db, &["dead", "retry", "--topic", &late_queue]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("re-queued 1 dead message") && out.contains(&head.id().to_string()),
        "{out}"
    );

    let got = consumer.wait_for(4, WAIT).await;
    relay.stop().await;
    assert_eq!(
        got[0].id,
        head.id(),
        "the re-queued message must come first for its key: {got:?}"
    );
    assert_per_key_order(&got);
    assert_eq!(
        db.count("dead").await + db.count("pending").await,
        0,
        "everything delivered"
    );
}

#[tokio::test]
async fn dead_discard_keeps_the_reason_and_unblocks_the_key() {
    let db = TestDb::new().await;
    let good = topic("good");
    let consumer = Consumer::connect().await;
    consumer.queue(&good).await;
    let mut s = settings(&db);
    s.retry.max_attempts = 1;
    let poison = Message::new(topic("nowhere"), b"p".to_vec())
        .unwrap()
        .with_key("k")
        .unwrap();
    let other_dead = Message::new(topic("nowhere"), b"o".to_vec())
        .unwrap()
        .with_key("other")
        .unwrap();
    let behind = Message::new(&good, b"behind".to_vec())
        .unwrap()
        .with_key("k")
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    for m in [&poison, &other_dead, &behind] {
        outbox::enqueue(&mut *tx, m).await.unwrap();
    }
    tx.commit().await.unwrap();
    let relay = start_relay(&s).await;
    wait_dead(&db, 2).await;

    let (code, out) = cli(
        &db,
        &[
            "dead",
            "discard",
            "--key",
            "k",
            "--reason",
            "payload for a retired service",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("discarded 1 dead message (reason: payload for a retired service)"),
        "{out}"
    );
    let got = consumer.wait_for(1, WAIT).await;
    relay.stop().await;
    assert_eq!(got[0].id, behind.id());

    let (reason, payload): (String, Vec<u8>) =
        sqlx::query_as("SELECT reason, payload FROM outbox.discarded WHERE id = $1")
            .bind(poison.id())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (reason.as_str(), payload.as_slice()),
        ("payload for a retired service", b"p".as_slice())
    );
    assert_eq!(
        db.count("dead").await,
        1,
        "only the selected message was discarded"
    );
    let (code, out) = cli(&db, &["dead", "list"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains(&other_dead.id().to_string()) && out.contains("1 dead message"),
        "{out}"
    );
}
