//! UDP sockets sized for QUIC.
//!
//! The kernel's default UDP buffers (208 KiB on most Linux systems) hold a fraction of a
//! millisecond of a fast QUIC connection: when the process is a moment late reading, the
//! kernel drops what does not fit (`UdpRcvbufErrors` in `nstat`), and each drop costs the
//! connection a retransmission and a congestion-window cut shared by all its streams. So
//! the relay, the connector and the agent size their sockets themselves, as large as the
//! system allows up to [`WANTED`]: first within `net.core.rmem_max` / `wmem_max`, then
//! beyond them where the process may (`SO_RCVBUFFORCE`, with `CAP_NET_ADMIN`). What they
//! obtained is logged once, with the sysctl to raise when it falls short.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};

/// The buffer size asked for in each direction: 8 MiB holds about 5 ms at 10 Gbit/s,
/// or the whole 16 MiB connection window of a few connections at once (as quic-go and
/// cloudflared ask for 7 MiB).
pub const WANTED: usize = 8 << 20;

/// The largest UDP payload a QUIC connection of the relay, the connector or the agent
/// grows its datagrams to, where the path carries them.
///
/// Each datagram costs both ends a fixed amount of work whatever its size (a packet
/// number, header protection, a sent-packet record, its share of ACKs, one segment of a
/// send), so where the path's MTU is larger than Ethernet's (loopback, a relay and
/// connector on one host, a network with jumbo frames) fewer, larger datagrams move the
/// same bytes for less CPU. quinn finds what the path carries (RFC 8899 probes, from
/// 1,200 bytes up, repeated every ten minutes): on an ordinary 1,500-byte path the
/// connection settles near 1,450 bytes (1,446-1,466) as before, and one that stops carrying large
/// datagrams falls back to 1,200 (black-hole detection) and searches again a minute later.
///
/// Why 6,500 and not the 65,527 QUIC allows: quinn hands the kernel up to 10 datagrams in
/// one segmented send (GSO), and the kernel refuses a send of more than 65,507 bytes. 10 x
/// 6,500 fits; with larger datagrams every full batch would fail, which quinn would take
/// for a black hole (quinn drops a refused send without a word, so it would show only as
/// loss). The tests below check a loopback connection reaches this size and keeps it.
pub const MAX_DATAGRAM: u16 = 6_500;

/// `config` accepting datagrams of up to [`MAX_DATAGRAM`] bytes from peers (quinn's
/// default, 1,472, caps what a peer may send whatever the path).
pub fn endpoint_config(mut config: quinn::EndpointConfig) -> quinn::EndpointConfig {
    // MAX_DATAGRAM is within QUIC's bounds (1,200..=65,527), so this cannot fail.
    let _ = config.max_udp_payload_size(MAX_DATAGRAM);
    config
}

/// Lets MTU discovery on `transport` search up to [`MAX_DATAGRAM`] (quinn stops at 1,452
/// by default); the peer's own limit still caps it.
pub fn discover_mtu(transport: &mut quinn::TransportConfig) {
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(MAX_DATAGRAM);
    transport.mtu_discovery_config(Some(discovery));
}

/// Whether `transport`'s MTU discovery searches up to [`MAX_DATAGRAM`] (as
/// [`discover_mtu`] sets it): for the daemons' tests of their own settings. quinn offers
/// no getter, so this reads its debug form.
pub fn searches_to_max_datagram(transport: &quinn::TransportConfig) -> bool {
    format!("{transport:?}").contains(&format!("upper_bound: {MAX_DATAGRAM},"))
}

/// Whether `config` accepts datagrams of [`MAX_DATAGRAM`] bytes (as [`endpoint_config`]
/// sets it), read from its debug form like [`searches_to_max_datagram`].
pub fn accepts_max_datagram(config: &quinn::EndpointConfig) -> bool {
    format!("{config:?}").contains(&format!("max_udp_payload_size: {MAX_DATAGRAM},"))
}

/// Buffer sizes a socket obtained, in bytes as asked for (Linux reports double, for its
/// bookkeeping; the figures here are halved back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    /// The receive buffer (`SO_RCVBUF`).
    pub receive: usize,
    /// The send buffer (`SO_SNDBUF`).
    pub send: usize,
}

impl BufferSizes {
    /// Whether either direction got less than `wanted`.
    pub fn short_of(&self, wanted: usize) -> bool {
        self.receive < wanted || self.send < wanted
    }
}

/// Binds a UDP socket on `addr` and sizes its buffers (see [`size`]).
pub fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, BufferSizes)> {
    let socket = UdpSocket::bind(addr)?;
    let sizes = size(&socket, WANTED);
    Ok((socket, sizes))
}

/// Asks for `wanted` bytes in each direction, forcing past the system maximum where the
/// process is allowed to, and returns what the socket obtained. Never fails: a socket
/// that keeps smaller buffers still works, only slower under load.
pub fn size(socket: &UdpSocket, wanted: usize) -> BufferSizes {
    use rustix::net::sockopt;
    // The plain option is capped at the sysctl maximum; the forced one ignores it but
    // needs CAP_NET_ADMIN. Try forced first so a privileged process is never capped,
    // and fall back silently (EPERM is the common case).
    #[cfg(target_os = "linux")]
    {
        if sockopt::set_socket_recv_buffer_size_force(socket, wanted).is_err() {
            let _ = sockopt::set_socket_recv_buffer_size(socket, wanted);
        }
        if sockopt::set_socket_send_buffer_size_force(socket, wanted).is_err() {
            let _ = sockopt::set_socket_send_buffer_size(socket, wanted);
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sockopt::set_socket_recv_buffer_size(socket, wanted);
        let _ = sockopt::set_socket_send_buffer_size(socket, wanted);
    }
    let reported = |v: rustix::io::Result<usize>| {
        let v = v.unwrap_or(0);
        if cfg!(target_os = "linux") { v / 2 } else { v }
    };
    BufferSizes {
        receive: reported(sockopt::socket_recv_buffer_size(socket)),
        send: reported(sockopt::socket_send_buffer_size(socket)),
    }
}

/// A QUIC client endpoint (never listening) on a sized socket bound to `local`, its
/// sizes reported once per process (see [`report`]).
pub fn client_endpoint(local: SocketAddr) -> io::Result<quinn::Endpoint> {
    let (socket, sizes) = bind(local)?;
    report(sizes);
    quinn::Endpoint::new(
        endpoint_config(quinn::EndpointConfig::default()),
        None,
        socket,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}

static REPORTED: AtomicBool = AtomicBool::new(false);

/// Logs what the first QUIC socket of this process obtained (later sockets get the same):
/// at info when it is what was asked for, else a warning naming the sysctls to raise.
pub fn report(sizes: BufferSizes) {
    if REPORTED.swap(true, Ordering::Relaxed) {
        return;
    }
    let (receive_kib, send_kib, wanted_kib) = (sizes.receive >> 10, sizes.send >> 10, WANTED >> 10);
    if sizes.short_of(WANTED) {
        tracing::warn!(
            receive_kib,
            send_kib,
            wanted_kib,
            "UDP socket buffers smaller than wanted: under load the kernel will drop QUIC \
             datagrams (nstat UdpRcvbufErrors); raise the limits with \
             `sysctl -w net.core.rmem_max={WANTED} net.core.wmem_max={WANTED}` \
             (or run with CAP_NET_ADMIN) and restart"
        );
    } else {
        tracing::info!(receive_kib, send_kib, "UDP socket buffers sized for QUIC");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket is sized to at least the kernel's default and never fails to bind for
    /// it; where the process may force or the sysctl allows, it gets all it asked for.
    #[test]
    fn sizes_a_socket_and_reports_what_it_got() -> io::Result<()> {
        let plain = UdpSocket::bind("127.0.0.1:0")?;
        let default = rustix::net::sockopt::socket_recv_buffer_size(&plain)?;
        let (socket, sizes) = bind("127.0.0.1:0".parse().map_err(io::Error::other)?)?;
        assert!(socket.local_addr()?.port() != 0);
        let reported_default = if cfg!(target_os = "linux") {
            default / 2
        } else {
            default
        };
        assert!(
            sizes.receive >= reported_default,
            "{sizes:?} below default {default}"
        );
        let max = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(0)
        };
        let allowed = max("rmem_max").min(max("wmem_max"));
        if sockopt_force_allowed() || allowed >= WANTED {
            assert!(!sizes.short_of(WANTED), "{sizes:?}");
        } else {
            assert!(sizes.short_of(WANTED), "{sizes:?}");
        }
        Ok(())
    }

    /// Over loopback (MTU 65,536) a connection with the datagram settings the relay, the
    /// connector and the agent share ([`endpoint_config`], [`discover_mtu`]; each daemon's
    /// test checks it uses them) grows its datagrams to MAX_DATAGRAM while it sends, and
    /// keeps them:
    /// with datagrams too large for quinn's segmented sends the kernel would refuse every
    /// full batch and quinn would fall back to 1,200 bytes (a black hole), so this fails
    /// if a quinn upgrade batches more per send than MAX_DATAGRAM allows for.
    #[tokio::test]
    async fn a_loopback_connection_grows_its_datagrams_and_keeps_them()
    -> Result<(), Box<dyn std::error::Error>> {
        use std::sync::Arc;
        let lo_mtu = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok());
        if lo_mtu.is_some_and(|mtu| mtu < MAX_DATAGRAM + 28) {
            eprintln!("skipped: loopback MTU {lo_mtu:?} is below {MAX_DATAGRAM} + 28");
            return Ok(());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        server_tls.alpn_protocols = vec![b"test".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone())?;
        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![b"test".to_vec()];
        let transport = || {
            let mut t = quinn::TransportConfig::default();
            discover_mtu(&mut t);
            Arc::new(t)
        };

        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
        ));
        server_config.transport_config(transport());
        let (socket, _) = bind("127.0.0.1:0".parse()?)?;
        let server = quinn::Endpoint::new(
            endpoint_config(quinn::EndpointConfig::default()),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let server_addr = server.local_addr()?;
        let receiver = tokio::spawn(async move {
            let conn = server.accept().await.ok_or("no connection")?.await?;
            let (_, mut recv) = conn.accept_bi().await?;
            let got = recv.read_to_end(usize::MAX).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(got.len())
        });

        let client = client_endpoint("127.0.0.1:0".parse()?)?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
        ));
        client_config.transport_config(transport());
        let conn = client
            .connect_with(client_config, server_addr, "localhost")?
            .await?;
        let (mut send, _) = conn.open_bi().await?;
        // 1 MiB writes until discovery has reached the largest size (a few round trips),
        // then 32 MiB more: thousands of full batches of that size.
        let chunk = vec![7u8; 1 << 20];
        let (mut sent, mut reached_at) = (0usize, None);
        while reached_at.is_none_or(|at| sent < at + (32 << 20)) && sent < 256 << 20 {
            send.write_all(&chunk).await?;
            sent += chunk.len();
            if reached_at.is_none() && conn.stats().path.current_mtu > MAX_DATAGRAM - 20 {
                reached_at = Some(sent);
            }
        }
        send.finish()?;
        let got = tokio::time::timeout(std::time::Duration::from_secs(60), receiver)
            .await?
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        assert_eq!(got, sent);
        let stats = conn.stats();
        assert!(
            reached_at.is_some(),
            "never grew past {} bytes: {stats:?}",
            stats.path.current_mtu
        );
        assert_eq!(stats.path.black_holes_detected, 0, "{stats:?}");
        assert!(stats.path.current_mtu > MAX_DATAGRAM - 20, "{stats:?}");
        if stats.udp_tx.datagrams == stats.udp_tx.ios {
            eprintln!("no segmentation offload here: the batch size was not exercised");
        }
        Ok(())
    }

    /// Whether this process may force buffer sizes (CAP_NET_ADMIN), probed on a socket.
    fn sockopt_force_allowed() -> bool {
        #[cfg(target_os = "linux")]
        {
            UdpSocket::bind("127.0.0.1:0").is_ok_and(|s| {
                rustix::net::sockopt::set_socket_recv_buffer_size_force(&s, 4096).is_ok()
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }
}
