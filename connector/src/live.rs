//! What changes while the connector runs: its ingress rules, reloaded from connector.toml
//! on SIGHUP or when the file changes, and its credentials, renewed (see `renew`) or
//! replaced on disk. A reload is all or nothing: a file that does not parse or hold
//! together, or credentials that do not load, are refused with one log line and the running
//! state is kept. Streams already open finish with the rules they started with; when the
//! published hostnames or the credentials change, every tunnel is replaced make-before-break
//! (a new connection registers, then the old one drains).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use portcullis_shared::access_log::AccessLog;
use portcullis_shared::config::ConnectorConfig;
use portcullis_shared::otlp::Spans;
use portcullis_shared::pki;
use portcullis_shared::shutdown::{Hangups, Shutdown};
use tokio::sync::watch;

use crate::dial::Dialer;
use crate::ops::metrics::Metrics;
use crate::origin::health::Checkers;
use crate::origin::{Origins, Reports};

/// How often the configuration and credential files are looked at for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The state a reload swaps as a whole.
pub(crate) struct Current {
    pub(crate) config: ConnectorConfig,
    pub(crate) origins: Arc<Origins>,
    pub(crate) dialer: Dialer,
    /// The CA, certificate and key files' bytes the dialer was built from.
    credentials: Vec<Vec<u8>>,
}

impl Current {
    fn build(
        config: ConnectorConfig,
        metrics: &Arc<Metrics>,
        reports: &Reports,
    ) -> anyhow::Result<Self> {
        let origins = Arc::new(Origins::new(&config, metrics.clone(), reports.clone())?);
        let dialer = Dialer::new(&config)?;
        let credentials = read_credentials(&config)?;
        Ok(Self {
            config,
            origins,
            dialer,
            credentials,
        })
    }

    /// The hostnames the tunnels register.
    pub(crate) fn hostnames(&self) -> Vec<String> {
        self.config
            .ingress
            .iter()
            .map(|r| r.hostname.to_string())
            .collect()
    }
}

fn read_credentials(config: &ConnectorConfig) -> anyhow::Result<Vec<Vec<u8>>> {
    [&config.ca, &config.cert, &config.key]
        .into_iter()
        .map(|p| std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display())))
        .collect()
}

/// Why a reload happens, for the log.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reason {
    Signal,
    FileChanged,
    Renewed,
}

/// The connector's changeable state, shared by the tunnels, the reloader and the renewer.
pub(crate) struct Live {
    /// connector.toml, when the connector was started from a file.
    path: Option<PathBuf>,
    current: RwLock<Arc<Current>>,
    /// Bumped when the tunnels must be replaced.
    replace: watch::Sender<u64>,
    health: Checkers,
    pub(crate) metrics: Arc<Metrics>,
    /// The access log and the span exporter, set up once at start (`access_log` and
    /// `otlp` changes need a restart).
    pub(crate) reports: Reports,
    /// The files' stamps at the last reload (see [`Live::stamps`]).
    seen: std::sync::Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl Live {
    /// The state built from `config` (read from `path`, if given).
    pub(crate) fn new(
        path: Option<PathBuf>,
        config: ConnectorConfig,
        metrics: Arc<Metrics>,
        health: Checkers,
    ) -> anyhow::Result<Self> {
        let access = match &config.access_log {
            Some(p) => Some(Arc::new(AccessLog::open(p).map_err(|e| {
                anyhow::anyhow!("cannot open the access log {}: {e}", p.display())
            })?)),
            None => None,
        };
        let spans = match &config.otlp {
            Some(otlp) => Some(Arc::new(Spans::start(otlp, "portcullis-connector")?)),
            None => None,
        };
        let reports = Reports { access, spans };
        let current = Current::build(config, &metrics, &reports)?;
        health.update(&current.config)?;
        let live = Self {
            path,
            current: RwLock::new(Arc::new(current)),
            replace: watch::channel(0).0,
            health,
            metrics,
            reports,
            seen: std::sync::Mutex::default(),
        };
        live.note_expiry();
        Ok(live)
    }

    /// The state in force.
    pub(crate) fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Follows the changes that need new tunnel connections.
    pub(crate) fn replacements(&self) -> watch::Receiver<u64> {
        self.replace.subscribe()
    }

    /// Reads the configuration and credentials again and applies them, or refuses them
    /// and keeps the running state. Returns whether they were applied.
    pub(crate) fn reload(&self, reason: Reason) -> bool {
        // What is read now is what the watcher compares against, whoever reloads (a
        // renewal writing the certificate, SIGHUP, the watcher): a change is read once.
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = self.stamps();
        let old = self.current();
        let what = self
            .path
            .as_deref()
            .map_or_else(|| "the credentials".to_owned(), |p| p.display().to_string());
        let loaded = match &self.path {
            Some(path) => ConnectorConfig::load(path).map_err(anyhow::Error::from),
            None => Ok(old.config.clone()),
        };
        let new = loaded.and_then(|config| {
            let new = Current::build(config, &self.metrics, &self.reports)?;
            self.health.update(&new.config)?;
            Ok(new)
        });
        let new = match new {
            Ok(new) => new,
            Err(e) => {
                self.metrics.reload(false);
                tracing::error!(
                    file = %what,
                    ?reason,
                    error = %format!("{e:#}"),
                    "reload refused: fix the file and save it again (or send SIGHUP); the connector keeps running with its previous rules and certificate"
                );
                return false;
            }
        };
        warn_restart_only(&old.config, &new.config);
        let hostnames = new.hostnames() != old.hostnames();
        let credentials = new.credentials != old.credentials;
        let rules = new.config.ingress.len();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        self.note_expiry();
        self.metrics.reload(true);
        tracing::info!(file = %what, ?reason, rules, hostnames_changed = hostnames, credentials_changed = credentials, "reloaded");
        if hostnames || credentials {
            self.replace.send_modify(|n| *n += 1);
        }
        true
    }

    fn note_expiry(&self) {
        let current = self.current();
        if let Some(info) = leaf(&current.config.cert) {
            self.metrics
                .cert_not_after
                .store(info.not_after, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Reloads on SIGHUP and when connector.toml or a credential file changes, until
    /// `shutdown`.
    pub(crate) async fn watch(self: Arc<Self>, shutdown: Shutdown) {
        let mut hup = Hangups::new("connector.toml");
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = self.stamps();
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    self.reload(Reason::Signal);
                }
                _ = tick.tick() => {
                    let now = self.stamps();
                    if now != *self.seen.lock().unwrap_or_else(|p| p.into_inner()) {
                        self.reload(Reason::FileChanged);
                    }
                }
                () = shutdown.wait() => return,
            }
        }
    }

    /// The modification times and sizes of connector.toml and the credential files: a
    /// change to any of them (an edit, a re-mounted ConfigMap or Secret, a certificate
    /// replaced by hand) triggers a reload.
    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        let current = self.current();
        let c = &current.config;
        self.path
            .iter()
            .map(PathBuf::as_path)
            .chain([c.ca.as_path(), c.cert.as_path(), c.key.as_path()])
            .map(stamp)
            .collect()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The first certificate of the PEM file at `path`, inspected.
pub(crate) fn leaf(path: &Path) -> Option<pki::CertInfo> {
    let certs = pki::load_certs(path).ok()?;
    pki::inspect(certs.first()?).ok()
}

/// Warns about changed keys a reload does not apply.
fn warn_restart_only(old: &ConnectorConfig, new: &ConnectorConfig) {
    let admin = |c: &ConnectorConfig| {
        (
            c.admin_listen,
            c.admin_allow_remote,
            c.admin_token_file.clone(),
            c.admin_probes_without_token,
        )
    };
    let changed: Vec<&str> = [
        ("relay", old.relay != new.relay),
        ("relay_tcp_port", old.relay_tcp_port != new.relay_tcp_port),
        (
            "relay_resolve_interval",
            old.relay_resolve_interval != new.relay_resolve_interval,
        ),
        ("server_name", old.server_name != new.server_name),
        ("status_file", old.status_file != new.status_file),
        (
            "quic_congestion",
            old.quic_congestion != new.quic_congestion,
        ),
        ("drain_grace", old.drain_grace != new.drain_grace),
        ("access_log", old.access_log != new.access_log),
        ("otlp", old.otlp != new.otlp),
        ("admin_listen", admin(old) != admin(new)),
    ]
    .into_iter()
    .filter_map(|(key, differs)| differs.then_some(key))
    .collect();
    if !changed.is_empty() {
        tracing::warn!(
            keys = ?changed,
            "these keys changed but take effect only at the next restart; the ingress rules and credentials were reloaded"
        );
    }
}
