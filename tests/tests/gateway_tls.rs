//! TLS both ways through the real gateway binary (issue 17): a client trusting the stack's
//! kind of local CA reaches a route on the TLS listener over h2 and over HTTP/1.1 (and the
//! upstream is told `https`); a route to a TLS upstream answers 200; a route whose upstream
//! presents a certificate from a CA the route does not trust is a 502 `upstream-certificate`
//! with its metric; a certificate renewed on disk is served to new connections without a
//! restart while an open connection keeps working.

// Needs the running stack (Kafka for the keys topic): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tollgate_gateway::tls::local_ca;
use tollgate_tests::free_port;
use tollgate_tests::gateway::{create_keys_topic, ADMIN_TOKEN};
use tollgate_tests::process::ServiceProcess;

/// A TLS connection to `port` trusting `ca`, offering `alpn`.
async fn connect(port: u16, ca: &Path, alpn: &[u8]) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("trust anchor");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .expect("TLS handshake with the gateway")
}

fn presented(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().expect("a certificate")[0]
        .as_ref()
        .to_vec()
}

/// HTTP/1.1 or h2 (by the protocol the handshake agreed) over `tls`; the sender stays usable
/// for more requests on the same connection.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn handshake(tls: TlsStream<TcpStream>) -> Sender {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(tls);
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        Sender::H2(sender)
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1 handshake");
        tokio::spawn(conn);
        Sender::H1(sender)
    }
}

impl Sender {
    async fn get(&mut self, path: &str, key: &str) -> (u16, serde_json::Value) {
        let builder = hyper::Request::get(path).header("authorization", format!("Bearer {key}"));
        let response = match self {
            Sender::H1(s) => {
                s.send_request(builder.header("host", "127.0.0.1").body(Empty::new()).unwrap())
                    .await
            }
            Sender::H2(s) => {
                let uri = format!("https://127.0.0.1{path}");
                s.send_request(
                    hyper::Request::get(uri)
                        .header("authorization", format!("Bearer {key}"))
                        .body(Empty::new())
                        .unwrap(),
                )
                .await
            }
        }
        .expect("a response");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }
}

async fn metric(admin: &str, line: &str) -> bool {
    let metrics = tollgate_tests::http::send("GET", &format!("{admin}/metrics"), &[], b"").await;
    metrics.text().lines().any(|l| l.starts_with(line))
}

#[tokio::test]
async fn tls_both_ways_with_a_certificate_swapped_on_disk() {
    let run = tollgate_tests::unique("tls");
    let dir = std::env::temp_dir().join(&run);
    let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    let ours = local_ca::ensure(&dir.join("ours"), &names, false).expect("our CA");
    let theirs = local_ca::ensure(&dir.join("theirs"), &names, false).expect("another CA");

    // The demo upstream on TLS with our CA's certificate.
    let (plain_port, tls_port) = (free_port(), free_port());
    let mut upstream = ServiceProcess::new(
        "tollgate-demo-upstream",
        &[
            "--listen",
            &format!("127.0.0.1:{plain_port}"),
            "--tls-listen",
            &format!("127.0.0.1:{tls_port}"),
            "--tls-cert",
            &ours.server_cert.display().to_string(),
            "--tls-key",
            &ours.server_key.display().to_string(),
        ],
        Vec::new(),
        format!("http://127.0.0.1:{plain_port}/"),
        &dir,
    );
    upstream.start().await;

    // Route 0 (`/v1/`) to the plain upstream; route 1 (the tenant-scoped one) to the TLS
    // upstream trusting only the other CA; route 2 (`/secure/`) to it trusting ours.
    let gateway_tls_port = free_port();
    let usage = format!("{run}.usage");
    tollgate_tests::create_topic(&tollgate_tests::kafka(), &usage, 1, &[]).await;
    let secure = format!("https://127.0.0.1:{tls_port}");
    let (ours_ca, theirs_ca) = (ours.ca_cert.display().to_string(), theirs.ca_cert.display().to_string());
    let (cert, key) = (
        ours.server_cert.display().to_string(),
        ours.server_key.display().to_string(),
    );
    let listen = format!("127.0.0.1:{gateway_tls_port}");
    let mut gateway = tollgate_tests::process::gateway(
        &dir,
        ADMIN_TOKEN,
        &tollgate_tests::kafka(),
        (&create_keys_topic().await, &usage),
        &format!("http://127.0.0.1:{plain_port}"),
        &[
            ("TOLLGATE_PUBLIC__TLS__LISTEN", &listen),
            ("TOLLGATE_PUBLIC__TLS__CERT_FILE", &cert),
            ("TOLLGATE_PUBLIC__TLS__KEY_FILE", &key),
            ("TOLLGATE_PUBLIC__TLS__RELOAD_INTERVAL_MS", "200"),
            ("TOLLGATE_ROUTES__1__UPSTREAM", &secure),
            ("TOLLGATE_ROUTES__1__UPSTREAM_CA_FILE", &theirs_ca),
            ("TOLLGATE_ROUTES__2__UPSTREAM", &secure),
            ("TOLLGATE_ROUTES__2__UPSTREAM_CA_FILE", &ours_ca),
        ],
    );
    gateway.process.start().await;
    let key = gateway
        .consumer_with_key(
            ADMIN_TOKEN,
            "tls-acme",
            json!({"tenantId": "t_tls", "plan": "enterprise"}),
        )
        .await;

    // h2 and HTTP/1.1 on the TLS listener; the upstream is told the client used https.
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let tls = connect(gateway_tls_port, &ours.ca_cert, alpn).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn), "ALPN agreed");
        let mut sender = handshake(tls).await;
        let (status, echo) = sender.get("/v1/hello", &key).await;
        assert_eq!(status, 200, "{echo}");
        assert_eq!(echo["path"], "/v1/hello");
        assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{echo}");
        assert!(echo["headers"]["forwarded"].as_str().unwrap().ends_with("proto=https"));
    }
    // The plain listener still says http.
    let plain = tollgate_tests::http::send(
        "GET",
        &format!("{}/v1/hello", gateway.public),
        &[("authorization", &format!("Bearer {key}"))],
        b"",
    )
    .await;
    assert_eq!(plain.json()["headers"]["x-forwarded-proto"], "http");

    // A TLS upstream the route trusts, and one it does not.
    let mut sender = handshake(connect(gateway_tls_port, &ours.ca_cert, b"http/1.1").await).await;
    let (status, echo) = sender.get("/secure/items?x=1", &key).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["path"], "/secure/items");
    let (status, problem) = sender.get("/v1/tenants/t_tls/items", &key).await;
    assert_eq!(status, 502, "{problem}");
    assert!(
        problem["type"].as_str().unwrap().ends_with("upstream-certificate"),
        "{problem}"
    );
    assert!(
        metric(
            &gateway.admin,
            "gateway_upstream_failures_total{reason=\"certificate\"} 1"
        )
        .await,
        "the certificate failure is counted"
    );
    let log = gateway.process.output();
    assert!(
        log.contains("tenant-scoped") && log.contains("certificate"),
        "the log names the route"
    );

    // Renew the certificate on disk: new connections get it without a restart; the open
    // connection (which has the old one) keeps serving.
    let mut kept = handshake(connect(gateway_tls_port, &ours.ca_cert, b"http/1.1").await).await;
    let before = presented(&connect(gateway_tls_port, &ours.ca_cert, b"http/1.1").await);
    local_ca::ensure(&dir.join("ours"), &names, true).expect("renewed certificate");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = presented(&connect(gateway_tls_port, &ours.ca_cert, b"http/1.1").await);
        if now != before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate is not served after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = kept.get("/v1/hello", &key).await;
    assert_eq!(status, 200, "a connection opened before the swap still serves");
    assert!(metric(&gateway.admin, "gateway_tls_reloads_total{reason=\"loaded\"}").await);
    let mut fresh = handshake(connect(gateway_tls_port, &ours.ca_cert, b"h2").await).await;
    assert_eq!(fresh.get("/v1/hello", &key).await.0, 200);

    gateway.process.terminate();
    assert!(gateway.process.wait_exit(Duration::from_secs(30)).await.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// With no `public.listen` the gateway serves TLS only; SIGHUP reloads a certificate renewed on
/// disk at once, long before the next file check.
#[tokio::test]
async fn tls_only_with_a_certificate_reloaded_on_sighup() {
    let run = tollgate_tests::unique("tls-only");
    let dir = std::env::temp_dir().join(&run);
    let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    let ca = local_ca::ensure(&dir.join("ca"), &names, false).expect("local CA");
    let upstream = tollgate_tests::http::EchoUpstream::start().await;
    let example =
        std::fs::read_to_string(tollgate_tests::process::repo().join("config/gateway.toml")).expect("example settings");
    let tls_only = example.replacen("[public]\nlisten = \"127.0.0.1:8080\"\n", "[public]\n", 1);
    assert_ne!(
        tls_only, example,
        "the example's [public] listen line is where this test expects"
    );
    let config = dir.join("gateway.toml");
    std::fs::write(&config, tls_only).expect("settings");

    let usage = format!("{run}.usage");
    tollgate_tests::create_topic(&tollgate_tests::kafka(), &usage, 1, &[]).await;
    let tls_port = free_port();
    let (listen, cert, key) = (
        format!("127.0.0.1:{tls_port}"),
        ca.server_cert.display().to_string(),
        ca.server_key.display().to_string(),
    );
    let mut gateway = tollgate_tests::process::gateway_on(
        &config,
        &dir,
        ADMIN_TOKEN,
        &tollgate_tests::kafka(),
        (&create_keys_topic().await, &usage),
        &upstream.url(),
        &[
            ("TOLLGATE_PUBLIC__TLS__LISTEN", &listen),
            ("TOLLGATE_PUBLIC__TLS__CERT_FILE", &cert),
            ("TOLLGATE_PUBLIC__TLS__KEY_FILE", &key),
            // An hour between file checks: only the signal can reload within the test.
            ("TOLLGATE_PUBLIC__TLS__RELOAD_INTERVAL_MS", "3600000"),
        ],
    );
    gateway.process.unset_env("TOLLGATE_PUBLIC__LISTEN");
    gateway.process.start().await;
    let api_key = gateway
        .consumer_with_key(
            ADMIN_TOKEN,
            "tls-only-acme",
            json!({"tenantId": "t_tls_only", "plan": "enterprise"}),
        )
        .await;

    let mut sender = handshake(connect(tls_port, &ca.ca_cert, b"h2").await).await;
    let (status, echo) = sender.get("/v1/hello", &api_key).await;
    assert_eq!(status, 200, "{echo}");
    let plain_port = gateway.public.rsplit(':').next().expect("a port").to_owned();
    assert!(
        TcpStream::connect(format!("127.0.0.1:{plain_port}")).await.is_err(),
        "no plain HTTP listener without public.listen"
    );

    let before = presented(&connect(tls_port, &ca.ca_cert, b"http/1.1").await);
    local_ca::ensure(&dir.join("ca"), &names, true).expect("renewed certificate");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        presented(&connect(tls_port, &ca.ca_cert, b"http/1.1").await),
        before,
        "nothing reloads the files before the signal"
    );
    gateway.process.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while presented(&connect(tls_port, &ca.ca_cert, b"http/1.1").await) == before {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the certificate in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = sender.get("/v1/hello", &api_key).await;
    assert_eq!(status, 200, "a connection opened before the reload still serves");

    gateway.process.terminate();
    assert!(gateway.process.wait_exit(Duration::from_secs(30)).await.success());
    let _ = std::fs::remove_dir_all(&dir);
}
