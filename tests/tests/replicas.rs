//! Replicas: several connectors publishing one hostname, in process. The relay sends each
//! request to the replica with the fewest streams in flight (weighted by round-trip
//! time), routes around one it no longer hears from, and fails what was in flight on a
//! dead one with 502 instead of hanging.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use portcullis_e2e::{
    H3Client, RunningRelay, Tally, TestConnector, TestOrigin, TestRelay, UdpPath, client_tls,
    eventually, h2_connect, h2_read_all, loopback, tls_from, wait_for_metric,
};

const WEB: &str = "web.internal";
/// Every test's bound: generous for two cores, short enough to name a hang.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn within<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("the test timed out")
}

async fn relay() -> RunningRelay {
    TestRelay::new()
        .allow(&[WEB], &["eng"])
        .device("alice", "alice", &["eng"])
        .run()
        .await
}

/// How many requests reached `origin`.
fn reached(origin: &TestOrigin) -> usize {
    origin.requests().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replica_gets_fewer_requests_than_a_fast_one() {
    within(async {
        let relay = relay().await;
        // The slow replica holds every /hold request; the fast one answers at once.
        let slow = TestOrigin::start("slow").await;
        let fast = TestOrigin::start("fast").await;
        fast.release();
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, slow.addr)
            .run()
            .await;
        let _c2 = TestConnector::new(&relay)
            .expose(WEB, fast.addr)
            .run()
            .await;

        // One request at a time, each sent once the previous one reached an origin: with
        // round robin the slow replica would get half of them.
        const N: usize = 20;
        let mut pending = Vec::new();
        for i in 0..N {
            let client = relay.client("alice");
            pending.push(tokio::spawn(async move { client.get(WEB, "/hold").await }));
            let arrived = eventually(Duration::from_secs(10), || async {
                (reached(&slow) + reached(&fast) > i).then_some(())
            })
            .await;
            assert!(arrived.is_some(), "request {i} reached no origin");
        }
        let (to_slow, to_fast) = (reached(&slow), reached(&fast));
        assert!(
            to_slow <= 3 && to_fast >= N - 3,
            "slow replica got {to_slow}, fast one {to_fast}"
        );
        slow.release();
        for p in pending {
            assert_eq!(p.await.unwrap().status, 200);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_gone_silent_is_routed_around_and_its_requests_fail_with_502() {
    within(async {
        let relay = relay().await;
        let gone = TestOrigin::start("gone").await;
        let alive = TestOrigin::start("alive").await;
        // The first connector's path to the relay can be cut, as if its host died.
        let path = UdpPath::start(relay.addrs.quic).await;
        let _c1 = TestConnector::new(&relay)
            .via(path.addr)
            .expose(WEB, gone.addr)
            .run()
            .await;
        let _c2 = TestConnector::new(&relay)
            .expose(WEB, alive.addr)
            .run()
            .await;

        // A request held on the first replica when its path goes dark.
        let client = relay.client("alice");
        let held = tokio::spawn(async move {
            let mut last = None;
            // Until one lands on the replica that holds it (the other answers at once).
            for _ in 0..10 {
                let r = client.get(WEB, "/hold").await;
                if r.body.contains("released by alive") {
                    continue;
                }
                last = Some(r);
                break;
            }
            last
        });
        alive.release();
        gone.wait_held(1).await;
        path.set_blackhole(true);

        // What was in flight on it fails with 502 within the tunnel's idle timeout.
        let r = tokio::time::timeout(Duration::from_secs(15), held)
            .await
            .expect("the request on a dead replica must not hang")
            .unwrap()
            .expect("one request reached the first replica");
        assert_eq!(r.status, 502, "{}", r.body);

        // New requests all go to the live replica.
        let before = reached(&gone);
        for _ in 0..20 {
            let r = relay.client("alice").get(WEB, "/").await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        assert_eq!(reached(&gone), before);
    })
    .await;
}

/// Sends GETs for [`WEB`] one after another on one connection of each protocol (HTTP/1.1
/// keep-alive, HTTP/2, HTTP/3) until `stop`, counting outcomes in `tally`.
async fn steady_load(
    relay: &RunningRelay,
    tally: Arc<Tally>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let tls = Arc::new(client_tls(&relay.world, "alice", &[b"http/1.1"]));
    let io = tls_from(loopback(1), relay.addrs.https, WEB, tls)
        .await
        .unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut h2 = h2_connect(&relay.world, &relay.addrs, "alice", WEB).await;
    let mut h3 = H3Client::connect(&relay.world, &relay.addrs, "alice", WEB).await;
    let h1 = {
        let (tally, stop) = (tally.clone(), stop.clone());
        tokio::spawn(async move {
            while !*stop.borrow() {
                let req = http::Request::get("/")
                    .header(http::header::HOST, WEB)
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let outcome = async {
                    let resp = h1.send_request(req).await.map_err(|e| format!("h1: {e}"))?;
                    let status = resp.status().as_u16();
                    resp.into_body()
                        .collect()
                        .await
                        .map_err(|e| format!("h1 body: {e}"))?;
                    Ok(status)
                }
                .await;
                tally.record(outcome);
            }
        })
    };
    let h2 = {
        let (tally, stop) = (tally.clone(), stop.clone());
        tokio::spawn(async move {
            while !*stop.borrow() {
                let req = http::Request::get(format!("https://{WEB}/"))
                    .body(())
                    .unwrap();
                let outcome = async {
                    let (resp, _) = h2.send_request(req, true).map_err(|e| format!("h2: {e}"))?;
                    let resp = resp.await.map_err(|e| format!("h2: {e}"))?;
                    let status = resp.status().as_u16();
                    h2_read_all(&mut resp.into_body()).await;
                    Ok(status)
                }
                .await;
                tally.record(outcome);
            }
        })
    };
    let h3 = tokio::spawn(async move {
        while !*stop.borrow() {
            let req = http::Request::get(format!("https://{WEB}/"))
                .body(())
                .unwrap();
            let r = h3.try_request(req, None).await;
            tally.record(r.map(|r| r.status).map_err(|e| format!("h3: {e:#}")));
        }
    });
    vec![h1, h2, h3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_each_of_two_connector_replicas_under_load_loses_no_request() {
    within(async {
        let relay = relay().await;
        let a = TestOrigin::start("a").await;
        let b = TestOrigin::start("b").await;
        let c1 = TestConnector::new(&relay)
            .name("c1")
            .expose(WEB, a.addr)
            .run()
            .await;
        let c2 = TestConnector::new(&relay)
            .name("c2")
            .expose(WEB, b.addr)
            .run()
            .await;
        let tally = Arc::new(Tally::default());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let load = steady_load(&relay, tally.clone(), stop).await;
        let reach = |n: usize| {
            let tally = tally.clone();
            async move {
                let got = eventually(Duration::from_secs(60), || async {
                    (tally.ok() >= n).then_some(())
                })
                .await;
                assert!(got.is_some(), "the load stalled at {} answered", tally.ok());
            }
        };
        const N: usize = 5_000;
        reach(N / 5).await;
        // A rolling restart: each replica in turn drains, stops and comes back.
        c1.stop().await.unwrap();
        let _c1 = TestConnector::new(&relay)
            .name("c1")
            .expose(WEB, a.addr)
            .run()
            .await;
        reach(N / 2).await;
        c2.stop().await.unwrap();
        let _c2 = TestConnector::new(&relay)
            .name("c2")
            .expose(WEB, b.addr)
            .run()
            .await;
        reach(N).await;
        stop_tx.send(true).unwrap();
        for l in load {
            l.await.unwrap();
        }
        let failed = tally.failed();
        assert_eq!(failed, 0, "{:?}", tally.why());
        assert!(tally.ok() >= N);
        // Both origins served, before and after their restarts.
        assert!(!a.requests().is_empty() && !b.requests().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_origin_is_withdrawn_and_restored_and_the_relay_counts_healthy_replicas() {
    within(async {
        let relay = relay().await;
        let sick = TestOrigin::start("sick").await;
        let well = TestOrigin::start("well").await;
        let check = "[ingress.health_check]\npath = \"/healthz\"\ninterval = \"200ms\"\nrise = 2\nfall = 2\n";
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, sick.addr)
            .config(check)
            .run()
            .await;
        let _c2 = TestConnector::new(&relay)
            .expose(WEB, well.addr)
            .config(check)
            .run()
            .await;
        let replicas = format!("portcullis_relay_hostname_replicas{{hostname=\"{WEB}\"}}");
        wait_for_metric(relay.addrs.admin, &replicas, "two healthy", |v| v == Some(2)).await;

        // The first origin fails its checks: its hostname is withdrawn from the relay.
        sick.set_healthy(false);
        wait_for_metric(relay.addrs.admin, &replicas, "one healthy", |v| v == Some(1)).await;
        let before = reached(&sick);
        for _ in 0..10 {
            let r = relay.client("alice").get(WEB, "/").await;
            assert_eq!((r.status, r.json()["origin"].as_str()), (200, Some("well")));
        }
        assert_eq!(reached(&sick), before);

        // Healthy again: published again, and it gets requests again.
        sick.set_healthy(true);
        wait_for_metric(relay.addrs.admin, &replicas, "two again", |v| v == Some(2)).await;
        assert_eq!(
            relay.client("alice").origins_answering(WEB, 2).await,
            ["sick", "well"]
        );
    })
    .await;
}
