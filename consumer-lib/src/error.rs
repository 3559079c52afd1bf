//! Errors of the consumer library.

/// What a handler reports when it could not handle a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Might work later (a lock timeout, a service briefly down): roll back, try again
    /// after a backoff, dead-letter after `max_attempts`.
    #[error("retryable: {0}")]
    Retryable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Will never work (invalid payload, unknown type): roll back and dead-letter now.
    #[error("permanent: {0}")]
    Permanent(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl HandlerError {
    /// A retryable failure with a message.
    pub fn retryable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Retryable(e.into())
    }

    /// A permanent failure with a message.
    pub fn permanent(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Permanent(e.into())
    }
}

/// An error of the library itself (not of a handler).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// PostgreSQL failed; nothing was acknowledged, the message will come again.
    #[error("consumer database operation failed")]
    Database(#[from] sqlx::Error),
    /// Applying the consumer schema failed.
    #[error("consumer schema migration failed")]
    Migrate(#[from] outbox::Error),
    /// The consumer group name is empty or too long.
    #[error("consumer group {0:?} must be 1 to 255 bytes")]
    InvalidGroup(String),
    /// The broker failed.
    #[error("broker error: {0}")]
    Broker(String),
    /// An action that changes dead letters named none of them.
    #[error(
        "name the dead letters (letter or message id, group, source, key, time) or ask for all of them explicitly"
    )]
    NoSelection,
    /// A discard without a reason.
    #[error("discarding dead letters needs a reason")]
    MissingReason,
}

/// `e` and its sources, joined by `: `.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
