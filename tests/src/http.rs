//! HTTP clients against the relay: curl (HTTP/1.1 and HTTP/2, as users run it), the
//! rustls client configuration of a device, raw TLS connections, HTTP/1.1 CONNECT, and
//! reading a message head by hand.

use std::process::Stdio;

use tokio::process::Command;

use crate::{RelayAddrs, World};

/// What curl saw.
#[derive(Debug)]
pub struct CurlResult {
    /// HTTP status, 0 when no response (e.g. the handshake failed).
    pub status: u16,
    /// HTTP version curl used: "1.1", "2".
    pub version: String,
    /// Response body.
    pub body: String,
    /// curl's exit code.
    pub exit: i32,
    /// curl's error output.
    pub stderr: String,
}

/// Builds a curl command for `https://HOST:PORT/PATH` through the relay, pinning HOST to
/// loopback, trusting the org CA and presenting device `device`'s certificate if given.
pub fn curl_cmd(
    w: &World,
    relay: &RelayAddrs,
    host: &str,
    path: &str,
    device: Option<&str>,
) -> Command {
    let out = w.out();
    let port = relay.https.port();
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{http_version}",
    ])
    .args(["--cacert", &format!("{out}/ca.crt")])
    .args(["--resolve", &format!("{host}:{port}:127.0.0.1")]);
    if let Some(d) = device {
        cmd.args([
            "--cert",
            &format!("{out}/{d}.crt"),
            "--key",
            &format!("{out}/{d}.key"),
        ]);
    }
    cmd.arg(format!("https://{host}:{port}{path}"));
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs a curl command and parses its output.
pub async fn run_curl(mut cmd: Command) -> CurlResult {
    let out = cmd.output().await.expect("curl must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut parts = tail.split(' ');
    CurlResult {
        status: parts.next().and_then(|s| s.parse().ok()).unwrap_or(0),
        version: parts.next().unwrap_or("").to_owned(),
        body: body.to_owned(),
        exit: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// GET through the relay with curl.
pub async fn curl(
    w: &World,
    relay: &RelayAddrs,
    host: &str,
    path: &str,
    device: Option<&str>,
) -> CurlResult {
    run_curl(curl_cmd(w, relay, host, path, device)).await
}

/// One GET of `/` as `device` that must answer `status` (wait for what it depends on
/// first, e.g. [`crate::wait_for_connectors`]).
pub async fn curl_expect(
    w: &World,
    relay: &RelayAddrs,
    host: &str,
    device: &str,
    status: u16,
) -> CurlResult {
    let r = curl(w, relay, host, "/", Some(device)).await;
    assert_eq!(
        r.status, status,
        "{host} answered {} instead: {} {}",
        r.status, r.body, r.stderr
    );
    r
}

/// A rustls client config trusting the org CA of `w`, presenting device `device`'s
/// certificate, offering `alpn`.
pub fn client_tls(w: &World, device: &str, alpn: &[&[u8]]) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let out = w.path("out");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(out.join("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<_> =
        rustls_pki_types::CertificateDer::pem_file_iter(out.join(format!("{device}.crt")))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_file(out.join(format!("{device}.key"))).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg
}

/// A TLS connection to the relay's HTTPS port with SNI `sni`, as device `device`.
pub async fn tls_connect(
    w: &World,
    relay: &RelayAddrs,
    sni: &str,
    device: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls(w, device, alpn)));
    let tcp = tokio::net::TcpStream::connect(relay.https).await.unwrap();
    // As curl and browsers do: small writes (a request after the handshake) go out at once.
    tcp.set_nodelay(true).unwrap();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// `CONNECT target` over HTTP/1.1 on a TLS connection to the relay (SNI: the relay's own
/// name), then `data` is sent and the write side half-closed; returns the response status
/// line and all bytes received until the far side closes.
pub async fn h1_connect(
    w: &World,
    relay: &RelayAddrs,
    device: &str,
    target: &str,
    data: &[u8],
) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(w, relay, "relay.acme.test", device, &[b"http/1.1"]).await;
    tls.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tls).await;
    let status = head.lines().next().unwrap_or("").to_owned();
    if !status.contains(" 200") {
        return (status, Vec::new());
    }
    tls.write_all(data).await.unwrap();
    // Half-close: TLS close_notify ends our direction, the tunnel must carry that FIN.
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    (status, rest)
}

/// Reads an HTTP/1.1 message head byte by byte, so nothing after it is consumed (an
/// upgraded or tunnelled stream follows); returns what arrived if the peer closes first.
pub async fn read_head<R: tokio::io::AsyncRead + Unpin>(io: &mut R) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if io.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}
