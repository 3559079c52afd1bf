//! Retention: delivered rows leave the hot table at once; their slim records (when kept)
//! and discarded messages are purged after their windows, in bounded batches.

use std::time::{Duration, Instant};

use outbox_tests::{
    enqueue_all, keyed_messages, relay, settings, start_relay, topic, Consumer, TestDb,
};

async fn count(db: &TestDb, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM outbox.{table}"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Under a sustained stream the hot table holds only what is not yet delivered (its peak is
/// printed, not asserted: speed belongs to benchmarks), the delivered records outlive their
/// rows for the window, then go.
#[tokio::test]
async fn under_load_the_hot_table_stays_small_and_records_expire() {
    const N: usize = 4000;
    let db = TestDb::new().await;
    let t = topic("retention");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let mut s = settings(&db);
    s.retention.delivered = Duration::from_secs(2);
    s.retention.purge_interval = Duration::from_millis(200);
    s.retention.purge_batch = 100; // several statements per purge
    let relay = start_relay(&s).await;

    let mut max_hot = 0;
    for start in (0..N).step_by(200) {
        enqueue_all(&db, &keyed_messages(&t, start..(start + 200).min(N), 20)).await;
        max_hot = max_hot.max(count(&db, "messages").await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    consumer.wait_for(N, Duration::from_secs(60)).await;
    // The broker hands a message to the consumer before the relay's delete commits: give the
    // last batch its moment, then the hot table must be empty.
    let confirmed = Instant::now();
    let mut hot_after = count(&db, "messages").await;
    while hot_after > 0 && confirmed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        hot_after = count(&db, "messages").await;
    }
    let kept = count(&db, "delivered").await;
    assert_eq!(hot_after, 0, "delivered rows must leave the hot table");
    assert!(kept > 0, "delivered records are kept for the window");

    let start = Instant::now();
    while count(&db, "delivered").await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "delivered records outlived their window"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
    println!(
        "hot table peaked at {max_hot} rows; {kept} delivered records purged after the 2 s window"
    );
}

#[tokio::test]
async fn purge_removes_only_records_past_their_window() {
    let db = TestDb::new().await;
    let mut s = settings(&db);
    s.retention.delivered = Duration::from_secs(3600);
    s.retention.discarded = Duration::from_secs(30 * 24 * 3600);
    s.retention.purge_batch = 7;
    for (age, n) in [("2 hours", 20), ("10 minutes", 5)] {
        sqlx::query(&format!(
            "INSERT INTO outbox.delivered (id, seq, topic, created_at, delivered_at, attempts)
             SELECT gen_random_uuid(), g, 't', now(), now() - interval '{age}', 0 FROM generate_series(1, {n}) g"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    for (age, n) in [("40 days", 9), ("1 day", 2)] {
        sqlx::query(&format!(
            "INSERT INTO outbox.discarded (id, seq, topic, payload, headers, created_at, attempts, discarded_at, reason)
             SELECT gen_random_uuid(), g, 't', '', '{{}}', now(), 1, now() - interval '{age}', 'r' FROM generate_series(1, {n}) g"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let relay = relay(&s).await;
    let purged = relay.purge().await.unwrap();
    assert_eq!(purged, (20, 9), "only records past their window go");
    assert_eq!(
        (count(&db, "delivered").await, count(&db, "discarded").await),
        (5, 2)
    );
}
