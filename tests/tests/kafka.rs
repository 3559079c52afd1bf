//! What is particular to Kafka: the outbox key is the Kafka message key, so a key lives in
//! one partition, in `seq` order; topics map through templates and routes.

use std::{collections::BTreeMap, time::Duration};

use outbox::Message;
use outbox_tests::{enqueue_all, keyed_messages, start_relay, topic, Broker, TestDb};

#[tokio::test]
async fn each_key_lives_in_one_partition_in_seq_order() {
    let db = TestDb::new().await;
    let t = topic("partitioned");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&t).await;
    enqueue_all(&db, &keyed_messages(&t, 0..300, 30)).await;
    let relay = start_relay(&Broker::Kafka.settings(&db)).await;
    let got = consumer.wait_for(300, Duration::from_secs(30)).await;
    relay.stop().await;

    // Per partition, messages come back in offset order.
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    let mut last_seq: BTreeMap<String, i64> = BTreeMap::new();
    for r in &got {
        let key = r.key.clone().unwrap();
        let p = r.partition.unwrap();
        let first = *partition_of.entry(key.clone()).or_insert(p);
        assert_eq!(first, p, "key {key} is in partitions {first} and {p}");
        let last = last_seq.entry(key.clone()).or_insert(i64::MIN);
        assert!(
            r.seq > *last,
            "key {key}: seq {} after {} in partition {p}",
            r.seq,
            last
        );
        *last = r.seq;
    }
    let used: std::collections::BTreeSet<i32> = partition_of.values().copied().collect();
    assert!(
        used.len() > 1,
        "30 keys should spread over the 3 partitions, used {used:?}"
    );
}

#[tokio::test]
async fn routes_and_templates_pick_the_kafka_topic() {
    let db = TestDb::new().await;
    let routed = topic("billing-events");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&routed).await;
    let mut s = Broker::Kafka.settings(&db);
    s.kafka.routes.insert(
        "billing".into(),
        outbox_relay::config::KafkaRouteSettings {
            topic: routed.clone(),
        },
    );
    let msg = Message::new("billing", b"invoice".to_vec())
        .unwrap()
        .with_key("c-1")
        .unwrap();
    outbox::enqueue(&db.pool, &msg).await.unwrap();
    let relay = start_relay(&s).await;
    let got = consumer.wait_for(1, Duration::from_secs(30)).await;
    relay.stop().await;
    assert_eq!(
        (
            got[0].id,
            got[0].routing_key.as_str(),
            got[0].topic.as_str()
        ),
        (msg.id(), routed.as_str(), "billing")
    );
}
