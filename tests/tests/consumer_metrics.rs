//! The consumer library's metrics (feature `metrics`): what `Deduplicator::handle` did,
//! counted by group and outcome, and its latency. A binary of its own, because it installs
//! the process-wide metrics recorder.

use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusBuilder;
use outbox_consumer::{Deduplicator, Handler, HandlerError, Incoming};
use outbox_tests::TestDb;
use sqlx::PgConnection;
use uuid::Uuid;

struct Fussy;

impl Handler for Fussy {
    fn handle<'a>(
        &'a self,
        _: &'a mut PgConnection,
        m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            match m.payload.as_slice() {
                b"bad" => Err(HandlerError::permanent("not an order")),
                b"flaky" => Err(HandlerError::retryable("inventory down")),
                _ => Ok(()),
            }
        })
    }
}

fn incoming(payload: &[u8]) -> Incoming {
    let headers = [("outbox-id".to_owned(), Uuid::new_v4().to_string())].into();
    Incoming::new("test", payload.to_vec(), headers)
}

fn sample(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .unwrap_or_else(|| panic!("no {line_start} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn handled_deliveries_are_counted_by_group_and_outcome() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this binary");

    let db = TestDb::new().await;
    let dedup = Deduplicator::new(db.pool.clone(), "billing").unwrap();
    dedup.migrate().await.unwrap();
    let ok = incoming(b"ok");
    dedup.handle(&ok, &Fussy).await.unwrap();
    dedup.handle(&incoming(b"ok"), &Fussy).await.unwrap();
    dedup.handle(&ok, &Fussy).await.unwrap(); // a redelivery
    dedup.handle(&incoming(b"bad"), &Fussy).await.unwrap();
    dedup.handle(&incoming(b"flaky"), &Fussy).await.unwrap();

    let text = handle.render();
    let count = |outcome: &str| {
        sample(
            &text,
            &format!("outbox_consumer_messages_total{{group=\"billing\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(count("processed"), 2.0);
    assert_eq!(count("duplicate"), 1.0);
    assert_eq!(count("dead_lettered"), 1.0);
    assert_eq!(count("retry"), 1.0);
    let stats = dedup.stats();
    assert_eq!(
        (
            stats.processed,
            stats.duplicates,
            stats.dead_lettered,
            stats.retries
        ),
        (2, 1, 1, 1),
        "the metrics and Deduplicator::stats agree"
    );
    // No buckets configured: the exporter renders a summary with a count.
    assert_eq!(
        sample(
            &text,
            "outbox_consumer_handle_duration_seconds_count{group=\"billing\"}"
        ),
        5.0
    );
}
