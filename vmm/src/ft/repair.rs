//! Divergence repair: a backup whose replay departs from the log (at an
//! exit, or at a digest check) does not end. It reports
//! `divergence at ...; resynchronizing`, asks its primary for the VM's whole
//! state on the same logging channel, restores it over its own, and replays
//! on from the state's exit.
//!
//! The primary answers with the re-protection transfer (live pre-copy, then
//! a short stop at an exit; [`super::join`]) on the same link, and
//! keeps its output rule meanwhile: outputs stay held until the backup
//! acknowledges a batch after the new state.
//!
//! What the backup may acknowledge while diverged: nothing. From its
//! request on it drops the batches that arrive and acknowledges none, so
//! the primary cannot release output on the strength of a diverged backup.
//! And it may not go live before the primary has reported every output up
//! to the state's exit released: those outputs were produced by the primary
//! before or during the transfer, the backup never produced them itself
//! (it restored their effects), so going live earlier would lose them. If
//! the primary dies during a resync (or before that report), the backup
//! halts with a message saying so (exit status 5): the VM is lost, but
//! nothing it showed the world is contradicted. The shared disk's
//! arbitration keeps split brain out either way.

use super::join::receive_state;
use super::{FtRole, FtState, Reason, Role};
use crate::error::RunError;
use crate::inputs::Inputs;
use crate::log_io::LogSink;
use crate::run::Vmm;
use replay::Divergence;

impl FtRole {
    /// Whether a divergence can be repaired: this VMM is a backup replaying
    /// from a live primary.
    pub(super) fn can_resync(&self, vm: &mut Vmm) -> bool {
        matches!(self.role, Role::Backup { .. })
            && vm.inputs.backup_link().is_some_and(|link| link.primary_lost().is_none())
    }

    /// Backup: repairs `divergence` by restoring the primary's whole state.
    /// Returns when the VM is at the state's exit, ready to replay on.
    pub(super) fn resync(&mut self, vm: &mut Vmm, divergence: Divergence) -> Result<(), RunError> {
        eprintln!("ftvmm: backup: {divergence}; resynchronizing");
        let halted = |why: String| {
            RunError::Halted(format!(
                "backup: the resynchronization failed ({why}); this backup's state is diverged, so it cannot go \
                 live: halting"
            ))
        };
        // The exit that diverged may still be pending in KVM (an IN whose
        // result KVM has not written): complete it, so that it cannot land
        // on the restored registers.
        vm.machine.complete_pending_io().map_err(|e| halted(e.to_string()))?;
        let (header, mem_size, at) = (vm.header.clone(), vm.machine.mem_size, vm.exits());
        let Vmm { inputs, machine, devices, .. } = vm;
        let Some(link) = inputs.backup_link() else { return Err(halted("no primary".into())) };
        link.request_resync(at);
        let restored = receive_state(link, &header, mem_size, machine, devices).map_err(|e| halted(e.to_string()))?;
        let exit = restored.exits;
        // The primary's generation of the shared disk, to claim it from.
        vm.header.disk_generation = restored.disk_generation;
        vm.adopt(restored).map_err(|e| halted(e.to_string()))?;
        // Records received before the request (up to the state's exit) are
        // covered by the state.
        if let Inputs::Replay(replayer) = &mut vm.inputs {
            replayer.skip_through(exit).map_err(|e| halted(e.to_string()))?;
        }
        // Our own outputs up to the state's exit came from a diverged (or
        // superseded) execution: the primary's, which came with the state
        // (`adopt`), replaced them.
        self.resynced_at = Some(exit);
        eprintln!("ftvmm: backup: resynchronized at exit {exit} (diverged at exit {at}); replaying in lockstep");
        Ok(())
    }

    /// Primary: if the backup asked for a resync, start sending it the
    /// whole state (the log to it pauses until the state ends; outputs stay
    /// held). Called where the current exit is fully handled.
    pub(super) fn answer_resync(&mut self, vm: &mut Vmm) -> Result<(), RunError> {
        let Some(exit) = vm.inputs.primary_link().and_then(|link| link.take_resync_request()) else { return Ok(()) };
        let Inputs::Live(live) = &mut vm.inputs else { return Ok(()) };
        let Some(mut recorder) = live.recorder.take() else { return Ok(()) };
        // What this exit logged goes out first; the restart drops it anyway.
        recorder.passed().map_err(crate::error::log_write_error)?;
        let LogSink::Primary(link) = recorder.into_sink() else { return Ok(()) };
        eprintln!(
            "ftvmm: primary: the backup diverged at exit {exit}; sending it the whole state from exit {} \
             (outputs stay held until it acknowledges again)",
            vm.exits()
        );
        self.status.metrics.divergences.inc();
        self.status.set(
            FtState::Resynchronizing,
            Reason::Divergence,
            format!("the backup diverged at exit {exit}: sending it the whole state"),
        );
        link.restart_state();
        self.start_transfer(vm, link, true)?;
        Ok(())
    }
}
