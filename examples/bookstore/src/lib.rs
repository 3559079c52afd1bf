//! # The bookstore saga
//!
//! Three services, each with its own schema and database role, joined only by messages:
//!
//! - **account** holds the customers' balances and places orders. Placing one is ONE
//!   transaction: the order row, two outbox messages ("ship one copy" to the warehouse,
//!   "credit 100" to the merchant) and the debit. Without enough money the debit fails and
//!   the transaction rolls back: no order, no message, no trace.
//! - **warehouse** consumes the shipping orders with `outbox-consumer` (dedup in its own
//!   schema). While a book is out of stock its handler asks to be retried; after the retries
//!   the message is parked in the warehouse's dead letters, and the story goes on.
//! - **merchant** consumes the credits.
//!
//! The relay runs as a real sidecar process (`outbox-relay run`). When every message has
//! settled, `outbox-relay reconcile` reports the parked shipment; the warehouse restocks, and
//! an operator replays it with `outbox-consumer dead replay`: the running warehouse consumer
//! handles it again through its dedup step. Reconciliation is then clean, and the final state
//! is checked: money conserved, every paid order shipped and credited exactly once, refused
//! orders without a trace.

pub mod broker;
pub mod check;
pub mod services;
pub mod setup;
pub mod tools;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use outbox::{Outbox, Schema};
use outbox_consumer::{DeadLetters, Deduplicator, LetterFilter, RetryPolicy};
use sqlx::{postgres::PgPoolOptions, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{
    services::{Account, Credit, Order, Ship},
    setup::{Roles, CUSTOMERS, MERCHANT_INBOX, OUTBOX_SCHEMA, PRICE, SCHEDULE, WAREHOUSE_INBOX},
    tools::Sidecar,
};

/// The broker between the services.
#[derive(Debug, Clone)]
pub enum Broker {
    /// RabbitMQ at this URL; the relay publishes to queues named like the topics.
    RabbitMq {
        /// `amqp://…`
        url: String,
    },
    /// Kafka at these bootstrap servers.
    Kafka {
        /// `host:port[,…]`
        brokers: String,
    },
}

/// How to run the story.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL URL of a role that may create roles and schemas (the database's owner).
    pub database_url: String,
    /// The broker.
    pub broker: Broker,
    /// The `outbox-relay` binary.
    pub relay_bin: PathBuf,
    /// The `outbox-consumer` binary (cargo feature `cli`).
    pub consumer_bin: PathBuf,
    /// Orders to place (the schedule repeats after 10).
    pub orders: usize,
    /// Prefix of the topics: `<namespace>.ship` and `<namespace>.credit`.
    pub namespace: String,
    /// The warehouse's retries while a book is out of stock.
    pub warehouse_retry: RetryPolicy,
    /// How often the consumers look for replays an operator asked for.
    pub replay_interval: Duration,
    /// Where the relay's log goes (default: a file in the temporary directory).
    pub relay_log: Option<PathBuf>,
    /// How long deliveries may take before the run fails.
    pub deadline: Duration,
}

impl Config {
    /// The story's defaults: 10 orders, topics `bookstore.*`, the warehouse retrying 4 times
    /// from 100 ms.
    pub fn new(
        database_url: impl Into<String>,
        broker: Broker,
        relay_bin: PathBuf,
        consumer_bin: PathBuf,
    ) -> Self {
        Self {
            database_url: database_url.into(),
            broker,
            relay_bin,
            consumer_bin,
            orders: 10,
            namespace: "bookstore".to_owned(),
            warehouse_retry: RetryPolicy {
                initial_delay: Duration::from_millis(100),
                factor: 2.0,
                max_delay: Duration::from_secs(1),
                max_attempts: 4,
            },
            replay_interval: Duration::from_millis(200),
            relay_log: None,
            deadline: Duration::from_secs(120),
        }
    }
}

/// What happened, and every check that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Orders paid (committed with their messages).
    pub paid: usize,
    /// Orders refused (rolled back).
    pub refused: usize,
    /// Messages the relay delivered (its delivery records).
    pub delivered: i64,
    /// Shipments made.
    pub shipped: i64,
    /// Credits made.
    pub credited: i64,
    /// Shipping orders parked in the warehouse's dead letters.
    pub parked: usize,
    /// Of those, replayed by the warehouse consumer after the operator asked.
    pub replayed: u64,
    /// Money in customers' and merchant's accounts at opening.
    pub money_at_opening: i64,
    /// Money in customers' and merchant's accounts at the end.
    pub money_at_end: i64,
    /// `outbox-relay reconcile` exit codes: before the replay, after it.
    pub reconcile_exits: Vec<Option<i32>>,
    /// Every check that failed, in words.
    pub failures: Vec<String>,
}

impl Summary {
    /// True when every check passed.
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

pub(crate) async fn count(pool: &PgPool, sql: &str) -> anyhow::Result<i64> {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .with_context(|| format!("counting: {sql}"))
}

/// Runs the story and checks its end. Errors are failures to run it at all (a server
/// unreachable, a binary missing); a story that runs but ends wrong returns a [`Summary`]
/// with `failures`.
pub async fn run(cfg: &Config) -> anyhow::Result<Summary> {
    let t0 = Instant::now();
    let at = || format!("[{:>5.1}s]", t0.elapsed().as_secs_f64());
    let mut summary = Summary::default();
    let ship_topic = format!("{}.ship", cfg.namespace);
    let credit_topic = format!("{}.credit", cfg.namespace);
    let broker_name = match cfg.broker {
        Broker::RabbitMq { .. } => "RabbitMQ",
        Broker::Kafka { .. } => "Kafka",
    };
    for bin in [&cfg.relay_bin, &cfg.consumer_bin] {
        if !bin.exists() {
            bail!(
                "{} not found: build it first (cargo build -p outbox-relay -p outbox-consumer --features outbox-consumer/cli)",
                bin.display()
            );
        }
    }

    println!("== the bookstore: three services, each with its own schema and role, joined by messages ({broker_name})");
    println!("   account    balances and orders; writes each order and its two messages in one transaction (outbox: {OUTBOX_SCHEMA})");
    println!("   warehouse  stock and shipments; consumes {ship_topic} with outbox-consumer (dedup: {WAREHOUSE_INBOX})");
    println!("   merchant   the merchant's balance; consumes {credit_topic} with outbox-consumer (dedup: {MERCHANT_INBOX})");

    let admin = PgPoolOptions::new()
        .max_connections(4)
        .connect(&cfg.database_url)
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {}",
                tools::redact(&cfg.database_url)
            )
        })?;
    let roles = Roles::new(&cfg.database_url)?;
    println!();
    println!("== setup: schemas and roles, the product's migrations, least-privilege grants");
    setup::create(&admin, &roles).await?;
    let admin_env = |schema: &str| {
        vec![
            ("OUTBOX__DATABASE__URL", cfg.database_url.clone()),
            ("OUTBOX__DATABASE__SCHEMA", schema.to_owned()),
            ("DATABASE_URL", cfg.database_url.clone()),
        ]
    };
    let (code, _) = tools::run(
        &cfg.relay_bin,
        &["migrate"],
        &admin_env(OUTBOX_SCHEMA),
        &format!("OUTBOX__DATABASE__SCHEMA={OUTBOX_SCHEMA} "),
    )
    .await?;
    if code != Some(0) {
        bail!("outbox-relay migrate failed");
    }
    for inbox in [WAREHOUSE_INBOX, MERCHANT_INBOX] {
        let (code, _) = tools::run(
            &cfg.consumer_bin,
            &["--schema", inbox, "migrate"],
            &admin_env(inbox),
            "",
        )
        .await?;
        if code != Some(0) {
            bail!("outbox-consumer migrate failed");
        }
    }
    setup::grant(&admin, &roles).await?;
    println!("  roles {}, {}, {}, {} (the relay) and {} (reconciliation), each granted only what it needs",
        roles.account.name, roles.warehouse.name, roles.merchant.name, roles.relay.name, roles.auditor.name);
    let money_at_opening: i64 = CUSTOMERS.iter().map(|(_, b)| i64::from(*b)).sum();
    summary.money_at_opening = money_at_opening;

    broker::prepare(&cfg.broker, &[&ship_topic, &credit_topic]).await?;

    // The relay: a sidecar of the account service.
    let log = cfg.relay_log.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("outbox-bookstore-relay-{}.log", std::process::id()))
    });
    let mut relay_env = vec![
        ("OUTBOX__DATABASE__URL", roles.relay.url.clone()),
        ("OUTBOX__DATABASE__SCHEMA", OUTBOX_SCHEMA.to_owned()),
        // Delivery records for reconciliation.
        ("OUTBOX__RETENTION__DELIVERED", "1h".to_owned()),
        ("OUTBOX__RELAY__POLL_INTERVAL", "250ms".to_owned()),
        ("OUTBOX__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    match &cfg.broker {
        Broker::RabbitMq { url } => relay_env.push(("OUTBOX__RABBITMQ__URL", url.clone())),
        Broker::Kafka { brokers } => {
            relay_env.push(("OUTBOX__BROKER", "kafka".to_owned()));
            relay_env.push(("OUTBOX__KAFKA__BROKERS", brokers.clone()));
        }
    }
    let mut relay = Sidecar::start(&cfg.relay_bin, &relay_env, log)?;
    println!();
    println!(
        "== the relay: `outbox-relay run` as the account service's sidecar (pid {}, role {}, log {})",
        relay.pid(),
        roles.relay.name,
        relay.log.display()
    );

    // The consumers.
    let warehouse_pool = connect(&roles.warehouse.url, 8).await?;
    let merchant_pool = connect(&roles.merchant.url, 8).await?;
    let warehouse = Deduplicator::new(warehouse_pool.clone(), "warehouse")?
        .with_schema(Schema::parse(WAREHOUSE_INBOX)?)
        .with_retry(cfg.warehouse_retry)
        .with_replay_interval(cfg.replay_interval);
    let merchant = Deduplicator::new(merchant_pool.clone(), "merchant")?
        .with_schema(Schema::parse(MERCHANT_INBOX)?)
        .with_replay_interval(cfg.replay_interval);
    let shutdown = CancellationToken::new();
    let consumers = vec![
        broker::consume(
            cfg,
            &ship_topic,
            warehouse.clone(),
            Arc::new(Ship),
            &shutdown,
        ),
        broker::consume(
            cfg,
            &credit_topic,
            merchant.clone(),
            Arc::new(Credit),
            &shutdown,
        ),
    ];
    let r = cfg.warehouse_retry;
    println!(
        "== the consumers: warehouse and merchant, outbox-consumer's {broker_name} source (the warehouse retries {} times from {:?}, doubling, then parks the message)",
        r.max_attempts, r.initial_delay
    );

    // The orders.
    let account = Account {
        pool: connect(&roles.account.url, 2).await?,
        outbox: Outbox::new(Schema::parse(OUTBOX_SCHEMA)?),
        ship_topic: ship_topic.clone(),
        credit_topic: credit_topic.clone(),
    };
    println!();
    println!(
        "== orders: {PRICE} per book; opening balances {}",
        CUSTOMERS
            .iter()
            .map(|(c, b)| format!("{c} {b}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut orders: Vec<Order> = Vec::new();
    for i in 0..cfg.orders {
        let (customer, book) = SCHEDULE[i % SCHEDULE.len()];
        let order = account.place(i + 1, customer, book).await?;
        match order.paid {
            Some(left) => println!(
                "  {} order #{:<3} {customer:<6} buys {book:<12} paid ({customer} has {left} left): order, debit and 2 messages committed together",
                at(),
                order.number
            ),
            None => println!(
                "  {} order #{:<3} {customer:<6} buys {book:<12} REFUSED: not enough money; rolled back, nothing written, nothing published",
                at(),
                order.number
            ),
        }
        orders.push(order);
    }
    let paid: Vec<&Order> = orders.iter().filter(|o| o.paid.is_some()).collect();
    let refused: Vec<&Order> = orders.iter().filter(|o| o.paid.is_none()).collect();
    summary.paid = paid.len();
    summary.refused = refused.len();
    let paid_n = paid.len() as i64;

    // Deliveries.
    println!();
    println!("== deliveries: the relay publishes each message once the broker confirms it; each consumer handles it in one transaction with its dedup row");
    let progress = |delivered: i64, shipped: i64, credited: i64, parked: i64| {
        println!(
            "  {} relay delivered {delivered}/{}   warehouse shipped {shipped}, parked {parked}   merchant credited {credited}/{paid_n}",
            at(),
            2 * paid_n
        )
    };
    let counts = || async {
        anyhow::Ok((
            count(&admin, "SELECT count(*) FROM account_outbox.delivered").await?,
            count(&admin, "SELECT count(*) FROM warehouse.shipments").await?,
            count(&admin, "SELECT count(*) FROM merchant.credits").await?,
            count(&admin, "SELECT count(*) FROM warehouse_inbox.dead_letters").await?,
            count(&admin, "SELECT count(*) FROM merchant_inbox.dead_letters").await?,
        ))
    };
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let (delivered, shipped, credited, parked_w, parked_m) = counts().await?;
        let settled = delivered >= 2 * paid_n
            && shipped + parked_w >= paid_n
            && credited + parked_m >= paid_n;
        if settled || last_print.elapsed() >= Duration::from_secs(1) {
            progress(delivered, shipped, credited, parked_w + parked_m);
            last_print = Instant::now();
        }
        if settled {
            break;
        }
        if started.elapsed() > cfg.deadline || !relay.running() {
            summary.failures.push(format!(
                "deliveries did not settle within {:?} (relay running: {}); relay log:\n{}",
                cfg.deadline,
                relay.running(),
                relay.tail(20)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = DeadLetters::new(admin.clone(), Schema::parse(WAREHOUSE_INBOX)?)
        .list(&LetterFilter::every(), 10_000)
        .await?;
    let merchant_letters =
        count(&admin, "SELECT count(*) FROM merchant_inbox.dead_letters").await?;
    if merchant_letters > 0 {
        summary
            .failures
            .push(format!("the merchant parked {merchant_letters} credits"));
    }
    summary.parked = letters.len();
    let mut restock: BTreeMap<String, i32> = BTreeMap::new();
    for l in &letters {
        let payload: Vec<u8> =
            sqlx::query_scalar("SELECT payload FROM warehouse_inbox.dead_letters WHERE id = $1")
                .bind(l.letter)
                .fetch_one(&admin)
                .await?;
        let body: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        let title = body["book"].as_str().unwrap_or("?").to_owned();
        println!(
            "  {} warehouse parked order #{} ({title:?}) in its dead letters after {} attempts: {}",
            at(),
            body["number"],
            l.attempts,
            l.error
        );
        *restock.entry(title).or_default() += 1;
    }

    // Reconciliation, with everything settled: it must see exactly the parked shipments.
    let reconcile = |label: &'static str| {
        let env = vec![
            ("OUTBOX__DATABASE__URL", roles.auditor.url.clone()),
            ("OUTBOX__DATABASE__SCHEMA", OUTBOX_SCHEMA.to_owned()),
        ];
        let warehouse_group = format!("warehouse={ship_topic}");
        let merchant_group = format!("merchant={credit_topic}");
        let relay_bin = cfg.relay_bin.clone();
        async move {
            println!();
            println!("== reconciliation {label} (role {}: reads no payloads; thresholds 0s: everything must have settled)", roles.auditor.name);
            tools::run(
                &relay_bin,
                &[
                    "reconcile",
                    "--consumer-schema",
                    WAREHOUSE_INBOX,
                    "--consumer-schema",
                    MERCHANT_INBOX,
                    "--group",
                    &warehouse_group,
                    "--group",
                    &merchant_group,
                    "--since",
                    "1h",
                    "--max-lag",
                    "0s",
                    "--max-pending-age",
                    "0s",
                ],
                &env,
                "",
            )
            .await
        }
    };
    let (code, _) = reconcile(if letters.is_empty() {
        ""
    } else {
        "before the fix"
    })
    .await?;
    summary.reconcile_exits.push(code);
    let expected = if letters.is_empty() { 0 } else { 1 };
    if code != Some(expected) {
        summary.failures.push(format!(
            "reconcile exited {code:?}, expected {expected} ({} parked)",
            letters.len()
        ));
    }

    if letters.is_empty() {
        println!("  nothing was parked: nothing for an operator to do");
    } else {
        println!();
        println!("== the operator: the warehouse restocks, then the parked shipments are replayed through the running warehouse consumer");
        let warehouse_env = vec![("DATABASE_URL", roles.warehouse.url.clone())];
        let shown = format!("DATABASE_URL=postgres://{}:***@… ", roles.warehouse.name);
        tools::run(
            &cfg.consumer_bin,
            &[
                "--schema",
                WAREHOUSE_INBOX,
                "dead",
                "list",
                "--group",
                "warehouse",
            ],
            &warehouse_env,
            &shown,
        )
        .await?;
        for (book, n) in &restock {
            sqlx::query("UPDATE warehouse.stock SET copies = copies + $2 WHERE book = $1")
                .bind(book)
                .bind(n)
                .execute(&warehouse_pool)
                .await?;
            println!("  {} warehouse restocks {book:?}: +{n}", at());
        }
        let (code, _) = tools::run(
            &cfg.consumer_bin,
            &[
                "--schema",
                WAREHOUSE_INBOX,
                "dead",
                "replay",
                "--group",
                "warehouse",
                "--wait",
                "30s",
            ],
            &warehouse_env,
            &shown,
        )
        .await?;
        if code != Some(0) {
            summary
                .failures
                .push(format!("outbox-consumer dead replay exited {code:?}"));
        }
        let started = Instant::now();
        while count(&admin, "SELECT count(*) FROM warehouse.shipments").await? < paid_n
            && started.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        summary.replayed = warehouse.stats().replayed;
        let (delivered, shipped, credited, parked_w, parked_m) = counts().await?;
        progress(delivered, shipped, credited, parked_w + parked_m);
        let (code, _) = reconcile("after the replay").await?;
        summary.reconcile_exits.push(code);
        if code != Some(0) {
            summary.failures.push(format!(
                "reconcile after the replay exited {code:?}, expected 0"
            ));
        }
    }

    // Stop: consumers finish the message in hand; the relay drains on SIGTERM.
    shutdown.cancel();
    for c in consumers {
        match c.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => summary.failures.push(format!("a consumer failed: {e}")),
            Err(e) => summary
                .failures
                .push(format!("a consumer task failed: {e}")),
        }
    }
    let tail = relay.tail(20);
    if !relay.stop(Duration::from_secs(30)).await? {
        summary.failures.push(format!(
            "the relay did not exit 0 on SIGTERM; its log:\n{tail}"
        ));
    }
    println!();
    println!("== stopped: the consumers finished their messages in hand, the relay drained and exited on SIGTERM");

    check::check(&admin, &orders, &restock, &mut summary).await?;
    println!();
    if summary.ok() {
        println!("OK ({:.1} s)", t0.elapsed().as_secs_f64());
    } else {
        println!("FAILED:");
        for f in &summary.failures {
            println!("  - {f}");
        }
    }
    Ok(summary)
}

async fn connect(url: &str, max: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", tools::redact(url)))
}
