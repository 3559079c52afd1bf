//! RabbitMQ through lapin: publisher confirms, `mandatory`, persistent delivery.
//!
//! A message is confirmed only by a broker `basic.ack` without a preceding `basic.return`.
//! A return (unroutable), a NACK or a channel closed over this message is a rejection; a
//! lost connection or a missing confirm is "broker unavailable" and the message is
//! released untouched.
//!
//! Each channel carries **one unconfirmed message at a time**; concurrency comes from a
//! pool of channels. A `basic.return` names no delivery tag, and when the broker acks
//! several messages at once (`multiple`), lapin hands a pending return to whichever of their
//! confirms it completes first — with several messages in flight on one channel, a returned
//! message could look confirmed (and be lost) while a routed one looked returned. With one
//! in flight per channel, a return can only belong to that message.

use std::{sync::Mutex, time::Duration};

use futures::{future::BoxFuture, FutureExt};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    publisher_confirm::Confirmation,
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use secrecy::{ExposeSecret, SecretString};

use super::{PublishError, Publisher};
use crate::{
    config::{redact_url, RabbitMqSettings},
    envelope::{Envelope, HEADER_ID, HEADER_KEY, HEADER_SEQ, HEADER_TOPIC},
    route::{Route, Router, Template},
};

/// Publishes to one RabbitMQ broker over one connection and one confirm-mode channel.
pub struct RabbitMqPublisher {
    url: SecretString,
    shown_url: String,
    router: Router,
    confirm_timeout: Duration,
    live: Mutex<Option<Live>>,
    connecting: tokio::sync::Mutex<()>,
    slots: tokio::sync::Semaphore,
    generations: std::sync::atomic::AtomicU64,
}

/// Most channels (hence unconfirmed messages) in flight at once per connection.
const CHANNELS: usize = 128;

struct Live {
    connection: std::sync::Arc<Connection>,
    generation: u64,
    idle: Vec<Channel>,
}

impl RabbitMqPublisher {
    /// A publisher for validated settings; connects on the first [`Publisher::ready`].
    pub fn new(settings: &RabbitMqSettings) -> Self {
        let url = settings
            .url
            .clone()
            .expect("rabbitmq.url is checked at load");
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
        Self {
            shown_url: redact_url(url.expose_secret()),
            url,
            router: Router::new(default, routes),
            confirm_timeout: settings.confirm_timeout,
            live: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            slots: tokio::sync::Semaphore::new(CHANNELS),
            generations: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn connected(&self) -> bool {
        let live = self.live.lock().expect("lock poisoned");
        live.as_ref()
            .is_some_and(|l| l.connection.status().connected())
    }

    /// An idle confirm-mode channel of the live connection, or a new one.
    async fn take_channel(&self) -> Result<(Channel, u64), PublishError> {
        let (connection, generation) = {
            let mut live = self.live.lock().expect("lock poisoned");
            let live = live
                .as_mut()
                .ok_or_else(|| PublishError::Unavailable("not connected to RabbitMQ".into()))?;
            while let Some(channel) = live.idle.pop() {
                if channel.status().connected() {
                    return Ok((channel, live.generation));
                }
            }
            (live.connection.clone(), live.generation)
        };
        let channel = connection.create_channel().await.map_err(|e| {
            self.reset();
            PublishError::Unavailable(format!(
                "cannot open a channel on RabbitMQ at {}: {e}",
                self.shown_url
            ))
        })?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| {
                self.reset();
                PublishError::Unavailable(format!(
                    "cannot enable confirms on RabbitMQ at {}: {e}",
                    self.shown_url
                ))
            })?;
        Ok((channel, generation))
    }

    /// Returns a channel with nothing in flight to the pool.
    fn give_back(&self, channel: Channel, generation: u64) {
        let mut live = self.live.lock().expect("lock poisoned");
        if let Some(live) = live.as_mut().filter(|l| l.generation == generation) {
            if channel.status().connected() {
                live.idle.push(channel);
            }
        }
    }

    /// Drops the connection so that the next `ready` opens a new one.
    fn reset(&self) {
        if let Some(old) = self.live.lock().expect("lock poisoned").take() {
            tokio::spawn(async move {
                let _ = old.connection.close(200, "outbox-relay reconnecting").await;
            });
        }
    }

    async fn connect(&self) -> Result<(), PublishError> {
        let _one_at_a_time = self.connecting.lock().await;
        if self.connected() {
            return Ok(());
        }
        self.reset();
        let properties = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio)
            .with_connection_name("outbox-relay".into());
        let connection = Connection::connect(self.url.expose_secret(), properties)
            .await
            .map_err(|e| self.connect_error(e))?;
        tracing::info!(url = %self.shown_url, "connected to RabbitMQ");
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.live.lock().expect("lock poisoned") = Some(Live {
            connection: std::sync::Arc::new(connection),
            generation,
            idle: Vec::new(),
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
        PublishError::Unavailable(format!(
            "cannot connect to RabbitMQ at {}: {e}",
            self.shown_url
        ))
    }

    async fn publish_one(&self, env: &Envelope) -> Result<(), PublishError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let (channel, generation) = self.take_channel().await?;
        let result = self.publish_on(&channel, env).await;
        if !matches!(result, Err(PublishError::Unavailable(_))) {
            self.give_back(channel, generation);
        }
        result
    }

    async fn publish_on(&self, channel: &Channel, env: &Envelope) -> Result<(), PublishError> {
        let (exchange, routing_key) = self.router.resolve(&env.topic, env.key.as_deref());
        let confirm = channel
            .basic_publish(
                &exchange,
                &routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &env.payload,
                properties(env),
            )
            .await
            .map_err(|e| self.classify(e, &exchange))?;
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| {
                self.reset();
                PublishError::Unavailable(format!(
                    "no confirm from RabbitMQ within {}",
                    humantime::format_duration(self.confirm_timeout)
                ))
            })?
            .map_err(|e| self.classify(e, &exchange))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(PublishError::Rejected(format!(
                    "returned as unroutable: {} {} (exchange {exchange:?}, routing key {routing_key:?})",
                    returned.reply_code, returned.reply_text
                )))
            }
            Confirmation::Nack(None) => Err(PublishError::Rejected(format!(
                "negatively acknowledged (basic.nack) by RabbitMQ (exchange {exchange:?}, \
                 routing key {routing_key:?})"
            ))),
            Confirmation::NotRequested => {
                self.reset();
                Err(PublishError::Unavailable("channel was not in confirm mode".into()))
            }
        }
    }

    /// A channel-level refusal (unknown exchange, access refused, oversize message) is the
    /// message's own problem; anything else is the connection's.
    fn classify(&self, e: lapin::Error, exchange: &str) -> PublishError {
        match &e {
            // The broker closed this message's channel (unknown exchange, access refused,
            // message too large): only that channel is gone, and it is not reused.
            lapin::Error::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) => {
                PublishError::Rejected(format!(
                    "RabbitMQ closed the channel: {amqp} (exchange {exchange:?})"
                ))
            }
            _ => {
                self.reset();
                PublishError::Unavailable(format!("RabbitMQ at {}: {e}", self.shown_url))
            }
        }
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

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            let live = self.live.lock().expect("lock poisoned").take();
            if let Some(live) = live {
                for channel in live.idle {
                    let _ = channel.close(200, "outbox-relay shutting down").await;
                }
                let _ = live
                    .connection
                    .close(200, "outbox-relay shutting down")
                    .await;
            }
        }
        .boxed()
    }
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
    for (name, value) in &env.headers {
        put(name, value.clone());
    }
    put(HEADER_ID, env.id.to_string());
    put(HEADER_TOPIC, env.topic.clone());
    if let Some(key) = &env.key {
        put(HEADER_KEY, key.clone());
    }
    put(HEADER_SEQ, env.seq.to_string());
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
