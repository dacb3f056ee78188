use proptest::strategy::Strategy;
use serde::Deserialize;

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sample {
    kafka: KafkaPart,
    public: PublicPart,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KafkaPart {
    brokers: String,
    #[serde(default = "default_timeout")]
    connect_timeout_ms: u64,
    #[serde(default)]
    topics: Vec<String>,
}

fn default_timeout() -> u64 {
    5000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicPart {
    listen: String,
    token_hint: Option<String>,
}

impl Validate for Sample {
    fn validate(&self) -> Result<(), Invalid> {
        socket_addr("public.listen", &self.public.listen)?;
        in_range("kafka.connect_timeout_ms", self.kafka.connect_timeout_ms, 100, 60_000)?;
        Ok(())
    }
}

const FILE: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"

[public]
listen = "127.0.0.1:8080"
"#;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn load_with(file: &str, pairs: &[(&str, &str)]) -> Result<Sample, SettingsError> {
    from_str_with_env(file, "gateway.toml", env(pairs))
}

#[test]
fn file_alone_loads_with_defaults() {
    let s = load_with(FILE, &[]).unwrap();
    assert_eq!(s.kafka.brokers, "127.0.0.1:9092");
    assert_eq!(s.kafka.connect_timeout_ms, 5000);
    assert_eq!(s.public.listen, "127.0.0.1:8080");
}

#[test]
fn overlays_set_strings_numbers_and_arrays() {
    let s = load_with(
        FILE,
        &[
            ("TOLLGATE_KAFKA__BROKERS", "kafka:9092"),
            ("TOLLGATE_KAFKA__CONNECT_TIMEOUT_MS", "250"),
            ("TOLLGATE_KAFKA__TOPICS", r#"["a.b", "c"]"#),
            ("TOLLGATE_PUBLIC__LISTEN", "0.0.0.0:80"),
        ],
    )
    .unwrap();
    assert_eq!(s.kafka.brokers, "kafka:9092");
    assert_eq!(s.kafka.connect_timeout_ms, 250);
    assert_eq!(s.kafka.topics, vec!["a.b", "c"]);
    assert_eq!(s.public.listen, "0.0.0.0:80");
}

#[test]
fn numeric_looking_value_for_a_string_setting_stays_a_string() {
    let s = load_with(FILE, &[("TOLLGATE_PUBLIC__TOKEN_HINT", "12345")]).unwrap();
    assert_eq!(s.public.token_hint.as_deref(), Some("12345"));
}

#[test]
fn variables_without_separator_are_not_overlays() {
    let s = load_with(FILE, &[("TOLLGATE_ADMIN_TOKEN", "secret"), ("PATH", "/bin")]).unwrap();
    assert_eq!(s.kafka.brokers, "127.0.0.1:9092");
}

#[test]
fn unknown_field_in_file_names_file_and_field() {
    let file = format!("{FILE}\n[extra]\nx = 1\n");
    let err = load_with(&file, &[]).unwrap_err().to_string();
    assert!(err.starts_with("gateway.toml: "), "{err}");
    assert!(err.contains("unknown field `extra`"), "{err}");
}

#[test]
fn typo_in_file_names_the_field() {
    let file = FILE.replace("brokers", "brokrs");
    let err = load_with(&file, &[]).unwrap_err().to_string();
    assert!(err.contains("unknown field `brokrs`"), "{err}");
    assert!(err.contains("kafka"), "{err}");
}

#[test]
fn typo_in_overlay_names_the_variable() {
    let err = load_with(FILE, &[("TOLLGATE_KAFKA__BROKRS", "x:1")])
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("TOLLGATE_KAFKA__BROKRS: "), "{err}");
    assert!(err.contains("unknown field `brokrs`"), "{err}");
}

#[test]
fn overlay_for_a_section_the_service_lacks_is_an_error() {
    let err = load_with(FILE, &[("TOLLGATE_STRIPE__API_BASE", "http://x")])
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("TOLLGATE_STRIPE__API_BASE: "), "{err}");
    assert!(err.contains("unknown field `stripe`"), "{err}");
}

#[test]
fn bad_type_in_overlay_names_the_variable() {
    let err = load_with(FILE, &[("TOLLGATE_KAFKA__CONNECT_TIMEOUT_MS", "soon")])
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("TOLLGATE_KAFKA__CONNECT_TIMEOUT_MS: "), "{err}");
    assert!(err.contains("kafka.connect_timeout_ms"), "{err}");
}

#[test]
fn overlay_into_a_scalar_is_refused() {
    let err = load_with(FILE, &[("TOLLGATE_KAFKA__BROKERS__HOST", "x")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`kafka.brokers` is not a table"), "{err}");
}

#[test]
fn validation_error_names_field_value_and_allowed() {
    let err = load_with(FILE, &[("TOLLGATE_PUBLIC__LISTEN", "localhost")])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "TOLLGATE_PUBLIC__LISTEN: setting `public.listen`: found \"localhost\", expected an address like 127.0.0.1:8080"
    );
    let file = FILE.replace("[kafka]", "[kafka]\nconnect_timeout_ms = 5");
    let err = load_with(&file, &[]).unwrap_err().to_string();
    assert_eq!(
        err,
        "gateway.toml: setting `kafka.connect_timeout_ms`: found \"5\", expected a number from 100 to 60000"
    );
}

#[test]
fn syntax_error_names_the_file() {
    let err = load_with("[kafka\nbrokers=", &[]).unwrap_err().to_string();
    assert!(err.starts_with("gateway.toml: not valid TOML"), "{err}");
}

#[test]
fn missing_file_names_the_path() {
    let err = load::<Sample>(Path::new("/nonexistent/tollgate.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("/nonexistent/tollgate.toml: cannot read"), "{err}");
}

#[test]
fn http_url_accepts_only_absolute_http() {
    assert!(http_url("u", "http://127.0.0.1:8090").is_ok());
    assert!(http_url("u", "https://api.example.com/base").is_ok());
    for bad in ["ftp://x", "/relative", "127.0.0.1:8090", ""] {
        assert!(http_url("u", bad).is_err(), "{bad}");
    }
}

proptest::proptest! {
    // Whatever an operator puts in a string setting's overlay, it is the value loaded: as is,
    // or, when it is written as a TOML string (`"host:9092"`, `'a b'`), that string.
    #[test]
    fn a_string_overlay_is_taken_verbatim_or_as_a_toml_string(raw in proptest::prop_oneof![
        "\\PC*",
        "\\PC*".prop_map(|s| format!("{s:?}")),
        "[^'\n]*".prop_map(|s| format!("'{s}'")),
    ]) {
        let loaded = load_with(FILE, &[("TOLLGATE_KAFKA__BROKERS", raw.as_str())]).expect("any text is a string");
        let as_toml = format!("v = {raw}").parse::<toml::Table>().ok().and_then(|t| t.get("v").cloned());
        match as_toml {
            Some(toml::Value::String(text)) => proptest::prop_assert_eq!(loaded.kafka.brokers, text),
            _ => proptest::prop_assert_eq!(loaded.kafka.brokers, raw),
        }
    }

    // A number setting's overlay loads exactly when it is a number in range; otherwise the
    // refusal names the variable (not a number) or the setting (out of range).
    #[test]
    fn a_number_overlay_loads_in_range_or_is_refused_by_name(raw in proptest::prop_oneof![
        (0u64..200_000).prop_map(|n| n.to_string()),
        "[0-9a-z .+-]{0,12}",
    ]) {
        let var = "TOLLGATE_KAFKA__CONNECT_TIMEOUT_MS";
        match (load_with(FILE, &[(var, raw.as_str())]), raw.trim().parse::<u64>()) {
            (Ok(loaded), Ok(n)) => {
                proptest::prop_assert!((100..=60_000).contains(&n), "{n} loaded but is out of range");
                proptest::prop_assert_eq!(loaded.kafka.connect_timeout_ms, n);
            }
            (Ok(loaded), Err(_)) => proptest::prop_assert!(false, "{raw:?} loaded as {}", loaded.kafka.connect_timeout_ms),
            (Err(err), Ok(n)) => {
                let err = err.to_string();
                proptest::prop_assert!(!(100..=60_000).contains(&n), "{n} is in range but refused: {err}");
                proptest::prop_assert!(err.contains("kafka.connect_timeout_ms"), "{err}");
            }
            (Err(err), Err(_)) => {
                let err = err.to_string();
                proptest::prop_assert!(err.starts_with(var), "{err}");
            }
        }
    }

    // An overlay for a field the service does not have is refused, naming the variable.
    #[test]
    fn an_overlay_for_an_unknown_field_is_refused_by_name(name in "[A-Z]{1,6}(_[A-Z]{1,6}){0,2}") {
        proptest::prop_assume!(!["BROKERS", "CONNECT_TIMEOUT_MS", "TOPICS"].contains(&name.as_str()));
        let var = format!("TOLLGATE_KAFKA__{name}");
        let err = load_with(FILE, &[(var.as_str(), "x")]).expect_err("no such field").to_string();
        proptest::prop_assert!(err.starts_with(&var), "{err}");
        proptest::prop_assert!(err.contains("unknown field"), "{err}");
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WithRoutes {
    routes: Vec<Route>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Route {
    path: String,
    upstream: String,
}

impl Validate for WithRoutes {
    fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

const ROUTES: &str = r#"
[[routes]]
path = "/v1/"
upstream = "http://127.0.0.1:8090"

[[routes]]
path = "/v2/"
upstream = "http://127.0.0.1:8091"
"#;

#[test]
fn overlay_enters_a_list_of_tables_by_index() {
    let s: WithRoutes = from_str_with_env(
        ROUTES,
        "g.toml",
        env(&[("TOLLGATE_ROUTES__1__UPSTREAM", "http://upstream:80")]),
    )
    .unwrap();
    assert_eq!(s.routes[0].upstream, "http://127.0.0.1:8090");
    assert_eq!(s.routes[1].upstream, "http://upstream:80");
    assert_eq!(s.routes[1].path, "/v2/");
}

#[test]
fn overlay_with_index_out_of_range_or_missing_is_refused() {
    for var in [
        "TOLLGATE_ROUTES__2__UPSTREAM",
        "TOLLGATE_ROUTES__UPSTREAM",
        "TOLLGATE_ROUTES__X__UPSTREAM",
    ] {
        let err = from_str_with_env::<WithRoutes>(ROUTES, "g.toml", env(&[(var, "http://x")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(var), "{err}");
        assert!(err.contains("`routes` is a list of 2 entries"), "{err}");
    }
}

fn log_of(file: &str, pairs: &[(&str, &str)]) -> Result<LogSettings, String> {
    from_str_with_env_and_log::<Sample>(file, "gateway.toml", env(pairs))
        .map(|loaded| loaded.log)
        .map_err(|e| e.to_string())
}

#[test]
fn log_section_is_every_services_and_defaults_to_text() {
    use crate::logging::LogFormat;
    assert_eq!(log_of(FILE, &[]).unwrap().format, LogFormat::Text);
    let json = format!("{FILE}\n[log]\nformat = \"json\"\n");
    assert_eq!(log_of(&json, &[]).unwrap().format, LogFormat::Json);
    assert_eq!(
        log_of(FILE, &[("TOLLGATE_LOG__FORMAT", "json")]).unwrap().format,
        LogFormat::Json
    );
    // The service's own struct never sees the section.
    assert!(from_str_with_env::<Sample>(&json, "gateway.toml", env(&[])).is_ok());
}

#[test]
fn log_typos_and_bad_formats_are_refused_with_their_origin() {
    let xml = format!("{FILE}\n[log]\nformat = \"xml\"\n");
    assert_eq!(
        log_of(&xml, &[]).unwrap_err(),
        "gateway.toml: setting `log.format`: unknown variant `xml`, expected `text` or `json`"
    );
    let typo = format!("{FILE}\n[log]\nfromat = \"json\"\n");
    assert_eq!(
        log_of(&typo, &[]).unwrap_err(),
        "gateway.toml: setting `log.fromat`: unknown field `fromat`, expected `format`"
    );
    let err = log_of(FILE, &[("TOLLGATE_LOG__FORMAT", "yaml")]).unwrap_err();
    assert!(
        err.starts_with("TOLLGATE_LOG__FORMAT: setting `log.format`: unknown variant `yaml`"),
        "{err}"
    );
}
