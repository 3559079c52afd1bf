//! Kafka through rdkafka: the idempotent producer with `acks=all`.
//!
//! A message is confirmed when its delivery report says it was written (every in-sync
//! replica has it). The outbox key is the Kafka message key, so a key's messages share a
//! partition and per-key order becomes partition order. Delivery failures are classified:
//! a message too large or an invalid topic name is permanent (dead at once, with the
//! broker's reason); a timeout or a transport failure is "broker unavailable" (no attempt
//! counted); idempotent writes refused on the cluster stop the relay; anything else the
//! broker rejected, an unknown topic or one the relay may not see included, counts as a
//! failed attempt and is retried with the relay's policy. A produce request the broker
//! refuses for good fails the whole producer (librdkafka's gapless guarantee): it is
//! replaced, and the request's messages come back as suspects (`Disconnected`), which the
//! relay publishes again one at a time, so that only the refused one is charged.

mod settings;

use std::time::Duration;

use futures::{future::BoxFuture, FutureExt};
use rdkafka::{
    client::ClientContext,
    config::ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer},
    util::Timeout,
};

use secrecy::ExposeSecret;

pub use self::settings::{
    check_kafka_property, is_secret_kafka_property, KafkaRouteSettings, KafkaSettings,
};
use super::{Confirm, PublishError, Publisher};
use crate::{
    envelope::{
        Envelope, HEADER_CONTENT_TYPE, HEADER_ID, HEADER_KEY, HEADER_REPLAY, HEADER_SEQ,
        HEADER_TOPIC,
    },
    route::Template,
    secrets::read_secret_file,
};

/// The producer's client context: librdkafka's client-level errors (a failed TLS
/// handshake, a refused SASL login, all brokers down) are logged and kept, so that a
/// "broker unavailable" names its cause rather than only a delivery timeout.
#[derive(Clone, Default)]
pub struct ClientErrors {
    last: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl ClientErrors {
    /// The last client-level error, if any since the last successful delivery.
    pub fn last(&self) -> Option<String> {
        self.last.lock().expect("lock poisoned").clone()
    }

    fn clear(&self) {
        self.last.lock().expect("lock poisoned").take();
    }
}

impl ClientContext for ClientErrors {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
        }
        // A connection that fails (TLS handshake, SASL login, timeouts) is logged as FAIL
        // without always reaching `error`: keep it as the cause of what follows.
        if fac == "FAIL" && !matches!(level, L::Notice | L::Info | L::Debug) {
            *self.last.lock().expect("lock poisoned") = Some(message.to_owned());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "Kafka client error");
        *self.last.lock().expect("lock poisoned") = Some(reason.to_owned());
    }
}

type RelayProducer = FutureProducer<ClientErrors>;

/// Publishes to one Kafka cluster.
///
/// A key's messages are pipelined ([`Publisher::key_depth`]): each is handed to the
/// producer as soon as the relay starts it, without waiting for the previous confirm.
/// Three settings make that safe. The idempotent producer keeps one partition's messages
/// in order across its retries; `enable.gapless.guarantee` turns any failure that could
/// leave a gap into a fatal producer error, so no message is written after an earlier
/// one of its partition failed; and messages never time out in the producer
/// (`message.timeout.ms = 0`), because a timeout is the one failure the gapless guarantee
/// does not cover. A message the broker does not confirm within `kafka.delivery_timeout`
/// is reported (the broker is unavailable) and stays with the producer, which keeps
/// trying.
pub struct KafkaPublisher {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    errors: ClientErrors,
    producer: std::sync::RwLock<RelayProducer>,
    /// Producers replaced so far (see [`Publisher::generation`]); changed only under the
    /// write lock of `producer`.
    generation: std::sync::atomic::AtomicU64,
    brokers: String,
    max_message_bytes: usize,
    default_topic: Template,
    routes: std::collections::BTreeMap<String, Template>,
    delivery_timeout: Duration,
    /// When a slow delivery was last reported (one warning per `delivery_timeout`).
    warned: std::sync::Mutex<Option<std::time::Instant>>,
}

impl KafkaPublisher {
    /// A producer for validated settings. librdkafka connects in the background; an
    /// unreachable cluster shows up as deliveries that do not come back ("broker
    /// unavailable").
    pub fn new(settings: &KafkaSettings) -> Result<Self, PublishError> {
        let brokers = settings
            .brokers
            .clone()
            .expect("kafka.brokers is checked at load");
        let mut config = ClientConfig::new();
        // Safe defaults first; user properties (checked at load) may tune the rest.
        config
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("linger.ms", "2")
            .set("client.id", "outbox-relay")
            // The Java client's partitioner (murmur2 of the key; unkeyed messages spread at
            // random), so a key lands where a Java or Kafka Streams producer would put it.
            // librdkafka's own default (consistent_random, CRC32) would not.
            .set("partitioner", "murmur2_random")
            .set("queue.buffering.max.messages", "1000000");
        for (name, value) in &settings.properties {
            config.set(name, value);
        }
        for (name, path) in &settings.property_files {
            let value = read_secret_file(&format!("kafka.property_files.\"{name}\""), path)
                .map_err(PublishError::Fatal)?;
            config.set(name, value.expose_secret());
        }
        // What a key's pipelining rests on (see above); refused as user properties.
        config
            .set("enable.gapless.guarantee", "true")
            .set("message.timeout.ms", "0");
        let errors = ClientErrors::default();
        let producer: RelayProducer = config
            .create_with_context(errors.clone())
            .map_err(|e| PublishError::Fatal(format!("cannot create the Kafka producer: {e}")))?;
        let template = |s: &str| Template::parse(s).expect("templates are checked at load");
        let max_message_bytes = settings
            .properties
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        Ok(Self {
            inner: std::sync::Arc::new(Inner {
                config,
                errors,
                max_message_bytes,
                producer: std::sync::RwLock::new(producer),
                generation: std::sync::atomic::AtomicU64::new(0),
                brokers,
                default_topic: template(&settings.topic),
                routes: settings
                    .routes
                    .iter()
                    .map(|(t, r)| (t.clone(), template(&r.topic)))
                    .collect(),
                delivery_timeout: settings.delivery_timeout,
                warned: std::sync::Mutex::new(None),
            }),
        })
    }
}

/// A message handed to the producer: the wait for its delivery report.
struct Sent {
    producer: RelayProducer,
    delivery: rdkafka::producer::DeliveryFuture,
    topic: String,
    seq: i64,
}

impl Inner {
    fn topic_for(&self, env: &Envelope) -> String {
        self.routes
            .get(&env.topic)
            .unwrap_or(&self.default_topic)
            .render(&env.topic, env.key.as_deref())
    }

    /// Hands `env` to the producer (without waiting for anything); with `expected`, only if
    /// the producer is still that generation.
    fn start(&self, env: &Envelope, expected: Option<u64>) -> Result<Sent, PublishError> {
        let topic = self.topic_for(env);
        // librdkafka refuses these too; saying so before sending names the limit.
        let size = env.payload.len()
            + env.key.as_ref().map_or(0, String::len)
            + env
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > self.max_message_bytes {
            return Err(PublishError::TooLarge(format!(
                "too large: the record is about {size} bytes (payload, key and headers), over the \
                 producer's message.max.bytes ({}) (Kafka topic {topic:?})",
                self.max_message_bytes
            )));
        }
        let id = env.id.to_string();
        let seq = env.seq.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(env.headers.len() + 5);
        // Kafka keeps duplicate header names (a consumer reading the first would take a
        // forged one, and some brokers refuse the record), so the relay's own names are left
        // out of the user's: `content-type` too, when the row sets `content_type`.
        let ours = |name: &str| {
            env.content_type.is_some() && name.eq_ignore_ascii_case(HEADER_CONTENT_TYPE)
        };
        for (name, value) in env.wire_headers().filter(|(name, _)| !ours(name)) {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        headers = headers
            .insert(Header {
                key: HEADER_ID,
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: HEADER_TOPIC,
                value: Some(env.wire_topic()),
            })
            .insert(Header {
                key: HEADER_SEQ,
                value: Some(seq.as_str()),
            });
        if let Some(key) = &env.key {
            headers = headers.insert(Header {
                key: HEADER_KEY,
                value: Some(key.as_str()),
            });
        }
        if env.replay_of.is_some() {
            headers = headers.insert(Header {
                key: HEADER_REPLAY,
                value: Some("true"),
            });
        }
        if let Some(ct) = &env.content_type {
            headers = headers.insert(Header {
                key: HEADER_CONTENT_TYPE,
                value: Some(ct.as_str()),
            });
        }
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
            .payload(env.payload.as_slice())
            .headers(headers)
            .timestamp(env.created_at_micros.div_euclid(1000));
        if let Some(key) = &env.key {
            record = record.key(key.as_str());
        }
        let producer = {
            let current = self.producer.read().expect("lock poisoned");
            let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
            if expected.is_some_and(|g| g != generation) {
                return Err(PublishError::Unavailable(
                    "the Kafka producer was replaced while messages handed to the old one were \
                     still out; nothing more goes until they are back"
                        .into(),
                ));
            }
            current.clone()
        };
        match producer.send_result(record) {
            Ok(delivery) => Ok(Sent {
                producer,
                delivery,
                topic,
                seq: env.seq,
            }),
            Err((e, _)) => {
                if let Some((code, reason)) = producer.client().fatal_error() {
                    return Err(self.fatal(&producer, code, &reason));
                }
                Err(self.classify(&e, &topic))
            }
        }
    }

    /// Waits for the delivery report of a message [`Inner::start`] handed over, reporting
    /// the broker unavailable each `delivery_timeout` it takes.
    async fn finish(&self, sent: Sent) -> Result<(), PublishError> {
        let Sent {
            producer,
            mut delivery,
            topic,
            seq,
        } = sent;
        let report = loop {
            tokio::select! {
                report = &mut delivery => break report,
                _ = tokio::time::sleep(self.delivery_timeout) => self.slow(seq, &topic),
            }
        };
        match report {
            Ok(Ok(_)) => {
                self.errors.clear();
                Ok(())
            }
            Ok(Err((e, _))) => {
                if let Some((code, reason)) = producer.client().fatal_error() {
                    let replaced = self.fatal(&producer, code, &reason);
                    // The broker refused the request that carried this message for good,
                    // and librdkafka failed the whole producer over it (its gapless
                    // guarantee). Let go as if the broker were down, the message would
                    // fail every producer after it, for good (a poison message looking like
                    // an outage); charged, so would the others the broker refused in the
                    // same request. So it is a suspect: the relay publishes it again alone,
                    // and a refusal then is its own.
                    if refused_by_broker(&e) && !matches!(replaced, PublishError::Fatal(_)) {
                        return Err(PublishError::Disconnected(format!(
                            "{e} (Kafka topic {topic:?}): the broker refused the request that \
                             carried it, and the producer failed over it and was replaced"
                        )));
                    }
                    return Err(replaced);
                }
                Err(self.classify(&e, &topic))
            }
            Err(_) => Err(PublishError::Unavailable(
                "the Kafka producer dropped the delivery report".into(),
            )),
        }
    }

    /// A delivery report is later than `delivery_timeout`: says so, at most once per
    /// `delivery_timeout`.
    fn slow(&self, seq: i64, topic: &str) {
        let mut warned = self.warned.lock().expect("lock poisoned");
        if warned.is_some_and(|t| t.elapsed() < self.delivery_timeout) {
            return;
        }
        *warned = Some(std::time::Instant::now());
        let cause = match self.errors.last() {
            Some(cause) => format!("; last client error: {cause}"),
            None => String::new(),
        };
        tracing::warn!(
            seq,
            topic,
            "broker unavailable: Kafka at {} has not confirmed the message after {:?}{cause}; \
             it stays with the producer, which keeps trying",
            self.brokers,
            self.delivery_timeout
        );
    }

    /// A producer in a fatal state. Idempotent writes refused on the cluster (librdkafka
    /// makes that fatal when it asks for a producer id) would refuse a new producer too: the
    /// relay stops and names the missing permission. Anything else: [`Inner::renew`].
    fn fatal(&self, failed: &RelayProducer, code: RDKafkaErrorCode, reason: &str) -> PublishError {
        if code == RDKafkaErrorCode::ClusterAuthorizationFailed {
            return self.cluster_refused(reason);
        }
        self.renew(failed, code, reason)
    }

    /// The relay may not write idempotently on this cluster: it stops and says why.
    fn cluster_refused(&self, reason: &str) -> PublishError {
        PublishError::Fatal(format!(
            "Kafka at {} refused the relay's idempotent writes: {reason} (grant its principal \
             IdempotentWrite on the cluster)",
            self.brokers
        ))
    }

    /// An idempotent producer that hit a fatal error (e.g. the broker lost its producer
    /// state, so sequence numbers no longer line up) refuses every later message; only a new
    /// producer can go on. The failed messages are not their own fault: not an attempt.
    fn renew(&self, failed: &RelayProducer, code: RDKafkaErrorCode, reason: &str) -> PublishError {
        let mut current = self.producer.write().expect("lock poisoned");
        if std::ptr::eq(current.client().native_ptr(), failed.client().native_ptr()) {
            match self
                .config
                .create_with_context::<_, RelayProducer>(self.errors.clone())
            {
                Ok(fresh) => {
                    tracing::warn!(error = %reason, code = ?code, "Kafka producer hit a fatal error; replaced it");
                    crate::metrics::broker_reconnected();
                    *current = fresh;
                    self.generation
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) => tracing::error!(error = %e, "cannot replace the Kafka producer"),
            }
        }
        PublishError::Unavailable(format!(
            "Kafka producer fatal error ({code:?}): {reason}; the producer was replaced"
        ))
    }

    fn classify(&self, e: &KafkaError, topic: &str) -> PublishError {
        use RDKafkaErrorCode as C;
        let reason = format!("{e} (Kafka topic {topic:?})");
        match e.rdkafka_error_code() {
            Some(
                C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidRecord
                | C::MessageBatchTooLarge,
            ) => PublishError::Permanent(reason),
            // A topic not created yet, or not yet open to the relay, is an operator's to
            // fix, and may well be fixed soon (a service deployed before its topic): a
            // failed attempt, retried under `retry.*` and then parked, as RabbitMQ's
            // unroutable messages are. Dead at once, each of them would wait for an operator.
            Some(C::UnknownTopic | C::UnknownTopicOrPartition | C::TopicAuthorizationFailed) => {
                PublishError::Rejected(reason)
            }
            // Idempotent writes refused on the whole cluster: no message can go, so the relay
            // stops and says why, rather than parking every message in turn.
            Some(C::ClusterAuthorizationFailed) => self.cluster_refused(&reason),
            Some(C::InvalidTopic) => PublishError::Permanent(reason),
            Some(C::PurgeQueue | C::PurgeInflight) => PublishError::Unavailable(format!(
                "{reason}: let go by the producer (the relay is stopping, or the producer was \
                 replaced)"
            )),
            Some(
                C::MessageTimedOut
                | C::AllBrokersDown
                | C::QueueFull
                | C::RequestTimedOut
                | C::BrokerTransportFailure
                | C::NetworkException,
            ) => PublishError::Unavailable(match self.errors.last() {
                Some(cause) => format!(
                    "Kafka at {}: {reason}; last client error: {cause}",
                    self.brokers
                ),
                None => format!("Kafka at {}: {reason}", self.brokers),
            }),
            Some(C::SaslAuthenticationFailed | C::Authentication) => PublishError::Fatal(format!(
                "Kafka at {} refused the relay: {reason} (check kafka.properties' credentials)",
                self.brokers
            )),
            _ => PublishError::Rejected(reason),
        }
    }
}

/// The broker itself refused the request that carried this message (its answer, not a
/// local failure of the client such as a purge, a timeout or a lost connection), for a reason
/// that is not the producer's own state. Such a refusal can be the message's fault (an invalid
/// record, one over a limit of the broker's, a topic it may not write, or a record the broker
/// fails to store and answers with an unknown error), so the message becomes a suspect.
/// Refusals over the producer's sequence numbers or epoch are the producer's: a new producer
/// fixes them, and the message is let go without suspicion.
fn refused_by_broker(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    let Some(code) = e.rdkafka_error_code() else {
        return false;
    };
    // librdkafka's own errors are below -1 (`Unknown`, -1, is the broker's unknown error).
    let from_broker = code as i32 >= C::Unknown as i32 && code != C::NoError;
    let producer_state = matches!(
        code,
        C::OutOfOrderSequenceNumber
            | C::DuplicateSequenceNumber
            | C::UnknownProducerId
            | C::InvalidProducerEpoch
            | C::InvalidProducerIdMapping
            | C::ProducerFenced
            | C::ClusterAuthorizationFailed
    );
    from_broker && !producer_state
}

impl Publisher for KafkaPublisher {
    fn ready(&self) -> BoxFuture<'_, Result<(), PublishError>> {
        // librdkafka (re)connects on its own; unreachable brokers surface per message.
        async { Ok(()) }.boxed()
    }

    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), PublishError>> {
        match self.send(envelope) {
            Ok(confirm) => confirm,
            Err(e) => async move { Err(e) }.boxed(),
        }
    }

    fn key_depth(&self) -> u32 {
        u32::MAX
    }

    fn send(&self, envelope: &Envelope) -> Result<Confirm, PublishError> {
        let inner = self.inner.clone();
        let sent = inner.start(envelope, None)?;
        Ok(async move { inner.finish(sent).await }.boxed())
    }

    fn generation(&self) -> u64 {
        self.inner
            .generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn send_to(&self, envelope: &Envelope, generation: u64) -> Result<Confirm, PublishError> {
        let inner = self.inner.clone();
        let sent = inner.start(envelope, Some(generation))?;
        Ok(async move { inner.finish(sent).await }.boxed())
    }

    fn stop_sending(&self) {
        // Messages not yet in a request to the broker: never written, so letting them go
        // costs no duplicate; with the cluster unreachable, that is all of them.
        let producer = self.inner.producer.read().expect("lock poisoned").clone();
        producer.purge(rdkafka::producer::PurgeConfig::default().queue());
    }

    fn health(&self) -> BoxFuture<'_, Result<(), String>> {
        async move {
            let producer = self.inner.producer.read().expect("lock poisoned").clone();
            let brokers = self.inner.brokers.clone();
            let errors = self.inner.errors.clone();
            tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(None, Timeout::After(Duration::from_secs(2)))
                    .map(|_| ())
                    .map_err(|e| match errors.last() {
                        Some(cause) => {
                            format!("Kafka at {brokers}: {e}; last client error: {cause}")
                        }
                        None => format!("Kafka at {brokers}: {e}"),
                    })
            })
            .await
            .unwrap_or_else(|e| Err(format!("Kafka health check failed: {e}")))
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            // Called after the last publish: whatever is still out was given up with the
            // grace period (its rows stay pending), so the flush is brief and bounded, and a
            // cluster that stopped answering cannot hold the shutdown.
            let producer = self.inner.producer.read().expect("lock poisoned").clone();
            let _ = tokio::task::spawn_blocking(move || producer.flush(Timeout::After(CLOSE_WAIT)))
                .await;
        }
        .boxed()
    }
}

/// The longest [`Publisher::close`] waits for the producer's last deliveries.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
