//! The bookstore saga, the README's first command, runs to completion on RabbitMQ (and on
//! Kafka): three relay
//! sidecars and the operators' commands as real processes; replies through the warehouse's
//! and the merchant's own outboxes, one of them failing before its commit and handled again;
//! a shipment parked for lack of stock and replayed after a restock; two credits lost to a
//! purged queue after delivery and repaired by `reconcile --repair`; reconciliation before
//! and after each fix, and of the replies. Its end is checked by the story itself and again
//! here, from the database.

use std::{path::PathBuf, time::Duration};

use outbox_bookstore::{Broker, Config};
use outbox_tests::{amqp_url, kafka_brokers, topic, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bookstore_conserves_money_and_ships_and_credits_every_paid_order_once() {
    bookstore(Broker::RabbitMq { url: amqp_url() }).await
}

/// The same story through Kafka, where the loss is a member of the merchant's group that
/// commits the credits' offsets without crediting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bookstore_through_kafka_ends_the_same() {
    bookstore(Broker::Kafka {
        brokers: kafka_brokers(),
    })
    .await
}

/// The story creates its roles (`bookstore_*`), which the cluster shares: one run at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn bookstore(broker: Broker) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let db = TestDb::empty().await;
    let mut cfg = Config::new(
        db.url.clone(),
        broker,
        PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay-under-test")),
        PathBuf::from(env!("CARGO_BIN_EXE_outbox-consumer-under-test")),
    );
    cfg.namespace = topic("bookstore");
    cfg.deadline = Duration::from_secs(45);
    let summary = tokio::time::timeout(Duration::from_secs(90), outbox_bookstore::run(&cfg))
        .await
        .expect("the story ends within 90 s")
        .expect("the story runs");
    assert!(summary.ok(), "{:#?}", summary.failures);
    assert_eq!((summary.paid, summary.refused), (9, 3), "{summary:#?}");
    assert_eq!((summary.parked, summary.replayed), (1, 1), "{summary:#?}");
    assert_eq!(
        (summary.delivered, summary.shipped, summary.credited),
        (18, 9, 9),
        "{summary:#?}"
    );
    assert_eq!(summary.replies, 18, "{summary:#?}");
    assert_eq!(
        (summary.repaired, summary.crashed_replies),
        (2, 1),
        "{summary:#?}"
    );
    assert_eq!(
        summary.reconcile_exits,
        vec![Some(1), Some(0), Some(1), Some(0), Some(0), Some(0)],
        "{summary:#?}"
    );
    assert_eq!((summary.money_at_opening, summary.money_at_end), (900, 900));

    // The same, read from the services' tables.
    let money: i64 = sqlx::query_scalar(
        "SELECT (SELECT sum(balance) FROM account.customers) + (SELECT balance FROM merchant.accounts)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(money, 900, "money conserved");
    let wrong: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT o.number,
                (SELECT count(*) FROM warehouse.shipments s WHERE s.order_id = o.id),
                (SELECT count(*) FROM merchant.credits c WHERE c.order_id = o.id)
         FROM account.orders o ORDER BY o.number",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .filter(|(_, shipped, credited)| (*shipped, *credited) != (1, 1))
    .collect();
    assert!(
        wrong.is_empty(),
        "orders not shipped and credited once: {wrong:?}"
    );
    let orders: Vec<i32> = sqlx::query_scalar("SELECT number FROM account.orders ORDER BY number")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        orders,
        vec![1, 2, 4, 5, 6, 7, 9, 11, 12],
        "the paid orders, and no refused one"
    );
    let steps: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT o.number, count(*) FILTER (WHERE s.state = 'done' AND s.replies = 1)
         FROM account.orders o JOIN account.order_steps s ON s.order_id = o.id
         WHERE s.step IN ('shipping', 'crediting')
         GROUP BY o.number ORDER BY o.number",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        steps.len() == 9 && steps.iter().all(|(_, done)| *done == 2),
        "every paid order's shipping and crediting done by one reply each: {steps:?}"
    );
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM account_outbox.messages)
              + (SELECT count(*) FROM warehouse_outbox.messages)
              + (SELECT count(*) FROM merchant_outbox.messages)
              + (SELECT count(*) FROM warehouse_inbox.dead_letters)
              + (SELECT count(*) FROM merchant_inbox.dead_letters)
              + (SELECT count(*) FROM account_inbox.dead_letters)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        leftovers, 0,
        "nothing left in the outbox or the dead letters"
    );
}
