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

    // The certificate file replaced by garbage: the file and the certificate named.
    let cert_line = text_ok.lines().find(|l| l.starts_with("cert")).unwrap();
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
