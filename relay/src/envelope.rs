//! A claimed message on its way to a broker: plain data, known to both the store and the
//! publishers, depending on neither.

use std::collections::BTreeMap;

use uuid::Uuid;

pub use outbox::wire::{
    HEADER_CONTENT_TYPE, HEADER_ID, HEADER_KEY, HEADER_REPLAY, HEADER_SEQ, HEADER_TOPIC,
};

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
    /// Set on a message sent again by `outbox-relay replay`: the topic it was first written
    /// with (`topic` is where the replay goes).
    pub replay_of: Option<String>,
}

impl Envelope {
    /// The user headers that go on the wire: every one but those with a reserved name
    /// ([`outbox::wire::is_reserved`]), which a plain-SQL writer may have put in the row and
    /// which the relay sets itself, so that a message carries exactly one of each.
    pub fn wire_headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers
            .iter()
            .filter(|(name, _)| !outbox::wire::is_reserved(name))
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }

    /// The topic sent as `outbox-topic`: the one the producer wrote, also on a replay sent
    /// elsewhere.
    pub fn wire_topic(&self) -> &str {
        self.replay_of.as_deref().unwrap_or(&self.topic)
    }

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
