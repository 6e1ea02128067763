//! A coarse monotonic clock for the pools' bookkeeping (connection ages
//! and idle times): one relaxed atomic load where a transaction used to
//! read the clock and subtract twice. Refreshed every
//! [`crate::bell::SWEEP_TICK`] by the proxy's sweeper, by every pool
//! maintenance pass and whenever a server connection is opened, so it lags
//! the real clock by about a tick at most; the limits it serves
//! (`server_idle_timeout`, `server_lifetime`) are seconds. May call: std.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();
static NOW_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the process first used this clock, as of the last
/// refresh.
pub fn now_ms() -> u64 {
    NOW_MS.load(Ordering::Relaxed)
}

/// Reads the real clock into the coarse one, and returns the new reading.
pub fn refresh() -> u64 {
    let ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64;
    // Several threads may refresh: the clock never goes back.
    NOW_MS.fetch_max(ms, Ordering::Relaxed).max(ms)
}

/// Time from `then` to `now`, both readings of this clock (zero if `then`
/// is later).
pub fn between(then: u64, now: u64) -> Duration {
    Duration::from_millis(now.saturating_sub(then))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_moves_only_forward_and_only_when_refreshed() {
        let a = refresh();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            now_ms() >= a,
            "a reading is never older than the last refresh"
        );
        let b = refresh();
        assert!(b >= a + 20, "refresh reads the real clock: {a} -> {b}");
        assert!(now_ms() >= b);
        assert_eq!(
            between(b, a),
            Duration::ZERO,
            "a later start is zero, not a panic"
        );
        assert_eq!(between(a, a + 1500), Duration::from_millis(1500));
    }
}
