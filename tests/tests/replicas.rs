//! Replicas: several connectors publishing one hostname, in process. The relay sends each
//! request to the replica with the fewest streams in flight (weighted by round-trip
//! time), routes around one it no longer hears from, and fails what was in flight on a
//! dead one with 502 instead of hanging.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::{RunningRelay, TestConnector, TestOrigin, TestRelay, UdpPath, eventually};

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
                if r.body.contains("\"origin\":\"alive\"") {
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
