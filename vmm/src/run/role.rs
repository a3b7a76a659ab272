//! What the run loop asks of the VMM's part in fault tolerance, at the
//! points where it matters: an exit passed, the log ended, a divergence, the
//! guest idling, the run ending. [`crate::ft`] answers for a primary or a
//! backup; [`Alone`] for a VM without one (a plain run, a recording, a
//! replay). The run loop knows nothing of roles beyond this trait.

use crate::error::RunError;
use crate::log_io::LogSink;
use crate::run::Vmm;
use logging_channel::LatencySummary;
use replay::{Divergence, Position};

/// What the guest does after [`RoleHooks::idling`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Resume it now, without an interrupt (a spurious wake-up: the role
    /// needs an exit boundary soon, e.g. a state transfer's final round).
    Resume,
    /// Wait for host input; `watch_peer`: wake at least every few
    /// milliseconds to keep an eye on a backup (or a joining one).
    Wait { watch_peer: bool },
}

/// The role's hooks. Each gets the VM (without its role) to act on.
pub trait RoleHooks: Send {
    /// The VMM is done with exit `position` and resumes the guest.
    fn passed(&mut self, _vm: &mut Vmm, _position: Position) -> Result<(), RunError> {
        Ok(())
    }

    /// The guest is held between exits while its disk writes not yet
    /// applied exceed their bound: do what frees room (release writes to a
    /// lost backup's storage, finish a transfer under way).
    fn holding_for_disk(&mut self, _vm: &mut Vmm, _position: Position) -> Result<(), RunError> {
        Ok(())
    }

    /// A replay ran out of log (`err`, a [`RunError::EndOfLog`] or another
    /// failure of the log). Ok: the VM carries on from here (a backup went
    /// live); Err: the run ends with it.
    fn end_of_log(&mut self, _vm: &mut Vmm, err: RunError) -> Result<(), RunError> {
        Err(err)
    }

    /// The replay diverged. Ok: repaired, the VM replays on from the state
    /// it restored; Err: the run ends.
    fn diverged(&mut self, _vm: &mut Vmm, divergence: Divergence) -> Result<(), RunError> {
        Err(RunError::Divergence(divergence))
    }

    /// The guest idles at `position` with nothing to inject.
    fn idling(&mut self, _vm: &mut Vmm, _position: Position) -> Result<Idle, RunError> {
        Ok(Idle::Wait { watch_peer: false })
    }

    /// Whether a log that ends now makes this VMM go live (a backup that
    /// can): a disk read at the log's end is then done by the VMM itself.
    fn may_go_live(&self) -> bool {
        false
    }

    /// The guest ended the VM and its log is complete, in `sink`: hand it
    /// to a backup before the VMM goes.
    fn log_complete(&mut self, _sink: LogSink) {}

    /// The output-commit latency, overall and hop by hop (a primary's).
    fn commit_stats(&self) -> (Option<LatencySummary>, Vec<(&'static str, LatencySummary)>) {
        (None, Vec::new())
    }
}

/// No fault tolerance: a plain run, a recording or a replay.
pub struct Alone;

impl RoleHooks for Alone {}
