//! The connector's Prometheus metrics, rendered as text on the admin listener's `/metrics`:
//! tunnels by state, streams, origin answers, errors and latency by ingress rule, reloads,
//! renewals and the certificate's expiry.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use portcullis_shared::histogram::{Histogram, label};

use crate::status::{TunnelState, TunnelStatus};

/// What happened to one request to an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The origin answered with this status.
    Status(u16),
    /// The origin could not be reached or did not answer.
    Error,
}

/// One ingress rule's origin: looked up once per rule (see [`Metrics::origin_stats`]),
/// then recorded into without a lock.
#[derive(Debug, Default)]
pub(crate) struct OriginStats {
    /// Answers by status class, index 1..=5 for 1xx..5xx.
    responses: [AtomicU64; 6],
    errors: AtomicU64,
    /// Time to the origin's response head (or, for `tcp://`, to the connection).
    latency: Histogram,
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Streams the relay opened on any tunnel.
    pub(crate) streams: AtomicU64,
    /// Streams being served now.
    pub(crate) streams_active: AtomicI64,
    /// Reloads of connector.toml and the credentials: applied, refused.
    reloads: [AtomicU64; 2],
    /// Certificate renewals: succeeded, failed.
    renewals: [AtomicU64; 2],
    /// Tunnel connections replaced without a break (after a reload or a renewal).
    pub(crate) tunnel_replacements: AtomicU64,
    /// The certificate's expiry, Unix seconds (0 before it is read).
    pub(crate) cert_not_after: AtomicI64,
    /// By ingress rule hostname (bounded by the configuration).
    origins: Mutex<BTreeMap<String, std::sync::Arc<OriginStats>>>,
}

impl Metrics {
    pub(crate) fn reload(&self, applied: bool) {
        self.reloads[usize::from(!applied)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn renewal(&self, ok: bool) {
        self.renewals[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// The figures of the rule `rule` (its hostname pattern), kept across reloads.
    pub(crate) fn origin_stats(&self, rule: &str) -> std::sync::Arc<OriginStats> {
        self.origins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(rule.to_owned())
            .or_default()
            .clone()
    }

    /// The text exposition of every series, with `tunnels`, the tunnels' states as their
    /// owners last recorded them.
    pub(crate) fn render(&self, tunnels: &[TunnelStatus]) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "portcullis_connector_streams_total",
            "Streams the relays opened on this connector's tunnels.",
            self.streams.load(Ordering::Relaxed),
        );
        counter(
            "portcullis_connector_tunnel_replacements_total",
            "Tunnel connections replaced without a break (after a reload or a renewal).",
            self.tunnel_replacements.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_streams_active Streams being served now.\n\
             # TYPE portcullis_connector_streams_active gauge\n\
             portcullis_connector_streams_active {}",
            self.streams_active.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_tunnels Tunnels to relay addresses, by state.\n\
             # TYPE portcullis_connector_tunnels gauge"
        );
        for state in ["up", "connecting", "down", "draining"] {
            let n = tunnels
                .iter()
                .filter(|t| state_name(&t.state) == state)
                .count();
            let _ = writeln!(out, "portcullis_connector_tunnels{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_tunnel_up Whether the tunnel to a relay address is registered (1) or not (0).\n\
             # TYPE portcullis_connector_tunnel_up gauge"
        );
        for t in tunnels {
            let up = u8::from(matches!(t.state, TunnelState::Up { .. }));
            let transport = match &t.state {
                TunnelState::Up { transport, .. } => transport.as_str(),
                _ => "",
            };
            let _ = writeln!(
                out,
                "portcullis_connector_tunnel_up{{relay=\"{}\",address=\"{}\",transport=\"{}\"}} {up}",
                label(&t.relay),
                t.address,
                transport
            );
        }
        let origins: Vec<(String, std::sync::Arc<OriginStats>)> = self
            .origins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_origin_responses_total Origin answers by ingress rule and status class.\n\
             # TYPE portcullis_connector_origin_responses_total counter"
        );
        for (rule, s) in &origins {
            for class in 1..=5 {
                let _ = writeln!(
                    out,
                    "portcullis_connector_origin_responses_total{{rule=\"{}\",class=\"{class}xx\"}} {}",
                    label(rule),
                    s.responses[class].load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_origin_errors_total Requests whose origin could not be reached or did not answer.\n\
             # TYPE portcullis_connector_origin_errors_total counter"
        );
        for (rule, s) in &origins {
            let _ = writeln!(
                out,
                "portcullis_connector_origin_errors_total{{rule=\"{}\"}} {}",
                label(rule),
                s.errors.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_origin_latency_seconds Time from the request to the origin's response head (tcp://: to the connection).\n\
             # TYPE portcullis_connector_origin_latency_seconds histogram"
        );
        for (rule, s) in &origins {
            s.latency.render(
                &mut out,
                "portcullis_connector_origin_latency_seconds",
                &format!("rule=\"{}\"", label(rule)),
            );
        }
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_reloads_total Reloads of connector.toml and the credentials, by result.\n\
             # TYPE portcullis_connector_reloads_total counter\n\
             portcullis_connector_reloads_total{{result=\"applied\"}} {}\n\
             portcullis_connector_reloads_total{{result=\"refused\"}} {}",
            self.reloads[0].load(Ordering::Relaxed),
            self.reloads[1].load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_renewals_total Certificate renewals, by result.\n\
             # TYPE portcullis_connector_renewals_total counter\n\
             portcullis_connector_renewals_total{{result=\"ok\"}} {}\n\
             portcullis_connector_renewals_total{{result=\"failed\"}} {}",
            self.renewals[0].load(Ordering::Relaxed),
            self.renewals[1].load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_certificate_expiry_timestamp_seconds When the connector's certificate expires.\n\
             # TYPE portcullis_connector_certificate_expiry_timestamp_seconds gauge\n\
             portcullis_connector_certificate_expiry_timestamp_seconds {}",
            self.cert_not_after.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_connector_build_info The running version.\n\
             # TYPE portcullis_connector_build_info gauge\n\
             portcullis_connector_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

impl OriginStats {
    /// Records one request to this origin.
    pub(crate) fn record(&self, outcome: Outcome, took: Duration) {
        match outcome {
            Outcome::Status(code) => {
                self.responses[usize::from(code / 100).min(5)].fetch_add(1, Ordering::Relaxed);
                self.latency.observe(took);
            }
            Outcome::Error => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn state_name(state: &TunnelState) -> &'static str {
    match state {
        TunnelState::Connecting => "connecting",
        TunnelState::Up { .. } => "up",
        TunnelState::Down { .. } => "down",
        TunnelState::Draining => "draining",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_answers_are_counted_by_class_and_errors_apart() {
        let m = Metrics::default();
        let app = m.origin_stats("app.internal");
        app.record(Outcome::Status(200), Duration::from_millis(3));
        app.record(Outcome::Status(503), Duration::from_millis(3));
        m.origin_stats("app.internal")
            .record(Outcome::Error, Duration::from_secs(10));
        let text = m.render(&[]);
        for line in [
            "portcullis_connector_origin_responses_total{rule=\"app.internal\",class=\"2xx\"} 1",
            "portcullis_connector_origin_responses_total{rule=\"app.internal\",class=\"5xx\"} 1",
            "portcullis_connector_origin_errors_total{rule=\"app.internal\"} 1",
            "portcullis_connector_origin_latency_seconds_count{rule=\"app.internal\"} 2",
            "portcullis_connector_tunnels{state=\"up\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
