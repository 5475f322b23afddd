//! HTTP/2 against the relay with the h2 library: a connection as a device, and reading
//! bodies with flow control released as they are read.

use crate::{RelayAddrs, World, tls_connect};

/// An HTTP/2 connection to the relay (SNI `sni`) as device `device`, returned once the
/// relay's SETTINGS are in force (e.g. extended CONNECT): a PING is answered only after
/// them, and h2 applies a SETTINGS frame before it reads the next frame.
pub async fn h2_connect(
    w: &World,
    relay: &RelayAddrs,
    device: &str,
    sni: &str,
) -> h2::client::SendRequest<bytes::Bytes> {
    let tls = tls_connect(w, relay, sni, device, &[b"h2"]).await;
    let (send, mut conn) = h2::client::handshake(tls).await.unwrap();
    let mut ping = conn.ping_pong().expect("a new connection's ping handle");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    ping.ping(h2::Ping::opaque()).await.unwrap();
    send
}

/// Reads exactly `n` bytes of an h2 body, keeping any surplus in `pending`.
pub async fn h2_read_exact(body: &mut h2::RecvStream, pending: &mut Vec<u8>, n: usize) -> Vec<u8> {
    while pending.len() < n {
        let chunk = body.data().await.unwrap().unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        pending.extend_from_slice(&chunk);
    }
    pending.drain(..n).collect()
}

/// Reads an h2 body to the end.
pub async fn h2_read_all(body: &mut h2::RecvStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    out
}
