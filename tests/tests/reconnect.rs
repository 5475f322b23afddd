//! Reconnecting without a storm: 500 connector tunnels (one connector library instance
//! each, all in this test process) to a relay process that is killed and started again on
//! the same ports. Every tunnel is back within 10 s, their returns are spread out rather
//! than all in the same instant, and the relay's CPU while they return is reported.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use portcullis_e2e::{APP, POLICY, World, cpu_seconds, metric, wait_for_metric};
use portcullis_shared::config::ConnectorConfig;
use portcullis_shared::shutdown::Shutdown;

const ANY: &str = "127.0.0.1:0";
const TUNNELS: i64 = 500;
const CONNECTORS: &str = "portcullis_relay_connector_tunnels";

// Slow and CPU-hungry (500 debug-build handshakes): run alone, by name, after the rest
// (see tests/run).
#[ignore = "slow: run by name in tests/run"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_tunnels_are_back_within_ten_seconds_of_a_relay_restart_spread_out() {
    let w = World::new();
    w.issue_connector("fleet", &[APP]);
    w.write_relay_config(ANY, ANY, ANY, POLICY);
    let (mut relay, addrs) = w.start_relay().await;
    let path = w.write_connector_config(
        "fleet",
        &addrs.quic.to_string(),
        &[(APP, "http://127.0.0.1:9")],
    );
    let mut config = ConnectorConfig::load(&path).unwrap();
    config.status_file = None;
    let shutdown = Shutdown::new();
    let fleet: Vec<_> = (0..TUNNELS)
        .map(|_| tokio::spawn(portcullis_connector::run(config.clone(), shutdown.clone())))
        .collect();
    wait_for_metric(addrs.admin, CONNECTORS, "500 tunnels up", |v| {
        v == Some(TUNNELS)
    })
    .await;

    // Killed: no drain, every tunnel lost at once. Back on the same ports.
    relay.signal("KILL");
    relay.wait(Duration::from_secs(5)).await;
    let (quic, https, admin) = (
        addrs.quic.to_string(),
        addrs.https.to_string(),
        addrs.admin.to_string(),
    );
    w.write_relay_config(&quic, &https, &admin, POLICY);
    let (relay, _) = w.start_relay().await;
    let pid = relay.child.id().unwrap();
    let back_at = Instant::now();
    let cpu_before = cpu_seconds(pid);
    // The count of tunnels back, sampled every 100 ms (the interval of this bounded wait).
    let mut samples: Vec<(Duration, i64)> = Vec::new();
    while back_at.elapsed() < Duration::from_secs(30) {
        let n = metric(addrs.admin, CONNECTORS).await.unwrap_or(0);
        samples.push((back_at.elapsed(), n));
        if n >= TUNNELS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = cpu_seconds(pid) - cpu_before;
    let when = |share: i64| {
        samples
            .iter()
            .find(|(_, n)| *n * 100 >= TUNNELS * share)
            .map(|(t, _)| *t)
    };
    let (p10, p50, p90, all) = (when(10), when(50), when(90), when(100));
    eprintln!(
        "500 tunnels after a relay restart: 10% back at {p10:?}, 50% at {p50:?}, 90% at {p90:?}, all at {all:?}; relay CPU {cpu:.2} s meanwhile"
    );
    let all = all.unwrap_or_else(|| panic!("not all tunnels came back: {samples:?}"));
    assert!(all < Duration::from_secs(10), "all back only after {all:?}");
    // Spread: the first tenth and the last tenth did not return in the same instant.
    let (p10, p90) = (p10.unwrap(), p90.unwrap());
    assert!(
        p90 - p10 >= Duration::from_millis(500),
        "returns not spread: {samples:?}"
    );
    shutdown.trigger();
    for f in fleet {
        let _ = tokio::time::timeout(Duration::from_secs(20), f).await;
    }
}
