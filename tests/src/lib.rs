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

    /// Starts the test origin listening on `listen`, inside `netns` if given.
    pub async fn start_origin_in(&self, netns: Option<&str>, listen: &str) -> (Daemon, String) {
        let ready = self.path("origin.ready");
        let mut cmd = in_netns(netns, &bin("pc-origin"));
        cmd.args(["--listen", listen, "--ready-file"]).arg(&ready);
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
