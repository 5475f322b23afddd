//! The relay's state directory (its SQLite store and access log) on a disk that fills up,
//! and seen read-only: the relay goes on serving with what it has, says once and clearly
//! what is wrong and what to do, refuses what needs a write with a reason, and loses
//! nothing already issued, revoked, spent or logged; when the disk is writable again,
//! everything works as before. A real tmpfs (root), real relay, connector, origin, curl.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use portcullis_e2e::{
    APP, POLICY, World, bin, curl, metric, relay_cli, relay_ok, wait_for_connectors,
};

const ANY: &str = "127.0.0.1:0";

/// A small tmpfs mounted over a directory (its contents copied in), unmounted on drop.
struct Disk {
    at: PathBuf,
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Disk {
    /// Mounts a tmpfs of `size` over `dir`, keeping what `dir` held.
    fn over(dir: &Path, size: &str) -> Self {
        let keep = dir.with_extension("orig");
        std::fs::rename(dir, &keep).unwrap();
        std::fs::create_dir(dir).unwrap();
        sh(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("portcullis-test")
            .arg(dir));
        let disk = Self { at: dir.to_owned() };
        sh(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", keep.display()))
            .arg(dir));
        disk
    }

    /// Writes a file until the disk has no space left.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.at.join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        // What is left is less than a chunk: take it too.
        while f.write_all(&chunk[..512]).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.at.join("filler")).unwrap();
    }

    /// `dir` seen read-only at `at` (a bind mount), unmounted on drop.
    fn read_only_view(dir: &Path, at: &Path) -> Self {
        std::fs::create_dir(at).unwrap();
        sh(Command::new("mount").arg("--bind").arg(dir).arg(at));
        let view = Self { at: at.to_owned() };
        sh(Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(at));
        view
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

fn can_mount() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root".into());
    }
    for tool in ["mount", "umount", "cp"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Err(format!("no {tool}"));
        }
    }
    Ok(())
}

/// Enrols a connector with `token` into a fresh directory; the command's output.
fn enrol(w: &World, token: &str, dir: &str) -> Output {
    std::fs::write(w.path("token"), token).unwrap();
    Command::new(bin("portcullis-connector"))
        .args(["enroll", "--token-file"])
        .arg(w.path("token"))
        .arg("--state")
        .arg(w.path(dir))
        .output()
        .unwrap()
}

/// `issue device NAME` against the store in `state`.
fn issue(w: &World, name: &str, state: &str) -> Output {
    relay_cli(&[
        "issue",
        "device",
        name,
        "--user",
        name,
        "--out",
        w.out(),
        "--state",
        state,
    ])
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Over at least `window` (longer than `[store] fail_closed_after`), every scrape finds
/// the store readable and nothing failed closed, and alice is served.
async fn keeps_serving(w: &World, addrs: &portcullis_e2e::RelayAddrs, window: Duration) {
    let start = Instant::now();
    let mut requests = 0;
    while start.elapsed() < window {
        assert_eq!(
            metric(addrs.admin, "portcullis_relay_store_failed_closed").await,
            Some(0)
        );
        assert_eq!(curl(w, addrs, APP, "/", Some("alice")).await.status, 200);
        requests += 1;
    }
    assert!(requests > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_then_read_only_state_disk_keeps_the_relay_serving_and_loses_nothing() {
    if let Err(why) = can_mount() {
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_NETNS").is_none(),
            "the state-disk test must run here but cannot: {why}"
        );
        eprintln!("\n!!! SKIPPED the state-disk test: {why} (needs root to mount a tmpfs)\n");
        return;
    }
    let w = World::new();
    let disk = Disk::over(&w.path("state"), "16m");
    w.issue_connector("c1", &[APP]);
    w.issue_device("alice", "alice", &["eng"], None);
    w.issue_device("mallory", "mallory", &["eng"], None);
    relay_ok(&["revoke", "device", "mallory", "--state", w.state()]);
    let (_origin, origin_addr) = w.start_origin().await;
    w.write_relay_config(
        ANY,
        ANY,
        ANY,
        &format!("[store]\nfail_closed_after = \"1s\"\n{POLICY}"),
    );
    let (relay, addrs) = w.start_relay().await;
    let relay_addr = addrs.quic.to_string();
    let token = |name: &str| {
        let out = relay_ok(&[
            "token",
            "create",
            "connector",
            name,
            "--hostname",
            APP,
            "--relay",
            &relay_addr,
            "--state",
            w.state(),
        ]);
        out.lines().last().unwrap().to_owned()
    };
    let while_full = token("c-full");
    let _connector = w.start_connector(
        "c1",
        &relay_addr,
        &[(APP, &format!("http://{origin_addr}"))],
    );
    wait_for_connectors(addrs.admin, 1).await;
    assert_eq!(
        curl(&w, &addrs, APP, "/before", Some("alice")).await.status,
        200
    );
    assert_ne!(
        curl(&w, &addrs, APP, "/", Some("mallory")).await.status,
        200
    );
    let access_log = w.path("state/access.log");
    let logged_before = std::fs::read_to_string(&access_log).unwrap();
    assert!(logged_before.contains("/before"));

    // Full.
    disk.fill();
    keeps_serving(&w, &addrs, Duration::from_secs(3)).await;
    assert_ne!(
        curl(&w, &addrs, APP, "/", Some("mallory")).await.status,
        200
    );
    let log = relay
        .wait_for_log("cannot write the access log", Duration::from_secs(10))
        .await;
    assert_eq!(
        log.matches("cannot write the access log").count(),
        1,
        "one line for the whole outage, not one per request:\n{log}"
    );
    // Issuing needs a write: refused, saying why and what to do.
    let out = issue(&w, "bob", w.state());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("full") && text(&out).contains("free space"),
        "{}",
        text(&out)
    );
    assert!(
        !Path::new(w.out()).join("bob.crt").exists(),
        "no certificate the relay does not know"
    );
    // So does revoking (alice stays served) and making a token.
    for out in [
        relay_cli(&["revoke", "device", "alice", "--state", w.state()]),
        relay_cli(&[
            "token",
            "create",
            "device",
            "--user",
            "dave",
            "--state",
            w.state(),
        ]),
    ] {
        assert!(!out.status.success());
        assert!(text(&out).contains("free space"), "{}", text(&out));
    }
    assert_eq!(curl(&w, &addrs, APP, "/", Some("alice")).await.status, 200);
    // Enrolment too; the token is not spent by the attempt.
    let out = enrol(&w, &while_full, "enrol-full-1");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refused"), "{}", text(&out));
    relay
        .wait_for_log("free space", Duration::from_secs(10))
        .await;

    // Space again: everything works, the token included, and the access log resumes.
    disk.free();
    assert!(issue(&w, "bob", w.state()).status.success());
    let out = enrol(&w, &while_full, "enrol-full-2");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        curl(&w, &addrs, APP, "/after-full", Some("alice"))
            .await
            .status,
        200
    );
    let logged = relay
        .wait_for_log("access log writable again", Duration::from_secs(10))
        .await;
    assert!(logged.contains("lines"), "{logged}");
    let access = std::fs::read_to_string(&access_log).unwrap();
    assert!(access.starts_with(&logged_before), "earlier lines lost");
    assert!(access.contains("/after-full"));

    // Read-only: the admin commands on a read-only view of the state directory (a bind
    // mount: a file system cannot be made read-only from user space under a relay that
    // has files open on it for writing, so the relay's own writes are covered by the full
    // disk above, whose writes fail the same way).
    let ro = w.path("state-ro");
    let _ro = Disk::read_only_view(&w.path("state"), &ro);
    let ro_state = ro.display().to_string();
    let out = issue(&w, "carol", &ro_state);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("read-only") && text(&out).contains("make it writable"),
        "{}",
        text(&out)
    );
    assert!(!Path::new(w.out()).join("carol.crt").exists());
    keeps_serving(&w, &addrs, Duration::from_secs(1)).await;

    // The same through the writable directory.
    assert!(issue(&w, "carol", w.state()).status.success());
    // Nothing issued or revoked was lost.
    let list = relay_ok(&["list", "--state", w.state()]);
    for name in ["alice", "bob", "carol", "c-full"] {
        assert!(list.contains(name), "{name} missing:\n{list}");
    }
    assert_ne!(
        curl(&w, &addrs, APP, "/", Some("mallory")).await.status,
        200
    );
    assert_eq!(curl(&w, &addrs, APP, "/", Some("alice")).await.status, 200);
}
