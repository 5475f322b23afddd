//! Idle detection for client connections.
//!
//! A connection is busy while any of its requests is being served, its response body is
//! still streaming, or a tunnel opened on it (CONNECT, WebSocket) is open: each holds an
//! [`Activity`] permit for exactly that long, next to its per-device and per-connector
//! permits. A connection with no permit out and no new request for `idle_timeout` is
//! closed by its listener. Transport keep-alives (QUIC PINGs, HTTP/2 PINGs) only prove the
//! peer is there; they do not count as activity.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// What one client connection has in flight.
#[derive(Debug)]
pub(crate) struct Activity {
    slots: Arc<Semaphore>,
    begun: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            begun: AtomicU64::new(0),
        })
    }

    /// Marks a request begun; the connection stays busy until the permit is dropped.
    pub(crate) fn begin(&self) -> Option<OwnedSemaphorePermit> {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.slots.clone().try_acquire_owned().ok()
    }

    fn busy(&self) -> bool {
        self.slots.available_permits() < Semaphore::MAX_PERMITS
    }

    /// Resolves once the connection has had nothing in flight and no new request for
    /// `timeout` (measured to within a quarter of it).
    pub(crate) async fn idle(&self, timeout: Duration) {
        let tick = timeout / 4;
        let mut seen = self.begun.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(tick).await;
            let begun = self.begun.load(Ordering::Relaxed);
            if self.busy() || begun != seen {
                seen = begun;
                since = Instant::now();
            } else if since.elapsed() >= timeout {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Only lower bounds are asserted: sleeping code cannot finish early, however loaded
    // the machine is; the upper bounds only catch hangs.
    #[tokio::test]
    async fn idle_only_after_the_last_permit_is_gone_for_the_whole_timeout() {
        let a = Activity::new();
        let t = Duration::from_millis(200);
        let hang = Duration::from_secs(20);
        // Unused from the start: idle after the timeout.
        let start = Instant::now();
        tokio::time::timeout(hang, a.idle(t)).await.unwrap();
        assert!(start.elapsed() >= t);
        // A permit held for 600 ms keeps it busy; idle comes a timeout after its release
        // (less the quarter-timeout tick the release may fall in).
        let permit = a.begin();
        let start = Instant::now();
        let held = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            drop(permit);
        });
        tokio::time::timeout(hang, a.idle(t)).await.unwrap();
        held.await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(750),
            "{:?}",
            start.elapsed()
        );
        // Short requests arriving more often than the timeout keep it from idling.
        let a2 = a.clone();
        let start = Instant::now();
        let busy = tokio::spawn(async move {
            for _ in 0..10 {
                drop(a2.begin());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        tokio::time::timeout(hang, a.idle(t)).await.unwrap();
        busy.await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(1000),
            "{:?}",
            start.elapsed()
        );
    }
}
