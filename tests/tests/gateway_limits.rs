//! Plans and limits through the gateway: the seed's four plans by their headers, one
//! decision over every dimension (a refusal consumes nothing), the upstream's reported cost,
//! a plan that is the tenant's across its consumers (kept agreeing by the admin API), and two
//! gateways sharing exact limits through the real Redis.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;
use tollgate_gateway::limits::Backend;
use tollgate_tests::gateway::{create_keys_topic, settings, TestGateway};
use tollgate_tests::http::{send, EchoUpstream, Reply};

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply
        .header(name)
        .unwrap_or_else(|| panic!("no {name} header: {:?}", reply.headers))
}

/// `r=` of one limit in the `RateLimit` structured field.
fn remaining(reply: &Reply, limit: &str) -> u64 {
    let field = header(reply, "ratelimit");
    let item = field
        .split(',')
        .map(str::trim)
        .find(|i| i.starts_with(&format!("\"{limit}\"")))
        .unwrap_or_else(|| panic!("{limit} not in RateLimit: {field}"));
    item.split(';')
        .find_map(|p| p.trim().strip_prefix("r="))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no r= in {item}"))
}

#[tokio::test]
async fn the_seed_plans_show_in_the_headers() {
    let upstream = EchoUpstream::start().await;
    let gw = TestGateway::start(settings(&create_keys_topic().await, &upstream.url()), None).await;
    for (plan, limit) in [
        ("free", 100),
        ("starter", 500),
        ("professional", 2000),
        ("enterprise", 10000),
    ] {
        let (key, _) = gw
            .consumer_with_key(
                &format!("seed-{plan}"),
                json!({"tenantId": format!("tenant_{plan}"), "plan": plan}),
            )
            .await;
        let reply = gw
            .get("/v1/orders", &[("authorization", &format!("Bearer {key}"))])
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(header(&reply, "ratelimit-limit"), limit.to_string(), "{plan}");
        assert_eq!(header(&reply, "ratelimit-remaining"), (limit - 1).to_string(), "{plan}");
        let reset: u64 = header(&reply, "ratelimit-reset").parse().unwrap();
        assert!(reset <= 60, "{plan}: reset {reset}");
        let policy = header(&reply, "ratelimit-policy");
        assert!(
            policy.contains("\"requests_per_minute\";q=") && policy.contains(&format!("q={limit}")),
            "{policy}"
        );
        assert!(policy.contains("\"compute_units_per_day\""), "{policy}");
        assert_eq!(remaining(&reply, "requests_per_minute"), limit - 1);
    }
    let unknown_plan = gw
        .admin(
            "POST",
            "/v1/consumers",
            Some(json!({"name": "x", "metadata": {"plan": "platinum"}})),
        )
        .await;
    assert_eq!(
        unknown_plan.status,
        400,
        "a plan must be defined: {}",
        unknown_plan.text()
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_plan_is_the_tenants_whichever_consumer_names_it() {
    let upstream = EchoUpstream::start().await;
    let gw = TestGateway::start(settings(&create_keys_topic().await, &upstream.url()), None).await;
    let plan_of = |name: &'static str| {
        let gw = &gw;
        async move { gw.admin("GET", &format!("/v1/consumers/{name}"), None).await.json()["metadata"].clone() }
    };
    let limit_for = |key: String| {
        let gw = &gw;
        async move {
            let reply = gw.get("/v1/x", &[("authorization", &format!("Bearer {key}"))]).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            header(&reply, "ratelimit-limit").to_owned()
        }
    };
    let (web, _) = gw
        .consumer_with_key("terms-web", json!({"tenantId": "t_terms", "plan": "starter"}))
        .await;
    // A second consumer naming no plan takes the tenant's.
    let (ci, _) = gw.consumer_with_key("terms-ci", json!({"tenantId": "t_terms"})).await;
    assert_eq!(plan_of("terms-ci").await["plan"], "starter");
    assert_eq!(limit_for(ci.clone()).await, "500");

    // Naming a plan on one consumer moves the whole tenant.
    let patched = gw
        .admin(
            "PATCH",
            "/v1/consumers/terms-ci",
            Some(json!({"metadata": {"plan": "professional"}})),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(plan_of("terms-web").await["plan"], "professional");
    assert_eq!(limit_for(web.clone()).await, "2000");
    assert_eq!(limit_for(ci.clone()).await, "2000");

    // So do overrides; a patch naming neither leaves the terms alone.
    let deal = json!({"metadata": {"plan": "free", "limits": {"requests_per_minute": 7}}});
    assert_eq!(
        gw.admin("PATCH", "/v1/consumers/terms-web", Some(deal)).await.status,
        200
    );
    let team = json!({"metadata": {"team": "platform"}});
    assert_eq!(
        gw.admin("PATCH", "/v1/consumers/terms-ci", Some(team)).await.status,
        200
    );
    let ci_terms = plan_of("terms-ci").await;
    assert_eq!(
        (&ci_terms["plan"], &ci_terms["limits"]["requests_per_minute"]),
        (&json!("free"), &json!(7))
    );
    assert_eq!(limit_for(web).await, "7");
    assert_eq!(limit_for(ci).await, "7");

    // Naming only the plan keeps the tenant's overrides, for the new consumer and the others.
    let (bot, _) = gw
        .consumer_with_key("terms-bot", json!({"tenantId": "t_terms", "plan": "starter"}))
        .await;
    for name in ["terms-web", "terms-ci", "terms-bot"] {
        let terms = plan_of(name).await;
        assert_eq!(
            (&terms["plan"], &terms["limits"]["requests_per_minute"]),
            (&json!("starter"), &json!(7)),
            "{name}"
        );
    }
    assert_eq!(limit_for(bot).await, "7");

    // A consumer of its own tenant naming no plan is on the default plan (free), and its
    // overrides are checked against that plan.
    let (solo, _) = gw.consumer_with_key("terms-solo", json!({"tenantId": "t_solo"})).await;
    assert_eq!(limit_for(solo).await, "100");
    let bad = json!({"name": "terms-bad", "metadata": {"tenantId": "t_bad", "limits": {"no_such_limit": 1}}});
    let refused = gw.admin("POST", "/v1/consumers", Some(bad)).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(refused.text().contains("no_such_limit"), "{}", refused.text());
    gw.stop().await;
}

#[tokio::test]
async fn a_refusal_consumes_nothing_and_reported_cost_counts() {
    let upstream = EchoUpstream::start().await;
    let gw = TestGateway::start(settings(&create_keys_topic().await, &upstream.url()), None).await;
    // The enterprise deal: this consumer's own allowances override its plan's.
    let metadata = json!({"tenantId": "tenant_deal", "plan": "free", "limits": {"requests_per_minute": 1000, "compute_units_per_day": 60}});
    let (key, _) = gw.consumer_with_key("deal", metadata).await;
    let auth = format!("Bearer {key}");
    let scoped = "/v1/tenants/tenant_deal/things";

    let first = gw.get(scoped, &[("authorization", &auth)]).await;
    assert_eq!(first.status, 200);
    assert_eq!(remaining(&first, "requests_per_minute"), 999, "the override applies");
    assert_eq!(remaining(&first, "compute_units_per_day"), 55, "the route costs 5");

    // The upstream reports 42 for this one: 5 up front, 37 more after the response.
    let costly = gw
        .get("/v1/tenants/tenant_deal/cost", &[("authorization", &auth)])
        .await;
    assert_eq!(costly.status, 200);
    assert_eq!(remaining(&costly, "compute_units_per_day"), 50);
    let next = gw.get("/v1/orders", &[("authorization", &auth)]).await;
    assert_eq!(next.status, 200);
    assert_eq!(
        remaining(&next, "compute_units_per_day"),
        55 - 42 - 1,
        "the reported 42 moved the meter"
    );
    assert_eq!(remaining(&next, "requests_per_minute"), 997);

    // 12 units left; the scoped route costs 5: two more pass, the third is refused on
    // compute units alone, and consumes nothing else.
    for _ in 0..2 {
        assert_eq!(gw.get(scoped, &[("authorization", &auth)]).await.status, 200);
    }
    let before = upstream.received();
    let refused = gw.get(scoped, &[("authorization", &auth)]).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.header("content-type"), Some("application/problem+json"));
    let problem = refused.json();
    assert!(
        problem["type"].as_str().unwrap().ends_with("quota-exceeded"),
        "{problem}"
    );
    assert_eq!(problem["violated-policies"], json!(["compute_units_per_day"]));
    assert!(header(&refused, "retry-after").parse::<u64>().unwrap() > 0);
    assert_eq!(
        upstream.received(),
        before,
        "a refused request never reaches the upstream"
    );
    assert_eq!(
        remaining(&refused, "requests_per_minute"),
        995,
        "the refusal took no request"
    );
    // The next request that fits (1 unit) sees every counter as the refusal left it.
    let after = gw.get("/v1/orders", &[("authorization", &auth)]).await;
    assert_eq!(after.status, 200);
    assert_eq!(remaining(&after, "compute_units_per_day"), 1);
    assert_eq!(remaining(&after, "requests_per_minute"), 994);
    gw.stop().await;
}

#[tokio::test]
async fn two_gateways_on_redis_admit_exactly_the_allowance() {
    let upstream = EchoUpstream::start().await;
    let topic = create_keys_topic().await;
    let prefix = tollgate_tests::unique("rl");
    let on_redis = || {
        let mut s = settings(&topic, &upstream.url());
        s.limits.backend = Backend::Redis;
        s.limits.redis_url = tollgate_tests::redis();
        s.limits.key_prefix = prefix.clone();
        s.limits.redis_timeout_ms = 2000;
        s
    };
    let a = TestGateway::start(on_redis(), None).await;
    let b = TestGateway::start(on_redis(), None).await;
    let limits = json!({"requests_per_minute": 1000, "compute_units_per_day": 1000000});
    let (key, _) = a
        .consumer_with_key(
            "flood",
            json!({"tenantId": "tenant_flood", "plan": "free", "limits": limits}),
        )
        .await;
    let (other, _) = a
        .consumer_with_key("calm", json!({"tenantId": "tenant_calm", "plan": "free"}))
        .await;
    let urls = [format!("{}/v1/x", a.public), format!("{}/v1/x", b.public)];
    tollgate_tests::eventually("B knows the keys", std::time::Duration::from_secs(30), || async {
        (send("GET", &urls[1], &[("authorization", &format!("Bearer {key}"))], b"")
            .await
            .status
            != 401)
            .then_some(())
    })
    .await;

    // That probe was admitted: 999 left. 64 clients send 1,300 more across both gateways.
    let admitted = Arc::new(AtomicUsize::new(1));
    let refused = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..64)
        .map(|c| {
            let (url, auth) = (urls[c % 2].clone(), format!("Bearer {key}"));
            let (admitted, refused, next) = (Arc::clone(&admitted), Arc::clone(&refused), Arc::clone(&next));
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < 1300 {
                    match send("GET", &url, &[("authorization", &auth)], b"").await.status {
                        200 => admitted.fetch_add(1, Ordering::SeqCst),
                        429 => refused.fetch_add(1, Ordering::SeqCst),
                        other => panic!("unexpected status {other}"),
                    };
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(
        admitted.load(Ordering::SeqCst),
        1000,
        "exactly the allowance, across both gateways"
    );
    assert_eq!(refused.load(Ordering::SeqCst), 301);
    // Another tenant is untouched by the flood.
    let calm = send("GET", &urls[1], &[("authorization", &format!("Bearer {other}"))], b"").await;
    assert_eq!(calm.status, 200);
    assert_eq!(header(&calm, "ratelimit-remaining"), "99");
    a.stop().await;
    b.stop().await;
}
