//! meter-consumer's settings (`config/meter-consumer.toml`), parsed and validated without IO.

use serde::Deserialize;
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_runtime::settings::{in_range, socket_addr, Invalid, Validate};
use tollgate_runtime::topics;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterSettings {
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub topics: TopicSettings,
    pub clickhouse: ClickhouseSettings,
    #[serde(default)]
    pub batch: BatchSettings,
    pub admin: AdminSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    /// Consumer group id; every instance of one deployment shares it.
    #[serde(default = "default_group")]
    pub group: String,
    /// Usage events to meter.
    #[serde(default = "default_usage")]
    pub usage: String,
    /// Where undecodable usage records go, with the reason in headers.
    #[serde(default = "default_dlq")]
    pub dlq: String,
    /// Consumer and key records, mirrored into ClickHouse.
    #[serde(default = "default_keys")]
    pub keys: String,
    /// This instance's static group membership id (`group.instance.id`): stable across
    /// restarts, unique among running instances. Default `<hostname>-<admin port>`, which the
    /// bound ops listener makes unique on a host.
    #[serde(default)]
    pub instance_id: Option<String>,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            group: default_group(),
            usage: default_usage(),
            dlq: default_dlq(),
            keys: default_keys(),
            instance_id: None,
        }
    }
}

fn default_group() -> String {
    "tollgate-meter".to_owned()
}
fn default_usage() -> String {
    topics::USAGE.to_owned()
}
fn default_dlq() -> String {
    topics::USAGE_DLQ.to_owned()
}
fn default_keys() -> String {
    topics::KEYS.to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    /// Rows per partition batch before it is written.
    #[serde(default = "default_max_rows")]
    pub max_rows: u64,
    /// Longest a row waits in a batch before it is written.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// First wait after a failed ClickHouse insert or dead-letter send; doubles per attempt.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest wait between attempts while ClickHouse or Kafka is unavailable.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// How long one insert (or watermark query) may take before it counts as failed.
    #[serde(default = "default_insert_timeout_ms")]
    pub insert_timeout_ms: u64,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_rows: default_max_rows(),
            max_wait_ms: default_max_wait_ms(),
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            insert_timeout_ms: default_insert_timeout_ms(),
        }
    }
}

fn default_retry_initial_ms() -> u64 {
    200
}
fn default_retry_max_ms() -> u64 {
    5_000
}
fn default_insert_timeout_ms() -> u64 {
    30_000
}

fn default_max_rows() -> u64 {
    50_000
}
fn default_max_wait_ms() -> u64 {
    1_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Health, readiness and metrics listener, `ip:port`.
    pub listen: String,
}

impl Validate for MeterSettings {
    fn validate(&self) -> Result<(), Invalid> {
        self.kafka.validate("kafka")?;
        self.clickhouse.validate("clickhouse")?;
        in_range("batch.max_rows", self.batch.max_rows, 1, 1_000_000)?;
        in_range("batch.max_wait_ms", self.batch.max_wait_ms, 10, 600_000)?;
        in_range("batch.retry_initial_ms", self.batch.retry_initial_ms, 10, 60_000)?;
        in_range(
            "batch.retry_max_ms",
            self.batch.retry_max_ms,
            self.batch.retry_initial_ms,
            600_000,
        )?;
        in_range("batch.insert_timeout_ms", self.batch.insert_timeout_ms, 1_000, 600_000)?;
        socket_addr("admin.listen", &self.admin.listen)?;
        if self.topics.group.trim().is_empty() {
            return Err(Invalid::new("topics.group", &self.topics.group, "a non-empty group id"));
        }
        topics::validate("topics.usage", &self.topics.usage)?;
        topics::validate("topics.dlq", &self.topics.dlq)?;
        topics::validate("topics.keys", &self.topics.keys)?;
        if let Some(id) = &self.topics.instance_id {
            if !instance_id_valid(id) {
                return Err(Invalid::new(
                    "topics.instance_id",
                    id,
                    "1 to 249 characters from [A-Za-z0-9._-]",
                ));
            }
        }
        Ok(())
    }
}

/// Kafka accepts any string as `group.instance.id`; a narrow alphabet keeps it readable in
/// broker logs and free of whitespace a config file could hide.
fn instance_id_valid(id: &str) -> bool {
    (1..=249).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use tollgate_runtime::settings::from_str_with_env;

    use super::*;

    const EXAMPLE: &str = include_str!("../../config/meter-consumer.toml");

    fn load(text: &str) -> Result<MeterSettings, String> {
        from_str_with_env(text, "meter-consumer.toml", Vec::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn example_config_is_valid() {
        let s = load(EXAMPLE).unwrap();
        assert_eq!(s.topics.usage, "tollgate.usage.v1");
        assert_eq!(s.clickhouse.url, "http://127.0.0.1:8123");
    }

    #[test]
    fn rejects_zero_batch_and_bad_clickhouse_url() {
        let err = load(&EXAMPLE.replace("max_rows = 50000", "max_rows = 0")).unwrap_err();
        assert!(err.contains("setting `batch.max_rows`: found \"0\""), "{err}");
        let err = load(&EXAMPLE.replace("http://127.0.0.1:8123", "127.0.0.1:8123")).unwrap_err();
        assert!(err.contains("setting `clickhouse.url`"), "{err}");
    }

    #[test]
    fn rejects_retry_cap_below_first_wait() {
        let text = EXAMPLE
            .replace("retry_initial_ms = 200", "retry_initial_ms = 500")
            .replace("retry_max_ms = 5000", "retry_max_ms = 100");
        let err = load(&text).unwrap_err();
        assert!(err.contains("setting `batch.retry_max_ms`: found \"100\""), "{err}");
    }

    #[test]
    fn rejects_bad_database_name() {
        let err = load(&EXAMPLE.replace("database = \"tollgate\"", "database = \"x; DROP\"")).unwrap_err();
        assert!(err.contains("setting `clickhouse.database`"), "{err}");
    }

    #[test]
    fn rejects_a_topic_name_kafka_would_refuse() {
        let text = EXAMPLE.replace("dlq = \"tollgate.usage.v1.dlq\"", "dlq = \"dead letters\"");
        let err = load(&text).unwrap_err();
        assert!(err.contains("setting `topics.dlq`: found \"dead letters\""), "{err}");
    }

    #[test]
    fn rejects_a_blank_or_spaced_instance_id() {
        let text = EXAMPLE.replace(
            "keys = \"tollgate.keys\"",
            "keys = \"tollgate.keys\"\ninstance_id = \"meter 1\"",
        );
        let err = load(&text).unwrap_err();
        assert!(err.contains("setting `topics.instance_id`: found \"meter 1\""), "{err}");
        let text = EXAMPLE.replace(
            "keys = \"tollgate.keys\"",
            "keys = \"tollgate.keys\"\ninstance_id = \"\"",
        );
        assert!(load(&text).unwrap_err().contains("topics.instance_id"));
        let text = EXAMPLE.replace(
            "keys = \"tollgate.keys\"",
            "keys = \"tollgate.keys\"\ninstance_id = \"meter-a.1\"",
        );
        assert_eq!(load(&text).unwrap().topics.instance_id.as_deref(), Some("meter-a.1"));
    }
}
