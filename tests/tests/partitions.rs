//! Sharing the 64 partitions between relays: fair shares, handover on shutdown, takeover
//! after a relay stops renewing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, FutureExt};
use outbox_relay::{
    envelope::Envelope,
    publish::{PublishError, Publisher},
};

use outbox_tests::{relay, settings, TestDb};

fn disjoint(a: &[i16], b: &[i16]) -> bool {
    a.iter().all(|p| !b.contains(p))
}

#[tokio::test]
async fn relays_split_the_partitions_evenly_and_never_share_one() {
    let db = TestDb::new().await;
    let s = settings(&db);
    let (a, b) = (relay(&s).await, relay(&s).await);
    assert_eq!(
        a.rebalance().await.unwrap().len(),
        64,
        "a lone relay takes every partition"
    );
    // B sees two live relays but nothing free; A gives up half; B takes it.
    assert_eq!(b.rebalance().await.unwrap().len(), 0);
    let a_owned = a.rebalance().await.unwrap();
    let b_owned = b.rebalance().await.unwrap();
    assert_eq!((a_owned.len(), b_owned.len()), (32, 32));
    assert!(
        disjoint(&a_owned, &b_owned),
        "a partition has two owners: {a_owned:?} / {b_owned:?}"
    );

    let c = relay(&s).await;
    c.rebalance().await.unwrap();
    let mut owned = Vec::new();
    for _ in 0..3 {
        owned = vec![
            a.rebalance().await.unwrap(),
            b.rebalance().await.unwrap(),
            c.rebalance().await.unwrap(),
        ];
    }
    let sizes: Vec<usize> = owned.iter().map(Vec::len).collect();
    assert_eq!(
        sizes.iter().sum::<usize>(),
        64,
        "every partition owned once: {sizes:?}"
    );
    // Nobody holds more than its fair share, ceil(64 / 3) = 22.
    assert!(
        sizes.iter().all(|n| (20..=22).contains(n)),
        "uneven shares {sizes:?}"
    );
    assert!(
        disjoint(&owned[0], &owned[1])
            && disjoint(&owned[1], &owned[2])
            && disjoint(&owned[0], &owned[2])
    );
}

#[tokio::test]
async fn a_relay_that_stops_renewing_is_taken_over_after_its_lease() {
    let db = TestDb::new().await;
    let mut s = settings(&db);
    s.relay.lease = Duration::from_secs(1);
    let (a, b) = (relay(&s).await, relay(&s).await);
    a.rebalance().await.unwrap();
    b.rebalance().await.unwrap();
    a.rebalance().await.unwrap();
    assert_eq!(b.rebalance().await.unwrap().len(), 32);
    // A goes silent (as if killed). B must hold everything within about one lease.
    let start = Instant::now();
    loop {
        let owned = b.rebalance().await.unwrap();
        if owned.len() == 64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "B holds {} partitions after {:?}",
            owned.len(),
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "took over after {took:?}, before A's lease could have run out"
    );
    println!("takeover after {took:?} with a 1 s lease");
}

/// The relay's publisher, with every confirm 1.5 s late.
struct SlowConfirms(Arc<dyn Publisher>);

impl Publisher for SlowConfirms {
    fn ready(&self) -> BoxFuture<'_, Result<(), PublishError>> {
        self.0.ready()
    }

    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), PublishError>> {
        async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            self.0.publish(envelope).await
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'_, Result<(), String>> {
        self.0.health()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.0.close()
    }
}

/// A planned handover publishes nothing twice, even when the partition keeper is slow
/// between looking at the partitions in hand and giving partitions up (a delay injected
/// there): no read starts in between, and none reads a partition given up since it was
/// planned. Relay A, whose confirms are slow, drains a light stream of keys; relay B joins
/// and leaves three times, and each time A hands half of its partitions over mid-stream.
#[tokio::test]
async fn a_slow_handover_publishes_nothing_twice() {
    use outbox::Message;
    let db = TestDb::new().await;
    let t = outbox_tests::topic("slow-handover");
    let consumer = outbox_tests::Consumer::connect().await;
    consumer.queue(&t).await;
    let mut s = settings(&db);
    s.relay.lease = Duration::from_secs(2);
    // A's confirms take 1.5 s, so the rows it reads stay in hand while B takes partitions.
    let slow = Arc::new(SlowConfirms(outbox_relay::startup::publisher(&s).unwrap()));
    let a = outbox_tests::relay_with(&s, slow).await;
    a.inject_handover_delay(Duration::from_millis(300));
    let a = outbox_tests::run_relay(a);

    let pool = db.pool.clone();
    let topic = t.clone();
    // A light stream of one message every 50 ms, each of a key of its own: A holds a few
    // dozen rows at a time, so most partitions have nothing in hand when its keeper looks,
    // and new rows land in them while the keeper waits.
    let producer = tokio::spawn(async move {
        let mut written = Vec::new();
        let started = Instant::now();
        let mut n = 0usize;
        while started.elapsed() < Duration::from_secs(9) {
            let msg = Message::new(&topic, n.to_string().into_bytes())
                .unwrap()
                .with_key(format!("k{n}"))
                .unwrap();
            outbox::enqueue(&pool, &msg).await.unwrap();
            written.push(msg.id());
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        written
    });
    // B joins (A hands half of its partitions over) and leaves again, three times.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let b = outbox_tests::start_relay(&s).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        b.stop().await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let b = outbox_tests::start_relay(&s).await;
    let written = producer.await.unwrap();
    consumer
        .wait_for_distinct(written.len(), Duration::from_secs(60))
        .await;
    // Late duplicates would arrive now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.stop().await;
    b.stop().await;
    let got = consumer.received();
    let arrived: std::collections::HashSet<uuid::Uuid> = got.iter().map(|r| r.id).collect();
    assert!(
        written.iter().all(|id| arrived.contains(id)),
        "a message was lost"
    );
    outbox_tests::assert_per_key_order(&got);
    let duplicates = got.len() - arrived.len();
    assert_eq!(
        duplicates,
        0,
        "{duplicates} of {} messages published twice across a planned handover",
        written.len()
    );
}
