//! [`Stack`]: the usual end-to-end arrangement of real binaries: a relay, connector `c1`
//! publishing web, TCP and h2c services of the test origin, and devices alice and bob.

use std::time::{Duration, Instant};

use crate::{
    CurlResult, Daemon, Impairment, RelayAddrs, UdpPath, World, curl, wait_for_connectors,
};

/// The published web app in [`Stack`].
pub const APP: &str = "app.internal";
/// A raw TCP service (the origin's echo server) in [`Stack`].
pub const DB: &str = "db.internal";
/// An HTTP/2 cleartext (gRPC-style) service in [`Stack`].
pub const GRPC: &str = "grpc.internal";
/// The policy of [`Stack`]: group eng may reach everything published.
pub const POLICY: &str = "[[policy]]\nhostnames = [\"app.internal\", \"db.internal\", \"grpc.internal\", \"*.eng.internal\"]\ngroups = [\"eng\"]\n";

/// A running relay, connector `c1`, the test origin, and devices alice (group eng) and bob
/// (group sales). c1 publishes [`APP`] and `*.eng.internal` (HTTP), [`DB`] (TCP echo) and
/// [`GRPC`] (h2c), all served by the one test origin.
pub struct Stack {
    /// The test's world.
    pub w: World,
    /// The relay.
    pub relay: Daemon,
    /// Its addresses.
    pub addrs: RelayAddrs,
    /// The connector.
    pub connector: Daemon,
    /// The origin process.
    pub origin: Daemon,
    /// The origin's HTTP address.
    pub origin_addr: String,
    /// Where the connector's QUIC goes when its tunnel must run over TCP.
    _udp_sink: Option<std::net::UdpSocket>,
    /// The impaired path the connector's QUIC crosses, if any.
    _udp_path: Option<UdpPath>,
}

/// How the stack's connector reaches the relay.
enum TunnelPath {
    Direct,
    OverTcp,
    Impaired(Impairment),
}

impl Stack {
    /// Brings the stack up; returns once the connector has registered with the relay, so
    /// its names are routed.
    pub async fn up() -> Self {
        Self::up_with("").await
    }

    /// Like [`Stack::up`], with `extra` TOML appended to relay.toml (e.g. `[limits]`).
    pub async fn up_with(extra: &str) -> Self {
        Self::start(extra, TunnelPath::Direct, None).await
    }

    /// Like [`Stack::up`], with the connector's UDP to the relay going nowhere (its
    /// `relay` is a UDP socket that never answers), so its tunnel runs over TLS on TCP.
    pub async fn up_tunnel_over_tcp() -> Self {
        Self::start("", TunnelPath::OverTcp, None).await
    }

    /// Like [`Stack::up`], with the connector reaching the relay through a [`UdpPath`]
    /// impaired by `impairment` (its fallback over TCP goes to the HTTPS port unimpaired).
    /// `congestion`: the QUIC congestion controller of relay and connector, if not the
    /// default.
    pub async fn up_impaired(impairment: Impairment, congestion: Option<&str>) -> Self {
        let extra = congestion
            .map(|c| format!("quic_congestion = {c:?}\n"))
            .unwrap_or_default();
        Self::start(&extra, TunnelPath::Impaired(impairment), congestion).await
    }

    /// Like [`Stack::up`], with relay and connector using the QUIC congestion controller
    /// `congestion` (`quic_congestion`).
    pub async fn up_with_congestion(congestion: &str) -> Self {
        let extra = format!("quic_congestion = {congestion:?}\n");
        Self::start(&extra, TunnelPath::Direct, Some(congestion)).await
    }

    /// Like [`Stack::up`], with c1 also publishing each `(hostname, service URL)` of
    /// `services` (names under `*.eng.internal`, so alice may reach them); `ORIGIN` in a
    /// URL stands for the origin's HTTP address (`tcp://ORIGIN`: the origin as raw TCP).
    /// `extra`: TOML appended to relay.toml, as for [`Stack::up_with`].
    pub async fn up_with_services(extra: &str, services: &[(&str, &str)]) -> Self {
        Self::start_with(extra, TunnelPath::Direct, None, services).await
    }

    async fn start(extra: &str, tunnel: TunnelPath, congestion: Option<&str>) -> Self {
        Self::start_with(extra, tunnel, congestion, &[]).await
    }

    async fn start_with(
        extra: &str,
        tunnel: TunnelPath,
        congestion: Option<&str>,
        services: &[(&str, &str)],
    ) -> Self {
        let w = World::new();
        let mut names = vec![APP, "*.eng.internal", DB, GRPC];
        names.extend(services.iter().map(|(name, _)| *name));
        w.issue_connector("c1", &names);
        w.issue_device("alice", "alice", &["eng"], None);
        w.issue_device("bob", "bob", &["sales"], None);
        let (origin, origin_addr) = w.start_origin().await;
        w.write_relay_config(
            "127.0.0.1:0",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &format!("{extra}\n{POLICY}"),
        );
        let (relay, addrs) = w.start_relay().await;
        let service = format!("http://{origin_addr}");
        let echo = format!("tcp://{}", w.echo_addr());
        let h2c = format!("h2c://{origin_addr}");
        // The extra services first: the wildcard would take their names.
        let extra: Vec<(&str, String)> = services
            .iter()
            .map(|(name, url)| (*name, url.replace("ORIGIN", &origin_addr)))
            .collect();
        let mut ingress: Vec<(&str, &str)> = extra.iter().map(|(n, u)| (*n, u.as_str())).collect();
        ingress.extend([
            (APP, service.as_str()),
            ("*.eng.internal", service.as_str()),
            (DB, echo.as_str()),
            (GRPC, h2c.as_str()),
        ]);
        let mut udp_sink = None;
        let mut udp_path = None;
        let relay_addr = match tunnel {
            TunnelPath::Direct => addrs.quic.to_string(),
            TunnelPath::OverTcp => {
                let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let addr = sink.local_addr().unwrap().to_string();
                udp_sink = Some(sink);
                addr
            }
            TunnelPath::Impaired(impairment) => {
                let path = UdpPath::start(addrs.quic).await;
                path.impair(impairment);
                let addr = path.addr.to_string();
                udp_path = Some(path);
                addr
            }
        };
        let path =
            w.write_connector_config_with_tcp_port("c1", &relay_addr, addrs.https.port(), &ingress);
        if let Some(c) = congestion {
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, format!("quic_congestion = {c:?}\n{text}")).unwrap();
        }
        let connector = w.run_connector(None, "c1", &path);
        wait_for_connectors(addrs.admin, 1).await;
        Self {
            w,
            relay,
            addrs,
            connector,
            origin,
            origin_addr,
            _udp_sink: udp_sink,
            _udp_path: udp_path,
        }
    }

    /// Kills the relay, waits `outage`, starts it again on the same ports, and returns how
    /// long after it was back the connector had registered again and a first request
    /// succeeded.
    pub async fn restart_relay(&mut self, outage: Duration) -> Duration {
        let back = self.restart_relay_only(outage).await;
        wait_for_connectors(self.addrs.admin, 1).await;
        let r = self.get(APP, "/", Some("alice")).await;
        assert_eq!(r.status, 200, "after the restart: {} {}", r.body, r.stderr);
        back.elapsed()
    }

    /// Kills and restarts the relay on the same ports; returns when it is ready.
    pub async fn restart_relay_only(&mut self, outage: Duration) -> Instant {
        self.relay.signal("KILL");
        self.relay.wait(Duration::from_secs(5)).await;
        let a = self.addrs;
        let (quic, https, admin) = (a.quic.to_string(), a.https.to_string(), a.admin.to_string());
        self.w.write_relay_config(&quic, &https, &admin, POLICY);
        // The outage itself: how long the relay stays down is what the caller tests.
        tokio::time::sleep(outage).await;
        let (relay, addrs) = self.w.start_relay().await;
        self.relay = relay;
        self.addrs = addrs;
        Instant::now()
    }

    /// GET through the relay with curl.
    pub async fn get(&self, host: &str, path: &str, device: Option<&str>) -> CurlResult {
        curl(&self.w, &self.addrs, host, path, device).await
    }
}
