//! # The bookstore saga
//!
//! Three services, each with its own schema, database role, outbox and relay sidecar, joined
//! only by messages:
//!
//! - **account** holds the customers' balances and places orders. Placing one is ONE
//!   transaction: the order row, its steps (the debit done; shipping and crediting in
//!   progress), two outbox messages ("ship one copy" to the warehouse, "credit 100" to the
//!   merchant) and the debit. Without enough money the debit fails and the transaction rolls
//!   back: no order, no message, no trace. It consumes the replies and moves each step to
//!   "done"; the first reply's handling fails before its commit, as a crash would, and is
//!   done again, once.
//! - **warehouse** consumes the shipping orders with `outbox-consumer` (dedup in its own
//!   schema) and replies through its own outbox, in the transaction of the shipment. While a
//!   book is out of stock its handler asks to be retried; after the retries the message is
//!   parked in the warehouse's dead letters, and the story goes on.
//! - **merchant** consumes the credits and replies the same way.
//!
//! Each relay runs as a real sidecar process (`outbox-relay run`). When every message has
//! settled, `outbox-relay reconcile` reports the parked shipment; the warehouse restocks, and
//! an operator replays it with `outbox-consumer dead replay`. Then the merchant's consumer is
//! down while two more orders are paid, and their credits are lost after delivery (its queue
//! purged on RabbitMQ; on Kafka, skipped by a member of its group): reconcile
//! reports the two credits as delivered but not processed, and `reconcile --repair` sends
//! them again from the account relay's archive. Reconciliation is then clean, for the orders
//! and for the replies, and the final state is checked: money conserved, every paid order
//! shipped and credited exactly once with both steps done by one reply each, refused orders
//! without a trace.

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
    services::{Account, Credit, Order, Replies, Reply, Ship},
    setup::{
        Roles, ACCOUNT_INBOX, CREDITED_GROUP, CUSTOMERS, INBOXES, MERCHANT_INBOX, MERCHANT_OUTBOX,
        OUTBOXES, OUTBOX_SCHEMA, PRICE, REPAIR_ORDERS, SCHEDULE, SHIPPED_GROUP, WAREHOUSE_INBOX,
        WAREHOUSE_OUTBOX,
    },
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
    /// Where the account's relay's log goes, the warehouse's and the merchant's beside it
    /// (`FILE.warehouse`, `FILE.merchant`); default: files in the temporary directory.
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
    /// `outbox-relay reconcile` exit codes, in the story's order: before the replay, after
    /// it, with `--repair`, after the repair, then each reply outbox.
    pub reconcile_exits: Vec<Option<i32>>,
    /// Credits `reconcile --repair` sent again after they were lost.
    pub repaired: u64,
    /// Replies whose handling failed before its commit and was done again (once).
    pub crashed_replies: u64,
    /// Replies the warehouse's and the merchant's relays delivered.
    pub replies: i64,
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
    for bin in [&cfg.relay_bin, &cfg.consumer_bin] {
        if !bin.exists() {
            bail!(
                "{} not found: build it first (cargo build -p outbox-relay -p outbox-consumer --features outbox-consumer/cli)",
                bin.display()
            );
        }
    }
    let mut story = Story::open(cfg).await?;
    story.start_relays()?;
    story.start_consumers();
    for i in 0..cfg.orders {
        let (customer, book) = SCHEDULE[i % SCHEDULE.len()];
        story.place(i + 1, customer, book).await?;
    }
    let paid = story.paid();
    println!();
    println!("== deliveries: each relay publishes its messages once the broker confirms them; each consumer handles one in one transaction with its dedup row (and its reply)");
    story.settle(paid, paid).await?;
    story.fix_parked().await?;
    story.lose_and_repair().await?;
    story.reconcile_replies().await?;
    story.stop().await?;
    let Story {
        admin,
        orders,
        restock,
        mut summary,
        t0,
        ..
    } = story;
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

/// The topics between the services.
struct Topics {
    ship: String,
    credit: String,
    shipped: String,
    credited: String,
}

/// A running consumer: its task, and what stops it.
struct Running {
    task: tokio::task::JoinHandle<Result<(), outbox_consumer::ConsumerError>>,
    stop: CancellationToken,
}

/// The story as it runs: the services, their sidecars and consumers, and what happened.
struct Story<'a> {
    cfg: &'a Config,
    t0: Instant,
    admin: PgPool,
    roles: Roles,
    topics: Topics,
    account: Account,
    warehouse: Deduplicator,
    merchant: Deduplicator,
    /// The account's groups for the replies: one per replying service (and outbox), so
    /// that each reconciles against its own.
    replies: [Deduplicator; 2],
    reply: Arc<Reply>,
    warehouse_pool: PgPool,
    relays: Vec<Sidecar>,
    consumers: Vec<Running>,
    /// The merchant's consumer, stopped and started again by the loss and repair.
    merchant_consumer: Option<Running>,
    orders: Vec<Order>,
    restock: BTreeMap<String, i32>,
    summary: Summary,
}

impl<'a> Story<'a> {
    fn at(&self) -> String {
        format!("[{:>5.1}s]", self.t0.elapsed().as_secs_f64())
    }

    /// The services' schemas and roles, the product's migrations, the grants, the queues or
    /// topics.
    async fn open(cfg: &'a Config) -> anyhow::Result<Story<'a>> {
        let t0 = Instant::now();
        let ns = &cfg.namespace;
        let topics = Topics {
            ship: format!("{ns}.ship"),
            credit: format!("{ns}.credit"),
            shipped: format!("{ns}.shipped"),
            credited: format!("{ns}.credited"),
        };
        let broker_name = broker_name(&cfg.broker);
        println!("== the bookstore: three services, each with its own schema, role, outbox and relay sidecar, joined by messages ({broker_name})");
        println!("   account    balances, orders and their steps; writes each order and its two messages in one transaction (outbox: {OUTBOX_SCHEMA}); consumes the replies (dedup: {ACCOUNT_INBOX})");
        println!("   warehouse  stock and shipments; consumes {} (dedup: {WAREHOUSE_INBOX}); replies on {} (outbox: {WAREHOUSE_OUTBOX})", topics.ship, topics.shipped);
        println!("   merchant   the merchant's balance; consumes {} (dedup: {MERCHANT_INBOX}); replies on {} (outbox: {MERCHANT_OUTBOX})", topics.credit, topics.credited);

        let admin = connect(&cfg.database_url, 4).await?;
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
        for outbox in OUTBOXES {
            let (code, _) = tools::run(
                &cfg.relay_bin,
                &["migrate"],
                &admin_env(outbox),
                &format!("OUTBOX__DATABASE__SCHEMA={outbox} "),
            )
            .await?;
            if code != Some(0) {
                bail!("outbox-relay migrate failed");
            }
        }
        for inbox in INBOXES {
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
        println!("  roles {}, {}, {}, {} (the relays) and {} (reconciliation and repair), each granted only what it needs",
            roles.account.name, roles.warehouse.name, roles.merchant.name, roles.relay.name, roles.auditor.name);
        let summary = Summary {
            money_at_opening: CUSTOMERS.iter().map(|(_, b)| i64::from(*b)).sum(),
            ..Summary::default()
        };
        broker::prepare(
            &cfg.broker,
            &[
                &topics.ship,
                &topics.credit,
                &topics.shipped,
                &topics.credited,
            ],
        )
        .await?;

        let warehouse_pool = connect(&roles.warehouse.url, 8).await?;
        let merchant_pool = connect(&roles.merchant.url, 8).await?;
        let account_pool = connect(&roles.account.url, 8).await?;
        let warehouse = Deduplicator::new(warehouse_pool.clone(), "warehouse")?
            .with_schema(Schema::parse(WAREHOUSE_INBOX)?)
            .with_retry(cfg.warehouse_retry)
            .with_replay_interval(cfg.replay_interval);
        let merchant = Deduplicator::new(merchant_pool, "merchant")?
            .with_schema(Schema::parse(MERCHANT_INBOX)?)
            .with_replay_interval(cfg.replay_interval);
        let reply_group = |group: &str| -> anyhow::Result<Deduplicator> {
            Ok(Deduplicator::new(account_pool.clone(), group)?
                .with_schema(Schema::parse(ACCOUNT_INBOX)?)
                .with_retry(RetryPolicy {
                    initial_delay: Duration::from_millis(100),
                    ..RetryPolicy::default()
                })
                .with_replay_interval(cfg.replay_interval))
        };
        let replies = [reply_group(SHIPPED_GROUP)?, reply_group(CREDITED_GROUP)?];
        let account = Account {
            pool: account_pool,
            outbox: Outbox::new(Schema::parse(OUTBOX_SCHEMA)?),
            ship_topic: topics.ship.clone(),
            credit_topic: topics.credit.clone(),
        };
        Ok(Story {
            cfg,
            t0,
            admin,
            roles,
            topics,
            account,
            warehouse,
            merchant,
            replies,
            reply: Arc::new(Reply::crashing_once()),
            warehouse_pool,
            relays: Vec::new(),
            consumers: Vec::new(),
            merchant_consumer: None,
            orders: Vec::new(),
            restock: BTreeMap::new(),
            summary,
        })
    }

    /// One relay sidecar per service, each on its own outbox. The account's keeps its
    /// delivered messages whole, so that a repair can send them again.
    fn start_relays(&mut self) -> anyhow::Result<()> {
        let cfg = self.cfg;
        println!();
        for (service, outbox) in ["account", "warehouse", "merchant"]
            .into_iter()
            .zip(OUTBOXES)
        {
            let log = match &cfg.relay_log {
                Some(path) if service == "account" => path.clone(),
                Some(path) => PathBuf::from(format!("{}.{service}", path.display())),
                None => std::env::temp_dir().join(format!(
                    "outbox-bookstore-relay-{service}-{}.log",
                    std::process::id()
                )),
            };
            let mut env = vec![
                ("OUTBOX__DATABASE__URL", self.roles.relay.url.clone()),
                ("OUTBOX__DATABASE__SCHEMA", outbox.to_owned()),
                // Delivery records for reconciliation.
                ("OUTBOX__RETENTION__DELIVERED", "1h".to_owned()),
                ("OUTBOX__RELAY__POLL_INTERVAL", "250ms".to_owned()),
                ("OUTBOX__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
            ];
            if service == "account" {
                env.push(("OUTBOX__RETENTION__DELIVERED_PAYLOADS", "true".to_owned()));
            }
            match &cfg.broker {
                Broker::RabbitMq { url } => env.push(("OUTBOX__RABBITMQ__URL", url.clone())),
                Broker::Kafka { brokers } => {
                    env.push(("OUTBOX__BROKER", "kafka".to_owned()));
                    env.push(("OUTBOX__KAFKA__BROKERS", brokers.clone()));
                }
            }
            let relay = Sidecar::start(&cfg.relay_bin, &env, log)?;
            println!(
                "== the {service}'s relay: `outbox-relay run` as its sidecar on {outbox} (pid {}, role {}{}, log {})",
                relay.pid(),
                self.roles.relay.name,
                if service == "account" {
                    ", delivered messages kept whole for repairs"
                } else {
                    ""
                },
                relay.log.display()
            );
            self.relays.push(relay);
        }
        Ok(())
    }

    fn consume_credits(&self) -> Running {
        let stop = CancellationToken::new();
        let task = broker::consume(
            self.cfg,
            &[&self.topics.credit],
            self.merchant.clone(),
            Arc::new(Credit(Replies {
                outbox: Outbox::new(Schema::parse(MERCHANT_OUTBOX).expect("a valid schema")),
                topic: self.topics.credited.clone(),
            })),
            &stop,
        );
        Running { task, stop }
    }

    /// The warehouse, the merchant, and the account's consumer of their replies.
    fn start_consumers(&mut self) {
        let stop = CancellationToken::new();
        let ship = Arc::new(Ship(Replies {
            outbox: Outbox::new(Schema::parse(WAREHOUSE_OUTBOX).expect("a valid schema")),
            topic: self.topics.shipped.clone(),
        }));
        let task = broker::consume(
            self.cfg,
            &[&self.topics.ship],
            self.warehouse.clone(),
            ship,
            &stop,
        );
        self.consumers.push(Running { task, stop });
        for (topic, group) in [&self.topics.shipped, &self.topics.credited]
            .into_iter()
            .zip(&self.replies)
        {
            let stop = CancellationToken::new();
            let task =
                broker::consume(self.cfg, &[topic], group.clone(), self.reply.clone(), &stop);
            self.consumers.push(Running { task, stop });
        }
        self.merchant_consumer = Some(self.consume_credits());
        let r = self.cfg.warehouse_retry;
        println!(
            "== the consumers: warehouse, merchant and the account's replies, outbox-consumer's {} source (the warehouse retries {} times from {:?}, doubling, then parks the message)",
            broker_name(&self.cfg.broker),
            r.max_attempts,
            r.initial_delay
        );
        println!();
        println!(
            "== orders: {PRICE} per book; opening balances {}",
            CUSTOMERS
                .iter()
                .map(|(c, b)| format!("{c} {b}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    /// Places order `number` and says how it went.
    async fn place(&mut self, number: usize, customer: &str, book: &str) -> anyhow::Result<()> {
        let order = self.account.place(number, customer, book).await?;
        match order.paid {
            Some(left) => println!(
                "  {} order #{:<3} {customer:<6} buys {book:<12} paid ({customer} has {left} left): order, steps, debit and 2 messages committed together",
                self.at(),
                order.number
            ),
            None => {
                println!(
                    "  {} order #{:<3} {customer:<6} buys {book:<12} REFUSED: not enough money; rolled back, nothing written, nothing published",
                    self.at(),
                    order.number
                );
                self.summary.refused += 1;
            }
        }
        if order.paid.is_some() {
            self.summary.paid += 1;
        }
        self.orders.push(order);
        Ok(())
    }

    fn paid(&self) -> i64 {
        self.summary.paid as i64
    }

    async fn counts(&self) -> anyhow::Result<Counts> {
        let a = &self.admin;
        Ok(Counts {
            delivered: count(a, "SELECT count(*) FROM account_outbox.delivered").await?,
            shipped: count(a, "SELECT count(*) FROM warehouse.shipments").await?,
            credited: count(a, "SELECT count(*) FROM merchant.credits").await?,
            steps_done: count(
                a,
                "SELECT count(*) FROM account.order_steps WHERE step <> 'debit' AND state = 'done'",
            )
            .await?,
            parked_w: count(a, "SELECT count(*) FROM warehouse_inbox.dead_letters").await?,
            parked_m: count(a, "SELECT count(*) FROM merchant_inbox.dead_letters").await?,
        })
    }

    fn progress(&self, c: &Counts) {
        let paid = self.paid();
        println!(
            "  {} relay delivered {}/{}   warehouse shipped {}, parked {}   merchant credited {}/{paid}   account steps done {}/{}",
            self.at(),
            c.delivered,
            2 * paid,
            c.shipped,
            c.parked_w + c.parked_m,
            c.credited,
            c.steps_done,
            2 * paid
        );
    }

    /// Waits until every paid order's messages were delivered and handled (shipped or
    /// parked, credited) and each effect's reply moved its step, with `shipped` shipments and
    /// `credited` credits expected at most; prints the progress every second.
    async fn settle(&mut self, shipped: i64, credited: i64) -> anyhow::Result<Counts> {
        let started = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let c = self.counts().await?;
            let settled = c.delivered >= 2 * self.paid()
                && c.shipped + c.parked_w >= shipped
                && c.credited + c.parked_m >= credited
                && c.steps_done == c.shipped + c.credited;
            if settled || last_print.elapsed() >= Duration::from_secs(1) {
                self.progress(&c);
                last_print = Instant::now();
            }
            if settled {
                return Ok(c);
            }
            let down = self.relays.iter_mut().position(|r| !r.running());
            if started.elapsed() > self.cfg.deadline || down.is_some() {
                let relay = &self.relays[down.unwrap_or(0)];
                self.summary.failures.push(format!(
                    "deliveries did not settle within {:?} (a relay stopped: {}); relay log:\n{}",
                    self.cfg.deadline,
                    down.is_some(),
                    relay.tail(20)
                ));
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `outbox-relay reconcile` of `outbox`'s deliveries against `groups` in `inboxes`, as the
    /// auditor; `extra` arguments after the story's own. Returns the exit code and output.
    async fn reconcile(
        &mut self,
        label: &str,
        outbox: &str,
        inboxes: &[&str],
        groups: &[String],
        extra: &[&str],
    ) -> anyhow::Result<(Option<i32>, String)> {
        let env = vec![
            ("OUTBOX__DATABASE__URL", self.roles.auditor.url.clone()),
            ("OUTBOX__DATABASE__SCHEMA", outbox.to_owned()),
        ];
        println!();
        println!("== reconciliation {label} (role {}: reads no payloads; thresholds 0s: everything must have settled)", self.roles.auditor.name);
        let mut args = vec!["reconcile"];
        for inbox in inboxes {
            args.extend(["--consumer-schema", inbox]);
        }
        for group in groups {
            args.extend(["--group", group]);
        }
        args.extend([
            "--since",
            "1h",
            "--max-lag",
            "0s",
            "--max-pending-age",
            "0s",
        ]);
        args.extend(extra);
        let shown = format!("OUTBOX__DATABASE__SCHEMA={outbox} ");
        let result = tools::run(&self.cfg.relay_bin, &args, &env, &shown).await?;
        self.summary.reconcile_exits.push(result.0);
        Ok(result)
    }

    /// The account's outbox against the warehouse and the merchant.
    async fn reconcile_orders(
        &mut self,
        label: &str,
        expected: i32,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let groups = [
            format!("warehouse={}", self.topics.ship),
            format!("merchant={}", self.topics.credit),
        ];
        let (code, out) = self
            .reconcile(
                label,
                OUTBOX_SCHEMA,
                &[WAREHOUSE_INBOX, MERCHANT_INBOX],
                &groups,
                extra,
            )
            .await?;
        if code != Some(expected) {
            self.summary.failures.push(format!(
                "reconcile {label} exited {code:?}, expected {expected}"
            ));
        }
        Ok(out)
    }

    /// A shipment parked for lack of stock: reconciliation reports it, the warehouse
    /// restocks, an operator replays it from the dead letters, and reconciliation is clean.
    async fn fix_parked(&mut self) -> anyhow::Result<()> {
        let letters = DeadLetters::new(self.admin.clone(), Schema::parse(WAREHOUSE_INBOX)?)
            .list(&LetterFilter::every(), 10_000)
            .await?;
        let merchant_letters = count(
            &self.admin,
            "SELECT count(*) FROM merchant_inbox.dead_letters",
        )
        .await?;
        if merchant_letters > 0 {
            self.summary
                .failures
                .push(format!("the merchant parked {merchant_letters} credits"));
        }
        self.summary.parked = letters.len();
        for l in &letters {
            let payload: Vec<u8> = sqlx::query_scalar(
                "SELECT payload FROM warehouse_inbox.dead_letters WHERE id = $1",
            )
            .bind(l.letter)
            .fetch_one(&self.admin)
            .await?;
            let body: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
            let title = body["book"].as_str().unwrap_or("?").to_owned();
            println!(
                "  {} warehouse parked order #{} ({title:?}) in its dead letters after {} attempts: {}",
                self.at(),
                body["number"],
                l.attempts,
                l.error
            );
            *self.restock.entry(title).or_default() += 1;
        }
        if letters.is_empty() {
            self.reconcile_orders("", 0, &[]).await?;
            println!("  nothing was parked: nothing for an operator to do");
            return Ok(());
        }
        self.reconcile_orders("before the fix", 1, &[]).await?;
        println!();
        println!("== the operator: the warehouse restocks, then the parked shipments are replayed through the running warehouse consumer");
        let warehouse_env = vec![("DATABASE_URL", self.roles.warehouse.url.clone())];
        let shown = format!(
            "DATABASE_URL=postgres://{}:***@… ",
            self.roles.warehouse.name
        );
        let dead = |action: &'static str| {
            let mut args = vec![
                "--schema",
                WAREHOUSE_INBOX,
                "dead",
                action,
                "--group",
                "warehouse",
            ];
            if action == "replay" {
                args.extend(["--wait", "30s"]);
            }
            args
        };
        tools::run(
            &self.cfg.consumer_bin,
            &dead("list"),
            &warehouse_env,
            &shown,
        )
        .await?;
        for (book, n) in &self.restock {
            sqlx::query("UPDATE warehouse.stock SET copies = copies + $2 WHERE book = $1")
                .bind(book)
                .bind(n)
                .execute(&self.warehouse_pool)
                .await?;
            println!("  {} warehouse restocks {book:?}: +{n}", self.at());
        }
        let (code, _) = tools::run(
            &self.cfg.consumer_bin,
            &dead("replay"),
            &warehouse_env,
            &shown,
        )
        .await?;
        if code != Some(0) {
            self.summary
                .failures
                .push(format!("outbox-consumer dead replay exited {code:?}"));
        }
        let paid = self.paid();
        self.settle(paid, paid).await?;
        self.summary.replayed = self.warehouse.stats().replayed;
        self.reconcile_orders("after the replay", 0, &[]).await?;
        Ok(())
    }

    /// A loss after delivery, and its repair. The merchant's consumer is down while two more
    /// orders are paid; their credits are delivered, and then lost: the merchant's queue
    /// purged by mistake (RabbitMQ), or skipped by a member of its group (Kafka). Reconciliation reports them as delivered but not processed, and
    /// `reconcile --repair` sends exactly those again from the account relay's archive; the
    /// merchant, back up, credits each one once and replies, and reconciliation is clean.
    async fn lose_and_repair(&mut self) -> anyhow::Result<()> {
        println!();
        let how = match self.cfg.broker {
            Broker::RabbitMq { .. } => "then its queue is purged by mistake",
            Broker::Kafka { .. } => {
                "then a member of its group takes them and commits their offsets without crediting them (as one that acknowledges first and then crashes would)"
            }
        };
        println!("== a loss after delivery: the merchant's consumer is down while two more orders are paid, and {how}");
        if let Some(merchant) = self.merchant_consumer.take() {
            merchant.stop.cancel();
            self.summary
                .failures
                .extend(consumer_failure(merchant.task.await));
        }
        let before = self.paid();
        let number = self.orders.len();
        for (i, (customer, book)) in REPAIR_ORDERS.iter().enumerate() {
            self.place(number + i + 1, customer, book).await?;
        }
        let lost = self.paid() - before;
        let paid = self.paid();
        if lost == 0 {
            // More orders than the schedule's ten left nobody able to pay.
            println!("  nobody can pay any more: nothing to lose, nothing to repair");
            self.merchant_consumer = Some(self.consume_credits());
            return Ok(());
        }
        let credited = count(&self.admin, "SELECT count(*) FROM merchant.credits").await?;
        self.settle(paid, credited).await?;
        let gone = broker::lose(self.cfg, &self.topics.credit, self.merchant.group()).await?;
        let what = match self.cfg.broker {
            Broker::RabbitMq { .. } => "the merchant's queue purged",
            Broker::Kafka { .. } => "the merchant's group skipped past them",
        };
        println!(
            "  {} {} on {}: {gone} credits lost after the broker confirmed them",
            self.at(),
            what,
            self.topics.credit
        );
        if gone as i64 != lost {
            self.summary.failures.push(format!(
                "the loss took {gone} credits, expected the {lost} of the new orders"
            ));
        }
        let out = self
            .reconcile_orders("with --repair", 1, &["--repair"])
            .await?;
        // The repair's summary line: "replayed N messages".
        self.summary.repaired = out
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("replayed "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        println!("  {} the merchant's consumer starts again", self.at());
        self.merchant_consumer = Some(self.consume_credits());
        self.settle(paid, paid).await?;
        self.reconcile_orders("after the repair", 0, &[]).await?;
        Ok(())
    }

    /// Each reply outbox against the account's group.
    async fn reconcile_replies(&mut self) -> anyhow::Result<()> {
        for (outbox, group, topic) in [
            (WAREHOUSE_OUTBOX, SHIPPED_GROUP, self.topics.shipped.clone()),
            (
                MERCHANT_OUTBOX,
                CREDITED_GROUP,
                self.topics.credited.clone(),
            ),
        ] {
            let (code, _) = self
                .reconcile(
                    &format!("of the replies in {outbox}"),
                    outbox,
                    &[ACCOUNT_INBOX],
                    &[format!("{group}={topic}")],
                    &[],
                )
                .await?;
            if code != Some(0) {
                self.summary.failures.push(format!(
                    "reconcile of the replies in {outbox} exited {code:?}, expected 0"
                ));
            }
        }
        Ok(())
    }

    /// Consumers finish the message in hand; the relays drain on SIGTERM.
    async fn stop(&mut self) -> anyhow::Result<()> {
        let mut consumers = std::mem::take(&mut self.consumers);
        consumers.extend(self.merchant_consumer.take());
        for c in &consumers {
            c.stop.cancel();
        }
        for c in consumers {
            self.summary.failures.extend(consumer_failure(c.task.await));
        }
        self.summary.crashed_replies = u64::from(self.reply.crashed());
        for relay in std::mem::take(&mut self.relays) {
            let tail = relay.tail(20);
            if !relay.stop(Duration::from_secs(30)).await? {
                self.summary.failures.push(format!(
                    "a relay did not exit 0 on SIGTERM; its log:\n{tail}"
                ));
            }
        }
        println!();
        println!("== stopped: the consumers finished their messages in hand, the relays drained and exited on SIGTERM");
        Ok(())
    }
}

/// What the deliveries have come to.
struct Counts {
    delivered: i64,
    shipped: i64,
    credited: i64,
    steps_done: i64,
    parked_w: i64,
    parked_m: i64,
}

fn broker_name(broker: &Broker) -> &'static str {
    match broker {
        Broker::RabbitMq { .. } => "RabbitMQ",
        Broker::Kafka { .. } => "Kafka",
    }
}

fn consumer_failure(
    joined: Result<Result<(), outbox_consumer::ConsumerError>, tokio::task::JoinError>,
) -> Option<String> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("a consumer failed: {e}")),
        Err(e) => Some(format!("a consumer task failed: {e}")),
    }
}

async fn connect(url: &str, max: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", tools::redact(url)))
}
