//! `[kafka]`: the Kafka publisher's settings, and the producer properties they may not
//! change. They exist in every build, with or without the `kafka` feature, since the
//! configuration reads the section either way.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::checks::{readable, templates};

/// `[kafka]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port[,host:port...]`; required when `broker = "kafka"`.
    pub brokers: Option<String>,
    /// Kafka topic for an outbox topic without a route; `{topic}` and `{key}` are replaced.
    pub topic: String,
    /// Per-topic Kafka topic, overriding `topic`.
    pub routes: BTreeMap<String, KafkaRouteSettings>,
    /// How long a message may wait for its delivery report before the relay reports the
    /// broker unavailable (a warning, at most one per this period). The message stays with
    /// the producer, which keeps trying: messages never time out in it, so that none can
    /// fail behind a later message of its key that gets through.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// librdkafka producer properties, passed through (e.g. `compression.type`,
    /// `security.protocol`, `sasl.username`). Properties that would break the relay's
    /// guarantees (`enable.idempotence`, `acks`, `max.in.flight...` above 5,
    /// `enable.gapless.guarantee`, `message.timeout.ms`) are refused.
    /// Values of secret properties (`sasl.password`, `ssl.key.password`, ...) are never
    /// logged.
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values are read from files (e.g. `sasl.password` from a
    /// mounted secret); the trailing newline is dropped.
    pub property_files: BTreeMap<String, PathBuf>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: None,
            topic: "{topic}".to_owned(),
            routes: BTreeMap::new(),
            delivery_timeout: Duration::from_secs(30),
            properties: BTreeMap::new(),
            property_files: BTreeMap::new(),
        }
    }
}

impl KafkaSettings {
    /// Checks the section (for `broker = "kafka"`), adding one problem per setting at
    /// fault.
    pub(crate) fn check(&self, p: &mut Vec<String>) {
        match self.brokers.as_deref().map(str::trim) {
            None | Some("") => p.push(
                "kafka.brokers is not set (OUTBOX__KAFKA__BROKERS or --kafka-brokers)".to_owned(),
            ),
            Some(list) => {
                for b in list.split(',') {
                    let ok = b.trim().rsplit_once(':').is_some_and(|(h, port)| {
                        !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                    });
                    if !ok {
                        p.push(format!("kafka.brokers: {b:?} is not host:port"));
                    }
                }
            }
        }
        if self.delivery_timeout < Duration::from_secs(1) {
            p.push("kafka.delivery_timeout must be at least 1s".to_owned());
        }
        let mut named = vec![("kafka.topic".to_owned(), &self.topic)];
        for (topic, route) in &self.routes {
            named.push((format!("kafka.routes.\"{topic}\".topic"), &route.topic));
        }
        templates(p, named);
        self.check_properties(p);
    }

    /// `properties` and `property_files`: none that breaks the guarantees, none set in
    /// both, every file readable.
    fn check_properties(&self, p: &mut Vec<String>) {
        for (name, value) in &self.properties {
            if let Err(e) = check_kafka_property(name, value) {
                p.push(format!("kafka.properties.\"{name}\": {e}"));
            }
        }
        for (name, path) in &self.property_files {
            if self.properties.contains_key(name) {
                p.push(format!(
                    "kafka.property_files.\"{name}\": also set in kafka.properties; keep one"
                ));
            } else if let Err(e) = check_kafka_property(name, "") {
                p.push(format!("kafka.property_files.\"{name}\": {e}"));
            }
            readable(p, &format!("kafka.property_files.\"{name}\""), Some(path));
        }
    }
}

/// `[kafka.routes."<topic>"]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaRouteSettings {
    /// Kafka topic for this outbox topic (`{topic}`, `{key}` are replaced).
    pub topic: String,
}

/// Refuses producer properties that would break per-key order or no-loss, or that the
/// relay sets itself.
pub fn check_kafka_property(name: &str, value: &str) -> Result<(), String> {
    match name {
        "enable.idempotence" if value != "true" => {
            Err("must stay true: the idempotent producer keeps per-key order across retries".into())
        }
        "acks" | "request.required.acks" if !matches!(value, "all" | "-1") => Err(
            "must stay all: a message is confirmed only once every in-sync replica has it".into(),
        ),
        "max.in.flight.requests.per.connection" | "max.in.flight"
            if value.parse::<u32>().map_or(true, |n| n > 5) =>
        {
            Err("must be 1 to 5 with the idempotent producer".into())
        }
        "partitioner" if !KEYED_PARTITIONERS.contains(&value) => Err(format!(
            "must place a message by its key ({}): {value:?} ignores the key, so a key's \
             messages, sent without waiting for each confirm, would land in different \
             partitions and could be read out of order",
            KEYED_PARTITIONERS.join(", ")
        )),
        "enable.gapless.guarantee" if value != "true" => Err(
            "must stay true: the relay sends a key's messages without waiting for each \
             confirm, and this keeps a failed message from leaving a gap before later ones"
                .into(),
        ),
        "bootstrap.servers" | "metadata.broker.list" => Err("set kafka.brokers instead".into()),
        "message.timeout.ms" | "delivery.timeout.ms" => Err(
            "messages never time out in the relay's producer (a timeout could leave a gap \
             before a key's later messages); kafka.delivery_timeout sets when a slow delivery \
             is reported"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// librdkafka's partitioners that place a keyed message by a hash of its key (the
/// `_random` ones spread only unkeyed messages at random).
const KEYED_PARTITIONERS: &[&str] = &[
    "murmur2_random",
    "murmur2",
    "consistent_random",
    "consistent",
    "fnv1a_random",
    "fnv1a",
];

/// True for librdkafka properties whose values are secrets, never to be logged.
pub fn is_secret_kafka_property(name: &str) -> bool {
    name.contains("password")
        || name.contains("secret")
        || name.ends_with(".key.pem")
        || name.contains("token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_that_would_break_the_guarantees_are_refused() {
        assert_eq!(
            check_kafka_property("acks", "1").unwrap_err(),
            "must stay all: a message is confirmed only once every in-sync replica has it"
        );
        assert!(check_kafka_property("enable.idempotence", "false").is_err());
        assert!(check_kafka_property("max.in.flight.requests.per.connection", "10").is_err());
        // A key's messages are pipelined: no gap may open before them, and none may time out.
        assert!(check_kafka_property("enable.gapless.guarantee", "false").is_err());
        assert!(check_kafka_property("enable.gapless.guarantee", "true").is_ok());
        for refused in ["random", "RANDOM", "custom"] {
            let e = check_kafka_property("partitioner", refused).unwrap_err();
            assert!(e.contains("ignores the key"), "{refused}: {e}");
        }
        for kept in KEYED_PARTITIONERS {
            assert!(check_kafka_property("partitioner", kept).is_ok(), "{kept}");
        }
        assert!(check_kafka_property("message.timeout.ms", "30000").is_err());
        assert!(check_kafka_property("compression.type", "zstd").is_ok());
    }
}
