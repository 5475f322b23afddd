//! The routing table of connector tunnels: hostname → the connectors serving it, and the
//! handle through which the request path opens one stream per exchange.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use portcullis_shared::identity::{HostPattern, Hostname};
use portcullis_shared::proto::{CloseCode, RelaySession, StreamHeader, StreamKind};
use portcullis_shared::transport::{Transport, TunnelRecv, TunnelSend};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, Semaphore};

/// A tunnel stream carrying one exchange, as the request path reads and writes it.
pub(crate) type TunnelStream = tokio::io::Join<Box<dyn TunnelRecv>, Box<dyn TunnelSend>>;

/// One connected connector: its transport, its tunnel session (shared with the driver,
/// which feeds it the control stream) and its stream slots.
#[derive(Debug)]
pub(crate) struct ConnectorHandle {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) transport: Arc<dyn Transport>,
    session: Mutex<RelaySession>,
    /// Wakes the driver when an open settles during a drain: `Drained` may be owed.
    pub(crate) wake: Notify,
    /// Set when opening a stream failed: the connection is gone, route elsewhere.
    retired: AtomicBool,
    /// Set while nothing has been heard from the connector for longer than its
    /// keep-alives allow (see [`watch_liveness`]): route elsewhere until it is heard again.
    silent: AtomicBool,
    /// The most streams this connector may carry at once.
    max_streams: usize,
    /// The transport's round-trip time in microseconds, sampled by [`watch_liveness`], so
    /// picking a replica reads an atomic rather than locking each connection's state.
    rtt_micros: AtomicU64,
    /// Concurrent requests and tunnels through this connector, at most
    /// `limits.max_streams_per_connector`.
    pub(crate) slots: Arc<Semaphore>,
}

impl ConnectorHandle {
    pub(crate) fn new(
        id: u64,
        name: String,
        transport: Arc<dyn Transport>,
        session: RelaySession,
        max_streams: usize,
    ) -> Self {
        Self {
            id,
            name,
            transport,
            session: Mutex::new(session),
            wake: Notify::new(),
            retired: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            max_streams,
            rtt_micros: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(max_streams)),
        }
    }

    /// Requests and tunnels in flight through this connector.
    pub(crate) fn outstanding(&self) -> usize {
        self.max_streams
            .saturating_sub(self.slots.available_permits())
    }

    /// What sending one more stream here costs, to compare replicas: the streams it would
    /// then carry, times a weight that grows by one for every [`RTT_STEP`] of round-trip
    /// time. Replicas within a step of each other weigh the same, so noise in the RTT
    /// does not decide between neighbours, while one 50 ms away weighs six times one
    /// nearby. The cheapest replica gets the stream: least outstanding, weighted by RTT.
    fn cost(&self) -> u128 {
        let rtt = u128::from(self.rtt_micros.load(Ordering::Relaxed));
        let weight = 1 + rtt / RTT_STEP.as_micros();
        (self.outstanding() as u128 + 1) * weight
    }

    /// The tunnel session. Never held across an await.
    pub(crate) fn session(&self) -> MutexGuard<'_, RelaySession> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops routing to this connector (its connection failed).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    fn routable(&self) -> bool {
        !self.retired.load(Ordering::Relaxed)
            && !self.silent.load(Ordering::Relaxed)
            && self.session().may_open()
    }

    /// Opens a tunnel stream for one HTTP exchange to `host` and writes its header. The
    /// session counts the open (a drain waits for it) and refuses it once the connector
    /// drains.
    pub(crate) async fn open_http(&self, host: &Hostname) -> anyhow::Result<TunnelStream> {
        self.session().begin_open()?;
        let open = SettleOpen {
            handle: self,
            opened: false,
        };
        let mut stream = self
            .transport
            .open_bi()
            .await
            .context("opening a tunnel stream")?;
        open.opened();
        let header = StreamHeader {
            kind: StreamKind::Http,
            hostname: host.to_string(),
        };
        stream
            .send
            .write_all(&header.encode())
            .await
            .context("writing the stream header")?;
        Ok(stream.join())
    }
}

/// Settles an open begun on the session: counted when it succeeded, forgotten when it
/// failed or the request was dropped while it was under way.
struct SettleOpen<'a> {
    handle: &'a ConnectorHandle,
    opened: bool,
}

impl SettleOpen<'_> {
    fn opened(mut self) {
        self.opened = true;
    }
}

impl Drop for SettleOpen<'_> {
    fn drop(&mut self) {
        let mut session = self.handle.session();
        if self.opened {
            session.stream_opened();
        } else {
            session.open_failed();
        }
        // While draining, the driver owes `Drained` once no open is under way.
        let draining = !session.may_open();
        drop(session);
        if draining {
            self.handle.wake.notify_one();
        }
    }
}

/// The round-trip time that adds one to a replica's weight (see [`ConnectorHandle::cost`]).
const RTT_STEP: Duration = Duration::from_millis(10);

/// How long a connector may go unheard before it is routed around. Connectors send a
/// keep-alive every 250 ms, so a second of silence means a dead process or path.
const SILENT_AFTER: Duration = Duration::from_secs(1);
/// How often liveness is checked.
const LIVENESS_CHECK: Duration = Duration::from_millis(200);

/// Watches that `handle`'s connector is still heard from, and samples its round-trip time
/// for [`ConnectorHandle::cost`], until its connection ends:
/// while it has been silent for [`SILENT_AFTER`] it gets no new streams (its transport's
/// idle timeout then closes it, failing what was in flight).
pub(crate) async fn watch_liveness(handle: Arc<ConnectorHandle>) {
    let mut heard = handle.transport.received();
    let mut heard_at = Instant::now();
    let closed = handle.transport.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            _ = &mut closed => return,
            () = tokio::time::sleep(LIVENESS_CHECK) => {}
        }
        let rtt = handle.transport.rtt().as_micros();
        handle
            .rtt_micros
            .store(u64::try_from(rtt).unwrap_or(u64::MAX), Ordering::Relaxed);
        let now = handle.transport.received();
        if now != heard {
            heard = now;
            heard_at = Instant::now();
            if handle.silent.swap(false, Ordering::Relaxed) {
                tracing::info!(connector = %handle.name, "connector heard again; routing to it");
            }
        } else if heard_at.elapsed() >= SILENT_AFTER && !handle.silent.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(connector = %handle.name, silent_for = ?heard_at.elapsed(), "connector silent; routing elsewhere");
        }
    }
}

/// Hostname → connectors serving it; each stream goes to the cheapest routable replica
/// (see [`ConnectorHandle::cost`]).
#[derive(Debug, Default)]
pub(crate) struct Router {
    routes: RwLock<HashMap<HostPattern, Vec<Arc<ConnectorHandle>>>>,
    next: AtomicUsize,
    ids: AtomicU64,
    /// Every connected connector, routed or draining, for closing at shutdown.
    all: Mutex<HashMap<u64, Arc<ConnectorHandle>>>,
}

impl Router {
    /// A fresh connector id.
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// A live, non-draining connector for `host`: exact routes first, then the most
    /// specific wildcard.
    pub(crate) fn pick(&self, host: &Hostname) -> Option<Arc<ConnectorHandle>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut candidates = routes.get(&HostPattern::Exact(host.clone()));
        if candidates.is_none_or(|c| c.is_empty()) {
            let name = host.as_str();
            candidates = name
                .match_indices('.')
                .filter_map(|(i, _)| Hostname::parse(&name[i + 1..]).ok())
                .find_map(|suffix| {
                    routes
                        .get(&HostPattern::Wildcard(suffix))
                        .filter(|c| !c.is_empty())
                });
        }
        let candidates = candidates?;
        if let [only] = candidates.as_slice() {
            return only.routable().then(|| only.clone());
        }
        // The cheapest routable replica; equal costs are taken in turn (the scan starts
        // one further each time), so idle replicas share the load.
        let n = candidates.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        candidates
            .iter()
            .cycle()
            .skip(start)
            .take(n)
            .filter(|c| c.routable())
            .min_by_key(|c| c.cost())
            .cloned()
    }

    /// Routes `patterns` to `handle`.
    pub(crate) fn add(&self, handle: &Arc<ConnectorHandle>, patterns: &[HostPattern]) {
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.id, handle.clone());
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        for p in patterns {
            routes.entry(p.clone()).or_default().push(handle.clone());
        }
    }

    /// Stops routing to `handle` (it drains); it stays known for closing at shutdown.
    pub(crate) fn unroute(&self, handle: &ConnectorHandle) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.retain(|_, list| {
            list.retain(|c| c.id != handle.id);
            !list.is_empty()
        });
    }

    /// Forgets `handle` entirely (its connection ended).
    pub(crate) fn remove(&self, handle: &ConnectorHandle) {
        self.unroute(handle);
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&handle.id);
    }

    /// Each published name and how many replicas may take a stream for it now (routed,
    /// not draining, not silent), for `/metrics`.
    pub(crate) fn replicas(&self) -> Vec<(String, usize)> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, usize)> = routes
            .iter()
            .map(|(p, list)| (p.to_string(), list.iter().filter(|c| c.routable()).count()))
            .collect();
        out.sort();
        out
    }

    /// Closes every connector connection (relay shutdown).
    pub(crate) fn close_all(&self, code: CloseCode) {
        let all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        for c in all.values() {
            c.transport.close(code, "relay shutting down");
        }
    }
}
