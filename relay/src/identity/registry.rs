//! The relay's live view of the store's identities: consulted on every handshake and
//! request, refreshed within a quarter second of any change, and the place that closes
//! live connections of revoked identities.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use portcullis_shared::identity::{HostPattern, Hostname, Identity, Role};
use portcullis_shared::pki::IdentityCheck;
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::store::{IdentityRecord, Store};
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
    /// unrevoked connector may publish it. Under a wildcard pattern a certificate covers
    /// one label, so `host` gets `*.` and its parent name: a name one label below
    /// `*.suffix` shares the `*.suffix` certificate, one deeper shares its parent's
    /// (`a.b.suffix` and `c.b.suffix` both get `*.b.suffix`), so random names under a
    /// wildcard cannot make the relay mint a certificate each.
    pub(crate) fn certificate_name(&self, host: &Hostname) -> Option<String> {
        let mut found = None;
        let patterns = self
            .by_identity
            .values()
            .filter(|r| r.identity.role() == Role::Connector && r.revoked_at.is_none())
            .flat_map(|r| r.hostnames.iter());
        for p in patterns {
            match p {
                HostPattern::Exact(h) if h == host => return Some(host.to_string()),
                HostPattern::Wildcard(_) if p.matches(host) => {
                    // A wildcard match has at least one label above the suffix.
                    let parent = host.as_str().split_once('.').map_or("", |(_, rest)| rest);
                    found.get_or_insert_with(|| format!("*.{parent}"));
                }
                _ => {}
            }
        }
        found
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
}

/// Held by a live connection; cancelled when its identity is revoked, deregistered on drop.
#[derive(Debug)]
pub(crate) struct LiveGuard {
    registry: Arc<Registry>,
    identity: Identity,
    key: u64,
    token: CancellationToken,
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
    /// fingerprint `key_sha256`.
    pub(crate) fn track(self: &Arc<Self>, identity: &Identity, key_sha256: &str) -> LiveGuard {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(identity.clone())
            .or_default()
            .insert(key, (key_sha256.to_owned(), token.clone()));
        // Revoked or re-issued between handshake and now: cut at once.
        if self
            .snapshot()
            .active(identity)
            .is_none_or(|r| r.key_sha256 != key_sha256)
        {
            token.cancel();
        }
        LiveGuard {
            registry: self.clone(),
            identity: identity.clone(),
            key,
            token,
        }
    }

    /// Reloads from the store now (after this relay itself changed it, e.g. an enrolment,
    /// so the new device can connect at once rather than after the next poll).
    pub(crate) fn reload(&self, store: &dyn Store) -> anyhow::Result<()> {
        self.replace(Snapshot::new(store.identities()?));
        Ok(())
    }

    /// Polls the store and applies changes until shutdown.
    pub(crate) async fn watch(self: Arc<Self>, store: Arc<dyn Store>, shutdown: Shutdown) {
        let mut seen = None;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.wait() => return,
            }
            let store = store.clone();
            let result = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let generation = store.generation()?;
                if Some(generation) == seen {
                    return Ok(None);
                }
                Ok(Some((generation, store.identities()?)))
            })
            .await;
            match result {
                Ok(Ok(Some((generation, records)))) => {
                    seen = Some(generation);
                    self.replace(Snapshot::new(records));
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the store; keeping the last identities")
                }
                Err(e) => tracing::warn!(error = %e, "store poll task failed"),
            }
        }
    }
}

fn same_serial(a: &str, b: &str) -> bool {
    a.trim_start_matches('0') == b.trim_start_matches('0')
}

impl IdentityCheck for Registry {
    fn check(&self, identity: &Identity, serial: &str, key_sha256: &str) -> Result<(), String> {
        let snapshot = self.snapshot();
        match snapshot.by_identity.get(identity) {
            None => Err(format!("{identity} is not registered")),
            Some(r) if r.revoked_at.is_some() => Err(format!("{identity} is revoked")),
            // The current certificate, or an earlier one for the same key (a renewal whose
            // answer the device has not stored yet); a re-issue with a new key retires
            // the old certificates.
            Some(r) if same_serial(&r.serial, serial) || r.key_sha256 == key_sha256 => Ok(()),
            Some(_) => Err(format!(
                "{identity} presented a superseded certificate (serial {serial})"
            )),
        }
    }
}
