//! A connector given one relay name follows the relays behind it: an address added to the
//! name gets a tunnel, an address removed has its tunnel drained and closed, without a
//! restart. The name is resolved from a hosts file the test controls, bind-mounted over
//! `/etc/hosts` in a private mount namespace of the connector's own (`unshare`), so the
//! machine's own file is never touched; two relays listen on the same port of 127.0.0.1
//! and 127.0.0.2.
//!
//! Needs root (for the mount namespace); skips without it unless
//! `PORTCULLIS_REQUIRE_NETNS` is set (CI sets it, and runs as root).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::{APP, Daemon, POLICY, World, bin, eventually, wait_for_connectors};
use tokio::process::Command;

const NAME: &str = "relays.acme.test";

#[tokio::test]
async fn a_connector_follows_relays_added_to_and_removed_from_its_relay_name() {
    if !rustix::process::geteuid().is_root() {
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_NETNS").is_none(),
            "this test needs root for a private mount namespace"
        );
        eprintln!("skipping: needs root for a private mount namespace");
        return;
    }
    let w1 = World::new();
    w1.issue_connector("c1", &[APP]);
    // The second relay shares the first's state (keys and the connector's registration).
    let w2 = World::copy_of(&w1);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut relays = Vec::new();
    for (w, ip) in [(&w1, "127.0.0.1"), (&w2, "127.0.0.2")] {
        w.write_relay_config(
            &format!("{ip}:{port}"),
            &format!("{ip}:0"),
            &format!("{ip}:0"),
            POLICY,
        );
        relays.push(w.start_relay().await);
    }
    let (a1, a2) = (relays[0].1, relays[1].1);

    let hosts = w1.path("hosts");
    std::fs::write(&hosts, format!("127.0.0.1 {NAME}\n")).unwrap();
    let config = w1.write_connector_config(
        "c1",
        &format!("{NAME}:{port}"),
        &[(APP, "http://127.0.0.1:9")],
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("relay_resolve_interval = \"1s\"\n{text}")).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/hosts && exec {} run --config {}",
            hosts.display(),
            bin("portcullis-connector").display(),
            config.display()
        ));
    let connector = Daemon::spawn_logged(cmd, w1.path("c1.log"));
    wait_for_connectors(a1.admin, 1).await;
    wait_for_connectors(a2.admin, 0).await;

    // A relay added behind the name: a tunnel to it too. (Written in place: the bind
    // mount follows the file, not its name.)
    std::fs::write(&hosts, format!("127.0.0.1 {NAME}\n127.0.0.2 {NAME}\n")).unwrap();
    wait_for_connectors(a2.admin, 1).await;

    // The first removed: its tunnel is drained and closed; the second stays.
    std::fs::write(&hosts, format!("127.0.0.2 {NAME}\n")).unwrap();
    wait_for_connectors(a1.admin, 0).await;
    let log = eventually(Duration::from_secs(10), || async {
        let log = connector.log_text();
        log.contains("left the relay's name").then_some(log)
    })
    .await;
    assert!(log.is_some(), "{}", connector.log_text());
    assert_eq!(
        portcullis_e2e::metric(a2.admin, "portcullis_relay_connector_tunnels").await,
        Some(1)
    );
}
