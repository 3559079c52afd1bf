//! The PostgreSQL schema that holds the outbox tables.

use std::fmt;

use crate::error::InvalidSchema;

/// A validated PostgreSQL schema name: 1 to 63 lowercase ASCII letters, digits and
/// underscores, starting with a letter or underscore. Being a plain identifier, it can be
/// placed in SQL text unquoted and means the same thing to every tool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Schema(String);

impl Schema {
    /// The default schema, `outbox`.
    pub const DEFAULT: &'static str = "outbox";

    /// Validates `name` as a schema name.
    pub fn parse(name: impl Into<String>) -> Result<Self, InvalidSchema> {
        let name = name.into();
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if first_ok && rest_ok && name.len() <= 63 && !name.starts_with("pg_") {
            Ok(Self(name))
        } else {
            Err(InvalidSchema(name))
        }
    }

    /// The name as written in SQL.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The LISTEN/NOTIFY channel on which inserts into this schema's outbox wake relays.
    pub fn wakeup_channel(&self) -> String {
        format!("outbox_wakeup_{}", self.0)
    }
}

impl Default for Schema {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Schema {
    type Err = InvalidSchema;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        for ok in ["outbox", "_x", "orders_outbox_2", &"a".repeat(63)] {
            assert!(Schema::parse(ok).is_ok(), "{ok} should be accepted");
        }
    }

    #[test]
    fn rejects_anything_that_would_need_quoting() {
        for bad in [
            "",
            "Outbox",
            "1abc",
            "a-b",
            "a b",
            "a;drop",
            "pg_catalog",
            &"a".repeat(64),
            "é",
        ] {
            let err = Schema::parse(bad).unwrap_err();
            assert!(
                err.to_string().contains("not a valid identifier"),
                "{bad}: {err}"
            );
        }
    }
}
