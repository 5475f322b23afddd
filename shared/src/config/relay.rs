//! `relay.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, defaults, parse_file, resolve};
use crate::identity::Hostname;
use crate::policy::PolicyRule;

/// Whether two TCP listeners would take the same port: equal ports (not 0, which asks
/// for any) on the same address, or where either is the unspecified address.
fn same_tcp_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// What the admin commands read from a relay.toml: [`RelayConfig::for_admin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminView {
    /// `state_dir`, relative to the file's directory when it is relative.
    pub state_dir: PathBuf,
    /// The shared store's URL, when the relay uses one.
    pub store_url: Option<String>,
    /// `jwt_prepublish`.
    pub jwt_prepublish: Duration,
}

/// The relay's configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The directory given to `ca init`: CA, store, JWT key, access log.
    pub state_dir: PathBuf,
    /// The relay's own TLS name, which connectors verify.
    pub server_name: Hostname,
    /// UDP address for QUIC (connectors).
    pub quic_listen: SocketAddr,
    /// TCP address for HTTPS clients (HTTP/1.1 and HTTP/2).
    pub https_listen: SocketAddr,
    /// TCP address for `/healthz`, `/readyz` and `/metrics`; off when absent.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// A certificate (PEM chain) to serve for published hostnames instead of leaves
    /// minted from the org CA; reloaded when the file changes.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The private key for `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Where to append the access log (JSON lines); default `state_dir/access.log`.
    #[serde(default)]
    pub access_log: Option<PathBuf>,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(default = "defaults::drain_grace", with = "humantime_serde")]
    pub drain_grace: Duration,
    /// After SIGTERM, how long the relay goes on serving normally with `/readyz` already
    /// answering 503, so a load balancer that checks it stops sending new connections
    /// before the relay stops accepting them; then the drain starts.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// The congestion controller of the relay's QUIC connections: `loss-tolerant` (the
    /// default) or `cubic`.
    #[serde(default)]
    pub quic_congestion: super::QuicCongestion,
    /// How long a key made by `jwt rotate` is published in the JWKS before it signs, so
    /// origins that cache the JWKS know it first (default 1h). The same on every relay
    /// sharing the key files.
    #[serde(default = "defaults::jwt_prepublish", with = "humantime_serde")]
    pub jwt_prepublish: Duration,
    /// How long audit rows are kept: the running relay deletes older ones every hour
    /// (default 400 days; at least a day).
    #[serde(default = "defaults::audit_retention", with = "humantime_serde")]
    pub audit_retention: Duration,
    /// Resource limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// TLS versions and the budget for minting certificates.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Where the store is (`store = "postgres://..."`, or `url` in a `[store]` table), and
    /// how the relay behaves when it cannot read it. Without a URL here, `store_file` or
    /// the environment's `PORTCULLIS_STORE` gives it.
    #[serde(default)]
    pub store: StoreConfig,
    /// A file holding the store's URL (a Kubernetes Secret, so the password is in no
    /// ConfigMap); instead of a URL in `store`.
    #[serde(default)]
    pub store_file: Option<PathBuf>,
    /// Who may reach the admin listener, and what `/metrics` names.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Export of the relay's spans over OTLP; off when absent.
    #[serde(default)]
    pub otlp: Option<super::OtlpConfig>,
    /// Allow rules; anything not allowed is denied.
    #[serde(default)]
    pub policy: Vec<PolicyRule>,
}

/// Explicit resource limits, each with a safe default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Time allowed for a TLS handshake on the HTTPS listener.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time allowed for a client to send a request's headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request header section accepted from clients, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Concurrent request streams one client connection may open (HTTP/2 and HTTP/3).
    pub max_concurrent_streams: u32,
    /// Concurrent requests and tunnels one device may have in flight (429 beyond).
    pub max_streams_per_device: usize,
    /// Concurrent requests and tunnels through one connector (503 beyond).
    pub max_streams_per_connector: usize,
    /// QUIC flow-control window per stream, in bytes.
    pub quic_stream_window: u32,
    /// QUIC flow-control window per connection, in bytes.
    pub quic_connection_window: u32,
    /// Idle time after which a client or connector connection is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open connections one listener (QUIC, HTTPS) holds at most, handshakes included;
    /// beyond it new ones are refused before any handshake work.
    pub max_connections: usize,
    /// Open connections one client address (IPv4 address, IPv6 /64) may hold on one
    /// listener; beyond it its new ones are refused before any handshake work.
    pub max_connections_per_address: usize,
    /// Connections without a client certificate (strangers: enrolment, requests that will
    /// be refused) one listener holds at most, after their handshake, in places of their
    /// own: past it new ones are closed, and they never take places from devices.
    pub max_unauthenticated_connections: usize,
    /// How long a connection without a client certificate may stay open, whatever it
    /// sends (its enrolment deadline is the smaller of this and `enroll_timeout`).
    #[serde(with = "humantime_serde")]
    pub unauthenticated_lifetime: Duration,
    /// QUIC handshakes from unvalidated addresses in progress at which a new one must
    /// first prove its address with a Retry (0: always).
    pub quic_retry_threshold: usize,
    /// How long an enrolment connection (ALPN `portcullis-enroll/1`) may stay open.
    #[serde(with = "humantime_serde")]
    pub enroll_timeout: Duration,
    /// Resident memory, in bytes, at which the relay answers new requests 503; from three
    /// quarters of it, it sheds new handshakes and enrolment.
    pub overload_memory: u64,
    /// Open client connections (both listeners together, handshakes included) at which
    /// the relay sheds new handshakes and enrolment.
    pub overload_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_concurrent_streams: 100,
            max_streams_per_device: 256,
            max_streams_per_connector: 4096,
            quic_stream_window: 1024 * 1024,
            quic_connection_window: 8 * 1024 * 1024,
            idle_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_connections_per_address: 500,
            max_unauthenticated_connections: 1_000,
            unauthenticated_lifetime: Duration::from_secs(30),
            quic_retry_threshold: 64,
            enroll_timeout: Duration::from_secs(30),
            overload_memory: 1024 * 1024 * 1024,
            overload_connections: 16_000,
        }
    }
}

/// The oldest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3. TLS 1.2 sends the client certificate, which names the device
    /// and so its user, unencrypted.
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// `[tls]`: what the relay's TLS listeners accept and how many certificates it mints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The oldest version the HTTPS listener accepts (QUIC is TLS 1.3 by definition).
    pub min_version: TlsVersion,
    /// New certificates the relay may mint for published names per minute (a burst of as
    /// many, refilled evenly); beyond it a handshake gets the relay's own certificate.
    pub leaves_per_minute: u32,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            min_version: TlsVersion::Tls13,
            leaves_per_minute: 60,
        }
    }
}

/// `[admin]`: the admin listener's exposure and what `/metrics` names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Allow `admin_listen` on an address other than loopback; `token_file` is then
    /// required.
    pub allow_remote: bool,
    /// A file holding the bearer token every admin request must then present
    /// (`Authorization: Bearer <token>`); read at start.
    pub token_file: Option<PathBuf>,
    /// List each device's id (which carries its user's name) in `/metrics`.
    pub metrics_device_ids: bool,
    /// Answer `/healthz` and `/readyz` without the bearer token (they say only "ok" or
    /// "ready"), so the kubelet's probes, which cannot carry a secret, reach them;
    /// `/metrics` still wants it.
    pub probes_without_token: bool,
}

/// `store`: where the store is and failing closed when it cannot be read. Written either
/// as a URL (`store = "postgres://user:password@host:port/db"`) or as a `[store]` table
/// with `url` and `fail_closed_after`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "StoreSetting")]
pub struct StoreConfig {
    /// The PostgreSQL database several relays share; absent, the SQLite file in
    /// `state_dir`.
    pub url: Option<String>,
    /// After the store has been unreadable this long, the relay refuses every certificate
    /// at the handshake and closes every live connection until it can read the store
    /// again.
    pub fail_closed_after: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            fail_closed_after: Duration::from_secs(30),
        }
    }
}

/// The two ways to write `store`.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoreSetting {
    Url(String),
    Table(StoreTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreTable {
    #[serde(default)]
    url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    fail_closed_after: Option<Duration>,
}

impl From<StoreSetting> for StoreConfig {
    fn from(s: StoreSetting) -> Self {
        let default = Self::default();
        match s {
            StoreSetting::Url(url) => Self {
                url: Some(url),
                ..default
            },
            StoreSetting::Table(t) => Self {
                url: t.url,
                fail_closed_after: t.fail_closed_after.unwrap_or(default.fail_closed_after),
            },
        }
    }
}

impl RelayConfig {
    /// The settings that differ from `running` and only take effect after a restart
    /// (everything but the policy, which a running relay reloads).
    pub fn needs_restart(&self, running: &Self) -> Vec<&'static str> {
        // Destructured so that a new setting cannot be forgotten here.
        let Self {
            state_dir,
            server_name,
            quic_listen,
            https_listen,
            admin_listen,
            tls_cert,
            tls_key,
            access_log,
            drain_grace,
            shutdown_delay,
            quic_congestion,
            jwt_prepublish,
            audit_retention,
            limits,
            tls,
            store,
            store_file: _,
            admin,
            otlp,
            policy: _,
        } = self;
        [
            ("state_dir", *state_dir != running.state_dir),
            ("server_name", *server_name != running.server_name),
            ("quic_listen", *quic_listen != running.quic_listen),
            ("https_listen", *https_listen != running.https_listen),
            ("admin_listen", *admin_listen != running.admin_listen),
            ("tls_cert", *tls_cert != running.tls_cert),
            ("tls_key", *tls_key != running.tls_key),
            ("access_log", *access_log != running.access_log),
            ("drain_grace", *drain_grace != running.drain_grace),
            ("shutdown_delay", *shutdown_delay != running.shutdown_delay),
            (
                "quic_congestion",
                *quic_congestion != running.quic_congestion,
            ),
            ("jwt_prepublish", *jwt_prepublish != running.jwt_prepublish),
            (
                "audit_retention",
                *audit_retention != running.audit_retention,
            ),
            ("limits", *limits != running.limits),
            ("tls", *tls != running.tls),
            ("store", *store != running.store),
            ("admin", *admin != running.admin),
            ("otlp", *otlp != running.otlp),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
    }

    /// Reads, parses and validates `path`; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Self = parse_file(path)?;
        cfg.resolve_store(path)?;
        cfg.state_dir = resolve(path, &cfg.state_dir);
        for p in [
            &mut cfg.tls_cert,
            &mut cfg.tls_key,
            &mut cfg.access_log,
            &mut cfg.admin.token_file,
        ]
        .into_iter()
        .flatten()
        {
            *p = resolve(path, p);
        }
        if let Some(ca) = cfg.otlp.as_mut().and_then(|o| o.ca.as_mut()) {
            *ca = resolve(path, ca);
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// What the admin commands need from `path`: its state directory, the store URL it
    /// names (`store`, `store_file` or `PORTCULLIS_STORE`) and `jwt_prepublish`, without
    /// checking the rest of the file (the CA and the files it names may not exist yet).
    pub fn for_admin(path: &Path) -> Result<AdminView, ConfigError> {
        let mut cfg: Self = parse_file(path)?;
        cfg.resolve_store(path)?;
        Ok(AdminView {
            state_dir: resolve(path, &cfg.state_dir),
            store_url: cfg.store.url,
            jwt_prepublish: cfg.jwt_prepublish,
        })
    }

    /// Fills `store.url` from `store_file` (relative to `path`) or, when neither gives
    /// one, from `PORTCULLIS_STORE`.
    fn resolve_store(&mut self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if let Some(file) = &mut self.store_file {
            *file = resolve(path, file);
            if self.store.url.is_some() {
                return Err(invalid(
                    "set the store's URL in store or in store_file, not both".into(),
                ));
            }
            let url = std::fs::read_to_string(&*file)
                .map_err(|e| invalid(format!("store_file {}: {e}", file.display())))?;
            let url = url.trim();
            if url.is_empty() {
                return Err(invalid(format!("store_file {} is empty", file.display())));
            }
            self.store.url = Some(url.to_owned());
        } else if self.store.url.is_none()
            && let Ok(url) = std::env::var("PORTCULLIS_STORE")
            && !url.trim().is_empty()
        {
            self.store.url = Some(url.trim().to_owned());
        }
        Ok(())
    }

    /// Checks values that serde cannot: paired options and required files.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid("set both tls_cert and tls_key, or neither".into()));
        }
        if let Some(admin) = self.admin_listen
            && same_tcp_port(admin, self.https_listen)
        {
            return Err(invalid(format!(
                "admin_listen {admin} and https_listen {} are one TCP port: give the admin \
                 listener a port of its own (e.g. \"127.0.0.1:9090\")",
                self.https_listen
            )));
        }
        if let Some(addr) = self.admin_listen
            && !addr.ip().is_loopback()
            && !self.admin.allow_remote
        {
            return Err(invalid(format!(
                "admin_listen {addr} is not a loopback address: bind it to 127.0.0.1, or set [admin] allow_remote = true with a token_file"
            )));
        }
        if self.admin.allow_remote && self.admin.token_file.is_none() {
            return Err(invalid(
                "[admin] allow_remote = true needs token_file, a file holding the bearer token admin requests must present".into(),
            ));
        }
        if self.tls.leaves_per_minute == 0 {
            return Err(invalid("tls.leaves_per_minute must be at least 1".into()));
        }
        if let Some(url) = &self.store.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(invalid(format!(
                "store {:?} is not a PostgreSQL URL: write store = \"postgres://user:password@host:port/db\", or leave it out for the SQLite file in state_dir",
                crate::text::mask_url(url)
            )));
        }
        if let Some(otlp) = &self.otlp {
            otlp.validate().map_err(invalid)?;
        }
        if self.audit_retention < Duration::from_secs(24 * 3600) {
            return Err(invalid(
                "audit_retention must be at least 1d: the audit log is evidence".into(),
            ));
        }
        if self.store.fail_closed_after < Duration::from_secs(1) {
            return Err(invalid(
                "store.fail_closed_after must be at least 1s".into(),
            ));
        }
        if !self.state_dir.join(crate::pki::CA_KEY_FILE).exists() {
            return Err(invalid(format!(
                "state_dir {} holds no CA: run `portcullis-relay ca init --state {}` first",
                self.state_dir.display(),
                self.state_dir.display()
            )));
        }
        for (i, rule) in self.policy.iter().enumerate() {
            if rule.hostnames.is_empty() {
                return Err(invalid(format!("policy rule {} lists no hostnames", i + 1)));
            }
            if rule.users.is_empty() && rule.groups.is_empty() && rule.devices.is_empty() {
                return Err(invalid(format!(
                    "policy rule {} names no users, groups or devices",
                    i + 1
                )));
            }
        }
        let l = &self.limits;
        if l.max_header_bytes < 1024 {
            return Err(invalid(
                "limits.max_header_bytes must be at least 1024".into(),
            ));
        }
        if l.max_concurrent_streams == 0
            || l.max_streams_per_device == 0
            || l.max_streams_per_connector == 0
        {
            return Err(invalid("limits: stream limits must be at least 1".into()));
        }
        if l.quic_stream_window < 16 * 1024 || l.quic_connection_window < l.quic_stream_window {
            return Err(invalid(
                "limits: quic_stream_window must be at least 16384 and quic_connection_window at least quic_stream_window".into(),
            ));
        }
        if l.idle_timeout < Duration::from_secs(2) {
            return Err(invalid("limits.idle_timeout must be at least 2s".into()));
        }
        if l.max_connections == 0
            || l.max_connections_per_address == 0
            || l.max_unauthenticated_connections == 0
            || l.overload_connections == 0
        {
            return Err(invalid(
                "limits: max_connections, max_connections_per_address, max_unauthenticated_connections and overload_connections must be at least 1".into(),
            ));
        }
        if l.unauthenticated_lifetime < Duration::from_secs(1) {
            return Err(invalid(
                "limits.unauthenticated_lifetime must be at least 1s".into(),
            ));
        }
        if l.enroll_timeout < Duration::from_secs(1) {
            return Err(invalid("limits.enroll_timeout must be at least 1s".into()));
        }
        if l.overload_memory < 16 * 1024 * 1024 {
            return Err(invalid(
                "limits.overload_memory must be at least 16777216 (16 MiB)".into(),
            ));
        }
        Ok(())
    }

    /// The access log's path.
    pub fn access_log_path(&self) -> PathBuf {
        self.access_log
            .clone()
            .unwrap_or_else(|| self.state_dir.join("access.log"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    const GOOD: &str = r#"
state_dir = "/var/lib/portcullis"
server_name = "relay.example.com"
quic_listen = "0.0.0.0:4433"
https_listen = "0.0.0.0:8443"
admin_listen = "127.0.0.1:9090"
[[policy]]
hostnames = ["grafana.internal", "*.eng.internal"]
groups = ["eng"]
"#;

    #[test]
    fn documented_example_parses() {
        let cfg: RelayConfig = parse_str(Path::new("relay.toml"), GOOD).unwrap();
        assert_eq!(cfg.policy.len(), 1);
        assert_eq!(cfg.drain_grace, Duration::from_secs(10));
        assert_eq!(cfg.limits.max_header_bytes, 16 * 1024);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = GOOD.replace("admin_listen", "admin_lissen");
        let err = parse_str::<RelayConfig>(Path::new("relay.toml"), &text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("relay.toml:6:"), "{msg}");
        assert!(msg.contains("admin_lissen"), "{msg}");
    }

    #[test]
    fn settings_needing_a_restart_are_named_and_the_policy_is_not_one() {
        let running: RelayConfig = parse_str(Path::new("relay.toml"), GOOD).unwrap();
        let text = GOOD
            .replace("\"eng\"]", "\"eng\", \"ops\"]")
            .replace("0.0.0.0:8443", "0.0.0.0:9443");
        let new: RelayConfig = parse_str(Path::new("relay.toml"), &text).unwrap();
        assert_ne!(new.policy, running.policy);
        assert_eq!(new.needs_restart(&running), ["https_listen"]);
        let limits = format!("{GOOD}\n[limits]\nidle_timeout = \"60s\"\n");
        let new: RelayConfig = parse_str(Path::new("relay.toml"), &limits).unwrap();
        assert_eq!(new.needs_restart(&running), ["limits"]);
        assert!(running.needs_restart(&running).is_empty());
    }

    #[test]
    fn bad_values_are_refused() {
        let text = GOOD.replace("0.0.0.0:4433", "nowhere");
        let err = parse_str::<RelayConfig>(Path::new("r.toml"), &text).unwrap_err();
        assert!(err.to_string().starts_with("r.toml:4:"), "{err}");
        let text = GOOD.replace("*.eng.internal", "a.*.internal");
        assert!(parse_str::<RelayConfig>(Path::new("r.toml"), &text).is_err());
    }

    #[test]
    fn the_tls_and_store_tables_parse_with_safe_defaults() {
        let cfg: RelayConfig = parse_str(Path::new("relay.toml"), GOOD).unwrap();
        assert_eq!(cfg.tls.min_version, TlsVersion::Tls13);
        assert_eq!(cfg.tls.leaves_per_minute, 60);
        assert_eq!(cfg.store.fail_closed_after, Duration::from_secs(30));
        assert_eq!(cfg.audit_retention, Duration::from_secs(400 * 24 * 3600));
        assert_eq!(cfg.jwt_prepublish, Duration::from_secs(3600));
        let text = format!(
            "{GOOD}[tls]\nmin_version = \"1.2\"\nleaves_per_minute = 5\n[store]\nfail_closed_after = \"5s\"\n"
        );
        let cfg: RelayConfig = parse_str(Path::new("relay.toml"), &text).unwrap();
        assert_eq!(cfg.tls.min_version, TlsVersion::Tls12);
        assert_eq!(cfg.tls.leaves_per_minute, 5);
        assert_eq!(cfg.store.fail_closed_after, Duration::from_secs(5));
        let text = format!("{GOOD}[tls]\nmin_version = \"1.1\"\n");
        assert!(parse_str::<RelayConfig>(Path::new("relay.toml"), &text).is_err());
    }

    #[test]
    fn the_admin_and_https_listeners_cannot_share_a_port() {
        let text = GOOD.replace("127.0.0.1:9090", "127.0.0.1:8443");
        let cfg: RelayConfig = parse_str(Path::new("relay.toml"), &text).unwrap();
        let err = cfg
            .validate(Path::new("relay.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "admin_listen 127.0.0.1:8443 and https_listen 0.0.0.0:8443 are one TCP port"
            ),
            "{err}"
        );
        assert!(!same_tcp_port(
            "127.0.0.1:0".parse().unwrap(),
            "0.0.0.0:0".parse().unwrap()
        ));
        assert!(!same_tcp_port(
            "127.0.0.1:9090".parse().unwrap(),
            "127.0.0.2:9090".parse().unwrap()
        ));
        assert!(same_tcp_port(
            "[::]:9090".parse().unwrap(),
            "127.0.0.1:9090".parse().unwrap()
        ));
    }

    #[test]
    fn the_store_url_can_come_from_a_file_but_not_from_two_places() {
        let dir = tempfile::tempdir().unwrap();
        let url = "postgres://relay:s3cret@db.internal:5432/portcullis";
        std::fs::write(dir.path().join("store.url"), format!("{url}\n")).unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, format!("store_file = \"store.url\"\n{GOOD}")).unwrap();
        let view = RelayConfig::for_admin(&path).unwrap();
        assert_eq!(view.store_url.as_deref(), Some(url));
        assert_eq!(view.state_dir, Path::new("/var/lib/portcullis"));
        std::fs::write(
            &path,
            format!("store = \"{url}\"\nstore_file = \"store.url\"\n{GOOD}"),
        )
        .unwrap();
        let err = RelayConfig::for_admin(&path).unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
        std::fs::write(&path, format!("store_file = \"missing.url\"\n{GOOD}")).unwrap();
        let err = RelayConfig::for_admin(&path).unwrap_err().to_string();
        assert!(err.contains("missing.url"), "{err}");
    }

    #[test]
    fn a_remote_admin_listener_needs_allow_remote_and_a_token_file() {
        let dir = tempfile::tempdir().unwrap();
        crate::pki::Ca::init(dir.path(), "Acme").unwrap();
        let state = dir.path().display().to_string();
        let base = GOOD.replace("/var/lib/portcullis", &state);
        let check = |text: &str| {
            let cfg: RelayConfig = parse_str(Path::new("r.toml"), text).unwrap();
            cfg.validate(Path::new("r.toml")).map_err(|e| e.to_string())
        };
        assert!(check(&base).is_ok());
        let err = check(&format!("audit_retention = \"1h\"\n{base}")).unwrap_err();
        assert!(err.contains("audit_retention must be at least 1d"), "{err}");
        assert!(check(&format!("audit_retention = \"90days\"\n{base}")).is_ok());
        let cfg: RelayConfig = parse_str(Path::new("r.toml"), &base).unwrap();
        assert_eq!(cfg.admin, AdminConfig::default());
        assert!(!cfg.admin.metrics_device_ids);
        let remote = base.replace("127.0.0.1:9090", "0.0.0.0:9090");
        let err = check(&remote).unwrap_err();
        assert!(err.contains("not a loopback address"), "{err}");
        let err = check(&format!("{remote}[admin]\nallow_remote = true\n")).unwrap_err();
        assert!(err.contains("token_file"), "{err}");
        let ok = format!("{remote}[admin]\nallow_remote = true\ntoken_file = \"admin.token\"\n");
        assert!(check(&ok).is_ok());
        let v6 = base.replace("127.0.0.1:9090", "[::1]:9090");
        assert!(check(&v6).is_ok());
    }

    #[test]
    fn connection_limits_parse_and_nonsense_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("state").join(crate::pki::CA_KEY_FILE), "").unwrap();
        let path = dir.path().join("relay.toml");
        let base = GOOD.replace("/var/lib/portcullis", "state");
        let limits = "[limits]\nmax_connections = 50\nmax_connections_per_address = 5\n\
                      max_unauthenticated_connections = 7\nunauthenticated_lifetime = \"9s\"\n\
                      quic_retry_threshold = 0\nenroll_timeout = \"5s\"\n\
                      overload_memory = 268435456\noverload_connections = 40\n";
        std::fs::write(&path, format!("{base}\n{limits}")).unwrap();
        let cfg = RelayConfig::load(&path).unwrap();
        assert_eq!(cfg.limits.max_unauthenticated_connections, 7);
        assert_eq!(cfg.limits.unauthenticated_lifetime, Duration::from_secs(9));
        assert_eq!(
            (
                cfg.limits.max_connections,
                cfg.limits.max_connections_per_address,
                cfg.limits.quic_retry_threshold,
                cfg.limits.enroll_timeout,
                cfg.limits.overload_memory,
                cfg.limits.overload_connections,
            ),
            (50, 5, 0, Duration::from_secs(5), 256 << 20, 40)
        );
        for bad in [
            "max_connections = 0",
            "max_connections_per_address = 0",
            "max_unauthenticated_connections = 0",
            "unauthenticated_lifetime = \"0s\"",
            "overload_connections = 0",
            "enroll_timeout = \"0s\"",
            "overload_memory = 1024",
        ] {
            std::fs::write(&path, format!("{base}\n[limits]\n{bad}\n")).unwrap();
            let err = RelayConfig::load(&path).unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn missing_state_dir_ca_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, GOOD.replace("/var/lib/portcullis", "state")).unwrap();
        let err = RelayConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("ca init"), "{err}");
    }
}
