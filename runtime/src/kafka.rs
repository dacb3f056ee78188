//! Kafka connection settings shared by the services, and the start-up reachability check.
//!
//! In: the `[kafka]` section. Out: an rdkafka `ClientConfig` for producers and consumers, and
//! [`check_topics`], which fails with one line naming the broker or the missing topic.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde::Deserialize;

use crate::settings::{in_range, Invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap brokers, `host:port[,host:port]`.
    pub brokers: String,
    /// How long start-up waits for the cluster's metadata before giving up.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Extra librdkafka properties (`security.protocol`, `sasl.mechanism`, …), passed as given.
    #[serde(default)]
    pub client: BTreeMap<String, String>,
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

impl KafkaSettings {
    pub fn validate(&self, section: &str) -> Result<(), Invalid> {
        let ok = !self.brokers.trim().is_empty()
            && self.brokers.split(',').all(|b| {
                b.trim()
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            });
        if !ok {
            return Err(Invalid::new(
                format!("{section}.brokers"),
                &self.brokers,
                "host:port[,host:port]",
            ));
        }
        in_range(
            &format!("{section}.connect_timeout_ms"),
            self.connect_timeout_ms,
            100,
            600_000,
        )?;
        Ok(())
    }

    /// Base client configuration; callers add their role's properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("socket.connection.setup.timeout.ms", "5000");
        for (key, value) in &self.client {
            config.set(key, value);
        }
        config
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaCheckError {
    #[error("kafka at {brokers} is unreachable: {reason}")]
    Unreachable { brokers: String, reason: String },
    #[error("kafka at {brokers}: topic `{topic}` does not exist (`scripts/stack up` creates it)")]
    MissingTopic { brokers: String, topic: String },
}

/// Fetches cluster metadata and checks that every topic in `topics` exists.
pub async fn check_topics(settings: &KafkaSettings, topics: &[String]) -> Result<(), KafkaCheckError> {
    let settings = settings.clone();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let unreachable = |reason: String| KafkaCheckError::Unreachable {
            brokers: settings.brokers.clone(),
            reason,
        };
        let consumer: BaseConsumer = settings
            .client_config()
            .create()
            .map_err(|e| unreachable(e.to_string()))?;
        let metadata = consumer
            .fetch_metadata(None, Duration::from_millis(settings.connect_timeout_ms))
            .map_err(|e| unreachable(e.to_string()))?;
        for topic in &topics {
            let found = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if !found {
                return Err(KafkaCheckError::MissingTopic {
                    brokers: settings.brokers.clone(),
                    topic: topic.clone(),
                });
            }
        }
        Ok(())
    })
    .await
    .expect("kafka metadata task does not panic")
}
