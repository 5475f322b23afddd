//! The service-level indicators of the relay, as Prometheus series: requests by hostname,
//! method class and status class; latency to the response head and in total, by hostname
//! and protocol; bytes in and out; TLS and QUIC handshakes by outcome and reason; the
//! statuses that mean "refused for load or size" (429, 431, 503); and how long TCP
//! tunnels and WebSocket sessions last (their own family: request latencies hold requests
//! only). Written by the Prometheus client library, through [`crate::ops::metrics`].
//!
//! Hostnames are labels once a device was allowed a name some connector may publish;
//! everything refused before that (unknown names, denied devices) is `hostname="-"`,
//! so strangers cannot grow the label set, and past [`MAX_HOSTNAMES`] names the rest are
//! `hostname="other"`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use portcullis_shared::metrics::{
    Histogram, counters, label, latency_histogram, session_histogram,
};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;

/// Distinct (hostname, protocol) label pairs kept; beyond, `other`.
const MAX_HOSTNAMES: usize = 2_000;

/// The method classes of the requests series.
const METHOD_CLASSES: [&str; 4] = ["read", "write", "connect", "other"];

/// A request method's class: `read` (GET, HEAD, OPTIONS), `write` (POST, PUT, PATCH,
/// DELETE), `connect` (CONNECT: TCP, WebSocket, CONNECT-UDP), `other`.
pub(crate) fn method_class(method: &str) -> usize {
    match method {
        "GET" | "HEAD" | "OPTIONS" => 0,
        "POST" | "PUT" | "PATCH" | "DELETE" => 1,
        "CONNECT" => 2,
        _ => 3,
    }
}

/// The kinds of session whose duration is its own family: an HTTP/1.1 upgrade
/// (WebSocket) answered 101, and a CONNECT answered 2xx (TCP, and WebSocket over HTTP/2
/// and HTTP/3).
const SESSION_KINDS: [&str; 2] = ["upgrade", "connect"];

/// One (hostname, protocol)'s figures.
#[derive(Debug)]
struct Host {
    /// By method class, then status class (1..=5).
    requests: [[AtomicU64; 6]; 4],
    head: Histogram,
    /// Requests only (not sessions).
    total: Histogram,
    /// Session durations, by [`SESSION_KINDS`] (only the kinds seen are shown).
    sessions: [Histogram; 2],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Default for Host {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            head: latency_histogram(),
            total: latency_histogram(),
            sessions: [session_histogram(), session_histogram()],
            bytes_in: AtomicU64::default(),
            bytes_out: AtomicU64::default(),
        }
    }
}

/// Which of [`SESSION_KINDS`] a finished exchange was, if it was a session.
fn session_kind(method: &str, status: u16) -> Option<usize> {
    match (method, status) {
        (_, 101) => Some(0),
        ("CONNECT", 200..=299) => Some(1),
        _ => None,
    }
}

/// One finished request, as the SLIs see it.
pub(crate) struct Finished<'a> {
    /// Routed hostname, or `None` when refused before routing.
    pub(crate) hostname: Option<&'a str>,
    pub(crate) protocol: &'static str,
    pub(crate) method: &'a str,
    pub(crate) status: u16,
    /// From the request to the response head.
    pub(crate) head: Duration,
    /// From the request to the end of the response body.
    pub(crate) total: Duration,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

/// Hostname to its figures by protocol.
type Hosts = HashMap<String, Vec<(&'static str, Arc<Host>)>>;

#[derive(Debug, Default)]
pub(crate) struct Sli {
    /// By hostname, then protocol. Read-locked per request (a name is added once).
    hosts: RwLock<Hosts>,
    /// How many (hostname, protocol) pairs `hosts` holds.
    pairs: AtomicUsize,
    /// 429, 431, 503.
    refusals: [AtomicU64; 3],
    /// (listener, outcome, reason) to count.
    handshakes: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
}

impl Sli {
    /// The figures of (`name`, `protocol`): found under a read lock, added (or `other`
    /// once [`MAX_HOSTNAMES`] pairs are kept) under the write lock.
    fn host(&self, name: &str, protocol: &'static str) -> Arc<Host> {
        let find = |hosts: &Hosts, name: &str| {
            hosts
                .get(name)?
                .iter()
                .find(|(p, _)| *p == protocol)
                .map(|(_, h)| h.clone())
        };
        if let Some(h) = find(&self.hosts.read().unwrap_or_else(|p| p.into_inner()), name) {
            return h;
        }
        let mut hosts = self.hosts.write().unwrap_or_else(|p| p.into_inner());
        let name = if self.pairs.load(Ordering::Relaxed) >= MAX_HOSTNAMES {
            "other"
        } else {
            name
        };
        if let Some(h) = find(&hosts, name) {
            return h;
        }
        let h = Arc::new(Host::default());
        hosts
            .entry(name.to_owned())
            .or_default()
            .push((protocol, h.clone()));
        self.pairs.fetch_add(1, Ordering::Relaxed);
        h
    }

    pub(crate) fn request(&self, r: &Finished<'_>) {
        let host = self.host(r.hostname.unwrap_or("-"), r.protocol);
        let class = usize::from(r.status / 100).clamp(1, 5);
        host.requests[method_class(r.method)][class].fetch_add(1, Ordering::Relaxed);
        host.head.observe(r.head);
        match session_kind(r.method, r.status) {
            Some(kind) => {
                host.sessions[kind].observe(r.total);
            }
            None => host.total.observe(r.total),
        }
        host.bytes_in.fetch_add(r.bytes_in, Ordering::Relaxed);
        host.bytes_out.fetch_add(r.bytes_out, Ordering::Relaxed);
        let refusal = match r.status {
            429 => Some(0),
            431 => Some(1),
            503 => Some(2),
            _ => None,
        };
        if let Some(i) = refusal {
            self.refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request the protocol codec refused before the pipeline saw it (hyper's and
    /// h3's 431 for a header section over the limit): a request with no hostname, no
    /// method and no latency of its own.
    pub(crate) fn codec_refusal(&self, protocol: &'static str, status: u16) {
        let host = self.host("-", protocol);
        let class = usize::from(status / 100).clamp(1, 5);
        host.requests[method_class("")][class].fetch_add(1, Ordering::Relaxed);
        if status == 431 {
            self.refusals[1].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one handshake on `listener` (`https` or `quic`): `reason` is `ok` for one
    /// that completed.
    pub(crate) fn handshake(&self, listener: &'static str, reason: &'static str) {
        let outcome = if reason == "ok" { "ok" } else { "failed" };
        *self
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((listener, outcome, reason))
            .or_default() += 1;
    }

    /// Writes every family with the library's encoder.
    pub(crate) fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mut hosts: Vec<((String, &'static str), Arc<Host>)> = self
            .hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flat_map(|(name, v)| v.iter().map(|(p, h)| ((name.clone(), *p), h.clone())))
            .collect();
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        let e = &mut encoder;
        let host_labels = |host: &str, protocol: &str| {
            [("hostname", label(host)), ("protocol", protocol.to_owned())]
        };
        counters(
            e,
            "requests",
            "Requests by hostname (- when refused before a name some connector may publish was allowed), protocol, method class and status class.",
            hosts.iter().flat_map(|((host, protocol), h)| {
                METHOD_CLASSES
                    .iter()
                    .enumerate()
                    .flat_map(move |(m, method)| {
                        (1..=5).filter_map(move |class| {
                            let n = h.requests[m][class].load(Ordering::Relaxed);
                            (n > 0).then(|| {
                                (
                                    [
                                        ("hostname", label(host)),
                                        ("protocol", (*protocol).to_owned()),
                                        ("method", (*method).to_owned()),
                                        ("class", format!("{class}xx")),
                                    ],
                                    n,
                                )
                            })
                        })
                    })
            }),
        )?;
        for (name, help, pick) in [
            (
                "response_head_seconds",
                "Time from the request to the response head, by hostname and protocol (sessions included: the time to set them up).",
                (|h: &Host| &h.head) as fn(&Host) -> &Histogram,
            ),
            (
                "request_duration_seconds",
                "Time from the request to the end of the response, by hostname and protocol; requests only (sessions are tunnel_session_duration_seconds).",
                |h: &Host| &h.total,
            ),
        ] {
            let mut family = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for ((host, protocol), h) in &hosts {
                pick(h).encode(family.encode_family(&host_labels(host, protocol))?)?;
            }
        }
        let mut family = e.encode_descriptor(
            "tunnel_session_duration_seconds",
            "How long sessions lasted, by hostname, protocol and kind: upgrade (an HTTP/1.1 WebSocket), connect (a CONNECT: TCP, or WebSocket over HTTP/2 and HTTP/3).",
            None,
            MetricType::Histogram,
        )?;
        for ((host, protocol), h) in &hosts {
            for (kind, histogram) in SESSION_KINDS.iter().zip(&h.sessions) {
                if histogram.count() > 0 {
                    let [hostname, protocol] = host_labels(host, protocol);
                    let labels = [hostname, protocol, ("kind", (*kind).to_owned())];
                    histogram.encode(family.encode_family(&labels)?)?;
                }
            }
        }
        for (name, help, pick) in [
            (
                "request_bytes",
                "Request body bytes received from clients, by hostname and protocol.",
                (|h: &Host| &h.bytes_in) as fn(&Host) -> &AtomicU64,
            ),
            (
                "response_bytes",
                "Response body bytes sent to clients, by hostname and protocol.",
                |h: &Host| &h.bytes_out,
            ),
        ] {
            counters(
                e,
                name,
                help,
                hosts.iter().map(|((host, protocol), h)| {
                    (host_labels(host, protocol), pick(h).load(Ordering::Relaxed))
                }),
            )?;
        }
        counters(
            e,
            "refused_responses",
            "Responses that refuse for load or size: 429 (a device over its stream limit), 431 (headers too large), 503 (overload, or every connector for the name at its stream limit).",
            ["429", "431", "503"].iter().enumerate().map(|(i, status)| {
                (
                    [("status", *status)],
                    self.refusals[i].load(Ordering::Relaxed),
                )
            }),
        )?;
        let handshakes = self
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        counters(
            e,
            "handshakes",
            "TLS (https) and QUIC handshakes by outcome and reason.",
            handshakes
                .into_iter()
                .map(|((listener, outcome, reason), n)| {
                    (
                        [
                            ("listener", listener),
                            ("outcome", outcome),
                            ("reason", reason),
                        ],
                        n,
                    )
                }),
        )
    }
}

/// Why a TLS handshake on the HTTPS listener failed, as a label.
pub(crate) fn tls_failure(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
        // The relay's own verifier refuses a revoked, unknown or replaced identity, or a
        // certificate of the wrong role; webpki refuses an expired one.
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_))) => {
            "refused_certificate"
        }
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        )) => "expired_certificate",
        Some(rustls::Error::InvalidCertificate(_)) => "bad_certificate",
        Some(rustls::Error::NoApplicationProtocol) => "no_common_alpn",
        Some(rustls::Error::PeerIncompatible(_)) => "incompatible",
        Some(rustls::Error::AlertReceived(_)) => "client_alert",
        Some(_) => "protocol",
        None => "closed",
    }
}

/// Why a QUIC handshake failed, as a label.
pub(crate) fn quic_failure(e: &quinn::ConnectionError) -> &'static str {
    // TLS alerts travel as QUIC transport codes 0x100..0x200.
    let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        quinn::ConnectionError::TimedOut => "timeout",
        quinn::ConnectionError::TransportError(t) if crypto(t.code) => "tls",
        quinn::ConnectionError::ConnectionClosed(c) if crypto(c.error_code) => "tls",
        quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed => {
            "closed"
        }
        quinn::ConnectionError::Reset => "reset",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `s`'s families as the library writes them under the relay's prefix.
    fn encoded(s: &Arc<Sli>) -> String {
        #[derive(Debug)]
        struct View(Arc<Sli>);
        impl prometheus_client::collector::Collector for View {
            fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
                self.0.encode(encoder)
            }
        }
        let mut registry = portcullis_shared::metrics::Registry::with_prefix("portcullis_relay");
        registry.register_collector(Box::new(View(s.clone())));
        portcullis_shared::metrics::encode(&registry)
    }

    fn finished(hostname: Option<&str>, status: u16) -> Finished<'_> {
        Finished {
            hostname,
            protocol: "h2",
            method: "GET",
            status,
            head: Duration::from_millis(2),
            total: Duration::from_millis(5),
            bytes_in: 10,
            bytes_out: 100,
        }
    }

    #[test]
    fn requests_are_counted_by_hostname_class_and_refusal() {
        let s = Arc::new(Sli::default());
        s.request(&finished(Some("app.internal"), 200));
        s.request(&finished(Some("app.internal"), 503));
        s.request(&finished(None, 403));
        s.handshake("https", "ok");
        s.handshake("https", "no_certificate");
        // A TCP tunnel (CONNECT) is a session: its duration is not a request latency.
        s.request(&Finished {
            method: "CONNECT",
            total: Duration::from_secs(12),
            ..finished(Some("db.internal"), 200)
        });
        let out = encoded(&s);
        for line in [
            "portcullis_relay_requests_total{hostname=\"app.internal\",protocol=\"h2\",method=\"read\",class=\"2xx\"} 1",
            "portcullis_relay_requests_total{hostname=\"app.internal\",protocol=\"h2\",method=\"read\",class=\"5xx\"} 1",
            "portcullis_relay_requests_total{hostname=\"-\",protocol=\"h2\",method=\"read\",class=\"4xx\"} 1",
            "portcullis_relay_response_head_seconds_count{hostname=\"app.internal\",protocol=\"h2\"} 2",
            "portcullis_relay_response_bytes_total{hostname=\"app.internal\",protocol=\"h2\"} 200",
            "portcullis_relay_refused_responses_total{status=\"503\"} 1",
            "portcullis_relay_handshakes_total{listener=\"https\",outcome=\"failed\",reason=\"no_certificate\"} 1",
            "portcullis_relay_handshakes_total{listener=\"https\",outcome=\"ok\",reason=\"ok\"} 1",
            "portcullis_relay_tunnel_session_duration_seconds_count{hostname=\"db.internal\",protocol=\"h2\",kind=\"connect\"} 1",
            "portcullis_relay_tunnel_session_duration_seconds_bucket{le=\"60.0\",hostname=\"db.internal\",protocol=\"h2\",kind=\"connect\"} 1",
            "portcullis_relay_request_duration_seconds_count{hostname=\"db.internal\",protocol=\"h2\"} 0",
            "portcullis_relay_request_duration_seconds_count{hostname=\"app.internal\",protocol=\"h2\"} 2",
        ] {
            assert!(out.contains(line), "missing {line} in\n{out}");
        }
    }

    #[test]
    fn hostnames_beyond_the_cap_are_other() {
        let s = Arc::new(Sli::default());
        for i in 0..MAX_HOSTNAMES + 5 {
            s.request(&finished(Some(&format!("h{i}.internal")), 200));
        }
        assert_eq!(s.pairs.load(Ordering::Relaxed), MAX_HOSTNAMES + 1);
        assert_eq!(s.hosts.read().unwrap().len(), MAX_HOSTNAMES + 1);
        assert!(encoded(&s).contains("hostname=\"other\""));
    }
}
