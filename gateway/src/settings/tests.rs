//! The gateway's settings against the example config and its typos.

use tollgate_runtime::settings::from_str_with_env;

use super::*;

const EXAMPLE: &str = include_str!("../../../config/gateway.toml");

fn load(text: &str) -> Result<GatewaySettings, String> {
    from_str_with_env(text, "gateway.toml", Vec::new()).map_err(|e| e.to_string())
}

#[test]
fn example_config_is_valid() {
    let s = load(EXAMPLE).unwrap();
    assert_eq!(s.public.listen.as_deref(), Some("127.0.0.1:8080"));
    assert_eq!(s.admin.listen, "127.0.0.1:8081");
    assert!(s.routes.iter().any(|r| r.path == "/v1/"));
}

#[test]
fn budgets_refuse_unknown_fields_and_bad_values_by_their_path() {
    let section = "\n[budgets]\ncatalogue = \"plans.toml\"\nclickhouse = { url = \"http://127.0.0.1:8123\" }\n";
    let s = load(&format!("{EXAMPLE}{section}")).unwrap();
    assert_eq!(s.budgets.unwrap().refresh_interval_ms, 5_000);
    let err = load(&format!("{EXAMPLE}{section}refresh_interval_ms = 10\n")).unwrap_err();
    assert!(err.contains("budgets.refresh_interval_ms"), "{err}");
    let err = load(&format!("{EXAMPLE}{section}refresh_every = 10\n")).unwrap_err();
    assert!(err.contains("refresh_every"), "{err}");
    let err = load(&format!(
        "{EXAMPLE}{}",
        section.replace("http://127.0.0.1:8123", "ftp://x")
    ))
    .unwrap_err();
    assert!(err.contains("budgets.clickhouse.url"), "{err}");
    let err = load(&format!("{EXAMPLE}{}", section.replace("\"plans.toml\"", "\"\""))).unwrap_err();
    assert!(err.contains("budgets.catalogue"), "{err}");
}

#[test]
fn rejects_same_public_and_admin_address() {
    let text = EXAMPLE.replace("127.0.0.1:8081", "127.0.0.1:8080");
    assert!(load(&text).unwrap_err().contains("setting `admin.listen`"));
}

#[test]
fn rejects_duplicate_route_paths() {
    let text = format!("{EXAMPLE}\n[[routes]]\nid = \"again\"\npath = \"/v1/\"\nupstream = \"http://127.0.0.1:1\"\n");
    let err = load(&text).unwrap_err();
    assert!(err.contains(".path`: found \"/v1/\""), "{err}");
}

#[test]
fn rejects_bad_upstream_url() {
    let text = format!("{EXAMPLE}\n[[routes]]\nid = \"bad\"\npath = \"/bad/\"\nupstream = \"127.0.0.1:1\"\n");
    let err = load(&text).unwrap_err();
    assert!(
        err.contains(".upstream`: found \"127.0.0.1:1\", expected an absolute http"),
        "{err}"
    );
}

#[test]
fn rejects_bad_route_pattern_method_and_key_environment() {
    let route = |path: &str, methods: &str| {
        format!("{EXAMPLE}\n[[routes]]\nid = \"x\"\npath = \"{path}\"\nmethods = {methods}\nupstream = \"http://127.0.0.1:1\"\n")
    };
    assert!(load(&route("/a/{unclosed/", "[]"))
        .unwrap_err()
        .contains("path`: found \"/a/{unclosed/\""));
    assert!(load(&route("no-slash", "[]"))
        .unwrap_err()
        .contains("path`: found \"no-slash\""));
    assert!(load(&route("/x/", "[\"get\"]"))
        .unwrap_err()
        .contains("methods[0]`: found \"get\""));
    let err = load(&EXAMPLE.replace("environment = \"live\"", "environment = \"Live!\"")).unwrap_err();
    assert!(err.contains("setting `keys.environment`"), "{err}");
}

#[test]
fn rejects_a_missing_or_undefined_default_plan_and_a_bad_limit() {
    let err = load(&EXAMPLE.replace("default_plan = \"free\"", "default_plan = \"platinum\"")).unwrap_err();
    assert!(
        err.contains("setting `identity.default_plan`: found \"platinum\", expected a plan defined"),
        "{err}"
    );
    let err = load(&EXAMPLE.replace("default_plan = \"free\"", "")).unwrap_err();
    assert!(
        err.contains(
            "setting `identity.default_plan`: found \"\", expected a plan defined under [plans] (enterprise, free"
        ),
        "{err}"
    );
    let err =
        load(&EXAMPLE.replace("window = \"1m\", limit = 100 }", "window = \"1 minute\", limit = 100 }")).unwrap_err();
    assert!(err.contains("plans.free.limits[0].window"), "{err}");
    let err = load(&EXAMPLE.replace("cost = { compute_units = 5 }", "cost = { cpu = 5 }")).unwrap_err();
    assert!(err.contains("routes[1].cost"), "{err}");
}

#[test]
fn example_ships_the_four_seed_plans() {
    let s = load(EXAMPLE).unwrap();
    for (plan, per_minute) in [
        ("free", 100),
        ("starter", 500),
        ("professional", 2000),
        ("enterprise", 10000),
    ] {
        let limits = &s.plans[plan].limits;
        assert!(
            limits.iter().any(|l| l.window == "1m" && l.limit == per_minute),
            "{plan}"
        );
        assert!(
            limits.iter().any(|l| l.window == "day"),
            "{plan} has a compute-units-per-day limit"
        );
    }
}

#[test]
fn rejects_bad_topic_and_brokers() {
    let err = load(&EXAMPLE.replace("keys = \"tollgate.keys\"", "keys = \"has space\"")).unwrap_err();
    assert!(err.contains("setting `topics.keys`"), "{err}");
    let err = load(&EXAMPLE.replace("brokers = \"127.0.0.1:9092\"", "brokers = \"nohostport\"")).unwrap_err();
    assert!(err.contains("setting `kafka.brokers`"), "{err}");
}
