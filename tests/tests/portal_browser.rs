//! The tenant portal in a real browser: headless Chromium driven over WebDriver
//! (chromedriver), against the gateway and portal binaries over the real stack.
//!
//! A tenant opens a session link, creates a key and reads it once, calls the gateway with it,
//! sees its limits page show the gateway's `RateLimit` remaining and its usage page count the
//! calls, rolls and revokes (the gateway then refuses the key), reads the API docs with its
//! key prefix in the samples; a reused link gets a clear page; the page's own script cannot
//! touch another tenant's key by id. Screenshots of each page land in
//! `target/portal-screenshots/`.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tollgate_tests::eventually;
use tollgate_tests::free_port;
use tollgate_tests::http::try_send_with;
use tollgate_tests::portal::PortalStack;
use tollgate_tests::process::repo;

const DEADLINE: Duration = Duration::from_secs(60);

/// chromedriver on a free port; killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/stack.d/install.sh installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        eventually("chromedriver answers", Duration::from_secs(20), || async {
            let reply = try_send_with(false, "GET", &status, &[], b"").await.ok()?;
            (reply.status == 200).then_some(())
        })
        .await;
        Self { child, url }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shots() -> PathBuf {
    let dir = repo().join("target/portal-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

async fn shot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.expect("screenshot");
    std::fs::write(shots().join(format!("{name}.png")), png).expect("write screenshot");
}

async fn text_of(browser: &Client, css: &str) -> String {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("text")
}

/// The text of `css` as the page shows it now, `None` while the page is being replaced (the
/// element not there yet, or gone between finding and reading it): for polling after a
/// click that navigates.
async fn current_text(browser: &Client, css: &str) -> Option<String> {
    browser.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// Fetches `path` from the page's own origin with its CSRF token, as the page's script does.
async fn page_fetch(browser: &Client, method: &str, path: &str, body: Value) -> u64 {
    let script = r#"
        const [method, path, body, done] = arguments;
        const csrf = document.querySelector('meta[name="csrf-token"]').content;
        const init = { method, headers: { 'X-CSRF-Token': csrf, 'Content-Type': 'application/json' } };
        if (body !== null) init.body = JSON.stringify(body);
        fetch(path, init).then(r => done(r.status));
    "#;
    browser
        .execute_async(script, vec![json!(method), json!(path), body])
        .await
        .expect("page fetch")
        .as_u64()
        .expect("a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_uses_the_portal_in_a_browser() {
    let s = PortalStack::start("portal_browser", 3600).await;
    s.consumer("web-acme", "t-web-acme", "free").await;
    let (other_key, other_key_id) = s.consumer("web-globex", "t-web-globex", "free").await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    // The operator's application mints a link; the browser opens it and lands home.
    let link = s.mint("web-acme").await;
    browser.goto(&link).await.unwrap();
    assert_eq!(browser.current_url().await.unwrap().path(), "/");
    assert!(text_of(&browser, "nav .who").await.contains("t-web-acme"));
    shot(&browser, "1-overview").await;

    // Create a key; its plaintext is shown once.
    browser.goto(&format!("{}/keys", s.url)).await.unwrap();
    browser
        .find(Locator::Css("#create-key input[name=description]"))
        .await
        .unwrap()
        .send_keys("browser test")
        .await
        .unwrap();
    browser
        .find(Locator::Css("#create-key button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let secret = browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#secret:not([hidden]) #secret-value"))
        .await
        .unwrap();
    let key = secret.text().await.unwrap();
    assert!(key.starts_with("tg_"), "{key}");
    assert!(text_of(&browser, "#secret .warning").await.contains("shown once"));
    eventually("the new key is listed", Duration::from_secs(10), || async {
        let rows = browser.find_all(Locator::Css("#keys tbody tr[data-key]")).await.ok()?;
        (rows.len() == 2).then_some(())
    })
    .await;
    shot(&browser, "2-keys-created").await;
    browser.refresh().await.unwrap();
    assert!(
        !browser.source().await.unwrap().contains(&key),
        "the plaintext is never shown again"
    );

    // Calls through the gateway.
    const CALLS: u64 = 5;
    let mut header = String::new();
    for _ in 0..CALLS {
        let r = s.call(&key, "/v1/hello").await;
        assert_eq!(r.status, 200, "{}", r.text());
        header = r.header("ratelimit").unwrap().to_owned();
    }
    let expected: u64 = header
        .split(", ")
        .find(|i| i.starts_with("\"requests_per_minute\";"))
        .and_then(|i| i.split(';').find_map(|p| p.strip_prefix("r=")))
        .and_then(|r| r.parse().ok())
        .unwrap();

    // Limits: remaining as the gateway's header said.
    browser.goto(&format!("{}/limits", s.url)).await.unwrap();
    let remaining = text_of(&browser, "#limits tr[data-limit=requests_per_minute] td.remaining").await;
    assert_eq!(remaining, expected.to_string(), "{header}");
    shot(&browser, "3-limits").await;

    // Usage: the calls, once, when meter-consumer has them. The period table (day rollup) and
    // the hourly chart (hour rollup) are written side by side, so wait for both.
    browser.goto(&format!("{}/usage", s.url)).await.unwrap();
    let written = eventually("the usage page counts the calls", DEADLINE, || async {
        browser.refresh().await.ok()?;
        let cell = browser
            .find(Locator::Css("#period tr[data-meter=requests] td.billable"))
            .await
            .ok()?;
        if cell.text().await.ok()? != CALLS.to_string() {
            return None;
        }
        let mut written = 0;
        for value in browser
            .find_all(Locator::Css(
                "figure[data-meter=requests][data-granularity=hour] svg text.value",
            ))
            .await
            .ok()?
        {
            written += value.text().await.ok()?.parse::<u64>().ok()?;
        }
        (written >= CALLS).then_some(written)
    })
    .await;
    let charts = browser
        .find_all(Locator::Css("figure[data-meter=requests] svg"))
        .await
        .unwrap();
    assert_eq!(charts.len(), 2, "an hourly and a daily chart");
    assert_eq!(written, CALLS, "every bar with calls has its value written on it");
    shot(&browser, "4-usage").await;

    // Roll with no grace, then revoke the new key; the gateway refuses both.
    browser.goto(&format!("{}/keys", s.url)).await.unwrap();
    let mut created_id = String::new();
    for row in browser
        .find_all(Locator::Css("#keys tbody tr[data-key]"))
        .await
        .unwrap()
    {
        if row.text().await.unwrap().contains("browser test") {
            created_id = row.attr("data-key").await.unwrap().unwrap();
        }
    }
    assert!(!created_id.is_empty(), "the created key is listed");
    browser
        .find(Locator::Css(&format!("select[data-grace='{created_id}']")))
        .await
        .unwrap()
        .select_by_value("0")
        .await
        .unwrap();
    browser
        .find(Locator::Css(&format!("button[data-roll='{created_id}']")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let rolled_key = eventually("the rolled key is shown", Duration::from_secs(10), || async {
        let value = current_text(&browser, "#secret-value").await?;
        (value != key && value.starts_with("tg_")).then_some(value)
    })
    .await;
    assert_eq!(s.call(&rolled_key, "/v1/hello").await.status, 200);
    eventually("the old key stops", Duration::from_secs(10), || async {
        (s.call(&key, "/v1/hello").await.status == 401).then_some(())
    })
    .await;
    shot(&browser, "5-keys-rolled").await;
    let rolled_id = eventually("the rolled key is listed", Duration::from_secs(10), || async {
        let rows = browser.find_all(Locator::Css("#keys tbody tr[data-key]")).await.ok()?;
        for row in rows {
            let id = row.attr("data-key").await.ok()??;
            if id != created_id && row.find(Locator::Css("button[data-revoke]")).await.is_ok() {
                let description = row.text().await.ok()?;
                if description.contains("browser test") {
                    return Some(id);
                }
            }
        }
        None
    })
    .await;
    browser
        .find(Locator::Css(&format!("button[data-revoke='{rolled_id}']")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually("the revoke is confirmed", Duration::from_secs(10), || async {
        browser.accept_alert().await.ok()
    })
    .await;
    eventually("the revoked key is refused", Duration::from_secs(10), || async {
        (s.call(&rolled_key, "/v1/hello").await.status == 401).then_some(())
    })
    .await;
    eventually("the page shows it revoked", Duration::from_secs(10), || async {
        let cell = current_text(&browser, &format!("#keys tr[data-key='{rolled_id}'] td:nth-child(6)")).await?;
        (cell == "revoked").then_some(())
    })
    .await;
    shot(&browser, "6-keys-revoked").await;

    // The page's own script, with its CSRF token, cannot reach another tenant's key.
    for (method, path, body) in [
        ("DELETE", format!("/api/keys/{other_key_id}"), Value::Null),
        (
            "POST",
            format!("/api/keys/{other_key_id}/roll"),
            json!({"graceSecs": 0}),
        ),
    ] {
        assert_eq!(page_fetch(&browser, method, &path, body).await, 404, "{method} {path}");
    }
    assert_eq!(s.call(&other_key, "/v1/hello").await.status, 200);

    // API docs: samples in four languages with the tenant's key prefix.
    browser.goto(&format!("{}/docs", s.url)).await.unwrap();
    let docs = browser.source().await.unwrap();
    for lang in ["curl", "Python", "JavaScript", "Go"] {
        assert!(docs.contains(&format!("<h3>{lang}</h3>")), "{lang}");
    }
    assert!(
        docs.contains("/v1/tenants/t-web-acme/reports"),
        "the tenant's own id in paths"
    );
    assert!(docs.contains("tg_"), "a key prefix placeholder");
    shot(&browser, "7-docs").await;

    // The try-it console: with a key typed in, a GET and a POST go from the page to the
    // gateway (its CORS grant for the portal's origin) and their answers are shown.
    let created = s.admin("POST", "/v1/consumers/web-acme/keys", Some(json!({}))).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let try_key = created.json()["key"].as_str().expect("plaintext").to_owned();
    browser
        .find(Locator::Css("#try-key input[name=key]"))
        .await
        .unwrap()
        .send_keys(&try_key)
        .await
        .unwrap();
    for (form, method, path) in [
        ("form.try[data-method=GET][data-url$='/v1/hello']", "GET", "/v1/hello"),
        (
            "form.try[data-method=POST][data-url$='/v1/tenants/t-web-acme/reports']",
            "POST",
            "/v1/tenants/t-web-acme/reports",
        ),
    ] {
        browser
            .find(Locator::Css(&format!("{form} button")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let answer = eventually(&format!("the {method} answer is shown"), DEADLINE, || async {
            let status = current_text(&browser, &format!("{form} output .status")).await?;
            status.starts_with("200").then_some(())?;
            current_text(&browser, &format!("{form} output .answer")).await
        })
        .await;
        assert!(
            answer.contains("ratelimit: "),
            "the limit headers are readable: {answer}"
        );
        let echo: Value = serde_json::from_str(answer.rsplit("\n\n").next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("the echoed request as JSON ({e}): {answer}"));
        assert_eq!(
            (echo["method"].as_str(), echo["path"].as_str()),
            (Some(method), Some(path))
        );
        assert!(
            echo["headers"].get("authorization").is_none(),
            "the key reached the gateway, never the upstream: {echo}"
        );
    }
    browser
        .execute(
            "document.querySelector(\"form.try[data-method=POST] output\").scrollIntoView({block: 'center'})",
            Vec::new(),
        )
        .await
        .unwrap();
    shot(&browser, "7b-docs-try-it").await;

    // The used link again: a clear page.
    browser.goto(&link).await.unwrap();
    assert!(text_of(&browser, "main").await.contains("cannot be used"));
    shot(&browser, "8-link-reused").await;

    browser.close().await.unwrap();
    s.stack.remove().await;
}
