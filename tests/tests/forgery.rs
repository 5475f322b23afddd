//! Only the relay speaks for an identity: real relay, connector and an origin that accepts
//! h2c upgrades (as Go's h2c handler does), as separate processes. A device's h2c upgrade,
//! with or without a malformed `Connection` line, never reaches the origin as HTTP/2, and
//! forged `portcullis-*` / `x-forwarded-*` headers never reach it over any protocol path:
//! HTTP/1.1, HTTP/2, HTTP/3, WebSocket over each, and HTTPS inside a CONNECT. Every path,
//! a TCP forward included, writes its access-log line.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portcullis_e2e::{
    APP, H3Client, RawH3, Stack, client_tls, eventually, h2_connect, h2_read_all, headers_frame,
    read_head, tls_connect,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// What a device claims about itself, on every request below.
const FORGED: &[(&str, &str)] = &[
    ("portcullis-user", "ceo"),
    ("portcullis-groups", "admins"),
    ("portcullis_device", "ceo-laptop"),
    ("x-forwarded-for", "10.9.9.9"),
];

/// The h2c upgrade a client sends first (RFC 7540 §3.2), with `connection` as given.
fn h2c_request(path: &str, connection: &[u8]) -> Request<Empty<Bytes>> {
    let mut req = Request::get(path)
        .header("host", APP)
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAAQAAP__")
        .body(Empty::new())
        .unwrap();
    let h = req.headers_mut();
    h.insert("connection", HeaderValue::from_bytes(connection).unwrap());
    forge(h);
    req
}

/// Adds the device's claims about itself.
fn forge(headers: &mut http::HeaderMap) {
    for (n, v) in FORGED {
        headers.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
    }
}

/// One HTTP/1.1 exchange on `io`: the status, and the body as JSON when it is JSON.
async fn h1_exchange<S>(io: S, req: Request<Empty<Bytes>>) -> (u16, serde_json::Value)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// The identity headers the origin saw are the relay's, for device alice.
fn assert_relay_identity(what: &str, v: &serde_json::Value) {
    let h = &v["headers"];
    assert_eq!(h["portcullis-user"], "alice", "{what}: {v}");
    assert_eq!(h["portcullis-groups"], "eng", "{what}: {v}");
    assert_eq!(h["portcullis-device"], "alice", "{what}: {v}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{what}: {v}");
    assert!(h.get("portcullis_device").is_none(), "{what}: {v}");
    for hop in ["upgrade", "http2-settings", "connection"] {
        assert!(
            h.get(hop).is_none(),
            "{what}: {hop} reached the origin: {v}"
        );
    }
    let jwt = h["portcullis-jwt-assertion"].as_str().unwrap_or_default();
    assert_eq!(jwt.split('.').count(), 3, "{what}: no assertion: {v}");
}

/// A TLS connection to the relay's HTTPS port for `APP`, or the TLS inside a
/// `CONNECT app.internal:443` whose TLS ends at the relay (the agent's HTTPS proxying).
async fn https_to_app(s: &Stack, inside_connect: bool) -> Box<dyn Io> {
    let outer_sni = if inside_connect {
        "relay.acme.test"
    } else {
        APP
    };
    let mut tls = tls_connect(&s.w, &s.addrs, outer_sni, "alice", &[b"http/1.1"]).await;
    if !inside_connect {
        return Box::new(tls);
    }
    tls.write_all(format!("CONNECT {APP}:443 HTTP/1.1\r\nHost: {APP}:443\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let inner = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls(
        &s.w,
        "alice",
        &[b"http/1.1"],
    )));
    let name = rustls_pki_types::ServerName::try_from(APP).unwrap();
    Box::new(inner.connect(name, tls).await.unwrap())
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[tokio::test]
async fn an_h2c_upgrade_never_reaches_the_origin_as_http2() {
    let s = Stack::up().await;
    for inside_connect in [false, true] {
        let via = if inside_connect {
            "HTTPS inside CONNECT"
        } else {
            "HTTP/1.1"
        };
        // A well-formed upgrade is served as plain HTTP/1.1, with the relay's identity.
        let io = https_to_app(&s, inside_connect).await;
        let (status, v) = h1_exchange(io, h2c_request("/h2c", b"Upgrade, HTTP2-Settings")).await;
        assert_eq!(status, 200, "{via}: {v}");
        assert_relay_identity(via, &v);

        // A Connection line that is not a list of tokens is refused, never forwarded.
        for bad in [
            &b"Upgrade, HTTP2-Settings\xff"[..],
            b"Upgrade HTTP2-Settings",
            b"Upgrade;HTTP2-Settings",
        ] {
            let io = https_to_app(&s, inside_connect).await;
            let (status, _) = h1_exchange(io, h2c_request("/h2c-malformed", bad)).await;
            assert_eq!(status, 400, "{via}: {bad:?}");
        }
    }
    let origin = s.origin.log_text();
    assert!(
        !origin.contains("h2c upgrade accepted") && !origin.contains("http2 request"),
        "an h2c upgrade reached the origin:\n{origin}"
    );
    assert!(!origin.contains("/h2c-malformed"), "{origin}");
    // Both the served and the refused requests are in the access log.
    let log = std::fs::read_to_string(s.w.path("state/access.log")).unwrap();
    let lines = |path: &str, status: u64| {
        log.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["path"] == path && l["status"] == status)
            .count()
    };
    assert_eq!(lines("/h2c", 200), 2, "{log}");
    assert_eq!(lines("/h2c-malformed", 400), 6, "{log}");
}

#[tokio::test]
async fn forged_identity_never_reaches_the_origin_over_http2_or_http3() {
    let s = Stack::up().await;
    // HTTP/2.
    let mut h2 = h2_connect(&s.w, &s.addrs, "alice", APP)
        .await
        .ready()
        .await
        .unwrap();
    let mut req = Request::get(format!("https://{APP}/forged-h2"))
        .body(())
        .unwrap();
    forge(req.headers_mut());
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = h2_read_all(&mut resp.into_body()).await;
    assert_relay_identity("HTTP/2", &serde_json::from_slice(&body).unwrap());

    // HTTP/3.
    let mut h3 = H3Client::connect(&s.w, &s.addrs, "alice", APP).await;
    let mut req = Request::get(format!("https://{APP}/forged-h3"))
        .body(())
        .unwrap();
    forge(req.headers_mut());
    let r = h3.request(req, None).await;
    assert_eq!(r.status, 200);
    assert_relay_identity("HTTP/3", &serde_json::from_slice(&r.body).unwrap());
}

#[tokio::test]
async fn forged_identity_never_reaches_a_websocket_origin_over_any_http_version() {
    let s = Stack::up().await;
    // WebSocket over HTTP/1.1, with the device's claims in the handshake.
    let mut tls = tls_connect(&s.w, &s.addrs, APP, "alice", &[b"http/1.1"]).await;
    let forged: String = FORGED
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: {APP}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{forged}\r\n"
    );
    tls.write_all(handshake.as_bytes()).await.unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );

    // WebSocket over HTTP/2 (RFC 8441).
    let mut h2 = h2_connect(&s.w, &s.addrs, "alice", APP)
        .await
        .ready()
        .await
        .unwrap();
    let mut req = Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{APP}:{}/ws", s.addrs.https.port()))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    forge(req.headers_mut());
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (resp, _send) = h2.send_request(req, false).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);

    // WebSocket over HTTP/3 (RFC 9220), spoken by hand.
    let h3 = RawH3::connect(&s.w, &s.addrs, "alice", APP).await;
    let mut fields = vec![
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "https"),
        (":authority", APP),
        (":path", "/ws"),
        ("sec-websocket-version", "13"),
    ];
    fields.extend_from_slice(FORGED);
    let mut stream = h3.open(&headers_frame(&fields)).await;
    assert_eq!(stream.response().await, Ok(200));

    let want = r#"origin websocket: portcullis-user=Some("alice") x-forwarded-for=Some("127.0.0.1") jwt=true"#;
    let origin = eventually(Duration::from_secs(10), || async {
        let log = s.origin.log_text();
        (log.matches("origin websocket").count() >= 3).then_some(log)
    })
    .await
    .unwrap_or_else(|| panic!("three WebSockets: {}", s.origin.log_text()));
    let lines: Vec<&str> = origin
        .lines()
        .filter(|l| l.starts_with("origin websocket"))
        .collect();
    assert_eq!(lines, [want; 3], "{origin}");
}

#[tokio::test]
async fn a_tcp_forward_is_in_the_access_log_with_the_device_that_asked() {
    let s = Stack::up().await;
    let port = s.w.echo_addr().rsplit(':').next().unwrap().to_owned();
    let target = format!("{}:{port}", portcullis_e2e::DB);
    let (status, echoed) =
        portcullis_e2e::h1_connect(&s.w, &s.addrs, "alice", &target, b"ping").await;
    assert!(status.contains(" 200"), "{status}");
    assert_eq!(echoed, b"ping");
    let line = eventually(Duration::from_secs(10), || async {
        let log = std::fs::read_to_string(s.w.path("state/access.log")).unwrap_or_default();
        log.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| l["method"] == "CONNECT" && l["hostname"] == portcullis_e2e::DB)
    })
    .await
    .expect("an access-log line for the TCP forward");
    assert_eq!(line["device"], "alice", "{line}");
    assert_eq!(line["user"], "alice", "{line}");
}
