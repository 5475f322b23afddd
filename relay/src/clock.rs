//! Wall-clock time as the relay stores it: Unix seconds. The one place the relay reads the
//! system clock for certificates, tokens and the audit log (monotonic `Instant`s for
//! timeouts stay where they are used).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
