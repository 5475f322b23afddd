//! The overload manager's decisions: from a sample of the process's resident memory and
//! its open client connections, the [`Level`] the relay runs at. New unauthenticated work
//! (handshakes, enrolment) is shed first; new requests are answered 503 only when memory
//! itself reaches its threshold; streams already open are never touched. Owns no clock
//! and no task: `ops/sampler.rs` takes the samples and the listeners and the request path
//! read the level. Reading `/proc/self/statm` ([`resident_bytes`]) is the only IO here.
//!
//! - [`Level::Shedding`] from three quarters of `overload_memory` resident, or at
//!   `overload_connections` open client connections: new handshakes are refused (QUIC) or
//!   closed before TLS (HTTPS), and enrolment requests are refused.
//! - [`Level::Critical`] at `overload_memory` resident: new requests get 503 as well.
//!   Connections alone never lead here: refusing requests frees no connection.
//!
//! A level is left only once the sample is below 90 % of what entered it, so a relay
//! hovering at a threshold does not flap.

use std::sync::atomic::{AtomicU8, Ordering};

/// How much new work the relay takes; ordered by severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Level {
    /// Everything is taken.
    Normal = 0,
    /// New handshakes and enrolment are shed.
    Shedding = 1,
    /// New requests are answered 503 as well.
    Critical = 2,
}

impl Level {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Normal,
            1 => Self::Shedding,
            _ => Self::Critical,
        }
    }
}

/// The work a shedding relay turned away, as counted in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    /// A new QUIC connection, refused before its handshake.
    QuicHandshake = 0,
    /// A new TCP connection to the HTTPS listener, closed before TLS.
    HttpsHandshake = 1,
    /// An enrolment or renewal request, refused.
    Enrolment = 2,
    /// A new request on an open connection, answered 503.
    Request = 3,
}

impl Shed {
    /// Every kind, in index order.
    pub(crate) const ALL: [Self; 4] = [
        Self::QuicHandshake,
        Self::HttpsHandshake,
        Self::Enrolment,
        Self::Request,
    ];

    /// The `work` label in metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::QuicHandshake => "quic_handshake",
            Self::HttpsHandshake => "https_handshake",
            Self::Enrolment => "enrolment",
            Self::Request => "request",
        }
    }
}

/// One look at the process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Resident memory in bytes, if the platform tells.
    pub(crate) resident: Option<u64>,
    /// Open client connections on both listeners, handshakes included.
    pub(crate) connections: usize,
}

/// Where the levels begin (`[limits] overload_memory` and `overload_connections`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Thresholds {
    pub(crate) memory: u64,
    pub(crate) connections: usize,
}

/// The percentage of its entry threshold a sample must fall below to leave a level.
const EXIT_PERCENT: u64 = 90;

impl Thresholds {
    /// The level after `sample`, coming from `current`.
    pub(crate) fn next(&self, current: Level, sample: Sample) -> Level {
        let entered = self.level_at(sample, 100);
        let kept = self.level_at(sample, EXIT_PERCENT).min(current);
        entered.max(kept)
    }

    /// The level `sample` calls for with every threshold scaled to `percent`.
    fn level_at(&self, sample: Sample, percent: u64) -> Level {
        // In whole numbers, without rounding the threshold: value >= threshold × percent.
        let reaches = |value: u64, threshold: u64| {
            value.saturating_mul(100) >= threshold.saturating_mul(percent)
        };
        let memory = sample.resident.unwrap_or(0);
        if reaches(memory, self.memory) {
            Level::Critical
        } else if reaches(memory, self.memory / 4 * 3)
            || reaches(sample.connections as u64, self.connections as u64)
        {
            Level::Shedding
        } else {
            Level::Normal
        }
    }
}

/// The level in force, shared by the sampler (which sets it) and every listener.
#[derive(Debug)]
pub(crate) struct Overload {
    thresholds: Thresholds,
    level: AtomicU8,
}

impl Overload {
    pub(crate) fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            level: AtomicU8::new(Level::Normal as u8),
        }
    }

    /// The level in force.
    pub(crate) fn level(&self) -> Level {
        Level::from_u8(self.level.load(Ordering::Relaxed))
    }

    /// Whether new handshakes and enrolment requests are shed.
    pub(crate) fn sheds_handshakes(&self) -> bool {
        self.level() >= Level::Shedding
    }

    /// Whether new requests are answered 503.
    pub(crate) fn sheds_requests(&self) -> bool {
        self.level() >= Level::Critical
    }

    /// Applies a sample; returns the level before and after it.
    pub(crate) fn update(&self, sample: Sample) -> (Level, Level) {
        let before = self.level();
        let after = self.thresholds.next(before, sample);
        self.level.store(after as u8, Ordering::Relaxed);
        (before, after)
    }
}

/// The process's resident memory in bytes, from `/proc/self/statm`; `None` where there
/// is no such file.
pub(crate) fn resident_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    parse_statm(&text, rustix::param::page_size() as u64)
}

/// Resident bytes from statm's text: its second field counts pages.
fn parse_statm(text: &str, page_size: u64) -> Option<u64> {
    let pages: u64 = text.split_ascii_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    const T: Thresholds = Thresholds {
        memory: 1000 * MIB,
        connections: 100,
    };

    fn at(mib: u64, connections: usize) -> Sample {
        Sample {
            resident: Some(mib * MIB),
            connections,
        }
    }

    #[test]
    fn unauthenticated_work_is_shed_before_requests() {
        use Level::*;
        assert_eq!(T.next(Normal, at(100, 10)), Normal);
        // Three quarters of the memory threshold: shed handshakes, keep serving requests.
        assert_eq!(T.next(Normal, at(750, 10)), Shedding);
        // The connection threshold alone never refuses requests.
        assert_eq!(T.next(Normal, at(100, 100)), Shedding);
        assert_eq!(T.next(Normal, at(100, 100_000)), Shedding);
        assert_eq!(T.next(Normal, at(1000, 10)), Critical);
        assert_eq!(T.next(Shedding, at(1200, 10)), Critical);
    }

    #[test]
    fn a_level_is_left_only_below_ninety_percent_of_its_entry() {
        use Level::*;
        // Critical, then memory falls just under the threshold: still critical.
        assert_eq!(T.next(Critical, at(950, 10)), Critical);
        // Under 90 % of it, but above the shedding point: shedding.
        assert_eq!(T.next(Critical, at(850, 10)), Shedding);
        // Shedding stays until under 90 % of three quarters (675 MiB) ...
        assert_eq!(T.next(Shedding, at(700, 10)), Shedding);
        assert_eq!(T.next(Shedding, at(600, 10)), Normal);
        // ... and of the connection threshold.
        assert_eq!(T.next(Shedding, at(100, 95)), Shedding);
        assert_eq!(T.next(Shedding, at(100, 89)), Normal);
        // Straight down when the pressure is gone.
        assert_eq!(T.next(Critical, at(100, 0)), Normal);
        // Small thresholds are not rounded down: under 90 % of 2 is under 1.8.
        let two = Thresholds {
            memory: 1000 * MIB,
            connections: 2,
        };
        assert_eq!(two.next(Shedding, at(10, 1)), Normal);
        // Without a memory figure only connections count.
        let blind = Sample {
            resident: None,
            connections: 100,
        };
        assert_eq!(T.next(Normal, blind), Shedding);
    }

    #[test]
    fn the_shared_level_follows_samples() {
        let o = Overload::new(T);
        assert!(!o.sheds_handshakes() && !o.sheds_requests());
        assert_eq!(o.update(at(1000, 0)), (Level::Normal, Level::Critical));
        assert!(o.sheds_handshakes() && o.sheds_requests());
        assert_eq!(o.update(at(800, 0)), (Level::Critical, Level::Shedding));
        assert!(o.sheds_handshakes() && !o.sheds_requests());
        assert_eq!(o.update(at(0, 0)), (Level::Shedding, Level::Normal));
    }

    #[test]
    fn statm_counts_resident_pages() {
        assert_eq!(
            parse_statm("5923 1234 456 2 0 789 0\n", 4096),
            Some(1234 * 4096)
        );
        assert_eq!(parse_statm("", 4096), None);
        assert_eq!(parse_statm("1 x", 4096), None);
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }
}
