//! A UDP path between QUIC peers that the test can see and spoil: [`UdpPath`] forwards
//! datagrams between clients and one server on loopback, reads the QUIC packet type of
//! each datagram it carries (so a test can assert on what crossed the wire, a Retry say),
//! and can impair the path as a bad network would ([`Impairment`]: loss, delay, jitter,
//! reordering, duplication; this kernel has no `netem`), or cut it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// What a bad path does to each datagram, in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Share of datagrams dropped, 0.0 to 1.0.
    pub loss: f64,
    /// Delay added to every datagram.
    pub delay: Duration,
    /// Up to this much more delay, uniformly drawn per datagram (so datagrams overtake
    /// each other when it exceeds their spacing).
    pub jitter: Duration,
    /// Share of datagrams held back by a further `delay`, so later ones overtake them.
    pub reorder: f64,
    /// Share of datagrams delivered twice.
    pub duplicate: f64,
}

impl Impairment {
    /// When a datagram that arrives now is delivered, after how long: none if it is
    /// lost, two if it is duplicated. Pure, given the random source.
    pub fn plan(&self, rng: &mut fastrand::Rng) -> Vec<Duration> {
        if rng.f64() < self.loss {
            return Vec::new();
        }
        let once = |rng: &mut fastrand::Rng| {
            let mut d = self.delay + self.jitter.mul_f64(rng.f64());
            if rng.f64() < self.reorder {
                d += self.delay.max(Duration::from_millis(1));
            }
            d
        };
        let first = once(rng);
        if rng.f64() < self.duplicate {
            vec![first, once(rng)]
        } else {
            vec![first]
        }
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
    /// Datagrams the impairment dropped, either way.
    pub dropped: AtomicU64,
}

/// A forwarding UDP path on `127.0.0.1`: each client address gets its own socket towards
/// the server, as a NAT would give it. Dropping it stops forwarding.
pub struct UdpPath {
    /// Where clients send.
    pub addr: SocketAddr,
    /// What crossed it.
    pub counts: Arc<PathCounts>,
    impairment: Arc<std::sync::Mutex<Impairment>>,
    tasks: JoinSet<()>,
}

impl UdpPath {
    /// Starts forwarding to `server`.
    pub async fn start(server: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let counts = Arc::new(PathCounts::default());
        let impairment = Arc::new(std::sync::Mutex::new(Impairment::default()));
        let mut tasks = JoinSet::new();
        tasks.spawn(forward(front, server, counts.clone(), impairment.clone()));
        Self {
            addr,
            counts,
            impairment,
            tasks,
        }
    }

    /// Impairs the path from now on, both ways (`Impairment::default()` heals it).
    pub fn impair(&self, impairment: Impairment) {
        *self.impairment.lock().unwrap() = impairment;
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

/// One datagram on its way: when it is due, where it goes.
type Delayed = (tokio::time::Instant, Vec<u8>, Option<SocketAddr>);

/// Sends delayed datagrams on `socket` in the order they were queued, each once it is
/// due, as a delaying link does: a timer per datagram would let datagrams due in the same
/// millisecond overtake each other, which QUIC takes for loss.
fn delay_line(socket: Arc<UdpSocket>) -> tokio::sync::mpsc::UnboundedSender<Delayed> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delayed>();
    tokio::spawn(async move {
        while let Some((due, datagram, to)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            send(&socket, to, &datagram).await;
        }
    });
    tx
}

async fn send(socket: &UdpSocket, to: Option<SocketAddr>, datagram: &[u8]) {
    // A full socket buffer loses the datagram, as a congested path would.
    let _ = match to {
        Some(to) => socket.send_to(datagram, to).await,
        None => socket.send(datagram).await,
    };
}

/// Sends `datagram` on `socket` (to `to`, or its connected peer) as `impairment` plans:
/// at once, later (through `line`, in order), twice or never. A datagram held back for
/// reordering goes on a timer of its own, so later ones overtake it.
async fn deliver(
    socket: &Arc<UdpSocket>,
    line: &tokio::sync::mpsc::UnboundedSender<Delayed>,
    to: Option<SocketAddr>,
    datagram: &[u8],
    impairment: &std::sync::Mutex<Impairment>,
    rng: &mut fastrand::Rng,
    counts: &PathCounts,
) {
    let (plan, base) = {
        let imp = impairment.lock().unwrap();
        (imp.plan(rng), imp.delay + imp.jitter)
    };
    if plan.is_empty() {
        counts.dropped.fetch_add(1, Ordering::Relaxed);
    }
    for after in plan {
        if after.is_zero() {
            send(socket, to, datagram).await;
        } else if after <= base {
            let _ = line.send((tokio::time::Instant::now() + after, datagram.to_vec(), to));
        } else {
            let (socket, datagram) = (socket.clone(), datagram.to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                send(&socket, to, &datagram).await;
            });
        }
    }
}

async fn forward(
    front: Arc<UdpSocket>,
    server: SocketAddr,
    counts: Arc<PathCounts>,
    impairment: Arc<std::sync::Mutex<Impairment>>,
) {
    let mut rng = fastrand::Rng::new();
    let mut backs: HashMap<
        SocketAddr,
        (Arc<UdpSocket>, tokio::sync::mpsc::UnboundedSender<Delayed>),
    > = HashMap::new();
    let mut returns = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok((n, client)) = front.recv_from(&mut buf).await {
        let (back, line) = match backs.get(&client) {
            Some(back) => back.clone(),
            None => {
                let Ok(back) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if back.connect(server).await.is_err() {
                    continue;
                }
                let back = Arc::new(back);
                let line = delay_line(back.clone());
                backs.insert(client, (back.clone(), line.clone()));
                returns.spawn(back_to_client(
                    back.clone(),
                    front.clone(),
                    client,
                    counts.clone(),
                    impairment.clone(),
                ));
                (back, line)
            }
        };
        if counts.blackhole.load(Ordering::Relaxed) {
            continue;
        }
        counts.to_server.fetch_add(1, Ordering::Relaxed);
        deliver(
            &back,
            &line,
            None,
            &buf[..n],
            &impairment,
            &mut rng,
            &counts,
        )
        .await;
    }
}

async fn back_to_client(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    counts: Arc<PathCounts>,
    impairment: Arc<std::sync::Mutex<Impairment>>,
) {
    let mut rng = fastrand::Rng::new();
    let line = delay_line(front.clone());
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok(n) = back.recv(&mut buf).await {
        if counts.blackhole.load(Ordering::Relaxed) {
            continue;
        }
        counts.to_clients.fetch_add(1, Ordering::Relaxed);
        if QuicPacket::of(&buf[..n]) == Some(QuicPacket::Retry) {
            counts.retries.fetch_add(1, Ordering::Relaxed);
        }
        deliver(
            &front,
            &line,
            Some(client),
            &buf[..n],
            &impairment,
            &mut rng,
            &counts,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impairment_plans_loss_delay_jitter_reordering_and_duplication_in_proportion() {
        let mut rng = fastrand::Rng::with_seed(7);
        let bad = Impairment {
            loss: 0.05,
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(10),
            reorder: 0.1,
            duplicate: 0.02,
        };
        let plans: Vec<Vec<Duration>> = (0..100_000).map(|_| bad.plan(&mut rng)).collect();
        let share = |f: &dyn Fn(&Vec<Duration>) -> bool| {
            plans.iter().filter(|p| f(p)).count() as f64 / plans.len() as f64
        };
        let near = |got: f64, want: f64| (got - want).abs() < want * 0.15 + 0.002;
        assert!(near(share(&|p| p.is_empty()), 0.05));
        assert!(near(share(&|p| p.len() == 2), 0.95 * 0.02));
        let delays: Vec<Duration> = plans.iter().flatten().copied().collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= bad.delay && *d <= bad.delay * 2 + bad.jitter)
        );
        let held = delays.iter().filter(|d| **d >= bad.delay * 2).count() as f64;
        assert!(near(held / delays.len() as f64, 0.1));
        // A healthy path delivers everything once, at once.
        let mut rng = fastrand::Rng::with_seed(1);
        assert!((0..1000).all(|_| Impairment::default().plan(&mut rng) == [Duration::ZERO]));
    }

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
