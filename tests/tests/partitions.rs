//! Sharing the 64 partitions between relays: fair shares, handover on shutdown, takeover
//! after a relay stops renewing.

use std::time::{Duration, Instant};

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
