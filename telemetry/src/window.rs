//! Recent-history helpers for `/status`, each in bounded memory:
//! [`LatencyWindow`], latency quantiles over the last minute, and
//! [`RateWindow`], the per-second rate of a counter over the last few
//! seconds.
//!
//! Neither locks: the owner wraps one in a `Mutex` when two threads use it
//! (the one that records, and the metrics server's, which reads).

use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The largest latency a [`LatencyWindow`] tells apart, in microseconds;
/// longer ones are counted as this.
pub const MAX_LATENCY_US: u64 = 60_000_000;
/// Significant decimal digits of a [`LatencyWindow`]'s quantiles (2: within
/// 1%).
const SIGNIFICANT_DIGITS: u8 = 2;

/// Latencies of the last [`LatencyWindow::window`], as quantiles.
///
/// A ring of `slots` histograms, each covering `window / slots` of time:
/// a latency goes into the slot of the moment it is recorded, a slot older
/// than the window is cleared before it is reused, and a summary merges the
/// slots still inside the window. So the summary covers between `window -
/// window / slots` and `window` of history, and memory is `slots`
/// histograms of about 20 KiB each (1 us to [`MAX_LATENCY_US`] at 1%),
/// whatever the rate. Recording is a few nanoseconds; a summary costs a
/// merge of the slots (microseconds).
///
/// ```
/// use std::time::Duration;
/// let mut commits = telemetry::LatencyWindow::last_minute();
/// commits.record(Duration::from_micros(250));
/// let summary = commits.summary();
/// assert_eq!(summary.count, 1);
/// assert!(summary.p50 >= Duration::from_micros(248) && summary.p50 <= Duration::from_micros(252));
/// ```
pub struct LatencyWindow {
    slot: Duration,
    origin: Instant,
    slots: Vec<Slot>,
}

struct Slot {
    /// Which slot-length interval since `origin` it holds; `None`: unused.
    index: Option<u64>,
    histogram: Histogram<u64>,
}

/// What a [`LatencyWindow`] holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowSummary {
    /// Latencies recorded in the window.
    pub count: u64,
    /// The median (zero when `count` is 0).
    pub p50: Duration,
    /// The 99th percentile (zero when `count` is 0).
    pub p99: Duration,
    /// The largest (zero when `count` is 0).
    pub max: Duration,
    /// The window's length.
    pub window: Duration,
}

impl WindowSummary {
    /// The summary as the `commit_latency` object of `/status` (see the
    /// crate doc): `count` and `window_seconds` always, the quantiles only
    /// when something was recorded.
    pub fn to_json(&self) -> serde_json::Value {
        let mut object = serde_json::json!({ "count": self.count, "window_seconds": self.window.as_secs_f64() });
        if self.count > 0 {
            object["p50_seconds"] = self.p50.as_secs_f64().into();
            object["p99_seconds"] = self.p99.as_secs_f64().into();
            object["max_seconds"] = self.max.as_secs_f64().into();
        }
        object
    }
}

impl LatencyWindow {
    /// The last 60 s, in 12 slots of 5 s: the summary covers 55 to 60 s.
    pub fn last_minute() -> Self {
        Self::new(Duration::from_secs(60), 12)
    }

    /// The last `window` (at least 1 ms), in `slots` slots (1 to 600).
    pub fn new(window: Duration, slots: usize) -> Self {
        let slots = slots.clamp(1, 600);
        let window = window.max(Duration::from_millis(1));
        let slot = window / slots as u32;
        let histogram = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_DIGITS)
            .expect("constant bounds: 1 <= 60e6, 2 significant digits");
        LatencyWindow {
            slot,
            origin: Instant::now(),
            slots: (0..slots).map(|_| Slot { index: None, histogram: histogram.clone() }).collect(),
        }
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        self.slot * self.slots.len() as u32
    }

    /// Records one latency now.
    pub fn record(&mut self, latency: Duration) {
        self.record_at(latency, Instant::now());
    }

    /// Records one latency at `now` (a time before the window's creation
    /// counts as its creation).
    pub fn record_at(&mut self, latency: Duration, now: Instant) {
        let index = self.index(now);
        let len = self.slots.len() as u64;
        let slot = &mut self.slots[(index % len) as usize];
        if slot.index != Some(index) {
            slot.histogram.reset();
            slot.index = Some(index);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).clamp(1, MAX_LATENCY_US);
        slot.histogram.saturating_record(us);
    }

    /// The latencies of the window ending now.
    pub fn summary(&self) -> WindowSummary {
        self.summary_at(Instant::now())
    }

    /// The latencies of the window ending at `now`.
    pub fn summary_at(&self, now: Instant) -> WindowSummary {
        let current = self.index(now);
        let len = self.slots.len() as u64;
        let mut merged: Option<Histogram<u64>> = None;
        for slot in &self.slots {
            let Some(index) = slot.index else { continue };
            // Inside the window: one of the `len` slots ending with now's.
            if index > current || current - index >= len || slot.histogram.is_empty() {
                continue;
            }
            let into = merged.get_or_insert_with(|| Histogram::new_from(&slot.histogram));
            // Same bounds and precision: adding cannot fail.
            let _ = into.add(&slot.histogram);
        }
        let window = self.window();
        let Some(all) = merged else { return WindowSummary { window, ..WindowSummary::default() } };
        WindowSummary {
            count: all.len(),
            p50: Duration::from_micros(all.value_at_quantile(0.5)),
            p99: Duration::from_micros(all.value_at_quantile(0.99)),
            max: Duration::from_micros(all.max()),
            window,
        }
    }

    fn index(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin);
        u64::try_from(since.as_nanos() / self.slot.as_nanos().max(1)).unwrap_or(u64::MAX)
    }
}

/// The per-second rate of a growing counter (guest exits, log bytes) over
/// about the last `window`, from samples of its total.
///
/// Feed it the counter's total whenever convenient — each `/status`
/// request, or a periodic tick — with [`RateWindow::observe`]; the rate is
/// that between the oldest sample kept and the newest. Samples closer than
/// `window / 32` to the one before the newest replace the newest rather than adding one, and those that
/// fall out of the window are dropped (all but the newest such, which
/// anchors the rate's start): at most 66 samples are kept. A total below
/// the last one (a counter that restarted) starts afresh.
///
/// ```
/// use std::time::{Duration, Instant};
/// let mut exits = telemetry::RateWindow::new(Duration::from_secs(10));
/// let t0 = Instant::now();
/// exits.observe_at(1000, t0);
/// exits.observe_at(3000, t0 + Duration::from_secs(2));
/// assert_eq!(exits.per_second(), Some(1000.0));
/// ```
pub struct RateWindow {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

/// A [`RateWindow`] keeps samples about `window / RATE_SAMPLES` apart.
const RATE_SAMPLES: u32 = 32;
/// Most samples a [`RateWindow`] keeps.
const MAX_RATE_SAMPLES: usize = 2 * RATE_SAMPLES as usize + 2;

impl RateWindow {
    /// A rate over about the last `window`.
    pub fn new(window: Duration) -> Self {
        RateWindow { window: window.max(Duration::from_millis(1)), samples: VecDeque::new() }
    }

    /// Samples the counter's `total` now.
    pub fn observe(&mut self, total: u64) {
        self.observe_at(total, Instant::now());
    }

    /// Samples the counter's `total` at `now`.
    pub fn observe_at(&mut self, total: u64, now: Instant) {
        if let Some(&(at, last)) = self.samples.back() {
            if total < last || now < at {
                self.samples.clear();
            }
        }
        // The newest sample moves with each observation until it is
        // `spacing` past the one before it; then it stays, and a new one
        // starts.
        let spacing = self.window / RATE_SAMPLES;
        let len = self.samples.len();
        let close = len >= 2 && now.saturating_duration_since(self.samples[len - 2].0) < spacing;
        match self.samples.back_mut() {
            Some(newest) if close => *newest = (now, total),
            _ => self.samples.push_back((now, total)),
        }
        let start = now.checked_sub(self.window);
        while self.samples.len() > 2 && start.is_some_and(|start| self.samples[1].0 <= start) {
            self.samples.pop_front();
        }
        // Every other sample is `spacing` apart, so a window holds at most
        // 2 * RATE_SAMPLES; this bound only acts on a clock that jumped.
        while self.samples.len() > MAX_RATE_SAMPLES {
            self.samples.pop_front();
        }
    }

    /// Per second, between the oldest sample kept and the newest; `None`
    /// until two samples some time apart.
    pub fn per_second(&self) -> Option<f64> {
        let (&(t0, n0), &(t1, n1)) = (self.samples.front()?, self.samples.back()?);
        let dt = t1.saturating_duration_since(t0).as_secs_f64();
        (dt > 0.0).then(|| (n1 - n0) as f64 / dt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn near(got: Duration, want: Duration) -> bool {
        let (g, w) = (got.as_secs_f64(), want.as_secs_f64());
        (g - w).abs() <= w * 0.01 + 1e-6
    }

    #[test]
    fn quantiles_of_what_was_recorded() {
        let mut w = LatencyWindow::last_minute();
        let t0 = w.origin;
        assert_eq!(w.summary_at(t0), WindowSummary { window: Duration::from_secs(60), ..Default::default() });
        for i in 1..=1000u64 {
            w.record_at(Duration::from_micros(i * 10), t0 + ms(i));
        }
        let s = w.summary_at(t0 + Duration::from_secs(2));
        assert_eq!(s.count, 1000);
        assert!(near(s.p50, Duration::from_micros(5000)), "{s:?}");
        assert!(near(s.p99, Duration::from_micros(9900)), "{s:?}");
        assert!(near(s.max, Duration::from_micros(10_000)), "{s:?}");
    }

    #[test]
    fn forgets_what_left_the_window() {
        let mut w = LatencyWindow::new(Duration::from_secs(60), 12);
        let t0 = w.origin;
        // A slow minute, then a fast one.
        for s in 0..60 {
            w.record_at(ms(100), t0 + Duration::from_secs(s));
        }
        for s in 60..120 {
            w.record_at(ms(1), t0 + Duration::from_secs(s));
        }
        let s = w.summary_at(t0 + Duration::from_secs(120));
        assert_eq!(s.count, 55, "the slot of 120..125 s is the current one (empty), that of 60..65 s just left");
        assert!(near(s.p99, ms(1)), "{s:?}");
        // Halfway: both.
        let mut w = LatencyWindow::new(Duration::from_secs(60), 12);
        let t0 = w.origin;
        for s in 0..90 {
            w.record_at(if s < 60 { ms(100) } else { ms(1) }, t0 + Duration::from_secs(s));
        }
        let s = w.summary_at(t0 + Duration::from_secs(89));
        assert_eq!(s.count, 60);
        assert!(near(s.p50, ms(1)) || near(s.p50, ms(100)), "{s:?}");
        assert!(near(s.max, ms(100)), "{s:?}");
        // Long idle: nothing left, even though the slots are not reused.
        assert_eq!(w.summary_at(t0 + Duration::from_secs(3600)).count, 0);
    }

    #[test]
    fn clamps_extremes_and_the_past() {
        let mut w = LatencyWindow::new(Duration::from_secs(1), 4);
        let t0 = w.origin;
        w.record_at(Duration::ZERO, t0);
        w.record_at(Duration::from_secs(3600), t0);
        // Before the window's creation: counted as its start.
        w.record_at(ms(5), t0.checked_sub(ms(10)).unwrap_or(t0));
        let s = w.summary_at(t0);
        assert_eq!(s.count, 3);
        assert!(near(s.max, Duration::from_micros(MAX_LATENCY_US)), "{s:?}");
        assert_eq!(s.window, Duration::from_secs(1));
        let json = s.to_json();
        assert_eq!(json["count"], 3);
        assert!(json["p99_seconds"].as_f64().is_some());
        let empty = WindowSummary { window: Duration::from_secs(60), ..Default::default() }.to_json();
        assert_eq!(empty, serde_json::json!({"count": 0, "window_seconds": 60.0}));
    }

    #[test]
    fn rates_over_the_window() {
        let mut r = RateWindow::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.per_second(), None);
        r.observe_at(0, t0);
        assert_eq!(r.per_second(), None);
        // 100/s for 30 s, sampled every 100 ms: bounded samples, and the
        // rate is over about the last 10 s.
        for i in 1..=300u64 {
            r.observe_at(i * 10, t0 + ms(i * 100));
        }
        assert!(r.samples.len() <= MAX_RATE_SAMPLES, "{}", r.samples.len());
        let span = r.samples.back().unwrap().0 - r.samples.front().unwrap().0;
        assert!(span >= Duration::from_secs(10) && span <= Duration::from_secs(11), "{span:?}");
        assert!((r.per_second().unwrap() - 100.0).abs() < 1e-6);
        // Then 1000/s for 20 s: the old rate is gone.
        for i in 1..=200u64 {
            r.observe_at(3000 + i * 100, t0 + Duration::from_secs(30) + ms(i * 100));
        }
        assert!((r.per_second().unwrap() - 1000.0).abs() < 1e-6);
        // A restarted counter starts afresh.
        r.observe_at(5, t0 + Duration::from_secs(51));
        assert_eq!(r.per_second(), None);
    }
}
