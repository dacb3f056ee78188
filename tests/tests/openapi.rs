//! Tollgate's own OpenAPI documents against what it serves: the gateway binary's admin API and
//! the portal binary's API each answer `GET /openapi.json`; every documented operation is
//! called on the real services, successes and refusals, and `scripts/openapi-check` (an
//! OpenAPI validator from PyPI) checks both documents and every request and answer against
//! them: status documented, media type documented, body valid under the schema.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use serde_json::{json, Value};
use tollgate_tests::http::{send, Reply};
use tollgate_tests::portal::{PortalStack, ADMIN_TOKEN};

/// What the checker gets: each request sent and the answer it got.
#[derive(Default)]
struct Capture {
    exchanges: Vec<Value>,
}

impl Capture {
    fn record(&mut self, document: &str, method: &str, path: &str, request: Option<&Value>, reply: &Reply) {
        let content_type = reply.header("content-type").unwrap_or_default().to_owned();
        let body = if reply.body.is_empty() {
            Value::Null
        } else if content_type.contains("json") {
            reply.json()
        } else {
            Value::String(reply.text())
        };
        self.exchanges.push(json!({
            "document": document,
            "method": method.to_ascii_lowercase(),
            "path": path,
            "request": request,
            "status": reply.status,
            "contentType": content_type,
            "body": body,
        }));
    }
}

/// An admin API call with the token (or without, `token: None`), recorded.
async fn admin(
    capture: &mut Capture,
    stack: &PortalStack,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth));
    }
    let text = body.as_ref().map(Value::to_string).unwrap_or_default();
    let reply = send(
        method,
        &format!("{}{path}", stack.gateway.admin),
        &headers,
        text.as_bytes(),
    )
    .await;
    capture.record("admin", method, path, body.as_ref(), &reply);
    reply
}

fn expect(reply: &Reply, status: u16, what: &str) {
    assert_eq!(reply.status, status, "{what}: {}", reply.text());
}

#[tokio::test]
async fn both_documents_are_valid_openapi_and_describe_every_real_answer() {
    let stack = PortalStack::start("openapi", 3600).await;
    let mut capture = Capture::default();
    let token = Some(ADMIN_TOKEN);
    let cap = &mut capture;

    // The admin API: its document without the token; then every operation.
    let document = send("GET", &format!("{}/openapi.json", stack.gateway.admin), &[], b"").await;
    expect(&document, 200, "the admin document is readable without the token");
    let admin_document = document.json();
    assert_eq!(admin_document["openapi"], "3.1.0");
    cap.record("admin", "GET", "/openapi.json", None, &document);

    let name = "openapi-acme";
    let created = admin(
        cap,
        &stack,
        token,
        "POST",
        "/v1/consumers",
        Some(json!({"name": name, "metadata": {"tenantId": "tenant_openapi", "plan": "professional"}})),
    )
    .await;
    expect(&created, 201, "create");
    expect(
        &admin(cap, &stack, token, "POST", "/v1/consumers", Some(json!({"name": name}))).await,
        409,
        "a second create of one name",
    );
    expect(
        &admin(
            cap,
            &stack,
            token,
            "POST",
            "/v1/consumers",
            Some(json!({"name": "x", "colour": 1})),
        )
        .await,
        400,
        "an unknown member",
    );
    expect(
        &admin(cap, &stack, None, "GET", "/v1/consumers", None).await,
        401,
        "no token",
    );
    expect(
        &admin(cap, &stack, token, "GET", "/v1/consumers", None).await,
        200,
        "list",
    );
    let path = format!("/v1/consumers/{name}");
    expect(&admin(cap, &stack, token, "GET", &path, None).await, 200, "read");
    expect(
        &admin(cap, &stack, token, "GET", "/v1/consumers/nobody-here", None).await,
        404,
        "read a missing one",
    );
    expect(
        &admin(
            cap,
            &stack,
            token,
            "PATCH",
            &path,
            Some(json!({"metadata": {"team": "billing"}})),
        )
        .await,
        200,
        "patch",
    );

    let keys = format!("{path}/keys");
    let key = admin(
        cap,
        &stack,
        token,
        "POST",
        &keys,
        Some(json!({"description": "ci", "labels": {"env": "test"}})),
    )
    .await;
    expect(&key, 201, "issue a key");
    assert!(
        key.json()["key"].is_string(),
        "the created key is shown once: {}",
        key.text()
    );
    expect(&admin(cap, &stack, token, "GET", &keys, None).await, 200, "list keys");
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let rolled = admin(
        cap,
        &stack,
        token,
        "POST",
        &format!("{path}/roll-key"),
        Some(json!({"expiresOn": later})),
    )
    .await;
    expect(&rolled, 201, "roll every key");
    let rolled_id = rolled.json()["id"].as_str().unwrap().to_owned();
    let one = admin(
        cap,
        &stack,
        token,
        "POST",
        &format!("{keys}/{rolled_id}/roll"),
        Some(json!({"expiresOn": later})),
    )
    .await;
    expect(&one, 201, "roll one key");
    let one_id = one.json()["id"].as_str().unwrap().to_owned();
    expect(
        &admin(
            cap,
            &stack,
            token,
            "POST",
            &format!("{keys}/{one_id}/roll"),
            Some(json!({"expiresOn": "soon"})),
        )
        .await,
        400,
        "a roll with a bad time",
    );
    expect(
        &admin(cap, &stack, token, "DELETE", &format!("{keys}/{one_id}"), None).await,
        204,
        "revoke",
    );
    expect(
        &admin(cap, &stack, token, "DELETE", &format!("{keys}/key_missing"), None).await,
        404,
        "revoke a missing key",
    );
    expect(
        &admin(cap, &stack, token, "GET", &format!("{path}/limits"), None).await,
        200,
        "limit status",
    );

    let budget = format!("{path}/budget");
    expect(
        &admin(cap, &stack, token, "GET", &budget, None).await,
        404,
        "no budget yet",
    );
    expect(
        &admin(
            cap,
            &stack,
            token,
            "PUT",
            &budget,
            Some(json!({"monthlyCap": 5000, "alertAt": [50, 80]})),
        )
        .await,
        200,
        "set a budget",
    );
    expect(
        &admin(cap, &stack, token, "PUT", &budget, Some(json!({"monthlyCap": -1}))).await,
        400,
        "a negative cap",
    );
    expect(
        &admin(cap, &stack, token, "GET", &budget, None).await,
        200,
        "read the budget",
    );
    expect(
        &admin(cap, &stack, token, "DELETE", &budget, None).await,
        204,
        "remove the budget",
    );

    let minted = admin(
        cap,
        &stack,
        token,
        "POST",
        &format!("{path}/portal-sessions"),
        Some(json!({})),
    )
    .await;
    expect(&minted, 201, "mint a link");
    let link_token = minted.json()["url"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let exchange = Some(json!({"token": link_token}));
    expect(
        &admin(
            cap,
            &stack,
            token,
            "POST",
            "/v1/portal-sessions/exchange",
            exchange.clone(),
        )
        .await,
        200,
        "redeem a link",
    );
    expect(
        &admin(cap, &stack, token, "POST", "/v1/portal-sessions/exchange", exchange).await,
        410,
        "redeem it again",
    );

    let doomed = "openapi-doomed";
    expect(
        &admin(
            cap,
            &stack,
            token,
            "POST",
            "/v1/consumers",
            Some(json!({"name": doomed, "metadata": {"tenantId": "tenant_openapi"}})),
        )
        .await,
        201,
        "create another",
    );
    expect(
        &admin(cap, &stack, token, "DELETE", &format!("/v1/consumers/{doomed}"), None).await,
        204,
        "delete it",
    );

    // The portal API, as a signed-in browser calls it.
    let document = send("GET", &format!("{}/openapi.json", stack.url), &[], b"").await;
    expect(&document, 200, "the portal document");
    let portal_document = document.json();
    let browser = stack.sign_in(name).await;
    let mut portal = |method: &'static str, path: String, body: Option<Value>, reply: Reply| {
        capture.record("portal", method, &path, body.as_ref(), &reply);
        reply
    };
    let r = browser.get("/api/session").await;
    expect(&portal("GET", "/api/session".into(), None, r), 200, "the session");
    let r = send("GET", &format!("{}/api/keys", stack.url), &[], b"").await;
    expect(&portal("GET", "/api/keys".into(), None, r), 401, "no session");
    let r = browser.get("/api/keys").await;
    expect(&portal("GET", "/api/keys".into(), None, r), 200, "the keys");
    let body = json!({"description": "from the portal"});
    let r = browser.send("POST", "/api/keys", Some(body.clone()), false).await;
    expect(
        &portal("POST", "/api/keys".into(), Some(body.clone()), r),
        403,
        "no CSRF token",
    );
    let r = browser.send("POST", "/api/keys", Some(body.clone()), true).await;
    let created = portal("POST", "/api/keys".into(), Some(body), r);
    expect(&created, 201, "a key from the portal");
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let roll = json!({"graceSecs": 60});
    let r = browser
        .send("POST", &format!("/api/keys/{id}/roll"), Some(roll.clone()), true)
        .await;
    expect(
        &portal("POST", format!("/api/keys/{id}/roll"), Some(roll.clone()), r),
        201,
        "roll it",
    );
    let r = browser
        .send("POST", "/api/keys/key_missing/roll", Some(roll.clone()), true)
        .await;
    expect(
        &portal("POST", "/api/keys/key_missing/roll".into(), Some(roll), r),
        404,
        "roll a missing key",
    );
    let r = browser.send("DELETE", &format!("/api/keys/{id}"), None, true).await;
    expect(&portal("DELETE", format!("/api/keys/{id}"), None, r), 204, "revoke it");
    let r = browser.get("/api/limits").await;
    expect(&portal("GET", "/api/limits".into(), None, r), 200, "the limits");
    let r = browser.get("/api/usage?granularity=day").await;
    expect(
        &portal("GET", "/api/usage?granularity=day".into(), None, r),
        200,
        "the usage",
    );
    let r = browser.get("/api/usage?granularity=week").await;
    expect(
        &portal("GET", "/api/usage?granularity=week".into(), None, r),
        400,
        "a granularity that is none",
    );
    let r = browser.get("/api/usage.csv").await;
    expect(
        &portal("GET", "/api/usage.csv".into(), None, r),
        200,
        "the usage as CSV",
    );
    let r = browser.send("DELETE", "/api/session", None, true).await;
    expect(&portal("DELETE", "/api/session".into(), None, r), 204, "sign out");

    let file = stack.stack.dir.join("openapi-capture.json");
    let written = json!({
        "documents": {"admin": admin_document, "portal": portal_document},
        "exchanges": capture.exchanges,
    });
    std::fs::write(&file, serde_json::to_vec_pretty(&written).unwrap()).expect("write the capture");
    let checked = std::process::Command::new(tollgate_tests::process::repo().join("scripts/openapi-check"))
        .arg(&file)
        .output()
        .expect("run scripts/openapi-check");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    println!("{report}");
    assert!(checked.status.success(), "the OpenAPI check failed:\n{report}");
    assert!(report.contains("admin: valid OpenAPI 3.1.0"), "{report}");
    assert!(report.contains("portal: valid OpenAPI 3.1.0"), "{report}");
}
