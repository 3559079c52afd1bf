//! The message a producer writes: validated once, at construction.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::error::InvalidMessage;

/// Longest topic, key and content type, in bytes (the SQL contract checks the same).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 128;
/// Longest header value, in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;
/// Most headers one message may carry.
pub const MAX_HEADERS: usize = 64;
/// Header names starting with this prefix are set by the relay on the wire and cannot be
/// set by producers.
pub const RESERVED_HEADER_PREFIX: &str = "outbox-";

/// A message to publish: where it goes, how it is ordered and what it carries.
///
/// Build one with [`Message::new`] or [`Message::json`], then add a key, headers or a content
/// type. Every setter validates its input, so a `Message` that exists is one the outbox
/// table accepts.
///
/// ```
/// # fn main() -> Result<(), outbox::InvalidMessage> {
/// let msg = outbox::Message::json("orders.created", &serde_json::json!({"order": 42}))?
///     .with_key("order-42")?
///     .with_header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")?;
/// assert_eq!(msg.key(), Some("order-42"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    id: Uuid,
    topic: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
    content_type: Option<String>,
}

impl Message {
    /// A message for `topic` carrying `payload` as opaque bytes, with a fresh UUIDv7 id.
    pub fn new(
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Self, InvalidMessage> {
        let topic = topic.into();
        check_name("topic", &topic)?;
        if topic.chars().any(char::is_control) {
            return Err(InvalidMessage::ControlCharacter { field: "topic" });
        }
        Ok(Self {
            id: Uuid::now_v7(),
            topic,
            key: None,
            payload: payload.into(),
            headers: BTreeMap::new(),
            content_type: None,
        })
    }

    /// A message whose payload is `value` serialised as JSON, with content type
    /// `application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(
        topic: impl Into<String>,
        value: &T,
    ) -> Result<Self, InvalidMessage> {
        let payload = serde_json::to_vec(value).map_err(InvalidMessage::Json)?;
        Self::new(topic, payload)?.with_content_type("application/json")
    }

    /// Use `id` instead of the generated UUIDv7 (for example an id the caller already
    /// stored). Ids are unique in the outbox: enqueueing one twice fails.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// The ordering key: messages with the same key are published in the order they were
    /// written. Without a key a message may overtake others.
    pub fn with_key(mut self, key: impl Into<String>) -> Result<Self, InvalidMessage> {
        let key = key.into();
        check_name("key", &key)?;
        self.key = Some(key);
        Ok(self)
    }

    /// Adds a string header, carried to the broker as a message header. Names are
    /// case-sensitive; setting a name twice keeps the last value.
    pub fn with_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, InvalidMessage> {
        let (name, value) = (name.into(), value.into());
        if name.is_empty() || name.len() > MAX_HEADER_NAME_BYTES {
            return Err(InvalidMessage::HeaderName {
                name,
                max: MAX_HEADER_NAME_BYTES,
            });
        }
        if name.chars().any(|c| c.is_control() || c == ':') {
            return Err(InvalidMessage::ControlCharacter {
                field: "header name",
            });
        }
        if crate::wire::is_reserved(&name) {
            return Err(InvalidMessage::ReservedHeader { name });
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return Err(InvalidMessage::HeaderValueTooLong {
                name,
                len: value.len(),
                max: MAX_HEADER_VALUE_BYTES,
            });
        }
        if !self.headers.contains_key(&name) && self.headers.len() >= MAX_HEADERS {
            return Err(InvalidMessage::TooManyHeaders { max: MAX_HEADERS });
        }
        self.headers.insert(name, value);
        Ok(self)
    }

    /// The payload's MIME type, e.g. `application/json`.
    pub fn with_content_type(
        mut self,
        content_type: impl Into<String>,
    ) -> Result<Self, InvalidMessage> {
        let content_type = content_type.into();
        check_name("content type", &content_type)?;
        self.content_type = Some(content_type);
        Ok(self)
    }

    /// The message id; consumers deduplicate on it.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Where the message goes; the relay maps it to a broker destination.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The ordering key, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The payload bytes, published unchanged.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The user headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The payload's content type, if set.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }
}

fn check_name(field: &'static str, value: &str) -> Result<(), InvalidMessage> {
    if value.is_empty() {
        return Err(InvalidMessage::Empty { field });
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(InvalidMessage::TooLong {
            field,
            len: value.len(),
            max: MAX_NAME_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_topic_is_rejected() {
        let err = Message::new("", b"x".to_vec()).unwrap_err();
        assert_eq!(err.to_string(), "message topic is empty");
    }

    #[test]
    fn overlong_key_names_its_length() {
        let err = Message::new("t", b"x".to_vec())
            .unwrap()
            .with_key("k".repeat(256))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "message key is 256 bytes, longer than the limit of 255"
        );
    }

    #[test]
    fn reserved_header_prefix_is_rejected_case_insensitively() {
        let err = Message::new("t", vec![])
            .unwrap()
            .with_header("Outbox-Id", "x")
            .unwrap_err();
        assert!(
            matches!(err, InvalidMessage::ReservedHeader { .. }),
            "{err}"
        );
    }

    #[test]
    fn header_count_is_capped_but_overwrite_is_allowed() {
        let mut m = Message::new("t", vec![]).unwrap();
        for i in 0..MAX_HEADERS {
            m = m.with_header(format!("h{i}"), "v").unwrap();
        }
        let m = m.with_header("h0", "again").unwrap();
        assert_eq!(m.headers()["h0"], "again");
        assert!(matches!(
            m.with_header("one-more", "v"),
            Err(InvalidMessage::TooManyHeaders { .. })
        ));
    }

    #[test]
    fn json_sets_content_type_and_bytes() {
        let m = Message::json("t", &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(m.content_type(), Some("application/json"));
        assert_eq!(m.payload(), br#"{"a":1}"#);
    }

    #[test]
    fn generated_ids_are_v7_and_distinct() {
        let a = Message::new("t", vec![]).unwrap();
        let b = Message::new("t", vec![]).unwrap();
        assert_eq!(a.id().get_version_num(), 7);
        assert_ne!(a.id(), b.id());
    }
}
