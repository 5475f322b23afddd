//! One request followed from client to origin: the client's W3C `traceparent` is
//! continued by the relay and the connector, each with a span of its own; the origin gets
//! the trace and the relay's request id; the relay's and the connector's access logs both
//! name them; the client gets the request id back. A request without a trace starts one.
//! The access logs are reopened on SIGUSR2 for rotation. Real relay, connector, origin and
//! curl.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use portcullis_e2e::{APP, POLICY, World, curl_cmd, eventually, run_curl, wait_for_connectors};

const ANY: &str = "127.0.0.1:0";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// The JSON lines of the access log at `path` whose `trace_id` is `trace`.
fn lines_of(path: &Path, trace: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["trace_id"] == trace)
        .collect()
}

/// Waits for exactly one line of `trace` in the access log at `path`.
async fn one_line(path: &Path, trace: &str) -> serde_json::Value {
    let line = eventually(Duration::from_secs(10), || async {
        let lines = lines_of(path, trace);
        (lines.len() == 1).then(|| lines[0].clone())
    })
    .await;
    line.unwrap_or_else(|| panic!("no line for {trace} in {}", path.display()))
}

#[tokio::test]
async fn a_traceparent_is_followed_from_client_through_relay_and_connector_to_origin() {
    let w = World::new();
    w.issue_connector("c1", &[APP]);
    w.issue_device("alice", "alice", &["eng"], None);
    let (_origin, origin_addr) = w.start_origin().await;
    w.write_relay_config(ANY, ANY, ANY, POLICY);
    let (relay, addrs) = w.start_relay().await;
    let service = format!("http://{origin_addr}");
    let path = w.write_connector_config("c1", &addrs.quic.to_string(), &[(APP, &service)]);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("access_log = \"c1-access.log\"\n{text}")).unwrap();
    let connector = w.run_connector(None, "c1", &path);
    wait_for_connectors(addrs.admin, 1).await;
    let relay_log = w.path("state/access.log");
    let connector_log = w.path("c1-access.log");

    // The client's trace.
    let headers = w.path("headers.txt");
    let mut cmd = curl_cmd(&w, &addrs, APP, "/traced", Some("alice"));
    cmd.arg("-H")
        .arg(format!("traceparent: 00-{TRACE}-{CLIENT_SPAN}-01"))
        .arg("-D")
        .arg(&headers);
    let r = run_curl(cmd).await;
    assert_eq!(r.status, 200, "{} {}", r.body, r.stderr);
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let origin_tp = seen["headers"]["traceparent"].as_str().unwrap().to_owned();
    let origin_rid = seen["headers"]["x-request-id"].as_str().unwrap().to_owned();
    let fields: Vec<&str> = origin_tp.split('-').collect();
    assert_eq!(fields[0], "00");
    assert_eq!(fields[1], TRACE, "the origin must see the client's trace");
    assert_ne!(
        fields[2], CLIENT_SPAN,
        "the origin's parent is the connector's span"
    );
    assert_eq!(fields[3], "01", "the sampled flag is kept");
    let returned = std::fs::read_to_string(&headers).unwrap();
    let returned_rid = returned
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        returned_rid, origin_rid,
        "the client gets the request id back"
    );

    let at_relay = one_line(&relay_log, TRACE).await;
    assert_eq!(at_relay["request_id"], origin_rid.as_str());
    assert_eq!(at_relay["path"], "/traced");
    assert_eq!(at_relay["status"], 200);
    let at_connector = one_line(&connector_log, TRACE).await;
    assert_eq!(at_connector["request_id"], origin_rid.as_str());
    // The relay's span (its request id) is the connector's parent; the connector's span is
    // the origin's.
    assert_eq!(at_connector["parent_id"], origin_rid.as_str());
    assert_eq!(at_connector["span_id"], fields[2]);
    assert_eq!(at_connector["path"], "/traced");
    assert_eq!(at_connector["status"], 200);

    // No trace from the client: the relay starts one, and both logs carry it.
    let r = run_curl(curl_cmd(&w, &addrs, APP, "/untraced", Some("alice"))).await;
    assert_eq!(r.status, 200);
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let fresh = seen["headers"]["traceparent"].as_str().unwrap();
    let fresh_trace = fresh.split('-').nth(1).unwrap().to_owned();
    assert_ne!(fresh_trace, TRACE);
    assert_eq!(
        one_line(&relay_log, &fresh_trace).await["path"],
        "/untraced"
    );
    assert_eq!(
        one_line(&connector_log, &fresh_trace).await["path"],
        "/untraced"
    );

    // Rotation: move both logs away, SIGUSR2, and the next lines go to new files.
    std::fs::rename(&relay_log, w.path("state/access.log.1")).unwrap();
    std::fs::rename(&connector_log, w.path("c1-access.log.1")).unwrap();
    relay.signal("USR2");
    connector.signal("USR2");
    relay
        .wait_for_log("access log reopened", Duration::from_secs(10))
        .await;
    connector
        .wait_for_log("access log reopened", Duration::from_secs(10))
        .await;
    let after = "5ec0ffee5ec0ffee5ec0ffee5ec0ffee";
    let mut cmd = curl_cmd(&w, &addrs, APP, "/rotated", Some("alice"));
    cmd.arg("-H")
        .arg(format!("traceparent: 00-{after}-{CLIENT_SPAN}-00"));
    assert_eq!(run_curl(cmd).await.status, 200);
    assert_eq!(one_line(&relay_log, after).await["path"], "/rotated");
    assert_eq!(one_line(&connector_log, after).await["path"], "/rotated");
    assert!(lines_of(&w.path("state/access.log.1"), after).is_empty());
}
