//! Which refused enrolment and renewal attempts get an audit row: at most one per source
//! (an IPv4 address, an IPv6 /64) per minute, and at most [`LINES_PER_WINDOW`] in all per
//! minute, so no flood of refusals, from one address or many, grows the store by more
//! than that. Every refusal is still counted (a metric) and logged; this only decides the
//! store row. Owns no IO and reads no clock: the caller passes the time in.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window one source gets one row in.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Rows per window from all sources together.
pub(crate) const LINES_PER_WINDOW: usize = 100;

/// Why an enrolment or renewal was refused, as counted in
/// `portcullis_relay_enrolment_refusals_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The request, token id or secret is not of their shape.
    Malformed,
    /// Over the per-address, per-identity or global rate.
    RateLimited,
    /// The token is unknown, used, expired, revoked, or its secret is wrong.
    Token,
    /// The CSR, name or renewal itself was refused.
    Request,
}

impl Refused {
    /// Every reason, in metric order.
    pub(crate) const ALL: [Self; 4] = [
        Self::Malformed,
        Self::RateLimited,
        Self::Token,
        Self::Request,
    ];

    /// The metric's label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::RateLimited => "rate_limited",
            Self::Token => "token",
            Self::Request => "request",
        }
    }
}

/// What to do with one refusal's audit row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Row {
    /// Write it: the first from this source in this window.
    Write,
    /// Write it, and say that refusals past this one are not written this window: the
    /// window's last row.
    WriteLast,
    /// Counted only.
    Skip,
}

/// See the module header.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    window_start: Option<Instant>,
    /// Sources with a row this window (never more than [`LINES_PER_WINDOW`]).
    written: HashSet<(u8, u128)>,
}

impl RefusalLog {
    /// Notes one refusal from `ip` at `now`.
    pub(crate) fn note(&self, ip: IpAddr, now: Instant) -> Row {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= WINDOW)
        {
            inner.window_start = Some(now);
            inner.written.clear();
        }
        if inner.written.len() >= LINES_PER_WINDOW || !inner.written.insert(source(ip)) {
            return Row::Skip;
        }
        if inner.written.len() == LINES_PER_WINDOW {
            Row::WriteLast
        } else {
            Row::Write
        }
    }
}

/// One source: an IPv4 address, or an IPv6 /64.
fn source(ip: IpAddr) -> (u8, u128) {
    match ip {
        IpAddr::V4(v4) => (4, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (6, u128::from(v6) >> 64),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn one_row_per_source_per_window() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let a = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(log.note(a, t0), Row::Write);
        for _ in 0..1000 {
            assert_eq!(log.note(a, t0 + Duration::from_secs(30)), Row::Skip);
        }
        // Another /64 is another source; the same /64 is not.
        let v6 =
            |net: u16, iid: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, net, 0, 0, 0, iid));
        assert_eq!(log.note(v6(1, 1), t0), Row::Write);
        assert_eq!(log.note(v6(1, 2), t0), Row::Skip);
        assert_eq!(log.note(v6(2, 1), t0), Row::Write);
        // The next window writes again.
        assert_eq!(log.note(a, t0 + WINDOW), Row::Write);
    }

    #[test]
    fn many_sources_together_write_a_bounded_number_of_rows() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let rows: Vec<Row> = (0..10_000u32)
            .map(|n| log.note(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), t0))
            .collect();
        let written = rows.iter().filter(|r| **r != Row::Skip).count();
        assert_eq!(written, LINES_PER_WINDOW);
        assert_eq!(rows[LINES_PER_WINDOW - 1], Row::WriteLast);
        assert_eq!(
            log.note(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)), t0 + WINDOW),
            Row::Write
        );
    }
}
