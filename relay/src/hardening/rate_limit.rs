//! The enrolment rate limiter: attempts per client address (an IPv6 /64 counts as one)
//! per window, bounded in memory. Owns no IO; the enrolment listener asks it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Enrolment attempts allowed per client address per window.
const ATTEMPTS: u32 = 10;
const WINDOW: Duration = Duration::from_secs(60);
/// Per-address attempt counters.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl RateLimit {
    pub(crate) fn allow(&self, ip: IpAddr) -> bool {
        // An IPv6 client controls its whole /64: count it as one address.
        let ip = match ip {
            IpAddr::V6(v6) => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
            v4 => v4,
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if seen.len() > 10_000 {
            seen.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if seen.len() > 10_000 {
                // Under a flood from many addresses: refuse newcomers until the window ends.
                return seen.contains_key(&ip) && seen[&ip].1 < ATTEMPTS;
            }
        }
        let (start, count) = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= ATTEMPTS
    }
}
