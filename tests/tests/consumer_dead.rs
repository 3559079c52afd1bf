//! Operators and the consumers' dead letters: a replay after a fix applies the effect exactly
//! once (replayed twice, replayed concurrently, or already processed meanwhile), a discard
//! removes the letter and keeps the reason, and an unnarrowed change is refused. Through the
//! library and through the `outbox-consumer` command with a running consumer.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::future::BoxFuture;
use outbox::Message;
use outbox_consumer::{
    rabbitmq::RabbitMqSource, DeadLetters, Deduplicator, Handler, HandlerError, Incoming,
    LetterFilter, Outcome, ReplayOutcome, RetryPolicy,
};
use outbox_tests::{
    amqp_url, enqueue_all, settings, start_relay, topic, Consumer, RelayProcess, TestDb,
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Writes one effect row per handled message; fails for good while `broken`.
struct Effects {
    broken: AtomicBool,
}

impl Effects {
    fn broken() -> Arc<Self> {
        Arc::new(Self {
            broken: AtomicBool::new(true),
        })
    }

    fn fix(&self) {
        self.broken.store(false, Ordering::SeqCst);
    }
}

impl Handler for Effects {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if self.broken.load(Ordering::SeqCst) {
                return Err(HandlerError::permanent("the price list has no such book"));
            }
            sqlx::query("INSERT INTO effects (message_id, payload) VALUES ($1, $2)")
                .bind(m.message_id)
                .bind(String::from_utf8_lossy(&m.payload).into_owned())
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
            Ok(())
        })
    }
}

async fn setup(db: &TestDb, group: &str) -> Deduplicator {
    sqlx::query("CREATE TABLE IF NOT EXISTS effects (n bigserial PRIMARY KEY, message_id uuid, payload text)")
        .execute(&db.pool)
        .await
        .unwrap();
    let dedup = Deduplicator::new(db.pool.clone(), group)
        .unwrap()
        .with_retry(RetryPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            max_attempts: 2,
            ..Default::default()
        })
        .with_replay_interval(Duration::from_millis(100));
    dedup.migrate().await.unwrap();
    dedup
}

async fn effects(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn incoming(id: Uuid) -> Incoming {
    Incoming::new(
        "orders",
        b"order 7".to_vec(),
        BTreeMap::from([
            ("outbox-id".to_owned(), id.to_string()),
            ("outbox-key".to_owned(), "order-7".to_owned()),
        ]),
    )
}

fn letters(db: &TestDb) -> DeadLetters {
    DeadLetters::new(db.pool.clone(), "outbox_consumer".parse().unwrap())
}

/// Parks `m` in `dedup`'s dead letters with a handler that is broken; returns the letter.
async fn park(dedup: &Deduplicator, db: &TestDb, m: &Incoming) -> i64 {
    let outcome = dedup.handle(m, Effects::broken().as_ref()).await.unwrap();
    assert!(
        matches!(outcome, Outcome::DeadLettered { .. }),
        "{outcome:?}"
    );
    let parked = letters(db)
        .list(
            &LetterFilter {
                message_ids: vec![m.message_id.unwrap()],
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    parked.last().expect("a dead letter").letter
}

async fn settled_outcome(db: &TestDb, letter: i64) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT outcome, reason FROM outbox_consumer.settled_letters WHERE id = $1")
        .bind(letter)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
}

/// The fixed handler replays the letter once; replaying it again, and replaying a second
/// letter of the same message (parked again after its dedup row was purged), apply nothing.
#[tokio::test]
async fn a_replay_after_the_fix_applies_the_effect_once_however_often_it_is_replayed() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let m = incoming(Uuid::new_v4());
    let id = m.message_id.unwrap();
    let first = park(&dedup, &db, &m).await;
    assert_eq!(
        dedup.handle(&m, Effects::broken().as_ref()).await.unwrap(),
        Outcome::Duplicate,
        "a parked message's redelivery waits for the operator"
    );
    // Parked a second time: its dedup row purged, then delivered again while still broken.
    dedup.purge(Duration::ZERO, 100).await.unwrap();
    let second = park(&dedup, &db, &m).await;
    assert_ne!(first, second);

    let fixed = Effects::broken();
    fixed.fix();
    let replays = dedup
        .replay_dead_letters(&LetterFilter::every(), fixed.as_ref())
        .await
        .unwrap();
    let outcomes: Vec<(i64, ReplayOutcome)> = replays
        .iter()
        .map(|r| (r.letter, r.outcome.clone()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (first, ReplayOutcome::Processed),
            (second, ReplayOutcome::Duplicate)
        ]
    );
    assert_eq!(effects(&db.pool, id).await, 1, "message {id}: one effect");
    assert_eq!(
        dedup
            .replay_dead_letters(&LetterFilter::letters([first, second]), fixed.as_ref())
            .await
            .unwrap(),
        vec![],
        "settled letters are not replayed again"
    );
    assert_eq!(
        dedup.handle(&m, fixed.as_ref()).await.unwrap(),
        Outcome::Duplicate,
        "after the replay a redelivery is a duplicate"
    );
    assert_eq!(effects(&db.pool, id).await, 1, "message {id}: one effect");
    assert_eq!(settled_outcome(&db, first).await.unwrap().0, "replayed");
    assert_eq!(settled_outcome(&db, second).await.unwrap().0, "duplicate");
    assert_eq!(dedup.stats().replayed, 1);
}

/// A message handled after it was parked (its dedup row purged, then a redelivery handled
/// by the fixed handler) is not handled again by the replay of its letter.
#[tokio::test]
async fn replaying_a_letter_whose_message_was_processed_meanwhile_applies_nothing() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let m = incoming(Uuid::new_v4());
    let id = m.message_id.unwrap();
    let letter = park(&dedup, &db, &m).await;
    dedup.purge(Duration::ZERO, 100).await.unwrap();
    let fixed = Effects::broken();
    fixed.fix();
    assert_eq!(
        dedup.handle(&m, fixed.as_ref()).await.unwrap(),
        Outcome::Processed
    );
    let replays = dedup
        .replay_dead_letters(&LetterFilter::letters([letter]), fixed.as_ref())
        .await
        .unwrap();
    assert_eq!(replays.len(), 1);
    assert_eq!(replays[0].outcome, ReplayOutcome::Duplicate);
    assert_eq!(replays[0].message_id, Some(id));
    assert_eq!(effects(&db.pool, id).await, 1, "message {id}: one effect");
    assert!(letters(&db)
        .list(&LetterFilter::every(), 10)
        .await
        .unwrap()
        .is_empty());
}

/// Four replays of one letter at once: one runs the handler, the others find nothing to do.
#[tokio::test]
async fn concurrent_replays_of_one_letter_apply_the_effect_once() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let m = incoming(Uuid::new_v4());
    let id = m.message_id.unwrap();
    let letter = park(&dedup, &db, &m).await;
    let fixed = Effects::broken();
    fixed.fix();
    let filter = LetterFilter::letters([letter]);
    let runs = futures::future::join_all(
        (0..4).map(|_| dedup.replay_dead_letters(&filter, fixed.as_ref())),
    )
    .await;
    let processed = runs
        .into_iter()
        .flat_map(|r| r.unwrap())
        .filter(|r| r.outcome == ReplayOutcome::Processed)
        .count();
    assert_eq!(processed, 1, "exactly one replay ran the handler");
    assert_eq!(effects(&db.pool, id).await, 1, "message {id}: one effect");
}

/// A replay that fails again leaves the letter parked, with the new error and one more
/// attempt, and applies nothing; an unnarrowed replay through the library is refused.
#[tokio::test]
async fn a_failed_replay_leaves_the_letter_parked_with_the_new_error() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let m = incoming(Uuid::new_v4());
    let letter = park(&dedup, &db, &m).await;
    let broken = Effects::broken();
    assert!(matches!(
        dedup
            .replay_dead_letters(&LetterFilter::default(), broken.as_ref())
            .await,
        Err(outbox_consumer::ConsumerError::NoSelection)
    ));
    let replays = dedup
        .replay_dead_letters(&LetterFilter::letters([letter]), broken.as_ref())
        .await
        .unwrap();
    assert!(
        matches!(&replays[0].outcome, ReplayOutcome::Failed { error } if error.contains("no such book")),
        "{replays:?}"
    );
    let parked = letters(&db).list(&LetterFilter::every(), 10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].attempts, 2, "one attempt before, one replay");
    assert!(parked[0].last_replay_at.is_some());
    assert_eq!(effects(&db.pool, m.message_id.unwrap()).await, 0);
    assert_eq!(
        dedup.handle(&m, broken.as_ref()).await.unwrap(),
        Outcome::Duplicate,
        "still parked: a redelivery still waits for the operator"
    );
}

async fn cli(db: &TestDb, args: &[&str]) -> (Option<i32>, String) {
    let mut p = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-consumer-under-test"),
        args,
        &[("DATABASE_URL", db.url.clone())],
    );
    let status = p.exit(Duration::from_secs(30)).await;
    (status.code(), p.output())
}

fn json(out: &str) -> serde_json::Value {
    let start = out
        .find(['[', '{'])
        .unwrap_or_else(|| panic!("no JSON in {out}"));
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// End to end: outbox → relay → RabbitMQ → a running consumer whose handler is broken, so
/// the message is parked. The operator lists it, is refused an unnarrowed replay, fixes the
/// handler, replays it with the command (the running consumer does it, through dedup),
/// replays it again: one effect.
#[tokio::test]
async fn the_command_replays_through_the_running_consumer_exactly_once() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "shipping").await;
    let queue = topic("replay");
    Consumer::connect().await.declare(&queue).await;
    let handler = Effects::broken();
    let shutdown = CancellationToken::new();
    let source = tokio::spawn({
        let (dedup, handler, shutdown) = (dedup.clone(), handler.clone(), shutdown.clone());
        let source = RabbitMqSource::new(amqp_url(), &queue);
        async move { source.run(dedup, handler, shutdown).await }
    });
    let relay = start_relay(&settings(&db)).await;
    let m = Message::new(&queue, b"ship order 7".to_vec())
        .unwrap()
        .with_key("order-7")
        .unwrap();
    enqueue_all(&db, std::slice::from_ref(&m)).await;

    let letters = letters(&db);
    let parked = loop {
        let parked = letters.list(&LetterFilter::every(), 10).await.unwrap();
        if !parked.is_empty() {
            break parked;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(parked[0].message_id, Some(m.id()));

    let (code, out) = cli(&db, &["dead", "list", "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let listed = json(&out);
    assert_eq!(listed[0]["message_id"], m.id().to_string(), "{listed}");
    assert_eq!(listed[0]["group"], "shipping", "{listed}");
    assert_eq!(listed[0]["source"], queue, "{listed}");
    assert!(
        listed[0]["error"]
            .as_str()
            .unwrap()
            .contains("no such book"),
        "{listed}"
    );

    let (code, out) = cli(&db, &["dead", "replay"]).await;
    assert_eq!(code, Some(1), "an unnarrowed replay must be refused: {out}");
    assert!(out.contains("ask for all of them explicitly"), "{out}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(effects(&db.pool, m.id()).await, 0);
    assert_eq!(
        letters
            .list(&LetterFilter::every(), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    handler.fix();
    let (code, out) = cli(
        &db,
        &["dead", "replay", "--group", "shipping", "--wait", "20s"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("replayed 1, already processed 0, failed 0, still waiting 0"),
        "{out}"
    );
    assert_eq!(
        effects(&db.pool, m.id()).await,
        1,
        "one effect after the replay"
    );

    let id = m.id().to_string();
    let (code, out) = cli(&db, &["dead", "replay", "--id", &id, "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(json(&out), serde_json::json!([]), "nothing left to replay");
    let (code, out) = cli(&db, &["dead", "list", "--settled", "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let settled = json(&out);
    assert_eq!(settled[0]["outcome"], "replayed", "{settled}");
    assert_eq!(settled[0]["message_id"], id, "{settled}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(effects(&db.pool, m.id()).await, 1, "still one effect");

    relay.stop().await;
    shutdown.cancel();
    source.await.unwrap().unwrap();
}

/// `dead discard` refuses without a reason or a selection; with both it removes the letter,
/// keeps it and the reason among the settled letters, and a replay no longer finds it.
#[tokio::test]
async fn the_command_discards_a_letter_and_keeps_the_reason() {
    let db = TestDb::new().await;
    let dedup = setup(&db, "billing").await;
    let kept = incoming(Uuid::new_v4());
    let gone = incoming(Uuid::new_v4());
    let kept_letter = park(&dedup, &db, &kept).await;
    let gone_letter = park(&dedup, &db, &gone).await;

    let (code, out) = cli(&db, &["dead", "discard", "--all"]).await;
    assert_eq!(
        code,
        Some(2),
        "a discard without --reason is a usage error: {out}"
    );
    let (code, out) = cli(&db, &["dead", "discard", "--reason", "refunded by hand"]).await;
    assert_eq!(
        code,
        Some(1),
        "an unnarrowed discard must be refused: {out}"
    );
    assert_eq!(
        letters(&db)
            .list(&LetterFilter::every(), 10)
            .await
            .unwrap()
            .len(),
        2
    );

    let n = gone_letter.to_string();
    let (code, out) = cli(
        &db,
        &[
            "dead",
            "discard",
            "--id",
            &n,
            "--reason",
            "refunded by hand",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let discarded = json(&out);
    assert_eq!(discarded[0]["letter"], gone_letter, "{discarded}");
    assert_eq!(discarded[0]["reason"], "refunded by hand", "{discarded}");

    let left = letters(&db).list(&LetterFilter::every(), 10).await.unwrap();
    assert_eq!(
        left.iter().map(|l| l.letter).collect::<Vec<_>>(),
        vec![kept_letter],
        "only the discarded letter went"
    );
    assert_eq!(
        settled_outcome(&db, gone_letter).await,
        Some(("discarded".to_owned(), Some("refunded by hand".to_owned())))
    );
    let (code, out) = cli(&db, &["dead", "list"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 dead letter"), "{out}");

    let fixed = Effects::broken();
    fixed.fix();
    let replays = dedup
        .replay_dead_letters(&LetterFilter::letters([gone_letter]), fixed.as_ref())
        .await
        .unwrap();
    assert!(replays.is_empty(), "a discarded letter is not replayed");
    assert_eq!(effects(&db.pool, gone.message_id.unwrap()).await, 0);
}
