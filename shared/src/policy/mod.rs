//! Pure allow/deny evaluation: deny by default, allow when a rule names the caller.
//!
//! The relay resolves the caller (device, user, groups) and the hostname; this module only
//! decides. A denial is a [`Decision`], not an error. No IO, no clock.

use serde::Deserialize;

use crate::identity::{HostPattern, Hostname};

pub mod reevaluate;

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

/// Whether a connector whose certificate (registration) allows `allowed` may publish
/// `requested`: only if one allowed pattern covers every name `requested` stands for. An
/// exact name is publishable under the same exact name or a wildcard above it; a wildcard
/// only under an equal or wider wildcard. No allowed patterns publish nothing, so a
/// connector can never claim a hostname issued to someone else.
pub fn may_publish(allowed: &[HostPattern], requested: &HostPattern) -> bool {
    allowed.iter().any(|a| a.covers(requested))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

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

    fn pat(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn nothing_allowed_publishes_nothing() {
        assert!(!may_publish(&[], &pat("a.internal")));
        assert!(!may_publish(&[], &pat("*.internal")));
    }

    #[test]
    fn an_exact_name_is_published_under_itself_or_a_wildcard_above_it() {
        assert!(may_publish(&[pat("a.internal")], &pat("a.internal")));
        assert!(may_publish(&[pat("*.internal")], &pat("a.internal")));
        assert!(may_publish(&[pat("*.internal")], &pat("x.a.internal")));
        assert!(!may_publish(&[pat("b.internal")], &pat("a.internal")));
        assert!(!may_publish(&[pat("*.a.internal")], &pat("a.internal")));
        assert!(!may_publish(&[pat("a.internal")], &pat("x.a.internal")));
    }

    #[test]
    fn a_wildcard_is_published_only_under_an_equal_or_wider_wildcard() {
        assert!(may_publish(&[pat("*.internal")], &pat("*.internal")));
        assert!(may_publish(&[pat("*.internal")], &pat("*.eng.internal")));
        assert!(!may_publish(&[pat("*.eng.internal")], &pat("*.internal")));
        assert!(!may_publish(
            &[pat("a.internal"), pat("b.internal")],
            &pat("*.internal")
        ));
    }

    /// An exact name or wildcard of up to two labels from a small alphabet, so that
    /// generated patterns often overlap; placed under a zone by [`place`].
    type Shape = (bool, Vec<&'static str>);

    fn shape() -> impl Strategy<Value = Shape> {
        (
            any::<bool>(),
            prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..3),
        )
    }

    fn place((wild, labels): &Shape, zone: &str) -> HostPattern {
        let name = labels.iter().map(|l| format!("{l}.")).collect::<String>() + zone;
        if *wild {
            HostPattern::Wildcard(host(&name))
        } else {
            HostPattern::Exact(host(&name))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// `may_publish` agrees with name matching: an exact name is publishable exactly
        /// when an allowed pattern matches it, and `*.s` exactly when an allowed pattern
        /// matches a label below `s` that no pattern names (only a wildcard at or above `s`
        /// can). So a pattern standing for any name no allowed pattern matches is never
        /// publishable.
        #[test]
        fn publishable_exactly_when_every_name_is_allowed(
            allowed in prop::collection::vec(shape(), 0..4),
            requested in shape(),
        ) {
            let allowed: Vec<_> = allowed.iter().map(|s| place(s, "internal")).collect();
            let requested = place(&requested, "internal");
            let allowed_name = |h: &str| allowed.iter().any(|a| a.matches(&host(h)));
            let verdict = may_publish(&allowed, &requested);
            match &requested {
                HostPattern::Exact(h) => prop_assert_eq!(verdict, allowed_name(h.as_str())),
                HostPattern::Wildcard(s) => {
                    prop_assert_eq!(verdict, allowed_name(&format!("unnamed.{s}")));
                    for below in ["a", "b", "c", "a.b", "c.unnamed"] {
                        let name = format!("{below}.{s}");
                        prop_assert!(!verdict || allowed_name(&name), "{name} is not allowed");
                    }
                }
            }
        }

        /// Connector A was issued the names under `<zone_a>.internal`, connector B patterns
        /// under `<zone_b>.internal`. B can claim none of A's names, nor a wildcard over
        /// them, while A can.
        #[test]
        fn a_connector_never_claims_another_ones_hostname(
            zone_a in "[a-z]{1,6}",
            zone_b in "[a-z]{1,6}",
            label in "[a-z]{1,6}",
            issued_to_b in prop::collection::vec(shape(), 0..4),
        ) {
            prop_assume!(zone_a != zone_b);
            let zone_b = format!("{zone_b}.internal");
            let issued_to_b: Vec<_> = issued_to_b.iter().map(|s| place(s, &zone_b)).collect();
            let issued_to_a = [pat(&format!("*.{zone_a}.internal"))];
            let theirs = [
                pat(&format!("{label}.{zone_a}.internal")),
                pat(&format!("x.{label}.{zone_a}.internal")),
                pat(&format!("*.{zone_a}.internal")),
                pat("*.internal"),
            ];
            for name in &theirs[..3] {
                prop_assert!(may_publish(&issued_to_a, name));
            }
            for name in &theirs {
                prop_assert!(!may_publish(&issued_to_b, name), "{issued_to_b:?} claimed {name}");
            }
        }
    }
}
