//! The agent's one QUIC connection to the relay, carrying HTTP/3: opened on first use,
//! reopened when it drops (relay restart), rebindable to a new local socket (roaming:
//! QUIC migration keeps open streams alive). No 0-RTT: the relay refuses replayable data.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use portcullis_shared::pki;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::home::{AgentState, Home};
use crate::keystore;
use portcullis_shared::transport::TransportKind;

use crate::transport::{Exchange, H2Connection, H3Connection, RelayConnection};

/// One request or tunnel through the relay, whatever carries it.
pub(crate) type Stream = Exchange;

/// The org CA stored at enrolment, as rustls trust roots.
pub(crate) fn org_ca_roots(home: &Home) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki::load_certs(&home.ca())? {
        roots
            .add(ca)
            .context("the stored org CA is unusable: enrol again")?;
    }
    Ok(roots)
}

/// The device's credentials, as rustls wants them.
pub(crate) struct Credentials {
    pub(crate) certs: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) roots: rustls::RootCertStore,
}

impl Credentials {
    pub(crate) fn load(home: &Home, state: &AgentState) -> anyhow::Result<Self> {
        let certs = pki::load_certs(&home.cert())?;
        let key_der = keystore::load(home, &state.key_store, &state.identity)?;
        Ok(Self {
            certs,
            key: pki::pkcs8(key_der),
            roots: org_ca_roots(home)?,
        })
    }

    fn tls_config(&self, alpn: &[u8]) -> anyhow::Result<rustls::ClientConfig> {
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(self.roots.clone())
        .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
        .context("the device certificate and key do not match: enrol again")?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        tls.enable_early_data = false;
        Ok(tls)
    }

    /// TLS for HTTP/2 to the relay's HTTPS port, where UDP is blocked.
    fn tcp_connector(&self) -> anyhow::Result<tokio_rustls::TlsConnector> {
        Ok(tokio_rustls::TlsConnector::from(Arc::new(
            self.tls_config(b"h2")?,
        )))
    }

    fn client_config(&self) -> anyhow::Result<quinn::ClientConfig> {
        let tls = self.tls_config(b"h3")?;
        let mut config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
        ));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }
}

/// The agent's QUIC transport settings (docs/protocol.md, "QUIC settings, and why").
fn transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        10_000,
    ))));
    transport.initial_rtt(Duration::from_millis(100));
    // Uploads keep their rate through a lossy Wi-Fi (see portcullis_shared::congestion).
    transport
        .congestion_controller_factory(Arc::new(portcullis_shared::congestion::LossTolerantConfig));
    portcullis_shared::udp::discover_mtu(&mut transport);
    transport
}

/// How long a relay that failed is passed over before it is tried again first.
const COOLDOWN: Duration = Duration::from_secs(30);
/// How long the agent stays on a relay other than its preferred one before it tries the
/// preferred one again (for new requests; open ones finish where they are).
const FAILBACK_AFTER: Duration = Duration::from_secs(30);
/// How long a relay may take to answer a new QUIC connection before HTTP/2 over TCP is
/// tried (then the next relay).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// A QUIC handshake tried while on TCP may take this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The agent's keep-alive interval: the relay answers each, so silence means it is gone.
const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// How long the relay may go unheard before its connection is given up: streams on it
/// fail with a clear error and new ones go to another relay.
const SILENT_AFTER: Duration = Duration::from_millis(1500);

/// While on TCP, QUIC is tried again after this long, then at doubling intervals up to
/// [`PROBE_MAX`] (each try runs beside the traffic, which stays on TCP until it works).
const PROBE_MIN: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(15);

/// Trying QUIC again while on TCP.
struct Probe {
    /// When the next try may start.
    next_at: Instant,
    /// The wait after that one.
    wait: Duration,
    /// A try is under way.
    running: Arc<std::sync::atomic::AtomicBool>,
    /// A QUIC connection a try opened, for the next request to take.
    ready: Arc<std::sync::Mutex<Option<Arc<dyn RelayConnection>>>>,
}

impl Probe {
    fn new() -> Self {
        Self {
            next_at: Instant::now() + PROBE_MIN,
            wait: PROBE_MIN,
            running: Arc::default(),
            ready: Arc::default(),
        }
    }
}

/// The current connection, where it goes, and since when.
struct Current {
    conn: Arc<dyn RelayConnection>,
    /// The relay's (QUIC) address it was opened for.
    addr: SocketAddr,
    /// Index of its address in the candidate list it was chosen from (0: preferred).
    rank: usize,
    since: Instant,
}

/// The connection to a relay and what it takes to open another: every relay the agent
/// knows, in order of preference. A new connection goes to the first that answers,
/// passing over those that failed within [`COOLDOWN`]; a relay that goes away (GOAWAY,
/// or silence past [`SILENT_AFTER`]) is left for the next, and the preferred one is
/// tried again after [`FAILBACK_AFTER`].
pub(crate) struct Relay {
    endpoint: quinn::Endpoint,
    /// `host:port` each, resolved again for every new connection (relays move, and a name
    /// with several addresses counts as several relays).
    relays: Vec<String>,
    addr: SocketAddr,
    server_name: String,
    config: RwLock<quinn::ClientConfig>,
    /// TLS for the fallback over TCP.
    tcp: RwLock<tokio_rustls::TlsConnector>,
    /// The relays' HTTPS port; `None`: the QUIC port.
    tcp_port: Option<u16>,
    /// Trying QUIC again while the current connection is on TCP.
    probe: std::sync::Mutex<Probe>,
    current: tokio::sync::Mutex<Option<Current>>,
    /// Addresses that failed, and when.
    failed: std::sync::Mutex<HashMap<SocketAddr, Instant>>,
    /// Set by a renewal: the next request opens a connection with the new certificate
    /// (the relay closes the old one when its certificate expires).
    renewed: std::sync::atomic::AtomicBool,
}

impl Relay {
    pub(crate) async fn new(state: &AgentState, creds: &Credentials) -> anyhow::Result<Self> {
        let relays = state.relays();
        let mut addr = None;
        for r in &relays {
            if let Ok(a) = portcullis_shared::enroll_client::resolve(r).await {
                addr = Some(a);
                break;
            }
        }
        let addr = match addr {
            Some(a) => a,
            None => portcullis_shared::enroll_client::resolve(&relays[0]).await?,
        };
        let endpoint = portcullis_shared::udp::client_endpoint(local_any(addr))
            .context("creating the agent's QUIC socket")?;
        Ok(Self {
            endpoint,
            relays,
            addr,
            server_name: state.server_name.clone(),
            config: RwLock::new(creds.client_config()?),
            tcp: RwLock::new(creds.tcp_connector()?),
            tcp_port: state.tcp_port,
            probe: std::sync::Mutex::new(Probe::new()),
            current: tokio::sync::Mutex::new(None),
            failed: std::sync::Mutex::new(HashMap::new()),
            renewed: false.into(),
        })
    }

    /// Uses renewed credentials from the next request on, on a new connection; streams
    /// open on the old one carry on until the relay closes it at the old certificate's
    /// expiry.
    pub(crate) fn update_credentials(&self, creds: &Credentials) -> anyhow::Result<()> {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = creds.client_config()?;
        *self.tcp.write().unwrap_or_else(|p| p.into_inner()) = creds.tcp_connector()?;
        self.renewed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Moves the connection to a fresh local UDP socket (a new address, as after a network
    /// change); QUIC migration carries every open stream over.
    pub(crate) fn rebind(&self) -> anyhow::Result<SocketAddr> {
        let (socket, _) = portcullis_shared::udp::bind(local_any(self.addr))?;
        let local = socket.local_addr()?;
        self.endpoint.rebind(socket)?;
        Ok(local)
    }

    /// Every relay address, in order of preference.
    async fn candidates(&self) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for r in &self.relays {
            match tokio::net::lookup_host(r.as_str()).await {
                Ok(addrs) => {
                    for a in addrs {
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
                Err(e) => tracing::warn!(relay = %r, error = %e, "cannot resolve the relay"),
            }
        }
        if out.is_empty() {
            out.push(self.addr);
        }
        out
    }

    fn cooling(&self, addr: SocketAddr) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .is_some_and(|at| at.elapsed() < COOLDOWN)
    }

    fn mark_failed(&self, addr: SocketAddr) {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, Instant::now());
    }

    /// The live connection, opened if there is none (for status: RTT, transport).
    pub(crate) async fn connection(&self) -> anyhow::Result<Arc<dyn RelayConnection>> {
        let mut current = self.current.lock().await;
        let renewed = self
            .renewed
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = current.as_mut()
            && !c.conn.is_closed()
            && !renewed
        {
            if c.conn.kind() == TransportKind::Tcp {
                if let Some(quic) = self.probe_quic(c.addr) {
                    tracing::info!(relay = %c.addr, transport = "quic", "UDP to the relay works again: new requests go over QUIC; those open on TCP finish there");
                    c.conn = quic.clone();
                    return Ok(quic);
                }
                return Ok(c.conn.clone());
            }
            if c.rank == 0 || c.since.elapsed() < FAILBACK_AFTER {
                return Ok(c.conn.clone());
            }
            // On a fallback long enough: try the preferred relays once, quickly.
            c.since = Instant::now();
            let keep = c.conn.clone();
            let candidates = self.candidates().await;
            let better: Vec<_> = candidates
                .iter()
                .copied()
                .take(c.rank)
                .filter(|a| !self.cooling(*a))
                .collect();
            for addr in better {
                if let Ok(conn) = self.open(addr).await {
                    tracing::info!(relay = %addr, "back on a preferred relay");
                    let rank = candidates.iter().position(|a| *a == addr).unwrap_or(0);
                    *current = Some(Current {
                        conn: conn.clone(),
                        addr,
                        rank,
                        since: Instant::now(),
                    });
                    return Ok(conn);
                }
                self.mark_failed(addr);
            }
            return Ok(keep);
        }
        if let Some(old) = current.take() {
            // Left for a reason: gone, or going away; not the first choice for a while.
            if !renewed {
                self.mark_failed(old.addr);
            }
        }
        let candidates = self.candidates().await;
        // Relays not known to have failed first, in order; then the others.
        let order: Vec<(usize, SocketAddr)> = candidates
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, a)| !self.cooling(*a))
            .chain(
                candidates
                    .iter()
                    .copied()
                    .enumerate()
                    .filter(|(_, a)| self.cooling(*a)),
            )
            .collect();
        let mut last = None;
        for (rank, addr) in order {
            match self.open(addr).await {
                Ok(conn) => {
                    if conn.kind() == TransportKind::Tcp {
                        *self.probe.lock().unwrap_or_else(|p| p.into_inner()) = Probe::new();
                    }
                    *current = Some(Current {
                        conn: conn.clone(),
                        addr,
                        rank,
                        since: Instant::now(),
                    });
                    return Ok(conn);
                }
                Err(e) => {
                    tracing::warn!(relay = %addr, error = %format!("{e:#}"), "cannot connect to the relay; trying the next");
                    self.mark_failed(addr);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no relay to connect to")))
    }

    /// A QUIC connection a probe opened, if one is ready; else starts a probe when one is
    /// due. Never waits.
    fn probe_quic(&self, addr: SocketAddr) -> Option<Arc<dyn RelayConnection>> {
        let mut probe = self.probe.lock().unwrap_or_else(|p| p.into_inner());
        let ready = probe.ready.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(conn) = ready {
            *probe = Probe::new();
            return Some(conn);
        }
        let running = probe.running.load(std::sync::atomic::Ordering::Relaxed);
        if running || Instant::now() < probe.next_at {
            return None;
        }
        probe.next_at = Instant::now() + probe.wait;
        probe.wait = (probe.wait * 2).min(PROBE_MAX);
        probe
            .running
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (running, ready) = (probe.running.clone(), probe.ready.clone());
        let endpoint = self.endpoint.clone();
        let config = self
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let server_name = self.server_name.clone();
        tokio::spawn(async move {
            match open_quic(&endpoint, config, addr, &server_name, PROBE_TIMEOUT).await {
                Ok(conn) => {
                    *ready.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                }
                Err(e) => {
                    tracing::debug!(relay = %addr, error = %format!("{e:#}"), "QUIC still unreachable")
                }
            }
            running.store(false, std::sync::atomic::Ordering::Relaxed);
        });
        None
    }

    /// A new connection to `addr`: HTTP/3 over QUIC, or where QUIC does not connect within
    /// [`CONNECT_TIMEOUT`], HTTP/2 over TLS on TCP to the relay's HTTPS port; its
    /// liveness watched.
    async fn open(&self, addr: SocketAddr) -> anyhow::Result<Arc<dyn RelayConnection>> {
        let config = self
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let quic_error = match open_quic(
            &self.endpoint,
            config,
            addr,
            &self.server_name,
            CONNECT_TIMEOUT,
        )
        .await
        {
            Ok(conn) => return Ok(conn),
            Err(e) => e,
        };
        let tcp_addr = SocketAddr::new(addr.ip(), self.tcp_port.unwrap_or(addr.port()));
        tracing::info!(relay = %addr, error = %format!("{quic_error:#}"), "QUIC to the relay failed; trying HTTP/2 over TCP to {tcp_addr}");
        let connector = self.tcp.read().unwrap_or_else(|p| p.into_inner()).clone();
        match open_tcp(connector, tcp_addr, &self.server_name).await {
            Ok(conn) => Ok(conn),
            Err(tcp_error) => Err(quic_error.context(format!("over TCP too: {tcp_error:#}"))),
        }
    }

    /// Stops using `conn` for new requests (it failed, or the relay is going away); its
    /// open streams carry on if they can.
    async fn leave(&self, conn: &Arc<dyn RelayConnection>) {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref()
            && Arc::ptr_eq(&c.conn, conn)
        {
            self.mark_failed(c.addr);
            *current = None;
        }
    }

    /// Sends a request head; the caller streams the body and reads the response.
    pub(crate) async fn send(&self, req: http::Request<()>) -> anyhow::Result<Stream> {
        // One retry: a connection found dead or going away only now (a relay restarting)
        // is left for another; its open streams finish where they are.
        for attempt in 0..2 {
            let conn = self.connection().await?;
            match conn.send_request(req.clone()).await {
                Ok(stream) => return Ok(stream),
                Err(e) if attempt == 0 => {
                    tracing::info!(relay = %conn.remote_address(), error = %e, "the relay connection cannot take requests; moving on");
                    self.leave(&conn).await;
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(e)).context("sending the request to the relay");
                }
            }
        }
        bail!("the relay connection keeps failing")
    }

    /// A tunnel to `target` (`host:port`) through the relay, ready for bytes.
    pub(crate) async fn connect(&self, target: &str) -> anyhow::Result<Stream> {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target)
            .body(())?;
        let mut stream = self.send(req).await?;
        let resp = stream
            .recv_response()
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        if resp.status() != 200 {
            let mut why = Vec::new();
            while let Ok(Some(chunk)) = stream.recv_data().await {
                why.extend_from_slice(&chunk);
            }
            bail!(
                "the relay refused {target}: {} {}",
                resp.status(),
                String::from_utf8_lossy(&why).trim()
            );
        }
        Ok(stream)
    }
}

/// Closes `conn` once the relay has been silent for [`SILENT_AFTER`] (it answers every
/// keep-alive, so silence means the relay or the path is gone): its streams fail at once
/// with a clear error rather than waiting out the idle timeout, and the next request
/// goes to another relay.
async fn watch_liveness(conn: Arc<dyn RelayConnection>) {
    let mut heard = conn.received();
    let mut heard_at = Instant::now();
    while !conn.is_closed() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = conn.received();
        if now != heard {
            (heard, heard_at) = (now, Instant::now());
        } else if heard_at.elapsed() >= SILENT_AFTER {
            tracing::warn!(relay = %conn.remote_address(), silent_for = ?heard_at.elapsed(), "the relay stopped answering; giving its connection up");
            conn.close("the relay stopped answering");
            return;
        }
    }
}

/// A QUIC handshake within `timeout`, then HTTP/3 on it, its liveness watched.
async fn open_quic(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> anyhow::Result<Arc<dyn RelayConnection>> {
    let connecting = endpoint
        .connect_with(config, addr, server_name)
        .context("dialling the relay")?;
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => bail!(
            "the relay {addr} refused or failed the connection ({e}); if this device was revoked, ask your administrator"
        ),
        Err(_) => bail!("the relay {addr} is unreachable over QUIC (no answer in {timeout:?})"),
    };
    let conn: Arc<dyn RelayConnection> = Arc::new(
        H3Connection::start(conn)
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .context("starting HTTP/3 with the relay")?,
    );
    tracing::info!(relay = %addr, transport = conn.kind().as_str(), "connected to the relay");
    tokio::spawn(watch_liveness(conn.clone()));
    Ok(conn)
}

/// TLS on TCP to `addr` (the relay's HTTPS port), then HTTP/2 on it, its liveness watched.
async fn open_tcp(
    connector: tokio_rustls::TlsConnector,
    addr: SocketAddr,
    server_name: &str,
) -> anyhow::Result<Arc<dyn RelayConnection>> {
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .with_context(|| format!("{server_name:?} is not a TLS name"))?;
    let tls = tokio::time::timeout(TCP_CONNECT_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        connector.connect(name, tcp).await
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "the relay {addr} is unreachable over TCP (no answer in {TCP_CONNECT_TIMEOUT:?})"
        )
    })?
    .with_context(|| {
        format!(
            "TLS over TCP with the relay {addr}; if this device was revoked, ask your administrator"
        )
    })?;
    let conn: Arc<dyn RelayConnection> = Arc::new(
        H2Connection::start(tls, addr, KEEP_ALIVE)
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .context("starting HTTP/2 with the relay")?,
    );
    tracing::info!(relay = %addr, transport = conn.kind().as_str(), "connected to the relay");
    tokio::spawn(watch_liveness(conn.clone()));
    Ok(conn)
}

fn local_any(remote: SocketAddr) -> SocketAddr {
    if remote.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_searches_for_large_datagrams() {
        let t = transport();
        assert!(
            portcullis_shared::udp::searches_to_max_datagram(&t),
            "{t:?}"
        );
    }
}
