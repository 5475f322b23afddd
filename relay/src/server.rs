//! The relay daemon, in four steps: load its identity (CA, store, registry, TLS), bind
//! its listeners, serve until shutdown, then drain. Every task it starts runs on the
//! shutdown tracker, so the drain waits for all of them.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use std::sync::{Mutex, RwLock};

use anyhow::Context;
use portcullis_shared::admin_gate::{self, AdminGate, MAX_ADMIN_CONNECTIONS};
use portcullis_shared::config::RelayConfig;
use portcullis_shared::pki::Ca;
use portcullis_shared::proto::CloseCode;
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::store::Store;
use portcullis_shared::udp::BufferSizes;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_rustls::TlsAcceptor;

use crate::conn::Terminated;
use crate::hardening::conn_limit::ConnLimit;
use crate::hardening::overload::{Overload, Thresholds};
use crate::hardening::rate_limit::RateLimit;
use crate::identity::jwt::JwtSigner;
use crate::identity::registry::Registry;
use crate::identity::state_dir::{RunLock, StoreRecord};
use crate::identity::tls::{self, CertResolver};
use crate::listen::admin_http::{self, AdminState};
use crate::listen::{https, quic, terminate};
use crate::ops::metrics::{Listener, Metrics};
use crate::ops::sampler::{self, Sampled};
use crate::reload;
use crate::state::State;
use crate::tunnel::Router;
use portcullis_shared::access_log::AccessLog;
use portcullis_shared::otlp::Spans;

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

fn write_ready_file(path: &Path, bound: &Bound) -> anyhow::Result<()> {
    // A temporary file renamed into place: a reader never sees half of it.
    portcullis_shared::pki::write_public_file(path, &serde_json::to_vec(bound)?)
        .with_context(|| format!("writing {}", path.display()))
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
    // `shutdown` is the caller's (a signal, or a test); the listeners stop on `serving`,
    // triggered after `shutdown_delay`.
    let stop = shutdown;
    let shutdown = Shutdown::new();
    // Held until the relay exits: a second relay on this directory would overwrite the
    // first one's endpoint.json and fight over its files.
    let _lock = RunLock::acquire(&config.state_dir)?;
    let identity = Identity::load(&config, source)?;
    let listeners = Listeners::bind(&config, &identity).await?;
    let bound = listeners.bound()?;
    let endpoint = listeners.quic.clone();
    let (state, terminated) = build_state(config, &identity, bound, &shutdown)?;
    state.metrics.udp_buffers(listeners.udp_buffers);
    let admin = serve(&state, &identity, listeners, terminated, source, &shutdown)?;
    record_endpoint(&state, bound);
    on_ready(bound)?;
    admin.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        quic = %bound.quic_listen,
        https = %bound.https_listen,
        admin = ?bound.admin_listen,
        "relay up"
    );
    tokio::select! {
        () = stop.wait() => {}
        // Something inside stopped the relay (none does today), or it is being dropped.
        () = shutdown.wait() => {}
    }
    admin.ready.store(false, Ordering::Relaxed);
    let delay = state.config.shutdown_delay;
    if !delay.is_zero() {
        tracing::info!(
            ?delay,
            "not ready: serving on until load balancers have noticed"
        );
        tokio::time::sleep(delay).await;
    }
    shutdown.trigger();
    drain(&state, &shutdown, &endpoint).await;
    tracing::info!("relay stopped");
    Ok(())
}

/// What identifies the relay and its clients: the CA, the store and registry, and the
/// TLS configurations built from them.
struct Identity {
    ca: Arc<Ca>,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    resolver: Arc<CertResolver>,
}

impl Identity {
    fn load(config: &RelayConfig, source: Option<&Path>) -> anyhow::Result<Self> {
        let ca = Arc::new(Ca::load(&config.state_dir)?);
        // Connectors would refuse the relay's own certificate.
        ca.check_server_name(config.server_name.as_str())
            .context("server_name")?;
        let store = crate::identity::store::open(&config.state_dir, config.store.url.as_deref())?;
        tracing::info!(store = %store.describe(), "store opened");
        // Admin commands given only the state directory find this store from here.
        StoreRecord::new(config.store.url.as_deref(), source)
            .write(&config.state_dir)
            .with_context(|| format!("recording the store in {}", config.state_dir.display()))?;
        let registry = Registry::load(&*store)?;
        let static_files = config.tls_cert.clone().zip(config.tls_key.clone());
        let resolver = CertResolver::new(
            ca.clone(),
            config.server_name.clone(),
            registry.clone(),
            static_files,
            config.tls.leaves_per_minute,
        )?;
        Ok(Self {
            ca,
            store,
            registry,
            resolver,
        })
    }
}

/// The bound sockets, before anything is served on them.
struct Listeners {
    https: TcpListener,
    quic: quinn::Endpoint,
    admin: Option<TcpListener>,
    /// What the QUIC socket's buffers obtained, for the metrics.
    udp_buffers: BufferSizes,
}

impl Listeners {
    async fn bind(config: &RelayConfig, id: &Identity) -> anyhow::Result<Self> {
        let https = TcpListener::bind(config.https_listen)
            .await
            .with_context(|| {
                format!(
                    "binding HTTPS on {}: is the port in use?",
                    config.https_listen
                )
            })?;
        let quic_tls = tls::quic_config(&id.ca, &id.registry, id.resolver.clone())?;
        let (quic, udp_buffers) = quic::bind(config, quic_tls)?;
        let admin = match config.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding admin on {addr}: is the port in use?"))?,
            ),
            None => None,
        };
        Ok(Self {
            https,
            quic,
            admin,
            udp_buffers,
        })
    }

    fn bound(&self) -> anyhow::Result<Bound> {
        Ok(Bound {
            quic_listen: self.quic.local_addr()?,
            https_listen: self.https.local_addr()?,
            admin_listen: self
                .admin
                .as_ref()
                .map(TcpListener::local_addr)
                .transpose()?,
        })
    }
}

fn build_state(
    config: RelayConfig,
    id: &Identity,
    bound: Bound,
    shutdown: &Shutdown,
) -> anyhow::Result<(Arc<State>, UnboundedReceiver<Terminated>)> {
    let path = config.access_log_path();
    let access_log = Arc::new(
        AccessLog::open(&path)
            .with_context(|| format!("opening the access log {}", path.display()))?,
    );
    tokio::spawn(access_log.clone().reopen_on_sigusr2(shutdown.clone()));
    let spans = match &config.otlp {
        Some(otlp) => Some(Arc::new(Spans::start(otlp, "portcullis-relay")?)),
        None => None,
    };
    let jwt = JwtSigner::load_or_create(
        &config.state_dir,
        format!("https://{}", config.server_name),
        config.jwt_prepublish,
    )?;
    let (terminator, terminated) = tokio::sync::mpsc::unbounded_channel();
    let limits = &config.limits;
    let metrics = Arc::new(Metrics::default());
    // Per listener: every connection from its arrival, and strangers past their handshake.
    let caps = |l: Listener, max: usize, gauges: &[Arc<AtomicI64>; 2]| {
        ConnLimit::new(
            max,
            limits.max_connections_per_address,
            gauges[l as usize].clone(),
        )
    };
    let (all, strangers) = (
        &metrics.open_connections,
        &metrics.unauthenticated_connections,
    );
    let quic_conns = caps(Listener::Quic, limits.max_connections, all);
    let https_conns = caps(Listener::Https, limits.max_connections, all);
    let quic_strangers = caps(
        Listener::Quic,
        limits.max_unauthenticated_connections,
        strangers,
    );
    let https_strangers = caps(
        Listener::Https,
        limits.max_unauthenticated_connections,
        strangers,
    );
    let overload = Arc::new(Overload::new(Thresholds {
        memory: limits.overload_memory,
        connections: limits.overload_connections,
    }));
    let state = Arc::new(State {
        policy: RwLock::new(Arc::new(config.policy.clone())),
        config,
        registry: id.registry.clone(),
        router: Router::default(),
        metrics,
        jwt,
        access_log,
        spans,
        alt_svc: http::HeaderValue::from_str(&format!(
            "h3=\":{}\"; ma=86400",
            bound.quic_listen.port()
        ))
        .ok(),
        device_slots: Mutex::default(),
        ca: id.ca.clone(),
        store: id.store.clone(),
        enroll_limit: RateLimit::default(),
        renew_limit: RateLimit::default(),
        refusal_log: Default::default(),
        quic_conns,
        https_conns,
        quic_strangers,
        https_strangers,
        quic_pending: Default::default(),
        overload,
        terminator,
        shutdown: shutdown.clone(),
        clients: tokio_util::task::TaskTracker::new(),
    });
    Ok((state, terminated))
}

/// Starts every task of the running relay on the shutdown tracker: the listeners' accept
/// loops, the TLS terminator, the registry and configuration watchers, the overload
/// sampler.
fn serve(
    state: &Arc<State>,
    id: &Identity,
    listeners: Listeners,
    terminated: UnboundedReceiver<Terminated>,
    source: Option<&Path>,
    shutdown: &Shutdown,
) -> anyhow::Result<Arc<AdminState>> {
    let tasks = shutdown.tracker();
    let sampled = Sampled {
        overload: state.overload.clone(),
        quic: state.quic_conns.clone(),
        https: state.https_conns.clone(),
        metrics: state.metrics.clone(),
    };
    tasks.spawn(sampler::run(
        sampled,
        shutdown.token().clone().cancelled_owned(),
    ));
    let inner_tls = TlsAcceptor::from(Arc::new(tls::inner_config(id.resolver.clone())?));
    tasks.spawn(terminate::terminator(
        terminated,
        inner_tls,
        Arc::downgrade(state),
        shutdown.clone(),
    ));
    tasks.spawn(id.registry.clone().watch(
        id.store.clone(),
        state.config.store.fail_closed_after,
        shutdown.clone(),
    ));
    tasks.spawn(reload::watch_tls_files(
        id.resolver.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(tls::premint(id.resolver.clone(), shutdown.clone()));
    tasks.spawn(reload::watch_jwt_keys(state.clone(), shutdown.clone()));
    tasks.spawn(crate::ops::retention::prune_audit(
        id.store.clone(),
        state.config.audit_retention,
        shutdown.clone(),
    ));
    if let Some(path) = source {
        tasks.spawn(reload::watch_config(
            path.to_owned(),
            state.clone(),
            shutdown.clone(),
        ));
    }
    let admin = Arc::new(AdminState {
        ready: false.into(),
        exposition: admin_http::exposition(
            state,
            &id.registry,
            &id.resolver,
            state.config.admin.metrics_device_ids,
        ),
        gate: AdminGate::new(
            admin_token(&state.config)?,
            state.config.admin.probes_without_token,
            MAX_ADMIN_CONNECTIONS,
        ),
    });
    if let Some(listener) = listeners.admin {
        tasks.spawn(admin_gate::serve(listener, admin.clone(), shutdown.clone()));
    }
    let https_tls = tls::https_config(
        &id.ca,
        &id.registry,
        id.resolver.clone(),
        state.config.tls.min_version,
    )?;
    tasks.spawn(https::accept_loop(
        listeners.https,
        TlsAcceptor::from(Arc::new(https_tls)),
        state.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(quic::accept_loop(
        listeners.quic,
        state.clone(),
        shutdown.clone(),
    ));
    Ok(admin)
}

/// The admin listener's bearer token, from `[admin] token_file`.
fn admin_token(config: &RelayConfig) -> anyhow::Result<Option<String>> {
    config
        .admin
        .token_file
        .as_deref()
        .map(admin_gate::read_token)
        .transpose()
        .map_err(Into::into)
}

/// Where tokens should send devices and connectors, unless an admin says otherwise.
fn record_endpoint(state: &State, bound: Bound) {
    let public_endpoint = serde_json::json!({
        "relay": format!("{}:{}", state.config.server_name, bound.quic_listen.port()),
        "server_name": state.config.server_name.to_string(),
        "tcp_port": bound.https_listen.port(),
    });
    if let Err(e) = portcullis_shared::pki::write_public_file(
        &state.config.state_dir.join(ENDPOINT_FILE),
        public_endpoint.to_string().as_bytes(),
    ) {
        tracing::warn!(error = %e, "cannot record the relay's endpoint for tokens");
    }
}

/// After shutdown fired: the accept loops have stopped; in-flight requests get
/// `drain_grace`, then connector tunnels are closed and QUIC is given a moment to send
/// the closes.
async fn drain(state: &State, shutdown: &Shutdown, endpoint: &quinn::Endpoint) {
    // Connector tunnels close once every client connection has ended (see `clients`).
    state.clients.close();
    let grace = state.config.drain_grace;
    if !shutdown.drain(grace).await {
        tracing::warn!(?grace, "drain grace expired with requests in flight");
    }
    state.router.close_all(CloseCode::Shutdown);
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    if let Some(spans) = state.spans.clone() {
        let _ = tokio::task::spawn_blocking(move || spans.shutdown(Duration::from_secs(5))).await;
    }
}
