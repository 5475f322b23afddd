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
        quinn::EndpointConfig::default(),
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
