//! RabbitMQ through lapin: publisher confirms, `mandatory`, persistent delivery.
//!
//! A message is confirmed only by a broker `basic.ack` without a `basic.return` of it.
//! A return (unroutable), a NACK or a channel closed over this message is a rejection; a
//! lost connection or a missing confirm is "broker unavailable" and the message is
//! released untouched.
//!
//! Concurrency comes from a few channels (`rabbitmq.channels`), each carrying a window of
//! up to `rabbitmq.channel_window` unconfirmed messages; see [`window`] for how a return is
//! matched to its message when the broker acknowledges several at once. The relay never
//! puts two messages of one key at the broker at once (a NACK of one and an ACK of the next
//! could otherwise break the key's order), so a window holds messages of different keys.

mod settings;
mod window;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{future::BoxFuture, FutureExt};
use lapin::{
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    tcp::{OwnedIdentity, OwnedTLSConfig},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Connection,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, oneshot};

pub use self::settings::{AmqpTlsSettings, RabbitMqSettings, RouteSettings};
use super::{PublishError, Publisher};
use crate::{
    envelope::{Envelope, HEADER_ID, HEADER_KEY, HEADER_REPLAY, HEADER_SEQ, HEADER_TOPIC},
    route::{Route, Router, Template},
    secrets::{read_secret_file, redact_url},
};

/// Publishes to one RabbitMQ broker over one connection and a few confirm-mode channels.
pub struct RabbitMqPublisher {
    url: SecretString,
    tls: AmqpTls,
    shown_url: String,
    router: Router,
    confirm_timeout: Duration,
    max_message_size: u64,
    channels: usize,
    channel_window: usize,
    live: Arc<Mutex<Option<Live>>>,
    connecting: tokio::sync::Mutex<()>,
    generations: std::sync::atomic::AtomicU64,
    last_error: Mutex<Option<String>>,
}

struct Live {
    connection: Arc<Connection>,
    generation: u64,
    /// The channel workers' queue; dropping it stops them.
    queue: mpsc::UnboundedSender<window::Job>,
    /// The negotiated largest frame; a message's properties must fit in one.
    frame_max: u32,
}

impl RabbitMqPublisher {
    /// A publisher for validated settings; connects on the first [`Publisher::ready`].
    /// Fails when a password or TLS file cannot be read.
    pub fn new(settings: &RabbitMqSettings) -> Result<Self, PublishError> {
        let url = settings.connection_url().map_err(PublishError::Fatal)?;
        let tls = tls_config(&settings.tls).map_err(PublishError::Fatal)?;
        let template = |s: &str| Template::parse(s).expect("templates are checked at load");
        let routes = settings
            .routes
            .iter()
            .map(|(topic, r)| {
                let route = Route {
                    exchange: template(&r.exchange),
                    routing_key: template(&r.routing_key),
                };
                (topic.clone(), route)
            })
            .collect();
        let default = Route {
            exchange: template(&settings.exchange),
            routing_key: template(&settings.routing_key),
        };
        Ok(Self {
            shown_url: redact_url(url.expose_secret()),
            url,
            tls,
            router: Router::new(default, routes),
            confirm_timeout: settings.confirm_timeout,
            max_message_size: settings.max_message_size,
            channels: usize::from(settings.channels.max(1)),
            channel_window: usize::from(settings.channel_window.max(1)),
            live: Arc::new(Mutex::new(None)),
            connecting: tokio::sync::Mutex::new(()),
            generations: std::sync::atomic::AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    fn connected(&self) -> bool {
        let live = self.live.lock().expect("lock poisoned");
        live.as_ref()
            .is_some_and(|l| l.connection.status().connected())
    }

    /// Drops the connection so that the next `ready` opens a new one.
    fn reset(&self) {
        drop_live(&self.live, None, self.close_wait());
    }

    /// The longest a close waits for the broker's Close-Ok: a broker that stopped answering
    /// (its process stopped, its packets dropped) never sends it, and lapin's heartbeats stop
    /// once closing starts, so an unbounded close would outlive any shutdown grace period.
    fn close_wait(&self) -> Duration {
        self.confirm_timeout.min(CLOSE_WAIT)
    }

    /// Why the broker is not ready, if it blocks the live connection.
    fn blocked(&self) -> Option<String> {
        let live = self.live.lock().expect("lock poisoned");
        live.as_ref()
            .filter(|l| l.connection.status().blocked())
            .map(|_| blocked_reason(&self.shown_url))
    }

    async fn connect(&self) -> Result<(), PublishError> {
        let _one_at_a_time = self.connecting.lock().await;
        if self.connected() {
            return Ok(());
        }
        self.reset();
        // Bounded: a broker that closes the connection during the handshake (or never
        // answers) must not leave the relay waiting forever. An attempt given up shuts its
        // socket, so lapin's socket thread for it ends too.
        let attempt = outbox::amqp::Attempt::new(self.confirm_timeout);
        let connecting =
            attempt.connect(self.url.expose_secret(), "outbox-relay", self.tls.config());
        let connected = match tokio::time::timeout(self.confirm_timeout, connecting).await {
            Ok(result) => result.map_err(|e| self.connect_error(e)),
            Err(_) => Err(PublishError::Unavailable(format!(
                "cannot connect to RabbitMQ at {}: no answer within {}",
                self.shown_url,
                humantime::format_duration(self.confirm_timeout)
            ))),
        };
        let connection = connected.inspect_err(|e| {
            *self.last_error.lock().expect("lock poisoned") = Some(e.to_string());
        })?;
        attempt.keep();
        tracing::info!(url = %self.shown_url, "connected to RabbitMQ");
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if generation > 0 {
            crate::metrics::broker_reconnected();
        }
        crate::metrics::broker_up(true);
        self.last_error.lock().expect("lock poisoned").take();
        let frame_max = connection.configuration().frame_max();
        let connection = Arc::new(connection);
        let live = Arc::downgrade(&self.live);
        let close_wait = self.close_wait();
        let shown_url = self.shown_url.clone();
        let queue = window::start(
            window::Shared {
                connection: connection.clone(),
                shown_url: self.shown_url.clone(),
                confirm_timeout: self.confirm_timeout,
                window: self.channel_window,
                // A worker that finds the connection unusable drops it, unless it has been
                // replaced meanwhile.
                reset: Box::new(move || {
                    if let Some(live) = live.upgrade() {
                        drop_live(&live, Some(generation), close_wait);
                    }
                }),
                blocked: Box::new(move |blocked| {
                    crate::metrics::broker_blocked(blocked);
                    if blocked {
                        tracing::warn!(url = %shown_url, "{}", blocked_reason(&shown_url));
                    } else {
                        tracing::info!(url = %shown_url, "RabbitMQ unblocked publishing; resuming");
                    }
                }),
                close_wait,
            },
            self.channels,
        );
        *self.live.lock().expect("lock poisoned") = Some(Live {
            connection,
            generation,
            queue,
            frame_max: if frame_max == 0 { u32::MAX } else { frame_max },
        });
        Ok(())
    }

    fn connect_error(&self, e: lapin::Error) -> PublishError {
        if let lapin::Error::ProtocolError(amqp) = &e {
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
                    | AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            ) {
                return PublishError::Fatal(format!(
                    "RabbitMQ at {} refused the connection: {amqp} (check rabbitmq.url's user, \
                     password and virtual host)",
                    self.shown_url
                ));
            }
        }
        // An untrusted or mismatched certificate will not fix itself by retrying.
        let text = e.to_string();
        if text.contains("certificate") || text.contains("CertificateRequired") {
            return PublishError::Fatal(format!(
                "TLS with RabbitMQ at {} failed: {text} (check rabbitmq.tls.ca_file, \
                 rabbitmq.tls.client_identity_file and the host name in rabbitmq.url)",
                self.shown_url
            ));
        }
        PublishError::Unavailable(format!(
            "cannot connect to RabbitMQ at {}: {e}",
            self.shown_url
        ))
    }

    async fn publish_one(&self, env: &Envelope) -> Result<(), PublishError> {
        // Checked before the message is queued: a message over the protocol's limits never
        // reaches the connection.
        let (exchange, routing_key) = self.router.resolve(&env.topic, env.key.as_deref());
        let (frame_max, queue) = self
            .live
            .lock()
            .expect("lock poisoned")
            .as_ref()
            .map(|l| (l.frame_max, l.queue.clone()))
            .ok_or_else(not_connected)?;
        check_limits(
            env,
            &exchange,
            &routing_key,
            frame_max,
            self.max_message_size,
        )
        .map_err(PublishError::TooLarge)?;
        let (reply, answer) = oneshot::channel();
        queue
            .send(window::Job {
                exchange,
                routing_key,
                payload: env.payload.clone(),
                properties: properties(env),
                reply,
            })
            .map_err(|_| not_connected())?;
        answer.await.unwrap_or_else(|_| {
            Err(PublishError::Unavailable(
                "the connection to RabbitMQ was replaced before this message was confirmed".into(),
            ))
        })
    }
}

/// The upper bound of [`RabbitMqPublisher::close_wait`].
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What a blocked connection means, for the log and the readiness probe.
fn blocked_reason(shown_url: &str) -> String {
    format!(
        "RabbitMQ at {shown_url} blocked publishing (connection.blocked: the broker is low on \
         memory or disk); waiting for it to clear the alarm, without reconnecting"
    )
}

/// Takes the live connection (only generation `only`'s, when given) and closes it in the
/// background, waiting at most `close_wait` for the broker; its channel workers stop once
/// their queue is answered.
fn drop_live(live: &Mutex<Option<Live>>, only: Option<u64>, close_wait: Duration) {
    let old = {
        let mut live = live.lock().expect("lock poisoned");
        if only.is_some() && live.as_ref().map(|l| l.generation) != only {
            return;
        }
        live.take()
    };
    crate::metrics::broker_up(false);
    if let Some(old) = old {
        drop(old.queue);
        crate::metrics::broker_blocked(false);
        tokio::spawn(async move {
            let closing = old.connection.close(200, "outbox-relay reconnecting");
            let _ = tokio::time::timeout(close_wait, closing).await;
        });
    }
}

impl Publisher for RabbitMqPublisher {
    fn ready(&self) -> BoxFuture<'_, Result<(), PublishError>> {
        async move {
            if self.connected() {
                Ok(())
            } else {
                self.connect().await
            }
        }
        .boxed()
    }

    fn publish<'a>(&'a self, envelope: &'a Envelope) -> BoxFuture<'a, Result<(), PublishError>> {
        self.publish_one(envelope).boxed()
    }

    fn health(&self) -> BoxFuture<'_, Result<(), String>> {
        async move {
            // Read here too, so the gauge is right while nothing is being published.
            let blocked = self.blocked();
            crate::metrics::broker_blocked(blocked.is_some());
            if let Some(blocked) = blocked {
                return Err(blocked);
            }
            if self.connected() {
                return Ok(());
            }
            Err(self
                .last_error
                .lock()
                .expect("lock poisoned")
                .clone()
                .unwrap_or_else(|| format!("not connected to RabbitMQ at {}", self.shown_url)))
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            let live = self.live.lock().expect("lock poisoned").take();
            if let Some(live) = live {
                drop(live.queue);
                let closing = live.connection.close(200, "outbox-relay shutting down");
                if tokio::time::timeout(self.close_wait(), closing)
                    .await
                    .is_err()
                {
                    tracing::warn!(url = %self.shown_url, wait = ?self.close_wait(),
                        "RabbitMQ did not answer the connection close; leaving it");
                }
            }
        }
        .boxed()
    }
}

fn not_connected() -> PublishError {
    PublishError::Unavailable("not connected to RabbitMQ".into())
}

/// AMQP's limit on short strings (exchange, routing key, header names, content type).
const SHORT_STRING_MAX: usize = 255;
/// Room taken in the content header frame by everything but the header table: frame
/// envelope, class, weight, body size, property flags, and the fixed properties.
const PROPERTIES_OVERHEAD: usize = 512;

/// Refuses a message that breaks AMQP 0-9-1's limits, naming the limit: a short string
/// over 255 bytes, properties that do not fit one frame (`frame_max`), or a payload over
/// `max_message_size`. RabbitMQ answers some of these by closing the whole connection.
fn check_limits(
    env: &Envelope,
    exchange: &str,
    routing_key: &str,
    frame_max: u32,
    max_message_size: u64,
) -> Result<(), String> {
    let short = |what: &str, value: &str| {
        if value.len() > SHORT_STRING_MAX {
            Err(format!(
                "{what} is {} bytes; AMQP allows at most {SHORT_STRING_MAX}",
                value.len()
            ))
        } else {
            Ok(())
        }
    };
    short("the exchange name", exchange)?;
    short("the routing key", routing_key)?;
    if let Some(ct) = &env.content_type {
        short("the content type", ct)?;
    }
    // Each header: name (short string), a type tag, a 4-byte length and the value.
    let mut table = 0usize;
    for (name, value) in env.wire_headers() {
        short(&format!("header name {:?}", truncate(name)), name)?;
        table += 1 + name.len() + 1 + 4 + value.len();
    }
    // The relay's own: id, topic, key, seq and, on a replay, `outbox-replay`.
    table += 5 * (1 + 13 + 1 + 4)
        + 36
        + env.wire_topic().len()
        + 20
        + env.key.as_ref().map_or(0, String::len)
        + 4;
    if table + PROPERTIES_OVERHEAD > frame_max as usize {
        return Err(format!(
            "its headers take about {table} bytes; with the other properties they must fit \
             in one frame of {frame_max} bytes (the connection's frame_max)"
        ));
    }
    if env.payload.len() as u64 > max_message_size {
        return Err(format!(
            "its payload is {} bytes, over rabbitmq.max_message_size ({max_message_size})",
            env.payload.len()
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect::<String>() + if s.chars().count() > 40 { "…" } else { "" }
}

/// TLS material for `amqps://` URLs, read once at start: extra CAs (PEM) and a client
/// identity (PKCS#12 and its password).
#[derive(Clone, Default)]
pub struct AmqpTls {
    cert_chain: Option<String>,
    identity: Option<(Vec<u8>, SecretString)>,
}

impl AmqpTls {
    /// lapin's TLS configuration for one connection attempt.
    pub fn config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self.identity.as_ref().map(|(der, password)| OwnedIdentity {
                der: der.clone(),
                password: password.expose_secret().to_owned(),
            }),
            cert_chain: self.cert_chain.clone(),
        }
    }
}

/// Reads the files `[rabbitmq.tls]` names; the error names the setting and the file.
pub fn tls_config(settings: &AmqpTlsSettings) -> Result<AmqpTls, String> {
    let cert_chain = match &settings.ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                format!("rabbitmq.tls.ca_file: cannot read {}: {e}", path.display())
            })?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!(
                    "rabbitmq.tls.ca_file: {} holds no PEM certificate",
                    path.display()
                ));
            }
            Some(pem)
        }
        None => None,
    };
    let identity = match &settings.client_identity_file {
        Some(path) => {
            let der = std::fs::read(path).map_err(|e| {
                format!(
                    "rabbitmq.tls.client_identity_file: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let password = match (
                &settings.client_identity_password,
                &settings.client_identity_password_file,
            ) {
                (Some(p), _) => p.clone(),
                (None, Some(file)) => {
                    read_secret_file("rabbitmq.tls.client_identity_password_file", file)?
                }
                (None, None) => SecretString::from(String::new()),
            };
            // Check it now: a wrong password or a file without a key would otherwise look
            // like an unreachable broker at every reconnect.
            let store = p12_keystore::KeyStore::from_pkcs12(&der, password.expose_secret())
                .map_err(|e| {
                    format!(
                        "rabbitmq.tls.client_identity_file: {} is not a PKCS#12 file this \
                         password opens ({e}); check rabbitmq.tls.client_identity_password",
                        path.display()
                    )
                })?;
            if store.private_key_chain().is_none() {
                return Err(format!(
                    "rabbitmq.tls.client_identity_file: {} holds no private key",
                    path.display()
                ));
            }
            Some((der, password))
        }
        None => None,
    };
    Ok(AmqpTls {
        identity,
        cert_chain,
    })
}

/// AMQP properties: persistent, message id, content type, timestamp, and headers (the
/// user's plus `outbox-id`, `outbox-topic`, `outbox-key`, `outbox-seq`, all strings).
fn properties(env: &Envelope) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut put = |name: &str, value: String| {
        headers.insert(
            ShortString::from(name.to_owned()),
            AMQPValue::LongString(LongString::from(value)),
        );
    };
    for (name, value) in env.wire_headers() {
        put(name, value.to_owned());
    }
    put(HEADER_ID, env.id.to_string());
    put(HEADER_TOPIC, env.wire_topic().to_owned());
    if let Some(key) = &env.key {
        put(HEADER_KEY, key.clone());
    }
    put(HEADER_SEQ, env.seq.to_string());
    if env.replay_of.is_some() {
        put(HEADER_REPLAY, "true".to_owned());
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(env.id.to_string().into())
        .with_timestamp(env.created_at_unix.max(0) as u64)
        .with_app_id("outbox-relay".into())
        .with_headers(headers);
    if let Some(ct) = &env.content_type {
        props = props.with_content_type(ct.clone().into());
    }
    props
}
