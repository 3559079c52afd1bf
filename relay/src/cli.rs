//! The `outbox-relay` command line: `migrate`, `run`, `status`, `dead`, `reconcile`, `replay`.

use std::{path::PathBuf, process::ExitCode, str::FromStr, sync::Arc};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use outbox::Backoff;
use secrecy::ExposeSecret;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
    PgPool,
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{redact_url, Overrides, Settings, SslMode},
    publish::Publisher,
    relay::error_chain,
};

/// Publishes committed outbox rows to RabbitMQ or Kafka, retrying until the broker confirms.
///
/// Settings come from built-in defaults, then --config FILE (TOML), then OUTBOX__SECTION__KEY
/// environment variables (e.g. OUTBOX__DATABASE__URL), then these flags.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL (database.url).
    #[arg(long, global = true, value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Schema holding the outbox tables (database.schema).
    #[arg(long, global = true, value_name = "NAME")]
    pub schema: Option<String>,
    /// RabbitMQ URL (rabbitmq.url).
    #[arg(long, global = true, value_name = "URL")]
    pub rabbitmq_url: Option<String>,
    /// Broker to publish to, rabbitmq or kafka (broker).
    #[arg(long, global = true, value_name = "KIND")]
    pub broker: Option<String>,
    /// Kafka bootstrap servers, host:port[,...] (kafka.brokers).
    #[arg(long, global = true, value_name = "LIST")]
    pub kafka_brokers: Option<String>,
    /// Log format, text or json (log.format).
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the outbox schema and apply pending migrations.
    Migrate,
    /// Relay messages until SIGTERM or SIGINT.
    Run,
    /// Show pending, retrying and dead messages per topic, and the live relays.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List, retry or discard dead messages.
    Dead {
        /// What to do with them.
        #[command(subcommand)]
        action: DeadAction,
    },
    /// Compare what the outbox delivered with what the consumer groups processed, and report
    /// what needs attention: exit 0 when nothing does, 1 when something does, 2 when the
    /// comparison could not be made.
    Reconcile(ReconcileArgs),
    /// Send delivered messages again, from the archive kept under
    /// retention.delivered_payloads, with their ids (consumers deduplicate them), in their
    /// original order; the running relays publish them. Exit 0 when every selected message
    /// was queued, 1 when some could not be (each is named) or on failure.
    Replay(ReplayArgs),
}

/// `outbox-relay reconcile ...`
#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// A database holding consumer schemas (repeatable); default: the outbox's own database.
    #[arg(
        long = "consumer-db",
        value_name = "URL",
        env = "OUTBOX_RECONCILE_CONSUMER_DBS",
        value_delimiter = ' ',
        hide_env_values = true
    )]
    pub consumer_dbs: Vec<String>,
    /// A consumer schema to look for in every consumer database (repeatable).
    #[arg(
        long = "consumer-schema",
        value_name = "NAME",
        default_value = "outbox_consumer"
    )]
    pub consumer_schemas: Vec<String>,
    /// A consumer group to reconcile, as NAME or NAME=TOPIC[,TOPIC...] (repeatable); default:
    /// every group found, each checked on the topics it processed in the window.
    #[arg(long = "group", value_name = "NAME[=TOPICS]")]
    pub groups: Vec<crate::reconcile::GroupSpec>,
    /// The window: compare what was delivered and processed this long ago until now.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub since: std::time::Duration,
    /// Report pending messages older than this.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_pending_age: std::time::Duration,
    /// Report messages delivered longer ago than this that a group has not processed.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_lag: std::time::Duration,
    /// Rows shown per kind of finding (counts are always complete).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print JSON instead of a report.
    #[arg(long)]
    pub json: bool,
    /// Send again every message found delivered but not processed (all of them, not only
    /// those shown), from the archive kept under retention.delivered_payloads; consumers
    /// that processed one already deduplicate it.
    #[arg(long)]
    pub repair: bool,
}

/// `outbox-relay replay ...`
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Only this message id (repeatable).
    #[arg(long = "id", value_name = "UUID")]
    pub ids: Vec<uuid::Uuid>,
    /// Only the message ids in FILE (- for standard input): UUIDs separated by whitespace,
    /// a JSON array, or the output of `outbox-relay reconcile --json`, whose messages
    /// delivered but not processed it takes.
    #[arg(long = "ids", value_name = "FILE")]
    pub ids_file: Option<PathBuf>,
    /// Only this topic (the one the messages were first written with).
    #[arg(long)]
    pub topic: Option<String>,
    /// Only this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only messages delivered at or after this: a UTC time (2026-12-08T10:00:00Z) or a
    /// duration ago (2h).
    #[arg(long, value_name = "TIME|DURATION")]
    pub from: Option<crate::replay::Moment>,
    /// Only messages delivered before this: a UTC time or a duration ago.
    #[arg(long, value_name = "TIME|DURATION")]
    pub until: Option<crate::replay::Moment>,
    /// Every archived message (needed when nothing else narrows the selection).
    #[arg(long)]
    pub all: bool,
    /// Send them to this topic instead of each one's own (e.g. to backfill one consumer);
    /// `outbox-topic` still names the original.
    #[arg(long, value_name = "TOPIC")]
    pub to_topic: Option<String>,
    /// Only list what would be sent.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `outbox-relay dead ...`
#[derive(Debug, Subcommand)]
pub enum DeadAction {
    /// Show dead messages, oldest first.
    List {
        /// Which messages.
        #[command(flatten)]
        filter: DeadArgs,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead messages back in the queue with attempts reset; each stays at the head of
    /// its key, so per-key order is kept.
    Retry {
        /// Which messages.
        #[command(flatten)]
        filter: DeadArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove dead messages from the queue for good, keeping them and the reason in the
    /// `discarded` table.
    Discard {
        /// Which messages.
        #[command(flatten)]
        filter: DeadArgs,
        /// Why (kept with each discarded message).
        #[arg(long)]
        reason: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Which dead messages: criteria combine with AND.
#[derive(Debug, clap::Args)]
pub struct DeadArgs {
    /// Only this message id (repeatable).
    #[arg(long = "id", value_name = "UUID")]
    pub ids: Vec<uuid::Uuid>,
    /// Only this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Only this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only messages dead for longer than this (e.g. 1h, 30m).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub older_than: Option<std::time::Duration>,
    /// Every dead message (needed by retry and discard when nothing else narrows it).
    #[arg(long)]
    pub all: bool,
}

impl From<DeadArgs> for crate::dead::DeadFilter {
    fn from(a: DeadArgs) -> Self {
        Self {
            ids: a.ids,
            topic: a.topic,
            key: a.key,
            older_than: a.older_than,
            all: a.all,
        }
    }
}

impl Cli {
    fn overrides(&self) -> Overrides {
        let mut o = Overrides::new();
        let mut put = |key, value: &Option<String>| {
            if let Some(v) = value {
                o.push((key, v.clone()));
            }
        };
        put("database.url", &self.database_url);
        put("database.schema", &self.schema);
        put("rabbitmq.url", &self.rabbitmq_url);
        put("broker", &self.broker);
        put("kafka.brokers", &self.kafka_brokers);
        put("log.format", &self.log_format);
        o
    }

    fn needs_broker(&self) -> bool {
        matches!(self.command, Command::Run)
    }
}

/// Entry point of the binary: exit 0 on success, 1 on a runtime failure, 2 on invalid
/// configuration or usage. `reconcile` exits 1 when it found something that needs attention
/// and 2 when it could not compare.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let failure = if matches!(cli.command, Command::Reconcile(_)) {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    };
    let settings = match Settings::load(cli.config.as_deref(), cli.overrides(), cli.needs_broker())
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outbox-relay: {e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(&settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "outbox-relay failed");
            eprintln!("outbox-relay: {e:#}");
            failure
        }
    }
}

async fn execute(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Reconcile(args) => return reconcile(args, settings).await,
        Command::Replay(args) => return replay(args, settings).await,
        _ => {}
    }
    execute_other(command, settings)
        .await
        .map(|()| ExitCode::SUCCESS)
}

async fn reconcile(args: ReconcileArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    use crate::reconcile::{ConsumerDatabase, Options};
    let pool = connect_once(&settings).await?;
    let (_, _, shown) = pool_options(&settings)?;
    let mut consumers = Vec::new();
    if args.consumer_dbs.is_empty() {
        consumers.push(ConsumerDatabase {
            pool: pool.clone(),
            name: shown,
        });
    }
    for url in &args.consumer_dbs {
        let shown = redact_url(url);
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| {
                anyhow::anyhow!("--consumer-db ({shown}) is not a usable PostgreSQL URL: {e}")
            })?
            .application_name("outbox-relay");
        let consumer = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(settings.database.connect_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| {
                let hint = if is_tls_failure(&e) {
                    " (check the URL's sslmode and sslrootcert)"
                } else {
                    ""
                };
                anyhow::anyhow!(
                    "cannot connect to the consumer database at {shown}: {}{hint}",
                    error_chain(&e)
                )
            })?;
        consumers.push(ConsumerDatabase {
            pool: consumer,
            name: shown,
        });
    }
    let consumer_schemas = args
        .consumer_schemas
        .iter()
        .map(|s| {
            outbox::Schema::parse(s.clone()).map_err(|e| anyhow::anyhow!("--consumer-schema: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = Options {
        since: args.since,
        max_pending_age: args.max_pending_age,
        max_lag: args.max_lag,
        groups: args.groups,
        consumer_schemas,
        limit: args.limit,
    };
    let schema = settings.schema();
    let mut report = crate::reconcile::reconcile(&pool, &schema, &consumers, &options)
        .await
        .context("reconciliation failed")?;
    if args.repair {
        let ids: Vec<uuid::Uuid> = report.unprocessed_ids.iter().copied().collect();
        report.repair = Some(if ids.is_empty() {
            crate::replay::Outcome::default()
        } else {
            let selection = crate::replay::Selection::ids(ids);
            crate::replay::replay(&pool, &schema, &selection, None, false)
                .await
                .context("repair failed")?
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
        if let Some(repair) = &report.repair {
            println!();
            println!("repair: the messages delivered but not processed, sent again");
            print!("{repair}");
        }
    }
    Ok(if report.findings() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn execute_other(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let pool = connect_once(&settings).await?;
            let outbox = outbox::Outbox::new(settings.schema());
            let applied = outbox.migrate(&pool).await.context("migration failed")?;
            if applied.is_empty() {
                println!(
                    "outbox schema {:?} is up to date (version {})",
                    settings.database.schema,
                    outbox::LATEST_VERSION
                );
            } else {
                println!(
                    "outbox schema {:?}: applied migrations {applied:?}",
                    settings.database.schema
                );
            }
            Ok(())
        }
        Command::Status { json } => {
            let pool = connect_once(&settings).await?;
            require_schema(&pool, &settings).await?;
            let status = crate::status::read(&pool, &settings.schema())
                .await
                .context("reading the outbox")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(())
        }
        Command::Run => run(settings).await,
        Command::Dead { action } => dead(action, settings).await,
        Command::Reconcile(_) | Command::Replay(_) => unreachable!("handled by execute"),
    }
}

async fn dead(action: DeadAction, settings: Settings) -> anyhow::Result<()> {
    use crate::dead::{self, DeadFilter};
    let pool = connect_once(&settings).await?;
    require_schema(&pool, &settings).await?;
    let schema = settings.schema();
    let changing = |filter: &DeadFilter| {
        if filter.is_narrowed() || filter.all {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "name the messages with --id, --topic, --key or --older-than, or pass --all"
            ))
        }
    };
    let print = |rows: &[dead::DeadMessage], json: bool, summary: String| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(rows)?);
        } else {
            if !rows.is_empty() {
                print!("{}", dead::table(rows));
            }
            println!("{summary}");
        }
        Ok(())
    };
    match action {
        DeadAction::List {
            filter,
            limit,
            json,
        } => {
            let rows = dead::list(&pool, &schema, &filter.into(), limit)
                .await
                .context("listing dead messages")?;
            let n = rows.len();
            print(
                &rows,
                json,
                format!("{n} dead message{}", if n == 1 { "" } else { "s" }),
            )
        }
        DeadAction::Retry { filter, json } => {
            let filter: DeadFilter = filter.into();
            changing(&filter)?;
            let rows = dead::retry(&pool, &schema, &filter)
                .await
                .context("re-queueing dead messages")?;
            let n = rows.len();
            print(
                &rows,
                json,
                format!(
                    "re-queued {n} dead message{}",
                    if n == 1 { "" } else { "s" }
                ),
            )
        }
        DeadAction::Discard {
            filter,
            reason,
            json,
        } => {
            let filter: DeadFilter = filter.into();
            changing(&filter)?;
            if reason.trim().is_empty() {
                bail!("--reason must say why the messages are discarded");
            }
            let rows = dead::discard(&pool, &schema, &filter, &reason)
                .await
                .context("discarding dead messages")?;
            let n = rows.len();
            print(
                &rows,
                json,
                format!(
                    "discarded {n} dead message{} (reason: {reason})",
                    if n == 1 { "" } else { "s" }
                ),
            )
        }
    }
}

async fn replay(args: ReplayArgs, settings: Settings) -> anyhow::Result<ExitCode> {
    use crate::replay::{self, Selection};
    let mut ids = args.ids;
    if let Some(path) = &args.ids_file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading ids from standard input")?
        } else {
            std::fs::read_to_string(path)
                .with_context(|| format!("reading ids from {}", path.display()))?
        };
        let read = replay::parse_ids(&text).map_err(|e| anyhow::anyhow!("--ids: {e}"))?;
        if read.is_empty() && ids.is_empty() {
            // An empty list (a clean reconciliation piped in) selects nothing, not everything.
            println!("nothing to replay: no message ids given");
            return Ok(ExitCode::SUCCESS);
        }
        ids.extend(read);
    }
    let selection = Selection {
        ids,
        topic: args.topic,
        key: args.key,
        from: args.from,
        until: args.until,
        all: args.all,
    };
    let pool = connect_once(&settings).await?;
    require_schema(&pool, &settings).await?;
    let outcome = replay::replay(
        &pool,
        &settings.schema(),
        &selection,
        args.to_topic.as_deref(),
        args.dry_run,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print!("{outcome}");
    }
    Ok(if outcome.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    log_settings(&settings);
    let Some(pool) = connect_retrying(&settings, &shutdown).await? else {
        return Ok(());
    };
    require_schema(&pool, &settings).await?;
    let missing = crate::store::missing_privileges(&pool, &settings.schema())
        .await
        .context("checking the relay's privileges")?;
    if !missing.is_empty() {
        bail!(
            "the database role lacks privileges the relay needs: {}; grant them as the \
             README's \"Least privilege\" section shows",
            missing.join(", ")
        );
    }
    let publisher: Arc<dyn Publisher> = crate::startup::publisher(&settings)?;
    let relay = Arc::new(crate::startup::relay(&settings, pool, publisher));
    let server = if settings.http.listen.is_empty() {
        None
    } else {
        let listener = crate::http::bind(&settings.http.listen).await?;
        let metrics = install_metrics()?;
        tracing::info!(address = %listener.local_addr()?, "serving /metrics, /livez and /readyz");
        let (relay, stop) = (relay.clone(), CancellationToken::new());
        let task = tokio::spawn(crate::http::serve(
            listener,
            relay,
            Some(metrics),
            stop.clone(),
        ));
        Some((task, stop))
    };
    let result = relay.run(shutdown).await;
    if let Some((task, stop)) = server {
        stop.cancel();
        let _ = task.await;
    }
    result?;
    Ok(())
}

/// Installs the Prometheus recorder that `/metrics` renders.
fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets(crate::metrics::LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(crate::metrics::BATCH_SIZE.to_owned()),
            crate::metrics::BATCH_BUCKETS,
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    crate::metrics::describe();
    Ok(handle)
}

async fn signal_shutdown(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}

fn log_settings(s: &Settings) {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        broker = ?s.broker,
        database = %redact_url(s.database.url.as_ref().map(|u| u.expose_secret()).unwrap_or("")),
        schema = %s.database.schema,
        broker_at = %broker_at(s),
        batch_size = s.relay.batch_size,
        workers = s.relay.workers,
        lease = ?s.relay.lease,
        listen = s.relay.listen,
        dead_key_policy = ?s.relay.dead_key_policy,
        max_attempts = s.retry.max_attempts,
        "starting outbox-relay"
    );
}

/// Where the configured broker is, for the start-up line (the other broker's settings are
/// not shown: they are not used).
fn broker_at(s: &Settings) -> String {
    match s.broker {
        crate::config::BrokerKind::Rabbitmq => redact_url(
            s.rabbitmq
                .url
                .as_ref()
                .map(|u| u.expose_secret())
                .unwrap_or(""),
        ),
        crate::config::BrokerKind::Kafka => s.kafka.brokers.clone().unwrap_or_default(),
    }
}

/// Checks the TLS files the database URL names (`sslrootcert`, `sslcert`, `sslkey`), so that
/// a missing one is named with its path rather than reported as a bare "No such file".
fn url_tls_files(raw: &str, shown: &str) -> anyhow::Result<()> {
    let Ok(url) = url::Url::parse(raw) else {
        return Ok(());
    };
    for (name, path) in url.query_pairs() {
        if !matches!(name.as_ref(), "sslrootcert" | "sslcert" | "sslkey") || path == "system" {
            continue;
        }
        if let Err(e) = std::fs::File::open(path.as_ref()) {
            bail!("database.url ({shown}): {name} file {path} cannot be read: {e}");
        }
    }
    Ok(())
}

fn pool_options(settings: &Settings) -> anyhow::Result<(PgPoolOptions, PgConnectOptions, String)> {
    let db = &settings.database;
    let url = db.connection_url().map_err(anyhow::Error::msg)?;
    let raw = url.expose_secret();
    let shown = redact_url(raw);
    url_tls_files(raw, &shown)?;
    let mut connect = PgConnectOptions::from_str(raw)
        .map_err(|e| anyhow::anyhow!("database.url ({shown}) is not a usable PostgreSQL URL: {e}"))?
        .application_name("outbox-relay");
    if let Some(mode) = db.ssl_mode {
        connect = connect.ssl_mode(pg_ssl_mode(mode));
    }
    if let Some(path) = &db.ssl_root_cert {
        connect = connect.ssl_root_cert(path);
    }
    if let Some(path) = &db.ssl_cert {
        connect = connect.ssl_client_cert(path);
    }
    if let Some(path) = &db.ssl_key {
        connect = connect.ssl_client_key(path);
    }
    let pool = PgPoolOptions::new()
        .max_connections(db.max_connections)
        .acquire_timeout(db.connect_timeout);
    Ok((pool, connect, shown))
}

fn pg_ssl_mode(mode: SslMode) -> PgSslMode {
    match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Allow => PgSslMode::Allow,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require => PgSslMode::Require,
        SslMode::VerifyCa => PgSslMode::VerifyCa,
        SslMode::VerifyFull => PgSslMode::VerifyFull,
    }
}

/// True for errors that retrying cannot fix: bad credentials, unknown database.
fn is_fatal_pg(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("28P01" | "28000" | "3D000")))
}

const TLS_HINT: &str = " (check database.ssl_mode, database.ssl_root_cert, database.ssl_cert \
     and database.ssl_key, or the URL's sslmode and sslrootcert)";

/// True for a TLS failure that retrying cannot fix: an untrusted or mismatched server
/// certificate, a server without TLS under `require`, an unreadable key.
fn is_tls_failure(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Tls(_) => true,
        // rustls' verdict on the server's certificate arrives as an I/O error.
        sqlx::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.to_string().contains("certificate")),
        _ => false,
    }
}

async fn connect_once(settings: &Settings) -> anyhow::Result<PgPool> {
    let (pool, connect, shown) = pool_options(settings)?;
    pool.connect_with(connect).await.map_err(|e| {
        let hint = if is_tls_failure(&e) { TLS_HINT } else { "" };
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at {shown}: {}{hint}",
            error_chain(&e)
        )
    })
}

/// Connects, retrying with capped backoff while PostgreSQL is unreachable. `None` if
/// shutdown was requested first.
async fn connect_retrying(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<PgPool>> {
    let (pool, connect, shown) = pool_options(settings)?;
    let mut backoff = Backoff::new(settings.relay.reconnect_max_delay);
    loop {
        match pool.clone().connect_with(connect.clone()).await {
            Ok(p) => {
                tracing::info!(database = %shown, "connected to PostgreSQL");
                return Ok(Some(p));
            }
            Err(e) if is_fatal_pg(&e) => {
                bail!(
                    "PostgreSQL at {shown} refused the relay: {} (check database.url)",
                    error_chain(&e)
                )
            }
            Err(e) if is_tls_failure(&e) => {
                bail!(
                    "TLS with PostgreSQL at {shown} failed: {}{TLS_HINT}",
                    error_chain(&e)
                )
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(
                    database = %shown, error = %error_chain(&e), retry_in = ?wait,
                    "PostgreSQL unreachable; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
        }
    }
}

async fn require_schema(pool: &PgPool, settings: &Settings) -> anyhow::Result<()> {
    let schema = settings.schema();
    let found: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{schema}.messages"))
        .fetch_one(pool)
        .await
        .context("checking the outbox schema")?;
    if !found {
        bail!("outbox table {schema}.messages does not exist; run `outbox-relay migrate` first (database.schema = \"{schema}\")");
    }
    // The newest column the relay's SQL needs, so that an upgrade applied without the
    // built-in runner (whose version table may not exist) is recognised too.
    let current: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute
                        WHERE attrelid = to_regclass($1) AND attname = 'replay_of'
                          AND NOT attisdropped)",
    )
    .bind(format!("{schema}.messages"))
    .fetch_one(pool)
    .await
    .context("checking the outbox schema")?;
    if !current {
        bail!(
            "outbox schema {schema} is older than this relay: {schema}.messages has no replay_of column \
             (schema version 7, migrations/0007_replay.sql); run `outbox-relay migrate` first \
             (this relay needs schema version {})",
            outbox::LATEST_VERSION
        );
    }
    Ok(())
}
