//! The relay's service-level indicators after real traffic: requests by routed hostname,
//! protocol, method and status class; latency to the head and in total; bytes both ways;
//! handshakes by outcome and reason; refusals; the CA's expiry. Scraped from the real
//! relay's `/metrics` after real curl requests through a real connector.

#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use portcullis_e2e::{APP, Stack, curl_cmd, metric, metrics_text, run_curl};

/// The sum of every sample whose series starts with `prefix` (a name and the first labels).
fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_relay_exports_its_slis_after_real_traffic() {
    let s = Stack::up().await;
    for _ in 0..3 {
        assert_eq!(s.get(APP, "/", Some("alice")).await.status, 200);
    }
    // A request body up, through HTTP/2.
    let mut post = curl_cmd(&s.w, &s.addrs, APP, "/echo", Some("alice"));
    post.args(["--http2", "--data-binary", "0123456789abcdef"]);
    let r = run_curl(post).await;
    assert!(r.status < 500, "{} {}", r.status, r.stderr);
    // Refused before routing: bob may not reach the app; and a client with no certificate.
    assert_eq!(s.get(APP, "/", Some("bob")).await.status, 403);
    let anonymous = s.get(APP, "/", None).await;
    assert_ne!(anonymous.status, 200);

    let text = metrics_text(s.addrs.admin).await.unwrap();
    // curl speaks HTTP/2 when the relay offers it.
    let app = "hostname=\"app.internal\",protocol=\"HTTP/2\"";
    for (series, at_least) in [
        (
            format!("portcullis_relay_requests_total{{{app},method=\"read\",class=\"2xx\"}}"),
            3.0,
        ),
        (format!("portcullis_relay_response_head_seconds_count{{{app}}}"), 3.0),
        (format!("portcullis_relay_request_duration_seconds_count{{{app}}}"), 3.0),
        (
            format!("portcullis_relay_request_duration_seconds_bucket{{le=\"+Inf\",{app}}}"),
            3.0,
        ),
        (format!("portcullis_relay_response_bytes_total{{{app}}}"), 1.0),
        (
            "portcullis_relay_request_bytes_total{hostname=\"app.internal\",protocol=\"HTTP/2\"}"
                .to_owned(),
            16.0,
        ),
        (
            "portcullis_relay_requests_total{hostname=\"app.internal\",protocol=\"HTTP/2\",method=\"write\""
                .to_owned(),
            1.0,
        ),
        (
            "portcullis_relay_requests_total{hostname=\"-\",protocol=\"HTTP/2\",method=\"read\",class=\"4xx\"}"
                .to_owned(),
            1.0,
        ),
        (
            "portcullis_relay_handshakes_total{listener=\"https\",outcome=\"ok\",reason=\"ok\"}"
                .to_owned(),
            5.0,
        ),
        (
            "portcullis_relay_handshakes_total{listener=\"quic\",outcome=\"ok\",reason=\"ok\"}"
                .to_owned(),
            1.0,
        ),
        (
            "portcullis_relay_hostname_replicas{hostname=\"app.internal\"}".to_owned(),
            1.0,
        ),
    ] {
        let v = sum(&text, &series);
        assert!(v >= at_least, "{series} is {v}, expected at least {at_least}\n{text}");
    }
    // The anonymous client was refused at the handshake or by the pipeline; either way it
    // is counted.
    let refused_handshakes = sum(
        &text,
        "portcullis_relay_handshakes_total{listener=\"https\",outcome=\"failed\"",
    );
    let refused_requests = sum(&text, "portcullis_relay_requests_total{hostname=\"-\"");
    assert!(refused_handshakes + refused_requests >= 2.0, "{text}");
    for series in [
        "portcullis_relay_refused_responses_total{status=\"429\"}",
        "portcullis_relay_refused_responses_total{status=\"431\"}",
        "portcullis_relay_refused_responses_total{status=\"503\"}",
    ] {
        assert!(metric(s.addrs.admin, series).await.is_some(), "no {series}");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ca = metric(
        s.addrs.admin,
        "portcullis_relay_certificate_expiry_timestamp_seconds{certificate=\"ca\"}",
    )
    .await
    .unwrap();
    assert!(ca > now + 365 * 86_400, "{ca}");
}
