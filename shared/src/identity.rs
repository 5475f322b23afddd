//! Identities (who holds a certificate) and hostnames (what they may reach or publish).
//!
//! An identity is a role plus an id, carried in a certificate as the SAN URI
//! `urn:portcullis:<role>:<id>`. Hostnames are normalised (lower case, no trailing dot)
//! so that comparisons are exact. This module is pure: no IO.

use std::fmt;

/// Why an identity, id or hostname was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The id is empty, longer than 64 bytes, or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid id {0:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    InvalidId(String),
    /// The SAN URI does not have the form `urn:portcullis:<device|connector>:<id>`.
    #[error("not a Portcullis identity URI: {0:?}")]
    InvalidUri(String),
    /// The hostname is not a valid DNS name.
    #[error("invalid hostname {0:?}: use DNS labels of a-z 0-9 and -, separated by dots")]
    InvalidHostname(String),
    /// The pattern is neither an exact hostname nor `*.suffix`.
    #[error("invalid hostname pattern {0:?}: use an exact name or *.suffix")]
    InvalidPattern(String),
}

/// The role a certificate grants. A certificate of one role is never accepted for another.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An employee's device: may call services.
    Device,
    /// A connector daemon: may publish services.
    Connector,
}

impl Role {
    /// The role's name as it appears in URIs, the store and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Connector => "connector",
        }
    }

    /// Parses `device` or `connector`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "device" => Some(Self::Device),
            "connector" => Some(Self::Connector),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const URI_PREFIX: &str = "urn:portcullis:";

/// A role and an id, such as `device:alice-laptop` or `connector:db-host`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    role: Role,
    id: String,
}

impl Identity {
    /// Builds an identity, checking the id's characters and length.
    pub fn new(role: Role, id: &str) -> Result<Self, IdentityError> {
        let valid = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(IdentityError::InvalidId(id.to_owned()));
        }
        Ok(Self {
            role,
            id: id.to_owned(),
        })
    }

    /// The identity's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The identity's id, unique within its role.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The SAN URI that names this identity in its certificate.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}:{}", self.role, self.id)
    }

    /// Parses a SAN URI written by [`Identity::uri`].
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(URI_PREFIX)
            .ok_or_else(|| IdentityError::InvalidUri(uri.to_owned()))?;
        let (role, id) = rest
            .split_once(':')
            .ok_or_else(|| IdentityError::InvalidUri(uri.to_owned()))?;
        let role = Role::parse(role).ok_or_else(|| IdentityError::InvalidUri(uri.to_owned()))?;
        Self::new(role, id)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.id)
    }
}

/// A normalised DNS hostname: lower case, no trailing dot, no port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hostname(String);

impl Hostname {
    /// Parses and normalises a hostname. IP literals and names with ports are refused.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let valid = !lower.is_empty()
            && lower.len() <= 253
            && lower.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
            // An all-numeric last label would make it an IP literal, not a name.
            && !lower
                .rsplit('.')
                .next()
                .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
        if valid {
            Ok(Self(lower))
        } else {
            Err(IdentityError::InvalidHostname(s.to_owned()))
        }
    }

    /// The hostname as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An exact hostname or a `*.suffix` wildcard matching any name below the suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// Matches this one name.
    Exact(Hostname),
    /// `*.suffix`: matches any name with at least one label before `.suffix`, not the
    /// suffix itself.
    Wildcard(Hostname),
}

impl HostPattern {
    /// Parses `name` or `*.suffix`.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        if let Some(suffix) = s.strip_prefix("*.") {
            let suffix =
                Hostname::parse(suffix).map_err(|_| IdentityError::InvalidPattern(s.to_owned()))?;
            Ok(Self::Wildcard(suffix))
        } else if s.contains('*') {
            Err(IdentityError::InvalidPattern(s.to_owned()))
        } else {
            Hostname::parse(s)
                .map(Self::Exact)
                .map_err(|_| IdentityError::InvalidPattern(s.to_owned()))
        }
    }

    /// Whether `host` is one of the names this pattern stands for.
    pub fn matches(&self, host: &Hostname) -> bool {
        match self {
            Self::Exact(name) => name == host,
            Self::Wildcard(suffix) => is_below(host.as_str(), suffix.as_str()),
        }
    }

    /// Whether every name `other` stands for is also one this pattern stands for. This is
    /// how the relay checks that a connector publishes only what its registration allows.
    pub fn covers(&self, other: &Self) -> bool {
        match (self, other) {
            (_, Self::Exact(host)) => self.matches(host),
            (Self::Exact(_), Self::Wildcard(_)) => false,
            (Self::Wildcard(mine), Self::Wildcard(theirs)) => {
                mine == theirs || is_below(theirs.as_str(), mine.as_str())
            }
        }
    }
}

fn is_below(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() + 1
        && name.ends_with(suffix)
        && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(h) => write!(f, "{h}"),
            Self::Wildcard(h) => write!(f, "*.{h}"),
        }
    }
}

impl serde::Serialize for HostPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for HostPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Hostname {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Hostname {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Hostname {
        Hostname::parse(s).unwrap()
    }

    fn pat(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn identity_uri_round_trips() {
        let id = Identity::new(Role::Connector, "db-host.1").unwrap();
        assert_eq!(id.uri(), "urn:portcullis:connector:db-host.1");
        assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
    }

    #[test]
    fn identity_uri_rejects_other_roles_and_bad_ids() {
        assert!(Identity::from_uri("urn:portcullis:admin:x").is_err());
        assert!(Identity::from_uri("urn:other:device:x").is_err());
        assert!(Identity::from_uri("urn:portcullis:device:").is_err());
        assert!(Identity::from_uri("urn:portcullis:device:a/b").is_err());
        assert!(Identity::new(Role::Device, &"x".repeat(65)).is_err());
    }

    #[test]
    fn hostnames_are_normalised_and_validated() {
        assert_eq!(host("Grafana.Internal.").as_str(), "grafana.internal");
        for bad in ["", "a..b", "-a.b", "a_b.c", "10.0.0.1", "a.b:80", "*.x"] {
            assert!(Hostname::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn exact_pattern_matches_only_itself() {
        let p = pat("grafana.internal");
        assert!(p.matches(&host("grafana.internal")));
        assert!(!p.matches(&host("x.grafana.internal")));
    }

    #[test]
    fn wildcard_matches_names_below_but_not_the_suffix_itself() {
        let p = pat("*.eng.internal");
        assert!(p.matches(&host("ci.eng.internal")));
        assert!(p.matches(&host("a.b.eng.internal")));
        assert!(!p.matches(&host("eng.internal")));
        assert!(!p.matches(&host("xeng.internal")));
        assert!(!p.matches(&host("ci.sales.internal")));
    }

    #[test]
    fn covers_is_containment_of_name_sets() {
        assert!(pat("*.internal").covers(&pat("*.eng.internal")));
        assert!(pat("*.internal").covers(&pat("a.internal")));
        assert!(!pat("*.eng.internal").covers(&pat("*.internal")));
        assert!(!pat("a.internal").covers(&pat("*.internal")));
        assert!(pat("a.internal").covers(&pat("a.internal")));
        assert!(!pat("a.internal").covers(&pat("b.internal")));
    }

    #[test]
    fn patterns_refuse_inner_wildcards() {
        assert!(HostPattern::parse("a.*.internal").is_err());
        assert!(HostPattern::parse("*").is_err());
        assert!(HostPattern::parse("*.").is_err());
    }
}
