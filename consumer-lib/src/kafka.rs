//! Consuming Kafka topics in a consumer group with dedup.
//!
//! Each assigned partition gets a lane that handles its messages one at a time (retrying in
//! place), so partition order — and with the relay's keying, per-key order — holds while
//! partitions run concurrently. With [`KafkaSource::with_concurrency`], a partition's lane
//! deals its messages out to that many key lanes instead: per-key order holds, a slow key
//! holds back only itself, and the partition's offset moves past a message only once every
//! message before it is settled. An offset is stored only after the message's transaction
//! committed (or it was a duplicate or dead-lettered), and librdkafka commits stored offsets
//! periodically and when partitions are revoked.
//!
//! **Rebalances.** When a partition is revoked, its lane finishes the message it is handling
//! (never a transaction cut in half) and drops the messages it had queued but not started;
//! their offsets were not stored, so the partition's new owner reads them from the last
//! committed offset. Messages handled but not yet committed come to the new owner again and
//! are skipped as duplicates. While the old lane finishes its last message, the new owner may
//! already be reading the same partition: the two serialise on the dedup row (the second
//! waits for the first transaction, then skips), and each lane goes in offset order, so a
//! message's effect still never happens before the effects of the messages ahead of it.
//! Nothing is lost, nothing is applied twice, per-partition order holds.
//!
//! **Back-pressure per partition.** A lane holds at most 256 messages. When a partition's
//! lane is full (its handler is slow, or a message waits to be retried), that partition's
//! next messages wait in the reader, in order, and a feeder hands them over as the lane
//! makes room; only once 4,096 messages (or 8 MiB of payloads) wait is the partition paused
//! in librdkafka, which stops fetching it, and it resumes once its lane has taken them all.
//! The other partitions keep flowing and the reader keeps polling, so a slow lane never
//! pushes the consumer out of its group (`max.poll.interval.ms`). (librdkafka drops a paused
//! partition's prefetched messages and fetches them again on resume: pausing at every full
//! lane would fetch most messages twice and wait for each fetch.) If a partition is revoked
//! and assigned back while messages wait for its old lane, they are dropped with that lane
//! (their offsets were never stored) and the partition's messages start a new lane.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use rdkafka::{
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    message::{Headers, Message, OwnedMessage},
    ClientConfig, ClientContext, Offset, TopicPartitionList,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{ConsumerError, Deduplicator, Handler, Incoming};

/// How long shutdown waits for the final offset commit.
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(10);

/// Messages a lane may hold before the reader waits for it (bounds memory per partition).
const LANE_CAPACITY: usize = 256;
/// Messages (or payload bytes) read for a partition whose lane is full before the partition
/// is paused.
const OVERFLOW_MESSAGES: usize = 4096;
const OVERFLOW_BYTES: usize = 8 * 1024 * 1024;
/// With key lanes ([`KafkaSource::with_concurrency`]): messages (or payload bytes) of one
/// partition dealt out behind its oldest unsettled message before the partition waits.
const UNSETTLED_MESSAGES: usize = 4096;
const UNSETTLED_BYTES: usize = 8 * 1024 * 1024;

/// Properties [`KafkaSource::with_property`] refuses: setting them would acknowledge
/// messages before their effects committed.
const GUARDED: &[&str] = &["enable.auto.offset.store"];

/// Topics to consume in a consumer group.
#[derive(Debug, Clone)]
pub struct KafkaSource {
    config: ClientConfig,
    topics: Vec<String>,
    concurrency: usize,
}

impl KafkaSource {
    /// Consumes `topics` from the cluster at `brokers` in group `group_id`, from the
    /// earliest offset when the group has none.
    pub fn new(brokers: &str, group_id: &str, topics: &[&str]) -> Self {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        Self {
            config,
            topics: topics.iter().map(|t| t.to_string()).collect(),
            concurrency: 1,
        }
    }

    /// Messages of one partition handled at once, each key in one lane of the partition
    /// (by the `outbox-key` header, else the Kafka key; a message with neither goes to
    /// any lane). Default 1: a partition's messages one at a time, in offset order. With
    /// more, order holds per key, not across the keys of a partition, and the partition's
    /// offset advances past a message only once every message before it is settled.
    pub fn with_concurrency(mut self, lanes: usize) -> Self {
        self.concurrency = lanes.max(1);
        self
    }

    /// Sets a librdkafka consumer property (e.g. `session.timeout.ms`,
    /// `auto.commit.interval.ms`, security settings). `enable.auto.offset.store` is ignored
    /// (with a warning): offsets are stored only after the handler's transaction committed.
    pub fn with_property(mut self, name: &str, value: &str) -> Self {
        if GUARDED.contains(&name) {
            tracing::warn!(
                property = name,
                "ignored: offsets are stored only after the handler's transaction commits"
            );
        } else {
            self.config.set(name, value);
        }
        self
    }

    /// Consumes until `shutdown` fires. Then each lane finishes the message it is handling,
    /// the stored offsets are committed (waiting at most 10 s for Kafka: with the cluster
    /// unreachable, `run` returns without it, and the handled messages come again and are
    /// skipped as duplicates) and the consumer leaves its group; messages read but not
    /// started are left to the group's next owner. Meanwhile it replays the group's dead
    /// letters that an operator asked to replay ([`Deduplicator::serve_replays`]).
    pub async fn run<H: Handler + 'static>(
        &self,
        dedup: Deduplicator,
        handler: Arc<H>,
        shutdown: CancellationToken,
    ) -> Result<(), ConsumerError> {
        let stop_replays = shutdown.child_token();
        let replays = dedup.spawn_replays(handler.clone(), stop_replays.clone());
        // Also stops the replays if this future is dropped midway (an aborted task).
        let stop_replays = stop_replays.drop_guard();
        let result = self.consume(dedup, handler, shutdown).await;
        drop(stop_replays);
        if let Some(replays) = replays {
            let _ = replays.await;
        }
        result
    }

    async fn consume<H: Handler + 'static>(
        &self,
        dedup: Deduplicator,
        handler: Arc<H>,
        shutdown: CancellationToken,
    ) -> Result<(), ConsumerError> {
        let broker = |e: KafkaError| ConsumerError::Broker(e.to_string());
        let lanes = Arc::new(Lanes::default());
        let consumer = Arc::new(ClosingOffThread(Some(
            self.config
                .create_with_context(LaneContext {
                    lanes: lanes.clone(),
                })
                .map_err(broker)?,
        )));
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(broker)?;

        let mut tasks = tokio::task::JoinSet::new();
        let mut error_backoff = outbox::Backoff::new(Duration::from_secs(5));
        // Partitions whose lane is full, with the messages read for them meanwhile (in
        // offset order); a feeder hands these to the lane and says when it is done.
        let mut overflowing: HashMap<(String, i32), Overflow> = HashMap::new();
        let mut overflows = 0u64;
        let (fed_tx, mut fed) = mpsc::unbounded_channel::<((String, i32), u64)>();
        loop {
            // `biased`: a message already taken from librdkafka is always dispatched, never
            // dropped because shutdown fired at the same moment. Rebalances are served
            // inside `recv` (see `LaneContext`).
            let message = tokio::select! {
                biased;
                m = consumer.recv() => m,
                Some((partition, id)) = fed.recv() => {
                    // A feeder of a lane revoked since reports too late: its entry is gone.
                    if overflowing.get(&partition).is_none_or(|o| o.id != id) {
                        continue;
                    }
                    let done = overflowing.remove(&partition).expect("checked above");
                    let rest = done.waiting.lock().expect("overflow lock").take();
                    if rest.messages.is_empty() {
                        if done.paused {
                            let mut list = TopicPartitionList::new();
                            list.add_partition(&partition.0, partition.1);
                            if let Err(e) = consumer.resume(&list) {
                                tracing::debug!(error = %e, partition = partition.1, "resume");
                            }
                            tracing::debug!(topic = %partition.0, partition = partition.1, "lane caught up; partition resumed");
                        }
                    } else {
                        // More arrived while the feeder worked: feed those too.
                        overflows += 1;
                        let overflow = Overflow::start(overflows, done.lane, rest, done.paused);
                        tasks.spawn(overflow.feed(partition.clone(), fed_tx.clone()));
                        overflowing.insert(partition, overflow);
                    }
                    continue;
                }
                _ = shutdown.cancelled() => break,
            };
            let message = match message {
                Ok(m) => {
                    error_backoff.reset();
                    m.detach()
                }
                Err(e) => {
                    let wait = error_backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "Kafka consumer error; continuing");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            };
            let partition = (message.topic().to_owned(), message.partition());
            let sender = lanes.sender(&partition, &shutdown, |rx, stop| {
                tasks.spawn(lane(
                    rx,
                    stop,
                    consumer.clone(),
                    dedup.clone(),
                    handler.clone(),
                    self.concurrency,
                ));
            });
            if let Some(overflow) = overflowing.get_mut(&partition) {
                if overflow.lane.same_channel(&sender) {
                    let over = {
                        let mut waiting = overflow.waiting.lock().expect("overflow lock");
                        waiting.push(message);
                        waiting.over_limit()
                    };
                    // Paused only once the overflow is large: librdkafka drops a paused
                    // partition's prefetched messages and fetches them again on resume, so
                    // pausing at every full lane would fetch most messages twice and wait
                    // for each fetch.
                    if over && !overflow.paused {
                        let mut list = TopicPartitionList::new();
                        list.add_partition(&partition.0, partition.1);
                        if let Err(e) = consumer.pause(&list) {
                            tracing::debug!(error = %e, partition = partition.1, "pause");
                        }
                        overflow.paused = true;
                        tracing::debug!(topic = %partition.0, partition = partition.1, "lane and overflow full; partition paused");
                    }
                    continue;
                }
                // The partition was revoked (its lane closed) and assigned to this consumer
                // again: what waited belongs to the closed lane, which drops it (the offsets
                // were never stored); this message starts the new lane.
                overflowing.remove(&partition);
            }
            match sender.try_send(message) {
                Ok(()) => {}
                // A closed lane was revoked after this message was fetched: the partition's
                // next owner reads it from the committed offset.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(message)) => {
                    let mut waiting = Waiting::default();
                    waiting.push(message);
                    overflows += 1;
                    let overflow = Overflow::start(overflows, sender, waiting, false);
                    tasks.spawn(overflow.feed(partition.clone(), fed_tx.clone()));
                    overflowing.insert(partition, overflow);
                }
            }
        }
        lanes.stop_all();
        while tasks.join_next().await.is_some() {}
        // Commit what the lanes stored (never the fetch position, which may be ahead of
        // what was handled); dropping the consumer then leaves the group (off this thread).
        // The commit waits for the broker, so it runs on a thread of its own, and shutdown
        // waits for it only so long: an uncommitted offset only brings messages again,
        // which dedup skips.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let committing = consumer.clone();
        let spawned = std::thread::Builder::new()
            .name("kafka-consumer-commit".into())
            .spawn(move || {
                let result = committing.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
                let _ = done_tx.send(result);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for the final offset commit; skipping it");
            return Ok(());
        }
        match tokio::time::timeout(FINAL_COMMIT_WAIT, done_rx).await {
            Ok(Ok(Ok(()))) | Ok(Err(_)) => {}
            Ok(Ok(Err(e))) => tracing::debug!(error = %e, "final offset commit"),
            Err(_) => tracing::warn!(
                waited = ?FINAL_COMMIT_WAIT,
                "final offset commit not confirmed by Kafka; stopping without it (messages \
                 handled since the last commit will come again and be skipped as duplicates)"
            ),
        }
        Ok(())
    }
}

/// Messages read for a partition whose lane is full, in offset order.
#[derive(Default)]
struct Waiting {
    messages: VecDeque<OwnedMessage>,
    bytes: usize,
}

impl Waiting {
    fn push(&mut self, m: OwnedMessage) {
        self.bytes += m.payload().map_or(0, <[u8]>::len);
        self.messages.push_back(m);
    }

    fn pop(&mut self) -> Option<OwnedMessage> {
        let m = self.messages.pop_front()?;
        self.bytes -= m.payload().map_or(0, <[u8]>::len);
        Some(m)
    }

    fn take(&mut self) -> Waiting {
        std::mem::take(self)
    }

    /// Past the point where the partition is paused.
    fn over_limit(&self) -> bool {
        self.messages.len() >= OVERFLOW_MESSAGES || self.bytes >= OVERFLOW_BYTES
    }
}

/// A partition's overflow: what waits for its lane, and the lane it waits for.
struct Overflow {
    /// Tells this overflow's feeder report from a later one's.
    id: u64,
    lane: mpsc::Sender<OwnedMessage>,
    waiting: Arc<Mutex<Waiting>>,
    /// Whether the partition was paused in librdkafka (and must be resumed once fed).
    paused: bool,
}

impl Overflow {
    fn start(id: u64, lane: mpsc::Sender<OwnedMessage>, waiting: Waiting, paused: bool) -> Self {
        Self {
            id,
            lane,
            waiting: Arc::new(Mutex::new(waiting)),
            paused,
        }
    }

    /// Hands the waiting messages to the lane as it makes room, then reports the partition
    /// as fed (the reader resumes it, or feeds what arrived meanwhile). Stops early if the
    /// lane closes (revoked or shut down): the rest is read again by the partition's next
    /// owner, from the committed offset.
    fn feed(
        &self,
        partition: (String, i32),
        fed: mpsc::UnboundedSender<((String, i32), u64)>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (id, lane, waiting) = (self.id, self.lane.clone(), self.waiting.clone());
        async move {
            loop {
                let next = waiting.lock().expect("overflow lock").pop();
                let Some(message) = next else { break };
                if lane.send(message).await.is_err() {
                    waiting.lock().expect("overflow lock").take();
                    break;
                }
            }
            let _ = fed.send((partition, id));
        }
    }
}

/// The consumer, closed on a thread of its own when the last handle goes. Closing leaves the
/// group, which waits for the broker: with the broker unreachable or failing, it can take
/// as long as the broker stays so. Done in place it would block the async worker that
/// dropped the last handle (at shutdown, or wherever an aborted task is dropped).
struct ClosingOffThread(Option<StreamConsumer<LaneContext>>);

impl std::ops::Deref for ClosingOffThread {
    type Target = StreamConsumer<LaneContext>;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for ClosingOffThread {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let closing = std::thread::Builder::new()
                .name("kafka-consumer-close".into())
                .spawn(move || drop(consumer));
            if let Err(e) = closing {
                tracing::warn!(error = %e, "no thread to close the Kafka consumer on; closing in place");
            }
        }
    }
}

/// The lanes of the partitions this consumer holds, shared by the reader (which opens them)
/// and the rebalance callback (which closes the revoked ones).
#[derive(Default)]
struct Lanes {
    open: Mutex<HashMap<(String, i32), Lane>>,
}

struct Lane {
    tx: mpsc::Sender<OwnedMessage>,
    stop: CancellationToken,
}

impl Lanes {
    /// The sender of `partition`'s lane, opening one (through `spawn`) if there is none.
    fn sender(
        &self,
        partition: &(String, i32),
        shutdown: &CancellationToken,
        spawn: impl FnOnce(mpsc::Receiver<OwnedMessage>, CancellationToken),
    ) -> mpsc::Sender<OwnedMessage> {
        let mut open = self.open.lock().expect("lanes lock");
        if let Some(lane) = open.get(partition) {
            return lane.tx.clone();
        }
        let (tx, rx) = mpsc::channel(LANE_CAPACITY);
        let stop = shutdown.child_token();
        spawn(rx, stop.clone());
        open.insert(
            partition.clone(),
            Lane {
                tx: tx.clone(),
                stop,
            },
        );
        tx
    }

    /// Closes the lanes of revoked partitions: each finishes its current message and drops
    /// the rest.
    fn revoke(&self, partitions: impl IntoIterator<Item = (String, i32)>) {
        let mut open = self.open.lock().expect("lanes lock");
        for p in partitions {
            if let Some(lane) = open.remove(&p) {
                tracing::info!(topic = %p.0, partition = p.1, "partition revoked; its lane stops after the message in hand");
                lane.stop.cancel();
            }
        }
    }

    fn stop_all(&self) {
        let mut open = self.open.lock().expect("lanes lock");
        for (_, lane) in open.drain() {
            lane.stop.cancel();
        }
    }
}

/// Closes a partition's lane before librdkafka gives the partition up.
struct LaneContext {
    lanes: Arc<Lanes>,
}

impl ClientContext for LaneContext {}

impl ConsumerContext for LaneContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                self.lanes.revoke(
                    list.elements()
                        .iter()
                        .map(|e| (e.topic().to_owned(), e.partition())),
                );
                // Hand the new owner every offset stored so far (librdkafka commits on
                // revoke too; this makes it explicit and does not wait).
                if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Async)
                {
                    tracing::debug!(error = %e, "offset commit on revoke");
                }
            }
            Rebalance::Assign(list) => {
                let partitions: Vec<String> = list
                    .elements()
                    .iter()
                    .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                    .collect();
                tracing::info!(?partitions, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }
}

/// Handles one partition's messages until revoked or shut down: in offset order, or with
/// `concurrency` above 1 in that many key lanes. An offset is stored once its message and
/// every message before it are settled.
async fn lane<H: Handler + 'static>(
    rx: mpsc::Receiver<OwnedMessage>,
    stop: CancellationToken,
    consumer: Arc<ClosingOffThread>,
    dedup: Deduplicator,
    handler: Arc<H>,
    concurrency: usize,
) {
    if concurrency <= 1 {
        crate::lane::run(rx, stop, dedup, handler, incoming, |m| {
            store_next(&consumer, m.topic(), m.partition(), m.offset());
            std::future::ready(())
        })
        .await;
        return;
    }
    key_lanes(rx, stop, consumer, dedup, handler, concurrency).await;
}

/// Stores `offset + 1`, the next offset to read. (`rd_kafka_offset_store` adds one by
/// itself; `rd_kafka_offsets_store` stores a list as given, which leaves no doubt.) A
/// revoked partition's offset is refused; its new owner skips the duplicate.
fn store_next(consumer: &ClosingOffThread, topic: &str, partition: i32, offset: i64) {
    let mut next = TopicPartitionList::new();
    let stored = next
        .add_partition_offset(topic, partition, Offset::Offset(offset + 1))
        .and_then(|()| consumer.store_offsets(&next));
    if let Err(e) = stored {
        tracing::debug!(error = %e, partition, "offset not stored");
    }
}

/// One partition's messages over `n` lanes by key. The partition's messages are dealt out in
/// offset order; each lane handles its own in that order, so a slow or failing key holds
/// back only itself, until 4,096 messages (or 8 MiB of payloads) of the partition wait
/// behind its oldest unsettled one. When the lanes stop (revoked or shut down), each
/// finishes the message in hand and drops the rest; the offset stored is the one before the
/// first message not settled, so the partition's next owner reads every unsettled message
/// again (and skips, as duplicates, those after it that were settled).
async fn key_lanes<H: Handler + 'static>(
    mut rx: mpsc::Receiver<OwnedMessage>,
    stop: CancellationToken,
    consumer: Arc<ClosingOffThread>,
    dedup: Deduplicator,
    handler: Arc<H>,
    n: usize,
) {
    let settled = Arc::new(Mutex::new(Settled::default()));
    let room = Arc::new(tokio::sync::Notify::new());
    let mut lanes = Vec::with_capacity(n);
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..n {
        // As long as the partition's bound: a send never waits for one lane while another
        // could go on. (The channel allocates as it fills.)
        let (tx, lane_rx) = mpsc::channel::<OwnedMessage>(UNSETTLED_MESSAGES);
        lanes.push(tx);
        let (consumer, settled, room) = (consumer.clone(), settled.clone(), room.clone());
        running.spawn(crate::lane::run(
            lane_rx,
            stop.clone(),
            dedup.clone(),
            handler.clone(),
            incoming,
            move |m: OwnedMessage| {
                // Under the lock, so that a later store never lands before an earlier one.
                let mut settled = settled.lock().expect("settled lock");
                if let Some(upto) = settled.settle(m.offset()) {
                    store_next(&consumer, m.topic(), m.partition(), upto);
                    room.notify_one();
                }
                std::future::ready(())
            },
        ));
    }
    'deal: loop {
        let message = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        loop {
            let freed = room.notified();
            if !settled.lock().expect("settled lock").full() {
                break;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break 'deal,
                _ = freed => {}
            }
        }
        settled
            .lock()
            .expect("settled lock")
            .dealt(message.offset(), message.payload().map_or(0, <[u8]>::len));
        let lane = key_lane(&message, n);
        if lanes[lane].try_send(message).is_err() {
            break; // the lane stopped
        }
    }
    drop(lanes);
    while running.join_next().await.is_some() {}
}

/// The lane of a message: by its `outbox-key` header, else its Kafka key, else its offset.
fn key_lane(m: &OwnedMessage, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let header = m.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == outbox::wire::HEADER_KEY)
            .and_then(|h| h.value)
    });
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match header.or_else(|| m.key()) {
        Some(key) => key.hash(&mut h),
        None => m.offset().hash(&mut h),
    }
    (h.finish() % lanes as u64) as usize
}

/// A partition's offsets dealt out to its key lanes, in order, and which of them are
/// settled: the partition may move past an offset only once every one before it is.
#[derive(Default)]
struct Settled {
    /// Dealt and not yet passed, in offset order, with whether each is settled and its
    /// payload's size.
    offsets: VecDeque<(i64, bool, usize)>,
    bytes: usize,
}

impl Settled {
    fn dealt(&mut self, offset: i64, bytes: usize) {
        self.offsets.push_back((offset, false, bytes));
        self.bytes += bytes;
    }

    /// Marks `offset` settled; returns the highest offset now settled with every one before
    /// it, if that moved.
    fn settle(&mut self, offset: i64) -> Option<i64> {
        if let Ok(i) = self.offsets.binary_search_by_key(&offset, |e| e.0) {
            self.offsets[i].1 = true;
        }
        let mut upto = None;
        while let Some(&(o, true, bytes)) = self.offsets.front() {
            upto = Some(o);
            self.bytes -= bytes;
            self.offsets.pop_front();
        }
        upto
    }

    /// As much of the partition as may wait behind its oldest unsettled message.
    fn full(&self) -> bool {
        self.offsets.len() >= UNSETTLED_MESSAGES || self.bytes >= UNSETTLED_BYTES
    }
}

/// The message as the handling step sees it: headers as strings (lossy UTF-8), the id from
/// `outbox-id`, the key from `outbox-key` or else the Kafka message key.
pub fn incoming(m: &OwnedMessage) -> Incoming {
    let mut headers = BTreeMap::new();
    if let Some(h) = m.headers() {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            headers.insert(header.key.to_owned(), value);
        }
    }
    let mut incoming = Incoming::new(m.topic(), m.payload().unwrap_or_default().to_vec(), headers);
    if incoming.key.is_none() {
        incoming.key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
    }
    incoming
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rdkafka::Timestamp;

    use super::*;

    fn message(offset: i64, bytes: usize) -> OwnedMessage {
        OwnedMessage::new(
            Some(vec![0; bytes]),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    #[test]
    fn a_partition_moves_past_an_offset_only_once_every_earlier_one_is_settled() {
        let mut settled = Settled::default();
        for offset in 10..15 {
            settled.dealt(offset, 100);
        }
        assert_eq!(settled.settle(12), None, "10 and 11 are not settled");
        assert_eq!(settled.settle(11), None, "10 is not settled");
        assert_eq!(settled.bytes, 500, "nothing passed yet");
        assert_eq!(settled.settle(10), Some(12));
        assert_eq!(settled.bytes, 200);
        assert_eq!(settled.settle(14), None, "13 is not settled");
        assert_eq!(settled.settle(13), Some(14));
        assert!(settled.offsets.is_empty());
        assert_eq!(settled.bytes, 0);
    }

    #[test]
    fn a_partition_waits_once_enough_is_dealt_behind_its_oldest_unsettled_message() {
        let mut by_count = Settled::default();
        for offset in 0..UNSETTLED_MESSAGES as i64 - 1 {
            by_count.dealt(offset, 1);
        }
        assert!(!by_count.full());
        by_count.dealt(UNSETTLED_MESSAGES as i64, 1);
        assert!(by_count.full());
        by_count.settle(0);
        assert!(!by_count.full(), "the oldest settled: one passed");

        let mut by_bytes = Settled::default();
        by_bytes.dealt(0, UNSETTLED_BYTES - 1);
        assert!(!by_bytes.full());
        by_bytes.dealt(1, 1);
        assert!(by_bytes.full());
    }

    #[test]
    fn a_key_always_goes_to_the_same_lane() {
        let keyed = |key: &str, offset: i64| {
            OwnedMessage::new(
                None,
                Some(key.as_bytes().to_vec()),
                "t".into(),
                Timestamp::NotAvailable,
                0,
                offset,
                None,
            )
        };
        let lanes: HashSet<usize> = (0..50).map(|o| key_lane(&keyed("k-7", o), 8)).collect();
        assert_eq!(lanes.len(), 1);
        let spread: HashSet<usize> = (0..200)
            .map(|k| key_lane(&keyed(&format!("k-{k}"), 0), 8))
            .collect();
        assert_eq!(spread.len(), 8, "200 keys use every lane");
    }

    #[test]
    fn an_overflow_keeps_offset_order_and_counts_its_payload_bytes() {
        let mut waiting = Waiting::default();
        for offset in 0..3 {
            waiting.push(message(offset, 100));
        }
        assert_eq!(waiting.bytes, 300);
        assert_eq!(waiting.pop().map(|m| m.offset()), Some(0));
        assert_eq!(waiting.bytes, 200);
        let rest = waiting.take();
        assert_eq!((waiting.messages.len(), waiting.bytes), (0, 0));
        let offsets: Vec<i64> = rest.messages.iter().map(|m| m.offset()).collect();
        assert_eq!((offsets, rest.bytes), (vec![1, 2], 200));
    }

    #[test]
    fn an_overflow_is_over_its_limit_by_messages_or_by_bytes() {
        let mut by_count = Waiting::default();
        for offset in 0..OVERFLOW_MESSAGES as i64 - 1 {
            by_count.push(message(offset, 1));
        }
        assert!(!by_count.over_limit());
        by_count.push(message(OVERFLOW_MESSAGES as i64, 1));
        assert!(by_count.over_limit());

        let mut by_bytes = Waiting::default();
        by_bytes.push(message(0, OVERFLOW_BYTES - 1));
        assert!(!by_bytes.over_limit());
        by_bytes.push(message(1, 1));
        assert!(
            by_bytes.over_limit(),
            "two messages, {} bytes",
            by_bytes.bytes
        );
    }
}
