//! Network namespaces for the tests that prove what the firewall allows: a namespace with
//! a veth link to the host and an nftables firewall, removed on drop.

use std::process::Command;

/// A namespace with a veth link to the host; removed (with its link) on drop.
pub struct NetNs {
    /// Its name, for `ip netns exec`.
    pub name: String,
    /// The host's end of the link.
    pub host_ip: String,
    /// The namespace's end.
    pub ns_ip: String,
}

/// Runs a command; its stderr as the error if it fails.
pub fn sh(args: &[&str]) -> Result<(), String> {
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
    /// Creates the namespace, its link and its firewall: inbound new connections dropped,
    /// outbound allowed (an `output` chain for tests to add drops to).
    pub fn create() -> Result<Self, String> {
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
             chain output {\n\
               type filter hook output priority 0; policy accept;\n\
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

/// Whether network-namespace tests can run here (root, `ip`, `nft`); why not.
pub fn netns_can_run() -> Result<(), String> {
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

impl NetNs {
    /// Drops UDP from the namespace to `ip:port` (a relay's QUIC port).
    pub fn block_udp_to(&self, ip: &str, port: u16) -> Result<(), String> {
        let port = port.to_string();
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "nft",
            "add",
            "rule",
            "inet",
            "portcullis_test",
            "output",
            "ip",
            "daddr",
            ip,
            "udp",
            "dport",
            &port,
            "drop",
        ])
    }

    /// Removes every drop [`NetNs::block_udp_to`] added.
    pub fn unblock(&self) -> Result<(), String> {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "nft",
            "flush",
            "chain",
            "inet",
            "portcullis_test",
            "output",
        ])
    }
}

/// Whether a network-namespace test may run; if not, says so loudly and the test returns,
/// unless `PORTCULLIS_REQUIRE_NETNS` (set by CI) makes that a failure.
pub fn netns_or_skip(what: &str) -> bool {
    match netns_can_run() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var_os("PORTCULLIS_REQUIRE_NETNS").is_none(),
                "network-namespace test required but cannot run: {why}"
            );
            eprintln!("\n!!! SKIPPED {what}: {why} (needs root, iproute2 and nftables)\n");
            false
        }
    }
}
