//! The relay's own counters and gauges (connections, caps, tunnels, enrolment refusals,
//! overload, reloads), kept in atomics where they are counted and written by the
//! Prometheus client library when `/metrics` is scraped: [`Metrics`] is the collector of
//! its families and of the SLIs it holds ([`crate::ops::sli`]). The identity registry, the
//! TLS resolver and the routing table register their own families
//! (`listen/admin_http.rs` assembles the registry).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use portcullis_shared::metrics::{counter, counters, gauge, gauges};
use portcullis_shared::transport::TransportKind;
use portcullis_shared::udp::BufferSizes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::hardening::conn_limit::Refusal;
use crate::hardening::overload::Shed;
use crate::hardening::refusal_log::Refused;

/// A client listener, as labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    Quic = 0,
    Https = 1,
}

impl Listener {
    const ALL: [Self; 2] = [Self::Quic, Self::Https];

    fn label(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Https => "https",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) tunnel_streams: AtomicI64,
    pub(crate) denied: AtomicU64,
    /// Reloads of relay.toml: applied, refused.
    config_reloads: [AtomicU64; 2],
    /// Open connections per [`Listener`], handshakes included (kept by its `ConnLimit`).
    pub(crate) open_connections: [Arc<AtomicI64>; 2],
    /// Refused by a connection cap, per [`Listener`]: over `max_connections`, over
    /// `max_connections_per_address` (both before any handshake work), over
    /// `max_unauthenticated_connections` (after a handshake without a certificate).
    refused: [[AtomicU64; 3]; 2],
    /// Open connections without a client certificate past their handshake, per
    /// [`Listener`] (kept by its strangers' `ConnLimit`).
    pub(crate) unauthenticated_connections: [Arc<AtomicI64>; 2],
    /// New QUIC connections asked to prove their address first.
    pub(crate) quic_retries: AtomicU64,
    /// Enrolment connections closed at their deadline.
    pub(crate) enroll_deadline_closes: AtomicU64,
    /// Enrolments and renewals refused, per [`Refused`].
    enroll_refusals: [AtomicU64; 4],
    /// Work turned away while overloaded, per [`Shed`].
    shed: [AtomicU64; 4],
    /// The overload level in force (0, 1, 2; set by the sampler).
    pub(crate) overload_level: AtomicI64,
    /// Connector tunnels up, by transport (QUIC, TCP).
    tunnels: [Arc<AtomicI64>; 2],
    /// Connections of enrolled devices, by transport (HTTP/3 on QUIC, HTTPS on TCP).
    device_connections: [Arc<AtomicI64>; 2],
    /// The QUIC socket's buffers as obtained: receive, send.
    udp_buffers: [AtomicI64; 2],
    /// Requests, latency, bytes and handshakes by hostname, protocol and reason.
    pub(crate) sli: crate::ops::sli::Sli,
}

/// Counts one thing in a gauge while it is held.
#[derive(Debug)]
pub(crate) struct GaugeGuard(Arc<AtomicI64>);

impl GaugeGuard {
    fn new(gauge: &Arc<AtomicI64>) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn transport_index(kind: TransportKind) -> usize {
    match kind {
        TransportKind::Quic => 0,
        TransportKind::Tcp => 1,
    }
}

const TRANSPORTS: [TransportKind; 2] = [TransportKind::Quic, TransportKind::Tcp];

impl Metrics {
    /// Counts a reload of relay.toml, applied or refused.
    pub(crate) fn config_reload(&self, applied: bool) {
        self.config_reloads[usize::from(!applied)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection refused by a cap.
    pub(crate) fn refused(&self, listener: Listener, why: Refusal) {
        let reason = match why {
            Refusal::Global => 0,
            Refusal::Address => 1,
        };
        self.refused[listener as usize][reason].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection without a certificate closed over `max_unauthenticated_connections`.
    pub(crate) fn refused_unauthenticated(&self, listener: Listener) {
        self.refused[listener as usize][2].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connector tunnel on `kind` while the guard is held.
    pub(crate) fn tunnel(&self, kind: TransportKind) -> GaugeGuard {
        GaugeGuard::new(&self.tunnels[transport_index(kind)])
    }

    /// Counts a device connection on `kind` while the guard is held.
    pub(crate) fn device_connection(&self, kind: TransportKind) -> GaugeGuard {
        GaugeGuard::new(&self.device_connections[transport_index(kind)])
    }

    /// Counts work shed while overloaded.
    /// Records what the QUIC socket's buffers obtained.
    pub(crate) fn udp_buffers(&self, sizes: BufferSizes) {
        for (gauge, bytes) in self.udp_buffers.iter().zip([sizes.receive, sizes.send]) {
            gauge.store(i64::try_from(bytes).unwrap_or(i64::MAX), Ordering::Relaxed);
        }
    }

    pub(crate) fn enroll_refused(&self, why: Refused) {
        self.enroll_refusals[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn shed(&self, work: Shed) {
        self.shed[work as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let g = |v: &AtomicI64| v.load(Ordering::Relaxed);
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let e = &mut encoder;
        let by_transport = |gauges: &[Arc<AtomicI64>; 2]| {
            TRANSPORTS.map(|k| ([("transport", k.as_str())], g(&gauges[transport_index(k)])))
        };
        gauges(
            e,
            "connector_tunnels",
            "Connector tunnels up, by transport (quic, or tcp where UDP is blocked).",
            by_transport(&self.tunnels),
        )?;
        gauges(
            e,
            "device_connections",
            "Connections of enrolled devices, by transport (quic: HTTP/3; tcp: HTTP/1.1 and HTTP/2).",
            by_transport(&self.device_connections),
        )?;
        counters(
            e,
            "enrolment_refusals",
            "Enrolments and renewals refused, by reason (each is logged; the audit log gets at most one row per address and minute).",
            Refused::ALL.map(|why| {
                (
                    [("reason", why.label())],
                    c(&self.enroll_refusals[why as usize]),
                )
            }),
        )?;
        gauges(
            e,
            "udp_buffer_bytes",
            &format!(
                "The QUIC socket's buffer sizes as obtained (wanted {}; short means net.core.rmem_max / wmem_max too low).",
                portcullis_shared::udp::WANTED
            ),
            ["receive", "send"]
                .iter()
                .zip(&self.udp_buffers)
                .map(|(direction, v)| ([("direction", *direction)], g(v))),
        )?;
        gauge(
            e,
            "tunnel_streams",
            "Open tunnel streams.",
            g(&self.tunnel_streams),
        )?;
        counter(
            e,
            "policy_denials",
            "Requests denied by policy.",
            c(&self.denied),
        )?;
        counters(
            e,
            "config_reloads",
            "Reloads of relay.toml, by result: applied, or refused as invalid (the running configuration was kept).",
            [("applied", 0), ("refused", 1)]
                .map(|(r, i)| ([("result", r)], c(&self.config_reloads[i]))),
        )?;
        let by_listener = |v: &[Arc<AtomicI64>; 2]| {
            Listener::ALL.map(|l| ([("listener", l.label())], g(&v[l as usize])))
        };
        gauges(
            e,
            "open_connections",
            "Open client connections per listener, handshakes included.",
            by_listener(&self.open_connections),
        )?;
        let reasons = [
            Refusal::Global.label(),
            Refusal::Address.label(),
            "max_unauthenticated_connections",
        ];
        counters(
            e,
            "connections_refused",
            "New client connections refused by a connection cap: before any handshake work, or after a handshake without a certificate (max_unauthenticated_connections).",
            Listener::ALL.into_iter().flat_map(|l| {
                reasons.iter().enumerate().map(move |(i, reason)| {
                    (
                        [("listener", l.label()), ("reason", *reason)],
                        c(&self.refused[l as usize][i]),
                    )
                })
            }),
        )?;
        gauges(
            e,
            "unauthenticated_connections",
            "Open client connections without a certificate, past their handshake, in their own places (max_unauthenticated_connections).",
            by_listener(&self.unauthenticated_connections),
        )?;
        counters(
            e,
            "overload_shed",
            "Work turned away while overloaded.",
            Shed::ALL.map(|work| ([("work", work.label())], c(&self.shed[work as usize]))),
        )?;
        counter(
            e,
            "quic_retries",
            "New QUIC connections asked to prove their address with a Retry.",
            c(&self.quic_retries),
        )?;
        counter(
            e,
            "enrolment_deadline_closes",
            "Enrolment connections closed at their deadline.",
            c(&self.enroll_deadline_closes),
        )?;
        gauge(
            e,
            "overload_level",
            "Overload level: 0 normal, 1 shedding handshakes and enrolment, 2 also new requests.",
            g(&self.overload_level),
        )?;
        self.sli.encode(encoder)
    }
}

#[cfg(test)]
mod tests {
    use portcullis_shared::metrics::{Registry, encode};

    use super::*;

    #[test]
    fn the_library_writes_the_relays_families_under_their_prefix() {
        let metrics = Arc::new(Metrics::default());
        metrics.config_reload(true);
        metrics.config_reload(false);
        metrics.config_reload(false);
        metrics.shed(Shed::ALL[0]);
        let _tunnel = metrics.tunnel(TransportKind::Tcp);
        let mut registry = Registry::with_prefix("portcullis_relay");
        registry.register_collector(Box::new(metrics));
        let text = encode(&registry);
        for line in [
            "# TYPE portcullis_relay_config_reloads counter",
            "portcullis_relay_config_reloads_total{result=\"applied\"} 1",
            "portcullis_relay_config_reloads_total{result=\"refused\"} 2",
            "portcullis_relay_connector_tunnels{transport=\"tcp\"} 1",
            "portcullis_relay_connector_tunnels{transport=\"quic\"} 0",
            "portcullis_relay_overload_level 0",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
