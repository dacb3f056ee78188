//! Tollgate's service binaries as processes a test can crash: started with their settings
//! and environment, killed with SIGKILL or stopped with SIGTERM, and started again exactly as
//! before.
//!
//! In: a binary name (found by `tollgate_test_support::service::binary`), its arguments, its
//! environment and a health URL. Out: a running process once the health URL answers 200; its
//! stderr in a log file of its own, readable by the test (for secrets checks).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::free_port;
use crate::http::try_send_with;

/// How long a service may take to become healthy on a loaded 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(180);

/// The repository root: services run there, as `scripts/stack` runs them.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

pub struct ServiceProcess {
    pub name: &'static str,
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    health: String,
    log: PathBuf,
    child: Option<Child>,
}

impl ServiceProcess {
    /// A service `name` (a workspace binary) run as `name args...` with only `env` (and PATH)
    /// set, healthy when `health` answers 200; its stderr appends to `<log_dir>/<name>.log`.
    pub fn new(name: &'static str, args: &[&str], env: Vec<(String, String)>, health: String, log_dir: &Path) -> Self {
        Self {
            name,
            binary: crate::service::binary(name),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env,
            health,
            log: log_dir.join(format!("{name}.log")),
            child: None,
        }
    }

    /// Starts the process and waits until it is healthy.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(repo())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.child = Some(child);
        let started = std::time::Instant::now();
        loop {
            if let Ok(reply) = try_send_with(false, "GET", &self.health, &[], b"").await {
                if reply.status == 200 {
                    return;
                }
            }
            // A service that exits while starting will never answer: say why at once, from its
            // own log, instead of waiting out the deadline.
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!(
                    "{} exited while starting ({status}); the end of its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            assert!(
                started.elapsed() < START_DEADLINE,
                "{} not healthy at {} within {START_DEADLINE:?}; the end of its log:\n{}",
                self.name,
                self.health,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the process dies as in a crash, with whatever it held in memory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
        }
    }

    /// SIGTERM, as an orchestrator stops a service; returns without waiting for the exit.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `HUP`, ...) to the running process.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("running");
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{name} {}", child.id());
    }

    /// Runs the next start without the environment variable `key`.
    pub fn unset_env(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
    }

    /// Waits for the process to exit (after [`ServiceProcess::terminate`]), at most `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        crate::eventually(&format!("{} exits", self.name), deadline, || {
            let status = child.try_wait().expect("wait");
            async move { status }
        })
        .await
    }

    /// Everything the process wrote to stderr so far, over all its starts.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log, enough to show why it stopped or stalled.
    pub fn log_tail(&self) -> String {
        log_tail(&self.output())
    }
}

/// The last lines of a service log, enough to show why it stopped.
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a gateway process listens and what it reads.
pub struct GatewayProcess {
    pub process: ServiceProcess,
    pub public: String,
    pub admin: String,
}

/// The gateway binary on the example settings (`config/gateway.toml`), on free loopback
/// ports, following `keys_topic` and writing `usage_topic` on `brokers`, both routes to
/// `upstream`, its spool and log in `dir`; `extra` overlays more settings.
pub fn gateway(
    dir: &Path,
    admin_token: &str,
    brokers: &str,
    topics: (&str, &str),
    upstream: &str,
    extra: &[(&str, &str)],
) -> GatewayProcess {
    gateway_on(
        &repo().join("config/gateway.toml"),
        dir,
        admin_token,
        brokers,
        topics,
        upstream,
        extra,
    )
}

/// [`gateway`] on the settings file `config` instead of the example's.
pub fn gateway_on(
    config: &Path,
    dir: &Path,
    admin_token: &str,
    brokers: &str,
    (keys_topic, usage_topic): (&str, &str),
    upstream: &str,
    extra: &[(&str, &str)],
) -> GatewayProcess {
    let (public_port, admin_port) = (free_port(), free_port());
    let config = config.display().to_string();
    let mut env: Vec<(String, String)> = [
        ("TOLLGATE_ADMIN_TOKEN", admin_token.to_owned()),
        ("TOLLGATE_SERVICE__ID", format!("gw-{public_port}")),
        ("TOLLGATE_PUBLIC__LISTEN", format!("127.0.0.1:{public_port}")),
        ("TOLLGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}")),
        ("TOLLGATE_KAFKA__BROKERS", brokers.to_owned()),
        ("TOLLGATE_TOPICS__KEYS", keys_topic.to_owned()),
        ("TOLLGATE_TOPICS__USAGE", usage_topic.to_owned()),
        ("TOLLGATE_ROUTES__0__UPSTREAM", upstream.to_owned()),
        ("TOLLGATE_ROUTES__1__UPSTREAM", upstream.to_owned()),
        ("TOLLGATE_EVENTS__SPOOL_DIR", dir.join("spool").display().to_string()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let admin = format!("http://127.0.0.1:{admin_port}");
    GatewayProcess {
        process: ServiceProcess::new(
            "tollgate-gateway",
            &["--config", &config],
            env,
            format!("{admin}/readyz"),
            dir,
        ),
        public: format!("http://127.0.0.1:{public_port}"),
        admin,
    }
}

impl GatewayProcess {
    /// Creates a consumer with `metadata` and one key through the admin API; returns the
    /// key's plaintext.
    pub async fn consumer_with_key(&self, admin_token: &str, name: &str, metadata: serde_json::Value) -> String {
        let auth = format!("Bearer {admin_token}");
        let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
        let body = serde_json::json!({"name": name, "metadata": metadata}).to_string();
        let url = format!("{}/v1/consumers", self.admin);
        let created = crate::http::send("POST", &url, &headers, body.as_bytes()).await;
        assert_eq!(created.status, 201, "{}", created.text());
        let key = crate::http::send("POST", &format!("{url}/{name}/keys"), &headers, b"{}").await;
        assert_eq!(key.status, 201, "{}", key.text());
        key.json()["key"].as_str().expect("plaintext key").to_owned()
    }
}
