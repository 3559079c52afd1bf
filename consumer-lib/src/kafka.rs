//! Consuming Kafka topics in a consumer group with dedup.
//!
//! Each assigned partition gets a lane that handles its messages one at a time (retrying in
//! place), so partition order — and with the relay's keying, per-key order — holds while
//! partitions run concurrently. An offset is stored only after the message's transaction
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

/// Properties [`KafkaSource::with_property`] refuses: setting them would acknowledge
/// messages before their effects committed.
const GUARDED: &[&str] = &["enable.auto.offset.store"];

/// Topics to consume in a consumer group.
#[derive(Debug, Clone)]
pub struct KafkaSource {
    config: ClientConfig,
    topics: Vec<String>,
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
        }
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
        let mut error_backoff = Duration::from_millis(100);
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
                    error_backoff = Duration::from_millis(100);
                    m.detach()
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?error_backoff, "Kafka consumer error; continuing");
                    tokio::select! {
                        _ = tokio::time::sleep(error_backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
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

/// Handles one partition's messages in offset order until revoked or shut down; an offset
/// is stored once its message is settled.
async fn lane<H: Handler + 'static>(
    rx: mpsc::Receiver<OwnedMessage>,
    stop: CancellationToken,
    consumer: Arc<ClosingOffThread>,
    dedup: Deduplicator,
    handler: Arc<H>,
) {
    crate::lane::run(rx, stop, dedup, handler, incoming, |m| {
        // The stored offset is the next one to read. (`rd_kafka_offset_store` adds one by
        // itself; `rd_kafka_offsets_store` stores a list as given, which leaves no doubt.)
        // A revoked partition's offset is refused; its new owner skips the duplicate.
        let mut next = TopicPartitionList::new();
        let stored = next
            .add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))
            .and_then(|()| consumer.store_offsets(&next));
        if let Err(e) = stored {
            tracing::debug!(error = %e, partition = m.partition(), "offset not stored");
        }
        std::future::ready(())
    })
    .await
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
