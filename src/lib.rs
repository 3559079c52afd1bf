//! # outbox: the producer side of the transactional outbox
//!
//! A service writes its business rows and the messages it wants published in **one
//! PostgreSQL transaction**. [`Outbox::enqueue`] inserts a [`Message`] through the caller's
//! own executor (a `&mut PgConnection` or a transaction), so the message exists if and only
//! if that transaction commits. The `outbox-relay` sidecar then publishes committed rows to
//! the broker and deletes each one after the broker confirms it.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let outbox = outbox::Outbox::default(); // schema "outbox"
//! outbox.migrate(&pool).await?;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! let msg = outbox::Message::json("orders.created", &serde_json::json!({"id": 42}))?
//!     .with_key("order-42")?;
//! outbox.enqueue(&mut *tx, &msg).await?;
//! tx.commit().await?; // the order and its message, or neither
//! # Ok(()) }
//! ```
//!
//! ## Guarantees, and where they end
//!
//! - **Atomicity**: a message is visible to the relay only once its transaction commits,
//!   and a rolled-back transaction leaves nothing behind.
//! - **Per-key order**: messages that share a key are published in `seq` order, which is
//!   the order they were inserted. That is the order you meant only if you serialise the
//!   writes of one key yourself (one aggregate's row lock, one connection): two concurrent,
//!   uncoordinated transactions writing the same key have no order to keep.
//! - **Delivery** is at least once: a consumer can see a message twice and must
//!   deduplicate on [`Message::id`] (the `outbox-consumer` crate does this).
#![deny(missing_docs)]

#[cfg(feature = "rabbitmq")]
pub mod amqp;
mod backoff;
mod error;
mod message;
pub mod migrate;
mod redact;
mod schema;
pub mod wire;

pub use backoff::Backoff;
pub use error::{Error, InvalidMessage, InvalidSchema};
pub use message::{
    Message, MAX_HEADERS, MAX_HEADER_NAME_BYTES, MAX_HEADER_VALUE_BYTES, MAX_NAME_BYTES,
    RESERVED_HEADER_PREFIX,
};
pub use migrate::LATEST_VERSION;
pub use redact::redact_url;
pub use schema::Schema;

use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

/// Where a message landed in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The message id.
    pub id: Uuid,
    /// Its position in the outbox; per-key order follows it.
    pub seq: i64,
}

/// Handle on one outbox schema: writes messages and applies migrations.
///
/// Cheap to clone; holds only the schema name and the SQL built from it.
#[derive(Debug, Clone)]
pub struct Outbox {
    schema: Schema,
    insert_one: String,
    insert_many: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new(Schema::default())
    }
}

impl Outbox {
    /// A handle on the outbox in `schema`.
    pub fn new(schema: Schema) -> Self {
        let insert_one = format!(
            "INSERT INTO {schema}.messages (id, topic, key, payload, headers, content_type) \
             VALUES ($1, $2, $3, $4, $5::jsonb, $6) RETURNING seq"
        );
        let insert_many = format!(
            "INSERT INTO {schema}.messages (id, topic, key, payload, headers, content_type) \
             SELECT id, topic, key, payload, headers::jsonb, content_type \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[]) \
                  WITH ORDINALITY AS m(id, topic, key, payload, headers, content_type, ord) \
             ORDER BY ord \
             RETURNING id, seq"
        );
        Self {
            schema,
            insert_one,
            insert_many,
        }
    }

    /// The schema this handle writes to.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Inserts `message` through `executor`, which should be the caller's transaction
    /// (`&mut *tx`): the message then commits or rolls back with the caller's own writes.
    #[tracing::instrument(skip_all, fields(message_id = %message.id(), topic = message.topic()), err)]
    pub async fn enqueue<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        message: &Message,
    ) -> Result<Enqueued, Error> {
        let seq: i64 = sqlx::query_scalar(&self.insert_one)
            .bind(message.id())
            .bind(message.topic())
            .bind(message.key())
            .bind(message.payload())
            .bind(headers_json(message))
            .bind(message.content_type())
            .fetch_one(executor)
            .await
            .map_err(|e| duplicate_id(e, message.id()))?;
        Ok(Enqueued {
            id: message.id(),
            seq,
        })
    }

    /// Inserts `messages` in one statement, in slice order (so their `seq` follows the
    /// slice). Returns where each landed, in the same order.
    #[tracing::instrument(skip_all, fields(count = messages.len()), err)]
    pub async fn enqueue_batch<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        messages: &[Message],
    ) -> Result<Vec<Enqueued>, Error> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = messages.iter().map(Message::id).collect();
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(&self.insert_many)
            .bind(&ids)
            .bind(messages.iter().map(|m| m.topic()).collect::<Vec<_>>())
            .bind(messages.iter().map(|m| m.key()).collect::<Vec<_>>())
            .bind(messages.iter().map(|m| m.payload()).collect::<Vec<_>>())
            .bind(messages.iter().map(headers_json).collect::<Vec<_>>())
            .bind(
                messages
                    .iter()
                    .map(|m| m.content_type())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(executor)
            .await
            .map_err(|e| duplicate_id_in_batch(e, &ids))?;
        let seq_of: std::collections::HashMap<Uuid, i64> = rows.into_iter().collect();
        Ok(ids
            .iter()
            .map(|id| Enqueued {
                id: *id,
                seq: seq_of[id],
            })
            .collect())
    }

    /// Turns the wake-up off for the rest of the caller's transaction: its commit (or its
    /// `PREPARE TRANSACTION`) sends no `NOTIFY`, and idle relays find its messages by
    /// polling, within `relay.poll_interval`. Needed by producers under two-phase commit
    /// (XA/JTA transaction managers): PostgreSQL refuses to prepare a transaction that ran
    /// `NOTIFY`. The same as `SET LOCAL outbox.wakeup = 'off'` in plain SQL (schema version 4).
    pub async fn skip_wakeup<'e, E: PgExecutor<'e>>(&self, executor: E) -> Result<(), Error> {
        sqlx::query("SELECT set_config('outbox.wakeup', 'off', true)")
            .execute(executor)
            .await?;
        Ok(())
    }

    /// Creates the schema and applies pending migrations; returns the versions applied now.
    /// Safe to run concurrently from several processes.
    pub async fn migrate(&self, pool: &PgPool) -> Result<Vec<i32>, Error> {
        let mut conn = pool.acquire().await?;
        migrate::run(&mut conn, &self.schema).await
    }
}

/// Inserts `message` into the default `outbox` schema; see [`Outbox::enqueue`].
pub async fn enqueue<'e, E: PgExecutor<'e>>(
    executor: E,
    message: &Message,
) -> Result<Enqueued, Error> {
    Outbox::default().enqueue(executor, message).await
}

/// Applies migrations to the default `outbox` schema; see [`Outbox::migrate`].
pub async fn migrate(pool: &PgPool) -> Result<Vec<i32>, Error> {
    Outbox::default().migrate(pool).await
}

fn headers_json(message: &Message) -> String {
    serde_json::to_string(message.headers()).expect("a map of strings always serialises")
}

fn is_id_conflict(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.constraint() == Some("messages_id_key"))
}

fn duplicate_id(err: sqlx::Error, id: Uuid) -> Error {
    if is_id_conflict(&err) {
        Error::DuplicateId(id)
    } else {
        Error::Database(err)
    }
}

fn duplicate_id_in_batch(err: sqlx::Error, ids: &[Uuid]) -> Error {
    if !is_id_conflict(&err) {
        return Error::Database(err);
    }
    // PostgreSQL's detail names the key: "Key (id)=(...) already exists."
    let detail = match &err {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.detail().map(str::to_owned)),
        _ => None,
    };
    match detail.and_then(|d| ids.iter().copied().find(|id| d.contains(&id.to_string()))) {
        Some(id) => Error::DuplicateId(id),
        None => Error::Database(err),
    }
}
