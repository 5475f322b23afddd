//! In process: the public relay against unauthenticated abuse. Strangers on the enrolment
//! ALPN get one stream at a time and are closed at the deadline; the connection caps refuse
//! an address's next connection and serve everyone else; Retry validates addresses; an
//! overloaded relay sheds new handshakes, then new requests, never what is already open.
//! Clients take loopback addresses of their own (`127.0.x.y`) to stand for different
//! hosts; every wait is on an event (a handshake, a response, a metric).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use portcullis_e2e::{
    H3Client, QuicDialer, RELAY_NAME, RunningRelay, TestConnector, TestOrigin, TestRelay, UdpPath,
    client_tls, loopback, refused, rss, tls_from, wait_for_metric,
};
use portcullis_shared::proto::ENROLL_ALPN;

const WEB: &str = "web.internal";
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const LEVEL: &str = "portcullis_relay_overload_level";
const RETRIES: &str = "portcullis_relay_quic_retries_total";

async fn within<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("the test timed out")
}

/// A relay where alice (eng) may reach [`WEB`], with `limits` as its `[limits]` table.
async fn relay(limits: &str) -> RunningRelay {
    TestRelay::new()
        .allow(&[WEB], &["eng"])
        .device("alice", "alice", &["eng"])
        .config(&format!("[limits]\n{limits}"))
        .run()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_enrolment_connection_gets_one_stream_at_a_time_and_is_closed_at_its_deadline()
{
    within(async {
        let relay = relay("enroll_timeout = \"2s\"").await;
        let stranger = QuicDialer::stranger(&relay.world, loopback(2), ENROLL_ALPN);
        let conn = stranger.dial(relay.addrs.quic, RELAY_NAME).await.unwrap();
        let connected = Instant::now();

        // One request stream at a time, and no unidirectional stream at all.
        let (mut send, mut recv) = conn
            .open_bi()
            .now_or_never()
            .expect("one stream is allowed at once")
            .unwrap();
        assert!(
            conn.open_bi().now_or_never().is_none(),
            "a second must wait"
        );
        assert!(
            conn.open_uni().now_or_never().is_none(),
            "no unidirectional streams"
        );
        // That stream is served...
        send.write_all(b"{}").await.unwrap();
        send.finish().unwrap();
        let answer = recv.read_to_end(64 * 1024).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains("malformed enrolment request"), "{answer}");
        // ...and once it is done, the next may open.
        let _idle = conn.open_bi().await.unwrap();

        // Nothing more is sent: the relay closes the connection at its deadline, whatever
        // keeps it alive at the QUIC level.
        let closed = conn.closed().await;
        assert!(
            connected.elapsed() >= Duration::from_millis(1500),
            "closed after {:?}, before the deadline",
            connected.elapsed()
        );
        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, quinn::VarInt::from_u32(0));
                assert_eq!(&close.reason[..], b"enrolment deadline passed");
            }
            other => panic!("closed otherwise: {other}"),
        }
        let closes = "portcullis_relay_enrolment_deadline_closes_total";
        assert_eq!(relay.metric(closes).await, Some(1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_caps_close_an_address_s_next_connection_before_tls_and_serve_everyone_else() {
    within(async {
        let relay = relay("max_connections = 4\nmax_connections_per_address = 2").await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay).expose(WEB, origin.addr).run().await;
        let tls = Arc::new(client_tls(&relay.world, "alice", &[b"http/1.1"]));
        let https = relay.addrs.https;
        let hold = |n: u16| tls_from(loopback(n), https, WEB, tls.clone());
        let alice = |n: u16| relay.client("alice").from_address(loopback(n));

        // Two connections held from one address: its third is closed before TLS.
        let first = hold(2).await.unwrap();
        let _second = hold(2).await.unwrap();
        assert!(hold(2).await.is_err(), "a third connection from one address");
        let r = alice(2).try_get(WEB, "/").await;
        assert!(r.is_err(), "{r:?}");
        // Everyone else is served.
        assert_eq!(alice(3).get(WEB, "/").await.status, 200);
        // A connection that ends gives its place back.
        drop(first);
        let https_open = "portcullis_relay_open_connections{listener=\"https\"}";
        wait_for_metric(relay.addrs.admin, https_open, "one held", |v| v == Some(1)).await;
        let _again = hold(2).await.unwrap();

        // The listener's cap: four held from three addresses, then a fourth address is
        // refused.
        let _held = [hold(3).await.unwrap(), hold(4).await.unwrap()];
        assert!(hold(5).await.is_err(), "a connection beyond max_connections");
        let refused = |reason: &str| {
            format!(
                "portcullis_relay_connections_refused_total{{listener=\"https\",reason=\"{reason}\"}}"
            )
        };
        assert_eq!(relay.metric(&refused("max_connections_per_address")).await, Some(2));
        assert_eq!(relay.metric(&refused("max_connections")).await, Some(1));
        assert_eq!(origin.requests(), [format!("{WEB} /")]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quic_caps_refuse_an_address_s_next_connection_and_serve_everyone_else() {
    within(async {
        let relay = relay("max_connections = 4\nmax_connections_per_address = 2").await;
        let origin = TestOrigin::start("web").await;
        // The connector's tunnel takes a place too (from 127.0.0.1).
        let _c1 = TestConnector::new(&relay).expose(WEB, origin.addr).run().await;
        let (w, addrs) = (&relay.world, &relay.addrs);
        let h3 = |n: u16| H3Client::try_connect_from(w, addrs, "alice", WEB, loopback(n));

        let mut first = h3(2).await.unwrap();
        let _second = h3(2).await.unwrap();
        let third = QuicDialer::device(w, "alice", loopback(2), b"h3")
            .dial(addrs.quic, WEB)
            .await;
        assert!(third.as_ref().is_err_and(refused), "{:?}", third.map(|_| ()));
        // Another address is served, and so is the first's open connection.
        let mut other = h3(3).await.unwrap();
        assert_eq!(other.get(WEB, "/").await.status, 200);
        assert_eq!(first.get(WEB, "/").await.status, 200);
        // Four open now: a new address is refused as well.
        let fifth = QuicDialer::device(w, "alice", loopback(4), b"h3")
            .dial(addrs.quic, WEB)
            .await;
        assert!(fifth.as_ref().is_err_and(refused), "{:?}", fifth.map(|_| ()));
        let refused = |reason: &str| {
            format!(
                "portcullis_relay_connections_refused_total{{listener=\"quic\",reason=\"{reason}\"}}"
            )
        };
        assert_eq!(relay.metric(&refused("max_connections_per_address")).await, Some(1));
        assert_eq!(relay.metric(&refused("max_connections")).await, Some(1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_retry_threshold_the_relay_validates_every_new_address_with_a_retry() {
    within(async {
        // Threshold 0: every new connection must prove its address first.
        let relay = relay("quic_retry_threshold = 0").await;
        let mut h3 = H3Client::connect(&relay.world, &relay.addrs, "alice", RELAY_NAME).await;
        let r = h3.get(RELAY_NAME, "/.well-known/jwks.json").await;
        assert_eq!(r.status, 200);
        assert_eq!(relay.metric(RETRIES).await, Some(1));
        // A stranger's handshake, watched on the wire: the relay's first answer is a
        // Retry, and the handshake completes once the client echoes its token.
        let path = UdpPath::start(relay.addrs.quic).await;
        let stranger = QuicDialer::stranger(&relay.world, loopback(2), ENROLL_ALPN);
        let conn = stranger.dial(path.addr, RELAY_NAME).await.unwrap();
        assert_eq!(path.retries(), 1);
        assert_eq!(relay.metric(RETRIES).await, Some(2));
        conn.close(0u32.into(), b"");

        // Under the default threshold, with no flood, nobody is asked.
        let calm = relay_with_defaults().await;
        let mut h3 = H3Client::connect(&calm.world, &calm.addrs, "alice", RELAY_NAME).await;
        assert_eq!(
            h3.get(RELAY_NAME, "/.well-known/jwks.json").await.status,
            200
        );
        let path = UdpPath::start(calm.addrs.quic).await;
        let stranger = QuicDialer::stranger(&calm.world, loopback(2), ENROLL_ALPN);
        stranger.dial(path.addr, RELAY_NAME).await.unwrap();
        assert_eq!(path.retries(), 0);
        assert!(
            path.counts
                .to_clients
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        assert_eq!(calm.metric(RETRIES).await, Some(0));
    })
    .await;
}

async fn relay_with_defaults() -> RunningRelay {
    relay("").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_threshold_new_handshakes_are_shed_and_open_connections_served() {
    within(async {
        // The connector's tunnel and alice's HTTP/3 connection make two.
        let relay = relay("overload_connections = 2").await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        let mut alice = H3Client::connect(&relay.world, &relay.addrs, "alice", WEB).await;
        wait_for_metric(relay.addrs.admin, LEVEL, "shedding", |v| v == Some(1)).await;

        // New handshakes are shed on both listeners, strangers' and devices' alike.
        let stranger = QuicDialer::stranger(&relay.world, loopback(2), ENROLL_ALPN);
        let shed = stranger.dial(relay.addrs.quic, RELAY_NAME).await;
        assert!(shed.as_ref().is_err_and(refused), "{:?}", shed.map(|_| ()));
        assert!(relay.client("alice").try_get(WEB, "/").await.is_err());
        // Requests on the open connection are served.
        assert_eq!(alice.get(WEB, "/").await.status, 200);
        let shed = |work: &str| format!("portcullis_relay_overload_shed_total{{work=\"{work}\"}}");
        assert_eq!(relay.metric(&shed("quic_handshake")).await, Some(1));
        assert_eq!(relay.metric(&shed("https_handshake")).await, Some(1));
        assert_eq!(relay.metric(&shed("request")).await, Some(0));

        // Once alice leaves, new connections are taken again.
        alice.endpoint.close(0u32.into(), b"");
        let quic_open = "portcullis_relay_open_connections{listener=\"quic\"}";
        wait_for_metric(relay.addrs.admin, quic_open, "alice gone", |v| v == Some(1)).await;
        wait_for_metric(relay.addrs.admin, LEVEL, "back to normal", |v| v == Some(0)).await;
        assert_eq!(relay.client("alice").get(WEB, "/").await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_memory_threshold_new_requests_get_503_while_an_open_stream_completes() {
    within(async {
        // The relay runs in this process, so memory this test takes is the relay's:
        // the threshold sits well above what the test starts with, and the ballast below
        // well above the threshold. (Under nextest each test is a process of its own.)
        const MIB: u64 = 1024 * 1024;
        let baseline = rss(std::process::id());
        let threshold = baseline + 192 * MIB;
        let relay = relay(&format!("overload_memory = {threshold}")).await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        let mut alice = H3Client::connect(&relay.world, &relay.addrs, "alice", WEB).await;
        assert_eq!(alice.get(WEB, "/").await.status, 200);
        let held = tokio::spawn({
            let alice = relay.client("alice");
            async move { alice.get(WEB, "/hold").await }
        });
        origin.wait_held(1).await;

        let ballast = std::hint::black_box(vec![1u8; (threshold + 64 * MIB - baseline) as usize]);
        wait_for_metric(relay.addrs.admin, LEVEL, "critical", |v| v == Some(2)).await;
        // A new request on an open connection: 503, saying why.
        let r = alice.get(WEB, "/").await;
        assert_eq!(r.status, 503);
        assert!(String::from_utf8_lossy(&r.body).contains("overloaded"));
        // A new connection: closed before TLS.
        assert!(relay.client("alice").try_get(WEB, "/").await.is_err());
        // The stream that was already open completes.
        origin.release();
        let r = held.await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "released by web"));
        let shed = |work: &str| format!("portcullis_relay_overload_shed_total{{work=\"{work}\"}}");
        assert_eq!(relay.metric(&shed("request")).await, Some(1));
        assert_eq!(relay.metric(&shed("https_handshake")).await, Some(1));
        assert_eq!(origin.requests().len(), 2, "{:?}", origin.requests());

        drop(ballast);
        wait_for_metric(relay.addrs.admin, LEVEL, "back to normal", |v| v == Some(0)).await;
        assert_eq!(alice.get(WEB, "/").await.status, 200);
    })
    .await;
}

/// Sends `GET path` for `host` every 250 ms on one HTTP/1.1 connection until it closes
/// (at most `rounds` times); returns how many were answered and when the connection
/// ended, counted from `start`.
async fn keep_asking<S>(io: S, host: &str, path: &str, rounds: usize) -> (usize, Option<Duration>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .unwrap();
    let mut ended = tokio::spawn(conn);
    let mut answered = 0;
    for _ in 0..rounds {
        let req = http::Request::get(path)
            .header("host", host)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        if send.send_request(req).await.is_err() {
            break;
        }
        answered += 1;
        tokio::select! {
            _ = &mut ended => return (answered, Some(start.elapsed())),
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    let closed = (&mut ended).now_or_never().is_some() || send.is_closed();
    (answered, closed.then(|| start.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_asking_every_250_ms_is_closed_at_unauthenticated_lifetime_and_a_device_is_not()
{
    within(async {
        let relay = relay("unauthenticated_lifetime = \"2s\"").await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        let https = relay.addrs.https;

        // A stranger keeps its connection busy (the JWKS needs no certificate): closed
        // at 2 s all the same.
        let stranger = Arc::new(portcullis_e2e::stranger_tls(&relay.world, &[b"http/1.1"]));
        let tls = tls_from(loopback(2), https, RELAY_NAME, stranger)
            .await
            .unwrap();
        let (answered, closed) = keep_asking(tls, RELAY_NAME, "/.well-known/jwks.json", 40).await;
        let closed = closed.expect("the stranger's connection was never closed");
        assert!(answered >= 4, "{answered} answered before the close");
        assert!(
            closed >= Duration::from_millis(1900) && closed < Duration::from_secs(6),
            "closed after {closed:?}"
        );

        // A device's connection lives on past it.
        let alice = Arc::new(client_tls(&relay.world, "alice", &[b"http/1.1"]));
        let tls = tls_from(loopback(3), https, WEB, alice).await.unwrap();
        let (answered, closed) = keep_asking(tls, WEB, "/", 14).await;
        assert_eq!((answered, closed), (14, None));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_strangers_hold_their_own_places_and_a_device_still_connects() {
    within(async {
        let relay = relay(
            "max_connections = 1000\nmax_unauthenticated_connections = 1000\n\
             max_connections_per_address = 500",
        )
        .await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay).expose(WEB, origin.addr).run().await;
        let https = relay.addrs.https;
        let stranger = Arc::new(portcullis_e2e::stranger_tls(&relay.world, &[b"http/1.1"]));

        // 1,000 strangers from four addresses, 50 handshakes at a time.
        let mut held = Vec::new();
        for batch in 0..20u16 {
            let dials = (0..50u16).map(|i| {
                let source = loopback(10 + (batch * 50 + i) % 4);
                tls_from(source, https, RELAY_NAME, stranger.clone())
            });
            for tls in futures_util::future::join_all(dials).await {
                held.push(tls.unwrap());
            }
        }
        let strangers = "portcullis_relay_unauthenticated_connections{listener=\"https\"}";
        wait_for_metric(relay.addrs.admin, strangers, "1,000 strangers held", |v| {
            v == Some(1000)
        })
        .await;
        // They left the listener's places: a device is served.
        let r = relay.client("alice").from_address(loopback(20)).get(WEB, "/").await;
        assert_eq!(r.status, 200);
        // The next stranger is closed after its handshake, and counted.
        let _next = tls_from(loopback(21), https, RELAY_NAME, stranger.clone()).await;
        let refused = "portcullis_relay_connections_refused_total{listener=\"https\",reason=\"max_unauthenticated_connections\"}";
        wait_for_metric(relay.addrs.admin, refused, "the 1,001st stranger refused", |v| {
            v == Some(1)
        })
        .await;
        // And one stranger leaving makes room for another.
        held.pop();
        wait_for_metric(relay.addrs.admin, strangers, "one stranger gone", |v| v == Some(999)).await;
        let _again = tls_from(loopback(22), https, RELAY_NAME, stranger).await.unwrap();
        wait_for_metric(relay.addrs.admin, strangers, "a stranger back", |v| v == Some(1000)).await;
        assert_eq!(origin.requests(), [format!("{WEB} /")]);
    })
    .await;
}
