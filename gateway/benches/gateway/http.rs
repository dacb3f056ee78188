//! HTTP for the benchmarks: a keep-alive client, the upstream behind the gateways, and
//! gateways served in this process on ports the OS picks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tollgate_gateway::server::Gateway;
use tollgate_gateway::GatewaySettings;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_runtime::shutdown::Shutdown;
use uuid::Uuid;

use crate::kafka::create_topic;
use crate::{SLOW_DELAY, USAGE_PARTITIONS};

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub(crate) fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

pub(crate) async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), String> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

pub(crate) async fn get(client: &HttpClient, url: &str, key: &str) -> Result<(StatusCode, Bytes), String> {
    send(
        client,
        "GET",
        url,
        &[("authorization", &format!("Bearer {key}"))],
        Vec::new(),
    )
    .await
}

/// The upstream: answers at once, except paths containing `/slow`, after [`SLOW_DELAY`].
pub(crate) struct Upstream {
    addr: SocketAddr,
    pub(crate) slow_in_flight: Arc<AtomicUsize>,
}

/// Counts a slow request in flight until its response is sent or its connection is gone.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) async fn start_upstream() -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("upstream binds");
    let addr = listener.local_addr().expect("upstream address");
    let slow_in_flight = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&slow_in_flight);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let counter = Arc::clone(&counter);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let counter = Arc::clone(&counter);
                async move {
                    if req.uri().path().contains("/slow") {
                        counter.fetch_add(1, Ordering::Relaxed);
                        let _in_flight = InFlight(counter);
                        tokio::time::sleep(SLOW_DELAY).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(br#"{"ok":true}"#))))
                }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    Upstream { addr, slow_in_flight }
}

/// A gateway served in this process, on ports the OS picks, with its own topics and spool.
pub(crate) struct BenchGateway {
    pub(crate) public: String,
    admin: String,
    client: HttpClient,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl BenchGateway {
    /// `config/gateway.toml` with both routes on `upstream`, plus `overlays`
    /// (`TOLLGATE_<SECTION>__<FIELD>`); returns once the gateway is ready.
    pub(crate) async fn start(
        kafka: &KafkaSettings,
        upstream: &Upstream,
        overlays: &[(&str, &str)],
        topics: &mut Vec<String>,
        spools: &mut Vec<PathBuf>,
    ) -> Self {
        let keys = create_topic(kafka, "keys", 1, &[("cleanup.policy", "compact")], topics).await;
        let usage = create_topic(kafka, "usage", USAGE_PARTITIONS, &[], topics).await;
        let spool = std::env::temp_dir().join(format!("tollgate-bench-spool-{}", Uuid::now_v7().simple()));
        spools.push(spool.clone());
        let upstream = format!("http://{}", upstream.addr);
        let spool_dir = spool.display().to_string();
        let env: Vec<(String, String)> = [
            ("TOLLGATE_PUBLIC__LISTEN", "127.0.0.1:0"),
            ("TOLLGATE_ADMIN__LISTEN", "127.0.0.1:0"),
            ("TOLLGATE_KAFKA__BROKERS", kafka.brokers.as_str()),
            ("TOLLGATE_TOPICS__KEYS", keys.as_str()),
            ("TOLLGATE_TOPICS__USAGE", usage.as_str()),
            ("TOLLGATE_ROUTES__0__UPSTREAM", upstream.as_str()),
            ("TOLLGATE_ROUTES__1__UPSTREAM", upstream.as_str()),
            ("TOLLGATE_EVENTS__SPOOL_DIR", spool_dir.as_str()),
            // The default plan (the bench's consumers name none) without limits: the
            // variants that measure limits name a plan of their own.
            ("TOLLGATE_PLANS__FREE__LIMITS", "[]"),
        ]
        .iter()
        .chain(overlays)
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/gateway.toml"))
            .expect("example config");
        let settings: GatewaySettings =
            tollgate_runtime::settings::from_str_with_env(&text, "config/gateway.toml", env)
                .expect("bench settings load");
        let gateway = Gateway::bind(settings, Some(ADMIN_TOKEN.to_owned()), None)
            .await
            .expect("gateway binds");
        let public = format!("http://{}", gateway.public_addr().expect("a plain HTTP listener"));
        let admin = format!("http://{}", gateway.admin_addr());
        let shutdown = Shutdown::default();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { gateway.serve(shutdown).await.expect("gateway serves") }
        });
        let client = http_client();
        let ready = format!("{admin}/readyz");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(
            send(&client, "GET", &ready, &[], Vec::new()).await,
            Ok((StatusCode::OK, _))
        ) {
            assert!(Instant::now() < deadline, "gateway not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            public,
            admin,
            client,
            shutdown,
            task,
        }
    }

    /// Creates a consumer of tenant `tenant` and one key through the admin API; the plaintext.
    pub(crate) async fn consumer_with_key(&self, name: &str, tenant: &str) -> String {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
        let consumer = serde_json::json!({"name": name, "metadata": {"tenantId": tenant}});
        let url = format!("{}/v1/consumers", self.admin);
        let (status, body) = send(&self.client, "POST", &url, &headers, consumer.to_string().into_bytes())
            .await
            .expect("create consumer");
        assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
        let url = format!("{}/v1/consumers/{name}/keys", self.admin);
        let (status, body) = send(
            &self.client,
            "POST",
            &url,
            &headers,
            br#"{"description":"bench"}"#.to_vec(),
        )
        .await
        .expect("create key");
        assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
        let key: serde_json::Value = serde_json::from_slice(&body).expect("key JSON");
        key["key"].as_str().expect("plaintext key").to_owned()
    }

    /// Stops the gateway; waits a bounded time for it to drain (its events to reach Kafka).
    pub(crate) async fn stop(self) {
        drop(self.client);
        self.shutdown.trigger();
        if tokio::time::timeout(Duration::from_secs(15), self.task).await.is_err() {
            println!("  (a gateway did not stop within 15 s; left running)");
        }
    }
}
