//! One tunnel's place: where it goes (a relay address), how it reports its state, and
//! what every tunnel shares (the endpoint, the configuration as started, the live rules
//! and credentials, the shutdown).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use portcullis_shared::config::{ConnectorConfig, RelayTarget};
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::transport::TransportKind;

use crate::live::Live;
use crate::origin::health::Withdrawn;
use crate::status::{Status, TunnelState};

/// Where one tunnel goes, and where it reports its state.
pub(crate) struct Tunnel {
    pub(crate) relay: RelayTarget,
    pub(crate) addr: SocketAddr,
    pub(crate) status: Arc<Status>,
    /// Hostnames withdrawn because their origin is unhealthy.
    pub(crate) withdrawn: Withdrawn,
    /// Which transport carries it.
    pub(super) kind: TransportKind,
    /// Told when the relay accepts the registration.
    pub(super) registered: Arc<tokio::sync::Notify>,
    /// Set once another tunnel to the same address has taken over the status.
    pub(super) quiet: AtomicBool,
}

impl Tunnel {
    pub(crate) fn new(
        relay: RelayTarget,
        addr: SocketAddr,
        status: Arc<Status>,
        withdrawn: Withdrawn,
    ) -> Self {
        Self {
            relay,
            addr,
            status,
            withdrawn,
            kind: TransportKind::Quic,
            registered: Arc::new(tokio::sync::Notify::new()),
            quiet: AtomicBool::new(false),
        }
    }

    /// The same tunnel's place on `kind`.
    pub(super) fn on(&self, kind: TransportKind) -> Self {
        let mut t = Self::new(
            self.relay.clone(),
            self.addr,
            self.status.clone(),
            self.withdrawn.clone(),
        );
        t.kind = kind;
        t
    }

    pub(super) fn set(&self, state: TunnelState) {
        if !self.quiet.load(Ordering::Relaxed) {
            self.status.set(&self.relay, self.addr, state);
        }
    }

    pub(super) fn up(&self, published: Vec<String>) {
        self.set(TunnelState::Up {
            published,
            since: unix_now(),
            transport: self.kind.as_str().to_owned(),
        });
    }

    pub(super) fn down(&self, error: String) {
        tracing::warn!(error = %error, "tunnel down");
        self.set(TunnelState::Down {
            error,
            since: unix_now(),
        });
    }
}

pub(super) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What one tunnel needs besides where it goes.
pub(crate) struct TunnelContext {
    pub(crate) endpoint: quinn::Endpoint,
    /// The configuration as started: the relays, timings and names a reload does not
    /// change.
    pub(crate) config: ConnectorConfig,
    /// The rules and credentials in force, reloaded and renewed while the tunnel runs.
    pub(crate) live: Arc<Live>,
    pub(crate) shutdown: Shutdown,
}
