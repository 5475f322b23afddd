//! A connector left running for years: its certificate renewed before it expires, its
//! ingress rules reloaded on SIGHUP and when connector.toml changes (a broken file refused,
//! the running rules kept), all while requests flow, none of them failing; and its admin
//! listener's health, readiness and metrics. Real relay, connector, origin and curl.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis_e2e::{
    APP, Daemon, POLICY, RelayAddrs, Stack, World, admin_get, curl, eventually, metric,
    metrics_text, wait_for_connectors,
};

const ANY: &str = "127.0.0.1:0";

/// The expiry (Unix seconds) of the first certificate in the PEM file at `path`.
fn not_after(path: &Path) -> i64 {
    let certs = portcullis_shared::pki::load_certs(path).unwrap();
    portcullis_shared::pki::inspect(&certs[0])
        .unwrap()
        .not_after
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The admin listener's address, from the connector's log line.
async fn admin_addr(connector: &Daemon) -> std::net::SocketAddr {
    let log = connector
        .wait_for_log("admin listener", Duration::from_secs(20))
        .await;
    let line = log.lines().find(|l| l.contains("admin listener")).unwrap();
    let at = line.find("admin=").unwrap() + "admin=".len();
    line[at..]
        .split(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '}')
        .find(|s| !s.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

/// GETs `host` as alice from `workers` tasks at once until `stop` is set; every answer
/// that is not 200 is kept with what curl said.
fn load(
    w: &Arc<World>,
    addrs: RelayAddrs,
    host: &'static str,
    workers: usize,
    stop: &Arc<AtomicBool>,
) -> (Arc<AtomicU32>, tokio::task::JoinHandle<Vec<String>>) {
    let done = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (w, stop, done) = (w.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                // Bounded: at most 5,000 requests a worker, whatever happens to `stop`.
                for _ in 0..5_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = curl(&w, &addrs, host, "/", Some("alice")).await;
                    if r.status != 200 {
                        failures.push(format!("{} {} {}", r.status, r.body, r.stderr));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();
    let all = tokio::spawn(async move {
        let mut failures = Vec::new();
        for t in tasks {
            failures.extend(t.await.unwrap());
        }
        failures
    });
    (done, all)
}

/// Waits until `n` more requests than `from` have been answered.
async fn until_answered(done: &AtomicU32, from: u32, n: u32) {
    let ok = eventually(Duration::from_secs(60), || async {
        (done.load(Ordering::Relaxed) >= from + n).then_some(())
    })
    .await;
    assert!(ok.is_some(), "the load stopped making progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_renews_its_certificate_before_it_expires_while_requests_flow_without_a_failure()
 {
    let w = Arc::new(World::new());
    w.admin(&[
        "issue",
        "connector",
        "c1",
        "--hostname",
        APP,
        "--ttl",
        "6s",
        "--out",
        w.out(),
    ]);
    w.issue_device("alice", "alice", &["eng"], None);
    let (_origin, origin_addr) = w.start_origin().await;
    w.write_relay_config(ANY, ANY, ANY, POLICY);
    let (_relay, addrs) = w.start_relay().await;
    let service = format!("http://{origin_addr}");
    let path = w.write_connector_config("c1", &addrs.quic.to_string(), &[(APP, &service)]);
    let connector = w.run_connector(None, "c1", &path);
    wait_for_connectors(addrs.admin, 1).await;
    let cert = Path::new(w.out()).join("c1.crt");
    let first = not_after(&cert);
    let stop = Arc::new(AtomicBool::new(false));
    let (done, load) = load(&w, addrs, APP, 2, &stop);
    // Requests flow past the first certificate's expiry, by which time it has been renewed
    // (at two thirds, 4 s) and the tunnel moved to the new one; the relay cuts every
    // connection at its certificate's expiry, so a tunnel left on the old one would fail
    // requests here.
    let past = eventually(Duration::from_secs(30), || async {
        (unix_now() > first + 2).then_some(())
    })
    .await;
    assert!(past.is_some());
    let before = done.load(Ordering::Relaxed);
    until_answered(&done, before, 20).await;
    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during renewal, first: {}\n{}",
        failures.len(),
        done.load(Ordering::Relaxed),
        failures[0],
        connector.log_text()
    );
    assert!(
        not_after(&cert) > first + 1,
        "the certificate file was not renewed: {}",
        connector.log_text()
    );
    assert!(connector.log_text().contains("certificate renewed"));
    assert_eq!(curl(&w, &addrs, APP, "/", Some("alice")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_reloads_its_ingress_rules_under_load_without_failing_a_request_and_refuses_a_broken_file()
 {
    let s = Stack::up().await;
    let path = s.w.path("c1.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    // A new exact rule under the wildcard: before the reload its name reaches the origin
    // through *.eng.internal; after it, the connector sends it to a port where nothing
    // listens (a 502 from the connector shows the new rule is in force).
    const ADDED: &str = "added.eng.internal";
    assert_eq!(s.get(ADDED, "/", Some("alice")).await.status, 200);
    // The load's own copy of the client files: its tasks outlive a borrow of the stack.
    let w = Arc::new(World::copy_of(&s.w));
    let stop = Arc::new(AtomicBool::new(false));
    let (done, load) = load(&w, s.addrs, APP, 3, &stop);
    until_answered(&done, 0, 20).await;
    let added =
        format!("{good}[[ingress]]\nhostname = \"{ADDED}\"\nservice = \"http://127.0.0.1:9\"\n");
    // The file changes: picked up without a signal (a ConfigMap being re-mounted).
    std::fs::write(&path, &added).unwrap();
    let reloaded = eventually(Duration::from_secs(20), || async {
        let r = s.get(ADDED, "/", Some("alice")).await;
        (r.status == 502).then_some(())
    })
    .await;
    assert!(
        reloaded.is_some(),
        "the new rule never took effect: {}",
        s.connector.log_text()
    );
    until_answered(&done, done.load(Ordering::Relaxed), 20).await;
    // A broken file is refused; the running rules stay and requests keep succeeding.
    std::fs::write(&path, format!("{added}[[ingress]]\nhostname = ")).unwrap();
    s.connector.signal("HUP");
    s.connector
        .wait_for_log("reload refused", Duration::from_secs(20))
        .await;
    until_answered(&done, done.load(Ordering::Relaxed), 20).await;
    assert_eq!(s.get(ADDED, "/", Some("alice")).await.status, 502);
    // The certificate replaced by garbage: refused too, the tunnel keeps the one it has.
    let cert = Path::new(s.w.out()).join("c1.crt");
    let good_cert = std::fs::read(&cert).unwrap();
    let refusals = |log: &str| log.matches("reload refused").count();
    let before = refusals(&s.connector.log_text());
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    let refused = eventually(Duration::from_secs(20), || async {
        (refusals(&s.connector.log_text()) > before).then_some(())
    })
    .await;
    assert!(refused.is_some(), "{}", s.connector.log_text());
    until_answered(&done, done.load(Ordering::Relaxed), 20).await;
    std::fs::write(&cert, &good_cert).unwrap();
    // Back to the first file, on SIGHUP: the name goes back to the wildcard's origin.
    std::fs::write(&path, &good).unwrap();
    s.connector.signal("HUP");
    let back = eventually(Duration::from_secs(20), || async {
        let r = s.get(ADDED, "/", Some("alice")).await;
        (r.status == 200).then_some(())
    })
    .await;
    assert!(back.is_some(), "{}", s.connector.log_text());
    until_answered(&done, done.load(Ordering::Relaxed), 20).await;
    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the reloads, first: {}\n{}",
        failures.len(),
        done.load(Ordering::Relaxed),
        failures[0],
        s.connector.log_text()
    );
    // One connector still: each replaced connection drained and closed.
    wait_for_connectors(s.addrs.admin, 1).await;
}

#[tokio::test]
async fn the_connector_admin_listener_serves_health_readiness_and_metrics_after_real_traffic() {
    let w = World::new();
    w.issue_connector("c1", &[APP]);
    w.issue_device("alice", "alice", &["eng"], None);
    let (_origin, origin_addr) = w.start_origin().await;
    w.write_relay_config(ANY, ANY, ANY, POLICY);
    let (mut relay, addrs) = w.start_relay().await;
    let service = format!("http://{origin_addr}");
    let path = w.write_connector_config("c1", &addrs.quic.to_string(), &[(APP, &service)]);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("admin_listen = \"127.0.0.1:0\"\n{text}")).unwrap();
    let connector = w.run_connector(None, "c1", &path);
    let admin = admin_addr(&connector).await;
    assert_eq!(admin_get(admin, "/healthz").await.unwrap().0, 200);
    wait_for_connectors(addrs.admin, 1).await;
    let ready = eventually(Duration::from_secs(10), || async {
        (admin_get(admin, "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "/readyz never said ready");
    for _ in 0..3 {
        assert_eq!(curl(&w, &addrs, APP, "/", Some("alice")).await.status, 200);
    }
    let text = metrics_text(admin).await.unwrap();
    for series in [
        "portcullis_connector_tunnels{state=\"up\"} 1",
        "portcullis_connector_origin_responses_total{rule=\"app.internal\",class=\"2xx\"} 3",
        "portcullis_connector_origin_latency_seconds_count{rule=\"app.internal\"} 3",
        "portcullis_connector_streams_total 3",
        "portcullis_connector_reloads_total{result=\"refused\"} 0",
    ] {
        assert!(text.contains(series), "no {series} in\n{text}");
    }
    let expiry = metric(
        admin,
        "portcullis_connector_certificate_expiry_timestamp_seconds",
    )
    .await
    .unwrap();
    assert!(expiry > unix_now() + 300 * 86_400, "{expiry}");
    // The relay gone: not ready, though still alive.
    relay.signal("KILL");
    relay.wait(Duration::from_secs(5)).await;
    let unready = eventually(Duration::from_secs(15), || async {
        (admin_get(admin, "/readyz").await?.0 == 503).then_some(())
    })
    .await;
    assert!(unready.is_some(), "/readyz must fail without a tunnel");
    assert_eq!(admin_get(admin, "/healthz").await.unwrap().0, 200);
}

/// A connector as a pod of a StatefulSet runs it: `run --enroll-token-file` with a
/// configuration whose key, certificate and CA live on an empty volume. The first start
/// enrols with the token and writes them there; the certificate then renews itself in
/// place; a restart finds them and does not use the (spent) token again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_enrols_with_its_token_on_first_start_then_renews_and_restarts_on_its_own_files()
 {
    let w = World::new();
    w.issue_device("alice", "alice", &["eng"], None);
    let (_origin, origin_addr) = w.start_origin().await;
    w.write_relay_config(ANY, ANY, ANY, POLICY);
    let (_relay, addrs) = w.start_relay().await;
    let relay = addrs.quic.to_string();
    let out = w.admin(&[
        "token",
        "create",
        "connector",
        "web-0",
        "--hostname",
        APP,
        "--cert-ttl",
        "6s",
        "--relay",
        &relay,
    ]);
    let token = w.path("web-0.token");
    std::fs::write(&token, out.lines().last().unwrap()).unwrap();

    // The volume is empty; connector.toml (a ConfigMap) points into it.
    let volume = w.path("volume");
    let config = w.path("web-0.toml");
    std::fs::write(
        &config,
        format!(
            "relay = {relay:?}\nserver_name = \"relay.acme.test\"\n\
             ca = \"volume/ca.crt\"\ncert = \"volume/connector.crt\"\nkey = \"volume/connector.key\"\n\
             [[ingress]]\nhostname = \"{APP}\"\nservice = \"http://{origin_addr}\"\n"
        ),
    )
    .unwrap();
    let run = |log: &str| {
        let mut cmd = tokio::process::Command::new(portcullis_e2e::bin("portcullis-connector"));
        cmd.args(["run", "--config"])
            .arg(&config)
            .arg("--enroll-token-file")
            .arg(&token);
        Daemon::spawn_logged(cmd, w.path(log))
    };
    let mut first = run("web-0.log");
    first
        .wait_for_log("enrolled with the token", Duration::from_secs(20))
        .await;
    wait_for_connectors(addrs.admin, 1).await;
    assert_eq!(curl(&w, &addrs, APP, "/", Some("alice")).await.status, 200);
    let cert = volume.join("connector.crt");
    let issued = not_after(&cert);
    // Renewed in place on the volume, at two thirds of its 6 s.
    first
        .wait_for_log("certificate renewed", Duration::from_secs(20))
        .await;
    assert!(not_after(&cert) > issued, "{}", first.log_text());
    first.signal("TERM");
    assert!(first.wait(Duration::from_secs(20)).await.success());

    // A restart: the files are there, the token is not used again (it is spent: using it
    // would fail), and the connector serves with its renewed certificate.
    let second = run("web-0-again.log");
    let registered = eventually(Duration::from_secs(20), || async {
        (curl(&w, &addrs, APP, "/", Some("alice")).await.status == 200).then_some(())
    })
    .await;
    assert!(registered.is_some(), "{}", second.log_text());
    assert!(!second.log_text().contains("enrolled with the token"));

    // A key without its certificate is refused with what to do.
    std::fs::remove_file(&cert).unwrap();
    second.signal("TERM");
    let mut broken = run("web-0-broken.log");
    assert!(!broken.wait(Duration::from_secs(20)).await.success());
    let said = broken.log_text();
    assert!(
        said.contains("restore the certificate") && said.contains("connector.key"),
        "{said}"
    );
}

/// Beyond loopback the connector's admin listener must ask for a bearer token: a
/// configuration without one is refused, and with one every request but the probes
/// (when spared) needs it.
#[tokio::test]
async fn a_remote_connector_admin_listener_wants_its_bearer_token() {
    use portcullis_e2e::admin_get_with;
    let w = World::new();
    w.issue_connector("c1", &[APP]);
    let (_origin, origin_addr) = w.start_origin().await;
    w.write_relay_config(ANY, ANY, ANY, POLICY);
    let (_relay, addrs) = w.start_relay().await;
    let service = format!("http://{origin_addr}");
    let path = w.write_connector_config("c1", &addrs.quic.to_string(), &[(APP, &service)]);
    let text = std::fs::read_to_string(&path).unwrap();

    // Remote without a token: refused at the start, with the reason.
    let remote = "admin_listen = \"0.0.0.0:0\"\nadmin_allow_remote = true\n";
    std::fs::write(&path, format!("{remote}{text}")).unwrap();
    let out = std::process::Command::new(portcullis_e2e::bin("portcullis-connector"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("admin_token_file"),
        "{err}"
    );

    // With a token (the probes spared): a scrape without it or with a wrong one gets 401.
    let token = "0123456789abcdef-admin";
    std::fs::write(w.path("admin.token"), format!("{token}\n")).unwrap();
    let with_token = format!(
        "{remote}admin_token_file = {:?}\nadmin_probes_without_token = true\n",
        w.path("admin.token").display().to_string()
    );
    std::fs::write(&path, format!("{with_token}{text}")).unwrap();
    let connector = w.run_connector(None, "c1", &path);
    let admin = admin_addr(&connector).await;
    let admin = std::net::SocketAddr::new([127, 0, 0, 1].into(), admin.port());
    assert_eq!(
        admin_get_with(admin, "/metrics", None).await.unwrap().0,
        401
    );
    let wrong = Some("0123456789abcdef-wrong");
    assert_eq!(
        admin_get_with(admin, "/metrics", wrong).await.unwrap().0,
        401
    );
    let (status, body) = admin_get_with(admin, "/metrics", Some(token))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("portcullis_connector_tunnels"), "{body}");
    assert_eq!(
        admin_get_with(admin, "/healthz", None).await.unwrap().0,
        200
    );
}
