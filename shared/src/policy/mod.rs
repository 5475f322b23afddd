//! Pure allow/deny evaluation: deny by default, allow when a rule names the caller.
//!
//! The relay resolves the caller (device, user, groups) and the hostname; this module only
//! decides. A denial is a [`Decision`], not an error. No IO, no clock.

use serde::Deserialize;

use crate::identity::{HostPattern, Hostname};

/// One `[[policy]]` table: these users, groups or devices may reach these hostnames.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Hostnames (exact or `*.suffix`) the rule opens.
    pub hostnames: Vec<HostPattern>,
    /// User names allowed.
    #[serde(default)]
    pub users: Vec<String>,
    /// Group names allowed: any of the caller's groups suffices.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Device ids allowed.
    #[serde(default)]
    pub devices: Vec<String>,
}

/// Who is calling, as the relay resolved it from the device certificate and its registry.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The device id from the certificate.
    pub device: &'a str,
    /// The user the device belongs to.
    pub user: &'a str,
    /// The user's groups.
    pub groups: &'a [String],
}

/// The outcome of evaluating the policy for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Rule number `rule` (0-based, in file order) allows the request.
    Allow {
        /// Index of the first matching rule.
        rule: usize,
    },
    /// No rule allows it.
    Deny,
}

impl Decision {
    /// Whether the request may proceed.
    pub fn is_allowed(self) -> bool {
        matches!(self, Self::Allow { .. })
    }
}

/// Evaluates `rules` in order; the first rule that names `host` and the subject allows.
pub fn evaluate(rules: &[PolicyRule], host: &Hostname, subject: Subject<'_>) -> Decision {
    rules
        .iter()
        .position(|rule| {
            rule.hostnames.iter().any(|p| p.matches(host))
                && (rule.users.iter().any(|u| u == subject.user)
                    || rule.devices.iter().any(|d| d == subject.device)
                    || rule.groups.iter().any(|g| subject.groups.contains(g)))
        })
        .map_or(Decision::Deny, |rule| Decision::Allow { rule })
}

/// Whether the rules allow the subject every name `pattern` stands for: for telling a
/// device which published names it may use (the agent's split tunnel).
pub fn allows_pattern(rules: &[PolicyRule], pattern: &HostPattern, subject: Subject<'_>) -> bool {
    rules.iter().any(|rule| {
        rule.hostnames.iter().any(|p| p.covers(pattern))
            && (rule.users.iter().any(|u| u == subject.user)
                || rule.devices.iter().any(|d| d == subject.device)
                || rule.groups.iter().any(|g| subject.groups.contains(g)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(hosts: &[&str], users: &[&str], groups: &[&str], devices: &[&str]) -> PolicyRule {
        let v = |xs: &[&str]| xs.iter().map(|s| (*s).to_owned()).collect();
        PolicyRule {
            hostnames: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            users: v(users),
            groups: v(groups),
            devices: v(devices),
        }
    }

    fn host(s: &str) -> Hostname {
        Hostname::parse(s).unwrap()
    }

    fn alice(groups: &[String]) -> Subject<'_> {
        Subject {
            device: "alice-laptop",
            user: "alice",
            groups,
        }
    }

    #[test]
    fn no_rules_denies() {
        assert_eq!(
            evaluate(&[], &host("a.internal"), alice(&[])),
            Decision::Deny
        );
    }

    #[test]
    fn group_rule_allows_members_only() {
        let rules = [rule(&["grafana.internal"], &[], &["eng"], &[])];
        let eng = vec!["eng".to_owned()];
        let sales = vec!["sales".to_owned()];
        assert!(evaluate(&rules, &host("grafana.internal"), alice(&eng)).is_allowed());
        assert!(!evaluate(&rules, &host("grafana.internal"), alice(&sales)).is_allowed());
    }

    #[test]
    fn user_and_device_rules_allow_by_name() {
        let rules = [
            rule(&["a.internal"], &["bob"], &[], &[]),
            rule(&["*.eng.internal"], &[], &[], &["alice-laptop"]),
        ];
        assert_eq!(
            evaluate(&rules, &host("ci.eng.internal"), alice(&[])),
            Decision::Allow { rule: 1 }
        );
        assert!(!evaluate(&rules, &host("a.internal"), alice(&[])).is_allowed());
    }

    #[test]
    fn a_rule_for_another_hostname_does_not_leak() {
        let rules = [rule(&["a.internal"], &["alice"], &[], &[])];
        assert!(!evaluate(&rules, &host("b.internal"), alice(&[])).is_allowed());
        assert!(!evaluate(&rules, &host("x.a.internal"), alice(&[])).is_allowed());
    }

    #[test]
    fn an_empty_rule_allows_nobody() {
        let rules = [rule(&["a.internal"], &[], &[], &[])];
        let groups = vec![String::new()];
        assert!(!evaluate(&rules, &host("a.internal"), alice(&groups)).is_allowed());
    }
}
