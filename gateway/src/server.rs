//! The gateway's listeners and start-up order.
//!
//! In: validated settings, the admin token and signing secret, a shutdown signal. Out: the
//! public listener (tenant traffic through [`Proxy`]) and the admin listener (admin API and
//! ops endpoints), served until shutdown, then drained.
//!
//! Order: bind both listeners (a taken port fails at once), serve ops while the keys topic
//! replays (tenant and admin requests get 503 until then, `/readyz` says why), then ready.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tollgate_runtime::ops::Ops;
use tollgate_runtime::shutdown::Shutdown;

use crate::admin::Admin;
use crate::chain::{Body, HyperUpstream, Proxy};
use crate::keystore::{KeyStore, StoreError};
use crate::settings::{GatewaySettings, ADMIN_TOKEN_ENV};
use crate::tls::{OverTls, ServerCerts};

/// The shortest admin token accepted: anything shorter is guessable.
const MIN_ADMIN_TOKEN_LEN: usize = 16;
/// How long in-flight requests may take to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{ADMIN_TOKEN_ENV} is not set: the admin API needs a token of {MIN_ADMIN_TOKEN_LEN} or more characters")]
    MissingAdminToken,
    #[error("{ADMIN_TOKEN_ENV} is too short: use {MIN_ADMIN_TOKEN_LEN} or more characters")]
    ShortAdminToken,
    #[error("{which} listener: cannot bind {addr}: {source}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kafka(#[from] tollgate_runtime::kafka::KafkaCheckError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Events(#[from] crate::events::EventError),
    #[error(transparent)]
    Limits(#[from] crate::limits::LimitsError),
    #[error("public.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("budgets.catalogue: {0}")]
    Catalogue(#[from] tollgate_runtime::catalogue::CatalogueError),
    #[error("budgets.catalogue {path}: plan {plan:?} has no prices there, so its tenants' spend cannot be capped")]
    UnpricedPlan { path: String, plan: String },
}

/// What serves requests once the keys topic has been replayed.
struct Live {
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
}

/// A gateway with its listeners bound, not yet serving.
pub struct Gateway {
    settings: Arc<GatewaySettings>,
    admin_token: String,
    signing_secret: Option<Vec<u8>>,
    public: Option<TcpListener>,
    /// The TLS listener and its certificate, with `[public.tls]`.
    public_tls: Option<(TcpListener, Arc<ServerCerts>)>,
    admin: TcpListener,
}

impl Gateway {
    pub async fn bind(
        settings: GatewaySettings,
        admin_token: Option<String>,
        signing_secret: Option<String>,
    ) -> Result<Self, GatewayError> {
        let admin_token = match admin_token {
            None => return Err(GatewayError::MissingAdminToken),
            Some(t) if t.is_empty() => return Err(GatewayError::MissingAdminToken),
            Some(t) if t.len() < MIN_ADMIN_TOKEN_LEN => return Err(GatewayError::ShortAdminToken),
            Some(t) => t,
        };
        let public = match &settings.public.listen {
            Some(listen) => Some(bind("public", listen).await?),
            None => None,
        };
        let public_tls = match &settings.public.tls {
            Some(tls) => {
                let certs = ServerCerts::load(tls)?;
                Some((bind("public TLS", &tls.listen).await?, certs))
            }
            None => None,
        };
        let admin = bind("admin", &settings.admin.listen).await?;
        Ok(Self {
            settings: Arc::new(settings),
            admin_token,
            signing_secret: signing_secret.filter(|s| !s.is_empty()).map(String::into_bytes),
            public,
            public_tls,
            admin,
        })
    }

    /// The plain HTTP listener's address, unless the gateway serves TLS only.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"))
    }

    /// The TLS listener's address, with `[public.tls]`.
    pub fn public_tls_addr(&self) -> Option<SocketAddr> {
        self.public_tls
            .as_ref()
            .map(|(l, _)| l.local_addr().expect("bound listener has an address"))
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    /// Replays the keys topic, serves until `shutdown`, then drains in-flight requests.
    pub async fn serve(self, shutdown: Shutdown) -> Result<(), GatewayError> {
        let settings = self.settings;
        let (ops, recorder) = Ops::new();
        let recorder = Arc::new(recorder);
        let event_metrics = Arc::new(crate::events::metrics::EventMetrics::new(&*recorder));
        let gateway_metrics = Arc::new(crate::metrics::GatewayMetrics::new(recorder.clone()));
        ops.set_not_ready("replaying the keys topic");
        let live: Arc<OnceLock<Live>> = Arc::default();

        let admin_task = {
            let (ops, live) = (ops.clone(), Arc::clone(&live));
            tokio::spawn(serve(
                self.admin,
                Transport::Plain,
                shutdown.clone(),
                ConnectionPolicy::new(&settings.http, Arc::clone(&gateway_metrics)),
                move |req, _peer| {
                    let (ops, live) = (ops.clone(), Arc::clone(&live));
                    async move {
                        if let Some(response) = ops.respond(&req) {
                            return response.map(|b| b.map_err(|never| match never {}).boxed());
                        }
                        match live.get() {
                            Some(live) => Arc::clone(&live.admin)
                                .handle(req)
                                .await
                                .map(|b| b.map_err(|never| match never {}).boxed()),
                            None => crate::chain::starting::starting_response(&req, None),
                        }
                    }
                },
            ))
        };
        // While starting, public answers are 503s that still get a request id and a usage
        // event (the sink opens before the replay: it needs only the spool directory).
        let starting: Arc<OnceLock<crate::chain::starting::Starting>> = Arc::default();
        let public_handler = {
            let (live, starting) = (Arc::clone(&live), Arc::clone(&starting));
            move |req: Request<Incoming>, peer| {
                let (live, starting) = (Arc::clone(&live), Arc::clone(&starting));
                async move {
                    match live.get() {
                        Some(live) => Arc::clone(&live.proxy).handle(req, peer).await,
                        None => crate::chain::starting::starting_response(&req, starting.get()),
                    }
                }
            }
        };
        let public_policy = ConnectionPolicy::new(&settings.http, Arc::clone(&gateway_metrics));
        let public_task = self.public.map(|listener| {
            tokio::spawn(serve(
                listener,
                Transport::Plain,
                shutdown.clone(),
                public_policy.clone(),
                public_handler.clone(),
            ))
        });
        // The TLS listener shares the plain one's connection table: the caps are per gateway.
        let tls_task = self.public_tls.map(|(listener, certs)| {
            tokio::spawn(crate::tls::watch(
                Arc::clone(&certs),
                Arc::clone(&gateway_metrics),
                shutdown.clone(),
            ));
            tokio::spawn(serve(
                listener,
                Transport::Tls(certs),
                shutdown.clone(),
                public_policy,
                public_handler,
            ))
        });

        let (usage, pipeline) = if settings.events.enabled {
            let (sink, pipeline) = crate::events::start(
                settings.events.clone(),
                &settings.kafka,
                &settings.topics.usage,
                &settings.service.id,
                event_metrics,
            )?;
            (sink, Some(pipeline))
        } else {
            (
                crate::events::UsageSink::disabled(settings.events.clone(), event_metrics),
                None,
            )
        };
        let _ = starting.set(crate::chain::starting::Starting {
            usage: usage.clone(),
            metrics: Arc::clone(&gateway_metrics),
            gateway_id: settings.service.id.clone(),
        });
        tollgate_runtime::kafka::check_topics(
            &settings.kafka,
            &[settings.topics.keys.clone(), settings.topics.usage.clone()],
        )
        .await?;
        if let Some(pipeline) = &pipeline {
            pipeline.kafka_checked();
        }
        let store = KeyStore::start(&settings.kafka, &settings.topics.keys).await?;
        let limiter = crate::limits::build(&settings.limits, crate::limits::LimitsMetrics::new(&*recorder))?;
        let mut proxy = Proxy::new(
            Arc::clone(&settings),
            Arc::clone(store.directory()),
            self.signing_secret,
            usage,
            limiter,
            Arc::clone(&gateway_metrics),
            Arc::new(HyperUpstream::new(
                Duration::from_millis(settings.http.upstream_connect_timeout_ms),
                &settings.routes,
            )?),
        );
        let spend = start_spend_caps(&settings, store.directory())?;
        if let Some(ledger) = &spend {
            proxy = proxy.with_spend_caps(Arc::clone(ledger));
        }
        let proxy = Arc::new(proxy);
        let admin = Admin {
            store,
            token: self.admin_token,
            key_env: settings.keys.environment.clone(),
            identity: settings.identity.clone(),
            plans: settings.plans.clone(),
            meters: settings.meters.clone(),
            spend,
            proxy: Arc::clone(&proxy),
            portal: settings.portal.clone().map(crate::admin::portal::PortalLinks::new),
        };
        let _ = live.set(Live {
            proxy,
            admin: Arc::new(admin),
        });
        ops.set_ready();
        tracing::info!(
            public = settings.public.listen.as_deref(),
            public_tls = settings.public.tls.as_ref().map(|t| t.listen.as_str()),
            admin = %settings.admin.listen,
            "gateway ready"
        );

        if let Some(task) = public_task {
            let _ = task.await;
        }
        if let Some(task) = tls_task {
            let _ = task.await;
        }
        let _ = admin_task.await;
        // Every request has finished (or the drain timed out): their events are recorded.
        if let Some(pipeline) = pipeline {
            pipeline.shutdown().await;
        }
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// With `[budgets]`: the catalogue loaded (every plan priced), the ledger, and its ClickHouse
/// refresh running. ClickHouse is not waited for: budgeted tenants get `spend-unknown` until
/// the first read lands, everyone else is served.
fn start_spend_caps(
    settings: &GatewaySettings,
    directory: &Arc<std::sync::RwLock<crate::directory::Directory>>,
) -> Result<Option<Arc<crate::spend::SpendLedger>>, GatewayError> {
    let Some(budgets) = &settings.budgets else {
        return Ok(None);
    };
    let started_ms = chrono::Utc::now().timestamp_millis();
    let catalogue = tollgate_runtime::catalogue::Catalogue::load(&budgets.catalogue)?;
    if let Some(plan) = settings.plans.keys().find(|p| !catalogue.plans.contains_key(*p)) {
        return Err(GatewayError::UnpricedPlan {
            path: budgets.catalogue.display().to_string(),
            plan: plan.clone(),
        });
    }
    let ledger = crate::spend::SpendLedger::new(catalogue);
    tokio::spawn(crate::spend::refresh::run(
        Arc::clone(&ledger),
        Arc::clone(directory),
        budgets.clickhouse.client(),
        Duration::from_millis(budgets.refresh_interval_ms),
        crate::spend::refresh::Own {
            gateway_id: settings.service.id.clone(),
            started_ms,
        },
    ));
    Ok(Some(ledger))
}

/// Binds, replays and serves until `shutdown` fires.
pub async fn run(
    settings: GatewaySettings,
    admin_token: Option<String>,
    signing_secret: Option<String>,
    shutdown: Shutdown,
) -> Result<(), GatewayError> {
    Gateway::bind(settings, admin_token, signing_secret)
        .await?
        .serve(shutdown)
        .await
}

async fn bind(which: &'static str, listen: &str) -> Result<TcpListener, GatewayError> {
    let addr: SocketAddr = listen.parse().expect("validated by GatewaySettings::validate");
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { which, addr, source })
}

/// How a listener treats its connections.
#[derive(Clone)]
struct ConnectionPolicy {
    header_read_timeout: Duration,
    first_request_timeout: Duration,
    idle_timeout: Duration,
    h2_keep_alive_interval: Duration,
    table: Arc<crate::connections::ConnectionTable>,
}

impl ConnectionPolicy {
    fn new(http: &crate::settings::HttpSettings, metrics: Arc<crate::metrics::GatewayMetrics>) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
            first_request_timeout: Duration::from_millis(http.first_request_timeout_ms),
            idle_timeout: Duration::from_millis(http.idle_timeout_ms),
            h2_keep_alive_interval: Duration::from_millis(http.h2_keep_alive_interval_ms),
            table: crate::connections::ConnectionTable::new(
                http.max_connections as usize,
                http.max_connections_per_ip as usize,
                metrics,
            ),
        }
    }
}

/// What a listener's connections speak below HTTP.
#[derive(Clone)]
enum Transport {
    Plain,
    /// TLS, handshaken with the certificate in service when the connection arrives.
    Tls(Arc<ServerCerts>),
}

/// A connection's byte stream, plain or TLS, as one type for hyper.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Serves HTTP/1.1 and h2 (h2c on plain connections) on `listener` until shutdown, then lets
/// open connections finish (up to [`DRAIN_TIMEOUT`]). Each connection holds a place in the
/// connection table, must finish its TLS handshake and deliver its first request head within
/// `first_request_timeout`, and is shut down gracefully once it has had no request in flight
/// for `idle_timeout` (see `connections`).
async fn serve<F, Fut>(
    listener: TcpListener,
    transport: Transport,
    shutdown: Shutdown,
    policy: ConnectionPolicy,
    handler: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    use crate::connections::{Activity, Verdict};

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(policy.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(policy.h2_keep_alive_interval))
        .keep_alive_timeout(policy.h2_keep_alive_interval);
    let over_tls = matches!(transport, Transport::Tls(_));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let Some(permit) = policy.table.admit(peer.ip()) else {
            drop(stream);
            continue;
        };
        let activity = Activity::new();
        let handler = handler.clone();
        let service = hyper::service::service_fn({
            let activity = Arc::clone(&activity);
            move |mut req: Request<Incoming>| {
                if over_tls {
                    req.extensions_mut().insert(OverTls);
                }
                let in_flight = activity.begin();
                let response = handler(req, peer);
                async move {
                    let response = response.await;
                    drop(in_flight);
                    Ok::<_, Infallible>(response)
                }
            }
        });
        // Held until the connection ends, so the drain below waits for it.
        let drain = graceful.watcher();
        let (policy, shutdown, builder, transport) =
            (policy.clone(), shutdown.clone(), builder.clone(), transport.clone());
        tokio::spawn(async move {
            let (_permit, _drain) = (permit, drain);
            let first_request_by = tokio::time::Instant::now() + policy.first_request_timeout;
            let io: Box<dyn Io> = match transport {
                Transport::Plain => Box::new(stream),
                Transport::Tls(certs) => {
                    match tokio::time::timeout_at(first_request_by, certs.acceptor().accept(stream)).await {
                        Ok(Ok(tls)) => Box::new(tls),
                        Ok(Err(_)) => {
                            policy
                                .table
                                .metrics()
                                .count("gateway_connections_closed_total", "tls_handshake");
                            return;
                        }
                        Err(_) => {
                            policy
                                .table
                                .metrics()
                                .count("gateway_connections_closed_total", "first_request_timeout");
                            return;
                        }
                    }
                }
            };
            let connection = builder.serve_connection(TokioIo::new(io), service).into_owned();
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => return,
                _ = tokio::time::sleep_until(first_request_by) => {}
                _ = shutdown.wait() => {}
            }
            if !activity.any_request() && !shutdown.is_triggered() {
                // Dropping the connection closes the socket.
                policy
                    .table
                    .metrics()
                    .count("gateway_connections_closed_total", "first_request_timeout");
                return;
            }
            while !shutdown.is_triggered() {
                let wait = match activity.idle_check(policy.idle_timeout, std::time::Instant::now()) {
                    Verdict::Wait(wait) => wait,
                    Verdict::Close => {
                        policy
                            .table
                            .metrics()
                            .count("gateway_connections_closed_total", "idle_timeout");
                        break;
                    }
                };
                tokio::select! {
                    _ = &mut connection => return,
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait() => {}
                }
            }
            // Stops new requests; one in progress (or an h2 stream) finishes first.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("in-flight requests still running after the drain timeout");
    }
}
