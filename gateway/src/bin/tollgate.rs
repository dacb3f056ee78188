//! `tollgate`: the operators' command line over the gateway's admin API.
//!
//! In: a subcommand, `--admin-url` (default the local stack's) and `TOLLGATE_ADMIN_TOKEN`.
//! Out: the API's JSON on stdout; a refusal's problem detail on stderr and exit 1.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use serde_json::{json, Map, Value};

#[derive(Parser)]
#[command(name = "tollgate", about = "Manage Tollgate consumers and API keys")]
struct Cli {
    /// The gateway's admin listener.
    #[arg(long, env = "TOLLGATE_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
    admin_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consumers: a tenant's identity at the gateway.
    #[command(subcommand)]
    Consumers(Consumers),
    /// API keys of a consumer.
    #[command(subcommand)]
    Keys(Keys),
    /// Prints a single-use link into the tenant portal as `consumer` (valid for minutes).
    PortalSession {
        consumer: String,
        /// Where the portal's "back" link leads (the operator's application).
        #[arg(long)]
        return_url: Option<String>,
    },
    /// Certificates for a development stack (no admin API involved).
    #[command(subcommand)]
    Tls(Tls),
}

#[derive(Subcommand)]
enum Tls {
    /// Makes a local CA in DIR (kept once made) and a server certificate signed by it:
    /// `ca.pem` is what clients trust; `server.pem`/`server.key` what listeners serve.
    LocalCa {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// DNS name or IP address the server certificate is for (repeatable).
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
        names: Vec<String>,
        /// Issue a new server certificate even if one exists.
        #[arg(long)]
        renew: bool,
    },
}

#[derive(Subcommand)]
enum Consumers {
    /// Creates a consumer: `tollgate consumers create acme-corp --meta tenantId=t1 --meta plan=enterprise`.
    Create {
        name: String,
        /// Metadata field, `key=value` (repeatable).
        #[arg(long = "meta", value_parser = parse_meta)]
        meta: Vec<(String, String)>,
    },
    List,
    Get {
        name: String,
    },
    /// Sets metadata fields (`key=value`), or removes them (`key=`).
    Update {
        name: String,
        #[arg(long = "meta", value_parser = parse_meta)]
        meta: Vec<(String, String)>,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum Keys {
    /// Issues a key; its plaintext is printed once.
    Create {
        consumer: String,
        #[arg(long)]
        description: Option<String>,
        /// RFC 3339 expiry, e.g. 2026-12-31T23:59:59Z.
        #[arg(long)]
        expires_on: Option<String>,
    },
    List {
        consumer: String,
    },
    /// Issues a new key; the current ones keep working until `--expires-on`.
    Roll {
        consumer: String,
        #[arg(long)]
        expires_on: String,
    },
    /// Revokes a key at once, on every gateway.
    Revoke {
        consumer: String,
        id: String,
    },
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn meta_object(meta: Vec<(String, String)>, empty_removes: bool) -> Value {
    let map: Map<String, Value> = meta
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                if v.is_empty() && empty_removes {
                    Value::Null
                } else {
                    Value::String(v)
                },
            )
        })
        .collect();
    Value::Object(map)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Tls(Tls::LocalCa { dir, names, renew }) = &cli.command {
        return match tollgate_gateway::tls::local_ca::ensure(dir, names, *renew) {
            Ok(ca) => {
                println!(
                    "{}",
                    json!({"ca": ca.ca_cert, "cert": ca.server_cert, "key": ca.server_key})
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("tollgate: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let Ok(token) = std::env::var("TOLLGATE_ADMIN_TOKEN") else {
        eprintln!("tollgate: TOLLGATE_ADMIN_TOKEN is not set (`scripts/stack status` prints the local one)");
        return ExitCode::FAILURE;
    };
    let path = |p: &str| format!("{}/v1/consumers{p}", cli.admin_url.trim_end_matches('/'));
    // A portal link is printed alone, so scripts can open it; everything else as JSON.
    let link_only = matches!(cli.command, Command::PortalSession { .. });
    let (method, url, body) = match cli.command {
        Command::Consumers(Consumers::Create { name, meta }) => (
            Method::POST,
            path(""),
            Some(json!({"name": name, "metadata": meta_object(meta, false)})),
        ),
        Command::Consumers(Consumers::List) => (Method::GET, path(""), None),
        Command::Consumers(Consumers::Get { name }) => (Method::GET, path(&format!("/{name}")), None),
        Command::Consumers(Consumers::Update { name, meta }) => (
            Method::PATCH,
            path(&format!("/{name}")),
            Some(json!({"metadata": meta_object(meta, true)})),
        ),
        Command::Consumers(Consumers::Delete { name }) => (Method::DELETE, path(&format!("/{name}")), None),
        Command::Keys(Keys::Create {
            consumer,
            description,
            expires_on,
        }) => (
            Method::POST,
            path(&format!("/{consumer}/keys")),
            Some(json!({"description": description, "expiresOn": expires_on})),
        ),
        Command::Keys(Keys::List { consumer }) => (Method::GET, path(&format!("/{consumer}/keys")), None),
        Command::Keys(Keys::Roll { consumer, expires_on }) => (
            Method::POST,
            path(&format!("/{consumer}/roll-key")),
            Some(json!({"expiresOn": expires_on})),
        ),
        Command::Keys(Keys::Revoke { consumer, id }) => (Method::DELETE, path(&format!("/{consumer}/keys/{id}")), None),
        Command::PortalSession { consumer, return_url } => (
            Method::POST,
            path(&format!("/{consumer}/portal-sessions")),
            Some(json!({"returnUrl": return_url})),
        ),
        Command::Tls(_) => unreachable!("answered above, without the admin API"),
    };
    match call(method, &url, &token, body).await {
        Ok((status, text)) if status < 400 && link_only => {
            let link = serde_json::from_str::<Value>(&text).unwrap_or_default();
            println!("{}", link["url"].as_str().unwrap_or_default());
            eprintln!(
                "single use; open it before {}",
                link["expiresAt"].as_str().unwrap_or("it expires")
            );
            ExitCode::SUCCESS
        }
        Ok((status, text)) if status < 400 => {
            if !text.is_empty() {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Ok((status, text)) => {
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v.get("detail")
                        .or(v.get("title"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or(text);
            eprintln!("tollgate: {status}: {detail}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("tollgate: {url}: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn call(method: Method, url: &str, token: &str, body: Option<Value>) -> Result<(u16, String), String> {
    // Absent optional fields are left out rather than sent as null.
    let body = body.map(|mut v| {
        if let Value::Object(m) = &mut v {
            m.retain(|k, v| k == "metadata" || !v.is_null());
        }
        v
    });
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("cannot reach the admin API: {e}"))?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
