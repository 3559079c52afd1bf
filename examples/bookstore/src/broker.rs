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
                Connection, ConnectionProperties,
            };
            let conn = Connection::connect(
                url,
                ConnectionProperties::default()
                    .with_executor(tokio_executor_trait::Tokio::current())
                    .with_reactor(tokio_reactor_trait::Tokio),
            )
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", tools::redact(url)))?;
            let channel = conn.create_channel().await?;
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

/// Runs a consumer of `topic` for `dedup`'s group until `shutdown`.
pub fn consume<H: Handler + 'static>(
    cfg: &Config,
    topic: &str,
    dedup: Deduplicator,
    handler: Arc<H>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), ConsumerError>> {
    let shutdown = shutdown.clone();
    match &cfg.broker {
        Broker::RabbitMq { url } => {
            let source = RabbitMqSource::new(url.clone(), topic).with_concurrency(4);
            tokio::spawn(async move { source.run(dedup, handler, shutdown).await })
        }
        Broker::Kafka { brokers } => {
            let group_id = format!("{}-{}", cfg.namespace, dedup.group());
            let source = KafkaSource::new(brokers, &group_id, &[topic]);
            tokio::spawn(async move { source.run(dedup, handler, shutdown).await })
        }
    }
}
