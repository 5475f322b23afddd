//! `connector.toml`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, defaults, parse_file, resolve};
use crate::identity::{HostPattern, Hostname};

/// The connector's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// The relays as `"host:port"` or a list of them; the connector keeps a tunnel to
    /// every address each host resolves to, re-resolving names every
    /// `relay_resolve_interval`.
    pub relay: RelayList,
    /// How often relay names are resolved again, so relays added to or removed from a
    /// name are followed without a restart.
    #[serde(default = "default_resolve_interval", with = "humantime_serde")]
    pub relay_resolve_interval: Duration,
    /// The relays' HTTPS port, where the tunnel goes over TLS on TCP when UDP is blocked;
    /// by default the QUIC port (relays normally serve 443 on both UDP and TCP).
    #[serde(default)]
    pub relay_tcp_port: Option<u16>,
    /// The relay's TLS name, when `relay` is an IP address or another name.
    #[serde(default)]
    pub server_name: Option<Hostname>,
    /// The organisation CA certificate (PEM).
    pub ca: PathBuf,
    /// This connector's certificate (PEM).
    pub cert: PathBuf,
    /// This connector's private key (PEM).
    pub key: PathBuf,
    /// How long in-flight streams may take to finish after SIGTERM.
    #[serde(default = "defaults::drain_grace", with = "humantime_serde")]
    pub drain_grace: Duration,
    /// Where the running connector writes each tunnel's state (read by
    /// `portcullis-connector status`); default `status.json` beside `cert`.
    #[serde(default)]
    pub status_file: Option<PathBuf>,
    /// The congestion controller of the tunnel's QUIC: `loss-tolerant` (the default) or
    /// `cubic`.
    #[serde(default)]
    pub quic_congestion: super::QuicCongestion,
    /// TCP address for `/healthz`, `/readyz` and `/metrics`; off when absent. Loopback
    /// only unless `admin_allow_remote` is set.
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Allow `admin_listen` on an address other than loopback (a pod's address, for the
    /// kubelet's probes and Prometheus). It serves health and metrics only: no secrets,
    /// no way to change anything.
    #[serde(default)]
    pub admin_allow_remote: bool,
    /// A file holding the bearer token every admin request must carry
    /// (`Authorization: Bearer …`, at least 16 characters); required with
    /// `admin_allow_remote`.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Let `/healthz` and `/readyz` answer without the token (for a kubelet's probes);
    /// `/metrics` still wants it.
    #[serde(default)]
    pub admin_probes_without_token: bool,
    /// Where to append the access log (JSON lines, one per proxied request, with the
    /// relay's request id and the trace id); `-` for standard output; absent, the lines go
    /// to the daemon's log. Reopened on SIGUSR2.
    #[serde(default)]
    pub access_log: Option<PathBuf>,
    /// Export of the connector's spans over OTLP; off when absent.
    #[serde(default)]
    pub otlp: Option<super::OtlpConfig>,
    /// The services this connector publishes.
    pub ingress: Vec<IngressRule>,
}

fn default_resolve_interval() -> Duration {
    Duration::from_secs(30)
}

/// `relay`: one `"host:port"` or a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayList(pub Vec<String>);

impl<'de> Deserialize<'de> for RelayList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d)? {
            OneOrMany::One(s) => Ok(Self(vec![s])),
            OneOrMany::Many(v) => Ok(Self(v)),
        }
    }
}

/// A relay as configured: a host (a name to resolve, or an IP address) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelayTarget {
    /// Host name or IP address, without brackets.
    pub host: String,
    /// UDP port (QUIC).
    pub port: u16,
}

impl RelayTarget {
    /// Parses `host:port` (`[v6]:port` for IPv6 literals).
    pub fn parse(s: &str) -> Option<Self> {
        let (host, port) = s.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().ok().filter(|p| *p != 0)?;
        (!host.is_empty()).then(|| Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for RelayTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One `[[ingress]]` table: a published hostname and the origin behind it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressRule {
    /// The published hostname (exact or `*.suffix`).
    pub hostname: HostPattern,
    /// The origin: `http://host:port` or `https://host:port`.
    pub service: ServiceUrl,
    /// For `https://` origins: a CA file (PEM) to trust instead of the system roots.
    #[serde(default)]
    pub origin_ca: Option<PathBuf>,
    /// Checks the origin; while it fails, the hostname is withdrawn from the relay.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// `[ingress.health_check]`: how the connector checks an origin, and how many results in
/// a row change its state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// An HTTP path to GET (healthy on any 2xx or 3xx answer); absent, the check is a TCP
    /// connect to the service.
    #[serde(default)]
    pub path: Option<String>,
    /// Time between checks.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How long one check may take.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Successes in a row that make an unhealthy origin healthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row that make a healthy origin unhealthy.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    3
}

/// Origin URL scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP/1.1.
    Http,
    /// HTTP over TLS, verified; HTTP/2 when the origin offers it (ALPN), else HTTP/1.1.
    Https,
    /// HTTP/2 without TLS, prior knowledge (`h2c://`): gRPC servers.
    H2c,
    /// Raw TCP (`tcp://`), reached by clients with `CONNECT host:port`.
    Tcp,
}

impl Scheme {
    /// The URL scheme's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::H2c => "h2c",
            Self::Tcp => "tcp",
        }
    }
}

/// A parsed origin URL: scheme, host and port, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUrl {
    /// http or https.
    pub scheme: Scheme,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Port, defaulted from the scheme.
    pub port: u16,
}

impl ServiceUrl {
    /// `host:port`, with brackets around IPv6 literals.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority())
    }
}

impl FromStr for ServiceUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid service {s:?}: use http://host:port, https://host:port, h2c://host:port or tcp://host:port"
            )
        };
        let (scheme, rest) = [
            ("http://", Scheme::Http),
            ("https://", Scheme::Https),
            ("h2c://", Scheme::H2c),
            ("tcp://", Scheme::Tcp),
        ]
        .into_iter()
        .find_map(|(prefix, scheme)| s.strip_prefix(prefix).map(|r| (scheme, r)))
        .ok_or_else(bad)?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad());
        }
        let default_port = match scheme {
            Scheme::Http | Scheme::H2c => 80,
            Scheme::Https => 443,
            // A TCP service has no conventional port: it must be given.
            Scheme::Tcp if !authority.ends_with(']') && authority.contains(':') => 0,
            Scheme::Tcp if authority.contains("]:") => 0,
            Scheme::Tcp => return Err(bad()),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => default_port,
                None => return Err(bad()),
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad())?),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Self { scheme, host, port })
    }
}

impl<'de> Deserialize<'de> for ServiceUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The file beside a connector's certificate that lists the hostname patterns the relay
/// granted it (one per line; `<cert>` with the extension `hostnames`): written by
/// `portcullis-connector enroll` and `portcullis-relay issue connector`, read by `check`
/// to catch an ingress rule the relay would refuse.
pub fn granted_hostnames_path(cert: &Path) -> PathBuf {
    cert.with_extension("hostnames")
}

/// The patterns in a granted-hostnames file ([`granted_hostnames_path`]).
pub fn parse_granted_hostnames(text: &str) -> Result<Vec<HostPattern>, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| HostPattern::parse(l).map_err(|e| format!("{l:?}: {e}")))
        .collect()
}

impl ConnectorConfig {
    /// Reads, parses and validates `path`; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Self = parse_file(path)?;
        for p in [&mut cfg.ca, &mut cfg.cert, &mut cfg.key] {
            *p = resolve(path, p);
        }
        cfg.status_file = Some(match &cfg.status_file {
            Some(p) => resolve(path, p),
            None => cfg
                .cert
                .parent()
                .unwrap_or(Path::new("."))
                .join("status.json"),
        });
        if let Some(p) = &mut cfg.access_log {
            *p = resolve(path, p);
        }
        if let Some(p) = &mut cfg.admin_token_file {
            *p = resolve(path, p);
        }
        if let Some(ca) = cfg.otlp.as_mut().and_then(|o| o.ca.as_mut()) {
            *ca = resolve(path, ca);
        }
        for rule in &mut cfg.ingress {
            if let Some(p) = &mut rule.origin_ca {
                *p = resolve(path, p);
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The configured relays, parsed; `None` if one is not `host:port`.
    pub fn relays(&self) -> Option<Vec<RelayTarget>> {
        let mut out: Vec<RelayTarget> = Vec::new();
        for s in &self.relay.0 {
            let t = RelayTarget::parse(s)?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        Some(out)
    }

    /// The TLS name to verify `relay` against: `server_name` if set, else its host.
    pub fn relay_server_name(&self, relay: &RelayTarget) -> Option<String> {
        if let Some(name) = &self.server_name {
            return Some(name.to_string());
        }
        Hostname::parse(&relay.host).ok().map(|h| h.to_string())
    }

    /// Checks values serde cannot.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if self.relay.0.is_empty() {
            return Err(invalid(
                "relay lists no relay: give \"host:port\" or a list of them".into(),
            ));
        }
        for r in &self.relay.0 {
            let Some(target) = RelayTarget::parse(r) else {
                return Err(invalid(format!(
                    "relay {r:?} is not host:port (for example relay.example.com:4433)"
                )));
            };
            if self.relay_server_name(&target).is_none() {
                return Err(invalid(format!(
                    "relay {r:?} is an IP address: set server_name to the relay's TLS name"
                )));
            }
        }
        if let Some(otlp) = &self.otlp {
            otlp.validate().map_err(invalid)?;
        }
        if self.relay_resolve_interval < Duration::from_secs(1) {
            return Err(invalid("relay_resolve_interval must be at least 1s".into()));
        }
        if let Some(addr) = self.admin_listen
            && !addr.ip().is_loopback()
            && !self.admin_allow_remote
        {
            return Err(invalid(format!(
                "admin_listen {addr} is not a loopback address: bind it to 127.0.0.1, or set admin_allow_remote = true"
            )));
        }
        if self.admin_allow_remote && self.admin_token_file.is_none() {
            return Err(invalid(
                "admin_allow_remote needs admin_token_file: a listener beyond loopback must ask every scraper for a bearer token".into(),
            ));
        }
        if self.ingress.is_empty() {
            return Err(invalid("no [[ingress]] rules: nothing to publish".into()));
        }
        for (i, rule) in self.ingress.iter().enumerate() {
            if self.ingress[..i]
                .iter()
                .any(|r| r.hostname == rule.hostname)
            {
                return Err(invalid(format!(
                    "hostname {} appears in two [[ingress]] rules",
                    rule.hostname
                )));
            }
            if let Some(check) = &rule.health_check {
                let bad =
                    |why: &str| invalid(format!("ingress {}: health_check {why}", rule.hostname));
                if check.rise == 0 || check.fall == 0 {
                    return Err(bad("rise and fall must be at least 1"));
                }
                if check.interval < Duration::from_millis(100) || check.timeout.is_zero() {
                    return Err(bad("interval must be at least 100ms and timeout above 0"));
                }
                if let Some(path) = &check.path {
                    if rule.service.scheme == Scheme::Tcp {
                        return Err(bad(
                            "path applies to HTTP services; a tcp:// service is checked by connecting",
                        ));
                    }
                    if !path.starts_with('/') {
                        return Err(bad("path must start with /"));
                    }
                }
            }
            if rule.service.scheme != Scheme::Https && rule.origin_ca.is_some() {
                return Err(invalid(format!(
                    "ingress {}: origin_ca applies to https:// services only",
                    rule.hostname
                )));
            }
        }
        Ok(())
    }

    /// The ingress rule serving `host`: an exact rule first, then the most specific wildcard.
    pub fn rule_for(&self, host: &Hostname) -> Option<&IngressRule> {
        self.ingress
            .iter()
            .filter(|r| r.hostname.matches(host))
            .max_by_key(|r| match &r.hostname {
                HostPattern::Exact(_) => usize::MAX,
                HostPattern::Wildcard(s) => s.as_str().len(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    const GOOD: &str = r#"
relay = "relay.example.com:4433"
ca = "ca.crt"
cert = "db-host.crt"
key = "db-host.key"
[[ingress]]
hostname = "grafana.internal"
service = "http://127.0.0.1:3000"
[[ingress]]
hostname = "*.eng.internal"
service = "https://[::1]"
"#;

    fn parse(text: &str) -> Result<ConnectorConfig, ConfigError> {
        let cfg: ConnectorConfig = parse_str(Path::new("c.toml"), text)?;
        cfg.validate(Path::new("c.toml"))?;
        Ok(cfg)
    }

    #[test]
    fn documented_example_parses() {
        let cfg = parse(GOOD).unwrap();
        let relays = cfg.relays().unwrap();
        assert_eq!(relays.len(), 1);
        assert_eq!(
            cfg.relay_server_name(&relays[0]).as_deref(),
            Some("relay.example.com")
        );
        assert_eq!(cfg.relay_resolve_interval, Duration::from_secs(30));
        assert_eq!(cfg.ingress[1].service.authority(), "[::1]:443");
        let host = Hostname::parse("ci.eng.internal").unwrap();
        assert_eq!(cfg.rule_for(&host).unwrap().service.port, 443);
    }

    #[test]
    fn ip_relay_needs_server_name() {
        let text = GOOD.replace("relay.example.com:4433", "127.0.0.1:4433");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("server_name"), "{err}");
        let text = format!("server_name = \"relay.example.com\"\n{text}");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn relay_may_be_a_list_and_each_entry_is_checked() {
        let text = GOOD.replace(
            "relay = \"relay.example.com:4433\"",
            "relay = [\"r1.example.com:4433\", \"[::1]:4433\", \"r1.example.com:4433\"]\nserver_name = \"relay.example.com\"",
        );
        let cfg = parse(&text).unwrap();
        let relays = cfg.relays().unwrap();
        assert_eq!(
            relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["r1.example.com:4433", "[::1]:4433"]
        );
        // With server_name set, every relay is verified against it.
        assert_eq!(
            cfg.relay_server_name(&relays[1]).as_deref(),
            Some("relay.example.com")
        );
        let bad = GOOD.replace(
            "relay = \"relay.example.com:4433\"",
            "relay = [\"r1.example.com:4433\", \"r2.example.com\"]",
        );
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("\"r2.example.com\" is not host:port"), "{err}");
        let empty = GOOD.replace("relay = \"relay.example.com:4433\"", "relay = []");
        assert!(parse(&empty).unwrap_err().to_string().contains("no relay"));
    }

    #[test]
    fn a_health_check_parses_with_defaults_and_is_checked() {
        let text =
            format!("{GOOD}[ingress.health_check]\npath = \"/healthz\"\ninterval = \"1s\"\n");
        let cfg = parse(&text).unwrap();
        let check = cfg.ingress[1].health_check.clone().unwrap();
        assert_eq!(check.path.as_deref(), Some("/healthz"));
        assert_eq!(check.interval, Duration::from_secs(1));
        assert_eq!(
            (check.timeout, check.rise, check.fall),
            (Duration::from_secs(2), 2, 3)
        );
        assert!(cfg.ingress[0].health_check.is_none());
        for bad in ["rise = 0", "path = \"healthz\"", "interval = \"1ms\""] {
            let text = format!("{GOOD}[ingress.health_check]\n{bad}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains("health_check"), "{bad}: {err}");
        }
    }

    #[test]
    fn service_urls_are_checked() {
        for bad in [
            "ftp://x",
            "http://",
            "http://x:0",
            "http://x/path",
            "http://x:99999",
        ] {
            assert!(bad.parse::<ServiceUrl>().is_err(), "{bad}");
        }
        let u: ServiceUrl = "http://db:5432/".parse().unwrap();
        assert_eq!(u.to_string(), "http://db:5432");
        let u: ServiceUrl = "tcp://db:5432".parse().unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Tcp, 5432));
        assert!(
            "tcp://db".parse::<ServiceUrl>().is_err(),
            "tcp needs a port"
        );
        let u: ServiceUrl = "h2c://[::1]:50051".parse().unwrap();
        assert_eq!(
            (u.scheme, u.authority().as_str()),
            (Scheme::H2c, "[::1]:50051")
        );
    }

    #[test]
    fn unknown_keys_and_duplicate_hostnames_are_refused() {
        let err = parse(&GOOD.replace("service =", "servce =")).unwrap_err();
        assert!(err.to_string().contains("c.toml:8"), "{err}");
        let dup = GOOD.replace("*.eng.internal", "grafana.internal");
        assert!(parse(&dup).unwrap_err().to_string().contains("two"));
    }
}
