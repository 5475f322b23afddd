//! Networks without UDP: a connector whose QUIC cannot reach the relay tunnels over TLS on
//! TCP to the relay's HTTPS port, carries every request there, and moves back to QUIC once
//! UDP works again without cutting what is open; a QUIC tunnel whose path goes silent
//! falls back to TCP; a TCP tunnel is held to the same identity rules and revocation as
//! a QUIC one. The relay runs in process; the connector's UDP path is a [`UdpPath`].

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use portcullis_e2e::{
    RELAY_NAME, RunningRelay, TcpPath, TestClient, TestConnector, UdpPath, client_tls, eventually,
    relay_with_origin, stranger_tls,
};
use portcullis_shared::proto::TUNNEL_TCP_ALPN;

const APP: &str = "app.internal";
const TCP: &str = "portcullis_relay_connector_tunnels{transport=\"tcp\"}";
const QUIC: &str = "portcullis_relay_connector_tunnels{transport=\"quic\"}";

/// Whether a request to APP is answered 200 within `within`.
async fn served(client: &TestClient, within: Duration) -> Option<()> {
    eventually(within, || async {
        (client.try_get(APP, "/hello").await.ok()?.status == 200).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_udp_tunnels_over_tcp_then_returns_to_quic_without_cutting_open_streams() {
    let (relay, _origin, origin_addr) = relay_with_origin(APP).await;
    let path = UdpPath::start(relay.addrs.quic).await;
    path.set_blackhole(true);
    let started = Instant::now();
    let _c = TestConnector::new(&relay)
        .via(path.addr)
        .service(APP, &format!("http://{origin_addr}"))
        .run()
        .await;
    let took = started.elapsed();
    assert_eq!(relay.metric(TCP).await, Some(1), "registered over TCP");
    assert_eq!(relay.metric(QUIC).await, Some(0));
    // A QUIC attempt (1.5 s), then TCP: about 1.6 s. The bound only catches a hang.
    eprintln!("up over TCP {took:?} after starting with UDP blocked");
    assert!(took < Duration::from_secs(15), "{took:?}");
    let client = relay.client("alice");
    let r = client.get(APP, "/hello").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // A response streamed over the TCP tunnel for 3 s, while UDP comes back.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.get(APP, "/stream?n=30&ms=100").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    path.set_blackhole(false);
    let unblocked = Instant::now();
    // Requests keep succeeding throughout the move back.
    let served = std::sync::atomic::AtomicUsize::new(0);
    let back = eventually(Duration::from_secs(30), || async {
        let r = client.get(APP, "/hello").await;
        assert_eq!(
            r.status, 200,
            "a request failed during the move back: {}",
            r.body
        );
        served.fetch_add(1, Ordering::Relaxed);
        (relay.metric(QUIC).await == Some(1) && relay.metric(TCP).await == Some(0)).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "UDP restored: the tunnel must be back on QUIC within 30 s"
    );
    eprintln!(
        "back on QUIC {:?} after UDP returned; {} requests served meanwhile",
        unblocked.elapsed(),
        served.into_inner()
    );
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200);
    assert_eq!(
        slow.body.lines().count(),
        30,
        "the stream open on TCP finished whole: {}",
        slow.body
    );
    assert!(path.counts.to_server.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_tunnel_whose_udp_dies_moves_to_tcp() {
    let (relay, _origin, origin_addr) = relay_with_origin(APP).await;
    let path = UdpPath::start(relay.addrs.quic).await;
    let _c = TestConnector::new(&relay)
        .via(path.addr)
        .service(APP, &format!("http://{origin_addr}"))
        .run()
        .await;
    assert_eq!(relay.metric(QUIC).await, Some(1));
    let client = relay.client("alice");
    assert_eq!(client.get(APP, "/hello").await.status, 200);
    path.set_blackhole(true);
    let blocked = Instant::now();
    // The connector's idle timeout (3 s) notices; its first retry (≤ 2 s), a QUIC attempt
    // (1.5 s) and the TCP handshake follow.
    let moved = eventually(Duration::from_secs(15), || async {
        (relay.metric(TCP).await == Some(1)).then_some(())
    })
    .await;
    assert!(moved.is_some(), "the tunnel never moved to TCP");
    let took = blocked.elapsed();
    eprintln!("on TCP {took:?} after UDP was blocked");
    // A bound that catches a hang; the figure is printed.
    assert!(took < Duration::from_secs(15), "{took:?}");
    let ok = served(&client, Duration::from_secs(5)).await;
    assert!(ok.is_some(), "requests are served over the TCP tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_connector_on_tcp_is_cut_within_a_second() {
    let (relay, _origin, origin_addr) = relay_with_origin(APP).await;
    let path = UdpPath::start(relay.addrs.quic).await;
    path.set_blackhole(true);
    let c = TestConnector::new(&relay)
        .via(path.addr)
        .service(APP, &format!("http://{origin_addr}"))
        .run()
        .await;
    assert_eq!(relay.metric(TCP).await, Some(1));
    let revoked = Instant::now();
    relay.revoke("connector", &c.name).await;
    let cut = eventually(Duration::from_secs(5), || async {
        (relay.metric(TCP).await == Some(0)).then_some(())
    })
    .await;
    assert!(cut.is_some(), "the revoked connector's TCP tunnel stays up");
    let took = revoked.elapsed();
    assert!(
        took < Duration::from_secs(1) + Duration::from_millis(500),
        "{took:?}"
    );
    let r = relay.client("alice").try_get(APP, "/hello").await;
    assert!(
        r.as_ref().map_or(true, |r| r.status != 200),
        "nothing is served by a revoked connector: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_cut_by_a_reset_reconnects() {
    let (relay, _origin, origin_addr) = relay_with_origin(APP).await;
    let udp = UdpPath::start(relay.addrs.quic).await;
    udp.set_blackhole(true);
    let tcp = TcpPath::start(relay.addrs.https).await;
    let _c = TestConnector::new(&relay)
        .via(udp.addr)
        .via_tcp(tcp.addr)
        .service(APP, &format!("http://{origin_addr}"))
        .run()
        .await;
    assert_eq!(relay.metric(TCP).await, Some(1));
    let client = relay.client("alice");
    assert_eq!(client.get(APP, "/hello").await.status, 200);
    let before = tcp.accepted.load(Ordering::Relaxed);
    tcp.reset_all();
    let back = eventually(Duration::from_secs(15), || async {
        (tcp.reset.load(Ordering::Relaxed) >= 1
            && tcp.accepted.load(Ordering::Relaxed) > before
            && relay.metric(TCP).await == Some(1))
        .then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the connector never came back over TCP after the reset"
    );
    let ok = served(&client, Duration::from_secs(5)).await;
    assert!(ok.is_some(), "requests are served again after the reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_when_quic_is_blackholed_ends_within_the_idle_timeout_and_never_hangs() {
    let (relay, _origin, origin_addr) = relay_with_origin(APP).await;
    let path = UdpPath::start(relay.addrs.quic).await;
    let _c = TestConnector::new(&relay)
        .via(path.addr)
        .service(APP, &format!("http://{origin_addr}"))
        .run()
        .await;
    let client = relay.client("alice");
    // 200 chunks, one every 50 ms: 10 s, far beyond the 3 s idle timeout.
    let download = {
        let client = client.clone();
        tokio::spawn(async move { client.try_get(APP, "/stream?n=200&ms=50").await })
    };
    let streaming = eventually(Duration::from_secs(5), || async {
        (relay.metric("portcullis_relay_tunnel_streams").await >= Some(1)).then_some(())
    })
    .await;
    assert!(streaming.is_some(), "the download never started");
    path.set_blackhole(true);
    let blackholed = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(15), download)
        .await
        .expect("the download hung after QUIC was blackholed")
        .unwrap();
    let took = blackholed.elapsed();
    eprintln!("download ended {took:?} after the blackhole: {result:?}");
    match result {
        // Cut with the tunnel: the client sees an error, not a short body taken as whole.
        Err(e) => assert!(!format!("{e:#}").is_empty()),
        Ok(r) => assert!(
            r.status != 200 || r.body.lines().count() == 200,
            "a cut download must not look complete: {} lines",
            r.body.lines().count()
        ),
    }
    // The next request goes over the fallback.
    let ok = served(&client, Duration::from_secs(15)).await;
    assert!(ok.is_some(), "requests are served again over TCP");
    assert_eq!(relay.metric(TCP).await, Some(1));
}

/// What the relay says first on a TLS connection to its HTTPS port with `config` and
/// SNI the relay's name: the start of its HTTP/2 preface when it takes a tunnel, nothing
/// (the connection closed, or the handshake refused) otherwise.
async fn first_bytes(relay: &RunningRelay, config: rustls::ClientConfig) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let tcp = tokio::net::TcpStream::connect(relay.addrs.https)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(RELAY_NAME.to_owned()).unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
    else {
        return Vec::new();
    };
    let mut buf = [0u8; 24];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
        .await
        .expect("the relay neither speaks nor closes");
    match read {
        Ok(n) => buf[..n].to_vec(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_over_tcp_takes_only_a_connector_certificate_and_its_own_alpn() {
    let (relay, _origin, _) = relay_with_origin(APP).await;
    relay.issue_connector("c9", &[APP]).await;
    let w = &relay.world;
    let preface = b"PRI * HTTP/2.0".as_slice();
    // A connector with the tunnel's ALPN: the relay starts HTTP/2 as the client.
    let ok = first_bytes(&relay, client_tls(w, "c9", &[TUNNEL_TCP_ALPN])).await;
    assert!(ok.starts_with(preface), "{ok:?}");
    // A device's certificate, or none, on the tunnel's ALPN: closed without a word.
    for config in [
        client_tls(w, "alice", &[TUNNEL_TCP_ALPN]),
        stranger_tls(w, &[TUNNEL_TCP_ALPN]),
    ] {
        let got = first_bytes(&relay, config).await;
        assert!(
            !got.starts_with(preface),
            "a tunnel without a connector: {got:?}"
        );
    }
    // A connector's certificate on HTTP/2 or HTTP/1.1: closed after the handshake.
    for alpn in [b"h2".as_slice(), b"http/1.1".as_slice()] {
        let got = first_bytes(&relay, client_tls(w, "c9", &[alpn])).await;
        assert!(got.is_empty(), "a connector on {alpn:?}: {got:?}");
    }
    // An ALPN the relay does not speak: the handshake fails.
    let got = first_bytes(&relay, client_tls(w, "c9", &[b"portcullis-tunnel-h2/9"])).await;
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(
        relay.metric(TCP).await,
        Some(0),
        "no tunnel came of any of them"
    );
    assert!(
        relay
            .metric("portcullis_relay_handshakes_total{listener=\"https\",outcome=\"failed\",reason=\"no_common_alpn\"}")
            .await
            >= Some(1),
        "the unknown ALPN failed the handshake"
    );
}
