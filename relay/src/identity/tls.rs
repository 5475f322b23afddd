//! TLS on the relay's listeners: which certificate to serve for which name, and the
//! rustls server configs (mTLS with role checks, no resumption, no 0-RTT).
//!
//! Published hostnames get a leaf minted from the org CA on first use and cached; an
//! operator's `tls_cert`/`tls_key` replace those and are reloaded when the files change.
//! The relay's own `server_name` always gets an org-CA leaf, since connectors trust only
//! the org CA.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use portcullis_shared::identity::{Hostname, Role};
use portcullis_shared::pki::{self, Ca, RoleVerifier};
use rustls::ServerConfig;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::clock::now;
use crate::identity::registry::Registry;

/// Lifetime of minted leaves; re-minted when less than a third remains.
const LEAF_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Cap on cached minted leaves (one per published name in use).
const MAX_CACHED: usize = 4096;

#[derive(Debug)]
struct StaticCert {
    cert: PathBuf,
    key: PathBuf,
    loaded: RwLock<Option<(SystemTime, Arc<CertifiedKey>)>>,
}

/// Picks the certificate for each handshake by SNI.
#[derive(Debug)]
pub(crate) struct CertResolver {
    ca: Arc<Ca>,
    server_name: Hostname,
    registry: Arc<Registry>,
    cache: Mutex<HashMap<String, (i64, Arc<CertifiedKey>)>>,
    static_cert: Option<StaticCert>,
}

fn certified_key(
    cert: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: &rustls_pki_types::PrivateKeyDer<'_>,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| anyhow::anyhow!("unsupported private key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(cert, signer)))
}

impl CertResolver {
    pub(crate) fn new(
        ca: Arc<Ca>,
        server_name: Hostname,
        registry: Arc<Registry>,
        static_files: Option<(PathBuf, PathBuf)>,
    ) -> anyhow::Result<Arc<Self>> {
        let resolver = Arc::new(Self {
            ca,
            server_name,
            registry,
            cache: Mutex::default(),
            static_cert: static_files.map(|(cert, key)| StaticCert {
                cert,
                key,
                loaded: RwLock::new(None),
            }),
        });
        // Fail at startup, not at the first handshake, if the operator's files are bad.
        resolver.reload_static()?;
        Ok(resolver)
    }

    /// Re-reads `tls_cert`/`tls_key` if the certificate file changed. Called at startup and
    /// periodically; a bad file keeps the previous certificate and logs why.
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
        ck.keys_match().map_err(|e| {
            anyhow::anyhow!("tls_key {} does not match tls_cert: {e}", s.key.display())
        })?;
        *s.loaded.write().unwrap_or_else(|p| p.into_inner()) = Some((mtime, ck));
        if current.is_some() {
            tracing::info!(path = %s.cert.display(), "reloaded tls_cert");
        }
        Ok(())
    }

    fn minted(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let now = now();
        if let Some((not_after, ck)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            && *not_after - now > (LEAF_TTL.as_secs() / 3) as i64
        {
            return Some(ck.clone());
        }
        // Signing happens outside the lock; two handshakes racing for a new name may both
        // mint, and the last one is kept.
        let issued = match self.ca.issue_server(&[name.to_owned()], LEAF_TTL) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "cannot mint a server certificate");
                return None;
            }
        };
        let key = issued.key?;
        let ck = certified_key(
            vec![issued.cert_der, self.ca.cert_der().clone()],
            &pki::pkcs8(key.der),
        )
        .inspect_err(|e| tracing::warn!(error = %e, "cannot load a minted certificate"))
        .ok()?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            // Names are bounded by the published patterns (see `certificate_name`), so this
            // only trims names deep under wildcards; drop the oldest.
            if let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(name.to_owned(), (issued.not_after, ck.clone()));
        Some(ck)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else {
            // No SNI (a client dialling an IP): present the relay's own name; requests for
            // published names then fail the SNI/Host check.
            return self.minted(self.server_name.as_str());
        };
        let host = Hostname::parse(sni).ok()?;
        if host == self.server_name {
            return self.minted(host.as_str());
        }
        let Some(cert_name) = self.registry.snapshot().certificate_name(&host) else {
            tracing::debug!(sni, "refusing TLS for an unknown name");
            return None;
        };
        if let Some(s) = &self.static_cert
            && let Some((_, ck)) = &*s.loaded.read().unwrap_or_else(|p| p.into_inner())
        {
            return Some(ck.clone());
        }
        self.minted(&cert_name)
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
    let verifier = RoleVerifier::new(ca.cert_der(), roles, registry.clone(), mandatory)?;
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
/// HTTP/2 and HTTP/1.1.
pub(crate) fn https_config(
    ca: &Ca,
    registry: &Arc<Registry>,
    resolver: Arc<CertResolver>,
) -> anyhow::Result<ServerConfig> {
    let mut cfg = base_config(
        ca,
        registry,
        resolver,
        &[Role::Device],
        false,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
