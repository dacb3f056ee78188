//! A stack of a test's own for spend caps and alerts: topics and a ClickHouse database, a
//! catalogue pricing every plan of the example gateway settings, meter-consumer counting into
//! that database, and gateways enforcing caps from it.
//!
//! In: the servers of the running stack (Kafka, ClickHouse). Out: [`CappedStack`], whose
//! processes stop when it is dropped and whose database and directory [`CappedStack::remove`]
//! deletes.

use crate::free_port;
use crate::http::EchoUpstream;
use crate::process::{gateway, GatewayProcess, ServiceProcess};
use crate::{clickhouse, create_topic, kafka, unique};

/// What one `/v1/` request (1 request, 1 compute unit) costs on every plan of the catalogue,
/// in minor units: 10 + 1.
pub const REQUEST_COST: i64 = 11;

/// How often the stack's gateways re-read month-to-date spend from ClickHouse.
pub const REFRESH_MS: u64 = 300;

pub struct CappedStack {
    pub dir: std::path::PathBuf,
    pub keys: String,
    pub usage: String,
    pub database: String,
    pub upstream: EchoUpstream,
    _meter: ServiceProcess,
}

impl CappedStack {
    pub async fn start(prefix: &str) -> Self {
        let run = unique(prefix);
        let dir = std::env::temp_dir().join(&run);
        std::fs::create_dir_all(&dir).expect("test directory");
        let (keys, usage, dlq) = (format!("{run}.keys"), format!("{run}.usage"), format!("{run}.dlq"));
        create_topic(&kafka(), &keys, 1, &[("cleanup.policy", "compact")]).await;
        create_topic(&kafka(), &usage, 3, &[]).await;
        create_topic(&kafka(), &dlq, 1, &[]).await;
        let mut catalogue = String::new();
        for plan in ["free", "starter", "professional", "enterprise"] {
            catalogue.push_str(&format!(
                "[plans.{plan}]\ncurrency = \"usd\"\nmeters.requests = {{ unit_price_minor = \"10\" }}\nmeters.compute_units = {{ unit_price_minor = \"1\" }}\n"
            ));
        }
        std::fs::write(dir.join("plans.toml"), catalogue).expect("catalogue");
        let meter_env = crate::meter::Env {
            brokers: kafka(),
            clickhouse: clickhouse(),
            database: run.clone(),
            usage: usage.clone(),
            dlq,
            keys: keys.clone(),
            group: format!("{run}.meter"),
        };
        let meter_port = free_port();
        let meter_config = dir.join("meter-consumer.toml");
        std::fs::write(
            &meter_config,
            meter_env.settings_toml_on(&clickhouse(), 5000, 200, &format!("127.0.0.1:{meter_port}")),
        )
        .expect("meter-consumer settings");
        let mut meter = ServiceProcess::new(
            "tollgate-meter-consumer",
            &["--config", &meter_config.display().to_string()],
            Vec::new(),
            format!("http://127.0.0.1:{meter_port}/healthz"),
            &dir,
        );
        meter.start().await;
        Self {
            dir,
            keys,
            usage,
            database: run,
            upstream: EchoUpstream::start().await,
            _meter: meter,
        }
    }

    /// The catalogue the gateways price with.
    pub fn catalogue(&self) -> std::path::PathBuf {
        self.dir.join("plans.toml")
    }

    /// A gateway on the example settings (its files under `name`) enforcing caps from this
    /// stack's ClickHouse, re-read every [`REFRESH_MS`], with `extra` settings overlays.
    pub fn gateway(&self, name: &str, admin_token: &str, extra: &[(&str, &str)]) -> GatewayProcess {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).expect("gateway directory");
        let catalogue = self.catalogue().display().to_string();
        let (clickhouse, refresh) = (clickhouse(), REFRESH_MS.to_string());
        let mut overlays = vec![
            ("TOLLGATE_BUDGETS__CATALOGUE", catalogue.as_str()),
            ("TOLLGATE_BUDGETS__CLICKHOUSE__URL", clickhouse.as_str()),
            ("TOLLGATE_BUDGETS__CLICKHOUSE__DATABASE", self.database.as_str()),
            ("TOLLGATE_BUDGETS__REFRESH_INTERVAL_MS", refresh.as_str()),
        ];
        overlays.extend_from_slice(extra);
        gateway(
            &dir,
            admin_token,
            &kafka(),
            (&self.keys, &self.usage),
            &self.upstream.url(),
            &overlays,
        )
    }

    /// A client on this stack's database.
    pub fn client(&self) -> ::clickhouse::Client {
        ::clickhouse::Client::default()
            .with_url(clickhouse())
            .with_database(&self.database)
            .with_validation(false)
    }

    pub async fn remove(self) {
        let client = ::clickhouse::Client::default().with_url(clickhouse());
        let _ = client
            .query(&format!("DROP DATABASE IF EXISTS {}", self.database))
            .execute()
            .await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
