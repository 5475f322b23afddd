//! The in-process tier: relay and connector run from their libraries inside the test's
//! runtime, with in-process origins and clients, all on `127.0.0.1:0`. Each test has its
//! own directory, CA and timeout, waits on events (bound, registered, held at the origin,
//! a status the relay answers) and never on the clock, and asserts what a user sees.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::{
    H3Client, RELAY_NAME, RunningRelay, TestConnector, TestOrigin, TestRelay, admin_get_with,
    eventually, tls_probe, wait_for_metric, wait_for_tunnel_streams,
};
use rustls::version::{TLS12, TLS13};
use rustls_pki_types::pem::PemObject;

/// TLS 1.3 only, as every client the relay accepts by default.
const ONLY_TLS13: &[&rustls::SupportedProtocolVersion] = &[&TLS13];

const WEB: &str = "web.internal";
const OTHER: &str = "other.internal";
const IDLE: &str = "idle.internal";
/// Every test's bound: generous for two cores, short enough to name a hang.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a test body under [`TEST_TIMEOUT`].
async fn within<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("the test timed out")
}

/// A relay where group eng may reach [`WEB`], [`OTHER`] and [`IDLE`]; devices alice
/// (eng) and bob (sales).
async fn relay() -> RunningRelay {
    TestRelay::new()
        .allow(&[WEB, OTHER, IDLE], &["eng"])
        .device("alice", "alice", &["eng"])
        .device("bob", "bob", &["sales"])
        .run()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_through_relay_and_connector_returns_the_origins_answer_with_the_identity() {
    within(async {
        let relay = relay().await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;

        let r = relay.client("alice").get(WEB, "/hello?x=1").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(
            (v["origin"].as_str(), v["path"].as_str()),
            (Some("web"), Some("/hello"))
        );
        let h = &v["headers"];
        assert_eq!(h["portcullis-user"], "alice");
        assert_eq!(h["portcullis-device"], "alice");
        assert_eq!(h["portcullis-groups"], "eng");

        // The same origin over HTTP/3, on the same in-process relay.
        let mut h3 = H3Client::connect(&relay.world, &relay.addrs, "alice", WEB).await;
        let r = h3.get(WEB, "/over-h3").await;
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["path"], "/over-h3");
        assert_eq!(v["headers"]["portcullis-user"], "alice");
        assert_eq!(
            origin.requests(),
            [format!("{WEB} /hello"), format!("{WEB} /over-h3")]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_the_policy_does_not_allow_gets_403_and_nothing_reaches_the_origin() {
    within(async {
        let relay = relay().await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;

        let r = relay.client("bob").get(WEB, "/for-eng-only").await;
        assert_eq!(r.status, 403, "{}", r.body);
        assert!(r.body.contains("policy does not allow"), "{}", r.body);
        let denied = "portcullis_relay_policy_denials_total";
        assert_eq!(relay.metric(denied).await, Some(1));
        // The route itself works: alice's request is the only one the origin saw.
        assert_eq!(relay.client("alice").get(WEB, "/").await.status, 200);
        assert_eq!(origin.requests(), [format!("{WEB} /")]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_refused_and_a_name_without_a_connector_online_gets_502() {
    within(async {
        let relay = relay().await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        // IDLE may be published, but its connector never connects.
        relay.issue_connector("spare", &[IDLE]).await;
        let alice = relay.client("alice");

        // A name nobody may publish: a normal handshake with the relay's own certificate
        // (a stranger learns nothing from the handshake), then the usual refusals: 404
        // for a device, 403 for a caller without a device certificate.
        let https = relay.addrs.https;
        let probe = |sni: &'static str, device: Option<&'static str>| {
            tls_probe(&relay.world, https, sni, device, ONLY_TLS13)
        };
        let p = probe("nope.internal", Some("alice")).await.unwrap();
        assert_eq!(
            (p.names.as_slice(), p.status),
            (&[RELAY_NAME.to_owned()][..], Some(404))
        );
        let p = probe("nope.internal", None).await.unwrap();
        assert_eq!(
            (p.names.as_slice(), p.status),
            (&[RELAY_NAME.to_owned()][..], Some(403))
        );
        // A published name gets its own certificate.
        let p = probe(WEB, None).await.unwrap();
        assert_eq!(
            (p.names.as_slice(), p.status),
            (&[WEB.to_owned()][..], Some(403))
        );
        // A client that checks the certificate refuses the relay's for the unknown name.
        let refused = alice.try_get("nope.internal", "/").await;
        assert!(refused.is_err(), "{refused:?}");
        // The same name asked for on a connection to the relay's own name: 404.
        let r = alice.get_via_relay_name("nope.internal", "/").await;
        assert_eq!(r.status, 404, "{}", r.body);
        // A published name with no connector online: 502, saying so.
        let r = alice.get(IDLE, "/").await;
        assert_eq!(r.status, 502, "{}", r.body);
        assert!(r.body.contains("no connector is online"), "{}", r.body);
        // Meanwhile the published, connected name is served.
        assert_eq!(alice.get(WEB, "/").await.status, 200);
        assert_eq!(alice.get_via_relay_name(WEB, "/").await.status, 200);
        assert_eq!(origin.requests().len(), 2, "{:?}", origin.requests());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_cannot_take_a_hostname_it_was_not_issued() {
    within(async {
        let relay = relay().await;
        let a = TestOrigin::start("a").await;
        let b = TestOrigin::start("b").await;
        let c1 = TestConnector::new(&relay).expose(WEB, a.addr).run().await;
        // c2's certificate names OTHER only, yet it asks to publish WEB as well.
        let _c2 = TestConnector::new(&relay)
            .issued_for(&[OTHER])
            .expose(OTHER, b.addr)
            .expose(WEB, b.addr)
            .run()
            .await;
        let alice = relay.client("alice");

        // c2 is registered and serves what it was issued...
        let r = alice.get(OTHER, "/").await;
        assert_eq!((r.status, r.json()["origin"].as_str()), (200, Some("b")));
        // ...but WEB goes to c1 only, however often it is asked for.
        for i in 0..6 {
            let r = alice.get(WEB, &format!("/{i}")).await;
            assert_eq!((r.status, r.json()["origin"].as_str()), (200, Some("a")));
        }
        // With c1 gone, WEB has no connector at all: c2 never got it.
        c1.stop().await.unwrap();
        relay.wait_for_connectors(1).await;
        let r = alice.get(WEB, "/").await;
        assert_eq!(r.status, 502, "{}", r.body);
        assert_eq!(b.requests(), [format!("{OTHER} /")]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connectors_share_a_name_and_one_leaving_loses_no_request() {
    within(async {
        let relay = relay().await;
        let a = TestOrigin::start("a").await;
        let b = TestOrigin::start("b").await;
        let c1 = TestConnector::new(&relay).expose(WEB, a.addr).run().await;
        let _c2 = TestConnector::new(&relay).expose(WEB, b.addr).run().await;
        let alice = relay.client("alice");

        // Idle replicas take turns: requests reach both.
        assert_eq!(alice.origins_answering(WEB, 2).await, ["a", "b"]);
        // c1 leaves gracefully: every later request is served by c2's origin.
        c1.stop().await.unwrap();
        relay.wait_for_connectors(1).await;
        for _ in 0..4 {
            let r = alice.get(WEB, "/").await;
            assert_eq!((r.status, r.json()["origin"].as_str()), (200, Some("b")));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_connector_shutdown_still_delivers_the_in_flight_response() {
    within(async {
        let relay = relay().await;
        let origin = TestOrigin::start("web").await;
        let c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        let alice = relay.client("alice");

        // A request the origin holds until told.
        let in_flight = tokio::spawn({
            let alice = alice.clone();
            async move { alice.get(WEB, "/hold").await }
        });
        origin.wait_held(1).await;
        let stopping = tokio::spawn(c1.stop());
        // The drain has reached the relay once it routes nothing more to c1.
        let drained = eventually(Duration::from_secs(10), || async {
            let r = alice.get(WEB, "/").await;
            assert!(matches!(r.status, 200 | 502), "{} {}", r.status, r.body);
            (r.status == 502).then_some(())
        })
        .await;
        assert!(
            drained.is_some(),
            "a draining connector must get no new requests"
        );
        assert!(
            !stopping.is_finished(),
            "c1 must wait for its in-flight stream"
        );

        origin.release();
        let r = in_flight.await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "released by web"));
        stopping.await.unwrap().expect("c1 stops cleanly");
        relay.wait_for_connectors(0).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_shutdown_drains_the_in_flight_request_and_stops_cleanly() {
    within(async {
        let relay = relay().await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        let alice = relay.client("alice");
        let https = relay.addrs.https;

        let in_flight = tokio::spawn({
            let alice = alice.clone();
            async move { alice.get(WEB, "/hold").await }
        });
        origin.wait_held(1).await;
        wait_for_tunnel_streams(relay.addrs.admin, 1).await;
        let stopping = tokio::spawn(relay.stop());
        // Draining: the relay no longer accepts connections.
        let closed = eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(https)
                .await
                .is_err()
                .then_some(())
        })
        .await;
        assert!(closed.is_some(), "a stopping relay must stop accepting");
        assert!(
            !stopping.is_finished(),
            "the relay must wait for its in-flight request"
        );

        origin.release();
        let r = in_flight.await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "released by web"));
        stopping.await.unwrap().expect("the relay stops cleanly");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_loses_its_live_request_and_is_refused_after() {
    within(async {
        let relay = relay().await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        relay.issue_device("carol", "carol", &["eng"]).await;
        let alice = relay.client("alice");
        let carol = relay.client("carol");
        assert_eq!(alice.get(WEB, "/").await.status, 200);
        assert_eq!(carol.get(WEB, "/").await.status, 200);

        let live = tokio::spawn({
            let alice = alice.clone();
            async move { alice.try_get(WEB, "/hold").await }
        });
        origin.wait_held(1).await;
        relay.revoke("device", "alice").await;
        // Its open connection is closed: the held request never gets a response.
        let cut = tokio::time::timeout(Duration::from_secs(10), live)
            .await
            .expect("the revoked device's connection must be closed")
            .unwrap();
        assert!(cut.is_err(), "{cut:?}");
        // A new connection is refused; other devices are unaffected.
        let refused = alice.try_get(WEB, "/").await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(carol.get(WEB, "/").await.status, 200);
        origin.release();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_names_under_a_wildcard_from_one_stranger_never_take_a_published_names_certificate()
 {
    within(async {
        let relay = TestRelay::new()
            .config("[tls]\nleaves_per_minute = 3")
            .run()
            .await;
        relay
            .issue_connector(
                "wild",
                &[
                    "*.wild.internal",
                    "app.internal",
                    "db.internal",
                    "ci.internal",
                ],
            )
            .await;
        let https = relay.addrs.https;
        let minted = "portcullis_relay_tls_leaves_minted_total";
        let exhausted = "portcullis_relay_tls_mint_budget_exhausted_total";
        let names = |sni: String| {
            let world = &relay.world;
            async move {
                tls_probe(world, https, &sni, None, ONLY_TLS13)
                    .await
                    .unwrap()
                    .names
            }
        };
        // Every published name is minted in the background, more than the budget allows
        // on demand.
        wait_for_metric(
            relay.addrs.admin,
            minted,
            "four published names minted",
            |v| v == Some(4),
        )
        .await;

        // One stranger walks hundreds of names: one label below the wildcard they share
        // its leaf, deeper ones get the relay's own certificate; nothing is minted.
        for i in 0..150 {
            assert_eq!(
                names(format!("x{i}.wild.internal")).await,
                ["*.wild.internal"]
            );
            assert_eq!(names(format!("x.p{i}.wild.internal")).await, [RELAY_NAME]);
        }
        assert_eq!(relay.metric(minted).await, Some(4));
        assert_eq!(relay.metric(exhausted).await, Some(0));
        // The published names keep their certificates.
        for name in ["app.internal", "db.internal", "ci.internal"] {
            assert_eq!(names(name.into()).await, [name]);
        }
        // A name published after the flood gets its own too.
        relay.issue_connector("late", &["late.internal"]).await;
        wait_for_metric(relay.addrs.admin, minted, "the late name minted", |v| {
            v == Some(5)
        })
        .await;
        assert_eq!(names("late.internal".into()).await, ["late.internal"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_listener_speaks_tls_1_3_only_unless_configured() {
    within(async {
        let relay = relay().await;
        let https = relay.addrs.https;
        let tls12 = tls_probe(&relay.world, https, RELAY_NAME, Some("alice"), &[&TLS12]).await;
        assert!(tls12.is_err(), "TLS 1.2 must be refused: {tls12:?}");
        let tls13 = tls_probe(&relay.world, https, RELAY_NAME, Some("alice"), &[&TLS13]).await;
        assert!(tls13.is_ok(), "{tls13:?}");

        let relay = TestRelay::new()
            .device("alice", "alice", &["eng"])
            .config("[tls]\nmin_version = \"1.2\"")
            .run()
            .await;
        let p = tls_probe(
            &relay.world,
            relay.addrs.https,
            RELAY_NAME,
            Some("alice"),
            &[&TLS12],
        )
        .await
        .unwrap();
        assert_eq!(p.names, [RELAY_NAME]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_connection_is_closed_when_its_certificate_expires() {
    within(async {
        let relay = relay().await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        relay.world.issue_device("eve", "eve", &["eng"], Some("4s"));
        portcullis_e2e::wait_for_identity(relay.addrs.admin, "device", "eve", true).await;
        let cert = std::fs::read(relay.world.path("out/eve.crt")).unwrap();
        let der = rustls_pki_types::CertificateDer::pem_slice_iter(&cert)
            .next()
            .unwrap()
            .unwrap();
        let not_after = portcullis_shared::pki::inspect(&der).unwrap().not_after;
        let eve = relay.client("eve");

        // A request the origin holds past the certificate's expiry.
        let live = tokio::spawn({
            let eve = eve.clone();
            async move { eve.try_get(WEB, "/hold").await }
        });
        origin.wait_held(1).await;
        let cut = tokio::time::timeout(Duration::from_secs(15), live)
            .await
            .expect("the connection must be closed when the certificate expires")
            .unwrap();
        assert!(cut.is_err(), "{cut:?}");
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            at >= not_after,
            "cut at {at}, before the expiry {not_after}"
        );
        origin.release();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reissued_device_loses_its_live_connection_and_its_old_certificate() {
    within(async {
        let relay = relay().await;
        let origin = TestOrigin::start("web").await;
        let _c1 = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        for ext in ["crt", "key"] {
            let out = |name: &str| relay.world.path(&format!("out/{name}.{ext}"));
            std::fs::copy(out("alice"), out("alice-v1")).unwrap();
        }
        let old = relay.client("alice-v1");
        assert_eq!(old.get(WEB, "/").await.status, 200);
        let live = tokio::spawn({
            let old = old.clone();
            async move { old.try_get(WEB, "/hold").await }
        });
        origin.wait_held(1).await;

        // Re-issued with a new key: the old certificate's connection is cut...
        relay.world.issue_device("alice", "alice", &["eng"], None);
        let cut = tokio::time::timeout(Duration::from_secs(10), live)
            .await
            .expect("the superseded certificate's connection must be closed")
            .unwrap();
        assert!(cut.is_err(), "{cut:?}");
        // ...and refused at the handshake from then on; the new one works.
        let refused = old.try_get(WEB, "/").await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(relay.client("alice").get(WEB, "/").await.status, 200);
        origin.release();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_wants_its_token_and_metrics_name_no_device_unless_asked() {
    within(async {
        let token = "s3cret-admin-token-0123456789";
        let relay = TestRelay::new().device("alice", "alice", &["eng"]);
        std::fs::write(relay.world().path("admin.token"), format!("{token}\n")).unwrap();
        let relay = relay
            .config("[admin]\ntoken_file = \"admin.token\"")
            .run()
            .await;
        let admin = relay.addrs.admin;
        for path in ["/healthz", "/metrics"] {
            let (status, _) = admin_get_with(admin, path, None).await.unwrap();
            assert_eq!(status, 401, "{path} without the token");
            let (status, _) = admin_get_with(admin, path, Some("wrong")).await.unwrap();
            assert_eq!(status, 401, "{path} with a wrong token");
        }
        let (status, text) = admin_get_with(admin, "/metrics", Some(token))
            .await
            .unwrap();
        assert_eq!(status, 200);
        // Device ids carry user names: only counted, not listed, by default.
        assert!(
            text.contains("portcullis_relay_identities{role=\"device\"} 1"),
            "{text}"
        );
        assert!(!text.contains("alice"), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_may_skip_the_admin_token_while_metrics_still_want_it() {
    within(async {
        let token = "s3cret-admin-token-0123456789";
        let relay = TestRelay::new();
        std::fs::write(relay.world().path("admin.token"), format!("{token}\n")).unwrap();
        let relay = relay
            .config("[admin]\ntoken_file = \"admin.token\"\nprobes_without_token = true")
            .run()
            .await;
        let admin = relay.addrs.admin;
        for path in ["/healthz", "/readyz"] {
            let (status, _) = admin_get_with(admin, path, None).await.unwrap();
            assert_eq!(status, 200, "{path} without the token");
        }
        let (status, _) = admin_get_with(admin, "/metrics", None).await.unwrap();
        assert_eq!(status, 401);
        let (status, _) = admin_get_with(admin, "/metrics", Some(token))
            .await
            .unwrap();
        assert_eq!(status, 200);
    })
    .await;
}
