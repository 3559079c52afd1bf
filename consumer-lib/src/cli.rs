//! The `outbox-consumer` command line (cargo feature `cli`): operators list, replay and
//! discard the consumers' dead letters without writing SQL.
//!
//! A replay needs the handler, which only the service has: `dead replay` marks the letters
//! and waits while each group's running consumer replays them through the dedup step
//! ([`crate::Deduplicator::serve_replays`]), then reports what happened to each.

use std::{
    process::ExitCode,
    str::FromStr,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use outbox::Schema;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool,
};
use uuid::Uuid;

use crate::letters::{self, DeadLetters, LetterFilter};

/// Operator commands for the consumers of `outbox-consumer`: the consumer schema and its
/// dead letters.
#[derive(Debug, Parser)]
#[command(name = "outbox-consumer", version)]
pub struct Cli {
    /// PostgreSQL URL of the consumers' database.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,
    /// Schema holding the consumer tables (the consumers' `with_schema`).
    #[arg(
        long,
        global = true,
        env = "OUTBOX_CONSUMER_SCHEMA",
        default_value = "outbox_consumer",
        value_name = "NAME"
    )]
    pub schema: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the consumer schema and apply pending migrations.
    Migrate,
    /// List, replay or discard dead letters.
    Dead {
        /// What to do with them.
        #[command(subcommand)]
        action: DeadAction,
    },
}

/// `outbox-consumer dead ...`
#[derive(Debug, Subcommand)]
pub enum DeadAction {
    /// Show dead letters, oldest first (or, with --settled, the replayed and discarded ones,
    /// newest first).
    List {
        /// Which letters.
        #[command(flatten)]
        filter: LetterArgs,
        /// Show letters that were settled (replayed, found already processed, discarded)
        /// instead; only --group narrows them.
        #[arg(long)]
        settled: bool,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Hand dead letters back to their group's running consumer, which handles each one
    /// again through the dedup step (an effect never happens twice); waits for the outcome.
    Replay {
        /// Which letters.
        #[command(flatten)]
        filter: LetterArgs,
        /// How long to wait for the consumers to replay them; 0s returns at once.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
        wait: Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Give up on dead letters: they leave the dead letters for `settled_letters`, with the
    /// reason.
    Discard {
        /// Which letters.
        #[command(flatten)]
        filter: LetterArgs,
        /// Why (kept with each discarded letter).
        #[arg(long)]
        reason: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Which dead letters: criteria combine with AND.
#[derive(Debug, clap::Args)]
pub struct LetterArgs {
    /// Only this letter (its number, as `list` shows it) or message id (a UUID); repeatable.
    #[arg(long = "id", value_name = "LETTER|UUID", value_parser = parse_id)]
    pub ids: Vec<LetterId>,
    /// Only this consumer group.
    #[arg(long)]
    pub group: Option<String>,
    /// Only letters from this source: the RabbitMQ queue or Kafka topic.
    #[arg(long, visible_alias = "topic")]
    pub source: Option<String>,
    /// Only this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only letters parked for longer than this (e.g. 1h, 30m).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub older_than: Option<Duration>,
    /// Only letters parked before this time (RFC 3339, e.g. 2026-11-25T08:00:00Z).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub before: Option<SystemTime>,
    /// Only letters parked at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub after: Option<SystemTime>,
    /// Every dead letter (needed by replay and discard when nothing else narrows it).
    #[arg(long)]
    pub all: bool,
}

/// A letter's number or a message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LetterId {
    /// The letter's number in `dead_letters`.
    Letter(i64),
    /// A message id.
    Message(Uuid),
}

fn parse_id(s: &str) -> Result<LetterId, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(LetterId::Letter(n));
    }
    Uuid::from_str(s)
        .map(LetterId::Message)
        .map_err(|_| format!("{s:?} is neither a letter number nor a message id (UUID)"))
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?}: {e} (use RFC 3339, e.g. 2026-11-25T08:00:00Z)"))
}

impl From<LetterArgs> for LetterFilter {
    fn from(a: LetterArgs) -> Self {
        let mut f = LetterFilter {
            group: a.group,
            source: a.source,
            key: a.key,
            older_than: a.older_than,
            before: a.before,
            after: a.after,
            all: a.all,
            ..LetterFilter::default()
        };
        for id in a.ids {
            match id {
                LetterId::Letter(n) => f.letters.push(n),
                LetterId::Message(id) => f.message_ids.push(id),
            }
        }
        f
    }
}

/// Entry point of the binary: exit 0 on success, 1 when something failed (including a replay
/// that failed or was still waiting when `--wait` ran out), 2 on invalid usage.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-consumer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outbox-consumer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let Some(url) = cli.database_url.as_deref() else {
        eprintln!("outbox-consumer: set --database-url or DATABASE_URL");
        return Ok(ExitCode::from(2));
    };
    let schema = match Schema::parse(cli.schema.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outbox-consumer: --schema: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let pool = connect(url).await?;
    match cli.command {
        Command::Migrate => {
            let applied = crate::migrate(&pool, &schema)
                .await
                .context("migrating the consumer schema")?;
            if applied.is_empty() {
                println!(
                    "consumer schema {:?} is up to date (version {})",
                    schema.as_str(),
                    crate::CONSUMER_SCHEMA_VERSION
                );
            } else {
                println!(
                    "consumer schema {:?}: applied migrations {applied:?}",
                    schema.as_str()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dead { action } => {
            require_schema(&pool, &schema).await?;
            dead(DeadLetters::new(pool, schema), action).await
        }
    }
}

async fn dead(letters: DeadLetters, action: DeadAction) -> anyhow::Result<ExitCode> {
    match action {
        DeadAction::List {
            filter,
            settled,
            limit,
            json,
        } => dead_list(&letters, filter.into(), settled, limit, json).await,
        DeadAction::Replay { filter, wait, json } => {
            dead_replay(&letters, filter.into(), wait, json).await
        }
        DeadAction::Discard {
            filter,
            reason,
            json,
        } => dead_discard(&letters, filter.into(), &reason, json).await,
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `dead list`: the dead letters (or the settled ones) that `filter` selects.
async fn dead_list(
    letters: &DeadLetters,
    filter: LetterFilter,
    settled: bool,
    limit: i64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if settled {
        let rows = letters
            .settled(filter.group.as_deref(), limit)
            .await
            .context("listing settled letters")?;
        if json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            if !rows.is_empty() {
                print!("{}", letters::settled_table(&rows));
            }
            println!("{} settled letter{}", rows.len(), plural(rows.len()));
        }
    } else {
        let rows = letters
            .list(&filter, limit)
            .await
            .context("listing dead letters")?;
        if json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            if !rows.is_empty() {
                print!("{}", letters::table(&rows));
            }
            println!("{} dead letter{}", rows.len(), plural(rows.len()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dead replay`: asks for a replay of the letters `filter` selects, then waits up to `wait`
/// for the groups' running consumers to replay them. Fails if one failed, or if one is
/// still waiting after a wait.
async fn dead_replay(
    letters: &DeadLetters,
    filter: LetterFilter,
    wait: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let marked = letters
        .request_replay(&filter)
        .await
        .context("asking for a replay")?;
    let ids: Vec<i64> = marked.iter().map(|l| l.letter).collect();
    let mut groups: Vec<&str> = marked.iter().map(|l| l.group.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    if !json {
        println!(
            "asked for a replay of {} dead letter{} (group{} {})",
            ids.len(),
            plural(ids.len()),
            plural(groups.len()),
            if groups.is_empty() {
                "-".to_owned()
            } else {
                groups.join(", ")
            }
        );
        if !ids.is_empty() && !wait.is_zero() {
            println!(
                "waiting up to {} for the groups' running consumers to replay them",
                humantime::format_duration(wait)
            );
        }
    }
    let started = Instant::now();
    let states = loop {
        let states = letters
            .replay_status(&ids)
            .await
            .context("reading the replays' outcome")?;
        let waiting = states.iter().any(|s| s.state == "waiting");
        if !waiting || started.elapsed() >= wait {
            break states;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let count = |state: &str| states.iter().filter(|s| s.state == state).count();
    let (waiting, failed) = (count("waiting"), count("failed"));
    if json {
        println!("{}", serde_json::to_string_pretty(&states)?);
    } else {
        if !states.is_empty() {
            print!("{}", letters::replay_table(&states));
        }
        println!(
            "replayed {}, already processed {}, failed {failed}, still waiting {waiting}",
            count("replayed"),
            count("duplicate"),
        );
        if waiting > 0 && !wait.is_zero() {
            println!(
                "a letter still waiting is replayed when a consumer of its group runs \
                 (it looks every replay interval, 5 s by default)"
            );
        }
    }
    Ok(if failed > 0 || (waiting > 0 && !wait.is_zero()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `dead discard`: settles the letters `filter` selects as discarded, with `reason`.
async fn dead_discard(
    letters: &DeadLetters,
    filter: LetterFilter,
    reason: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let rows = letters
        .discard(&filter, reason)
        .await
        .context("discarding dead letters")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        if !rows.is_empty() {
            print!("{}", letters::settled_table(&rows));
        }
        println!(
            "discarded {} dead letter{} (reason: {reason})",
            rows.len(),
            plural(rows.len())
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let shown = outbox::redact_url(url);
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| {
            anyhow::anyhow!("--database-url ({shown}) is not a usable PostgreSQL URL: {e}")
        })?
        .application_name("outbox-consumer");
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to PostgreSQL at {shown}: {}",
                crate::error::chain(&e)
            )
        })
}

async fn require_schema(pool: &PgPool, schema: &Schema) -> anyhow::Result<()> {
    let (letters, settled): (bool, bool) =
        sqlx::query_as("SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL")
            .bind(format!("{schema}.dead_letters"))
            .bind(format!("{schema}.settled_letters"))
            .fetch_one(pool)
            .await
            .context("checking the consumer schema")?;
    if !letters {
        bail!(
            "{schema}.dead_letters does not exist (or this role cannot see it): check --schema, \
             or create the schema with `outbox-consumer migrate`"
        );
    }
    if !settled {
        bail!(
            "consumer schema {schema} is older than version {}: apply its migrations with \
             `outbox-consumer migrate` (or Deduplicator::migrate)",
            crate::CONSUMER_SCHEMA_VERSION
        );
    }
    Ok(())
}
