//! OTLP export of spans (`[otlp]`): the relay (to a collector over HTTPS, trusted through
//! `ca`) and the connector (over plain HTTP) each export a span per request, in the
//! client's trace, linked parent to child, with the ids the access logs and the origin
//! see; an unsampled trace is not exported; a trace the relay starts is; failures are
//! marked; a collector that goes away costs the requests nothing. Real relay, connector,
//! origin and curl; the collector decodes the OTLP protobuf messages.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::{
    APP, Collector, DB, POLICY, ReceivedSpan, SPAN_KIND_CLIENT, SPAN_KIND_SERVER, World, curl_cmd,
    run_curl, wait_for_connectors,
};
use portcullis_shared::pki::{CA_CERT_FILE, Ca};

const ANY: &str = "127.0.0.1:0";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const UNSAMPLED: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const WAIT: Duration = Duration::from_secs(20);

/// The span of `service` in `trace`, once there is exactly one.
fn one_of<'a>(spans: &'a [ReceivedSpan], service: &str, trace: &str) -> Option<&'a ReceivedSpan> {
    let mut found = spans
        .iter()
        .filter(|s| s.service == service && s.trace_id == trace);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Waits for the relay's span of `trace` at `relay` and the connector's at `connector`.
async fn pair(
    relay: &Collector,
    connector: &Collector,
    trace: &str,
) -> (ReceivedSpan, ReceivedSpan) {
    let r = relay
        .wait_for(WAIT, |s| one_of(s, "portcullis-relay", trace).cloned())
        .await
        .unwrap_or_else(|| panic!("no relay span of {trace}: {:?}", relay.spans()));
    let c = connector
        .wait_for(WAIT, |s| one_of(s, "portcullis-connector", trace).cloned())
        .await
        .unwrap_or_else(|| panic!("no connector span of {trace}: {:?}", connector.spans()));
    (r, c)
}

#[tokio::test]
async fn spans_are_exported_over_otlp_in_the_clients_trace() {
    let w = World::new();
    w.issue_connector("c1", &[APP, DB]);
    w.issue_device("alice", "alice", &["eng"], None);
    let (_origin, origin_addr) = w.start_origin().await;

    // The relay's collector speaks HTTPS with a certificate from the org CA, which the
    // relay is told to trust; the connector's speaks plain HTTP.
    let ca = Ca::load(std::path::Path::new(w.state())).unwrap();
    let leaf = ca
        .issue_server(&["localhost".to_owned()], Duration::from_secs(3600))
        .unwrap();
    let relay_collector =
        Collector::start(Some((&leaf.cert_pem, &leaf.key.as_ref().unwrap().pem))).await;
    let connector_collector = Collector::start(None).await;

    let otlp = format!(
        "{POLICY}\n[otlp]\nendpoint = \"https://localhost:{}\"\nca = \"{}/{CA_CERT_FILE}\"\n",
        relay_collector.addr.port(),
        w.state()
    );
    w.write_relay_config(ANY, ANY, ANY, &otlp);
    let (_relay, addrs) = w.start_relay().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let path = w.write_connector_config(
        "c1",
        &addrs.quic.to_string(),
        &[
            (APP, &format!("http://{origin_addr}")),
            (DB, &format!("http://{dead}")),
        ],
    );
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{text}[otlp]\nendpoint = \"http://127.0.0.1:{}/v1/traces\"\nallow_insecure = true\n[otlp.headers]\nx-tenant = \"acme\"\n",
            connector_collector.addr.port()
        ),
    )
    .unwrap();
    let _connector = w.run_connector(None, "c1", &path);
    wait_for_connectors(addrs.admin, 1).await;

    // Not sampled by the client: nothing is exported for it.
    let mut cmd = curl_cmd(&w, &addrs, APP, "/quiet", Some("alice"));
    cmd.arg("-H")
        .arg(format!("traceparent: 00-{UNSAMPLED}-{CLIENT_SPAN}-00"));
    assert_eq!(run_curl(cmd).await.status, 200);

    // Sampled by a caller the relay refuses (no device certificate): a stranger cannot
    // make the relay export spans.
    let refused = "0badc0de0badc0de0badc0de0badc0de";
    let mut cmd = curl_cmd(&w, &addrs, APP, "/refused", None);
    cmd.arg("-H")
        .arg(format!("traceparent: 00-{refused}-{CLIENT_SPAN}-01"));
    assert_eq!(run_curl(cmd).await.status, 403);

    // Sampled by the client: both hops export their span, each the child of the last.
    let headers = w.path("headers.txt");
    let mut cmd = curl_cmd(&w, &addrs, APP, "/traced", Some("alice"));
    cmd.arg("-H")
        .arg(format!("traceparent: 00-{TRACE}-{CLIENT_SPAN}-01"))
        .arg("-D")
        .arg(&headers);
    let r = run_curl(cmd).await;
    assert_eq!(r.status, 200, "{} {}", r.body, r.stderr);
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let origin_parent = seen["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .split('-')
        .nth(2)
        .unwrap()
        .to_owned();
    let request_id = std::fs::read_to_string(&headers)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: ").map(str::trim))
        .unwrap()
        .to_owned();

    let (relay_span, connector_span) = pair(&relay_collector, &connector_collector, TRACE).await;
    assert_eq!(relay_span.kind, SPAN_KIND_SERVER);
    assert_eq!(
        relay_span.parent_span_id, CLIENT_SPAN,
        "the client's span is the parent"
    );
    assert_eq!(
        relay_span.span_id, request_id,
        "the request id is the relay's span"
    );
    assert_eq!(relay_span.name, "GET");
    let a = &relay_span.attributes;
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["url.path"], "/traced");
    assert_eq!(a["server.address"], APP);
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["enduser.id"], "alice");
    assert_eq!(a["portcullis.device"], "alice");
    assert_eq!(relay_span.status, 0, "a 200 is not an error");
    assert!(relay_span.duration_ns > 0);

    assert_eq!(connector_span.kind, SPAN_KIND_CLIENT);
    assert_eq!(
        connector_span.parent_span_id, relay_span.span_id,
        "the relay's span is the connector's parent"
    );
    assert_eq!(
        connector_span.span_id, origin_parent,
        "the connector's span is the origin's parent"
    );
    let a = &connector_span.attributes;
    assert_eq!(a["url.path"], "/traced");
    assert_eq!(a["server.address"], "127.0.0.1");
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["portcullis.rule"], APP);

    // No trace from the client: the relay starts one (sample_ratio defaults to all) and
    // it is the root.
    let r = run_curl(curl_cmd(&w, &addrs, APP, "/fresh", Some("alice"))).await;
    assert_eq!(r.status, 200);
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let fresh = seen["headers"]["traceparent"].as_str().unwrap().to_owned();
    let fields: Vec<&str> = fresh.split('-').collect();
    assert_eq!(
        fields[3], "01",
        "a trace the relay exports is marked sampled"
    );
    let (root, child) = pair(&relay_collector, &connector_collector, fields[1]).await;
    assert_eq!(root.parent_span_id, "", "the relay's span is the root");
    assert_eq!(child.parent_span_id, root.span_id);

    // An origin that does not answer: both spans say so.
    let failing = "5ec0ffee5ec0ffee5ec0ffee5ec0ffee";
    let mut cmd = curl_cmd(&w, &addrs, DB, "/down", Some("alice"));
    cmd.arg("-H")
        .arg(format!("traceparent: 00-{failing}-{CLIENT_SPAN}-01"));
    assert_eq!(run_curl(cmd).await.status, 502);
    let (relay_span, connector_span) = pair(&relay_collector, &connector_collector, failing).await;
    assert_eq!(
        relay_span.status, 2,
        "a 502 is an error of the relay's span"
    );
    assert_eq!(relay_span.attributes["http.response.status_code"], "502");
    assert_eq!(connector_span.status, 2);
    assert_eq!(
        connector_span.attributes["error.type"],
        "origin_unreachable"
    );

    // The unsampled trace was never exported (it was sent before everything above).
    for spans in [relay_collector.spans(), connector_collector.spans()] {
        assert!(
            spans.iter().all(|s| s.trace_id != UNSAMPLED),
            "an unsampled trace was exported"
        );
        assert!(
            spans.iter().all(|s| s.trace_id != refused),
            "a refused caller's sampled trace was exported"
        );
    }

    // The connector's collector goes away: requests go on regardless.
    drop(connector_collector);
    for i in 0..5 {
        let r = run_curl(curl_cmd(
            &w,
            &addrs,
            APP,
            &format!("/after/{i}"),
            Some("alice"),
        ))
        .await;
        assert_eq!(r.status, 200, "request {i} with the collector gone");
    }
    relay_collector
        .wait_for(WAIT, |s| {
            s.iter()
                .any(|s| {
                    s.attributes
                        .get("url.path")
                        .is_some_and(|p| p == "/after/4")
                })
                .then_some(())
        })
        .await
        .expect("the relay goes on exporting");
}
