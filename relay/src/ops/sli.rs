//! The service-level indicators of the relay, as Prometheus series: requests by hostname,
//! method class and status class; latency to the response head and in total, by hostname
//! and protocol; bytes in and out; TLS and QUIC handshakes by outcome and reason; the
//! statuses that mean "refused for load or size" (429, 431, 503); and the expiry of the
//! CA and of the public certificate.
//!
//! Hostnames are labels once a device was allowed a name some connector may publish;
//! everything refused before that (unknown names, denied devices) is `hostname="-"`,
//! so strangers cannot grow the label set, and past [`MAX_HOSTNAMES`] names the rest are
//! `hostname="other"`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use portcullis_shared::histogram::{Histogram, label};

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

/// One (hostname, protocol)'s figures.
#[derive(Debug, Default)]
struct Host {
    /// By method class, then status class (1..=5).
    requests: [[AtomicU64; 6]; 4],
    head: Histogram,
    total: Histogram,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
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
        host.total.observe(r.total);
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

    /// Appends every series; `expiries` are (certificate, Unix seconds).
    pub(crate) fn render(&self, out: &mut String, expiries: &[(&str, i64)]) {
        let mut hosts: Vec<((String, &'static str), Arc<Host>)> = self
            .hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flat_map(|(name, v)| v.iter().map(|(p, h)| ((name.clone(), *p), h.clone())))
            .collect();
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            out,
            "portcullis_relay_requests_total",
            "counter",
            "Requests by routed hostname (- when refused before routing), protocol, method class and status class.",
        );
        for ((host, protocol), h) in &hosts {
            for (m, method) in METHOD_CLASSES.iter().enumerate() {
                for class in 1..=5 {
                    let n = h.requests[m][class].load(Ordering::Relaxed);
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "portcullis_relay_requests_total{{hostname=\"{}\",protocol=\"{protocol}\",method=\"{method}\",class=\"{class}xx\"}} {n}",
                            label(host)
                        );
                    }
                }
            }
        }
        for (name, help, pick) in [
            (
                "portcullis_relay_response_head_seconds",
                "Time from the request to the response head, by hostname and protocol.",
                (|h: &Host| &h.head) as fn(&Host) -> &Histogram,
            ),
            (
                "portcullis_relay_request_duration_seconds",
                "Time from the request to the end of the response, by hostname and protocol.",
                |h: &Host| &h.total,
            ),
        ] {
            head(out, name, "histogram", help);
            for ((host, protocol), h) in &hosts {
                pick(h).render(
                    out,
                    name,
                    &format!("hostname=\"{}\",protocol=\"{protocol}\"", label(host)),
                );
            }
        }
        for (name, help, pick) in [
            (
                "portcullis_relay_request_bytes_total",
                "Request body bytes received from clients, by hostname and protocol.",
                (|h: &Host| &h.bytes_in) as fn(&Host) -> &AtomicU64,
            ),
            (
                "portcullis_relay_response_bytes_total",
                "Response body bytes sent to clients, by hostname and protocol.",
                |h: &Host| &h.bytes_out,
            ),
        ] {
            head(out, name, "counter", help);
            for ((host, protocol), h) in &hosts {
                let _ = writeln!(
                    out,
                    "{name}{{hostname=\"{}\",protocol=\"{protocol}\"}} {}",
                    label(host),
                    pick(h).load(Ordering::Relaxed)
                );
            }
        }
        head(
            out,
            "portcullis_relay_refused_responses_total",
            "counter",
            "Responses that refuse for load or size: 429 (a device over its stream limit), 431 (headers too large), 503 (overload, or every connector for the name at its stream limit).",
        );
        for (i, status) in ["429", "431", "503"].iter().enumerate() {
            let _ = writeln!(
                out,
                "portcullis_relay_refused_responses_total{{status=\"{status}\"}} {}",
                self.refusals[i].load(Ordering::Relaxed)
            );
        }
        head(
            out,
            "portcullis_relay_handshakes_total",
            "counter",
            "TLS (https) and QUIC handshakes by outcome and reason.",
        );
        for ((listener, outcome, reason), n) in self
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "portcullis_relay_handshakes_total{{listener=\"{listener}\",outcome=\"{outcome}\",reason=\"{reason}\"}} {n}"
            );
        }
        head(
            out,
            "portcullis_relay_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the relay's own certificates expire: the organisation CA, and the public certificate (tls_cert) when one is configured.",
        );
        for (which, at) in expiries {
            let _ = writeln!(
                out,
                "portcullis_relay_certificate_expiry_timestamp_seconds{{certificate=\"{which}\"}} {at}"
            );
        }
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
        let s = Sli::default();
        s.request(&finished(Some("app.internal"), 200));
        s.request(&finished(Some("app.internal"), 503));
        s.request(&finished(None, 403));
        s.handshake("https", "ok");
        s.handshake("https", "no_certificate");
        let mut out = String::new();
        s.render(&mut out, &[("ca", 42)]);
        for line in [
            "portcullis_relay_requests_total{hostname=\"app.internal\",protocol=\"h2\",method=\"read\",class=\"2xx\"} 1",
            "portcullis_relay_requests_total{hostname=\"app.internal\",protocol=\"h2\",method=\"read\",class=\"5xx\"} 1",
            "portcullis_relay_requests_total{hostname=\"-\",protocol=\"h2\",method=\"read\",class=\"4xx\"} 1",
            "portcullis_relay_response_head_seconds_count{hostname=\"app.internal\",protocol=\"h2\"} 2",
            "portcullis_relay_response_bytes_total{hostname=\"app.internal\",protocol=\"h2\"} 200",
            "portcullis_relay_refused_responses_total{status=\"503\"} 1",
            "portcullis_relay_handshakes_total{listener=\"https\",outcome=\"failed\",reason=\"no_certificate\"} 1",
            "portcullis_relay_handshakes_total{listener=\"https\",outcome=\"ok\",reason=\"ok\"} 1",
            "portcullis_relay_certificate_expiry_timestamp_seconds{certificate=\"ca\"} 42",
        ] {
            assert!(out.contains(line), "missing {line} in\n{out}");
        }
    }

    #[test]
    fn hostnames_beyond_the_cap_are_other() {
        let s = Sli::default();
        for i in 0..MAX_HOSTNAMES + 5 {
            s.request(&finished(Some(&format!("h{i}.internal")), 200));
        }
        assert_eq!(s.pairs.load(Ordering::Relaxed), MAX_HOSTNAMES + 1);
        assert_eq!(s.hosts.read().unwrap().len(), MAX_HOSTNAMES + 1);
        let mut out = String::new();
        s.render(&mut out, &[]);
        assert!(out.contains("hostname=\"other\""));
    }
}
