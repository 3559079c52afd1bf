//! Several relay processes on one outbox: one is killed with SIGKILL mid-stream; the other
//! takes its partitions over within the lease, nothing is lost and per-key order holds. And
//! planned changes (a relay joining, a rolling restart) publish no duplicates.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use outbox::Message;
use outbox_tests::{amqp_url, assert_per_key_order, topic, Consumer, RelayProcess, TestDb};
use uuid::Uuid;

async fn owners(db: &TestDb) -> Vec<(Uuid, i64)> {
    sqlx::query_as(
        "SELECT owner, count(*) FROM outbox.partitions
         WHERE owner IS NOT NULL AND lease_until > now() GROUP BY owner ORDER BY owner",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Writes message `from`, `from + 1`, … (key `k{i % keys}`) to `t`, one per transaction every
/// 5 ms, until `stop`; returns their ids.
fn steady_stream(
    db: &TestDb,
    t: &str,
    from: usize,
    keys: usize,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Uuid>> {
    let (pool, t, stop) = (db.pool.clone(), t.to_owned(), stop.clone());
    tokio::spawn(async move {
        let mut written = Vec::new();
        let mut i = from;
        while !stop.load(Ordering::Relaxed) {
            let msg = Message::new(&t, i.to_string().into_bytes())
                .unwrap()
                .with_key(format!("k{}", i % keys))
                .unwrap();
            outbox::enqueue(&pool, &msg).await.unwrap();
            written.push(msg.id());
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        written
    })
}

#[tokio::test]
async fn a_killed_relay_is_taken_over_within_its_lease_without_loss() {
    let db = TestDb::new().await;
    let t = topic("failover");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let lease = Duration::from_secs(2);
    let env = vec![
        ("OUTBOX__DATABASE__URL", db.url.clone()),
        ("OUTBOX__RABBITMQ__URL", amqp_url()),
        ("OUTBOX__RELAY__LEASE", "2s".to_owned()),
        ("OUTBOX__RELAY__POLL_INTERVAL", "100ms".to_owned()),
    ];
    let bin = env!("CARGO_BIN_EXE_outbox-relay-under-test");
    let mut a = RelayProcess::spawn(bin, &["run"], &env);
    let mut b = RelayProcess::spawn(bin, &["run"], &env);
    let start = Instant::now();
    while owners(&db).await.iter().map(|o| o.1).collect::<Vec<_>>() != [32, 32] {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "relays never split the partitions: {:?}",
            owners(&db).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A steady stream over 128 keys, one message per transaction.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = steady_stream(&db, &t, 0, 128, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;

    a.kill();
    let killed = Instant::now();
    // B alone is left: wait until it holds everything.
    let takeover = loop {
        let o = owners(&db).await;
        if o.len() == 1 && o[0].1 == 64 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no takeover after {:?}: {o:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let written = producer.await.unwrap();
    let got = consumer
        .wait_for_distinct(written.len(), Duration::from_secs(30))
        .await;
    b.terminate();
    assert!(
        b.exit(Duration::from_secs(30)).await.success(),
        "{}",
        b.output()
    );
    let _ = a.exit(Duration::from_secs(5)).await;

    let arrived: std::collections::HashSet<Uuid> = got.iter().map(|r| r.id).collect();
    let lost: Vec<_> = written.iter().filter(|id| !arrived.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} messages lost",
        lost.len(),
        written.len()
    );
    assert_per_key_order(&got);
    // The lease is 2 s and renewals come every third of it, so a takeover needs at most
    // lease + lease/3, plus the time for this test to notice.
    assert!(
        takeover <= lease + lease / 3 + Duration::from_millis(700),
        "takeover took {takeover:?}"
    );
    println!(
        "killed one of two relays: takeover after {takeover:?} (lease {lease:?}); {} messages, {} arrivals ({} duplicates)",
        written.len(),
        got.len(),
        got.len() - arrived.len()
    );
}

/// Planned changes hand a partition over only once the rows read from it are settled: a
/// relay joining while another drains a backlog (scale-up), then a rolling restart (SIGTERM,
/// a new process in its place), publish no message twice.
#[tokio::test]
async fn scale_up_and_a_rolling_restart_publish_no_duplicates() {
    const BACKLOG: usize = 20_000;
    let db = TestDb::new().await;
    let t = topic("handover");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let env = vec![
        ("OUTBOX__DATABASE__URL", db.url.clone()),
        ("OUTBOX__RABBITMQ__URL", amqp_url()),
        ("OUTBOX__RELAY__LEASE", "2s".to_owned()),
        ("OUTBOX__RELAY__POLL_INTERVAL", "100ms".to_owned()),
    ];
    let bin = env!("CARGO_BIN_EXE_outbox-relay-under-test");
    let split = |want: &'static [i64]| {
        let db = &db;
        async move {
            let start = Instant::now();
            loop {
                let o = owners(db).await;
                if o.iter().map(|o| o.1).collect::<Vec<_>>() == want {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "partitions never split as {want:?}: {o:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // A backlog over 1,000 keys, so that a relay always has a full window of rows in hand.
    let mut written: Vec<Uuid> = Vec::new();
    for chunk in (0..BACKLOG).collect::<Vec<_>>().chunks(1_000) {
        let msgs: Vec<Message> = chunk
            .iter()
            .map(|i| {
                Message::new(&t, i.to_string().into_bytes())
                    .unwrap()
                    .with_key(format!("k{}", i % 1_000))
                    .unwrap()
            })
            .collect();
        outbox::Outbox::default()
            .enqueue_batch(&db.pool, &msgs)
            .await
            .unwrap();
        written.extend(msgs.iter().map(Message::id));
    }
    let mut a = RelayProcess::spawn(bin, &["run"], &env);
    split(&[64]).await;
    // And a steady stream on top, one message per transaction.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = steady_stream(&db, &t, BACKLOG, 1_000, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Scale-up: B joins while A has a full window of rows in hand.
    let mut b = RelayProcess::spawn(bin, &["run"], &env);
    split(&[32, 32]).await;
    let backlog_left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Rolling restart: A stops (SIGTERM), C takes its place.
    a.terminate();
    assert!(
        a.exit(Duration::from_secs(30)).await.success(),
        "{}",
        a.output()
    );
    let mut c = RelayProcess::spawn(bin, &["run"], &env);
    split(&[32, 32]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    written.extend(producer.await.unwrap());

    consumer
        .wait_for_distinct(written.len(), Duration::from_secs(120))
        .await;
    // Late duplicates would arrive now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = consumer.received();
    for r in [&mut b, &mut c] {
        r.terminate();
        assert!(
            r.exit(Duration::from_secs(30)).await.success(),
            "{}",
            r.output()
        );
    }
    let arrived: std::collections::HashSet<Uuid> = got.iter().map(|r| r.id).collect();
    let lost = written.iter().filter(|id| !arrived.contains(id)).count();
    assert_eq!(lost, 0, "{lost} of {} messages lost", written.len());
    assert_per_key_order(&got);
    let duplicates = got.len() - arrived.len();
    println!(
        "scale-up with {backlog_left} rows left, then a rolling restart: {} messages, {} arrivals, {duplicates} duplicates",
        written.len(),
        got.len()
    );
    assert!(
        backlog_left > 0,
        "the backlog was drained before the second relay joined: nothing was handed over mid-stream"
    );
    assert_eq!(
        duplicates, 0,
        "planned handovers published {duplicates} messages twice"
    );
}
