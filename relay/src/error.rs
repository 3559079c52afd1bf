//! Why a relay stops, and how its errors are written on one line.

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The broker refused the relay itself (credentials, permissions).
    #[error("{0}")]
    Fatal(String),
    /// PostgreSQL failed where retrying is over (the relay's loops retry it first).
    #[error("PostgreSQL error while relaying")]
    Database(#[from] sqlx::Error),
    /// A relay task panicked: a bug. The relay stops (its partitions go to the others)
    /// and the process exits non-zero, so that it is restarted and the bug is seen.
    #[error("a relay task panicked: {0}")]
    Panicked(String),
}

/// What a panicked task said, if it said it with a string.
pub(crate) fn panic_message(join: tokio::task::JoinError) -> String {
    if !join.is_panic() {
        return join.to_string();
    }
    let payload = join.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// An error and its sources on one line; a source whose text the line already holds (many
/// errors repeat their source's message in their own) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("invalid peer certificate: UnknownIssuer")]
        struct Verdict;
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Repeats(#[source] Verdict);
        #[derive(Debug, thiserror::Error)]
        #[error("TLS handshake failed")]
        struct Context(#[source] Repeats);
        assert_eq!(
            error_chain(&Repeats(Verdict)),
            "invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(
            error_chain(&Context(Repeats(Verdict))),
            "TLS handshake failed: invalid peer certificate: UnknownIssuer"
        );
    }
}
