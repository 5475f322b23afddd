//! End-to-end tests: real relay, connector, origin and curl as separate processes on
//! loopback, with real certificates and real QUIC.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use base64::Engine as _;
use portcullis_e2e::{
    World, curl_cmd, curl_expect, identity_series, metric, relay_cli, relay_ok, run_curl,
    wait_for_connectors, wait_for_metric,
};

use portcullis_e2e::{APP, Stack};

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn curl_over_http1_and_http2_reaches_the_origin_with_identity_headers() {
    let s = Stack::up().await;
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/hello?x=1", Some("alice"));
        cmd.arg(flag).args([
            "-H",
            "portcullis-user: mallory",
            "-H",
            "Portcullis-Groups: admin",
        ]);
        let r = run_curl(cmd).await;
        assert_eq!(
            (r.status, r.version.as_str()),
            (200, version),
            "{}",
            r.stderr
        );
        let v = json(&r.body);
        assert_eq!(v["origin"], "pc-origin");
        assert_eq!(v["path"], "/hello");
        let h = &v["headers"];
        assert_eq!(
            h["portcullis-user"], "alice",
            "client-supplied identity must be replaced"
        );
        assert_eq!(h["portcullis-device"], "alice");
        assert_eq!(h["portcullis-groups"], "eng");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert!(h["host"].as_str().unwrap().starts_with(APP));
        let jwt = h["portcullis-jwt-assertion"].as_str().unwrap();
        assert_eq!(jwt.split('.').count(), 3, "{jwt}");
    }
    // Wildcard-published names route too.
    let r = s.get("ci.eng.internal", "/", Some("alice")).await;
    assert_eq!(r.status, 200, "{}", r.stderr);
}

#[tokio::test]
async fn access_log_records_each_request_with_identity() {
    let s = Stack::up().await;
    s.get(APP, "/logged", Some("alice")).await;
    s.get(APP, "/denied", Some("bob")).await;
    let log = std::fs::read_to_string(s.w.path("state/access.log")).unwrap();
    let lines: Vec<serde_json::Value> = log.lines().map(json).collect();
    let ok = lines
        .iter()
        .find(|l| l["path"] == "/logged")
        .expect("line for /logged");
    assert_eq!(ok["device"], "alice");
    assert_eq!(ok["user"], "alice");
    assert_eq!(ok["hostname"], APP);
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["status"], 200);
    assert!(ok["bytes"].as_u64().unwrap() > 0);
    assert!(ok["duration_ms"].is_number() && ok["time"].is_string());
    let denied = lines
        .iter()
        .find(|l| l["path"] == "/denied")
        .expect("line for /denied");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["user"], "bob");
}

#[tokio::test]
async fn policy_and_routing_refusals_get_the_right_status() {
    let s = Stack::up().await;
    // Default deny: bob's group has no rule.
    let r = s.get(APP, "/", Some("bob")).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // No device certificate.
    assert_eq!(s.get(APP, "/", None).await.status, 403);
    // An unknown hostname gets the relay's own certificate, which curl refuses for that
    // name: no response, nothing internal named.
    let r = s.get("nope.internal", "/", Some("alice")).await;
    assert_eq!(
        r.status, 0,
        "unknown name must not get a response: {}",
        r.body
    );
    // SNI and Host disagree: 421.
    let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/", Some("alice"));
    cmd.args(["-H", "Host: ci.eng.internal"]);
    assert_eq!(run_curl(cmd).await.status, 421);
    // An absolute-form target that disagrees with Host is refused, never forwarded.
    let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/", Some("alice"));
    cmd.args(["--http1.1", "--request-target", &format!("https://{APP}/")])
        .args(["-H", "Host: admin.internal"]);
    assert_eq!(run_curl(cmd).await.status, 400);
}

#[tokio::test]
async fn identity_spoofing_headers_never_reach_the_origin() {
    let s = Stack::up().await;
    let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/", Some("alice"));
    cmd.args([
        "-H",
        "portcullis_user: mallory",
        "-H",
        "X-Real-IP: 10.9.9.9",
    ])
    .args([
        "-H",
        "Forwarded: for=10.9.9.9",
        "-H",
        "X-Forwarded-For: 10.9.9.9",
    ]);
    let r = run_curl(cmd).await;
    assert_eq!(r.status, 200, "{}", r.stderr);
    let h = &json(&r.body)["headers"];
    assert!(h.get("portcullis_user").is_none(), "{h}");
    assert!(
        h.get("x-real-ip").is_none() && h.get("forwarded").is_none(),
        "{h}"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["portcullis-user"], "alice");
}

#[tokio::test]
async fn a_published_name_without_a_connector_up_gets_502() {
    let mut s = Stack::up().await;
    s.connector.signal("KILL");
    s.connector.wait(Duration::from_secs(5)).await;
    // A killed connector sends no close: the relay answers 502 while its tunnel times
    // out, then "no connector" once QUIC's idle timeout has removed it.
    let r = portcullis_e2e::eventually(Duration::from_secs(40), || async {
        let r = s.get(APP, "/", Some("alice")).await;
        assert!(
            r.status == 502 || r.status == 200,
            "{} {}",
            r.status,
            r.body
        );
        r.body.contains("no connector is online").then_some(r)
    })
    .await
    .expect("502 naming the missing connector once the tunnel is gone");
    assert_eq!(r.status, 502);
}

#[tokio::test]
async fn bad_certificates_are_refused_at_the_handshake() {
    let s = Stack::up().await;
    // A connector certificate used as a device.
    let r = s.get(APP, "/", Some("c1")).await;
    assert_eq!(
        r.status, 0,
        "connector cert must not work as a device: {}",
        r.body
    );
    // A device from another organisation's CA.
    let other = World::new();
    other.issue_device("eve", "eve", &["eng"], None);
    std::fs::copy(other.path("out/eve.crt"), s.w.path("out/eve.crt")).unwrap();
    std::fs::copy(other.path("out/eve.key"), s.w.path("out/eve.key")).unwrap();
    assert_eq!(s.get(APP, "/", Some("eve")).await.status, 0);
    // An expired certificate.
    s.w.issue_device("old", "alice", &["eng"], Some("1s"));
    // Time must pass for a certificate to expire: this sleep is the test's subject.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.get(APP, "/", Some("old")).await.status, 0);
    // A superseded certificate: re-issuing alice invalidates the first one.
    std::fs::copy(s.w.path("out/alice.crt"), s.w.path("out/alice-v1.crt")).unwrap();
    std::fs::copy(s.w.path("out/alice.key"), s.w.path("out/alice-v1.key")).unwrap();
    let alice = identity_series("device", "alice");
    let first = metric(s.addrs.admin, &alice).await;
    assert!(first.is_some(), "the relay knows alice");
    s.w.issue_device("alice", "alice", &["eng"], None);
    // The relay has read the re-issue once alice's expiry on /metrics is the new one.
    wait_for_metric(s.addrs.admin, &alice, "alice re-issued", |v| {
        v.is_some() && v != first
    })
    .await;
    assert_eq!(s.get(APP, "/", Some("alice-v1")).await.status, 0);
    assert_eq!(s.get(APP, "/", Some("alice")).await.status, 200);
    // The clients may see the refusals before the relay's lines reach its log file.
    s.relay
        .wait_for_log("client certificate refused", Duration::from_secs(10))
        .await;
    // A connector's certificate passes the handshake (it may carry a tunnel over TCP on
    // this port) and the connection is closed before any HTTP is read.
    s.relay
        .wait_for_log(
            "a connector certificate on HTTPS refused",
            Duration::from_secs(10),
        )
        .await;
}

#[tokio::test]
async fn revoking_a_device_closes_its_live_connection_and_refuses_new_ones() {
    let s = Stack::up().await;
    use tokio::io::AsyncReadExt;
    // A response that streams for 20 s; revoke once its first chunk has arrived.
    let mut live = curl_cmd(&s.w, &s.addrs, APP, "/stream?n=200&ms=100", Some("alice"));
    live.arg("-N").stdout(std::process::Stdio::piped());
    let started = Instant::now();
    let mut child = live.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("chunk 0") {
        let n = tokio::time::timeout(Duration::from_secs(10), out.read(&mut buf))
            .await
            .expect("the stream must start")
            .unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    relay_ok(&["revoke", "device", "alice", "--state", s.w.state()]);
    let revoked_at = Instant::now();
    let rest = async {
        let _ = out.read_to_end(&mut seen).await;
        child.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(10), rest)
        .await
        .expect("live connection must be cut");
    assert!(
        !status.success(),
        "the transfer must fail, not complete: {}",
        String::from_utf8_lossy(&seen)
    );
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "cut {:?} after revocation",
        revoked_at.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(s.get(APP, "/", Some("alice")).await.status, 0);
    // Listing shows it.
    let list = relay_ok(&["list", "--state", s.w.state()]);
    let line = list.lines().find(|l| l.contains("alice")).unwrap();
    assert!(line.contains("revoked"), "{list}");
}

#[tokio::test]
async fn revoking_a_connector_disconnects_it() {
    let s = Stack::up().await;
    relay_ok(&["revoke", "connector", "c1", "--state", s.w.state()]);
    // Briefly a request may still be routed to the closing tunnel (502), or find its name
    // unpublished between the handshake and the request (404); then the names it alone
    // published are no longer served at all (the relay presents its own certificate, which
    // curl refuses for the name).
    let r = portcullis_e2e::eventually(Duration::from_secs(5), || async {
        let r = s.get(APP, "/", Some("alice")).await;
        assert!(
            matches!(r.status, 200 | 502 | 404 | 0),
            "{} {}",
            r.status,
            r.body
        );
        (r.status == 0).then_some(r)
    })
    .await;
    assert!(
        r.is_some(),
        "a revoked connector's names must stop being served"
    );
    let log = portcullis_e2e::eventually(Duration::from_secs(5), || async {
        let log = s.connector.log_text();
        log.contains("revoked").then_some(log)
    })
    .await;
    assert!(
        log.is_some(),
        "connector must log that it was revoked: {}",
        s.connector.log_text()
    );
}

#[tokio::test]
async fn a_connector_cannot_publish_a_name_it_was_not_issued() {
    let s = Stack::up().await;
    s.w.issue_connector("c2", &["other.internal"]);
    let service = format!("http://{}", s.origin_addr);
    // c2's app.internal would go nowhere: were it routed there, requests would get 502.
    let c2 = s.w.start_connector(
        "c2",
        &s.addrs.quic.to_string(),
        &[("other.internal", &service), (APP, "http://127.0.0.1:9")],
    );
    let log = portcullis_e2e::eventually(Duration::from_secs(10), || async {
        let log = c2.log_text();
        log.contains("refused to publish").then_some(log)
    })
    .await
    .expect("connector must log the refused hostname");
    assert!(log.contains(APP), "{log}");
    // app.internal still goes to c1 only; requests keep working.
    for _ in 0..4 {
        assert_eq!(s.get(APP, "/", Some("alice")).await.status, 200);
    }
}

#[tokio::test]
async fn relay_restart_keeps_identities_revocations_and_logs_and_connector_reconnects() {
    let mut s = Stack::up().await;
    relay_ok(&["revoke", "device", "bob", "--state", s.w.state()]);
    s.get(APP, "/before-restart", Some("alice")).await;
    let took = s.restart_relay(Duration::ZERO).await;
    // Generous bound that catches hangs; typical figures are in the closing notes.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(
        s.get(APP, "/", Some("bob")).await.status,
        0,
        "bob stays revoked"
    );
    let log = std::fs::read_to_string(s.w.path("state/access.log")).unwrap();
    assert!(log.contains("/before-restart"), "{log}");

    // A long outage, past the connector's idle timeout: it keeps dialling with capped
    // backoff and is back soon after the relay.
    let took = s.restart_relay(Duration::from_secs(12)).await;
    eprintln!("connector back {took:?} after a 12 s relay outage");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let mut s = Stack::up().await;
    let slow = tokio::spawn(run_curl(curl_cmd(
        &s.w,
        &s.addrs,
        APP,
        "/slow?ms=1500",
        Some("alice"),
    )));
    // Signal only once the request is really in flight (a tunnel stream is open).
    portcullis_e2e::wait_for_tunnel_streams(s.addrs.admin, 1).await;
    s.relay.signal("TERM");
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.stderr);
    assert_eq!(r.body.trim(), "slow done");
    let status = s.relay.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "relay exit: {status:?}");

    // The connector drains the same way.
    let (relay, addrs) = s.w.start_relay().await;
    s.relay = relay;
    s.addrs = addrs;
    let service = format!("http://{}", s.origin_addr);
    let mut c =
        s.w.start_connector("c1", &addrs.quic.to_string(), &[(APP, &service)]);
    wait_for_connectors(addrs.admin, 1).await;
    curl_expect(&s.w, &addrs, APP, "alice", 200).await;
    // Stop the first connector so the slow request goes through `c`.
    s.connector.signal("TERM");
    assert!(s.connector.wait(Duration::from_secs(10)).await.success());
    let slow = tokio::spawn(run_curl(curl_cmd(
        &s.w,
        &addrs,
        APP,
        "/slow?ms=1500",
        Some("alice"),
    )));
    // Signal only once the request is really in flight (a tunnel stream is open).
    portcullis_e2e::wait_for_tunnel_streams(addrs.admin, 1).await;
    c.signal("TERM");
    let r = slow.await.unwrap();
    assert_eq!(
        (r.status, r.body.trim()),
        (200, "slow done"),
        "{}",
        r.stderr
    );
    assert!(c.wait(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn admin_endpoints_report_health_and_metrics() {
    let s = Stack::up().await;
    let r = s.get(APP, "/", Some("alice")).await;
    assert_eq!(r.status, 200, "{}", r.stderr);
    let admin = s.addrs.admin;
    let get = |path: &'static str| async move {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                "-w",
                "\n%{http_code}",
                &format!("http://{admin}{path}"),
            ])
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(get("/healthz").await.ends_with("\n200"));
    assert!(get("/readyz").await.ends_with("\n200"));
    let m = get("/metrics").await;
    // Written by the Prometheus client library: OpenMetrics, the build and process
    // families, counters as `_total`.
    assert_eq!(
        portcullis_e2e::sample(&m, "portcullis_relay_connector_tunnels"),
        Some(1),
        "{m}"
    );
    assert!(
        m.lines().any(|l| l
            .starts_with("portcullis_relay_requests_total{hostname=\"app.internal\"")
            && l.contains("class=\"2xx\"")),
        "{m}"
    );
    for line in [
        "portcullis_relay_identity_certificate_expiry_timestamp_seconds{role=\"device\",id=\"alice\"}",
        "portcullis_relay_build_info{version=\"",
        "\nprocess_resident_memory_bytes ",
        "\nprocess_open_fds ",
        "# TYPE portcullis_relay_requests counter",
    ] {
        assert!(m.contains(line), "{line} not in {m}");
    }
    assert!(m.contains("\n# EOF\n"), "{m}");
}

#[tokio::test]
async fn jwks_is_served_rotates_with_an_overlap_and_pkcs12_bundle_works_with_curl() {
    let s = Stack::up().await;
    let r = s
        .get("relay.acme.test", "/.well-known/jwks.json", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.stderr);
    let v = json(&r.body);
    assert_eq!(v["keys"][0]["alg"], "ES256");
    let first = v["keys"][0]["kid"].as_str().unwrap().to_owned();
    // The kid an origin's assertion was signed with.
    let signed_with = || async {
        let r = s.get(APP, "/", Some("alice")).await;
        let jwt = json(&r.body)["headers"]["portcullis-jwt-assertion"]
            .as_str()
            .unwrap()
            .to_owned();
        let header = jwt.split('.').next().unwrap().to_owned();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap();
        json(&String::from_utf8(header).unwrap())["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(signed_with().await, first);
    let kids = || async {
        let r = s
            .get("relay.acme.test", "/.well-known/jwks.json", None)
            .await;
        let v = json(&r.body);
        let kids: Vec<String> = v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect();
        kids
    };
    // Rotation: the new key is published first, while the old one still signs...
    let config = s.w.path("relay.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let prepublished = config.with_file_name("prepublish.toml");
    std::fs::write(&prepublished, format!("jwt_prepublish = \"4s\"\n{text}")).unwrap();
    let rotated_at = Instant::now();
    let prepublish = ["--config", prepublished.to_str().unwrap()];
    let out = relay_ok(&[&["jwt", "rotate", "--state", s.w.state()][..], &prepublish].concat());
    assert!(out.contains("signs from"), "{out}");
    let published = portcullis_e2e::eventually(Duration::from_secs(10), || async {
        let kids = kids().await;
        (kids.len() == 2).then_some(kids)
    })
    .await
    .expect("the running relay must publish the next key after a rotation");
    assert_eq!(
        published[0], first,
        "the old key still signs, so it comes first"
    );
    if rotated_at.elapsed() < Duration::from_secs(3) {
        assert_eq!(signed_with().await, first);
    }
    // ...and signs once its pre-publication is over: a second rotation waits for it,
    // and `jwt retire` after the 4 s makes it the signing key in the files (this relay
    // runs with the default hour, so it would otherwise promote it only then) and stops
    // publishing the old one.
    let next = published[1].clone();
    let err = relay_cli(&[&["jwt", "rotate", "--state", s.w.state()][..], &prepublish].concat());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("still being pre-published"),
        "{err:?}"
    );
    tokio::time::sleep_until((rotated_at + Duration::from_secs(4)).into()).await;
    relay_ok(&[&["jwt", "retire", "--state", s.w.state()][..], &prepublish].concat());
    let retired = portcullis_e2e::eventually(Duration::from_secs(10), || async {
        let kids = kids().await;
        (kids.len() == 1).then_some(kids)
    })
    .await;
    assert_eq!(retired, Some(vec![next.clone()]));
    assert_eq!(signed_with().await, next);
    // The browser bundle is a working PKCS#12 (empty password).
    let out = s.w.out();
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code} %{http_version}"])
        .args(["--cacert", &format!("{out}/ca.crt")])
        .args(["--cert-type", "P12", "--cert", &format!("{out}/alice.p12:")])
        .args([
            "--resolve",
            &format!("{APP}:{}:127.0.0.1", s.addrs.https.port()),
        ])
        .arg(format!("https://{APP}:{}/", s.addrs.https.port()));
    let r = run_curl(cmd).await;
    assert_eq!(r.status, 200, "{}", r.stderr);
}

#[test]
fn admin_commands_refuse_bad_input_with_one_clear_line() {
    let w = World::new();
    // An existing CA is never overwritten.
    let out = relay_cli(&["ca", "init", "--state", w.state()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Commands on a directory with no CA say how to make one.
    let empty = w.path("empty");
    let out = relay_cli(&["list", "--state", empty.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca init"));
    // Bad ids and patterns.
    let out = relay_cli(&[
        "issue",
        "device",
        "a/b",
        "--user",
        "u",
        "--state",
        w.state(),
        "--out",
        w.out(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid id"));
    let out = relay_cli(&[
        "issue",
        "connector",
        "c",
        "--hostname",
        "a.*.b",
        "--state",
        w.state(),
        "--out",
        w.out(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid hostname pattern"));
    // Revoking someone unknown.
    let out = relay_cli(&["revoke", "device", "ghost", "--state", w.state()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device:ghost is registered"));
    // Issued key files are private.
    w.issue_device("alice", "alice", &["eng"], None);
    use std::os::unix::fs::PermissionsExt;
    for f in ["alice.key", "alice.p12"] {
        let mode = std::fs::metadata(w.path("out").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // A revoked id cannot be re-issued.
    relay_ok(&["revoke", "device", "alice", "--state", w.state()]);
    let out = relay_cli(&[
        "issue",
        "device",
        "alice",
        "--user",
        "alice",
        "--state",
        w.state(),
        "--out",
        w.out(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
}

#[test]
fn bad_relay_config_exits_64_naming_file_and_line() {
    let w = World::new();
    let run = |path: &std::path::Path| {
        let out = std::process::Command::new(portcullis_e2e::bin("portcullis-relay"))
            .arg("run")
            .arg("--config")
            .arg(path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cfg = w.write_relay_config("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "");
    let good = std::fs::read_to_string(&cfg).unwrap();

    // An unknown top-level key on line 7, after the harness's six.
    let (head, tail) = good.split_at(good.match_indices('\n').nth(5).unwrap().0 + 1);
    std::fs::write(&cfg, format!("{head}bogus_key = 1\n{tail}")).unwrap();
    let (code, err) = run(&cfg);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("relay.toml:7") && err.contains("bogus_key"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    std::fs::write(&cfg, "state_dir = \n").unwrap();
    let (code, err) = run(&cfg);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("relay.toml:1"), "{err}");

    let (code, err) = run(&w.path("missing.toml"));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("missing.toml"), "{err}");
}

#[tokio::test]
async fn a_port_in_use_is_reported() {
    let w = World::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    w.write_relay_config("127.0.0.1:0", &port, "127.0.0.1:0", "");
    let out = tokio::process::Command::new(portcullis_e2e::bin("portcullis-relay"))
        .arg("run")
        .arg("--config")
        .arg(w.path("relay.toml"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&port) && err.contains("in use"), "{err}");
}

#[tokio::test]
async fn bad_connector_config_and_missing_files_are_clear() {
    let w = World::new();
    w.issue_connector("c1", &[APP]);
    let path = w.write_connector_config("c1", "127.0.0.1:9", &[(APP, "http://127.0.0.1:9")]);
    let run = |path: std::path::PathBuf| async move {
        let out = tokio::process::Command::new(portcullis_e2e::bin("portcullis-connector"))
            .arg("run")
            .arg("--config")
            .arg(path)
            .output()
            .await
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("service =", "servic =")).unwrap();
    let (code, err) = run(path.clone()).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("servic"), "{err}");
    std::fs::write(&path, good.replace("c1.key", "nope.key")).unwrap();
    let (code, err) = run(path.clone()).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nope.key"), "{err}");
}

#[tokio::test]
async fn policy_changes_in_relay_toml_apply_without_a_restart() {
    let s = Stack::up().await;
    let pid = s.relay.child.id();
    assert_eq!(s.get(APP, "/", Some("bob")).await.status, 403);
    let path = s.w.path("relay.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let bob_allowed = |want: bool| {
        let s = &s;
        async move {
            portcullis_e2e::eventually(Duration::from_secs(10), || async {
                let status = s.get(APP, "/", Some("bob")).await.status;
                ((status == 200) == want).then_some(())
            })
            .await
            .is_some()
        }
    };
    let log_says = |text: &'static str| {
        let s = &s;
        async move {
            portcullis_e2e::eventually(Duration::from_secs(10), || async {
                s.relay.log_text().contains(text).then_some(())
            })
            .await
            .is_some()
        }
    };

    // Grant bob access and send SIGHUP.
    let granted = format!("{original}\n[[policy]]\nhostnames = [\"{APP}\"]\nusers = [\"bob\"]\n");
    std::fs::write(&path, &granted).unwrap();
    s.relay.signal("HUP");
    assert!(
        bob_allowed(true).await,
        "the new rule must apply after SIGHUP"
    );

    // An invalid file is noticed without a signal and changes nothing.
    std::fs::write(
        &path,
        format!("{granted}\n[[policy]]\nhostnames = []\nusers = [\"mallory\"]\n"),
    )
    .unwrap();
    assert!(log_says("keeping the running configuration").await);
    assert_eq!(s.get(APP, "/", Some("bob")).await.status, 200);

    // Back to the original policy, with a listen address changed: the policy applies,
    // the address is named as needing a restart.
    let moved = original.replace(
        &format!("admin_listen = \"{}\"", "127.0.0.1:0"),
        "admin_listen = \"127.0.0.1:1\"",
    );
    assert_ne!(moved, original, "the harness's admin_listen line moved");
    std::fs::write(&path, moved).unwrap();
    assert!(
        bob_allowed(false).await,
        "removing the rule must deny bob again"
    );
    assert!(log_says("take effect only after a restart").await);
    assert!(s.relay.log_text().contains("admin_listen"));

    // One process throughout, still serving, and counted on /metrics.
    assert_eq!(s.relay.child.id(), pid);
    assert_eq!(s.get(APP, "/", Some("alice")).await.status, 200);
    let metrics = tokio::process::Command::new("curl")
        .args(["-sS", &format!("http://{}/metrics", s.addrs.admin)])
        .output()
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("portcullis_relay_config_reloads_total{result=\"refused\"} 1"),
        "{metrics}"
    );
}

/// Runs `openssl` with `args` in `dir`; its combined output, and whether it succeeded.
fn openssl(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn the_org_ca_vouches_only_for_its_permitted_domains_and_devices_are_still_served() {
    // The test world's CA is created with --permit-dns .internal --permit-dns .test.
    let s = Stack::up().await;
    assert_eq!(s.get(APP, "/", Some("alice")).await.status, 200);

    // The relay refuses to publish a name outside them, with the reason.
    let out = relay_cli(&[
        "issue",
        "connector",
        "evil",
        "--hostname",
        "www.bank.example",
        "--state",
        s.w.state(),
        "--out",
        s.w.out(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("outside the organisation CA's permitted domains"),
        "{err}"
    );

    // A leaf for another site, signed with the CA's own key anyway (as a thief of the key
    // could), is refused by OpenSSL; one for a permitted name verifies.
    let dir = tempfile::tempdir().unwrap();
    // The relay's online signer: the intermediate and its key (the root trusts it).
    let ca_key = s.w.path("state/ca.key");
    let signer = s.w.path("state/ca-intermediate.crt");
    let ca_crt = s.w.path("out/ca.crt");
    for (name, ok) in [("www.bank.example", false), ("anything.internal", true)] {
        let (made, text) = openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.crt",
                "-days",
                "1",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                &format!("subjectAltName=DNS:{name}"),
                "-CA",
                signer.to_str().unwrap(),
                "-CAkey",
                ca_key.to_str().unwrap(),
            ],
        );
        assert!(made, "{text}");
        let (verified, text) = openssl(
            dir.path(),
            &[
                "verify",
                "-CAfile",
                ca_crt.to_str().unwrap(),
                "-untrusted",
                signer.to_str().unwrap(),
                "leaf.crt",
            ],
        );
        assert_eq!(verified, ok, "{name}: {text}");
        if !ok {
            assert!(text.contains("permitted subtree violation"), "{text}");
        }
    }
}

#[tokio::test]
async fn the_root_key_leaves_the_host_and_a_new_intermediate_keeps_every_device_served() {
    let mut s = Stack::up().await;
    assert_eq!(s.get(APP, "/", Some("alice")).await.status, 200);
    let offline = s.w.path("offline-root.key");
    let state = s.w.state().to_owned();
    // The root key goes offline; the relay keeps signing with the intermediate.
    relay_ok(&[
        "ca",
        "export-root",
        "--state",
        &state,
        "--out",
        offline.to_str().unwrap(),
    ]);
    relay_ok(&["ca", "remove-root-key", "--state", &state]);
    assert!(!s.w.path("state/ca-root.key").exists());
    let out = relay_cli(&["ca", "export-root", "--state", &state, "--out", "/dev/null"]);
    assert!(!out.status.success());
    // A new intermediate from the offline key; after a restart the relay signs with it.
    relay_ok(&[
        "ca",
        "rotate-intermediate",
        "--state",
        &state,
        "--root-key",
        offline.to_str().unwrap(),
    ]);
    s.restart_relay(Duration::from_millis(100)).await;
    wait_for_connectors(s.addrs.admin, 1).await;
    // alice's certificate came from the old intermediate, carol's from the new one: both
    // are served, and nobody enrolled again.
    s.w.issue_device("carol", "carol", &["eng"], None);
    portcullis_e2e::wait_for_identity(s.addrs.admin, "device", "carol", true).await;
    for device in ["alice", "carol"] {
        let r = s.get(APP, "/", Some(device)).await;
        assert_eq!(r.status, 200, "{device}: {}", r.stderr);
    }
    let audit = s.w.admin(&["audit", "--action", "ca.rotate-intermediate"]);
    assert!(audit.lines().count() >= 2, "{audit}");
}
