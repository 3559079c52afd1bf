//! What a failed publish comes to: a failed attempt to record (retried later or dead, by the
//! retry policy), or nothing to record (the broker was unavailable, the row is let go).

use std::time::Duration;

use crate::{
    envelope::Envelope,
    publish::PublishError,
    retry::{Next, RetryPolicy},
    store::{Failure, Malformed},
};

/// What a failed publish comes to.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A failed attempt to record.
    Failed(Failure),
    /// Nothing to record: the row is let go untouched (the broker was unavailable).
    Released(PublishError),
}

/// What a failed publish of `env` comes to: a failure to record (retried later or dead,
/// by the retry policy), or nothing to record (the broker was unavailable).
pub(crate) fn judge(policy: &RetryPolicy, env: &Envelope, error: &PublishError) -> Verdict {
    match error {
        PublishError::Rejected(error) => {
            let failures = env.attempts + 1;
            let retry_after = match policy.next(failures, &mut rand::rng()) {
                Next::RetryAfter(d) => Some(d),
                Next::Dead => None,
            };
            crate::metrics::failed(&env.topic, "rejected");
            match retry_after {
                Some(_) => crate::metrics::retried(&env.topic),
                None => crate::metrics::dead(&env.topic),
            }
            log_failure(env, failures, error, retry_after);
            Verdict::Failed(Failure {
                seq: env.seq,
                error: error.clone(),
                retry_after,
            })
        }
        e @ (PublishError::Permanent(error) | PublishError::TooLarge(error)) => {
            let reason = match e {
                PublishError::TooLarge(_) => "too_large",
                _ => "permanent",
            };
            crate::metrics::failed(&env.topic, reason);
            crate::metrics::dead(&env.topic);
            log_failure(env, env.attempts + 1, error, None);
            Verdict::Failed(Failure {
                seq: env.seq,
                error: error.clone(),
                retry_after: None,
            })
        }
        e @ (PublishError::Unavailable(_)
        | PublishError::Disconnected(_)
        | PublishError::Fatal(_)) => {
            crate::metrics::failed(&env.topic, "unavailable");
            Verdict::Released(e.clone())
        }
    }
}

/// The dead-letter record of a row that cannot be read (or whose payload is over
/// `relay.max_payload`).
pub(crate) fn malformed(m: &Malformed) -> Failure {
    crate::metrics::dead(&m.topic);
    let error = if let Some(reason) = m.error.strip_prefix(crate::store::TOO_LARGE) {
        crate::metrics::failed(&m.topic, "too_large");
        tracing::error!(seq = m.seq, topic = %m.topic, error = %reason, "outbox row too large; parking it as dead");
        format!("too large: {reason}")
    } else {
        crate::metrics::failed(&m.topic, "malformed");
        tracing::error!(seq = m.seq, topic = %m.topic, error = %m.error, "malformed outbox row; parking it as dead");
        format!("malformed row: {}", m.error)
    };
    Failure {
        seq: m.seq,
        error,
        retry_after: None,
    }
}

fn log_failure(env: &Envelope, failures: u32, error: &str, retry_after: Option<Duration>) {
    match retry_after {
        Some(d) => tracing::warn!(
            seq = env.seq, message_id = %env.id, topic = %env.topic, key = ?env.key,
            attempts = failures, retry_in = ?d, error = %error, "publish failed; will retry"
        ),
        None => tracing::error!(
            seq = env.seq, message_id = %env.id, topic = %env.topic, key = ?env.key,
            attempts = failures, error = %error, "publish failed; message is dead"
        ),
    }
}
