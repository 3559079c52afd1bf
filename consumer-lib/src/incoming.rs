//! A delivered message, as the handling step sees it.

use std::collections::BTreeMap;

use uuid::Uuid;

/// One delivery from a broker.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The outbox message id (`outbox-id` header), if the message carries one.
    pub message_id: Option<Uuid>,
    /// Where it came from: the RabbitMQ queue or the Kafka topic.
    pub source: String,
    /// The ordering key (`outbox-key`), if any.
    pub key: Option<String>,
    /// The body.
    pub payload: Vec<u8>,
    /// Every header, as strings.
    pub headers: BTreeMap<String, String>,
}

impl Incoming {
    /// A message from `source` with `headers`; the id and key are read from the relay's
    /// `outbox-id` and `outbox-key` headers.
    pub fn new(
        source: impl Into<String>,
        payload: Vec<u8>,
        headers: BTreeMap<String, String>,
    ) -> Self {
        let message_id = headers
            .get(crate::MESSAGE_ID_HEADER)
            .and_then(|v| v.parse().ok());
        let key = headers.get(outbox::wire::HEADER_KEY).cloned();
        Self {
            message_id,
            source: source.into(),
            key,
            payload,
            headers,
        }
    }

    /// True for a message the outbox sent again (`outbox-relay replay`, `reconcile --repair`):
    /// it may arrive after later messages of its key. Its id is the original's, so the
    /// dedup table already absorbs it when it was processed before.
    pub fn is_replay(&self) -> bool {
        self.headers
            .get(outbox::wire::HEADER_REPLAY)
            .is_some_and(|v| v == "true")
    }

    /// The W3C `traceparent` header, if the producer set one.
    pub fn traceparent(&self) -> Option<&str> {
        self.headers.get("traceparent").map(String::as_str)
    }
}
