//! Who is on the other end of a connection to one of the agent's loopback listeners (the
//! proxy and TCP forwards): they carry the device's identity to the relay, so only the
//! user running the agent may use them.
//!
//! On Linux the peer's socket is found in `/proc/net/tcp` and `/proc/net/tcp6` (local
//! address = the peer's, remote = ours), whose `uid` column is the user that owns it, and
//! compared with the agent's effective uid (`/proc/self/status`). If the peer cannot be
//! found, the connection is refused. Elsewhere there is no such table and the check
//! allows every local connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether the connection from `peer` to our `local` address belongs to the user running
/// the agent. Reads procfs: call it off the async threads.
#[cfg(target_os = "linux")]
pub(crate) fn same_user(peer: SocketAddr, local: SocketAddr) -> bool {
    let Some(ours) = own_uid() else {
        tracing::warn!("cannot read this process's uid: refusing the local connection");
        return false;
    };
    let found = ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .find_map(|text| socket_owner(&text, peer, local));
    match found {
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

/// [`same_user`] on the blocking pool.
pub(crate) async fn allowed(peer: SocketAddr, local: SocketAddr) -> bool {
    tokio::task::spawn_blocking(move || same_user(peer, local))
        .await
        .unwrap_or(false)
}

/// Elsewhere: no socket table to read, every local connection is allowed.
#[cfg(not(target_os = "linux"))]
pub(crate) fn same_user(_peer: SocketAddr, _local: SocketAddr) -> bool {
    true
}

/// The effective uid, from the `Uid:` line of `/proc/self/status` (real, effective, ...).
#[cfg(target_os = "linux")]
fn own_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
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
    #[test]
    fn a_connection_from_this_process_is_the_same_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(same_user(peer, listener.local_addr().unwrap()));
        assert!(!same_user(
            "127.0.0.1:1".parse().unwrap(),
            listener.local_addr().unwrap()
        ));
    }
}
