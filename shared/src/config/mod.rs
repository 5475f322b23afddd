//! Configuration files of the relay and the connector: serde structs, then `validate()`.
//!
//! Unknown keys are errors (a typo must not silently drop a policy rule), and every error
//! names the file and, where it can, the line. Relative paths in a file are relative to
//! that file's directory. Reading the files is the only IO here.

mod connector;
mod otlp;
mod relay;

use std::path::{Path, PathBuf};

pub use connector::{
    ConnectorConfig, HealthCheck, IngressRule, RelayList, RelayTarget, Scheme, ServiceUrl,
    granted_hostnames_path, parse_granted_hostnames,
};
pub use otlp::{OtlpConfig, OtlpEndpoint, SampleRatio};
pub use relay::{
    AdminConfig, AdminView, LimitsConfig, RelayConfig, StoreConfig, TlsConfig, TlsVersion,
};

/// Why a configuration file was refused. Binaries exit with status 64 on these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config, e.g. an unknown key or a wrong type.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// What is wrong, from the TOML parser.
        message: String,
    },
    /// The file parsed but its values do not make sense together.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

/// Reads and parses a TOML file into `T`, mapping errors to one line with file and line.
pub(crate) fn parse_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_str(path, &text)
}

pub(crate) fn parse_str<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |span| {
            text[..span.start.min(text.len())].matches('\n').count() + 1
        });
        let message = e.message().trim().replace('\n', " ");
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            message: in_words(&message, key_at(text, line).as_deref()),
        }
    })
}

/// The dotted key set on `line` (1-based) of `text`, with its table: `limits.max_connections`.
fn key_at(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    for (n, l) in text.lines().enumerate() {
        let l = l.trim();
        if let Some(header) = l.strip_prefix('[') {
            table = header
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
        }
        if n + 1 == line {
            let key = l.split_once('=')?.0.trim().trim_matches('"');
            return Some(if table.is_empty() {
                key.to_owned()
            } else {
                format!("{table}.{key}")
            });
        }
    }
    None
}

/// A parser's message about `key` in words a person acts on: what the value must look
/// like, not the type the program stores it in.
fn in_words(message: &str, key: Option<&str>) -> String {
    const NUMBERS: [&str; 8] = ["usize", "u64", "u32", "u16", "u8", "i64", "i32", "f64"];
    let expected_number = NUMBERS
        .iter()
        .any(|t| message.ends_with(&format!("expected {t}")));
    let said = if message == "invalid socket address syntax" {
        "expected an address and port, such as \"0.0.0.0:443\" or \"[::]:443\"".to_owned()
    } else if expected_number && let Some(rest) = message.strip_prefix("invalid type: ") {
        let found = rest.split(", expected").next().unwrap_or(rest);
        format!("expected a number, found {found}")
    } else if expected_number && let Some(rest) = message.strip_prefix("invalid value: ") {
        let found = rest.split(", expected").next().unwrap_or(rest);
        format!("expected a number of 0 or more that fits, found {found}")
    } else {
        return message.to_owned();
    };
    match key {
        Some(key) => format!("{key}: {said}"),
        None => said,
    }
}

/// Resolves `p` against the directory of the config file it came from.
pub(crate) fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    // `-` is standard output (an access log), not a file beside the configuration.
    if p.is_absolute() || p == Path::new("-") {
        p.to_owned()
    } else {
        config_path
            .parent()
            .map_or_else(|| p.to_owned(), |dir| dir.join(p))
    }
}

pub(crate) mod defaults {
    use std::time::Duration;

    pub(crate) fn drain_grace() -> Duration {
        Duration::from_secs(10)
    }

    pub(crate) fn jwt_prepublish() -> Duration {
        Duration::from_secs(3600)
    }

    pub(crate) fn audit_retention() -> Duration {
        Duration::from_secs(400 * 24 * 3600)
    }
}

/// The congestion controller of the daemon's QUIC connections (`quic_congestion`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuicCongestion {
    /// Keeps its rate through random loss ([`crate::congestion`]); the default.
    #[default]
    LossTolerant,
    /// quinn's CUBIC: halves its window at every loss.
    Cubic,
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The README's quickstart relay.toml and connector.toml are ones the daemons take,
    /// and the connector publishes with `tcp://` what the agent's `portcullis tcp` and
    /// `ssh-proxy` examples reach.
    #[test]
    fn the_readme_quickstart_configs_parse() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let relay = readme
            .split("<<'TOML'\n")
            .nth(1)
            .and_then(|rest| rest.split("\nTOML\n").next())
            .expect("the README's relay.toml");
        let relay: RelayConfig = parse_str(&path, relay).unwrap();
        let connector = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the README's connector.toml");
        let connector: ConnectorConfig = parse_str(&path, connector).unwrap();
        for host in ["db.internal", "build.internal"] {
            let rule = connector
                .ingress
                .iter()
                .find(|r| r.hostname.to_string() == host)
                .unwrap_or_else(|| panic!("{host} is not published"));
            assert!(
                format!("{:?}", rule.service).to_lowercase().contains("tcp"),
                "{rule:?}"
            );
            assert!(
                relay
                    .policy
                    .iter()
                    .any(|p| p.hostnames.iter().any(|h| h.to_string() == host)),
                "{host} is not in the policy"
            );
            assert!(readme.contains(host));
        }
    }

    #[test]
    fn a_wrong_value_is_named_by_its_key_in_words() {
        let path = Path::new("relay.toml");
        let text = "state_dir = \"/s\"\nserver_name = \"relay.example.com\"\nquic_listen = \"4433\"\nhttps_listen = \"0.0.0.0:8443\"\n";
        let err = parse_str::<RelayConfig>(path, text)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "relay.toml:3: quic_listen: expected an address and port, such as \"0.0.0.0:443\" or \"[::]:443\""
        );
        let text = "state_dir = \"/s\"\nserver_name = \"relay.example.com\"\nquic_listen = \"0.0.0.0:4433\"\nhttps_listen = \"0.0.0.0:8443\"\n[limits]\nmax_connections = \"many\"\n";
        let err = parse_str::<RelayConfig>(path, text)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "relay.toml:6: limits.max_connections: expected a number, found string \"many\""
        );
        assert!(!err.contains("usize"));
    }

    /// Every example config shipped in `deploy/examples` parses and validates (file
    /// existence aside, which depends on the host).
    #[test]
    fn shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let relay = dir.join("relay.toml");
        let text = std::fs::read_to_string(&relay).unwrap();
        let cfg: RelayConfig = parse_str(&relay, &text).unwrap();
        assert_eq!(cfg.policy.len(), 2);
        let connector = dir.join("connector.toml");
        let text = std::fs::read_to_string(&connector).unwrap();
        let cfg: ConnectorConfig = parse_str(&connector, &text).unwrap();
        cfg.validate(&connector).unwrap();
        assert_eq!(cfg.ingress.len(), 2);
    }
}
