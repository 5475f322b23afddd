//! A UDP path between QUIC peers that the test can see: [`UdpPath`] forwards datagrams
//! between clients and one server on loopback and reads the QUIC packet type of each
//! datagram it carries, so a test can assert on what crossed the wire (a Retry, say)
//! rather than on what either end reports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::UdpSocket;
use tokio::task::JoinSet;

/// The type of a QUIC version 1 packet, read from its first byte and version field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicPacket {
    /// Long header, Initial.
    Initial,
    /// Long header, 0-RTT.
    ZeroRtt,
    /// Long header, Handshake.
    Handshake,
    /// Long header, Retry (address validation).
    Retry,
    /// Long header with version 0.
    VersionNegotiation,
    /// Short header (1-RTT).
    Short,
}

impl QuicPacket {
    /// The first packet type of `datagram`, if it looks like QUIC.
    pub fn of(datagram: &[u8]) -> Option<Self> {
        let first = *datagram.first()?;
        if first & 0x80 == 0 {
            return Some(Self::Short);
        }
        let version = u32::from_be_bytes(datagram.get(1..5)?.try_into().ok()?);
        if version == 0 {
            return Some(Self::VersionNegotiation);
        }
        Some(match (first >> 4) & 0b11 {
            0 => Self::Initial,
            1 => Self::ZeroRtt,
            2 => Self::Handshake,
            _ => Self::Retry,
        })
    }
}

/// Counts of the datagrams a [`UdpPath`] carried from the server to its clients.
#[derive(Debug, Default)]
pub struct PathCounts {
    /// Every datagram towards clients.
    pub to_clients: AtomicU64,
    /// Of those, the ones that were a Retry.
    pub retries: AtomicU64,
    /// Every datagram towards the server.
    pub to_server: AtomicU64,
    /// While set, datagrams are dropped both ways (a path gone dark, a peer gone).
    pub blackhole: std::sync::atomic::AtomicBool,
}

/// A forwarding UDP path on `127.0.0.1`: each client address gets its own socket towards
/// the server, as a NAT would give it. Dropping it stops forwarding.
pub struct UdpPath {
    /// Where clients send.
    pub addr: SocketAddr,
    /// What crossed it.
    pub counts: Arc<PathCounts>,
    tasks: JoinSet<()>,
}

impl UdpPath {
    /// Starts forwarding to `server`.
    pub async fn start(server: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let counts = Arc::new(PathCounts::default());
        let mut tasks = JoinSet::new();
        tasks.spawn(forward(front, server, counts.clone()));
        Self {
            addr,
            counts,
            tasks,
        }
    }

    /// Drops every datagram from now on, both ways, or forwards them again.
    pub fn set_blackhole(&self, on: bool) {
        self.counts.blackhole.store(on, Ordering::Relaxed);
    }

    /// How many Retry packets went from the server to a client.
    pub fn retries(&self) -> u64 {
        self.counts.retries.load(Ordering::Relaxed)
    }
}

impl Drop for UdpPath {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// The largest datagram the path carries (QUIC's own limit is lower).
const MAX_DATAGRAM: usize = 65_535;

async fn forward(front: Arc<UdpSocket>, server: SocketAddr, counts: Arc<PathCounts>) {
    let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut returns = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok((n, client)) = front.recv_from(&mut buf).await {
        let back = match backs.get(&client) {
            Some(back) => back.clone(),
            None => {
                let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if back.connect(server).await.is_err() {
                    continue;
                }
                let back = Arc::new(back);
                backs.insert(client, back.clone());
                returns.spawn(back_to_client(
                    back.clone(),
                    front.clone(),
                    client,
                    counts.clone(),
                ));
                back
            }
        };
        if counts.blackhole.load(Ordering::Relaxed) {
            continue;
        }
        counts.to_server.fetch_add(1, Ordering::Relaxed);
        // A full socket buffer loses the datagram, as a congested path would.
        let _ = back.send(&buf[..n]).await;
    }
}

async fn back_to_client(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    counts: Arc<PathCounts>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok(n) = back.recv(&mut buf).await {
        if counts.blackhole.load(Ordering::Relaxed) {
            continue;
        }
        counts.to_clients.fetch_add(1, Ordering::Relaxed);
        if QuicPacket::of(&buf[..n]) == Some(QuicPacket::Retry) {
            counts.retries.fetch_add(1, Ordering::Relaxed);
        }
        let _ = front.send_to(&buf[..n], client).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_types_are_read_from_the_first_byte_and_version() {
        let v1 = [0, 0, 0, 1];
        let long = |first: u8| [&[first][..], &v1[..], &[8][..]].concat();
        assert_eq!(QuicPacket::of(&long(0xc3)), Some(QuicPacket::Initial));
        assert_eq!(QuicPacket::of(&long(0xd0)), Some(QuicPacket::ZeroRtt));
        assert_eq!(QuicPacket::of(&long(0xe1)), Some(QuicPacket::Handshake));
        assert_eq!(QuicPacket::of(&long(0xf0)), Some(QuicPacket::Retry));
        assert_eq!(
            QuicPacket::of(&[0x80, 0, 0, 0, 0]),
            Some(QuicPacket::VersionNegotiation)
        );
        assert_eq!(QuicPacket::of(&[0x41, 1, 2]), Some(QuicPacket::Short));
        assert_eq!(QuicPacket::of(&[0xc0, 0, 0]), None);
        assert_eq!(QuicPacket::of(&[]), None);
    }
}
