//! No single relay: two relay processes on one PostgreSQL store (started by the test), a
//! connector with a tunnel to each, an agent enrolled with a token naming both, and
//! HTTP/1.1 and HTTP/2 devices reaching them through a load balancer that follows each
//! relay's `/readyz`. When a relay dies or restarts, the agent moves to the other, the
//! balancer sends new connections to the other, and requests keep succeeding.
//!
//! Skips without PostgreSQL unless `PORTCULLIS_REQUIRE_POSTGRES` is set (CI sets it).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use portcullis_e2e::{
    APP, Balancer, Daemon, POLICY, RelayAddrs, Tally, TestPostgres, World, bin, client_tls,
    eventually, h2_read_all, loopback, tls_from, wait_for_connectors,
};
use tokio::process::Command;

const ANY: &str = "127.0.0.1:0";

/// The relays' extra configuration: the policy, and half a second of serving on after
/// SIGTERM with `/readyz` at 503, so the balancer (checking every 100 ms) stops sending
/// new connections before the relay stops accepting them.
fn relay_toml() -> String {
    format!("shutdown_delay = \"500ms\"\n{POLICY}")
}

/// Two relays on `pg`'s store (the second from a copy of the first's state directory),
/// a connector publishing [`APP`] through both, and its origin.
struct Pair {
    w1: World,
    _w2: World,
    relays: Vec<(Daemon, RelayAddrs)>,
    _connector: Daemon,
    _origin: Daemon,
}

impl Pair {
    async fn up(pg: &TestPostgres) -> Self {
        let w1 = World::with_store(&pg.url);
        w1.issue_connector("c1", &[APP]);
        // A device that reaches the relays directly, through a load balancer.
        w1.issue_device("dave", "dave", &["eng"], None);
        let w2 = World::copy_of(&w1);
        let mut relays = Vec::new();
        for w in [&w1, &w2] {
            w.write_relay_config(ANY, ANY, ANY, &relay_toml());
            relays.push(w.start_relay().await);
        }
        let (origin, origin_addr) = w1.start_origin().await;
        let quic: Vec<String> = relays.iter().map(|(_, a)| a.quic.to_string()).collect();
        let quic: Vec<&str> = quic.iter().map(String::as_str).collect();
        let service = format!("http://{origin_addr}");
        let connector = w1.start_connector_for("c1", &quic, &[(APP, &service)]);
        for (_, a) in &relays {
            wait_for_connectors(a.admin, 1).await;
        }
        Self {
            w1,
            _w2: w2,
            relays,
            _connector: connector,
            _origin: origin,
        }
    }

    /// Enrols an agent with a token naming both relays, and starts `portcullis up`;
    /// the agent and its proxy port.
    async fn agent(&self, home: &Path) -> (Daemon, u16) {
        let mut args = vec![
            "token", "create", "device", "--user", "alice", "--group", "eng",
        ];
        let quic: Vec<String> = self
            .relays
            .iter()
            .map(|(_, a)| a.quic.to_string())
            .collect();
        for q in &quic {
            args.extend(["--relay", q.as_str()]);
        }
        args.extend(["--server-name", "relay.acme.test"]);
        let token = self.w1.admin(&args).lines().last().unwrap().to_owned();
        let token_file = self.w1.path("alice.token");
        std::fs::write(&token_file, token).unwrap();
        let out = agent_cmd(home)
            .args(["enroll", "--key-store", "file", "--token-file"])
            .arg(&token_file)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ready = self.w1.path("agent.ready");
        let mut cmd = agent_cmd(home);
        cmd.args(["up", "--proxy", "127.0.0.1:0", "--ready-file"])
            .arg(&ready);
        let mut agent = Daemon::spawn_logged(cmd, self.w1.path("agent.log"));
        let v: serde_json::Value =
            serde_json::from_str(&agent.wait_ready_file(&ready).await).unwrap();
        let port = v["proxy"]
            .as_str()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .port();
        (agent, port)
    }
}

fn agent_cmd(home: &Path) -> Command {
    let mut cmd = Command::new(bin("portcullis"));
    cmd.arg("--home")
        .arg(home)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// GET through the agent's proxy with curl: the status (0 when curl failed).
async fn proxy_get(port: u16, url: &str) -> u16 {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-x", &format!("http://127.0.0.1:{port}"), url])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// The relay address `portcullis status --json` says the agent is connected to.
async fn connected_to(home: &Path) -> String {
    let out = agent_cmd(home)
        .args(["status", "--json"])
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["connected_to"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn the_agent_moves_to_the_other_relay_when_its_relay_dies() {
    let Some(pg) = TestPostgres::start().await else {
        return;
    };
    let mut pair = Pair::up(&pg).await;
    let home = pair.w1.path("alice-home");
    let (agent, port) = pair.agent(&home).await;
    let url = format!("http://{APP}/");
    assert_eq!(proxy_get(port, &url).await, 200, "{}", agent.log_text());
    let first = pair.relays[0].1.quic.to_string();
    let second = pair.relays[1].1.quic.to_string();
    assert_eq!(connected_to(&home).await, first);

    // The preferred relay dies without a word.
    pair.relays[0].0.child.start_kill().unwrap();
    let died = Instant::now();
    let back = eventually(Duration::from_secs(20), || async {
        (proxy_get(port, &url).await == 200).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "no request succeeded after the relay died: {}",
        agent.log_text()
    );
    let took = died.elapsed();
    // Generous bound for a shared machine; the figure itself is in the log.
    assert!(took < Duration::from_secs(8), "back after {took:?}");
    eprintln!("requests succeeded again {took:?} after the relay died");
    for _ in 0..5 {
        assert_eq!(proxy_get(port, &url).await, 200, "{}", agent.log_text());
    }
    assert!(agent.log_text().contains("connected to the relay"));
    assert_eq!(connected_to(&home).await, second);
}

/// `loops` clients, each on one keep-alive HTTP/1.1 connection to the agent's proxy,
/// sending GETs for [`APP`] one after another until `stop`.
async fn load_through_agent(
    port: u16,
    loops: usize,
    tally: Arc<Tally>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..loops {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (tally, stop) = (tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !*stop.borrow() {
                let req = http::Request::get(format!("http://{APP}/"))
                    .header(http::header::HOST, APP)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let outcome = async {
                    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((status, body.to_bytes()))
                }
                .await;
                tally.record(match outcome {
                    Ok((200, _)) => Ok(200),
                    Ok((status, body)) => Err(format!("agent: {status} {body:?}")),
                    Err(e) => Err(format!("agent: {e}")),
                });
            }
        }));
    }
    tasks
}

/// One client of `alpn` (`http/1.1` or `h2`) as device dave, through `balancer`, sending
/// GETs for [`APP`] one after another until `stop`. As browsers and curl do, a request
/// that fails because its reused connection closed is sent once more on a new connection
/// (through the balancer, so to a relay that is ready); only a second failure counts.
fn direct_load(
    w: &World,
    balancer: std::net::SocketAddr,
    alpn: &'static [u8],
    tally: Arc<Tally>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let tls = Arc::new(client_tls(w, "dave", &[alpn]));
    tokio::spawn(async move {
        let mut conn: Option<DirectConn> = None;
        while !*stop.borrow() {
            let mut outcome = Err(String::new());
            for _attempt in 0..2 {
                let c = match conn.take() {
                    Some(c) => c,
                    None => match DirectConn::open(balancer, tls.clone(), alpn).await {
                        Ok(c) => c,
                        Err(e) => {
                            outcome = Err(e);
                            continue;
                        }
                    },
                };
                let (c, result) = c.get().await;
                conn = c;
                outcome = result;
                if outcome.is_ok() {
                    break;
                }
            }
            let what = String::from_utf8_lossy(alpn);
            tally.record(match outcome {
                Ok(200) => Ok(200),
                Ok(status) => Err(format!("{what}: {status}")),
                Err(e) => Err(format!("{what}: {e}")),
            });
        }
    })
}

/// A device's connection to a relay, HTTP/1.1 or HTTP/2.
enum DirectConn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(h2::client::SendRequest<Bytes>),
}

impl DirectConn {
    async fn open(
        to: std::net::SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        alpn: &[u8],
    ) -> Result<Self, String> {
        let io = tls_from(loopback(1), to, APP, tls)
            .await
            .map_err(|e| format!("connect: {e:#}"))?;
        if alpn == b"h2" {
            let (send, conn) = h2::client::handshake(io).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(Self::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(Self::H1(send))
        }
    }

    /// One GET; the connection back if it may be reused, and the status.
    async fn get(self) -> (Option<Self>, Result<u16, String>) {
        match self {
            Self::H1(mut send) => {
                let req = http::Request::get("/")
                    .header(http::header::HOST, APP)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let result = async {
                    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    resp.into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(status)
                }
                .await;
                let reuse = result.is_ok() && !send.is_closed();
                (reuse.then_some(Self::H1(send)), result)
            }
            Self::H2(send) => {
                let req = http::Request::get(format!("https://{APP}/"))
                    .body(())
                    .unwrap();
                let result = async {
                    let mut ready = send.clone().ready().await.map_err(|e| e.to_string())?;
                    let (resp, _) = ready.send_request(req, true).map_err(|e| e.to_string())?;
                    let resp = resp.await.map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    h2_read_all(&mut resp.into_body()).await;
                    Ok(status)
                }
                .await;
                (result.is_ok().then_some(Self::H2(send)), result)
            }
        }
    }
}

#[tokio::test]
async fn restarting_each_relay_in_turn_under_load_loses_no_request() {
    let Some(pg) = TestPostgres::start().await else {
        return;
    };
    let mut pair = Pair::up(&pg).await;
    let home = pair.w1.path("alice-home");
    let (agent, port) = pair.agent(&home).await;
    assert_eq!(proxy_get(port, &format!("http://{APP}/")).await, 200);
    let tally = Arc::new(Tally::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut load = load_through_agent(port, 2, tally.clone(), stop.clone()).await;
    // HTTP/1.1 and HTTP/2 clients reach the relays through a load balancer that follows
    // their /readyz, as an operator runs one.
    let balancer = Balancer::start(
        &pair
            .relays
            .iter()
            .map(|(_, a)| (a.https, a.admin))
            .collect::<Vec<_>>(),
    )
    .await;
    for alpn in [b"http/1.1".as_slice(), b"h2".as_slice()] {
        load.push(direct_load(
            &pair.w1,
            balancer.addr,
            alpn,
            tally.clone(),
            stop.clone(),
        ));
    }
    let reach = |n: usize| {
        let tally = tally.clone();
        async move {
            let got = eventually(Duration::from_secs(90), || async {
                (tally.ok() >= n).then_some(())
            })
            .await;
            assert!(got.is_some(), "the load stalled");
        }
    };
    const N: usize = 5_000;
    reach(N / 5).await;
    // Each relay in turn: SIGTERM (it drains: GOAWAY to agents, in-flight requests
    // finish), then back on the same ports, and the connector's tunnel to it again.
    for i in 0..2 {
        let worlds = [&pair.w1, &pair._w2];
        let (daemon, addrs) = &mut pair.relays[i];
        daemon.signal("TERM");
        daemon.wait(Duration::from_secs(30)).await;
        let a = *addrs;
        let (quic, https, admin) = (a.quic.to_string(), a.https.to_string(), a.admin.to_string());
        worlds[i].write_relay_config(&quic, &https, &admin, &relay_toml());
        pair.relays[i] = worlds[i].start_relay().await;
        wait_for_connectors(pair.relays[i].1.admin, 1).await;
        reach(N / 5 * (2 + 2 * i)).await;
    }
    reach(N).await;
    stop_tx.send(true).unwrap();
    for l in load {
        l.await.unwrap();
    }
    let failed = tally.failed();
    assert_eq!(failed, 0, "{:?}\n{}", tally.why(), agent.log_text());
}

#[tokio::test]
async fn a_download_through_a_relay_killed_midway_fails_promptly_and_the_next_request_succeeds() {
    let Some(pg) = TestPostgres::start().await else {
        return;
    };
    let mut pair = Pair::up(&pg).await;
    let home = pair.w1.path("alice-home");
    let (agent, port) = pair.agent(&home).await;
    // Ten seconds of chunks, one every 100 ms.
    let mut download = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "30", "-o", "/dev/null"])
        .args(["-x", &format!("http://127.0.0.1:{port}")])
        .arg(format!("http://{APP}/stream?n=100&ms=100"))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Under way: the origin is streaming it.
    let origin_log = pair.w1.path("origin.log");
    let streaming = eventually(Duration::from_secs(10), || async {
        let log = std::fs::read_to_string(&origin_log).unwrap_or_default();
        log.contains("/stream?n=100").then_some(())
    })
    .await;
    assert!(streaming.is_some(), "the download never reached the origin");
    pair.relays[0].0.child.start_kill().unwrap();
    let killed = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), download.wait())
        .await
        .expect("the download must not hang when its relay dies")
        .unwrap();
    let took = killed.elapsed();
    assert!(
        !status.success(),
        "the cut download must fail, not look complete"
    );
    assert!(
        took < Duration::from_secs(8),
        "it failed only after {took:?}"
    );
    eprintln!("the download failed {took:?} after its relay died");
    // The connector's tunnel to the other relay serves the next request.
    let next = eventually(Duration::from_secs(10), || async {
        (proxy_get(port, &format!("http://{APP}/")).await == 200).then_some(())
    })
    .await;
    assert!(next.is_some(), "{}", agent.log_text());
}
