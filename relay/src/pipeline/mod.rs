//! A relay worker as a stream: read → publish → settle, all three under way at once.
//!
//! - **Read** ([`lanes`]) keeps a queue per key topped up from the worker's partitions,
//!   passing over the rows it holds already, within a window bounded in rows
//!   (`relay.window`) and in payload bytes (`relay.window_bytes`).
//! - **Publish** starts a key's next message as soon as the broker confirmed its previous
//!   one, with every key that has a message waiting in flight at once; with a publisher
//!   that keeps a key's order itself (Kafka), a key's messages go without waiting, in
//!   rounds (see [`ROUND_WAIT`]).
//! - **Settle** ([`settle`]) commits the outcomes that arrived while the previous settle ran
//!   in one round trip: a group commit, so settles never wait for each other and never hold
//!   up a publish.
//!
//! A row leaves the window only once its outcome is committed, so no read can hand it out
//! twice; per-key order rests on the lane rules in [`lanes`].

mod lanes;
mod settle;

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    time::{Duration, Instant},
};

use futures::{stream::FuturesUnordered, StreamExt};
use outbox::Backoff;
use tokio_util::sync::CancellationToken;

use self::{lanes::LaneId, lanes::Lanes, settle::Pending};
use crate::{
    envelope::Envelope,
    error::{error_chain, RelayError},
    publish::PublishError,
    relay::Relay,
    store::Claim,
    verdict::Verdict,
    wake::Wake,
};

/// How soon a busy worker reads again after a read that found everything read.
const BUSY_POLL: Duration = Duration::from_millis(5);
/// How long outcomes wait to be settled together (unless there are many, or the window is
/// full): one round trip per few milliseconds instead of one per confirm.
const SETTLE_LINGER: Duration = Duration::from_millis(3);
/// Outcomes that are settled at once without waiting for more.
const SETTLE_BATCH: usize = 500;
/// With a publisher that pipelines a key's messages (Kafka), messages are handed over in
/// rounds: the next round once every message of the last one is confirmed, or once the last
/// round has been out this long (so a partition that stops answering holds up the others
/// by at most this much per round). librdkafka's idempotent producer keeps one produce
/// request in flight per partition, and while it waits its broker thread spins on the
/// messages queued behind that request; held here instead, they cost no CPU, and they go
/// out in the next request all the same.
const ROUND_WAIT: Duration = Duration::from_millis(500);

/// The longest a suspect waits to go alone (for everything out to come back) with nothing
/// else starting; after it, it goes with the rest (costing no attempt if refused again), so
/// a partition that does not answer does not hold the whole worker.
const SUSPECT_WAIT: Duration = Duration::from_secs(5);

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a read brought.
enum Read {
    /// The broker connection is not up; nothing was read.
    Broker(PublishError),
    Rows {
        claim: Result<Claim, sqlx::Error>,
        took: Duration,
    },
}

/// Runs worker `worker` of `relay` until `shutdown`, then finishes what is at the broker
/// (until `abort`) and commits its outcomes.
pub(crate) async fn run(
    relay: &Relay,
    worker: u32,
    wake: &Wake,
    shutdown: CancellationToken,
    abort: CancellationToken,
) -> Result<(), RelayError> {
    let settings = &relay.settings;
    let workers = settings.workers as i16;
    let beat = || relay.heartbeats.beat(worker as usize);
    let mut owned = relay.owned.subscribe();
    let mine = |owned: &[i16]| -> Vec<i16> {
        owned
            .iter()
            .copied()
            .filter(|p| p % workers == worker as i16)
            .collect()
    };
    let mut partitions = mine(&owned.borrow_and_update());
    // Partitions that had more rows than the last read of them took.
    let mut hot: HashSet<i16> = HashSet::new();
    // The partitions the read under way reads from, and how many reads there were.
    let mut read_limits: Vec<i16> = Vec::new();
    let mut reads: usize = 0;

    let mut lanes = Lanes::with_depth(relay.publisher.key_depth());
    let pipelined = relay.publisher.key_depth() > 1;
    let mut pending = Pending::default();
    let mut publishing: FuturesUnordered<Boxed<'_, (Envelope, Result<Duration, PublishError>)>> =
        FuturesUnordered::new();
    let mut reading: Option<Boxed<'_, Read>> = None;
    let mut settling: Option<Boxed<'_, (Pending, Result<crate::store::Settled, RelayError>)>> =
        None;

    let mut woken = Box::pin(wake.notify.notified());
    woken.as_mut().enable();
    // When the next read is due.
    let mut read_at = Instant::now();
    // With a pipelining publisher: when the next round may start though the last one is
    // not all confirmed.
    let mut next_round_at: Option<Instant> = None;
    // No read or publish before this (backing off from PostgreSQL or the broker).
    let mut pause_until: Option<Instant> = None;
    let mut db_backoff = Backoff::new(settings.reconnect_max_delay);
    let mut broker_backoff = Backoff::new(settings.reconnect_max_delay);
    // Set while the broker is in trouble: nothing new starts until what is in flight is
    // back, then the worker backs off and reconnects.
    let mut broker_trouble: Option<String> = None;
    // The publisher answered `ready` since the last trouble.
    let mut broker_ok = false;
    let mut fatal: Option<String> = None;
    // With a pipelining publisher, the suspect rule (see `Relay::under_suspicion`): a suspect
    // taken from its lane waits here until nothing else is out, then goes alone; nothing
    // else starts while it is out.
    let mut waiting_suspect: Option<(Envelope, Instant)> = None;
    let mut handed_to: u64 = relay.publisher.generation();
    let mut alone: Option<i64> = None;
    // Whether this worker counts in `SharedAlone`'s waiting suspects.
    let mut told_waiting = false;
    let mut alone_changed = Box::pin(relay.shared_alone.changed.notified());
    alone_changed.as_mut().enable();
    let mut stopping = false;
    let mut aborted = false;
    let mut idle = false;
    // The last read found nothing to do: the worker waits the poll interval unless woken.
    // Only then is it idle; a busy worker looks again within `BUSY_POLL` anyway, and
    // registering for wake-ups would make every producer's commit send a NOTIFY (which
    // serializes those commits) for nothing.
    let mut quiet = false;
    // When the oldest outcome waiting to be settled arrived.
    let mut pending_since: Option<Instant> = None;
    // The partitions of the read under way, and the busy partitions last told the relay
    // (with the lanes' change count then).
    let mut reading_from: Vec<i16> = Vec::new();
    let mut told_busy: (Vec<i16>, u64) = (Vec::new(), u64::MAX);
    // Tells the relay which partitions must not change hands yet: those of rows in hand and
    // of the read under way. Called with `read_changed` when a read starts or ends; else it
    // costs a comparison unless a partition started or stopped being busy.
    let tell_busy =
        |lanes: &Lanes, reading_from: &[i16], read_changed: bool, told: &mut (Vec<i16>, u64)| {
            if !read_changed && lanes.busy_changes() == told.1 {
                return;
            }
            told.1 = lanes.busy_changes();
            let mut busy = lanes.busy_partitions();
            busy.extend_from_slice(reading_from);
            busy.sort_unstable();
            busy.dedup();
            if busy != told.0 {
                relay.busy.lock().expect("busy partitions")[worker as usize].clone_from(&busy);
                told.0 = busy;
            }
        };

    loop {
        beat();
        tell_busy(&lanes, &reading_from, false, &mut told_busy);
        let now = Instant::now();
        if pause_until.is_some_and(|t| t <= now) {
            pause_until = None;
        }
        let may_start = !stopping && pause_until.is_none() && broker_trouble.is_none();
        // With a pipelining publisher: the client everything out now went to. A message
        // goes only to that one (see `Publisher::send_to`); once nothing is out, to whichever
        // is current.
        if pipelined && publishing.is_empty() {
            handed_to = relay.publisher.generation();
        }

        // Publish: every lane whose previous message is confirmed, or, with a publisher
        // that keeps a key's order itself, every queued message, handed over here in order.
        let round_due =
            !pipelined || publishing.is_empty() || next_round_at.is_none_or(|t| t <= now);
        // Another worker's suspect waits to go alone, or is out alone (relay-wide with a
        // pipelining publisher: the workers share its requests).
        let others_alone = pipelined && !relay.shared_alone.may_start();
        if may_start
            && broker_ok
            && round_due
            && waiting_suspect.is_none()
            && alone.is_none()
            && !others_alone
        {
            while let Some(env) = lanes.next() {
                if pipelined && relay.is_suspect(env.seq) {
                    // It goes alone, once everything out now has come back.
                    waiting_suspect = Some((env, now));
                    break;
                }
                if pipelined {
                    next_round_at = Some(now + ROUND_WAIT);
                    match hand_over(relay, &mut lanes, &mut publishing, env, handed_to) {
                        Some(
                            e @ (PublishError::Unavailable(_) | PublishError::Disconnected(_)),
                        ) => {
                            broker_trouble.get_or_insert_with(|| e.to_string());
                            // The producer may just have been replaced: what the old one
                            // held is lost and will be read again, so nothing more is
                            // handed over (a key's later message would overtake its earlier
                            // ones) until all of it has come back.
                            break;
                        }
                        Some(PublishError::Fatal(_)) => break,
                        _ => {}
                    }
                } else {
                    publishing.push(Box::pin(async move {
                        let result = relay.publish_one(&env).await;
                        (env, result)
                    }));
                }
            }
        }
        if may_start && broker_ok && alone.is_none() {
            if let Some((env, since)) = waiting_suspect.take() {
                if publishing.is_empty() && relay.shared_alone.go_alone() {
                    tracing::info!(worker, seq = env.seq, message_id = %env.id, "publishing a suspect message alone");
                    alone = Some(env.seq);
                    hand_over(relay, &mut lanes, &mut publishing, env, handed_to);
                } else if now >= since + SUSPECT_WAIT {
                    tracing::warn!(worker, seq = env.seq, message_id = %env.id, in_flight = publishing.len(),
                        "a suspect message waited too long to go alone; publishing it with the others");
                    hand_over(relay, &mut lanes, &mut publishing, env, handed_to);
                } else {
                    waiting_suspect = Some((env, since));
                }
            }
        }
        // Broker trouble: once nothing is in flight, back off, then reconnect with a read.
        if let Some(reason) = &broker_trouble {
            if publishing.is_empty() {
                let wait = broker_backoff.next_delay();
                tracing::warn!(worker, error = %reason, retry_in = ?wait, "broker unavailable");
                if let Some((env, _)) = waiting_suspect.take() {
                    lanes.released(&env);
                }
                lanes.drop_queued();
                broker_trouble = None;
                broker_ok = false;
                pause_until = Some(now + wait);
                read_at = now + wait;
                continue;
            }
        }
        if pending.is_empty() {
            pending_since = None;
        }
        // Settle: everything that arrived while the previous settle ran, once it lingered
        // a little (or there is much of it, or the worker needs the room, or is stopping).
        let settle_due = pending_since.is_some_and(|t| now >= t + SETTLE_LINGER)
            || pending.len() >= SETTLE_BATCH
            || lanes.held() >= settings.window as usize
            || stopping;
        if settling.is_none() && !pending.is_empty() && settle_due {
            pending_since = None;
            let batch = std::mem::take(&mut pending);
            settling = Some(Box::pin(async move {
                let started = Instant::now();
                let result = relay.settle_with_retries(&batch.settlement).await;
                crate::metrics::settle(started.elapsed());
                (batch, result)
            }));
        }
        // Read: when due and there is room.
        let room = (settings.window as usize).saturating_sub(lanes.held());
        let bytes_room = lanes.held_bytes() < settings.window_bytes as usize;
        // Each read passes over every held row, so a full window is topped up in large
        // steps, not one small read per confirm.
        let low_water = (settings.batch_size.min(settings.window / 4) as usize).max(1);
        // A read may start (now, or when `read_at` comes); the read timer is armed only
        // then, so a worker without room sleeps until a settle makes some.
        let mut can_read = may_start
            && reading.is_none()
            && bytes_room
            && (room >= low_water || lanes.is_empty())
            && !partitions.is_empty();
        if can_read && read_at <= now {
            can_read = false;
            let asked = settings.batch_size.min(room as u32).max(1);
            let held = lanes.start_read();
            let bytes = (settings.window_bytes as usize).saturating_sub(lanes.held_bytes()) as u64;
            let limits = share(
                &partitions,
                &hot,
                |p| lanes.held_in(p),
                settings.window,
                asked,
                reads,
            );
            reads = reads.wrapping_add(1);
            read_limits = limits.iter().map(|l| l.0).collect();
            reading_from.clone_from(&partitions);
            tell_busy(&lanes, &reading_from, true, &mut told_busy);
            reading = Some(Box::pin(async move {
                // Reconnects if the connection dropped (cheap when it is up): no rows are
                // read for a broker that cannot take them.
                if let Err(e) = relay.publisher.ready().await {
                    return Read::Broker(e);
                }
                // Not while partitions change hands; and none given up since the read was
                // planned is read (see `Relay::rebalance`).
                let _handover = relay.handover.read().await;
                let limits: Vec<(i16, u32)> = {
                    let owned = relay.owned.borrow();
                    limits
                        .into_iter()
                        .filter(|l| owned.contains(&l.0))
                        .collect()
                };
                let started = Instant::now();
                let claim = relay
                    .store
                    .claim_from(relay.id, &limits, bytes, &held)
                    .await;
                Read::Rows {
                    claim,
                    took: started.elapsed(),
                }
            }));
        }

        let now_idle = quiet
            && lanes.is_empty()
            && pending.is_empty()
            && reading.is_none()
            && settling.is_none()
            && publishing.is_empty()
            && read_at > now;
        if now_idle != idle {
            idle = now_idle;
            if idle {
                wake.went_idle();
            } else {
                wake.busy();
            }
        }
        if stopping
            && publishing.is_empty()
            && settling.is_none()
            && pending.is_empty()
            && reading.is_none()
        {
            break;
        }

        if pipelined && waiting_suspect.is_some() != told_waiting {
            told_waiting = waiting_suspect.is_some();
            relay.shared_alone.waiting(told_waiting);
        }
        let suspect_due = waiting_suspect
            .as_ref()
            .map(|w| w.1 + SUSPECT_WAIT)
            .filter(|due| *due > now);
        tokio::select! {
            biased;
            _ = abort.cancelled(), if !aborted => {
                aborted = true;
                if !publishing.is_empty() {
                    tracing::warn!(worker, in_flight = publishing.len(), "shutdown grace period over; releasing unconfirmed messages");
                }
                // Dropped publishes were never confirmed: their rows stay pending.
                if pipelined {
                    relay.shared_alone.returned(publishing.len());
                }
                publishing.clear();
                if alone.take().is_some() {
                    relay.shared_alone.alone_done();
                }
                lanes.drop_queued();
            }
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                relay.publisher.stop_sending();
                reading = None;
                lanes.read_failed();
                if let Some((env, _)) = waiting_suspect.take() {
                    lanes.released(&env);
                }
                lanes.drop_queued();
            }
            Some((env, result)) = publishing.next(), if !publishing.is_empty() => {
                pending_since.get_or_insert_with(Instant::now);
                let was_alone = alone == Some(env.seq);
                if pipelined {
                    relay.shared_alone.returned(1);
                }
                if was_alone {
                    alone = None;
                    relay.shared_alone.alone_done();
                }
                // A pipelining publisher's outcomes go through the suspect rule here (the
                // other kind applies it in `Relay::publish_one`).
                let result = if pipelined {
                    relay.under_suspicion(env.seq, was_alone, result)
                } else {
                    result
                };
                // A suspect set aside from this message's lane shares what happens to the
                // lane (a failure stops the key, a release lets its rows go).
                if result.is_err() {
                    let same_lane = |(s, _): &mut (Envelope, Instant)| LaneId::of(s) == LaneId::of(&env);
                    if let Some((suspect, _)) = waiting_suspect.take_if(same_lane) {
                        lanes.put_back(suspect);
                    }
                }
                match result {
                    Ok(sent) => {
                        crate::metrics::published(&env.topic, sent, env.age());
                        lanes.confirmed(&env);
                        pending.delivered(env.seq);
                        broker_backoff.reset();
                    }
                    Err(e) => match relay.judge(&env, &e) {
                        Verdict::Failed(failure) => {
                            let dropped = lanes.failed(&env);
                            pending.failed(failure, LaneId::of(&env), dropped);
                        }
                        Verdict::Released(e) => {
                            lanes.released(&env);
                            match e {
                                PublishError::Fatal(msg) => {
                                    fatal.get_or_insert(msg);
                                    stopping = true;
                                    lanes.drop_queued();
                                }
                                e => {
                                    broker_trouble.get_or_insert_with(|| e.to_string());
                                }
                            }
                        }
                    },
                }
            }
            (batch, result) = maybe(&mut settling) => {
                settling = None;
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
                        let wait = db_backoff.next_delay();
                        tracing::warn!(worker, error = %error_chain(&e), rows = batch.len(), retry_in = ?wait,
                            "outcomes not recorded; the rows will be read and published again");
                        pause_until = Some(Instant::now() + wait);
                    }
                }
                lanes.settled(batch.rows().collect::<Vec<_>>(), batch.unblock);
            }
            read = maybe(&mut reading) => {
                reading = None;
                reading_from.clear();
                // Told at the top of the loop, once the read's rows are taken in.
                told_busy.1 = u64::MAX;
                match read {
                    Read::Broker(PublishError::Fatal(msg)) => {
                        lanes.read_failed();
                        fatal.get_or_insert(msg);
                        stopping = true;
                    }
                    Read::Broker(e) => {
                        lanes.read_failed();
                        quiet = false;
                        let wait = broker_backoff.next_delay();
                        tracing::warn!(worker, error = %e, retry_in = ?wait, "broker unavailable");
                        read_at = Instant::now() + wait;
                    }
                    Read::Rows { claim: Err(e), .. } => {
                        lanes.read_failed();
                        let wait = db_backoff.next_delay();
                        tracing::warn!(worker, error = %error_chain(&e), retry_in = ?wait, "PostgreSQL unavailable");
                        read_at = Instant::now() + wait;
                    }
                    Read::Rows { claim: Ok(claim), took } => {
                        broker_ok = true;
                        db_backoff.reset();
                        let rows = claim.len();
                        crate::metrics::claim(rows, took);
                        let more = !claim.full.is_empty();
                        // Partitions left out of this read keep what the last one said.
                        hot.retain(|p| !read_limits.contains(p));
                        hot.extend(claim.full.iter().copied());
                        for m in &claim.malformed {
                            let id = LaneId::new(m.seq, m.key.as_deref());
                            if lanes.admit_unpublishable(m.seq, m.partition, &id) {
                                pending.failed(relay.malformed(m), id, Vec::new());
                                pending_since.get_or_insert_with(Instant::now);
                            }
                        }
                        lanes.admit(claim.envelopes);
                        let now = Instant::now();
                        quiet = !more && rows == 0 && lanes.is_empty();
                        read_at = if quiet {
                            now + settings.poll_interval
                        } else if more {
                            now
                        } else {
                            now + BUSY_POLL
                        };
                    }
                }
            }
            _ = &mut alone_changed, if pipelined => {
                alone_changed.set(relay.shared_alone.changed.notified());
                alone_changed.as_mut().enable();
            }
            _ = &mut woken => {
                woken.set(wake.notify.notified());
                woken.as_mut().enable();
                read_at = Instant::now();
            }
            changed = owned.changed() => {
                if changed.is_ok() {
                    partitions = mine(&owned.borrow_and_update());
                    read_at = Instant::now();
                }
            }
            _ = tokio::time::sleep_until(read_at.into()), if can_read => {}
            _ = tokio::time::sleep_until(next_round_at.unwrap_or(now).into()),
                if next_round_at.is_some_and(|t| t > now) && !publishing.is_empty() => {}
            _ = tokio::time::sleep_until(pause_until.unwrap_or(read_at).into()), if pause_until.is_some() => {}
            // Armed only until the suspect's wait is over: after it, the suspect goes as soon
            // as starts are allowed again, which something else wakes the loop for.
            _ = tokio::time::sleep_until(suspect_due.unwrap_or(now).into()), if suspect_due.is_some() => {}
            _ = tokio::time::sleep_until((pending_since.unwrap_or(now) + SETTLE_LINGER).into()),
                if pending_since.is_some() && settling.is_none() => {}
        }
    }
    if idle {
        wake.busy();
    }
    if told_waiting {
        relay.shared_alone.waiting(false);
    }
    relay.busy.lock().expect("busy partitions")[worker as usize].clear();
    match fatal {
        Some(msg) => Err(RelayError::Fatal(msg)),
        None => Ok(()),
    }
}

/// How many rows to read from each partition: each is topped up toward its share of the
/// window (`window` rows in all), counting the rows it has in hand (`held`), and the whole
/// read is cut to `asked` rows. The shares are even, except that once some partitions are
/// known to have more rows than the last read took (`hot`), the others' share is a few rows
/// and the hot ones share the rest: one key with a long backlog is read in long runs. A
/// partition whose keys drain slowly (one key, one message at the broker at a time) thus
/// does not fill the window while partitions of many keys go without. `turn` counts the
/// reads: it decides who goes first among partitions equally in need when there are more
/// of them than rows asked.
fn share(
    partitions: &[i16],
    hot: &HashSet<i16>,
    held: impl Fn(i16) -> usize,
    window: u32,
    asked: u32,
    turn: usize,
) -> Vec<(i16, u32)> {
    const COLD: u32 = 4;
    let n = partitions.len().max(1) as u32;
    let hot_n = partitions.iter().filter(|p| hot.contains(p)).count() as u32;
    let even = window.div_ceil(n).max(1);
    let target = |p: &i16| -> u32 {
        if hot_n == 0 || hot_n == n {
            return even;
        }
        let cold = even.min(COLD);
        if hot.contains(p) {
            (window.saturating_sub(cold * (n - hot_n)) / hot_n).max(cold)
        } else {
            cold
        }
    };
    // (partition, rows it may take, rows it holds)
    let mut limits: Vec<(i16, u32, usize)> = partitions
        .iter()
        .map(|p| {
            let in_hand = held(*p);
            let wanted = target(p).saturating_sub(u32::try_from(in_hand).unwrap_or(u32::MAX));
            (*p, wanted, in_hand)
        })
        .filter(|l| l.1 > 0)
        .collect();
    let total: u64 = limits.iter().map(|l| u64::from(l.1)).sum();
    if total > u64::from(asked) {
        // In proportion, rounded down; the rows left over go one each to the partitions
        // holding the fewest (among equals, starting at a partition that moves on with
        // every read, so that none is passed over for good), so that the read never takes
        // more than was asked.
        let wanted: Vec<u32> = limits.iter().map(|l| l.1).collect();
        for l in &mut limits {
            l.1 = (u64::from(l.1) * u64::from(asked) / total) as u32;
        }
        let mut left = asked - limits.iter().map(|l| l.1).sum::<u32>();
        let mut order: Vec<usize> = (0..limits.len()).collect();
        let n = limits.len();
        order.sort_by_key(|&i| (limits[i].2, (i + n - turn % n) % n));
        for i in order {
            if left == 0 {
                break;
            }
            if limits[i].1 < wanted[i] {
                limits[i].1 += 1;
                left -= 1;
            }
        }
    }
    limits
        .into_iter()
        .filter(|l| l.1 > 0)
        .map(|(p, n, _)| (p, n))
        .collect()
}

/// Hands `env` to a pipelining publisher, if it still hands over to `generation` (another
/// worker may have seen its client replaced); its outcome joins `publishing`. Returns the
/// refusal when the publisher would not take it: nothing later of its key may go before
/// that outcome is taken in, so the key stops.
fn hand_over<'a>(
    relay: &'a Relay,
    lanes: &mut Lanes,
    publishing: &mut FuturesUnordered<Boxed<'a, (Envelope, Result<Duration, PublishError>)>>,
    env: Envelope,
    generation: u64,
) -> Option<PublishError> {
    let started = Instant::now();
    relay.shared_alone.handed();
    match relay.publisher.send_to(&env, generation) {
        Ok(confirm) => {
            publishing.push(Box::pin(async move {
                let result = confirm.await.map(|()| started.elapsed());
                (env, result)
            }));
            None
        }
        Err(e) => {
            lanes.stop_key(&env);
            let refused = e.clone();
            publishing.push(Box::pin(async move { (env, Err(e)) }));
            Some(refused)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hot_partition_gets_most_of_the_room() {
        let parts: Vec<i16> = (0..64).collect();
        let none = |_: i16| 0;
        let even = share(&parts, &HashSet::new(), none, 2048, 2048, 0);
        assert!(even.iter().all(|&(_, n)| n == 32), "{even:?}");
        let hot: HashSet<i16> = [5].into();
        let skewed = share(&parts, &hot, none, 2048, 2048, 0);
        let hot_limit = skewed.iter().find(|l| l.0 == 5).unwrap().1;
        assert_eq!(hot_limit, 2048 - 63 * 4);
        assert!(skewed.iter().filter(|l| l.0 != 5).all(|l| l.1 == 4));
        let all: HashSet<i16> = parts.iter().copied().collect();
        assert_eq!(share(&parts, &all, none, 2048, 2048, 0), even);
    }

    #[test]
    fn partitions_are_topped_up_to_their_share_and_the_read_is_cut_to_what_was_asked() {
        let parts: Vec<i16> = (0..4).collect();
        // Partition 0 has its whole share in hand, 1 half of it: 0 is not read at all.
        let held = |p: i16| match p {
            0 => 100,
            1 => 50,
            _ => 0,
        };
        let limits = share(&parts, &HashSet::new(), held, 400, 400, 0);
        assert_eq!(limits, vec![(1, 50), (2, 100), (3, 100)]);
        // Asked for less: every partition's part shrinks in proportion, none to nothing.
        let cut = share(&parts, &HashSet::new(), held, 400, 50, 0);
        assert_eq!(cut, vec![(1, 10), (2, 20), (3, 20)]);
        let total: u32 = cut.iter().map(|l| l.1).sum();
        assert!(total <= 50, "{cut:?}");
    }

    #[test]
    fn a_read_never_takes_more_rows_than_asked_and_the_starving_partitions_come_first() {
        // A window of one row over 64 partitions: one row, from a partition holding none.
        let parts: Vec<i16> = (0..64).collect();
        let held = |p: i16| usize::from(p < 10);
        let one = share(&parts, &HashSet::new(), held, 1, 1, 0);
        assert_eq!(one.len(), 1, "{one:?}");
        assert_eq!(one[0].1, 1);
        assert!(one[0].0 >= 10, "{one:?}");
        // Read after read, every partition equally in need gets its turn.
        let mut read: HashSet<i16> = HashSet::new();
        for turn in 0..64 {
            read.extend(
                share(&parts, &HashSet::new(), |_| 0, 1, 1, turn)
                    .iter()
                    .map(|l| l.0),
            );
        }
        assert_eq!(read.len(), 64, "{read:?}");
        // Whatever is held and asked, the read stays within what was asked.
        for asked in [1, 7, 63, 64, 65, 500, 2000] {
            for window in [1, 100, 2000] {
                let hot: HashSet<i16> = [3, 40].into();
                for h in [&HashSet::new(), &hot] {
                    let limits = share(&parts, h, |p| (p as usize * 7) % 5, window, asked, 5);
                    let total: u32 = limits.iter().map(|l| l.1).sum();
                    assert!(total <= asked, "asked {asked}, window {window}: {limits:?}");
                    assert!(limits.iter().all(|l| l.1 > 0), "{limits:?}");
                }
            }
        }
    }
}
