//! TLS on the relay's listeners: which certificate to serve for which name, and the
//! rustls server configs (mTLS with role checks, no resumption, no 0-RTT).
//!
//! Published hostnames get a leaf minted from the org CA on first use and cached; an
//! operator's `tls_cert`/`tls_key` replace those and are reloaded when the files change.
//! The relay's own `server_name` always gets an org-CA leaf, since connectors trust only
//! the org CA, and so does every name the relay does not serve: the handshake completes
//! as for any other name and the request path refuses the request, so the handshake's
//! outcome says nothing about which names exist.
//!
//! What a stranger can make the relay spend here is bounded, and cannot cost a published
//! name its certificate:
//! - Leaves exist only for published names: one per exact name, one per `*.suffix`
//!   pattern, serving names exactly one label below it; a deeper or unknown name gets the
//!   relay's own certificate and mints nothing. So the names that can ever be minted are
//!   the registry's, and an operator's choice.
//! - [`premint`] mints every published name's leaf in the background as soon as it is
//!   published (and renews it before it ages), outside any budget, so a handshake for a
//!   published name finds its leaf cached.
//! - A handshake that finds none (a name published a moment ago) mints within
//!   `[tls] leaves_per_minute` for the whole relay and a few a minute per client address
//!   (IPv4, IPv6 /64); past those it gets a cached leaf if there is one, else the relay's
//!   own certificate until [`premint`] reaches the name.
//! - At most [`MAX_CACHED`] leaves are kept; the least recently used goes first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use portcullis_shared::config::TlsVersion;
use portcullis_shared::identity::{Hostname, Role};
use portcullis_shared::pki::{self, Ca, RoleVerifier};
use rustls::ServerConfig;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::clock::now;
use crate::hardening::rate_limit::RateLimit;
use crate::identity::registry::Registry;

/// Lifetime of minted leaves; re-minted when less than a third remains.
const LEAF_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Cap on cached minted leaves (one per published name or wildcard parent in use).
pub(crate) const MAX_CACHED: usize = 4096;

#[derive(Debug)]
struct StaticCert {
    cert: PathBuf,
    key: PathBuf,
    loaded: RwLock<Option<(SystemTime, Arc<CertifiedKey>)>>,
}

/// A minted leaf and its expiry (Unix seconds).
type Leaf = (i64, Arc<CertifiedKey>);

/// Minted leaves for published names, each with when it was last served (a counter), for
/// evicting the least recently used when full; and the minting budgets.
#[derive(Debug)]
struct Leaves {
    by_name: HashMap<String, (Leaf, u64)>,
    uses: u64,
    budget: MintBudget,
    /// Leaves minted on demand per client address, a few a minute each.
    per_source: RateLimit,
}

impl Leaves {
    /// The cached leaf for `name`, marked as used now.
    fn get(&mut self, name: &str) -> Option<Leaf> {
        self.uses += 1;
        let uses = self.uses;
        self.by_name.get_mut(name).map(|(leaf, used)| {
            *used = uses;
            leaf.clone()
        })
    }

    /// Caches `leaf` for `name`, evicting the least recently used past [`MAX_CACHED`].
    fn put(&mut self, name: &str, leaf: Leaf) {
        self.uses += 1;
        self.by_name.insert(name.to_owned(), (leaf, self.uses));
        while self.by_name.len() > MAX_CACHED {
            let Some(oldest) = self
                .by_name
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(n, _)| n.clone())
            else {
                break;
            };
            self.by_name.remove(&oldest);
        }
    }
}

tokio::task_local! {
    /// The client address of the handshake being served, where the listener knows it.
    static SOURCE: IpAddr;
}

/// Runs `start` (quinn's accept, which reads the first Initial packet and so the
/// ClientHello right away) knowing its client's address.
pub(crate) fn with_source_sync<R>(source: IpAddr, start: impl FnOnce() -> R) -> R {
    SOURCE.sync_scope(source, start)
}

/// Runs a handshake future knowing its client's address, so on-demand minting is counted
/// against that address too.
pub(crate) async fn with_source<F: Future>(source: IpAddr, handshake: F) -> F::Output {
    SOURCE.scope(source, handshake).await
}

/// A token bucket: `per_minute` leaves in a burst, refilled evenly over a minute.
#[derive(Debug)]
struct MintBudget {
    per_minute: f64,
    tokens: f64,
    refilled: Option<Instant>,
}

impl MintBudget {
    fn new(per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        Self {
            per_minute,
            tokens: per_minute,
            refilled: None,
        }
    }

    /// Takes one leaf's worth at `at`, if there is one.
    fn take(&mut self, at: Instant) -> bool {
        if let Some(last) = self.refilled {
            let earned = at.saturating_duration_since(last).as_secs_f64() * self.per_minute / 60.0;
            self.tokens = (self.tokens + earned).min(self.per_minute);
        }
        self.refilled = Some(at);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Picks the certificate for each handshake by SNI.
#[derive(Debug)]
pub(crate) struct CertResolver {
    ca: Arc<Ca>,
    server_name: Hostname,
    registry: Arc<Registry>,
    /// The relay's own leaf, outside the cache and the budget: it is always available.
    own: Mutex<Option<Leaf>>,
    leaves: Mutex<Leaves>,
    static_cert: Option<StaticCert>,
    /// Leaves minted for published names (the relay's own excluded).
    minted: AtomicU64,
    /// Handshakes that got the relay's own certificate because the budget was spent.
    over_budget: AtomicU64,
}

fn certified_key(
    cert: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: &rustls_pki_types::PrivateKeyDer<'_>,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| anyhow::anyhow!("unsupported private key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(cert, signer)))
}

/// Whether a leaf expiring at `not_after` still has more than a third of its life left.
fn fresh(not_after: i64, now: i64) -> bool {
    not_after - now > (LEAF_TTL.as_secs() / 3) as i64
}

impl CertResolver {
    pub(crate) fn new(
        ca: Arc<Ca>,
        server_name: Hostname,
        registry: Arc<Registry>,
        static_files: Option<(PathBuf, PathBuf)>,
        leaves_per_minute: u32,
    ) -> anyhow::Result<Arc<Self>> {
        let resolver = Arc::new(Self {
            ca,
            server_name,
            registry,
            own: Mutex::default(),
            leaves: Mutex::new(Leaves {
                by_name: HashMap::new(),
                uses: 0,
                budget: MintBudget::new(leaves_per_minute),
                per_source: RateLimit::default(),
            }),
            static_cert: static_files.map(|(cert, key)| StaticCert {
                cert,
                key,
                loaded: RwLock::new(None),
            }),
            minted: AtomicU64::new(0),
            over_budget: AtomicU64::new(0),
        });
        // Fail at startup, not at the first handshake, if the operator's files are bad.
        resolver.reload_static()?;
        Ok(resolver)
    }

    /// Leaves minted for published names since start.
    pub(crate) fn minted_total(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// Handshakes for published names answered with the relay's own certificate because
    /// the minting budget was spent.
    pub(crate) fn over_budget_total(&self) -> u64 {
        self.over_budget.load(Ordering::Relaxed)
    }

    /// Re-reads `tls_cert`/`tls_key` if the certificate file changed. Called at startup and
    /// periodically; a bad file keeps the previous certificate and logs why.
    /// When the organisation CA and the public certificate (`tls_cert`, if any) expire,
    /// as (`ca` or `public`, Unix seconds).
    pub(crate) fn expiries(&self) -> Vec<(&'static str, i64)> {
        let mut out = Vec::new();
        if let Ok(info) = pki::inspect(self.ca.cert_der()) {
            out.push(("ca", info.not_after));
        }
        if let Some(s) = &self.static_cert
            && let Some((_, ck)) = &*s.loaded.read().unwrap_or_else(|p| p.into_inner())
            && let Some(leaf) = ck.cert.first()
            && let Ok(info) = pki::inspect(leaf)
        {
            out.push(("public", info.not_after));
        }
        out
    }

    pub(crate) fn reload_static(&self) -> anyhow::Result<()> {
        let Some(s) = &self.static_cert else {
            return Ok(());
        };
        let mtime = std::fs::metadata(&s.cert)
            .and_then(|m| m.modified())
            .map_err(|e| anyhow::anyhow!("tls_cert {}: {e}", s.cert.display()))?;
        let current = s
            .loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(t, _)| *t);
        if current == Some(mtime) {
            return Ok(());
        }
        let certs = pki::load_certs(&s.cert)?;
        let key = pki::load_key(&s.key)?;
        let ck = certified_key(certs, &key)?;
        ck.keys_match().map_err(|_| {
            anyhow::anyhow!(
                "tls_key {} is not the key of tls_cert {}: give the key the certificate was issued for",
                s.key.display(),
                s.cert.display()
            )
        })?;
        *s.loaded.write().unwrap_or_else(|p| p.into_inner()) = Some((mtime, ck));
        if current.is_some() {
            tracing::info!(path = %s.cert.display(), "reloaded tls_cert");
        }
        Ok(())
    }

    /// A new org-CA leaf for `name`.
    fn mint(&self, name: &str) -> Option<Leaf> {
        let issued = match self.ca.issue_server(&[name.to_owned()], LEAF_TTL) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "cannot mint a server certificate");
                return None;
            }
        };
        let key = issued.key?;
        let ck = certified_key(
            std::iter::once(issued.cert_der)
                .chain(self.ca.chain_der().iter().cloned())
                .chain(std::iter::once(self.ca.cert_der().clone()))
                .collect(),
            &pki::pkcs8(key.der),
        )
        .inspect_err(|e| tracing::warn!(error = %e, "cannot load a minted certificate"))
        .ok()?;
        Some((issued.not_after, ck))
    }

    /// The relay's own certificate, for its `server_name` and for every name it does not
    /// serve.
    fn own(&self) -> Option<Arc<CertifiedKey>> {
        let now = now();
        if let Some((not_after, ck)) = &*self.own.lock().unwrap_or_else(|p| p.into_inner())
            && fresh(*not_after, now)
        {
            return Some(ck.clone());
        }
        // Two handshakes racing here may both mint; the last one is kept.
        let leaf = self.mint(self.server_name.as_str())?;
        let ck = leaf.1.clone();
        *self.own.lock().unwrap_or_else(|p| p.into_inner()) = Some(leaf);
        Some(ck)
    }

    /// The leaf for the published certificate name `name`: cached, or minted if the
    /// budgets allow (the relay's, and `source`'s when known), else an ageing cached one,
    /// else the relay's own until [`premint`] reaches it.
    fn leaf(&self, name: &str, at: Instant, source: Option<IpAddr>) -> Option<Arc<CertifiedKey>> {
        let now = now();
        let stale = {
            let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            let cached = leaves.get(name);
            match cached {
                Some((not_after, ck)) if fresh(not_after, now) => return Some(ck),
                _ => {}
            }
            let source_ok = source.is_none_or(|ip| leaves.per_source.check(ip, at).is_ok());
            if !source_ok || !leaves.budget.take(at) {
                drop(leaves);
                self.over_budget.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(name, "certificate minting budget spent");
                return match cached {
                    Some((not_after, ck)) if not_after > now => Some(ck),
                    _ => self.own(),
                };
            }
            cached
        };
        // Signing happens outside the lock; two handshakes racing for a new name may both
        // mint (each within the budget), and the last one is kept.
        let Some(leaf) = self.mint(name) else {
            return stale.map(|(_, ck)| ck);
        };
        self.minted.fetch_add(1, Ordering::Relaxed);
        let ck = leaf.1.clone();
        self.leaves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(name, leaf);
        Some(ck)
    }

    /// Mints the leaf of every published certificate name that has none fresh, outside
    /// the budgets (the names are the registry's, not a stranger's), at most
    /// [`MAX_CACHED`]; returns how many it minted.
    pub(crate) fn premint_published(&self) -> usize {
        if self.static_cert.is_some() {
            return 0;
        }
        let now = now();
        let mut minted = 0;
        for name in self
            .registry
            .snapshot()
            .certificate_names()
            .iter()
            .take(MAX_CACHED)
        {
            let current = self
                .leaves
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .by_name
                .get(name.as_str())
                .is_some_and(|((not_after, _), _)| fresh(*not_after, now));
            if current {
                continue;
            }
            let Some(leaf) = self.mint(name) else {
                continue;
            };
            self.minted.fetch_add(1, Ordering::Relaxed);
            minted += 1;
            self.leaves
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(name, leaf);
        }
        minted
    }

    /// The certificate for a handshake from `source` (where known) that asked for `sni`,
    /// at `at`.
    fn choose(
        &self,
        sni: Option<&str>,
        at: Instant,
        source: Option<IpAddr>,
    ) -> Option<Arc<CertifiedKey>> {
        // No SNI (a client dialling an IP), or a name that is not a valid hostname: the
        // relay's own name; requests then fail the SNI/Host check.
        let Some(host) = sni.and_then(|s| Hostname::parse(s).ok()) else {
            return self.own();
        };
        if host == self.server_name {
            return self.own();
        }
        let Some(cert_name) = self.registry.snapshot().certificate_name(&host) else {
            // An unknown name gets the same kind of handshake as a known one (only the
            // certificate differs), then the request path's refusal.
            tracing::debug!(
                sni = host.as_str(),
                "TLS for a name the relay does not serve"
            );
            return self.own();
        };
        if let Some(s) = &self.static_cert
            && let Some((_, ck)) = &*s.loaded.read().unwrap_or_else(|p| p.into_inner())
        {
            return Some(ck.clone());
        }
        self.leaf(&cert_name, at, source)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let source = SOURCE.try_with(|ip| *ip).ok();
        self.choose(hello.server_name(), Instant::now(), source)
    }
}

/// Keeps every published name's leaf minted: at start, then every 2 s (a look-up per
/// published name when nothing changed), off the async threads.
pub(crate) async fn premint(
    resolver: Arc<CertResolver>,
    shutdown: portcullis_shared::shutdown::Shutdown,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let r = resolver.clone();
                if let Ok(n) = tokio::task::spawn_blocking(move || r.premint_published()).await
                    && n > 0
                {
                    tracing::debug!(minted = n, "minted leaves for published names");
                }
            }
            () = shutdown.wait() => return,
        }
    }
}

fn base_config(
    ca: &Ca,
    registry: &Arc<Registry>,
    resolver: Arc<CertResolver>,
    roles: &[Role],
    mandatory: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<ServerConfig> {
    let verifier = RoleVerifier::new(
        ca.cert_der(),
        ca.chain_der(),
        roles,
        registry.clone(),
        mandatory,
    )?;
    let mut cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver);
    // Resumption would skip the client-certificate check, and so revocation: off.
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    // 0-RTT data can be replayed: never accepted.
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// TLS for the HTTPS listener: devices (optional at the handshake, required per request),
/// HTTP/2 and HTTP/1.1, TLS 1.3 unless `min_version` allows 1.2; and where UDP is
/// blocked, connector tunnels and enrolment by their own ALPNs.
pub(crate) fn https_config(
    ca: &Ca,
    registry: &Arc<Registry>,
    resolver: Arc<CertResolver>,
    min_version: TlsVersion,
) -> anyhow::Result<ServerConfig> {
    // TLS 1.2 sends the client certificate, which names the device and its user, in the
    // clear: only when the operator asks for it.
    let versions: &[&'static rustls::SupportedProtocolVersion] = match min_version {
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    // Connectors come here only for their tunnel over TCP (its own ALPN, checked after the
    // handshake in `listen::https`).
    let mut cfg = base_config(
        ca,
        registry,
        resolver,
        &[Role::Device, Role::Connector],
        false,
        versions,
    )?;
    cfg.alpn_protocols = vec![
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        portcullis_shared::proto::TUNNEL_TCP_ALPN.to_vec(),
        portcullis_shared::proto::ENROLL_ALPN.to_vec(),
    ];
    Ok(cfg)
}

/// TLS for the QUIC listener, TLS 1.3: connectors (tunnel ALPN) and devices (`h3`); a
/// certificate is mandatory, and the role must match the ALPN (checked after the
/// handshake, in `tunnel::accept_loop`).
pub(crate) fn quic_config(
    ca: &Ca,
    registry: &Arc<Registry>,
    resolver: Arc<CertResolver>,
) -> anyhow::Result<ServerConfig> {
    // Optional at the handshake so enrolment (which has no certificate yet) can connect;
    // the tunnel and HTTP/3 refuse a connection without one right after.
    let mut cfg = base_config(
        ca,
        registry,
        resolver,
        &[Role::Device, Role::Connector],
        false,
        &[&rustls::version::TLS13],
    )?;
    cfg.alpn_protocols = vec![
        b"h3".to_vec(),
        portcullis_shared::proto::TUNNEL_ALPN.to_vec(),
        portcullis_shared::proto::ENROLL_ALPN.to_vec(),
    ];
    Ok(cfg)
}

/// TLS for HTTPS inside a CONNECT tunnel: the same certificates, no client certificate
/// (the tunnel's outer connection already authenticated the device), no resumption.
pub(crate) fn inner_config(resolver: Arc<CertResolver>) -> anyhow::Result<ServerConfig> {
    let mut cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

impl prometheus_client::collector::Collector for CertResolver {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use portcullis_shared::metrics::{counter, gauges};
        let e = &mut encoder;
        counter(
            e,
            "tls_leaves_minted",
            "Certificates minted for published names (bounded by [tls] leaves_per_minute).",
            self.minted_total(),
        )?;
        counter(
            e,
            "tls_mint_budget_exhausted",
            "Handshakes answered with the relay's own certificate because the minting budget was spent.",
            self.over_budget_total(),
        )?;
        gauges(
            e,
            "certificate_expiry_timestamp_seconds",
            "When the relay's own certificates expire: the organisation CA, and the public certificate (tls_cert) when one is configured.",
            self.expiries()
                .into_iter()
                .map(|(which, at)| ([("certificate", which)], at)),
        )
    }
}

#[cfg(test)]
mod tests {

    use portcullis_shared::store::IdentityRecord;

    use super::*;

    fn connector(name: &str, hostnames: &[&str]) -> IdentityRecord {
        Registry::test_record(Role::Connector, name, hostnames)
    }

    /// A resolver for `relay.acme.test` with connector c1 publishing `app.acme.test`,
    /// `*.wild.acme.test` and `p0.acme.test` to `p11.acme.test`, minting at most
    /// `per_minute` leaves a minute on demand.
    fn resolver(per_minute: u32) -> (tempfile::TempDir, Arc<CertResolver>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::init(dir.path(), "Acme").unwrap());
        let mut names = vec!["app.acme.test".to_owned(), "*.wild.acme.test".to_owned()];
        names.extend((0..12).map(|i| format!("p{i}.acme.test")));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let registry = Registry::with_records(vec![connector("c1", &names)]);
        let name = Hostname::parse("relay.acme.test").unwrap();
        let resolver = CertResolver::new(ca, name, registry, None, per_minute).unwrap();
        (dir, resolver)
    }

    /// The DNS names in the certificate `r` presents for `sni` at `at` to `source`.
    fn names_from(
        r: &CertResolver,
        sni: Option<&str>,
        at: Instant,
        source: Option<IpAddr>,
    ) -> Vec<String> {
        let ck = r
            .choose(sni, at, source)
            .expect("a certificate for every handshake");
        let (_, cert) = x509_parser::parse_x509_certificate(&ck.cert[0]).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect()
    }

    fn names(r: &CertResolver, sni: Option<&str>, at: Instant) -> Vec<String> {
        names_from(r, sni, at, None)
    }

    #[test]
    fn unknown_deeper_and_invalid_names_get_the_relays_own_certificate_and_mint_nothing() {
        let (_dir, r) = resolver(60);
        let at = Instant::now();
        for sni in [
            Some("nope.acme.test"),
            Some("wild.acme.test"),
            Some("x.b.wild.acme.test"),
            Some("not a name"),
            None,
        ] {
            assert_eq!(names(&r, sni, at), ["relay.acme.test"], "{sni:?}");
        }
        assert_eq!(r.minted_total(), 0);
        assert_eq!(names(&r, Some("app.acme.test"), at), ["app.acme.test"]);
        assert_eq!(r.minted_total(), 1);
    }

    #[test]
    fn names_one_label_under_a_wildcard_share_its_leaf_and_deeper_ones_mint_nothing() {
        let (_dir, r) = resolver(60);
        let at = Instant::now();
        for sni in ["a.wild.acme.test", "b.wild.acme.test"] {
            assert_eq!(names(&r, Some(sni), at), ["*.wild.acme.test"]);
        }
        assert_eq!(r.minted_total(), 1);
        // A wildcard certificate covers one label: deeper names, however many, get the
        // relay's own certificate and cost nothing.
        for i in 0..50 {
            let sni = format!("x.p{i}.wild.acme.test");
            assert_eq!(names(&r, Some(&sni), at), ["relay.acme.test"]);
        }
        assert_eq!((r.minted_total(), r.over_budget_total()), (1, 0));
    }

    #[test]
    fn spent_budgets_never_cost_a_published_name_its_leaf_once_preminted() {
        let (_dir, r) = resolver(3);
        let at = Instant::now();
        let got: Vec<_> = (0..6)
            .map(|i| names(&r, Some(&format!("p{i}.acme.test")), at))
            .collect();
        // On demand: three, then the relay's own certificate for the moment...
        assert_eq!(r.minted_total(), 3);
        assert_eq!(got[2], ["p2.acme.test"]);
        assert!(
            got[3..].iter().all(|n| n == &["relay.acme.test"]),
            "{got:?}"
        );
        // ...until the background minting reaches every published name, budget or not.
        assert_eq!(r.premint_published(), 14 - 3);
        assert_eq!(r.premint_published(), 0);
        for i in 0..12 {
            let name = format!("p{i}.acme.test");
            assert_eq!(names(&r, Some(&name), at), [name.as_str()]);
        }
        assert_eq!(
            names(&r, Some("z.wild.acme.test"), at),
            ["*.wild.acme.test"]
        );
        assert_eq!(names(&r, Some("relay.acme.test"), at), ["relay.acme.test"]);
    }

    #[test]
    fn one_address_mints_a_few_leaves_a_minute_on_demand_and_others_go_on() {
        let (_dir, r) = resolver(1000);
        let at = Instant::now();
        let a = Some(IpAddr::from([192, 0, 2, 1]));
        let b = Some(IpAddr::from([192, 0, 2, 2]));
        let from = |src, i: usize| names_from(&r, Some(&format!("p{i}.acme.test")), at, src);
        let first: Vec<_> = (0..11).map(|i| from(a, i)).collect();
        assert_eq!(r.minted_total(), 10);
        assert_eq!(first[10], ["relay.acme.test"]);
        assert_eq!(from(b, 11), ["p11.acme.test"]);
        // What was minted is served to everyone, the spent address included.
        assert_eq!(from(a, 0), ["p0.acme.test"]);
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_leaf() {
        let (_dir, r) = resolver(60);
        let leaf = r.mint("app.acme.test").unwrap();
        let mut leaves = r.leaves.lock().unwrap();
        for i in 0..MAX_CACHED {
            leaves.put(&format!("n{i}"), leaf.clone());
        }
        // n0 is the oldest put, but used since: n1 goes instead.
        assert!(leaves.get("n0").is_some());
        leaves.put("new", leaf);
        assert_eq!(leaves.by_name.len(), MAX_CACHED);
        assert!(leaves.get("n0").is_some() && leaves.get("new").is_some());
        assert!(leaves.get("n1").is_none());
    }
}
