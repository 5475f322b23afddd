//! The relay's live view of the store's identities: consulted on every handshake and
//! request, refreshed within a quarter second of any change, and the place that closes
//! live connections: of revoked identities, of superseded certificates, of certificates
//! reaching their expiry, and all of them while the store cannot be read (failing closed).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use portcullis_shared::identity::{HostPattern, Hostname, Identity, Role};
use portcullis_shared::pki::IdentityCheck;
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::store::{IdentityRecord, RENEWAL_OVERLAP_SECS, Store};
use tokio_util::sync::CancellationToken;

/// How often the store's generation counter is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// An immutable copy of the identities table.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    by_identity: HashMap<Identity, IdentityRecord>,
}

impl Snapshot {
    pub(crate) fn new(records: Vec<IdentityRecord>) -> Self {
        Self {
            by_identity: records
                .into_iter()
                .map(|r| (r.identity.clone(), r))
                .collect(),
        }
    }

    /// The record of an unrevoked identity.
    pub(crate) fn active(&self, identity: &Identity) -> Option<&IdentityRecord> {
        self.by_identity
            .get(identity)
            .filter(|r| r.revoked_at.is_none())
    }

    /// Whether some unrevoked connector may publish `host`: only such names get a TLS
    /// certificate and a route.
    pub(crate) fn is_published_name(&self, host: &Hostname) -> bool {
        self.by_identity.values().any(|r| {
            r.identity.role() == Role::Connector
                && r.revoked_at.is_none()
                && r.hostnames.iter().any(|p| p.matches(host))
        })
    }

    /// The name to put in the TLS certificate served for `host`, or `None` if no
    /// unrevoked connector publishes it as a certificate covers it: `host` itself when
    /// published exactly, `*.suffix` when it is exactly one label below a published
    /// `*.suffix` (as a wildcard certificate covers one label, RFC 6125 §6.4.3). Any
    /// deeper name gets none, so no name a stranger makes up, at any depth, costs a
    /// certificate: every certificate name is one of [`Snapshot::certificate_names`].
    pub(crate) fn certificate_name(&self, host: &Hostname) -> Option<String> {
        let parent = host.as_str().split_once('.').map(|(_, rest)| rest);
        let mut found = None;
        for p in self.published_patterns() {
            match p {
                HostPattern::Exact(h) if h == host => return Some(host.to_string()),
                HostPattern::Wildcard(suffix) if parent == Some(suffix.as_str()) => {
                    found.get_or_insert_with(|| p.to_string());
                }
                _ => {}
            }
        }
        found
    }

    /// Every certificate name a handshake can be served (see [`Self::certificate_name`]):
    /// each published exact name and `*.suffix` pattern, once.
    pub(crate) fn certificate_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.published_patterns().map(ToString::to_string).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    fn published_patterns(&self) -> impl Iterator<Item = &HostPattern> {
        self.by_identity
            .values()
            .filter(|r| r.identity.role() == Role::Connector && r.revoked_at.is_none())
            .flat_map(|r| r.hostnames.iter())
    }

    pub(crate) fn records(&self) -> impl Iterator<Item = &IdentityRecord> {
        self.by_identity.values()
    }
}

/// One identity's live connections: key → (certificate key fingerprint, token).
type LiveConnections = HashMap<u64, (String, CancellationToken)>;

/// The registry: current snapshot plus the live connections to cut on revocation.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Live connections by identity: key → (certificate key fingerprint, token).
    live: Mutex<HashMap<Identity, LiveConnections>>,
    next: AtomicU64,
    /// Set while the store has been unreadable for longer than allowed: every certificate
    /// is refused and no connection is kept.
    failed_closed: AtomicBool,
    /// Set while the last read of the store failed (the relay serves its last good view).
    unreadable: AtomicBool,
}

/// Held by a live connection; cancelled when its identity is revoked, its certificate
/// superseded or expired, or the registry fails closed; deregistered on drop.
#[derive(Debug)]
pub(crate) struct LiveGuard {
    registry: Arc<Registry>,
    identity: Identity,
    key: u64,
    token: CancellationToken,
    /// Cancelled on drop, ending the expiry timer.
    dropped: CancellationToken,
}

impl LiveGuard {
    pub(crate) fn revoked(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// A token cancelled on revocation, for tasks that outlive the request (tunnels).
    pub(crate) fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.dropped.cancel();
        let mut live = self.registry.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conns) = live.get_mut(&self.identity) {
            conns.remove(&self.key);
            if conns.is_empty() {
                live.remove(&self.identity);
            }
        }
    }
}

impl Registry {
    pub(crate) fn load(store: &dyn Store) -> anyhow::Result<Arc<Self>> {
        let registry = Arc::new(Self::default());
        registry.replace(Snapshot::new(store.identities()?));
        Ok(registry)
    }

    /// An unrevoked, never-expiring record of `role` `id` publishing `hostnames`, for
    /// tests to adjust with struct update syntax.
    #[cfg(test)]
    pub(crate) fn test_record(role: Role, id: &str, hostnames: &[&str]) -> IdentityRecord {
        IdentityRecord {
            identity: Identity::new(role, id).expect("a valid test id"),
            user: None,
            groups: vec![],
            hostnames: hostnames
                .iter()
                .map(|h| HostPattern::parse(h).expect("a valid pattern"))
                .collect(),
            serial: "1".into(),
            previous_serial: None,
            key_sha256: String::new(),
            not_after: i64::MAX,
            issued_at: 0,
            revoked_at: None,
        }
    }

    /// A registry holding `records`, for tests.
    #[cfg(test)]
    pub(crate) fn with_records(records: Vec<IdentityRecord>) -> Arc<Self> {
        let registry = Arc::new(Self::default());
        registry.replace(Snapshot::new(records));
        registry
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Installs a new snapshot and cancels live connections whose identity is no longer
    /// active or whose certificate has been superseded by a re-issue.
    fn replace(&self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = snapshot.clone();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for (identity, conns) in live.iter() {
            // A renewal keeps the key (live connections carry on); a re-issue replaces it.
            let current = snapshot.active(identity).map(|r| r.key_sha256.as_str());
            for (key, token) in conns.values() {
                if current.is_none_or(|c| c != key) {
                    tracing::info!(%identity, "certificate revoked or superseded: closing its connection");
                    token.cancel();
                }
            }
        }
    }

    /// Registers a live connection of `identity` made with a certificate for the key with
    /// fingerprint `key_sha256` that expires at `not_after` (Unix seconds; `now` is the
    /// current time in the same unit). The connection is cut when the certificate
    /// expires, so no connection outlives the certificate it was opened with. Must be
    /// called within the tokio runtime.
    pub(crate) fn track(
        self: &Arc<Self>,
        identity: &Identity,
        key_sha256: &str,
        not_after: i64,
        now: i64,
    ) -> LiveGuard {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let dropped = CancellationToken::new();
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(identity.clone())
            .or_default()
            .insert(key, (key_sha256.to_owned(), token.clone()));
        // Revoked or re-issued between handshake and now, or the store unreadable: cut at
        // once.
        if self.is_failed_closed()
            || self
                .snapshot()
                .active(identity)
                .is_none_or(|r| r.key_sha256 != key_sha256)
        {
            token.cancel();
        }
        // `now` is whole seconds, rounded down: the cut comes at `not_after` or within the
        // second after it, never before.
        let left = Duration::from_secs(u64::try_from(not_after - now).unwrap_or(0));
        let (expiring, done, who) = (token.clone(), dropped.clone(), identity.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(left) => {
                    if !expiring.is_cancelled() {
                        tracing::info!(identity = %who, "certificate expired: closing its connection");
                        expiring.cancel();
                    }
                }
                () = done.cancelled() => {}
                () = expiring.cancelled() => {}
            }
        });
        LiveGuard {
            registry: self.clone(),
            identity: identity.clone(),
            key,
            token,
            dropped,
        }
    }

    /// Whether the last read of the store failed.
    pub(crate) fn is_store_unreadable(&self) -> bool {
        self.unreadable.load(Ordering::Relaxed)
    }

    /// Whether the registry has failed closed: the store has been unreadable for longer
    /// than allowed.
    pub(crate) fn is_failed_closed(&self) -> bool {
        self.failed_closed.load(Ordering::Relaxed)
    }

    /// Refuses every certificate from now on and cuts every live connection.
    fn fail_closed(&self) {
        self.failed_closed.store(true, Ordering::Relaxed);
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for (_, token) in live.values().flat_map(HashMap::values) {
            token.cancel();
        }
    }

    /// Reloads from the store now (after this relay itself changed it, e.g. an enrolment,
    /// so the new device can connect at once rather than after the next poll).
    pub(crate) fn reload(&self, store: &dyn Store) -> anyhow::Result<()> {
        self.replace(Snapshot::new(store.identities()?));
        Ok(())
    }

    /// Polls the store and applies changes until shutdown. If the store cannot be read
    /// (an error, or a read still unanswered) for `fail_closed_after`, the registry fails
    /// closed until a read succeeds again.
    pub(crate) async fn watch(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        fail_closed_after: Duration,
        shutdown: Shutdown,
    ) {
        type Poll = anyhow::Result<Option<(u64, Vec<IdentityRecord>)>>;
        let mut seen = None;
        let mut last_read = Instant::now();
        // At most one read in flight: a store that hangs must not pile up blocked threads.
        let mut pending: Option<tokio::task::JoinHandle<Poll>> = None;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A store that announces changes (PostgreSQL) is read as soon as one is announced;
        // the poll stays as the backstop.
        let changes = store.changes();
        let announced = || async {
            match &changes {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = announced() => {}
                () = shutdown.wait() => return,
            }
            let mut read = pending.take().unwrap_or_else(|| {
                let store = store.clone();
                tokio::task::spawn_blocking(move || -> Poll {
                    let generation = store.generation()?;
                    if Some(generation) == seen {
                        return Ok(None);
                    }
                    Ok(Some((generation, store.identities()?)))
                })
            });
            let ok = match tokio::time::timeout(POLL_INTERVAL, &mut read).await {
                Err(_) => {
                    pending = Some(read);
                    false
                }
                Ok(Ok(Ok(Some((generation, records))))) => {
                    seen = Some(generation);
                    self.replace(Snapshot::new(records));
                    true
                }
                Ok(Ok(Ok(None))) => true,
                Ok(Ok(Err(e))) => {
                    if !self.unreadable.load(Ordering::Relaxed) {
                        tracing::warn!(error = %format!("{e:#}"), "cannot read the store; serving with the last identities read, refusing enrolment and renewal");
                    }
                    false
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "store poll task failed");
                    false
                }
            };
            if !ok {
                self.unreadable.store(true, Ordering::Relaxed);
            } else if self.unreadable.swap(false, Ordering::Relaxed) {
                tracing::info!("the store can be read again");
            }
            if ok {
                last_read = Instant::now();
                if self.failed_closed.swap(false, Ordering::Relaxed) {
                    tracing::warn!("the store can be read again: accepting certificates again");
                }
            } else if last_read.elapsed() >= fail_closed_after && !self.is_failed_closed() {
                tracing::error!(
                    unreadable_for = ?last_read.elapsed(),
                    "the store cannot be read: failing closed (refusing every certificate, closing every connection)"
                );
                self.fail_closed();
            }
        }
    }
}

fn same_serial(a: &str, b: &str) -> bool {
    a.trim_start_matches('0') == b.trim_start_matches('0')
}

/// Whether `serial` is `record`'s certificate at `now`: the current one, or the one a
/// renewal replaced, for [`RENEWAL_OVERLAP_SECS`] after the renewal.
fn accepts(record: &IdentityRecord, serial: &str, now: i64) -> bool {
    same_serial(&record.serial, serial)
        || record.previous_serial.as_deref().is_some_and(|previous| {
            same_serial(previous, serial) && now < record.issued_at + RENEWAL_OVERLAP_SECS
        })
}

impl IdentityCheck for Registry {
    fn check(&self, identity: &Identity, serial: &str, _key_sha256: &str) -> Result<(), String> {
        if self.is_failed_closed() {
            return Err(
                "the relay cannot read its store: every certificate is refused until it can".into(),
            );
        }
        let snapshot = self.snapshot();
        match snapshot.by_identity.get(identity) {
            None => Err(format!("{identity} is not registered")),
            Some(r) if r.revoked_at.is_some() => Err(format!("{identity} is revoked")),
            Some(r) if accepts(r, serial, crate::clock::now()) => Ok(()),
            Some(_) => Err(format!(
                "{identity} presented a superseded certificate (serial {serial})"
            )),
        }
    }
}

/// The registry's families for `/metrics`: active identities by role, each active
/// certificate's expiry (devices only when `device_ids`: a device's id names its user),
/// and whether the store can be read.
#[derive(Debug)]
pub(crate) struct RegistryMetrics {
    pub(crate) registry: Arc<Registry>,
    pub(crate) device_ids: bool,
}

impl prometheus_client::collector::Collector for RegistryMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use portcullis_shared::metrics::{gauge, gauges, label};
        let e = &mut encoder;
        let snapshot = self.registry.snapshot();
        let mut records: Vec<_> = snapshot
            .records()
            .filter(|r| r.revoked_at.is_none())
            .collect();
        records.sort_by(|a, b| a.identity.cmp(&b.identity));
        gauges(
            e,
            "identities",
            "Active (issued, unrevoked) identities, by role.",
            [Role::Connector, Role::Device].map(|role| {
                let n = records.iter().filter(|r| r.identity.role() == role).count();
                (
                    [("role", role.as_str())],
                    i64::try_from(n).unwrap_or(i64::MAX),
                )
            }),
        )?;
        gauges(
            e,
            "identity_certificate_expiry_timestamp_seconds",
            "Expiry of each active issued certificate (devices only with [admin] metrics_device_ids).",
            records
                .iter()
                .filter(|r| self.device_ids || r.identity.role() != Role::Device)
                .map(|r| {
                    (
                        [
                            ("role", r.identity.role().as_str().to_owned()),
                            ("id", label(r.identity.id())),
                        ],
                        r.not_after,
                    )
                }),
        )?;
        gauge(
            e,
            "store_unreadable",
            "1 while the relay's last read of its store failed: it serves with the identities it read last and refuses enrolment and renewal.",
            i64::from(self.registry.is_store_unreadable()),
        )?;
        gauge(
            e,
            "store_failed_closed",
            "1 while the store has been unreadable for longer than [store] fail_closed_after: every certificate is refused.",
            i64::from(self.registry.is_failed_closed()),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use portcullis_shared::store::{AuditEvent, AuditQuery, SqliteStore, StoreError, TokenRecord};

    use super::*;

    #[test]
    fn device_ids_are_listed_only_when_asked_for() {
        let record = |role, id: &str| IdentityRecord {
            user: Some("alice".into()),
            not_after: 1234,
            ..Registry::test_record(role, id, &[])
        };
        let registry = Registry::with_records(vec![
            record(Role::Device, "alice_laptop"),
            record(Role::Connector, "c1"),
        ]);
        let text = |device_ids| {
            let mut r = portcullis_shared::metrics::Registry::with_prefix("portcullis_relay");
            r.register_collector(Box::new(RegistryMetrics {
                registry: registry.clone(),
                device_ids,
            }));
            portcullis_shared::metrics::encode(&r)
        };
        let without = text(false);
        assert!(!without.contains("alice"), "{without}");
        for line in [
            "portcullis_relay_identities{role=\"device\"} 1",
            "portcullis_relay_identity_certificate_expiry_timestamp_seconds{role=\"connector\",id=\"c1\"} 1234",
            "portcullis_relay_store_failed_closed 0",
        ] {
            assert!(without.contains(line), "{line} not in {without}");
        }
        assert!(text(true).contains(
            "portcullis_relay_identity_certificate_expiry_timestamp_seconds{role=\"device\",id=\"alice_laptop\"} 1234"
        ));
    }

    /// A store whose reads of identities fail while `broken` is set.
    #[derive(Debug)]
    struct Flaky {
        inner: SqliteStore,
        broken: AtomicBool,
    }

    impl Flaky {
        fn check(&self) -> Result<(), StoreError> {
            if self.broken.load(Ordering::Relaxed) {
                Err(StoreError::Corrupt {
                    what: "identities".into(),
                    why: "unreadable in this test".into(),
                })
            } else {
                Ok(())
            }
        }
    }

    impl Store for Flaky {
        fn put_identity(&self, r: &IdentityRecord) -> Result<(), StoreError> {
            self.inner.put_identity(r)
        }
        fn create_identity(&self, r: &IdentityRecord) -> Result<(), StoreError> {
            self.inner.create_identity(r)
        }
        fn identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
            self.check()?;
            self.inner.identities()
        }
        fn revoke(&self, i: &Identity, at: i64) -> Result<(), StoreError> {
            self.inner.revoke(i, at)
        }
        fn audit(&self, e: &AuditEvent) -> Result<(), StoreError> {
            self.inner.audit(e)
        }
        fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
            self.inner.audit_log(q)
        }
        fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
            self.inner.prune_audit(before)
        }
        fn generation(&self) -> Result<u64, StoreError> {
            self.check()?;
            self.inner.generation()
        }
        fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
            self.inner.create_token(t)
        }
        fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
            self.inner.tokens()
        }
        fn revoke_token(&self, id: &str, at: i64) -> Result<(), StoreError> {
            self.inner.revoke_token(id, at)
        }
        fn redeem_token(&self, id: &str, s: &str, now: i64) -> Result<TokenRecord, StoreError> {
            self.inner.redeem_token(id, s, now)
        }
        fn bind_ca(&self, ca_sha256: &str) -> Result<(), StoreError> {
            self.inner.bind_ca(ca_sha256)
        }
        fn describe(&self) -> String {
            "a store that breaks on demand".into()
        }
    }

    fn device(id: &str, serial: &str, key: &str) -> IdentityRecord {
        IdentityRecord {
            user: Some("alice".into()),
            serial: serial.into(),
            previous_serial: None,
            key_sha256: key.into(),
            ..Registry::test_record(Role::Device, id, &[])
        }
    }

    /// Polls `f` every 20 ms for up to 5 s.
    async fn soon(f: impl Fn() -> bool) -> bool {
        for _ in 0..250 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn an_unreadable_store_fails_closed_after_the_limit_and_recovers() {
        let store = Arc::new(Flaky {
            inner: SqliteStore::in_memory().unwrap(),
            broken: AtomicBool::new(false),
        });
        store.put_identity(&device("alice", "0a", "k1")).unwrap();
        let registry = Registry::load(&*store).unwrap();
        let alice = Identity::new(Role::Device, "alice").unwrap();
        let shutdown = Shutdown::new();
        let watch = tokio::spawn(registry.clone().watch(
            store.clone(),
            Duration::from_millis(600),
            shutdown.clone(),
        ));
        let live = registry.track(&alice, "k1", i64::MAX, 0);
        assert!(registry.check(&alice, "a", "k1").is_ok());

        store.broken.store(true, Ordering::Relaxed);
        let started = Instant::now();
        assert!(
            soon(|| registry.is_failed_closed()).await,
            "must fail closed"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        // Live connections are cut; new handshakes and connections are refused.
        assert!(live.token().is_cancelled());
        let err = registry.check(&alice, "a", "k1").unwrap_err();
        assert!(err.contains("cannot read its store"), "{err}");
        assert!(
            registry
                .track(&alice, "k1", i64::MAX, 0)
                .token()
                .is_cancelled()
        );

        store.broken.store(false, Ordering::Relaxed);
        assert!(soon(|| !registry.is_failed_closed()).await, "must recover");
        assert!(registry.check(&alice, "a", "k1").is_ok());
        assert!(
            !registry
                .track(&alice, "k1", i64::MAX, 0)
                .token()
                .is_cancelled()
        );
        shutdown.trigger();
        watch.await.unwrap();
    }

    #[tokio::test]
    async fn a_live_connection_is_cut_when_its_certificate_expires() {
        let registry = Registry::with_records(vec![device("alice", "0a", "k1")]);
        let alice = Identity::new(Role::Device, "alice").unwrap();
        let now = 1_000;
        let lasting = registry.track(&alice, "k1", now + 3600, now);
        let expiring = registry.track(&alice, "k1", now + 1, now);
        let expired = registry.track(&alice, "k1", now - 1, now);
        assert!(soon(|| expired.token().is_cancelled()).await);
        let started = Instant::now();
        assert!(soon(|| expiring.token().is_cancelled()).await);
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        assert!(!lasting.token().is_cancelled());
    }

    #[test]
    fn only_the_exact_current_certificate_is_accepted_and_a_renewed_one_briefly() {
        let registry = Registry::with_records(vec![device("alice", "0a1b", "k2")]);
        let alice = Identity::new(Role::Device, "alice").unwrap();
        // The current serial, with or without leading zeros.
        assert!(registry.check(&alice, "a1b", "k2").is_ok());
        assert!(registry.check(&alice, "000a1b", "k2").is_ok());
        // Any other serial is superseded, whatever its key.
        for key in ["k2", "k1"] {
            let err = registry.check(&alice, "99", key).unwrap_err();
            assert!(err.contains("superseded"), "{err}");
        }
        let bob = Identity::new(Role::Device, "bob").unwrap();
        assert!(registry.check(&bob, "a1b", "k2").is_err());
    }

    #[test]
    fn the_certificate_a_renewal_replaced_is_accepted_only_for_the_overlap() {
        let renewed = IdentityRecord {
            previous_serial: Some("99".into()),
            issued_at: 1_000,
            ..device("alice", "a1b", "k")
        };
        let end = 1_000 + RENEWAL_OVERLAP_SECS;
        assert!(accepts(&renewed, "a1b", end + 1));
        assert!(accepts(&renewed, "0099", 1_000));
        assert!(accepts(&renewed, "99", end - 1));
        assert!(!accepts(&renewed, "99", end));
        assert!(!accepts(&renewed, "98", 1_000));
        let reissued = IdentityRecord {
            previous_serial: None,
            ..renewed
        };
        assert!(!accepts(&reissued, "99", 1_000));
    }
}
