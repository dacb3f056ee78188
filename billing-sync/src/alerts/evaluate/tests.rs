use super::*;
use tollgate_schemas::ConsumerRecord;

const CATALOGUE: &str = r#"
[plans.starter]
currency = "usd"
monthly_fee_minor = 100
meters.requests = { unit_price_minor = "10" }
meters.compute_units = { unit_price_minor = "1", included_units = 5 }
"#;

const GATEWAY: &str = r#"
[plans.starter]
limits = [{ name = "compute_units_per_day", meter = "compute_units", window = "day", limit = 100 }]
"#;

fn tenant(id: &str, plan: &str, metadata: &str) -> Tenant {
    Tenant {
        tenant_id: id.to_owned(),
        plan: Some(plan.to_owned()),
        stripe_customer_id: None,
        consumers: vec![ConsumerRecord {
            id: format!("c_{id}"),
            name: id.to_owned(),
            tenant_id: Some(id.to_owned()),
            plan: Some(plan.to_owned()),
            stripe_customer_id: None,
            metadata_json: metadata.to_owned(),
            created_at_ms: 0,
            updated_at_ms: 0,
            version: 1,
            updated_by: "test".to_owned(),
        }],
    }
}

fn budget(tenant: &str, cap: i64) -> BudgetRecord {
    BudgetRecord {
        tenant_id: tenant.to_owned(),
        monthly_cap_minor: cap,
        alert_at: vec![50, 80, 100],
        updated_at_ms: 0,
        version: 1,
        updated_by: "test".to_owned(),
    }
}

fn units(tenant: &str, pairs: &[(&str, i64)]) -> TenantUnits {
    let per_meter = pairs.iter().map(|(m, u)| ((*m).to_owned(), *u)).collect();
    TenantUnits::from([(tenant.to_owned(), per_meter)])
}

/// 2026-12-15 12:00 UTC.
const NOW: i64 = 1_797_336_000;

fn alerts(
    billable: &TenantUnits,
    admitted_day: &TenantUnits,
    recorded: &BTreeSet<AlertKey>,
    metadata: &str,
) -> Vec<AlertRow> {
    let catalogue = Catalogue::parse(CATALOGUE, "plans.toml").unwrap();
    let plans = QuotaPlans::parse(GATEWAY).unwrap();
    let tenants = BTreeMap::from([("t1".to_owned(), tenant("t1", "starter", metadata))]);
    let budgets = BTreeMap::from([("t1".to_owned(), budget("t1", 1000))]);
    new_alerts(&Observed {
        tenants: &tenants,
        budgets: &budgets,
        catalogue: &catalogue,
        quota_plans: &plans,
        quota_thresholds: &[80, 100],
        month: &Period::month_of(NOW),
        day: &Period::day_of(NOW),
        billable_month: billable,
        admitted_month: &TenantUnits::new(),
        admitted_day,
        recorded,
        now: NOW,
    })
}

#[test]
fn periods_are_utc_calendar_months_and_days() {
    let month = Period::month_of(NOW);
    assert_eq!(month.name, "2026-12");
    assert_eq!(rfc3339(i64::from(month.start)), "2026-12-01T00:00:00Z");
    assert_eq!(month.end_text(), "2027-01-01T00:00:00Z");
    let day = Period::day_of(NOW);
    assert_eq!(day.name, "2026-12-15");
    assert_eq!(day.end_text(), "2026-12-16T00:00:00Z");
}

#[test]
fn spend_is_priced_with_the_fee_and_included_units_as_the_invoice() {
    // 100 fee + 30 requests × 10 + (15 − 5 included) × 1 = 410: under 50 % of 1000.
    let billable = units("t1", &[("requests", 30), ("compute_units", 15)]);
    assert!(alerts(&billable, &TenantUnits::new(), &BTreeSet::new(), "{}").is_empty());
    // 100 + 400 + 0 = 500: exactly 50 %.
    let billable = units("t1", &[("requests", 40), ("compute_units", 5)]);
    let rows = alerts(&billable, &TenantUnits::new(), &BTreeSet::new(), "{}");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(
        (row.kind.as_str(), row.subject.as_str(), row.threshold),
        ("spend", MONTHLY_CAP, 50)
    );
    assert_eq!(
        (row.observed, row.limit_value, row.status.as_str()),
        (500, 1000, "pending")
    );
    let body: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(body["type"], "spend.threshold_crossed");
    assert_eq!(body["data"]["spentMinor"], 500);
    assert_eq!(body["data"]["monthlyCapMinor"], 1000);
    assert_eq!(body["data"]["currency"], "usd");
    assert_eq!(body["data"]["periodEnd"], "2027-01-01T00:00:00Z");
    assert_eq!(row.webhook_id, row.key().unwrap().webhook_id());
}

#[test]
fn recorded_alerts_are_not_raised_again_and_quota_overrides_apply() {
    let billable = units("t1", &[("requests", 100)]);
    let all = alerts(&billable, &TenantUnits::new(), &BTreeSet::new(), "{}");
    assert_eq!(all.iter().map(|r| r.threshold).collect::<Vec<_>>(), [50, 80, 100]);
    let recorded: BTreeSet<AlertKey> = all.iter().filter_map(AlertRow::key).collect();
    assert!(alerts(&billable, &TenantUnits::new(), &recorded, "{}").is_empty());

    let day = units("t1", &[("compute_units", 8)]);
    assert!(alerts(&TenantUnits::new(), &day, &BTreeSet::new(), "{}")
        .iter()
        .all(|r| r.kind == "spend"));
    let quota = alerts(
        &TenantUnits::new(),
        &day,
        &BTreeSet::new(),
        r#"{"limits": {"compute_units_per_day": 10}}"#,
    );
    let quota: Vec<_> = quota.iter().filter(|r| r.kind == "quota").collect();
    assert_eq!(quota.len(), 1);
    assert_eq!((quota[0].threshold, quota[0].period.as_str()), (80, "2026-12-15"));
    let body: serde_json::Value = serde_json::from_str(&quota[0].payload).unwrap();
    assert_eq!(body["type"], "quota.threshold_crossed");
    assert_eq!(body["data"]["limitName"], "compute_units_per_day");
    assert_eq!(
        (body["data"]["used"].as_i64(), body["data"]["limit"].as_i64()),
        (Some(8), Some(10))
    );
}
