//! A whole gateway run, as the real binary, never writes a key or the admin token to its
//! output: issue keys, use them, use broken ones, revoke, roll, then grep everything it logged
//! (JSON logs with the access log on, whose lines name each request by key id).

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tollgate_tests::free_port;

const TOKEN: &str = "no-secrets-admin-token-5f1e2d3c4b5a";

fn kafka() -> String {
    let brokers = std::env::var("TOLLGATE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    assert!(
        TcpStream::connect_timeout(&brokers.parse().expect("host:port"), Duration::from_secs(2)).is_ok(),
        "Kafka is not reachable at {brokers}: start it with `scripts/stack up --infra`"
    );
    brokers
}

/// One HTTP/1.1 request over a fresh connection; returns status and body.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn field(json: &str, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|_| {
        // Chunked bodies: the JSON object sits between the chunk size lines.
        let start = json.find('{').unwrap();
        let end = json.rfind('}').unwrap();
        serde_json::from_str(&json[start..=end]).unwrap()
    });
    v[name].as_str().unwrap().to_owned()
}

#[test]
fn no_key_or_token_appears_in_a_whole_runs_output() {
    let brokers = kafka();
    let topic = format!("test.keys.nosecrets.{}", uuid::Uuid::now_v7().simple());
    let (public, admin, upstream) = (free_port(), free_port(), free_port());
    let settings = include_str!("../../config/gateway.toml")
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{public}"))
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{admin}"))
        .replace("127.0.0.1:8090", &format!("127.0.0.1:{upstream}"))
        .replace("keys = \"tollgate.keys\"", &format!("keys = \"{topic}\""));
    let dir = std::env::temp_dir().join(format!("tollgate-nosecrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(&config, settings).unwrap();
    create_topic(&brokers, &topic);

    let mut child = Command::new(tollgate_tests::service::binary("tollgate-gateway"))
        .arg("--config")
        .arg(&config)
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .env("TOLLGATE_KAFKA__BROKERS", &brokers)
        .env("TOLLGATE_EVENTS__SPOOL_DIR", dir.join("spool"))
        .env("RUST_LOG", "debug")
        .env("TOLLGATE_LOG__FORMAT", "json")
        .env("TOLLGATE_ACCESS_LOG__ENABLED", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gateway");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_ready(admin).is_none() {
        assert!(Instant::now() < deadline, "gateway not ready within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    let auth = format!("Bearer {TOKEN}");
    let admin_headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let (status, _) = http(
        admin,
        "POST",
        "/v1/consumers",
        &admin_headers,
        r#"{"name":"acme-corp","metadata":{"tenantId":"t1"}}"#,
    );
    assert_eq!(status, 201);
    let (status, body) = http(admin, "POST", "/v1/consumers/acme-corp/keys", &admin_headers, "{}");
    assert_eq!(status, 201);
    let key = field(&body, "key");
    let id = field(&body, "id");
    let (_, rolled) = http(
        admin,
        "POST",
        "/v1/consumers/acme-corp/roll-key",
        &admin_headers,
        r#"{"expiresOn":"2099-01-01T00:00:00Z"}"#,
    );
    let rolled = field(&rolled, "key");
    let mut typo = key.clone();
    typo.replace_range(10..11, if &key[10..11] == "Z" { "Y" } else { "Z" });
    for presented in [&key, &rolled, &typo] {
        // The upstream is down: the gateway logs a 502 for the valid keys, a 401 for the typo.
        http(
            public,
            "GET",
            "/v1/orders",
            &[("authorization", &format!("Bearer {presented}"))],
            "",
        );
        http(public, "GET", "/v1/orders", &[("x-api-key", presented)], "");
    }
    http(
        admin,
        "DELETE",
        &format!("/v1/consumers/acme-corp/keys/{id}"),
        &admin_headers,
        "",
    );
    http(
        admin,
        "GET",
        "/v1/consumers",
        &[("authorization", "Bearer wrong-token-123456789")],
        "",
    );
    let (_, metrics) = http(admin, "GET", "/metrics", &[], "");
    for line in [
        "gateway_requests_total{outcome=\"unauthenticated\"} 2",
        "gateway_requests_total{outcome=\"upstream_error\"} 4",
    ] {
        assert!(
            metrics.contains(line),
            "metrics count requests by outcome: {line} in\n{metrics}"
        );
    }

    // SIGTERM, then read everything it wrote.
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let mut output = String::new();
    child.stdout.take().unwrap().read_to_string(&mut output).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut output).unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status:?}\n{output}");
    assert!(output.contains("gateway ready"), "the run was logged:\n{output}");

    // Every line is one JSON object; the access log has a line per public request.
    let lines: Vec<serde_json::Value> = output
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "tollgate::access")
        .map(|l| &l["fields"])
        .collect();
    let mut statuses: Vec<u64> = access.iter().map(|f| f["status"].as_u64().unwrap()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [401, 401, 502, 502, 502, 502], "{access:?}");
    for line in access.iter().filter(|f| f["status"] == 502) {
        assert_eq!(line["consumer"], "acme-corp");
        assert_eq!(line["tenant"], "t1");
        assert!(line["key_id"].as_str().is_some_and(|k| !k.is_empty()), "{line}");
        assert_eq!(line["outcome"], "UPSTREAM_ERROR");
        assert!(line["request_id"].as_str().is_some_and(|r| !r.is_empty()), "{line}");
    }
    assert!(
        access.iter().any(|f| f["key_id"] == id.as_str()),
        "the first key's id is named"
    );
    for secret in [key.as_str(), rolled.as_str(), typo.as_str(), TOKEN] {
        assert!(!output.contains(secret), "a secret appears in the output");
        assert!(!metrics.contains(secret), "a secret appears in the metrics");
        // Nor its secret part alone.
        let secret_part = secret.split('_').nth(2).unwrap_or(secret);
        assert!(
            !output.contains(secret_part),
            "a key's secret part appears in the output"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn http_ready(port: u16) -> Option<()> {
    TcpStream::connect(("127.0.0.1", port)).ok()?;
    (http(port, "GET", "/readyz", &[], "").0 == 200).then_some(())
}

fn create_topic(brokers: &str, topic: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(tollgate_tests::create_topic(
        brokers,
        topic,
        1,
        &[("cleanup.policy", "compact")],
    ));
}
