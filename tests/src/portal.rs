//! A portal stack of a test's own: [`CappedStack`] (topics, a ClickHouse database with
//! meter-consumer counting into it, an echo upstream), one gateway binary whose session links
//! point at the portal, and the portal binary over both.
//!
//! In: the running stack's Kafka and ClickHouse. Out: [`PortalStack`] with helpers that act
//! like the operator's application (mint a link) and like a browser (open it, keep the
//! cookie, send the CSRF token).

use serde_json::{json, Value};

use crate::capped::CappedStack;
use crate::free_port;
use crate::http::{send, Reply};
use crate::process::{GatewayProcess, ServiceProcess};

pub const ADMIN_TOKEN: &str = "portal-tests-admin-token-0123456789";

pub struct PortalStack {
    pub stack: CappedStack,
    pub gateway: GatewayProcess,
    pub portal: ServiceProcess,
    /// The portal's base URL.
    pub url: String,
}

/// A browser's view of one session: its cookie and CSRF token.
pub struct Browser {
    pub portal: String,
    pub cookie: String,
    pub csrf: String,
    pub session: Value,
}

impl PortalStack {
    /// Starts everything; `session_ttl_secs` is the portal's session lifetime.
    pub async fn start(prefix: &str, session_ttl_secs: u64) -> Self {
        let stack = CappedStack::start(prefix).await;
        let portal_port = free_port();
        let url = format!("http://127.0.0.1:{portal_port}");
        // The portal's pages may call both API routes (its try-it console).
        let origins = format!("[\"{url}\"]");
        let mut gateway = stack.gateway(
            "gateway",
            ADMIN_TOKEN,
            &[
                ("TOLLGATE_PORTAL__URL", url.as_str()),
                ("TOLLGATE_ROUTES__0__CORS_ORIGINS", origins.as_str()),
                ("TOLLGATE_ROUTES__1__CORS_ORIGINS", origins.as_str()),
            ],
        );
        gateway.process.start().await;
        let mut portal = portal_process(&stack, &gateway, portal_port, session_ttl_secs);
        portal.start().await;
        Self {
            stack,
            gateway,
            portal,
            url,
        }
    }

    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        send(
            method,
            &format!("{}{path}", self.gateway.admin),
            &[("authorization", &auth), ("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
    }

    /// A consumer of tenant `tenant` on `plan` with one key; returns the key's plaintext and id.
    pub async fn consumer(&self, name: &str, tenant: &str, plan: &str) -> (String, String) {
        let created = self
            .admin(
                "POST",
                "/v1/consumers",
                Some(json!({"name": name, "metadata": {"tenantId": tenant, "plan": plan}})),
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.text());
        let key = self
            .admin("POST", &format!("/v1/consumers/{name}/keys"), Some(json!({})))
            .await;
        assert_eq!(key.status, 201, "{}", key.text());
        let key = key.json();
        (
            key["key"].as_str().unwrap().to_owned(),
            key["id"].as_str().unwrap().to_owned(),
        )
    }

    /// What the operator's application does: a session link for `consumer`.
    pub async fn mint(&self, consumer: &str) -> String {
        let minted = self
            .admin(
                "POST",
                &format!("/v1/consumers/{consumer}/portal-sessions"),
                Some(json!({})),
            )
            .await;
        assert_eq!(minted.status, 201, "{}", minted.text());
        let url = minted.json()["url"].as_str().expect("url").to_owned();
        assert!(url.starts_with(&format!("{}/session/", self.url)), "{url}");
        url
    }

    /// Mints and opens a link as a browser would: the cookie and the session's CSRF token.
    pub async fn sign_in(&self, consumer: &str) -> Browser {
        let link = self.mint(consumer).await;
        let opened = send("GET", &link, &[], b"").await;
        assert_eq!(opened.status, 303, "{}", opened.text());
        assert_eq!(opened.header("location"), Some("/"));
        let set_cookie = opened.header("set-cookie").expect("a session cookie").to_owned();
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        let session = send("GET", &format!("{}/api/session", self.url), &[("cookie", &cookie)], b"").await;
        assert_eq!(session.status, 200, "{}", session.text());
        let session = session.json();
        Browser {
            portal: self.url.clone(),
            csrf: session["csrfToken"].as_str().unwrap().to_owned(),
            cookie,
            session,
        }
    }

    /// A request on the gateway's public listener with `key`.
    pub async fn call(&self, key: &str, path: &str) -> Reply {
        let auth = format!("Bearer {key}");
        send(
            "GET",
            &format!("{}{path}", self.gateway.public),
            &[("authorization", &auth)],
            b"",
        )
        .await
    }
}

/// The portal binary on the example settings (`config/portal.toml`) over `gateway` and the
/// stack's database, on `port`.
pub fn portal_process(
    stack: &CappedStack,
    gateway: &GatewayProcess,
    port: u16,
    session_ttl_secs: u64,
) -> ServiceProcess {
    let config = crate::process::repo().join("config/portal.toml").display().to_string();
    let env = [
        ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("TOLLGATE_PORTAL__LISTEN", format!("127.0.0.1:{port}")),
        ("TOLLGATE_PORTAL__URL", format!("http://127.0.0.1:{port}")),
        ("TOLLGATE_PORTAL__SESSION_TTL_SECS", session_ttl_secs.to_string()),
        ("TOLLGATE_GATEWAY__ADMIN_URL", gateway.admin.clone()),
        ("TOLLGATE_GATEWAY__PUBLIC_URL", gateway.public.clone()),
        ("TOLLGATE_CLICKHOUSE__URL", crate::clickhouse()),
        ("TOLLGATE_CLICKHOUSE__DATABASE", stack.database.clone()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    ServiceProcess::new(
        "tollgate-portal",
        &["--config", &config],
        env,
        format!("http://127.0.0.1:{port}/healthz"),
        &stack.dir,
    )
}

impl Browser {
    /// A request with the session cookie; `csrf` adds the session's token.
    pub async fn send(&self, method: &str, path: &str, body: Option<Value>, csrf: bool) -> Reply {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers = vec![("cookie", self.cookie.as_str())];
        if csrf {
            headers.push(("x-csrf-token", self.csrf.as_str()));
        }
        if !body.is_empty() {
            headers.push(("content-type", "application/json"));
        }
        send(method, &format!("{}{path}", self.portal), &headers, body.as_bytes()).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, None, false).await
    }
}
