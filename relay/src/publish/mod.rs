//! Publishers: one folder per broker behind the [`Publisher`] trait. A publisher knows
//! nothing of PostgreSQL; it is handed an [`Envelope`] and says whether the broker confirmed
//! it.

use futures::future::BoxFuture;

use crate::envelope::Envelope;

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;

/// Kafka's settings only: this build has no Kafka publisher (cargo feature `kafka`), but
/// the configuration still reads the `[kafka]` section.
#[cfg(not(feature = "kafka"))]
pub mod kafka {
    mod settings;
    pub use settings::{
        check_kafka_property, is_secret_kafka_property, KafkaRouteSettings, KafkaSettings,
    };
}

/// RabbitMQ's settings only: this build has no RabbitMQ publisher (cargo feature
/// `rabbitmq`), but the configuration still reads the `[rabbitmq]` section.
#[cfg(not(feature = "rabbitmq"))]
pub mod rabbitmq {
    mod settings;
    pub use settings::{AmqpTlsSettings, RabbitMqSettings, RouteSettings};
}

/// Why a publish did not end in a broker confirm.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// The broker refused this message (NACK, unroutable, too large…). It counts as a
    /// failed attempt and is retried with backoff, then dead.
    #[error("rejected by the broker: {0}")]
    Rejected(String),
    /// The message can never be published as it is; it is dead at once.
    #[error("cannot be published: {0}")]
    Permanent(String),
    /// The message breaks the broker's protocol limits (too large for a frame or for the
    /// broker, a name longer than the protocol allows). It was not sent, so the connection
    /// was never at risk; it is dead at once.
    #[error("cannot be sent: {0}")]
    TooLarge(String),
    /// The connection closed while this message was in flight, or (Kafka) the broker
    /// refused the request that carried it and others and the producer failed over it.
    /// Some brokers answer a message they cannot take by closing the whole connection, so
    /// this may be the message's fault or not; the relay tells them apart by publishing
    /// such messages alone (see the relay's suspect rule).
    #[error("connection lost while publishing: {0}")]
    Disconnected(String),
    /// The broker could not be reached or the connection failed: not this message's fault.
    /// The message is released without counting an attempt and the relay backs off.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused the relay itself (wrong credentials, no permission): retrying
    /// cannot help, so the relay stops with this message.
    #[error("{0}")]
    Fatal(String),
}

/// The wait for a broker's confirm of a message already handed over.
pub type Confirm = BoxFuture<'static, Result<(), PublishError>>;

/// Sends envelopes to a broker and waits for its confirm.
pub trait Publisher: Send + Sync + 'static {
    /// Connects (or reconnects after a failure). Called before each read of the outbox;
    /// cheap when the connection is up. A [`PublishError::Unavailable`] here means no rows
    /// are read until the broker is back.
    fn ready(&self) -> BoxFuture<'_, Result<(), PublishError>>;

    /// Publishes one message and resolves once the broker confirmed it (or did not).
    /// Many calls are in flight at once (one per key with a message waiting); unless the
    /// publisher has a [`Publisher::key_depth`] above 1, the relay never starts a message of
    /// a key before the previous message of that key is confirmed.
    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), PublishError>>;

    /// How many messages of one key may be at the broker at once. 1 (the default) unless the
    /// publisher keeps a key's order itself: its [`Publisher::send`] hands each message to
    /// the broker's client before it returns, in call order, and a message cannot be
    /// written after an earlier one of its key and topic failed (Kafka's idempotent
    /// producer with the gapless guarantee and no message timeout). The relay pipelines a
    /// key's messages only while they share a topic.
    fn key_depth(&self) -> u32 {
        1
    }

    /// For a publisher with a [`Publisher::key_depth`] above 1: hands `envelope` to the
    /// broker's client now and returns the wait for its confirm, or why it could not be
    /// handed over.
    fn send(&self, envelope: &Envelope) -> Result<Confirm, PublishError> {
        let _ = envelope;
        Err(PublishError::Fatal(
            "this publisher does not pipeline a key's messages".into(),
        ))
    }

    /// For a publisher with a [`Publisher::key_depth`] above 1: which client it hands
    /// messages to now. It changes when that client is replaced (Kafka: a new producer after
    /// a fatal error), which lets go of everything the old one held: those messages come
    /// back failed, and a key's later message must not reach the new client before they do.
    fn generation(&self) -> u64 {
        0
    }

    /// [`Publisher::send`], refused as unavailable unless the publisher still hands over to
    /// `generation` (see [`Publisher::generation`]): the relay passes the generation its
    /// messages still out went to, so that none of their keys' later messages goes to a
    /// replacement client while they may still come back failed.
    fn send_to(&self, envelope: &Envelope, generation: u64) -> Result<Confirm, PublishError> {
        let _ = generation;
        self.send(envelope)
    }

    /// The relay is shutting down and starts nothing new: messages handed to the broker's
    /// client but not yet sent may be let go (they fail as unavailable and stay pending),
    /// so that shutdown waits only for what is at the broker. A no-op by default.
    fn stop_sending(&self) {}

    /// `Ok` while the broker connection is up (for the readiness probe and the
    /// `outbox_broker_up` gauge); otherwise why not.
    fn health(&self) -> BoxFuture<'_, Result<(), String>>;

    /// Closes the connection cleanly; called once, after the last publish.
    fn close(&self) -> BoxFuture<'_, ()>;
}
