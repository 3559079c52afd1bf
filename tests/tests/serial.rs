//! Tests that stop or alarm the stack's shared broker, so they cannot share it with others:
//! ignored in the parallel run, and run alone afterwards by `scripts/test.sh`
//! (`cargo test -p outbox-tests --test serial -- --ignored --test-threads=1`).
//!
//! - A broker that stops answering (its process stopped with SIGSTOP, its sockets open) must
//!   not hold a relay's shutdown past its grace period.
//! - A RabbitMQ resource alarm (`connection.blocked`) is an outage the relay waits out: no
//!   reconnects, no duplicates beyond what was in flight, no attempts charged.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use outbox::Message;
use outbox_tests::{
    enqueue_all, keyed_messages, settings, start_relay, topic, Broker, Consumer, RelayProcess,
    TestDb,
};

const WAIT: Duration = Duration::from_secs(30);

/// The stack's state directory (`scripts/stack.sh` exports it to the tests).
fn stack_dir() -> String {
    std::env::var("OUTBOX_STACK_DIR").expect("OUTBOX_STACK_DIR: run with scripts/test.sh")
}

/// A broker process stopped with SIGSTOP (it keeps its sockets open and answers nothing);
/// continued on drop, also when the test fails.
struct Stopped {
    pid: String,
}

impl Stopped {
    fn broker(b: Broker) -> Self {
        let file = match b {
            Broker::RabbitMq => format!("{}/rabbitmq/beam.pid", stack_dir()),
            Broker::Kafka => format!("{}/kafka.pid", stack_dir()),
        };
        let pid = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .trim()
            .to_owned();
        signal("-STOP", &pid);
        Self { pid }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", &self.pid);
    }
}

fn signal(sig: &str, pid: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// Runs `rabbitmqctl` against the stack's node.
fn rabbitmqctl(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/stack.sh");
    let out = std::process::Command::new(script)
        .arg("rabbitmqctl")
        .args(args)
        .output()
        .expect("scripts/stack.sh rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Partitions still leased to some relay.
async fn leased(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox.partitions WHERE owner IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// SIGTERM to a relay whose broker stopped answering, idle or with messages out: it exits
/// within `relay.shutdown_grace` + 5 s, releases its partitions, and the messages it had out
/// stay pending for the next relay.
async fn shutdown_is_bounded_when_the_broker_goes_silent(b: Broker) {
    let grace = Duration::from_secs(3);
    for in_flight in [false, true] {
        let case = if in_flight {
            "with messages out"
        } else {
            "idle"
        };
        let db = TestDb::new().await;
        let t = topic("silent");
        let consumer = b.consumer().await;
        consumer.queue(&t).await;
        enqueue_all(&db, &keyed_messages(&t, 0..5, 5)).await;
        let mut env = b.env(&db);
        env.push(("OUTBOX__RELAY__SHUTDOWN_GRACE", "3s".into()));
        let mut relay = RelayProcess::spawn(
            env!("CARGO_BIN_EXE_outbox-relay-under-test"),
            &["run"],
            &env,
        );
        // Delivered: the relay's connection is open.
        consumer.wait_for(5, WAIT).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stopped = Stopped::broker(b);
        if in_flight {
            enqueue_all(&db, &keyed_messages(&t, 5..8, 5)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let asked = Instant::now();
        relay.terminate();
        let status = relay.exit(grace + Duration::from_secs(30)).await;
        let took = asked.elapsed();
        drop(stopped);
        assert!(
            took <= grace + Duration::from_secs(5),
            "{b:?}, {case}: the relay took {took:?} to stop with the broker silent (grace \
             {grace:?}); output:\n{}",
            relay.output()
        );
        assert!(
            status.success(),
            "{b:?}, {case}: {status}; output:\n{}",
            relay.output()
        );
        assert_eq!(
            leased(&db).await,
            0,
            "{b:?}, {case}: partitions left leased"
        );
        if in_flight {
            // What was out when the broker fell silent was never confirmed: still there.
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            assert_eq!(
                left, 3,
                "{b:?}: the messages sent to the silent broker are not pending"
            );
        }
    }
}

#[tokio::test]
#[ignore = "stops the shared RabbitMQ node: run alone by scripts/test.sh"]
async fn rabbitmq_shutdown_is_bounded_when_the_broker_goes_silent() {
    shutdown_is_bounded_when_the_broker_goes_silent(Broker::RabbitMq).await
}

#[tokio::test]
#[ignore = "stops the shared Kafka-protocol broker: run alone by scripts/test.sh"]
async fn kafka_shutdown_is_bounded_when_the_broker_goes_silent() {
    shutdown_is_bounded_when_the_broker_goes_silent(Broker::Kafka).await
}

/// Clears the node's memory alarm on drop, also when the test fails.
struct Alarm;

impl Alarm {
    fn raise() -> Self {
        // An absolute watermark far below what the node uses: the alarm goes off at once.
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1MB"]);
        Self
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

/// A memory alarm blocks the relay's connection mid-stream for longer than several confirm
/// timeouts. The relay says it is blocked (readiness names the cause), keeps its connection
/// instead of resetting it every confirm timeout (which published what was in flight again
/// and again), charges no attempt, and resumes once the alarm clears: every message arrives,
/// with no more duplicates than messages were in flight when the block began.
#[tokio::test]
#[ignore = "raises a memory alarm on the shared RabbitMQ node: run alone by scripts/test.sh"]
async fn a_blocked_rabbitmq_connection_is_waited_out_without_duplicates() {
    let db = TestDb::new().await;
    let t = topic("blocked");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let mut s = settings(&db);
    s.rabbitmq.confirm_timeout = Duration::from_secs(2);
    s.retention.delivered = Duration::from_secs(3600); // keeps each delivery's attempts
    let relay = outbox_tests::relay(&s).await;
    let running = outbox_tests::run_relay(relay.clone());
    let first = keyed_messages(&t, 0..500, 50);
    enqueue_all(&db, &first).await;
    consumer.wait_for(500, WAIT).await;

    let alarm = Alarm::raise();
    let during = keyed_messages(&t, 500..1500, 50);
    enqueue_all(&db, &during).await;
    // Five confirm timeouts: the old relay reset its connection (and republished) each time.
    let started = Instant::now();
    let mut said_blocked = None;
    while started.elapsed() < Duration::from_secs(10) {
        if let Err(problems) = relay.readiness().await {
            if let Some(p) = problems.iter().find(|p| p.contains("blocked publishing")) {
                said_blocked = Some(p.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let arrived_while_blocked = consumer.received().len() - 500;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    drop(alarm);

    let got = consumer.wait_for_distinct(1500, WAIT).await;
    running.stop().await;
    let said_blocked = said_blocked.expect("readiness never said RabbitMQ blocked publishing");
    assert!(said_blocked.contains("memory or disk"), "{said_blocked}");
    assert!(
        pending > 0 && arrived_while_blocked < during.len(),
        "the alarm did not hold the stream back ({arrived_while_blocked} arrived, {pending} pending)"
    );
    let mut seen: HashMap<uuid::Uuid, usize> = HashMap::new();
    for r in &got {
        *seen.entry(r.id).or_default() += 1;
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    // What one confirm window of each channel holds is the most that can be in flight.
    let in_flight = usize::from(s.rabbitmq.channels) * usize::from(s.rabbitmq.channel_window);
    assert!(
        duplicates <= in_flight.min(during.len()),
        "{duplicates} duplicates across the alarm (at most {in_flight} were in flight)"
    );
    let charged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox.delivered WHERE attempts > 0")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(charged, 0, "messages were charged attempts for the alarm");
    let lost: Vec<&Message> = first
        .iter()
        .chain(&during)
        .filter(|m| !seen.contains_key(&m.id()))
        .collect();
    assert!(lost.is_empty(), "{} messages never arrived", lost.len());
}

/// The idle-relay case above runs in-process too, with the relay's own `run` (no process):
/// its `close` of a silent connection is bounded.
#[tokio::test]
#[ignore = "stops the shared RabbitMQ node: run alone by scripts/test.sh"]
async fn an_in_process_relay_stops_in_time_with_rabbitmq_silent() {
    let db = TestDb::new().await;
    let t = topic("silent-in-process");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let mut s = settings(&db);
    s.relay.shutdown_grace = Duration::from_secs(2);
    let relay = start_relay(&s).await;
    enqueue_all(&db, &keyed_messages(&t, 0..3, 3)).await;
    consumer.wait_for(3, WAIT).await;
    let stopped = Stopped::broker(Broker::RabbitMq);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    relay.shutdown.cancel();
    let done = tokio::time::timeout(Duration::from_secs(30), relay.task).await;
    let took = asked.elapsed();
    drop(stopped);
    done.expect("the relay did not stop within 30 s")
        .unwrap()
        .unwrap();
    assert!(
        took <= s.relay.shutdown_grace + Duration::from_secs(5),
        "took {took:?}"
    );
    assert_eq!(leased(&db).await, 0, "partitions left leased");
}
