//! `outbox-relay reconcile`: the outbox and a consumer group in two databases, compared under
//! a role with only the README's grants. A clean run exits 0 and reports nothing; then one
//! discrepancy of each kind is planted, and each is reported, nothing else is, and the exit
//! code says so. A comparison that cannot be made exits 2.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, FutureExt};
use outbox::Message;
use outbox_consumer::{
    rabbitmq::RabbitMqSource, DeadLetters, Deduplicator, Handler, HandlerError, Incoming,
    LetterFilter, Outcome,
};
use outbox_tests::{
    amqp_url, enqueue_all, settings, start_relay, topic, Broker, Consumer, RelayProcess, TestDb,
};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Ships a book per message; a payload of `poison` can never be handled.
struct Ship;

impl Handler for Ship {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if m.payload == b"poison" {
                return Err(HandlerError::permanent("no such book"));
            }
            sqlx::query("INSERT INTO shipments (message_id, replay) VALUES ($1, $2)")
                .bind(m.message_id)
                .bind(m.is_replay())
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
            Ok(())
        })
    }
}

async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

fn as_role(url: &str, role: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_username(role).unwrap();
    u.set_password(Some("pw")).unwrap();
    u.to_string()
}

/// A login role with nothing but the README's reconciliation grants, on both databases.
async fn reconciler(outbox: &TestDb, consumer: &TestDb) -> String {
    let role = format!("reconcile_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .execute(&outbox.pool)
        .await
        .unwrap();
    for (db, block) in [
        (outbox, "reconcile-grants"),
        (consumer, "reconcile-consumer-grants"),
    ] {
        sqlx::raw_sql(&outbox_tests::readme_sql(block).replace("outbox_reconciler", &role))
            .execute(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("the README's {block} apply: {e}"));
    }
    role
}

async fn reconcile(outbox_url: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["reconcile"];
    all.extend_from_slice(args);
    let mut p = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        &all,
        &[("OUTBOX__DATABASE__URL", outbox_url.to_owned())],
    );
    let status = p.exit(Duration::from_secs(30)).await;
    (status.code(), p.output())
}

fn json(out: &str) -> Value {
    serde_json::from_str(&out[out.find('{').unwrap_or_else(|| panic!("no JSON: {out}"))..])
        .unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Every finding's count, by kind.
fn counts(report: &Value) -> BTreeMap<&'static str, u64> {
    ["dead", "pending", "unprocessed", "unknown", "dead_letters"]
        .into_iter()
        .map(|k| (k, report[k]["count"].as_u64().unwrap()))
        .collect()
}

/// An outbox; a consumer database with the `warehouse` group and its `shipments` table; and
/// a login role with the README's reconciliation grants on both.
async fn warehouse() -> (TestDb, TestDb, Deduplicator, String) {
    let outbox = TestDb::new().await;
    let consumer_db = TestDb::empty().await;
    sqlx::query("CREATE TABLE shipments (message_id uuid, replay boolean)")
        .execute(&consumer_db.pool)
        .await
        .unwrap();
    let dedup = Deduplicator::new(consumer_db.pool.clone(), "warehouse").unwrap();
    dedup.migrate().await.unwrap();
    let role = reconciler(&outbox, &consumer_db).await;
    (outbox, consumer_db, dedup, role)
}

#[tokio::test]
async fn each_planted_discrepancy_is_reported_once_and_nothing_else() {
    let (outbox, consumer_db, dedup, role) = warehouse().await;
    let outbox_url = as_role(&outbox.url, &role);
    let consumer_url = as_role(&consumer_db.url, &role);

    let ship = topic("ship");
    Consumer::connect().await.declare(&ship).await;
    let shutdown = CancellationToken::new();
    let source = tokio::spawn({
        let (dedup, shutdown) = (dedup.clone(), shutdown.clone());
        let source = RabbitMqSource::new(amqp_url(), &ship);
        async move { source.run(dedup, Arc::new(Ship), shutdown).await }
    });
    let mut s = settings(&outbox);
    s.retention.delivered = Duration::from_secs(3600);
    s.retry.max_attempts = 1;
    let relay = start_relay(&s).await;
    let books: Vec<Message> = (0..5)
        .map(|i| {
            Message::new(&ship, format!("book {i}").into_bytes())
                .unwrap()
                .with_key(format!("order-{i}"))
                .unwrap()
        })
        .collect();
    enqueue_all(&outbox, &books).await;
    wait_until("five shipments", || async {
        count(&consumer_db.pool, "SELECT count(*) FROM shipments").await == 5
    })
    .await;

    // Clean: exit 0, nothing reported; the group and its topic were found by themselves.
    let (code, out) = reconcile(&outbox_url, &["--consumer-db", &consumer_url, "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let report = json(&out);
    assert!(counts(&report).values().all(|n| *n == 0), "{report:#}");
    assert_eq!(report["delivered_in_window"], 5, "{report:#}");
    assert_eq!(report["groups"][0]["group"], "warehouse", "{report:#}");
    assert_eq!(
        report["groups"][0]["topics"],
        serde_json::json!([ship]),
        "{report:#}"
    );
    assert_eq!(report["groups"][0]["topics_inferred"], true, "{report:#}");
    assert_eq!(report["groups"][0]["processed_in_window"], 5, "{report:#}");
    let (code, out) = reconcile(&outbox_url, &["--consumer-db", &consumer_url]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("reconciled: nothing needs attention"), "{out}");

    // 1. Dead in the outbox: a message the broker cannot route.
    let (dead, _) = Broker::RabbitMq.poison("lost");
    enqueue_all(&outbox, std::slice::from_ref(&dead)).await;
    // 2. Parked in the consumer's dead letters (delivered, so also a test that it is not
    //    reported as unprocessed too).
    let parked = Message::new(&ship, b"poison".to_vec())
        .unwrap()
        .with_key("order-p")
        .unwrap();
    enqueue_all(&outbox, std::slice::from_ref(&parked)).await;
    wait_until("one dead message and one dead letter", || async {
        outbox.count("dead").await == 1
            && count(
                &consumer_db.pool,
                "SELECT count(*) FROM outbox_consumer.dead_letters",
            )
            .await
                == 1
    })
    .await;
    // 3. Delivered but not processed: the consumer is down when it is delivered, and the
    //    delivery is ten minutes old.
    shutdown.cancel();
    source.await.unwrap().unwrap();
    let unhandled = Message::new(&ship, b"book 9".to_vec()).unwrap();
    enqueue_all(&outbox, std::slice::from_ref(&unhandled)).await;
    wait_until("the unhandled message delivered", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.delivered WHERE id = $1")
            .bind(unhandled.id())
            .fetch_one(&outbox.pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    sqlx::query(
        "UPDATE outbox.delivered SET delivered_at = delivered_at - interval '10 minutes' WHERE id = $1",
    )
    .bind(unhandled.id())
    .execute(&outbox.pool)
    .await
    .unwrap();
    // 4. Pending too long: written ten minutes ago, while no relay runs.
    relay.stop().await;
    let stuck = Message::new(&ship, b"book 10".to_vec()).unwrap();
    enqueue_all(&outbox, std::slice::from_ref(&stuck)).await;
    sqlx::query(
        "UPDATE outbox.messages SET created_at = created_at - interval '10 minutes' WHERE id = $1",
    )
    .bind(stuck.id())
    .execute(&outbox.pool)
    .await
    .unwrap();
    // 5. Processed but unknown to the outbox: a message from elsewhere.
    let stranger = Uuid::new_v4();
    let outcome = dedup
        .handle(
            &Incoming::new(
                &ship,
                b"book 11".to_vec(),
                BTreeMap::from([("outbox-id".to_owned(), stranger.to_string())]),
            ),
            &Ship,
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Processed);

    let (code, out) = reconcile(&outbox_url, &["--consumer-db", &consumer_url, "--json"]).await;
    assert_eq!(code, Some(1), "findings exit 1: {out}");
    let report = json(&out);
    assert_eq!(
        counts(&report),
        BTreeMap::from([
            ("dead", 1),
            ("pending", 1),
            ("unprocessed", 1),
            ("unknown", 1),
            ("dead_letters", 1)
        ]),
        "{report:#}"
    );
    assert_eq!(report["dead"]["rows"][0]["id"], dead.id().to_string());
    assert!(
        report["dead"]["rows"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("NO_ROUTE"),
        "{report:#}"
    );
    assert_eq!(report["pending"]["rows"][0]["id"], stuck.id().to_string());
    assert_eq!(
        report["unprocessed"]["rows"][0]["id"],
        unhandled.id().to_string()
    );
    assert_eq!(report["unprocessed"]["rows"][0]["group"], "warehouse");
    assert_eq!(
        report["unknown"]["rows"][0]["message_id"],
        stranger.to_string()
    );
    assert_eq!(
        report["dead_letters"]["rows"][0]["message_id"],
        parked.id().to_string()
    );
    assert!(
        report["dead_letters"]["rows"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no such book"),
        "{report:#}"
    );
    // Handled: the five books and the stranger; the parked message is not counted.
    assert_eq!(report["groups"][0]["processed_in_window"], 6, "{report:#}");
    // Every topic delivered in the window was checked for some group.
    assert_eq!(
        report["unchecked_topics"],
        serde_json::json!([]),
        "{report:#}"
    );

    // Naming the group and its topic finds the same.
    let group = format!("warehouse={ship}");
    let (code, out) = reconcile(
        &outbox_url,
        &["--consumer-db", &consumer_url, "--group", &group, "--json"],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    let named = json(&out);
    assert_eq!(counts(&named), counts(&report), "{named:#}");
    assert_eq!(named["groups"][0]["topics_inferred"], false);

    // The report for people names each finding and the total.
    let (code, out) = reconcile(&outbox_url, &["--consumer-db", &consumer_url]).await;
    assert_eq!(code, Some(1), "{out}");
    for needle in [
        "dead in the outbox: 1",
        "pending for longer than 5m: 1",
        "delivered more than 5m ago, not processed: 1",
        "processed but unknown to the outbox: 1",
        "parked in consumers' dead letters: 1",
        "reconciled: 5 findings need attention",
        &dead.id().to_string(),
        &stuck.id().to_string(),
        &unhandled.id().to_string(),
        &stranger.to_string(),
        &parked.id().to_string(),
    ] {
        assert!(out.contains(needle), "{needle:?} missing:\n{out}");
    }

    // Settled by the operator: the dead letter discarded, the stranger's row purged, and the
    // thresholds loose enough for the rest: clean again.
    DeadLetters::new(consumer_db.pool.clone(), "outbox_consumer".parse().unwrap())
        .discard(&LetterFilter::every(), "bad data, refunded")
        .await
        .unwrap();
    sqlx::query("DELETE FROM outbox_consumer.processed WHERE message_id = $1")
        .bind(stranger)
        .execute(&consumer_db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM outbox.messages")
        .execute(&outbox.pool)
        .await
        .unwrap();
    let (code, out) = reconcile(
        &outbox_url,
        &["--consumer-db", &consumer_url, "--max-lag", "1h", "--json"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(counts(&json(&out)).values().all(|n| *n == 0), "{out}");
}

/// A queue purged after delivery loses three messages: reconcile reports them, `--repair`
/// (under the README's reconciliation and replay grants) sends exactly those again from the
/// archive, the consumer handles each once, marked as a replay, and reconcile is then clean.
#[tokio::test]
async fn a_repair_sends_again_what_a_group_missed_and_reconcile_is_then_clean() {
    let (outbox, consumer_db, dedup, role) = warehouse().await;
    sqlx::raw_sql(&outbox_tests::readme_sql("replay-grants").replace("outbox_reconciler", &role))
        .execute(&outbox.pool)
        .await
        .unwrap_or_else(|e| panic!("the README's replay-grants apply: {e}"));
    let outbox_url = as_role(&outbox.url, &role);
    let consumer_url = as_role(&consumer_db.url, &role);
    let ship = topic("ship");
    let broker = Consumer::connect().await;
    broker.declare(&ship).await;
    let start_source = || {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (dedup, shutdown) = (dedup.clone(), shutdown.clone());
            let source = RabbitMqSource::new(amqp_url(), &ship);
            async move { source.run(dedup, Arc::new(Ship), shutdown).await }
        });
        (shutdown, task)
    };
    let shipments = |sql: &'static str| {
        let pool = consumer_db.pool.clone();
        async move { count(&pool, sql).await }
    };
    let (shutdown, source) = start_source();
    let mut s = settings(&outbox);
    s.retention.delivered = Duration::from_secs(3600);
    s.retention.delivered_payloads = true;
    let relay = start_relay(&s).await;
    let book = |i: usize| {
        Message::new(&ship, format!("book {i}").into_bytes())
            .unwrap()
            .with_key(format!("order-{}", i % 2))
            .unwrap()
    };
    enqueue_all(&outbox, &(0..5).map(book).collect::<Vec<_>>()).await;
    wait_until("five shipments", || {
        shipments("SELECT count(*) FROM shipments").then(|n| async move { n == 5 })
    })
    .await;

    // The consumer is down; three more are delivered, and the queue is purged.
    shutdown.cancel();
    source.await.unwrap().unwrap();
    let lost: Vec<Message> = (5..8).map(book).collect();
    enqueue_all(&outbox, &lost).await;
    wait_until("eight delivery records", || async {
        count(&outbox.pool, "SELECT count(*) FROM outbox.delivered").await == 8
    })
    .await;
    broker
        .channel()
        .queue_purge(&ship, lapin::options::QueuePurgeOptions::default())
        .await
        .unwrap();

    let args = ["--consumer-db", &consumer_url, "--max-lag", "0s", "--json"];
    let (code, out) = reconcile(&outbox_url, &[&args[..], &["--repair"]].concat()).await;
    assert_eq!(code, Some(1), "findings exit 1, repaired or not: {out}");
    let report = json(&out);
    assert_eq!(report["unprocessed"]["count"], 3, "{report:#}");
    let mut repaired: Vec<String> = report["repair"]["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("a repair section: {report:#}"))
        .iter()
        .map(|m| {
            assert_eq!(m["fate"], "queued", "{report:#}");
            m["id"].as_str().unwrap().to_owned()
        })
        .collect();
    repaired.sort();
    let mut expected: Vec<String> = lost.iter().map(|m| m.id().to_string()).collect();
    expected.sort();
    assert_eq!(repaired, expected, "exactly the messages not processed");

    let (_shutdown, _source) = start_source();
    wait_until("eight shipments", || {
        shipments("SELECT count(*) FROM shipments").then(|n| async move { n == 8 })
    })
    .await;
    let (code, out) = reconcile(&outbox_url, &args).await;
    assert_eq!(code, Some(0), "clean after the repair: {out}");
    // Each book shipped once; the three repaired ones as replays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        shipments("SELECT count(DISTINCT message_id) FROM shipments").await,
        8
    );
    assert_eq!(shipments("SELECT count(*) FROM shipments").await, 8);
    assert_eq!(
        shipments("SELECT count(*) FROM shipments WHERE replay").await,
        3
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_comparison_that_cannot_be_made_exits_2() {
    let outbox = TestDb::new().await;
    let (code, out) = reconcile(
        &outbox.url,
        &[
            "--consumer-db",
            "postgres://nobody:secret@127.0.0.1:1/nowhere",
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(
            "cannot connect to the consumer database at postgres://nobody:***@127.0.0.1:1/nowhere"
        ),
        "{out}"
    );
    assert!(!out.contains("secret"), "{out}");
    let (code, out) = reconcile(&outbox.url, &["--consumer-schema", "nope"]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no consumer schema (nope)"), "{out}");
}
