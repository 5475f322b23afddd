//! Harness for the end-to-end tests: runs the real `portcullis-relay`,
//! `portcullis-connector` and the test origin as child processes on loopback, each test in
//! its own temporary directory with its own CA, and drives them with real `curl`.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Directory holding the built binaries (`target/debug` next to this test executable),
/// or `PORTCULLIS_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PORTCULLIS_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a built binary; panics with advice if it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// Runs `portcullis-relay` with `args` to completion.
pub fn relay_cli(args: &[&str]) -> Output {
    std::process::Command::new(bin("portcullis-relay"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `portcullis-relay` and asserts success.
pub fn relay_ok(args: &[&str]) -> String {
    let out = relay_cli(args);
    assert!(
        out.status.success(),
        "portcullis-relay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn read_ready(path: &Path, child: &mut Child, what: &str) -> String {
    let found = eventually(Duration::from_secs(20), || async {
        std::fs::read_to_string(path).ok()
    })
    .await;
    match found {
        Some(s) => s,
        None => {
            let _ = child.start_kill();
            panic!("{what} did not become ready");
        }
    }
}

/// A spawned daemon whose stderr goes to a log file in the test's directory.
pub struct Daemon {
    /// The child process (killed on drop).
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` (killed when the `Daemon` drops) with its output in `log`.
    pub fn spawn_logged(cmd: Command, log: PathBuf) -> Self {
        Self::spawn(cmd, log)
    }

    fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`TERM`, `KILL`) by the child's id.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("process already reaped");
        let ok = std::process::Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid} failed");
    }

    /// Waits for exit, up to `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("daemon did not exit in time")
            .unwrap()
    }
}

/// Ports bound by a relay, from its ready file.
#[derive(Debug, Clone, Copy)]
pub struct RelayAddrs {
    /// UDP QUIC port.
    pub quic: std::net::SocketAddr,
    /// TCP HTTPS port.
    pub https: std::net::SocketAddr,
    /// TCP admin port.
    pub admin: std::net::SocketAddr,
}

/// One test's world: a directory, a CA, certificates.
pub struct World {
    /// Temporary directory, removed on drop.
    pub dir: tempfile::TempDir,
}

impl World {
    /// A new directory with an initialised CA (`state/`) and issued files in `out/`.
    pub fn new() -> Self {
        // PORTCULLIS_KEEP_TEST_DIRS=1 keeps each test's directory (logs, configs) for a look.
        let keep = std::env::var_os("PORTCULLIS_KEEP_TEST_DIRS").is_some();
        let dir = tempfile::Builder::new()
            .prefix("pc-e2e-")
            .disable_cleanup(keep)
            .tempdir()
            .unwrap();
        let w = Self { dir };
        relay_ok(&["ca", "init", "--state", w.state(), "--org", "Acme"]);
        w
    }

    /// `state/` as a string.
    pub fn state(&self) -> &str {
        Box::leak(
            self.path("state")
                .to_string_lossy()
                .into_owned()
                .into_boxed_str(),
        )
    }

    /// `out/` as a string.
    pub fn out(&self) -> &str {
        Box::leak(
            self.path("out")
                .to_string_lossy()
                .into_owned()
                .into_boxed_str(),
        )
    }

    /// A path in the test's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a connector certificate.
    pub fn issue_connector(&self, name: &str, hostnames: &[&str]) {
        let mut args = vec!["issue", "connector", name];
        for h in hostnames {
            args.extend(["--hostname", h]);
        }
        args.extend(["--state", self.state(), "--out", self.out()]);
        relay_ok(&args);
    }

    /// Issues a device certificate.
    pub fn issue_device(&self, id: &str, user: &str, groups: &[&str], ttl: Option<&str>) {
        let mut args = vec!["issue", "device", id, "--user", user];
        for g in groups {
            args.extend(["--group", g]);
        }
        if let Some(ttl) = ttl {
            args.extend(["--ttl", ttl]);
        }
        args.extend(["--state", self.state(), "--out", self.out()]);
        relay_ok(&args);
    }

    /// Writes `relay.toml` listening on the given addresses, plus `extra` TOML (policy).
    pub fn write_relay_config(&self, quic: &str, https: &str, admin: &str, extra: &str) -> PathBuf {
        let path = self.path("relay.toml");
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}\"\nserver_name = \"relay.acme.test\"\nquic_listen = \"{quic}\"\n\
                 https_listen = \"{https}\"\nadmin_listen = \"{admin}\"\ndrain_grace = \"5s\"\n{extra}",
                self.state()
            ),
        )
        .unwrap();
        path
    }

    /// Starts the relay with `relay.toml` and waits for its ready file.
    pub async fn start_relay(&self) -> (Daemon, RelayAddrs) {
        let ready = self.path("relay.ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(bin("portcullis-relay"));
        cmd.args(["run", "--config"])
            .arg(self.path("relay.toml"))
            .arg("--ready-file")
            .arg(&ready)
            .env("PORTCULLIS_LOG", "info,portcullis_relay=debug");
        let mut d = Daemon::spawn(cmd, self.path("relay.log"));
        let text = read_ready(&ready, &mut d.child, "relay").await;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let addr = |k: &str| v[k].as_str().unwrap().parse().unwrap();
        let addrs = RelayAddrs {
            quic: addr("quic_listen"),
            https: addr("https_listen"),
            admin: addr("admin_listen"),
        };
        (d, addrs)
    }

    /// Writes a connector config for `name` dialling `relay`, publishing `ingress`
    /// (hostname, service URL) pairs, and starts the connector.
    pub fn start_connector(&self, name: &str, relay: &str, ingress: &[(&str, &str)]) -> Daemon {
        self.start_connector_in(None, name, relay, ingress)
    }

    /// Like [`World::start_connector`], inside network namespace `netns` if given.
    pub fn start_connector_in(
        &self,
        netns: Option<&str>,
        name: &str,
        relay: &str,
        ingress: &[(&str, &str)],
    ) -> Daemon {
        let path = self.write_connector_config(name, relay, ingress);
        let mut cmd = in_netns(netns, &bin("portcullis-connector"));
        cmd.args(["run", "--config"]).arg(&path);
        Daemon::spawn(cmd, self.path(&format!("{name}.log")))
    }

    /// Writes `NAME.toml` for a connector.
    pub fn write_connector_config(
        &self,
        name: &str,
        relay: &str,
        ingress: &[(&str, &str)],
    ) -> PathBuf {
        let out = self.out();
        let mut text = format!(
            "relay = \"{relay}\"\nserver_name = \"relay.acme.test\"\nca = \"{out}/ca.crt\"\n\
             cert = \"{out}/{name}.crt\"\nkey = \"{out}/{name}.key\"\ndrain_grace = \"5s\"\n"
        );
        for (h, s) in ingress {
            text.push_str(&format!(
                "[[ingress]]\nhostname = \"{h}\"\nservice = \"{s}\"\n"
            ));
        }
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts the test origin on loopback and returns it with its address.
    pub async fn start_origin(&self) -> (Daemon, String) {
        self.start_origin_in(None, "127.0.0.1:0").await
    }

    /// Starts the test origin listening on `listen`, inside `netns` if given. Its raw TCP
    /// echo server's address is then [`World::echo_addr`].
    pub async fn start_origin_in(&self, netns: Option<&str>, listen: &str) -> (Daemon, String) {
        let ready = self.path("origin.ready");
        let mut cmd = in_netns(netns, &bin("pc-origin"));
        cmd.args(["--listen", listen, "--ready-file"])
            .arg(&ready)
            .arg("--echo-ready-file")
            .arg(self.path("echo.ready"));
        let mut d = Daemon::spawn(cmd, self.path("origin.log"));
        let addr = read_ready(&ready, &mut d.child, "origin").await;
        (d, addr)
    }
}

/// A command for `program`, run inside network namespace `netns` if given.
pub fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

impl World {
    /// The test origin's raw TCP echo address.
    pub fn echo_addr(&self) -> String {
        std::fs::read_to_string(self.path("echo.ready")).unwrap()
    }
}

/// The published web app in [`Stack`].
pub const APP: &str = "app.internal";
/// A raw TCP service (the origin's echo server) in [`Stack`].
pub const DB: &str = "db.internal";
/// An HTTP/2 cleartext (gRPC-style) service in [`Stack`].
pub const GRPC: &str = "grpc.internal";
/// The policy of [`Stack`]: group eng may reach everything published.
pub const POLICY: &str = "[[policy]]\nhostnames = [\"app.internal\", \"db.internal\", \"grpc.internal\", \"*.eng.internal\"]\ngroups = [\"eng\"]\n";

/// A running relay, connector `c1`, the test origin, and devices alice (group eng) and bob
/// (group sales). c1 publishes [`APP`] and `*.eng.internal` (HTTP), [`DB`] (TCP echo) and
/// [`GRPC`] (h2c), all served by the one test origin.
pub struct Stack {
    /// The test's world.
    pub w: World,
    /// The relay.
    pub relay: Daemon,
    /// Its addresses.
    pub addrs: RelayAddrs,
    /// The connector.
    pub connector: Daemon,
    /// The origin process.
    pub origin: Daemon,
    /// The origin's HTTP address.
    pub origin_addr: String,
}

impl Stack {
    /// Brings the stack up and waits until alice reaches [`APP`].
    pub async fn up() -> Self {
        Self::up_with("").await
    }

    /// Like [`Stack::up`], with `extra` TOML appended to relay.toml (e.g. `[limits]`).
    pub async fn up_with(extra: &str) -> Self {
        let w = World::new();
        w.issue_connector("c1", &[APP, "*.eng.internal", DB, GRPC]);
        w.issue_device("alice", "alice", &["eng"], None);
        w.issue_device("bob", "bob", &["sales"], None);
        let (origin, origin_addr) = w.start_origin().await;
        w.write_relay_config(
            "127.0.0.1:0",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &format!("{extra}\n{POLICY}"),
        );
        let (relay, addrs) = w.start_relay().await;
        let service = format!("http://{origin_addr}");
        let echo = format!("tcp://{}", w.echo_addr());
        let h2c = format!("h2c://{origin_addr}");
        let connector = w.start_connector(
            "c1",
            &addrs.quic.to_string(),
            &[
                (APP, &service),
                ("*.eng.internal", &service),
                (DB, &echo),
                (GRPC, &h2c),
            ],
        );
        curl_until(&w, &addrs, APP, "alice", 200).await;
        Self {
            w,
            relay,
            addrs,
            connector,
            origin,
            origin_addr,
        }
    }

    /// Kills the relay, waits `outage`, starts it again on the same ports, and returns how
    /// long after it was back the first request succeeded.
    pub async fn restart_relay(&mut self, outage: Duration) -> Duration {
        let back = self.restart_relay_only(outage).await;
        curl_until(&self.w, &self.addrs, APP, "alice", 200).await;
        back.elapsed()
    }

    /// Kills and restarts the relay on the same ports; returns when it is ready.
    pub async fn restart_relay_only(&mut self, outage: Duration) -> Instant {
        self.relay.signal("KILL");
        self.relay.wait(Duration::from_secs(5)).await;
        let a = self.addrs;
        let (quic, https, admin) = (a.quic.to_string(), a.https.to_string(), a.admin.to_string());
        self.w.write_relay_config(&quic, &https, &admin, POLICY);
        tokio::time::sleep(outage).await;
        let (relay, addrs) = self.w.start_relay().await;
        self.relay = relay;
        self.addrs = addrs;
        Instant::now()
    }

    /// GET through the relay with curl.
    pub async fn get(&self, host: &str, path: &str, device: Option<&str>) -> CurlResult {
        curl(&self.w, &self.addrs, host, path, device).await
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

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

/// Retries a GET until it answers `status` (a tunnel takes a moment to come up).
pub async fn curl_until(
    w: &World,
    relay: &RelayAddrs,
    host: &str,
    device: &str,
    status: u16,
) -> CurlResult {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = curl(w, relay, host, "/", Some(device)).await;
        if r.status == status {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{host} never answered {status}; last: {} {}",
            r.status,
            r.stderr
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// What an HTTP/3 exchange returned.
#[derive(Debug)]
pub struct H3Response {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Trailers, if any.
    pub trailers: Option<http::HeaderMap>,
}

/// An HTTP/3 client connection to the relay's QUIC port as device `device`.
pub struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>,
    _driver: tokio::task::JoinHandle<()>,
    /// The QUIC endpoint (its socket can be rebound to test migration).
    pub endpoint: quinn::Endpoint,
}

impl H3Client {
    /// Connects with TLS name `sni`; panics if the relay refuses.
    pub async fn connect(w: &World, relay: &RelayAddrs, device: &str, sni: &str) -> Self {
        Self::try_connect(w, relay, device, sni).await.unwrap()
    }

    /// Connects with TLS name `sni`.
    pub async fn try_connect(
        w: &World,
        relay: &RelayAddrs,
        device: &str,
        sni: &str,
    ) -> anyhow::Result<Self> {
        let tls = client_tls(w, device, &[b"h3"]);
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
        let conn = endpoint.connect(relay.quic, sni)?.await?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Self {
            send,
            _driver: driver,
            endpoint,
        })
    }

    /// Sends one request with an optional body and reads the whole response; panics on a
    /// stream error.
    pub async fn request(&mut self, req: http::Request<()>, body: Option<Vec<u8>>) -> H3Response {
        self.try_request(req, body).await.unwrap()
    }

    /// Like [`H3Client::request`], returning a stream error (e.g. a reset) as `Err`.
    pub async fn try_request(
        &mut self,
        req: http::Request<()>,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<H3Response> {
        use bytes::Buf;
        let mut stream = self.send.send_request(req).await?;
        if let Some(body) = body {
            for chunk in body.chunks(64 * 1024) {
                stream
                    .send_data(bytes::Bytes::copy_from_slice(chunk))
                    .await?;
            }
        }
        stream.finish().await?;
        let resp = stream.recv_response().await?;
        let mut out = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await? {
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        let trailers = stream.recv_trailers().await?;
        Ok(H3Response {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: out,
            trailers,
        })
    }

    /// Another handle on the same connection, for concurrent requests.
    pub fn sender(&self) -> h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes> {
        self.send.clone()
    }

    /// GET `https://HOST/PATH`.
    pub async fn get(&mut self, host: &str, path: &str) -> H3Response {
        let req = http::Request::get(format!("https://{host}{path}"))
            .body(())
            .unwrap();
        self.request(req, None).await
    }

    /// `CONNECT target` (host:port); sends `data`, half-closes, returns status and
    /// everything received until the other side closes.
    pub async fn connect_tunnel(&mut self, target: &str, data: &[u8]) -> (u16, Vec<u8>) {
        use bytes::Buf;
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target)
            .body(())
            .unwrap();
        let mut stream = self.send.send_request(req).await.unwrap();
        let resp = stream.recv_response().await.unwrap();
        if resp.status() != 200 {
            return (resp.status().as_u16(), Vec::new());
        }
        stream
            .send_data(bytes::Bytes::copy_from_slice(data))
            .await
            .unwrap();
        stream.finish().await.unwrap();
        let mut out = Vec::new();
        while let Ok(Some(mut chunk)) = stream.recv_data().await {
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        (200, out)
    }
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

/// An HTTP/2 connection to the relay (SNI `sni`) as device `device`.
pub async fn h2_connect(
    w: &World,
    relay: &RelayAddrs,
    device: &str,
    sni: &str,
) -> h2::client::SendRequest<bytes::Bytes> {
    let tls = tls_connect(w, relay, sni, device, &[b"h2"]).await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A WebSocket over HTTP/2 extended CONNECT (RFC 8441) to `https://host/ws` as `device`,
/// once the relay's SETTINGS allow it: the stream to write WebSocket frames on, and the
/// one to read them from (status 200 already checked).
pub async fn h2_websocket(
    w: &World,
    relay: &RelayAddrs,
    device: &str,
    host: &str,
) -> (h2::SendStream<bytes::Bytes>, h2::RecvStream) {
    let mut h2 = h2_connect(w, relay, device, host).await;
    h2 = h2.ready().await.unwrap();
    // The server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) arrive right after the handshake.
    for _ in 0..50 {
        if h2.is_extended_connect_protocol_enabled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h2.is_extended_connect_protocol_enabled());
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{host}:{}/ws", relay.https.port()))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (resp, send) = h2.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    (send, resp.into_body())
}

/// Reads exactly `n` bytes of an h2 body, keeping any surplus in `pending`.
pub async fn h2_read_exact(body: &mut h2::RecvStream, pending: &mut Vec<u8>, n: usize) -> Vec<u8> {
    while pending.len() < n {
        let chunk = body.data().await.unwrap().unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        pending.extend_from_slice(&chunk);
    }
    pending.drain(..n).collect()
}

/// The HEADERS frame of an RFC 9220 WebSocket (extended CONNECT over HTTP/3) to
/// `https://authority/ws`.
pub fn h3_websocket_request(authority: &str) -> Vec<u8> {
    headers_frame(&[
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "https"),
        (":authority", authority),
        (":path", "/ws"),
        ("sec-websocket-version", "13"),
    ])
}

/// Reads an h2 body to the end.
pub async fn h2_read_all(body: &mut h2::RecvStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    out
}

/// Waits until the relay's `portcullis_relay_tunnel_streams` gauge reads `n`.
pub async fn wait_for_tunnel_streams(admin: std::net::SocketAddr, n: u32) {
    let found = eventually(Duration::from_secs(10), || async move {
        let out = Command::new("curl")
            .args(["-s", &format!("http://{admin}/metrics")])
            .output()
            .await
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("portcullis_relay_tunnel_streams {n}"))
            .then_some(())
    })
    .await;
    assert!(found.is_some(), "no request reached the tunnel");
}

/// HTTP/3 spoken by hand on a QUIC connection to the relay, for what the h3 library will
/// not send: RFC 9220 `websocket`, malformed or oversized header sections, odd frames.
pub struct RawH3 {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    _control: quinn::SendStream,
    _endpoint: quinn::Endpoint,
}

/// One request stream of a [`RawH3`] connection.
pub struct RawH3Stream {
    /// Sending side.
    pub send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

/// How a raw HTTP/3 read ended when it did not produce a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum RawH3End {
    /// The peer finished the stream.
    Finished,
    /// The peer reset the stream with this code.
    Reset(u64),
    /// The connection closed with this application error code.
    ConnectionClosed(u64),
    /// Anything else (timeout, transport error).
    Other(String),
}

impl RawH3 {
    /// Connects as `device` with TLS name `sni` and opens the control stream (with an
    /// empty SETTINGS frame).
    pub async fn connect(w: &World, relay: &RelayAddrs, device: &str, sni: &str) -> Self {
        let tls = client_tls(w, device, &[b"h3"]);
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // Like any HTTP/3 client that holds connections open, keep this one alive.
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        let mut client = quinn::ClientConfig::new(std::sync::Arc::new(quic));
        client.transport_config(std::sync::Arc::new(transport));
        endpoint.set_default_client_config(client);
        let conn = endpoint.connect(relay.quic, sni).unwrap().await.unwrap();
        let mut control = conn.open_uni().await.unwrap();
        let mut settings = vec![0x00];
        portcullis_shared::h3wire::encode_frame(
            portcullis_shared::h3wire::FRAME_SETTINGS,
            &[],
            &mut settings,
        );
        control.write_all(&settings).await.unwrap();
        Self {
            conn,
            _control: control,
            _endpoint: endpoint,
        }
    }

    /// Opens a request stream and writes `bytes` on it (use [`headers_frame`]).
    pub async fn open(&self, bytes: &[u8]) -> RawH3Stream {
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        RawH3Stream {
            send,
            recv,
            buf: Vec::new(),
        }
    }

    /// Sends one request and returns the response status, or how the stream ended.
    pub async fn status_of(&self, bytes: &[u8]) -> Result<u16, RawH3End> {
        let mut s = self.open(bytes).await;
        let _ = s.send.finish();
        s.response().await
    }
}

/// A HEADERS frame carrying `fields` as literals, in order, exactly as given.
pub fn headers_frame(fields: &[(&str, &str)]) -> Vec<u8> {
    use portcullis_shared::h3wire;
    let block =
        h3wire::encode_field_section(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let mut f = Vec::new();
    h3wire::encode_frame(h3wire::FRAME_HEADERS, &block, &mut f);
    f
}

/// A DATA frame carrying `payload`.
pub fn data_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    portcullis_shared::h3wire::encode_frame(portcullis_shared::h3wire::FRAME_DATA, payload, &mut f);
    f
}

impl RawH3Stream {
    /// Reads the next whole frame (type and payload), within 10 s.
    pub async fn frame(&mut self) -> Result<(u64, Vec<u8>), RawH3End> {
        use portcullis_shared::h3wire;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(h) = h3wire::decode_frame_head(&self.buf) {
                let end = h.head_len + h.len as usize;
                if self.buf.len() >= end {
                    let payload = self.buf[h.head_len..end].to_vec();
                    self.buf.drain(..end);
                    return Ok((h.ty, payload));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = tokio::time::timeout_at(deadline.into(), self.recv.read(&mut chunk)).await;
            match read {
                Err(_) => return Err(RawH3End::Other("timed out".into())),
                Ok(Ok(Some(n))) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Ok(None)) => return Err(RawH3End::Finished),
                Ok(Err(quinn::ReadError::Reset(code))) => {
                    return Err(RawH3End::Reset(code.into_inner()));
                }
                Ok(Err(quinn::ReadError::ConnectionLost(
                    quinn::ConnectionError::ApplicationClosed(c),
                ))) => return Err(RawH3End::ConnectionClosed(c.error_code.into_inner())),
                Ok(Err(e)) => return Err(RawH3End::Other(e.to_string())),
            }
        }
    }

    /// Reads frames up to the response's HEADERS and returns its `:status`.
    pub async fn response(&mut self) -> Result<u16, RawH3End> {
        loop {
            let (ty, payload) = self.frame().await?;
            if ty != portcullis_shared::h3wire::FRAME_HEADERS {
                continue;
            }
            let fields = portcullis_shared::h3wire::decode_field_section(&payload)
                .map_err(|e| RawH3End::Other(format!("bad response section: {e}")))?;
            let status = fields
                .iter()
                .find(|f| f.name == b":status")
                .and_then(|f| std::str::from_utf8(&f.value).ok()?.parse().ok())
                .ok_or_else(|| RawH3End::Other("no :status".into()))?;
            return Ok(status);
        }
    }

    /// Reads DATA frames until `n` payload bytes have arrived.
    pub async fn data(&mut self, n: usize) -> Result<Vec<u8>, RawH3End> {
        let mut out = Vec::new();
        while out.len() < n {
            let (ty, payload) = self.frame().await?;
            if ty == portcullis_shared::h3wire::FRAME_DATA {
                out.extend_from_slice(&payload);
            }
        }
        Ok(out)
    }
}

/// A masked client WebSocket frame (RFC 6455 §5.2) with opcode `op` (1 text, 8 close,
/// 9 ping) and a payload under 126 bytes: WebSocket spoken by hand, so every hop's
/// framing can be checked byte for byte.
pub fn ws_client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | op, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Peak resident set size of a process, in bytes (`VmHWM` from /proc).
pub fn peak_rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

/// Current resident set size of a process, in bytes (`VmRSS` from /proc).
pub fn rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
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

/// Sends an HTTP/1.1 WebSocket handshake for `target` (origin-form, or absolute-form to a
/// proxy) with `Host: host` and the RFC 6455 §1.3 sample key, and checks the `101` and
/// that the origin's accept key for it came through untouched; returns the head,
/// lower-cased.
pub async fn ws_handshake<S>(io: &mut S, target: &str, host: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let handshake = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    io.write_all(handshake.as_bytes()).await.unwrap();
    let head = read_head(io).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    head
}
