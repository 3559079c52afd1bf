//! `KafkaSource` under a stuck partition: the partition whose lane and overflow are full is
//! paused alone, the others keep flowing, and the consumer keeps polling, so it stays in its
//! group past `max.poll.interval.ms`. A binary of its own: it installs a global tracing layer
//! to count partition pauses and revocations.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use outbox_consumer::{
    kafka::KafkaSource, Deduplicator, Handler, HandlerError, Incoming, RetryPolicy,
};
use outbox_tests::{kafka_brokers, topic, Consumer, TestDb};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;

/// Counts log events whose message contains a phrase.
struct Counting {
    phrase: &'static str,
    seen: Arc<AtomicUsize>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counting {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message<'p>(&'p str, bool);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" && format!("{value:?}").contains(self.0) {
                    self.1 = true;
                }
            }
        }
        let mut m = Message(self.phrase, false);
        event.record(&mut m);
        if m.1 {
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Fails the message "stuck" forever (retryable); records the payload of every other.
#[derive(Default)]
struct Recorder {
    handled: Mutex<Vec<String>>,
}

impl Handler for Recorder {
    fn handle<'a>(
        &'a self,
        _: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let payload = String::from_utf8_lossy(&m.payload).into_owned();
            if payload == "stuck" {
                return Err(HandlerError::retryable("inventory down (on purpose)"));
            }
            self.handled.lock().unwrap().push(payload);
            Ok(())
        })
    }
}

async fn produce(producer: &FutureProducer, topic: &str, partition: i32, payload: &str) {
    let id = uuid::Uuid::new_v4().to_string();
    let headers = OwnedHeaders::new().insert(Header {
        key: "outbox-id",
        value: Some(id.as_str()),
    });
    producer
        .send(
            FutureRecord::<str, str>::to(topic)
                .partition(partition)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
}

fn handled_with(recorder: &Recorder, prefix: &str) -> usize {
    recorder
        .handled
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.starts_with(prefix))
        .count()
}

async fn wait_handled(recorder: &Recorder, prefix: &str, n: usize, within: Duration) {
    let start = Instant::now();
    while handled_with(recorder, prefix) < n {
        assert!(
            start.elapsed() < within,
            "{} of {n} {prefix}* messages handled within {within:?}: a stuck partition held the others back",
            handled_with(recorder, prefix)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stuck_partition_is_paused_alone_and_the_consumer_stays_in_its_group() {
    let revoked = Arc::new(AtomicUsize::new(0));
    let paused = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(Counting {
                phrase: "partition revoked",
                seen: revoked.clone(),
            })
            .with(Counting {
                phrase: "partition paused",
                seen: paused.clone(),
            }),
    )
    .expect("the only subscriber of this binary");

    let db = TestDb::new().await;
    let t = topic("backpressure");
    Consumer::kafka().declare(&t).await; // 3 partitions
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    // Partition 0: a message that never succeeds, then more than its lane and the reader's
    // overflow hold (256 + 4,096) behind it, so that the partition is paused.
    produce(&producer, &t, 0, "stuck").await;
    for chunk in (0..4600).collect::<Vec<_>>().chunks(500) {
        let payloads: Vec<String> = chunk.iter().map(|i| format!("p0-{i}")).collect();
        futures::future::join_all(payloads.iter().map(|p| produce(&producer, &t, 0, p))).await;
    }

    let dedup = Deduplicator::new(db.pool.clone(), "backpressure")
        .unwrap()
        .with_retry(RetryPolicy {
            initial_delay: Duration::from_millis(100),
            factor: 2.0,
            max_delay: Duration::from_millis(500),
            max_attempts: 10_000,
        });
    dedup.migrate().await.unwrap();
    let recorder = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    let max_poll = Duration::from_secs(6);
    let source = KafkaSource::new(&kafka_brokers(), &format!("g-{t}"), &[&t])
        .with_property("session.timeout.ms", "6000")
        .with_property("max.poll.interval.ms", &max_poll.as_millis().to_string());
    let running = tokio::spawn({
        let (recorder, shutdown) = (recorder.clone(), shutdown.clone());
        async move { source.run(dedup, recorder, shutdown).await }
    });
    let started = Instant::now();

    // Let partition 0's lane fill up behind the stuck message.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in [1, 2] {
        for i in 0..50 {
            produce(&producer, &t, p, &format!("p{p}-{i}")).await;
        }
    }
    wait_handled(&recorder, "p1-", 50, Duration::from_secs(15)).await;
    wait_handled(&recorder, "p2-", 50, Duration::from_secs(15)).await;
    assert_eq!(
        handled_with(&recorder, "p0-"),
        0,
        "partition 0 keeps its order: nothing passes the stuck message"
    );
    assert!(
        paused.load(Ordering::SeqCst) >= 1,
        "partition 0 was never paused with 4,600 messages behind its stuck head: the reader \
         would hold them all"
    );

    // Past max.poll.interval.ms with partition 0 still stuck: still a member, still served.
    let past = max_poll * 3 / 2;
    if let Some(rest) = past.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    for i in 50..60 {
        produce(&producer, &t, 1, &format!("p1-{i}")).await;
    }
    wait_handled(&recorder, "p1-", 60, Duration::from_secs(10)).await;
    assert_eq!(
        revoked.load(Ordering::SeqCst),
        0,
        "the consumer lost its partitions: it left the group"
    );

    shutdown.cancel();
    running.await.unwrap().unwrap();
}
