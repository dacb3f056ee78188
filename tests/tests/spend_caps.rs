//! Monthly spend caps over the real stack: the gateway binary with `[budgets]`, the
//! meter-consumer binary counting its usage into ClickHouse, Kafka in between.
//!
//! Budgets are set, read and removed on the admin API with clear refusals; a capped tenant is
//! admitted until the next request would pass its cap, then refused with `spend-cap-exceeded`
//! (the upstream never sees it); the refusal continues after a gateway restart (the count comes
//! back from ClickHouse) and on a second gateway (which sees the first one's spend through
//! ClickHouse within one refresh).

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_tests::capped::{CappedStack, REFRESH_MS, REQUEST_COST};
use tollgate_tests::eventually;
use tollgate_tests::http::{send, Reply};
use tollgate_tests::process::GatewayProcess;

const ADMIN_TOKEN: &str = "spend-caps-admin-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(60);

/// Billable requests ClickHouse has counted for `tenant`.
async fn counted(stack: &CappedStack, tenant: &str) -> u64 {
    stack
        .client()
        .query("SELECT count() FROM usage_events WHERE tenant_id = ? AND billable = 1")
        .bind(tenant)
        .fetch_one::<u64>()
        .await
        .unwrap_or(0)
}

async fn admin(gw: &GatewayProcess, method: &str, path: &str, body: Option<Value>) -> Reply {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    send(method, &format!("{}{path}", gw.admin), &headers, body.as_bytes()).await
}

async fn call(gw: &GatewayProcess, key: &str) -> Reply {
    let auth = format!("Bearer {key}");
    send(
        "GET",
        &format!("{}/v1/orders", gw.public),
        &[("authorization", &auth)],
        b"",
    )
    .await
}

/// The first answer that is not `spend-unknown` (the gateway has not read ClickHouse for the
/// tenant yet).
async fn settled_call(gw: &GatewayProcess, key: &str) -> Reply {
    eventually("an answer with the month-to-date spend known", DEADLINE, || async {
        let reply = call(gw, key).await;
        (reply.status != 503).then_some(reply)
    })
    .await
}

fn assert_cap_exceeded(reply: &Reply, cap: i64) {
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/problem+json"));
    let body = reply.json();
    assert_eq!(body["type"], "https://tollgate.dev/problems/spend-cap-exceeded");
    assert_eq!(body["monthlyCap"], cap);
    let period_end = body["periodEnd"].as_str().expect("periodEnd");
    assert!(period_end.ends_with("-01T00:00:00Z"), "{period_end}");
    assert!(body["detail"].as_str().unwrap().contains(&cap.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budgets_are_set_read_and_removed_on_the_admin_api_with_clear_refusals() {
    let stack = CappedStack::start("budget_admin").await;
    let mut gw = stack.gateway("gw", ADMIN_TOKEN, &[]);
    gw.process.start().await;
    gw.consumer_with_key(ADMIN_TOKEN, "acme", json!({"tenantId": "t_acme", "plan": "free"}))
        .await;
    gw.consumer_with_key(ADMIN_TOKEN, "acme-batch", json!({"tenantId": "t_acme", "plan": "free"}))
        .await;
    let path = "/v1/consumers/acme/budget";

    assert_eq!(admin(&gw, "GET", path, None).await.status, 404);
    for (body, status, detail) in [
        (json!({"monthlyCap": -1}), 400, "monthlyCap must be a whole number"),
        (json!({"monthlyCap": 100, "alertAt": [0]}), 400, "alertAt: 0"),
        (json!({"monthlyCap": 100, "alertAt": [101]}), 400, "alertAt: 101"),
        (json!({"monthlyCap": 100, "cap": 5}), 400, "unknown field `cap`"),
        (json!({"monthlyCap": "100"}), 400, "invalid type"),
    ] {
        let reply = admin(&gw, "PUT", path, Some(body.clone())).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
        assert_eq!(reply.header("content-type"), Some("application/problem+json"));
        assert!(
            reply.json()["detail"].as_str().unwrap().contains(detail),
            "{body}: {}",
            reply.text()
        );
    }
    let unknown = admin(
        &gw,
        "PUT",
        "/v1/consumers/nobody/budget",
        Some(json!({"monthlyCap": 1})),
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["type"].as_str().unwrap().ends_with("/not-found"));

    let set = admin(
        &gw,
        "PUT",
        path,
        Some(json!({"monthlyCap": 5000, "alertAt": [100, 50, 80]})),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.text());
    let set = set.json();
    assert_eq!(set["monthlyCap"], 5000);
    assert_eq!(set["alertAt"], json!([50, 80, 100]));
    assert_eq!(set["tenantId"], "t_acme");
    assert_eq!(set["enforced"], true);
    assert_eq!(set["currency"], "usd");
    // The tenant's budget, whichever of its consumers it is read through.
    let read = admin(&gw, "GET", "/v1/consumers/acme-batch/budget", None).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.json()["monthlyCap"], 5000);
    let known = eventually("the month-to-date spend read from clickhouse", DEADLINE, || async {
        let read = admin(&gw, "GET", path, None).await.json();
        read["monthToDate"]["spent"].as_i64()
    })
    .await;
    assert_eq!(known, 0);

    assert_eq!(admin(&gw, "DELETE", path, None).await.status, 204);
    assert_eq!(admin(&gw, "GET", path, None).await.status, 404);
    assert_eq!(
        admin(&gw, "DELETE", path, None).await.status,
        204,
        "deleting twice is fine"
    );
    stack.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_capped_tenant_is_refused_at_its_cap_after_a_restart_and_on_another_gateway() {
    let stack = CappedStack::start("spend_caps").await;
    let mut first = stack.gateway("first", ADMIN_TOKEN, &[]);
    first.process.start().await;
    let key = first
        .consumer_with_key(ADMIN_TOKEN, "acme", json!({"tenantId": "t_acme", "plan": "free"}))
        .await;
    // Room for 4 requests (44), not a fifth (55).
    let cap = 4 * REQUEST_COST + REQUEST_COST / 2;
    let set = admin(
        &first,
        "PUT",
        "/v1/consumers/acme/budget",
        Some(json!({"monthlyCap": cap})),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.text());

    let mut admitted = 0;
    let refused = loop {
        let reply = settled_call(&first, &key).await;
        if reply.status != 200 {
            break reply;
        }
        admitted += 1;
        assert!(admitted <= 4, "admitted past the cap");
    };
    assert_eq!(admitted, 4);
    assert_cap_exceeded(&refused, cap);
    assert_eq!(stack.upstream.received(), 4, "a refusal never reaches the upstream");
    let status = admin(&first, "GET", "/v1/consumers/acme/budget", None).await.json();
    assert_eq!(status["monthToDate"]["spent"], 4 * REQUEST_COST);

    // ClickHouse counts what was admitted, and nothing for the refusal.
    eventually("clickhouse counted the admitted requests", DEADLINE, || async {
        (counted(&stack, "t_acme").await == 4).then_some(())
    })
    .await;

    // A restart forgets what the process admitted; ClickHouse remembers.
    first.process.terminate();
    first.process.wait_exit(DEADLINE).await;
    first.process.start().await;
    assert_cap_exceeded(&settled_call(&first, &key).await, cap);

    // A second gateway (another service.id) starts from ClickHouse too.
    let mut second = stack.gateway("second", ADMIN_TOKEN, &[]);
    second.process.start().await;
    assert_cap_exceeded(&settled_call(&second, &key).await, cap);
    assert_eq!(stack.upstream.received(), 4);

    // A raised cap makes room for exactly one more request on either gateway; once the
    // first gateway's admission reaches ClickHouse the second refuses too.
    let cap = cap + REQUEST_COST;
    let raised = admin(
        &second,
        "PUT",
        "/v1/consumers/acme/budget",
        Some(json!({"monthlyCap": cap})),
    )
    .await;
    assert_eq!(raised.status, 200);
    eventually("the raised cap reached the first gateway", DEADLINE, || async {
        let reply = call(&first, &key).await;
        (reply.status == 200).then_some(())
    })
    .await;
    assert_cap_exceeded(&call(&first, &key).await, cap);
    eventually("clickhouse counted the fifth request", DEADLINE, || async {
        (counted(&stack, "t_acme").await == 5).then_some(())
    })
    .await;
    eventually("the second gateway saw the first one's spend", DEADLINE, || async {
        let status = admin(&second, "GET", "/v1/consumers/acme/budget", None).await.json();
        (status["monthToDate"]["spent"] == 5 * REQUEST_COST).then_some(())
    })
    .await;
    assert_cap_exceeded(&call(&second, &key).await, cap);
    assert_eq!(stack.upstream.received(), 5);
    assert_eq!(counted(&stack, "t_acme").await, 5);
    drop((first, second));
    stack.remove().await;
}

/// What a gateway may admit beyond the cap for each other gateway (the bound stated in the
/// README): what that other one admits in one refresh interval plus the pipeline's lag. The
/// lag allowed here (spool, Kafka transaction, meter-consumer batch, ClickHouse insert) is
/// generous for a loaded machine; each gateway below sends at most one request a second.
const PIPELINE_LAG_MS: u64 = 5_000;
const PACE: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_redis_admit_at_most_the_cap_plus_the_stated_bound() {
    let stack = CappedStack::start("spend_two").await;
    let (redis, prefix) = (tollgate_tests::redis(), tollgate_tests::unique("spend_two"));
    let on_redis = [
        ("TOLLGATE_LIMITS__BACKEND", "redis"),
        ("TOLLGATE_LIMITS__REDIS_URL", redis.as_str()),
        ("TOLLGATE_LIMITS__KEY_PREFIX", prefix.as_str()),
    ];
    let mut gateways = [
        stack.gateway("one", ADMIN_TOKEN, &on_redis),
        stack.gateway("two", ADMIN_TOKEN, &on_redis),
    ];
    for gw in &mut gateways {
        gw.process.start().await;
    }
    let key = gateways[0]
        .consumer_with_key(ADMIN_TOKEN, "duo", json!({"tenantId": "t_duo", "plan": "enterprise"}))
        .await;
    // Room for 40 requests; either gateway alone would admit all of them.
    let cap_requests = 40;
    let cap = cap_requests * REQUEST_COST + REQUEST_COST / 2;
    let set = admin(
        &gateways[0],
        "PUT",
        "/v1/consumers/duo/budget",
        Some(json!({"monthlyCap": cap})),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.text());
    eventually("the other gateway has the budget", DEADLINE, || async {
        let budget = admin(&gateways[1], "GET", "/v1/consumers/duo/budget", None).await;
        (budget.status == 200).then_some(())
    })
    .await;

    // Both gateways at once, each at its own pace, until each refuses.
    let (one, two) = tokio::join!(
        admit_until_refused(&gateways[0], &key, cap),
        admit_until_refused(&gateways[1], &key, cap)
    );
    let admitted = [one, two];
    let total: i64 = admitted.iter().sum();
    let per_window = ((REFRESH_MS + PIPELINE_LAG_MS) as f64 / PACE.as_millis() as f64).ceil() as i64;
    println!("admitted {admitted:?} = {total} against a cap of {cap_requests}; bound {per_window} per other gateway");
    assert!(total >= cap_requests, "the tenant gets its whole cap: {admitted:?}");
    assert!(
        total <= cap_requests + 2 * per_window,
        "admitted {total} ({admitted:?}): past the cap of {cap_requests} by more than the bound"
    );
    eventually("clickhouse counted every admitted request", DEADLINE, || async {
        (counted(&stack, "t_duo").await == total as u64).then_some(())
    })
    .await;
    drop(gateways);
    stack.remove().await;
}

/// Requests through `gw`, one per [`PACE`], until the cap refuses one; how many were admitted.
async fn admit_until_refused(gw: &GatewayProcess, key: &str, cap: i64) -> i64 {
    let mut admitted = 0;
    loop {
        let reply = settled_call(gw, key).await;
        if reply.status != 200 {
            assert_cap_exceeded(&reply, cap);
            return admitted;
        }
        admitted += 1;
        tokio::time::sleep(PACE).await;
    }
}
