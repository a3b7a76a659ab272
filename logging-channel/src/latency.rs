//! Latency figures of fixed size, for `--stats`: an HDR histogram of
//! microseconds per measured hop, however long the run.

use std::time::{Duration, Instant};

/// A latency summary: (count, p50 µs, p99 µs, max µs).
pub type LatencySummary = (usize, u32, u32, u32);

/// A latency record of fixed size: an HDR histogram of microseconds, from
/// 1 µs to an hour at 3 significant digits (about 30 KiB), values beyond
/// clamped.
pub struct LatencyHistogram(hdrhistogram::Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    const MAX_US: u64 = 3_600_000_000;

    pub fn new() -> Self {
        // The bounds are constants that hdrhistogram accepts.
        let h = hdrhistogram::Histogram::new_with_bounds(1, Self::MAX_US, 3)
            .unwrap_or_else(|e| unreachable!("histogram bounds: {e}"));
        LatencyHistogram(h)
    }

    /// Records one value in µs (values beyond an hour are clamped).
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us.min(Self::MAX_US));
    }

    /// (count, p50, p99, max) in µs, or None when nothing was recorded.
    pub fn summary(&self) -> Option<LatencySummary> {
        let h = &self.0;
        if h.is_empty() {
            return None;
        }
        let us = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Some((h.len() as usize, us(h.value_at_quantile(0.5)), us(h.value_at_quantile(0.99)), us(h.max())))
    }

    /// Records the time from `from` to `to` (0 if `to` is earlier).
    pub fn record_between(&mut self, from: Instant, to: Instant) {
        self.record(micros(to.saturating_duration_since(from)));
    }
}

/// A duration in whole µs, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
