//! Failover: the primary's watermark, acks and released output; noticing
//! a lost backup; the go-live arbitration (the test-and-set on the arbiter
//! or the shared disk); and a backup going live where its primary's log
//! ends — what happens when the primary dies.

use super::{owner_name, FtRole, FtState, Held, Joiner, OutputGate, Reason, Role, Suppressed};
use crate::arbiter::Arbitration;
use crate::clock::HostClock;
use crate::error::{log_write_error, RunError};
use crate::host::disk::{Claim, DiskPort};
use crate::inputs::{Inputs, LiveInputs};
use crate::run::Vmm;
use replay::Position;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Without output waiting for it, the primary ships the lockstep watermark
/// at least every this many exits...
const SHIP_EVERY_EXITS: u64 = 64;
/// ...and at least this often.
pub(super) const SHIP_EVERY: Duration = Duration::from_millis(5);

impl FtRole {
    /// The role's share of passing an exit: tell the backup (the lockstep
    /// watermark), keep pace with it, keep its view of released output and
    /// applied disk ops current.
    pub(super) fn tend_role(&mut self, vm: &mut Vmm, position: Position) -> Result<(), RunError> {
        // A diverged backup asks for the whole state again (repair).
        self.answer_resync(vm)?;
        // No backup: take one that joins, or finish its state transfer.
        self.tend_protection(vm, true)?;
        match &mut vm.inputs {
            Inputs::Live(live) => {
                let Some(recorder) = &mut live.recorder else { return Ok(()) };
                if let Role::Primary { gate, shipped, .. } = &mut self.role {
                    // Ship the watermark at once when output waits for it,
                    // else every few exits or milliseconds: each message
                    // wakes threads on both sides, which a guest that exits
                    // often but outputs little should not pay for every exit.
                    // After a sync at once: the backup holds until it sees it.
                    let due = gate.held() > 0
                        || vm.synced_at == position.exit
                        || position.exit >= shipped.0 + SHIP_EVERY_EXITS
                        || shipped.1.elapsed() >= SHIP_EVERY;
                    if !due {
                        return Ok(());
                    }
                    *shipped = (position.exit, Instant::now());
                }
                recorder.passed().map_err(log_write_error)?;
                self.shipped(position.exit);
                if let (Some(link), Role::Primary { gate, delivered, .. }) = (vm.inputs.primary_link(), &self.role) {
                    link.released(gate.released(delivered.load(Ordering::Acquire)));
                    link.disk_applied(vm.disk.as_ref().map_or(0, DiskPort::applied_through));
                    link.throttle(position.exit);
                }
                if let Some(why) = self.newly_lost_backup(vm) {
                    return self.backup_lost(vm, position, &why);
                }
            }
            Inputs::Replay(_) => {
                if let Some(link) = vm.inputs.backup_link() {
                    let (released, disk_applied) = (link.released(), link.disk_applied());
                    vm.output.prune(released, disk_applied);
                }
            }
        }
        Ok(())
    }

    /// Why the backup was lost, the first time the primary notices.
    pub(super) fn newly_lost_backup(&mut self, vm: &mut Vmm) -> Option<String> {
        if self.backup_loss_reported {
            return None;
        }
        let why = vm.inputs.primary_link()?.backup_lost()?;
        self.backup_loss_reported = true;
        Some(why)
    }

    /// The primary lost its backup: win the shared disk (if there is one to
    /// arbitrate on), then stop holding output and run alone.
    pub(super) fn backup_lost(&mut self, vm: &mut Vmm, position: Position, why: &str) -> Result<(), RunError> {
        eprintln!("ftvmm: primary: backup lost ({why}) at exit {}", position.exit);
        let Role::Primary { gate, .. } = &self.role else { return Ok(()) };
        let gate = gate.clone();
        if let Some(generation) = self.arbitrate(vm, "primary")? {
            vm.header.disk_generation = generation;
        }
        eprintln!("ftvmm: primary: running alone");
        self.status.metrics.backups_lost.inc();
        self.status.set_peer(None);
        self.status.set(
            FtState::NeedsSecondary,
            Reason::LostConnection,
            format!("backup lost ({why}) at exit {}; running alone", position.exit),
        );
        gate.acked(u64::MAX);
        self.unprotected(vm)
    }

    /// Where going live is arbitrated: the arbiter, else a shared disk on
    /// ftdisk (a local disk file answers that it cannot arbitrate).
    fn arbitration<'a>(&'a self, vm: &'a Vmm) -> Arbitration<'a> {
        match (&self.arbiter, &vm.disk) {
            (Some(a), _) => Arbitration::Remote(a),
            (None, Some(d)) => Arbitration::Disk(d),
            (None, None) => Arbitration::None,
        }
    }

    /// Go-live arbitration: the test-and-set on the arbiter or the shared
    /// disk from the VM's generation. Returns the new generation (None:
    /// nothing to arbitrate on, and each side goes live on its own
    /// detection). Losing halts this VMM; unreachable storage is retried for
    /// as long as it takes, without going live.
    fn arbitrate(&self, vm: &Vmm, role: &str) -> Result<Option<u64>, RunError> {
        let expected = vm.header.disk_generation;
        let arbitration = self.arbitration(vm);
        let record = match arbitration {
            Arbitration::Remote(_) => "the arbiter",
            _ => "the shared disk",
        };
        let owner = owner_name(role);
        loop {
            match arbitration.claim(expected, &owner) {
                Ok(None) => return Ok(None),
                Ok(Some(Claim::Won { generation })) => {
                    eprintln!("ftvmm: {role}: won {record} (generation {generation})");
                    return Ok(Some(generation));
                }
                Ok(Some(Claim::Lost { generation, owner })) => {
                    self.status.set(
                        FtState::Halted,
                        Reason::LostArbitration,
                        format!("{owner} won (generation {generation})"),
                    );
                    return Err(RunError::Halted(format!(
                        "{role}: lost the go-live arbitration to {owner} (generation {generation}); halting"
                    )));
                }
                Err(e) => {
                    eprintln!("ftvmm: {role}: cannot reach {record} to arbitrate ({e}); not going live, retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// A replay ran out of log. For a backup that means the primary is gone:
    /// go live — serve the outside world, take inputs from the host, and
    /// re-emit the output the primary may not have released — and carry on
    /// from exactly here. For anything else it is the end of the run.
    pub(super) fn go_live(&mut self, vm: &mut Vmm, err: RunError) -> Result<(), RunError> {
        let RunError::EndOfLog { .. } = err else { return Err(err) };
        let Role::Backup { endpoint, serial_input, nic, listener } = &mut self.role else {
            return Err(err);
        };
        let Some(endpoint) = endpoint.take() else { return Err(err) };
        if !matches!(vm.inputs, Inputs::Replay(_)) {
            return Err(err);
        }
        let (released, disk_applied, why) = match vm.inputs.backup_link() {
            Some(link) => {
                (link.released(), link.disk_applied(), link.primary_lost().unwrap_or_else(|| "log ended".into()))
            }
            None => (0, 0, "log ended".into()),
        };
        if let Some(at) = self.resynced_at.filter(|at| released < *at) {
            // Outputs up to `at` came from the primary alone (this backup
            // restored their effects): going live would lose those it held.
            self.status.set(
                FtState::Halted,
                Reason::DivergenceHalted,
                format!(
                    "primary lost before it released the outputs up to exit {at}, where this backup resynchronized"
                ),
            );
            return Err(RunError::Halted(format!(
                "backup: primary lost ({why}) at exit {} before it released the outputs up to exit {at}, where this                  backup resynchronized (it released up to exit {released}); going live would lose them: halting",
                vm.exits()
            )));
        }
        let serial_input = serial_input.take();
        let nic = nic.take();
        let listener = listener.take();
        eprintln!("ftvmm: backup: primary lost ({why}) at exit {}", vm.exits());
        self.status.set(
            FtState::GoingLive,
            Reason::PrimaryLost,
            format!("primary lost ({why}) at exit {}", vm.exits()),
        );
        if let Some(generation) = self.arbitrate(vm, "backup")? {
            vm.header.disk_generation = generation;
        }
        eprintln!("ftvmm: backup: going live at exit {}", vm.exits());
        let (input, port) = endpoint.start_with_file(serial_input);
        if let Some(nic) = &nic {
            // The LAN's bridges learn where the VM's MAC now is, before the
            // re-emitted frames and the guest's retransmissions go out.
            nic.announce();
        }
        // The primary's last word on what left it, then: the disk first
        // (re-issued and flushed), then the outputs that may depend on it.
        vm.output.prune(released, disk_applied);
        vm.output
            .go_live(port, vm.disk.as_ref(), nic.as_ref().map(|n| n.tx.clone()))
            .map_err(|err| RunError::Io { what: "re-issuing the primary's disk writes", err })?;
        let host = HostClock::resume_at(vm.clock.now_ns());
        let mut live = LiveInputs::new(host, Some(input), None, None);
        if let Some(nic) = &nic {
            live.attach_nic(nic.rx.clone(), &nic.waker);
            nic.rx.set_discard(false);
        }
        vm.inputs = Inputs::Live(Box::new(live));
        self.role = Role::Solo;
        self.status.metrics.failovers.inc();
        self.status.set_role("solo");
        self.status.set_peer(None);
        self.status.set(
            FtState::NeedsSecondary,
            Reason::WentLive,
            format!("went live at exit {} after the primary was lost ({why})", vm.exits()),
        );
        if let Some(listener) = listener {
            self.become_primary(vm, listener, nic.as_ref().map(|n| n.tx.clone()))?;
        }
        Ok(())
    }

    /// A backup that went live with `--listen`: it is now a primary without
    /// a backup, accepting one on `listener` (outputs pass through its gate
    /// until one has joined).
    fn become_primary(
        &mut self,
        vm: &mut Vmm,
        listener: logging_channel::PrimaryListener,
        net: Option<crate::host::tap::TapTx>,
    ) -> Result<(), RunError> {
        let live_outputs = std::mem::replace(&mut vm.output, Box::new(Suppressed::default()));
        let Some(port) = live_outputs.into_port() else {
            return Err(RunError::Io { what: "becoming a primary", err: std::io::Error::other("no serial port") });
        };
        let gate = OutputGate::for_primary(&port, vm.disk.as_mut(), net, vm.metrics.clone());
        gate.acked(u64::MAX);
        eprintln!("ftvmm: live: accepting a backup on {}", listener.local_addr());
        self.status.set_role("primary");
        let joiner = Joiner::start(listener, vm.header.clone(), self.channel.clone(), true);
        self.role = Role::primary(&gate, &port, &self.channel, joiner, vm.exits());
        vm.output = Box::new(Held { gate, port });
        Ok(())
    }
}
