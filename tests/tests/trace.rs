//! Trace context: the producer's `traceparent` header becomes the parent of the consumer's
//! handler span. A test binary of its own, because it installs the process's subscriber.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use outbox_consumer::{Deduplicator, Handler, HandlerError, Incoming, Outcome};
use outbox_tests::TestDb;
use sqlx::PgConnection;
use uuid::Uuid;

/// Writes nothing: the span is what is under test.
struct Noop;

impl Handler for Noop {
    fn handle<'a>(
        &'a self,
        _tx: &'a mut PgConnection,
        _m: &'a Incoming,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

fn incoming(traceparent: &str) -> Incoming {
    Incoming::new(
        "orders",
        b"order".to_vec(),
        BTreeMap::from([
            ("outbox-id".to_owned(), Uuid::new_v4().to_string()),
            ("traceparent".to_owned(), traceparent.to_owned()),
        ]),
    )
}

/// The producer's W3C `traceparent` header becomes the OpenTelemetry parent of the
/// handler's span; a message without one (or with a malformed one) starts a trace of its own.
#[tokio::test]
async fn the_producers_traceparent_becomes_the_parent_of_the_handler_span() {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt as _;

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("consumer-test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let db = TestDb::new().await;
    let dedup = Deduplicator::new(db.pool.clone(), "billing").unwrap();
    dedup.migrate().await.unwrap();
    let (trace_id, parent_id) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traced = incoming(&format!("00-{trace_id}-{parent_id}-01"));
    let malformed = incoming("00-not-a-trace-01");
    for m in [&traced, &malformed] {
        assert_eq!(dedup.handle(m, &Noop).await.unwrap(), Outcome::Processed);
    }
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let handled: Vec<_> = spans.iter().filter(|s| s.name == "handle").collect();
    assert_eq!(handled.len(), 2, "one handle span per delivery: {spans:?}");
    let (with_parent, without): (Vec<_>, Vec<_>) = handled
        .into_iter()
        .partition(|s| s.span_context.trace_id().to_string() == trace_id);
    assert_eq!(
        with_parent.len(),
        1,
        "the traced message's span joins trace {trace_id}"
    );
    assert_eq!(
        with_parent[0].parent_span_id.to_string(),
        parent_id,
        "its parent is the producer's span"
    );
    assert_eq!(
        without.len(),
        1,
        "the malformed header is ignored, not adopted"
    );
    assert_ne!(
        without[0].parent_span_id.to_string(),
        parent_id,
        "a malformed traceparent names no parent"
    );
}
