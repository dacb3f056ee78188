//! Never charge a refusal, in-process: a refusal after admission gives back every limit
//! dimension and is not billable; byte meters count what was streamed; reported costs above
//! the cap fall back to the route cost.

use http_body_util::Full;
use hyper::body::Bytes;

use super::edge_tests::with_extra_routes;
use super::tests::Harness;

/// A plan of exactly three requests a minute, and one counting bytes.
fn small_plans(text: &str) -> String {
    format!(
        "{}\n[plans.three]\nlimits = [{{ name = \"three_per_minute\", meter = \"requests\", window = \"1m\", limit = 3 }}]\n\
         [plans.bytes]\nlimits = [\n  {{ name = \"request_bytes_per_minute\", meter = \"request_bytes\", window = \"1m\", limit = 20 }},\n  \
         {{ name = \"response_bytes_per_minute\", meter = \"response_bytes\", window = \"1m\", limit = 40 }},\n]\n",
        with_extra_routes(&text.replace("max_body_bytes = 10485760", "max_body_bytes = 32"))
    )
}

/// A body that sends a few bytes, then fails (the client went away mid-upload).
struct Truncated(bool);

impl hyper::body::Body for Truncated {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        if self.0 {
            return std::task::Poll::Ready(Some(Err(std::io::Error::other("connection reset"))));
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"abc")))))
    }
}

/// Lets the response-end tasks (in-flight release, response bytes) run.
async fn settle_tasks() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn refusals_after_admission_give_back_every_dimension_and_are_not_billable() {
    let h = Harness::with(small_plans);
    let key = h.consumer("three", "t_three", Some("three"), "{}");
    let auth = format!("Bearer {key}");
    let send = |target: &'static str, headers: Vec<(&'static str, String)>, body: &'static [u8]| {
        let auth = auth.clone();
        let h = &h;
        async move {
            let mut all: Vec<(&str, &str)> = vec![("authorization", auth.as_str())];
            all.extend(headers.iter().map(|(n, v)| (*n, v.as_str())));
            h.send_raw("POST", target, &all, Full::new(Bytes::from_static(body)))
                .await
        }
    };
    assert_eq!(send("/v1/x", vec![], b"").await.status, 200);

    // 413: declared too large, and streamed too large.
    assert_eq!(
        send("/v1/x", vec![("content-length", "64".into())], &[b'x'; 64])
            .await
            .status,
        413
    );
    assert_eq!(send("/v1/x", vec![], &[b'x'; 64]).await.status, 413);
    // 400: the upload was cut short.
    let truncated = h
        .send_raw("POST", "/v1/x", &[("authorization", auth.as_str())], Truncated(false))
        .await;
    assert_eq!(truncated.status, 400);
    // 403: the body names another tenant.
    let form = ("content-type", "application/x-www-form-urlencoded".to_owned());
    assert_eq!(send("/forms/x", vec![form], b"tenant_id=t_other").await.status, 403);
    // 502: the upstream could not be reached.
    h.upstream.unreachable.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(send("/v1/x", vec![], b"").await.status, 502);
    h.upstream
        .unreachable
        .store(false, std::sync::atomic::Ordering::Relaxed);

    let events = h.events.all();
    assert!(events[1..].iter().all(|e| !e.billable), "no refusal is billable");
    // The quota is as if none of the refusals had happened: two more, then 429.
    assert_eq!(send("/v1/x", vec![], b"").await.status, 200);
    let last = send("/v1/x", vec![], b"").await;
    assert_eq!(last.status, 200);
    assert_eq!(last.header("ratelimit-remaining"), Some("0"));
    let refused = send("/v1/x", vec![], b"").await;
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.json()["violated-policies"][0],
        "three_per_minute",
        "{:?}",
        refused.json()
    );
}

#[tokio::test]
async fn byte_meters_count_what_was_streamed_chunked_included() {
    let h = Harness::with(small_plans);
    let key = h.consumer("bytes", "t_bytes", Some("bytes"), "{}");
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str())];
    // No Content-Length (chunked): admitted, then its 15 bytes counted.
    let first = h
        .send_raw("POST", "/v1/x", &headers, Full::new(Bytes::from_static(&[b'x'; 15])))
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(h.last_event().units["request_bytes"], 15);
    assert_eq!(h.last_event().units["response_bytes"], 16);
    settle_tasks().await;
    // 15 of 20 used: 5 more fit, then the limit is reached.
    let second = h
        .send_raw("POST", "/v1/x", &headers, Full::new(Bytes::from_static(&[b'x'; 5])))
        .await;
    assert_eq!(second.status, 200);
    settle_tasks().await;
    let third = h
        .send_raw("POST", "/v1/x", &headers, Full::new(Bytes::from_static(b"y")))
        .await;
    assert_eq!(third.status, 429);
    assert!(third.json()["violated-policies"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == "request_bytes_per_minute"));
    // Two 16-byte responses were counted: 32 of 40.
    assert_eq!(
        h.events
            .all()
            .iter()
            .filter(|e| e.billable)
            .map(|e| e.response_bytes)
            .sum::<i64>(),
        32
    );
}

#[tokio::test]
async fn reported_costs_above_the_cap_or_malformed_fall_back_to_the_route_cost() {
    let h = Harness::new();
    let cases = [
        ("compute_units=7", 7),
        ("compute_units=18446744073709551615", 1),
        ("compute_units=1000001", 1),
        ("compute_units=lots", 1),
        ("compute_units=1000000", 1_000_000),
    ];
    for (header, units) in cases {
        *h.upstream.reply_headers.lock().unwrap() = vec![("x-tollgate-cost", header.to_owned())];
        let reply = h.send("GET", "/v1/x", &[], b"").await;
        assert_eq!(reply.status, 200, "{header}");
        assert!(reply.header("x-tollgate-cost").is_none(), "never shown to the client");
        assert_eq!(h.last_event().units["compute_units"], units, "{header}");
    }
}
