//! The gateway's listeners and start-up order.
//!
//! In: validated settings, the admin token, a shutdown signal. Out: the public listener (tenant
//! traffic) and the admin listener (ops endpoints), served until shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tollgate_runtime::ops::Ops;
use tollgate_runtime::shutdown::Shutdown;

use crate::problem::Problem;
use crate::settings::{GatewaySettings, ADMIN_TOKEN_ENV};

/// The shortest admin token accepted: anything shorter is guessable.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

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
}

/// Runs the gateway until `shutdown` fires.
pub async fn run(
    settings: GatewaySettings,
    admin_token: Option<String>,
    shutdown: Shutdown,
) -> Result<(), GatewayError> {
    match admin_token.as_deref() {
        None | Some("") => return Err(GatewayError::MissingAdminToken),
        Some(t) if t.len() < MIN_ADMIN_TOKEN_LEN => return Err(GatewayError::ShortAdminToken),
        Some(_) => {}
    }
    let public = bind("public", &settings.public.listen).await?;
    let admin = bind("admin", &settings.admin.listen).await?;
    tollgate_runtime::kafka::check_topics(
        &settings.kafka,
        &[settings.topics.keys.clone(), settings.topics.usage.clone()],
    )
    .await?;

    let (ops, _recorder) = Ops::new();
    ops.set_ready();
    tracing::info!(
        public = %settings.public.listen,
        admin = %settings.admin.listen,
        "gateway listening"
    );
    let admin_task = tokio::spawn(serve(admin, shutdown.clone(), move |req| {
        ops.respond(&req).unwrap_or_else(|| {
            Problem::new(StatusCode::NOT_FOUND, "not-found", "Not Found").into_response()
        })
    }));
    serve(public, shutdown, |_req| {
        Problem::new(StatusCode::NOT_FOUND, "no-route", "No route matches this request").into_response()
    })
    .await;
    let _ = admin_task.await;
    Ok(())
}

async fn bind(which: &'static str, listen: &str) -> Result<TcpListener, GatewayError> {
    let addr: SocketAddr = listen.parse().expect("validated by GatewaySettings::validate");
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { which, addr, source })
}

async fn serve<F>(listener: TcpListener, shutdown: Shutdown, handler: F)
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = handler(req);
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, service)
                .await;
        });
    }
}
