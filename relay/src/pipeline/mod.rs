//! A relay worker as a stream: read → dispatch → settle, all three under way at once.
//!
//! - **Read** ([`read`]) keeps a queue per key ([`lanes`]) topped up from the worker's
//!   partitions, within a window bounded in rows and in payload bytes.
//! - **Dispatch** ([`dispatch`]) starts a key's next message as soon as the broker confirmed
//!   its previous one, with every key that has a message waiting in flight at once; with a
//!   publisher that keeps a key's order itself (Kafka), a key's messages go without
//!   waiting, in rounds.
//! - **Settle** ([`settle`]) commits the outcomes that arrived while the previous settle ran
//!   in one round trip: a group commit.
//!
//! [`Worker::step`] is one turn of the worker: it starts what may start in each stage,
//! waits for the next [`Event`] (an outcome, a read, a settle, a wake-up, a timer) and takes
//! it in. A row leaves the window only once its outcome is committed, so no read can hand
//! it out twice; per-key order rests on the lane rules in [`lanes`].

mod context;
mod dispatch;
mod lanes;
mod read;
mod settle;

use std::{future::Future, pin::Pin, time::Duration};

use futures::StreamExt;
use outbox::Backoff;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

pub(crate) use self::context::Context;
pub use self::context::WorkerOptions;
use self::{
    dispatch::{Dispatch, Outcome},
    lanes::{LaneId, Lanes},
    read::{Read, Reader},
    settle::{Committed, Settler},
};
use crate::{
    error::{error_chain, RelayError},
    publish::PublishError,
    verdict::{self, Verdict},
};

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs worker `ctx.worker` until `shutdown`, then finishes what is at the broker (until
/// `abort`) and commits its outcomes.
pub(crate) async fn run(
    ctx: Context<'_>,
    shutdown: CancellationToken,
    abort: CancellationToken,
) -> Result<(), RelayError> {
    let mut worker = Worker::new(ctx, shutdown, abort);
    while worker.step().await {}
    worker.finish()
}

/// What a worker waits for between two turns.
enum Event {
    /// The shutdown grace is over.
    Abort,
    Shutdown,
    Published(Outcome),
    Settled(Committed),
    Read(Read),
    /// Another worker's suspect went or came back (pipelined).
    AloneChanged,
    /// A wake-up: rows were committed.
    Woken,
    /// The relay's partitions changed (false: the relay is gone).
    Owned(bool),
    /// A timer: a read, a round, a pause, a suspect's or a settle's wait is due.
    Timer,
}

/// The worker's standing with PostgreSQL and the broker.
struct Link {
    /// No read or publish before this (backing off from PostgreSQL or the broker).
    pause_until: Option<Instant>,
    db_backoff: Backoff,
    broker_backoff: Backoff,
    /// Set while the broker is in trouble: nothing new starts until what is in flight is
    /// back, then the worker backs off and reconnects.
    trouble: Option<String>,
    /// The publisher answered `ready` since the last trouble.
    broker_ok: bool,
    /// A fatal error: the worker stops, and the relay with it.
    fatal: Option<String>,
}

/// One worker: its lanes, its three stages, and its standing with the servers.
pub(crate) struct Worker<'a> {
    ctx: Context<'a>,
    lanes: Lanes,
    read: Reader<'a>,
    dispatch: Dispatch<'a>,
    settle: Settler<'a>,
    link: Link,
    owned: tokio::sync::watch::Receiver<Vec<i16>>,
    /// The partitions this worker reads.
    partitions: Vec<i16>,
    woken: Pin<Box<tokio::sync::futures::Notified<'a>>>,
    alone_changed: Pin<Box<tokio::sync::futures::Notified<'a>>>,
    shutdown: CancellationToken,
    abort: CancellationToken,
    stopping: bool,
    aborted: bool,
    idle: bool,
    /// The busy partitions last told the relay, with the lanes' change count then.
    told_busy: (Vec<i16>, u64),
}

fn armed(notify: &Notify) -> Pin<Box<tokio::sync::futures::Notified<'_>>> {
    let mut notified = Box::pin(notify.notified());
    notified.as_mut().enable();
    notified
}

impl<'a> Worker<'a> {
    pub(crate) fn new(
        ctx: Context<'a>,
        shutdown: CancellationToken,
        abort: CancellationToken,
    ) -> Self {
        let mut owned = ctx.owned.subscribe();
        let partitions = ctx.mine(&owned.borrow_and_update());
        let reconnect = ctx.options.reconnect_max_delay;
        Self {
            ctx,
            lanes: Lanes::with_depth(ctx.publisher.key_depth()),
            read: Reader::new(),
            dispatch: Dispatch::new(ctx),
            settle: Settler::default(),
            link: Link {
                pause_until: None,
                db_backoff: Backoff::new(reconnect),
                broker_backoff: Backoff::new(reconnect),
                trouble: None,
                broker_ok: false,
                fatal: None,
            },
            owned,
            partitions,
            woken: armed(&ctx.wake.notify),
            alone_changed: armed(&ctx.shared_alone.changed),
            shutdown,
            abort,
            stopping: false,
            aborted: false,
            idle: false,
            told_busy: (Vec::new(), u64::MAX),
        }
    }

    /// One turn: starts what may start in each stage, then waits for the next event and
    /// takes it in. Returns false once the worker has stopped and has nothing left.
    pub(crate) async fn step(&mut self) -> bool {
        self.ctx.beat();
        self.tell_busy(false);
        let now = Instant::now();
        if self.link.pause_until.is_some_and(|t| t <= now) {
            self.link.pause_until = None;
        }
        let may_start =
            !self.stopping && self.link.pause_until.is_none() && self.link.trouble.is_none();
        let publish = may_start && self.link.broker_ok;
        if let Some(trouble) = self.dispatch.start(self.ctx, &mut self.lanes, publish, now) {
            self.link.trouble.get_or_insert(trouble);
        }
        if self.link.trouble.is_some() && self.dispatch.is_empty() {
            self.back_off_broker(now);
            return true;
        }
        self.settle
            .start_if_due(self.ctx, now, self.lanes.held(), self.stopping);
        let mut can_read = self
            .read
            .may_read(self.ctx, &self.lanes, &self.partitions, may_start);
        if can_read && self.read.at <= now {
            can_read = false;
            self.read.start(self.ctx, &mut self.lanes, &self.partitions);
            self.tell_busy(true);
        }
        self.track_idle(now);
        if self.stopping
            && self.dispatch.is_empty()
            && self.settle.is_idle()
            && self.read.under_way.is_none()
        {
            return false;
        }
        self.dispatch.tell_waiting(self.ctx);
        let event = self.next_event(now, can_read).await;
        self.take(event);
        true
    }

    /// The broker is in trouble and nothing is out any more: drop what is queued, back off,
    /// then reconnect with a read.
    fn back_off_broker(&mut self, now: Instant) {
        let wait = self.link.broker_backoff.next_delay();
        let reason = self.link.trouble.take().unwrap_or_default();
        tracing::warn!(worker = self.ctx.worker, error = %reason, retry_in = ?wait, "broker unavailable");
        self.dispatch.release_suspect(&mut self.lanes);
        self.lanes.drop_queued();
        self.link.broker_ok = false;
        self.link.pause_until = Some(now + wait);
        self.read.at = now + wait;
    }

    /// Tells the wake-ups whether this worker is idle: it found nothing to do last time it
    /// read, and holds nothing.
    fn track_idle(&mut self, now: Instant) {
        let idle = self.read.quiet
            && self.lanes.is_empty()
            && self.settle.is_idle()
            && self.read.under_way.is_none()
            && self.dispatch.is_empty()
            && self.read.at > now;
        if idle != self.idle {
            self.idle = idle;
            if idle {
                self.ctx.wake.went_idle();
            } else {
                self.ctx.wake.busy();
            }
        }
    }

    /// Tells the relay which partitions must not change hands yet: those of rows in hand and
    /// of the read under way. With `read_changed` when a read starts or ends; otherwise it
    /// costs a comparison unless a partition started or stopped being busy.
    fn tell_busy(&mut self, read_changed: bool) {
        if !read_changed && self.lanes.busy_changes() == self.told_busy.1 {
            return;
        }
        self.told_busy.1 = self.lanes.busy_changes();
        let mut busy = self.lanes.busy_partitions();
        busy.extend_from_slice(&self.read.from);
        busy.sort_unstable();
        busy.dedup();
        if busy != self.told_busy.0 {
            self.ctx.set_busy(&busy);
            self.told_busy.0 = busy;
        }
    }

    /// Waits for whichever comes first of what the worker has under way and its timers.
    async fn next_event(&mut self, now: Instant, can_read: bool) -> Event {
        let pipelined = self.dispatch.pipelined();
        let read_at = self.read.at;
        let round = self.dispatch.round_due(now);
        let pause = self.link.pause_until;
        let suspect = self.dispatch.suspect_due(now);
        let linger = self.settle.linger_until();
        let at = |t: Option<Instant>| tokio::time::sleep_until(t.unwrap_or(now));
        tokio::select! {
            biased;
            _ = self.abort.cancelled(), if !self.aborted => Event::Abort,
            _ = self.shutdown.cancelled(), if !self.stopping => Event::Shutdown,
            Some(outcome) = self.dispatch.out.next(), if !self.dispatch.out.is_empty() => Event::Published(outcome),
            committed = maybe(&mut self.settle.under_way) => Event::Settled(committed),
            read = maybe(&mut self.read.under_way) => Event::Read(read),
            _ = &mut self.alone_changed, if pipelined => Event::AloneChanged,
            _ = &mut self.woken => Event::Woken,
            changed = self.owned.changed() => Event::Owned(changed.is_ok()),
            _ = tokio::time::sleep_until(read_at), if can_read => Event::Timer,
            _ = at(round), if round.is_some() => Event::Timer,
            _ = at(pause), if pause.is_some() => Event::Timer,
            _ = at(suspect), if suspect.is_some() => Event::Timer,
            _ = at(linger), if linger.is_some() => Event::Timer,
        }
    }

    /// Takes in what happened.
    fn take(&mut self, event: Event) {
        match event {
            Event::Abort => {
                self.aborted = true;
                // Dropped publishes were never confirmed: their rows stay pending.
                self.dispatch.abandon(self.ctx);
                self.lanes.drop_queued();
            }
            Event::Shutdown => {
                self.stopping = true;
                self.ctx.publisher.stop_sending();
                if self.read.under_way.is_some() {
                    self.read.ended();
                    self.lanes.read_failed();
                    self.told_busy.1 = u64::MAX;
                }
                self.dispatch.release_suspect(&mut self.lanes);
                self.lanes.drop_queued();
            }
            Event::Published((env, result)) => self.published(env, result),
            Event::Settled((batch, result)) => self.settled(batch, result),
            Event::Read(read) => self.took_read(read),
            Event::AloneChanged => self.alone_changed = armed(&self.ctx.shared_alone.changed),
            Event::Woken => {
                self.woken = armed(&self.ctx.wake.notify);
                self.read.now();
            }
            Event::Owned(changed) => {
                if changed {
                    self.partitions = self.ctx.mine(&self.owned.borrow_and_update());
                    self.read.now();
                }
            }
            Event::Timer => {}
        }
    }

    /// A message's outcome: confirmed, to be recorded as a failure, or let go.
    fn published(
        &mut self,
        env: crate::envelope::Envelope,
        result: Result<Duration, PublishError>,
    ) {
        self.settle.arrived();
        let result = self
            .dispatch
            .outcome(self.ctx, &mut self.lanes, &env, result);
        let error = match result {
            Ok(sent) => {
                crate::metrics::published(&env.topic, sent, env.age());
                self.lanes.confirmed(&env);
                self.settle.pending.delivered(env.seq);
                self.link.broker_backoff.reset();
                return;
            }
            Err(e) => e,
        };
        match verdict::judge(self.ctx.policy, &env, &error) {
            Verdict::Failed(failure) => {
                let dropped = self.lanes.failed(&env);
                self.settle
                    .pending
                    .failed(failure, LaneId::of(&env), dropped);
            }
            Verdict::Released(PublishError::Fatal(msg)) => {
                self.lanes.released(&env);
                self.link.fatal.get_or_insert(msg);
                self.stopping = true;
                self.lanes.drop_queued();
            }
            Verdict::Released(e) => {
                self.lanes.released(&env);
                self.link.trouble.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// A settle is over: its rows leave the window (recorded, or to be read again).
    fn settled(
        &mut self,
        batch: settle::Pending,
        result: Result<crate::store::Settled, RelayError>,
    ) {
        self.settle.under_way = None;
        match result {
            Ok(done) => {
                let not_owned = batch.settlement.failed.len() as u64 - done.failed;
                if not_owned > 0 {
                    tracing::warn!(
                        rows = not_owned,
                        "partition taken over before failures were recorded; the new owner retries them"
                    );
                }
            }
            Err(e) => {
                let wait = self.link.db_backoff.next_delay();
                tracing::warn!(worker = self.ctx.worker, error = %error_chain(&e), rows = batch.len(), retry_in = ?wait,
                    "outcomes not recorded; the rows will be read and published again");
                self.link.pause_until = Some(Instant::now() + wait);
            }
        }
        self.lanes
            .settled(batch.rows().collect::<Vec<_>>(), batch.unblock);
    }

    /// A read is over: its rows join the lanes, or the worker backs off.
    fn took_read(&mut self, read: Read) {
        self.read.ended();
        // Told at the start of the next turn, once the read's rows are taken in.
        self.told_busy.1 = u64::MAX;
        let worker = self.ctx.worker;
        let claim = match read {
            Read::Broker(PublishError::Fatal(msg)) => {
                self.lanes.read_failed();
                self.link.fatal.get_or_insert(msg);
                self.stopping = true;
                return;
            }
            Read::Broker(e) => {
                self.lanes.read_failed();
                self.read.quiet = false;
                let wait = self.link.broker_backoff.next_delay();
                tracing::warn!(worker, error = %e, retry_in = ?wait, "broker unavailable");
                self.read.retry_in(wait);
                return;
            }
            Read::Rows { claim: Err(e), .. } => {
                self.lanes.read_failed();
                let wait = self.link.db_backoff.next_delay();
                tracing::warn!(worker, error = %error_chain(&e), retry_in = ?wait, "PostgreSQL unavailable");
                self.read.retry_in(wait);
                return;
            }
            Read::Rows {
                claim: Ok(claim),
                took,
            } => {
                crate::metrics::claim(claim.len(), took);
                claim
            }
        };
        self.link.broker_ok = true;
        self.link.db_backoff.reset();
        let rows = claim.len();
        for m in &claim.malformed {
            let id = LaneId::new(m.seq, m.key.as_deref());
            if self.lanes.admit_unpublishable(m.seq, m.partition, &id) {
                self.settle
                    .pending
                    .failed(verdict::malformed(m), id, Vec::new());
                self.settle.arrived();
            }
        }
        self.lanes.admit(claim.envelopes);
        let drained = self.lanes.is_empty();
        self.read
            .took(rows, &claim.full, drained, self.ctx.options.poll_interval);
    }

    /// The worker has stopped: it is no longer idle, waiting or busy. Returns the fatal
    /// error that stopped it, if any.
    pub(crate) fn finish(mut self) -> Result<(), RelayError> {
        if self.idle {
            self.ctx.wake.busy();
        }
        self.dispatch.finish(self.ctx);
        self.ctx.set_busy(&[]);
        match self.link.fatal.take() {
            Some(msg) => Err(RelayError::Fatal(msg)),
            None => Ok(()),
        }
    }
}

/// Awaits the future in `slot`, or never when there is none.
async fn maybe<T>(slot: &mut Option<Boxed<'_, T>>) -> T {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
