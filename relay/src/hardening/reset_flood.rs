//! The rapid-reset guard (CVE-2023-44487 and its HTTP/3 twin): counts requests a client
//! abandoned before their response finished, and trips when there are too many.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// Counts requests a client abandoned (reset) before their response finished. A client that
/// abandons more than [`ResetFlood::LIMIT`] in [`ResetFlood::WINDOW`] is flooding (the
/// HTTP/2 "rapid reset" attack, CVE-2023-44487, and its HTTP/3 twin): the listener closes
/// its connection.
#[derive(Debug, Default)]
pub(crate) struct ResetFlood {
    window: Mutex<Option<(Instant, u32)>>,
    pub(crate) tripped: CancellationToken,
}

impl ResetFlood {
    const LIMIT: u32 = 100;
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

    fn abandoned(&self) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (start, count) = w.get_or_insert((now, 0));
        if now.duration_since(*start) > Self::WINDOW {
            *start = now;
            *count = 0;
        }
        *count += 1;
        if *count > Self::LIMIT && !self.tripped.is_cancelled() {
            tracing::warn!(
                abandoned = *count,
                "client is flooding request resets: closing its connection"
            );
            self.tripped.cancel();
        }
    }

    /// A guard to hold while a request is served; dropping it unfinished counts a reset.
    pub(crate) fn guard(self: &Arc<Self>) -> ResetGuard {
        ResetGuard {
            flood: self.clone(),
            finished: false,
        }
    }
}

pub(crate) struct ResetGuard {
    flood: Arc<ResetFlood>,
    finished: bool,
}

impl ResetGuard {
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for ResetGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.flood.abandoned();
        }
    }
}
