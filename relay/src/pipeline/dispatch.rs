//! The dispatch stage: hands the lanes' messages to the publisher and takes their outcomes
//! back, under the suspect rule (see [`crate::suspects`]).
//!
//! - **One at a time per key** (RabbitMQ): a key's next message starts once the broker
//!   confirmed its previous one; every key with a message waiting is in flight at once.
//! - **Pipelined** (Kafka, whose producer keeps a key's order itself): a key's messages are
//!   handed over without waiting, in rounds (see [`ROUND_WAIT`]), all to the same client
//!   (see [`crate::publish::Publisher::send_to`]).
//! - **Suspects** (pipelined): a suspect taken from its lane waits until nothing else is out
//!   relay-wide, then goes alone, and nothing else starts while it is out.

use std::time::Duration;

use futures::stream::FuturesUnordered;
use tokio::time::Instant;

use super::{
    context::Context,
    lanes::{LaneId, Lanes},
    Boxed,
};
use crate::{envelope::Envelope, publish::PublishError};

/// With a publisher that pipelines a key's messages (Kafka), messages are handed over in
/// rounds: the next round once every message of the last one is confirmed, or once the last
/// round has been out this long (so a partition that stops answering holds up the others
/// by at most this much per round). librdkafka's idempotent producer keeps one produce
/// request in flight per partition, and while it waits its broker thread spins on the
/// messages queued behind that request; held here instead, they cost no CPU, and they go
/// out in the next request all the same.
pub(super) const ROUND_WAIT: Duration = Duration::from_millis(500);

/// The longest a suspect waits to go alone (for everything out to come back) with nothing
/// else starting; after it, it goes with the rest (costing no attempt if refused again), so
/// a partition that does not answer does not hold the whole worker.
pub(super) const SUSPECT_WAIT: Duration = Duration::from_secs(5);

/// A message back from the publisher: confirmed (after how long), or why not.
pub(super) type Outcome = (Envelope, Result<Duration, PublishError>);

/// The messages at the broker, and what decides which may go next.
pub(super) struct Dispatch<'a> {
    pipelined: bool,
    /// The messages at the broker, each with its outcome to come.
    pub(super) out: FuturesUnordered<Boxed<'a, Outcome>>,
    /// Pipelined: when the next round may start though the last is not all confirmed.
    next_round_at: Option<Instant>,
    /// Pipelined: a suspect taken from its lane, waiting (since when) to go alone.
    waiting_suspect: Option<(Envelope, Instant)>,
    /// Pipelined: the client everything out now went to (see `Publisher::generation`).
    handed_to: u64,
    /// Pipelined: the suspect out alone.
    alone: Option<i64>,
    /// Whether this worker counts in [`crate::suspects::SharedAlone`]'s waiting suspects.
    told_waiting: bool,
}

impl<'a> Dispatch<'a> {
    pub(super) fn new(ctx: Context<'a>) -> Self {
        Self {
            pipelined: ctx.pipelined(),
            out: FuturesUnordered::new(),
            next_round_at: None,
            waiting_suspect: None,
            handed_to: ctx.publisher.generation(),
            alone: None,
            told_waiting: false,
        }
    }

    pub(super) fn pipelined(&self) -> bool {
        self.pipelined
    }

    /// Nothing is at the broker.
    pub(super) fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Starts what may start now (nothing unless `may_start`): the lanes' next messages, and
    /// a waiting suspect once it may go. Returns the broker trouble met handing over, if
    /// any: nothing more starts until what is out has come back.
    pub(super) fn start(
        &mut self,
        ctx: Context<'a>,
        lanes: &mut Lanes,
        may_start: bool,
        now: Instant,
    ) -> Option<String> {
        // A message goes only to the client everything out went to; once nothing is out,
        // to whichever is current.
        if self.pipelined && self.out.is_empty() {
            self.handed_to = ctx.publisher.generation();
        }
        if !may_start {
            return None;
        }
        let round_due =
            !self.pipelined || self.out.is_empty() || self.next_round_at.is_none_or(|t| t <= now);
        // Another worker's suspect waits to go alone, or is out alone (relay-wide with a
        // pipelining publisher: the workers share its requests).
        let others_alone = self.pipelined && !ctx.shared_alone.may_start();
        let mut trouble = None;
        if round_due && self.waiting_suspect.is_none() && self.alone.is_none() && !others_alone {
            trouble = self.start_lanes(ctx, lanes, now);
        }
        if self.alone.is_none() {
            self.start_suspect(ctx, lanes, now);
        }
        trouble
    }

    /// Every lane whose previous message is confirmed, or (pipelined) every queued message,
    /// in order, until a suspect comes up.
    fn start_lanes(&mut self, ctx: Context<'a>, lanes: &mut Lanes, now: Instant) -> Option<String> {
        while let Some(env) = lanes.next() {
            if !self.pipelined {
                let (publisher, suspects) = (ctx.publisher, ctx.suspects);
                self.out.push(Box::pin(async move {
                    let result = suspects.publish_one(publisher, &env).await;
                    (env, result)
                }));
                continue;
            }
            if ctx.suspects.is_suspect(env.seq) {
                // It goes alone, once everything out now has come back.
                self.waiting_suspect = Some((env, now));
                break;
            }
            self.next_round_at = Some(now + ROUND_WAIT);
            match self.hand_over(ctx, lanes, env) {
                Some(e @ (PublishError::Unavailable(_) | PublishError::Disconnected(_))) => {
                    // The producer may just have been replaced: what the old one held is
                    // lost and will be read again, so nothing more is handed over (a key's
                    // later message would overtake its earlier ones) until all of it has
                    // come back.
                    return Some(e.to_string());
                }
                Some(PublishError::Fatal(_)) => break,
                _ => {}
            }
        }
        None
    }

    /// The waiting suspect goes alone once nothing is out relay-wide, or with the rest once
    /// it has waited [`SUSPECT_WAIT`].
    fn start_suspect(&mut self, ctx: Context<'a>, lanes: &mut Lanes, now: Instant) {
        let Some((env, since)) = self.waiting_suspect.take() else {
            return;
        };
        let worker = ctx.worker;
        if self.out.is_empty() && ctx.shared_alone.go_alone() {
            tracing::info!(worker, seq = env.seq, message_id = %env.id, "publishing a suspect message alone");
            self.alone = Some(env.seq);
            self.hand_over(ctx, lanes, env);
        } else if now >= since + SUSPECT_WAIT {
            tracing::warn!(worker, seq = env.seq, message_id = %env.id, in_flight = self.out.len(),
                "a suspect message waited too long to go alone; publishing it with the others");
            self.hand_over(ctx, lanes, env);
        } else {
            self.waiting_suspect = Some((env, since));
        }
    }

    /// Hands `env` to a pipelining publisher, if it still hands over to the client
    /// everything out went to; its outcome joins `out`. Returns the refusal when the
    /// publisher would not take it: nothing later of its key may go before that outcome is
    /// taken in, so the key stops.
    fn hand_over(
        &mut self,
        ctx: Context<'a>,
        lanes: &mut Lanes,
        env: Envelope,
    ) -> Option<PublishError> {
        let started = Instant::now();
        ctx.shared_alone.handed();
        match ctx.publisher.send_to(&env, self.handed_to) {
            Ok(confirm) => {
                self.out.push(Box::pin(async move {
                    let result = confirm.await.map(|()| started.elapsed());
                    (env, result)
                }));
                None
            }
            Err(e) => {
                lanes.stop_key(&env);
                let refused = e.clone();
                self.out.push(Box::pin(async move { (env, Err(e)) }));
                Some(refused)
            }
        }
    }

    /// Takes in a message's outcome: the suspect rule applied (pipelined; the other kind
    /// applies it in [`crate::suspects::Suspects::publish_one`]), and a suspect waiting from
    /// the same lane put back if the lane failed or was let go.
    pub(super) fn outcome(
        &mut self,
        ctx: Context<'a>,
        lanes: &mut Lanes,
        env: &Envelope,
        result: Result<Duration, PublishError>,
    ) -> Result<Duration, PublishError> {
        let was_alone = self.alone == Some(env.seq);
        if self.pipelined {
            ctx.shared_alone.returned(1);
        }
        if was_alone {
            self.alone = None;
            ctx.shared_alone.alone_done();
        }
        let result = if self.pipelined {
            ctx.suspects.under_suspicion(env.seq, was_alone, result)
        } else {
            result
        };
        if result.is_err() {
            let same_lane = |(s, _): &mut (Envelope, Instant)| LaneId::of(s) == LaneId::of(env);
            if let Some((suspect, _)) = self.waiting_suspect.take_if(same_lane) {
                lanes.put_back(suspect);
            }
        }
        result
    }

    /// The grace period is over: what is out is dropped unconfirmed (its rows stay pending).
    pub(super) fn abandon(&mut self, ctx: Context<'a>) {
        if !self.out.is_empty() {
            tracing::warn!(
                worker = ctx.worker,
                in_flight = self.out.len(),
                "shutdown grace period over; releasing unconfirmed messages"
            );
        }
        if self.pipelined {
            ctx.shared_alone.returned(self.out.len());
        }
        self.out.clear();
        if self.alone.take().is_some() {
            ctx.shared_alone.alone_done();
        }
    }

    /// A waiting suspect is let go (its row stays pending).
    pub(super) fn release_suspect(&mut self, lanes: &mut Lanes) {
        if let Some((env, _)) = self.waiting_suspect.take() {
            lanes.released(&env);
        }
    }

    /// Tells the other workers whether a suspect of this one waits to go alone.
    pub(super) fn tell_waiting(&mut self, ctx: Context<'a>) {
        let waits = self.waiting_suspect.is_some();
        if self.pipelined && waits != self.told_waiting {
            self.told_waiting = waits;
            ctx.shared_alone.waiting(waits);
        }
    }

    /// When the waiting suspect's wait is over, while it is still to come: the timer is
    /// armed only until then, since after it the suspect goes as soon as starts are allowed
    /// again, which something else wakes the worker for.
    pub(super) fn suspect_due(&self, now: Instant) -> Option<Instant> {
        self.waiting_suspect
            .as_ref()
            .map(|w| w.1 + SUSPECT_WAIT)
            .filter(|due| *due > now)
    }

    /// When the next round may start though the last is still out (pipelined).
    pub(super) fn round_due(&self, now: Instant) -> Option<Instant> {
        self.next_round_at
            .filter(|t| *t > now && !self.out.is_empty())
    }

    /// The worker stops: it no longer counts among the waiting suspects.
    pub(super) fn finish(&mut self, ctx: Context<'a>) {
        if self.told_waiting {
            self.told_waiting = false;
            ctx.shared_alone.waiting(false);
        }
    }
}
