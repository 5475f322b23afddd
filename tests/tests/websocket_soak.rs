//! WebSocket sessions held for minutes through relay and connector, over HTTP/1.1 (a real
//! client, tungstenite), HTTP/2 (RFC 8441) and HTTP/3 (RFC 9220) at once, with a quiet
//! stretch longer than the relay's idle timeout in the middle. Slow, so ignored by default:
//! `tests/run` runs it by name after the main run.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use portcullis_e2e::{
    APP, RawH3, Stack, data_frame, h2_read_exact, h2_websocket, h3_websocket_request,
    ws_client_frame,
};
use tokio_tungstenite::tungstenite::Message;

/// Pauses before each message: busy, then silent for longer than `idle_timeout` (30 s by
/// default), then busy again: about two and a half minutes in all. These sleeps are the
/// test's subject (sessions held over time), never a wait for readiness.
fn schedule() -> Vec<Duration> {
    let mut s = vec![Duration::from_secs(5); 10];
    s.push(Duration::from_secs(45));
    s.extend(vec![Duration::from_secs(5); 10]);
    s
}

#[tokio::test]
#[ignore = "slow: holds WebSocket sessions for about two and a half minutes; tests/run runs it by name"]
async fn websocket_sessions_last_minutes_over_http1_http2_and_http3() {
    let s = Stack::up().await;
    let started = Instant::now();

    let http1 = async {
        let tls = portcullis_e2e::tls_connect(&s.w, &s.addrs, APP, "alice", &[b"http/1.1"]).await;
        let (mut ws, resp) = tokio_tungstenite::client_async(format!("wss://{APP}/ws"), tls)
            .await
            .unwrap();
        assert_eq!(resp.status(), 101);
        for (i, pause) in schedule().into_iter().enumerate() {
            // The schedule's pause: time held is the subject (see schedule()).
            tokio::time::sleep(pause).await;
            let text = format!("h1 message {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
        }
        // tungstenite answers the origin's pongs itself; a ping must come back as a pong.
        ws.send(Message::Ping(Bytes::from_static(b"h1 ping")))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"h1 ping"))
        );
        ws.close(None).await.unwrap();
    };

    let http2 = async {
        let (mut send, mut body) = h2_websocket(&s.w, &s.addrs, "alice", APP).await;
        let mut pending = Vec::new();
        for (i, pause) in schedule().into_iter().enumerate() {
            // The schedule's pause: time held is the subject (see schedule()).
            tokio::time::sleep(pause).await;
            let text = format!("h2 message {i}");
            send.send_data(Bytes::from(ws_client_frame(0x1, text.as_bytes())), false)
                .unwrap();
            let got = h2_read_exact(&mut body, &mut pending, 2 + text.len()).await;
            assert_eq!(&got[2..], text.as_bytes());
        }
        send.send_data(Bytes::from(ws_client_frame(0x9, b"h2 ping")), false)
            .unwrap();
        assert_eq!(
            h2_read_exact(&mut body, &mut pending, 9).await,
            b"\x8a\x07h2 ping"
        );
    };

    let http3 = async {
        let h3 = RawH3::connect(&s.w, &s.addrs, "alice", APP).await;
        let mut ws = h3.open(&h3_websocket_request(APP)).await;
        assert_eq!(ws.response().await, Ok(200));
        for (i, pause) in schedule().into_iter().enumerate() {
            // The schedule's pause: time held is the subject (see schedule()).
            tokio::time::sleep(pause).await;
            let text = format!("h3 message {i}");
            ws.send
                .write_all(&data_frame(&ws_client_frame(0x1, text.as_bytes())))
                .await
                .unwrap();
            let got = ws.data(2 + text.len()).await.unwrap();
            assert_eq!(&got[2..], text.as_bytes());
        }
        ws.send
            .write_all(&data_frame(&ws_client_frame(0x9, b"h3 ping")))
            .await
            .unwrap();
        assert_eq!(ws.data(9).await.unwrap(), b"\x8a\x07h3 ping");
    };

    tokio::join!(http1, http2, http3);
    let held = started.elapsed();
    assert!(held >= Duration::from_secs(140), "held only {held:?}");
    eprintln!("three WebSocket sessions held for {held:?}");
}
