//! The producer library against a real PostgreSQL: atomicity, ids, batches, migrations.

use outbox::{Message, Outbox, Schema};
use outbox_tests::TestDb;
use uuid::Uuid;

#[tokio::test]
async fn enqueued_rows_are_invisible_before_commit_and_gone_after_rollback() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    let msg = Message::new("t", b"x".to_vec()).unwrap();
    outbox::enqueue(&mut *tx, &msg).await.unwrap();
    assert_eq!(
        db.count("pending").await,
        0,
        "another session saw an uncommitted message"
    );
    tx.rollback().await.unwrap();
    assert_eq!(db.count("pending").await, 0, "a rolled-back message stayed");

    let mut tx = db.pool.begin().await.unwrap();
    let enq = outbox::enqueue(&mut *tx, &msg).await.unwrap();
    tx.commit().await.unwrap();
    let (id, payload): (Uuid, Vec<u8>) =
        sqlx::query_as("SELECT id, payload FROM outbox.messages WHERE seq = $1")
            .bind(enq.seq)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((id, payload), (msg.id(), b"x".to_vec()));
}

#[tokio::test]
async fn a_duplicate_id_is_a_typed_error() {
    let db = TestDb::new().await;
    let msg = Message::new("t", vec![]).unwrap();
    outbox::enqueue(&db.pool, &msg).await.unwrap();
    let err = outbox::enqueue(&db.pool, &msg).await.unwrap_err();
    assert!(
        matches!(err, outbox::Error::DuplicateId(id) if id == msg.id()),
        "{err:?}"
    );
    let batch = vec![Message::new("t", vec![]).unwrap(), msg.clone()];
    let err = Outbox::default()
        .enqueue_batch(&db.pool, &batch)
        .await
        .unwrap_err();
    assert!(
        matches!(err, outbox::Error::DuplicateId(id) if id == msg.id()),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_batch_keeps_slice_order_in_seq() {
    let db = TestDb::new().await;
    let msgs: Vec<Message> = (0..50)
        .map(|i| {
            Message::new("t", vec![i as u8])
                .unwrap()
                .with_key(format!("k{}", i % 3))
                .unwrap()
        })
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    let placed = Outbox::default()
        .enqueue_batch(&mut *tx, &msgs)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        placed.iter().map(|p| p.id).collect::<Vec<_>>(),
        msgs.iter().map(Message::id).collect::<Vec<_>>()
    );
    assert!(
        placed.windows(2).all(|w| w[0].seq < w[1].seq),
        "seqs not increasing: {placed:?}"
    );
    let stored: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM outbox.messages ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, (0..50).map(|i| vec![i as u8]).collect::<Vec<_>>());
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_concurrently_in_a_custom_schema() {
    let db = TestDb::empty().await;
    let outbox = Outbox::new(Schema::parse("billing_outbox").unwrap());
    let (a, b) = tokio::join!(outbox.migrate(&db.pool), outbox.migrate(&db.pool));
    // Each migration runs in its own transaction under the schema's lock, so two calls
    // may share the work; together they apply each migration exactly once.
    let mut applied = [a.unwrap(), b.unwrap()].concat();
    applied.sort_unstable();
    assert_eq!(
        applied,
        (1..=outbox::LATEST_VERSION).collect::<Vec<_>>(),
        "two concurrent calls apply each migration exactly once"
    );
    assert_eq!(outbox.migrate(&db.pool).await.unwrap(), Vec::<i32>::new());
    let msg = Message::new("t", vec![]).unwrap();
    outbox.enqueue(&db.pool, &msg).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_changed_migration_is_refused() {
    let db = TestDb::new().await;
    sqlx::query("UPDATE outbox.schema_migrations SET checksum = 'tampered' WHERE version = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    let err = outbox::migrate(&db.pool).await.unwrap_err();
    assert!(
        matches!(err, outbox::Error::MigrationChanged { version: 1, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_schema_rejects_rows_the_relay_could_not_publish() {
    let db = TestDb::new().await;
    for (sql, constraint) in [
        (
            "INSERT INTO outbox.messages (topic, payload) VALUES ('', 'x')",
            "messages_topic_check",
        ),
        (
            "INSERT INTO outbox.messages (topic, payload, headers) VALUES ('t', 'x', '{\"n\": 1}')",
            "messages_header_values_check",
        ),
        (
            "INSERT INTO outbox.messages (topic, payload, headers) VALUES ('t', 'x', '[]')",
            "messages_headers_check",
        ),
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.constraint(), Some(constraint), "{sql}: {err}");
    }
}
