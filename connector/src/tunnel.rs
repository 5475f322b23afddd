//! The connector's side of the tunnel: resolving and dialling the relay, registering,
//! accepting the relay's streams, reconnecting with jittered backoff, and draining.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use portcullis_shared::config::{ConnectorConfig, RelayTarget};
use portcullis_shared::pki;
use portcullis_shared::proto::{
    CloseCode, ConnectorEvent, ConnectorSession, ConnectorSessionConfig, ControlFrame,
    FrameDecoder, StreamHeader, TUNNEL_ALPN, TUNNEL_TCP_ALPN, encode_frame,
};
use portcullis_shared::shutdown::Shutdown;
use portcullis_shared::tcp_transport::{PeerInfo, TcpSettings, TcpTransport};
use portcullis_shared::transport::{
    BiStream, BoxFuture, QuicTransport, Transport, TransportError, TransportKind, TunnelRecv,
    TunnelSend,
};
use portcullis_shared::tunnel_io::{FrameReadError, read_frame};
use quinn::VarInt;
use quinn::crypto::rustls::QuicClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

use crate::health::Withdrawn;
use crate::live::Live;
use crate::origin::Origins;
use crate::relays::{Status, TunnelState};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The cap is short so that a relay back from a long outage (beyond the stateless-reset
/// fast path) is found again within about two seconds; a dial is one small UDP packet.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a QUIC handshake may take before the tunnel goes over TCP instead. With the
/// first retry after a lost tunnel (at most [`BACKOFF_MAX`]) and the TCP handshake, a
/// connector whose UDP is blocked is back within 5 s of losing its tunnel.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// A QUIC handshake tried while on TCP may take this long (it costs nothing to wait).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait before trying QUIC again while on TCP; it doubles up to
/// [`PROBE_MAX`], so UDP that returns is used again within about 20 s.
const PROBE_MIN: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(15);
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A PING (QUIC or HTTP/2) this often; see [`client_config`].
const KEEP_ALIVE: Duration = Duration::from_millis(250);
/// Nothing from the relay for this long and the tunnel is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Streams the relay may have open on a tunnel at once. The relay bounds them itself
/// (`max_streams_per_connector`, 4096 by default, answering 503 beyond); this stays above
/// that default even while QUIC owes back stream credit (up to an eighth), so the relay's
/// own limit is what a client meets. (At 1024 the relay's next stream waited for credit
/// instead of being refused.) Not higher: quinn keeps an entry per stream it allows.
const RELAY_STREAMS: u32 = 4800;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a finished stream's task waits for the relay to acknowledge its data.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How this connector reaches a relay: QUIC, and TLS on TCP where UDP is blocked, both
/// with the org CA as the only root and this connector's certificate.
#[derive(Clone)]
pub(crate) struct Dialer {
    quic: quinn::ClientConfig,
    tcp: tokio_rustls::TlsConnector,
    /// The relays' HTTPS port (`relay_tcp_port`); `None`: the QUIC port.
    tcp_port: Option<u16>,
}

impl Dialer {
    pub(crate) fn new(config: &ConnectorConfig) -> anyhow::Result<Self> {
        let quic = client_config(config)?;
        let tcp = tokio_rustls::TlsConnector::from(Arc::new(tls_config(config, TUNNEL_TCP_ALPN)?));
        Ok(Self {
            quic,
            tcp,
            tcp_port: config.relay_tcp_port,
        })
    }

    /// Where the TCP fallback for the relay at `addr` (its QUIC address) goes.
    fn tcp_addr(&self, addr: SocketAddr) -> SocketAddr {
        SocketAddr::new(addr.ip(), self.tcp_port.unwrap_or(addr.port()))
    }

    /// A QUIC handshake with the relay at `addr`, bounded by `timeout`.
    async fn quic(
        &self,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        timeout: Duration,
    ) -> anyhow::Result<quinn::Connection> {
        let connecting = endpoint
            .connect_with(self.quic.clone(), addr, server_name)
            .context("cannot dial the relay")?;
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| anyhow::anyhow!("QUIC handshake with {addr} timed out after {timeout:?}"))?
            .with_context(|| format!("QUIC handshake with {addr}"))
    }

    /// A tunnel over TLS on TCP to the relay's HTTPS port.
    async fn tcp(&self, addr: SocketAddr, server_name: &str) -> anyhow::Result<TcpTransport> {
        let addr = self.tcp_addr(addr);
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("{server_name:?} is not a TLS name"))?;
        let dial = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("TCP connection to {addr}"))?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .tcp
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with {addr}"))?;
            let peer = PeerInfo {
                certificates: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
                server_name: None,
                remote: addr,
            };
            TcpTransport::connector(tls, peer, tcp_settings())
                .await
                .with_context(|| format!("HTTP/2 with {addr}"))
        };
        tokio::time::timeout(TCP_CONNECT_TIMEOUT, dial)
            .await
            .map_err(|_| anyhow::anyhow!("connecting over TCP to {addr} timed out"))?
    }
}

/// The HTTP/2 settings of the tunnel over TCP: the windows and timers of the QUIC tunnel.
fn tcp_settings() -> TcpSettings {
    TcpSettings {
        stream_window: 1 << 20,
        connection_window: 16 << 20,
        keep_alive: KEEP_ALIVE,
        idle_timeout: IDLE_TIMEOUT,
        max_streams: RELAY_STREAMS,
    }
}

/// The rustls client config for the tunnel's ALPN `alpn`.
fn tls_config(config: &ConnectorConfig, alpn: &[u8]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki::load_certs(&config.ca)? {
        roots
            .add(ca)
            .with_context(|| format!("{}: not a usable CA certificate", config.ca.display()))?;
    }
    let certs = pki::load_certs(&config.cert)?;
    let key = pki::load_key(&config.key)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .with_context(|| {
        format!(
            "{} and {} do not form a usable certificate and key",
            config.cert.display(),
            config.key.display()
        )
    })?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = false;
    Ok(tls)
}

/// The QUIC client config: org CA as the only root, this connector's certificate, the
/// tunnel ALPN, and no 0-RTT.
pub(crate) fn client_config(config: &ConnectorConfig) -> anyhow::Result<quinn::ClientConfig> {
    let tls = tls_config(config, TUNNEL_ALPN)?;
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    client.transport_config(Arc::new(transport(config.quic_congestion)));
    Ok(client)
}

/// The tunnel's transport settings (docs/protocol.md, "QUIC settings, and why").
fn transport(congestion: portcullis_shared::config::QuicCongestion) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Keep-alives every 250 ms let the relay route around a connector it has not heard
    // from for a second, make a restarted relay answer with a stateless reset at once (it
    // keeps its reset key), and with the 3 s idle timeout (the smaller of the two ends'
    // wins) a dead relay or connector is noticed, and its streams failed, within 3 s.
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(VarInt::from_u32(
        IDLE_TIMEOUT.as_millis() as u32,
    ))));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // Retransmit a lost Initial after ~300 ms rather than ~1 s, so a relay that comes back
    // during a dial is reached quickly.
    t.initial_rtt(Duration::from_millis(100));
    // Responses cross whatever path the connector sits behind: a controller that keeps
    // its rate through random loss (see portcullis_shared::congestion).
    t.congestion_controller_factory(portcullis_shared::congestion::factory(congestion));
    // The relay opens one stream per request; these bound how many run at once.
    t.max_concurrent_bidi_streams(RELAY_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((1u32 << 20).into());
    t.receive_window((16u32 << 20).into());
    t.send_window(16 << 20);
    // Larger datagrams where the path carries them (a relay on this host or LAN).
    portcullis_shared::udp::discover_mtu(&mut t);
    t
}

/// A client endpoint for dialling `addr`: bound to an ephemeral port, never listening.
pub(crate) fn endpoint_for(addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    portcullis_shared::udp::client_endpoint(bind).context("creating the QUIC client socket")
}

/// Exponential backoff with full jitter in the upper half.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The wait before the next attempt. The first after a tunnel that was up is drawn
    /// over the whole of [`BACKOFF_MAX`]: when a relay restarts, every connector loses its
    /// tunnel at the same moment, and this spreads their return over two seconds rather
    /// than a few milliseconds. Later ones grow from [`BACKOFF_MIN`] to [`BACKOFF_MAX`],
    /// jittered over their upper half.
    pub(crate) fn next_delay(&mut self) -> Duration {
        if self.attempt == 0 {
            self.attempt = 1;
            return BACKOFF_MAX.mul_f64(fastrand::f64());
        }
        let ceiling = BACKOFF_MIN
            .saturating_mul(1 << self.attempt.min(16))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Where one tunnel goes, and where it reports its state.
pub(crate) struct Tunnel {
    pub(crate) relay: RelayTarget,
    pub(crate) addr: SocketAddr,
    pub(crate) status: Arc<Status>,
    /// Hostnames withdrawn because their origin is unhealthy.
    pub(crate) withdrawn: Withdrawn,
    /// Which transport carries it.
    kind: TransportKind,
    /// Told when the relay accepts the registration.
    registered: Arc<tokio::sync::Notify>,
    /// Set once another tunnel to the same address has taken over the status.
    quiet: AtomicBool,
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
    fn on(&self, kind: TransportKind) -> Self {
        let mut t = Self::new(
            self.relay.clone(),
            self.addr,
            self.status.clone(),
            self.withdrawn.clone(),
        );
        t.kind = kind;
        t
    }

    fn set(&self, state: TunnelState) {
        if !self.quiet.load(Ordering::Relaxed) {
            self.status.set(&self.relay, self.addr, state);
        }
    }

    fn up(&self, published: Vec<String>) {
        self.set(TunnelState::Up {
            published,
            since: unix_now(),
            transport: self.kind.as_str().to_owned(),
        });
    }

    fn down(&self, error: String) {
        tracing::warn!(error = %error, "tunnel down");
        self.set(TunnelState::Down {
            error,
            since: unix_now(),
        });
    }
}

fn unix_now() -> i64 {
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

/// Keeps one tunnel to `addr` (an address of `relay`) up until `shutdown`, reconnecting
/// with jittered exponential backoff, independently of every other tunnel. QUIC first;
/// where its handshake fails the tunnel goes over TLS on TCP, and moves back to QUIC once
/// a probe gets through.
pub(crate) async fn supervise(cx: TunnelContext, tunnel: Tunnel) {
    let cx = Arc::new(cx);
    let server_name = cx
        .config
        .relay_server_name(&tunnel.relay)
        .unwrap_or_default();
    let mut backoff = Backoff::default();
    let span = tracing::info_span!("tunnel", relay = %tunnel.relay, relay.addr = %tunnel.addr);
    let addr = tunnel.addr;
    let shutdown = &cx.shutdown;
    async {
        while !shutdown.is_triggered() {
            tunnel.set(TunnelState::Connecting);
            let dialer = cx.live.current().dialer.clone();
            let quic = tokio::select! {
                r = dialer.quic(&cx.endpoint, addr, &server_name, CONNECT_TIMEOUT) => r,
                () = shutdown.wait() => break,
            };
            match quic {
                Ok(conn) => {
                    let transport = Arc::new(QuicTransport::new(conn));
                    let first = Arc::new(tunnel.on(TransportKind::Quic));
                    let (result, registered) =
                        serve(transport, &cx, shutdown, &server_name, first).await;
                    if registered {
                        backoff.reset();
                    }
                    if let Err(e) = result {
                        tunnel.down(format!("tunnel lost: {e:#}"));
                    }
                }
                Err(quic_error) => {
                    tracing::info!(error = %format!("{quic_error:#}"), "QUIC to the relay failed; trying TLS over TCP");
                    let tcp = tokio::select! {
                        r = dialer.tcp(addr, &server_name) => r,
                        () = shutdown.wait() => break,
                    };
                    match tcp {
                        Ok(transport) => {
                            if let Err(e) =
                                over_tcp(transport, &cx, &server_name, &mut backoff, &tunnel).await
                            {
                                tunnel.down(format!("tunnel lost: {e:#}"));
                            }
                        }
                        Err(e) => tunnel.down(format!(
                            "cannot connect to the relay: {quic_error:#}; over TCP: {e:#}"
                        )),
                    }
                }
            }
            if shutdown.is_triggered() {
                break;
            }
            let delay = backoff.next_delay();
            tracing::info!(?delay, "reconnecting");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.wait() => break,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), cx.endpoint.wait_idle()).await;
        tunnel.status.remove(addr);
        tracing::info!("tunnel closed");
    }
    .instrument(span)
    .await;
}

/// Runs the tunnel over TCP while probing QUIC with backoff; once a QUIC handshake gets
/// through, a QUIC tunnel registers, then the TCP one drains (the relay routes new
/// streams to QUIC, streams open on TCP finish there) and the QUIC one goes on.
async fn over_tcp(
    tcp: TcpTransport,
    cx: &Arc<TunnelContext>,
    server_name: &str,
    backoff: &mut Backoff,
    tunnel: &Tunnel,
) -> anyhow::Result<()> {
    tracing::info!(transport = "tcp", "tunnel over TLS on TCP");
    let child = cx.shutdown.child();
    let tcp_tunnel = Arc::new(tunnel.on(TransportKind::Tcp));
    let tcp_session = serve(Arc::new(tcp), cx, &child, server_name, tcp_tunnel.clone());
    tokio::pin!(tcp_session);
    let probe = probe_quic(cx, tunnel.addr, server_name);
    let conn = tokio::select! {
        (r, registered) = &mut tcp_session => {
            // Registered over TCP: the next failure starts the backoff afresh.
            if registered {
                backoff.reset();
            }
            return r;
        }
        conn = probe => conn,
    };
    tracing::info!("UDP to the relay works again: moving the tunnel back to QUIC");
    let quic = Arc::new(QuicTransport::new(conn));
    let quic_tunnel = Arc::new(tunnel.on(TransportKind::Quic));
    let registered = quic_tunnel.registered.clone();
    let quic_run = async {
        let (r, registered) = serve(quic, cx, &cx.shutdown, server_name, quic_tunnel).await;
        if registered {
            backoff.reset();
        }
        // QUIC failed before the TCP tunnel finished draining: both end, and the
        // supervisor starts again.
        child.trigger();
        r
    };
    let handover = async {
        tokio::select! {
            () = registered.notified() => {
                tcp_tunnel.quiet.store(true, Ordering::Relaxed);
                tracing::info!(transport = "quic", "tunnel back on QUIC; the TCP tunnel drains");
                child.trigger();
            }
            () = child.wait() => {}
        }
    };
    let (quic_result, (tcp_result, _), ()) = tokio::join!(quic_run, tcp_session, handover);
    if let Err(e) = tcp_result {
        tracing::debug!(error = %format!("{e:#}"), "the TCP tunnel ended with an error while draining");
    }
    quic_result
}

/// Tries QUIC to `addr` after 1 s, then at doubling intervals up to [`PROBE_MAX`], until
/// a handshake completes.
async fn probe_quic(cx: &TunnelContext, addr: SocketAddr, server_name: &str) -> quinn::Connection {
    let mut wait = PROBE_MIN;
    loop {
        tokio::time::sleep(wait).await;
        let dialer = cx.live.current().dialer.clone();
        match dialer
            .quic(&cx.endpoint, addr, server_name, PROBE_TIMEOUT)
            .await
        {
            Ok(conn) => return conn,
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "QUIC still unreachable"),
        }
        wait = (wait * 2).min(PROBE_MAX);
    }
}

/// A tunnel session running on a connection of its own, with its own stop signal.
struct Running {
    task: std::pin::Pin<Box<dyn Future<Output = (anyhow::Result<()>, bool)> + Send>>,
    tunnel: Arc<Tunnel>,
    stop: Shutdown,
}

impl Running {
    fn start(
        transport: Arc<dyn Transport>,
        cx: &Arc<TunnelContext>,
        shutdown: &Shutdown,
        tunnel: Arc<Tunnel>,
    ) -> Self {
        let stop = shutdown.child();
        Self {
            task: Box::pin(session(transport, cx.clone(), stop.clone(), tunnel.clone())),
            tunnel,
            stop,
        }
    }
}

/// Serves the tunnel on `transport` until its connection ends, replacing the connection
/// make-before-break whenever the published hostnames or the credentials change (a reload,
/// a renewed certificate): a new connection of the same kind, made with the credentials in
/// force, registers; only then is the old one drained, its streams finishing on it. A
/// replacement that fails leaves the old connection serving. Returns the last
/// connection's result, and whether any connection registered.
async fn serve(
    transport: Arc<dyn Transport>,
    cx: &Arc<TunnelContext>,
    shutdown: &Shutdown,
    server_name: &str,
    first: Arc<Tunnel>,
) -> (anyhow::Result<()>, bool) {
    let kind = first.kind;
    let mut replacements = cx.live.replacements();
    replacements.borrow_and_update();
    let mut registered = false;
    let mut current = Running::start(transport, cx, shutdown, first);
    loop {
        tokio::select! {
            (r, reg) = &mut current.task => return (r, registered || reg),
            Ok(()) = replacements.changed() => {}
        }
        tracing::info!(
            "the hostnames or the credentials changed: replacing the tunnel's connection"
        );
        let dialer = cx.live.current().dialer.clone();
        let dial = async {
            Ok::<Arc<dyn Transport>, anyhow::Error>(match kind {
                TransportKind::Quic => Arc::new(QuicTransport::new(
                    dialer
                        .quic(
                            &cx.endpoint,
                            current.tunnel.addr,
                            server_name,
                            CONNECT_TIMEOUT,
                        )
                        .await?,
                )),
                TransportKind::Tcp => Arc::new(dialer.tcp(current.tunnel.addr, server_name).await?),
            })
        };
        let next = tokio::select! {
            r = dial => r,
            (r, reg) = &mut current.task => return (r, registered || reg),
        };
        let next = match next {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot open the replacement connection; the current one keeps serving");
                continue;
            }
        };
        let mut next = Running::start(next, cx, shutdown, Arc::new(current.tunnel.on(kind)));
        tokio::select! {
            () = next.tunnel.registered.notified() => {
                current.tunnel.quiet.store(true, Ordering::Relaxed);
                current.stop.trigger();
                cx.live.metrics.tunnel_replacements.fetch_add(1, Ordering::Relaxed);
                tracing::info!("the replacement connection registered; the old one drains");
                registered = true;
                let old = std::mem::replace(&mut current, next);
                // The old connection drains on its own; the process waits for it at exit.
                shutdown.tracker().spawn(async move {
                    let (r, _) = old.task.await;
                    if let Err(e) = r {
                        tracing::debug!(error = %format!("{e:#}"), "the replaced connection ended with an error");
                    }
                });
            }
            (r, _) = &mut next.task => {
                let why = r.err().map(|e| format!("{e:#}")).unwrap_or_default();
                tracing::warn!(error = %why, "the replacement connection ended before it registered; the current one keeps serving");
            }
            (r, reg) = &mut current.task => {
                registered |= reg;
                if let Err(e) = r {
                    tracing::info!(error = %format!("{e:#}"), "the tunnel's connection ended while it was being replaced");
                }
                current = next;
            }
        }
    }
}

/// One connected tunnel, driven by its [`ConnectorSession`]: register, then serve the
/// relay's streams until the connection ends, or until `shutdown` and the drain that
/// follows it complete. Also returns whether the relay accepted the registration.
async fn session(
    transport: Arc<dyn Transport>,
    cx: Arc<TunnelContext>,
    shutdown: Shutdown,
    tunnel: Arc<Tunnel>,
) -> (anyhow::Result<()>, bool) {
    let control = match transport.open_bi().await {
        Ok(c) => c,
        Err(e) => {
            return (
                Err(anyhow::Error::new(e).context("opening the control stream")),
                false,
            );
        }
    };
    let agent = concat!("portcullis-connector/", env!("CARGO_PKG_VERSION")).to_owned();
    let session = ConnectorSession::new(
        Instant::now(),
        cx.live.current().hostnames(),
        agent,
        ConnectorSessionConfig::new(cx.config.drain_grace),
    );
    let (finished_tx, finished) = tokio::sync::mpsc::unbounded_channel();
    let BiStream { send, recv } = control;
    let mut driver = Driver {
        session,
        control: send,
        frames: read_frames(recv),
        finished_tx,
        finished,
        draining: false,
        accepted: Vec::new(),
        withdrawn: tunnel.withdrawn.clone(),
        registered: false,
    };
    let result = driver.run(&*transport, &cx, &shutdown, &tunnel).await;
    (result, driver.registered)
}

/// Reads the relay's control frames on a task of their own and hands them over, so the
/// driver's loop waits on a channel rather than re-polling the stream on every wake-up.
/// The last item is the stream's end (`Ok(None)`) or its error.
fn read_frames(
    mut recv: Box<dyn TunnelRecv>,
) -> tokio::sync::mpsc::Receiver<Result<Option<ControlFrame>, FrameReadError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut decoder = FrameDecoder::default();
        loop {
            let frame = read_frame(&mut recv, &mut decoder).await;
            let last = !matches!(frame, Ok(Some(_)));
            if tx.send(frame).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

/// The async shell around one tunnel's [`ConnectorSession`].
struct Driver {
    session: ConnectorSession,
    control: Box<dyn TunnelSend>,
    /// The relay's control frames, from [`read_frames`].
    frames: tokio::sync::mpsc::Receiver<Result<Option<ControlFrame>, FrameReadError>>,
    /// Each stream task says here when it ends.
    finished_tx: tokio::sync::mpsc::UnboundedSender<()>,
    finished: tokio::sync::mpsc::UnboundedReceiver<()>,
    draining: bool,
    /// The hostnames the relay accepted, once registered.
    accepted: Vec<String>,
    /// Follows the hostnames withdrawn for unhealthy origins.
    withdrawn: Withdrawn,
    /// Whether the relay accepted the registration.
    registered: bool,
}

/// What woke the driver.
enum Input {
    Stream(BiStream),
    Frame(Result<Option<ControlFrame>, FrameReadError>),
    Finished,
    Timeout,
    Shutdown,
    /// The set of withdrawn hostnames changed.
    Health,
}

impl Driver {
    async fn run(
        &mut self,
        transport: &dyn Transport,
        cx: &TunnelContext,
        shutdown: &Shutdown,
        tunnel: &Tunnel,
    ) -> anyhow::Result<()> {
        // One accept in flight for the tunnel's life, re-armed after each stream.
        let mut accept = transport.accept_bi();
        loop {
            self.transmit().await?;
            if let Some(end) = self.act(transport, tunnel) {
                return end;
            }
            let input = match self.next_input(&mut accept, shutdown).await {
                Ok(input) => input,
                Err(e) => {
                    if let Some(why) = e.peer_code().and_then(close_reason) {
                        tracing::error!(reason = why, "the relay closed the tunnel");
                    }
                    return Err(anyhow::Error::new(e).context("tunnel closed"));
                }
            };
            let now = Instant::now();
            match input {
                Input::Stream(stream) => {
                    accept = transport.accept_bi();
                    self.session.handle_stream_accepted(now);
                    let done = self.finished_tx.clone();
                    let metrics = cx.live.metrics.clone();
                    let task = serve_stream(stream, cx.live.current().origins.clone());
                    metrics.streams.fetch_add(1, Ordering::Relaxed);
                    metrics.streams_active.fetch_add(1, Ordering::Relaxed);
                    shutdown.tracker().spawn(
                        async move {
                            task.await;
                            metrics.streams_active.fetch_sub(1, Ordering::Relaxed);
                            let _ = done.send(());
                        }
                        .instrument(tracing::debug_span!("stream")),
                    );
                }
                Input::Frame(Ok(Some(frame))) => {
                    // The error is also queued as a Close event, acted on above.
                    let _ = self.session.handle_frame(now, frame);
                }
                Input::Frame(Ok(None)) => self.session.handle_control_closed(now),
                Input::Frame(Err(FrameReadError::Decode(e))) => {
                    self.session.handle_decode_error(now, e);
                }
                Input::Frame(Err(FrameReadError::Io(e))) => {
                    return Err(e).context("reading the control stream");
                }
                Input::Finished => {
                    self.session.handle_stream_finished(now);
                    // Take every other stream that has ended too, in one wake-up.
                    while self.finished.try_recv().is_ok() {
                        self.session.handle_stream_finished(now);
                    }
                }
                Input::Timeout => self.session.handle_timeout(now),
                Input::Health => self.publish(tunnel),
                Input::Shutdown => {
                    // Drain: the relay stops routing here; in-flight streams finish,
                    // streams it opened before it read the Drain are still accepted.
                    self.draining = true;
                    self.session.start_drain(now);
                    tunnel.set(TunnelState::Draining);
                }
            }
        }
    }

    async fn next_input(
        &mut self,
        accept: &mut BoxFuture<'_, Result<BiStream, TransportError>>,
        shutdown: &Shutdown,
    ) -> Result<Input, TransportError> {
        let deadline = self.session.poll_timeout();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let draining = self.draining;
        let stop = async {
            if draining {
                std::future::pending().await
            } else {
                shutdown.wait().await
            }
        };
        // A finished stream before a new one, so the drain's accounting stays current.
        Ok(tokio::select! {
            biased;
            Some(()) = self.finished.recv() => Input::Finished,
            stream = accept => Input::Stream(stream?),
            Some(frame) = self.frames.recv() => Input::Frame(frame),
            () = timer => Input::Timeout,
            () = stop => Input::Shutdown,
            Ok(()) = self.withdrawn.changed() => Input::Health,
        })
    }

    /// Tells the relay to route the accepted hostnames whose origins are healthy.
    fn publish(&mut self, tunnel: &Tunnel) {
        let withdrawn = self.withdrawn.borrow_and_update().clone();
        let published: Vec<String> = self
            .accepted
            .iter()
            .filter(|h| !withdrawn.contains(*h))
            .cloned()
            .collect();
        if self.session.publish(published.clone()) {
            tunnel.up(published);
        }
    }

    /// Writes every frame the session queued, and finishes the control stream when the
    /// drain asks for it.
    async fn transmit(&mut self) -> anyhow::Result<()> {
        while let Some(frame) = self.session.poll_transmit() {
            self.control
                .write_all(&encode_frame(&frame)?)
                .await
                .context("writing the control stream")?;
        }
        if self.session.poll_finish_control() {
            let _ = self.control.shutdown().await;
        }
        Ok(())
    }

    /// Acts on every event the session queued; `Some` ends the tunnel with that result.
    fn act(&mut self, transport: &dyn Transport, tunnel: &Tunnel) -> Option<anyhow::Result<()>> {
        while let Some(event) = self.session.poll_event() {
            match event {
                ConnectorEvent::Registered { accepted, rejected } => {
                    for r in &rejected {
                        tracing::error!(hostname = %r.hostname, reason = %r.reason, "the relay refused to publish this hostname; check the connector's certificate (issue connector --hostname)");
                    }
                    tracing::info!(published = ?accepted, transport = tunnel.kind.as_str(), "tunnel up");
                    self.accepted = accepted.clone();
                    // Origins already known to be unhealthy are withdrawn at once.
                    if !self.withdrawn.borrow_and_update().is_empty() {
                        self.publish(tunnel);
                    } else {
                        tunnel.up(accepted);
                    }
                    tunnel.registered.notify_one();
                    // Only a registration the relay answered counts as success: a refused
                    // certificate fails after the QUIC handshake and must keep backing off.
                    self.registered = true;
                }
                ConnectorEvent::DrainNotAcknowledged => {
                    tracing::warn!(
                        "the relay did not acknowledge the drain; finishing what arrived"
                    );
                }
                ConnectorEvent::DrainComplete => {
                    transport.close(CloseCode::Normal, "connector shutting down");
                    return Some(Ok(()));
                }
                ConnectorEvent::DrainTimedOut {
                    in_flight,
                    not_arrived,
                } => {
                    tracing::warn!(
                        in_flight,
                        not_arrived,
                        "drain grace expired; closing with streams in flight"
                    );
                    transport.close(CloseCode::Normal, "connector shutting down");
                    return Some(Ok(()));
                }
                ConnectorEvent::Close { code, reason } => {
                    transport.close(code, &reason.to_string());
                    return Some(Err(anyhow::Error::new(reason).context("tunnel protocol")));
                }
            }
        }
        None
    }
}

/// A sentence for the operator for the relay's close code, `None` for an orderly close.
fn close_reason(code: CloseCode) -> Option<&'static str> {
    match code {
        CloseCode::Revoked => Some("this connector's certificate was revoked"),
        CloseCode::Shutdown => Some("the relay is restarting"),
        CloseCode::Protocol => Some("protocol error"),
        CloseCode::WrongRole => Some("wrong certificate role"),
        CloseCode::Normal => None,
    }
}

async fn serve_stream(mut stream: BiStream, origins: Arc<Origins>) {
    let header = tokio::time::timeout(HEADER_TIMEOUT, async {
        let mut prefix = [0u8; 3];
        stream.recv.read_exact(&mut prefix).await?;
        let len = StreamHeader::body_len(prefix)?;
        let mut buf = vec![0u8; 3 + len];
        buf[..3].copy_from_slice(&prefix);
        stream.recv.read_exact(&mut buf[3..]).await?;
        Ok::<_, anyhow::Error>(StreamHeader::decode(&buf)?)
    })
    .await;
    let header = match header {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(error = %format!("{e:#}"), "bad stream header");
            return;
        }
        Err(_) => return,
    };
    // Resolves once the relay has everything written here (or stopped reading): a drain
    // then closes the connection only after in-flight responses were delivered, not just
    // handed to the transport.
    let delivered = stream.send.delivered();
    origins.serve_http(header, stream).await;
    let _ = tokio::time::timeout(DELIVERY_TIMEOUT, delivered).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_searches_for_large_datagrams() {
        let t = transport(portcullis_shared::config::QuicCongestion::default());
        assert!(
            portcullis_shared::udp::searches_to_max_datagram(&t),
            "{t:?}"
        );
    }

    #[test]
    fn backoff_spreads_the_first_retry_then_grows_with_jitter_and_is_capped() {
        // The first retries of many connectors spread over the whole window.
        let firsts: Vec<Duration> = (0..200).map(|_| Backoff::default().next_delay()).collect();
        assert!(firsts.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(firsts.iter().any(|d| *d < BACKOFF_MAX / 4));
        assert!(firsts.iter().any(|d| *d > BACKOFF_MAX * 3 / 4));
        let mut b = Backoff::default();
        b.next_delay();
        let second = b.next_delay();
        assert!(
            second >= BACKOFF_MIN && second <= BACKOFF_MIN * 2,
            "{second:?}"
        );
        for _ in 0..40 {
            assert!(b.next_delay() <= BACKOFF_MAX);
        }
        let late = b.next_delay();
        assert!(late >= BACKOFF_MAX / 2 && late <= BACKOFF_MAX, "{late:?}");
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MAX);
    }
}
