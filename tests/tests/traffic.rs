//! Every kind of traffic through the tunnel, end to end with the real binaries: HTTP/3,
//! raw TCP over CONNECT (HTTP/1.1, HTTP/2, HTTP/3), WebSocket (HTTP/1.1 upgrade and
//! HTTP/2 extended CONNECT), trailers over HTTP/2 and HTTP/3 to an h2c origin, server-sent
//! events, Expect: 100-continue, cancellation, and the limits.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use portcullis_e2e::{
    APP, DB, GRPC, H3Client, Stack, curl_cmd, h1_connect, h2_connect, h2_read_all, run_curl,
    ws_client_frame,
};

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

#[tokio::test]
async fn http3_reaches_the_origin_with_the_same_auth_policy_and_headers() {
    let s = Stack::up().await;
    let mut alice = H3Client::connect(&s.w, &s.addrs, "alice", APP).await;
    let r = alice.get(APP, "/over-h3").await;
    assert_eq!(r.status, 200);
    let v = json(&r.body);
    assert_eq!(v["path"], "/over-h3");
    assert_eq!(v["headers"]["portcullis-user"], "alice");
    assert_eq!(v["headers"]["portcullis-groups"], "eng");
    // Policy applies: bob is denied.
    let mut bob = H3Client::connect(&s.w, &s.addrs, "bob", APP).await;
    assert_eq!(bob.get(APP, "/").await.status, 403);
    // SNI of one published name, :authority of another: 421.
    assert_eq!(alice.get("ci.eng.internal", "/").await.status, 421);
    // The access log names the protocol.
    let log = std::fs::read_to_string(s.w.path("state/access.log")).unwrap();
    assert!(
        log.contains("\"path\":\"/over-h3\"") && log.contains("HTTP/3"),
        "{log}"
    );
    // HTTPS responses advertise HTTP/3 on the QUIC port.
    let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/", Some("alice"));
    cmd.args(["-D", "-"]);
    let r = run_curl(cmd).await;
    let alt = format!("alt-svc: h3=\":{}\"", s.addrs.quic.port());
    assert!(r.body.to_ascii_lowercase().contains(&alt), "{}", r.body);
    // So does curl, where it was built with HTTP/3.
    let version = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .unwrap();
    if String::from_utf8_lossy(&version.stdout).contains("HTTP3") {
        let mut quic = s.addrs;
        quic.https = quic.quic;
        let mut cmd = curl_cmd(&s.w, &quic, APP, "/over-curl-h3", Some("alice"));
        cmd.arg("--http3-only");
        let r = run_curl(cmd).await;
        assert_eq!((r.status, r.version.as_str()), (200, "3"), "{}", r.stderr);
        assert_eq!(
            json(r.body.as_bytes())["headers"]["portcullis-user"],
            "alice"
        );
    } else {
        eprintln!("this curl has no HTTP/3; the h3 client above is the proof");
    }
}

#[tokio::test]
async fn a_connector_certificate_cannot_speak_http3() {
    let s = Stack::up().await;
    // The relay closes the connection (WrongRole) right after the handshake: either the
    // HTTP/3 setup or the first request fails.
    if let Ok(mut c1) = H3Client::try_connect(&s.w, &s.addrs, "c1", APP).await {
        let req = http::Request::get(format!("https://{APP}/"))
            .body(())
            .unwrap();
        let handle = tokio::spawn(async move { c1.request(req, None).await });
        let outcome = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .unwrap();
        assert!(
            outcome.is_err(),
            "a connector certificate must not get an HTTP/3 response"
        );
    }
    // The client may see the close before the relay's line reaches its log file.
    s.relay
        .wait_for_log(
            "asked for a protocol its role may not use",
            Duration::from_secs(10),
        )
        .await;
}

#[tokio::test]
async fn raw_tcp_flows_both_ways_with_half_close_over_http1_http2_and_http3() {
    raw_tcp_flows_both_ways_with_half_close_over_http1_http2_and_http3_on(Stack::up().await).await;
}

/// The same through a tunnel over TLS on TCP (the connector's UDP blocked).
#[tokio::test]
async fn raw_tcp_flows_both_ways_with_half_close_over_http1_http2_and_http3_through_a_tunnel_over_tcp()
 {
    raw_tcp_flows_both_ways_with_half_close_over_http1_http2_and_http3_on(
        Stack::up_tunnel_over_tcp().await,
    )
    .await;
}

async fn raw_tcp_flows_both_ways_with_half_close_over_http1_http2_and_http3_on(s: Stack) {
    let port = s.w.echo_addr().rsplit(':').next().unwrap().to_owned();
    let target = format!("{DB}:{port}");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();

    // HTTP/1.1 CONNECT on a TLS connection to the relay.
    let (status, echoed) = h1_connect(&s.w, &s.addrs, "alice", &target, &payload).await;
    assert!(status.contains(" 200"), "{status}");
    assert!(
        echoed == payload,
        "HTTP/1.1 tunnel echoed {} bytes",
        echoed.len()
    );

    // HTTP/3 CONNECT.
    let mut h3 = H3Client::connect(&s.w, &s.addrs, "alice", "relay.acme.test").await;
    let (status, echoed) = h3.connect_tunnel(&target, &payload).await;
    assert_eq!(status, 200);
    assert!(
        echoed == payload,
        "HTTP/3 tunnel echoed {} bytes",
        echoed.len()
    );

    // HTTP/2 CONNECT.
    let mut h2 = h2_connect(&s.w, &s.addrs, "alice", "relay.acme.test").await;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.as_str())
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    send.send_data(Bytes::from(payload.clone()), true).unwrap();
    let echoed = h2_read_all(&mut resp.into_body()).await;
    assert!(
        echoed == payload,
        "HTTP/2 tunnel echoed {} bytes",
        echoed.len()
    );

    // Bad targets: a hostname with no tcp:// rule, and the wrong port.
    let (status, _) = h1_connect(&s.w, &s.addrs, "alice", &format!("{APP}:{port}"), b"").await;
    assert!(status.contains(" 404"), "{status}");
    let (status, _) = h1_connect(&s.w, &s.addrs, "alice", &format!("{DB}:1"), b"").await;
    assert!(status.contains(" 403"), "{status}");
    // Policy applies to tunnels too.
    let (status, _) = h1_connect(&s.w, &s.addrs, "bob", &target, b"").await;
    assert!(status.contains(" 403"), "{status}");
}

#[tokio::test]
async fn websocket_over_http1_upgrade_echoes_messages_and_pings() {
    websocket_over_http1_upgrade_echoes_messages_and_pings_on(Stack::up().await).await;
}

/// The same through a tunnel over TLS on TCP (the connector's UDP blocked).
#[tokio::test]
async fn websocket_over_http1_upgrade_echoes_messages_and_pings_through_a_tunnel_over_tcp() {
    websocket_over_http1_upgrade_echoes_messages_and_pings_on(Stack::up_tunnel_over_tcp().await)
        .await;
}

async fn websocket_over_http1_upgrade_echoes_messages_and_pings_on(s: Stack) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = portcullis_e2e::tls_connect(&s.w, &s.addrs, APP, "alice", &[b"http/1.1"]).await;
    let head = portcullis_e2e::ws_handshake(&mut tls, "/ws", APP).await;
    let connection = head
        .lines()
        .find(|l| l.starts_with("connection:"))
        .unwrap_or("");
    assert!(
        connection.split([':', ',']).any(|t| t.trim() == "upgrade"),
        "{head}"
    );
    for i in 0..20 {
        let text = format!("hello {i}");
        tls.write_all(&ws_client_frame(0x1, text.as_bytes()))
            .await
            .unwrap();
        let mut frame = vec![0u8; 2 + text.len()];
        tls.read_exact(&mut frame).await.unwrap();
        assert_eq!(&frame[..2], &[0x81, text.len() as u8]);
        assert_eq!(&frame[2..], text.as_bytes());
    }
    // A ping is answered by the origin with a pong carrying the same payload.
    tls.write_all(&ws_client_frame(0x9, b"are you there"))
        .await
        .unwrap();
    let mut frame = vec![0u8; 2 + 13];
    tls.read_exact(&mut frame).await.unwrap();
    assert_eq!(&frame[..2], &[0x8a, 13]);
    assert_eq!(&frame[2..], b"are you there");
}

#[tokio::test]
async fn websocket_over_http2_extended_connect_reaches_a_websocket_origin() {
    websocket_over_http2_extended_connect_reaches_a_websocket_origin_on(Stack::up().await).await;
}

/// The same through a tunnel over TLS on TCP (the connector's UDP blocked).
#[tokio::test]
async fn websocket_over_http2_extended_connect_reaches_a_websocket_origin_through_a_tunnel_over_tcp()
 {
    websocket_over_http2_extended_connect_reaches_a_websocket_origin_on(
        Stack::up_tunnel_over_tcp().await,
    )
    .await;
}

async fn websocket_over_http2_extended_connect_reaches_a_websocket_origin_on(s: Stack) {
    let (mut send, mut body) = portcullis_e2e::h2_websocket(&s.w, &s.addrs, "alice", APP).await;
    send.send_data(Bytes::from(ws_client_frame(0x1, b"over h2")), false)
        .unwrap();
    let got = portcullis_e2e::h2_read_exact(&mut body, &mut Vec::new(), 9).await;
    // An unmasked text frame from the origin carrying the same message.
    assert_eq!(&got[..2], &[0x81, 7]);
    assert_eq!(&got[2..9], b"over h2");
}

#[tokio::test]
async fn trailers_from_an_h2c_origin_survive_http2_and_http3() {
    trailers_from_an_h2c_origin_survive_http2_and_http3_on(Stack::up().await).await;
}

/// The same through a tunnel over TLS on TCP (the connector's UDP blocked).
#[tokio::test]
async fn trailers_from_an_h2c_origin_survive_http2_and_http3_through_a_tunnel_over_tcp() {
    trailers_from_an_h2c_origin_survive_http2_and_http3_on(Stack::up_tunnel_over_tcp().await).await;
}

async fn trailers_from_an_h2c_origin_survive_http2_and_http3_on(s: Stack) {
    // HTTP/2, with hyper's client.
    let tls = portcullis_e2e::tls_connect(&s.w, &s.addrs, GRPC, "alice", &[b"h2"]).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://{GRPC}/trailers"))
        .header("te", "trailers")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    let trailers = collected.trailers().cloned().expect("trailers over HTTP/2");
    assert_eq!(collected.to_bytes().as_ref(), b"body-then-trailers\n");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-checksum"], "abc123");

    let mut h3 = H3Client::connect(&s.w, &s.addrs, "alice", GRPC).await;
    let r = h3.get(GRPC, "/trailers").await;
    assert_eq!(r.status, 200);
    let trailers = r.trailers.expect("trailers over HTTP/3");
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test]
async fn server_sent_events_arrive_as_the_origin_writes_them() {
    server_sent_events_arrive_as_the_origin_writes_them_on(Stack::up().await).await;
}

/// The same through a tunnel over TLS on TCP (the connector's UDP blocked).
#[tokio::test]
async fn server_sent_events_arrive_as_the_origin_writes_them_through_a_tunnel_over_tcp() {
    server_sent_events_arrive_as_the_origin_writes_them_on(Stack::up_tunnel_over_tcp().await).await;
}

async fn server_sent_events_arrive_as_the_origin_writes_them_on(s: Stack) {
    use tokio::io::AsyncReadExt;
    // The origin writes event 0 at once, event 1 after 3 s. Seeing event 0 well before then
    // proves nothing on the way buffers the stream.
    let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/sse?ms=3000&n=2", Some("alice"));
    cmd.arg("-N").stdout(std::process::Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("data: event 0") {
        let n = tokio::time::timeout(Duration::from_secs(10), out.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    let first = start.elapsed();
    eprintln!("first server-sent event after {first:?} (curl start included)");
    assert!(
        first < Duration::from_millis(2500),
        "first event took {first:?}"
    );
    assert!(!String::from_utf8_lossy(&seen).contains("event 1"));
    let _ = child.kill().await;
}

#[tokio::test]
async fn expect_100_continue_and_chunked_uploads_arrive_intact() {
    let s = Stack::up().await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let file = s.w.path("upload.bin");
    std::fs::write(&file, &data).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &data);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let expected = format!("{hex} {}", data.len());
    for extra in [
        vec!["-H", "Expect: 100-continue"],
        vec!["-H", "Transfer-Encoding: chunked"],
        vec!["--http2"],
    ] {
        let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/sha256", Some("alice"));
        cmd.args(["--data-binary", &format!("@{}", file.display())])
            .args(&extra);
        let r = run_curl(cmd).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, expected.as_str()),
            "{extra:?} {}",
            r.stderr
        );
    }
}

#[tokio::test]
async fn a_client_disconnect_aborts_the_origin_request() {
    a_client_disconnect_aborts_the_origin_request_on(Stack::up().await).await;
}

/// The same through a tunnel over TLS on TCP (the connector's UDP blocked).
#[tokio::test]
async fn a_client_disconnect_aborts_the_origin_request_through_a_tunnel_over_tcp() {
    a_client_disconnect_aborts_the_origin_request_on(Stack::up_tunnel_over_tcp().await).await;
}

async fn a_client_disconnect_aborts_the_origin_request_on(s: Stack) {
    // The origin notes each stream whose client went away; count them as clients leave.
    let aborted = |n: usize| {
        let origin = &s.origin;
        async move {
            let seen = portcullis_e2e::eventually(Duration::from_secs(5), || async {
                (origin.log_text().matches("client went away").count() >= n).then_some(())
            })
            .await;
            assert!(
                seen.is_some(),
                "the origin must see request {n} aborted: {}",
                origin.log_text()
            );
        }
    };
    for (i, version) in ["--http1.1", "--http2"].into_iter().enumerate() {
        let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/stream?n=600&ms=50", Some("alice"));
        cmd.args([version, "--max-time", "1"]);
        let r = run_curl(cmd).await;
        assert_eq!(r.exit, 28, "curl should time out mid-stream: {}", r.stderr);
        let gone = Instant::now();
        aborted(i + 1).await;
        eprintln!(
            "{version}: the origin saw the abort {:?} after the client left",
            gone.elapsed()
        );
    }
    // HTTP/3: the client drops its request stream after the first chunk (quinn then sends
    // STOP_SENDING; h3-quinn cannot be told to while a read is pending).
    let h3 = H3Client::connect(&s.w, &s.addrs, "alice", APP).await;
    let req = http::Request::get(format!("https://{APP}/stream?n=600&ms=50"))
        .body(())
        .unwrap();
    let mut stream = h3.sender().send_request(req).await.unwrap();
    stream.finish().await.unwrap();
    assert_eq!(stream.recv_response().await.unwrap().status(), 200);
    assert!(stream.recv_data().await.unwrap().is_some());
    drop(stream);
    let gone = Instant::now();
    aborted(3).await;
    eprintln!(
        "HTTP/3: the origin saw the abort {:?} after the client left",
        gone.elapsed()
    );
}

#[tokio::test]
async fn limits_answer_429_and_431_instead_of_queueing() {
    let s = Stack::up_with("[limits]\nmax_streams_per_device = 2\n").await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(run_curl(curl_cmd(
                &s.w,
                &s.addrs,
                APP,
                "/slow?ms=6000",
                Some("alice"),
            )))
        })
        .collect();
    // Once both slow requests hold their slots (two tunnel streams open), a third is
    // refused, not queued.
    portcullis_e2e::wait_for_tunnel_streams(s.addrs.admin, 2).await;
    let r = s.get(APP, "/", Some("alice")).await;
    assert_eq!(r.status, 429, "{}", r.body);
    for t in slow {
        assert_eq!(t.await.unwrap().status, 200);
    }
    // Capacity is back once they finish.
    assert_eq!(s.get(APP, "/", Some("alice")).await.status, 200);
    // Oversized headers (the limit is 16 KiB): 431, over HTTP/2 and HTTP/3.
    let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/", Some("alice"));
    cmd.args(["--http2", "-H", &format!("X-Big: {}", "a".repeat(20_000))]);
    let r = run_curl(cmd).await;
    assert_eq!(r.status, 431, "{}", r.stderr);
    let mut h3 = H3Client::connect(&s.w, &s.addrs, "alice", APP).await;
    let req = http::Request::get(format!("https://{APP}/"))
        .header("x-big", "a".repeat(20_000))
        .body(())
        .unwrap();
    assert_eq!(h3.request(req, None).await.status, 431);
    let mut cmd = curl_cmd(&s.w, &s.addrs, APP, "/", Some("alice"));
    cmd.args(["--http1.1", "-H", &format!("X-Big: {}", "a".repeat(20_000))]);
    let r = run_curl(cmd).await;
    assert_eq!(r.status, 431, "{}", r.stderr);
    // The 431s the HTTP/1.1 and HTTP/3 codecs answer before the pipeline are counted (the
    // HTTP/2 codec's cannot be seen from outside it).
    let text = portcullis_e2e::metrics_text(s.addrs.admin).await.unwrap();
    let value = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series}\n{text}"))
    };
    assert_eq!(
        value("portcullis_relay_refused_responses_total{status=\"431\"}"),
        2.0
    );
    for protocol in ["HTTP/1.1", "HTTP/3"] {
        assert_eq!(
            value(&format!(
                "portcullis_relay_requests_total{{hostname=\"-\",protocol=\"{protocol}\",method=\"other\",class=\"4xx\"}}"
            )),
            1.0,
            "{protocol}"
        );
    }
}

#[tokio::test]
async fn conflicting_length_and_chunked_is_refused_with_400_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Stack::up().await;
    // Both orders of the two headers, and the conflict as the second request on a
    // keep-alive connection, after a request whose body looks like a conflicting head.
    let decoy = "GET /decoy HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
    let attempts = [
        format!(
            "POST /smuggle-a HTTP/1.1\r\nHost: {APP}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {APP}\r\n\r\n"
        ),
        format!(
            "POST /smuggle-b HTTP/1.1\r\nHost: {APP}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {APP}\r\n\r\n"
        ),
        format!(
            "POST /sha256?first HTTP/1.1\r\nHost: {APP}\r\nContent-Length: {}\r\n\r\n{decoy}\
             POST /smuggle-c HTTP/1.1\r\nHost: {APP}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {APP}\r\n\r\n",
            decoy.len()
        ),
    ];
    for (i, attempt) in attempts.iter().enumerate() {
        let mut tls =
            portcullis_e2e::tls_connect(&s.w, &s.addrs, APP, "alice", &[b"http/1.1"]).await;
        tls.write_all(attempt.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut resp)).await;
        assert!(
            read.is_ok(),
            "the relay must close the connection after refusing"
        );
        let text = String::from_utf8_lossy(&resp);
        // Status codes in order (a body need not end with a newline).
        let statuses: Vec<&str> = text
            .match_indices("HTTP/1.1 ")
            .filter_map(|(at, _)| text.get(at + 9..at + 12))
            .collect();
        let expected: &[&str] = if i == 2 { &["200", "400"] } else { &["400"] };
        assert_eq!(statuses, expected, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
    }
    // Neither the ambiguous requests nor anything after them reached the origin; the
    // decoy inside the first body was a body, forwarded as one.
    let origin = s.origin.log_text();
    assert!(origin.contains("POST /sha256?first"), "{origin}");
    for path in [
        "/smuggle-a",
        "/smuggle-b",
        "/smuggle-c",
        "/smuggled",
        "/decoy",
    ] {
        assert!(
            !origin.contains(path),
            "{path} reached the origin:\n{origin}"
        );
    }
}

#[tokio::test]
async fn a_flood_of_http2_stream_resets_closes_that_connection_only() {
    let s = Stack::up().await;
    let mut h2 = h2_connect(&s.w, &s.addrs, "alice", APP).await;
    let mut closed = false;
    for _ in 0..2000 {
        let req = http::Request::get(format!("https://{APP}/slow?ms=5000"))
            .body(())
            .unwrap();
        // HEADERS then RST_STREAM at once: the "rapid reset" pattern.
        match h2.send_request(req, false) {
            Ok((_resp, mut send)) => {
                tokio::task::yield_now().await;
                send.send_reset(h2::Reason::CANCEL);
            }
            Err(_) => {
                closed = true;
                break;
            }
        }
        if h2.clone().ready().await.is_err() {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "the relay must close a connection that floods resets"
    );
    // Others are still served.
    assert_eq!(s.get(APP, "/", Some("alice")).await.status, 200);
}

#[tokio::test]
async fn revoking_a_device_closes_its_open_http1_tunnels() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Stack::up().await;
    let port = s.w.echo_addr().rsplit(':').next().unwrap().to_owned();
    let target = format!("{DB}:{port}");
    let mut tls =
        portcullis_e2e::tls_connect(&s.w, &s.addrs, "relay.acme.test", "alice", &[b"http/1.1"])
            .await;
    tls.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = portcullis_e2e::read_head(&mut tls).await;
    assert!(head.contains(" 200"), "{head}");
    tls.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tls.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    // The tunnel outlives hyper's connection future; revocation must still reach it.
    portcullis_e2e::relay_ok(&["revoke", "device", "alice", "--state", s.w.state()]);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the revoked device's tunnel must be closed");
}

#[tokio::test]
async fn malformed_http3_requests_are_reset_and_the_connection_keeps_serving() {
    let s = Stack::up().await;
    let mut h3 = H3Client::connect(&s.w, &s.addrs, "alice", APP).await;
    // A connection-specific header field: H3_MESSAGE_ERROR, nothing forwarded.
    let req = http::Request::get(format!("https://{APP}/conn-specific"))
        .header("connection", "keep-alive")
        .body(())
        .unwrap();
    assert!(h3.try_request(req, None).await.is_err());
    // A body longer than its Content-Length.
    let req = http::Request::post(format!("https://{APP}/sha256"))
        .header("content-length", "3")
        .body(())
        .unwrap();
    assert!(
        h3.try_request(req, Some(b"0123456789".to_vec()))
            .await
            .is_err()
    );
    // The same connection still serves well-formed requests.
    let r = h3.get(APP, "/after").await;
    assert_eq!(r.status, 200);
    let log = std::fs::read_to_string(s.w.path("state/access.log")).unwrap();
    assert!(!log.contains("/conn-specific"), "{log}");
}

#[tokio::test]
async fn a_connector_at_capacity_answers_503() {
    let s = Stack::up_with("[limits]\nmax_streams_per_connector = 1\n").await;
    let slow = tokio::spawn(run_curl(curl_cmd(
        &s.w,
        &s.addrs,
        APP,
        "/slow?ms=4000",
        Some("alice"),
    )));
    portcullis_e2e::wait_for_tunnel_streams(s.addrs.admin, 1).await;
    let r = s.get(APP, "/", Some("bob")).await;
    // bob is denied by policy before any slot is taken; alice's second request is the test.
    assert_eq!(r.status, 403);
    let r = s.get(APP, "/", Some("alice")).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_flood_of_http3_request_resets_closes_that_connection_only() {
    let s = Stack::up().await;
    let mut flooder = H3Client::connect(&s.w, &s.addrs, "alice", APP).await;
    let mut send = flooder.sender();
    for _ in 0..400 {
        let req = http::Request::get(format!("https://{APP}/"))
            .body(())
            .unwrap();
        match send.send_request(req).await {
            Ok(mut stream) => stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED),
            Err(_) => break,
        }
        // Pacing of the flood (one reset per request, as an attacker would send them), not
        // a wait for anything.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The last resets may still be counting: the relay must close the connection shortly.
    assert!(
        flooder.closed_within(Duration::from_secs(10)).await,
        "the relay must close an HTTP/3 connection that floods resets"
    );
    s.relay
        .wait_for_log("flooding request resets", Duration::from_secs(10))
        .await;
    // Others are still served.
    let mut other = H3Client::connect(&s.w, &s.addrs, "alice", APP).await;
    assert_eq!(other.get(APP, "/").await.status, 200);
}

/// One HTTP/2 request written frame by frame (RFC 9113), with header fields encoded as
/// HPACK literals exactly as given, so values the h2 library would refuse to send can be
/// sent. Returns what the relay did with stream 1: `Ok(status byte)` for a response
/// HEADERS frame, or `Err((frame type, error code))` for RST_STREAM (3) or GOAWAY (7).
async fn raw_h2_request(s: &Stack, fields: &[(&str, &str)]) -> Result<u8, (u8, u32)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = portcullis_e2e::tls_connect(&s.w, &s.addrs, APP, "alice", &[b"h2"]).await;
    let mut block = Vec::new();
    for (name, value) in fields {
        // Literal without indexing, new name (RFC 7541 §6.2.2), no Huffman.
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let frame = |ty: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[ty, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    // HEADERS with END_STREAM | END_HEADERS.
    out.extend(frame(0x1, 0x5, 1, &block));
    tls.write_all(&out).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut head = [0u8; 9];
        tokio::time::timeout_at(deadline.into(), tls.read_exact(&mut head))
            .await
            .expect("no answer from the relay")
            .expect("connection closed without an answer");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (ty, stream) = (head[3], u32::from_be_bytes(head[5..9].try_into().unwrap()));
        let mut payload = vec![0u8; len];
        tls.read_exact(&mut payload).await.unwrap();
        match (ty, stream) {
            (0x1, 1) => return Ok(payload[0]),
            (0x3, 1) => return Err((ty, u32::from_be_bytes(payload[..4].try_into().unwrap()))),
            (0x7, _) => return Err((ty, u32::from_be_bytes(payload[4..8].try_into().unwrap()))),
            _ => {}
        }
    }
}

#[tokio::test]
async fn header_injection_over_http2_is_refused_before_the_origin() {
    let s = Stack::up().await;
    let base = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", APP),
    ];
    let request = |path: &'static str, extra: (&'static str, &'static str)| {
        let mut f = base.to_vec();
        f.push((":path", path));
        f.push(extra);
        f
    };
    // The frame writer works: a clean request is answered (:status 200 is HPACK static
    // entry 8, sent indexed as 0x88).
    assert_eq!(
        raw_h2_request(&s, &request("/h2-clean", ("x-a", "1"))).await,
        Ok(0x88)
    );
    let cases = [
        (
            "CR LF in a value",
            request("/h2-crlf", ("x-a", "v\r\nx-injected: 1")),
        ),
        (
            "LF in a value",
            request("/h2-lf", ("x-a", "v\nx-injected: 1")),
        ),
        ("NUL in a value", request("/h2-nul", ("x-a", "v\0w"))),
        ("CR LF in a name", request("/h2-name", ("x-a\r\nx-b", "1"))),
        ("an upper-case name", request("/h2-upper", ("X-Upper", "1"))),
        (
            "a connection-specific field",
            request("/h2-conn", ("connection", "close")),
        ),
    ];
    for (what, fields) in &cases {
        let got = raw_h2_request(&s, fields).await;
        // RST_STREAM or GOAWAY with PROTOCOL_ERROR (1) or COMPRESSION_ERROR (9): the
        // request is malformed (RFC 9113 §8.2.1, §8.1.1) and never becomes a request.
        assert!(
            matches!(got, Err((0x3 | 0x7, 0x1 | 0x9))),
            "{what}: {got:?}"
        );
    }
    let origin = s.origin.log_text();
    assert!(origin.contains("/h2-clean"), "{origin}");
    for (what, fields) in &cases {
        let path = fields.iter().find(|(n, _)| *n == ":path").unwrap().1;
        assert!(
            !origin.contains(path),
            "{what} reached the origin:\n{origin}"
        );
    }
}

#[tokio::test]
async fn slow_handshakes_unfinished_headers_and_idle_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Stack::up_with(
        "[limits]\nhandshake_timeout = \"1s\"\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\n",
    )
    .await;
    // A TCP connection that never starts TLS is dropped.
    let mut tcp = tokio::net::TcpStream::connect(s.addrs.https).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "handshake never started: {read:?}"
    );
    // Headers that never finish: the connection is closed and nothing is forwarded.
    let mut tls = portcullis_e2e::tls_connect(&s.w, &s.addrs, APP, "alice", &[b"http/1.1"]).await;
    tls.write_all(format!("GET /never-finished HTTP/1.1\r\nHost: {APP}\r\nX-Slow: ").as_bytes())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "unfinished headers must not hold the connection"
    );

    // Busy connections are not idle: requests taking 2.5 times the idle timeout complete
    // over HTTP/2 and HTTP/3 (the origin sends nothing until it is done).
    let h2 = h2_connect(&s.w, &s.addrs, "alice", APP).await;
    let h2_get = |h2: h2::client::SendRequest<Bytes>, path: &str| {
        let req = http::Request::get(format!("https://{APP}{path}"))
            .body(())
            .unwrap();
        async move {
            let mut h2 = h2.ready().await?;
            let (resp, _) = h2.send_request(req, true)?;
            Ok::<_, h2::Error>(resp.await?.status().as_u16())
        }
    };
    let mut h3 = H3Client::connect(&s.w, &s.addrs, "alice", APP).await;
    let slow_h3 = http::Request::get(format!("https://{APP}/slow?ms=5000"))
        .body(())
        .unwrap();
    let (over_h2, over_h3) = tokio::join!(
        h2_get(h2.clone(), "/slow?ms=5000"),
        h3.try_request(slow_h3, None)
    );
    assert_eq!(over_h2.unwrap(), 200);
    assert_eq!(over_h3.unwrap().status, 200);
    // Then, with nothing in flight, both are closed once the idle timeout has passed: a
    // deliberate idle period (2.5 times the timeout), which is the test's subject.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        h2_get(h2, "/").await.is_err(),
        "idle HTTP/2 connection still open"
    );
    assert!(
        h3.try_request(
            http::Request::get(format!("https://{APP}/"))
                .body(())
                .unwrap(),
            None
        )
        .await
        .is_err(),
        "idle HTTP/3 connection still open"
    );
    assert!(!s.origin.log_text().contains("/never-finished"));
    // New connections are served as usual.
    assert_eq!(s.get(APP, "/", Some("alice")).await.status, 200);
}
