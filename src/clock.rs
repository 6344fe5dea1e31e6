//! Wall-clock time as the store, the broker and the admin API write it:
//! Unix milliseconds.

use std::time::SystemTime;

/// Milliseconds since the unix epoch, now.
#[must_use]
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// Milliseconds since the unix epoch (0 for a time before it).
#[must_use]
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
