//! `[rabbitmq]`: the RabbitMQ publisher's settings. They exist in every build, with or
//! without the `rabbitmq` feature, since the configuration reads the section either way.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::{
    checks::{check_url, positive, readable, templates},
    secrets::with_password_file,
};

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

    /// Checks the section (for `broker = "rabbitmq"`), adding one problem per setting at
    /// fault.
    pub(crate) fn check(&self, p: &mut Vec<String>) {
        match &self.url {
            None => p.push(
                "rabbitmq.url is not set (OUTBOX__RABBITMQ__URL or --rabbitmq-url)".to_owned(),
            ),
            Some(url) => {
                if let Err(e) = check_url(url.expose_secret(), &["amqp", "amqps"]) {
                    p.push(format!("rabbitmq.url {e}"));
                }
            }
        }
        positive(p, "rabbitmq.confirm_timeout", self.confirm_timeout);
        if !(1..=2047).contains(&self.channels) {
            p.push(format!(
                "rabbitmq.channels must be between 1 and 2047 (RabbitMQ's default channel_max); got {}",
                self.channels
            ));
        }
        if !(1..=10_000).contains(&self.channel_window) {
            p.push(format!(
                "rabbitmq.channel_window must be between 1 and 10000; got {}",
                self.channel_window
            ));
        }
        if !(1..=512 * 1024 * 1024).contains(&self.max_message_size) {
            p.push(format!(
                "rabbitmq.max_message_size must be between 1 and 536870912 bytes (RabbitMQ's own ceiling); got {}",
                self.max_message_size
            ));
        }
        readable(p, "rabbitmq.password_file", self.password_file.as_deref());
        self.check_tls(p);
        self.check_routes(p);
    }

    /// `[rabbitmq.tls]`: its files, and only with an `amqps://` URL.
    fn check_tls(&self, p: &mut Vec<String>) {
        let tls = &self.tls;
        readable(p, "rabbitmq.tls.ca_file", tls.ca_file.as_deref());
        readable(
            p,
            "rabbitmq.tls.client_identity_file",
            tls.client_identity_file.as_deref(),
        );
        readable(
            p,
            "rabbitmq.tls.client_identity_password_file",
            tls.client_identity_password_file.as_deref(),
        );
        if tls.client_identity_password.is_some() && tls.client_identity_password_file.is_some() {
            p.push("rabbitmq.tls.client_identity_password and rabbitmq.tls.client_identity_password_file are both set; keep one".into());
        }
        let uses_tls = self
            .url
            .as_ref()
            .is_some_and(|u| u.expose_secret().starts_with("amqps:"));
        if !uses_tls && (tls.ca_file.is_some() || tls.client_identity_file.is_some()) {
            p.push("rabbitmq.tls.* is set but rabbitmq.url is not an amqps:// URL".into());
        }
    }

    /// The default exchange and routing key, and each route's.
    fn check_routes(&self, p: &mut Vec<String>) {
        let mut named = vec![
            ("rabbitmq.exchange".to_owned(), &self.exchange),
            ("rabbitmq.routing_key".to_owned(), &self.routing_key),
        ];
        for (topic, route) in &self.routes {
            named.push((
                format!("rabbitmq.routes.\"{topic}\".exchange"),
                &route.exchange,
            ));
            named.push((
                format!("rabbitmq.routes.\"{topic}\".routing_key"),
                &route.routing_key,
            ));
        }
        templates(p, named);
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
