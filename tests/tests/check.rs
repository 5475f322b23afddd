//! `portcullis-relay check` and `portcullis-connector check`: a configuration file checked
//! without starting anything, as a CI pipeline would, with the real binaries. A good file
//! exits 0 and says ok; a broken one exits 1 naming the file, the line where there is one,
//! and what to fix; nothing is started (no ready file, no socket).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use portcullis_e2e::{World, bin};

fn check(program: &str, config: &Path) -> Output {
    Command::new(bin(program))
        .arg("check")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `check` says the file is fine.
fn passes(program: &str, config: &Path) {
    let out = check(program, config);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!("{}: ok", config.display())),
        "{said}"
    );
}

/// `good` with `from` replaced by the unknown key `to`: `check` fails naming the file and
/// the line of `to`.
fn fails_at_the_line_of(program: &str, good: &Path, from: &str, to: &str) {
    let typo = good.with_file_name(format!("typo-{to}.toml"));
    let text_ok = std::fs::read_to_string(good).unwrap();
    std::fs::write(&typo, text_ok.replace(from, to)).unwrap();
    let out = check(program, &typo);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let line = line_of(&typo, to);
    let said = text(&out);
    assert!(
        said.contains(&format!("{}:{line}:", typo.display())),
        "{said}"
    );
    assert!(said.contains(to), "{said}");
}

/// The line of `needle` in `file`, 1-based.
fn line_of(file: &Path, needle: &str) -> usize {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn the_relay_checks_its_configuration_without_starting() {
    let w = World::new();
    let good = w.write_relay_config("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "");
    passes("portcullis-relay", &good);
    // An unknown key: file and line.
    fails_at_the_line_of("portcullis-relay", &good, "drain_grace", "drain_grase");
    let text_ok = std::fs::read_to_string(&good).unwrap();

    // A value that parses but cannot work: says which key and what it must be.
    let bad = w.path("bad.toml");
    std::fs::write(
        &bad,
        format!("{text_ok}\n[limits]\nmax_header_bytes = 10\n"),
    )
    .unwrap();
    let out = check("portcullis-relay", &bad);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("limits.max_header_bytes must be at least 1024"),
        "{}",
        text(&out)
    );

    // An OTLP endpoint that is not OTLP over HTTP, and a collector CA that is garbage.
    let bad = w.path("otlp.toml");
    std::fs::write(
        &bad,
        format!("{text_ok}\n[otlp]\nendpoint = \"grpc://collector:4317\"\n"),
    )
    .unwrap();
    let out = check("portcullis-relay", &bad);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let line = line_of(&bad, "grpc://");
    assert!(
        text(&out).contains(&format!("otlp.toml:{line}:")) && text(&out).contains("http://"),
        "{}",
        text(&out)
    );
    // Headers (an API key) to a plain http:// collector: refused unless allowed.
    std::fs::write(
        &bad,
        format!("{text_ok}\n[otlp]\nendpoint = \"http://collector:4318\"\n[otlp.headers]\nx-api-key = \"secret\"\n"),
    )
    .unwrap();
    let out = check("portcullis-relay", &bad);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("allow_insecure"), "{}", text(&out));
    assert!(!text(&out).contains("secret"), "{}", text(&out));
    let junk_ca = w.path("junk-ca.pem");
    std::fs::write(&junk_ca, "not a certificate").unwrap();
    std::fs::write(
        &bad,
        format!(
            "{text_ok}\n[otlp]\nendpoint = \"https://collector:4318\"\nca = {:?}\n",
            junk_ca.display().to_string()
        ),
    )
    .unwrap();
    let out = check("portcullis-relay", &bad);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("otlp.ca") && text(&out).contains("junk-ca.pem"),
        "{}",
        text(&out)
    );

    // A state directory without a CA.
    let empty = w.path("empty-state");
    std::fs::create_dir_all(&empty).unwrap();
    let no_ca = w.path("no-ca.toml");
    let state_line = text_ok
        .lines()
        .find(|l| l.starts_with("state_dir"))
        .unwrap();
    std::fs::write(
        &no_ca,
        text_ok.replace(
            state_line,
            &format!("state_dir = {:?}", empty.display().to_string()),
        ),
    )
    .unwrap();
    let out = check("portcullis-relay", &no_ca);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("ca init"), "{}", text(&out));

    // A public certificate replaced by garbage.
    let garbage = w.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let with_tls = w.path("tls.toml");
    let key = w.path("garbage.key");
    std::fs::write(&key, "not a key").unwrap();
    std::fs::write(
        &with_tls,
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\n{text_ok}",
            garbage.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    let out = check("portcullis-relay", &with_tls);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("tls_cert"), "{}", text(&out));
    // Nothing was started: no access log in a state directory that check never opened.
    assert!(!empty.join("access.log").exists());
}

#[test]
fn the_connector_checks_its_configuration_without_starting() {
    let w = World::new();
    w.issue_connector("c1", &["app.internal"]);
    let good = w.write_connector_config(
        "c1",
        "127.0.0.1:1",
        &[("app.internal", "http://127.0.0.1:1")],
    );
    passes("portcullis-connector", &good);
    fails_at_the_line_of("portcullis-connector", &good, "hostname", "hostnam");
    let text_ok = std::fs::read_to_string(&good).unwrap();

    // A hostname its certificate may not publish (issue connector granted app.internal).
    assert!(w.path("out/c1.hostnames").exists());
    let other = w.path("other-host.toml");
    std::fs::write(
        &other,
        text_ok.replace("hostname = \"app.internal\"", "hostname = \"db.internal\""),
    )
    .unwrap();
    let out = check("portcullis-connector", &other);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let line = line_of(&other, "db.internal");
    assert!(
        text(&out).contains(&format!("other-host.toml:{line}: this connector's certificate may not publish db.internal (it may publish app.internal")),
        "{}",
        text(&out)
    );

    // A device's certificate and key configured as the connector's.
    w.issue_device("alice", "alice", &["eng"], None);
    let key_line = text_ok.lines().find(|l| l.starts_with("key")).unwrap();
    let cert_line = text_ok.lines().find(|l| l.starts_with("cert")).unwrap();
    let device = w.path("device.toml");
    std::fs::write(
        &device,
        text_ok
            .replace(
                cert_line,
                &format!("cert = {:?}", w.path("out/alice.crt").display().to_string()),
            )
            .replace(
                key_line,
                &format!("key = {:?}", w.path("out/alice.key").display().to_string()),
            ),
    )
    .unwrap();
    let out = check("portcullis-connector", &device);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is device:alice's certificate, not a connector's"),
        "{}",
        text(&out)
    );

    // The certificate file replaced by garbage: the file and the certificate named.
    let cert = cert_line.split('"').nth(1).unwrap();
    let cert = if Path::new(cert).is_absolute() {
        Path::new(cert).to_path_buf()
    } else {
        good.parent().unwrap().join(cert)
    };
    std::fs::write(&cert, "garbage").unwrap();
    let out = check("portcullis-connector", &good);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&good.display().to_string()),
        "{}",
        text(&out)
    );
}

#[test]
fn the_relay_check_catches_what_run_would_refuse_in_words() {
    let w = World::new();
    let policy = "[[policy]]\nhostnames = [\"app.internal\"]\ngroups = [\"eng\"]\n";
    let good = w.write_relay_config("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", policy);
    passes("portcullis-relay", &good);
    let text_ok = std::fs::read_to_string(&good).unwrap();
    let variant = |name: &str, config: String| {
        let path = w.path(name);
        std::fs::write(&path, config).unwrap();
        let out = check("portcullis-relay", &path);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let said = text(&out);
        assert_eq!(said.trim().lines().count(), 1, "{said}");
        said
    };

    // The admin listener on the HTTPS listener's port.
    let said = variant(
        "clash.toml",
        text_ok
            .replace(
                "https_listen = \"127.0.0.1:0\"",
                "https_listen = \"0.0.0.0:18443\"",
            )
            .replace(
                "admin_listen = \"127.0.0.1:0\"",
                "admin_listen = \"127.0.0.1:18443\"",
            ),
    );
    assert!(said.contains("are one TCP port"), "{said}");

    // Values in words, with the key: no type names, no parser jargon.
    let said = variant(
        "address.toml",
        text_ok.replace("quic_listen = \"127.0.0.1:0\"", "quic_listen = \"4433\""),
    );
    let line = line_of(&w.path("address.toml"), "quic_listen");
    assert!(
        said.contains(&format!(
            "address.toml:{line}: quic_listen: expected an address and port"
        )),
        "{said}"
    );
    let said = variant(
        "number.toml",
        format!("{text_ok}\n[limits]\nmax_connections = \"many\"\n"),
    );
    assert!(
        said.contains("limits.max_connections: expected a number") && !said.contains("usize"),
        "{said}"
    );
    // A missing file is said once.
    let missing = w.path("no-such.crt");
    let said = variant(
        "missing.toml",
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\n{text_ok}",
            missing.display().to_string(),
            missing.display().to_string()
        ),
    );
    assert_eq!(said.matches("No such file").count(), 1, "{said}");

    // A public certificate that is not valid for a published name.
    let (cert, key) = (w.path("public.crt"), w.path("public.key"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=other.test"])
        .args(["-addext", "subjectAltName=DNS:other.test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    let said = variant(
        "uncovered.toml",
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\n{text_ok}",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    assert!(
        said.contains("is not valid for app.internal") && said.contains("other.test"),
        "{said}"
    );
}

/// Whether the tests run as root (needed to act as other users).
fn root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

/// Two uids no account on this machine has.
fn unused_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let taken = |id: u32| passwd.lines().any(|l| l.contains(&format!(":{id}:")));
    let mut free = (62_000..63_000).filter(|id| !taken(*id));
    (free.next().unwrap(), free.next().unwrap())
}

#[tokio::test]
async fn admin_commands_leave_files_the_relays_user_can_read_and_refuse_another_user() {
    if !root() || Command::new("setpriv").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_SECOND_USER").is_none(),
            "needs root and setpriv"
        );
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let w = World::new();
    let good = w.write_relay_config("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "");
    let state = Path::new(w.state());
    // A relay ran once (it makes the JWT key), and stopped.
    let (mut relay, _) = w.start_relay().await;
    relay.signal("TERM");
    assert!(
        relay
            .wait(std::time::Duration::from_secs(30))
            .await
            .success()
    );
    let (relay_user, stranger) = unused_ids();
    // The relay's user owns the state directory (and its parent lets it in).
    std::fs::set_permissions(
        state.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for entry in std::fs::read_dir(state).unwrap() {
        std::os::unix::fs::chown(entry.unwrap().path(), Some(relay_user), Some(relay_user))
            .unwrap();
    }
    std::os::unix::fs::chown(state, Some(relay_user), Some(relay_user)).unwrap();
    passes("portcullis-relay", &good);

    // Root rotates the JWT key: what it writes belongs to the relay's user.
    let rotate = |as_user: Option<u32>| {
        let mut cmd = match as_user {
            Some(id) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={id}"),
                    format!("--regid={id}"),
                    "--clear-groups".into(),
                    "--".into(),
                ])
                .arg(bin("portcullis-relay"));
                c
            }
            None => Command::new(bin("portcullis-relay")),
        };
        cmd.args(["jwt", "rotate", "--state"])
            .arg(state)
            .env_remove("PORTCULLIS_CONFIG")
            .env_remove("PORTCULLIS_STORE")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = rotate(None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(state.join("jwt-signing.next.key").exists());
    for entry in std::fs::read_dir(state).unwrap() {
        let path = entry.unwrap().path();
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&path).unwrap());
        assert_eq!(uid, relay_user, "{} left to uid {uid}", path.display());
    }
    passes("portcullis-relay", &good);

    // Another user is refused before anything changes, told whom to run as.
    let before: Vec<_> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let out = rotate(Some(stranger));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "belongs to uid {relay_user}, and this command runs as uid {stranger}"
        )),
        "{said}"
    );
    let after: Vec<_> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before.len(), after.len());

    // A key root left behind (copied in by hand): check names it and the fix.
    let stray = state.join("jwt-signing.previous.key");
    std::fs::write(&stray, "x").unwrap();
    let out = check("portcullis-relay", &good);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("jwt-signing.previous.key belongs to root")
            && said.contains(&format!("chown {relay_user}:")),
        "{said}"
    );
}
