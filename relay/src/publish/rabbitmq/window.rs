//! Confirm windows: many unconfirmed messages per channel, each return matched to its
//! message by `message-id`.
//!
//! A few channel workers share one queue of messages to publish. A worker that is free takes
//! what is queued (up to `rabbitmq.channel_window` messages), publishes all of it on its
//! channel, and waits for all of their confirms before it takes more: a **window**. Under
//! light load a window holds one message and a publish goes out at once; under load the
//! windows fill and the broker acknowledges them with few `basic.ack ... multiple` frames.
//!
//! Why a window is closed before it is judged: RabbitMQ sends a `basic.return` (unroutable
//! with `mandatory`) before the `basic.ack` of the same message, but the return names no
//! delivery tag, and when one ack covers several messages lapin hands the waiting return to
//! any one of them. So a message's own confirm cannot say whether it was returned. Once every
//! confirm of the window is in, every return of the window has arrived (it precedes its ack)
//! and was handed to a confirm of the same window (nothing else was in flight on the
//! channel); the returns then name their messages by `message-id`, which is the outbox id.
//! A message is confirmed only if it was acked and no return of its window names it.
//!
//! If a message of a window loses its confirm (the channel or the connection closed under
//! it), an acknowledgement of a later message of the window is not taken for a delivery
//! either: lapin may have handed that message's return to the lost confirm. It is published
//! again under the relay's suspect rule, a duplicate at worst.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::future::join_all;
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    protocol::AMQPErrorKind,
    publisher_confirm::Confirmation,
    BasicProperties, Channel, Connection,
};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::super::PublishError;

/// One message on its way to a channel worker.
pub(super) struct Job {
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
    /// Carries the outbox id as `message-id`: what a return is matched by.
    pub properties: BasicProperties,
    pub reply: oneshot::Sender<Result<(), PublishError>>,
}

/// What the workers need of their publisher.
pub(super) struct Shared {
    pub connection: Arc<Connection>,
    pub shown_url: String,
    pub confirm_timeout: Duration,
    pub window: usize,
    /// Called when the connection is no longer usable (the next `ready` reconnects).
    pub reset: Box<dyn Fn() + Send + Sync>,
    /// Called when a window finds the broker blocking the connection (`true`) and when it
    /// no longer does (`false`).
    pub blocked: Box<dyn Fn(bool) + Send + Sync>,
    /// The longest a channel close waits for the broker's answer.
    pub close_wait: Duration,
}

/// Starts `channels` workers on one connection, fed by the queue whose sender is returned.
/// They stop once the sender is dropped and what was queued is answered.
pub(super) fn start(shared: Shared, channels: usize) -> mpsc::UnboundedSender<Job> {
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = Arc::new(Mutex::new(rx));
    let shared = Arc::new(shared);
    for _ in 0..channels {
        tokio::spawn(worker(shared.clone(), rx.clone()));
    }
    tx
}

async fn worker(shared: Arc<Shared>, rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) {
    let mut channel: Option<Channel> = None;
    loop {
        let jobs = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                break;
            };
            let mut jobs = vec![first];
            while jobs.len() < shared.window {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            jobs
        };
        // A caller that gave up (the shutdown grace period ran out) left its row pending:
        // sending it now would only make a duplicate.
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if jobs.is_empty() {
            continue;
        }
        let open = match channel.take().filter(|c| c.status().connected()) {
            Some(c) => Ok(c),
            None => open_channel(&shared).await,
        };
        let outcomes = match &open {
            Ok(c) => publish_window(&shared, c, &jobs).await,
            Err(e) => jobs.iter().map(|_| Err(e.clone())).collect(),
        };
        channel = open.ok().filter(|c| c.status().connected());
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            // The caller may have given up (shutdown's grace period): the row stays pending.
            let _ = job.reply.send(outcome);
        }
    }
    if let Some(c) = channel {
        // A broker that stopped answering never sends Close-Ok.
        let closing = c.close(200, "outbox-relay: connection replaced or closing");
        let _ = tokio::time::timeout(shared.close_wait, closing).await;
    }
}

/// Opens a confirm-mode channel. Every wait on the connection is bounded by
/// `confirm_timeout` (while the broker does not block the connection), so that a connection closing under a request (whose reply then never
/// comes) cannot hold a window, and the relay behind it, forever.
async fn open_channel(shared: &Shared) -> Result<Channel, PublishError> {
    let channel = bounded(shared, "open a channel", shared.connection.create_channel()).await?;
    bounded(
        shared,
        "enable confirms",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// `op` within `confirm_timeout`; a failure or no answer drops the connection.
async fn bounded<T>(
    shared: &Shared,
    what: &str,
    op: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, PublishError> {
    let why = match within_confirm_timeout(shared, op).await {
        Some(Ok(v)) => return Ok(v),
        Some(Err(e)) => e.to_string(),
        None => format!(
            "no answer within {}",
            humantime::format_duration(shared.confirm_timeout)
        ),
    };
    (shared.reset)();
    Err(PublishError::Unavailable(format!(
        "cannot {what} on RabbitMQ at {}: {why}",
        shared.shown_url
    )))
}

/// Publishes `jobs` on `channel`, waits for every confirm, and says what became of each.
async fn publish_window(
    shared: &Shared,
    channel: &Channel,
    jobs: &[Job],
) -> Vec<Result<(), PublishError>> {
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    // One deadline for the window: handing the frames over (a publish whose connection
    // closed under it may never hear back) and every confirm. The publishes are polled in
    // order, so the delivery tags follow `jobs`; all frames are queued at once.
    let window = async {
        let sent = join_all(jobs.iter().map(|job| {
            channel.basic_publish(
                &job.exchange,
                &job.routing_key,
                options,
                &job.payload,
                job.properties.clone(),
            )
        }))
        .await;
        join_all(sent.into_iter().map(|sent| async move { sent?.await })).await
    };
    let Some(confirms) = within_confirm_timeout(shared, window).await else {
        (shared.reset)();
        let e = PublishError::Unavailable(format!(
            "no confirm from RabbitMQ within {}",
            humantime::format_duration(shared.confirm_timeout)
        ));
        return jobs.iter().map(|_| Err(e.clone())).collect();
    };

    let came: Vec<Came> = confirms.into_iter().map(Came::from).collect();
    let ids: Vec<Option<&str>> = jobs
        .iter()
        .map(|j| j.properties.message_id().as_ref().map(|id| id.as_str()))
        .collect();
    let in_flight = jobs.len();
    jobs.iter()
        .zip(judge(&ids, came))
        .map(|(job, verdict)| {
            let route = || {
                format!(
                    "(exchange {:?}, routing key {:?})",
                    job.exchange, job.routing_key
                )
            };
            match verdict {
                Verdict::Delivered => Ok(()),
                Verdict::Returned(why) => Err(PublishError::Rejected(format!(
                    "returned as unroutable: {why} {}",
                    route()
                ))),
                Verdict::Nacked => Err(PublishError::Rejected(format!(
                    "negatively acknowledged (basic.nack) by RabbitMQ {}",
                    route()
                ))),
                Verdict::Failed(e) => Err(classify(shared, e, &job.exchange, in_flight)),
                Verdict::Unsure => Err(PublishError::Disconnected(format!(
                    "acknowledged by RabbitMQ, but an earlier message of its window lost its \
                     confirm, which may have carried this one's return {}",
                    route()
                ))),
                Verdict::NotRequested => {
                    (shared.reset)();
                    Err(PublishError::Unavailable(
                        "channel was not in confirm mode".into(),
                    ))
                }
            }
        })
        .collect()
}

/// How often a window waiting for its confirms looks whether the broker blocked the
/// connection.
const BLOCKED_CHECK: Duration = Duration::from_millis(250);

/// Awaits `window` until `confirm_timeout` has passed **without the broker blocking the
/// connection**; `None` once it has. RabbitMQ answers a memory or disk alarm with
/// `connection.blocked` and holds every publishing connection (lapin then writes nothing)
/// until the alarm clears: an outage, not a lost confirm. Resetting the connection would
/// only publish what is in flight again and again, so the wait goes on for as long as the
/// broker says it is blocked, and the clock starts again once it unblocks.
async fn within_confirm_timeout<T>(
    shared: &Shared,
    window: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut window = std::pin::pin!(window);
    let mut since = tokio::time::Instant::now();
    let mut was_blocked = false;
    loop {
        let step =
            (since + shared.confirm_timeout).min(tokio::time::Instant::now() + BLOCKED_CHECK);
        if let Ok(done) = tokio::time::timeout_at(step, &mut window).await {
            if was_blocked {
                (shared.blocked)(false);
            }
            return Some(done);
        }
        let now = tokio::time::Instant::now();
        if shared.connection.status().blocked() {
            if !was_blocked {
                was_blocked = true;
                (shared.blocked)(true);
            }
            since = now;
        } else if was_blocked {
            was_blocked = false;
            (shared.blocked)(false);
            since = now;
        } else if now >= since + shared.confirm_timeout {
            return None;
        }
    }
}

/// How one message of a window came back from lapin.
enum Came {
    Acked(Option<Returned>),
    Nacked(Option<Returned>),
    NotRequested,
    Failed(lapin::Error),
}

/// A `basic.return` that lapin handed to a confirm: the `message-id` it carries (not
/// necessarily that confirm's message) and why.
struct Returned {
    message_id: Option<String>,
    why: String,
}

impl From<Result<Confirmation, lapin::Error>> for Came {
    fn from(confirm: Result<Confirmation, lapin::Error>) -> Self {
        let carried = |r: Option<Box<lapin::message::BasicReturnMessage>>| {
            r.map(|r| Returned {
                message_id: r.properties.message_id().as_ref().map(|id| id.to_string()),
                why: format!("{} {}", r.reply_code, r.reply_text),
            })
        };
        match confirm {
            Ok(Confirmation::Ack(r)) => Came::Acked(carried(r)),
            Ok(Confirmation::Nack(r)) => Came::Nacked(carried(r)),
            Ok(Confirmation::NotRequested) => Came::NotRequested,
            Err(e) => Came::Failed(e),
        }
    }
}

/// What became of one message of a window.
#[derive(Debug)]
enum Verdict {
    Delivered,
    Returned(String),
    Nacked,
    Failed(lapin::Error),
    /// Acknowledged after an earlier message of the window lost its confirm (the channel or
    /// connection closed under it): lapin hands a waiting return to whichever confirm it
    /// completes next, so this message's return may have gone to that lost confirm.
    Unsure,
    NotRequested,
}

/// Judges a whole window: `ids` are its messages' ids in publish order, `came` how each came
/// back. Every confirm of the window is in, so every return of the window has arrived and
/// was handed to one of them; a message acknowledged is delivered unless a return names it,
/// or an earlier message lost its confirm (whose return-carrying it cannot be checked).
fn judge(ids: &[Option<&str>], came: Vec<Came>) -> Vec<Verdict> {
    let mut returned: HashMap<String, String> = HashMap::new();
    for c in &came {
        if let Came::Acked(Some(r)) | Came::Nacked(Some(r)) = c {
            match &r.message_id {
                Some(id) => {
                    returned.insert(id.clone(), r.why.clone());
                }
                None => tracing::warn!(
                    reason = r.why,
                    "RabbitMQ returned a message without a message-id; ignoring it"
                ),
            }
        }
    }
    let mut lost_before = false;
    ids.iter()
        .zip(came)
        .map(|(id, c)| match c {
            Came::Failed(e) => {
                lost_before = true;
                Verdict::Failed(e)
            }
            Came::Acked(_) => match id.and_then(|id| returned.get(id)) {
                Some(why) => Verdict::Returned(why.clone()),
                None if lost_before => Verdict::Unsure,
                None => Verdict::Delivered,
            },
            Came::Nacked(_) => Verdict::Nacked,
            Came::NotRequested => Verdict::NotRequested,
        })
        .collect()
}

/// A channel-level refusal (unknown exchange, access refused, oversize message) closes
/// only the channel. With one message in flight it is that message's own problem; with
/// several, any one of them may be at fault, so each is published again alone (the relay's
/// suspect rule) before one is charged. Anything else is the connection's.
fn classify(shared: &Shared, e: lapin::Error, exchange: &str, in_flight: usize) -> PublishError {
    match &e {
        lapin::Error::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) => {
            if in_flight == 1 {
                PublishError::Rejected(format!(
                    "RabbitMQ closed the channel: {amqp} (exchange {exchange:?})"
                ))
            } else {
                PublishError::Disconnected(format!(
                    "RabbitMQ closed the channel with {in_flight} messages in flight: {amqp}; \
                     each is published again alone to find the one at fault"
                ))
            }
        }
        // The channel was closed under this message (by a close of the window's channel
        // that reached it first) while the connection stays up: not the connection's fault.
        lapin::Error::InvalidChannelState(_) if shared.connection.status().connected() => {
            PublishError::Disconnected(format!(
                "RabbitMQ closed the channel with {in_flight} messages in flight: {e}"
            ))
        }
        // The whole connection went while this message was in flight: maybe its fault
        // (a frame the broker refused), maybe not; the relay's suspect rule decides.
        _ => {
            (shared.reset)();
            PublishError::Disconnected(format!("RabbitMQ at {}: {e}", shared.shown_url))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn returned(id: &str) -> Option<Returned> {
        Some(Returned {
            message_id: Some(id.into()),
            why: "312 NO_ROUTE".into(),
        })
    }

    fn lost() -> Came {
        Came::Failed(lapin::Error::InvalidChannelState(
            lapin::ChannelState::Closed,
        ))
    }

    #[test]
    fn a_return_counts_against_the_message_it_names_whichever_confirm_carried_it() {
        // One ack for both: lapin gave "b"'s return to "a"'s confirm.
        let v = judge(
            &[Some("a"), Some("b"), Some("c")],
            vec![
                Came::Acked(returned("b")),
                Came::Acked(None),
                Came::Acked(None),
            ],
        );
        assert!(matches!(v[0], Verdict::Delivered), "{v:?}");
        assert!(
            matches!(&v[1], Verdict::Returned(why) if why == "312 NO_ROUTE"),
            "{v:?}"
        );
        assert!(matches!(v[2], Verdict::Delivered), "{v:?}");
    }

    #[test]
    fn an_ack_after_a_lost_confirm_is_not_taken_for_a_delivery() {
        // "b"'s confirm never came (the channel closed); "c" was acknowledged, but its return
        // may have been handed to "b"'s lost confirm. "a", before the loss, is delivered.
        let v = judge(
            &[Some("a"), Some("b"), Some("c"), Some("d")],
            vec![
                Came::Acked(None),
                lost(),
                Came::Acked(None),
                Came::Nacked(None),
            ],
        );
        assert!(matches!(v[0], Verdict::Delivered), "{v:?}");
        assert!(matches!(v[1], Verdict::Failed(_)), "{v:?}");
        assert!(matches!(v[2], Verdict::Unsure), "{v:?}");
        assert!(matches!(v[3], Verdict::Nacked), "{v:?}");
    }
}
