//! "No inbound ports", proven: the origin and the connector run in a network namespace
//! whose nftables firewall drops every inbound new connection; the relay and the client
//! run outside it. Requests still reach the origin through the connector's outbound
//! tunnel, and a direct connection to the origin from outside fails.
//!
//! Needs root, `ip` and `nft`. Without them the test skips loudly, unless
//! `PORTCULLIS_REQUIRE_NETNS=1` (set by CI) makes that a failure.

#![allow(clippy::unwrap_used)]

use portcullis_e2e::{World, curl_expect, wait_for_connectors};
use std::process::Command;

/// A namespace with a veth link to the host; removed (with its link) on drop.
struct NetNs {
    name: String,
    host_ip: String,
    ns_ip: String,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    fn create() -> Result<Self, String> {
        let tag = format!("{:x}{:04x}", std::process::id() & 0xffff, fastrand_u16());
        let subnet = 1 + (fastrand_u16() % 250);
        let ns = Self {
            name: format!("pc-{tag}"),
            host_ip: format!("10.231.{subnet}.1"),
            ns_ip: format!("10.231.{subnet}.2"),
        };
        let (host_if, ns_if) = (format!("pch{tag}"), format!("pcn{tag}"));
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        sh(&["ip", "netns", "add", &ns.name])?;
        // From here on, Drop cleans up whatever was made.
        let n = ns.name.as_str();
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        sh(&["ip", "link", "set", &ns_if, "netns", n])?;
        sh(&["ip", "addr", "add", &host_cidr, "dev", &host_if])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        sh(&[
            "ip", "netns", "exec", n, "ip", "addr", "add", &ns_cidr, "dev", &ns_if,
        ])?;
        sh(&["ip", "netns", "exec", n, "ip", "link", "set", &ns_if, "up"])?;
        sh(&["ip", "netns", "exec", n, "ip", "link", "set", "lo", "up"])?;
        let ruleset = "table inet portcullis_test {\n\
             chain input {\n\
               type filter hook input priority 0; policy drop;\n\
               iif lo accept\n\
               ct state established,related accept\n\
             }\n\
           }\n";
        let rules = std::env::temp_dir().join(format!("{n}.nft"));
        std::fs::write(&rules, ruleset).map_err(|e| e.to_string())?;
        let loaded = sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "nft",
            "-f",
            rules.to_str().unwrap(),
        ]);
        let _ = std::fs::remove_file(&rules);
        loaded?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it ours.
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

fn fastrand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos ^ (nanos >> 16)) as u16
}

fn can_run() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    for tool in ["ip", "nft"] {
        sh(&["sh", "-c", &format!("command -v {tool}")])
            .map_err(|_| format!("{tool} not installed"))?;
    }
    Ok(())
}

#[tokio::test]
async fn origin_behind_a_firewall_that_drops_all_inbound_is_reachable_only_through_the_tunnel() {
    if let Err(why) = can_run() {
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_NETNS").is_none(),
            "network-namespace test required but cannot run: {why}"
        );
        eprintln!(
            "\n!!! SKIPPED the zero-inbound-ports test: {why} (needs root, iproute2 and nftables)\n"
        );
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
