//! `tollgate-demo-upstream --listen 127.0.0.1:8090`: an upstream to try the gateway against.
//!
//! In: any HTTP request. Out: 200 with a JSON object echoing what arrived: `method`, `path`
//! (raw, as received), `query` and `headers` (an object; repeated headers joined by `, `), so a
//! user sees exactly what the gateway forwarded.

use std::convert::Infallible;
use std::net::SocketAddr;

use clap::Parser;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "tollgate-demo-upstream", about = "Echoes every request as JSON")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", args.listen))?;
    eprintln!("tollgate-demo-upstream: listening on {}", args.listen);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, hyper::service::service_fn(echo))
                .await;
        });
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str())
            .and_modify(|v| {
                if let serde_json::Value::String(s) = v {
                    s.push_str(", ");
                    s.push_str(&value);
                }
            })
            .or_insert(serde_json::Value::String(value));
    }
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
    });
    let response = Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid");
    Ok(response)
}
