//! Consuming Kafka topics in a consumer group with dedup.
//!
//! Each assigned partition gets a lane that handles its messages one at a time (retrying in
//! place), so partition order — and with the relay's keying, per-key order — holds while
//! partitions run concurrently. An offset is stored only after the message's transaction
//! committed (or it was a duplicate or dead-lettered), and librdkafka commits stored offsets
//! (periodically and on rebalance). After a rebalance the new owner of a partition starts at
//! the last committed offset: messages handled but not yet committed come again and are
//! skipped as duplicates, so nothing is lost and nothing is applied twice.

use std::{collections::HashMap, sync::Arc, time::Duration};

use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    message::{Headers, Message, OwnedMessage},
    ClientConfig,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{ConsumerError, Deduplicator, Handler, Incoming};

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

    /// Sets a librdkafka consumer property (e.g. `session.timeout.ms`, security settings).
    /// `enable.auto.offset.store` stays false: offsets are stored only after commit.
    pub fn with_property(mut self, name: &str, value: &str) -> Self {
        if name != "enable.auto.offset.store" {
            self.config.set(name, value);
        }
        self
    }

    /// Consumes until `shutdown` fires; messages being handled then are finished and their
    /// offsets committed before returning.
    pub async fn run<H: Handler + 'static>(
        &self,
        dedup: Deduplicator,
        handler: Arc<H>,
        shutdown: CancellationToken,
    ) -> Result<(), ConsumerError> {
        let broker = |e: rdkafka::error::KafkaError| ConsumerError::Broker(e.to_string());
        let consumer: Arc<StreamConsumer> = Arc::new(self.config.create().map_err(broker)?);
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(broker)?;

        let mut lanes: HashMap<(String, i32), mpsc::Sender<OwnedMessage>> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            // `biased`: a message already taken from librdkafka is always dispatched, never
            // dropped because shutdown fired at the same moment.
            let message = tokio::select! {
                biased;
                m = consumer.recv() => m,
                _ = shutdown.cancelled() => break,
            };
            let message = match message {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka consumer error; continuing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let lane_key = (message.topic().to_owned(), message.partition());
            let sender = lanes.entry(lane_key).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(256);
                tasks.spawn(lane(rx, consumer.clone(), dedup.clone(), handler.clone()));
                tx
            });
            if sender.send(message).await.is_err() {
                return Err(ConsumerError::Broker("a partition lane stopped".into()));
            }
        }
        lanes.clear();
        while tasks.join_next().await.is_some() {}
        // Commit what the lanes stored (never the fetch position, which may be ahead of
        // what was handled); closing the consumer then leaves the group.
        if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit");
        }
        Ok(())
    }
}

async fn lane<H: Handler + 'static>(
    mut rx: mpsc::Receiver<OwnedMessage>,
    consumer: Arc<StreamConsumer>,
    dedup: Deduplicator,
    handler: Arc<H>,
) {
    while let Some(m) = rx.recv().await {
        dedup
            .handle_until_settled(&incoming(&m), handler.as_ref())
            .await;
        // Stored offsets are committed by librdkafka; a revoked partition's offset may be
        // refused, and the new owner skips the duplicate.
        if let Err(e) = consumer.store_offset(m.topic(), m.partition(), m.offset() + 1) {
            tracing::debug!(error = %e, partition = m.partition(), "offset not stored");
        }
    }
}

/// The message as the handling step sees it.
pub fn incoming(m: &OwnedMessage) -> Incoming {
    let mut headers = std::collections::BTreeMap::new();
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
