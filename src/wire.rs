//! The message format on the wire: the header names the relay sets on every message, on
//! RabbitMQ and on Kafka alike, and that a consumer in any language reads. Defined once here,
//! for the relay that writes them and the consumer library that reads them.
//!
//! Every name starting with [`RESERVED_HEADER_PREFIX`](crate::RESERVED_HEADER_PREFIX) is the
//! relay's: [`Message`](crate::Message) refuses such user headers, and the relay drops any that
//! a plain-SQL writer put in a row (see [`is_reserved`]), so a message carries exactly one of
//! each and a consumer never deduplicates on a forged id.

/// The message id (also RabbitMQ's `message-id` property); deduplicate on it.
pub const HEADER_ID: &str = "outbox-id";
/// The outbox topic the producer wrote.
pub const HEADER_TOPIC: &str = "outbox-topic";
/// The ordering key, when the message has one.
pub const HEADER_KEY: &str = "outbox-key";
/// The outbox `seq`, as a decimal string: per-key order follows it.
pub const HEADER_SEQ: &str = "outbox-seq";
/// Present, with the value `true`, on a message sent again by `outbox-relay replay`: it may
/// arrive after later messages of its key, and its `outbox-topic` is the topic it was first
/// written with even when the replay went elsewhere.
pub const HEADER_REPLAY: &str = "outbox-replay";
/// The payload's MIME type, on Kafka (RabbitMQ carries it as the `content-type` property).
pub const HEADER_CONTENT_TYPE: &str = "content-type";

/// True for a header name that only the relay may set: one that starts, in any case, with
/// [`RESERVED_HEADER_PREFIX`](crate::RESERVED_HEADER_PREFIX).
pub fn is_reserved(name: &str) -> bool {
    let prefix = crate::RESERVED_HEADER_PREFIX;
    name.len() >= prefix.len()
        && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names_are_recognised_in_any_case() {
        for name in [
            HEADER_ID,
            HEADER_TOPIC,
            HEADER_KEY,
            HEADER_SEQ,
            HEADER_REPLAY,
            "Outbox-Id",
            "OUTBOX-x",
        ] {
            assert!(is_reserved(name), "{name} is reserved");
        }
        for name in [
            "traceparent",
            "outbox",
            "outboxid",
            "x-outbox-id",
            "",
            HEADER_CONTENT_TYPE,
        ] {
            assert!(!is_reserved(name), "{name} is not reserved");
        }
    }
}
