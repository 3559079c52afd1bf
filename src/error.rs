//! Errors of the producer library.

/// A message that the outbox would not accept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// A required text field is empty.
    #[error("message {field} is empty")]
    Empty {
        /// Which field.
        field: &'static str,
    },
    /// A text field is longer than its limit.
    #[error("message {field} is {len} bytes, longer than the limit of {max}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A field contains a control character (or, in a header name, a colon).
    #[error("message {field} contains a control character")]
    ControlCharacter {
        /// Which field.
        field: &'static str,
    },
    /// A header name is empty or too long.
    #[error("header name {name:?} must be 1 to {max} bytes")]
    HeaderName {
        /// The offending name.
        name: String,
        /// The limit in bytes.
        max: usize,
    },
    /// A header name uses the prefix the relay reserves for its own headers.
    #[error("header name {name:?} uses the reserved prefix \"outbox-\"")]
    ReservedHeader {
        /// The offending name.
        name: String,
    },
    /// A header value is longer than its limit.
    #[error("header {name:?} is {len} bytes, longer than the limit of {max}")]
    HeaderValueTooLong {
        /// The header's name.
        name: String,
        /// The value's length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// More headers than a message may carry.
    #[error("a message may carry at most {max} headers")]
    TooManyHeaders {
        /// The limit.
        max: usize,
    },
    /// The JSON convenience could not serialise the payload.
    #[error("payload could not be serialised as JSON")]
    Json(#[source] serde_json::Error),
}

/// A PostgreSQL schema name that is not a plain identifier.
#[derive(Debug, thiserror::Error)]
#[error(
    "schema name {0:?} is not a valid identifier: use 1 to 63 lowercase ASCII letters, digits \
     and underscores, starting with a letter or underscore"
)]
pub struct InvalidSchema(pub String);

/// An error from writing to or migrating the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A message with this id is already in the outbox.
    #[error("a message with id {0} is already in the outbox")]
    DuplicateId(uuid::Uuid),
    /// The database refused or failed the operation.
    #[error("outbox database operation failed")]
    Database(#[from] sqlx::Error),
    /// The database holds a newer schema version than this library knows.
    #[error(
        "the outbox schema {schema:?} is at version {found}, newer than the {known} this \
         library knows; upgrade the library"
    )]
    SchemaTooNew {
        /// The schema name.
        schema: String,
        /// The version found in the database.
        found: i32,
        /// The newest version this library ships.
        known: i32,
    },
    /// An applied migration differs from the one this library ships.
    #[error("outbox migration {version} ({name}) was applied with different contents")]
    MigrationChanged {
        /// The migration's version.
        version: i32,
        /// The migration's file name.
        name: &'static str,
    },
}
