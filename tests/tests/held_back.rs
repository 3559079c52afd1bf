//! Rows waiting behind a dead row of their key (`block`) are marked held back, so reads step
//! over them instead of walking them; the marks go when the dead row is retried or
//! discarded (by the command, or by hand), and per-key order holds throughout. Reads keep
//! to their byte budget.

use std::time::{Duration, Instant};

use outbox::{Message, Schema};
use outbox_relay::{
    config::DeadKeyPolicy,
    dead::{self, DeadFilter},
    store::{Archive, Store, Sweep},
};
use outbox_tests::{enqueue_all, settings, start_relay, topic, with_policy, Consumer, TestDb};
use uuid::Uuid;

const BEHIND: i64 = 3_000;
const WAIT: Duration = Duration::from_secs(30);

/// A store leasing all 64 partitions.
async fn leasing_all(db: &TestDb, policy: DeadKeyPolicy) -> (Store, Uuid, Vec<i16>) {
    let store = Store::new(db.pool.clone(), Schema::default(), policy, Archive::Off);
    let me = Uuid::new_v4();
    let mut owned = Vec::new();
    while owned.len() < 64 {
        owned = store.rebalance(me, Duration::from_secs(60)).await.unwrap();
    }
    (store, me, owned)
}

/// A dead row of key `stuck` with `BEHIND` rows of the key after it, then 200 rows over
/// 20 other keys. Returns the dead row's seq.
async fn stuck_key(db: &TestDb) -> i64 {
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT 't', 'stuck', '\\x00' FROM generate_series(0, $1)",
    )
    .bind(BEHIND)
    .execute(&db.pool)
    .await
    .unwrap();
    let head: i64 = sqlx::query_scalar(
        "UPDATE outbox.messages SET status = 'dead', attempts = 1, last_error = 'test',
                dead_at = now()
         WHERE seq = (SELECT min(seq) FROM outbox.messages) RETURNING seq",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT 't', 'k' || (i % 20), '\\x00' FROM generate_series(1, 200) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE outbox.messages")
        .execute(&db.pool)
        .await
        .unwrap();
    head
}

/// What a sweep marked and cleared.
fn marks(s: Sweep) -> (u64, u64) {
    (s.marked, s.cleared)
}

fn limits(owned: &[i16]) -> Vec<(i16, u32)> {
    owned.iter().map(|&p| (p, 500)).collect()
}

#[tokio::test]
async fn rows_behind_a_dead_row_are_stepped_over_not_walked() {
    let db = TestDb::new().await;
    stuck_key(&db).await;
    let (store, me, owned) = leasing_all(&db, DeadKeyPolicy::Block).await;

    let claim = store
        .claim_from(me, &limits(&owned), u64::MAX, &[])
        .await
        .unwrap();
    assert_eq!(
        claim.envelopes.len(),
        200,
        "only the other keys' rows are read"
    );
    let walked = store
        .rows_examined_by_claim(me, &limits(&owned), &[])
        .await
        .unwrap();
    assert!(
        walked > BEHIND as u64,
        "before the marks, a read walks the waiting rows: {walked} rows examined"
    );

    assert_eq!(
        marks(store.hold_back(me).await.unwrap()),
        (BEHIND as u64, 0)
    );
    assert_eq!(
        marks(store.hold_back(me).await.unwrap()),
        (0, 0),
        "nothing to redo"
    );
    let stepped = store
        .rows_examined_by_claim(me, &limits(&owned), &[])
        .await
        .unwrap();
    assert!(
        stepped <= 400,
        "a read must not look at the held-back rows: {stepped} rows examined (was {walked})"
    );
    let claim = store
        .claim_from(me, &limits(&owned), u64::MAX, &[])
        .await
        .unwrap();
    assert_eq!(claim.envelopes.len(), 200);
    assert!(claim
        .envelopes
        .iter()
        .all(|e| e.key.as_deref() != Some("stuck")));

    // A row of the key written after the marks waits too, and is marked by the next sweep.
    sqlx::query("INSERT INTO outbox.messages (topic, key, payload) VALUES ('t', 'stuck', '\\x01')")
        .execute(&db.pool)
        .await
        .unwrap();
    let claim = store
        .claim_from(me, &limits(&owned), u64::MAX, &[])
        .await
        .unwrap();
    assert!(
        claim
            .envelopes
            .iter()
            .all(|e| e.key.as_deref() != Some("stuck")),
        "a new row of a held-back key must not be read"
    );
    assert_eq!(marks(store.hold_back(me).await.unwrap()), (1, 0));
}

#[tokio::test]
async fn a_retried_or_discarded_dead_row_frees_its_key_in_order() {
    let db = TestDb::new().await;
    let head = stuck_key(&db).await;
    let (store, me, owned) = leasing_all(&db, DeadKeyPolicy::Block).await;
    marks(store.hold_back(me).await.unwrap());
    assert_eq!(db.held_back().await, BEHIND);

    // `dead retry` clears the marks in its own transaction: no sweep needed.
    let filter = DeadFilter {
        key: Some("stuck".into()),
        ..Default::default()
    };
    let retried = dead::retry(&db.pool, &Schema::default(), &filter)
        .await
        .unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(db.held_back().await, 0, "retry clears the marks of its key");
    let stuck_seqs = |c: &outbox_relay::store::Claim| -> Vec<i64> {
        c.envelopes
            .iter()
            .filter(|e| e.key.as_deref() == Some("stuck"))
            .map(|e| e.seq)
            .collect()
    };
    let claim = store
        .claim_from(me, &limits(&owned), u64::MAX, &[])
        .await
        .unwrap();
    let seqs = stuck_seqs(&claim);
    assert_eq!(
        seqs.first(),
        Some(&head),
        "the retried row comes first for its key"
    );
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in seq order");

    // Dead again, marked again; this time discarded.
    sqlx::query(
        "UPDATE outbox.messages SET status = 'dead', attempts = 1, dead_at = now() WHERE seq = $1",
    )
    .bind(head)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        marks(store.hold_back(me).await.unwrap()),
        (BEHIND as u64, 0)
    );
    dead::discard(&db.pool, &Schema::default(), &filter, "test")
        .await
        .unwrap();
    assert_eq!(
        db.held_back().await,
        0,
        "discard clears the marks of its key"
    );
    let claim = store
        .claim_from(me, &limits(&owned), u64::MAX, &[])
        .await
        .unwrap();
    assert_eq!(stuck_seqs(&claim).first(), Some(&(head + 1)));
}

#[tokio::test]
async fn marks_whose_dead_row_went_by_hand_or_under_skip_are_cleared_by_the_sweep() {
    let db = TestDb::new().await;
    let head = stuck_key(&db).await;
    let (store, me, owned) = leasing_all(&db, DeadKeyPolicy::Block).await;
    marks(store.hold_back(me).await.unwrap());

    // An operator re-queues the dead row with SQL, not with the command.
    sqlx::query("UPDATE outbox.messages SET status = 'pending', attempts = 0, dead_at = NULL WHERE seq = $1")
        .bind(head)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(db.held_back().await, BEHIND);
    let claim = store
        .claim_from(me, &limits(&owned), u64::MAX, &[])
        .await
        .unwrap();
    let stuck: Vec<i64> = claim
        .envelopes
        .iter()
        .filter(|e| e.key.as_deref() == Some("stuck"))
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        stuck,
        vec![head],
        "held-back rows still wait behind their key's head, whatever its state"
    );
    assert_eq!(
        marks(store.hold_back(me).await.unwrap()),
        (0, BEHIND as u64)
    );
    assert_eq!(db.held_back().await, 0);

    // Under `skip`, dead rows hold nothing back: a relay with that policy clears the marks.
    sqlx::query(
        "UPDATE outbox.messages SET status = 'dead', attempts = 1, dead_at = now() WHERE seq = $1",
    )
    .bind(head)
    .execute(&db.pool)
    .await
    .unwrap();
    marks(store.hold_back(me).await.unwrap());
    assert_eq!(db.held_back().await, BEHIND);
    store.release_all(me).await.unwrap();
    let (skip, me2, owned2) = leasing_all(&db, DeadKeyPolicy::Skip).await;
    assert_eq!(
        marks(skip.hold_back(me2).await.unwrap()),
        (0, BEHIND as u64)
    );
    let claim = skip
        .claim_from(me2, &limits(&owned2), u64::MAX, &[])
        .await
        .unwrap();
    assert_eq!(
        claim
            .envelopes
            .iter()
            .filter(|e| e.key.as_deref() == Some("stuck"))
            .map(|e| e.seq)
            .next(),
        Some(head + 1),
        "under skip the rows behind the dead row are read, oldest first"
    );
}

/// Makes the first row a retrying one: failed once, due again in `delay`.
async fn retrying_head(db: &TestDb, head: i64, delay: &str) {
    sqlx::query(
        "UPDATE outbox.messages SET status = 'pending', attempts = 1, last_error = 'test',
                dead_at = NULL, available_at = now() + $2::interval
         WHERE seq = $1",
    )
    .bind(head)
    .bind(delay)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn rows_behind_a_row_waiting_out_a_retry_delay_are_stepped_over_until_it_is_due() {
    for policy in [DeadKeyPolicy::Block, DeadKeyPolicy::Skip] {
        let db = TestDb::new().await;
        let head = stuck_key(&db).await;
        retrying_head(&db, head, "1 hour").await;
        let (store, me, owned) = leasing_all(&db, policy).await;
        let walked = store
            .rows_examined_by_claim(me, &limits(&owned), &[])
            .await
            .unwrap();
        assert!(
            walked > BEHIND as u64,
            "{policy:?}: before the marks, a read walks the waiting rows: {walked} examined"
        );

        assert_eq!(
            marks(store.hold_back(me).await.unwrap()),
            (BEHIND as u64, 0),
            "{policy:?}"
        );
        let stepped = store
            .rows_examined_by_claim(me, &limits(&owned), &[])
            .await
            .unwrap();
        assert!(
            stepped <= 400,
            "{policy:?}: a read must step over the rows behind a retrying row: {stepped} examined (was {walked})"
        );
        let claim = store
            .claim_from(me, &limits(&owned), u64::MAX, &[])
            .await
            .unwrap();
        assert_eq!(
            claim.envelopes.len(),
            200,
            "{policy:?}: the other keys' rows only"
        );

        // Due again: the marks go, and the key comes back in order, its head first.
        sqlx::query("UPDATE outbox.messages SET available_at = now() WHERE seq = $1")
            .bind(head)
            .execute(&db.pool)
            .await
            .unwrap();
        assert_eq!(
            marks(store.hold_back(me).await.unwrap()),
            (0, BEHIND as u64),
            "{policy:?}"
        );
        let claim = store
            .claim_from(me, &limits(&owned), u64::MAX, &[])
            .await
            .unwrap();
        let stuck: Vec<i64> = claim
            .envelopes
            .iter()
            .filter(|e| e.key.as_deref() == Some("stuck"))
            .map(|e| e.seq)
            .collect();
        assert_eq!(
            stuck.first(),
            Some(&head),
            "{policy:?}: the retried row first"
        );
        assert!(
            stuck.windows(2).all(|w| w[0] < w[1]),
            "{policy:?}: in seq order"
        );
    }
}

#[tokio::test]
async fn a_short_retry_delay_marks_nothing() {
    let db = TestDb::new().await;
    let head = stuck_key(&db).await;
    retrying_head(&db, head, "1 second").await;
    let (store, me, _) = leasing_all(&db, DeadKeyPolicy::Block).await;
    assert_eq!(marks(store.hold_back(me).await.unwrap()), (0, 0));
    assert_eq!(db.held_back().await, 0);
}

#[tokio::test]
async fn a_sweep_walks_only_the_rows_that_arrived_since_the_last_one() {
    let db = TestDb::new().await;
    // A dead row of `stuck`, then rows of other keys in its partition only.
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload, status, attempts, last_error, dead_at)
         VALUES ('t', 'stuck', '\\x00', 'dead', 1, 'test', now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let others = |n: i64, from: i64| {
        sqlx::query(
            "INSERT INTO outbox.messages (topic, key, payload)
             SELECT 't', k, '\\x00'
             FROM (SELECT 'o' || i AS k FROM generate_series($2, $2 + $1 * 80) i) keys
             WHERE (hashtext(k) & 63) = (hashtext('stuck') & 63)
             LIMIT $1",
        )
        .bind(n)
        .bind(from)
    };
    others(2_000, 0).execute(&db.pool).await.unwrap();
    let (store, me, _) = leasing_all(&db, DeadKeyPolicy::Block).await;

    let first = store.hold_back(me).await.unwrap();
    assert_eq!(
        (first.marked, first.walked),
        (0, 2_000),
        "the first sweep walks the partition once"
    );
    let idle = store.hold_back(me).await.unwrap();
    assert_eq!(idle.walked, 0, "nothing arrived: nothing is walked again");

    others(10, 1_000_000).execute(&db.pool).await.unwrap();
    sqlx::query("INSERT INTO outbox.messages (topic, key, payload) VALUES ('t', 'stuck', '\\x01')")
        .execute(&db.pool)
        .await
        .unwrap();
    let next = store.hold_back(me).await.unwrap();
    assert_eq!(
        (next.marked, next.walked),
        (1, 11),
        "only the 11 new rows are looked at"
    );

    // The dead row dies again after a retry: its key is walked behind again from its seq.
    sqlx::query(
        "UPDATE outbox.messages SET dead_at = now() + interval '1 second' WHERE status = 'dead'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let again = store.hold_back(me).await.unwrap();
    assert_eq!(
        again.walked, 2_010,
        "a head that failed again is walked behind from its seq"
    );
}

/// A read keeps, in `seq` order, the rows that start within its byte budget (the first
/// always), whole; the partition it cut short, or whose row limit it reached, is reported as
/// having more.
#[tokio::test]
async fn a_read_takes_the_rows_that_start_within_its_byte_budget_and_says_which_had_more() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT 't', 'a', convert_to(repeat(i::text, 1000), 'UTF8') FROM generate_series(1, 9) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let part: i16 = sqlx::query_scalar("SELECT DISTINCT partition FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let (store, me, owned) = leasing_all(&db, DeadKeyPolicy::Block).await;
    let all: Vec<i64> = sqlx::query_scalar("SELECT seq FROM outbox.messages ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();

    for (bytes, want) in [(2_500, 3), (2_000, 2), (0, 1), (u64::MAX, 9)] {
        let claim = store
            .claim_from(me, &limits(&owned), bytes, &[])
            .await
            .unwrap();
        let seqs: Vec<i64> = claim.envelopes.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, all[..want], "a budget of {bytes} bytes");
        for (i, env) in claim.envelopes.iter().enumerate() {
            let digit = char::from(b'1' + i as u8).to_string();
            assert_eq!(
                env.payload,
                digit.repeat(1000).into_bytes(),
                "row {i} whole"
            );
        }
        let more = if want < 9 { vec![part] } else { vec![] };
        assert_eq!(claim.full, more, "partitions with more, budget {bytes}");
    }
    let claim = store
        .claim_from(me, &[(part, 4)], u64::MAX, &[])
        .await
        .unwrap();
    assert_eq!(claim.envelopes.len(), 4);
    assert_eq!(
        claim.full,
        vec![part],
        "the row limit reached: more to read"
    );
}

/// Through a running relay: the rows behind a dead row are marked held back, and when the
/// dead row is deleted by hand the marks go stale; the relay's sweep clears them, and the
/// key's rows then arrive, every one, in order.
#[tokio::test]
async fn a_running_relay_clears_stale_marks_and_the_key_drains_in_order() {
    let db = TestDb::new().await;
    let t = topic("stale-marks");
    let consumer = Consumer::connect().await;
    consumer.queue(&t).await;
    let msgs: Vec<Message> = (0..51u8)
        .map(|i| Message::new(&t, vec![i]).unwrap().with_key("k").unwrap())
        .collect();
    enqueue_all(&db, &msgs).await;
    let head: i64 = sqlx::query_scalar(
        "UPDATE outbox.messages SET status = 'dead', attempts = 1, last_error = 'test',
                dead_at = now()
         WHERE id = $1 RETURNING seq",
    )
    .bind(msgs[0].id())
    .fetch_one(&db.pool)
    .await
    .unwrap();

    let relay = start_relay(&with_policy(settings(&db), DeadKeyPolicy::Block)).await;
    let start = Instant::now();
    while db.held_back().await < 50 {
        assert!(
            start.elapsed() < WAIT,
            "the sweep marked {} of the 50 rows behind the dead one",
            db.held_back().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        consumer.received().is_empty(),
        "a row behind the dead one was published"
    );

    sqlx::query("DELETE FROM outbox.messages WHERE seq = $1")
        .bind(head)
        .execute(&db.pool)
        .await
        .unwrap();
    let got = consumer.wait_for(50, WAIT).await;
    relay.stop().await;
    let ids: Vec<Uuid> = got.iter().map(|r| r.id).collect();
    let want: Vec<Uuid> = msgs[1..].iter().map(Message::id).collect();
    assert_eq!(ids, want, "the key's rows, each once, in order");
    assert_eq!(db.held_back().await, 0, "no mark is left");
}
