//! `[rabbitmq]`: the RabbitMQ publisher's settings. They exist in every build, with or
//! without the `rabbitmq` feature, since the configuration reads the section either way.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use secrecy::SecretString;
use serde::Deserialize;

use crate::secrets::with_password_file;

/// `[rabbitmq]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitMqSettings {
    /// `amqp://user:password@host:port/vhost`; required when `broker = "rabbitmq"`.
    pub url: Option<SecretString>,
    /// Exchange for a topic without a route; `{topic}` and `{key}` are replaced.
    pub exchange: String,
    /// Routing key for a topic without a route; `{topic}` and `{key}` are replaced.
    pub routing_key: String,
    /// Per-topic exchange and routing key, overriding the two above.
    pub routes: BTreeMap<String, RouteSettings>,
    /// How long to wait for an answer from RabbitMQ: a window's confirms, the connection
    /// handshake, opening a channel.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Largest payload sent, in bytes; larger messages are dead at once without being sent.
    /// Keep it at or below the broker's `max_message_size` (RabbitMQ's default: 128 MiB).
    pub max_message_size: u64,
    /// Channels on the connection, each publishing a window of messages (of different keys)
    /// and waiting for their confirms before it takes more.
    pub channels: u16,
    /// The most unconfirmed messages on one channel. `channels × channel_window` bounds the
    /// messages at the broker at once; 1 gives one unconfirmed message per channel.
    pub channel_window: u16,
    /// A file holding the password; replaces the URL's password (e.g. a mounted secret).
    pub password_file: Option<PathBuf>,
    /// TLS for `amqps://` URLs.
    pub tls: AmqpTlsSettings,
}

impl RabbitMqSettings {
    /// `url`, with the password from `password_file` when that is set.
    pub fn connection_url(&self) -> Result<SecretString, String> {
        let url = self.url.as_ref().ok_or("rabbitmq.url is not set")?;
        with_password_file(url, "rabbitmq", self.password_file.as_deref())
    }
}

/// `[rabbitmq.tls]`: applies to `amqps://` URLs. The system's CA store is always trusted.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpTlsSettings {
    /// PEM file of extra CA certificates to trust (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PKCS#12 file holding a client certificate and its key, for brokers that
    /// authenticate clients by certificate.
    pub client_identity_file: Option<PathBuf>,
    /// Password of `client_identity_file`. Never logged.
    pub client_identity_password: Option<SecretString>,
    /// A file holding the password of `client_identity_file`.
    pub client_identity_password_file: Option<PathBuf>,
}

impl Default for RabbitMqSettings {
    fn default() -> Self {
        Self {
            url: None,
            exchange: String::new(),
            routing_key: "{topic}".to_owned(),
            routes: BTreeMap::new(),
            confirm_timeout: Duration::from_secs(10),
            max_message_size: 128 * 1024 * 1024,
            channels: 4,
            channel_window: 512,
            password_file: None,
            tls: AmqpTlsSettings::default(),
        }
    }
}

/// `[rabbitmq.routes."<topic>"]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Exchange for this topic (`{topic}`, `{key}` are replaced).
    pub exchange: String,
    /// Routing key for this topic (`{topic}`, `{key}` are replaced); default `{topic}`.
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
}

fn default_routing_key() -> String {
    "{topic}".to_owned()
}
