//! Sending delivered messages again (`outbox-relay replay`, `reconcile --repair`).
//!
//! A replay writes archived messages (kept whole under `retention.delivered_payloads`) back
//! into the outbox with their original ids, in their original order, so the relay's normal
//! pipeline sends them again: retries, dead messages and metrics as for any message, and a
//! consumer that already processed one deduplicates it. Each such row carries `replay_of`,
//! the topic it was first written with, which the relay marks on the wire (`outbox-replay`).
//! All SQL; no broker involved.

use std::{collections::BTreeSet, fmt, time::Duration};

use outbox::Schema;
use serde::{Serialize, Serializer};
use sqlx::PgPool;
use uuid::Uuid;

/// A point in time for a selection: a UTC time (RFC 3339, `Z` or none), or a span before now
/// (by the database's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Moment {
    /// A time, e.g. `2026-12-08T10:00:00Z` (UTC).
    At(std::time::SystemTime),
    /// This long ago.
    Ago(Duration),
}

impl std::str::FromStr for Moment {
    type Err = String;

    /// An RFC 3339 time or a duration (`2h`, `30m`, meaning that long ago).
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(d) = humantime::parse_duration(s) {
            return Ok(Self::Ago(d));
        }
        humantime::parse_rfc3339_weak(s).map(Self::At).map_err(|_| {
            format!(
                "{s:?} is neither a time (e.g. 2026-12-08T10:00:00Z) nor a duration ago (e.g. 2h)"
            )
        })
    }
}

impl Moment {
    /// The time in RFC 3339 with a `Z`, as PostgreSQL reads it whatever the session's time
    /// zone.
    fn time(&self) -> Option<String> {
        match self {
            Self::At(t) => Some(humantime::format_rfc3339_micros(*t).to_string()),
            Self::Ago(_) => None,
        }
    }

    fn secs_ago(&self) -> Option<f64> {
        match self {
            Self::Ago(d) => Some(d.as_secs_f64()),
            Self::At(_) => None,
        }
    }
}

/// Which delivered messages to send again. Criteria combine with AND and apply to the
/// messages as first delivered (their original topic).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these ids.
    pub ids: Vec<Uuid>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this key.
    pub key: Option<String>,
    /// Only messages delivered at or after this.
    pub from: Option<Moment>,
    /// Only messages delivered before this.
    pub until: Option<Moment>,
    /// Explicitly every archived message (required when nothing else narrows it).
    pub all: bool,
}

impl Selection {
    /// Exactly the messages `ids`.
    pub fn ids(ids: Vec<Uuid>) -> Self {
        Self {
            ids,
            ..Self::default()
        }
    }

    /// True when at least one criterion narrows the selection.
    pub fn is_narrowed(&self) -> bool {
        !self.ids.is_empty()
            || self.topic.is_some()
            || self.key.is_some()
            || self.from.is_some()
            || self.until.is_some()
    }
}

/// What became of one selected message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Written back into the outbox (with `--dry-run`: would be).
    Queued,
    /// Left alone: a message with its id is in the outbox already (pending, retrying or
    /// dead), so it goes (or went) out as that row.
    InOutbox,
    /// Cannot be sent: its record was kept without the payload
    /// (`retention.delivered_payloads` was off when it was delivered).
    NoPayload,
}

impl Fate {
    fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::InOutbox => "in the outbox already",
            Self::NoPayload => "archived without payload",
        }
    }
}

impl Serialize for Fate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Self::Queued => "queued",
            Self::InOutbox => "in_outbox",
            Self::NoPayload => "no_payload",
        })
    }
}

/// One selected message.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq, Eq)]
pub struct Replayed {
    /// Message id (kept by the replay).
    pub id: Uuid,
    /// Its original position in the outbox.
    pub seq: i64,
    /// The topic it was first written with.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// When the broker first confirmed it (UTC, RFC 3339).
    pub delivered_at: String,
    /// Payload size in bytes, when the payload was kept.
    pub payload_bytes: Option<i32>,
    /// What became of it.
    #[sqlx(skip)]
    pub fate: Option<Fate>,
    #[serde(skip)]
    whole: bool,
    #[serde(skip)]
    queued: bool,
}

/// The outcome of a replay.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Outcome {
    /// True when nothing was written (`--dry-run`).
    pub dry_run: bool,
    /// Where the replay goes, when not to each message's own topic.
    pub to_topic: Option<String>,
    /// The selected messages, in their original order.
    pub messages: Vec<Replayed>,
    /// Ids asked for that have no delivery record (never delivered, or purged after
    /// `retention.delivered`).
    pub not_archived: Vec<Uuid>,
}

impl Outcome {
    /// How many messages met `fate`.
    pub fn count(&self, fate: Fate) -> usize {
        self.messages
            .iter()
            .filter(|m| m.fate == Some(fate))
            .count()
    }

    /// True when every message asked for was queued or is in the outbox already.
    pub fn complete(&self) -> bool {
        self.not_archived.is_empty() && self.count(Fate::NoPayload) == 0
    }
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Nothing narrows the selection and `all` is not set.
    #[error(
        "name the messages with --id, --ids, --topic, --key, --from or --until, or pass --all"
    )]
    Unselected,
    /// The redirect topic is not a valid topic.
    #[error("--to-topic {0:?} is not a valid topic (1–255 bytes, no control characters)")]
    BadTopic(String),
    /// Criteria other than ids matched nothing: says what the archive holds.
    #[error("no archived message matches the selection: {0}")]
    NothingMatched(String),
    /// The database refused or failed.
    #[error("replaying from {schema}.delivered (the role needs SELECT on it and INSERT, SELECT on {schema}.messages): {source}")]
    Database {
        /// The outbox schema.
        schema: String,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
}

/// Writes the archived messages that `selection` picks back into the outbox in `schema`,
/// in their original order, to `to_topic` when given (each keeps its own topic otherwise);
/// with `dry_run`, only says what would go. Runs as one statement: either every queued
/// message is written, or none.
pub async fn replay(
    pool: &PgPool,
    schema: &Schema,
    selection: &Selection,
    to_topic: Option<&str>,
    dry_run: bool,
) -> Result<Outcome, ReplayError> {
    if !selection.is_narrowed() && !selection.all {
        return Err(ReplayError::Unselected);
    }
    if let Some(t) = to_topic {
        if t.is_empty() || t.len() > outbox::MAX_NAME_BYTES || t.chars().any(char::is_control) {
            return Err(ReplayError::BadTopic(t.to_owned()));
        }
    }
    let s = schema;
    // Each record is picked once; `queued` says whether it went (or would go) back in.
    let queued = if dry_run {
        format!(
            "SELECT id FROM picked p
             WHERE p.payload IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM {s}.messages m WHERE m.id = p.id)"
        )
    } else {
        format!(
            "INSERT INTO {s}.messages (id, topic, key, payload, headers, content_type, replay_of)
             SELECT id, coalesce($8, topic), key, payload, coalesce(headers, '{{}}'),
                    content_type, topic
             FROM picked WHERE payload IS NOT NULL
             ORDER BY seq
             ON CONFLICT ON CONSTRAINT messages_id_key DO NOTHING
             RETURNING id"
        )
    };
    let sql = format!(
        "WITH picked AS (
             SELECT d.id, d.seq, d.topic, d.key, d.delivered_at, d.payload, d.headers,
                    d.content_type
             FROM {s}.delivered d
             WHERE (cardinality($1::uuid[]) = 0 OR d.id = ANY($1))
               AND ($2::text IS NULL OR d.topic = $2)
               AND ($3::text IS NULL OR d.key = $3)
               AND d.delivered_at >= coalesce($4::timestamptz,
                                             now() - make_interval(secs => $5), '-infinity')
               AND d.delivered_at < coalesce($6::timestamptz,
                                            now() - make_interval(secs => $7), 'infinity')
         ), queued AS ({queued})
         SELECT p.id, p.seq, p.topic, p.key,
                to_char(p.delivered_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                    AS delivered_at,
                octet_length(p.payload) AS payload_bytes,
                p.payload IS NOT NULL AS whole,
                p.id IN (SELECT id FROM queued) AS queued
         FROM picked p
         ORDER BY p.seq"
    );
    let from = selection.from.as_ref();
    let until = selection.until.as_ref();
    let mut messages: Vec<Replayed> = sqlx::query_as(&sql)
        .bind(&selection.ids)
        .bind(selection.topic.as_deref())
        .bind(selection.key.as_deref())
        .bind(from.and_then(Moment::time))
        .bind(from.and_then(Moment::secs_ago))
        .bind(until.and_then(Moment::time))
        .bind(until.and_then(Moment::secs_ago))
        .bind(to_topic)
        .fetch_all(pool)
        .await
        .map_err(|source| ReplayError::Database {
            schema: s.to_string(),
            source,
        })?;
    if messages.is_empty() && selection.ids.is_empty() {
        return Err(ReplayError::NothingMatched(
            archive_span(pool, schema)
                .await
                .map_err(|source| ReplayError::Database {
                    schema: s.to_string(),
                    source,
                })?,
        ));
    }
    for m in &mut messages {
        m.fate = Some(match (m.queued, m.whole) {
            (true, _) => Fate::Queued,
            (false, true) => Fate::InOutbox,
            (false, false) => Fate::NoPayload,
        });
    }
    let found: BTreeSet<Uuid> = messages.iter().map(|m| m.id).collect();
    let mut not_archived: Vec<Uuid> = selection
        .ids
        .iter()
        .filter(|id| !found.contains(id))
        .copied()
        .collect();
    not_archived.sort_unstable();
    not_archived.dedup();
    Ok(Outcome {
        dry_run,
        to_topic: to_topic.map(str::to_owned),
        messages,
        not_archived,
    })
}

/// What the archive in `schema` holds, in words, for a selection that matched nothing.
async fn archive_span(pool: &PgPool, schema: &Schema) -> Result<String, sqlx::Error> {
    let utc =
        |c: &str| format!("to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
    let (from, to, records, whole): (Option<String>, Option<String>, i64, i64) =
        sqlx::query_as(&format!(
            "SELECT {}, {}, count(*), count(*) FILTER (WHERE payload IS NOT NULL)
             FROM {schema}.delivered",
            utc("min(delivered_at)"),
            utc("max(delivered_at)")
        ))
        .fetch_one(pool)
        .await?;
    Ok(match (from, to) {
        (Some(from), Some(to)) => format!(
            "{schema}.delivered holds {records} messages delivered from {from} to {to}, {whole} \
             of them with their payload (older ones were purged after retention.delivered)"
        ),
        _ => format!(
            "{schema}.delivered holds no delivered message (set retention.delivered and \
             retention.delivered_payloads on the relays to keep them)"
        ),
    })
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.messages.is_empty() {
            writeln!(
                f,
                "{:<10} {:<36} {:<20} {:<16} {:<20} {:>9} OUTCOME",
                "SEQ", "ID", "TOPIC", "KEY", "DELIVERED AT", "BYTES"
            )?;
        }
        for m in &self.messages {
            writeln!(
                f,
                "{:<10} {:<36} {:<20} {:<16} {:<20} {:>9} {}",
                m.seq,
                m.id,
                m.topic,
                m.key.as_deref().unwrap_or("-"),
                m.delivered_at,
                m.payload_bytes.map_or("-".to_owned(), |b| b.to_string()),
                m.fate.map_or("", Fate::as_str)
            )?;
        }
        for id in &self.not_archived {
            writeln!(
                f,
                "{id}: no delivery record (never delivered, or purged after retention.delivered)"
            )?;
        }
        let queued = self.count(Fate::Queued);
        let verb = if self.dry_run {
            "would replay"
        } else {
            "replayed"
        };
        let to = self
            .to_topic
            .as_ref()
            .map_or(String::new(), |t| format!(" to topic {t:?}"));
        write!(
            f,
            "{verb} {queued} message{}{to}",
            if queued == 1 { "" } else { "s" }
        )?;
        let mut left = Vec::new();
        for fate in [Fate::InOutbox, Fate::NoPayload] {
            let n = self.count(fate);
            if n > 0 {
                left.push(format!("{n} {}", fate.as_str()));
            }
        }
        if !self.not_archived.is_empty() {
            left.push(format!(
                "{} without a delivery record",
                self.not_archived.len()
            ));
        }
        if !left.is_empty() {
            write!(f, "; not replayed: {}", left.join(", "))?;
        }
        if self.count(Fate::NoPayload) > 0 {
            write!(
                f,
                " (set retention.delivered_payloads = true on the relays to keep payloads)"
            )?;
        }
        writeln!(f)
    }
}

/// Message ids read from `text`: whitespace-separated UUIDs (`#` starts a comment), a JSON
/// array of UUIDs or of objects with an `id`, or the JSON report of `outbox-relay reconcile
/// --json`, whose "delivered, not processed" ids it takes. A report that lists only some of
/// them (its `--limit`) is refused rather than half used.
pub fn parse_ids(text: &str) -> Result<Vec<Uuid>, String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return json_ids(trimmed);
    }
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        for word in line.split_whitespace() {
            let id = word
                .parse()
                .map_err(|_| format!("line {}: {word:?} is not a message id (a UUID)", n + 1))?;
            ids.push(id);
        }
    }
    Ok(ids)
}

fn json_ids(text: &str) -> Result<Vec<Uuid>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the ids are not valid JSON: {e}"))?;
    let id_of = |v: &serde_json::Value| -> Result<Uuid, String> {
        let s = match v {
            serde_json::Value::String(s) => s.as_str(),
            serde_json::Value::Object(o) => o
                .get("id")
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("{v} has no \"id\""))?,
            other => return Err(format!("{other} is not a message id")),
        };
        s.parse()
            .map_err(|_| format!("{s:?} is not a message id (a UUID)"))
    };
    match &value {
        serde_json::Value::Array(items) => items.iter().map(id_of).collect(),
        serde_json::Value::Object(report) => {
            let unprocessed = report
                .get("unprocessed")
                .ok_or("a JSON object must be the report of `outbox-relay reconcile --json`")?;
            let rows = unprocessed
                .get("rows")
                .and_then(|r| r.as_array())
                .ok_or("the report's \"unprocessed\" has no \"rows\"")?;
            let count = unprocessed
                .get("count")
                .and_then(|c| c.as_u64())
                .unwrap_or(rows.len() as u64);
            if count > rows.len() as u64 {
                return Err(format!(
                    "the report lists {} of its {count} messages delivered but not processed \
                     (reconcile's --limit): run reconcile with --limit {count}, or with --repair",
                    rows.len()
                ));
            }
            let mut ids: Vec<Uuid> = rows.iter().map(id_of).collect::<Result<_, _>>()?;
            // A message several groups missed is listed once per group.
            ids.sort_unstable();
            ids.dedup();
            Ok(ids)
        }
        _ => unreachable!("starts with {{ or ["),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0b3c4d3e-95c1-4d43-a8b4-1f0c2b6f7a11";
    const B: &str = "6f1d0f2a-3b4c-4d5e-8f90-a1b2c3d4e5f6";

    #[test]
    fn ids_are_read_from_lines_json_arrays_and_reconcile_reports() {
        let a: Uuid = A.parse().unwrap();
        let b: Uuid = B.parse().unwrap();
        assert_eq!(
            parse_ids(&format!("{A}\n# a comment\n  {B} # trailing\n")).unwrap(),
            vec![a, b]
        );
        assert_eq!(
            parse_ids(&format!("[\"{A}\", {{\"id\": \"{B}\"}}]")).unwrap(),
            vec![a, b]
        );
        let report = format!(
            "{{\"unprocessed\": {{\"count\": 3, \"rows\": [
                {{\"group\": \"g1\", \"id\": \"{B}\"}}, {{\"group\": \"g1\", \"id\": \"{A}\"}},
                {{\"group\": \"g2\", \"id\": \"{A}\"}}]}}}}"
        );
        assert_eq!(parse_ids(&report).unwrap(), vec![a, b]);
    }

    #[test]
    fn a_report_cut_short_by_its_limit_and_bad_ids_are_refused_by_name() {
        let cut =
            format!("{{\"unprocessed\": {{\"count\": 250, \"rows\": [{{\"id\": \"{A}\"}}]}}}}");
        let e = parse_ids(&cut).unwrap_err();
        assert!(
            e.contains("1 of its 250") && e.contains("--limit 250"),
            "{e}"
        );
        let e = parse_ids(&format!("{A}\nnot-an-id\n")).unwrap_err();
        assert!(e.contains("line 2") && e.contains("not-an-id"), "{e}");
        assert!(parse_ids("{\"dead\": {}}")
            .unwrap_err()
            .contains("reconcile --json"));
    }

    #[test]
    fn moments_are_times_or_durations_ago() {
        assert_eq!(
            "2h".parse::<Moment>().unwrap(),
            Moment::Ago(Duration::from_secs(7200))
        );
        assert!(matches!(
            "2026-12-08T10:00:00Z".parse::<Moment>().unwrap(),
            Moment::At(_)
        ));
        assert!("yesterday"
            .parse::<Moment>()
            .unwrap_err()
            .contains("neither"));
    }
}
