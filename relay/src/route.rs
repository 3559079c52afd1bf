//! Mapping an outbox topic to a broker destination.

use std::collections::BTreeMap;

/// A destination name with `{topic}` and `{key}` placeholders, checked once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Topic,
    Key,
}

impl Template {
    /// Parses `raw`; `{topic}` and `{key}` are the only placeholders, `{{` and `}}` are
    /// literal braces.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = raw;
        while let Some(c) = rest.chars().next() {
            if rest.starts_with("{{") || rest.starts_with("}}") {
                text.push(c);
                rest = &rest[2..];
            } else if c == '{' {
                let end = rest
                    .find('}')
                    .ok_or_else(|| format!("unclosed '{{' in {raw:?}"))?;
                let part = match &rest[..=end] {
                    "{topic}" => Part::Topic,
                    "{key}" => Part::Key,
                    other => {
                        return Err(format!(
                            "unknown placeholder {other} in {raw:?}; use {{topic}} or {{key}}"
                        ))
                    }
                };
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(part);
                rest = &rest[end + 1..];
            } else if c == '}' {
                return Err(format!("unmatched '}}' in {raw:?}"));
            } else {
                text.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self(parts))
    }

    /// The name for a message of `topic` with `key` (an absent key renders as empty).
    pub fn render(&self, topic: &str, key: Option<&str>) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Topic => out.push_str(topic),
                Part::Key => out.push_str(key.unwrap_or("")),
            }
        }
        out
    }
}

/// Where one topic's messages go: an exchange and a routing key.
#[derive(Debug, Clone)]
pub struct Route {
    /// Exchange name template.
    pub exchange: Template,
    /// Routing key template.
    pub routing_key: Template,
}

/// Topic → route, with a default for unlisted topics.
#[derive(Debug, Clone)]
pub struct Router {
    default: Route,
    routes: BTreeMap<String, Route>,
}

impl Router {
    /// A router that sends unlisted topics to `default`.
    pub fn new(default: Route, routes: BTreeMap<String, Route>) -> Self {
        Self { default, routes }
    }

    /// `(exchange, routing key)` for a message.
    pub fn resolve(&self, topic: &str, key: Option<&str>) -> (String, String) {
        let route = self.routes.get(topic).unwrap_or(&self.default);
        (
            route.exchange.render(topic, key),
            route.routing_key.render(topic, key),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_placeholders_and_literal_braces() {
        let t = Template::parse("x.{topic}.{key}.{{lit}}").unwrap();
        assert_eq!(t.render("orders", Some("k1")), "x.orders.k1.{lit}");
        assert_eq!(t.render("orders", None), "x.orders..{lit}");
    }

    #[test]
    fn rejects_unknown_and_unbalanced() {
        assert!(Template::parse("{topc}")
            .unwrap_err()
            .contains("unknown placeholder {topc}"));
        assert!(Template::parse("{topic").unwrap_err().contains("unclosed"));
        assert!(Template::parse("a}").unwrap_err().contains("unmatched"));
    }

    #[test]
    fn per_topic_route_wins_over_default() {
        let t = |s: &str| Template::parse(s).unwrap();
        let router = Router::new(
            Route {
                exchange: t(""),
                routing_key: t("{topic}"),
            },
            [(
                "billing".to_owned(),
                Route {
                    exchange: t("billing-x"),
                    routing_key: t("{key}"),
                },
            )]
            .into(),
        );
        assert_eq!(
            router.resolve("orders", Some("k")),
            ("".into(), "orders".into())
        );
        assert_eq!(
            router.resolve("billing", Some("k")),
            ("billing-x".into(), "k".into())
        );
    }
}
