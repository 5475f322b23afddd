//! "No inbound ports", proven: the origin and the connector run in a network namespace
//! whose nftables firewall drops every inbound new connection; the relay and the client
//! run outside it. Requests still reach the origin through the connector's outbound
//! tunnel, and a direct connection to the origin from outside fails.
//!
//! Needs root, `ip` and `nft`. Without them the test skips loudly, unless
//! `PORTCULLIS_REQUIRE_NETNS=1` (set by CI) makes that a failure.

#![allow(clippy::unwrap_used)]

use portcullis_e2e::{NetNs, World, curl_expect, netns_or_skip, wait_for_connectors};

#[tokio::test]
async fn origin_behind_a_firewall_that_drops_all_inbound_is_reachable_only_through_the_tunnel() {
    if !netns_or_skip("the zero-inbound-ports test") {
        return;
    }
    let ns = NetNs::create().expect("creating the test network namespace");
    let w = World::new();
    w.issue_connector("c1", &["app.internal"]);
    w.issue_device("alice", "alice", &["eng"], None);
    let (_origin, origin_addr) = w.start_origin_in(Some(&ns.name), "0.0.0.0:0").await;
    let origin_port = origin_addr.rsplit(':').next().unwrap().to_owned();
    w.write_relay_config(
        &format!("{}:0", ns.host_ip),
        "127.0.0.1:0",
        "127.0.0.1:0",
        "[[policy]]\nhostnames = [\"app.internal\"]\ngroups = [\"eng\"]\n",
    );
    let (_relay, addrs) = w.start_relay().await;
    let connector = w.start_connector_in(
        Some(&ns.name),
        "c1",
        &addrs.quic.to_string(),
        &[("app.internal", &format!("http://127.0.0.1:{origin_port}"))],
    );

    // Through the relay and the connector's outbound tunnel: works.
    wait_for_connectors(addrs.admin, 1).await;
    let r = curl_expect(&w, &addrs, "app.internal", "alice", 200).await;
    assert!(r.body.contains("pc-origin"), "{}", r.body);

    // The connector itself listens on no TCP port (its one UDP socket is a QUIC client's).
    let pid = connector.child.id().unwrap();
    let ss = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-ltnpH"])
        .output()
        .await
        .unwrap();
    let listeners = String::from_utf8_lossy(&ss.stdout);
    assert!(ss.status.success());
    assert!(
        !listeners.contains(&format!("pid={pid},")),
        "connector must not listen: {listeners}"
    );
    assert!(
        listeners.contains(&origin_port),
        "ss must see the origin: {listeners}"
    );

    // Directly from outside to the origin's namespace address: dropped.
    let direct = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "2",
            &format!("http://{}:{origin_port}/", ns.ns_ip),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        !direct.status.success(),
        "a direct connection to the origin must fail"
    );
    // ... although the origin does listen on that address (checked from inside).
    let inside = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "curl", "-sS", "--max-time", "5"])
        .arg(format!("http://{}:{origin_port}/", ns.ns_ip))
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&inside.stdout).contains("pc-origin"),
        "origin must be listening inside: {}",
        String::from_utf8_lossy(&inside.stderr)
    );
}
