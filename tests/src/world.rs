//! One test's world: a temporary directory with its own CA (made by the relay's CLI),
//! issued certificates, relay and connector configuration files, and the binaries started
//! from them (relay, connector, test origin) with their ready files.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use tokio::process::Command;

use crate::process::read_ready;
use crate::{Daemon, bin, in_netns, relay_ok};

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
    /// The shared store (`postgres://...`) the relay and its admin commands use, if not
    /// the SQLite file in `state/`.
    pub store: Option<String>,
}

impl World {
    /// A new directory with an initialised CA (`state/`) and issued files in `out/`.
    pub fn new() -> Self {
        Self::init(None)
    }

    /// A new world whose relay keeps its state in the PostgreSQL database at `url`.
    pub fn with_store(url: &str) -> Self {
        Self::init(Some(url.to_owned()))
    }

    /// A second relay's world beside `first`'s: its own directory, with a copy of the
    /// first's state directory (CA, JWT key) and issued files, on the same store; this
    /// is how an operator makes a second relay.
    pub fn copy_of(first: &Self) -> Self {
        let w = Self {
            dir: Self::tempdir(),
            store: first.store.clone(),
        };
        for sub in ["state", "out"] {
            let to = w.path(sub);
            std::fs::create_dir_all(&to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o700)).unwrap();
            for entry in std::fs::read_dir(first.path(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
                }
            }
        }
        w
    }

    fn init(store: Option<String>) -> Self {
        let w = Self {
            dir: Self::tempdir(),
            store,
        };
        // Name-constrained as a careful operator's would be, so every test runs against
        // such a CA.
        w.admin(&[
            "ca",
            "init",
            "--org",
            "Acme",
            "--permit-dns",
            ".internal",
            "--permit-dns",
            ".test",
            // Test collectors and origins with org-CA certificates listen on localhost.
            "--permit-dns",
            "localhost",
        ]);
        w
    }

    fn tempdir() -> tempfile::TempDir {
        // PORTCULLIS_KEEP_TEST_DIRS=1 keeps each test's directory (logs, configs) for a look.
        let keep = std::env::var_os("PORTCULLIS_KEEP_TEST_DIRS").is_some();
        tempfile::Builder::new()
            .prefix("pc-e2e-")
            .disable_cleanup(keep)
            .tempdir()
            .unwrap()
    }

    /// Runs the relay's admin command `args` against this world's state directory and
    /// store, asserting success; its standard output.
    pub fn admin(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--state", self.state()]);
        if let Some(url) = &self.store {
            all.extend(["--store", url.as_str()]);
        }
        relay_ok(&all)
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
        args.extend(["--out", self.out()]);
        self.admin(&args);
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
        args.extend(["--out", self.out()]);
        self.admin(&args);
    }

    /// Writes `relay.toml` listening on the given addresses, plus `extra` TOML (policy).
    /// Unless `extra` has an `[admin]` table of its own, `/metrics` lists device ids
    /// (`[admin] metrics_device_ids`), which the harness waits on.
    pub fn write_relay_config(&self, quic: &str, https: &str, admin: &str, extra: &str) -> PathBuf {
        let path = self.path("relay.toml");
        let admin_table = if extra.contains("[admin]") {
            ""
        } else {
            "\n[admin]\nmetrics_device_ids = true\n"
        };
        let store = match &self.store {
            Some(url) if !extra.contains("[store]") => format!("store = {url:?}\n"),
            _ => String::new(),
        };
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}\"\nserver_name = \"relay.acme.test\"\nquic_listen = \"{quic}\"\n\
                 https_listen = \"{https}\"\nadmin_listen = \"{admin}\"\ndrain_grace = \"5s\"\n{store}{extra}{admin_table}",
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
        self.run_connector(netns, name, &path)
    }

    /// Starts connector `name` with the config at `path`, inside `netns` if given.
    pub fn run_connector(&self, netns: Option<&str>, name: &str, path: &std::path::Path) -> Daemon {
        let mut cmd = in_netns(netns, &bin("portcullis-connector"));
        cmd.args(["run", "--config"]).arg(path);
        Daemon::spawn(cmd, self.path(&format!("{name}.log")))
    }

    /// Writes connector `name`'s config for `relay`, with its tunnel's fallback over TCP
    /// going to `tcp_port` (`relay_tcp_port`).
    pub fn write_connector_config_with_tcp_port(
        &self,
        name: &str,
        relay: &str,
        tcp_port: u16,
        ingress: &[(&str, &str)],
    ) -> PathBuf {
        let path = self.write_connector_config(name, relay, ingress);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("relay_tcp_port = {tcp_port}\n{text}")).unwrap();
        path
    }

    /// Starts connector `name` with a tunnel to each of `relays`.
    pub fn start_connector_for(
        &self,
        name: &str,
        relays: &[&str],
        ingress: &[(&str, &str)],
    ) -> Daemon {
        let path = self.write_connector_config_for(name, relays, ingress);
        let mut cmd = Command::new(bin("portcullis-connector"));
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
        self.write_connector_config_for(name, &[relay], ingress)
    }

    /// [`World::write_connector_config`] with several relays (`relay = [...]`).
    pub fn write_connector_config_for(
        &self,
        name: &str,
        relays: &[&str],
        ingress: &[(&str, &str)],
    ) -> PathBuf {
        let out = self.out();
        let relay = match relays {
            [one] => format!("{one:?}"),
            many => format!("{many:?}"),
        };
        let mut text = format!(
            "relay = {relay}\nserver_name = \"relay.acme.test\"\nca = \"{out}/ca.crt\"\n\
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

impl World {
    /// The test origin's raw TCP echo address.
    pub fn echo_addr(&self) -> String {
        std::fs::read_to_string(self.path("echo.ready")).unwrap()
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}
