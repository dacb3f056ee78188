//! The gateway's settings (`config/gateway.toml`), parsed and validated without IO.

use std::collections::HashSet;

use serde::Deserialize;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_runtime::settings::{http_url, socket_addr, Invalid, Validate};

/// Where the admin token comes from: never the settings file.
pub const ADMIN_TOKEN_ENV: &str = "TOLLGATE_ADMIN_TOKEN";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    pub service: ServiceSettings,
    pub public: ListenerSettings,
    pub admin: ListenerSettings,
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub topics: TopicSettings,
    /// Routes, matched by longest path prefix.
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// This gateway's id, carried in every usage event.
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    /// Address to bind, `ip:port`.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    /// Compacted topic holding consumers and API keys.
    #[serde(default = "default_keys_topic")]
    pub keys: String,
    /// Topic the usage events go to.
    #[serde(default = "default_usage_topic")]
    pub usage: String,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            keys: default_keys_topic(),
            usage: default_usage_topic(),
        }
    }
}

pub fn default_keys_topic() -> String {
    "tollgate.keys".to_owned()
}

pub fn default_usage_topic() -> String {
    "tollgate.usage.v1".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Route id, carried in usage events.
    pub id: String,
    /// Path prefix this route serves, starting with `/`.
    pub path: String,
    /// Upstream base URL the request is proxied to.
    pub upstream: String,
}

impl Validate for GatewaySettings {
    fn validate(&self) -> Result<(), Invalid> {
        if self.service.id.trim().is_empty() {
            return Err(Invalid::new("service.id", &self.service.id, "a non-empty gateway id"));
        }
        let public = socket_addr("public.listen", &self.public.listen)?;
        let admin = socket_addr("admin.listen", &self.admin.listen)?;
        if public == admin {
            return Err(Invalid::new(
                "admin.listen",
                &self.admin.listen,
                "an address other than public.listen",
            ));
        }
        self.kafka.validate("kafka")?;
        for (field, topic) in [("topics.keys", &self.topics.keys), ("topics.usage", &self.topics.usage)] {
            if !valid_topic(topic) {
                return Err(Invalid::new(field, topic, "a Kafka topic name: 1-249 of [a-zA-Z0-9._-]"));
            }
        }
        let mut ids = HashSet::new();
        let mut paths = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            if route.id.is_empty() || !ids.insert(route.id.as_str()) {
                return Err(Invalid::new(format!("routes[{i}].id"), &route.id, "a unique, non-empty route id"));
            }
            if !route.path.starts_with('/') || !paths.insert(route.path.as_str()) {
                return Err(Invalid::new(
                    format!("routes[{i}].path"),
                    &route.path,
                    "a path starting with `/`, not used by another route",
                ));
            }
            http_url(&format!("routes[{i}].upstream"), &route.upstream)?;
        }
        Ok(())
    }
}

/// Kafka's own rule for topic names.
pub fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use tollgate_runtime::settings::from_str_with_env;

    use super::*;

    const EXAMPLE: &str = include_str!("../../config/gateway.toml");

    fn load(text: &str) -> Result<GatewaySettings, String> {
        from_str_with_env(text, "gateway.toml", Vec::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn example_config_is_valid() {
        let s = load(EXAMPLE).unwrap();
        assert_eq!(s.public.listen, "127.0.0.1:8080");
        assert_eq!(s.admin.listen, "127.0.0.1:8081");
        assert!(s.routes.iter().any(|r| r.path == "/v1/"));
    }

    #[test]
    fn rejects_same_public_and_admin_address() {
        let text = EXAMPLE.replace("127.0.0.1:8081", "127.0.0.1:8080");
        assert!(load(&text).unwrap_err().contains("setting `admin.listen`"));
    }

    #[test]
    fn rejects_duplicate_route_paths() {
        let text = format!("{EXAMPLE}\n[[routes]]\nid = \"again\"\npath = \"/v1/\"\nupstream = \"http://127.0.0.1:1\"\n");
        let err = load(&text).unwrap_err();
        assert!(err.contains(".path`: found \"/v1/\""), "{err}");
    }

    #[test]
    fn rejects_bad_upstream_url() {
        let text = format!("{EXAMPLE}\n[[routes]]\nid = \"bad\"\npath = \"/bad/\"\nupstream = \"127.0.0.1:1\"\n");
        let err = load(&text).unwrap_err();
        assert!(err.contains(".upstream`: found \"127.0.0.1:1\", expected an absolute http"), "{err}");
    }

    #[test]
    fn rejects_bad_topic_and_brokers() {
        let err = load(&EXAMPLE.replace("keys = \"tollgate.keys\"", "keys = \"has space\"")).unwrap_err();
        assert!(err.contains("setting `topics.keys`"), "{err}");
        let err = load(&EXAMPLE.replace("brokers = \"127.0.0.1:9092\"", "brokers = \"nohostport\"")).unwrap_err();
        assert!(err.contains("setting `kafka.brokers`"), "{err}");
    }
}
