//! The relay as Prometheus and Kubernetes see it: `/metrics` scraped during a run matches
//! what happened in the outbox, `/readyz` turns 503 while the broker is cut off and 200
//! when it is back, and `/livez` stays 200 throughout.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use outbox::{Message, Outbox};
use outbox_tests::{amqp_url, free_port, topic, Consumer, RelayProcess, TestDb};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(30);

use outbox_tests::http_get as get;

/// Samples of one metric, by their label set as written (`{topic="x"}`, or "" for none).
fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, value) = r.split_once('}')?;
                    (format!("{{{labels}}}"), value)
                }
                None if rest.starts_with(' ') => (String::new(), rest),
                None => return None,
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

fn one(text: &str, name: &str, labels: &str) -> f64 {
    *samples(text, name)
        .get(labels)
        .unwrap_or_else(|| panic!("no {name}{labels} in:\n{text}"))
}

/// A TCP proxy in front of RabbitMQ that the test can cut (close every connection and
/// refuse new ones) and restore: the broker going away, as the relay sees it.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns2.lock().unwrap().push(task);
            }
        });
        Self { port, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn wait_status(port: u16, path: &str, want: u16, relay: &RelayProcess) -> String {
    let start = Instant::now();
    loop {
        if let Some((status, body)) = get(port, path).await {
            if status == want {
                return body;
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "{path} never answered {want}; last: {:?}; relay output:\n{}",
            get(port, path).await,
            relay.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_match_the_outbox_and_readiness_follows_the_broker() {
    let db = TestDb::new().await;
    let q = topic("observed");
    let nowhere = topic("nowhere");
    let consumer = Consumer::connect().await;
    consumer.queue(&q).await;

    // 40 messages that go through; a poison message on key "stuck" (no queue for its
    // topic) that dies after 2 attempts; 5 messages waiting behind it.
    let good: Vec<Message> = (0..40)
        .map(|i| {
            Message::new(&q, vec![i])
                .unwrap()
                .with_key(format!("k{}", i % 8))
                .unwrap()
        })
        .collect();
    let poison = Message::new(&nowhere, b"p".to_vec())
        .unwrap()
        .with_key("stuck")
        .unwrap();
    let behind: Vec<Message> = (0..5)
        .map(|_| {
            Message::new(&q, b"b".to_vec())
                .unwrap()
                .with_key("stuck")
                .unwrap()
        })
        .collect();
    let mut all = vec![poison.clone()];
    all.extend(behind.iter().cloned());
    all.extend(good.iter().cloned());
    Outbox::default()
        .enqueue_batch(&db.pool, &all)
        .await
        .unwrap();

    let rabbit_port: u16 = url::Url::parse(&amqp_url()).unwrap().port().unwrap();
    let proxy = Proxy::start(rabbit_port).await;
    let mut via_proxy = url::Url::parse(&amqp_url()).unwrap();
    via_proxy.set_port(Some(proxy.port)).unwrap();
    let http = free_port();
    let relay = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__RABBITMQ__URL", via_proxy.to_string()),
            ("OUTBOX__HTTP__LISTEN", format!("127.0.0.1:{http}")),
            ("OUTBOX__HTTP__BACKLOG_INTERVAL", "200ms".into()),
            ("OUTBOX__RETRY__MAX_ATTEMPTS", "2".into()),
            ("OUTBOX__RETRY__INITIAL_DELAY", "100ms".into()),
            ("OUTBOX__RELAY__POLL_INTERVAL", "100ms".into()),
            ("OUTBOX__RELAY__RECONNECT_MAX_DELAY", "500ms".into()),
        ],
    );
    consumer.wait_for_distinct(good.len(), WAIT).await;
    let start = Instant::now();
    loop {
        let dead: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE status = 'dead'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if dead == 1 {
            break;
        }
        assert!(start.elapsed() < WAIT, "the poison message never died");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the backlog gauges catch up (read every 200 ms).
    tokio::time::sleep(Duration::from_millis(800)).await;

    assert_eq!(wait_status(http, "/readyz", 200, &relay).await, "ready\n");
    assert_eq!(wait_status(http, "/livez", 200, &relay).await, "live\n");
    let (status, text) = get(http, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200);
    let on_q = format!("{{topic=\"{q}\"}}");
    let on_nowhere = format!("{{topic=\"{nowhere}\"}}");
    assert_eq!(one(&text, "outbox_messages_published_total", &on_q), 40.0);
    assert_eq!(
        one(
            &text,
            "outbox_publish_failures_total",
            &format!("{{topic=\"{nowhere}\",reason=\"rejected\"}}")
        ),
        2.0
    );
    assert_eq!(
        one(&text, "outbox_messages_retried_total", &on_nowhere),
        1.0
    );
    assert_eq!(one(&text, "outbox_messages_dead_total", &on_nowhere), 1.0);
    // The gauges match the outbox itself.
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox.messages WHERE status = 'pending' AND topic = $1",
    )
    .bind(&q)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(pending, 5, "the messages behind the dead one wait");
    assert_eq!(one(&text, "outbox_backlog_messages", &on_q), pending as f64);
    assert_eq!(one(&text, "outbox_dead_messages", &on_nowhere), 1.0);
    // The relay marks the 5 as held back within a second; the gauge follows.
    let start = Instant::now();
    loop {
        let (_, text) = get(http, "/metrics").await.expect("/metrics answers");
        let held = samples(&text, "outbox_held_back_messages")
            .get(&on_q)
            .copied()
            .unwrap_or(0.0);
        if held == 5.0 {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "outbox_held_back_messages for {q} is {held}, not 5"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let oldest: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(created_at))::float8 FROM outbox.messages \
         WHERE status = 'pending' AND topic = $1",
    )
    .bind(&q)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let reported = one(&text, "outbox_oldest_pending_age_seconds", &on_q);
    assert!(
        reported > 0.0 && (oldest - reported).abs() < 2.0,
        "oldest pending age {reported}, the outbox says {oldest}"
    );
    assert_eq!(one(&text, "outbox_partitions_owned", ""), 64.0);
    assert_eq!(one(&text, "outbox_relays_live", ""), 1.0);
    assert_eq!(one(&text, "outbox_broker_up", ""), 1.0);
    assert_eq!(
        one(&text, "outbox_publish_duration_seconds_count", &on_q),
        40.0
    );
    assert_eq!(
        one(&text, "outbox_commit_to_confirm_seconds_count", &on_q),
        40.0
    );
    for h in [
        "outbox_claim_duration_seconds_count",
        "outbox_settle_duration_seconds_count",
        "outbox_batch_size_count",
    ] {
        assert!(one(&text, h, "") >= 1.0, "{h}");
    }

    // The broker goes away: not ready (naming the broker), still live; back: ready.
    proxy.cut();
    let body = wait_status(http, "/readyz", 503, &relay).await;
    assert!(
        body.contains("RabbitMQ"),
        "the body names the broker: {body}"
    );
    assert_eq!(get(http, "/livez").await.map(|r| r.0), Some(200));
    let (_, text) = get(http, "/metrics").await.unwrap();
    assert_eq!(one(&text, "outbox_broker_up", ""), 0.0);
    // Work that arrives meanwhile waits, and goes once the broker is back.
    let late = Message::new(&q, b"late".to_vec()).unwrap();
    outbox::enqueue(&db.pool, &late).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get(http, "/livez").await.map(|r| r.0), Some(200));
    proxy.restore();
    wait_status(http, "/readyz", 200, &relay).await;
    let got = consumer.wait_for_distinct(good.len() + 1, WAIT).await;
    assert!(got.iter().any(|r| r.id == late.id()));
    let (_, text) = get(http, "/metrics").await.unwrap();
    assert!(one(&text, "outbox_broker_reconnects_total", "") >= 1.0);
    relay.terminate();
}

#[tokio::test]
async fn a_busy_http_port_is_an_error_naming_the_setting() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut relay = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        &["run"],
        &[
            ("OUTBOX__DATABASE__URL", db.url.clone()),
            ("OUTBOX__RABBITMQ__URL", amqp_url()),
            ("OUTBOX__HTTP__LISTEN", format!("127.0.0.1:{port}")),
        ],
    );
    let status = relay.exit(WAIT).await;
    let out = relay.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("http.listen"), "{out}");
}

/// The alerts of `deploy/prometheus/outbox-rules.yml` as a real Prometheus evaluates them,
/// scraping a real relay: every `for:` is shortened to 2 s. A dead message fires
/// OutboxDeadMessages; the broker cut off fires OutboxRelayUnready; with the broker back and
/// the message discarded, both resolve.
#[tokio::test]
async fn a_real_prometheus_fires_and_resolves_the_relays_alerts() {
    let prometheus = std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("prometheus"))
                .find(|p| p.is_file())
        })
        .expect("prometheus not found: scripts/test.sh installs Debian's prometheus package");
    let db = TestDb::new().await;
    let poison = Message::new(topic("nowhere"), b"p".to_vec())
        .unwrap()
        .with_key("stuck")
        .unwrap();
    Outbox::default().enqueue(&db.pool, &poison).await.unwrap();
    let rabbit_port: u16 = url::Url::parse(&amqp_url()).unwrap().port().unwrap();
    let proxy = Proxy::start(rabbit_port).await;
    let mut via_proxy = url::Url::parse(&amqp_url()).unwrap();
    via_proxy.set_port(Some(proxy.port)).unwrap();
    let http = free_port();
    let env = [
        ("OUTBOX__DATABASE__URL", db.url.clone()),
        ("OUTBOX__RABBITMQ__URL", via_proxy.to_string()),
        ("OUTBOX__HTTP__LISTEN", format!("127.0.0.1:{http}")),
        ("OUTBOX__HTTP__BACKLOG_INTERVAL", "200ms".into()),
        ("OUTBOX__RETRY__MAX_ATTEMPTS", "2".into()),
        ("OUTBOX__RETRY__INITIAL_DELAY", "100ms".into()),
        ("OUTBOX__RELAY__RECONNECT_MAX_DELAY", "500ms".into()),
    ];
    let relay = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        &["run"],
        &env,
    );

    // The shipped rules, every `for:` shortened; a Prometheus scraping the relay each second.
    let dir = std::env::temp_dir().join(format!("outbox-alerts-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/prometheus/outbox-rules.yml"),
    )
    .unwrap();
    let shortened: String = rules
        .lines()
        .map(|l| match l.split_once("for: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: 2s\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(dir.join("rules.yml"), shortened).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\n\
             scrape_configs:\n  - job_name: outbox-relay\n    static_configs:\n      - targets: ['127.0.0.1:{http}']\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut server = tokio::process::Command::new(&prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus");
    let firing = |state: &'static str| {
        move |alerts: &serde_json::Value, name: &str| {
            alerts["data"]["alerts"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x["labels"]["alertname"] == name && x["state"] == state)
            })
        }
    };
    let wait_alerts = |what: String, done: Box<dyn Fn(&serde_json::Value) -> bool>| {
        let relay = &relay;
        let dir = dir.clone();
        async move {
            let start = Instant::now();
            loop {
                let alerts = match get(web, "/api/v1/alerts").await {
                    Some((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
                    _ => serde_json::Value::Null,
                };
                if done(&alerts) {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "{what} within 60 s; alerts: {alerts}; prometheus log:\n{}\nrelay output:\n{}",
                    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default(),
                    relay.output()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };

    let is_firing = firing("firing");
    wait_alerts(
        "OutboxDeadMessages firing".into(),
        Box::new(move |a| is_firing(a, "OutboxDeadMessages")),
    )
    .await;
    proxy.cut();
    let is_firing = firing("firing");
    wait_alerts(
        "OutboxRelayUnready firing".into(),
        Box::new(move |a| is_firing(a, "OutboxRelayUnready")),
    )
    .await;

    // Recovery: the broker back, the dead message discarded by an operator.
    proxy.restore();
    let mut discard = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_outbox-relay-under-test"),
        &["dead", "discard", "--all", "--reason", "alert test"],
        &[("OUTBOX__DATABASE__URL", db.url.clone())],
    );
    assert!(discard.exit(WAIT).await.success(), "{}", discard.output());
    wait_alerts(
        "both alerts resolved".into(),
        Box::new(|a| {
            a["data"]["alerts"].as_array().is_some_and(|alerts| {
                !alerts.iter().any(|x| {
                    x["labels"]["alertname"] == "OutboxDeadMessages"
                        || x["labels"]["alertname"] == "OutboxRelayUnready"
                })
            })
        }),
    )
    .await;
    let _ = server.kill().await;
    std::fs::remove_dir_all(&dir).ok();
}
