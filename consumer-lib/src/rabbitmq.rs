//! Consuming a RabbitMQ queue with dedup.
//!
//! Deliveries are spread over `concurrency` lanes by key (by message id when there is no
//! key); a lane handles its messages one at a time and retries in place, so a key's effects
//! happen in delivery order, while different keys run concurrently. A delivery is acked only
//! after its transaction committed (or it was a duplicate, or it was dead-lettered); a crash
//! before the ack makes RabbitMQ redeliver it, and the dedup row makes that a no-op.
//!
//! Order holds per consumer: several consumers competing on one queue each take some of a
//! key's messages. Run one per queue, or declare the queue with `x-single-active-consumer`
//! so the others stand by and take over (failover without breaking per-key order).

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{ConsumerError, Deduplicator, Handler, Incoming};

/// A queue to consume.
#[derive(Debug, Clone)]
pub struct RabbitMqSource {
    url: String,
    queue: String,
    prefetch: u16,
    concurrency: usize,
    tls: Tls,
    connect_timeout: Duration,
}

/// TLS material for `amqps://` URLs: extra trusted CAs and a client identity. The system's
/// CA store is always trusted as well.
#[derive(Clone, Default)]
pub struct Tls {
    ca_pem: Option<String>,
    identity: Option<(Vec<u8>, String)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("identity", &self.identity.is_some())
            .finish() // never the password
    }
}

impl Tls {
    /// Trust the CA certificates in this PEM text (a private CA), besides the system's.
    pub fn with_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Authenticate with the client certificate and key in this PKCS#12 archive
    /// (`openssl pkcs12 -export -in client.crt -inkey client.key -out client.p12`).
    pub fn with_client_identity(mut self, pkcs12: Vec<u8>, password: impl Into<String>) -> Self {
        self.identity = Some((pkcs12, password.into()));
        self
    }

    fn config(&self) -> lapin::tcp::OwnedTLSConfig {
        lapin::tcp::OwnedTLSConfig {
            identity: self
                .identity
                .as_ref()
                .map(|(der, password)| lapin::tcp::OwnedIdentity {
                    der: der.clone(),
                    password: password.clone(),
                }),
            cert_chain: self.ca_pem.clone(),
        }
    }
}

impl RabbitMqSource {
    /// Consumes `queue` on the broker at `url` (prefetch 100, 4 lanes).
    pub fn new(url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            queue: queue.into(),
            prefetch: 100,
            concurrency: 4,
            tls: Tls::default(),
            connect_timeout: Duration::from_secs(30),
        }
    }

    /// How long connecting may take (the TCP and TLS handshakes, AMQP's, opening the
    /// channel, `basic.qos` and `basic.consume`) before the attempt counts as failed and is
    /// retried with backoff. Default 30 s. A broker that accepts the connection and then
    /// says nothing would otherwise hold the consumer for good.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// TLS settings for an `amqps://` URL (a private CA, a client certificate).
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = tls;
        self
    }

    /// Unacknowledged deliveries the broker may send ahead (basic.qos). Default 100.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Lanes that handle messages concurrently (one key stays in one lane). Default 4.
    pub fn with_concurrency(mut self, lanes: usize) -> Self {
        self.concurrency = lanes.max(1);
        self
    }

    /// Consumes until `shutdown` fires, reconnecting with capped backoff when the broker
    /// goes away. Messages being handled when it fires are finished (committed and acked)
    /// first; deliveries received but not started are left unacked for redelivery. Meanwhile
    /// it replays the group's dead letters that an operator asked to replay
    /// ([`Deduplicator::serve_replays`]).
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
        let result = self.consume(&dedup, &handler, &shutdown).await;
        drop(stop_replays);
        if let Some(replays) = replays {
            let _ = replays.await;
        }
        result
    }

    async fn consume<H: Handler + 'static>(
        &self,
        dedup: &Deduplicator,
        handler: &Arc<H>,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        let mut backoff = outbox::Backoff::new(Duration::from_secs(10));
        while !shutdown.is_cancelled() {
            match self.session(dedup, handler, shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(queue = %self.queue, error = %e, retry_in = ?wait, "RabbitMQ consumer lost; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
            }
        }
        Ok(())
    }

    async fn session<H: Handler + 'static>(
        &self,
        dedup: &Deduplicator,
        handler: &Arc<H>,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        let broker = |e: lapin::Error| ConsumerError::Broker(e.to_string());
        // Given up (timed out, shut down, failed), the attempt shuts its socket, so that
        // lapin's socket thread does not linger on a broker that never answers.
        let attempt = outbox::amqp::Attempt::new(self.connect_timeout);
        let setup = async {
            let connection = attempt
                .connect(&self.url, "outbox-consumer", self.tls.config())
                .await
                .map_err(broker)?;
            let channel = connection.create_channel().await.map_err(broker)?;
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await
                .map_err(broker)?;
            let deliveries = channel
                .basic_consume(
                    &self.queue,
                    "",
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(broker)?;
            Ok::<_, ConsumerError>((connection, deliveries))
        };
        // Neither a broker that never answers nor one asked to stop mid-connect holds it.
        let (connection, mut deliveries) = tokio::select! {
            set_up = tokio::time::timeout(self.connect_timeout, setup) => match set_up {
                Ok(set_up) => set_up?,
                Err(_) => {
                    return Err(ConsumerError::Broker(format!(
                        "RabbitMQ did not finish connecting and starting to consume {:?} within {:?}",
                        self.queue, self.connect_timeout
                    )))
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        // Bound after the consumer, so dropped before it: if this future is dropped midway
        // (its task aborted), the socket is shut at once, and RabbitMQ requeues what this
        // consumer held as it removes it, instead of seeing a `basic.cancel` first and
        // handing the key's next messages to another consumer before those (see
        // `Attempt::shut_on_drop`).
        let _socket = attempt.shut_on_drop();

        // Lanes stop after the delivery in hand when the session ends (shutdown or a lost
        // connection); what they had not started is unacked, and RabbitMQ redelivers it.
        let stop = shutdown.child_token();
        let mut lanes = Vec::with_capacity(self.concurrency);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.concurrency {
            let (tx, rx) = mpsc::channel::<Delivery>(usize::from(self.prefetch));
            lanes.push(tx);
            tasks.spawn(lane(
                rx,
                stop.clone(),
                self.queue.clone(),
                dedup.clone(),
                handler.clone(),
            ));
        }
        let result = loop {
            tokio::select! {
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let lane = lane_of(&delivery, lanes.len());
                        // A full lane (a handler retrying) must not keep shutdown waiting:
                        // a delivery not handed over stays unacked and is redelivered.
                        tokio::select! {
                            sent = lanes[lane].send(delivery) => if sent.is_err() {
                                break Err(ConsumerError::Broker("a handling lane stopped".into()));
                            },
                            _ = shutdown.cancelled() => break Ok(()),
                        }
                    }
                    Some(Err(e)) => break Err(broker(e)),
                    None => break Err(ConsumerError::Broker("the consumer was cancelled by the broker".into())),
                },
                _ = shutdown.cancelled() => break Ok(()),
            }
        };
        stop.cancel();
        drop(lanes);
        while tasks.join_next().await.is_some() {}
        // A connection the broker dropped uncleanly may never answer the close.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            connection.close(200, "outbox-consumer stopping"),
        )
        .await;
        result
    }
}

fn lane_of(d: &Delivery, lanes: usize) -> usize {
    let headers = d.properties.headers();
    let header = |name: &str| match headers.as_ref().and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongString(s)) => Some(s.as_bytes().to_vec()),
        _ => None,
    };
    let mut h = DefaultHasher::new();
    header(outbox::wire::HEADER_KEY)
        .or_else(|| header(crate::MESSAGE_ID_HEADER))
        .unwrap_or_else(|| d.delivery_tag.to_be_bytes().to_vec())
        .hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// Handles one lane's deliveries in order; retries in place; acks after commit. Stops after
/// the delivery in hand once `stop` fires.
async fn lane<H: Handler + 'static>(
    rx: mpsc::Receiver<Delivery>,
    stop: CancellationToken,
    queue: String,
    dedup: Deduplicator,
    handler: Arc<H>,
) {
    let incoming = |d: &Delivery| incoming(&queue, d);
    crate::lane::run(rx, stop, dedup, handler, incoming, |d| async move {
        if let Err(e) = d.ack(BasicAckOptions::default()).await {
            // The channel is gone; the broker redelivers, dedup skips it.
            tracing::warn!(error = %e, "ack failed after commit; the redelivery will be skipped");
        }
    })
    .await
}

/// The delivery as the handling step sees it: headers as strings, the id from `outbox-id`
/// or else the `message-id` property.
pub fn incoming(queue: &str, d: &Delivery) -> Incoming {
    let mut headers = std::collections::BTreeMap::new();
    if let Some(table) = d.properties.headers() {
        for (k, v) in table.inner() {
            let value = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.to_string(),
                other => format!("{other:?}"),
            };
            headers.insert(k.to_string(), value);
        }
    }
    let mut m = Incoming::new(queue, d.data.clone(), headers);
    if m.message_id.is_none() {
        m.message_id = d
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| id.as_str().parse().ok());
    }
    m
}
