//! The shipped alert rules fire on what the real daemons export: a relay, a connector and
//! an origin carry real traffic, the connector is stopped, and the relay's own scrape
//! (the hostname's replicas reading 0, its 502s counted under its name) becomes the input
//! of `promtool test rules`, which must see `PortcullisNoConnector` and
//! `PortcullisSuccessRateLow` fire. Every rule file passes `promtool check rules`, and the
//! plain scrape configuration passes `promtool check config`.
//!
//! promtool comes with Debian's `prometheus` package (`.ci/run` installs it); without it
//! the test skips, unless `PORTCULLIS_REQUIRE_PROMTOOL` is set.

#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use portcullis_e2e::{APP, Stack, metrics_text, wait_for_metric};

fn have_promtool() -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_PROMTOOL").is_none(),
            "promtool is required (Debian's prometheus package) but not installed"
        );
        eprintln!("\n!!! SKIPPED: promtool is not installed\n");
    }
    found
}

fn deploy(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn promtool_ok(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The samples of `family` in a scrape, as (series with its labels, value).
fn samples<'a>(scrape: &'a str, family: &str) -> Vec<(&'a str, f64)> {
    scrape
        .lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series, value.parse().ok()?))
        })
        .collect()
}

/// `series` (`name{labels}`) with the labels Prometheus adds to what it scrapes.
fn as_scraped(series: &str) -> String {
    let scrape = "instance=\"relay-1\",job=\"portcullis-relay\"";
    match series.split_once('{') {
        Some((name, labels)) => format!("{name}{{{scrape},{labels}"),
        None => format!("{series}{{{scrape}}}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_connector_fires_the_shipped_alerts_from_the_relays_real_series() {
    if !have_promtool() {
        return;
    }
    let rules = deploy("prometheus/portcullis-rules.yaml");
    promtool_ok(&["check", "rules", rules.to_str().unwrap()], Path::new("."));

    tokio::time::timeout(Duration::from_secs(120), async {
        let mut stack = Stack::up().await;
        let replicas = format!("portcullis_relay_hostname_replicas{{hostname=\"{APP}\"}}");
        let r = stack.get(APP, "/", Some("alice")).await;
        assert_eq!(r.status, 200, "{}", r.stderr);
        wait_for_metric(stack.addrs.admin, &replicas, "one connector for the app", |v| {
            v == Some(1)
        })
        .await;

        // The connector goes: the series reads 0 instead of vanishing, and requests to
        // the name are 502s counted under it.
        stack.connector.signal("KILL");
        stack.connector.wait(Duration::from_secs(10)).await;
        wait_for_metric(stack.addrs.admin, &replicas, "no connector for the app", |v| {
            v == Some(0)
        })
        .await;
        for _ in 0..3 {
            let r = stack.get(APP, "/", Some("alice")).await;
            assert_eq!(r.status, 502, "{}", r.stderr);
        }
        let scrape = metrics_text(stack.addrs.admin).await.unwrap();
        let five_xx = samples(&scrape, "portcullis_relay_requests_total")
            .into_iter()
            .filter(|(s, v)| {
                s.contains(&format!("hostname=\"{APP}\"")) && s.contains("class=\"5xx\"") && *v > 0.0
            })
            .collect::<Vec<_>>();
        assert!(!five_xx.is_empty(), "no 5xx counted under {APP}:\n{scrape}");

        // The scrape as Prometheus would hold it for 20 minutes: gauges as read, the
        // routed requests growing at the rate the test made them (all 5xx now), and the
        // relay answering its scrape.
        let mut series = String::new();
        let mut no_connector = String::new();
        for (s, v) in samples(&scrape, "portcullis_relay_hostname_replicas") {
            let _ = writeln!(
                series,
                "      - series: '{}'\n        values: '{v}x20'",
                as_scraped(s)
            );
            // Every name the stopped connector published reads 0, the app among them.
            assert_eq!(v, 0.0, "{s}");
            let host = s.split('"').nth(1).unwrap();
            let _ = write!(
                no_connector,
                "\x20         - exp_labels: {{severity: critical, hostname: '{host}', instance: relay-1, job: portcullis-relay}}\n\
                 \x20           exp_annotations:\n\
                 \x20             summary: \"{host} has no healthy connector on relay relay-1\"\n\
                 \x20             runbook_url: \"docs/operations.md#a-connector-is-down\"\n"
            );
        }
        assert!(no_connector.contains(&format!("hostname: '{APP}'")), "{scrape}");
        for (s, _) in &five_xx {
            let _ = writeln!(
                series,
                "      - series: '{}'\n        values: '0+60x20'",
                as_scraped(s)
            );
        }
        let _ = writeln!(
            series,
            "      - series: 'up{{instance=\"relay-1\",job=\"portcullis-relay\"}}'\n        values: '1x20'"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&rules, dir.path().join("rules.yaml")).unwrap();
        let test = format!(
            "rule_files: [rules.yaml]\n\
             evaluation_interval: 1m\n\
             tests:\n\
             \x20 - interval: 1m\n\
             \x20   input_series:\n{series}\
             \x20   alert_rule_test:\n\
             \x20     - eval_time: 15m\n\
             \x20       alertname: PortcullisNoConnector\n\
             \x20       exp_alerts:\n{no_connector}\
             \x20     - eval_time: 15m\n\
             \x20       alertname: PortcullisSuccessRateLow\n\
             \x20       exp_alerts:\n\
             \x20         - exp_labels: {{severity: critical, hostname: {APP}}}\n\
             \x20           exp_annotations:\n\
             \x20             summary: \"{APP}: 100% of requests fail (5xx)\"\n\
             \x20             runbook_url: \"docs/operations.md#requests-fail-5xx\"\n\
             \x20     - eval_time: 15m\n\
             \x20       alertname: PortcullisRelayDown\n\
             \x20       exp_alerts: []\n"
        );
        std::fs::write(dir.path().join("test.yaml"), &test).unwrap();
        let said = promtool_ok(&["test", "rules", "test.yaml"], dir.path());
        assert!(said.contains("SUCCESS"), "{said}\n{test}");

        // And a relay that stops answering its scrape.
        let down = "rule_files: [rules.yaml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n      - series: 'up{instance=\"relay-1\",job=\"portcullis-relay\"}'\n        values: '1 1 0x10'\n    alert_rule_test:\n      - eval_time: 10m\n        alertname: PortcullisRelayDown\n        exp_alerts:\n          - exp_labels: {severity: critical, instance: relay-1, job: portcullis-relay}\n            exp_annotations:\n              summary: \"relay relay-1 does not answer its scrape\"\n              runbook_url: \"docs/operations.md#a-relay-does-not-answer\"\n";
        std::fs::write(dir.path().join("down.yaml"), down).unwrap();
        promtool_ok(&["test", "rules", "down.yaml"], dir.path());
    })
    .await
    .expect("the test timed out");

    // The plain scrape configuration, with its token files where it expects them.
    let dir = tempfile::tempdir().unwrap();
    let scrape = std::fs::read_to_string(deploy("prometheus/scrape.yaml"))
        .unwrap()
        .replace("/etc/prometheus/secrets", dir.path().to_str().unwrap());
    for who in ["portcullis-relay-admin", "portcullis-connector-admin"] {
        std::fs::create_dir_all(dir.path().join(who)).unwrap();
        std::fs::write(dir.path().join(who).join("token"), "t0ken-of-sixteen-chars").unwrap();
    }
    std::fs::write(dir.path().join("prometheus.yml"), scrape).unwrap();
    promtool_ok(&["check", "config", "prometheus.yml"], dir.path());
}

/// Every other shipped rule fires on the series, named and labelled as the daemons export
/// them and as Prometheus scrapes them, that its runbook describes.
#[test]
fn each_shipped_rule_fires_on_the_series_it_watches() {
    if !have_promtool() {
        return;
    }
    let relay = "instance: relay-1, job: portcullis-relay";
    let connector = "instance: connector-1, job: portcullis-connector";
    let r = "instance=\"relay-1\",job=\"portcullis-relay\"";
    let c = "instance=\"connector-1\",job=\"portcullis-connector\"";
    // (alert, input series, expected labels, summary, runbook anchor)
    let cases = [
        (
            "PortcullisRelayAbsent",
            format!("      - series: 'up{{{r}}}'\n        values: '0x20'\n"),
            // absent() of a comparison keeps no label of the series.
            String::new(),
            "no relay answers its scrape".to_owned(),
            "a-relay-does-not-answer",
        ),
        (
            "PortcullisConnectorAbsent",
            format!("      - series: 'up{{{c}}}'\n        values: '0x20'\n"),
            String::new(),
            "no connector answers its scrape".to_owned(),
            "a-connector-is-down",
        ),
        (
            "PortcullisConnectorDown",
            format!("      - series: 'up{{{c}}}'\n        values: '0x20'\n"),
            connector.to_owned(),
            "connector connector-1 does not answer its scrape".to_owned(),
            "a-connector-is-down",
        ),
        (
            "PortcullisStoreFailedClosed",
            format!("      - series: 'portcullis_relay_store_failed_closed{{{r}}}'\n        values: '1x20'\n"),
            relay.to_owned(),
            "relay relay-1 has failed closed: it refuses every device and connector until it reads its store".to_owned(),
            "the-store-is-unreachable",
        ),
        (
            "PortcullisStoreUnreadable",
            format!("      - series: 'portcullis_relay_store_unreadable{{{r}}}'\n        values: '1x20'\n"),
            relay.to_owned(),
            "relay relay-1 cannot read its store (enrolment and renewal refused)".to_owned(),
            "the-store-is-unreachable",
        ),
        (
            "PortcullisRelayReloadFailed",
            format!("      - series: 'portcullis_relay_config_reloads_total{{{r},result=\"refused\"}}'\n        values: '0 0 1 1 1 1 1 1 1 1 1'\n"),
            format!("{relay}, result: refused"),
            "relay relay-1 refused a new relay.toml and runs the previous one".to_owned(),
            "a-reload-was-refused",
        ),
        (
            "PortcullisConnectorReloadFailed",
            format!("      - series: 'portcullis_connector_reloads_total{{{c},result=\"refused\"}}'\n        values: '0 0 1 1 1 1 1 1 1 1 1'\n"),
            format!("{connector}, result: refused"),
            "connector connector-1 refused a new connector.toml or certificate and runs the previous one".to_owned(),
            "a-reload-was-refused",
        ),
        (
            "PortcullisConnectorRenewalFailing",
            format!(
                "      - series: 'portcullis_connector_renewals_total{{{c},result=\"failed\"}}'\n        values: '0+1x90'\n\
                 \x20     - series: 'portcullis_connector_renewals_total{{{c},result=\"ok\"}}'\n        values: '3x90'\n"
            ),
            format!("{connector}, result: failed"),
            "connector connector-1 cannot renew its certificate".to_owned(),
            "a-certificate-is-about-to-expire",
        ),
        (
            "PortcullisOverloaded",
            format!("      - series: 'portcullis_relay_overload_shed_total{{{r},work=\"request\"}}'\n        values: '0+5x20'\n"),
            "instance: relay-1, work: request".to_owned(),
            "relay relay-1 is overloaded and turns request away".to_owned(),
            "the-relay-is-overloaded",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        deploy("prometheus/portcullis-rules.yaml"),
        dir.path().join("rules.yaml"),
    )
    .unwrap();
    let mut tests = String::from("rule_files: [rules.yaml]\nevaluation_interval: 1m\ntests:\n");
    for (alert, series, labels, summary, anchor) in &cases {
        let severity = if matches!(
            *alert,
            "PortcullisRelayAbsent" | "PortcullisStoreFailedClosed" | "PortcullisStoreUnreadable"
        ) {
            "critical"
        } else {
            "warning"
        };
        let labels = if labels.is_empty() {
            format!("severity: {severity}")
        } else {
            format!("severity: {severity}, {labels}")
        };
        let eval = if *alert == "PortcullisConnectorRenewalFailing" {
            "75m"
        } else {
            "10m"
        };
        tests.push_str(&format!(
            "  - interval: 1m\n    input_series:\n{series}    alert_rule_test:\n\
             \x20     - eval_time: {eval}\n        alertname: {alert}\n        exp_alerts:\n\
             \x20         - exp_labels: {{{labels}}}\n            exp_annotations:\n\
             \x20             summary: \"{summary}\"\n\
             \x20             runbook_url: \"docs/operations.md#{anchor}\"\n"
        ));
    }
    std::fs::write(dir.path().join("each.yaml"), &tests).unwrap();
    promtool_ok(&["test", "rules", "each.yaml"], dir.path());
}
