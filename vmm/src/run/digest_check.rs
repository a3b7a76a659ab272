//! Periodic digest checks: the recording side (a primary, or `--record`)
//! logs its full state digest every so often ([`CheckPolicy`]), and the
//! replaying side (a backup, or `--replay`) compares its own digest at the
//! same position. A divergence that exits do not reveal — a flipped byte
//! the guest has not read yet, a register the guest has not used — is then
//! caught within one check period instead of never (or at the end).
//!
//! Also the `--inject-divergence-at EXIT` testing aid, which flips a byte of
//! the replaying side's guest memory where no exit will notice it.
//!
//! What a check hashes: all of guest memory, the vCPU, the devices, the
//! virtual clock and the exit count ([`crate::digest::state_digest`]), at the
//! start of the position's input delivery, before any other input of that
//! position is applied, on both sides. Hashing all of memory needs no dirty
//! log (the dirty log belongs to state syncs and live transfers), so a check
//! is independent of them; its cost is one BLAKE3 pass over memory (see
//! docs/design.md, "Digest checks"), which the default period keeps small.

use crate::error::{log_write_error, RunError};
use crate::inputs::Inputs;
use crate::run::Vmm;
use replay::{Digest, Event, Position};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

/// When the recording side logs a digest check: every `every_ms` of guest
/// (virtual) time and/or every `every_exits` guest-caused exits since the
/// last one; 0 turns that trigger off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckPolicy {
    pub every_ms: u64,
    pub every_exits: u64,
}

impl CheckPolicy {
    /// No checks.
    pub const OFF: CheckPolicy = CheckPolicy { every_ms: 0, every_exits: 0 };

    fn due(&self, since: Position, since_ns: u64, now: Position, now_ns: u64) -> bool {
        (self.every_exits > 0 && now.exit >= since.exit + self.every_exits)
            || (self.every_ms > 0 && now_ns >= since_ns.saturating_add(self.every_ms * 1_000_000))
    }
}

/// Where the checks stand in a run.
#[derive(Debug)]
pub struct Checks {
    pub policy: CheckPolicy,
    /// The position and virtual time of the last check (or of the start).
    last: (Position, u64),
    /// Checks made (logged, or verified) so far, and the time they took.
    pub made: u64,
    pub spent_us: u64,
    /// Replaying side: flip a byte of guest memory at this exit.
    pub inject_at: Option<u64>,
}

impl Checks {
    pub fn new(policy: CheckPolicy, inject_at: Option<u64>) -> Self {
        Checks { policy, last: (Position { exit: 0, rip: 0 }, 0), made: 0, spent_us: 0, inject_at }
    }

    /// The average cost of a check in µs (for `--stats`).
    pub fn average_us(&self) -> Option<u64> {
        self.spent_us.checked_div(self.made)
    }
}

impl Vmm {
    /// Before the inputs of `position`: log a digest check if one is due
    /// (recording side), or inject the testing aid's divergence (replaying
    /// side). Checks on the replaying side come from the log, in
    /// [`Vmm::verify_digest_check`].
    pub(super) fn digest_check_point(&mut self, position: Position) -> Result<(), RunError> {
        if self.checks.inject_at == Some(position.exit) && matches!(self.inputs, Inputs::Replay(_)) {
            self.checks.inject_at = None;
            self.inject_divergence(position)?;
        }
        let Inputs::Live(live) = &self.inputs else { return Ok(()) };
        if live.recorder.is_none() {
            return Ok(());
        }
        let now_ns = self.clock.now_ns();
        let (since, since_ns) = self.checks.last;
        if !self.checks.policy.due(since, since_ns, position, now_ns) {
            return Ok(());
        }
        self.checks.last = (position, now_ns);
        let digest = self.timed_digest()?;
        if let Inputs::Live(live) = &mut self.inputs {
            live.record(Event::DigestCheck { digest }).map_err(log_write_error)?;
        }
        Ok(())
    }

    /// A logged digest check at the current position: our state must have
    /// the recording's digest.
    pub(super) fn verify_digest_check(&mut self, logged: Digest) -> Result<(), RunError> {
        let ours = self.timed_digest()?;
        if ours != logged {
            return Err(self.diverged(
                format_args!("state digest {logged} at the digest check"),
                format_args!("state digest {ours} (guest memory, vCPU or device state differ)"),
            ));
        }
        Ok(())
    }

    fn timed_digest(&mut self) -> Result<Digest, RunError> {
        let started = Instant::now();
        let digest = self.digest_now(true)?;
        self.checks.made += 1;
        self.metrics.digest_checks.inc();
        self.checks.spent_us += u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(digest)
    }

    /// The testing aid: flips the last byte of guest memory, which the
    /// embedded guests never use, so that only a digest check can notice.
    fn inject_divergence(&mut self, position: Position) -> Result<(), RunError> {
        let addr = GuestAddress(self.machine.mem_size - 1);
        let byte: u8 = self
            .machine
            .mem
            .read_obj(addr)
            .map_err(|e| RunError::Io { what: "injecting a divergence", err: std::io::Error::other(e.to_string()) })?;
        self.machine
            .mem
            .write_obj(byte ^ 0x5a, addr)
            .map_err(|e| RunError::Io { what: "injecting a divergence", err: std::io::Error::other(e.to_string()) })?;
        eprintln!("ftvmm: testing aid: flipped guest memory byte {:#x} at {position} (--inject-divergence-at)", addr.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(exit: u64) -> Position {
        Position { exit, rip: 0 }
    }

    #[test]
    fn checks_are_due_by_exits_or_by_guest_time() {
        let by_exits = CheckPolicy { every_ms: 0, every_exits: 100 };
        assert!(!by_exits.due(pos(0), 0, pos(99), u64::MAX));
        assert!(by_exits.due(pos(0), 0, pos(100), 0));
        let by_time = CheckPolicy { every_ms: 5, every_exits: 0 };
        assert!(!by_time.due(pos(0), 1_000, pos(1_000_000), 5_000_999));
        assert!(by_time.due(pos(0), 1_000, pos(1), 5_001_000));
        assert!(!CheckPolicy::OFF.due(pos(0), 0, pos(u64::MAX), u64::MAX));
    }
}
