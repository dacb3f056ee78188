//! The tenant boundary, in-process: every path and parameter trick tried against the whole
//! chain, and a property test over arbitrary request targets with a zoo of upstream
//! normalisers. Header tricks are in `header_tests`, refunds and byte meters in
//! `refund_tests`.

use http_body_util::Full;
use hyper::body::Bytes;
use proptest::prelude::*;

use super::tests::{Harness, Reply};

/// A route whose ids may hold `/` and non-ASCII characters, and which checks bodies.
pub(super) fn with_extra_routes(text: &str) -> String {
    format!(
        "{text}\n[[routes]]\nid = \"files\"\npath = \"/files/{{tenantId}}/\"\nupstream = \"http://127.0.0.1:1\"\n\
         escaped_slashes = \"keep\"\nnon_ascii = \"allow\"\n\
         [[routes]]\nid = \"forms\"\npath = \"/forms/\"\nupstream = \"http://127.0.0.1:1\"\ncheck_body_tenant = true\n"
    )
}

pub(super) fn problem_type(reply: &Reply) -> String {
    reply.json()["type"]
        .as_str()
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn case_variants_of_a_tenant_scoped_path_get_the_tenant_check() {
    let h = Harness::new();
    for target in [
        "/V1/TENANTS/t_other/orders",
        "/v1/Tenants/t_other/orders",
        "/V1/tenants/t_other",
    ] {
        let reply = h.send("GET", target, &[], b"").await;
        assert_eq!(reply.status, 403, "{target}");
        assert_eq!(h.last_event().route, "tenant-scoped", "{target}");
    }
    let own = h.send("GET", "/V1/Tenants/t_acme/orders", &[], b"").await;
    assert_eq!(own.status, 200);
    assert_eq!(h.last_event().route, "tenant-scoped");
    assert_eq!(
        h.last_event().units["compute_units"],
        5,
        "charged the tenant route's cost"
    );
    assert!(h.seen().iter().all(|s| !s.target.contains("t_other")));
}

#[tokio::test]
async fn ambiguous_paths_are_refused_naming_the_reason_never_the_path() {
    let h = Harness::new();
    for (target, slug) in [
        ("/v1/tenants;x=1/t_other/orders", "path-parameter"),
        ("/v1/tenants/t_other;/orders", "path-parameter"),
        ("/v1/..;/tenants/t_other", "path-parameter"),
        ("/v1/tenants%5Ct_other/orders", "backslash"),
        ("/v1/tenants%5ct_other/orders", "backslash"),
        ("/v1/tenants%2Ft_other/orders", "encoded-slash"),
        ("/v1/tenants%252Ft_other/orders", "double-encoding"),
        ("/v1/x/%2e%2e/tenants/t_other", "dot-segment"),
        ("/v1/x/.../tenants/t_other", "dot-segment"),
        ("/v1/x/..%00/tenants/t_other", "control-character"),
        ("/v1/x/..%20/tenants/t_other", "dot-segment"),
        ("/v1/x/%C0%AE%C0%AE/tenants/t_other", "invalid-utf8"),
        ("/v1/x/%EF%BC%8E%EF%BC%8E/tenants/t_other", "dot-segment"),
        ("/v1/%EF%BD%94enants/t_other", "non-ascii"),
        ("/v1/%zz", "bad-escape"),
    ] {
        let reply = h.send("GET", target, &[], b"").await;
        assert_eq!(reply.status, 400, "{target}");
        assert_eq!(problem_type(&reply), slug, "{target}");
        assert!(
            !String::from_utf8_lossy(&reply.body).contains("t_other"),
            "the refusal does not echo the path: {target}"
        );
        assert!(reply.header("x-request-id").is_some());
        assert!(!h.last_event().billable);
    }
    assert!(h.seen().is_empty(), "nothing ambiguous reaches the upstream");
}

#[tokio::test]
async fn the_upstream_gets_the_canonical_path_that_was_routed_on() {
    let h = Harness::new();
    let reply = h.send("GET", "/v1//%6Frders/%7e7%3f/?q=%2F", &[], b"").await;
    assert_eq!(reply.status, 200);
    assert_eq!(h.seen()[0].target, "/v1/orders/~7%3F/?q=%2F");
}

#[tokio::test]
async fn escaped_slashes_and_non_ascii_pass_only_on_routes_that_allow_them() {
    let h = Harness::with(with_extra_routes);
    let kept = h.send("GET", "/files/t_acme/dir%2ffile%C3%A9", &[], b"").await;
    assert_eq!(kept.status, 200);
    assert_eq!(h.seen()[0].target, "/files/t_acme/dir%2Ffile%C3%A9");
    // Kept within its segment: it cannot name another tenant.
    let other = h.send("GET", "/files/t_other%2Fx/y", &[], b"").await;
    assert_eq!(other.status, 403);
    assert_eq!(h.send("GET", "/v1/dir%2Ffile", &[], b"").await.status, 400);
}

#[tokio::test]
async fn the_tenant_parameter_is_checked_in_every_spelling_and_separator() {
    let h = Harness::new();
    for query in [
        "tenant_id=t_other",
        "TENANT_ID=t_other",
        "Tenant-Id=t_other",
        "tenant.id=t_other",
        "tenant%20id=t_other",
        "tenant+id=t_other",
        "tenantId=t_other",
        "tenant_id[]=t_other",
        "tenant_id%5B0%5D=t_other",
        "a=1;tenant_id=t_other",
        "tenant_id=t_acme&tenant_id=t_other",
        "tenant_id=t_other&tenant_id=t_acme",
        "tenant%5Fid=t%5Fother",
        "tenant_id=",
    ] {
        let reply = h.send("GET", &format!("/v1/orders?{query}"), &[], b"").await;
        assert_eq!(reply.status, 403, "{query}");
    }
    for query in [
        "tenant_id=t_acme",
        "Tenant-Id=t%5Facme;tenant_id=t_acme",
        "tenant=t_other",
    ] {
        assert_eq!(
            h.send("GET", &format!("/v1/orders?{query}"), &[], b"").await.status,
            200,
            "{query}"
        );
    }
}

#[tokio::test]
async fn form_and_json_bodies_are_checked_on_routes_that_ask_for_it() {
    let h = Harness::with(with_extra_routes);
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let json = [("content-type", "application/json; charset=utf-8")];
    assert_eq!(
        h.send("POST", "/forms/x", &form, b"a=1&Tenant.Id=t_other").await.status,
        403
    );
    assert_eq!(
        h.send("POST", "/forms/x", &form, b"a=1&tenant_id=t_acme").await.status,
        200
    );
    assert_eq!(
        h.send("POST", "/forms/x", &json, br#"{"tenantId":"t_other"}"#)
            .await
            .status,
        403
    );
    assert_eq!(
        h.send("POST", "/forms/x", &json, br#"{"tenant_id":7}"#).await.status,
        403
    );
    let repeated = h
        .send(
            "POST",
            "/forms/x",
            &json,
            br#"{"tenant_id":"t_acme","tenant_id":"t_other"}"#,
        )
        .await;
    assert_eq!(repeated.status, 400);
    assert_eq!(
        h.send("POST", "/forms/x", &json, br#"{"tenantId":"t_acme","x":[1]}"#)
            .await
            .status,
        200
    );
    // Routes that do not ask are not read.
    assert_eq!(h.send("POST", "/v1/x", &form, b"tenant_id=t_other").await.status, 200);
    assert_eq!(h.seen().len(), 3);
}

// ---- The property: whatever the target, no upstream normaliser reaches another tenant. ----

/// Percent-decodes once (lossy UTF-8), as a framework would.
fn decode_once(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn decode_repeatedly(s: &str) -> String {
    let mut s = s.to_owned();
    for _ in 0..4 {
        let next = decode_once(&s);
        if next == s {
            break;
        }
        s = next;
    }
    s
}

fn backslash_to_slash(s: &str) -> String {
    s.replace('\\', "/")
}

fn strip_params(s: &str) -> String {
    s.split('/')
        .map(|seg| seg.split(';').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("/")
}

fn fold_case(s: &str) -> String {
    s.to_lowercase()
}

fn collapse_slashes(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// RFC 3986 section 5.2.4, on `/`-separated segments.
fn remove_dot_segments(s: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in s.split('/') {
        match seg {
            "." => {}
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
            }
            seg => out.push(seg),
        }
    }
    out.join("/")
}

fn nfkc(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    s.nfkc().collect()
}

/// Everything at once, in the order a lenient stack might apply it.
fn everything(s: &str) -> String {
    remove_dot_segments(&collapse_slashes(&fold_case(&strip_params(&backslash_to_slash(
        &nfkc(&decode_repeatedly(s)),
    )))))
}

type Normaliser = fn(&str) -> String;

const ZOO: [(&str, Normaliser); 9] = [
    ("as sent", |s| s.to_owned()),
    ("decoded repeatedly", decode_repeatedly),
    ("backslash as slash", |s| backslash_to_slash(&decode_once(s))),
    ("params stripped", |s| strip_params(&decode_once(s))),
    ("case folded", |s| fold_case(&decode_once(s))),
    ("dot segments removed", |s| remove_dot_segments(&decode_repeatedly(s))),
    ("NFKC", |s| nfkc(&decode_once(s))),
    ("slashes collapsed", |s| collapse_slashes(&decode_once(s))),
    ("everything", everything),
];

/// The tenant whose scope (`/v1/tenants/<tenant>/…`, any case) a path names, if any.
fn tenant_scope(path: &str) -> Option<String> {
    let path = path.split(['?', '#']).next().unwrap_or_default().to_lowercase();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["v1", "tenants", tenant, ..] => Some((*tenant).to_owned()),
        _ => None,
    }
}

const PIECES: &[&str] = &[
    "/",
    "/",
    "/",
    "v1",
    "V1",
    "tenants",
    "TeNaNtS",
    "t_acme",
    "t_other",
    "T_OTHER",
    "%2F",
    "%2f",
    "%5C",
    "\\",
    ";",
    ";x=1",
    ".",
    "..",
    "%2e",
    "%2E",
    "%252F",
    "%25",
    "%2525",
    "%00",
    "%20",
    "+",
    "%EF%BC%8E",
    "%EF%BC%8F",
    "%EF%BD%94",
    "%C0%AE",
    "%C0%AF",
    "%E2%80%A5",
    "%3B",
    "%3F",
    "?",
    "#",
    "&",
    "tenant_id=",
    "%74",
    "%41",
    "~",
    "%7E",
    "@",
    ":",
    "//",
    "x",
];

/// Spellings of the tenant route's literals and tenants, and what may surround a segment.
const V1: &[&str] = &["v1", "V1", "%76%31", "%56%31", "v%31"];
const TENANTS: &[&str] = &[
    "tenants",
    "TENANTS",
    "Tenants",
    "%74enants",
    "tenant%73",
    "%EF%BD%94enants",
];
const TENANT: &[&str] = &["t_acme", "t_other", "T_OTHER", "t%5Fother", "t_other%00", "t_other%20"];
const AROUND: &[&str] = &[
    "",
    "",
    "",
    ";",
    ";x=1",
    "%3B",
    "%3Bx",
    "%00",
    "%20",
    ".",
    "%2e",
    "%EF%BC%8E",
    "~",
    "%7E",
    "%25",
    "%2525",
];
const SEPARATORS: &[&str] = &[
    "/",
    "/",
    "/",
    "//",
    "/./",
    "/../",
    "/x/../",
    "/%2e%2e/",
    "/x/%2E%2E/",
    "%2F",
    "%2f",
    "%252F",
    "\\",
    "%5C",
    "%5c",
    "/..;/",
    "/x/..;/",
    "/.%00/",
    "/..%20/",
    "/%EF%BC%8E%EF%BC%8E/",
    "%EF%BC%8F",
    "/%C0%AE%C0%AE/",
    "%C0%AF",
];

/// Mostly `clean`, sometimes one of `tricks`: most targets then carry one or two tricks, so
/// that some get through the checks and their forwarded paths are put to the zoo.
fn mostly(clean: &'static str, tricks: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    prop_oneof![5 => Just(clean), 1 => prop::sample::select(tricks)]
}

fn segment(spellings: &'static [&'static str]) -> impl Strategy<Value = String> {
    (mostly("", AROUND), prop::sample::select(spellings), mostly("", AROUND))
        .prop_map(|(before, word, after)| format!("{before}{word}{after}"))
}

/// Targets shaped like the tenant route with tricks in every place, random pieces, and bytes.
fn targets() -> impl Strategy<Value = Vec<u8>> {
    let shaped = (
        mostly("/", SEPARATORS),
        segment(V1),
        mostly("/", SEPARATORS),
        segment(TENANTS),
        mostly("/", SEPARATORS),
        segment(TENANT),
        mostly("/", SEPARATORS),
        prop::collection::vec(mostly("x", PIECES), 0..3),
    )
        .prop_map(|(s0, v1, s1, tenants, s2, tenant, s3, rest)| {
            let lead = if s0.starts_with('/') {
                s0.to_owned()
            } else {
                format!("/{s0}")
            };
            format!("{lead}{v1}{s1}{tenants}{s2}{tenant}{s3}{}", rest.concat()).into_bytes()
        });
    prop_oneof![
        6 => shaped,
        2 => prop::collection::vec(prop::sample::select(PIECES), 1..14).prop_map(|p| p.concat().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..32).prop_map(|mut b| {
            b.insert(0, b'/');
            b
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_upstream_normaliser_moves_a_forwarded_request_into_another_tenants_scope(target in targets()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let h = Harness::new();
        let Ok(uri) = hyper::Uri::try_from(target.as_slice()) else {
            // hyper refuses this target before any gateway code runs (400).
            return Ok(());
        };
        let auth = format!("Bearer {}", h.key);
        let reply = runtime.block_on(h.send_raw(
            "GET",
            &uri.to_string(),
            &[("authorization", &auth)],
            Full::new(Bytes::new()),
        ));
        let seen = h.seen();
        if reply.status != 200 {
            prop_assert!(seen.is_empty(), "a refusal reached the upstream");
            return Ok(());
        }
        prop_assert_eq!(seen.len(), 1);
        let forwarded = &seen[0].target;
        let route = h.last_event().route;
        for (name, normalise) in ZOO {
            let scope = tenant_scope(&normalise(forwarded));
            prop_assert!(
                scope.is_none() || scope.as_deref() == Some("t_acme"),
                "{} maps the forwarded {:?} (sent as {:?}) into {:?}", name, forwarded, uri.to_string(), scope
            );
            if route == "tenant-scoped" {
                prop_assert_eq!(scope.as_deref(), Some("t_acme"), "{} on {:?}", name, forwarded);
            }
        }
    }
}
