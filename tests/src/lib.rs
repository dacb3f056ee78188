//! Shared helpers for the end-to-end tests: where the stack's services are, a fail-fast check
//! that each is up, and unique names so tests can run side by side.
//!
//! Addresses come from `TOLLGATE_TEST_*` (set by `scripts/stack test`), defaulting to the
//! native stack's loopback ports.
#![forbid(unsafe_code)]

pub mod gateway;
pub mod http;
pub mod private_kafka;

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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

fn require_listening(what: &str, host_port: &str) {
    let addr: Option<SocketAddr> = host_port.to_socket_addrs().ok().and_then(|mut a| a.next());
    let up = addr.is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    assert!(up, "{what} is not reachable at {host_port}: {START_HINT}");
}

/// A name no other test (or earlier run) uses: `<prefix>_<uuid v7 simple>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Polls `check` until it returns `Some` or `deadline` passes; the last `None` is a failure.
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
