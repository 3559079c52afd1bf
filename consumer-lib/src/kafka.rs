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
//! **Back-pressure per partition.** Each assigned partition's messages come through a
//! queue of its own, split off before librdkafka starts fetching it, and a lane holds at
//! most 256 of them. When a lane is full (its handler is slow, or a message waits to be
//! retried), its partition's messages wait in librdkafka, which stops fetching that
//! partition at its prefetch limits (`queued.min.messages`, `queued.max.messages.kbytes`),
//! while the other partitions keep flowing. Nothing fetched is thrown away (pausing a
//! partition would drop its prefetched messages and fetch them again), and the reader
//! keeps polling the consumer, so a slow lane never pushes it out of its group
//! (`max.poll.interval.ms`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use rdkafka::{
    consumer::{
        stream_consumer::StreamPartitionQueue, BaseConsumer, Consumer, ConsumerContext, Rebalance,
        StreamConsumer,
    },
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

/// librdkafka's prefetch limit per partition (`queued.max.messages.kbytes`), in KiB: 4 MiB
/// instead of its default of 64 MiB, which applies per partition once partitions have
/// queues of their own.
const PREFETCH_KBYTES_PER_PARTITION: &str = "4096";

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
    /// earliest offset when the group has none, prefetching at most 4 MiB per partition
    /// (`queued.max.messages.kbytes`).
    pub fn new(brokers: &str, group_id: &str, topics: &[&str]) -> Self {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Each partition has a queue of its own, and this prefetch limit applies to each.
            .set("queued.max.messages.kbytes", PREFETCH_KBYTES_PER_PARTITION);
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
        let (opened_tx, mut opened) = mpsc::unbounded_channel();
        let context = LaneContext {
            lanes: Lanes::default(),
            consumer: OnceLock::new(),
            shutdown: shutdown.clone(),
            opened: opened_tx,
        };
        let consumer: Arc<StreamConsumer<LaneContext>> =
            Arc::new(self.config.create_with_context(context).map_err(broker)?);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let consumer = Arc::new(OffThread::new(consumer));
        // However this ends (returned, or dropped midway), the queue handles go, and with
        // them the cycle through the consumer's context.
        let _forget_queues = ForgetQueues(consumer.clone());
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(broker)?;

        let mut tasks = tokio::task::JoinSet::new();
        let mut error_backoff = Duration::from_millis(100);
        // Polling the consumer's own queue serves rebalances and tells librdkafka the
        // application is alive; the tick does so while every lane is busy and no event
        // comes, so lanes slowed by their handlers never push the consumer out of its group
        // (`max.poll.interval.ms`).
        let mut alive = tokio::time::interval(Duration::from_secs(1));
        alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // `biased`: a message already taken from librdkafka is always dispatched, never
            // dropped because shutdown fired at the same moment. Rebalances are served
            // inside `recv` (see `LaneContext`).
            let message = tokio::select! {
                biased;
                m = consumer.recv() => m,
                Some(opened) = opened.recv() => {
                    let Opened { tx, rx, stop, queue } = opened;
                    if let Some(queue) = queue {
                        tasks.spawn(pump(queue, tx, stop.clone()));
                    }
                    tasks.spawn(lane(rx, stop, consumer.clone(), dedup.clone(), handler.clone()));
                    continue;
                }
                _ = alive.tick() => continue,
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
            // A partition's messages come through its own queue (see `LaneContext`); one
            // whose queue could not be split comes here, and goes to its lane in order.
            let partition = (message.topic().to_owned(), message.partition());
            let Some(sender) = consumer.context().lanes.sender(&partition) else {
                // Not (or no longer) assigned: the partition's owner reads it from the
                // committed offset.
                continue;
            };
            tokio::select! {
                biased;
                // A closed lane was revoked after this message was fetched: the partition's
                // next owner reads it from the committed offset.
                _ = sender.send(message) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        consumer.context().lanes.stop_all();
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

/// Moves a partition's messages from its librdkafka queue to its lane, in offset order,
/// until the lane stops. While the lane is full this waits, and librdkafka stops fetching
/// the partition once its queue holds `queued.min.messages` or `queued.max.messages.kbytes`:
/// back-pressure per partition, with nothing fetched thrown away and fetched again (which
/// pausing the partition would do).
async fn pump(
    queue: Arc<PartitionQueue>,
    lane: mpsc::Sender<OwnedMessage>,
    stop: CancellationToken,
) {
    let mut error_backoff = Duration::from_millis(100);
    loop {
        let message = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            m = queue.recv() => m,
        };
        match message {
            Ok(m) => {
                error_backoff = Duration::from_millis(100);
                let m = m.detach();
                tokio::select! {
                    biased;
                    // Stopped (revoked or shut down): the lane drops what it had not started,
                    // and the partition's next owner reads it from the committed offset.
                    _ = stop.cancelled() => break,
                    sent = lane.send(m) => if sent.is_err() { break },
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?error_backoff, "Kafka partition error; continuing");
                tokio::select! {
                    _ = tokio::time::sleep(error_backoff) => {}
                    _ = stop.cancelled() => break,
                }
                error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Drops the consumer's partition queue handles when dropped.
struct ForgetQueues(Arc<OffThread<Arc<StreamConsumer<LaneContext>>>>);

impl Drop for ForgetQueues {
    fn drop(&mut self) {
        self.0.context().lanes.forget_queues();
    }
}

/// Something holding the consumer (a handle, or a partition queue, which holds one),
/// dropped on a thread of its own. Dropping the last handle closes the consumer, which
/// leaves the group and waits for the broker: with the broker unreachable or failing, it
/// can take as long as the broker stays so. Done in place it would block the async worker
/// that dropped it (at shutdown, or wherever an aborted task is dropped).
struct OffThread<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> OffThread<T> {
    fn new(value: T) -> Self {
        Self(Some(value))
    }
}

impl<T: Send + 'static> std::ops::Deref for OffThread<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> Drop for OffThread<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            let closing = std::thread::Builder::new()
                .name("kafka-consumer-close".into())
                .spawn(move || drop(value));
            if let Err(e) = closing {
                tracing::warn!(error = %e, "no thread to close the Kafka consumer on; closing in place");
            }
        }
    }
}

/// A partition's own queue. Its handle wraps librdkafka's queue of the partition, whose
/// wake-up callback is set when the handle is made and cleared when it is dropped.
type PartitionQueue = OffThread<StreamPartitionQueue<LaneContext>>;

/// The lanes of the partitions this consumer holds, opened and closed by the rebalance
/// callback, and the partitions' queues.
#[derive(Default)]
struct Lanes {
    open: Mutex<HashMap<(String, i32), Lane>>,
    /// Every partition's queue handle, kept from its first assignment until the consumer
    /// stops and used again when the partition comes back. A second handle would set the
    /// queue's wake-up callback anew, and the first one, dropped later, would clear it
    /// under the second: its lane would never be woken again.
    queues: Mutex<HashMap<(String, i32), Arc<PartitionQueue>>>,
}

struct Lane {
    tx: mpsc::Sender<OwnedMessage>,
    stop: CancellationToken,
}

/// A lane just opened, for the reader to start: its messages, its stop, and the partition's
/// own queue that feeds it (none if it could not be split off).
struct Opened {
    tx: mpsc::Sender<OwnedMessage>,
    rx: mpsc::Receiver<OwnedMessage>,
    stop: CancellationToken,
    queue: Option<Arc<PartitionQueue>>,
}

impl Lanes {
    /// Opens a lane for `partition` unless it has one.
    fn open(
        &self,
        partition: &(String, i32),
        shutdown: &CancellationToken,
        queue: Option<Arc<PartitionQueue>>,
    ) -> Option<Opened> {
        let mut open = self.open.lock().expect("lanes lock");
        if open.contains_key(partition) {
            return None;
        }
        let (tx, rx) = mpsc::channel(LANE_CAPACITY);
        let stop = shutdown.child_token();
        open.insert(
            partition.clone(),
            Lane {
                tx: tx.clone(),
                stop: stop.clone(),
            },
        );
        Some(Opened {
            tx,
            rx,
            stop,
            queue,
        })
    }

    /// The sender of `partition`'s lane, if it has one.
    fn sender(&self, partition: &(String, i32)) -> Option<mpsc::Sender<OwnedMessage>> {
        let open = self.open.lock().expect("lanes lock");
        open.get(partition).map(|lane| lane.tx.clone())
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

    /// `partition`'s queue handle, split off by `split` the first time.
    fn queue(
        &self,
        partition: &(String, i32),
        split: impl FnOnce() -> Option<PartitionQueue>,
    ) -> Option<Arc<PartitionQueue>> {
        let mut queues = self.queues.lock().expect("queues lock");
        if let Some(queue) = queues.get(partition) {
            return Some(queue.clone());
        }
        let queue = Arc::new(split()?);
        queues.insert(partition.clone(), queue.clone());
        Some(queue)
    }

    /// Drops the queue handles, which hold the consumer (the consumer holds them in turn,
    /// through its context).
    fn forget_queues(&self) {
        self.queues.lock().expect("queues lock").clear();
    }

    fn stop_all(&self) {
        let mut open = self.open.lock().expect("lanes lock");
        for (_, lane) in open.drain() {
            lane.stop.cancel();
        }
    }
}

/// Opens a partition's lane when it is assigned, and closes it before librdkafka gives the
/// partition up.
///
/// Each assigned partition's messages are split off into a queue of its own before
/// librdkafka starts fetching it (an application's split is kept by the fetcher), so a
/// lane that falls behind holds back only its partition, through librdkafka's own
/// per-partition prefetch limits.
struct LaneContext {
    lanes: Lanes,
    /// The consumer itself, to split partition queues off (set right after creation).
    consumer: OnceLock<Weak<StreamConsumer<LaneContext>>>,
    shutdown: CancellationToken,
    /// Lanes opened, for the reader to start.
    opened: mpsc::UnboundedSender<Opened>,
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
                let this = self.consumer.get().and_then(Weak::upgrade);
                let mut partitions = Vec::new();
                for e in list.elements() {
                    let partition = (e.topic().to_owned(), e.partition());
                    partitions.push(format!("{}[{}]", partition.0, partition.1));
                    if self.lanes.sender(&partition).is_some() {
                        continue;
                    }
                    let queue = self.lanes.queue(&partition, || {
                        this.as_ref()
                            .and_then(|c| c.split_partition_queue(&partition.0, partition.1))
                            .map(OffThread::new)
                    });
                    if queue.is_none() {
                        tracing::warn!(topic = %partition.0, partition = partition.1,
                            "no queue of its own for the partition; its messages come through the consumer's");
                    }
                    if let Some(opened) = self.lanes.open(&partition, &self.shutdown, queue) {
                        let _ = self.opened.send(opened);
                    }
                }
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
    consumer: Arc<OffThread<Arc<StreamConsumer<LaneContext>>>>,
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
