//! A claimed message on its way to a broker: plain data, known to both the store and the
//! publishers, depending on neither.

use std::collections::BTreeMap;

use uuid::Uuid;

/// Wire header carrying the message id (also the AMQP `message-id` property).
pub const HEADER_ID: &str = "outbox-id";
/// Wire header carrying the outbox topic.
pub const HEADER_TOPIC: &str = "outbox-topic";
/// Wire header carrying the ordering key, when there is one.
pub const HEADER_KEY: &str = "outbox-key";
/// Wire header carrying the outbox `seq` (per-key order follows it).
pub const HEADER_SEQ: &str = "outbox-seq";

/// One message as claimed from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Position in the outbox.
    pub seq: i64,
    /// The outbox partition it belongs to (by its key).
    pub partition: i16,
    /// Message id; consumers deduplicate on it.
    pub id: Uuid,
    /// Outbox topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// User headers.
    pub headers: BTreeMap<String, String>,
    /// Payload MIME type.
    pub content_type: Option<String>,
    /// When the row was written, in seconds since the Unix epoch.
    pub created_at_unix: i64,
    /// When the row was written, in microseconds since the Unix epoch.
    pub created_at_micros: i64,
    /// Failed attempts so far.
    pub attempts: u32,
}

impl Envelope {
    /// Time since the row was written, by this machine's clock (`None` if that clock is
    /// behind the database's).
    pub fn age(&self) -> Option<std::time::Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_micros() as i64;
        u64::try_from(now - self.created_at_micros)
            .ok()
            .map(std::time::Duration::from_micros)
    }
}
