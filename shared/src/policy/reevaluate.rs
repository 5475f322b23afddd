//! Continuous authorization's decision, without IO: given one live stream (who holds it,
//! for which name, since when) and the state in force now (the policy, the locks, what the
//! registry says of the identity, the time), whether the stream may go on, and if not,
//! why. The relay asks it for every live stream on every change that can affect a
//! decision: a policy reload, a revocation or re-issue, a lock added or expired, a
//! certificate's expiry. Allowed streams are never ended.

use crate::identity::{HostPattern, Hostname};

use super::{PolicyRule, Subject, evaluate};

/// What a lock denies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockTarget {
    /// Every device of a user.
    User(String),
    /// One device.
    Device(String),
    /// Every member of a group.
    Group(String),
    /// A hostname (or every name under a wildcard), for everyone.
    Hostname(HostPattern),
}

impl LockTarget {
    /// `kind` (`user`, `device`, `group`, `hostname`) and its value, as the command line
    /// and the store spell them.
    pub fn parse(kind: &str, value: &str) -> Result<Self, String> {
        let plain = |what: &str| {
            let ok = !value.is_empty()
                && value.len() <= 128
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b));
            if ok {
                Ok(value.to_owned())
            } else {
                Err(format!(
                    "invalid {what} {value:?}: use 1 to 128 characters from A-Z a-z 0-9 . _ @ + -"
                ))
            }
        };
        match kind {
            "user" => plain("user").map(Self::User),
            "device" => plain("device").map(Self::Device),
            "group" => plain("group").map(Self::Group),
            "hostname" => HostPattern::parse(value)
                .map(Self::Hostname)
                .map_err(|e| format!("invalid hostname {value:?}: {e}")),
            other => Err(format!(
                "unknown lock kind {other:?}: lock a user, device, group or hostname"
            )),
        }
    }

    /// The kind, as [`LockTarget::parse`] takes it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::User(_) => "user",
            Self::Device(_) => "device",
            Self::Group(_) => "group",
            Self::Hostname(_) => "hostname",
        }
    }

    /// The value, as [`LockTarget::parse`] takes it.
    pub fn value(&self) -> String {
        match self {
            Self::User(v) | Self::Device(v) | Self::Group(v) => v.clone(),
            Self::Hostname(p) => p.to_string(),
        }
    }
}

/// A lock: what it denies, until when, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// Its id (for `unlock`).
    pub id: String,
    /// What it denies.
    pub target: LockTarget,
    /// Unix seconds from which it no longer applies; `None`: until unlocked.
    pub expires_at: Option<i64>,
    /// Why, for the person refused and the audit log.
    pub reason: String,
}

impl Lock {
    /// Whether the lock is in force at `now` and covers a stream of `subject` to `host`.
    pub fn applies(&self, subject: Subject<'_>, host: &Hostname, now: i64) -> bool {
        if self.expires_at.is_some_and(|at| now >= at) {
            return false;
        }
        match &self.target {
            LockTarget::User(u) => u == subject.user,
            LockTarget::Device(d) => d == subject.device,
            LockTarget::Group(g) => subject.groups.contains(g),
            LockTarget::Hostname(p) => p.matches(host),
        }
    }
}

/// One live stream, as the relay's registry of streams holds it.
#[derive(Debug, Clone, Copy)]
pub struct LiveStream<'a> {
    /// Who holds it, with the groups the identity had when the stream was allowed.
    pub subject: Subject<'a>,
    /// The name it was allowed for.
    pub host: &'a Hostname,
}

/// What the registry says of a stream's identity now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityNow {
    /// Active, with its groups as they are now (a re-issue may have changed them).
    Active {
        /// The identity's groups now.
        groups: Vec<String>,
        /// Its certificate's expiry, Unix seconds.
        not_after: i64,
    },
    /// Revoked, or no longer in the registry.
    Gone,
}

/// Why a live stream was ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The identity was revoked (or removed).
    Revoked,
    /// The identity's certificate expired.
    Expired,
    /// A lock covers it.
    Locked {
        /// The lock's id.
        lock: String,
        /// The lock's reason.
        reason: String,
    },
    /// The policy in force no longer allows the identity this name.
    PolicyDenies,
}

impl EndReason {
    /// A label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Locked { .. } => "locked",
            Self::PolicyDenies => "policy",
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Revoked => f.write_str("the identity was revoked"),
            Self::Expired => f.write_str("the identity's certificate expired"),
            Self::Locked { lock, reason } if reason.is_empty() => write!(f, "locked ({lock})"),
            Self::Locked { lock, reason } => write!(f, "locked ({lock}): {reason}"),
            Self::PolicyDenies => f.write_str("the policy no longer allows it"),
        }
    }
}

/// The decision for `stream` at `now`: `None` while it may go on, else why it ends. The
/// identity's groups are taken as they are now, so a group removed at re-issue ends the
/// streams only that group allowed.
pub fn verdict(
    stream: LiveStream<'_>,
    identity: &IdentityNow,
    rules: &[PolicyRule],
    locks: &[Lock],
    now: i64,
) -> Option<EndReason> {
    let (groups, not_after) = match identity {
        IdentityNow::Gone => return Some(EndReason::Revoked),
        IdentityNow::Active { groups, not_after } => (groups, *not_after),
    };
    if now >= not_after {
        return Some(EndReason::Expired);
    }
    let subject = Subject {
        groups,
        ..stream.subject
    };
    if let Some(lock) = locks.iter().find(|l| l.applies(subject, stream.host, now)) {
        return Some(EndReason::Locked {
            lock: lock.id.clone(),
            reason: lock.reason.clone(),
        });
    }
    if !evaluate(rules, stream.host, subject).is_allowed() {
        return Some(EndReason::PolicyDenies);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(hosts: &[&str], groups: &[&str]) -> PolicyRule {
        PolicyRule {
            hostnames: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            users: vec![],
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            devices: vec![],
        }
    }

    fn active(groups: &[&str]) -> IdentityNow {
        IdentityNow::Active {
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            not_after: 10_000,
        }
    }

    fn lock(kind: &str, value: &str, expires_at: Option<i64>) -> Lock {
        Lock {
            id: format!("lock-{kind}"),
            target: LockTarget::parse(kind, value).unwrap(),
            expires_at,
            reason: "incident 42".into(),
        }
    }

    #[test]
    fn an_allowed_stream_goes_on_and_each_change_ends_it_with_its_reason() {
        let db = Hostname::parse("db.internal").unwrap();
        let eng = vec!["eng".to_owned()];
        let stream = LiveStream {
            subject: Subject {
                device: "alice-laptop",
                user: "alice",
                groups: &eng,
            },
            host: &db,
        };
        let rules = vec![rule(&["db.internal", "*.eng.internal"], &["eng"])];
        let now = 1_000;
        assert_eq!(verdict(stream, &active(&["eng"]), &rules, &[], now), None);
        // The policy changed: db.internal removed.
        let narrower = vec![rule(&["*.eng.internal"], &["eng"])];
        assert_eq!(
            verdict(stream, &active(&["eng"]), &narrower, &[], now),
            Some(EndReason::PolicyDenies)
        );
        // The group was taken away at re-issue.
        assert_eq!(
            verdict(stream, &active(&["sales"]), &rules, &[], now),
            Some(EndReason::PolicyDenies)
        );
        // Revoked; expired.
        assert_eq!(
            verdict(stream, &IdentityNow::Gone, &rules, &[], now),
            Some(EndReason::Revoked)
        );
        assert_eq!(
            verdict(stream, &active(&["eng"]), &rules, &[], 10_000),
            Some(EndReason::Expired)
        );
        // Locks by user, device, group and hostname end it; one on someone else does not.
        for (kind, value) in [
            ("user", "alice"),
            ("device", "alice-laptop"),
            ("group", "eng"),
            ("hostname", "db.internal"),
            ("hostname", "*.internal"),
        ] {
            let l = lock(kind, value, Some(2_000));
            assert_eq!(
                verdict(
                    stream,
                    &active(&["eng"]),
                    &rules,
                    std::slice::from_ref(&l),
                    now
                ),
                Some(EndReason::Locked {
                    lock: l.id.clone(),
                    reason: "incident 42".into()
                }),
                "{kind} {value}"
            );
            // Past its expiry the same lock lets the stream (and new ones) through.
            assert_eq!(
                verdict(stream, &active(&["eng"]), &rules, &[l], 2_000),
                None,
                "{kind} {value} after expiry"
            );
        }
        let others = [
            lock("user", "bob", None),
            lock("hostname", "web.internal", None),
        ];
        assert_eq!(
            verdict(stream, &active(&["eng"]), &rules, &others, now),
            None
        );
    }

    #[test]
    fn of_a_thousand_allowed_streams_only_the_denied_one_ends() {
        let hosts: Vec<Hostname> = (0..1000)
            .map(|i| Hostname::parse(&format!("h{i}.eng.internal")).unwrap())
            .collect();
        let eng = vec!["eng".to_owned()];
        let rules = vec![rule(&["*.eng.internal"], &["eng"])];
        let locks = vec![lock("hostname", "h500.eng.internal", None)];
        let ended: Vec<usize> = hosts
            .iter()
            .enumerate()
            .filter(|(_, host)| {
                let stream = LiveStream {
                    subject: Subject {
                        device: "d",
                        user: "u",
                        groups: &eng,
                    },
                    host,
                };
                verdict(stream, &active(&["eng"]), &rules, &locks, 1_000).is_some()
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ended, vec![500]);
    }

    #[test]
    fn bad_lock_subjects_get_one_line_each() {
        for (kind, value, says) in [
            ("team", "x", "unknown lock kind"),
            ("user", "", "invalid user"),
            ("device", "a b", "invalid device"),
            ("hostname", "*.*.x", "invalid hostname"),
        ] {
            let err = LockTarget::parse(kind, value).unwrap_err();
            assert!(err.contains(says) && !err.contains('\n'), "{err}");
        }
        let t = LockTarget::parse("hostname", "*.eng.internal").unwrap();
        assert_eq!((t.kind(), t.value()), ("hostname", "*.eng.internal".into()));
    }
}
