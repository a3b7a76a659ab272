//! The VM's state as a snapshot: taking it at a guest-caused exit (for a
//! snapshot file, or the last round of a live state transfer) and restoring
//! it into a freshly built VM of the same image and configuration.

use crate::clock::{HostClock, VirtualClock};
use crate::devices::Devices;
use crate::digest;
use crate::error::RunError;
use crate::inputs::Inputs;
use crate::output::PendingOutputs;
use crate::run::Vmm;
use crate::snapshot::{self, MachineState, SnapshotError, StateItem, StateReader, StateWriter};
use crate::vm::Machine;
use std::io::{Read, Write};

fn snapshot_io(what: &'static str) -> impl FnOnce(std::io::Error) -> RunError {
    move |err| RunError::Io { what, err }
}

impl Vmm {
    /// The `Begin` item describing this VM at its current exit.
    pub(crate) fn state_begin(&self) -> StateItem {
        StateItem::Begin {
            image_hash: self.header.image_hash,
            config: self.header.config.clone(),
            mem_size: self.machine.mem_size,
            exits: self.exits,
        }
    }

    /// Everything of the VM's state but memory, at this exit (it completes
    /// the exit just answered first, so the registers are final).
    pub(crate) fn machine_state(&mut self) -> Result<MachineState, RunError> {
        let disk_generation = self.header.disk_generation;
        Ok(MachineState {
            vcpu: self.machine.save_vcpu()?,
            devices: self.devices.state(),
            clock: self.clock.clone(),
            exits: self.exits,
            injected_at: self.injected_at,
            wall_clock_base_ns: self.wall_clock_base_ns,
            disk_generation,
        })
    }

    /// The state digest now (`memory`: of all of it, else of all but guest memory).
    pub(crate) fn digest_now(&self, memory: bool) -> Result<replay::Digest, RunError> {
        let digest = if memory { digest::state_digest } else { digest::machine_digest };
        digest(&self.machine, &self.devices.state(), &self.clock, self.exits)
    }

    /// The outputs the guest has produced that have not yet left this VMM:
    /// disk ops not yet applied, serial output not yet delivered to a
    /// console client, held frames. What a state taken now must carry.
    pub(crate) fn pending_outputs(&self) -> PendingOutputs {
        let mut pending = self.output.pending();
        pending.disk = self.disk.as_ref().map(|d| d.pending_ops()).unwrap_or_default();
        pending
    }

    /// Writes a whole snapshot of the VM at this exit to `out`.
    pub fn save_snapshot(&mut self, out: impl Write) -> Result<(), RunError> {
        let io = snapshot_io("writing the snapshot");
        let mut w = StateWriter::new(out).map_err(snapshot_io("writing the snapshot"))?;
        w.item(&self.state_begin()).map_err(snapshot_io("writing the snapshot"))?;
        let machine = self.machine_state()?;
        snapshot::memory_items(&self.machine.mem, self.machine.mem_size, None, |item| w.item(&item)).map_err(io)?;
        snapshot::pending_items(&self.pending_outputs(), |item| w.item(&item))
            .map_err(snapshot_io("writing the snapshot"))?;
        w.item(&StateItem::Machine(Box::new(machine))).map_err(snapshot_io("writing the snapshot"))?;
        let digest = self.digest_now(true)?;
        w.item(&StateItem::End { digest, memory: true }).map_err(snapshot_io("writing the snapshot"))?;
        w.into_inner().flush().map_err(snapshot_io("writing the snapshot"))
    }

    /// Takes on the position, clock and bookkeeping of a state restored into
    /// its machine and devices ([`restore_state`]), and checks the whole
    /// against the snapshot's digest. (Not its disk generation: a backup
    /// takes its primary's from [`Restored::disk_generation`]; a VM that
    /// claimed the disk at boot keeps its own.)
    pub fn adopt(&mut self, restored: Restored) -> Result<(), SnapshotError> {
        self.clock = restored.clock;
        self.exits = restored.exits;
        self.injected_at = restored.injected_at;
        // (An exit number of the run before: meaningless after it.)
        self.disk_served_at = 0;
        if let Inputs::Replay(r) = &mut self.inputs {
            // The log goes on after the state's exit (with a sync, maybe).
            r.resume_after(restored.exits);
        }
        self.wall_clock_base_ns = restored.wall_clock_base_ns;
        self.header.wall_clock_base_ns = restored.wall_clock_base_ns;
        // Live inputs read the host clock from here on, where the snapshot's
        // virtual time was.
        if let Inputs::Live(live) = &mut self.inputs {
            live.host = HostClock::resume_at(self.clock.now_ns());
        }
        self.take_over_outputs(restored.pending)?;
        let ours = self.digest_now(restored.digest_covers_memory).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
        if ours != restored.digest {
            return Err(SnapshotError::Corrupt(format!(
                "the restored VM's state digest {ours} is not the snapshot's {}",
                restored.digest
            )));
        }
        Ok(())
    }

    /// The outputs a restored state had pending: a backup keeps them for
    /// going live (they replace its own, superseded by the state); a live
    /// VM puts them out now — the disk ops applied and flushed before the
    /// guest runs on; a replay, which puts nothing out, ignores them.
    fn take_over_outputs(&mut self, pending: PendingOutputs) -> Result<(), SnapshotError> {
        let Some(pending) = self.output.take_over(pending) else { return Ok(()) };
        if !matches!(self.inputs, Inputs::Live(_)) {
            return Ok(());
        }
        if let Some(disk) = &self.disk {
            disk.apply_taken_over(&pending.disk)?;
        }
        let position = replay::Position { exit: self.exits, rip: 0 };
        for (_, bytes) in pending.serial {
            self.output.output(position, bytes);
        }
        for (_, frame) in pending.frames {
            self.output.frame(position, frame);
        }
        Ok(())
    }

    /// After exit `exit` has been handled: save a snapshot if one was asked
    /// for at this exit.
    pub(super) fn maybe_save_snapshot(&mut self, exit: u64) -> Result<(), RunError> {
        let Some((at, path)) = self.save_at.take_if(|(at, _)| *at == exit) else { return Ok(()) };
        let file =
            std::fs::File::create(&path).map_err(|err| RunError::Io { what: "creating the snapshot file", err })?;
        self.save_snapshot(std::io::BufWriter::new(file))?;
        eprintln!("ftvmm: saved a snapshot at exit {at} to {}", path.display());
        Ok(())
    }
}

/// Checks a snapshot's `Begin` against this VM (image, configuration,
/// memory size); returns the exit it was taken at.
pub fn check_begin(item: Option<StateItem>, header: &replay::Header, mem_size: u64) -> Result<u64, SnapshotError> {
    match item {
        Some(StateItem::Begin { image_hash, config, mem_size: m, exits }) => {
            if image_hash != header.image_hash {
                return Err(SnapshotError::Mismatch(format!(
                    "the snapshot is of another guest image (image hash {image_hash}, this image {})",
                    header.image_hash
                )));
            }
            if config != header.config || m != mem_size {
                return Err(SnapshotError::Mismatch(format!(
                    "the snapshot is of another VM configuration ({config}; this VM: {})",
                    header.config
                )));
            }
            Ok(exits)
        }
        Some(_) => Err(SnapshotError::Corrupt("the snapshot does not begin with Begin".into())),
        None => Err(SnapshotError::Truncated),
    }
}

/// What [`restore_state`] restored beyond the machine and the devices.
pub struct Restored {
    pub clock: VirtualClock,
    pub exits: u64,
    pub injected_at: u64,
    pub wall_clock_base_ns: u64,
    pub disk_generation: u64,
    /// The digest the VM must now have...
    pub digest: replay::Digest,
    /// ...of all its state (else of all but memory).
    pub digest_covers_memory: bool,
    /// The outputs it had produced and not yet put out.
    pub pending: PendingOutputs,
}

/// Restores the rest of a snapshot stream (its `Begin` read and checked
/// with [`check_begin`]) into a machine and devices built from the same
/// image and configuration that have not run.
pub fn restore_state(
    machine: &mut Machine,
    devices: &mut Devices,
    reader: &mut StateReader<impl Read>,
) -> Result<Restored, SnapshotError> {
    let mut saved = None;
    let mut pending = PendingOutputs::default();
    loop {
        let item = reader.next_item()?.ok_or(SnapshotError::Truncated)?;
        match item {
            StateItem::Pages { .. } | StateItem::Zeros { .. } => {
                snapshot::apply_memory(&machine.mem, machine.mem_size, &item)?
            }
            StateItem::PendingWrite { .. }
            | StateItem::PendingFlush { .. }
            | StateItem::PendingSerial { .. }
            | StateItem::PendingFrame { .. } => snapshot::add_pending(&mut pending, item)?,
            StateItem::Machine(m) => saved = Some(m),
            StateItem::End { digest, memory } => {
                let m = saved.ok_or_else(|| SnapshotError::Corrupt("no machine state before End".into()))?;
                devices.restore(m.devices).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
                machine.restore_vcpu(&m.vcpu).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
                return Ok(Restored {
                    clock: m.clock,
                    exits: m.exits,
                    injected_at: m.injected_at,
                    wall_clock_base_ns: m.wall_clock_base_ns,
                    disk_generation: m.disk_generation,
                    digest,
                    digest_covers_memory: memory,
                    pending,
                });
            }
            StateItem::Begin { .. } => return Err(SnapshotError::Corrupt("a second Begin".into())),
        }
    }
}
