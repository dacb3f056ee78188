//! The Grafana dashboard and the Prometheus alert rules under `deploy/` name only metrics,
//! and label values, that the services export; and compose's Prometheus scrapes the ports
//! the services listen on.
//!
//! In: `deploy/grafana/dashboards/*.json`, `deploy/prometheus/rules/*.yml`,
//! `deploy/prometheus/prometheus.yml`, `docker-compose.yml`; each service's metrics as its
//! `/metrics` renders them, from its own registration code on an in-process ops listener
//! (the series a service registers only when it happens, a partition's lag, a dead letter's
//! reason, are made to happen the way the service does). Out: assertions naming each
//! metric or series the files reference and no service exports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::Request;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use tollgate_runtime::ops::Ops;

const PREFIXES: [&str; 3] = ["gateway_", "meter_consumer_", "billing_sync_"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files_in(dir: &str, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .{extension} file in {dir}");
    files
}

/// Every PromQL expression of the dashboards (`targets[].expr`) and the rules (`expr`).
fn expressions() -> Vec<(String, String)> {
    fn collect_json(value: &Json, file: &str, out: &mut Vec<(String, String)>) {
        match value {
            Json::Object(map) => {
                if let Some(Json::String(expr)) = map.get("expr") {
                    out.push((file.to_owned(), expr.clone()));
                }
                map.values().for_each(|v| collect_json(v, file, out));
            }
            Json::Array(items) => items.iter().for_each(|v| collect_json(v, file, out)),
            _ => {}
        }
    }
    fn collect_yaml(value: &Yaml, file: &str, out: &mut Vec<(String, String)>) {
        match value {
            Yaml::Mapping(map) => {
                if let Some(Yaml::String(expr)) = map.get("expr") {
                    out.push((file.to_owned(), expr.clone()));
                }
                map.values().for_each(|v| collect_yaml(v, file, out));
            }
            Yaml::Sequence(items) => items.iter().for_each(|v| collect_yaml(v, file, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for path in files_in("deploy/grafana/dashboards", "json") {
        let text = std::fs::read_to_string(&path).expect("dashboard");
        let json: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        collect_json(&json, &path.display().to_string(), &mut out);
    }
    for path in files_in("deploy/prometheus/rules", "yml") {
        let text = std::fs::read_to_string(&path).expect("rules");
        let yaml: Yaml = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        collect_yaml(&yaml, &path.display().to_string(), &mut out);
    }
    out
}

/// A Tollgate metric an expression selects, with its `label="value"` matchers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    metric: String,
    labels: Vec<(String, String)>,
}

fn selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts_name = (chars[i].is_ascii_alphabetic() || chars[i] == '_')
            && (i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_'));
        if !starts_name {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        if !PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let mut labels = Vec::new();
        if chars.get(i) == Some(&'{') {
            let end = chars[i..].iter().position(|&c| c == '}').map_or(chars.len(), |p| i + p);
            let inner: String = chars[i + 1..end].iter().collect();
            for matcher in inner.split(',') {
                // Only equality matchers name a series that must exist.
                if let Some((label, value)) = matcher.split_once('=') {
                    let (label, value) = (label.trim(), value.trim());
                    if !label.ends_with('!') && !value.starts_with('~') {
                        labels.push((label.to_owned(), value.trim_matches('"').to_owned()));
                    }
                }
            }
            i = end;
        }
        out.push(Selector { metric: name, labels });
    }
    out
}

async fn render(ops: &Ops) -> String {
    let request = Request::get("/metrics").body(()).expect("request");
    let response = ops.respond(&request).expect("/metrics is an ops path");
    let body: Bytes = response.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

/// Each service's `/metrics`, from the code the service registers its metrics with.
async fn exported() -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();

    let (ops, recorder) = Ops::new();
    let recorder = std::sync::Arc::new(recorder);
    let _events = tollgate_gateway::events::metrics::EventMetrics::new(&*recorder);
    let _limits = tollgate_gateway::limits::LimitsMetrics::new(&*recorder);
    let _requests = tollgate_gateway::metrics::GatewayMetrics::new(recorder.clone());
    // The gateway installs the recorder's handle on its admin listener the same way.
    out.insert("gateway", render_with(&ops, recorder).await);

    let (ops, recorder) = Ops::new();
    let meter = tollgate_meter_consumer::metrics::Metrics::new(recorder);
    // Series the consumer registers as they occur: a partition assigned, a dead letter.
    let _lag = meter.lag(0);
    meter.dead_letter("undecodable");
    meter.freshness(std::time::Duration::from_millis(250));
    out.insert("meter-consumer", render(&ops).await);

    let (ops, recorder) = Ops::new();
    let _push = tollgate_billing_sync::push::PushMetrics::register(&recorder);
    let _service = tollgate_billing_sync::ServiceMetrics::register(&recorder);
    out.insert("billing-sync", render_with(&ops, recorder).await);
    out
}

/// Renders while `recorder` is still alive (the ops handle reads its registry).
async fn render_with<R>(ops: &Ops, recorder: R) -> String {
    let text = render(ops).await;
    drop(recorder);
    text
}

/// `name{labels} value` lines of a text exposition, as (name, labels).
fn series(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = line[..name_end].to_owned();
            let labels = match line[name_end..].strip_prefix('{') {
                Some(rest) => rest[..rest.find('}').unwrap_or(rest.len())]
                    .split(',')
                    .filter_map(|pair| pair.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                    .collect(),
                None => Vec::new(),
            };
            (name, labels)
        })
        .collect()
}

#[tokio::test]
async fn dashboards_and_alerts_reference_only_exported_metrics() {
    let expressions = expressions();
    assert!(expressions.len() >= 20, "dashboards and rules hold expressions");
    let exported = exported().await;
    let all: Vec<(String, Vec<(String, String)>)> = exported.values().flat_map(|text| series(text)).collect();

    let mut referenced = BTreeSet::new();
    let mut missing = Vec::new();
    for (file, expr) in &expressions {
        for selector in selectors(expr) {
            referenced.insert(selector.metric.clone());
            let found = all.iter().any(|(name, labels)| {
                name == &selector.metric && selector.labels.iter().all(|wanted| labels.contains(wanted))
            });
            if !found {
                missing.push(format!("{file}: {selector:?} in `{expr}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by any service:\n{}",
        missing.join("\n")
    );
    // Every service's metrics appear somewhere.
    for prefix in PREFIXES {
        assert!(
            referenced.iter().any(|m| m.starts_with(prefix)),
            "no {prefix}* metric referenced: {referenced:?}"
        );
    }
}

#[test]
fn selectors_are_read_from_promql() {
    let found =
        selectors(r#"increase(billing_sync_meter_events_total{outcome="failed", job=~"b.*"}[15m]) > 0 and up == 0"#);
    assert_eq!(
        found,
        [Selector {
            metric: "billing_sync_meter_events_total".to_owned(),
            labels: vec![("outcome".to_owned(), "failed".to_owned())],
        }]
    );
}

#[test]
fn compose_prometheus_scrapes_the_services_admin_ports() {
    let config: Yaml = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).expect("prometheus.yml"),
    )
    .expect("prometheus.yml is YAML");
    let compose: Yaml =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("docker-compose.yml")).expect("compose"))
            .expect("compose is YAML");
    let mut jobs = BTreeSet::new();
    for job in config["scrape_configs"].as_sequence().expect("scrape_configs") {
        for target in job["static_configs"][0]["targets"].as_sequence().expect("targets") {
            let (host, port) = target.as_str().and_then(|t| t.split_once(':')).expect("host:port");
            let listen = compose["services"][host]["environment"]["TOLLGATE_ADMIN__LISTEN"]
                .as_str()
                .unwrap_or_else(|| panic!("compose service {host} sets its admin listener"));
            assert!(
                listen.ends_with(&format!(":{port}")),
                "{host}: scraped on {port}, listens on {listen}"
            );
            jobs.insert(host.to_owned());
        }
    }
    assert_eq!(
        jobs,
        ["billing-sync", "gateway", "meter-consumer"].map(str::to_owned).into()
    );
    // Compose mounts what deploy/ holds.
    let volumes = |service: &str| -> Vec<String> {
        compose["services"][service]["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .filter_map(|v| v.as_str())
            .filter_map(|v| v.strip_prefix("./"))
            .map(|v| v.split(':').next().unwrap_or_default().to_owned())
            .collect()
    };
    for path in volumes("prometheus").into_iter().chain(volumes("grafana")) {
        assert!(
            repo().join(&path).exists(),
            "compose mounts {path}, which deploy/ lacks"
        );
    }
}
