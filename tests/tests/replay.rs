//! `outbox-relay replay`: delivered messages kept whole (`retention.delivered_payloads`) go
//! out again through a running relay, as the CLI is used: with their ids, payloads, headers
//! and content types, in their original order per key, marked `outbox-replay` on the wire;
//! to another destination on request; and what cannot be sent is named, never skipped in
//! silence.

use std::{collections::BTreeMap, time::Duration};

use outbox::Message;
use outbox_tests::{
    enqueue_all, for_each_broker, settings, start_relay, topic, Broker, Received, RelayProcess,
    TestDb,
};
use uuid::Uuid;

async fn cli(env: &[(&str, String)], args: &[&str]) -> (Option<i32>, String) {
    let mut p = RelayProcess::spawn(env!("CARGO_BIN_EXE_outbox-relay-under-test"), args, env);
    let status = p.exit(Duration::from_secs(30)).await;
    (status.code(), p.output())
}

fn archive_whole(mut s: outbox_relay::config::Settings) -> outbox_relay::config::Settings {
    s.retention.delivered = Duration::from_secs(3600);
    s.retention.delivered_payloads = true;
    s.validate(true).expect("valid settings");
    s
}

/// Six messages over two keys, each with a header, a content type and a payload of its own.
fn orders(topic: &str) -> Vec<Message> {
    (0..6)
        .map(|i| {
            Message::new(topic, format!("{{\"order\": {i}}}").into_bytes())
                .unwrap()
                .with_key(format!("customer-{}", i % 2))
                .unwrap()
                .with_header("x-tenant", format!("tenant-{i}"))
                .unwrap()
                .with_content_type("application/json")
                .unwrap()
        })
        .collect()
}

/// The ids of `received`, per key, in arrival order.
fn ids_by_key(received: &[&Received]) -> BTreeMap<String, Vec<Uuid>> {
    let mut by_key: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for r in received {
        by_key
            .entry(r.key.clone().unwrap_or_default())
            .or_default()
            .push(r.id);
    }
    by_key
}

async fn archived_messages_go_out_again_whole_in_order_and_marked(broker: Broker) {
    let db = TestDb::new().await;
    let t = topic("replayed");
    let consumer = broker.consumer().await;
    consumer.queue(&t).await;
    let relay = start_relay(&archive_whole(broker.settings(&db))).await;
    let msgs = orders(&t);
    enqueue_all(&db, &msgs).await;
    let first = consumer.wait_for(6, Duration::from_secs(30)).await;
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox.delivered
         WHERE payload IS NOT NULL AND headers ? 'x-tenant' AND content_type IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(kept, 6, "each delivered message is kept whole");

    let env = broker.env(&db);
    let (code, out) = cli(&env, &["replay", "--topic", &t, "--dry-run"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("would replay 6 messages"), "{out}");
    assert_eq!(db.count("pending").await, 0, "a dry run writes nothing");

    let (code, out) = cli(&env, &["replay", "--topic", &t]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replayed 6 messages"), "{out}");
    let all = consumer.wait_for(12, Duration::from_secs(30)).await;
    let replays: Vec<&Received> = all[6..].iter().collect();
    let originals: Vec<&Received> = first.iter().collect();
    assert_eq!(
        ids_by_key(&replays),
        ids_by_key(&originals),
        "the same ids again, in the same order per key"
    );
    for r in &replays {
        let m = msgs.iter().find(|m| m.id() == r.id).expect("a known id");
        assert_eq!(r.payload, m.payload(), "payload byte for byte");
        assert_eq!(
            r.headers.get("outbox-replay").map(String::as_str),
            Some("true")
        );
        assert_eq!(r.headers.get("x-tenant"), m.headers().get("x-tenant"));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(r.topic, t, "outbox-topic is the original");
    }
    for r in &originals {
        assert!(!r.headers.contains_key("outbox-replay"), "{r:?}");
    }
    // Nothing more went out, and the archive still holds one record per message.
    assert_eq!(consumer.settle(Duration::from_millis(500)).await.len(), 12);
    let records: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.delivered")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(records, 6);
    relay.stop().await;
}

async fn a_replay_redirected_elsewhere_names_its_original_topic(broker: Broker) {
    let db = TestDb::new().await;
    let (t, backfill) = (topic("orders"), topic("backfill"));
    let consumer = broker.consumer().await;
    consumer.queue(&t).await;
    consumer.queue(&backfill).await;
    let relay = start_relay(&archive_whole(broker.settings(&db))).await;
    let msgs = orders(&t);
    enqueue_all(&db, &msgs).await;
    consumer.wait_for(6, Duration::from_secs(30)).await;
    let (code, out) = cli(
        &broker.env(&db),
        &["replay", "--key", "customer-1", "--to-topic", &backfill],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("replayed 3 messages to topic {backfill:?}")),
        "{out}"
    );
    let all = consumer.wait_for(9, Duration::from_secs(30)).await;
    let redirected: Vec<&Received> = all[6..].iter().collect();
    let expected: Vec<Uuid> = msgs.iter().skip(1).step_by(2).map(|m| m.id()).collect();
    assert_eq!(
        redirected.iter().map(|r| r.id).collect::<Vec<_>>(),
        expected
    );
    for r in redirected {
        assert_eq!(r.routing_key, backfill, "sent to the backfill destination");
        assert_eq!(r.topic, t, "outbox-topic names the original");
        assert_eq!(
            r.headers.get("outbox-replay").map(String::as_str),
            Some("true")
        );
    }
    relay.stop().await;
}

for_each_broker!(
    archived_messages_go_out_again_whole_in_order_and_marked,
    a_replay_redirected_elsewhere_names_its_original_topic,
);

/// What cannot be replayed is named and makes the command exit 1: a record kept without
/// its payload, an id with no record. A message already in the outbox is left alone. A
/// replay that selects nothing is refused.
#[tokio::test]
async fn what_cannot_be_replayed_is_named_and_nothing_is_selected_by_default() {
    let db = TestDb::new().await;
    let t = topic("partly");
    let consumer = Broker::RabbitMq.consumer().await;
    consumer.queue(&t).await;
    let slim = Message::new(&t, b"slim".to_vec()).unwrap();
    let whole = Message::new(&t, b"whole".to_vec()).unwrap();
    // The first delivered with slim records only, the second kept whole.
    let mut s = settings(&db);
    s.retention.delivered = Duration::from_secs(3600);
    let relay = start_relay(&s).await;
    enqueue_all(&db, std::slice::from_ref(&slim)).await;
    consumer.wait_for(1, Duration::from_secs(30)).await;
    relay.stop().await;
    let relay = start_relay(&archive_whole(settings(&db))).await;
    enqueue_all(&db, std::slice::from_ref(&whole)).await;
    consumer.wait_for(2, Duration::from_secs(30)).await;
    relay.stop().await;

    let env = outbox_tests::Broker::RabbitMq.env(&db);
    let (code, out) = cli(&env, &["replay"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("name the messages with --id"), "{out}");
    assert_eq!(db.count("pending").await, 0);

    // Ids from a file: the two delivered ones and one the outbox never had.
    let stranger = Uuid::new_v4();
    let file = std::env::temp_dir().join(format!("replay-ids-{}", Uuid::new_v4().simple()));
    std::fs::write(
        &file,
        format!(
            "# to send again\n{}\n{}\n{stranger}\n",
            slim.id(),
            whole.id()
        ),
    )
    .unwrap();
    let path = file.to_str().unwrap().to_owned();
    let (code, out) = cli(&env, &["replay", "--ids", &path, "--json"]).await;
    assert_eq!(code, Some(1), "{out}");
    let outcome: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..])
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    let fates: BTreeMap<String, String> = outcome["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["fate"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        fates,
        BTreeMap::from([
            (slim.id().to_string(), "no_payload".to_owned()),
            (whole.id().to_string(), "queued".to_owned()),
        ])
    );
    assert_eq!(
        outcome["not_archived"],
        serde_json::json!([stranger.to_string()])
    );
    let row: (Uuid, String, Vec<u8>, Option<String>) =
        sqlx::query_as("SELECT id, topic, payload, replay_of FROM outbox.messages")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        row,
        (whole.id(), t.clone(), b"whole".to_vec(), Some(t.clone()))
    );

    // Asked again while it waits in the outbox: left alone, not an error.
    let (code, out) = cli(&env, &["replay", "--id", &whole.id().to_string()]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("replayed 0 messages; not replayed: 1 in the outbox already"),
        "{out}"
    );
    assert_eq!(db.count("pending").await, 1);
    // The table says what went wrong with the slim one.
    let (code, out) = cli(&env, &["replay", "--id", &slim.id().to_string()]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("archived without payload") && out.contains("retention.delivered_payloads"),
        "{out}"
    );
    std::fs::remove_file(file).ok();
}

/// Keeping payloads without keeping records is a configuration error naming both settings.
#[tokio::test]
async fn payloads_without_delivery_records_are_refused_at_start() {
    let db = TestDb::new().await;
    let mut env = Broker::RabbitMq.env(&db);
    env.push(("OUTBOX__RETENTION__DELIVERED_PAYLOADS", "true".to_owned()));
    let (code, out) = cli(&env, &["run"]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("retention.delivered_payloads") && out.contains("retention.delivered is 0s"),
        "{out}"
    );
}

/// A selection past the archive's window is refused and says what the archive holds; a
/// message whose record was purged after `retention.delivered` cannot be replayed, and the
/// command names it and says why.
#[tokio::test]
async fn a_selection_past_the_archive_and_a_purged_message_are_refused_with_why() {
    let db = TestDb::new().await;
    let t = topic("expiring");
    let consumer = Broker::RabbitMq.consumer().await;
    consumer.queue(&t).await;
    let m = Message::new(&t, b"soon gone".to_vec()).unwrap();
    let relay = start_relay(&archive_whole(settings(&db))).await;
    enqueue_all(&db, std::slice::from_ref(&m)).await;
    consumer.wait_for(1, Duration::from_secs(30)).await;
    relay.stop().await;
    let env = Broker::RabbitMq.env(&db);

    // Delivered a moment ago: nothing was delivered before two hours ago.
    let (code, out) = cli(&env, &["replay", "--until", "2h"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("no archived message matches the selection")
            && out.contains("holds 1 messages delivered from")
            && out.contains("1 of them with their payload"),
        "{out}"
    );

    // A relay keeping records for one second purges it.
    let mut s = archive_whole(settings(&db));
    s.retention.delivered = Duration::from_secs(1);
    s.retention.purge_interval = Duration::from_millis(100);
    let relay = start_relay(&s).await;
    let start = std::time::Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.delivered")
        .fetch_one(&db.pool)
        .await
        .unwrap()
        > 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "purged within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
    let (code, out) = cli(&env, &["replay", "--id", &m.id().to_string()]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "{}: no delivery record (never delivered, or purged after retention.delivered)",
            m.id()
        )),
        "{out}"
    );
    let (code, out) = cli(&env, &["replay", "--topic", &t]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("holds no delivered message"), "{out}");
    assert_eq!(db.count("pending").await, 0, "nothing was queued");
}
