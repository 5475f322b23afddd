//! Clients without a certificate, and clients from a chosen loopback source address, for
//! the abuse tests and the benchmark: a QUIC dialer (any ALPN, a device's certificate or
//! none) bound to one source address, TCP and TLS connections from one. Linux routes all
//! of 127.0.0.0/8 to loopback, so `127.0.0.N` stands for N different clients.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpSocket, TcpStream};

use crate::{World, client_tls};

/// The `n`th loopback client address, `127.0.x.y` with `n` in 1..=65_000.
pub fn loopback(n: u16) -> IpAddr {
    let [hi, lo] = n.to_be_bytes();
    IpAddr::from([127, 0, hi, lo])
}

/// A TLS client config trusting the world's CA and presenting no certificate.
pub fn stranger_tls(w: &World, alpn: &[&[u8]]) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(w.path("out").join("ca.crt")).unwrap()
    {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg
}

/// A QUIC client endpoint on `source`, dialling with one TLS config; it can hold any
/// number of connections. Like a stranger, it sends no keep-alives of its own.
pub struct QuicDialer {
    /// The endpoint (dropping it ends every connection it made).
    pub endpoint: quinn::Endpoint,
}

impl QuicDialer {
    /// An endpoint on `source` (port 0) dialling with `tls`.
    pub fn new(source: IpAddr, tls: rustls::ClientConfig) -> Self {
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0)).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        Self { endpoint }
    }

    /// A stranger on `source`: no certificate, ALPN `alpn`.
    pub fn stranger(w: &World, source: IpAddr, alpn: &[u8]) -> Self {
        Self::new(source, stranger_tls(w, &[alpn]))
    }

    /// Device `device` on `source`, ALPN `alpn`.
    pub fn device(w: &World, device: &str, source: IpAddr, alpn: &[u8]) -> Self {
        Self::new(source, client_tls(w, device, &[alpn]))
    }

    /// Connects to `relay` with TLS name `sni`; the handshake's outcome.
    pub async fn dial(
        &self,
        relay: SocketAddr,
        sni: &str,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        self.endpoint.connect(relay, sni).unwrap().await
    }
}

/// Whether a QUIC handshake ended because the server refused the connection before it
/// began (`CONNECTION_REFUSED`).
pub fn refused(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

/// A TCP connection to `to` from `source`.
pub async fn tcp_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(to).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A TLS connection from `source` to `to` with TLS name `sni` and `tls`'s identity; the
/// handshake's outcome (an error if the server closed the connection first).
pub async fn tls_from(
    source: IpAddr,
    to: SocketAddr,
    sni: &str,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(source, to).await?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned())?;
    Ok(tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?)
}
