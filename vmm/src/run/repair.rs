//! Divergence repair: a backup whose replay departs from the log (at an
//! exit, or at a digest check) does not end. It reports
//! `divergence at ...; resynchronizing`, asks its primary for the VM's whole
//! state on the same logging channel, restores it over its own, and replays
//! on from the state's exit.
//!
//! The primary answers with the re-protection transfer (live pre-copy, then
//! a short stop at an exit; [`crate::run::join`]) on the same link, and
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

use crate::error::RunError;
use crate::ft::Role;
use crate::inputs::Inputs;
use crate::log_io::{LogSink, LogSource};
use crate::run::{check_begin, restore_state, StateIn, Vmm};
use crate::snapshot::{SnapshotError, StateReader};
use replay::Divergence;
use std::io::BufRead;

impl Vmm {
    /// Whether a divergence can be repaired: this VMM is a backup replaying
    /// from a live primary.
    pub(super) fn can_resync(&mut self) -> bool {
        if !matches!(self.role, Role::Backup { .. }) {
            return false;
        }
        match &mut self.inputs {
            Inputs::Replay(r) => matches!(r.source_mut(), LogSource::Backup(link) if link.primary_lost().is_none()),
            Inputs::Live(_) => false,
        }
    }

    /// Backup: repairs `divergence` by restoring the primary's whole state.
    /// Returns when the VM is at the state's exit, ready to replay on.
    pub(super) fn resync(&mut self, divergence: Divergence) -> Result<(), RunError> {
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
        self.machine.complete_pending_io().map_err(|e| halted(e.to_string()))?;
        let (header, mem_size, at) = (self.header.clone(), self.machine.mem_size, self.exits);
        let Vmm { inputs, machine, devices, .. } = self;
        let Inputs::Replay(replayer) = inputs else { return Err(halted("not replaying".into())) };
        let LogSource::Backup(link) = replayer.source_mut() else { return Err(halted("no primary".into())) };
        link.request_resync(at);
        let restored = (|| -> Result<_, SnapshotError> {
            let mut reader = StateReader::new(std::io::BufReader::with_capacity(1 << 20, StateIn::new(link)))?;
            check_begin(reader.next_item()?, &header, mem_size)?;
            let restored = restore_state(machine, devices, &mut reader)?;
            let mut rest = reader.into_inner();
            if rest.fill_buf()?.is_empty() && rest.into_inner().finish()? {
                Ok(restored)
            } else {
                Err(SnapshotError::Corrupt("data after the state's End item".into()))
            }
        })()
        .map_err(|e| halted(e.to_string()))?;
        let exit = restored.exits;
        self.adopt(restored).map_err(|e| halted(e.to_string()))?;
        // Records received before the request (up to the state's exit) are
        // covered by the state.
        if let Inputs::Replay(replayer) = &mut self.inputs {
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
    pub(super) fn answer_resync(&mut self) -> Result<(), RunError> {
        let Some(exit) = self.primary_link().and_then(|link| link.take_resync_request()) else { return Ok(()) };
        let Inputs::Live(live) = &mut self.inputs else { return Ok(()) };
        let Some(mut recorder) = live.recorder.take() else { return Ok(()) };
        // What this exit logged goes out first; the restart drops it anyway.
        recorder.passed().map_err(crate::error::log_write_error)?;
        let LogSink::Primary(link) = recorder.into_sink() else { return Ok(()) };
        eprintln!(
            "ftvmm: primary: the backup diverged at exit {exit}; sending it the whole state from exit {} \
             (outputs stay held until it acknowledges again)",
            self.exits
        );
        link.restart_state();
        self.start_transfer(link, true)?;
        Ok(())
    }
}
