//! gRPC through the relay with a real gRPC implementation (Python's grpcio) on both ends:
//! unary, server-streaming and bidirectional calls, trailers (`grpc-status`, trailing
//! metadata) and error statuses, to an h2c origin and to a TLS origin (HTTP/2 by ALPN).
//!
//! Needs `python3` with `grpcio`; skips loudly without it, unless
//! `PORTCULLIS_REQUIRE_GRPC=1` (set by CI, which installs it) makes that a failure.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use portcullis_e2e::{Daemon, World, curl_expect, wait_for_connectors};

fn grpc_available() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("grpc")
        .join(name)
}

async fn start_server(w: &World, name: &str, tls: Option<(&Path, &Path)>) -> (Daemon, String) {
    let ready = w.path(&format!("{name}.ready"));
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script("echo_server.py"))
        .arg("--ready-file")
        .arg(&ready);
    if let Some((cert, key)) = tls {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let daemon = Daemon::spawn_logged(cmd, w.path(&format!("{name}.log")));
    let addr = portcullis_e2e::eventually(std::time::Duration::from_secs(20), || async {
        std::fs::read_to_string(&ready).ok()
    })
    .await
    .unwrap_or_else(|| panic!("gRPC server did not start: {}", daemon.log_text()));
    (daemon, addr)
}

/// A CA and a server certificate for 127.0.0.1, made with openssl, for the TLS origin.
fn origin_pki(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| dir.join(n);
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: &std::path::PathBuf| p.to_str().unwrap().to_owned();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&p("oca.key")),
        "-out",
        &s(&p("oca.crt")),
        "-days",
        "2",
        "-subj",
        "/CN=origin test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&p("origin.key")),
        "-out",
        &s(&p("origin.csr")),
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&p("origin.csr")),
        "-CA",
        &s(&p("oca.crt")),
        "-CAkey",
        &s(&p("oca.key")),
        "-CAcreateserial",
        "-out",
        &s(&p("origin.crt")),
        "-days",
        "2",
        "-extfile",
        &s(&p("ext.cnf")),
    ]);
    (p("oca.crt"), p("origin.crt"), p("origin.key"))
}

#[tokio::test]
async fn grpc_unary_streaming_and_errors_pass_through_with_trailers() {
    grpc_through(false).await;
}

/// The same through a tunnel over TLS on TCP (the connector's UDP going nowhere).
#[tokio::test]
async fn grpc_with_trailers_passes_through_a_tunnel_over_tcp() {
    grpc_through(true).await;
}

async fn grpc_through(tunnel_over_tcp: bool) {
    if !grpc_available() {
        assert!(
            std::env::var_os("PORTCULLIS_REQUIRE_GRPC").is_none(),
            "gRPC test required but python3 grpcio is not installed"
        );
        eprintln!("\n!!! SKIPPED the gRPC test: python3 with grpcio is not installed\n");
        return;
    }
    let w = World::new();
    w.issue_connector("c1", &["grpc.internal", "grpcs.internal", "app.internal"]);
    w.issue_device("alice", "alice", &["eng"], None);
    let (_plain, plain_addr) = start_server(&w, "grpc-h2c", None).await;
    let (ca, cert, key) = origin_pki(w.dir.path());
    let (_tls, tls_addr) = start_server(&w, "grpc-tls", Some((&cert, &key))).await;
    let (_origin, origin_addr) = w.start_origin().await;
    w.write_relay_config(
        "127.0.0.1:0",
        "127.0.0.1:0",
        "127.0.0.1:0",
        "[[policy]]\nhostnames = [\"grpc.internal\", \"grpcs.internal\", \"app.internal\"]\ngroups = [\"eng\"]\n",
    );
    let (_relay, addrs) = w.start_relay().await;
    // Over TCP: the connector's QUIC goes to a UDP socket that never answers.
    let udp_sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = if tunnel_over_tcp {
        udp_sink.local_addr().unwrap()
    } else {
        addrs.quic
    };
    let path = w.write_connector_config_with_tcp_port(
        "c1",
        &relay.to_string(),
        addrs.https.port(),
        &[
            ("grpc.internal", &format!("h2c://{plain_addr}")),
            ("grpcs.internal", &format!("https://{tls_addr}")),
            ("app.internal", &format!("http://{origin_addr}")),
        ],
    );
    let mut text = std::fs::read_to_string(&path).unwrap();
    text = text.replace(
        &format!("service = \"https://{tls_addr}\"\n"),
        &format!(
            "service = \"https://{tls_addr}\"\norigin_ca = \"{}\"\n",
            ca.display()
        ),
    );
    std::fs::write(&path, text).unwrap();
    let mut cmd = tokio::process::Command::new(portcullis_e2e::bin("portcullis-connector"));
    cmd.args(["run", "--config"]).arg(&path);
    let _connector = Daemon::spawn_logged(cmd, w.path("c1.log"));
    wait_for_connectors(addrs.admin, 1).await;
    let transport = if tunnel_over_tcp { "tcp" } else { "quic" };
    let series = format!("portcullis_relay_connector_tunnels{{transport=\"{transport}\"}}");
    assert_eq!(portcullis_e2e::metric(addrs.admin, &series).await, Some(1));
    curl_expect(&w, &addrs, "app.internal", "alice", 200).await;

    let out = w.path("out");
    for authority in ["grpc.internal", "grpcs.internal"] {
        let result = tokio::process::Command::new("python3")
            .arg(script("echo_client.py"))
            .arg(addrs.https.to_string())
            .arg(authority)
            .arg(out.join("ca.crt"))
            .arg(out.join("alice.crt"))
            .arg(out.join("alice.key"))
            .output()
            .await
            .unwrap();
        assert!(
            result.status.success(),
            "{authority}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
        assert_eq!(v["say"], "hello alice", "{authority}: {v}");
        assert_eq!(
            v["say_trailers"]["x-served-by"], "python-grpc",
            "{authority}: {v}"
        );
        assert_eq!(
            v["count"],
            serde_json::json!(["0", "1", "2", "3", "4"]),
            "{authority}"
        );
        assert_eq!(v["chat"], serde_json::json!(["a", "b", "c"]), "{authority}");
        assert_eq!(
            v["fail"],
            serde_json::json!(["NOT_FOUND", "no such thing"]),
            "{authority}"
        );
    }
}
