//! Reconciliation: compares what the outbox delivered with what each consumer group
//! processed, and reports everything that needs attention.
//!
//! Five kinds of finding:
//!
//! - **dead in the outbox**: messages the relay parked (`status = 'dead'`);
//! - **pending too long**: messages still waiting for the broker longer than
//!   `max_pending_age`;
//! - **delivered, not processed**: messages delivered (a record in `delivered`) inside the
//!   window, longer ago than `max_lag`, on a topic the group consumes, without a dedup row of
//!   the group;
//! - **processed, unknown to the outbox**: dedup rows of the group written inside the window
//!   for ids the outbox never had (neither delivered, pending, dead nor discarded);
//! - **parked in a consumer's dead letters**: letters still waiting for an operator.
//!
//! Producers and consumers may live in different databases, so nothing is joined across
//! them: ids go from one side to the other in chunks (`unnest($1::uuid[])`), which keeps
//! memory bounded by the chunk and the rows shown. Which topics a group consumes is given
//! (`GroupSpec::topics`) or inferred: the topics of the messages it processed or parked in
//! the window. The consumers' tables are read through the consumer library
//! ([`DedupRecords`], [`DeadLetters::summaries`]), which knows their shape and versions.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
    time::Duration,
};

use futures::TryStreamExt;
use outbox::Schema;
use outbox_consumer::{ConsumerError, DeadLetters, DedupRecords};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// Ids sent from one database to the other per query.
const CHUNK: usize = 1000;

const TIME: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'";

fn utc(column: &str) -> String {
    format!("to_char(({column}) AT TIME ZONE 'UTC', {TIME})")
}

/// A consumer group to reconcile, and the topics it consumes (empty: inferred).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// The consumer group.
    pub name: String,
    /// Outbox topics the group consumes; empty to infer them from what it processed.
    pub topics: Vec<String>,
}

impl FromStr for GroupSpec {
    type Err = String;

    /// `NAME` or `NAME=TOPIC[,TOPIC...]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, topics) = match s.split_once('=') {
            Some((name, topics)) => (
                name,
                topics
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            ),
            None => (s, Vec::new()),
        };
        if name.is_empty() || (s.contains('=') && topics.is_empty()) {
            return Err(format!(
                "{s:?}: write a group as NAME or NAME=TOPIC[,TOPIC...]"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            topics,
        })
    }
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct Options {
    /// The window: messages delivered and processed within this much of now.
    pub since: Duration,
    /// Pending messages older than this are stuck.
    pub max_pending_age: Duration,
    /// Messages delivered longer ago than this should have been processed.
    pub max_lag: Duration,
    /// Groups to reconcile; empty: every group found in the consumer schemas.
    pub groups: Vec<GroupSpec>,
    /// Consumer schemas to look in, in every consumer database.
    pub consumer_schemas: Vec<Schema>,
    /// Rows shown per kind of finding (counts are always complete).
    pub limit: usize,
}

/// A consumer database.
#[derive(Debug, Clone)]
pub struct ConsumerDatabase {
    /// Its pool (at least two connections when it is also the outbox's).
    pub pool: PgPool,
    /// How to name it in the report (a URL without its password).
    pub name: String,
}

/// Reconciliation could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// A query failed.
    #[error("{what}")]
    Database {
        /// What was being read.
        what: String,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// The outbox has no `delivered` table (not migrated, wrong schema).
    #[error("{0}.messages or {0}.delivered does not exist (or this role cannot see it); check database.schema")]
    NoOutbox(String),
    /// None of the consumer databases has any of the consumer schemas.
    #[error(
        "no consumer schema ({schemas}) in {databases}; check --consumer-db and --consumer-schema"
    )]
    NoConsumerSchema {
        /// The schemas looked for.
        schemas: String,
        /// The databases looked in.
        databases: String,
    },
    /// A group named with `--group` was found in none of several consumer schemas.
    #[error("group {0:?} is in none of the consumer schemas; with several, it must have processed something to be found")]
    GroupNotFound(String),
}

fn db(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Database { what, source }
}

/// As [`db`], for the consumer library's reads of a consumer schema: they fail only in the
/// database.
fn consumer_db(what: impl Into<String>) -> impl FnOnce(ConsumerError) -> ReconcileError {
    let what = what.into();
    move |e| {
        let source = match e {
            ConsumerError::Database(source) => source,
            other => sqlx::Error::Protocol(other.to_string()),
        };
        ReconcileError::Database { what, source }
    }
}

/// A message in the outbox table (dead, or pending too long).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Position in the outbox.
    pub seq: i64,
    /// Message id.
    pub id: Uuid,
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: Option<String>,
    /// Failed attempts.
    pub attempts: i32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was written (UTC, RFC 3339).
    pub created_at: String,
    /// When it died (UTC, RFC 3339).
    pub dead_at: Option<String>,
}

/// A message delivered but not processed by a group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Unprocessed {
    /// The group that has no record of it.
    pub group: String,
    /// Message id.
    pub id: Uuid,
    /// Position in the outbox.
    pub seq: i64,
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: Option<String>,
    /// When the broker confirmed it (UTC, RFC 3339).
    pub delivered_at: String,
}

/// A message a group processed that the outbox does not know.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Unknown {
    /// The group.
    pub group: String,
    /// The message id it recorded.
    pub message_id: Uuid,
    /// When (UTC, RFC 3339).
    pub processed_at: String,
}

/// A message parked in a consumer's dead letters, as the consumer library reads it.
pub use outbox_consumer::LetterSummary as Letter;

/// One kind of finding: how many, and the first of them.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding<T> {
    /// How many there are.
    pub count: u64,
    /// The first `limit` of them.
    pub rows: Vec<T>,
}

impl<T> Default for Finding<T> {
    fn default() -> Self {
        Self {
            count: 0,
            rows: Vec::new(),
        }
    }
}

impl<T> Finding<T> {
    fn push(&mut self, row: T, limit: usize) {
        self.count += 1;
        if self.rows.len() < limit {
            self.rows.push(row);
        }
    }
}

/// One consumer group, where it was found and what was checked.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupReport {
    /// The group.
    pub group: String,
    /// Its database (without password).
    pub database: String,
    /// Its consumer schema.
    pub schema: String,
    /// The topics checked for it.
    pub topics: Vec<String>,
    /// True when the topics were inferred from what it processed or parked in the window.
    pub topics_inferred: bool,
    /// Its dedup rows written in the window (handled messages).
    pub processed_in_window: u64,
    /// Its messages delivered but not processed.
    pub unprocessed: u64,
    /// Its processed ids unknown to the outbox.
    pub unknown: u64,
    /// Its dead letters.
    pub dead_letters: u64,
}

/// The outcome of a reconciliation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// The outbox schema.
    pub outbox: String,
    /// When the comparison ran, by the outbox database's clock (UTC, RFC 3339).
    pub now: String,
    /// Start of the window (UTC, RFC 3339).
    pub window_start: String,
    /// `max_pending_age`, in seconds.
    pub max_pending_age_seconds: f64,
    /// `max_lag`, in seconds.
    pub max_lag_seconds: f64,
    /// Delivery records in the window.
    pub delivered_in_window: u64,
    /// The oldest delivery record kept (UTC, RFC 3339), if any.
    pub delivered_records_from: Option<String>,
    /// Topics delivered in the window that no reconciled group consumes (not checked).
    pub unchecked_topics: Vec<String>,
    /// The groups compared.
    pub groups: Vec<GroupReport>,
    /// Things to know about the comparison itself (not findings).
    pub notes: Vec<String>,
    /// Dead messages in the outbox.
    pub dead: Finding<OutboxMessage>,
    /// Messages pending longer than `max_pending_age`.
    pub pending: Finding<OutboxMessage>,
    /// Messages delivered longer than `max_lag` ago and not processed by a group.
    pub unprocessed: Finding<Unprocessed>,
    /// Messages a group processed that the outbox does not know.
    pub unknown: Finding<Unknown>,
    /// Messages parked in the consumers' dead letters.
    pub dead_letters: Finding<Letter>,
    /// What `--repair` sent again: the messages delivered but not processed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<crate::replay::Outcome>,
    /// Every message delivered but not processed by some group (not only the first
    /// `limit`), for a repair.
    #[serde(skip)]
    pub unprocessed_ids: BTreeSet<Uuid>,
}

impl Report {
    /// How many findings need attention.
    pub fn findings(&self) -> u64 {
        self.dead.count
            + self.pending.count
            + self.unprocessed.count
            + self.unknown.count
            + self.dead_letters.count
    }
}

/// A delivery record.
#[derive(sqlx::FromRow)]
struct Delivery {
    id: Uuid,
    seq: i64,
    topic: String,
    key: Option<String>,
    delivered_at: String,
    /// Delivered longer than `max_lag` ago.
    due: bool,
}

/// One group to reconcile, in the consumer schema it was found in.
struct Unit {
    records: DedupRecords,
    letters: DeadLetters,
    group: String,
    topics: BTreeSet<String>,
    inferred: bool,
    report: GroupReport,
}

/// Compares the outbox in `schema` on `outbox` with the consumer groups in `consumers`.
pub async fn reconcile(
    outbox: &PgPool,
    schema: &Schema,
    consumers: &[ConsumerDatabase],
    opts: &Options,
) -> Result<Report, ReconcileError> {
    let mut report = start(outbox, schema, opts).await?;
    outbox_messages(outbox, schema, opts, &mut report).await?;
    let missing = delivery_records(outbox, schema, &mut report).await?;

    // Where the groups are.
    let mut units = units(consumers, opts).await?;

    // Consumer → outbox: each group's processed ids in the window, looked up in the outbox;
    // their topics tell which topics the group consumes, when not given.
    for unit in &mut units {
        let mut seen_topics = processed(outbox, schema, unit, opts, &mut report).await?;
        dead_letters(
            outbox,
            schema,
            unit,
            &mut seen_topics,
            &mut report,
            opts.limit,
        )
        .await?;
        if unit.inferred {
            unit.topics = seen_topics.into_keys().collect();
        }
        unit.report.topics = unit.topics.iter().cloned().collect();
    }

    let delivered_topics = deliveries(outbox, schema, &mut units, opts, &mut report).await?;
    finish(&mut report, schema, units, delivered_topics, missing);
    Ok(report)
}

/// The outbox database's clock and the window, in an empty report; fails when the outbox's
/// tables are not there.
async fn start(outbox: &PgPool, o: &Schema, opts: &Options) -> Result<Report, ReconcileError> {
    let (present, now, window_start): (bool, String, String) = sqlx::query_as(&format!(
        "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL, {}, {}",
        utc("now()"),
        utc("now() - make_interval(secs => $3)")
    ))
    .bind(format!("{o}.messages"))
    .bind(format!("{o}.delivered"))
    .bind(opts.since.as_secs_f64())
    .fetch_one(outbox)
    .await
    .map_err(db("reading the outbox database's clock"))?;
    if !present {
        return Err(ReconcileError::NoOutbox(o.to_string()));
    }
    Ok(Report {
        outbox: o.to_string(),
        now,
        window_start,
        max_pending_age_seconds: opts.max_pending_age.as_secs_f64(),
        max_lag_seconds: opts.max_lag.as_secs_f64(),
        delivered_in_window: 0,
        delivered_records_from: None,
        unchecked_topics: Vec::new(),
        groups: Vec::new(),
        notes: Vec::new(),
        dead: Finding::default(),
        pending: Finding::default(),
        unprocessed: Finding::default(),
        unknown: Finding::default(),
        dead_letters: Finding::default(),
        repair: None,
        unprocessed_ids: BTreeSet::new(),
    })
}

/// The outbox itself: dead messages, and pending ones older than the threshold.
async fn outbox_messages(
    outbox: &PgPool,
    o: &Schema,
    opts: &Options,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    let limit = opts.limit;
    let columns = format!(
        "seq, id, topic, key, attempts, last_error, {} AS created_at, {} AS dead_at",
        utc("created_at"),
        utc("dead_at")
    );
    let sql = format!("SELECT {columns} FROM {o}.messages WHERE status = 'dead' ORDER BY seq");
    let mut rows = sqlx::query_as::<_, OutboxMessage>(&sql).fetch(outbox);
    while let Some(r) = rows.try_next().await.map_err(db("reading dead messages"))? {
        report.dead.push(r, limit);
    }
    drop(rows);
    let sql = format!(
        "SELECT {columns} FROM {o}.messages
         WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)
         ORDER BY seq"
    );
    let mut rows = sqlx::query_as::<_, OutboxMessage>(&sql)
        .bind(opts.max_pending_age.as_secs_f64())
        .fetch(outbox);
    while let Some(r) = rows
        .try_next()
        .await
        .map_err(db("reading pending messages"))?
    {
        report.pending.push(r, limit);
    }
    Ok(())
}

/// The oldest delivery record, and whether a live relay started before it (then records are
/// missing: retention.delivered is shorter than the window, or was off).
async fn delivery_records(
    outbox: &PgPool,
    o: &Schema,
    report: &mut Report,
) -> Result<bool, ReconcileError> {
    let (records_from, missing): (Option<String>, bool) = sqlx::query_as(&format!(
        "SELECT {}, coalesce((SELECT min(started_at) FROM {o}.relays)
                             < coalesce(min(delivered_at), now()) - interval '1 minute', false)
         FROM {o}.delivered",
        utc("min(delivered_at)")
    ))
    .fetch_one(outbox)
    .await
    .map_err(db("reading the oldest delivery record"))?;
    report.delivered_records_from = records_from;
    Ok(missing)
}

/// `unit`'s processed ids in the window, looked up in the outbox in chunks: those it does not
/// know are findings; the others' topics are counted.
async fn processed(
    outbox: &PgPool,
    o: &Schema,
    unit: &mut Unit,
    opts: &Options,
    report: &mut Report,
) -> Result<BTreeMap<String, u64>, ReconcileError> {
    let mut seen_topics: BTreeMap<String, u64> = BTreeMap::new();
    let mut rows = unit.records.handled_since(&unit.group, opts.since);
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        let next = rows.try_next().await.map_err(consumer_db(format!(
            "reading processed messages of group {:?}",
            unit.group
        )))?;
        let end = next.is_none();
        if let Some(row) = next {
            chunk.push(row);
        }
        if chunk.len() == CHUNK || (end && !chunk.is_empty()) {
            unit.report.processed_in_window += chunk.len() as u64;
            let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
            let topics = outbox_topics(outbox, o, &ids).await?;
            for (id, processed_at) in chunk.drain(..) {
                match topics.get(&id) {
                    Some(topic) => *seen_topics.entry(topic.clone()).or_default() += 1,
                    None => {
                        unit.report.unknown += 1;
                        report.unknown.push(
                            Unknown {
                                group: unit.group.clone(),
                                message_id: id,
                                processed_at,
                            },
                            opts.limit,
                        );
                    }
                }
            }
        }
        if end {
            break;
        }
    }
    Ok(seen_topics)
}

/// `unit`'s dead letters (all of them: each waits for an operator); the topics of those the
/// outbox knows are counted.
async fn dead_letters(
    outbox: &PgPool,
    o: &Schema,
    unit: &mut Unit,
    seen_topics: &mut BTreeMap<String, u64>,
    report: &mut Report,
    limit: usize,
) -> Result<(), ReconcileError> {
    let letters = unit
        .letters
        .summaries(&unit.group)
        .await
        .map_err(consumer_db(format!(
            "reading dead letters of group {:?}",
            unit.group
        )))?;
    let ids: Vec<Uuid> = letters.iter().filter_map(|l| l.message_id).collect();
    for ids in ids.chunks(CHUNK) {
        for topic in outbox_topics(outbox, o, ids).await?.into_values() {
            *seen_topics.entry(topic).or_default() += 1;
        }
    }
    unit.report.dead_letters = letters.len() as u64;
    for letter in letters {
        report.dead_letters.push(letter, limit);
    }
    Ok(())
}

/// Outbox → consumers: every delivery in the window, older than the lag, checked against the
/// dedup rows of each group that consumes its topic. Returns the topics delivered.
async fn deliveries(
    outbox: &PgPool,
    o: &Schema,
    units: &mut [Unit],
    opts: &Options,
    report: &mut Report,
) -> Result<BTreeSet<String>, ReconcileError> {
    let sql = format!(
        "SELECT id, seq, topic, key, {} AS delivered_at,
                delivered_at < now() - make_interval(secs => $2) AS due
         FROM {o}.delivered d
         WHERE d.delivered_at >= now() - make_interval(secs => $1)
         ORDER BY d.delivered_at, d.id",
        utc("delivered_at")
    );
    let mut rows = sqlx::query_as::<_, Delivery>(&sql)
        .bind(opts.since.as_secs_f64())
        .bind(opts.max_lag.as_secs_f64())
        .fetch(outbox);
    let mut delivered_topics = BTreeSet::new();
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        let next = rows
            .try_next()
            .await
            .map_err(db("reading delivery records"))?;
        let end = next.is_none();
        if let Some(row) = next {
            report.delivered_in_window += 1;
            if !delivered_topics.contains(&row.topic) {
                delivered_topics.insert(row.topic.clone());
            }
            if row.due {
                chunk.push(row);
            }
        }
        if chunk.len() == CHUNK || (end && !chunk.is_empty()) {
            for unit in units.iter_mut() {
                unprocessed(unit, &chunk, report, opts.limit).await?;
            }
            chunk.clear();
        }
        if end {
            break;
        }
    }
    Ok(delivered_topics)
}

/// Those of `chunk` on `unit`'s topics that its group has no dedup row for (handled or
/// dead-lettered: a dead-lettered message is reported as a dead letter, or was discarded on
/// purpose).
async fn unprocessed(
    unit: &mut Unit,
    chunk: &[Delivery],
    report: &mut Report,
    limit: usize,
) -> Result<(), ReconcileError> {
    let due: Vec<&Delivery> = chunk
        .iter()
        .filter(|r| unit.topics.contains(&r.topic))
        .collect();
    if due.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = due.iter().map(|r| r.id).collect();
    let missing: BTreeSet<Uuid> = unit
        .records
        .without_row(&unit.group, &ids)
        .await
        .map_err(consumer_db(format!(
            "looking delivered ids up in group {:?}",
            unit.group
        )))?
        .into_iter()
        .collect();
    for r in due.into_iter().filter(|r| missing.contains(&r.id)) {
        unit.report.unprocessed += 1;
        report.unprocessed_ids.insert(r.id);
        report.unprocessed.push(
            Unprocessed {
                group: unit.group.clone(),
                id: r.id,
                seq: r.seq,
                topic: r.topic.clone(),
                key: r.key.clone(),
                delivered_at: r.delivered_at.clone(),
            },
            limit,
        );
    }
    Ok(())
}

/// The topics no group was checked on, the notes about the comparison, and each group's line.
fn finish(
    report: &mut Report,
    o: &Schema,
    units: Vec<Unit>,
    delivered_topics: BTreeSet<String>,
    missing: bool,
) {
    let checked: BTreeSet<&String> = units.iter().flat_map(|u| u.topics.iter()).collect();
    report.unchecked_topics = delivered_topics
        .into_iter()
        .filter(|t| !checked.contains(t))
        .collect();
    match &report.delivered_records_from {
        None => report.notes.push(format!(
            "{o}.delivered holds no records: nothing delivered can be checked (set \
             retention.delivered on the relays, longer than the window)"
        )),
        Some(from) if missing && *from > report.window_start => report.notes.push(format!(
            "delivery records begin at {from}, after the window's start, although a relay has \
             run since earlier: anything delivered before {from} is not checked \
             (retention.delivered must be longer than the window)"
        )),
        _ => {}
    }
    for unit in &units {
        if unit.inferred && unit.topics.is_empty() {
            report.notes.push(format!(
                "group {:?} processed nothing of this outbox in the window, so no topic is \
                 checked for it; name its topics with --group {}=TOPIC,...",
                unit.group, unit.group
            ));
        }
    }
    report.groups = units.into_iter().map(|u| u.report).collect();
}

/// A consumer schema found in a consumer database, and the groups in it.
struct Location {
    db: usize,
    records: DedupRecords,
    groups: Vec<String>,
}

/// The consumer schemas found in the consumer databases, and the groups to reconcile in them.
async fn units(
    consumers: &[ConsumerDatabase],
    opts: &Options,
) -> Result<Vec<Unit>, ReconcileError> {
    let locations = locations(consumers, opts).await?;
    let unit = |loc: &Location, group: &str, topics: &[String]| Unit {
        letters: DeadLetters::new(consumers[loc.db].pool.clone(), loc.records.schema().clone()),
        records: loc.records.clone(),
        group: group.to_owned(),
        topics: topics.iter().cloned().collect(),
        inferred: topics.is_empty(),
        report: GroupReport {
            group: group.to_owned(),
            database: consumers[loc.db].name.clone(),
            schema: loc.records.schema().to_string(),
            topics: Vec::new(),
            topics_inferred: topics.is_empty(),
            processed_in_window: 0,
            unprocessed: 0,
            unknown: 0,
            dead_letters: 0,
        },
    };
    let mut units = Vec::new();
    if opts.groups.is_empty() {
        for loc in &locations {
            for g in &loc.groups {
                units.push(unit(loc, g, &[]));
            }
        }
    } else {
        for spec in &opts.groups {
            let found: Vec<&Location> = locations
                .iter()
                .filter(|l| l.groups.contains(&spec.name))
                .collect();
            match (found.as_slice(), locations.as_slice()) {
                ([], [only]) => units.push(unit(only, &spec.name, &spec.topics)),
                ([], _) => return Err(ReconcileError::GroupNotFound(spec.name.clone())),
                (found, _) => units.extend(found.iter().map(|l| unit(l, &spec.name, &spec.topics))),
            }
        }
    }
    Ok(units)
}

/// Every consumer schema of `opts` in every consumer database, with the groups in each
/// (every group with a dedup row or a dead letter); fails when there is none.
async fn locations(
    consumers: &[ConsumerDatabase],
    opts: &Options,
) -> Result<Vec<Location>, ReconcileError> {
    let mut locations = Vec::new();
    for (i, consumer) in consumers.iter().enumerate() {
        for schema in &opts.consumer_schemas {
            let found = DedupRecords::open(consumer.pool.clone(), schema.clone())
                .await
                .map_err(consumer_db(format!(
                    "looking for consumer schema {schema} in {}",
                    consumer.name
                )))?;
            let Some(records) = found else {
                continue;
            };
            let groups = records.groups().await.map_err(consumer_db(format!(
                "listing consumer groups in {schema} of {}",
                consumer.name
            )))?;
            locations.push(Location {
                db: i,
                records,
                groups,
            });
        }
    }
    if locations.is_empty() {
        return Err(ReconcileError::NoConsumerSchema {
            schemas: opts
                .consumer_schemas
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            databases: consumers
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(locations)
}

/// The topics of those of `ids` that the outbox knows (delivered, pending, dead or
/// discarded).
async fn outbox_topics(
    outbox: &PgPool,
    o: &Schema,
    ids: &[Uuid],
) -> Result<BTreeMap<Uuid, String>, ReconcileError> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(&format!(
        "SELECT u.id, coalesce(d.topic, m.topic, x.topic)
         FROM unnest($1::uuid[]) AS u(id)
         LEFT JOIN {o}.delivered d ON d.id = u.id
         LEFT JOIN {o}.messages m ON m.id = u.id
         LEFT JOIN {o}.discarded x ON x.id = u.id
         WHERE d.id IS NOT NULL OR m.id IS NOT NULL OR x.id IS NOT NULL"
    ))
    .bind(ids)
    .fetch_all(outbox)
    .await
    .map_err(db("looking processed ids up in the outbox"))?;
    Ok(rows.into_iter().collect())
}

fn seconds(s: f64) -> String {
    humantime::format_duration(Duration::from_secs_f64(s.max(0.0))).to_string()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_groups(f)?;
        writeln!(f)?;
        self.write_outbox_findings(f)?;
        self.write_consumer_findings(f)?;
        writeln!(f)?;
        match self.findings() {
            0 => writeln!(f, "reconciled: nothing needs attention"),
            n => writeln!(
                f,
                "reconciled: {n} finding{} need{} attention",
                if n == 1 { "" } else { "s" },
                if n == 1 { "s" } else { "" }
            ),
        }
    }
}

impl Report {
    /// The window, one line per group, the topics not checked and the notes.
    fn write_groups(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "outbox schema {:?}: window {} .. {}; {} delivered in the window (records from {})",
            self.outbox,
            self.window_start,
            self.now,
            self.delivered_in_window,
            self.delivered_records_from.as_deref().unwrap_or("-")
        )?;
        writeln!(
            f,
            "{:<16} {:<18} {:<40} {:>9} {:>11} {:>7} {:>12}  DATABASE",
            "GROUP", "SCHEMA", "TOPICS", "PROCESSED", "UNPROCESSED", "UNKNOWN", "DEAD LETTERS"
        )?;
        for g in &self.groups {
            let topics = if g.topics.is_empty() {
                "-".to_owned()
            } else {
                g.topics.join(",")
            };
            writeln!(
                f,
                "{:<16} {:<18} {:<40} {:>9} {:>11} {:>7} {:>12}  {}",
                g.group,
                g.schema,
                format!(
                    "{topics}{}",
                    if g.topics_inferred { " (inferred)" } else { "" }
                ),
                g.processed_in_window,
                g.unprocessed,
                g.unknown,
                g.dead_letters,
                g.database
            )?;
        }
        if !self.unchecked_topics.is_empty() {
            writeln!(
                f,
                "topics delivered in the window that no group above consumes (not checked): {}",
                self.unchecked_topics.join(", ")
            )?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }

    /// Dead messages, and messages pending too long.
    fn write_outbox_findings(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dead in the outbox: {}", self.dead.count)?;
        write_outbox_rows(f, &self.dead)?;
        writeln!(
            f,
            "pending for longer than {}: {}",
            seconds(self.max_pending_age_seconds),
            self.pending.count
        )?;
        write_outbox_rows(f, &self.pending)
    }

    /// Messages not processed, processed but unknown, and parked in dead letters.
    fn write_consumer_findings(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "delivered more than {} ago, not processed: {}",
            seconds(self.max_lag_seconds),
            self.unprocessed.count
        )?;
        for r in &self.unprocessed.rows {
            writeln!(
                f,
                "  group {:<14} seq {:<8} {} {:<24} key {:<14} delivered {}",
                r.group,
                r.seq,
                r.id,
                r.topic,
                r.key.as_deref().unwrap_or("-"),
                r.delivered_at
            )?;
        }
        write_more(f, &self.unprocessed)?;
        writeln!(
            f,
            "processed but unknown to the outbox: {}",
            self.unknown.count
        )?;
        for r in &self.unknown.rows {
            writeln!(
                f,
                "  group {:<14} {} processed {}",
                r.group, r.message_id, r.processed_at
            )?;
        }
        write_more(f, &self.unknown)?;
        writeln!(
            f,
            "parked in consumers' dead letters: {}",
            self.dead_letters.count
        )?;
        for r in &self.dead_letters.rows {
            writeln!(
                f,
                "  group {:<14} letter {:<6} {} {:<24} key {:<14} attempts {:<3} {}",
                r.group,
                r.letter,
                r.message_id
                    .map(|id| id.to_string())
                    .as_deref()
                    .unwrap_or("-"),
                r.source,
                r.key.as_deref().unwrap_or("-"),
                r.attempts,
                r.error
            )?;
        }
        write_more(f, &self.dead_letters)
    }
}

/// The rows shown of a finding about outbox messages, then how many more there are.
fn write_outbox_rows(f: &mut fmt::Formatter<'_>, finding: &Finding<OutboxMessage>) -> fmt::Result {
    for r in &finding.rows {
        writeln!(
            f,
            "  seq {:<8} {} {:<24} key {:<14} attempts {:<3} written {} {}",
            r.seq,
            r.id,
            r.topic,
            r.key.as_deref().unwrap_or("-"),
            r.attempts,
            r.created_at,
            r.last_error.as_deref().unwrap_or("")
        )?;
    }
    write_more(f, finding)
}

/// How many of a finding's rows are not shown, if any.
fn write_more<T>(f: &mut fmt::Formatter<'_>, finding: &Finding<T>) -> fmt::Result {
    let shown = finding.rows.len() as u64;
    if finding.count > shown {
        writeln!(f, "  … and {} more", finding.count - shown)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_specs_parse() {
        assert_eq!(
            "billing".parse::<GroupSpec>().unwrap(),
            GroupSpec {
                name: "billing".into(),
                topics: vec![]
            }
        );
        assert_eq!(
            "billing=orders.paid, orders.refunded"
                .parse::<GroupSpec>()
                .unwrap()
                .topics,
            vec!["orders.paid", "orders.refunded"]
        );
        assert!("billing=".parse::<GroupSpec>().is_err());
        assert!("=orders".parse::<GroupSpec>().is_err());
    }
}
