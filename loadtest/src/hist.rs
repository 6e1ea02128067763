//! Latency histograms with the percentiles the reports quote.

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies in microseconds, 1 µs to 1 h at 3 significant digits.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    h: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        LatencyHistogram {
            h: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// Records one latency (saturating at the upper bound).
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, self.h.high());
        self.h.saturating_record(us);
    }

    pub fn add(&mut self, other: &LatencyHistogram) {
        let _ = self.h.add(&other.h);
    }

    pub fn summary(&self) -> Summary {
        let us = |v: u64| Duration::from_micros(v);
        Summary {
            count: self.h.len(),
            mean: Duration::from_micros(self.h.mean() as u64),
            p50: us(self.h.value_at_quantile(0.50)),
            p99: us(self.h.value_at_quantile(0.99)),
            max: us(self.h.max()),
        }
    }
}

/// What a report prints of a histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    pub mean: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "n={} mean={:?} p50={:?} p99={:?} max={:?}",
            self.count, self.mean, self.p50, self.p99, self.max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_follow_the_recorded_values() {
        let mut h = LatencyHistogram::new();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        let near = |d: Duration, ms: u64| d.as_micros().abs_diff(u128::from(ms) * 1000) <= 1000;
        assert!(near(s.p50, 50), "{s}");
        assert!(near(s.p99, 99), "{s}");
        assert!(near(s.max, 100), "{s}");
    }

    #[test]
    fn merging_adds_counts() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_millis(3));
        a.add(&b);
        assert_eq!(a.summary().count, 2);
        assert!(a.summary().max >= Duration::from_millis(3));
    }
}
