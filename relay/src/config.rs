//! Settings: built-in defaults, then a TOML file, then `OUTBOX__SECTION__KEY` environment
//! variables, then command-line flags. Every setting and its default is listed in the
//! README's configuration reference; [`Settings::validate`] names the setting at fault.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use outbox::Schema;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub use crate::publish::{
    kafka::{check_kafka_property, is_secret_kafka_property, KafkaRouteSettings, KafkaSettings},
    rabbitmq::{AmqpTlsSettings, RabbitMqSettings, RouteSettings},
};
pub use crate::secrets::{read_secret_file, redact_url};
use crate::{
    checks::{check_url, positive, readable},
    retry::RetryPolicy,
    secrets::with_password_file,
};

/// Prefix of the environment variables read as settings (`OUTBOX__DATABASE__URL`).
pub const ENV_PREFIX: &str = "OUTBOX";

/// All settings of the relay.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Which broker messages go to.
    pub broker: BrokerKind,
    /// The PostgreSQL database holding the outbox.
    pub database: DatabaseSettings,
    /// The claim → publish → settle loop.
    pub relay: RelaySettings,
    /// Retries of messages the broker rejected.
    pub retry: RetrySettings,
    /// The RabbitMQ broker.
    pub rabbitmq: RabbitMqSettings,
    /// The Kafka cluster.
    pub kafka: KafkaSettings,
    /// How long delivered and discarded records are kept.
    pub retention: RetentionSettings,
    /// Logging.
    pub log: LogSettings,
    /// The HTTP listener for metrics and health probes.
    pub http: HttpSettings,
}

/// `[http]`: `/metrics`, `/livez` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address to listen on, `host:port`; an empty string turns the listener off.
    pub listen: String,
    /// How often the backlog gauges (pending, dead, oldest age per topic) are read.
    #[serde(with = "humantime_serde")]
    pub backlog_interval: Duration,
    /// `/livez` fails once a relay loop made no progress for this long.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9477".to_owned(),
            backlog_interval: Duration::from_secs(15),
            stall_timeout: Duration::from_secs(300),
        }
    }
}

/// `[retention]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Keep a slim record (id, seq, topic, key, times) of each delivered message in
    /// `delivered` for this long; `0s` keeps none.
    #[serde(with = "humantime_serde")]
    pub delivered: Duration,
    /// Keep each delivered message whole (payload, headers, content type) in its record,
    /// so that `outbox-relay replay` can send it again; needs `delivered` above zero.
    pub delivered_payloads: bool,
    /// Keep discarded dead messages in `discarded` for this long.
    #[serde(with = "humantime_serde")]
    pub discarded: Duration,
    /// How often expired records are purged.
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
    /// Rows deleted per purge statement, so no purge holds locks for long.
    pub purge_batch: u32,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            delivered: Duration::ZERO,
            delivered_payloads: false,
            discarded: Duration::from_secs(30 * 24 * 3600),
            purge_interval: Duration::from_secs(30),
            purge_batch: 1000,
        }
    }
}

impl RetentionSettings {
    /// Adds a problem per `[retention]` setting out of range.
    fn check(&self, p: &mut Vec<String>) {
        positive(p, "retention.purge_interval", self.purge_interval);
        if self.delivered_payloads && self.delivered.is_zero() {
            p.push(
                "retention.delivered_payloads keeps payloads in the delivery records, but \
                 retention.delivered is 0s (no records): set it to how long they are kept"
                    .to_owned(),
            );
        }
        if !(1..=100_000).contains(&self.purge_batch) {
            p.push(format!(
                "retention.purge_batch must be between 1 and 100000 (got {})",
                self.purge_batch
            ));
        }
    }
}

/// The broker to publish to.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum BrokerKind {
    /// RabbitMQ, through AMQP 0.9.1 with publisher confirms.
    #[default]
    Rabbitmq,
    /// Kafka, through the idempotent producer with `acks=all`.
    Kafka,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/db`; required. Never logged.
    pub url: Option<SecretString>,
    /// Schema holding the outbox tables.
    pub schema: String,
    /// Pool size.
    pub max_connections: u32,
    /// How long one connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A file holding the password; replaces the URL's password (e.g. a mounted secret).
    pub password_file: Option<PathBuf>,
    /// TLS mode, as libpq's `sslmode`; replaces the URL's `sslmode` when set.
    pub ssl_mode: Option<SslMode>,
    /// PEM file of the CA(s) that signed the server's certificate (`sslrootcert`).
    pub ssl_root_cert: Option<PathBuf>,
    /// PEM client certificate, for servers that authenticate clients by certificate
    /// (`sslcert`); needs `ssl_key`.
    pub ssl_cert: Option<PathBuf>,
    /// PEM private key of `ssl_cert` (`sslkey`).
    pub ssl_key: Option<PathBuf>,
}

/// libpq's `sslmode`, as PostgreSQL clients spell it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain first, TLS if the server insists.
    Allow,
    /// TLS if the server offers it, plain otherwise (libpq's default).
    Prefer,
    /// TLS or nothing; the certificate is not checked.
    Require,
    /// TLS with a certificate signed by a trusted CA.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host connected to.
    VerifyFull,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            schema: Schema::DEFAULT.to_owned(),
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
            password_file: None,
            ssl_mode: None,
            ssl_root_cert: None,
            ssl_cert: None,
            ssl_key: None,
        }
    }
}

pub use crate::store::DeadKeyPolicy;

/// `[relay]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySettings {
    /// Most rows read in one claim.
    pub batch_size: u32,
    /// Workers of this relay, each streaming a fixed subset of its partitions.
    pub workers: u32,
    /// Most rows one worker holds at once: read and not yet settled (waiting in their key's
    /// queue, at the broker, or being recorded).
    pub window: u32,
    /// Most payload bytes one worker holds at once (a read may pass it by one row).
    pub window_bytes: u64,
    /// Largest payload relayed; a row with a larger one is parked as dead with the reason,
    /// without its payload being read.
    pub max_payload: u64,
    /// How long a partition lease lasts. Leases are renewed every third of it; a relay that
    /// dies is taken over once its leases run out.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often an idle relay looks for rows without being woken.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Wake up on PostgreSQL NOTIFY when new rows commit, instead of waiting for the poll.
    pub listen: bool,
    /// What later messages of a key do once an earlier one is dead.
    pub dead_key_policy: DeadKeyPolicy,
    /// On SIGTERM/SIGINT, how long in-flight publishes may take to be confirmed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Longest wait between reconnect attempts to PostgreSQL or the broker.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            workers: 1,
            window: 2000,
            window_bytes: 16 * 1024 * 1024,
            max_payload: 64 * 1024 * 1024,
            lease: Duration::from_secs(6),
            poll_interval: Duration::from_secs(1),
            listen: true,
            dead_key_policy: DeadKeyPolicy::Block,
            shutdown_grace: Duration::from_secs(25),
            reconnect_max_delay: Duration::from_secs(30),
        }
    }
}

impl RelaySettings {
    /// Adds a problem per `[relay]` setting out of range.
    fn check(&self, p: &mut Vec<String>) {
        if !(1..=10_000).contains(&self.batch_size) {
            p.push(format!(
                "relay.batch_size must be between 1 and 10000 (got {})",
                self.batch_size
            ));
        }
        if !(1..=64).contains(&self.workers) {
            p.push(format!(
                "relay.workers must be between 1 and 64 (got {})",
                self.workers
            ));
        }
        if !(1..=100_000).contains(&self.window) {
            p.push(format!(
                "relay.window must be between 1 and 100000 (got {})",
                self.window
            ));
        }
        if !(1..=1024 * 1024 * 1024).contains(&self.max_payload) {
            p.push(format!(
                "relay.max_payload must be between 1 and 1073741824 bytes (PostgreSQL's bytea limit); got {}",
                self.max_payload
            ));
        }
        if self.window_bytes < 1024 {
            p.push(format!(
                "relay.window_bytes must be at least 1024 (got {})",
                self.window_bytes
            ));
        }
        if self.lease < Duration::from_secs(1) {
            p.push("relay.lease must be at least 1s".to_owned());
        }
        positive(p, "relay.poll_interval", self.poll_interval);
        positive(p, "relay.reconnect_max_delay", self.reconnect_max_delay);
    }
}

/// `[retry]`: see [`RetryPolicy`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Delay after the first failure.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Each further failure multiplies the delay by this.
    pub factor: f64,
    /// The delay never exceeds this.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Random spread, as a fraction of the delay (0.2 = ±20%).
    pub jitter: f64,
    /// Failed attempts after which a message is dead.
    pub max_attempts: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        let p = RetryPolicy::default();
        Self {
            initial_delay: p.initial_delay,
            factor: p.factor,
            max_delay: p.max_delay,
            jitter: p.jitter,
            max_attempts: p.max_attempts,
        }
    }
}

impl Settings {
    /// The PostgreSQL connections the relay may hold at once: 2 per worker (a read and a
    /// settle under way together), 1 for the partition keeper, 1 held by LISTEN when
    /// `relay.listen` is on, and 4 for the chores and probes that may run at the same time
    /// (purge, held-back sweep, backlog gauges, the readiness probe). A pool this size never
    /// makes the lease keeper wait for a connection, so leases never expire under load.
    pub fn connections_needed(&self) -> u32 {
        2 * self.relay.workers + 1 + u32::from(self.relay.listen) + 4
    }
}

impl DatabaseSettings {
    /// `url`, with the password from `password_file` when that is set.
    pub fn connection_url(&self) -> Result<SecretString, String> {
        let url = self.url.as_ref().ok_or("database.url is not set")?;
        with_password_file(url, "database", self.password_file.as_deref())
    }

    /// The server's URL, the files named, TLS that goes together, and the schema name.
    fn check_server(&self, p: &mut Vec<String>) {
        match &self.url {
            None => p.push(
                "database.url is not set (OUTBOX__DATABASE__URL or --database-url)".to_owned(),
            ),
            Some(url) => {
                if let Err(e) = check_url(url.expose_secret(), &["postgres", "postgresql"]) {
                    p.push(format!("database.url {e}"));
                }
            }
        }
        readable(p, "database.password_file", self.password_file.as_deref());
        readable(p, "database.ssl_root_cert", self.ssl_root_cert.as_deref());
        readable(p, "database.ssl_cert", self.ssl_cert.as_deref());
        readable(p, "database.ssl_key", self.ssl_key.as_deref());
        if self.ssl_cert.is_some() != self.ssl_key.is_some() {
            p.push(
                "database.ssl_cert and database.ssl_key go together: set both or neither".into(),
            );
        }
        if let Some(SslMode::Disable) = self.ssl_mode {
            if self.ssl_root_cert.is_some() || self.ssl_cert.is_some() {
                p.push("database.ssl_mode is \"disable\" but TLS files are set (database.ssl_root_cert, database.ssl_cert)".into());
            }
        }
        if let Err(e) = Schema::parse(&self.schema) {
            p.push(format!("database.schema: {e}"));
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `outbox_relay=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

impl LogSettings {
    /// `log.level` must be a valid tracing filter.
    fn check(&self, p: &mut Vec<String>) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            p.push(format!(
                "log.level {:?} is not a valid filter: {e}",
                self.level
            ));
        }
    }
}

/// Settings spelled as one of a few words: a misspelling is reported with the words
/// allowed, e.g. `unknown value "kafak" (expected rabbitmq or kafka) for key \`broker\``.
macro_rules! spelled {
    ($($ty:ident { $($word:literal => $variant:ident),+ $(,)? })+) => {$(
        impl TryFrom<String> for $ty {
            type Error = String;

            fn try_from(value: String) -> Result<Self, String> {
                let word = value.trim().to_ascii_lowercase();
                $(if word == $word {
                    return Ok(Self::$variant);
                })+
                Err(format!(
                    "unknown value {value:?} (expected {})",
                    one_of(&[$($word),+])
                ))
            }
        }
    )+};
}

spelled! {
    BrokerKind { "rabbitmq" => Rabbitmq, "kafka" => Kafka }
    SslMode {
        "disable" => Disable,
        "allow" => Allow,
        "prefer" => Prefer,
        "require" => Require,
        "verify-ca" => VerifyCa,
        "verify-full" => VerifyFull,
    }
    DeadKeyPolicy { "block" => Block, "skip" => Skip }
    LogFormat { "text" => Text, "json" => Json }
}

/// `a, b or c`.
fn one_of(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// Settings that could not be loaded or are invalid; every problem is listed.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem, each naming its setting.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }
}

/// Values given on the command line; they override every other source.
pub type Overrides = Vec<(&'static str, String)>;

impl Settings {
    /// Loads defaults, then `file` (if any), then the process environment, then `overrides`,
    /// and validates the result (the broker's settings only if `with_broker`: `migrate` and
    /// `status` need none).
    pub fn load(
        file: Option<&Path>,
        overrides: Overrides,
        with_broker: bool,
    ) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars(), overrides, with_broker)
    }

    /// As [`Settings::load`], reading environment variables from `env`.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: Overrides,
        with_broker: bool,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::one(format!(
                    "configuration file {} does not exist or is not a file",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        for (key, value) in overrides {
            builder = builder
                .set_override(key, value)
                .map_err(|e| ConfigError::one(format!("{key}: {e}")))?;
        }
        let raw = builder.build().map_err(|e| ConfigError::one(describe(e)))?;
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError::one(describe(e)))?;
        settings.validate(with_broker)?;
        Ok(settings)
    }

    /// Checks every value (the broker's only if `with_broker`); the error lists each
    /// problem with the setting's name.
    pub fn validate(&self, with_broker: bool) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        self.check_database(&mut p);
        self.relay.check(&mut p);
        self.retention.check(&mut p);
        if let Err(e) = self.retry_policy().validate() {
            p.push(e);
        }
        if with_broker {
            match self.broker {
                BrokerKind::Rabbitmq => self.rabbitmq.check(&mut p),
                BrokerKind::Kafka => self.kafka.check(&mut p),
            }
        }
        self.check_http(&mut p);
        self.log.check(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }

    /// `[database]`: the server and its files, then the pool, which must also fit the
    /// relay's workers.
    fn check_database(&self, p: &mut Vec<String>) {
        self.database.check_server(p);
        self.check_pool_size(p);
        positive(p, "database.connect_timeout", self.database.connect_timeout);
    }

    /// `database.max_connections`: in range, and at least [`Settings::connections_needed`].
    fn check_pool_size(&self, p: &mut Vec<String>) {
        let max = self.database.max_connections;
        if !(1..=1000).contains(&max) {
            p.push(format!(
                "database.max_connections must be between 1 and 1000 (got {max})"
            ));
        } else if max < self.connections_needed() {
            p.push(format!(
                "database.max_connections ({}) must be at least {} with relay.workers = {}{}: \
                 2 per worker (each reads and settles at once), 1 for the partition keeper{}, \
                 and 4 for the chores and probes (purge, held-back sweep, backlog gauges, \
                 readiness), so that renewing the leases never waits for a connection",
                max,
                self.connections_needed(),
                self.relay.workers,
                if self.relay.listen {
                    " and relay.listen on"
                } else {
                    ""
                },
                if self.relay.listen {
                    ", 1 held by LISTEN for wake-ups"
                } else {
                    ""
                },
            ));
        }
    }

    /// `[http]`; its stall timeout is measured against `relay.lease`.
    fn check_http(&self, p: &mut Vec<String>) {
        let h = &self.http;
        if !h.listen.is_empty() && h.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!(
                "http.listen {:?} is not host:port with an IP address (e.g. 0.0.0.0:9477), nor empty",
                h.listen
            ));
        }
        positive(p, "http.backlog_interval", h.backlog_interval);
        if h.stall_timeout < self.relay.lease {
            p.push(format!(
                "http.stall_timeout ({}) must be at least relay.lease ({})",
                humantime::format_duration(h.stall_timeout),
                humantime::format_duration(self.relay.lease)
            ));
        }
    }

    /// The retry policy these settings describe.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial_delay: self.retry.initial_delay,
            factor: self.retry.factor,
            max_delay: self.retry.max_delay,
            jitter: self.retry.jitter,
            max_attempts: self.retry.max_attempts,
        }
    }

    /// The retention windows these settings describe.
    pub fn retention(&self) -> crate::store::Retention {
        crate::store::Retention {
            delivered: self.retention.delivered,
            discarded: self.retention.discarded,
            batch: self.retention.purge_batch,
            interval: self.retention.purge_interval,
        }
    }

    /// What a delivered row leaves in `delivered`.
    pub fn archive(&self) -> crate::store::Archive {
        use crate::store::Archive;
        let r = &self.retention;
        match (r.delivered.is_zero(), r.delivered_payloads) {
            (true, _) => Archive::Off,
            (false, false) => Archive::Records,
            (false, true) => Archive::Whole,
        }
    }

    /// The validated schema name.
    pub fn schema(&self) -> Schema {
        Schema::parse(&self.database.schema).expect("validated at load")
    }
}

/// `config`'s messages name the key; make sure they read as sentences about a setting.
fn describe(e: config::ConfigError) -> String {
    let text = e.to_string().replace(
        "expected a duration",
        "expected a duration with its unit (e.g. 250ms, 5s, 2m, 1h)",
    );
    match e {
        config::ConfigError::FileParse { .. } => {
            format!("configuration file could not be parsed: {text}")
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all = vec![
            (
                "OUTBOX__DATABASE__URL".to_owned(),
                "postgres://u:secret@localhost/db".to_owned(),
            ),
            (
                "OUTBOX__RABBITMQ__URL".to_owned(),
                "amqp://g:secret@localhost:5672/%2f".to_owned(),
            ),
        ];
        all.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        all
    }

    fn problems(pairs: &[(&str, &str)]) -> String {
        Settings::load_from(None, env(pairs), vec![], true)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_with_urls_are_valid() {
        let s = Settings::load_from(None, env(&[]), vec![], true).unwrap();
        assert_eq!(s.relay.batch_size, 1000);
        assert_eq!(s.database.schema, "outbox");
        assert_eq!(s.relay.dead_key_policy, DeadKeyPolicy::Block);
    }

    #[test]
    fn environment_overrides_defaults_and_flags_override_environment() {
        let s = Settings::load_from(
            None,
            env(&[
                ("OUTBOX__RELAY__BATCH_SIZE", "42"),
                ("OUTBOX__RELAY__POLL_INTERVAL", "250ms"),
            ]),
            vec![("relay.batch_size", "7".to_owned())],
            true,
        )
        .unwrap();
        assert_eq!(s.relay.batch_size, 7);
        assert_eq!(s.relay.poll_interval, Duration::from_millis(250));
    }

    #[test]
    fn missing_urls_are_named() {
        let err = Settings::load_from(None, Vec::new(), vec![], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.url is not set"), "{err}");
        assert!(err.contains("rabbitmq.url is not set"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_setting() {
        let err = problems(&[
            ("OUTBOX__RELAY__BATCH_SIZE", "0"),
            ("OUTBOX__RETRY__FACTOR", "0.5"),
        ]);
        assert!(
            err.contains("relay.batch_size must be between 1 and 10000 (got 0)"),
            "{err}"
        );
        assert!(err.contains("retry.factor"), "{err}");
    }

    #[test]
    fn unparsable_values_name_the_setting() {
        let err = problems(&[("OUTBOX__RELAY__LEASE", "soon")]);
        assert!(err.contains("relay.lease"), "{err}");
        let err = problems(&[("OUTBOX__RELAY__POLL_INTERVAL", "5")]);
        assert!(
            err.contains("expected a duration with its unit (e.g. 250ms, 5s, 2m, 1h) for key `relay.poll_interval`"),
            "{err}"
        );
        let err = problems(&[("OUTBOX__RELAY__DEAD_KEY_POLICY", "maybe")]);
        assert!(err.contains("dead_key_policy"), "{err}");
    }

    #[test]
    fn a_misspelled_word_is_reported_with_the_words_allowed() {
        for (var, value, key, allowed) in [
            ("OUTBOX__BROKER", "kafak", "broker", "rabbitmq or kafka"),
            (
                "OUTBOX__RELAY__DEAD_KEY_POLICY",
                "blok",
                "relay.dead_key_policy",
                "block or skip",
            ),
            ("OUTBOX__LOG__FORMAT", "xml", "log.format", "text or json"),
            (
                "OUTBOX__DATABASE__SSL_MODE",
                "strict",
                "database.ssl_mode",
                "disable, allow, prefer, require, verify-ca or verify-full",
            ),
        ] {
            let err = problems(&[(var, value)]);
            assert!(
                err.contains(&format!(
                    "unknown value \"{value}\" (expected {allowed}) for key `{key}`"
                )),
                "{err}"
            );
        }
        // Words are taken whatever their case, as environment variables often are.
        let s = Settings::load_from(
            None,
            env(&[
                ("OUTBOX__BROKER", "RabbitMQ"),
                ("OUTBOX__DATABASE__SSL_MODE", "VERIFY-FULL"),
                ("OUTBOX__RELAY__DEAD_KEY_POLICY", "Skip"),
                ("OUTBOX__LOG__FORMAT", "JSON"),
            ]),
            vec![],
            true,
        )
        .unwrap();
        assert_eq!(s.broker, BrokerKind::Rabbitmq);
        assert_eq!(s.database.ssl_mode, Some(SslMode::VerifyFull));
        assert_eq!(s.relay.dead_key_policy, DeadKeyPolicy::Skip);
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn bad_schema_and_url_scheme_are_rejected_without_echoing_secrets() {
        let err = problems(&[
            ("OUTBOX__DATABASE__SCHEMA", "Robert'); DROP"),
            ("OUTBOX__DATABASE__URL", "mysql://u:hunter2@h/db"),
        ]);
        assert!(err.contains("database.schema"), "{err}");
        assert!(err.contains("database.url has scheme \"mysql\""), "{err}");
        assert!(!err.contains("hunter2"), "the password leaked: {err}");
    }

    #[test]
    fn unknown_template_placeholder_is_rejected() {
        let err = problems(&[("OUTBOX__RABBITMQ__ROUTING_KEY", "{topc}")]);
        assert!(err.contains("rabbitmq.routing_key"), "{err}");
        assert!(err.contains("{topc}"), "{err}");
    }

    #[test]
    fn lease_has_a_floor() {
        let err = problems(&[("OUTBOX__RELAY__LEASE", "200ms")]);
        assert!(err.contains("relay.lease must be at least 1s"), "{err}");
    }

    #[test]
    fn kafka_needs_brokers_as_host_and_port() {
        let err = problems(&[("OUTBOX__BROKER", "kafka")]);
        assert!(err.contains("kafka.brokers is not set"), "{err}");
        assert!(
            !err.contains("rabbitmq.url"),
            "RabbitMQ settings are not needed for Kafka: {err}"
        );
        let err = problems(&[
            ("OUTBOX__BROKER", "kafka"),
            ("OUTBOX__KAFKA__BROKERS", "localhost:9092,nohost"),
        ]);
        assert!(err.contains("\"nohost\" is not host:port"), "{err}");
    }
}
