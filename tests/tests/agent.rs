//! The employee agent, end to end with the real binaries: token enrolment (good and bad
//! tokens), `up` with the proxy, PAC and DNS stub, TCP forwards, `ssh-proxy`, status,
//! renewal, revocation, roaming (connection migration mid-download), relay restart,
//! logout; and connector enrolment.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use portcullis_e2e::{
    APP, DB, Daemon, Impairment, Stack, UdpPath, World, bin, curl_expect, eventually, relay_ok,
    wait_for_connectors,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// A port that was free a moment ago, for sshd, which cannot report the one it bound.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Creates a device token for `user` (group eng) and writes it to a file.
fn device_token(s: &Stack, user: &str, extra: &[&str]) -> PathBuf {
    let relay = s.addrs.quic.to_string();
    let mut args = vec![
        "token", "create", "device", "--user", user, "--group", "eng",
    ];
    args.extend(["--relay", &relay, "--state", s.w.state()]);
    args.extend(extra);
    let out = relay_ok(&args);
    let token = out.lines().last().unwrap().to_owned();
    assert!(token.starts_with("pct1_"), "{out}");
    let path = s.w.path(&format!("{user}.token"));
    std::fs::write(&path, token).unwrap();
    path
}

fn agent(home: &Path) -> Command {
    let mut cmd = Command::new(bin("portcullis"));
    cmd.arg("--home")
        .arg(home)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// `portcullis tcp TARGET --listen 127.0.0.1:0`, running, and the address it listens on.
async fn forward(s: &Stack, home: &Path, target: &str) -> (Daemon, std::net::SocketAddr) {
    let ready = s.w.path("tcp.ready");
    let mut cmd = agent(home);
    cmd.args(["tcp", target, "--listen", "127.0.0.1:0"])
        .arg("--ready-file")
        .arg(&ready);
    let mut fwd = Daemon::spawn_logged(cmd, s.w.path("tcp.log"));
    let v: serde_json::Value = serde_json::from_str(&fwd.wait_ready_file(&ready).await).unwrap();
    let listen = v["listen"].as_str().unwrap().parse().unwrap();
    (fwd, listen)
}

async fn enroll(home: &Path, token: &Path, store: &str) -> std::process::Output {
    enroll_with(home, token, store, &[]).await
}

async fn enroll_with(
    home: &Path,
    token: &Path,
    store: &str,
    extra: &[&str],
) -> std::process::Output {
    agent(home)
        .args(["enroll", "--key-store", store])
        .args(extra)
        .arg("--token-file")
        .arg(token)
        .output()
        .await
        .unwrap()
}

/// `portcullis up`, running.
struct Up {
    /// The agent process.
    agent: Daemon,
    /// Its proxy's port.
    port: u16,
    /// Its DNS stub's port, if asked for one (`--dns 127.0.0.1:0`).
    dns: Option<u16>,
}

/// Starts `portcullis up` with its proxy on a port of its choosing and returns once its
/// ready file says it is listening.
async fn up(s: &Stack, home: &Path, extra: &[&str]) -> Up {
    let ready = s.w.path("agent.ready");
    let mut cmd = agent(home);
    cmd.args(["up", "--proxy", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .args(extra);
    let mut agent = Daemon::spawn_logged(cmd, s.w.path("agent.log"));
    let v: serde_json::Value = serde_json::from_str(&agent.wait_ready_file(&ready).await).unwrap();
    let port = |k: &str| {
        v[k].as_str()
            .map(|a| a.parse::<std::net::SocketAddr>().unwrap().port())
    };
    Up {
        port: port("proxy").unwrap(),
        dns: port("dns"),
        agent,
    }
}

/// GET through the agent's proxy with curl: (status, body).
async fn proxy_get(port: u16, url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-x",
            &format!("http://127.0.0.1:{port}"),
        ])
        .args(["-o", "-", "-w", "\n%{http_code}", url])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test]
async fn a_device_enrols_with_one_token_and_reaches_private_web_and_tcp_services() {
    let s = Stack::up().await;
    let token = device_token(&s, "carol", &[]);
    let home = s.w.path("carol-home");
    let out = enroll(&home, &token, "file").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.join("device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let Up {
        agent: _agent,
        port,
        dns,
    } = up(&s, &home, &["--dns", "127.0.0.1:0"]).await;
    let dns_port = dns.expect("the DNS stub's address in the ready file");
    // A private web page, with the device's identity.
    let (code, body) = proxy_get(port, &format!("http://{APP}/via-agent")).await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["portcullis-user"], "carol");
    assert!(
        v["headers"]["portcullis-device"]
            .as_str()
            .unwrap()
            .starts_with("carol_")
    );
    // https:// through the proxy: TLS inside the CONNECT ends at the relay with its
    // org-CA leaf, and the identity is the agent's connection's.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-x",
            &format!("http://127.0.0.1:{port}"),
        ])
        .args(["--cacert", &format!("{}/ca.crt", s.w.out())])
        .arg(format!("https://{APP}/via-https"))
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["path"], "/via-https");
    assert_eq!(v["headers"]["portcullis-user"], "carol");
    // ws:// through the proxy: the handshake by hand (a proxy request is absolute-form),
    // then tungstenite speaks WebSocket on the same connection.
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        portcullis_e2e::ws_handshake(&mut tcp, &format!("http://{APP}/ws"), APP).await;
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            tcp,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        for i in 0..5 {
            let text = format!("via the agent {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
        }
    }
    // Not a private name: refused, with a clear message (no open proxy).
    let (code, body) = proxy_get(port, "http://example.com/").await;
    assert_eq!(code, 403);
    assert!(
        body.contains("not one of your organisation's private names"),
        "{body}"
    );
    assert!(body.contains("no permission for example.com"), "{body}");
    // The PAC file lists the private names.
    let pac = Command::new("curl")
        .args(["-sS", &format!("http://127.0.0.1:{port}/proxy.pac")])
        .output()
        .await
        .unwrap();
    let pac = String::from_utf8_lossy(&pac.stdout);
    assert!(
        pac.contains("FindProxyForURL") && pac.contains("\"app.internal\""),
        "{pac}"
    );
    assert!(
        pac.contains("dnsDomainIs(host, \".eng.internal\")"),
        "{pac}"
    );
    // The DNS stub answers private names and refuses the rest.
    assert_eq!(
        dns_query(dns_port, "db.internal").await,
        (0, vec![[127, 0, 0, 1]])
    );
    assert_eq!(dns_query(dns_port, "example.com").await.0, 5);

    // A TCP forward, 50 connections at once, to the TCP echo service.
    let echo_port = s.w.echo_addr().rsplit(':').next().unwrap().to_owned();
    let (fwd, listen) = forward(&s, &home, &format!("{DB}:{echo_port}")).await;
    let listen = listen.port();
    let conns: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = tokio::net::TcpStream::connect(("127.0.0.1", listen))
                    .await
                    .unwrap();
                let msg = format!("connection {i} says hello").repeat(100);
                c.write_all(msg.as_bytes()).await.unwrap();
                c.shutdown().await.unwrap();
                let mut back = String::new();
                c.read_to_string(&mut back).await.unwrap();
                assert_eq!(back, msg);
            })
        })
        .collect();
    for c in conns {
        tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .unwrap()
            .unwrap();
    }
    // An open session survives the forwarder moving to a new local address.
    let mut session = tokio::net::TcpStream::connect(("127.0.0.1", listen))
        .await
        .unwrap();
    let mut buf = [0u8; 6];
    session.write_all(b"before").await.unwrap();
    session.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");
    fwd.signal("USR1");
    fwd.wait_for_log("moved to a new local address", Duration::from_secs(10))
        .await;
    session.write_all(b"after!").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), session.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"after!");

    // ssh-proxy: standard input/output to the TCP service.
    let mut ssh = agent(&home);
    ssh.args(["ssh-proxy", DB, &echo_port])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = ssh.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"SSH-2.0-test\r\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.stdout, b"SSH-2.0-test\r\n");

    // Status and logout.
    let st = agent(&home)
        .args(["status", "--json"])
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["state"], "connected", "{v}");
    assert_eq!(v["user"], "carol");
    assert!(v["rtt_ms"].as_f64().unwrap() >= 0.0);
    assert!(
        v["services"].as_array().unwrap().iter().any(|s| s == APP),
        "{v}"
    );
    let out = agent(&home).arg("logout").output().await.unwrap();
    assert!(out.status.success());
    assert!(!home.join("device.key").exists() && !home.join("agent.json").exists());
    let out = agent(&home).args(["status"]).output().await.unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not enrolled"));
}

/// One DNS query over UDP; returns (rcode, A records).
async fn dns_query(port: u16, name: &str) -> (u8, Vec<[u8; 4]>) {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q, ("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let resp = &buf[..n];
    let rcode = resp[3] & 0x0f;
    let answers = u16::from_be_bytes([resp[6], resp[7]]);
    let mut addrs = Vec::new();
    if answers > 0 {
        // Answer records end with the 4-byte A data.
        let mut a = [0u8; 4];
        a.copy_from_slice(&resp[n - 4..]);
        addrs.push(a);
    }
    (rcode, addrs)
}

#[tokio::test]
async fn bad_tokens_are_refused_with_a_reason_and_nothing_is_issued() {
    let s = Stack::up().await;
    let home = |n: &str| s.w.path(&format!("home-{n}"));
    // Reused. (A requested device name always follows the token's user and `_`, which
    // neither side can contain, so no token can claim another user's device id.)
    let token = device_token(&s, "dave", &[]);
    let out = enroll_with(&home("1"), &token, "file", &["--name", "ci-runner"]).await;
    assert!(out.status.success(), "{out:?}");
    let identity = |n: &str| -> serde_json::Value {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(home(n).join("agent.json")).unwrap()).unwrap();
        state["identity"].clone()
    };
    assert_eq!(identity("1"), "device:dave_ci-runner");
    // User "dave-ci" naming a device "runner" gets its own id, not dave's.
    let other = device_token(&s, "dave-ci", &[]);
    let out = enroll_with(&home("1b"), &other, "file", &["--name", "runner"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(identity("1b"), "device:dave-ci_runner");
    // An id that is taken is refused, never replaced.
    let again = device_token(&s, "dave", &[]);
    let out = enroll_with(&home("1c"), &again, "file", &["--name", "ci-runner"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is taken"),
        "{out:?}"
    );
    let out = enroll(&home("2"), &token, "file").await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already used"),
        "{out:?}"
    );
    // Expired.
    let token = device_token(&s, "erin", &["--ttl", "1s"]);
    // Time must pass for the token to expire: this sleep is the test's subject.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = enroll(&home("3"), &token, "file").await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{out:?}"
    );
    // Revoked.
    let token = device_token(&s, "frank", &[]);
    let text = std::fs::read_to_string(&token).unwrap();
    let list = relay_ok(&["token", "list", "--state", s.w.state(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id = v
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["user"] == "frank")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    relay_ok(&["token", "revoke", &id, "--state", s.w.state()]);
    let out = enroll(&home("4"), &token, "file").await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revoked"),
        "{out:?}"
    );
    // Malformed.
    std::fs::write(s.w.path("bad.token"), "not-a-token").unwrap();
    let out = enroll(&home("5"), &s.w.path("bad.token"), "file").await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Portcullis enrolment token"));
    // Forged: a valid shape with a guessed secret.
    let forged = forge(&text, "guessed", &s.w.path("forged.token"));
    let out = enroll(&home("6"), &forged, "file").await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused"),
        "{out:?}"
    );
    // A token pinning another organisation's CA: the relay is not trusted.
    let other = World::new();
    let relay = s.addrs.quic.to_string();
    let out = relay_ok(&[
        "token",
        "create",
        "device",
        "--user",
        "x",
        "--relay",
        &relay,
        "--server-name",
        "relay.acme.test",
        "--state",
        other.state(),
    ]);
    std::fs::write(s.w.path("other.token"), out.lines().last().unwrap()).unwrap();
    let out = enroll(&home("7"), &s.w.path("other.token"), "file").await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pinned CA"),
        "{out:?}"
    );
    // Nothing was issued for the refused attempts, and each was logged.
    let list = relay_ok(&["list", "--state", s.w.state()]);
    for who in ["erin", "frank", "x"] {
        assert!(!list.contains(&format!("{who} [")), "{list}");
    }
    let log = s.relay.log_text();
    assert!(log.contains("enroll.refused"), "{log}");
    // Without --relay, the token names the endpoint the running relay recorded.
    let out = relay_ok(&[
        "token",
        "create",
        "device",
        "--user",
        "u",
        "--state",
        s.w.state(),
    ]);
    let recorded =
        portcullis_shared::token::EnrollToken::decode(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        recorded.relay,
        format!("relay.acme.test:{}", s.addrs.quic.port())
    );
    // A token never comes from argv: the agent has no such flag.
    let out = agent(&home("8"))
        .args(["enroll", "--token", &text])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Writes `token` with its secret replaced by `secret` to `path`: a forgery with a valid shape.
fn forge(token: &str, secret: &str, path: &Path) -> PathBuf {
    let mut t = portcullis_shared::token::EnrollToken::decode(token).unwrap();
    // A secret's length and alphabet, so the relay looks it up (and refuses it).
    t.secret = format!("{secret:A<43}");
    std::fs::write(path, t.encode()).unwrap();
    path.to_owned()
}

#[tokio::test]
async fn certificates_renew_without_user_action_and_revocation_stops_it() {
    let s = Stack::up().await;
    let token = device_token(&s, "gina", &["--cert-ttl", "6s"]);
    let home = s.w.path("gina-home");
    assert!(enroll(&home, &token, "file").await.status.success());
    let first: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("agent.json")).unwrap()).unwrap();
    let Up { agent, port, .. } = up(&s, &home, &[]).await;
    // Renewed at two thirds (4 s), then again; requests keep working past the first expiry.
    let renewed = eventually(Duration::from_secs(15), || async {
        let now: serde_json::Value =
            serde_json::from_slice(&std::fs::read(home.join("agent.json")).ok()?).ok()?;
        (now["not_after"].as_i64()? > first["not_after"].as_i64()? + 2).then_some(())
    })
    .await;
    assert!(renewed.is_some(), "no renewal: {}", agent.log_text());
    // Time must pass beyond the first certificate's expiry: that is what this checks.
    let first_expiry = std::time::UNIX_EPOCH
        + Duration::from_secs(first["not_after"].as_u64().unwrap())
        + Duration::from_millis(500);
    if let Ok(left) = first_expiry.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    assert_eq!(proxy_get(port, &format!("http://{APP}/")).await.0, 200);
    // Revoked: the live connection is closed and renewal is refused.
    let device = std::fs::read_to_string(home.join("agent.json")).unwrap();
    let id = serde_json::from_str::<serde_json::Value>(&device).unwrap()["identity"]
        .as_str()
        .unwrap()
        .trim_start_matches("device:")
        .to_owned();
    relay_ok(&["revoke", "device", &id, "--state", s.w.state()]);
    let cut = eventually(Duration::from_secs(10), || async {
        let (code, _) = proxy_get(port, &format!("http://{APP}/")).await;
        (code == 502).then_some(())
    })
    .await;
    assert!(cut.is_some(), "a revoked device must lose access");
    let failed = eventually(Duration::from_secs(15), || async {
        let log = agent.log_text();
        log.contains("renewal failed").then_some(())
    })
    .await;
    assert!(
        failed.is_some(),
        "renewal must fail once revoked: {}",
        agent.log_text()
    );
}

#[tokio::test]
async fn a_download_survives_the_agent_moving_to_a_new_address_and_the_relay_restarting() {
    let mut s = Stack::up().await;
    let token = device_token(&s, "hana", &[]);
    let home = s.w.path("hana-home");
    assert!(enroll(&home, &token, "file").await.status.success());
    let Up { agent, port, .. } = up(&s, &home, &[]).await;
    // A 4 s streamed download through the proxy; move the agent's socket once a third of
    // it has arrived.
    let mut download = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "20", "-x"])
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(format!("http://{APP}/stream?n=40&ms=100"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = download.stdout.take().unwrap();
    let mut body = Vec::new();
    while !String::from_utf8_lossy(&body).contains("chunk 13\n") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), out.read(&mut buf))
            .await
            .expect("the download must be under way")
            .unwrap();
        assert!(
            n > 0,
            "download ended early: {}",
            String::from_utf8_lossy(&body)
        );
        body.extend_from_slice(&buf[..n]);
    }
    agent.signal("USR1");
    agent
        .wait_for_log("moved to a new local address", Duration::from_secs(10))
        .await;
    out.read_to_end(&mut body).await.unwrap();
    assert!(download.wait().await.unwrap().success());
    let body = String::from_utf8(body).unwrap();
    assert_eq!(body.lines().count(), 40, "{body}");
    assert!(body.ends_with("chunk 39\n"), "{body}");
    // The relay restarts: the local proxy stays up and works again soon after.
    let back = s.restart_relay_only(Duration::ZERO).await;
    let ok = eventually(Duration::from_secs(10), || async {
        (proxy_get(port, &format!("http://{APP}/")).await.0 == 200).then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "agent did not recover after the relay restart"
    );
    eprintln!(
        "agent request succeeded {:?} after the relay was back",
        back.elapsed()
    );
}

#[tokio::test]
async fn the_os_keyring_holds_the_key_when_one_is_reachable() {
    let s = Stack::up().await;
    let token = device_token(&s, "ivan", &[]);
    let home = s.w.path("ivan-home");
    let out = enroll(&home, &token, "keyring").await;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no OS keyring is reachable") && err.contains("--key-store file"),
            "{err}"
        );
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_KEYRING").is_none(),
            "the OS keyring is required here (kernel keyutils): {err}"
        );
        eprintln!(
            "\n!!! no OS keyring reachable here ({err}); the keyring path was checked for its message only\n"
        );
        return;
    }
    assert!(
        !home.join("device.key").exists(),
        "the key must not be on disk"
    );
    let Up {
        agent: _agent,
        port,
        ..
    } = up(&s, &home, &[]).await;
    assert_eq!(proxy_get(port, &format!("http://{APP}/")).await.0, 200);
    assert!(
        agent(&home)
            .arg("logout")
            .output()
            .await
            .unwrap()
            .status
            .success()
    );
}

#[tokio::test]
async fn a_connector_enrols_with_a_token_and_serves_with_the_written_config() {
    let mut s = Stack::up().await;
    let relay = s.addrs.quic.to_string();
    let out = relay_ok(&[
        "token",
        "create",
        "connector",
        "c9",
        "--hostname",
        "new.eng.internal",
        "--relay",
        &relay,
        "--server-name",
        "relay.acme.test",
        "--state",
        s.w.state(),
    ]);
    let token = s.w.path("c9.token");
    std::fs::write(&token, out.lines().last().unwrap()).unwrap();
    let state = s.w.path("c9-state");
    let out = Command::new(bin("portcullis-connector"))
        .args(["enroll", "--token-file"])
        .arg(&token)
        .arg("--state")
        .arg(&state)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = state.join("connector.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("hostname = \"new.eng.internal\""), "{text}");
    std::fs::write(
        &config,
        text.replace(
            "http://127.0.0.1:8080",
            &format!("http://{}", s.origin_addr),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("portcullis-connector"));
    cmd.args(["run", "--config"]).arg(&config);
    let _c9 = Daemon::spawn_logged(cmd, s.w.path("c9.log"));
    wait_for_connectors(s.addrs.admin, 2).await;
    // Stop c1 (it publishes *.eng.internal too) so new.eng.internal can only be served by c9.
    s.connector.signal("TERM");
    assert!(s.connector.wait(Duration::from_secs(10)).await.success());
    wait_for_connectors(s.addrs.admin, 1).await;
    let r = curl_expect(&s.w, &s.addrs, "new.eng.internal", "alice", 200).await;
    assert!(r.body.contains("pc-origin"));
    let list = relay_ok(&["list", "--state", s.w.state()]);
    assert!(list.contains("c9"), "{list}");
}

#[tokio::test]
async fn ssh_reaches_a_real_sshd_behind_a_connector_through_ssh_proxy() {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_SSHD").is_none(),
            "the sshd test is required but /usr/sbin/sshd is not installed"
        );
        eprintln!("\n!!! SKIPPED the sshd test: openssh-server is not installed\n");
        return;
    }
    let s =
        Stack::up_with("[[policy]]\nhostnames = [\"ssh.internal\"]\ngroups = [\"eng\"]\n").await;
    let dir = s.w.path("ssh");
    std::fs::create_dir_all(&dir).unwrap();
    let keygen = |path: &Path| {
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "ssh-keygen failed");
    };
    keygen(&dir.join("host_key"));
    keygen(&dir.join("user_key"));
    std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
    let port = free_port();
    let user = String::from_utf8(
        std::process::Command::new("id")
            .arg("-un")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
             PermitRootLogin prohibit-password\nAllowUsers {user}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let _ = std::fs::create_dir_all("/run/sshd");
    let mut cmd = Command::new(sshd);
    cmd.args(["-D", "-e", "-f"]).arg(dir.join("sshd_config"));
    let sshd = Daemon::spawn_logged(cmd, s.w.path("sshd.log"));
    s.w.issue_connector("c2", &["ssh.internal"]);
    let path = s.w.write_connector_config(
        "c2",
        &s.addrs.quic.to_string(),
        &[("ssh.internal", &format!("tcp://127.0.0.1:{port}"))],
    );
    let mut cmd = Command::new(bin("portcullis-connector"));
    cmd.args(["run", "--config"]).arg(&path);
    let _c2 = Daemon::spawn_logged(cmd, s.w.path("c2.log"));

    let token = device_token(&s, "jon", &[]);
    let home = s.w.path("jon-home");
    assert!(enroll(&home, &token, "file").await.status.success());
    let proxy = format!(
        "{} --home {} ssh-proxy %h %p",
        bin("portcullis").display(),
        home.display()
    );
    // Both ends ready: sshd listening, c2 registered with the relay.
    sshd.wait_for_log("Server listening on", Duration::from_secs(20))
        .await;
    wait_for_connectors(s.addrs.admin, 2).await;
    let run = Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
        ])
        .args(["-o", &format!("ProxyCommand={proxy}")])
        .arg("-i")
        .arg(dir.join("user_key"))
        .args([
            "-p",
            &port.to_string(),
            &format!("{user}@ssh.internal"),
            "echo hello-over-ssh",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("ssh hung")
        .unwrap();
    assert!(
        out.status.success(),
        "ssh failed: {}\nsshd: {}",
        String::from_utf8_lossy(&out.stderr),
        sshd.log_text()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello-over-ssh"
    );
}

#[tokio::test]
async fn enrolment_attempts_are_rate_limited_per_address() {
    let s = Stack::up().await;
    let token = device_token(&s, "kim", &[]);
    // Same token id, wrong secret: refused each time, and after ten, refused for flooding.
    let text = std::fs::read_to_string(&token).unwrap();
    let forged = forge(&text, "wrong", &s.w.path("kim-forged.token"));
    let mut last = String::new();
    for i in 0..11 {
        let out = enroll(&s.w.path(&format!("kim-{i}")), &forged, "file").await;
        assert!(!out.status.success());
        last = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    assert!(last.contains("too many enrolment attempts"), "{last}");
    // The genuine token is refused too while the address is limited: nothing is issued.
    let out = enroll(&s.w.path("kim-real"), &token, "file").await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too many"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_csr_naming_someone_else_is_refused_and_relay_can_be_overridden() {
    use portcullis_shared::enroll_client::exchange;
    use portcullis_shared::identity::{Identity, Role};
    use portcullis_shared::proto::{EnrollRequest, EnrollResponse};
    use portcullis_shared::token::EnrollToken;
    let s = Stack::up().await;
    let path = device_token(&s, "lou", &[]);
    let token = EnrollToken::decode(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // A CSR asking for another identity's name, with a valid token: refused, nothing issued.
    let mallory = Identity::new(Role::Device, "mallory").unwrap();
    let (_key, csr) = portcullis_shared::pki::generate_csr(&mallory).unwrap();
    let request = EnrollRequest::Enroll {
        token_id: token.id.clone(),
        secret: token.secret.clone(),
        csr,
        name: None,
    };
    let answer = exchange(
        &token.relay,
        token.tcp_port,
        &token.server_name,
        &token.ca_sha256,
        None,
        &request,
    )
    .await
    .unwrap();
    match answer {
        EnrollResponse::Refused { reason } => {
            assert!(reason.contains("must not name an identity"), "{reason}")
        }
        other => panic!("a CSR for someone else must be refused: {other:?}"),
    }
    assert!(!relay_ok(&["list", "--state", s.w.state()]).contains("mallory"));
    // --relay overrides the token's address (its TLS name still applies).
    let wrong = s.w.path("lou-wrong.token");
    let mut moved = token.clone();
    moved.relay = "127.0.0.1:9".into();
    std::fs::write(&wrong, moved.encode()).unwrap();
    let home = s.w.path("lou-home");
    let out = agent(&home)
        .args([
            "enroll",
            "--key-store",
            "file",
            "--relay",
            &s.addrs.quic.to_string(),
            "--token-file",
        ])
        .arg(&wrong)
        .output()
        .await
        .unwrap();
    // The CSR check comes before the token is spent, so the same token still works.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `program` with `args` as user and group 65534 (nobody) through `setpriv`, if this
/// test runs as root with `setpriv` installed; `None` otherwise.
fn as_second_user(program: &str, args: &[&str]) -> Option<Command> {
    let uid = std::process::Command::new("id").arg("-u").output().ok()?;
    let setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" || !setpriv {
        return None;
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program)
        .args(args);
    Some(cmd)
}

#[tokio::test]
async fn the_proxy_and_forwards_serve_only_the_user_running_the_agent() {
    if as_second_user("true", &[]).is_none() {
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_SECOND_USER").is_none(),
            "the second-user test is required but needs root and setpriv"
        );
        eprintln!("\n!!! SKIPPED the second-user test: it needs root and setpriv\n");
        return;
    }
    let s = Stack::up().await;
    let token = device_token(&s, "olga", &[]);
    let home = s.w.path("olga-home");
    assert!(enroll(&home, &token, "file").await.status.success());
    let Up {
        agent: _agent,
        port,
        ..
    } = up(&s, &home, &[]).await;
    let echo_port = s.w.echo_addr().rsplit(':').next().unwrap().to_owned();
    let (_fwd, listen) = forward(&s, &home, &format!("{DB}:{echo_port}")).await;
    // Sends a word to the forward and prints the first five bytes that come back (none if
    // the connection is closed), as whoever runs it.
    let echo = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{}; printf hello >&3; timeout 10 head -c 5 <&3",
        listen.port()
    );
    let url = format!("http://{APP}/");
    let proxy = format!("http://127.0.0.1:{port}");
    let curl_args = [
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
        "-x",
    ];

    // The agent's own user is served by both.
    assert_eq!(proxy_get(port, &url).await.0, 200);
    let out = Command::new("bash")
        .args(["-c", &echo])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello", "{out:?}");
    // Another local user gets its connections closed without an answer.
    let mut curl = as_second_user("curl", &curl_args).unwrap();
    let out = curl.args([&proxy, &url]).output().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000", "{out:?}");
    let out = as_second_user("bash", &["-c", &echo])
        .unwrap()
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "{out:?}");
    let log = s.w.path("agent.log");
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        log.contains("refusing a connection from another user"),
        "{log}"
    );
}

#[tokio::test]
async fn a_download_through_the_agent_crosses_a_lossy_path_intact() {
    let s = Stack::up().await;
    // The laptop's path to the relay drops 5 % of the datagrams each way and delays each
    // by 25 ms each way.
    let path = UdpPath::start(s.addrs.quic).await;
    path.impair(Impairment {
        loss: 0.05,
        delay: Duration::from_millis(25),
        ..Impairment::default()
    });
    let relay = path.addr.to_string();
    let out = relay_ok(&[
        "token",
        "create",
        "device",
        "--user",
        "dave",
        "--group",
        "eng",
        "--relay",
        &relay,
        "--state",
        s.w.state(),
    ]);
    let token = s.w.path("dave.token");
    std::fs::write(&token, out.lines().last().unwrap()).unwrap();
    let home = s.w.path("dave-home");
    let enrolled = enroll(&home, &token, "file").await;
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let up = up(&s, &home, &[]).await;
    let size = 20 << 20;
    let got = Command::new("curl")
        .args(["-sS", "--max-time", "120", "-x"])
        .arg(format!("http://127.0.0.1:{}", up.port))
        .args(["-o", "/dev/null", "-w", "%{http_code} %{size_download}"])
        .arg(format!("http://{APP}/bytes?n={size}"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&got.stdout).into_owned();
    assert_eq!(
        text,
        format!("200 {size}"),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let dropped = path
        .counts
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        dropped > 0,
        "the path dropped nothing: the test tested nothing"
    );
    drop(up);
}

/// A TCP forward carries many more connections over time than a relay connection may have
/// streams open at once (100 by default): each closed connection gives its stream back,
/// whichever side closes first. An HTTP origin reached as raw TCP: 200 connections one
/// after another and 3 rounds of 64 at once, half closed by the client, half by the server
/// (`Connection: close`); then 85 held open at once must all be served (QUIC gives stream
/// credit back once an eighth of the limit has closed, so up to 12 of the 100 may still be
/// owed then).
#[tokio::test]
async fn a_tcp_forward_gives_back_the_stream_of_every_closed_connection() {
    const HELD: usize = 85;
    let s = Stack::up_with_services("", &[("web.eng.internal", "tcp://ORIGIN")]).await;
    let home = s.w.path("home");
    let token = device_token(&s, "kim", &[]);
    assert!(enroll(&home, &token, "file").await.status.success());
    let port = s.origin_addr.rsplit(':').next().unwrap();
    let (fwd, listen) = forward(&s, &home, &format!("web.eng.internal:{port}")).await;
    let log = fwd.log.clone();
    let bounded = |what: String, one: tokio::task::JoinHandle<()>| {
        let log = log.clone();
        async move {
            match tokio::time::timeout(Duration::from_secs(10), one).await {
                Ok(r) => r.unwrap(),
                Err(_) => panic!(
                    "{what} hung:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        }
    };
    let started = std::time::Instant::now();
    for i in 0..200 {
        bounded(
            format!("connection {i}"),
            tokio::spawn(get_over(listen, i % 2 == 1, None)),
        )
        .await;
    }
    eprintln!("200 connections one after another: {:?}", started.elapsed());
    let started = std::time::Instant::now();
    for round in 0..3 {
        let all: Vec<_> = (0..64)
            .map(|i| tokio::spawn(get_over(listen, i % 2 == 1, None)))
            .collect();
        for (i, one) in all.into_iter().enumerate() {
            bounded(format!("round {round}, connection {i}"), one).await;
        }
    }
    eprintln!("3 rounds of 64 at once: {:?}", started.elapsed());
    let started = std::time::Instant::now();
    // Closed to release the held connections.
    let held = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let (served, mut count) = tokio::sync::mpsc::channel(HELD);
    let all: Vec<_> = (0..HELD)
        .map(|_| {
            tokio::spawn(get_over(
                listen,
                false,
                Some((served.clone(), held.clone())),
            ))
        })
        .collect();
    for i in 0..HELD {
        tokio::time::timeout(Duration::from_secs(10), count.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("{i} of {HELD} held connections served:\n{}", fwd.log_text())
            });
    }
    eprintln!("{HELD} held at once: {:?}", started.elapsed());
    held.close();
    for (i, one) in all.into_iter().enumerate() {
        bounded(format!("held connection {i}"), one).await;
    }
}

type Hold = (
    tokio::sync::mpsc::Sender<()>,
    std::sync::Arc<tokio::sync::Semaphore>,
);

/// One HTTP/1.1 GET over raw TCP to `addr`; `server_closes` asks the server to close
/// (`Connection: close`), else the client closes after the response. With `hold`, says
/// it was served and keeps the connection open until the hold is released.
async fn get_over(addr: std::net::SocketAddr, server_closes: bool, hold: Option<Hold>) {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let close = if server_closes {
        "Connection: close\r\n"
    } else {
        ""
    };
    let req = format!("GET /bytes?n=64 HTTP/1.1\r\nHost: web.eng.internal\r\n{close}\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The head and the 64-byte body.
    let whole = |got: &[u8]| {
        got.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|end| got.len() >= end + 4 + 64)
    };
    while !whole(&got) {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    if let Some((served, release)) = hold {
        served.send(()).await.unwrap();
        let _ = release.acquire().await;
    }
    if server_closes {
        while c.read(&mut buf).await.unwrap() > 0 {}
    }
}

/// A connector whose enrolment answer was lost (it crashed, or its connection broke,
/// after the relay spent the token and before it wrote its certificate) finds its pending
/// key at the next start and is answered again for it with the same token; another key
/// with that token is still refused.
#[tokio::test]
async fn a_connector_that_lost_its_enrolment_answer_enrols_again_with_the_same_token_and_key() {
    use portcullis_shared::enroll_client::exchange;
    use portcullis_shared::proto::{EnrollRequest, EnrollResponse};
    use portcullis_shared::token::EnrollToken;
    let s = Stack::up().await;
    let relay = s.addrs.quic.to_string();
    let out = relay_ok(&[
        "token",
        "create",
        "connector",
        "c8",
        "--hostname",
        "c8.eng.internal",
        "--relay",
        &relay,
        "--server-name",
        "relay.acme.test",
        "--state",
        s.w.state(),
    ]);
    let text = out.lines().last().unwrap().to_owned();
    let token_path = s.w.path("c8.token");
    std::fs::write(&token_path, &text).unwrap();
    let token = EnrollToken::decode(&text).unwrap();

    // The first attempt: the key is kept where the connector keeps a pending key, the
    // token is spent, and the answer never arrives.
    let state = s.w.path("c8-state");
    std::fs::create_dir_all(&state).unwrap();
    let (key, _) = portcullis_shared::pki::generate_enrolment_csr().unwrap();
    let pending = state.join("connector.key.pending");
    portcullis_shared::pki::write_private_file(
        &pending,
        portcullis_shared::pki::pkcs8_pem(&key).as_bytes(),
    )
    .unwrap();
    let request = |key: &[u8]| EnrollRequest::Enroll {
        token_id: token.id.clone(),
        secret: token.secret.clone(),
        csr: portcullis_shared::pki::enrolment_csr_for_key(key).unwrap(),
        name: None,
    };
    let ask = |request| {
        let token = token.clone();
        async move {
            exchange(
                &token.relay,
                None,
                &token.server_name,
                &token.ca_sha256,
                None,
                &request,
            )
            .await
            .unwrap()
        }
    };

    assert!(matches!(
        ask(request(&key)).await,
        EnrollResponse::Issued { .. }
    ));

    // The next start: the same token and key are answered again.
    let enrol = |state: PathBuf| {
        let token_path = token_path.clone();
        async move {
            Command::new(bin("portcullis-connector"))
                .args(["enroll", "--token-file"])
                .arg(&token_path)
                .arg("--state")
                .arg(&state)
                .output()
                .await
                .unwrap()
        }
    };
    let out = enrol(state.clone()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pending.exists(), "the pending key moved into place");
    let written = std::fs::read_to_string(state.join("connector.key")).unwrap();
    assert_eq!(written, portcullis_shared::pki::pkcs8_pem(&key));
    let cert = portcullis_shared::pki::load_certs(&state.join("connector.crt")).unwrap();
    let info = portcullis_shared::pki::inspect(&cert[0]).unwrap();
    assert_eq!(info.identity.unwrap().to_string(), "connector:c8");

    // Another key with the spent token: refused, as before.
    let (other, _) = portcullis_shared::pki::generate_enrolment_csr().unwrap();
    match ask(request(&other)).await {
        EnrollResponse::Refused { reason } => assert!(reason.contains("already used"), "{reason}"),
        other => panic!("a second key must not be enrolled with a used token: {other:?}"),
    }
    let out = enrol(s.w.path("c8-elsewhere")).await;
    assert!(!out.status.success());
}
