//! Tunnels to every relay: the configured relays are resolved (names again every
//! `relay_resolve_interval`), each address gets a tunnel of its own that reconnects on its
//! own, an address that leaves a name has its tunnel drained and closed, and the state of
//! every tunnel is logged and written to the status file (`portcullis-connector status`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use portcullis_shared::config::{ConnectorConfig, RelayTarget};
use portcullis_shared::shutdown::Shutdown;
use serde::{Deserialize, Serialize};

use crate::live::Live;
use crate::tunnel;

/// The state of one tunnel, as the status file shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum TunnelState {
    /// Dialling.
    Connecting,
    /// Registered: the relay routes requests here.
    Up {
        /// The hostnames the relay accepted.
        published: Vec<String>,
        /// Unix seconds.
        since: i64,
        /// `quic`, or `tcp` where UDP to the relay is blocked.
        #[serde(default)]
        transport: String,
    },
    /// Lost or refused; a retry follows.
    Down {
        /// Why, for a person.
        error: String,
        /// Unix seconds.
        since: i64,
    },
    /// Draining before it closes (shutdown, or the address left the relay's name).
    Draining,
}

/// One tunnel in the status file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// The relay as configured (`host:port`).
    pub relay: String,
    /// The address dialled.
    pub address: SocketAddr,
    /// Its state.
    #[serde(flatten)]
    pub state: TunnelState,
}

/// Every tunnel's state, written to `path` (atomically) on each change.
#[derive(Debug)]
pub(crate) struct Status {
    path: Option<PathBuf>,
    /// The process's shutdown: once triggered, the status is closed at the next change.
    shutdown: Shutdown,
    /// The tunnels, or `None` once the connector is shutting down: the file is then
    /// removed and never written again, so nothing appears in its directory after the
    /// signal (a script may be removing it) and no stale file outlives the process.
    tunnels: Mutex<Option<BTreeMap<SocketAddr, TunnelStatus>>>,
}

impl Status {
    pub(crate) fn new(path: Option<PathBuf>, shutdown: Shutdown) -> Self {
        Self {
            path,
            shutdown,
            tunnels: Mutex::new(Some(BTreeMap::new())),
        }
    }

    /// Removes the status file for good (the connector is shutting down).
    pub(crate) fn close(&self) {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        *tunnels = None;
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Records `address`'s state and rewrites the status file.
    pub(crate) fn set(&self, relay: &RelayTarget, address: SocketAddr, state: TunnelState) {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tunnels) = tunnels.as_mut() else {
            return;
        };
        tunnels.insert(
            address,
            TunnelStatus {
                relay: relay.to_string(),
                address,
                state,
            },
        );
        self.write(tunnels);
    }

    /// Every tunnel's state now (none once shutting down).
    pub(crate) fn tunnels(&self) -> Vec<TunnelStatus> {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        tunnels
            .as_ref()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets `address` (its tunnel has ended for good).
    pub(crate) fn remove(&self, address: SocketAddr) {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tunnels) = tunnels.as_mut() else {
            return;
        };
        tunnels.remove(&address);
        self.write(tunnels);
    }

    fn write(&self, tunnels: &BTreeMap<SocketAddr, TunnelStatus>) {
        let Some(path) = &self.path else { return };
        if self.shutdown.is_triggered() {
            let _ = std::fs::remove_file(path);
            return;
        }
        let list: Vec<_> = tunnels.values().collect();
        let body = serde_json::json!({ "tunnels": list }).to_string();
        if let Err(e) = portcullis_shared::pki::write_public_file(path, body.as_bytes()) {
            tracing::debug!(path = %path.display(), error = %e, "cannot write the status file");
        }
    }
}

/// Reads the status file a running connector writes.
pub(crate) fn read_status(path: &Path) -> anyhow::Result<Vec<TunnelStatus>> {
    #[derive(Deserialize)]
    struct File {
        tunnels: Vec<TunnelStatus>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {}: {e}; is the connector running with this config?",
            path.display()
        )
    })?;
    Ok(serde_json::from_str::<File>(&text)?.tunnels)
}

/// Keeps a tunnel to every relay address until shutdown; returns once every tunnel has
/// drained and closed.
pub(crate) async fn run(
    config: ConnectorConfig,
    live: Arc<Live>,
    shutdown: Shutdown,
    status: Arc<Status>,
    withdrawn: crate::health::Withdrawn,
) -> anyhow::Result<()> {
    let targets = config
        .relays()
        .ok_or_else(|| anyhow::anyhow!("relay is not host:port"))?;
    let names = targets.iter().any(|t| t.host.parse::<IpAddr>().is_err());
    let mut known: HashMap<RelayTarget, Vec<SocketAddr>> = HashMap::new();
    let mut tunnels: HashMap<SocketAddr, Tunnel> = HashMap::new();
    let mut tick = tokio::time::interval(config.relay_resolve_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Until every name has resolved once, retry sooner than the interval.
    let mut backoff = tunnel::Backoff::default();
    loop {
        let mut all_resolved = true;
        // A resolver built afresh each round reads the system's configuration and hosts
        // file again, so changes to either are followed too.
        let resolver = if names {
            match hickory_resolver::TokioResolver::builder_tokio().and_then(|b| b.build()) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the system's DNS configuration");
                    None
                }
            }
        } else {
            None
        };
        for target in &targets {
            match resolve(resolver.as_ref(), target).await {
                Ok(addrs) => {
                    let before = known.insert(target.clone(), addrs.clone());
                    if before.as_ref() != Some(&addrs) {
                        tracing::info!(relay = %target, addresses = ?addrs, "resolved the relay");
                    }
                }
                // A failed lookup keeps the addresses the name had: DNS trouble alone
                // never takes a working tunnel down.
                Err(e) => {
                    all_resolved &= known.contains_key(target);
                    tracing::warn!(relay = %target, error = %e, "cannot resolve the relay; retrying");
                }
            }
        }
        let wanted: HashMap<SocketAddr, &RelayTarget> = known
            .iter()
            .flat_map(|(t, addrs)| addrs.iter().map(move |a| (*a, t)))
            .collect();
        tunnels.retain(|addr, t| {
            let keep = wanted.contains_key(addr);
            if !keep {
                tracing::info!(relay = %t.relay, address = %addr, "the address left the relay's name: draining its tunnel");
                t.stop.trigger();
            }
            keep
        });
        for (addr, target) in &wanted {
            if tunnels.contains_key(addr) {
                continue;
            }
            let stop = shutdown.child();
            let endpoint = tunnel::endpoint_for(*addr)?;
            let task = tokio::spawn(tunnel::supervise(
                tunnel::TunnelContext {
                    endpoint,
                    config: config.clone(),
                    live: live.clone(),
                    shutdown: stop.clone(),
                },
                tunnel::Tunnel::new((*target).clone(), *addr, status.clone(), withdrawn.clone()),
            ));
            tunnels.insert(
                *addr,
                Tunnel {
                    relay: (*target).clone(),
                    stop,
                    task,
                },
            );
        }
        let wait = if all_resolved {
            backoff.reset();
            None
        } else {
            Some(backoff.next_delay())
        };
        tokio::select! {
            _ = tick.tick(), if wait.is_none() => {}
            () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            () = shutdown.wait() => break,
        }
    }
    status.close();
    for (_, t) in tunnels {
        let _ = t.task.await;
    }
    Ok(())
}

/// One tunnel's handles.
struct Tunnel {
    relay: RelayTarget,
    /// Triggered to drain and close just this tunnel.
    stop: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

/// The addresses of `target`, sorted: itself for an IP address.
async fn resolve(
    resolver: Option<&hickory_resolver::TokioResolver>,
    target: &RelayTarget,
) -> anyhow::Result<Vec<SocketAddr>> {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let resolver = resolver.ok_or_else(|| anyhow::anyhow!("no resolver"))?;
    let ips = resolver.lookup_ip(target.host.as_str()).await?;
    let mut addrs: Vec<_> = ips
        .iter()
        .map(|ip| SocketAddr::new(ip, target.port))
        .collect();
    addrs.sort();
    addrs.dedup();
    anyhow::ensure!(!addrs.is_empty(), "the name has no address");
    Ok(addrs)
}
