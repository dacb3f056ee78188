//! Gateways for the end-to-end tests: the real gateway, in-process, on ports the OS picks,
//! following a keys topic of the test's own, in front of a test upstream.

use std::time::Duration;

use serde_json::Value;
use tollgate_gateway::server::Gateway;
use tollgate_gateway::GatewaySettings;
use tollgate_runtime::settings::from_str_with_env;
use tollgate_runtime::shutdown::Shutdown;

use crate::http::{send, Reply};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// Creates a compacted, one-partition topic like the stack's `tollgate.keys`.
pub async fn create_keys_topic() -> String {
    let topic = crate::unique("test.keys");
    create_topic(&topic, 1, &[("cleanup.policy", "compact")]).await;
    topic
}

/// Creates `topic` on the stack's Kafka.
pub async fn create_topic(topic: &str, partitions: i32, config: &[(&str, &str)]) {
    crate::create_topic(&crate::kafka(), topic, partitions, config).await;
}

/// The example settings (`config/gateway.toml`) pointed at the test's topic and upstream.
pub fn settings(keys_topic: &str, upstream: &str) -> GatewaySettings {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/gateway.toml"))
        .expect("example config");
    let env = [
        ("TOLLGATE_PUBLIC__LISTEN", "127.0.0.1:0"),
        ("TOLLGATE_ADMIN__LISTEN", "127.0.0.1:0"),
        ("TOLLGATE_KAFKA__BROKERS", &crate::kafka()),
        ("TOLLGATE_TOPICS__KEYS", keys_topic),
        ("TOLLGATE_ROUTES__0__UPSTREAM", upstream),
        ("TOLLGATE_ROUTES__1__UPSTREAM", upstream),
        ("TOLLGATE_EVENTS__SPOOL_DIR", &spool_dir()),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    from_str_with_env(&text, "config/gateway.toml", env).expect("example settings load")
}

/// A route to an upstream that is never there (port 1 on loopback: connections are refused).
pub fn dead_route() -> tollgate_gateway::settings::RouteSettings {
    tollgate_gateway::settings::RouteSettings {
        id: "dead".into(),
        path: "/dead/".into(),
        methods: vec![],
        upstream: "http://127.0.0.1:1".into(),
        timeout_ms: 1000,
        ..Default::default()
    }
}

/// A spool directory of the test's own.
pub fn spool_dir() -> String {
    std::env::temp_dir()
        .join(crate::unique("tollgate-spool"))
        .display()
        .to_string()
}

pub struct TestGateway {
    pub public: String,
    pub admin: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl TestGateway {
    /// Starts a gateway and waits until it has replayed its keys topic.
    pub async fn start(settings: GatewaySettings, signing_secret: Option<&str>) -> Self {
        // The gateway's warnings go into the test's captured output, so a failing test shows
        // what the gateway said (libtest prints it only on failure).
        let _ = tracing_subscriber::fmt()
            // librdkafka's lines arrive twice: as its own and as rdkafka's "global error".
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn,rdkafka::client=off"))
            .with_test_writer()
            .try_init();
        let gateway = Gateway::bind(
            settings,
            Some(ADMIN_TOKEN.to_owned()),
            signing_secret.map(str::to_owned),
        )
        .await
        .expect("gateway binds");
        let public = format!("http://{}", gateway.public_addr().expect("a plain HTTP listener"));
        let admin = format!("http://{}", gateway.admin_addr());
        let shutdown = Shutdown::default();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { gateway.serve(shutdown).await.expect("gateway serves") }
        });
        let ready_url = format!("{admin}/readyz");
        crate::eventually("gateway ready", Duration::from_secs(30), || async {
            (send("GET", &ready_url, &[], b"").await.status == 200).then_some(())
        })
        .await;
        Self {
            public,
            admin,
            shutdown,
            task,
        }
    }

    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        send(
            method,
            &format!("{}{path}", self.admin),
            &[("authorization", &auth), ("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
    }

    /// Creates a consumer and one key; returns the key's plaintext and id.
    pub async fn consumer_with_key(&self, name: &str, metadata: Value) -> (String, String) {
        let created = self
            .admin(
                "POST",
                "/v1/consumers",
                Some(serde_json::json!({"name": name, "metadata": metadata})),
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.text());
        let key = self
            .admin(
                "POST",
                &format!("/v1/consumers/{name}/keys"),
                Some(serde_json::json!({})),
            )
            .await;
        assert_eq!(key.status, 201, "{}", key.text());
        let key = key.json();
        (
            key["key"].as_str().expect("plaintext").to_owned(),
            key["id"].as_str().expect("id").to_owned(),
        )
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        send("GET", &format!("{}{path}", self.public), headers, b"").await
    }

    /// Stops accepting, drains, and waits for the gateway to finish.
    pub async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.expect("gateway task");
    }
}
