//! Rate-limit response headers and the refusal body, from a [`Decision`]; pure functions.
//!
//! In: a decision. Out: `RateLimit-Policy` and `RateLimit` as in
//! draft-ietf-httpapi-ratelimit-headers-10 (<https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/10/>):
//! Structured Field lists (RFC 9651) with one String item per limit, e.g.
//! `RateLimit-Policy: "requests_per_minute";q=100;w=60` and
//! `RateLimit: "requests_per_minute";r=99;t=60`; the older `ratelimit-limit`,
//! `ratelimit-remaining`, `ratelimit-reset` trio for the tightest limit; and the draft's
//! `quota-exceeded` problem (section 5.1) with `Retry-After` for a refusal.
//!
//! Quota units (`qu`): the draft registers `requests` (the default, left out),
//! `content-bytes` and `concurrent-requests`; compute units have no registered unit, so they
//! carry the vendor parameter `tollgate-unit="compute-units"` instead. `concurrent` limits
//! have no window (`w`) and no reset (`t`).
//!
//! The tightest limit for the trio: among the violated limits if the request was refused,
//! otherwise among all windowed limits (`concurrent` only when it is the sole limit), the one
//! with the lowest remaining/limit ratio; ties go to the lowest remaining, then the longest
//! reset.

use std::cmp::Ordering;

use serde_json::json;

use super::{Decision, LimitState, Meter};

/// The draft's problem type for a refusal on quota.
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";
/// The draft's problem type when limits cannot be checked and the policy is fail-closed.
pub const REDUCED_CAPACITY: &str = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity";

/// An sf-string: quoted, with `\` and `"` escaped and anything outside printable ASCII dropped.
fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn unit_param(meter: Meter) -> String {
    match meter {
        Meter::Requests => String::new(),
        Meter::RequestBytes | Meter::ResponseBytes => ";qu=\"content-bytes\"".to_owned(),
        Meter::Concurrent => ";qu=\"concurrent-requests\"".to_owned(),
        Meter::ComputeUnits => ";tollgate-unit=\"compute-units\"".to_owned(),
        // The declared name, not the unit: a token, checked at load, needing no escape.
        Meter::Custom(declared) => format!(";tollgate-unit=\"{}\"", declared.name),
    }
}

/// `RateLimit-Policy`: `"name";q=<limit>[;qu=..];w=<window secs>` per limit; `None` without limits.
pub fn policy_header(decision: &Decision) -> Option<String> {
    let items: Vec<String> = decision
        .states
        .iter()
        .map(|s| {
            let window = if s.window_secs > 0 {
                format!(";w={}", s.window_secs)
            } else {
                String::new()
            };
            format!("{};q={}{}{window}", sf_string(&s.name), s.limit, unit_param(s.meter))
        })
        .collect();
    (!items.is_empty()).then(|| items.join(", "))
}

/// `RateLimit`: `"name";r=<remaining>;t=<reset secs>` per limit (no `t` for `concurrent`).
pub fn ratelimit_header(decision: &Decision) -> Option<String> {
    let items: Vec<String> = decision
        .states
        .iter()
        .map(|s| {
            let reset = if s.meter == Meter::Concurrent {
                String::new()
            } else {
                format!(";t={}", s.reset_secs)
            };
            format!("{};r={}{reset}", sf_string(&s.name), s.remaining)
        })
        .collect();
    (!items.is_empty()).then(|| items.join(", "))
}

/// Orders by tightness: lower remaining/limit first, then lower remaining, then longer reset.
fn tighter(a: &LimitState, b: &LimitState) -> Ordering {
    let ratio_a = u128::from(a.remaining) * u128::from(b.limit.max(1));
    let ratio_b = u128::from(b.remaining) * u128::from(a.limit.max(1));
    ratio_a
        .cmp(&ratio_b)
        .then(a.remaining.cmp(&b.remaining))
        .then(b.reset_secs.cmp(&a.reset_secs))
}

/// The limit the legacy trio describes (see the module header).
pub fn tightest(decision: &Decision) -> Option<&LimitState> {
    let violated: Vec<&LimitState> = decision
        .states
        .iter()
        .filter(|s| decision.violated.contains(&s.name))
        .collect();
    let windowed: Vec<&LimitState> = decision
        .states
        .iter()
        .filter(|s| s.meter != Meter::Concurrent)
        .collect();
    let pool = if !violated.is_empty() {
        violated
    } else if !windowed.is_empty() {
        windowed
    } else {
        decision.states.iter().collect()
    };
    pool.into_iter().min_by(|a, b| tighter(a, b))
}

/// `ratelimit-limit`, `ratelimit-remaining`, `ratelimit-reset` for the tightest limit.
pub fn legacy_headers(decision: &Decision) -> Vec<(&'static str, String)> {
    tightest(decision).map_or_else(Vec::new, |s| {
        vec![
            ("ratelimit-limit", s.limit.to_string()),
            ("ratelimit-remaining", s.remaining.to_string()),
            ("ratelimit-reset", s.reset_secs.to_string()),
        ]
    })
}

/// Every rate-limit header for a response: the two draft fields, the trio and, on a refusal,
/// `Retry-After`. Nothing (but `Retry-After` when refused) for a degraded decision.
pub fn response_headers(decision: &Decision) -> Vec<(&'static str, String)> {
    let mut headers = Vec::with_capacity(6);
    if let Some(policy) = policy_header(decision) {
        headers.push(("ratelimit-policy", policy));
    }
    if let Some(limit) = ratelimit_header(decision) {
        headers.push(("ratelimit", limit));
    }
    headers.extend(legacy_headers(decision));
    if !decision.allowed {
        headers.push(("retry-after", decision.retry_after_secs.max(1).to_string()));
    }
    headers
}

/// The problem+json body of a refusal: the draft's `quota-exceeded` type, status 429, the
/// violated limits by name in `detail` and `violated-policies`. A degraded fail-closed
/// refusal is `temporary-reduced-capacity` with status 503 instead: use the body's `status`.
pub fn refusal_problem_json(decision: &Decision) -> serde_json::Value {
    if decision.degraded {
        return json!({
            "type": REDUCED_CAPACITY,
            "title": "Rate limits cannot be checked right now",
            "status": 503,
            "detail": format!("try again in {} s", decision.retry_after_secs.max(1)),
            "violated-policies": decision.violated,
        });
    }
    let described: Vec<String> = decision
        .states
        .iter()
        .filter(|s| decision.violated.contains(&s.name))
        .map(|s| match s.meter {
            Meter::Concurrent => format!("{} ({} {} at once)", s.name, s.limit, unit_words(s.meter)),
            _ => format!(
                "{} ({} {} per {} s)",
                s.name,
                s.limit,
                unit_words(s.meter),
                s.window_secs
            ),
        })
        .collect();
    let what = if described.is_empty() {
        decision.violated.join(", ")
    } else {
        described.join(", ")
    };
    json!({
        "type": QUOTA_EXCEEDED,
        "title": "Quota exceeded",
        "status": 429,
        "detail": format!(
            "limit exceeded: {what}; retry in {} s",
            decision.retry_after_secs.max(1)
        ),
        "violated-policies": decision.violated,
    })
}

fn unit_words(meter: Meter) -> &'static str {
    match meter {
        Meter::Requests => "requests",
        Meter::ComputeUnits => "compute units",
        Meter::RequestBytes => "request bytes",
        Meter::ResponseBytes => "response bytes",
        Meter::Concurrent => "requests",
        Meter::Custom(declared) => &declared.unit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str, meter: Meter, limit: u64, remaining: u64, reset: u64, window: u64) -> LimitState {
        LimitState {
            name: name.into(),
            limit,
            remaining,
            reset_secs: reset,
            window_secs: window,
            meter,
        }
    }

    fn seed_free() -> Decision {
        Decision {
            allowed: true,
            states: vec![
                state("requests_per_minute", Meter::Requests, 100, 99, 60, 60),
                state(
                    "compute_units_per_day",
                    Meter::ComputeUnits,
                    10_000,
                    9_995,
                    3_600,
                    86_400,
                ),
            ],
            ..Decision::default()
        }
    }

    #[test]
    fn draft_fields_list_every_limit() {
        let d = seed_free();
        assert_eq!(
            policy_header(&d).unwrap(),
            "\"requests_per_minute\";q=100;w=60, \"compute_units_per_day\";q=10000;tollgate-unit=\"compute-units\";w=86400"
        );
        assert_eq!(
            ratelimit_header(&d).unwrap(),
            "\"requests_per_minute\";r=99;t=60, \"compute_units_per_day\";r=9995;t=3600"
        );
        let inflight = Decision {
            states: vec![state("inflight", Meter::Concurrent, 5, 4, 0, 0)],
            ..d
        };
        assert_eq!(
            policy_header(&inflight).unwrap(),
            "\"inflight\";q=5;qu=\"concurrent-requests\""
        );
        assert_eq!(ratelimit_header(&inflight).unwrap(), "\"inflight\";r=4");
        assert_eq!(policy_header(&Decision::default()), None);
    }

    #[test]
    fn a_declared_meter_is_named_in_the_policy_and_its_unit_in_the_refusal() {
        let tokens = crate::limits::Meters::declare([("tokens", "AI tokens")])
            .get("tokens")
            .unwrap();
        let d = Decision {
            allowed: false,
            states: vec![state("tokens_per_day", tokens, 5_000, 0, 600, 86_400)],
            violated: vec!["tokens_per_day".into()],
            retry_after_secs: 600,
            ..Decision::default()
        };
        assert_eq!(
            policy_header(&d).unwrap(),
            "\"tokens_per_day\";q=5000;tollgate-unit=\"tokens\";w=86400"
        );
        let detail = refusal_problem_json(&d)["detail"].as_str().unwrap().to_owned();
        assert!(
            detail.contains("tokens_per_day (5000 AI tokens per 86400 s)"),
            "{detail}"
        );
    }

    #[test]
    fn names_are_valid_sf_strings() {
        assert_eq!(sf_string("a\"b\\c\u{e9}"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn legacy_trio_describes_the_tightest_limit() {
        let headers = legacy_headers(&seed_free());
        assert_eq!(
            headers,
            [
                ("ratelimit-limit", "100".into()),
                ("ratelimit-remaining", "99".into()),
                ("ratelimit-reset", "60".into())
            ]
        );
        // A concurrent limit nearer its end does not take the trio from a windowed one.
        let mut d = seed_free();
        d.states.push(state("inflight", Meter::Concurrent, 2, 1, 0, 0));
        assert_eq!(legacy_headers(&d)[0].1, "100");
        // The compute quota becomes the tightest once mostly used.
        d.states[1].remaining = 10;
        assert_eq!(legacy_headers(&d)[0].1, "10000");
    }

    #[test]
    fn a_refusal_is_a_quota_exceeded_problem_naming_the_limit() {
        let mut d = seed_free();
        d.allowed = false;
        d.states[0].remaining = 0;
        d.violated = vec!["requests_per_minute".into()];
        d.retry_after_secs = 12;
        let body = refusal_problem_json(&d);
        assert_eq!(body["type"], QUOTA_EXCEEDED);
        assert_eq!(body["status"], 429);
        assert_eq!(body["violated-policies"], json!(["requests_per_minute"]));
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("requests_per_minute (100 requests per 60 s)") && detail.contains("12 s"),
            "{detail}"
        );
        let headers = response_headers(&d);
        assert!(headers.contains(&("retry-after", "12".into())));
        assert!(headers.contains(&("ratelimit-remaining", "0".into())));
    }

    #[test]
    fn a_degraded_closed_refusal_is_reduced_capacity() {
        let d = Decision {
            allowed: false,
            degraded: true,
            retry_after_secs: 1,
            ..Decision::default()
        };
        let body = refusal_problem_json(&d);
        assert_eq!(body["status"], 503);
        assert_eq!(body["type"], REDUCED_CAPACITY);
        assert_eq!(response_headers(&d), [("retry-after", "1".to_owned())]);
    }
}
