//! The guest-visible virtual clock.
//!
//! The VMM owns time: the PIT, the CMOS RTC and the TSC all derive from one
//! value, `now_ns` (nanoseconds since boot), which moves only when the run
//! loop takes a time reading — from the host on the primary, from the log on
//! a replay — so both sides see the same time at the same positions.

use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Frequency of the virtual TSC: 1 GHz, so one tick is one virtual nanosecond.
pub const TSC_HZ: u64 = 1_000_000_000;

/// The virtual clock's state (part of the state digest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualClock {
    now_ns: u64,
    /// What the guest added to the TSC by writing IA32_TSC (wrapping).
    tsc_offset: u64,
}

impl VirtualClock {
    /// Virtual nanoseconds since boot, as of the last reading.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Takes a reading. Time never runs backwards.
    pub fn set(&mut self, ns: u64) {
        self.now_ns = self.now_ns.max(ns);
    }

    /// The TSC value at the last reading.
    pub fn tsc(&self) -> u64 {
        self.now_ns.wrapping_add(self.tsc_offset)
    }

    /// The guest wrote `value` to IA32_TSC.
    pub fn set_tsc(&mut self, value: u64) {
        self.tsc_offset = value.wrapping_sub(self.now_ns);
    }
}

/// The host time source the primary reads the virtual clock from.
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    boot: Instant,
}

impl HostClock {
    pub fn start() -> Self {
        HostClock { boot: Instant::now() }
    }

    /// A host clock that reads `ns` now: a backup going live continues the
    /// virtual time it replayed up to.
    pub fn resume_at(ns: u64) -> Self {
        let now = Instant::now();
        HostClock { boot: now.checked_sub(std::time::Duration::from_nanos(ns)).unwrap_or(now) }
    }

    /// Host nanoseconds since boot.
    pub fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.boot.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The host instant at virtual time `ns` (for waiting until a deadline).
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.boot + std::time::Duration::from_nanos(ns)
    }
}

/// Wall-clock time now, in nanoseconds since the Unix epoch.
pub fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_never_goes_back_and_tsc_follows_writes() {
        let mut c = VirtualClock::default();
        c.set(1000);
        c.set(500);
        assert_eq!(c.now_ns(), 1000);
        assert_eq!(c.tsc(), 1000);
        c.set_tsc(5);
        assert_eq!(c.tsc(), 5);
        c.set(1100);
        assert_eq!(c.tsc(), 105);
    }
}
