//! Prometheus counters and gauges of the relay, rendered as text on `/metrics`.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use portcullis_shared::identity::Role;
use portcullis_shared::transport::TransportKind;
use portcullis_shared::udp::BufferSizes;

use crate::hardening::conn_limit::Refusal;
use crate::hardening::overload::Shed;
use crate::hardening::refusal_log::Refused;
use crate::identity::registry::Registry;
use crate::identity::tls::CertResolver;

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
    /// Responses by status class: index 1..=5 for 1xx..5xx.
    responses: [AtomicU64; 6],
    pub(crate) https_connections: AtomicI64,
    pub(crate) tls_handshake_failures: AtomicU64,
    pub(crate) connectors: AtomicI64,
    pub(crate) tunnel_streams: AtomicI64,
    pub(crate) denied: AtomicU64,
    pub(crate) config_reloads: AtomicU64,
    pub(crate) config_reload_errors: AtomicU64,
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
    /// QUIC handshakes that failed or timed out.
    pub(crate) quic_handshake_failures: AtomicU64,
    /// Enrolment connections closed at their deadline.
    pub(crate) enroll_deadline_closes: AtomicU64,
    /// Enrolments and renewals refused, per [`Refused`].
    enroll_refusals: [AtomicU64; 4],
    /// Work turned away while overloaded, per [`Shed`].
    shed: [AtomicU64; 4],
    /// The overload level in force (0, 1, 2; set by the sampler).
    pub(crate) overload_level: AtomicI64,
    /// Resident memory at the last sample.
    pub(crate) resident_bytes: AtomicI64,
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
    pub(crate) fn response(&self, status: u16) {
        let class = usize::from(status / 100).min(5);
        self.responses[class].fetch_add(1, Ordering::Relaxed);
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

    /// The metrics as Prometheus text. Device ids carry their user's name, so their
    /// certificates are listed one by one only with `device_ids`; connectors always are.
    pub(crate) fn render(
        &self,
        registry: &Registry,
        tls: &CertResolver,
        replicas: &[(String, usize)],
        device_ids: bool,
    ) -> String {
        let mut out = String::new();
        let g = |v: &AtomicI64| v.load(Ordering::Relaxed);
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        out.push_str("# HELP portcullis_relay_responses_total HTTP responses sent to clients, by status class.\n");
        out.push_str("# TYPE portcullis_relay_responses_total counter\n");
        for class in 1..=5 {
            let _ = writeln!(
                out,
                "portcullis_relay_responses_total{{class=\"{class}xx\"}} {}",
                c(&self.responses[class])
            );
        }
        for (name, help, gauges) in [
            (
                "portcullis_relay_tunnels",
                "Connector tunnels up, by transport (quic, or tcp where UDP is blocked).",
                &self.tunnels,
            ),
            (
                "portcullis_relay_device_connections",
                "Connections of enrolled devices, by transport (quic: HTTP/3; tcp: HTTP/1.1 and HTTP/2).",
                &self.device_connections,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for kind in TRANSPORTS {
                let _ = writeln!(
                    out,
                    "{name}{{transport=\"{}\"}} {}",
                    kind.as_str(),
                    g(&gauges[transport_index(kind)])
                );
            }
        }
        let name = "portcullis_relay_enrolment_refusals_total";
        let _ = writeln!(
            out,
            "# HELP {name} Enrolments and renewals refused, by reason (each is logged; the audit log gets at most one row per address and minute).\n# TYPE {name} counter"
        );
        for why in Refused::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                why.label(),
                c(&self.enroll_refusals[why as usize])
            );
        }
        let name = "portcullis_relay_udp_buffer_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} The QUIC socket's buffer sizes as obtained (wanted {}; short means net.core.rmem_max / wmem_max too low).\n# TYPE {name} gauge",
            portcullis_shared::udp::WANTED
        );
        for (direction, gauge) in ["receive", "send"].iter().zip(&self.udp_buffers) {
            let _ = writeln!(out, "{name}{{direction=\"{direction}\"}} {}", g(gauge));
        }
        let mut one = |name: &str, kind: &str, help: &str, value: i64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        one(
            "portcullis_relay_https_connections",
            "gauge",
            "Open client TLS connections.",
            g(&self.https_connections),
        );
        one(
            "portcullis_relay_tls_handshake_failures_total",
            "counter",
            "Client TLS handshakes refused or failed.",
            c(&self.tls_handshake_failures) as i64,
        );
        one(
            "portcullis_relay_connectors",
            "gauge",
            "Connected connector tunnels.",
            g(&self.connectors),
        );
        one(
            "portcullis_relay_tunnel_streams",
            "gauge",
            "Open tunnel streams.",
            g(&self.tunnel_streams),
        );
        one(
            "portcullis_relay_policy_denials_total",
            "counter",
            "Requests denied by policy.",
            c(&self.denied) as i64,
        );
        one(
            "portcullis_relay_config_reloads_total",
            "counter",
            "Reloads of relay.toml that took effect.",
            c(&self.config_reloads) as i64,
        );
        one(
            "portcullis_relay_config_reload_errors_total",
            "counter",
            "Reloads of relay.toml refused as invalid (the running configuration was kept).",
            c(&self.config_reload_errors) as i64,
        );
        one(
            "portcullis_relay_tls_leaves_minted_total",
            "counter",
            "Certificates minted for published names (bounded by [tls] leaves_per_minute).",
            tls.minted_total() as i64,
        );
        one(
            "portcullis_relay_tls_mint_budget_exhausted_total",
            "counter",
            "Handshakes answered with the relay's own certificate because the minting budget was spent.",
            tls.over_budget_total() as i64,
        );
        one(
            "portcullis_relay_store_unreadable",
            "gauge",
            "1 while the relay's last read of its store failed: it serves with the identities it read last and refuses enrolment and renewal.",
            i64::from(registry.is_store_unreadable()),
        );
        one(
            "portcullis_relay_store_failed_closed",
            "gauge",
            "1 while the store has been unreadable for longer than [store] fail_closed_after: every certificate is refused.",
            i64::from(registry.is_failed_closed()),
        );
        self.render_abuse(&mut out);
        out.push_str("# HELP portcullis_relay_hostname_replicas Connectors that may take a new stream for each hostname a registered connector may publish or the policy opens (not draining, not silent, origin healthy); 0 when none can.\n");
        out.push_str("# TYPE portcullis_relay_hostname_replicas gauge\n");
        for (hostname, n) in replicas {
            let _ = writeln!(
                out,
                "portcullis_relay_hostname_replicas{{hostname=\"{hostname}\"}} {n}"
            );
        }
        self.sli.render(&mut out, &tls.expiries());
        let snapshot = registry.snapshot();
        let mut records: Vec<_> = snapshot
            .records()
            .filter(|r| r.revoked_at.is_none())
            .collect();
        records.sort_by(|a, b| a.identity.cmp(&b.identity));
        out.push_str(
            "# HELP portcullis_identities Active (issued, unrevoked) identities, by role.\n",
        );
        out.push_str("# TYPE portcullis_identities gauge\n");
        for role in [Role::Connector, Role::Device] {
            let n = records.iter().filter(|r| r.identity.role() == role).count();
            let _ = writeln!(out, "portcullis_identities{{role=\"{role}\"}} {n}");
        }
        out.push_str("# HELP portcullis_certificate_expiry_timestamp_seconds Expiry of each active issued certificate (devices only with [admin] metrics_device_ids).\n");
        out.push_str("# TYPE portcullis_certificate_expiry_timestamp_seconds gauge\n");
        for r in records
            .iter()
            .filter(|r| device_ids || r.identity.role() != Role::Device)
        {
            let _ = writeln!(
                out,
                "portcullis_certificate_expiry_timestamp_seconds{{role=\"{}\",id=\"{}\"}} {}",
                r.identity.role(),
                r.identity.id(),
                r.not_after
            );
        }
        out
    }

    /// The connection caps, Retry, handshake failures, the enrolment deadline and the
    /// overload manager.
    fn render_abuse(&self, out: &mut String) {
        let g = |v: &AtomicI64| v.load(Ordering::Relaxed);
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            out,
            "portcullis_relay_open_connections",
            "gauge",
            "Open client connections per listener, handshakes included.",
        );
        for l in Listener::ALL {
            let _ = writeln!(
                out,
                "portcullis_relay_open_connections{{listener=\"{}\"}} {}",
                l.label(),
                g(&self.open_connections[l as usize])
            );
        }
        head(
            out,
            "portcullis_relay_connections_refused_total",
            "counter",
            "New client connections refused by a connection cap: before any handshake work, or after a handshake without a certificate (max_unauthenticated_connections).",
        );
        for l in Listener::ALL {
            let reasons = [
                Refusal::Global.label(),
                Refusal::Address.label(),
                "max_unauthenticated_connections",
            ];
            for (i, reason) in reasons.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "portcullis_relay_connections_refused_total{{listener=\"{}\",reason=\"{reason}\"}} {}",
                    l.label(),
                    c(&self.refused[l as usize][i])
                );
            }
        }
        head(
            out,
            "portcullis_relay_unauthenticated_connections",
            "gauge",
            "Open client connections without a certificate, past their handshake, in their own places (max_unauthenticated_connections).",
        );
        for l in Listener::ALL {
            let _ = writeln!(
                out,
                "portcullis_relay_unauthenticated_connections{{listener=\"{}\"}} {}",
                l.label(),
                g(&self.unauthenticated_connections[l as usize])
            );
        }
        head(
            out,
            "portcullis_relay_overload_shed_total",
            "counter",
            "Work turned away while overloaded.",
        );
        for work in Shed::ALL {
            let _ = writeln!(
                out,
                "portcullis_relay_overload_shed_total{{work=\"{}\"}} {}",
                work.label(),
                c(&self.shed[work as usize])
            );
        }
        for (name, kind, help, value) in [
            (
                "portcullis_relay_quic_retries_total",
                "counter",
                "New QUIC connections asked to prove their address with a Retry.",
                c(&self.quic_retries) as i64,
            ),
            (
                "portcullis_relay_quic_handshake_failures_total",
                "counter",
                "QUIC handshakes that failed or timed out.",
                c(&self.quic_handshake_failures) as i64,
            ),
            (
                "portcullis_relay_enrolment_deadline_closes_total",
                "counter",
                "Enrolment connections closed at their deadline.",
                c(&self.enroll_deadline_closes) as i64,
            ),
            (
                "portcullis_relay_overload_level",
                "gauge",
                "Overload level: 0 normal, 1 shedding handshakes and enrolment, 2 also new requests.",
                g(&self.overload_level),
            ),
            (
                "portcullis_relay_resident_memory_bytes",
                "gauge",
                "The relay's resident memory at the last overload sample.",
                g(&self.resident_bytes),
            ),
        ] {
            head(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use portcullis_shared::identity::Hostname;
    use portcullis_shared::pki::Ca;
    use portcullis_shared::store::IdentityRecord;

    use super::*;

    fn record(role: Role, id: &str) -> IdentityRecord {
        IdentityRecord {
            user: Some("alice".into()),
            not_after: 1234,
            ..Registry::test_record(role, id, &[])
        }
    }

    #[test]
    fn device_ids_are_listed_only_when_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::init(dir.path(), "Acme").unwrap());
        let registry = Registry::with_records(vec![
            record(Role::Device, "alice_laptop"),
            record(Role::Connector, "c1"),
        ]);
        let name = Hostname::parse("relay.acme.test").unwrap();
        let tls = CertResolver::new(ca, name, registry.clone(), None, 60).unwrap();
        let metrics = Metrics::default();

        let text = metrics.render(&registry, &tls, &[], false);
        assert!(!text.contains("alice"), "{text}");
        assert!(
            text.contains("portcullis_identities{role=\"device\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "portcullis_certificate_expiry_timestamp_seconds{role=\"connector\",id=\"c1\"} 1234"
            ),
            "{text}"
        );
        assert!(
            text.contains("portcullis_relay_store_failed_closed 0"),
            "{text}"
        );
        let text = metrics.render(&registry, &tls, &[], true);
        assert!(
            text.contains("portcullis_certificate_expiry_timestamp_seconds{role=\"device\",id=\"alice_laptop\"} 1234"),
            "{text}"
        );
    }
}
