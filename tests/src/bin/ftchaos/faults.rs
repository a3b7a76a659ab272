//! The faults: their kinds and names, and the helpers that time and signal
//! them (the scenario injects them).

use rand::rngs::StdRng;
use rand::Rng;
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Fault {
    KillPrimary,
    KillBackup,
    FreezePrimary,
    FreezeBackup,
    CutLogging,
    RestartFtdisk,
    CutStorage,
    CutLink,
    SlowStorage,
    /// Injected at a re-protection, not drawn with the others.
    KillAfterJoin,
}

impl Fault {
    /// The faults drawn at random between settled states.
    pub(crate) const ALL: [Fault; 9] = [
        Fault::KillPrimary,
        Fault::KillBackup,
        Fault::FreezePrimary,
        Fault::FreezeBackup,
        Fault::CutLogging,
        Fault::RestartFtdisk,
        Fault::CutStorage,
        Fault::CutLink,
        Fault::SlowStorage,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill-primary",
            Fault::KillBackup => "kill-backup",
            Fault::FreezePrimary => "freeze-primary",
            Fault::FreezeBackup => "freeze-backup",
            Fault::CutLogging => "cut-logging",
            Fault::RestartFtdisk => "restart-ftdisk",
            Fault::CutStorage => "cut-storage",
            Fault::CutLink => "cut-link",
            Fault::SlowStorage => "slow-storage",
            Fault::KillAfterJoin => "kill-after-join",
        }
    }

    pub(crate) fn is_storage(self) -> bool {
        matches!(self, Fault::RestartFtdisk | Fault::CutStorage | Fault::SlowStorage)
    }

    pub(crate) fn is_kill(self) -> bool {
        matches!(self, Fault::KillPrimary | Fault::KillBackup | Fault::KillAfterJoin)
    }
}

pub(crate) fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// A duration around the heartbeat timeout: shorter about a third of the time.
pub(crate) fn around_heartbeat(rng: &mut StdRng, hb: u64, max_ms: u64) -> Duration {
    if rng.gen_bool(0.3) {
        Duration::from_millis(rng.gen_range(20..hb.max(21)) / 2 + 10)
    } else {
        Duration::from_millis(rng.gen_range(hb * 3 / 2..max_ms))
    }
}
