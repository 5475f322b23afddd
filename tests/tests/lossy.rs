//! A lossy, slow tunnel path: the connector reaches the relay through a [`UdpPath`] that
//! drops 5 % of the datagrams each way and delays each by 50 ms each way (100 ms more
//! round trip). A 100 MiB download through it arrives whole and intact; its throughput is
//! printed. `PORTCULLIS_LOSSY_BYTES`, `PORTCULLIS_LOSSY_LOSS` and `PORTCULLIS_LOSSY_DELAY`
//! (seconds, each way) change the transfer and the path.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use portcullis_e2e::{H3Client, Impairment, TestConnector, UdpPath, relay_with_origin};

const APP: &str = "app.internal";
/// 100 MiB; `PORTCULLIS_LOSSY_BYTES` overrides it.
fn size() -> usize {
    std::env::var("PORTCULLIS_LOSSY_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_mib_cross_a_lossy_delayed_tunnel_path_intact() {
    let (relay, _origin, origin_addr) = relay_with_origin(APP).await;
    let path = UdpPath::start(relay.addrs.quic).await;
    let _c = TestConnector::new(&relay)
        .via(path.addr)
        .service(APP, &format!("http://{origin_addr}"))
        .run()
        .await;
    let env = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    path.impair(Impairment {
        loss: env("PORTCULLIS_LOSSY_LOSS", 0.05),
        delay: Duration::from_secs_f64(env("PORTCULLIS_LOSSY_DELAY", 0.05)),
        ..Impairment::default()
    });
    let mut h3 = H3Client::connect(&relay.world, &relay.addrs, "alice", APP).await;
    let size = size();
    let started = Instant::now();
    let req = http::Request::get(format!("https://{APP}/bytes?n={size}"))
        .body(())
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(300), h3.request(req, None))
        .await
        .expect("the download must finish");
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), size);
    // The origin's pattern: each 64 KiB chunk counts 0..251 over and over.
    let bad = r
        .body
        .iter()
        .enumerate()
        .position(|(k, b)| *b != ((k % 65_536) % 251) as u8);
    assert_eq!(bad, None, "the body differs from the origin's");
    let dropped = path
        .counts
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{size} bytes over a lossy, delayed tunnel path: {took:?}, {:.1} Mbit/s ({dropped} datagrams dropped)",
        size as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    assert!(
        dropped > 0,
        "the path dropped nothing: the test tested nothing"
    );
}
