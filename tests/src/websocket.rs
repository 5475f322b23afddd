//! WebSocket spoken by hand over each HTTP version: the HTTP/1.1 upgrade handshake,
//! HTTP/2 extended CONNECT (RFC 8441), the HTTP/3 request (RFC 9220), and masked frames.

use crate::{RelayAddrs, World, h2_connect, headers_frame, read_head};

/// A WebSocket over HTTP/2 extended CONNECT (RFC 8441) to `https://host/ws` as `device`,
/// once the relay's SETTINGS allow it: the stream to write WebSocket frames on, and the
/// one to read them from (status 200 already checked).
pub async fn h2_websocket(
    w: &World,
    relay: &RelayAddrs,
    device: &str,
    host: &str,
) -> (h2::SendStream<bytes::Bytes>, h2::RecvStream) {
    // h2_connect returns once the relay's SETTINGS (with ENABLE_CONNECT_PROTOCOL) apply.
    let mut h2 = h2_connect(w, relay, device, host)
        .await
        .ready()
        .await
        .unwrap();
    assert!(h2.is_extended_connect_protocol_enabled());
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{host}:{}/ws", relay.https.port()))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (resp, send) = h2.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    (send, resp.into_body())
}

/// The HEADERS frame of an RFC 9220 WebSocket (extended CONNECT over HTTP/3) to
/// `https://authority/ws`.
pub fn h3_websocket_request(authority: &str) -> Vec<u8> {
    headers_frame(&[
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "https"),
        (":authority", authority),
        (":path", "/ws"),
        ("sec-websocket-version", "13"),
    ])
}

/// A masked client WebSocket frame (RFC 6455 §5.2) with opcode `op` (1 text, 8 close,
/// 9 ping) and a payload under 126 bytes: WebSocket spoken by hand, so every hop's
/// framing can be checked byte for byte.
pub fn ws_client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | op, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Sends an HTTP/1.1 WebSocket handshake for `target` (origin-form, or absolute-form to a
/// proxy) with `Host: host` and the RFC 6455 §1.3 sample key, and checks the `101` and
/// that the origin's accept key for it came through untouched; returns the head,
/// lower-cased.
pub async fn ws_handshake<S>(io: &mut S, target: &str, host: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let handshake = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    io.write_all(handshake.as_bytes()).await.unwrap();
    let head = read_head(io).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    head
}
