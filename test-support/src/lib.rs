//! What every test and benchmark that needs the stack shares, in one home: where the stack's
//! servers are and a fail-fast check that each is up, unique names so tests can run side by
//! side, topic creation, polling with a deadline, running a service binary, a Kafka broker of
//! a test's own, and the meter workload with the totals ClickHouse must hold.
//!
//! In: `TOLLGATE_TEST_*` addresses (set by `scripts/stack test`), defaulting to the native
//! stack's loopback ports. Out: addresses that answered, or a panic that says how to start
//! the missing server.
//!
//! Depends on no Tollgate service, so every service crate can use it as a dev-dependency.
#![forbid(unsafe_code)]

pub mod meter;
pub mod private_kafka;
pub mod redis_cluster;
pub mod service;

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// How to bring the stack up, for every "is down" message.
pub const START_HINT: &str = "start it with `scripts/stack up --infra` (or run the tests with `scripts/stack test`)";

fn var_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Kafka bootstrap address; panics at once, saying how to start it, when nothing listens.
pub fn kafka() -> String {
    let brokers = var_or("TOLLGATE_TEST_KAFKA", "127.0.0.1:9092");
    require_listening("Kafka", &brokers);
    brokers
}

/// ClickHouse HTTP URL; panics at once when nothing listens.
pub fn clickhouse() -> String {
    let url = var_or("TOLLGATE_TEST_CLICKHOUSE", "http://127.0.0.1:8123");
    require_listening("ClickHouse", url.trim_start_matches("http://").trim_end_matches('/'));
    url
}

/// The cluster stack's ClickHouse replicas, one URL each (`scripts/stack up --cluster`);
/// panics at once when one does not listen.
pub fn cluster_clickhouse() -> Vec<String> {
    let urls = var_or(
        "TOLLGATE_TEST_CLUSTER_CLICKHOUSE",
        "http://127.0.0.1:19123,http://127.0.0.1:19124",
    );
    let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
    for url in &urls {
        assert!(
            listening(url.trim_start_matches("http://").trim_end_matches('/')),
            "the cluster stack's ClickHouse replica {url} is not reachable: start it with `scripts/stack up --cluster`"
        );
    }
    urls
}

/// The stack's ClickHouse user with a password (`scripts/clickhouse/users.xml`): services run
/// as it in the tests that check the password never shows in their output.
pub const CLICKHOUSE_SECRETS_USER: &str = "tollgate_secrets";
/// Its password, known only to those tests; it guards nothing on a loopback-only server.
pub const CLICKHOUSE_SECRETS_PASSWORD: &str = "ch-pw-secrets-check-5e1d07a9";

/// stripe-mock base URL (with trailing slash); panics at once when nothing listens.
pub fn stripe() -> String {
    let url = var_or("TOLLGATE_TEST_STRIPE", "http://127.0.0.1:12111");
    require_listening("stripe-mock", url.trim_start_matches("http://").trim_end_matches('/'));
    format!("{}/", url.trim_end_matches('/'))
}

/// Redis URL; panics at once when nothing listens.
pub fn redis() -> String {
    let url = var_or("TOLLGATE_TEST_REDIS", "redis://127.0.0.1:6379");
    require_listening("Redis", url.trim_start_matches("redis://").trim_end_matches('/'));
    url
}

/// Panics, naming the server and how to start it, when nothing accepts on `host_port`.
pub fn require_listening(what: &str, host_port: &str) {
    assert!(
        listening(host_port),
        "{what} is not reachable at {host_port}: {START_HINT}"
    );
}

fn listening(host_port: &str) -> bool {
    let addr: Option<SocketAddr> = host_port.to_socket_addrs().ok().and_then(|mut a| a.next());
    addr.is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// A name no other test (or earlier run) uses: `<prefix>_<uuid v7 simple>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Creates `topic` on `brokers` with `partitions` and topic-level `config`
/// (`cleanup.policy=compact`, ...), replication 1 as on the native stack.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (key, value) in config {
        new = new.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&[new], &options)
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(name, err)| panic!("topic {name} not created: {err}"));
    }
    // The controller answers once the topic is committed; the broker serves it a moment later.
    // A service started in that moment would find the topic missing and exit.
    let topic = topic.to_owned();
    eventually(
        &format!("topic {topic} served with {partitions} partitions"),
        Duration::from_secs(30),
        || {
            let metadata = admin.inner().fetch_metadata(Some(&topic), Duration::from_secs(5));
            let served = metadata.ok().is_some_and(|m| {
                m.topics().iter().any(|t| {
                    t.error().is_none()
                        && t.partitions().len() == partitions as usize
                        && t.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none())
                })
            });
            std::future::ready(served.then_some(()))
        },
    )
    .await;
}

/// A loopback port free right now (bound and released: a service given it binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `check` until it returns `Some` or `deadline` passes; the last `None` is a failure.
/// Deadlines are generous: they bound a hang, they do not measure speed.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "{what}: not true within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
