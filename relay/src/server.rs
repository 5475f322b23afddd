//! The relay daemon: binds its listeners, serves until shutdown, then drains.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use portcullis_shared::config::RelayConfig;
use portcullis_shared::pki::Ca;
use portcullis_shared::policy::PolicyRule;
use portcullis_shared::proto::CloseCode;
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::store::{STORE_FILE, SqliteStore, Store};
use quinn::crypto::rustls::QuicServerConfig;
use tokio::net::TcpListener;

use crate::access_log::AccessLog;
use crate::http_admin::{self, AdminState};
use crate::https;
use crate::jwt::JwtSigner;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::tls::{self, CertResolver};
use crate::tunnel::{self, Router};

/// Shared by every task of a running relay.
#[derive(Debug)]
pub(crate) struct State {
    /// The configuration the relay started with; the policy in it is only the first.
    pub(crate) config: RelayConfig,
    /// The policy in force: `config.policy` until relay.toml is reloaded.
    policy: std::sync::RwLock<Arc<Vec<PolicyRule>>>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) router: Router,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) jwt: JwtSigner,
    pub(crate) access_log: AccessLog,
    /// `alt-svc` advertising HTTP/3 on the QUIC port, added to HTTPS responses.
    pub(crate) alt_svc: Option<http::HeaderValue>,
    pub(crate) ca: Arc<Ca>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) enroll_limit: crate::enroll::RateLimit,
    /// Serves HTTPS inside CONNECT tunnels whose TLS ends at the relay.
    pub(crate) terminator: tokio::sync::mpsc::UnboundedSender<https::Terminated>,
    device_slots: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl State {
    /// The policy in force.
    pub(crate) fn policy(&self) -> Arc<Vec<PolicyRule>> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads relay.toml again: a valid file's policy replaces the one in force (settings
    /// that need a restart are named in the log); an invalid file changes nothing.
    fn reload(&self, path: &Path) {
        match RelayConfig::load(path) {
            Ok(new) => {
                let restart = new.needs_restart(&self.config);
                if !restart.is_empty() {
                    tracing::warn!(
                        settings = %restart.join(", "),
                        "relay.toml changed settings that take effect only after a restart"
                    );
                }
                let mut policy = self
                    .policy
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if **policy != new.policy {
                    tracing::info!(rules = new.policy.len(), "policy reloaded");
                    *policy = Arc::new(new.policy);
                }
                self.metrics.config_reloads.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics
                    .config_reload_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "keeping the running configuration");
            }
        }
    }

    /// The semaphore bounding one device's concurrent requests and tunnels.
    pub(crate) fn device_slots(&self, device: &str) -> Arc<tokio::sync::Semaphore> {
        let mut slots = self.device_slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(device.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(
                    self.config.limits.max_streams_per_device,
                ))
            })
            .clone()
    }
}

/// File in the state directory naming the relay's public QUIC endpoint, written at start
/// and read by `token create` as its default `--relay`.
pub const ENDPOINT_FILE: &str = "endpoint.json";

/// Addresses the relay bound, as written to the ready file.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Bound {
    /// UDP, QUIC.
    pub quic_listen: SocketAddr,
    /// TCP, HTTPS.
    pub https_listen: SocketAddr,
    /// TCP, admin HTTP.
    pub admin_listen: Option<SocketAddr>,
}

/// Loads the config file and runs until SIGTERM or SIGINT.
pub async fn run_from_file(config_path: &Path, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let config = RelayConfig::load(config_path)?;
    let shutdown = Shutdown::new();
    shutdown
        .trigger_on_signals()
        .context("installing signal handlers")?;
    run(config, Some(config_path), shutdown, |bound| {
        if let Some(path) = ready_file {
            write_ready_file(path, &bound)?;
        }
        Ok(())
    })
    .await
}

/// Reloads relay.toml on SIGHUP, and when its modification time changes (checked every
/// 2 s, so an edited or re-mounted file is picked up without a signal).
async fn watch_config(path: std::path::PathBuf, state: Arc<State>, shutdown: Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = mtime(&path);
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; relay.toml is still reloaded when it changes");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hangup => {
                tracing::info!(path = %path.display(), "SIGHUP: reloading relay.toml");
                seen = mtime(&path);
                state.reload(&path);
            }
            _ = tick.tick() => {
                let now = mtime(&path);
                if now.is_some() && now != seen {
                    seen = now;
                    tracing::info!(path = %path.display(), "relay.toml changed: reloading");
                    state.reload(&path);
                }
            }
            () = shutdown.wait() => return,
        }
    }
}

fn write_ready_file(path: &Path, bound: &Bound) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(bound)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The QUIC endpoint config, with the stateless-reset key kept in the state directory.
/// A restarted relay then answers connectors' packets for connections it no longer has
/// with a valid stateless reset, so they reconnect at once instead of waiting for their
/// idle timeout.
fn endpoint_config(state_dir: &Path) -> anyhow::Result<quinn::EndpointConfig> {
    let path = state_dir.join("quic-reset.key");
    let secret = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => bytes,
        _ => {
            let mut bytes = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| anyhow::anyhow!("no randomness for the QUIC reset key"))?;
            portcullis_shared::pki::write_private_file(&path, &bytes)?;
            bytes
        }
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    // Connection IDs must also validate across restarts, or the new process drops the
    // connectors' packets as garbage instead of resetting them.
    let tag = ring::hmac::sign(&key, b"portcullis connection-id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

fn transport(
    limits: &portcullis_shared::config::LimitsConfig,
) -> anyhow::Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(limits.idle_timeout)?));
    // PINGs keep a busy connection up (a request waiting on a slow origin sends nothing);
    // an idle one is closed by its listener (see crate::idle), not by QUIC.
    t.keep_alive_interval(Some(limits.idle_timeout / 3));
    // Devices open one bidirectional stream per HTTP/3 request (connectors open only their
    // control stream); HTTP/3 needs three unidirectional control streams per side.
    t.max_concurrent_bidi_streams(limits.max_concurrent_streams.into());
    t.max_concurrent_uni_streams(8u32.into());
    // Explicit windows: quinn's default connection window is effectively unbounded.
    t.stream_receive_window(limits.quic_stream_window.into());
    t.receive_window(limits.quic_connection_window.into());
    t.send_window(u64::from(limits.quic_connection_window));
    Ok(t)
}

/// Runs the relay with `config` until `shutdown` fires, then drains: stops accepting,
/// lets in-flight requests finish within `drain_grace`, closes connector tunnels.
/// `on_ready` is called once every listener is bound. With `source` (the file `config`
/// came from), the policy is reloaded on SIGHUP and whenever the file changes.
pub async fn run(
    config: RelayConfig,
    source: Option<&Path>,
    shutdown: Shutdown,
    on_ready: impl FnOnce(Bound) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let ca = Arc::new(Ca::load(&config.state_dir)?);
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.state_dir.join(STORE_FILE))
            .with_context(|| format!("opening the store in {}", config.state_dir.display()))?,
    );
    let registry = Registry::load(&*store)?;
    let static_files = config.tls_cert.clone().zip(config.tls_key.clone());
    let resolver = CertResolver::new(
        ca.clone(),
        config.server_name.clone(),
        registry.clone(),
        static_files,
    )?;
    let https_tls = tls::https_config(&ca, &registry, resolver.clone())?;
    let quic_tls = tls::quic_config(&ca, &registry, resolver.clone())?;

    let https_listener = TcpListener::bind(config.https_listen)
        .await
        .with_context(|| {
            format!(
                "binding HTTPS on {}: is the port in use?",
                config.https_listen
            )
        })?;
    let mut quic_server = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(quic_tls).context("QUIC TLS config")?,
    ));
    quic_server.transport_config(Arc::new(transport(&config.limits)?));
    let socket = std::net::UdpSocket::bind(config.quic_listen).with_context(|| {
        format!(
            "binding QUIC on {}: is the port in use?",
            config.quic_listen
        )
    })?;
    let endpoint = quinn::Endpoint::new(
        endpoint_config(&config.state_dir)?,
        Some(quic_server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("starting QUIC on {}", config.quic_listen))?;
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin on {addr}: is the port in use?"))?,
        ),
        None => None,
    };
    let bound = Bound {
        quic_listen: endpoint.local_addr()?,
        https_listen: https_listener.local_addr()?,
        admin_listen: admin_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?,
    };

    let access_log = AccessLog::open(&config.access_log_path())?;
    let jwt =
        JwtSigner::load_or_create(&config.state_dir, format!("https://{}", config.server_name))?;
    let metrics = Arc::new(Metrics::default());
    let grace = config.drain_grace;
    let (terminator_tx, terminator_rx) = tokio::sync::mpsc::unbounded_channel();
    let inner_tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls::inner_config(resolver.clone())?));
    let state = Arc::new(State {
        policy: std::sync::RwLock::new(Arc::new(config.policy.clone())),
        config,
        registry: registry.clone(),
        router: Router::default(),
        metrics: metrics.clone(),
        jwt,
        access_log,
        alt_svc: http::HeaderValue::from_str(&format!(
            "h3=\":{}\"; ma=86400",
            bound.quic_listen.port()
        ))
        .ok(),
        device_slots: std::sync::Mutex::default(),
        ca: ca.clone(),
        store: store.clone(),
        enroll_limit: crate::enroll::RateLimit::default(),
        terminator: terminator_tx,
    });

    tokio::spawn(https::terminator(
        terminator_rx,
        inner_tls,
        Arc::downgrade(&state),
    ));
    tokio::spawn(registry.clone().watch(store.clone(), shutdown.clone()));
    {
        let resolver = resolver.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = resolver.reload_static() {
                            tracing::warn!(error = %format!("{e:#}"), "keeping the previous tls_cert");
                        }
                    }
                    () = shutdown.wait() => return,
                }
            }
        });
    }
    if let Some(path) = source {
        tokio::spawn(watch_config(
            path.to_owned(),
            state.clone(),
            shutdown.clone(),
        ));
    }
    let admin = Arc::new(AdminState {
        ready: false.into(),
        metrics,
        registry,
    });
    if let Some(listener) = admin_listener {
        tokio::spawn(http_admin::serve(listener, admin.clone(), shutdown.clone()));
    }
    let https_task = tokio::spawn(https::accept_loop(
        https_listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(https_tls)),
        state.clone(),
        shutdown.clone(),
    ));
    let quic_task = tokio::spawn(tunnel::accept_loop(
        endpoint.clone(),
        state.clone(),
        shutdown.clone(),
    ));

    // Where tokens should send devices and connectors, unless an admin says otherwise.
    let public_endpoint = serde_json::json!({
        "relay": format!("{}:{}", state.config.server_name, bound.quic_listen.port()),
        "server_name": state.config.server_name.to_string(),
    });
    if let Err(e) = std::fs::write(
        state.config.state_dir.join(ENDPOINT_FILE),
        public_endpoint.to_string(),
    ) {
        tracing::warn!(error = %e, "cannot record the relay's endpoint for tokens");
    }
    on_ready(bound)?;
    admin.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        quic = %bound.quic_listen,
        https = %bound.https_listen,
        admin = ?bound.admin_listen,
        "relay up"
    );

    shutdown.wait().await;
    admin.ready.store(false, Ordering::Relaxed);
    let _ = https_task.await;
    let _ = quic_task.await;
    if !shutdown.drain(grace).await {
        tracing::warn!(?grace, "drain grace expired with requests in flight");
    }
    state.router.close_all(CloseCode::Shutdown);
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!("relay stopped");
    Ok(())
}
