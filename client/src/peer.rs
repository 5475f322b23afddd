//! Who is on the other end of a connection to one of the agent's loopback listeners (the
//! proxy and TCP forwards): they carry the device's identity to the relay, so only the
//! user running the agent may use them.
//!
//! On Linux the kernel is asked for the peer's socket (local address = the peer's, remote =
//! ours) by its address pair over netlink (`NETLINK_SOCK_DIAG`, one exact lookup whatever
//! the number of sockets on the machine), else found in `/proc/net/tcp` and
//! `/proc/net/tcp6`, whose `uid` column is the user that owns it (a scan of every socket,
//! TIME_WAIT included: 100 ms per connection on a machine that had just made 100,000). The
//! owner is compared with the agent's effective uid. If the peer
//! cannot be found, the connection is refused. Elsewhere there is no such table and the check
//! allows every local connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether the connection from `peer` to our `local` address belongs to the user running
/// the agent, without blocking the async threads: the kernel answers the netlink lookup
/// at once, so it is asked here; only the table scan, where netlink is unavailable, goes to
/// the blocking pool. (Asking on the blocking pool every time, and reading the agent's uid
/// from `/proc/self/status`, was a fifth of the agent's CPU per new connection.)
#[cfg(target_os = "linux")]
pub(crate) async fn allowed(peer: SocketAddr, local: SocketAddr) -> bool {
    let owner = match diag::socket_owner(peer, local) {
        Some(uid) => Some(uid),
        None => tokio::task::spawn_blocking(move || table_owner(peer, local))
            .await
            .ok()
            .flatten(),
    };
    judge(owner, peer)
}

/// Elsewhere: no socket table to read, every local connection is allowed.
#[cfg(not(target_os = "linux"))]
pub(crate) async fn allowed(_peer: SocketAddr, _local: SocketAddr) -> bool {
    true
}

/// The owner of the peer's socket from `/proc/net/tcp` or `/proc/net/tcp6`.
#[cfg(target_os = "linux")]
fn table_owner(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .find_map(|text| socket_owner(&text, peer, local))
}

/// Allowed when the socket's owner is the agent's effective user.
#[cfg(target_os = "linux")]
fn judge(owner: Option<u32>, peer: SocketAddr) -> bool {
    let ours = rustix::process::geteuid().as_raw();
    match owner {
        Some(uid) if uid == ours => true,
        Some(uid) => {
            tracing::warn!(client.addr = %peer, client.uid = uid, "refusing a connection from another user");
            false
        }
        None => {
            tracing::warn!(client.addr = %peer, "cannot tell which user connected: refusing");
            false
        }
    }
}

/// The uid owning the socket whose local address is `peer` and remote address `local`,
/// in the text of a `/proc/net/tcp` or `/proc/net/tcp6` table.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn socket_owner(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (peer, local) = (unmapped(peer), unmapped(local));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (from, to, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        (parse_addr(from)? == peer && parse_addr(to)? == local).then(|| uid.parse().ok())?
    })
}

/// An IPv4 address seen through an IPv6 socket, as the IPv4 address it is.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the kernel prints the
/// address as 32-bit words in the machine's byte order, the port as a number.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut octets = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        octets.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match octets.len() {
        4 => IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3])),
        16 => {
            let bytes: [u8; 16] = octets.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(unmapped(SocketAddr::new(ip, port)))
}

/// The owner of a TCP socket by its address pair, from the kernel's socket diagnostics
/// (`sock_diag(7)`): an `inet_diag_req_v2` for exactly that socket, answered with an
/// `inet_diag_msg` that carries its uid.
#[cfg(target_os = "linux")]
mod diag {
    use std::net::{IpAddr, SocketAddr};

    use rustix::net::netlink::{self, SocketAddrNetlink};
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const IPPROTO_TCP: u8 = 6;
    const NLMSG_HEADER: usize = 16;
    /// Where `idiag_uid` sits in an `inet_diag_msg`: after family, state, timer, retrans
    /// (4 bytes), the socket id (48) and expires, rqueue, wqueue (12).
    const UID_AT: usize = 4 + 48 + 12;

    /// The request: a netlink header and an `inet_diag_req_v2` naming the socket whose
    /// local address is `from` and remote address `to`, in any state.
    pub(super) fn request(from: SocketAddr, to: SocketAddr) -> Vec<u8> {
        let family: u8 = if from.is_ipv4() { 2 } else { 10 };
        let mut m = Vec::with_capacity(NLMSG_HEADER + 56);
        m.extend_from_slice(&((NLMSG_HEADER + 56) as u32).to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
        m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
        m.extend_from_slice(&from.port().to_be_bytes());
        m.extend_from_slice(&to.port().to_be_bytes());
        for addr in [from.ip(), to.ip()] {
            let mut field = [0u8; 16];
            match addr {
                IpAddr::V4(v4) => field[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => field.copy_from_slice(&v6.octets()),
            }
            m.extend_from_slice(&field);
        }
        m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
        m.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
        m
    }

    /// The uid in an answer to [`request`]; `None` for an error (no such socket).
    pub(super) fn uid(answer: &[u8]) -> Option<u32> {
        let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
        if kind == NLMSG_ERROR || kind != SOCK_DIAG_BY_FAMILY {
            return None;
        }
        let at = NLMSG_HEADER + UID_AT;
        Some(u32::from_ne_bytes(answer.get(at..at + 4)?.try_into().ok()?))
    }

    /// Asks the kernel; `None` if netlink is unavailable or the socket is not found.
    pub(super) fn socket_owner(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
        // The socket is looked up in the family it was made in: a peer of an IPv6
        // listener is IPv6 even when it carries a mapped IPv4 address.
        if peer.is_ipv4() != local.is_ipv4() {
            return None;
        }
        let fd = rustix::net::socket(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            Some(netlink::SOCK_DIAG),
        )
        .ok()?;
        rustix::net::sendto(
            &fd,
            &request(peer, local),
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )
        .ok()?;
        let mut answer = [0u8; 512];
        // The kernel queues its answer while handling the request, before `sendto`
        // returns, so this never waits (it runs on the agent's async threads); were it
        // not there, the table scan would be the answer.
        let (n, _) = rustix::net::recv(&fd, &mut answer[..], RecvFlags::DONTWAIT).ok()?;
        uid(answer.get(..n)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table line in the machine's byte order, as the kernel writes it.
    fn hex(addr: SocketAddr) -> String {
        let octets = match addr.ip() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let words: String = octets
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        format!("{words}:{:04X}", addr.port())
    }

    fn table(rows: &[(SocketAddr, SocketAddr, u32)]) -> String {
        let mut text = String::from(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n",
        );
        for (i, (from, to, uid)) in rows.iter().enumerate() {
            text.push_str(&format!(
                "{i:4}: {} {} 01 00000000:00000000 00:00000000 00000000 {uid:5}        0 1234 1 0000000000000000 20 4 30 10 -1\n",
                hex(*from),
                hex(*to)
            ));
        }
        text
    }

    #[test]
    fn the_owner_of_the_peers_socket_is_found_in_either_table() {
        let proxy: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let text = table(&[
            (proxy, client, 1000),
            (client, proxy, 1001),
            (other, proxy, 1002),
        ]);
        // Our own accepted socket (local = the proxy) is not the peer's.
        assert_eq!(socket_owner(&text, client, proxy), Some(1001));
        assert_eq!(socket_owner(&text, other, proxy), Some(1002));
        assert_eq!(
            socket_owner(&text, "127.0.0.1:1".parse().unwrap(), proxy),
            None
        );
        // IPv6, and an IPv4 peer seen through an IPv6 socket.
        let proxy6: SocketAddr = "[::1]:8080".parse().unwrap();
        let client6: SocketAddr = "[::1]:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40002".parse().unwrap();
        let text = table(&[(client6, proxy6, 1003), (mapped, proxy, 1004)]);
        assert_eq!(socket_owner(&text, client6, proxy6), Some(1003));
        let v4: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        assert_eq!(socket_owner(&text, v4, proxy), Some(1004));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_connection_from_this_process_is_the_same_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(allowed(peer, listener.local_addr().unwrap()).await);
        assert!(
            !allowed(
                "127.0.0.1:1".parse().unwrap(),
                listener.local_addr().unwrap()
            )
            .await
        );
    }

    /// The kernel's answer by address pair names the same owner as the /proc table, for
    /// IPv4 and (where the machine has it) IPv6, and nothing for a pair that does not exist.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_names_the_owner_of_a_socket_by_its_addresses() {
        let ours = rustix::process::geteuid().as_raw();
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(bind) else {
                continue;
            };
            let local = listener.local_addr().unwrap();
            let _client = std::net::TcpStream::connect(local).unwrap();
            let (_accepted, peer) = listener.accept().unwrap();
            assert_eq!(diag::socket_owner(peer, local), Some(ours), "{bind}");
            let table = if local.is_ipv4() {
                "/proc/net/tcp"
            } else {
                "/proc/net/tcp6"
            };
            let text = std::fs::read_to_string(table).unwrap();
            assert_eq!(socket_owner(&text, peer, local), Some(ours), "{bind}");
            let nobody = SocketAddr::new(peer.ip(), 1);
            assert_eq!(diag::socket_owner(nobody, local), None, "{bind}");
        }
    }
}
