//! The `outbox-relay` binary as a process: bad input, unreachable servers, wrong
//! credentials, and graceful shutdown.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use outbox::{Message, Outbox};
use outbox_tests::{
    amqp_url, enqueue_all, for_each_broker, free_port, keyed_messages, start_relay, topic, Broker,
    RelayProcess, TestDb,
};

/// A relay process built for these tests.
struct Proc;

impl Proc {
    fn spawn(args: &[&str], env: &[(&str, String)]) -> RelayProcess {
        RelayProcess::spawn(env!("CARGO_BIN_EXE_outbox-relay-under-test"), args, env)
    }
}

fn with_password(url: &str, password: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_password(Some(password)).unwrap();
    u.to_string()
}

#[tokio::test]
async fn invalid_configuration_exits_2_naming_every_setting() {
    let mut p = Proc::spawn(
        &["run"],
        &[
            (
                "OUTBOX__DATABASE__URL",
                "postgres://u:hunter2@127.0.0.1/db".into(),
            ),
            ("OUTBOX__RELAY__BATCH_SIZE", "0".into()),
            ("OUTBOX__RETRY__JITTER", "3".into()),
            ("OUTBOX__RELAY__DEAD_KEY_POLICY", "block".into()),
        ],
    );
    let status = p.exit(Duration::from_secs(10)).await;
    let out = p.output();
    assert_eq!(status.code(), Some(2), "{out}");
    for needle in [
        "relay.batch_size must be between 1 and 10000 (got 0)",
        "retry.jitter",
        "rabbitmq.url is not set",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(!out.contains("hunter2"), "a password was printed:\n{out}");

    let mut p = Proc::spawn(&["run"], &[("OUTBOX__RELAY__BACH_SIZE", "10".into())]);
    assert_eq!(p.exit(Duration::from_secs(10)).await.code(), Some(2));
    assert!(
        p.output().contains("unknown field `bach_size`"),
        "{}",
        p.output()
    );

    let mut p = Proc::spawn(&["--config", "/nonexistent/relay.toml", "status"], &[]);
    assert_eq!(p.exit(Duration::from_secs(10)).await.code(), Some(2));
    assert!(
        p.output()
            .contains("configuration file /nonexistent/relay.toml does not exist"),
        "{}",
        p.output()
    );
}

#[tokio::test]
async fn a_malformed_config_file_is_named() {
    let dir = std::env::temp_dir().join(format!("outbox-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    std::fs::write(&file, "[relay]\nbatch_size = \"many\"\n").unwrap();
    let mut p = Proc::spawn(
        &[
            "--config",
            file.to_str().unwrap(),
            "--database-url",
            "postgres://h/db",
            "status",
        ],
        &[],
    );
    assert_eq!(p.exit(Duration::from_secs(10)).await.code(), Some(2));
    assert!(p.output().contains("relay.batch_size"), "{}", p.output());
}

#[tokio::test]
async fn unreachable_postgres_is_retried_with_backoff_until_sigterm() {
    let port = free_port();
    let mut p = Proc::spawn(
        &["run"],
        &[
            (
                "OUTBOX__DATABASE__URL",
                format!("postgres://app:hunter2@127.0.0.1:{port}/app"),
            ),
            ("OUTBOX__RABBITMQ__URL", amqp_url()),
            ("OUTBOX__RELAY__RECONNECT_MAX_DELAY", "400ms".into()),
            ("OUTBOX__DATABASE__CONNECT_TIMEOUT", "1s".into()),
        ],
    );
    p.wait_for_line(
        "PostgreSQL unreachable; retrying",
        3,
        Duration::from_secs(15),
    )
    .await;
    p.terminate();
    let status = p.exit(Duration::from_secs(10)).await;
    let out = p.output();
    assert!(
        status.success(),
        "SIGTERM while retrying should exit 0: {status:?}\n{out}"
    );
    assert!(
        out.contains(&format!("postgres://app:***@127.0.0.1:{port}/app")),
        "server not named:\n{out}"
    );
    assert!(!out.contains("hunter2"), "password printed:\n{out}");
}

#[tokio::test]
async fn wrong_postgres_password_is_fatal_and_says_so() {
    let url = with_password(&outbox_tests::database_url(), "not-the-password");
    let mut p = Proc::spawn(
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", url),
            ("OUTBOX__RABBITMQ__URL", amqp_url()),
        ],
    );
    let status = p.exit(Duration::from_secs(15)).await;
    let out = p.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("refused the relay") && out.contains("password authentication failed"),
        "{out}"
    );
    assert!(
        !out.contains("not-the-password"),
        "password printed:\n{out}"
    );
}

#[tokio::test]
async fn wrong_rabbitmq_credentials_are_fatal_and_say_so() {
    let db = TestDb::new().await;
    let mut p = Proc::spawn(
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__RABBITMQ__URL", with_password(&amqp_url(), "wrong")),
        ],
    );
    let status = p.exit(Duration::from_secs(15)).await;
    let out = p.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("refused the connection") && out.contains("ACCESS_REFUSED"),
        "{out}"
    );
}

#[tokio::test]
async fn unreachable_rabbitmq_is_retried_without_spending_attempts() {
    let db = TestDb::new().await;
    let msg = Message::new(topic("t"), b"x".to_vec()).unwrap();
    outbox::enqueue(&db.pool, &msg).await.unwrap();
    let port = free_port();
    let mut p = Proc::spawn(
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            (
                "OUTBOX__RABBITMQ__URL",
                format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            ),
            ("OUTBOX__RELAY__RECONNECT_MAX_DELAY", "300ms".into()),
            ("OUTBOX__RELAY__WORKERS", "1".into()),
        ],
    );
    p.wait_for_line("broker unavailable", 3, Duration::from_secs(15))
        .await;
    p.terminate();
    assert!(
        p.exit(Duration::from_secs(10)).await.success(),
        "{}",
        p.output()
    );
    assert!(
        p.output().contains(&format!(
            "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:{port}"
        )),
        "{}",
        p.output()
    );
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbox.messages")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), attempts),
        ("pending", 0),
        "a broker outage must not count as attempts"
    );
}

#[tokio::test]
async fn a_missing_outbox_table_is_fatal_with_a_hint() {
    let db = TestDb::empty().await;
    let mut p = Proc::spawn(
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__RABBITMQ__URL", amqp_url()),
        ],
    );
    assert_eq!(p.exit(Duration::from_secs(15)).await.code(), Some(1));
    assert!(
        p.output().contains("run `outbox-relay migrate` first"),
        "{}",
        p.output()
    );
}

/// A relay newer than the schema refuses to start and names the migration it needs,
/// rather than failing on every read.
#[tokio::test]
async fn an_outbox_schema_older_than_the_relay_is_fatal_with_a_hint() {
    let db = TestDb::new().await;
    // The schema as version 6 left it.
    sqlx::raw_sql(
        "ALTER TABLE outbox.messages DROP COLUMN replay_of;
         ALTER TABLE outbox.delivered DROP COLUMN payload, DROP COLUMN headers, DROP COLUMN content_type;
         DELETE FROM outbox.schema_migrations WHERE version = 7",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut p = Proc::spawn(
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__RABBITMQ__URL", amqp_url()),
        ],
    );
    assert_eq!(p.exit(Duration::from_secs(15)).await.code(), Some(1));
    let out = p.output();
    assert!(
        out.contains("older than this relay")
            && out.contains("0007_replay.sql")
            && out.contains("run `outbox-relay migrate` first"),
        "{out}"
    );
}

#[tokio::test]
async fn migrate_then_status_report_the_outbox() {
    let db = TestDb::empty().await;
    let env = [("OUTBOX__DATABASE__URL", db.url.clone())];
    let mut p = Proc::spawn(&["migrate"], &env);
    assert!(
        p.exit(Duration::from_secs(15)).await.success(),
        "{}",
        p.output()
    );
    assert!(
        p.output()
            .contains("applied migrations [1, 2, 3, 4, 5, 6, 7]"),
        "{}",
        p.output()
    );
    let msgs: Vec<Message> = (0..3)
        .map(|_| Message::new("orders", vec![]).unwrap())
        .collect();
    Outbox::default()
        .enqueue_batch(&db.pool, &msgs)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox.messages SET status = 'dead', last_error = 'x' WHERE seq = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut p = Proc::spawn(&["status", "--json"], &env);
    assert!(
        p.exit(Duration::from_secs(15)).await.success(),
        "{}",
        p.output()
    );
    let out = p.output();
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(json["total"]["pending"], 2, "{json}");
    assert_eq!(json["total"]["dead"], 1, "{json}");
    assert_eq!(json["topics"][0]["topic"], "orders", "{json}");
}

/// SIGTERM mid-stream: the relay exits 0 within its grace period, leaves no row leased,
/// and a second relay delivers everything that was not confirmed, so nothing is lost.
async fn graceful_shutdown_mid_stream_loses_nothing_and_exits_within_grace(b: Broker) {
    // Long enough that SIGTERM lands mid-stream: the relay hands Kafka a key's messages
    // without waiting for each confirm, so it drains several times faster there.
    let n: usize = match b {
        Broker::Kafka => 20_000,
        _ => 3000,
    };
    let db = TestDb::new().await;
    let t = topic("drain");
    let consumer = b.consumer().await;
    consumer.queue(&t).await;
    let msgs = keyed_messages(&t, 0..n, 50);
    enqueue_all(&db, &msgs).await;

    let grace = Duration::from_secs(5);
    let mut env = b.env(&db);
    env.push(("OUTBOX__RELAY__BATCH_SIZE", "200".into()));
    env.push(("OUTBOX__RELAY__SHUTDOWN_GRACE", "5s".into()));
    let mut p = Proc::spawn(&["run"], &env);
    consumer.wait_for(n / 10, Duration::from_secs(30)).await;
    let signalled = Instant::now();
    p.terminate();
    let status = p.exit(grace + Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    let out = p.output();
    assert!(status.success(), "{status:?}\n{out}");
    assert!(
        took < grace + Duration::from_secs(2),
        "shutdown took {took:?} with a {grace:?} grace period"
    );
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox.partitions WHERE owner IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(held, 0, "partitions still held after a graceful shutdown");
    let before = consumer.received().len();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        left > 0,
        "the stream should have been cut mid-way (all {n} were published before SIGTERM took effect)"
    );

    let relay = start_relay(&b.settings(&db)).await;
    consumer.wait_for_distinct(n, Duration::from_secs(60)).await;
    relay.stop().await;
    let got = consumer.settle(Duration::from_millis(300)).await;
    let ids: HashSet<_> = got.iter().map(|r| r.id).collect();
    let missing: Vec<_> = msgs
        .iter()
        .filter(|m| !ids.contains(&m.id()))
        .map(|m| m.id())
        .collect();
    assert!(
        missing.is_empty(),
        "{} messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    outbox_tests::assert_per_key_order(&got);
    println!(
        "graceful shutdown: {before} of {n} arrived and {left} left in the outbox at exit, \
         exit after {took:?}, {} duplicates",
        got.len() - n
    );
}

/// A Kafka cluster that cannot be reached shows up as delivery timeouts: retried, logged,
/// and never counted as attempts.
#[tokio::test]
async fn unreachable_kafka_is_retried_without_spending_attempts() {
    let db = TestDb::new().await;
    let msg = Message::new(topic("t"), b"x".to_vec()).unwrap();
    outbox::enqueue(&db.pool, &msg).await.unwrap();
    let port = free_port();
    let mut p = Proc::spawn(
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__BROKER", "kafka".into()),
            ("OUTBOX__KAFKA__BROKERS", format!("127.0.0.1:{port}")),
            ("OUTBOX__KAFKA__DELIVERY_TIMEOUT", "1s".into()),
            ("OUTBOX__RELAY__RECONNECT_MAX_DELAY", "300ms".into()),
            ("OUTBOX__RELAY__WORKERS", "1".into()),
        ],
    );
    p.wait_for_line("broker unavailable", 2, Duration::from_secs(20))
        .await;
    p.terminate();
    assert!(
        p.exit(Duration::from_secs(15)).await.success(),
        "{}",
        p.output()
    );
    assert!(
        p.output().contains(&format!("Kafka at 127.0.0.1:{port}")),
        "{}",
        p.output()
    );
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM outbox.messages")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), attempts),
        ("pending", 0),
        "an unreachable cluster must not count as attempts"
    );
}

#[tokio::test]
async fn kafka_settings_that_would_break_guarantees_are_refused() {
    let mut p = Proc::spawn(
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", "postgres://h/db".into()),
            ("OUTBOX__BROKER", "kafka".into()),
            ("OUTBOX__KAFKA__BROKERS", "127.0.0.1:9092".into()),
            ("OUTBOX__KAFKA__PROPERTIES__ACKS", "1".into()),
        ],
    );
    assert_eq!(
        p.exit(Duration::from_secs(10)).await.code(),
        Some(2),
        "{}",
        p.output()
    );
    assert!(
        p.output()
            .contains("kafka.properties.\"acks\": must stay all"),
        "{}",
        p.output()
    );
}

for_each_broker!(graceful_shutdown_mid_stream_loses_nothing_and_exits_within_grace);
