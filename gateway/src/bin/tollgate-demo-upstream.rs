//! `tollgate-demo-upstream --listen 127.0.0.1:8090 [--tls-listen 127.0.0.1:8091 --tls-cert F
//! --tls-key F]`: an upstream to try the gateway against; it echoes every request as JSON
//! (see `tollgate_gateway::demo_upstream`), over plain HTTP and, with a certificate, over TLS.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "tollgate-demo-upstream", about = "Echoes every request as JSON")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Address of a TLS listener beside it (needs --tls-cert and --tls-key).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listener.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener.
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {addr}: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = bind(args.listen).await?;
    if let (Some(addr), Some(cert_file), Some(key_file)) = (args.tls_listen, args.tls_cert, args.tls_key) {
        let certs = tollgate_gateway::tls::ServerCerts::load(&tollgate_gateway::tls::TlsListenerSettings {
            listen: addr.to_string(),
            cert_file,
            key_file,
            reload_interval_ms: 2_000,
        })?;
        let tls = bind(addr).await?;
        eprintln!("tollgate-demo-upstream: listening with TLS on {addr}");
        tokio::spawn(async move {
            if let Err(err) = tollgate_gateway::demo_upstream::serve_tls(tls, certs.acceptor()).await {
                eprintln!("tollgate-demo-upstream: TLS listener stopped: {err}");
            }
        });
    }
    eprintln!("tollgate-demo-upstream: listening on {}", args.listen);
    tollgate_gateway::demo_upstream::serve(listener).await?;
    Ok(())
}
