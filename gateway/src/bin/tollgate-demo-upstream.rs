//! `tollgate-demo-upstream --listen 127.0.0.1:8090`: an upstream to try the gateway against;
//! it echoes every request as JSON (see `tollgate_gateway::demo_upstream`).

use std::net::SocketAddr;

use clap::Parser;
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
    tollgate_gateway::demo_upstream::serve(listener).await?;
    Ok(())
}
