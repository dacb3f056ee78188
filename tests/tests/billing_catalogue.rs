//! The plan catalogue is the one list of plan names: the example gateway settings define
//! exactly the plans the example catalogue prices, and every meter it prices is one the
//! example billing-sync settings push. Reads files only; needs no server.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tollgate_billing_sync::BillingSettings;
use tollgate_gateway::GatewaySettings;
use tollgate_runtime::catalogue::Catalogue;
use tollgate_runtime::settings::from_str_with_env;

fn config(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../config")).join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(config(name)).expect("example config")
}

#[test]
fn the_gateway_defines_exactly_the_plans_the_catalogue_prices() {
    let catalogue = Catalogue::load(&config("plans.toml")).expect("catalogue");
    let gateway: GatewaySettings =
        from_str_with_env(&read("gateway.toml"), "gateway.toml", Vec::new()).expect("gateway");
    let priced: BTreeSet<&String> = catalogue.plans.keys().collect();
    let defined: BTreeSet<&String> = gateway.plans.keys().collect();
    assert_eq!(defined, priced, "config/gateway.toml [plans] and config/plans.toml");
    if let Some(default) = &gateway.identity.default_plan {
        assert!(
            catalogue.plans.contains_key(default),
            "default plan {default} has prices"
        );
    }
}

#[test]
fn billing_sync_pushes_every_meter_the_catalogue_prices() {
    let mut settings: BillingSettings =
        from_str_with_env(&read("billing-sync.toml"), "billing-sync.toml", Vec::new()).expect("settings");
    let catalogue = settings.catalogue.as_mut().expect("the example has a catalogue");
    catalogue.path = config("plans.toml");
    assert!(tollgate_billing_sync::load_catalogue(&settings)
        .expect("valid")
        .is_some());
    // And the refusal names the plan and the meter.
    settings.meters.retain(|m| m.meter != "compute_units");
    let err = tollgate_billing_sync::load_catalogue(&settings)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plans.enterprise.meters.compute_units: billing-sync does not push meter \"compute_units\""),
        "{err}"
    );
}

#[test]
fn billing_sync_pushes_only_meters_the_gateway_counts() {
    let gateway: GatewaySettings =
        from_str_with_env(&read("gateway.toml"), "gateway.toml", Vec::new()).expect("gateway");
    let billing: BillingSettings =
        from_str_with_env(&read("billing-sync.toml"), "billing-sync.toml", Vec::new()).expect("settings");
    for m in &billing.meters {
        assert!(
            gateway.meters.countable(&m.meter).is_some(),
            "config/billing-sync.toml pushes {:?}, which config/gateway.toml does not count",
            m.meter
        );
    }
    assert!(
        billing
            .meters
            .iter()
            .any(|m| gateway.meters.get(&m.meter) != tollgate_gateway::limits::Meter::built_in(&m.meter)),
        "the examples bill a declared meter"
    );
}
