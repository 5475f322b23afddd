//! Wall-clock time as the relay stores it: Unix seconds. The one place the relay reads the
//! system clock for certificates, tokens and the audit log (monotonic `Instant`s for
//! timeouts stay where they are used).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Unix seconds as RFC 3339 (`2026-12-07T23:00:00Z`), for people: tables, audit details,
/// messages. Times before the epoch show as the epoch.
pub(crate) fn rfc3339(at: i64) -> String {
    humantime::format_rfc3339_seconds(
        UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0)),
    )
    .to_string()
}
