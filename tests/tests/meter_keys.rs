//! meter-consumer mirrors the keys topic into ClickHouse (`consumers`, `key_audit`) and the
//! finance views join it: the invoice preview names the tenant's current Stripe customer.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::FutureRecord;
use support::{produce, producer, Env, Workload};
use tollgate_runtime::shutdown::Shutdown;
use tollgate_schemas::{encode, ApiKeyRecord, ConsumerRecord, EntityKey};
use tollgate_test_support::meter as support;

fn consumer(id: &str, tenant: &str, customer: &str, version: i64) -> ConsumerRecord {
    ConsumerRecord {
        id: id.into(),
        name: format!("{id}-name"),
        tenant_id: Some(tenant.into()),
        plan: Some("pro".into()),
        stripe_customer_id: Some(customer.into()),
        metadata_json: "{}".into(),
        created_at_ms: 1_795_000_000_000,
        updated_at_ms: 1_795_000_000_000 + version,
        version,
        updated_by: "admin".into(),
    }
}

fn key(version: i64, revoked: bool) -> ApiKeyRecord {
    ApiKeyRecord {
        id: "key_1".into(),
        consumer_id: "c1".into(),
        consumer_name: "c1-name".into(),
        prefix: "tg_test_abc".into(),
        secret_sha256: [9; 32],
        description: String::new(),
        labels: BTreeMap::new(),
        created_at_ms: 1_795_000_000_000,
        expires_at_ms: None,
        revoked_at_ms: revoked.then_some(1_795_000_100_000),
        rolled_from: None,
        version,
        updated_by: "ops@example.com".into(),
    }
}

#[derive(Debug, PartialEq, serde::Deserialize, clickhouse::Row)]
struct Live {
    consumer_id: String,
    stripe_customer_id: String,
    deleted: u8,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_and_key_audit_are_mirrored_and_joined_by_the_invoice_preview() {
    let env = Env::new("meter_keys", 1).await;
    let producer = producer(&env.brokers);
    let records: Vec<(String, Option<Vec<u8>>)> = vec![
        (
            EntityKey::Consumer("c1").to_string(),
            Some(encode(&consumer("c1", "tenant_1", "cus_old", 1))),
        ),
        (
            EntityKey::Consumer("c1").to_string(),
            Some(encode(&consumer("c1", "tenant_1", "cus_new", 2))),
        ),
        (
            EntityKey::Consumer("c2").to_string(),
            Some(encode(&consumer("c2", "tenant_2", "cus_two", 1))),
        ),
        (EntityKey::Consumer("c2").to_string(), None),
        (EntityKey::ApiKey("key_1").to_string(), Some(encode(&key(1, false)))),
        (EntityKey::ApiKey("key_1").to_string(), Some(encode(&key(2, true)))),
    ];
    for (k, payload) in &records {
        let mut record = FutureRecord::<str, [u8]>::to(&env.keys).key(k.as_str());
        if let Some(payload) = payload {
            record = record.payload(payload.as_slice());
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("acked");
    }
    let workload = Workload::new(6, 500);
    produce(&producer, &env.usage, &workload.events, None).await;

    let shutdown = Shutdown::default();
    let task = tokio::spawn({
        let (settings, shutdown) = (env.settings(&env.clickhouse, 1_000, 200), shutdown.clone());
        async move { tollgate_meter_consumer::run(settings, shutdown).await.expect("runs") }
    });
    let client = env.client();
    let live = tollgate_tests::eventually("consumers mirrored", Duration::from_secs(60), || async {
        let rows: Vec<Live> = client
            .query("SELECT consumer_id, stripe_customer_id, deleted FROM consumers FINAL ORDER BY consumer_id")
            .fetch_all()
            .await
            .ok()?;
        (rows.len() == 2 && rows[1].deleted == 1).then_some(rows)
    })
    .await;
    assert_eq!(
        live,
        vec![
            Live {
                consumer_id: "c1".into(),
                stripe_customer_id: "cus_new".into(),
                deleted: 0
            },
            Live {
                consumer_id: "c2".into(),
                stripe_customer_id: "cus_two".into(),
                deleted: 1
            },
        ]
    );
    let actions = tollgate_tests::eventually("key audit mirrored", Duration::from_secs(60), || async {
        let rows: Vec<(String, String)> = client
            .query("SELECT action, actor FROM key_audit FINAL WHERE key_id = 'key_1' ORDER BY version")
            .fetch_all()
            .await
            .ok()?;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    assert_eq!(
        actions,
        vec![
            ("created".to_owned(), "ops@example.com".to_owned()),
            ("revoked".to_owned(), "ops@example.com".to_owned())
        ]
    );
    support::assert_exact(&client, &workload.totals, workload.count, Duration::from_secs(60)).await;
    let customers: Vec<String> = client
        .query("SELECT DISTINCT stripe_customer_id FROM invoice_preview WHERE tenant_id = 'tenant_1'")
        .fetch_all()
        .await
        .expect("invoice preview");
    assert_eq!(customers, vec!["cus_new".to_owned()]);
    let previewed: i64 = client
        .query("SELECT sum(billable_units) FROM invoice_preview WHERE meter = 'compute_units'")
        .fetch_one()
        .await
        .expect("invoice preview total");
    let expected: i64 = workload
        .totals
        .iter()
        .filter(|((tenant, meter), _)| !tenant.is_empty() && meter == "compute_units")
        .map(|(_, t)| t.1)
        .sum();
    assert_eq!(previewed, expected);

    shutdown.trigger();
    task.await.expect("stops");
    env.drop_database().await;
}
