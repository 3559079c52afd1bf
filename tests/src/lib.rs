//! Shared harness for the integration tests: a fresh database per test, uniquely named
//! RabbitMQ queues, an in-process relay, and a consumer that records what arrived.
//!
//! The servers come from `scripts/stack.sh` (run by `scripts/test.sh`), which exports
//! `DATABASE_URL` and `AMQP_URL`.

use std::{
    collections::BTreeMap,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, Connection, ConnectionProperties,
};
use outbox_relay::{
    config::{DeadKeyPolicy, Settings},
    relay::Relay,
};
use sqlx::{postgres::PgPoolOptions, PgPool};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// `DATABASE_URL`, or a panic that says how to get one.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: run the tests with scripts/test.sh")
}

/// `AMQP_URL`, or a panic that says how to get one.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").expect("AMQP_URL is not set: run the tests with scripts/test.sh")
}

/// A database of its own for one test, migrated.
pub struct TestDb {
    /// Pool on the test's database.
    pub pool: PgPool,
    /// URL of the test's database.
    pub url: String,
}

impl TestDb {
    /// Creates a fresh database and applies the outbox migrations to it.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        outbox::migrate(&db.pool).await.expect("migrate");
        db
    }

    /// Creates a fresh, empty database.
    pub async fn empty() -> Self {
        let admin_url = database_url();
        let name = format!("outbox_test_{}", Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .expect("admin connect");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let mut url = url::Url::parse(&admin_url).expect("DATABASE_URL");
        url.set_path(&name);
        let url = url.to_string();
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&url)
            .await
            .expect("connect");
        Self { pool, url }
    }

    /// Rows in `outbox.messages`, by status.
    pub async fn count(&self, status: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE status = $1")
            .bind(status)
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Rows in `outbox.messages` held back behind a dead row of their key.
    pub async fn held_back(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE held_back")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

/// `KAFKA_BROKERS`, or a panic that says how to get one.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS")
        .expect("KAFKA_BROKERS is not set: run the tests with scripts/test.sh")
}

/// The broker a test runs against. Tests of the relay's guarantees run against both (see
/// [`for_each_broker!`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// RabbitMQ, through the default exchange: the topic names the queue.
    RabbitMq,
    /// Kafka: the topic names the Kafka topic (3 partitions).
    Kafka,
}

impl Broker {
    /// Relay settings for this broker against `db`, with short timings.
    pub fn settings(self, db: &TestDb) -> Settings {
        let mut s = settings(db);
        if self == Broker::Kafka {
            s.broker = outbox_relay::config::BrokerKind::Kafka;
            s.kafka.brokers = Some(kafka_brokers());
            s.kafka.delivery_timeout = Duration::from_secs(10);
            s.validate(true).expect("test settings are valid");
        }
        s
    }

    /// `OUTBOX__*` variables for a relay process on this broker against `db`.
    pub fn env(self, db: &TestDb) -> Vec<(&'static str, String)> {
        let mut env = vec![("OUTBOX__DATABASE__URL", db.url.clone())];
        match self {
            Broker::RabbitMq => env.push(("OUTBOX__RABBITMQ__URL", amqp_url())),
            Broker::Kafka => {
                env.push(("OUTBOX__BROKER", "kafka".to_owned()));
                env.push(("OUTBOX__KAFKA__BROKERS", kafka_brokers()));
            }
        }
        env
    }

    /// A consumer on this broker.
    pub async fn consumer(self) -> Consumer {
        match self {
            Broker::RabbitMq => Consumer::connect().await,
            Broker::Kafka => Consumer::kafka(),
        }
    }

    /// A message this broker refuses for good or keeps refusing, with a fragment of the
    /// reason the relay must record: RabbitMQ cannot route a topic without a queue; Kafka
    /// refuses a message larger than `message.max.bytes`.
    pub fn poison(self, key: &str) -> (outbox::Message, &'static str) {
        match self {
            Broker::RabbitMq => (
                outbox::Message::new(topic("nowhere"), b"p".to_vec())
                    .unwrap()
                    .with_key(key)
                    .unwrap(),
                "NO_ROUTE",
            ),
            Broker::Kafka => (
                outbox::Message::new(topic("oversize"), vec![0u8; 2_000_000])
                    .unwrap()
                    .with_key(key)
                    .unwrap(),
                "too large",
            ),
        }
    }

    /// Loses what was delivered to `topic` and not consumed yet, as an operator's mistake
    /// or a consumer that acknowledged without processing would: RabbitMQ purges the queue;
    /// on Kafka, a member of consumer group `group` reads what the group has not committed
    /// and commits it unprocessed. Returns how many messages were lost.
    pub async fn lose(self, topic: &str, group: &str) -> u64 {
        match self {
            Broker::RabbitMq => {
                let c = Consumer::connect().await;
                u64::from(
                    c.channel()
                        .queue_purge(topic, lapin::options::QueuePurgeOptions::default())
                        .await
                        .expect("queue_purge"),
                )
            }
            Broker::Kafka => kafka_skip_uncommitted(topic, group).await,
        }
    }

    /// Failed attempts before the poison message is dead: RabbitMQ's refusal is retried up
    /// to `retry.max_attempts`; Kafka's is permanent.
    pub fn poison_attempts(self, max_attempts: u32) -> i32 {
        match self {
            Broker::RabbitMq => max_attempts as i32,
            Broker::Kafka => 1,
        }
    }
}

/// Runs each listed `async fn name(broker: Broker)` once per broker, as
/// `rabbitmq::name` and `kafka::name`.
#[macro_export]
macro_rules! for_each_broker {
    ($($name:ident),* $(,)?) => {
        mod rabbitmq {
            $(#[tokio::test]
            async fn $name() {
                super::$name($crate::Broker::RabbitMq).await
            })*
        }
        mod kafka {
            $(#[tokio::test]
            async fn $name() {
                super::$name($crate::Broker::Kafka).await
            })*
        }
    };
}

/// Relay settings for tests: both URLs set and short timings (RabbitMQ).
pub fn settings(db: &TestDb) -> Settings {
    let mut s = Settings::default();
    s.database.url = Some(db.url.clone().into());
    s.rabbitmq.url = Some(amqp_url().into());
    s.relay.poll_interval = Duration::from_millis(100);
    s.relay.lease = Duration::from_secs(5);
    s.rabbitmq.confirm_timeout = Duration::from_secs(2);
    s.relay.batch_size = 100;
    s.retry.initial_delay = Duration::from_millis(50);
    s.retry.max_delay = Duration::from_millis(400);
    s.retry.jitter = 0.0;
    s.retry.max_attempts = 3;
    s.relay.reconnect_max_delay = Duration::from_millis(500);
    s.validate(true).expect("test settings are valid");
    s
}

/// A relay running in this process.
pub struct RunningRelay {
    /// Cancels the relay (as SIGTERM would).
    pub shutdown: CancellationToken,
    /// The relay's task.
    pub task: JoinHandle<Result<(), outbox_relay::relay::RelayError>>,
}

impl RunningRelay {
    /// Stops the relay and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("relay task").expect("relay result");
    }
}

/// Builds a relay from `settings` (as `outbox-relay run` would).
pub async fn relay(settings: &Settings) -> Arc<Relay> {
    let publisher = outbox_relay::startup::publisher(settings).expect("publisher");
    relay_with(settings, publisher).await
}

/// Builds a relay from `settings` that publishes through `publisher`.
pub async fn relay_with(
    settings: &Settings,
    publisher: Arc<dyn outbox_relay::publish::Publisher>,
) -> Arc<Relay> {
    use secrecy::ExposeSecret;
    let url = settings
        .database
        .url
        .as_ref()
        .unwrap()
        .expose_secret()
        .to_owned();
    let pool = PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .connect(&url)
        .await
        .expect("relay pool");
    Arc::new(outbox_relay::startup::relay(settings, pool, publisher))
}

/// Starts a relay from `settings` in this process.
pub async fn start_relay(settings: &Settings) -> RunningRelay {
    run_relay(relay(settings).await)
}

/// Starts `relay` in this process.
pub fn run_relay(relay: Arc<Relay>) -> RunningRelay {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    RunningRelay { shutdown, task }
}

/// Settings with `policy` for messages behind a dead one.
pub fn with_policy(mut s: Settings, policy: DeadKeyPolicy) -> Settings {
    s.relay.dead_key_policy = policy;
    s
}

/// Messages `range` for `topic`: message `i` carries payload `i` and key `k{i % keys}`.
pub fn keyed_messages(
    topic: &str,
    range: impl IntoIterator<Item = usize>,
    keys: usize,
) -> Vec<outbox::Message> {
    range
        .into_iter()
        .map(|i| {
            outbox::Message::new(topic, i.to_string().into_bytes())
                .expect("a valid topic")
                .with_key(format!("k{}", i % keys))
                .expect("a valid key")
        })
        .collect()
}

/// Writes `msgs` to the default outbox of `db`, in one transaction.
pub async fn enqueue_all(db: &TestDb, msgs: &[outbox::Message]) {
    outbox::Outbox::default()
        .enqueue_batch(&db.pool, msgs)
        .await
        .expect("enqueue");
}

/// A unique topic name; with the default routing it is also the queue's name.
pub fn topic(prefix: &str) -> String {
    format!("{prefix}.{}", Uuid::new_v4().simple())
}

/// One message as a consumer received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The AMQP `message-id` property.
    pub message_id: Option<String>,
    /// The `outbox-id` header.
    pub id: Uuid,
    /// The `outbox-key` header.
    pub key: Option<String>,
    /// The `outbox-seq` header.
    pub seq: i64,
    /// The `outbox-topic` header.
    pub topic: String,
    /// Every header, as strings (of a name that came twice, the last value).
    pub headers: BTreeMap<String, String>,
    /// Every header name in the order the message carried them, repeats included.
    pub header_names: Vec<String>,
    /// The `content-type` property.
    pub content_type: Option<String>,
    /// The `delivery-mode` property (2 = persistent).
    pub delivery_mode: Option<u8>,
    /// The body.
    pub payload: Vec<u8>,
    /// The exchange it was published to.
    pub exchange: String,
    /// The routing key it was published with (Kafka: the topic).
    pub routing_key: String,
    /// The Kafka partition it was read from.
    pub partition: Option<i32>,
}

/// Declares queues and records every delivery from them, in arrival order.
pub struct Consumer {
    inner: Inner,
    received: Arc<Mutex<Vec<Received>>>,
}

#[allow(clippy::large_enum_variant)] // one per test; boxing buys nothing
enum Inner {
    Rabbit {
        _connection: Connection,
        channel: Channel,
    },
    Kafka,
}

impl Consumer {
    /// Connects to RabbitMQ.
    pub async fn connect() -> Self {
        let connection = Connection::connect(
            &amqp_url(),
            ConnectionProperties::default()
                .with_executor(tokio_executor_trait::Tokio::current())
                .with_reactor(tokio_reactor_trait::Tokio),
        )
        .await
        .expect("consumer connect");
        let channel = connection.create_channel().await.expect("consumer channel");
        Self {
            inner: Inner::Rabbit {
                _connection: connection,
                channel,
            },
            received: Arc::default(),
        }
    }

    /// A Kafka consumer (topics are created and read by [`Consumer::queue`]).
    pub fn kafka() -> Self {
        Self {
            inner: Inner::Kafka,
            received: Arc::default(),
        }
    }

    /// Declares queue `name` (RabbitMQ) or creates topic `name` (Kafka) without reading it,
    /// for tests whose reader is the code under test.
    pub async fn declare(&self, name: &str) {
        match &self.inner {
            Inner::Rabbit { channel, .. } => {
                channel
                    .queue_declare(
                        name,
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .expect("queue_declare");
            }
            Inner::Kafka => create_kafka_topic(name).await,
        }
    }

    /// RabbitMQ: declares queue `name` (durable) and consumes it. Kafka: creates topic
    /// `name` with 3 partitions (unless it exists) and reads every partition from the
    /// beginning.
    pub async fn queue(&self, name: &str) {
        let channel = match &self.inner {
            Inner::Rabbit { channel, .. } => channel,
            Inner::Kafka => return kafka_read(name, self.received.clone()).await,
        };
        channel
            .queue_declare(
                name,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue_declare");
        let mut consumer = channel
            .basic_consume(
                name,
                &format!("test-{name}"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("basic_consume");
        let received = self.received.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                received.lock().unwrap().push(decode(&delivery));
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
    }

    /// The consumer's channel, for declaring exchanges and bindings (RabbitMQ only).
    pub fn channel(&self) -> &Channel {
        match &self.inner {
            Inner::Rabbit { channel, .. } => channel,
            Inner::Kafka => panic!("a Kafka consumer has no channel"),
        }
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages arrived, or panics after `timeout` saying how
    /// many did.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until_counted(n, timeout, "messages", |got| got.len())
            .await
    }

    /// Waits until at least `n` distinct messages arrived (duplicates do not count), or
    /// panics after `timeout` saying how many did. Returns every arrival, duplicates included.
    pub async fn wait_for_distinct(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until_counted(n, timeout, "distinct messages", |got| {
            got.iter()
                .map(|r| r.id)
                .collect::<std::collections::HashSet<_>>()
                .len()
        })
        .await
    }

    async fn wait_until_counted(
        &self,
        n: usize,
        timeout: Duration,
        what: &str,
        count: impl Fn(&[Received]) -> usize,
    ) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let got = self.received();
            let counted = count(&got);
            if counted >= n {
                return got;
            }
            assert!(
                start.elapsed() < timeout,
                "expected {n} {what} within {timeout:?}, got {counted} ({} arrivals)",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits `quiet` and returns everything received (for asserting nothing more came).
    pub async fn settle(&self, quiet: Duration) -> Vec<Received> {
        tokio::time::sleep(quiet).await;
        self.received()
    }
}

fn decode(d: &lapin::message::Delivery) -> Received {
    let mut headers = BTreeMap::new();
    let mut header_names = Vec::new();
    if let Some(table) = d.properties.headers() {
        for (k, v) in table.inner() {
            header_names.push(k.to_string());
            let value = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                other => format!("{other:?}"),
            };
            headers.insert(k.to_string(), value);
        }
    }
    Received {
        message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
        id: headers
            .get("outbox-id")
            .and_then(|s| s.parse().ok())
            .expect("outbox-id header"),
        key: headers.get("outbox-key").cloned(),
        seq: headers
            .get("outbox-seq")
            .and_then(|s| s.parse().ok())
            .expect("outbox-seq header"),
        topic: headers
            .get("outbox-topic")
            .cloned()
            .expect("outbox-topic header"),
        content_type: d.properties.content_type().as_ref().map(|s| s.to_string()),
        delivery_mode: *d.properties.delivery_mode(),
        headers,
        header_names,
        payload: d.data.clone(),
        exchange: d.exchange.to_string(),
        routing_key: d.routing_key.to_string(),
        partition: None,
    }
}

/// For each key, the `seq` of its first arrivals, in arrival order; duplicates after the
/// first arrival are left out.
pub fn first_arrivals_by_key(received: &[Received]) -> BTreeMap<String, Vec<i64>> {
    let mut seen = std::collections::HashSet::new();
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in received {
        if seen.insert(r.id) {
            if let Some(k) = &r.key {
                by_key.entry(k.clone()).or_default().push(r.seq);
            }
        }
    }
    by_key
}

/// Panics naming the key and the two `seq`s if any key's first arrivals are out of order.
pub fn assert_per_key_order(received: &[Received]) {
    for (key, seqs) in first_arrivals_by_key(received) {
        for pair in seqs.windows(2) {
            assert!(
                pair[0] < pair[1],
                "key {key}: seq {} arrived after seq {} ({seqs:?})",
                pair[1],
                pair[0]
            );
        }
    }
}

/// A relay process with its output collected line by line (stdout and stderr together).
pub struct RelayProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl RelayProcess {
    /// Starts `bin` with `args`, with only the `OUTBOX__*` variables in `env`.
    pub fn spawn(bin: &str, args: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("OUTBOX__") || k == "RUST_LOG")
        {
            cmd.env_remove(k);
        }
        // Tests run many relays at once: each gets a port of its own unless it names one.
        cmd.env("OUTBOX__HTTP__LISTEN", "127.0.0.1:0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn relay");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = BufReader::new(child.stdout.take().unwrap());
        let err = BufReader::new(child.stderr.take().unwrap());
        for mut reader in [
            Box::new(out) as Box<dyn tokio::io::AsyncBufRead + Unpin + Send>,
            Box::new(err),
        ] {
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut line = String::new();
                while reader.read_line(&mut line).await.unwrap_or(0) > 0 {
                    lines.lock().unwrap().push(std::mem::take(&mut line));
                }
            });
        }
        Self { child, lines }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().concat()
    }

    /// Waits until `needle` was printed `count` times.
    pub async fn wait_for_line(&self, needle: &str, count: usize, timeout: Duration) {
        let start = Instant::now();
        while self.output().matches(needle).count() < count {
            assert!(
                start.elapsed() < timeout,
                "expected {count}× {needle:?} within {timeout:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
    }

    /// Waits for the exit status.
    pub async fn exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "relay did not exit within {timeout:?}; output:\n{}",
                    self.output()
                )
            })
            .unwrap();
        // Let the readers drain the pipes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        status
    }
}

/// Creates `topic` (3 partitions) and records every message in it, from the beginning.
async fn kafka_read(topic: &str, received: Arc<Mutex<Vec<Received>>>) {
    use rdkafka::{
        consumer::{Consumer as _, StreamConsumer},
        message::{Headers, Message as _},
        ClientConfig, Offset, TopicPartitionList,
    };
    create_kafka_topic(topic).await;
    let brokers = kafka_brokers();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("test-{topic}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for p in 0..3 {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    tokio::spawn(async move {
        loop {
            let m = match consumer.recv().await {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("kafka consumer: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut headers = BTreeMap::new();
            let mut header_names = Vec::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    header_names.push(header.key.to_owned());
                    let value = header
                        .value
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    headers.insert(header.key.to_owned(), value);
                }
            }
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
            received.lock().unwrap().push(Received {
                message_id: headers.get("outbox-id").cloned(),
                id: headers
                    .get("outbox-id")
                    .and_then(|s| s.parse().ok())
                    .expect("outbox-id header"),
                key: headers.get("outbox-key").cloned().or(key),
                seq: headers
                    .get("outbox-seq")
                    .and_then(|s| s.parse().ok())
                    .expect("outbox-seq header"),
                topic: headers
                    .get("outbox-topic")
                    .cloned()
                    .expect("outbox-topic header"),
                content_type: headers.get("content-type").cloned(),
                delivery_mode: None,
                payload: m.payload().unwrap_or_default().to_vec(),
                exchange: String::new(),
                routing_key: m.topic().to_owned(),
                partition: Some(m.partition()),
                headers,
                header_names,
            });
        }
    });
}

/// Creates `topic` with 3 partitions, unless it exists.
async fn create_kafka_topic(topic: &str) {
    use rdkafka::{
        admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
        client::DefaultClientContext,
        ClientConfig,
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("admin client");
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create_topics");
    for r in created {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => panic!("creating topic {t}: {e}"),
        }
    }
}

/// Joins consumer group `group` on `topic`, reads everything the group has not committed
/// yet and commits it without processing anything, as a consumer that acknowledges before
/// it handles and then crashes would. Returns how many messages it skipped.
async fn kafka_skip_uncommitted(topic: &str, group: &str) -> u64 {
    use rdkafka::{
        consumer::{CommitMode, Consumer as _, StreamConsumer},
        message::Message as _,
        ClientConfig, Offset, TopicPartitionList,
    };
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("Kafka consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut skipped = 0;
    // The first message waits for the group to take the consumer in; then the topic is
    // read to its end once nothing more arrives for a while.
    let mut wait = Duration::from_secs(20);
    while let Ok(m) = tokio::time::timeout(wait, consumer.recv()).await {
        let m = m.expect("Kafka message");
        next.insert(m.partition(), m.offset() + 1);
        skipped += 1;
        wait = Duration::from_secs(2);
    }
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in next {
        offsets
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .expect("partition offset");
    }
    if offsets.count() > 0 {
        consumer
            .commit(&offsets, CommitMode::Sync)
            .expect("commit the skipped offsets");
    }
    skipped
}

/// `GET path` on 127.0.0.1:port: (status code, body); `None` if nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// A server that takes TCP connections and never answers (a broker hung before its
/// handshake, or a proxy in front of a dead one): fault injection a real broker cannot give.
/// It counts the connections it took and those the client has since closed.
pub struct SilentServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    closed: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl SilentServer {
    /// Starts listening on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local address").port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn({
            let (accepted, closed) = (accepted.clone(), closed.clone());
            async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let closed = closed.clone();
                    // Reads what the client sends (its protocol header, a TLS hello) and
                    // answers nothing, until the client closes the connection.
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Self {
            port,
            accepted,
            closed,
            task,
        }
    }

    /// Connections taken so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections the client has closed so far.
    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits up to `timeout` for the client to have closed every connection it opened;
    /// returns (accepted, closed) as they stand then.
    pub async fn wait_all_closed(&self, timeout: Duration) -> (usize, usize) {
        let start = Instant::now();
        loop {
            let (accepted, closed) = (self.accepted(), self.closed());
            if closed >= accepted || start.elapsed() >= timeout {
                return (accepted, closed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
        .port()
}

/// The SQL block that follows `<!-- sql-contract:NAME -->` in the README: what the README
/// tells users to run is what the tests run.
pub fn readme_sql(name: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let marker = format!("<!-- sql-contract:{name} -->");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README has no {marker}"));
    readme[at + marker.len()..]
        .split("```sql")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .unwrap_or_else(|| panic!("no sql block after {marker}"))
        .trim()
        .to_owned()
}
