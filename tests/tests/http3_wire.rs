//! HTTP/3 spoken by hand against the real relay: RFC 9220 WebSocket, and the malformed,
//! oversized and out-of-place frames and sections the relay's guard must refuse before
//! anything reaches h3's buffers or the origin.

#![allow(clippy::unwrap_used)]

use portcullis_e2e::{
    APP, RawH3, RawH3End, Stack, data_frame, h3_websocket_request, headers_frame, ws_client_frame,
};
use portcullis_shared::h3wire;

const H3_FRAME_UNEXPECTED: u64 = 0x105;
const H3_FRAME_ERROR: u64 = 0x106;
const H3_EXCESSIVE_LOAD: u64 = 0x107;
const H3_MESSAGE_ERROR: u64 = 0x10e;
const QPACK_DECOMPRESSION_FAILED: u64 = 0x200;

#[tokio::test]
async fn websocket_over_http3_extended_connect_echoes_messages_and_pings() {
    let s = Stack::up().await;
    let h3 = RawH3::connect(&s.w, &s.addrs, "alice", APP).await;
    let mut ws = h3.open(&h3_websocket_request(APP)).await;
    // RFC 9220: the origin's 101 becomes a 200 on the extended CONNECT stream.
    assert_eq!(ws.response().await, Ok(200));
    for i in 0..20 {
        let text = format!("over h3 {i}");
        ws.send
            .write_all(&data_frame(&ws_client_frame(0x1, text.as_bytes())))
            .await
            .unwrap();
        let got = ws.data(2 + text.len()).await.unwrap();
        assert_eq!(&got[..2], &[0x81, text.len() as u8]);
        assert_eq!(&got[2..], text.as_bytes());
    }
    // The origin answers a ping with a pong carrying the same payload.
    ws.send
        .write_all(&data_frame(&ws_client_frame(0x9, b"still there?")))
        .await
        .unwrap();
    let got = ws.data(2 + 12).await.unwrap();
    assert_eq!(&got[..2], &[0x8a, 12]);
    assert_eq!(&got[2..], b"still there?");
    // A close frame ends the stream cleanly: a FIN, not a reset.
    ws.send
        .write_all(&data_frame(&[0x88, 0x80, 1, 2, 3, 4]))
        .await
        .unwrap();
    let end = loop {
        if let Err(end) = ws.frame().await {
            break end;
        }
    };
    assert_eq!(end, RawH3End::Finished);

    // Same device auth and policy as every other request: bob may not reach APP.
    let bob = RawH3::connect(&s.w, &s.addrs, "bob", APP).await;
    assert_eq!(bob.status_of(&h3_websocket_request(APP)).await, Ok(403));
    // An extended CONNECT for a protocol nobody implements is refused.
    let other = headers_frame(&[
        (":method", "CONNECT"),
        (":protocol", "x-unknown"),
        (":scheme", "https"),
        (":authority", APP),
        (":path", "/ws"),
    ]);
    assert_eq!(h3.status_of(&other).await, Ok(501));
    let log = std::fs::read_to_string(s.w.path("state/access.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"path\":\"/ws\"") && l.contains("HTTP/3")),
        "{log}"
    );
}

fn get(path: &str) -> Vec<(&'static str, String)> {
    vec![
        (":method", "GET".into()),
        (":scheme", "https".into()),
        (":authority", APP.into()),
        (":path", path.into()),
    ]
}

fn frame_of(fields: &[(&str, String)]) -> Vec<u8> {
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
    headers_frame(&pairs)
}

#[tokio::test]
async fn malformed_http3_requests_are_refused_and_never_reach_the_origin() {
    let s = Stack::up().await;
    let h3 = RawH3::connect(&s.w, &s.addrs, "alice", APP).await;
    assert_eq!(h3.status_of(&frame_of(&get("/h3-ok"))).await, Ok(200));

    let mut malformed: Vec<(&str, Vec<(&str, String)>)> = Vec::new();
    let mut dup = get("/h3-dup");
    dup.push((":path", "/h3-dup-second".into()));
    malformed.push(("a repeated pseudo-header field", dup));
    let mut late = get("/h3-late");
    late.insert(2, ("x-early", "1".into()));
    malformed.push(("a pseudo-header field after a regular one", late));
    let mut crlf = get("/h3-crlf");
    crlf.push(("x-a", "v\r\nx-injected: 1".into()));
    malformed.push(("CR LF in a value", crlf));
    let mut nul = get("/h3-nul");
    nul.push(("x-a", "v\0w".into()));
    malformed.push(("NUL in a value", nul));
    let mut name = get("/h3-name");
    name.push(("x-a\r\nx-b", "1".into()));
    malformed.push(("CR LF in a name", name));
    let mut status = get("/h3-status");
    status.push((":status", "200".into()));
    malformed.push(("a response pseudo-header in a request", status));
    let mut conn = get("/h3-connection");
    conn.push(("connection", "keep-alive".into()));
    malformed.push(("a connection-specific field", conn));
    for (what, fields) in &malformed {
        assert_eq!(
            h3.status_of(&frame_of(fields)).await,
            Err(RawH3End::Reset(H3_MESSAGE_ERROR)),
            "{what}"
        );
    }

    // An unknown (grease) frame with a 64 KiB payload before the headers is skipped.
    let mut grease = Vec::new();
    h3wire::encode_frame(0x1f * 7 + 0x21, &vec![7u8; 64 * 1024], &mut grease);
    grease.extend(frame_of(&get("/h3-grease")));
    assert_eq!(h3.status_of(&grease).await, Ok(200));

    // A HEADERS frame declaring 1 GiB is answered 431 at once: the relay neither waits
    // for nor buffers what was declared.
    let mut huge = Vec::new();
    h3wire::encode_varint(h3wire::FRAME_HEADERS, &mut huge);
    h3wire::encode_varint(1 << 30, &mut huge);
    huge.extend_from_slice(&[0u8; 32 * 1024]);
    let mut stream = h3.open(&huge).await;
    assert_eq!(stream.response().await, Ok(431));

    // The connection kept serving through all of it.
    assert_eq!(h3.status_of(&frame_of(&get("/h3-after"))).await, Ok(200));
    let origin = s.origin.log_text();
    for path in ["/h3-ok", "/h3-grease", "/h3-after"] {
        let line = format!("origin request: GET {path}");
        assert!(
            origin.lines().any(|l| l == line),
            "{path} missing:\n{origin}"
        );
    }
    for (what, fields) in &malformed {
        let path = &fields.iter().find(|(n, _)| *n == ":path").unwrap().1;
        assert!(
            !origin.contains(path.as_str()),
            "{what} reached the origin:\n{origin}"
        );
    }

    // Connection errors close only the offending connection; others are unaffected.
    let mut truncated = frame_of(&get("/h3-truncated"));
    truncated.truncate(truncated.len() - 3);
    let connection_errors: [(&str, Vec<u8>, u64); 3] = [
        // A SETTINGS frame on a request stream (RFC 9114 §7.2.4).
        (
            "SETTINGS on a request stream",
            vec![0x04, 0x00],
            H3_FRAME_UNEXPECTED,
        ),
        // A frame cut short by the end of the stream (RFC 9114 §7.1).
        ("a truncated HEADERS frame", truncated, H3_FRAME_ERROR),
        // A section that refers to the dynamic table the relay never offered.
        (
            "a dynamic table reference",
            vec![0x01, 0x03, 0x01, 0x00, 0x80],
            QPACK_DECOMPRESSION_FAILED,
        ),
    ];
    for (what, bytes, code) in connection_errors {
        let bad = RawH3::connect(&s.w, &s.addrs, "alice", APP).await;
        // The stream may see the close, or a FIN just before it.
        let _ = bad.status_of(&bytes).await;
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), bad.conn.closed())
            .await
            .unwrap_or_else(|_| panic!("{what}: the connection stayed open"));
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == code),
            "{what}: {closed:?}"
        );
        assert_eq!(
            h3.status_of(&frame_of(&get("/h3-still"))).await,
            Ok(200),
            "{what}"
        );
    }
    assert!(!s.origin.log_text().contains("/h3-truncated"));

    // A client that keeps declaring huge sections is answered 431 each time, then treated
    // as a flood (more than 100 abandoned requests in 10 s) and closed with
    // H3_EXCESSIVE_LOAD; nothing was buffered, so the relay's memory stays small.
    let flood = RawH3::connect(&s.w, &s.addrs, "alice", APP).await;
    let mut answered = 0;
    for _ in 0..1000 {
        let Ok((mut send, _recv)) = flood.conn.open_bi().await else {
            break;
        };
        if send.write_all(&huge).await.is_err() {
            break;
        }
        answered += 1;
    }
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), flood.conn.closed())
        .await
        .expect("the flooding connection stayed open");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == H3_EXCESSIVE_LOAD),
        "{closed:?}"
    );
    assert!(answered > 100, "closed after only {answered} streams");
    let peak = portcullis_e2e::peak_rss(s.relay.child.id().unwrap());
    eprintln!(
        "{answered} streams declaring 1 GiB sections; relay peak RSS {} MiB",
        peak >> 20
    );
    assert!(peak < 100 << 20, "relay peak RSS {peak} bytes");
    assert_eq!(h3.status_of(&frame_of(&get("/h3-last"))).await, Ok(200));
}
