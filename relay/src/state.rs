//! The state every task of a running relay shares: configuration and the policy in force,
//! the identity registry, connector routes, metrics, signing keys and limits. It holds
//! only types defined below it (identity, routing, hardening, ops), never the listeners
//! or the request pipeline that use it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use portcullis_shared::config::RelayConfig;
use portcullis_shared::pki::Ca;
use portcullis_shared::policy::PolicyRule;
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::store::Store;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedSender;

use crate::conn::Terminated;
use crate::hardening::conn_limit::{ConnLimit, Pending};
use crate::hardening::overload::Overload;
use crate::hardening::rate_limit::RateLimit;
use crate::hardening::refusal_log::RefusalLog;
use crate::identity::jwt::JwtSigner;
use crate::identity::registry::Registry;
use crate::ops::metrics::Metrics;
use crate::tunnel::Router;
use portcullis_shared::access_log::AccessLog;
use portcullis_shared::otlp::Spans;

/// Shared by every task of a running relay.
#[derive(Debug)]
pub(crate) struct State {
    /// The configuration the relay started with; the policy in it is only the first.
    pub(crate) config: RelayConfig,
    /// The policy in force: `config.policy` until relay.toml is reloaded.
    pub(crate) policy: RwLock<Arc<Vec<PolicyRule>>>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) router: Router,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) jwt: JwtSigner,
    pub(crate) access_log: Arc<AccessLog>,
    /// The span exporter (`[otlp]`), when configured.
    pub(crate) spans: Option<Arc<Spans>>,
    /// `alt-svc` advertising HTTP/3 on the QUIC port, added to HTTPS responses.
    pub(crate) alt_svc: Option<http::HeaderValue>,
    pub(crate) ca: Arc<Ca>,
    pub(crate) store: Arc<dyn Store>,
    /// Enrolment attempts per client address, and in all.
    pub(crate) enroll_limit: RateLimit,
    /// Renewal attempts per enrolled identity.
    pub(crate) renew_limit: RateLimit,
    /// Which refused enrolments and renewals get an audit row.
    pub(crate) refusal_log: RefusalLog,
    /// Open connections on the QUIC listener (`max_connections`, per address).
    pub(crate) quic_conns: Arc<ConnLimit>,
    /// Open connections on the HTTPS listener (`max_connections`, per address).
    pub(crate) https_conns: Arc<ConnLimit>,
    /// Connections without a certificate past their handshake, per listener
    /// (`max_unauthenticated_connections`, per address): strangers' own places.
    pub(crate) quic_strangers: Arc<ConnLimit>,
    pub(crate) https_strangers: Arc<ConnLimit>,
    /// QUIC handshakes in progress from unvalidated addresses (`quic_retry_threshold`).
    pub(crate) quic_pending: Pending,
    /// The overload level, set by the sampler.
    pub(crate) overload: Arc<Overload>,
    /// Serves HTTPS inside CONNECT tunnels whose TLS ends at the relay.
    pub(crate) terminator: UnboundedSender<Terminated>,
    pub(crate) device_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Tasks started on behalf of a request (tunnel connections, body readers, upgraded
    /// streams) run on its tracker, so the drain waits for them.
    pub(crate) shutdown: Shutdown,
    /// Every open client connection (HTTPS, and devices' HTTP/3) holds a token of this
    /// tracker. At shutdown the connector tunnels stay up until it is empty, so a request
    /// a client sent while its connection was winding down still reaches a connector.
    pub(crate) clients: tokio_util::task::TaskTracker,
}

impl State {
    /// The policy in force.
    pub(crate) fn policy(&self) -> Arc<Vec<PolicyRule>> {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads relay.toml again: a valid file's policy replaces the one in force (settings
    /// that need a restart are named in the log); an invalid file changes nothing.
    pub(crate) fn reload(&self, path: &Path) {
        match RelayConfig::load(path) {
            Ok(new) => {
                let restart = new.needs_restart(&self.config);
                if !restart.is_empty() {
                    tracing::warn!(
                        settings = %restart.join(", "),
                        "relay.toml changed settings that take effect only after a restart"
                    );
                }
                let mut policy = self.policy.write().unwrap_or_else(PoisonError::into_inner);
                if **policy != new.policy {
                    tracing::info!(rules = new.policy.len(), "policy reloaded");
                    self.audit(
                        "policy.reload",
                        format!("{} rules from {}", new.policy.len(), path.display()),
                    );
                    *policy = Arc::new(new.policy);
                }
                self.metrics.config_reload(true);
            }
            Err(e) => {
                self.metrics.config_reload(false);
                tracing::error!(error = %e, "keeping the running configuration");
                self.audit("policy.reload.refused", e.to_string());
            }
        }
    }

    /// Appends an event about this relay's configuration to the audit log, off the async
    /// threads (the store may be a network away); a failure is logged, never fatal.
    fn audit(&self, action: &'static str, detail: String) {
        let store = self.store.clone();
        let event = portcullis_shared::store::AuditEvent {
            at: crate::clock::now(),
            action: action.to_owned(),
            subject: format!("relay:{}", self.config.quic_listen),
            detail,
            actor: "relay".to_owned(),
        };
        let write = move || {
            if let Err(e) = store.audit(&event) {
                tracing::warn!(error = %e, "cannot write the audit log");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    /// The semaphore bounding one device's concurrent requests and tunnels.
    pub(crate) fn device_slots(&self, device: &str) -> Arc<Semaphore> {
        let mut slots = self.device_slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(device.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.limits.max_streams_per_device)))
            .clone()
    }
}
