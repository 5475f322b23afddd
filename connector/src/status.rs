//! What the connector's tunnels are doing, as the status file, `portcullis-connector
//! status`, the admin listener and the metrics see it: written by the tunnels that own
//! the states, read by everyone else. Imports nothing of the connector's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use portcullis_shared::config::RelayTarget;
use portcullis_shared::shutdown::Shutdown;
use serde::{Deserialize, Serialize};

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

impl prometheus_client::collector::Collector for Status {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use portcullis_shared::metrics::{gauges, label};
        let tunnels = self.tunnels();
        let e = &mut encoder;
        gauges(
            e,
            "tunnels",
            "Tunnels to relay addresses, by state.",
            ["up", "connecting", "down", "draining"].map(|state| {
                let n = tunnels.iter().filter(|t| t.state.name() == state).count();
                ([("state", state)], i64::try_from(n).unwrap_or(i64::MAX))
            }),
        )?;
        gauges(
            e,
            "tunnel_up",
            "Whether the tunnel to a relay address is registered (1) or not (0).",
            tunnels.iter().map(|t| {
                let transport = match &t.state {
                    TunnelState::Up { transport, .. } => transport.clone(),
                    _ => String::new(),
                };
                (
                    [
                        ("relay", label(&t.relay)),
                        ("address", t.address.to_string()),
                        ("transport", transport),
                    ],
                    i64::from(matches!(t.state, TunnelState::Up { .. })),
                )
            }),
        )
    }
}

impl TunnelState {
    /// The state's name, as the metrics label it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Up { .. } => "up",
            Self::Down { .. } => "down",
            Self::Draining => "draining",
        }
    }
}
