//! The portal's HTML: home, keys, usage, limits and API docs, rendered on the server.
//!
//! In: the session (a page without one says so and how to get in), the admin API's key list
//! and limit status, ClickHouse usage, the operator's OpenAPI document. Out: pages whose every
//! dynamic piece is escaped ([`escape`]); the little script (`/assets/portal.js`) sends the
//! key actions to the JSON API with the session's CSRF token from the page's `<meta>`.

use axum::extract::State as AxumState;
use axum::http::{header, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde_json::Value;

use crate::admin_client::AdminClient;
use crate::api::Authed;
use crate::chart::{bars, escape};
use crate::problem::Problem;
use crate::usage::{self, Granularity, Range, UsageQuery};
use crate::State;

const STYLE: &str = include_str!("portal.css");
const SCRIPT: &str = include_str!("portal.js");

/// A whole page around `body`, with the navigation and the session's CSRF token.
fn layout(title: &str, session: Option<&crate::sessions::Session>, active: &str, body: &str) -> String {
    let nav = match session {
        Some(s) => {
            let link = |href: &str, name: &str| {
                let class = if href == active { " class=\"active\"" } else { "" };
                format!("<a href=\"{href}\"{class}>{name}</a>")
            };
            format!(
                "<nav>{}{}{}{}{}<span class=\"who\">{} · tenant <code>{}</code></span></nav>",
                link("/", "Overview"),
                link("/keys", "API keys"),
                link("/usage", "Usage"),
                link("/limits", "Limits"),
                link("/docs", "API docs"),
                escape(&s.consumer),
                escape(&s.tenant_id)
            )
        }
        None => String::new(),
    };
    let csrf = session
        .map(|s| format!("<meta name=\"csrf-token\" content=\"{}\">", escape(&s.csrf_token)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">{csrf}<title>{t} · Tollgate portal</title><style>{STYLE}</style></head><body><header><strong>Tollgate</strong> developer portal</header>{nav}<main><h1>{t}</h1>{body}</main><script src=\"/assets/portal.js\"></script></body></html>",
        t = escape(title)
    )
}

/// The page for a link that cannot be used (expired, used, unknown).
pub fn link_refused(why: &str) -> String {
    layout(
        "Session link not usable",
        None,
        "",
        &format!("<p class=\"notice\">{}</p>", escape(why)),
    )
}

/// What a page answers without a live session.
fn signed_out() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Html(layout(
            "Your session has ended",
            None,
            "",
            "<p class=\"notice\">Portal sessions last a limited time. Open the portal again from your application to get a new session link.</p>",
        )),
    )
        .into_response()
}

fn page(authed: &Authed, title: &str, active: &str, body: &str) -> Response {
    Html(layout(title, Some(&authed.session), active, body)).into_response()
}

/// `GET /`.
pub async fn home(authed: Result<Authed, Problem>) -> Response {
    let Ok(authed) = authed else { return signed_out() };
    let s = &authed.session;
    let body = format!(
        "<p>Signed in as <strong>{}</strong> (tenant <code>{}</code>) until {}.</p>\
         <ul class=\"cards\"><li><a href=\"/keys\">API keys</a>: create, roll and revoke your keys.</li>\
         <li><a href=\"/usage\">Usage</a>: the last 48 hours and 30 days, this period's totals, CSV.</li>\
         <li><a href=\"/limits\">Limits</a>: every limit of your plan, live.</li>\
         <li><a href=\"/docs\">API docs</a>: the API reference with code samples.</li></ul>",
        escape(&s.consumer),
        escape(&s.tenant_id),
        escape(&crate::api::time_text(s.expires_at_ms))
    );
    page(&authed, "Overview", "/", &body)
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".to_owned(),
        Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

/// The consumer's keys from the admin API, or the page's error text.
async fn key_list(state: &State, consumer: &str) -> Result<Vec<Value>, String> {
    let path = AdminClient::consumer_path(consumer, "/keys");
    match state.admin.call(Method::GET, &path, None, None).await {
        Ok(reply) if reply.status.is_success() => Ok(reply.body["data"].as_array().cloned().unwrap_or_default()),
        Ok(reply) => Err(format!("the key list is unavailable ({})", reply.status)),
        Err(e) => {
            tracing::error!(error = %e, "key list failed");
            Err("the key list is unavailable right now".to_owned())
        }
    }
}

/// `GET /keys`.
pub async fn keys(AxumState(state): AxumState<State>, authed: Result<Authed, Problem>) -> Response {
    let Ok(authed) = authed else { return signed_out() };
    let keys = key_list(&state, &authed.session.consumer).await;
    let mut body = String::from(
        "<section class=\"panel\"><h2>Create a key</h2><form id=\"create-key\"><label>Description <input name=\"description\" maxlength=\"200\" placeholder=\"e.g. production server\"></label> <button type=\"submit\">Create key</button></form>\
         <div id=\"secret\" class=\"secret\" hidden><p class=\"warning\">Copy this key now: it is shown once and cannot be shown again.</p><code id=\"secret-value\"></code> <button type=\"button\" id=\"copy\">Copy</button></div></section>",
    );
    match keys {
        Err(e) => body.push_str(&format!("<p class=\"notice\">{}</p>", escape(&e))),
        Ok(keys) => {
            body.push_str(
                "<table id=\"keys\"><thead><tr><th>Key id</th><th>Prefix</th><th>Description</th><th>Created</th><th>Expires</th><th>Status</th><th></th></tr></thead><tbody>",
            );
            for k in &keys {
                let id = k["id"].as_str().unwrap_or_default();
                let revoked = !k["revokedOn"].is_null();
                let status = if revoked { "revoked" } else { "active" };
                let actions = if revoked {
                    String::new()
                } else {
                    format!(
                        "<label class=\"grace\">grace <select data-grace=\"{id}\"><option value=\"0\">none</option><option value=\"3600\" selected>1 hour</option><option value=\"86400\">1 day</option><option value=\"{max}\">{maxh} hours (max)</option></select></label> <button data-roll=\"{id}\">Roll</button> <button class=\"danger\" data-revoke=\"{id}\">Revoke</button>",
                        id = escape(id),
                        max = state.settings.portal.max_roll_grace_secs,
                        maxh = state.settings.portal.max_roll_grace_secs / 3600,
                    )
                };
                body.push_str(&format!(
                    "<tr data-key=\"{}\"><td><code>{}</code></td><td><code>{}…</code></td><td>{}</td><td>{}</td><td>{}</td><td class=\"{status}\">{status}</td><td>{actions}</td></tr>",
                    escape(id),
                    escape(id),
                    text(&k["prefix"]),
                    text(&k["description"]),
                    text(&k["createdOn"]),
                    text(&k["expiresOn"]),
                ));
            }
            if keys.is_empty() {
                body.push_str("<tr><td colspan=\"7\">No keys yet.</td></tr>");
            }
            body.push_str("</tbody></table>");
        }
    }
    page(&authed, "API keys", "/keys", &body)
}

/// Axis labels: `HH:00` for hours, `MM-DD` for days.
fn label(start: &str, granularity: Granularity) -> String {
    match granularity {
        Granularity::Hour => start.get(11..16).unwrap_or(start).to_owned(),
        Granularity::Day => start.get(5..10).unwrap_or(start).to_owned(),
    }
}

/// `GET /usage`.
pub async fn usage(AxumState(state): AxumState<State>, authed: Result<Authed, Problem>) -> Response {
    let Ok(authed) = authed else { return signed_out() };
    let now = crate::now_ms() / 1000;
    let tenant = &authed.session.tenant_id;
    let mut body = String::new();
    for (granularity, title, every) in [
        (Granularity::Hour, "Last 48 hours, by hour (UTC)", 6),
        (Granularity::Day, "Last 30 days, by day (UTC)", 5),
    ] {
        let query = UsageQuery {
            granularity: Some(granularity),
            from: None,
            to: None,
        };
        let range = Range::of(&query, now).expect("the default range is valid");
        match usage::read(&state.clickhouse, tenant, range, now).await {
            Err(e) => {
                tracing::error!(error = %e, "usage read failed");
                body.push_str("<p class=\"notice\">Usage is unavailable right now; retry later.</p>");
                break;
            }
            Ok(u) => {
                if granularity == Granularity::Hour {
                    body.push_str(&period_table(&u));
                }
                let name = match granularity {
                    Granularity::Hour => "hour",
                    Granularity::Day => "day",
                };
                body.push_str(&format!(
                    "<h2>{}</h2><p><a href=\"/api/usage.csv?granularity={name}\" download>Download CSV</a></p>",
                    escape(title)
                ));
                if u.meters.is_empty() {
                    body.push_str("<p>No usage recorded in this range yet.</p>");
                }
                for series in &u.meters {
                    let points: Vec<(String, i64)> = series
                        .points
                        .iter()
                        .map(|p| (label(&p.start, granularity), p.units))
                        .collect();
                    body.push_str(&format!(
                        "<figure data-meter=\"{m}\" data-granularity=\"{name}\">{}</figure>",
                        bars(&format!("{} per {name}", series.meter), &points, every),
                        m = escape(&series.meter)
                    ));
                }
            }
        }
    }
    page(&authed, "Usage", "/usage", &body)
}

fn period_table(u: &usage::Usage) -> String {
    let mut out = format!(
        "<h2>This billing period</h2><p>{} to {} (UTC calendar month), so far.</p><table id=\"period\"><thead><tr><th>Meter</th><th>Requests counted</th><th>Units</th><th>Billable units</th></tr></thead><tbody>",
        escape(&u.period.start[..10]),
        escape(&u.period.end[..10])
    );
    for t in &u.period.meters {
        out.push_str(&format!(
            "<tr data-meter=\"{m}\"><td>{m}</td><td>{}</td><td>{}</td><td class=\"billable\">{}</td></tr>",
            t.events,
            t.units,
            t.billable_units,
            m = escape(&t.meter)
        ));
    }
    if u.period.meters.is_empty() {
        out.push_str("<tr><td colspan=\"4\">Nothing yet this period.</td></tr>");
    }
    out.push_str("</tbody></table>");
    out
}

fn duration(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

/// `GET /limits`.
pub async fn limits(AxumState(state): AxumState<State>, authed: Result<Authed, Problem>) -> Response {
    let Ok(authed) = authed else { return signed_out() };
    let path = AdminClient::consumer_path(&authed.session.consumer, "/limits");
    let status = match state.admin.call(Method::GET, &path, None, None).await {
        Ok(reply) if reply.status.is_success() => reply.body,
        _ => {
            return page(
                &authed,
                "Limits",
                "/limits",
                "<p class=\"notice\">Limits are unavailable right now; retry later.</p>",
            )
        }
    };
    let mut body = format!(
        "<p>Plan <strong>{}</strong>. Read live from the gateway ({}) at {}, without using any of your allowance.</p>",
        text(&status["plan"]),
        text(&status["scope"]),
        text(&status["at"])
    );
    if status["degraded"].as_bool() == Some(true) {
        body.push_str("<p class=\"notice\">The limit store did not answer: figures are missing.</p>");
    }
    body.push_str("<table id=\"limits\"><thead><tr><th>Limit</th><th>Counts</th><th>Window</th><th>For</th><th>Used</th><th>Remaining</th><th>Resets in</th><th></th></tr></thead><tbody>");
    for l in status["limits"].as_array().into_iter().flatten() {
        let limit = l["limit"].as_u64().unwrap_or(0);
        let used = l["used"].as_u64();
        let subject = match l["subject"]["by"].as_str() {
            Some("key") => format!("key <code>{}</code>", text(&l["subject"]["keyId"])),
            Some("ip") => "each client address".to_owned(),
            _ => "your tenant".to_owned(),
        };
        let gauge = used
            .map(|u| {
                let pct = u.saturating_mul(100).checked_div(limit).map_or(100, |p| p.min(100));
                format!("<span class=\"gauge\"><span style=\"width:{pct}%\"></span></span> {pct} %")
            })
            .unwrap_or_default();
        body.push_str(&format!(
            "<tr data-limit=\"{name}\"><td>{name}</td><td>{}</td><td>{}</td><td>{subject}</td><td class=\"used\">{}</td><td class=\"remaining\">{}</td><td>{}</td><td>{gauge}</td></tr>",
            text(&l["meter"]),
            text(&l["window"]),
            used.map_or("—".to_owned(), |u| format!("{u} of {limit}")),
            text(&l["remaining"]),
            l["resetSeconds"].as_u64().map_or("—".to_owned(), duration),
            name = text(&l["name"]),
        ));
    }
    body.push_str("</tbody></table>");
    page(&authed, "Limits", "/limits", &body)
}

/// The language samples for one operation.
fn samples(method: &str, url: &str, key: &str) -> Vec<(&'static str, String)> {
    let upper = method.to_ascii_uppercase();
    vec![
        ("curl", format!("curl -X {upper} '{url}' \\\n  -H 'Authorization: Bearer {key}'")),
        (
            "Python",
            format!("import requests\n\nr = requests.request(\"{upper}\", \"{url}\",\n    headers={{\"Authorization\": \"Bearer {key}\"}})\nprint(r.status_code, r.json())"),
        ),
        (
            "JavaScript",
            format!("const r = await fetch(\"{url}\", {{\n  method: \"{upper}\",\n  headers: {{ Authorization: \"Bearer {key}\" }},\n}});\nconsole.log(r.status, await r.json());"),
        ),
        (
            "Go",
            format!("req, _ := http.NewRequest(\"{upper}\", \"{url}\", nil)\nreq.Header.Set(\"Authorization\", \"Bearer {key}\")\nres, err := http.DefaultClient.Do(req)"),
        ),
    ]
}

/// `GET /docs`: the operator's API reference, with samples using the tenant's key prefix.
pub async fn docs(AxumState(state): AxumState<State>, authed: Result<Authed, Problem>) -> Response {
    let Ok(authed) = authed else { return signed_out() };
    let Some(doc) = &state.openapi else {
        return page(
            &authed,
            "API docs",
            "/docs",
            "<p class=\"notice\">The operator has not published API docs here.</p>",
        );
    };
    // The first active key's prefix stands in for the secret: the tenant sees which key to use.
    let prefix = key_list(&state, &authed.session.consumer)
        .await
        .ok()
        .and_then(|keys| {
            keys.iter()
                .find(|k| k["revokedOn"].is_null())
                .and_then(|k| k["prefix"].as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| format!("tg_{}_", authed.session.key_environment));
    let key = format!("{prefix}…YOUR_KEY");
    let base = state.settings.gateway.public_url.trim_end_matches('/');
    let info = &doc["info"];
    let mut body = format!(
        "<p><strong>{}</strong> {}</p><p>{}</p><p>Base URL <code>{}</code>. Replace <code>{}</code> with your key.</p>\
         <form id=\"try-key\" class=\"try-key\" autocomplete=\"off\"><label>Your API key, to try requests from this page \
         <input type=\"password\" name=\"key\" autocomplete=\"off\" spellcheck=\"false\" placeholder=\"{}\"></label>\
         <small>Sent only to the gateway with each request you try; never stored, not even in this browser.</small></form>",
        text(&info["title"]),
        text(&info["version"]),
        text(&info["description"]),
        escape(base),
        escape(&key),
        escape(&key)
    );
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            if !matches!(
                method.as_str(),
                "get" | "put" | "post" | "delete" | "patch" | "head" | "options"
            ) {
                continue;
            }
            let url = format!("{base}{}", path.replace("{tenantId}", &authed.session.tenant_id));
            body.push_str(&format!(
                "<section class=\"operation\"><h2><span class=\"method {m}\">{M}</span> <code>{}</code></h2><p>{}</p><div class=\"samples\">",
                escape(path),
                text(op.get("summary").unwrap_or(&Value::Null)),
                m = escape(method),
                M = escape(&method.to_ascii_uppercase())
            ));
            for (lang, code) in samples(method, &url, &key) {
                body.push_str(&format!("<h3>{lang}</h3><pre><code>{}</code></pre>", escape(&code)));
            }
            body.push_str(&try_it(method, &url));
            body.push_str("</div></section>");
        }
    }
    page(&authed, "API docs", "/docs", &body)
}

/// The try-it console of one operation: the request is sent by the page's script straight to
/// the gateway (which must list the portal's origin in the route's `cors_origins`), with the
/// key typed above; the portal never sees the key or the answer.
fn try_it(method: &str, url: &str) -> String {
    let body = if matches!(method, "post" | "put" | "patch") {
        "<label>Body (JSON) <textarea name=\"body\" rows=\"3\">{}</textarea></label>"
    } else {
        ""
    };
    format!(
        "<form class=\"try\" data-method=\"{m}\" data-url=\"{u}\"><h3>Try it</h3>{body}\
         <button type=\"submit\">Send {M}</button><output hidden><p class=\"status\"></p><pre class=\"answer\"></pre></output></form>",
        m = escape(&method.to_ascii_uppercase()),
        M = escape(&method.to_ascii_uppercase()),
        u = escape(url)
    )
}

/// `GET /api/openapi-tenant.json`: the operator's document, for a session holder.
pub async fn tenant_openapi(AxumState(state): AxumState<State>, _authed: Authed) -> Result<Response, Problem> {
    let doc = state
        .openapi
        .as_ref()
        .ok_or_else(|| Problem::not_found("no API document is published"))?;
    Ok(axum::Json(doc.clone()).into_response())
}

/// `GET /assets/portal.js`.
pub async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_cover_four_languages_with_the_placeholder() {
        let s = samples("get", "http://gw/v1/x", "tg_live_ab…YOUR_KEY");
        assert_eq!(
            s.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            ["curl", "Python", "JavaScript", "Go"]
        );
        assert!(s
            .iter()
            .all(|(_, code)| code.contains("tg_live_ab…YOUR_KEY") && code.contains("GET")));
    }

    #[test]
    fn a_refused_link_page_escapes_its_reason() {
        assert!(link_refused("<script>").contains("&lt;script&gt;"));
    }
}
