//! The consumer library's metrics (feature `metrics`): what `Deduplicator::handle` did,
//! counted by group and outcome, and its latency. A binary of its own, because it installs
//! the process-wide metrics recorder.

use std::{
    collections::BTreeSet,
    sync::OnceLock,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use outbox::{Message, Outbox};
use outbox_consumer::{Deduplicator, Handler, HandlerError, Incoming};
use outbox_tests::{amqp_url, free_port, http_get, topic, Consumer, RelayProcess, TestDb};
use sqlx::PgConnection;
use uuid::Uuid;

/// The process-wide recorder, installed once for the tests of this binary.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
        handle
    })
}

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
    let handle = recorder();

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

/// The metric names in `text` (the Prometheus exposition format), from its `# TYPE` lines.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The `outbox…` names in a query or rules text.
fn names_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("outbox_") || t.starts_with("outbox:"))
        .map(str::to_owned)
        .collect()
}

/// Every metric the dashboard (`deploy/grafana/outbox.json`) and the alert rules
/// (`deploy/prometheus/outbox-rules.yml`) query is one a relay or the consumer library
/// exports, read from a live relay's `/metrics` and the consumer's recorder; every recording
/// rule the dashboard uses is defined. The dashboard cannot drift from the code.
#[tokio::test]
async fn every_metric_the_dashboard_and_the_rules_query_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/outbox.json")).unwrap(),
    )
    .unwrap();
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/outbox-rules.yml")).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("an expr").to_owned())
        .collect();
    assert!(exprs.len() >= 12, "the dashboard's queries: {exprs:?}");

    // The consumer's metrics, after a delivery handled and one dead-lettered.
    let db = TestDb::new().await;
    let dedup = Deduplicator::new(db.pool.clone(), "dashboard").unwrap();
    dedup.migrate().await.unwrap();
    dedup.handle(&incoming(b"ok"), &Fussy).await.unwrap();
    dedup.handle(&incoming(b"bad"), &Fussy).await.unwrap();
    let mut names = exported(&recorder().render());

    // A relay's, after a message delivered and one retried, then dead.
    let q = topic("dashboard");
    Consumer::connect().await.declare(&q).await;
    let good = Message::new(&q, b"ok".to_vec()).unwrap();
    let poison = Message::new(topic("nowhere"), b"p".to_vec()).unwrap();
    Outbox::default()
        .enqueue_batch(&db.pool, &[good, poison])
        .await
        .unwrap();
    let http = free_port();
    let relay = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__RABBITMQ__URL", amqp_url()),
            ("OUTBOX__HTTP__LISTEN", format!("127.0.0.1:{http}")),
            ("OUTBOX__HTTP__BACKLOG_INTERVAL", "200ms".into()),
            ("OUTBOX__RETRY__MAX_ATTEMPTS", "2".into()),
            ("OUTBOX__RETRY__INITIAL_DELAY", "100ms".into()),
        ],
    );
    let start = Instant::now();
    while db.count("dead").await != 1 || db.count("pending").await != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "one delivered, one retried and dead within 30 s; relay output:\n{}",
            relay.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // the gauges catch up
    let (status, text) = http_get(http, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200);
    names.extend(exported(&text));

    let recorded: BTreeSet<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_owned)
        .collect();
    let mut missing = Vec::new();
    for name in exprs
        .iter()
        .flat_map(|e| names_in(e))
        .chain(names_in(&rules))
    {
        let known = if name.contains(':') {
            recorded.contains(&name)
        } else {
            names.contains(&name)
                || ["_bucket", "_sum", "_count"].iter().any(|s| {
                    name.strip_suffix(s)
                        .is_some_and(|base| names.contains(base))
                })
        };
        if !known {
            missing.push(name);
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "queried but not exported (or not recorded): {missing:?}; exported: {names:?}"
    );
}
