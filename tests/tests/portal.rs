//! The tenant portal over the real stack: the gateway binary minting session links, the
//! portal binary, meter-consumer counting into ClickHouse, Kafka in between.
//!
//! Sessions: a link opens once, into an HttpOnly SameSite=Strict cookie; a reused, unknown or
//! expired link gets a clear page; a session ends at its TTL; state changes need the CSRF
//! token. Keys: created, rolled within the operator's maximum grace and revoked through the
//! portal, seen working and refused at the gateway, attributed to `portal:<consumer>` in the
//! audit trail. Limits equal the gateway's `RateLimit` header. Usage counts the calls once.
//! Another tenant's keys, usage and limits are out of reach by any id.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_tests::eventually;
use tollgate_tests::free_port;
use tollgate_tests::http::send;
use tollgate_tests::portal::{portal_process, Browser, PortalStack};

const DEADLINE: Duration = Duration::from_secs(60);

/// `remaining` for `name` in a `RateLimit` header (`"name";r=9;t=60, ...`).
fn remaining_in(header: &str, name: &str) -> u64 {
    header
        .split(", ")
        .find(|item| item.starts_with(&format!("\"{name}\";")))
        .and_then(|item| item.split(';').find_map(|p| p.strip_prefix("r=")))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {header:?}"))
}

fn limit_named<'a>(limits: &'a Value, name: &str) -> &'a Value {
    limits["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no limit {name} in {limits}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_links_open_once_sessions_expire_and_changes_need_the_csrf_token() {
    let s = PortalStack::start("portal_sessions", 3600).await;
    s.consumer("sess-acme", "t-sess-acme", "free").await;

    let link = s.mint("sess-acme").await;
    let opened = send("GET", &link, &[], b"").await;
    assert_eq!(opened.status, 303);
    let cookie = opened.header("set-cookie").unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "plain http: no Secure flag ({cookie})");
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let session = send("GET", &format!("{}/api/session", s.url), &[("cookie", &cookie)], b"").await;
    let session = session.json();
    assert_eq!(session["consumer"], "sess-acme");
    assert_eq!(session["tenantId"], "t-sess-acme");
    assert!(session["csrfToken"].as_str().unwrap().len() >= 43);
    assert!(session["expiresAt"].as_str().is_some());

    // Reused: refused with a page that says why.
    let reused = send("GET", &link, &[], b"").await;
    assert_eq!(reused.status, 410);
    assert!(reused.text().contains("cannot be used"), "{}", reused.text());
    let made_up = send(
        "GET",
        &format!("{}/session/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", s.url),
        &[],
        b"",
    )
    .await;
    assert_eq!(made_up.status, 410);
    // No cookie, a forged cookie: no session.
    for headers in [vec![], vec![("cookie", "tollgate_portal=forged")]] {
        let r = send("GET", &format!("{}/api/keys", s.url), &headers, b"").await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        let page = send("GET", &format!("{}/keys", s.url), &headers, b"").await;
        assert_eq!(page.status, 401);
        assert!(page.text().contains("Your session has ended"));
    }

    // State changes without or with a wrong CSRF token are refused and change nothing.
    let browser = Browser {
        portal: s.url.clone(),
        cookie: cookie.clone(),
        csrf: "wrong".into(),
        session: session.clone(),
    };
    for csrf in [false, true] {
        let r = browser.send("POST", "/api/keys", Some(json!({})), csrf).await;
        assert_eq!(r.status, 403, "{}", r.text());
    }
    let keys = browser.get("/api/keys").await.json();
    assert_eq!(keys["data"].as_array().unwrap().len(), 1, "nothing was created: {keys}");

    // A session ends at its TTL: a second portal whose sessions last 2 s.
    let port = free_port();
    let mut short = portal_process(&s.stack, &s.gateway, port, 2);
    short.start().await;
    let short_url = format!("http://127.0.0.1:{port}");
    let link = s.mint("sess-acme").await.replace(&s.url, &short_url);
    let opened = send("GET", &link, &[], b"").await;
    assert_eq!(opened.status, 303, "{}", opened.text());
    let cookie = opened
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let session_url = format!("{short_url}/api/session");
    assert_eq!(send("GET", &session_url, &[("cookie", &cookie)], b"").await.status, 200);
    eventually("the short session expires", Duration::from_secs(10), || async {
        (send("GET", &session_url, &[("cookie", &cookie)], b"").await.status == 401).then_some(())
    })
    .await;
    assert!(
        !short.output().contains(&cookie["tollgate_portal=".len()..]),
        "the cookie is never logged"
    );
    s.stack.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_manages_its_keys_sees_its_limits_and_usage_and_nothing_of_another_tenant() {
    let s = PortalStack::start("portal_keys", 3600).await;
    let (_, first_key_id) = s.consumer("keys-acme", "t-keys-acme", "free").await;
    let (other_key, other_key_id) = s.consumer("keys-globex", "t-keys-globex", "free").await;
    let acme = s.sign_in("keys-acme").await;

    // Create: the plaintext once, and it works at the gateway.
    let created = acme
        .send("POST", "/api/keys", Some(json!({"description": "ci"})), true)
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let created = created.json();
    let key = created["key"].as_str().unwrap().to_owned();
    let key_id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    let listed = acme.get("/api/keys").await.json();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&key_id.as_str()) && ids.contains(&first_key_id.as_str()));
    assert!(!listed.to_string().contains(&key), "a listing never holds a secret");

    // Calls with it; the limits page's remaining equals the RateLimit header of the last one.
    const CALLS: u64 = 7;
    let mut header = String::new();
    for _ in 0..CALLS {
        let r = s.call(&key, "/v1/hello").await;
        assert_eq!(r.status, 200, "{}", r.text());
        header = r.header("ratelimit").unwrap().to_owned();
    }
    let limits = acme.get("/api/limits").await.json();
    assert_eq!(limits["backend"], "local");
    assert_eq!(limits["plan"], "free");
    for name in ["requests_per_minute", "compute_units_per_day"] {
        let l = limit_named(&limits, name);
        assert_eq!(
            l["remaining"].as_u64().unwrap(),
            remaining_in(&header, name),
            "{name}: {limits}"
        );
        assert_eq!(l["used"].as_u64().unwrap(), CALLS, "{name}");
    }
    let again = acme.get("/api/limits").await.json();
    assert_eq!(
        limit_named(&again, "requests_per_minute")["remaining"],
        limit_named(&limits, "requests_per_minute")["remaining"],
        "reading the limits costs nothing"
    );
    let page = acme.get("/limits").await.text();
    assert!(
        page.contains("requests_per_minute") && page.contains(&format!("{CALLS} of 100")),
        "{page}"
    );

    // Usage: the calls, once, when meter-consumer has them. The consumer writes the hour and
    // day rollups side by side, so the period total (from days) can show the calls a moment
    // before the hourly series does: wait for both.
    let usage = eventually("the calls are in the portal's usage", DEADLINE, || async {
        let u = acme.get("/api/usage?granularity=hour").await.json();
        let requests = u["period"]["meters"]
            .as_array()?
            .iter()
            .find(|m| m["meter"] == "requests")?
            .clone();
        let hourly: u64 = u["meters"]
            .as_array()?
            .iter()
            .filter(|m| m["meter"] == "requests")
            .flat_map(|m| m["points"].as_array().into_iter().flatten())
            .filter_map(|p| p["events"].as_u64())
            .sum();
        (requests["events"].as_u64()? >= CALLS && hourly >= CALLS).then_some(u)
    })
    .await;
    assert_eq!(usage["tenantId"], "t-keys-acme");
    let requests = usage["period"]["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == "requests")
        .unwrap();
    assert_eq!(
        (requests["events"].as_u64(), requests["billableUnits"].as_i64()),
        (Some(CALLS), Some(CALLS as i64))
    );
    let hourly: i64 = usage["meters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["meter"] == "requests")
        .flat_map(|m| {
            m["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["units"].as_i64().unwrap())
        })
        .sum();
    assert_eq!(hourly, CALLS as i64);
    let series = usage["meters"].as_array().unwrap();
    assert!(series.iter().all(|m| m["points"].as_array().unwrap().len() == 48));
    let daily = acme.get("/api/usage?granularity=day").await.json();
    assert!(daily["meters"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["points"].as_array().unwrap().len() == 30));
    let csv = acme.get("/api/usage.csv?granularity=day").await;
    assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
    let csv_requests: i64 = csv
        .text()
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("requests,"))
        .map(|l| l.rsplit(',').nth(1).unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(csv_requests, CALLS as i64);
    assert!(acme.get("/usage").await.text().contains("<svg"));
    for bad in [
        "/api/usage?granularity=week",
        "/api/usage?tenantId=t-keys-globex",
        "/api/usage?from=yesterday",
    ] {
        assert_eq!(acme.get(bad).await.status, 400, "{bad}");
    }

    // Roll: grace within the operator's maximum; the new key works, the old one stops.
    let too_long = acme
        .send(
            "POST",
            &format!("/api/keys/{key_id}/roll"),
            Some(json!({"graceSecs": 604_801})),
            true,
        )
        .await;
    assert_eq!(too_long.status, 400, "{}", too_long.text());
    let rolled = acme
        .send(
            "POST",
            &format!("/api/keys/{key_id}/roll"),
            Some(json!({"graceSecs": 0})),
            true,
        )
        .await;
    assert_eq!(rolled.status, 201, "{}", rolled.text());
    let rolled = rolled.json();
    let new_key = rolled["key"].as_str().unwrap().to_owned();
    assert_eq!(s.call(&new_key, "/v1/hello").await.status, 200);
    eventually(
        "the rolled key stops after its grace",
        Duration::from_secs(10),
        || async { (s.call(&key, "/v1/hello").await.status == 401).then_some(()) },
    )
    .await;

    // Revoke: refused at the gateway at once.
    let new_id = rolled["id"].as_str().unwrap().to_owned();
    let revoked = acme.send("DELETE", &format!("/api/keys/{new_id}"), None, true).await;
    assert_eq!(revoked.status, 204, "{}", revoked.text());
    assert_eq!(s.call(&new_key, "/v1/hello").await.status, 401);

    // Another tenant's key by id, and odd ids: 404 everywhere, and the key still works.
    for (method, path, body) in [
        (
            "POST",
            format!("/api/keys/{other_key_id}/roll"),
            Some(json!({"graceSecs": 0})),
        ),
        ("DELETE", format!("/api/keys/{other_key_id}"), None),
        ("DELETE", "/api/keys/..%2F..%2Fkeys-globex".to_owned(), None),
        ("DELETE", "/api/keys/key_1%2Froll".to_owned(), None),
    ] {
        let r = acme.send(method, &path, body, true).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
        assert!(!r.text().contains("keys-globex"), "{}", r.text());
    }
    assert_eq!(s.call(&other_key, "/v1/hello").await.status, 200);
    let listed = acme.get("/api/keys").await.text();
    assert!(!listed.contains(&other_key_id));
    for path in ["/api/keys", "/api/limits", "/api/usage", "/api/session"] {
        let text = acme.get(path).await.text();
        assert!(
            !text.contains("t-keys-globex") && !text.contains(&other_key_id),
            "{path}: {text}"
        );
    }
    // Unknown members are refused, so no body can name another consumer.
    let r = acme
        .send("POST", "/api/keys", Some(json!({"consumer": "keys-globex"})), true)
        .await;
    assert_eq!(r.status, 400, "{}", r.text());

    // The audit trail says the tenant did it, through the portal.
    let client = s.stack.client();
    eventually("the portal's writes are attributed in key_audit", DEADLINE, || async {
        let actors: Vec<String> = client
            .query("SELECT DISTINCT actor FROM key_audit WHERE consumer_name = 'keys-acme' AND key_id IN (?, ?)")
            .bind(&key_id)
            .bind(&new_id)
            .fetch_all()
            .await
            .ok()?;
        (actors == ["portal:keys-acme"]).then_some(())
    })
    .await;
    s.stack.remove().await;
}
