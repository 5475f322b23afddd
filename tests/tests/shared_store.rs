//! Several relays on one PostgreSQL store, started by the test itself (see
//! [`TestPostgres`]): what one relay or the admin CLI writes, every relay applies; an
//! enrolment token is single-use across relays; relays with other keys are refused; and
//! a store outage leaves relays serving with their last good view, then failing closed.
//!
//! Each test skips when PostgreSQL is not installed, unless `PORTCULLIS_REQUIRE_POSTGRES`
//! is set (CI sets it).

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_e2e::{
    H3Client, RELAY_NAME, RunningRelay, TestConnector, TestOrigin, TestPostgres, TestRelay, World,
    bin, eventually, relay_cli, wait_for_identity, wait_for_metric,
};
use portcullis_shared::Role;
use portcullis_shared::store::{PostgresStore, Store, StoreError, TokenGrant, TokenRecord};
use portcullis_shared::token::EnrollToken;

const WEB: &str = "web.internal";
/// Every test's bound: generous for two cores, short enough to name a hang.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn within<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("the test timed out")
}

/// A relay on `world` where group eng may reach [`WEB`].
async fn relay_in(world: World, extra: &str) -> RunningRelay {
    TestRelay::in_world(world)
        .allow(&[WEB], &["eng"])
        .config(extra)
        .run()
        .await
}

/// Two relays on `pg`'s store, the second made from a copy of the first's state
/// directory; device alice (eng) was issued before the copy, so both worlds hold her files.
async fn two_relays(pg: &TestPostgres) -> (RunningRelay, RunningRelay) {
    let first = World::with_store(&pg.url);
    first.issue_device("alice", "alice", &["eng"], None);
    let second = World::copy_of(&first);
    (relay_in(first, "").await, relay_in(second, "").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_identities_and_a_revocation_on_either_cuts_connections_on_both() {
    within(async {
        let Some(pg) = TestPostgres::start().await else {
            return;
        };
        let (r1, r2) = two_relays(&pg).await;

        // Issued through the first relay's state, known to the second.
        r1.world.issue_device("bob", "bob", &["eng"], None);
        wait_for_identity(r2.addrs.admin, "device", "bob", true).await;
        // (Bob's certificate is in the first world's files.)
        let mut bob = H3Client::connect(&r1.world, &r2.addrs, "bob", RELAY_NAME).await;
        assert_eq!(
            bob.get(RELAY_NAME, "/.well-known/jwks.json").await.status,
            200
        );

        // Alice is connected to both; revoked through the second relay's admin CLI.
        let mut on_r1 = H3Client::connect(&r1.world, &r1.addrs, "alice", RELAY_NAME).await;
        let mut on_r2 = H3Client::connect(&r2.world, &r2.addrs, "alice", RELAY_NAME).await;
        for c in [&mut on_r1, &mut on_r2] {
            assert_eq!(
                c.get(RELAY_NAME, "/.well-known/jwks.json").await.status,
                200
            );
        }
        r2.world.admin(&["revoke", "device", "alice"]);
        let revoked = Instant::now();
        assert!(on_r1.closed_within(Duration::from_secs(1)).await);
        assert!(on_r2.closed_within(Duration::from_secs(1)).await);
        let took = revoked.elapsed();
        assert!(took < Duration::from_secs(1), "both cut after {took:?}");
        assert!(
            H3Client::try_connect(&r1.world, &r1.addrs, "alice", RELAY_NAME)
                .await
                .is_err()
        );
        // Bob is untouched.
        assert_eq!(
            bob.get(RELAY_NAME, "/.well-known/jwks.json").await.status,
            200
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolment_token_is_used_once_across_relays_under_a_race() {
    within(async {
        let Some(pg) = TestPostgres::start().await else {
            return;
        };
        let (r1, r2) = two_relays(&pg).await;

        // Several rounds: each time two agents enrol with one token at once, one through
        // each relay; exactly one gets a certificate.
        for round in 0..3 {
            let out = r1.world.admin(&[
                "token",
                "create",
                "device",
                "--user",
                &format!("carol{round}"),
                "--group",
                "eng",
                "--relay",
                &r1.addrs.quic.to_string(),
            ]);
            let token = EnrollToken::decode(out.lines().last().unwrap()).unwrap();
            let via_r2 = EnrollToken {
                relay: r2.addrs.quic.to_string(),
                ..token.clone()
            };
            let enrol = |t: &EnrollToken, who: &str| {
                let home = r1.world.path(&format!("{who}-{round}"));
                let file = r1.world.path(&format!("{who}-{round}.token"));
                std::fs::write(&file, t.encode()).unwrap();
                tokio::process::Command::new(bin("portcullis"))
                    .arg("--home")
                    .arg(home)
                    .args(["enroll", "--key-store", "file", "--token-file"])
                    .arg(file)
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .output()
            };
            let (a, b) = tokio::join!(enrol(&token, "a"), enrol(&via_r2, "b"));
            let (a, b) = (a.unwrap(), b.unwrap());
            let won = [&a, &b].iter().filter(|o| o.status.success()).count();
            let said = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
            assert_eq!(won, 1, "round {round}: {}\n{}", said(&a), said(&b));
            let loser = if a.status.success() { &b } else { &a };
            assert!(
                said(loser).contains("already used"),
                "round {round}: {}",
                said(loser)
            );
        }

        // And at the store itself, eight relays' worth of handles racing on one token.
        let url = pg.url.clone();
        let won = tokio::task::spawn_blocking(move || race_at_the_store(&url, 8))
            .await
            .unwrap();
        assert_eq!(won, 1);
    })
    .await;
}

/// Redeems one token from `n` store handles on `n` threads at once; how many succeeded.
fn race_at_the_store(url: &str, n: usize) -> usize {
    let stores: Vec<Arc<PostgresStore>> = (0..n)
        .map(|_| Arc::new(PostgresStore::connect(url).unwrap()))
        .collect();
    stores[0]
        .create_token(&TokenRecord {
            id: "race".into(),
            secret_sha256: "s".into(),
            grant: TokenGrant {
                role: Role::Device,
                user: Some("dora".into()),
                groups: vec![],
                name: None,
                hostnames: vec![],
                cert_ttl_secs: 60,
            },
            created_at: 0,
            expires_at: i64::MAX,
            used_at: None,
            revoked_at: None,
        })
        .unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = stores
        .into_iter()
        .map(|store| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                match store.redeem_token("race", "s", 1) {
                    Ok(_) => true,
                    Err(StoreError::TokenRefused(why)) => {
                        assert_eq!(why, "the token was already used");
                        false
                    }
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|won| *won)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_other_keys_is_refused_by_the_store_and_a_newer_schema_is_refused() {
    within(async {
        let Some(pg) = TestPostgres::start().await else {
            return;
        };
        let _first = World::with_store(&pg.url);
        // Another organisation's CA, pointed at the same store.
        let stranger = World::new();
        let out = relay_cli(&["list", "--state", stranger.state(), "--store", &pg.url]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("belongs to the CA"), "{err}");
        assert!(
            !err.contains("s3cret"),
            "the password must be masked: {err}"
        );

        // A store migrated by a newer release.
        pg.execute("UPDATE meta SET value = 999 WHERE key = 'schema_version'")
            .await
            .unwrap();
        let out = relay_cli(&["list", "--state", _first.state(), "--store", &pg.url]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("newer than this release knows"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_at_start_is_one_clear_line_with_the_password_masked() {
    within(async {
        let w = World::new();
        // Port 1 on loopback: nothing listens there.
        let url = "postgres://relay:hunter2@127.0.0.1:1/portcullis";
        let out = relay_cli(&["list", "--state", w.state(), "--store", url]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("postgres://relay:***@127.0.0.1:1/portcullis") && !err.contains("hunter2"),
            "{err}"
        );
        // The relay itself, with the URL in relay.toml.
        let config = w.write_relay_config(
            "127.0.0.1:0",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &format!("store = {url:?}\n"),
        );
        let out = std::process::Command::new(bin("portcullis-relay"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("postgres://relay:***@127.0.0.1:1/portcullis") && !err.contains("hunter2"),
            "{err}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_store_outage_relays_serve_refuse_enrolment_fail_closed_and_catch_up() {
    within(async {
        let Some(mut pg) = TestPostgres::start().await else {
            return;
        };
        let world = World::with_store(&pg.url);
        world.issue_device("alice", "alice", &["eng"], None);
        let store = format!("[store]\nurl = {:?}\nfail_closed_after = \"4s\"\n", pg.url);
        let relay = relay_in(world, &store).await;
        let origin = TestOrigin::start("web").await;
        let _c = TestConnector::new(&relay)
            .expose(WEB, origin.addr)
            .run()
            .await;
        assert_eq!(relay.client("alice").get(WEB, "/").await.status, 200);

        pg.stop();
        let unreadable = "portcullis_relay_store_unreadable";
        wait_for_metric(relay.addrs.admin, unreadable, "store down", |v| {
            v == Some(1)
        })
        .await;
        // Still served from the last good view, on a new connection too.
        assert_eq!(relay.client("alice").get(WEB, "/").await.status, 200);
        // Issuing needs the store: one clear line, the password masked.
        let out = relay_cli(&[
            "issue",
            "device",
            "erin",
            "--user",
            "erin",
            "--state",
            relay.world.state(),
            "--out",
            relay.world.out(),
            "--store",
            &pg.url,
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unavailable") && !err.contains("s3cret"),
            "{err}"
        );

        // Past fail_closed_after, every certificate is refused.
        let closed = "portcullis_relay_store_failed_closed";
        wait_for_metric(relay.addrs.admin, closed, "failed closed", |v| v == Some(1)).await;
        assert!(relay.client("alice").try_get(WEB, "/").await.is_err());

        // Back: serving again, and changes made meanwhile are picked up.
        pg.restart().await;
        wait_for_metric(relay.addrs.admin, closed, "open again", |v| v == Some(0)).await;
        wait_for_metric(relay.addrs.admin, unreadable, "store up", |v| v == Some(0)).await;
        // Failing closed closed the connector's tunnel too; it comes back by itself.
        relay.wait_for_connectors(1).await;
        assert_eq!(relay.client("alice").get(WEB, "/").await.status, 200);
        relay.world.admin(&["revoke", "device", "alice"]);
        wait_for_identity(relay.addrs.admin, "device", "alice", false).await;
        assert!(relay.client("alice").try_get(WEB, "/").await.is_err());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_keeps_a_tunnel_to_every_relay_and_serves_through_each() {
    within(async {
        let Some(pg) = TestPostgres::start().await else {
            return;
        };
        let (r1, r2) = two_relays(&pg).await;
        let origin = TestOrigin::start("web").await;
        let c = TestConnector::new(&r1)
            .also(&r2)
            .expose(WEB, origin.addr)
            .run()
            .await;
        for r in [&r1, &r2] {
            let got = r.client("alice").get(WEB, "/").await;
            assert_eq!(got.status, 200, "{}", got.body);
        }
        // Its status lists both tunnels up.
        let status = r1.world.path("out/status.json");
        let tunnels = |want: usize| {
            let status = status.clone();
            async move {
                eventually(Duration::from_secs(20), || async {
                    let text = std::fs::read_to_string(&status).ok()?;
                    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
                    let list: Vec<portcullis_connector::TunnelStatus> =
                        serde_json::from_value(v["tunnels"].clone()).ok()?;
                    let up = list
                        .iter()
                        .filter(|t| matches!(t.state, portcullis_connector::TunnelState::Up { .. }))
                        .count();
                    (up == want).then_some(list)
                })
                .await
            }
        };
        let both = tunnels(2).await.expect("two tunnels up in the status file");
        assert_eq!(both.len(), 2);

        // One relay gone: the other still serves, and the status says which is down.
        let r2_quic = r2.addrs.quic;
        r2.stop().await.unwrap();
        let one = tunnels(1)
            .await
            .expect("one tunnel up once a relay is gone");
        let gone = one.iter().find(|t| t.address == r2_quic).unwrap();
        assert!(!matches!(
            gone.state,
            portcullis_connector::TunnelState::Up { .. }
        ));
        assert_eq!(r1.client("alice").get(WEB, "/").await.status, 200);
        c.stop().await.unwrap();
    })
    .await;
}

/// A certificate authority for the database server, and its chain and key for `names`.
fn database_pki(
    dir: &std::path::Path,
    org: &str,
    names: &[&str],
) -> (std::path::PathBuf, String, String) {
    let ca = portcullis_shared::pki::Ca::init(dir, org).unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let leaf = ca.issue_server(&names, Duration::from_secs(3600)).unwrap();
    let chain = format!("{}{}", leaf.cert_pem, ca.cert_pem());
    (dir.join("ca.crt"), chain, leaf.key.unwrap().pem)
}

#[tokio::test]
async fn the_store_over_tls_verifies_its_server_refuses_a_wrong_ca_and_never_shows_the_password() {
    within(async {
        let pki = tempfile::tempdir().unwrap();
        let (ca, chain, key) = database_pki(&pki.path().join("db-ca"), "Database", &["localhost"]);
        let (other_ca, _, _) = database_pki(&pki.path().join("other-ca"), "Impostor", &["localhost"]);
        let Some(pg) = TestPostgres::start_tls(&chain, &key).await else {
            return;
        };
        let over_tls = |root: &std::path::Path, mode: &str| {
            format!(
                "{}?sslmode={mode}&sslrootcert={}",
                pg.url.replace("@127.0.0.1:", "@localhost:"),
                root.display()
            )
        };

        // verify-full: the relay's admin commands and the relay itself use the store.
        let w = World::with_store(&over_tls(&ca, "verify-full"));
        w.issue_device("alice", "alice", &["eng"], None);
        assert!(w.admin(&["list"]).contains("alice"));
        let relay = relay_in(w, "").await;
        assert!(relay.metric("portcullis_relay_store_unreadable").await == Some(0));

        // Another CA: refused, with a line that says why, and no password anywhere.
        for mode in ["verify-full", "verify-ca"] {
            let out = relay_cli(&[
                "list",
                "--state",
                relay.world.state(),
                "--store",
                &over_tls(&other_ca, mode),
            ]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{mode}: {err}");
            assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{mode}: {err}");
            assert!(!err.contains(portcullis_e2e::PG_PASSWORD), "{mode}: {err}");
            assert_eq!(err.lines().count(), 1, "{mode}: one line: {err}");
        }
        // A password given as a query parameter is masked too.
        let query_password = format!(
            "postgres://portcullis@localhost:9/portcullis?password={}&sslmode=verify-full&sslrootcert={}",
            portcullis_e2e::PG_PASSWORD,
            ca.display()
        );
        let out = relay_cli(&["list", "--state", relay.world.state(), "--store", &query_password]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("password=***"), "{err}");
        assert!(!err.contains(portcullis_e2e::PG_PASSWORD), "{err}");
    })
    .await;
}

/// `portcullis-relay args` with only `env` of the variables that name a relay or a store
/// (none inherited from the test's environment).
fn relay_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(bin("portcullis-relay"));
    cmd.args(args).stdin(Stdio::null());
    for var in ["PORTCULLIS_STORE", "PORTCULLIS_CONFIG", "PORTCULLIS_STATE"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn succeeded(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn token_ids(url: &str) -> Vec<String> {
    let store = PostgresStore::connect(url).unwrap();
    store.tokens().unwrap().into_iter().map(|t| t.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_reach_the_relays_postgres_store_from_its_config_or_its_state_dir_and_the_lost_laptop_runbook_cuts_the_device()
 {
    within(async {
        let Some(pg) = TestPostgres::start().await else {
            return;
        };
        let world = World::with_store(&pg.url);
        let state = world.state();
        world.issue_device("erin-laptop", "erin", &["eng"], None);
        world.issue_device("erin-phone", "erin", &["eng"], None);
        world.issue_device("frank-laptop", "frank", &["eng"], None);
        let sqlite = std::path::Path::new(state).join("portcullis.db");
        let token = [
            "token",
            "create",
            "device",
            "--user",
            "dave",
            "--relay",
            "relay.acme.test:4433",
        ];

        // Before the relay has run, nothing says where its relay.toml is: the state
        // directory alone is refused, naming the store without its password, and
        // nothing is written anywhere.
        let before = token_ids(&pg.url);
        let out = relay_env(&[&token[..], &["--state", state]].concat(), &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("belongs to a relay on the shared store postgres://portcullis:***@")
                && err.contains("--config"),
            "{err}"
        );
        assert!(!err.contains(portcullis_e2e::PG_PASSWORD), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(token_ids(&pg.url), before);
        assert!(!sqlite.exists());

        let config = world.write_relay_config("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "");
        let config = config.to_str().unwrap();
        let (mut relay, addrs) = world.start_relay().await;

        // `--config` alone: the state directory and the store from relay.toml.
        let created = succeeded(&relay_env(
            &[&token[..], &["--config", config]].concat(),
            &[],
        ));
        let by_config = created.trim().lines().last().unwrap().to_owned();
        // The state directory alone, now that the relay has run: through the relay.toml
        // it ran with.
        let created = succeeded(&relay_env(&[&token[..], &["--state", state]].concat(), &[]));
        let by_state = created.trim().lines().last().unwrap().to_owned();
        let in_store = token_ids(&pg.url);
        for token in [&by_config, &by_state] {
            let id = EnrollToken::decode(token).unwrap().id;
            assert!(in_store.contains(&id), "{id} not in {in_store:?}");
            assert!(!id.starts_with('-'));
        }
        let listed = succeeded(&relay_env(&["token", "list", "--state", state], &[]));
        assert_eq!(listed.matches("dave").count(), 2, "{listed}");
        // Another database than the relay's is refused.
        let other = pg.url.replace("/portcullis", "/elsewhere");
        let out = relay_env(&["list", "--state", state, "--store", &other], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("not postgres://"),
            "{err}"
        );
        assert!(!sqlite.exists(), "a stray SQLite store was made");

        // The lost-laptop runbook, command for command (docs/operations.md).
        let mut laptop = H3Client::connect(&world, &addrs, "erin-laptop", RELAY_NAME).await;
        assert_eq!(
            laptop
                .get(RELAY_NAME, "/.well-known/jwks.json")
                .await
                .status,
            200
        );
        let runbook = [("PORTCULLIS_CONFIG", config)];
        let listed = succeeded(&relay_env(&["list"], &runbook));
        assert!(listed.contains("erin-laptop"), "{listed}");
        succeeded(&relay_env(&["revoke", "device", "erin-laptop"], &runbook));
        assert!(laptop.closed_within(Duration::from_secs(2)).await);
        assert!(
            H3Client::try_connect(&world, &addrs, "erin-laptop", RELAY_NAME)
                .await
                .is_err()
        );
        let audit = succeeded(&relay_env(
            &["audit", "--identity", "erin-laptop"],
            &runbook,
        ));
        assert!(audit.contains("revoke"), "{audit}");

        // Every device of a user; another user's untouched.
        let mut phone = H3Client::connect(&world, &addrs, "erin-phone", RELAY_NAME).await;
        let mut frank = H3Client::connect(&world, &addrs, "frank-laptop", RELAY_NAME).await;
        let said = succeeded(&relay_env(&["revoke", "user", "erin"], &runbook));
        assert!(said.contains("revoked 1 device(s) of user erin"), "{said}");
        assert!(phone.closed_within(Duration::from_secs(2)).await);
        assert_eq!(
            frank.get(RELAY_NAME, "/.well-known/jwks.json").await.status,
            200
        );

        // A second relay on the same state directory is refused while the first runs.
        let second = relay_env(&["run", "--config", config], &[]);
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(!second.status.success());
        assert!(err.contains("another relay is running on"), "{err}");
        assert!(
            relay.child.try_wait().unwrap().is_none(),
            "the first relay died"
        );
        assert_eq!(
            frank.get(RELAY_NAME, "/.well-known/jwks.json").await.status,
            200
        );
        relay.signal("TERM");
        relay.wait(Duration::from_secs(30)).await;
    })
    .await;
}
