//! The enrolment rate limiter, fair under a flood from many addresses and bounded in
//! memory whatever it sees. Owns no IO and reads no clock: the enrolment listener passes
//! the time in.
//!
//! - Every attempt is counted against its address in a fixed-size count-min sketch (two
//!   [`DEPTH`] rows of counters indexed by keyed hashes, reset each window): no table that strangers
//!   can fill, so an address never seen before is never refused for want of room, and
//!   memory stays at [`WIDTH`] counters per row however many addresses there are. A
//!   collision can only over-count, and the keys are hashed with a per-process random key,
//!   so a stranger cannot aim collisions at someone else's address.
//! - An IPv6 client controls at least a /64, which counts as one address; under pressure
//!   (the global bucket below half) it counts by /48, so a stranger cannot spread a flood
//!   over the 65,536 /64s of one site.
//! - A global token bucket beside the per-address counts bounds the enrolment work the
//!   relay does overall (each one costs a signature and store writes).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Enrolment attempts allowed per client address per window.
pub(crate) const ATTEMPTS: u16 = 10;
/// The per-address counting window.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Counters per sketch row.
pub(crate) const WIDTH: usize = 1 << 17;
/// Sketch rows: with 20,000 addresses each past its limit in one window, a newcomer is
/// over-counted into a refusal with a probability of about 0.3 %.
const DEPTH: usize = 3;
/// Enrolment attempts the relay takes in a burst, from all addresses together.
pub(crate) const GLOBAL_BURST: f64 = 200.0;
/// Attempts per second the global bucket refills with.
pub(crate) const GLOBAL_RATE: f64 = 20.0;

/// Why an attempt was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// This address (or its /64, or /48 under pressure) used its attempts for the window.
    Address,
    /// The relay takes no more enrolment attempts from anyone just now.
    Global,
}

/// Counts enrolment attempts; see the module header.
#[derive(Debug)]
pub(crate) struct RateLimit {
    hashers: [RandomState; DEPTH],
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    rows: [Box<[u16]>; DEPTH],
    window_start: Option<Instant>,
    tokens: f64,
    refilled: Option<Instant>,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            hashers: std::array::from_fn(|_| RandomState::new()),
            inner: Mutex::new(Inner {
                rows: std::array::from_fn(|_| vec![0; WIDTH].into()),
                window_start: None,
                tokens: GLOBAL_BURST,
                refilled: None,
            }),
        }
    }
}

impl RateLimit {
    /// Counts one attempt from `ip` at `now`, and says whether it may go ahead.
    pub(crate) fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        self.check_with(now, |under_pressure| address_key(ip, under_pressure))
    }

    /// Counts one attempt by the enrolled identity `id` (a renewal) at `now`, and says
    /// whether it may go ahead: each identity gets [`ATTEMPTS`] per window, whatever
    /// address it comes from.
    pub(crate) fn check_identity(&self, id: &str, now: Instant) -> Result<(), Refusal> {
        self.check_with(now, |_| id)
    }

    fn check_with<K: std::hash::Hash>(
        &self,
        now: Instant,
        key: impl FnOnce(bool) -> K,
    ) -> Result<(), Refusal> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.refill(now);
        if inner
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            for row in &mut inner.rows {
                row.fill(0);
            }
            inner.window_start = Some(now);
        }
        let under_pressure = inner.tokens < GLOBAL_BURST / 2.0;
        let key = key(under_pressure);
        let slots = self
            .hashers
            .each_ref()
            .map(|h| h.hash_one(&key) as usize % WIDTH);
        // Every attempt is counted, allowed or not, so a refused address stays refused.
        let mut count = u16::MAX;
        for (row, slot) in inner.rows.iter_mut().zip(slots) {
            row[slot] = row[slot].saturating_add(1);
            count = count.min(row[slot]);
        }
        if count > ATTEMPTS {
            return Err(Refusal::Address);
        }
        if inner.tokens < 1.0 {
            return Err(Refusal::Global);
        }
        inner.tokens -= 1.0;
        Ok(())
    }
}

impl Inner {
    fn refill(&mut self, now: Instant) {
        if let Some(then) = self.refilled {
            let earned = now.saturating_duration_since(then).as_secs_f64() * GLOBAL_RATE;
            self.tokens = (self.tokens + earned).min(GLOBAL_BURST);
        }
        self.refilled = Some(now);
    }
}

/// What one address counts as: IPv4 addresses alone, IPv6 by /64, or by /48 under
/// pressure.
fn address_key(ip: IpAddr, under_pressure: bool) -> (u8, u128) {
    match ip {
        IpAddr::V4(v4) => (4, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            if under_pressure {
                (48, bits >> 80)
            } else {
                (64, bits >> 64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn an_address_gets_its_attempts_per_window_and_refusals_count() {
        let limit = RateLimit::default();
        let t0 = Instant::now();
        for _ in 0..ATTEMPTS {
            assert_eq!(limit.check(v4(1), t0), Ok(()));
        }
        assert_eq!(limit.check(v4(1), t0), Err(Refusal::Address));
        // Another address is unaffected.
        assert_eq!(limit.check(v4(2), t0), Ok(()));
        // Retrying while refused does not help; the next window does.
        assert_eq!(limit.check(v4(1), t0 + WINDOW / 2), Err(Refusal::Address));
        assert_eq!(limit.check(v4(1), t0 + WINDOW), Ok(()));
    }

    #[test]
    fn twenty_thousand_strangers_do_not_lock_out_a_legitimate_address() {
        let limit = RateLimit::default();
        let t0 = Instant::now();
        // 20,000 addresses, each past its limit, all in one window.
        for n in 0..20_000u32 {
            for _ in 0..=ATTEMPTS {
                let _ = limit.check(v4(1000 + n), t0);
            }
        }
        assert_eq!(limit.check(v4(1000), t0), Err(Refusal::Address));
        // Once the global bucket has refilled a little, a newcomer is served.
        let later = t0 + Duration::from_secs(1);
        let legit = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(limit.check(legit, later), Ok(()));
        assert_eq!(limit.check(v4(1000), later), Err(Refusal::Address));
    }

    #[test]
    fn the_global_bucket_bounds_a_burst_from_many_addresses_and_refills() {
        let limit = RateLimit::default();
        let t0 = Instant::now();
        let allowed = (0..1000u32)
            .filter(|n| limit.check(v4(*n), t0).is_ok())
            .count();
        assert_eq!(allowed, GLOBAL_BURST as usize);
        assert_eq!(limit.check(v4(5000), t0), Err(Refusal::Global));
        assert_eq!(limit.check(v4(5001), t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn an_identity_gets_its_renewals_per_window_from_any_address() {
        let limit = RateLimit::default();
        let t0 = Instant::now();
        for _ in 0..ATTEMPTS {
            assert_eq!(limit.check_identity("device:alice_laptop", t0), Ok(()));
        }
        assert_eq!(
            limit.check_identity("device:alice_laptop", t0),
            Err(Refusal::Address)
        );
        assert_eq!(limit.check_identity("device:bob_laptop", t0), Ok(()));
        assert_eq!(
            limit.check_identity("device:alice_laptop", t0 + WINDOW),
            Ok(())
        );
    }

    #[test]
    fn ipv6_counts_by_64_and_by_48_under_pressure() {
        let limit = RateLimit::default();
        let t0 = Instant::now();
        let host =
            |net: u16, iid: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x1, net, 0, 0, 0, iid));
        // One /64: every interface id counts as the same address.
        for iid in 0..ATTEMPTS {
            assert_eq!(limit.check(host(1, iid), t0), Ok(()));
        }
        assert_eq!(limit.check(host(1, 999), t0), Err(Refusal::Address));
        // Other /64s of the same /48 are separate while the relay is not under pressure.
        assert_eq!(limit.check(host(2, 1), t0), Ok(()));
        // Drain the global bucket below half from elsewhere: now the /48 is one address.
        let mut n = 0;
        while limit.inner.lock().unwrap().tokens >= GLOBAL_BURST / 2.0 {
            let _ = limit.check(v4(n), t0);
            n += 1;
        }
        let spread = (3..200u16)
            .filter(|net| limit.check(host(*net, 1), t0).is_ok())
            .count();
        assert!(spread <= usize::from(ATTEMPTS), "{spread} /64s got through");
    }
}
