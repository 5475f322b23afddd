//! Dialling a relay: the QUIC client configuration (and TLS over TCP where UDP is
//! blocked), one endpoint per address family, the tunnel's timeouts, and the jittered
//! backoff between attempts. Nothing here knows of sessions or of the live configuration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use portcullis_shared::config::ConnectorConfig;
use portcullis_shared::pki;
use portcullis_shared::proto::{TUNNEL_ALPN, TUNNEL_TCP_ALPN};
use portcullis_shared::tcp_transport::{PeerInfo, TcpSettings, TcpTransport};
use quinn::VarInt;
use quinn::crypto::rustls::QuicClientConfig;

pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The cap is short so that a relay back from a long outage (beyond the stateless-reset
/// fast path) is found again within about two seconds; a dial is one small UDP packet.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a QUIC handshake may take before the tunnel goes over TCP instead. With the
/// first retry after a lost tunnel (at most [`BACKOFF_MAX`]) and the TCP handshake, a
/// connector whose UDP is blocked is back within 5 s of losing its tunnel.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// A QUIC handshake tried while on TCP may take this long (it costs nothing to wait).
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait before trying QUIC again while on TCP; it doubles up to
/// [`PROBE_MAX`], so UDP that returns is used again within about 20 s.
pub(crate) const PROBE_MIN: Duration = Duration::from_secs(1);
pub(crate) const PROBE_MAX: Duration = Duration::from_secs(15);
pub(crate) const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A PING (QUIC or HTTP/2) this often; see [`client_config`].
pub(crate) const KEEP_ALIVE: Duration = Duration::from_millis(250);
/// Nothing from the relay for this long and the tunnel is gone.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Streams the relay may have open on a tunnel at once. The relay bounds them itself
/// (`max_streams_per_connector`, 4096 by default, answering 503 beyond); this stays above
/// that default even while QUIC owes back stream credit (up to an eighth), so the relay's
/// own limit is what a client meets. (At 1024 the relay's next stream waited for credit
/// instead of being refused.) Not higher: quinn keeps an entry per stream it allows.
pub(crate) const RELAY_STREAMS: u32 = 4800;
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a finished stream's task waits for the relay to acknowledge its data.
pub(crate) const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub(crate) async fn quic(
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
    pub(crate) async fn tcp(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> anyhow::Result<TcpTransport> {
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
    .map_err(|_| {
        anyhow::anyhow!(
            "{} is not the key of {}: give the key the certificate was issued for (or enrol again)",
            config.key.display(),
            config.cert.display()
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
