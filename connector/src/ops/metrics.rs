//! The connector's counters: streams, origin answers, errors and latency by ingress rule,
//! reloads, renewals and the certificate's expiry, kept where they are counted and written
//! by the Prometheus client library on the admin listener's `/metrics` ([`Metrics`] is
//! their collector; the tunnels' states are [`crate::status::Status`]'s).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use portcullis_shared::metrics::{Histogram, counter, counters, gauge, label, latency_histogram};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;

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
#[derive(Debug)]
pub(crate) struct OriginStats {
    /// Answers by status class, index 1..=5 for 1xx..5xx.
    responses: [AtomicU64; 6],
    errors: AtomicU64,
    /// Time to the origin's response head (or, for `tcp://`, to the connection).
    latency: Histogram,
}

impl Default for OriginStats {
    fn default() -> Self {
        Self {
            responses: Default::default(),
            errors: AtomicU64::default(),
            latency: latency_histogram(),
        }
    }
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
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let e = &mut encoder;
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        counter(
            e,
            "streams",
            "Streams the relays opened on any tunnel.",
            c(&self.streams),
        )?;
        gauge(
            e,
            "streams_active",
            "Streams being served now.",
            self.streams_active.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "tunnel_replacements",
            "Tunnel connections replaced without a break (after a reload or a renewal).",
            c(&self.tunnel_replacements),
        )?;
        let origins: Vec<(String, std::sync::Arc<OriginStats>)> = self
            .origins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (label(k), v.clone()))
            .collect();
        counters(
            e,
            "origin_responses",
            "Origin answers by ingress rule and status class.",
            origins.iter().flat_map(|(rule, s)| {
                (1..=5).map(move |class| {
                    (
                        [("rule", rule.clone()), ("class", format!("{class}xx"))],
                        s.responses[class].load(Ordering::Relaxed),
                    )
                })
            }),
        )?;
        counters(
            e,
            "origin_errors",
            "Requests whose origin could not be reached or did not answer.",
            origins
                .iter()
                .map(|(rule, s)| ([("rule", rule.clone())], c(&s.errors))),
        )?;
        let mut family = e.encode_descriptor(
            "origin_latency_seconds",
            "Time from the request to the origin's response head (tcp://: to the connection).",
            None,
            MetricType::Histogram,
        )?;
        for (rule, s) in &origins {
            s.latency
                .encode(family.encode_family(&[("rule", rule.clone())])?)?;
        }
        counters(
            e,
            "reloads",
            "Reloads of connector.toml and the credentials, by result.",
            [("applied", 0), ("refused", 1)].map(|(r, i)| ([("result", r)], c(&self.reloads[i]))),
        )?;
        counters(
            e,
            "renewals",
            "Certificate renewals, by result.",
            [("ok", 0), ("failed", 1)].map(|(r, i)| ([("result", r)], c(&self.renewals[i]))),
        )?;
        gauge(
            e,
            "certificate_expiry_timestamp_seconds",
            "When the connector's certificate expires.",
            self.cert_not_after.load(Ordering::Relaxed),
        )
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
        let mut registry =
            portcullis_shared::metrics::Registry::with_prefix("portcullis_connector");
        registry.register_collector(Box::new(std::sync::Arc::new(m)));
        let text = portcullis_shared::metrics::encode(&registry);
        for line in [
            "portcullis_connector_origin_responses_total{rule=\"app.internal\",class=\"2xx\"} 1",
            "portcullis_connector_origin_responses_total{rule=\"app.internal\",class=\"5xx\"} 1",
            "portcullis_connector_origin_errors_total{rule=\"app.internal\"} 1",
            "portcullis_connector_origin_latency_seconds_count{rule=\"app.internal\"} 2",
            "portcullis_connector_renewals_total{result=\"failed\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
