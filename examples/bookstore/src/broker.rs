//! The broker between the services: queues or topics, and the consumers' sources.

use std::sync::Arc;

use anyhow::{bail, Context};
use outbox_consumer::{
    kafka::KafkaSource, rabbitmq::RabbitMqSource, ConsumerError, Deduplicator, Handler,
};
use tokio_util::sync::CancellationToken;

use crate::{tools, Broker, Config};

/// RabbitMQ: declares the queues the relay publishes to (the default exchange routes a topic
/// to the queue of its name) and empties them. Kafka: creates the topics (3 partitions).
pub async fn prepare(broker: &Broker, topics: &[&str]) -> anyhow::Result<()> {
    match broker {
        Broker::RabbitMq { url } => {
            use lapin::{
                options::{QueueDeclareOptions, QueuePurgeOptions},
                types::FieldTable,
            };
            let (conn, channel) = rabbitmq(url).await?;
            for topic in topics {
                channel
                    .queue_declare(
                        topic,
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_purge(topic, QueuePurgeOptions::default())
                    .await?;
            }
            let _ = conn.close(200, "queues declared").await;
        }
        Broker::Kafka { brokers } => {
            use rdkafka::{
                admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
                client::DefaultClientContext,
                types::RDKafkaErrorCode,
                ClientConfig,
            };
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .create()?;
            let new: Vec<NewTopic> = topics
                .iter()
                .map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(1)))
                .collect();
            for r in admin.create_topics(&new, &AdminOptions::new()).await? {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, e)) => bail!("creating Kafka topic {t}: {e}"),
                }
            }
        }
    }
    Ok(())
}

/// Runs a consumer of `topics` for `dedup`'s group until `shutdown`: on RabbitMQ one source
/// per queue, on Kafka one source for them all.
pub fn consume<H: Handler + 'static>(
    cfg: &Config,
    topics: &[&str],
    dedup: Deduplicator,
    handler: Arc<H>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), ConsumerError>> {
    let shutdown = shutdown.clone();
    match &cfg.broker {
        Broker::RabbitMq { url } => {
            let sources: Vec<RabbitMqSource> = topics
                .iter()
                .map(|t| RabbitMqSource::new(url.clone(), *t).with_concurrency(4))
                .collect();
            tokio::spawn(async move {
                let runs = sources
                    .iter()
                    .map(|s| s.run(dedup.clone(), handler.clone(), shutdown.clone()));
                futures::future::join_all(runs).await.into_iter().collect()
            })
        }
        Broker::Kafka { brokers } => {
            let source = KafkaSource::new(brokers, &kafka_group(cfg, dedup.group()), topics);
            tokio::spawn(async move { source.run(dedup, handler, shutdown).await })
        }
    }
}

/// Loses what was delivered to `topic` and not consumed yet by `dedup_group`, after the
/// broker confirmed it. RabbitMQ: the queue is purged, as an operator's mistake would.
/// Kafka: a member of the group reads what the group has not committed and commits it
/// without handling it, as a consumer that acknowledges first and then crashes would.
/// Returns how many messages were lost.
pub async fn lose(cfg: &Config, topic: &str, dedup_group: &str) -> anyhow::Result<u64> {
    match &cfg.broker {
        Broker::RabbitMq { url } => {
            let (conn, channel) = rabbitmq(url).await?;
            let purged = channel
                .queue_purge(topic, lapin::options::QueuePurgeOptions::default())
                .await?;
            let _ = conn.close(200, "queue purged").await;
            Ok(u64::from(purged))
        }
        Broker::Kafka { brokers } => {
            use rdkafka::{
                consumer::{CommitMode, Consumer, StreamConsumer},
                message::Message,
                ClientConfig, Offset, TopicPartitionList,
            };
            let consumer: StreamConsumer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("group.id", kafka_group(cfg, dedup_group))
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .create()?;
            consumer.subscribe(&[topic])?;
            let mut next = std::collections::BTreeMap::new();
            let mut lost = 0;
            // The first message waits for the group to take this member in; the topic has
            // been read to its end once nothing more comes for a while.
            let mut wait = std::time::Duration::from_secs(20);
            while let Ok(m) = tokio::time::timeout(wait, consumer.recv()).await {
                let m = m?;
                next.insert(m.partition(), m.offset() + 1);
                lost += 1;
                wait = std::time::Duration::from_secs(2);
            }
            let mut offsets = TopicPartitionList::new();
            for (partition, offset) in next {
                offsets.add_partition_offset(topic, partition, Offset::Offset(offset))?;
            }
            if offsets.count() > 0 {
                consumer.commit(&offsets, CommitMode::Sync)?;
            }
            Ok(lost)
        }
    }
}

/// A connection to RabbitMQ at `url` and a channel on it, for the story's own housekeeping.
async fn rabbitmq(url: &str) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(
        url,
        lapin::ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
    )
    .await
    .with_context(|| format!("connecting to RabbitMQ at {}", tools::redact(url)))?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

/// The Kafka consumer group of a dedup group in this run.
fn kafka_group(cfg: &Config, dedup_group: &str) -> String {
    format!("{}-{dedup_group}", cfg.namespace)
}
