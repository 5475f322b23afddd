//! The in-process tier: the relay and connector libraries run inside the test's tokio
//! runtime on `127.0.0.1:0`, each in its own tracing span, started by builders that return
//! once they are bound (the relay, through its `on_ready` callback) or registered (a
//! connector, once the relay's `/metrics` counts it), and stopped by triggering their
//! [`Shutdown`]: awaited by `stop()`, triggered on drop.
//!
//! ```ignore
//! let relay = TestRelay::new().allow(&["app.internal"], &["eng"]).device("alice", "alice", &["eng"]).run().await;
//! let origin = TestOrigin::start("app").await;
//! let _c = TestConnector::new(&relay).expose("app.internal", origin.addr).run().await;
//! assert_eq!(relay.client("alice").get("app.internal", "/").await.status, 200);
//! ```
//!
//! Each relay has its own [`World`] (temporary directory and CA; certificates are issued
//! with the relay's CLI). Clients are in process too: [`TestClient`] speaks HTTP/1.1 over
//! TLS as a device (from any loopback address), and the HTTP/2, HTTP/3 and stranger
//! helpers take `relay.world` and `relay.addrs`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portcullis_shared::config::{ConnectorConfig, RelayConfig};
use portcullis_shared::shutdown::Shutdown;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{RelayAddrs, World, client_tls, metric, tls_from, wait_for_identity, wait_for_metric};

/// The relay's TLS name in every [`World`].
pub const RELAY_NAME: &str = "relay.acme.test";
/// How long a daemon may take to stop once its shutdown is triggered (its drain grace is
/// 5 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECTORS: &str = "portcullis_relay_connector_tunnels";

/// Logs of everything in process go to the test's captured output, filtered by
/// `PORTCULLIS_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Awaits a daemon's task after its shutdown was triggered.
async fn stopped(what: &str, task: JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::time::timeout(STOP_TIMEOUT, task)
        .await
        .with_context(|| format!("{what} did not stop within {STOP_TIMEOUT:?}"))?
        .with_context(|| format!("{what} panicked"))?
}

/// A relay to be started: its policy, extra configuration and devices.
pub struct TestRelay {
    world: World,
    config: String,
}

impl TestRelay {
    /// A relay with a fresh world (directory, CA), no policy (default deny), no devices.
    pub fn new() -> Self {
        Self::in_world(World::new())
    }

    /// A relay in `world` (e.g. [`World::with_store`], or [`World::copy_of`] another
    /// relay's for a second relay on the same store).
    pub fn in_world(world: World) -> Self {
        Self {
            world,
            config: String::new(),
        }
    }

    /// A policy rule: `groups` may reach `hostnames`.
    pub fn allow(mut self, hostnames: &[&str], groups: &[&str]) -> Self {
        let list = |xs: &[&str]| {
            xs.iter()
                .map(|x| format!("{x:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.config.push_str(&format!(
            "[[policy]]\nhostnames = [{}]\ngroups = [{}]\n",
            list(hostnames),
            list(groups)
        ));
        self
    }

    /// Extra relay.toml text (e.g. a `[limits]` table), appended as is.
    pub fn config(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    /// Its world: directory, CA, issued certificates (to place files before the start).
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Issues a device certificate for `id` (user `user`, in `groups`) before the start.
    pub fn device(self, id: &str, user: &str, groups: &[&str]) -> Self {
        self.world.issue_device(id, user, groups, None);
        self
    }

    /// Starts the relay on `127.0.0.1:0` (QUIC, HTTPS, admin) in a `relay` span and returns
    /// once every listener is bound.
    pub async fn run(self) -> RunningRelay {
        init_tracing();
        let any = "127.0.0.1:0";
        let path = self.world.write_relay_config(any, any, any, &self.config);
        let config = RelayConfig::load(&path).unwrap();
        let shutdown = Shutdown::new();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(
            portcullis_relay::server::run(config, None, shutdown.clone(), move |bound| {
                let _ = bound_tx.send(bound);
                Ok(())
            })
            .instrument(tracing::info_span!("relay")),
        );
        let Ok(bound) = bound_rx.await else {
            panic!("the relay stopped before it was bound: {:?}", task.await);
        };
        RunningRelay {
            world: self.world,
            addrs: RelayAddrs {
                quic: bound.quic_listen,
                https: bound.https_listen,
                admin: bound
                    .admin_listen
                    .expect("the admin listener was configured"),
            },
            shutdown,
            task: Some(task),
            connectors: AtomicUsize::new(0),
        }
    }
}

impl Default for TestRelay {
    fn default() -> Self {
        Self::new()
    }
}

/// A relay on which device alice (group eng) may reach `app`, and the test origin with its
/// address.
pub async fn relay_with_origin(app: &str) -> (RunningRelay, crate::Daemon, String) {
    let relay = TestRelay::new()
        .allow(&[app], &["eng"])
        .device("alice", "alice", &["eng"])
        .run()
        .await;
    let (origin, origin_addr) = relay.world.start_origin().await;
    (relay, origin, origin_addr)
}

/// A relay running in the test's runtime; its shutdown is triggered on drop.
pub struct RunningRelay {
    /// Its world: directory, CA, issued certificates.
    pub world: World,
    /// What it bound.
    pub addrs: RelayAddrs,
    shutdown: Shutdown,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    connectors: AtomicUsize,
}

impl RunningRelay {
    /// A client presenting device `id`'s certificate.
    pub fn client(&self, device: &str) -> TestClient {
        TestClient::new(self, device)
    }

    /// Issues a device certificate and returns once the running relay knows the device.
    pub async fn issue_device(&self, id: &str, user: &str, groups: &[&str]) {
        self.world.issue_device(id, user, groups, None);
        wait_for_identity(self.addrs.admin, "device", id, true).await;
    }

    /// Issues a connector certificate for `hostnames` and returns once the running relay
    /// knows the connector.
    pub async fn issue_connector(&self, name: &str, hostnames: &[&str]) {
        self.world.issue_connector(name, hostnames);
        wait_for_identity(self.addrs.admin, "connector", name, true).await;
    }

    /// Revokes `role` (`device` or `connector`) `id` with the relay's CLI and returns once
    /// the running relay has read the revocation.
    pub async fn revoke(&self, role: &str, id: &str) {
        self.world.admin(&["revoke", role, id]);
        wait_for_identity(self.addrs.admin, role, id, false).await;
    }

    /// A sample from its `/metrics` (see [`metric`]).
    pub async fn metric(&self, series: &str) -> Option<i64> {
        metric(self.addrs.admin, series).await
    }

    /// Waits until `n` connectors are registered.
    pub async fn wait_for_connectors(&self, n: u32) {
        crate::wait_for_connectors(self.addrs.admin, n).await;
    }

    /// Starts the shutdown without waiting for it: the relay stops accepting, drains
    /// in-flight requests, then closes connector tunnels.
    pub fn begin_stop(&self) {
        self.shutdown.trigger();
    }

    /// Triggers the shutdown and waits for `run` to return; its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        let task = self.task.take().context("the relay was already stopped")?;
        stopped("the relay", task).await
    }

    fn next_connector(&self) -> usize {
        self.connectors.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// A connector to be started against a [`RunningRelay`]: its name, what it publishes and
/// what its certificate allows.
pub struct TestConnector<'r> {
    relay: &'r RunningRelay,
    also: Vec<&'r RunningRelay>,
    via: Option<SocketAddr>,
    via_tcp: Option<SocketAddr>,
    extra: String,
    name: Option<String>,
    ingress: Vec<(String, String)>,
    issued: Option<Vec<String>>,
}

impl<'r> TestConnector<'r> {
    /// A connector for `relay`, named `c1`, `c2`... unless [`TestConnector::name`] says.
    pub fn new(relay: &'r RunningRelay) -> Self {
        Self {
            relay,
            also: Vec::new(),
            via: None,
            via_tcp: None,
            extra: String::new(),
            name: None,
            ingress: Vec::new(),
            issued: None,
        }
    }

    /// Extra connector.toml text, appended after the ingress rules (so a
    /// `[ingress.health_check]` table applies to the last rule).
    pub fn config(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Dials the relay at `addr` (say, a [`crate::UdpPath`] in front of it) instead.
    pub fn via(mut self, addr: SocketAddr) -> Self {
        self.via = Some(addr);
        self
    }

    /// Its fallback over TCP goes to `addr` (say, a [`crate::TcpPath`] in front of the
    /// relay's HTTPS port; same host as the QUIC address) instead.
    pub fn via_tcp(mut self, addr: SocketAddr) -> Self {
        self.via_tcp = Some(addr);
        self
    }

    /// Also keeps a tunnel to `other` (a relay on the same store), as `relay = [...]`.
    pub fn also(mut self, other: &'r RunningRelay) -> Self {
        self.also.push(other);
        self
    }

    /// Its name (and certificate id).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// Publishes `hostname`, served by the HTTP origin at `origin`.
    pub fn expose(self, hostname: &str, origin: SocketAddr) -> Self {
        self.service(hostname, &format!("http://{origin}"))
    }

    /// Publishes `hostname`, served by `service` (`http://`, `h2c://`, `tcp://`...).
    pub fn service(mut self, hostname: &str, service: &str) -> Self {
        self.ingress.push((hostname.to_owned(), service.to_owned()));
        self
    }

    /// The hostnames its certificate is issued for; by default, those it publishes.
    pub fn issued_for(mut self, hostnames: &[&str]) -> Self {
        self.issued = Some(hostnames.iter().map(|h| (*h).to_owned()).collect());
        self
    }

    /// Issues its certificate (once the relay knows it, it may dial), starts it in a
    /// `connector` span, and returns once the relay counts one more connector registered.
    pub async fn run(self) -> RunningConnector {
        let relay = self.relay;
        let name = self
            .name
            .unwrap_or_else(|| format!("c{}", relay.next_connector()));
        let issued = self
            .issued
            .unwrap_or_else(|| self.ingress.iter().map(|(h, _)| h.clone()).collect());
        let issued: Vec<&str> = issued.iter().map(String::as_str).collect();
        relay.issue_connector(&name, &issued).await;
        let ingress: Vec<(&str, &str)> = self
            .ingress
            .iter()
            .map(|(h, s)| (h.as_str(), s.as_str()))
            .collect();
        let relays: Vec<&RunningRelay> = std::iter::once(relay)
            .chain(self.also.iter().copied())
            .collect();
        let mut addrs: Vec<String> = relays.iter().map(|r| r.addrs.quic.to_string()).collect();
        if let Some(via) = self.via {
            addrs[0] = via.to_string();
        }
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let path = relay
            .world
            .write_connector_config_for(&name, &addrs, &ingress);
        {
            let mut text = std::fs::read_to_string(&path).unwrap();
            if relays.len() == 1 {
                // The fallback over TCP goes to the relay's HTTPS port.
                let port = self.via_tcp.unwrap_or(relay.addrs.https).port();
                text = format!("relay_tcp_port = {port}\n{text}");
            }
            text.push_str(&self.extra);
            std::fs::write(&path, text).unwrap();
        }
        let config = ConnectorConfig::load(&path).unwrap();
        let mut before = Vec::new();
        for r in &relays {
            before.push(r.metric(CONNECTORS).await.unwrap_or(0));
        }
        let shutdown = Shutdown::new();
        let mut task = tokio::spawn(
            portcullis_connector::run(config, shutdown.clone())
                .instrument(tracing::info_span!("connector", name = %name)),
        );
        let what = format!("connector {name} must register with every relay");
        let registered = async {
            for (r, before) in relays.iter().zip(before) {
                wait_for_metric(r.addrs.admin, CONNECTORS, &what, |n| {
                    n.unwrap_or(0) > before
                })
                .await;
            }
        };
        tokio::select! {
            () = registered => {}
            r = &mut task => panic!("connector {name} stopped before it registered: {r:?}"),
        }
        RunningConnector {
            name,
            shutdown,
            task: Some(task),
        }
    }
}

/// A connector running in the test's runtime; its shutdown is triggered on drop.
pub struct RunningConnector {
    /// Its name.
    pub name: String,
    shutdown: Shutdown,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RunningConnector {
    /// Triggers the shutdown (the connector asks the relay to route nothing more to it,
    /// finishes in-flight streams, then closes) and waits for `run` to return; its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        let task = self
            .task
            .take()
            .context("the connector was already stopped")?;
        stopped(&format!("connector {}", self.name), task).await
    }
}

impl Drop for RunningConnector {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// What a [`TestClient`] request returned.
#[derive(Debug)]
pub struct TestResponse {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Body, as text.
    pub body: String,
}

impl TestResponse {
    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A device's HTTPS client to the relay, in process: one TLS connection (HTTP/1.1) per
/// request, like a browser's first visit.
#[derive(Clone)]
pub struct TestClient {
    tls: Arc<rustls::ClientConfig>,
    https: SocketAddr,
    source: IpAddr,
}

impl TestClient {
    /// A client presenting device `device`'s certificate (issued in `relay.world`).
    pub fn new(relay: &RunningRelay, device: &str) -> Self {
        Self {
            tls: Arc::new(client_tls(&relay.world, device, &[b"http/1.1"])),
            https: relay.addrs.https,
            source: IpAddr::from([127, 0, 0, 1]),
        }
    }

    /// The same client, connecting from loopback address `source` (see [`crate::loopback`]).
    pub fn from_address(mut self, source: IpAddr) -> Self {
        self.source = source;
        self
    }

    /// The test origins (their `origin` field) that answer GET `https://host/`, asked
    /// until `want` different ones have answered or 15 s have passed, sorted. Idle replicas
    /// take turns, but one whose round trip is a step longer weighs double (see the relay's
    /// router), and on a loaded machine one sample can be: so a fixed number of requests
    /// may see only one.
    pub async fn origins_answering(&self, host: &str, want: usize) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        let until = std::time::Instant::now() + Duration::from_secs(15);
        while seen.len() < want && std::time::Instant::now() < until {
            let r = self.get(host, "/").await;
            assert_eq!(r.status, 200, "{}", r.body);
            seen.insert(r.json()["origin"].as_str().unwrap_or_default().to_owned());
        }
        seen.into_iter().collect()
    }

    /// GET `https://host/path`; panics if there is no response (e.g. TLS refused).
    pub async fn get(&self, host: &str, path: &str) -> TestResponse {
        self.try_get(host, path)
            .await
            .unwrap_or_else(|e| panic!("GET https://{host}{path}: {e:#}"))
    }

    /// GET `https://host/path` with TLS name `host`; an error if the relay refuses the
    /// handshake or closes the connection without a response.
    pub async fn try_get(&self, host: &str, path: &str) -> anyhow::Result<TestResponse> {
        self.request(host, host, path).await
    }

    /// GET `path` with `Host: host` on a connection to the relay's own TLS name, which a
    /// device may use for any name (the relay then routes by `Host` alone).
    pub async fn get_via_relay_name(&self, host: &str, path: &str) -> TestResponse {
        self.request(RELAY_NAME, host, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} for {host} via {RELAY_NAME}: {e:#}"))
    }

    async fn request(&self, sni: &str, host: &str, path: &str) -> anyhow::Result<TestResponse> {
        let tls = tls_from(self.source, self.https, sni, self.tls.clone())
            .await
            .context("TLS handshake")?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, host)
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await.context("request")?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.context("body")?.to_bytes();
        Ok(TestResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}
