//! The FT state an operator watches: one state machine with reasons
//! (VMware FT's names: not configured, starting, protected, needs secondary
//! with why, ...), every transition said once on stderr with the time and
//! the reason, and mirrored in the metrics. Shared ([`FtStatus`] is read by
//! the metrics server's thread while the vCPU thread and the joiner write
//! it).

use crate::metrics::VmMetrics;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Where the VM stands, for fault tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FtState {
    /// No fault tolerance: a plain run, a recording, a replay.
    NotConfigured,
    /// A primary transferring its state to a backup that joins (or
    /// waiting at boot for its first backup).
    Starting,
    /// A primary in lockstep with its backup: it survives its host's death.
    Protected,
    /// Running without a backup (see the reason).
    NeedsSecondary,
    /// A backup is being repaired by a full state transfer.
    Resynchronizing,
    /// A backup whose primary is gone: arbitrating and taking over.
    GoingLive,
    /// Stopped on purpose (lost the arbitration, or cannot go live safely).
    Halted,
    /// A backup replaying its primary's log in lockstep.
    Replaying,
    /// A backup receiving a running primary's state.
    Joining,
}

/// The states' names, in [`FtState::ALL`]'s order (the metrics' list).
pub const STATE_NAMES: [&str; 9] = [
    "not_configured",
    "starting",
    "protected",
    "needs_secondary",
    "resynchronizing",
    "going_live",
    "halted",
    "replaying",
    "joining",
];

/// The reasons' names, in [`Reason::ALL`]'s order.
pub const REASON_NAMES: [&str; 12] = [
    "none",
    "initializing",
    "backup_attached",
    "backup_joined",
    "resynchronized",
    "lost_connection",
    "divergence",
    "divergence_halted",
    "went_live",
    "backup_refused",
    "lost_arbitration",
    "primary_lost",
];

impl FtState {
    pub const ALL: [FtState; 9] = [
        FtState::NotConfigured,
        FtState::Starting,
        FtState::Protected,
        FtState::NeedsSecondary,
        FtState::Resynchronizing,
        FtState::GoingLive,
        FtState::Halted,
        FtState::Replaying,
        FtState::Joining,
    ];

    /// Its name in metrics and `/status` (snake case).
    pub fn name(self) -> &'static str {
        match self {
            FtState::NotConfigured => "not_configured",
            FtState::Starting => "starting",
            FtState::Protected => "protected",
            FtState::NeedsSecondary => "needs_secondary",
            FtState::Resynchronizing => "resynchronizing",
            FtState::GoingLive => "going_live",
            FtState::Halted => "halted",
            FtState::Replaying => "replaying",
            FtState::Joining => "joining",
        }
    }

    /// Whether the VM survives its current host's death in this state.
    pub fn protected(self) -> bool {
        matches!(self, FtState::Protected | FtState::Replaying)
    }
}

/// Why the VM entered its state: a fixed set (a metrics label), with a
/// free one-line detail beside it in `/status` and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Nothing to say (not configured).
    None,
    /// A primary that booted without a backup (or waits for its first).
    Initializing,
    /// The backup attached at boot.
    BackupAttached,
    /// A backup joined the running VM and acknowledged its state.
    BackupJoined,
    /// The peer's connection was lost (heartbeats stopped, or it closed).
    LostConnection,
    /// The diverged backup was repaired.
    Resynchronized,
    /// The backup diverged: it is being resynchronized.
    Divergence,
    /// The backup could not repair a divergence (or cannot go live safely
    /// after one).
    DivergenceHalted,
    /// This VMM was the backup and went live.
    WentLive,
    /// A backup that tried to join was refused (a stranger or mismatched).
    BackupRefused,
    /// The other side won the go-live arbitration.
    LostArbitration,
    /// The primary is gone (a backup going live).
    PrimaryLost,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::None,
        Reason::Initializing,
        Reason::BackupAttached,
        Reason::BackupJoined,
        Reason::Resynchronized,
        Reason::LostConnection,
        Reason::Divergence,
        Reason::DivergenceHalted,
        Reason::WentLive,
        Reason::BackupRefused,
        Reason::LostArbitration,
        Reason::PrimaryLost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::None => "none",
            Reason::Initializing => "initializing",
            Reason::BackupAttached => "backup_attached",
            Reason::BackupJoined => "backup_joined",
            Reason::Resynchronized => "resynchronized",
            Reason::LostConnection => "lost_connection",
            Reason::Divergence => "divergence",
            Reason::DivergenceHalted => "divergence_halted",
            Reason::WentLive => "went_live",
            Reason::BackupRefused => "backup_refused",
            Reason::LostArbitration => "lost_arbitration",
            Reason::PrimaryLost => "primary_lost",
        }
    }
}

/// The current state, its reason and since when.
#[derive(Debug, Clone)]
pub struct Current {
    /// `primary`, `backup` or `solo` (a backup that went live is `solo`,
    /// then `primary` once it accepts backups).
    pub role: &'static str,
    pub state: FtState,
    pub reason: Reason,
    /// One line: what happened, for a person.
    pub detail: String,
    pub since: SystemTime,
    pub since_instant: Instant,
    /// The peer's address, if there is one.
    pub peer: Option<String>,
    /// The last failover: when, and why.
    pub last_failover: Option<(SystemTime, String)>,
}

/// The VM's FT state, shared with whoever watches it.
#[derive(Debug)]
pub struct FtStatus {
    current: Mutex<Current>,
    /// Where the state is mirrored, and what happened is counted.
    pub metrics: Arc<VmMetrics>,
}

impl FtStatus {
    /// A VMM that starts as `role` (`primary`, `backup`, `solo`), in
    /// `state` for `reason`, mirrored in `metrics`.
    pub fn new(role: &'static str, state: FtState, reason: Reason, detail: &str, metrics: Arc<VmMetrics>) -> FtStatus {
        let status = FtStatus {
            metrics,
            current: Mutex::new(Current {
                role,
                state,
                reason,
                detail: detail.to_string(),
                since: SystemTime::now(),
                since_instant: Instant::now(),
                peer: None,
                last_failover: None,
            }),
        };
        status.mirror(&status.current());
        if state != FtState::NotConfigured {
            status.say(role, state, reason, detail);
        }
        status
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state now.
    pub fn current(&self) -> Current {
        self.lock().clone()
    }

    pub fn state(&self) -> FtState {
        self.lock().state
    }

    /// Enters `state` for `reason` (said once; a repeat of the current state
    /// and reason only updates the detail).
    pub fn set(&self, state: FtState, reason: Reason, detail: impl Into<String>) {
        let detail = detail.into();
        let (role, now) = {
            let mut c = self.lock();
            if c.state == state && c.reason == reason {
                c.detail = detail;
                return;
            }
            c.state = state;
            c.reason = reason;
            c.detail.clone_from(&detail);
            c.since = SystemTime::now();
            c.since_instant = Instant::now();
            if reason == Reason::WentLive {
                c.last_failover = Some((c.since, detail.clone()));
            }
            (c.role, c.clone())
        };
        self.mirror(&now);
        self.say(role, state, reason, &detail);
    }

    /// What this VMM is now: `primary`, `backup` or `solo`.
    pub fn set_role(&self, role: &'static str) {
        self.lock().role = role;
    }

    /// The state in the metrics.
    fn mirror(&self, c: &Current) {
        self.metrics.ft_state.set(c.state.name());
        self.metrics.ft_reason.set(c.reason.name());
        self.metrics.ft_state_since.set(c.since.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
        self.metrics.protected.set(i64::from(c.state.protected()));
    }

    /// The peer's address (None: no peer).
    pub fn set_peer(&self, peer: Option<String>) {
        self.lock().peer = peer;
    }

    fn say(&self, role: &str, state: FtState, reason: Reason, detail: &str) {
        let at = humantime::format_rfc3339_millis(SystemTime::now());
        eprintln!("ftvmm: {role}: FT state {} ({}) at {at}: {detail}", state.name(), reason.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_lists_follow_the_enums() {
        assert_eq!(FtState::ALL.map(FtState::name), STATE_NAMES);
        assert_eq!(Reason::ALL.map(Reason::name), REASON_NAMES);
    }

    #[test]
    fn a_transition_is_mirrored_in_the_metrics_once() {
        let (metrics, _) = VmMetrics::new(&STATE_NAMES, &REASON_NAMES);
        let status = FtStatus::new("primary", FtState::NeedsSecondary, Reason::Initializing, "booted", metrics.clone());
        assert_eq!(metrics.ft_state.get(), "needs_secondary");
        assert_eq!(metrics.protected.get(), 0);
        status.set(FtState::Protected, Reason::BackupJoined, "joined at exit 5");
        assert_eq!((metrics.ft_state.get(), metrics.ft_reason.get()), ("protected", "backup_joined"));
        assert_eq!(metrics.protected.get(), 1);
        let since = status.current().since_instant;
        status.set(FtState::Protected, Reason::BackupJoined, "still");
        assert_eq!(status.current().since_instant, since, "a repeat is no transition");
        assert_eq!(status.current().detail, "still");
        status.set(FtState::NeedsSecondary, Reason::WentLive, "went live at exit 9");
        assert!(status.current().last_failover.is_some());
    }
}
