//! docker-compose.yml against the services' own settings and the native stack's pins: the
//! compose file cannot drift from what the services accept (settings, variable names, ports),
//! from the topics the native stack creates, or from the versions it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_yaml::Value;
use tollgate_billing_sync::BillingSettings;
use tollgate_gateway::GatewaySettings;
use tollgate_meter_consumer::MeterSettings;
use tollgate_portal::PortalSettings;
use tollgate_runtime::settings::{from_str_with_env, Validate};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Value {
    serde_yaml::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is valid YAML")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("compose has no service `{name}`"))
}

/// Interpolates compose's `${VAR:-default}`, `${VAR:?message}` and `$$` the way compose
/// would with the operator's variables unset (required ones get a placeholder).
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(body) = rest.strip_prefix("${") {
            let end = body.find('}').expect("closed ${...}");
            let expr = &body[..end];
            if let Some((_, default)) = expr.split_once(":-") {
                out.push_str(default);
            } else {
                out.push_str("placeholder-set-by-operator");
            }
            rest = &body[end + 1..];
        } else {
            panic!("bare `$` in compose value {value:?}: write `$$`");
        }
    }
    out.push_str(rest);
    out
}

fn environment(svc: &Value) -> BTreeMap<String, String> {
    svc["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        other => panic!("environment value {other:?} is not a string"),
                    };
                    (k.as_str().expect("string key").to_owned(), interpolate(&v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Loads the settings file a compose service runs with, overlaid by its compose environment.
fn settings_of<T: DeserializeOwned + Validate>(compose: &Value, name: &str, binary: &str) -> T {
    let svc = service(compose, name);
    let command: Vec<&str> = svc["command"]
        .as_sequence()
        .expect("command is a list")
        .iter()
        .map(|v| v.as_str().expect("string"))
        .collect();
    assert_eq!(command[0], binary, "{name} runs {binary}");
    let config_at = command.iter().position(|a| *a == "--config").expect("--config given");
    // The Dockerfile copies config/ to /etc/tollgate/.
    let file = command[config_at + 1]
        .strip_prefix("/etc/tollgate/")
        .expect("config read from /etc/tollgate");
    let text = read(&format!("config/{file}"));
    from_str_with_env(&text, file, environment(svc)).unwrap_or_else(|e| panic!("compose service `{name}`: {e}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

fn host_port_of(url: &str) -> &str {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .expect("authority")
}

fn published_container_ports(svc: &Value) -> BTreeSet<u16> {
    svc["ports"]
        .as_sequence()
        .map(|ports| {
            ports
                .iter()
                .map(|p| port_of(p.as_str().expect("port mapping as string")))
                .collect()
        })
        .unwrap_or_default()
}

fn healthcheck_port(svc: &Value) -> u16 {
    let test: Vec<&str> = svc["healthcheck"]["test"]
        .as_sequence()
        .expect("healthcheck test")
        .iter()
        .map(|v| v.as_str().expect("string"))
        .collect();
    let url = test
        .iter()
        .find(|a| a.starts_with("http://"))
        .expect("healthcheck probes a URL");
    assert!(url.ends_with("/healthz"), "{url}");
    port_of(host_port_of(url))
}

fn depends_on(svc: &Value, other: &str) -> String {
    svc["depends_on"][other]["condition"]
        .as_str()
        .unwrap_or_else(|| panic!("no depends_on condition on `{other}`"))
        .to_owned()
}

/// Kafka's advertised PLAINTEXT listener, `host:port`.
fn kafka_address(compose: &Value) -> String {
    let advertised = environment(service(compose, "kafka"))["KAFKA_ADVERTISED_LISTENERS"].clone();
    advertised
        .split(',')
        .find_map(|l| l.strip_prefix("PLAINTEXT://"))
        .expect("a PLAINTEXT listener")
        .to_owned()
}

/// Topics as `name partitions config`, from the native stack's list.
fn native_topics() -> BTreeSet<String> {
    let infra = read("scripts/stack.d/infra.sh");
    let start = infra.find("KAFKA_TOPICS=(").expect("KAFKA_TOPICS in infra.sh");
    let block = &infra[start..start + infra[start..].find(')').expect("closed list")];
    block
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().strip_prefix('"')?.strip_suffix('"').map(str::to_owned))
        .collect()
}

/// Topics as `name partitions config`, from compose's one-shot kafka-init.
fn compose_topics(compose: &Value) -> BTreeSet<String> {
    let script = service(compose, "kafka-init")["command"][0].as_str().expect("script");
    script
        .lines()
        .filter(|l| l.contains("--topic"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let after = |flag: &str| words[words.iter().position(|w| *w == flag).expect(flag) + 1];
            format!("{} {} {}", after("--topic"), after("--partitions"), after("--config"))
        })
        .collect()
}

#[test]
fn every_service_accepts_its_compose_settings() {
    let compose = compose();
    let _: GatewaySettings = settings_of(&compose, "gateway", "tollgate-gateway");
    let _: MeterSettings = settings_of(&compose, "meter-consumer", "tollgate-meter-consumer");
    let _: BillingSettings = settings_of(&compose, "billing-sync", "tollgate-billing-sync");
    let portal: PortalSettings = settings_of(&compose, "portal", "tollgate-portal");
    let gateway: GatewaySettings = settings_of(&compose, "gateway", "tollgate-gateway");
    assert_eq!(
        gateway.portal.expect("the gateway mints portal links").url,
        portal.portal.url,
        "session links point at the portal"
    );
    assert_eq!(
        port_of(&portal.portal.listen),
        healthcheck_port(service(&compose, "portal"))
    );
    assert_eq!(host_port_of(&portal.gateway.admin_url), "gateway:8081");
    assert_eq!(host_port_of(&portal.clickhouse.url), "clickhouse:8123");
}

#[test]
fn secrets_use_the_variable_names_the_services_read() {
    let compose = compose();
    let read_by_services: BTreeSet<&str> = [
        tollgate_gateway::settings::ADMIN_TOKEN_ENV,
        tollgate_runtime::clickhouse::PASSWORD_ENV,
        tollgate_billing_sync::settings::STRIPE_KEY_ENV,
    ]
    .into();
    for name in ["gateway", "meter-consumer", "billing-sync", "portal"] {
        for var in environment(service(&compose, name)).keys() {
            if !var.contains("__") {
                assert!(
                    read_by_services.contains(var.as_str()),
                    "{name}: {var} is read by no service"
                );
            }
        }
    }
    let gateway = environment(service(&compose, "gateway"));
    assert!(gateway.contains_key(tollgate_gateway::settings::ADMIN_TOKEN_ENV));
    let billing = environment(service(&compose, "billing-sync"));
    assert!(billing.contains_key(tollgate_billing_sync::settings::STRIPE_KEY_ENV));
}

#[test]
fn ports_and_healthchecks_match_the_listeners() {
    let compose = compose();
    let gateway: GatewaySettings = settings_of(&compose, "gateway", "tollgate-gateway");
    let public_listen = gateway.public.listen.clone().expect("compose serves plain HTTP");
    let svc = service(&compose, "gateway");
    let published = published_container_ports(svc);
    assert!(published.contains(&port_of(&public_listen)), "public port published");
    assert!(
        published.contains(&port_of(&gateway.admin.listen)),
        "admin port published"
    );
    assert_eq!(healthcheck_port(svc), port_of(&gateway.admin.listen));
    // The admin API is for operators: published on the host's loopback only.
    let admin_mapping = svc["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .find(|p| p.ends_with(&format!(":{}", port_of(&gateway.admin.listen))))
        .unwrap();
    assert!(admin_mapping.starts_with("127.0.0.1:"), "{admin_mapping}");
    // The usage spool outlives the container: it holds events Kafka does not have yet.
    let volumes: Vec<&str> = svc["volumes"]
        .as_sequence()
        .expect("gateway volumes")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        volumes
            .iter()
            .any(|v| v.split(':').nth(1) == Some(gateway.events.spool_dir.as_str())),
        "the spool dir {} is on a volume: {volumes:?}",
        gateway.events.spool_dir
    );
    // In a container, 127.0.0.1 is unreachable from other containers and the host.
    assert!(public_listen.starts_with("0.0.0.0:"), "{public_listen}");

    let meter: MeterSettings = settings_of(&compose, "meter-consumer", "tollgate-meter-consumer");
    assert_eq!(
        healthcheck_port(service(&compose, "meter-consumer")),
        port_of(&meter.admin.listen)
    );
    let billing: BillingSettings = settings_of(&compose, "billing-sync", "tollgate-billing-sync");
    assert_eq!(
        healthcheck_port(service(&compose, "billing-sync")),
        port_of(&billing.admin.listen)
    );
}

#[test]
fn services_reach_each_other_by_compose_names() {
    let compose = compose();
    let kafka = kafka_address(&compose);
    let gateway: GatewaySettings = settings_of(&compose, "gateway", "tollgate-gateway");
    let meter: MeterSettings = settings_of(&compose, "meter-consumer", "tollgate-meter-consumer");
    let billing: BillingSettings = settings_of(&compose, "billing-sync", "tollgate-billing-sync");
    assert_eq!(gateway.kafka.brokers, kafka);
    assert_eq!(meter.kafka.brokers, kafka);

    let clickhouse_port = port_of(
        service(&compose, "clickhouse")["ports"][0]
            .as_str()
            .expect("clickhouse port"),
    );
    for url in [&meter.clickhouse.url, &billing.clickhouse.url] {
        assert_eq!(host_port_of(url), format!("clickhouse:{clickhouse_port}"));
    }
    let ch_user = environment(service(&compose, "clickhouse"))["CLICKHOUSE_USER"].clone();
    assert_eq!(meter.clickhouse.user, ch_user);
    assert_eq!(billing.clickhouse.user, ch_user);

    let stripe_port = port_of(
        service(&compose, "stripe-mock")["ports"][0]
            .as_str()
            .expect("stripe port"),
    );
    assert_eq!(
        host_port_of(&billing.stripe.api_base),
        format!("stripe-mock:{stripe_port}")
    );

    let services: BTreeSet<&str> = compose["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(!gateway.routes.is_empty());
    for route in &gateway.routes {
        let host = host_port_of(&route.upstream).split(':').next().unwrap();
        assert!(
            services.contains(host),
            "route {} goes to {host}, not a compose service",
            route.id
        );
        let upstream_svc = service(&compose, host);
        // An https:// route needs the upstream's TLS listener, an http:// one its plain one.
        let flag = if route.upstream.starts_with("https://") {
            "--tls-listen"
        } else {
            "--listen"
        };
        let args: Vec<&str> = upstream_svc["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let listen_at = args
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("route {}: the upstream's command has no {flag}", route.id));
        assert_eq!(port_of(listen_at), port_of(host_port_of(&route.upstream)));
    }
}

#[test]
fn topics_match_the_native_stack_and_the_services() {
    let compose = compose();
    let created = compose_topics(&compose);
    assert_eq!(
        created,
        native_topics(),
        "compose kafka-init and scripts/stack.d/infra.sh"
    );
    let names: BTreeSet<String> = created
        .iter()
        .map(|t| t.split(' ').next().unwrap().to_owned())
        .collect();
    let gateway: GatewaySettings = settings_of(&compose, "gateway", "tollgate-gateway");
    let meter: MeterSettings = settings_of(&compose, "meter-consumer", "tollgate-meter-consumer");
    for topic in [
        &gateway.topics.keys,
        &gateway.topics.usage,
        &meter.topics.usage,
        &meter.topics.dlq,
        &meter.topics.keys,
    ] {
        assert!(names.contains(topic), "topic {topic} is used but never created");
    }
    let keys = created
        .iter()
        .find(|t| t.starts_with(&format!("{} ", gateway.topics.keys)))
        .unwrap();
    assert!(
        keys.ends_with("cleanup.policy=compact"),
        "the keys topic must be compacted: {keys}"
    );
}

#[test]
fn startup_order_waits_for_what_each_service_needs() {
    let compose = compose();
    for name in ["gateway", "meter-consumer"] {
        assert_eq!(
            depends_on(service(&compose, name), "kafka-init"),
            "service_completed_successfully"
        );
    }
    for name in ["meter-consumer", "billing-sync"] {
        assert_eq!(depends_on(service(&compose, name), "clickhouse"), "service_healthy");
    }
    assert_eq!(depends_on(service(&compose, "kafka-init"), "kafka"), "service_healthy");
    for name in [
        "kafka",
        "clickhouse",
        "redis",
        "gateway",
        "meter-consumer",
        "billing-sync",
    ] {
        assert!(
            !service(&compose, name)["healthcheck"].is_null(),
            "{name} has a healthcheck"
        );
    }
}

#[test]
fn image_versions_match_the_native_stack_pins() {
    let compose = compose();
    let pom = read("scripts/kafka/pom.xml");
    let kafka_version = pom
        .split("<kafka.version>")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("kafka.version in the pom");
    for name in ["kafka", "kafka-init"] {
        assert_eq!(
            service(&compose, name)["image"].as_str(),
            Some(format!("apache/kafka:{kafka_version}").as_str())
        );
    }
    let install = read("scripts/stack.d/install.sh");
    let stripe_version = install
        .lines()
        .find_map(|l| l.strip_prefix("STRIPE_MOCK_VERSION="))
        .expect("STRIPE_MOCK_VERSION in install.sh");
    assert_eq!(
        service(&compose, "stripe-mock")["image"].as_str(),
        Some(format!("stripe/stripe-mock:{stripe_version}").as_str())
    );
}

#[test]
fn interpolation_follows_compose_rules() {
    assert_eq!(interpolate("${A:-http://x:1/}"), "http://x:1/");
    assert_eq!(interpolate("${A:?set A}"), "placeholder-set-by-operator");
    assert_eq!(interpolate("$$topics --x"), "$topics --x");
}

/// The native stack's ports by variable name, from `scripts/stack.d/ports.sh`, where they are
/// defined once.
fn native_ports() -> BTreeMap<String, u16> {
    read("scripts/stack.d/ports.sh")
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once('=')?;
            let port = value.trim().parse().ok()?;
            name.ends_with("_PORT").then(|| (name.to_owned(), port))
        })
        .collect()
}

/// The port of a `host:port` or `scheme://host:port/...` string.
fn port_in(address: &str) -> u16 {
    let after_scheme = address.split_once("://").map_or(address, |(_, rest)| rest);
    let host_port = after_scheme.split('/').next().unwrap_or_default();
    let port = host_port.rsplit_once(':').map(|(_, port)| port).unwrap_or_default();
    port.parse().unwrap_or_else(|_| panic!("no port in {address:?}"))
}

#[test]
fn example_configs_use_the_native_stack_ports() {
    let ports = native_ports();
    assert!(ports.len() >= 12, "ports.sh defines the stack's ports: {ports:?}");
    let config = |file: &str| -> toml::Value { toml::from_str(&read(file)).expect("example config is TOML") };
    let at = |value: &toml::Value, path: &str| -> String {
        let found = path.split('.').try_fold(value, |v, key| match key.parse::<usize>() {
            Ok(index) => v.get(index),
            Err(_) => v.get(key),
        });
        found
            .and_then(toml::Value::as_str)
            .unwrap_or_else(|| panic!("{path} missing"))
            .to_owned()
    };
    let gateway = config("config/gateway.toml");
    let meter = config("config/meter-consumer.toml");
    let billing = config("config/billing-sync.toml");
    let portal = config("config/portal.toml");
    let mut checks = vec![
        (
            "config/gateway.toml public.listen",
            at(&gateway, "public.listen"),
            "GATEWAY_PORT",
        ),
        (
            "config/gateway.toml admin.listen",
            at(&gateway, "admin.listen"),
            "GATEWAY_ADMIN_PORT",
        ),
        (
            "config/gateway.toml kafka.brokers",
            at(&gateway, "kafka.brokers"),
            "KAFKA_PORT",
        ),
        (
            "config/gateway.toml limits.redis_url",
            at(&gateway, "limits.redis_url"),
            "REDIS_PORT",
        ),
        (
            "config/meter-consumer.toml kafka.brokers",
            at(&meter, "kafka.brokers"),
            "KAFKA_PORT",
        ),
        (
            "config/meter-consumer.toml clickhouse.url",
            at(&meter, "clickhouse.url"),
            "CLICKHOUSE_HTTP_PORT",
        ),
        (
            "config/meter-consumer.toml admin.listen",
            at(&meter, "admin.listen"),
            "METER_CONSUMER_PORT",
        ),
        (
            "config/billing-sync.toml clickhouse.url",
            at(&billing, "clickhouse.url"),
            "CLICKHOUSE_HTTP_PORT",
        ),
        (
            "config/billing-sync.toml stripe.api_base",
            at(&billing, "stripe.api_base"),
            "STRIPE_MOCK_PORT",
        ),
        (
            "config/billing-sync.toml admin.listen",
            at(&billing, "admin.listen"),
            "BILLING_SYNC_PORT",
        ),
        (
            "config/billing-sync.toml provisioning.kafka.brokers",
            at(&billing, "provisioning.kafka.brokers"),
            "KAFKA_PORT",
        ),
        (
            "config/gateway.toml portal.url",
            at(&gateway, "portal.url"),
            "PORTAL_PORT",
        ),
        (
            "config/portal.toml portal.listen",
            at(&portal, "portal.listen"),
            "PORTAL_PORT",
        ),
        (
            "config/portal.toml portal.url",
            at(&portal, "portal.url"),
            "PORTAL_PORT",
        ),
        (
            "config/portal.toml gateway.admin_url",
            at(&portal, "gateway.admin_url"),
            "GATEWAY_ADMIN_PORT",
        ),
        (
            "config/portal.toml gateway.public_url",
            at(&portal, "gateway.public_url"),
            "GATEWAY_PORT",
        ),
        (
            "config/portal.toml clickhouse.url",
            at(&portal, "clickhouse.url"),
            "CLICKHOUSE_HTTP_PORT",
        ),
    ];
    let routes = gateway["routes"].as_array().expect("example routes");
    for (index, _) in routes.iter().enumerate() {
        let field = format!("routes.{index}.upstream");
        let upstream = at(&gateway, &field);
        let variable = if upstream.starts_with("https://") {
            "DEMO_UPSTREAM_TLS_PORT"
        } else {
            "DEMO_UPSTREAM_PORT"
        };
        checks.push(("config/gateway.toml routes[].upstream", upstream, variable));
    }
    for (what, address, variable) in checks {
        assert_eq!(
            port_in(&address),
            ports[variable],
            "{what} = {address:?}, but ports.sh has {variable}"
        );
    }
}

/// Names of the services in compose's cluster profile.
fn cluster_services(compose: &Value) -> BTreeSet<String> {
    compose["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, svc)| {
            svc["profiles"]
                .as_sequence()
                .is_some_and(|p| p.iter().any(|v| v.as_str() == Some("cluster")))
        })
        .map(|(name, _)| name.as_str().unwrap().to_owned())
        .collect()
}

/// The cluster stack's topics as `name partitions config...`, from scripts/stack.d/cluster.sh.
fn native_cluster_topics() -> BTreeSet<String> {
    let cluster = read("scripts/stack.d/cluster.sh");
    let start = cluster.find("KAFKA_TOPICS=(").expect("KAFKA_TOPICS in cluster.sh");
    let block = &cluster[start..start + cluster[start..].find(')').expect("closed list")];
    block
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().strip_prefix('"')?.strip_suffix('"').map(str::to_owned))
        .collect()
}

#[test]
fn the_cluster_profile_has_the_cluster_stack_topology() {
    let compose = compose();
    let profiled = cluster_services(&compose);
    let mut expected: BTreeSet<String> = [
        "zookeeper",
        "kafka-cluster-init",
        "clickhouse-1",
        "clickhouse-2",
        "redis-cluster-init",
        "gateway-1",
        "gateway-2",
        "meter-consumer-1",
        "meter-consumer-2",
    ]
    .map(str::to_owned)
    .into();
    expected.extend((1..=3).map(|i| format!("kafka-{i}")));
    expected.extend((1..=6).map(|i| format!("redis-{i}")));
    assert_eq!(profiled, expected, "the cluster profile's services");

    // Three KRaft nodes of one quorum, advertising their own names.
    let kafka_nodes: Vec<BTreeMap<String, String>> = (1..=3)
        .map(|i| environment(service(&compose, &format!("kafka-{i}"))))
        .collect();
    let voters = "1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093";
    for (i, env) in kafka_nodes.iter().enumerate() {
        assert_eq!(env["KAFKA_NODE_ID"], (i + 1).to_string());
        assert_eq!(env["KAFKA_CONTROLLER_QUORUM_VOTERS"], voters);
        assert_eq!(env["CLUSTER_ID"], kafka_nodes[0]["CLUSTER_ID"], "one cluster id");
        assert_eq!(env["KAFKA_MIN_INSYNC_REPLICAS"], "2");
        assert_eq!(env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"], "2");
    }
    let brokers: Vec<String> = kafka_nodes
        .iter()
        .map(|env| {
            env["KAFKA_ADVERTISED_LISTENERS"]
                .trim_start_matches("PLAINTEXT://")
                .to_owned()
        })
        .collect();
    let brokers = brokers.join(",");

    // Topics as the native cluster stack makes them, on all three nodes.
    let script = service(&compose, "kafka-cluster-init")["command"][0]
        .as_str()
        .expect("script");
    assert!(script.contains("--replication-factor 3"), "{script}");
    let topics: BTreeSet<String> = script
        .lines()
        .filter(|l| l.contains("--topic"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let after = |i: usize| words[i + 1];
            let mut topic = vec![];
            for (i, w) in words.iter().enumerate() {
                match *w {
                    "--topic" | "--partitions" | "--config" => topic.push(after(i)),
                    _ => {}
                }
            }
            topic.join(" ")
        })
        .collect();
    assert_eq!(
        topics,
        native_cluster_topics(),
        "compose kafka-cluster-init and cluster.sh"
    );

    // Two gateways on the Redis Cluster's six nodes, each with its own id and spool.
    let redis_nodes: BTreeSet<String> = (1..=6).map(|i| format!("redis://redis-{i}:6379")).collect();
    for i in 1..=6 {
        let command = format!("{:?}", service(&compose, &format!("redis-{i}"))["command"]);
        assert!(command.contains("--cluster-enabled"), "redis-{i}: {command}");
    }
    let mut ids = BTreeSet::new();
    let mut spools = BTreeSet::new();
    for i in 1..=2 {
        let name = format!("gateway-{i}");
        let gateway: GatewaySettings = settings_of(&compose, &name, "tollgate-gateway");
        assert_eq!(
            gateway.limits.backend,
            tollgate_gateway::limits::Backend::RedisCluster,
            "{name}"
        );
        assert_eq!(
            gateway.limits.redis_nodes().map(str::to_owned).collect::<BTreeSet<_>>(),
            redis_nodes,
            "{name}"
        );
        assert_eq!(gateway.kafka.brokers, brokers, "{name}");
        ids.insert(gateway.service.id.clone());
        let volume = service(&compose, &name)["volumes"][0].as_str().unwrap().to_owned();
        assert_eq!(
            volume.split(':').nth(1),
            Some(gateway.events.spool_dir.as_str()),
            "{name}"
        );
        spools.insert(volume.split(':').next().unwrap().to_owned());
    }
    assert_eq!(
        (ids.len(), spools.len()),
        (2, 2),
        "each gateway its own id and spool: {ids:?} {spools:?}"
    );

    // Two meter-consumers of one group, each on its own replica of the cluster `tollgate`.
    let replication = read("deploy/clickhouse/cluster.xml");
    let mut instances = BTreeSet::new();
    for i in 1..=2 {
        let name = format!("meter-consumer-{i}");
        let meter: MeterSettings = settings_of(&compose, &name, "tollgate-meter-consumer");
        assert_eq!(meter.clickhouse.cluster.as_deref(), Some("tollgate"), "{name}");
        assert_eq!(host_port_of(&meter.clickhouse.url), format!("clickhouse-{i}:8123"));
        assert_eq!(meter.kafka.brokers, brokers, "{name}");
        instances.insert(meter.topics.instance_id.clone().expect("a static member id"));
        assert_eq!(
            depends_on(service(&compose, &name), "kafka-cluster-init"),
            "service_completed_successfully"
        );
        let replica = format!("clickhouse-{i}");
        assert_eq!(environment(service(&compose, &replica))["TOLLGATE_REPLICA"], replica);
        assert!(
            replication.contains(&format!("<host>{replica}</host>")),
            "cluster.xml names {replica}"
        );
    }
    assert_eq!(instances.len(), 2, "distinct group.instance.id: {instances:?}");
    assert!(replication.contains("<host>zookeeper</host>"));
    assert!(
        replication.contains("<tollgate>"),
        "the cluster is named as the services say"
    );
}
