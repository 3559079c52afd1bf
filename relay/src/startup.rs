//! Where configuration stops: the loaded [`Settings`] become the store's, the relay's and the
//! publisher's own option types here, once, for `outbox-relay run` and for anything that
//! embeds a relay (the integration tests build theirs with the same call).

use std::sync::Arc;

use sqlx::PgPool;

use crate::{
    config::{RelaySettings, Settings},
    publish::Publisher,
    relay::{Observe, Relay, RelayOptions, WorkerOptions},
    store::Store,
};

/// A relay on `pool` publishing through `publisher`, as `settings` ask: the outbox schema,
/// the dead-key policy, the archive of deliveries, the payload limit, the retry policy, the
/// loop's settings, retention, and the health and gauge timings.
pub fn relay(settings: &Settings, pool: PgPool, publisher: Arc<dyn Publisher>) -> Relay {
    let store = Store::new(
        pool,
        settings.schema(),
        settings.relay.dead_key_policy,
        settings.archive(),
    )
    .with_max_payload(settings.relay.max_payload);
    Relay::new(
        store,
        publisher,
        settings.retry_policy(),
        relay_options(&settings.relay),
        settings.retention(),
    )
    .with_observe(Observe {
        backlog_interval: Some(settings.http.backlog_interval),
        stall_timeout: settings.http.stall_timeout,
    })
}

/// The relay's options from `[relay]`.
pub fn relay_options(s: &RelaySettings) -> RelayOptions {
    RelayOptions {
        workers: s.workers,
        listen: s.listen,
        shutdown_grace: s.shutdown_grace,
        worker: WorkerOptions {
            batch_size: s.batch_size,
            window: s.window,
            window_bytes: s.window_bytes,
            poll_interval: s.poll_interval,
            lease: s.lease,
            reconnect_max_delay: s.reconnect_max_delay,
        },
    }
}

/// The publisher `settings` ask for (`broker`, and that broker's section).
pub fn publisher(settings: &Settings) -> Result<Arc<dyn Publisher>, crate::publish::PublishError> {
    match settings.broker {
        #[cfg(feature = "rabbitmq")]
        crate::config::BrokerKind::Rabbitmq => Ok(Arc::new(
            crate::publish::rabbitmq::RabbitMqPublisher::new(&settings.rabbitmq)?,
        )),
        #[cfg(feature = "kafka")]
        crate::config::BrokerKind::Kafka => Ok(Arc::new(
            crate::publish::kafka::KafkaPublisher::new(&settings.kafka)?,
        )),
        #[allow(unreachable_patterns)]
        other => Err(crate::publish::PublishError::Fatal(format!(
            "this build of outbox-relay has no {other:?} support (cargo feature {:?})",
            format!("{other:?}").to_lowercase()
        ))),
    }
}
