//! Least privilege: the relay runs under a role with only the README's grants, a producer
//! role can only add messages, and a missing grant stops the relay at start naming it.

use std::time::Duration;

use outbox::{Message, Outbox};
use outbox_tests::{amqp_url, topic, Consumer, RelayProcess, TestDb};
use uuid::Uuid;

/// The grants block of the README, for these role names.
fn readme_grants(relay: &str, writer: &str) -> String {
    outbox_tests::readme_sql("grants")
        .replace("outbox_relay", relay)
        .replace("outbox_writer", writer)
}

/// Login roles with no privileges but the README's grants.
async fn roles(db: &TestDb) -> (String, String) {
    let suffix = Uuid::new_v4().simple().to_string();
    let (relay, writer) = (format!("relay_{suffix}"), format!("writer_{suffix}"));
    for role in [&relay, &writer] {
        sqlx::query(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    sqlx::raw_sql(&readme_grants(&relay, &writer))
        .execute(&db.pool)
        .await
        .expect("the README's grants apply");
    (relay, writer)
}

fn as_role(url: &str, role: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_username(role).unwrap();
    u.set_password(Some("pw")).unwrap();
    u.to_string()
}

#[tokio::test]
async fn relay_and_producer_work_with_only_the_documented_grants() {
    let db = TestDb::new().await;
    let (relay_role, writer_role) = roles(&db).await;
    let q = topic("grants");
    let consumer = Consumer::connect().await;
    consumer.queue(&q).await;

    let writer = sqlx::PgPool::connect(&as_role(&db.url, &writer_role))
        .await
        .unwrap();
    let msgs: Vec<Message> = (0..10)
        .map(|i| Message::new(&q, vec![i]).unwrap().with_key("k").unwrap())
        .collect();
    Outbox::default()
        .enqueue_batch(&writer, &msgs)
        .await
        .expect("a producer with insert-only grants can enqueue");
    let read = sqlx::query("SELECT payload FROM outbox.messages")
        .fetch_all(&writer)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        read.contains("permission denied"),
        "a producer must not read payloads: {read}"
    );

    let mut relay = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", as_role(&db.url, &relay_role)),
            ("OUTBOX__RABBITMQ__URL", amqp_url()),
            ("OUTBOX__RELAY__POLL_INTERVAL", "100ms".into()),
            ("OUTBOX__RETENTION__DELIVERED", "1h".into()),
        ],
    );
    consumer
        .wait_for_distinct(10, Duration::from_secs(30))
        .await;
    relay.terminate();
    let status = relay.exit(Duration::from_secs(30)).await;
    let out = relay.output();
    assert!(status.success(), "{out}");
    assert!(!out.contains("permission denied"), "{out}");
    assert_eq!(db.count("pending").await, 0);
}

#[tokio::test]
async fn a_missing_grant_stops_the_relay_at_start_naming_it() {
    let db = TestDb::new().await;
    let (relay_role, _) = roles(&db).await;
    sqlx::query(&format!(
        "REVOKE DELETE ON outbox.messages FROM {relay_role}"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut relay = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", as_role(&db.url, &relay_role)),
            ("OUTBOX__RABBITMQ__URL", amqp_url()),
        ],
    );
    let status = relay.exit(Duration::from_secs(30)).await;
    let out = relay.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("DELETE on outbox.messages") && out.contains("Least privilege"),
        "{out}"
    );
}
