//! The relay under connection failures, against the real servers. These tests cut
//! connections that other tests would notice, so they live in their own test binary (cargo
//! runs test binaries one after another).

use std::{collections::HashSet, process::Command, time::Duration};

use outbox::{Message, Outbox};
use outbox_tests::{
    assert_per_key_order, keyed_messages, settings, start_relay, topic, Broker, Consumer, TestDb,
};

const N: usize = 2000;

fn stream(t: &str) -> Vec<Message> {
    keyed_messages(t, 0..N, 40)
}

fn assert_all_arrived(msgs: &[Message], got: &[outbox_tests::Received]) {
    let ids: HashSet<_> = got.iter().map(|r| r.id).collect();
    let lost: Vec<_> = msgs
        .iter()
        .filter(|m| !ids.contains(&m.id()))
        .map(Message::id)
        .collect();
    assert!(
        lost.is_empty(),
        "{} messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_per_key_order(got);
}

/// Runs `rabbitmqctl` against the test node.
fn rabbitmqctl(args: &str) -> String {
    let dir =
        std::env::var("OUTBOX_STACK_DIR").expect("OUTBOX_STACK_DIR: run with scripts/test.sh");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            ". '{dir}/rabbitmq/rabbit.env' && /usr/lib/rabbitmq/bin/rabbitmqctl -q {args}"
        ))
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn relay_recovers_when_the_broker_closes_its_connection() {
    let db = TestDb::new().await;
    let t = topic("broker-cut");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let msgs = stream(&t);
    let relay = start_relay(&settings(&db)).await;
    let mut closed = 0;
    for chunk in msgs.chunks(N / 4) {
        Outbox::default()
            .enqueue_batch(&db.pool, chunk)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for line in rabbitmqctl("list_connections pid client_properties").lines() {
            if line.contains("outbox-relay") {
                let pid = line.split('\t').next().unwrap();
                rabbitmqctl(&format!("close_connection '{pid}' 'fault injection'"));
                closed += 1;
            }
        }
    }
    assert!(
        closed >= 2,
        "expected to cut the relay's connection at least twice, cut {closed}"
    );
    let got = consumer.wait_for_distinct(N, Duration::from_secs(60)).await;
    relay.stop().await;
    assert_all_arrived(&msgs, &got);
    println!(
        "broker cut {closed} times: {} arrivals for {N} messages",
        got.len()
    );
}

#[tokio::test]
async fn relay_recovers_when_postgres_drops_its_connections() {
    let db = TestDb::new().await;
    let t = topic("pg-cut");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let msgs = stream(&t);
    let relay = start_relay(&settings(&db)).await;
    let mut killed = 0i64;
    for chunk in msgs.chunks(N / 4) {
        Outbox::default()
            .enqueue_batch(&db.pool, chunk)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        killed += sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
    }
    assert!(
        killed >= 2,
        "expected to cut the relay's connections, cut {killed}"
    );
    let got = consumer.wait_for_distinct(N, Duration::from_secs(60)).await;
    relay.stop().await;
    assert_all_arrived(&msgs, &got);
    println!(
        "{killed} PostgreSQL connections cut: {} arrivals for {N} messages",
        got.len()
    );
}

/// Kills the Kafka-protocol broker with SIGKILL and starts it again on the same port and
/// storage (its own PostgreSQL cluster, which keeps running).
async fn restart_kafka() {
    let dir =
        std::env::var("OUTBOX_STACK_DIR").expect("OUTBOX_STACK_DIR: run with scripts/test.sh");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/stack.sh");
    let status = tokio::process::Command::new("bash")
        .arg(script)
        .args(["restart", "kafka"])
        .env("OUTBOX_STACK_DIR", dir)
        .status()
        .await
        .unwrap();
    assert!(
        status.success(),
        "restarting the Kafka-protocol broker failed"
    );
}

#[tokio::test]
async fn kafka_broker_restart_mid_stream_loses_nothing() {
    let db = TestDb::new().await;
    let t = topic("kafka-restart");
    let consumer = Broker::Kafka.consumer().await;
    consumer.queue(&t).await;
    let msgs = stream(&t);
    let relay = start_relay(&Broker::Kafka.settings(&db)).await;
    let (first, second) = msgs.split_at(N / 2);
    Outbox::default()
        .enqueue_batch(&db.pool, first)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    restart_kafka().await;
    Outbox::default()
        .enqueue_batch(&db.pool, second)
        .await
        .unwrap();
    // First the relay must have had every message confirmed by the restarted broker...
    let start = std::time::Instant::now();
    loop {
        let left = db.count("pending").await;
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{left} messages still pending after the broker restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await;
    // ...then a reader that starts after the restart must find them all in the topic.
    let reader = Broker::Kafka.consumer().await;
    reader.queue(&t).await;
    let got = reader.wait_for_distinct(N, Duration::from_secs(60)).await;
    assert_all_arrived(&msgs, &got);
    println!(
        "Kafka broker restarted mid-stream: {} messages read back after it; the reader from before the restart saw {}",
        got.len(),
        consumer.received().len()
    );
}

/// A server that takes TCP connections and never answers (a broker hung mid-handshake, or a
/// connection closed under a request whose reply never comes): the publisher gives up within
/// `rabbitmq.confirm_timeout` and reports RabbitMQ unavailable, instead of waiting forever
/// with the relay behind it, and closes the connection it gave up on.
#[tokio::test]
async fn a_broker_that_never_answers_is_reported_unavailable_within_the_timeout() {
    use outbox_relay::publish::{rabbitmq::RabbitMqPublisher, PublishError, Publisher};

    let silent = outbox_tests::SilentServer::start().await;
    let port = silent.port;
    let db = TestDb::new().await;
    let mut s = settings(&db);
    s.rabbitmq.url = Some(format!("amqp://guest:guest@127.0.0.1:{port}/%2f").into());
    s.rabbitmq.confirm_timeout = Duration::from_secs(1);
    let publisher = RabbitMqPublisher::new(&s.rabbitmq).unwrap();
    let started = std::time::Instant::now();
    let ready = tokio::time::timeout(Duration::from_secs(10), publisher.ready())
        .await
        .expect("connecting to a silent broker must end within rabbitmq.confirm_timeout");
    match ready {
        Err(PublishError::Unavailable(why)) => {
            assert!(why.contains("no answer within 1s"), "{why}")
        }
        other => panic!("a silent broker came out as {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The attempt given up closed its connection (and with it lapin's thread driving it),
    // so retrying against such a broker does not pile up sockets and threads.
    let (accepted, closed) = silent.wait_all_closed(Duration::from_secs(5)).await;
    assert_eq!(accepted, 1, "one connection attempt");
    assert_eq!(closed, 1, "the given-up connection was left open");
}
