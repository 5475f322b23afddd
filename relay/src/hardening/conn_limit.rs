//! Caps on a listener's open connections: a global count and a count per client address,
//! taken when a connection arrives, before any handshake work, and given back when its
//! [`ConnGuard`] drops. Also [`Pending`], the count of QUIC handshakes in progress from
//! addresses not yet validated, which decides when new ones must answer a Retry first.
//! Owns no IO and reads no clock; the listeners do the refusing.
//!
//! An IPv4 client is its address; an IPv6 client controls at least a /64, which counts as
//! one address, and often a whole /48: once the listener is half full, a /48 together
//! gets no more than one address's places, so a stranger cannot spread over the 65,536
//! /64s of one site. IPv4-mapped IPv6 addresses (a dual-stack socket) count as IPv4. The
//! tables of counts hold only addresses with a connection open, so they are never larger
//! than the global cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The listener holds `max_connections`.
    Global,
    /// This address (or its /64) holds `max_connections_per_address` on the listener.
    Address,
}

impl Refusal {
    /// The `reason` label in metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Global => "max_connections",
            Self::Address => "max_connections_per_address",
        }
    }
}

/// One listener's connection counts; see the module header.
#[derive(Debug)]
pub(crate) struct ConnLimit {
    max: usize,
    per_address: usize,
    inner: Mutex<Inner>,
    /// Mirrors the open count for metrics.
    gauge: Arc<AtomicI64>,
}

#[derive(Debug, Default)]
struct Inner {
    open: usize,
    by_address: HashMap<AddressKey, usize>,
    /// Open connections per IPv6 /48.
    by_site: HashMap<u64, usize>,
}

/// What one client address counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4(u32),
    /// The upper 64 bits.
    V6(u64),
}

impl AddressKey {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => Self::V6((u128::from(v6) >> 64) as u64),
        }
    }

    /// The /48 an IPv6 key is in.
    fn site(self) -> Option<u64> {
        match self {
            Self::V4(_) => None,
            Self::V6(net) => Some(net >> 16),
        }
    }
}

impl ConnLimit {
    /// At most `max` connections, and `per_address` from one address; the open count is
    /// kept in `gauge` as well.
    pub(crate) fn new(max: usize, per_address: usize, gauge: Arc<AtomicI64>) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_address,
            inner: Mutex::default(),
            gauge,
        })
    }

    /// Counts a new connection from `ip`, or says why it must be refused. The place is
    /// held until the guard drops.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refusal> {
        let key = AddressKey::of(ip);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.open >= self.max {
            return Err(Refusal::Global);
        }
        let under_pressure = inner.open >= self.max / 2;
        if let Some(site) = key.site()
            && under_pressure
            && inner.by_site.get(&site).copied().unwrap_or(0) >= self.per_address
        {
            return Err(Refusal::Address);
        }
        let count = inner.by_address.entry(key).or_insert(0);
        if *count >= self.per_address {
            return Err(Refusal::Address);
        }
        *count += 1;
        if let Some(site) = key.site() {
            *inner.by_site.entry(site).or_insert(0) += 1;
        }
        inner.open += 1;
        self.gauge.fetch_add(1, Ordering::Relaxed);
        Ok(ConnGuard {
            limit: self.clone(),
            key,
        })
    }

    /// Connections open (or in their handshake) now.
    pub(crate) fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).open
    }

    fn release(&self, key: AddressKey) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.open = inner.open.saturating_sub(1);
        self.gauge.fetch_sub(1, Ordering::Relaxed);
        if let Some(count) = inner.by_address.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                inner.by_address.remove(&key);
            }
        }
        if let Some(site) = key.site()
            && let Some(count) = inner.by_site.get_mut(&site)
        {
            *count -= 1;
            if *count == 0 {
                inner.by_site.remove(&site);
            }
        }
    }
}

/// One connection's place in its listener's counts, given back on drop.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    limit: Arc<ConnLimit>,
    key: AddressKey,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.limit.release(self.key);
    }
}

/// QUIC handshakes in progress from addresses the relay has not validated: the ones a
/// flood of spoofed packets can create, each holding handshake state until it times out.
#[derive(Debug, Default)]
pub(crate) struct Pending(Arc<AtomicUsize>);

impl Pending {
    /// How many are in progress.
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Whether a new handshake must first answer a Retry (proving it receives packets at
    /// its address): its address is unvalidated and `threshold` such handshakes are
    /// already in progress.
    pub(crate) fn must_retry(&self, validated: bool, threshold: usize) -> bool {
        !validated && self.count() >= threshold
    }

    /// Counts one handshake in progress until the guard drops.
    pub(crate) fn enter(&self) -> PendingGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        PendingGuard(self.0.clone())
    }
}

/// One unvalidated handshake in progress.
#[derive(Debug)]
pub(crate) struct PendingGuard(Arc<AtomicUsize>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn the_address_cap_refuses_the_next_connection_and_a_drop_gives_the_place_back() {
        let limit = ConnLimit::new(100, 2, Arc::default());
        let a = limit.try_acquire(v4(1)).unwrap();
        let _b = limit.try_acquire(v4(1)).unwrap();
        assert_eq!(limit.try_acquire(v4(1)).unwrap_err(), Refusal::Address);
        // Another address is unaffected.
        let _c = limit.try_acquire(v4(2)).unwrap();
        assert_eq!(limit.open(), 3);
        drop(a);
        assert_eq!(limit.open(), 2);
        assert_eq!(limit.gauge.load(Ordering::Relaxed), 2);
        let _d = limit.try_acquire(v4(1)).unwrap();
    }

    #[test]
    fn the_global_cap_refuses_everyone_until_a_connection_ends() {
        let limit = ConnLimit::new(3, 2, Arc::default());
        let held: Vec<_> = (1..=3).map(|n| limit.try_acquire(v4(n)).unwrap()).collect();
        assert_eq!(limit.try_acquire(v4(9)).unwrap_err(), Refusal::Global);
        drop(held);
        assert_eq!(limit.open(), 0);
        assert!(limit.inner.lock().unwrap().by_address.is_empty());
        let _e = limit.try_acquire(v4(9)).unwrap();
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let limit = ConnLimit::new(100, 2, Arc::default());
        let host =
            |net: u16, iid: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, net, 0, 0, 0, iid));
        let _a = limit.try_acquire(host(1, 1)).unwrap();
        let _b = limit.try_acquire(host(1, 2)).unwrap();
        assert_eq!(limit.try_acquire(host(1, 3)).unwrap_err(), Refusal::Address);
        let _c = limit.try_acquire(host(2, 1)).unwrap();
        // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d: each is its own
        // address, not one /64 shared by every IPv4 client.
        let mapped = |last: u8| IpAddr::V6(Ipv4Addr::new(192, 0, 2, last).to_ipv6_mapped());
        let _d = limit.try_acquire(mapped(1)).unwrap();
        let _e = limit.try_acquire(v4(1)).unwrap();
        assert_eq!(limit.try_acquire(mapped(1)).unwrap_err(), Refusal::Address);
        let _f = limit.try_acquire(mapped(2)).unwrap();
    }

    #[test]
    fn under_pressure_an_ipv6_48_together_gets_one_addresss_places() {
        let limit = ConnLimit::new(20, 4, Arc::default());
        let host =
            |net: u16, iid: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 7, net, 0, 0, 0, iid));
        // Below half the cap, each /64 of a /48 has its own places.
        let mut held: Vec<_> = (1..=3)
            .flat_map(|net| (1..=3).map(move |iid| (net, iid)))
            .map(|(net, iid)| limit.try_acquire(host(net, iid)).unwrap())
            .collect();
        held.push(limit.try_acquire(v4(1)).unwrap());
        assert_eq!(limit.open(), 10);
        // From half full, the /48 (already over an address's 4 places) gets no more,
        // whichever /64 asks; other addresses still do.
        assert_eq!(limit.try_acquire(host(9, 1)).unwrap_err(), Refusal::Address);
        held.push(limit.try_acquire(v4(2)).unwrap());
        let other_site = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 8, 1, 0, 0, 0, 1));
        held.push(limit.try_acquire(other_site).unwrap());
        // Places given back are counted out of the /48 too.
        held.retain(|_| false);
        assert_eq!(limit.open(), 0);
        assert!(limit.try_acquire(host(9, 1)).is_ok());
    }

    #[test]
    fn retry_is_asked_of_unvalidated_addresses_once_the_threshold_is_reached() {
        let pending = Pending::default();
        assert!(!pending.must_retry(false, 2));
        let a = pending.enter();
        let _b = pending.enter();
        assert!(pending.must_retry(false, 2));
        // An address that answered a Retry is never asked again.
        assert!(!pending.must_retry(true, 2));
        drop(a);
        assert!(!pending.must_retry(false, 2));
        // Threshold 0: always.
        assert!(Pending::default().must_retry(false, 0));
    }
}
