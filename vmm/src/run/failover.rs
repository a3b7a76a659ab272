//! The FT role at run time: the primary's watermark, acks and released
//! output; noticing a lost backup; go-live arbitration on the shared disk;
//! and a backup going live where its primary's log ends.

use crate::arbiter::Arbitration;
use crate::clock::HostClock;
use crate::error::{log_write_error, RunError};
use crate::ft::{owner_name, Held, Joiner, OutputGate, Role, Suppressed};
use crate::host::disk::{Claim, DiskPort, MAX_DEFERRED_BYTES};
use crate::inputs::{Inputs, LiveInputs};
use crate::log_io::{LogSink, LogSource};
use crate::run::Vmm;
use replay::Position;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Without output waiting for it, the primary ships the lockstep watermark
/// at least every this many exits...
const SHIP_EVERY_EXITS: u64 = 64;
/// ...and at least this often.
const SHIP_EVERY: Duration = Duration::from_millis(5);

impl Vmm {
    /// The VMM is done with exit `position` and resumes the guest: tell the
    /// backup (the lockstep watermark), keep pace with it, keep its view of
    /// released output current; and keep the disk's unapplied writes within
    /// their bound.
    pub(super) fn passed(&mut self, position: Position) -> Result<(), RunError> {
        self.check_disk()?;
        self.tend_role(position)?;
        self.report_join();
        self.wait_for_disk_room(position)
    }

    /// A primary whose storage failed a write halts: what the guest saw
    /// complete would be lost.
    fn check_disk(&self) -> Result<(), RunError> {
        match self.disk.as_ref().and_then(|d| d.failure()) {
            Some(why) => Err(RunError::Halted(format!("writing the shared disk failed ({why}); halting"))),
            None => Ok(()),
        }
    }

    /// Holds the guest at this boundary while its disk writes not yet
    /// applied exceed [`MAX_DEFERRED_BYTES`], until the storage has caught
    /// up. Here, between exits, nothing that frees room waits for the guest:
    /// this exit's watermark is out (held output makes it due at once), so
    /// the backup's acks release the writes to the writer thread; a lost
    /// backup releases them once the arbitration is won; a state transfer
    /// under way (whose final round needs a boundary) is finished here.
    fn wait_for_disk_room(&mut self, position: Position) -> Result<(), RunError> {
        while self.disk.as_ref().is_some_and(|d| d.deferred_bytes() > MAX_DEFERRED_BYTES) {
            self.check_disk()?;
            if let Some(why) = self.newly_lost_backup() {
                self.backup_lost(position, &why)?;
            }
            self.answer_resync()?;
            self.tend_protection(true)?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// The FT role's share of passing an exit (see [`Vmm::passed`]).
    fn tend_role(&mut self, position: Position) -> Result<(), RunError> {
        // A diverged backup asks for the whole state again (repair).
        self.answer_resync()?;
        // No backup: take one that joins, or finish its state transfer.
        self.tend_protection(true)?;
        match &mut self.inputs {
            Inputs::Live(live) => {
                let Some(recorder) = &mut live.recorder else { return Ok(()) };
                if let Role::Primary { gate, shipped, .. } = &mut self.role {
                    // Ship the watermark at once when output waits for it,
                    // else every few exits or milliseconds: each message
                    // wakes threads on both sides, which a guest that exits
                    // often but outputs little should not pay for every exit.
                    // After a sync at once: the backup holds until it sees it.
                    let due = gate.held() > 0
                        || self.synced_at == position.exit
                        || position.exit >= shipped.0 + SHIP_EVERY_EXITS
                        || shipped.1.elapsed() >= SHIP_EVERY;
                    if !due {
                        return Ok(());
                    }
                    *shipped = (position.exit, Instant::now());
                }
                recorder.passed().map_err(log_write_error)?;
                if let (LogSink::Primary(link), Role::Primary { gate, delivered, .. }) =
                    (recorder.sink_mut(), &self.role)
                {
                    link.released(gate.released(delivered.load(Ordering::Acquire)));
                    link.disk_applied(self.disk.as_ref().map_or(0, DiskPort::applied_through));
                    link.throttle(position.exit);
                }
                if let Some(why) = self.newly_lost_backup() {
                    return self.backup_lost(position, &why);
                }
            }
            Inputs::Replay(r) => {
                if let LogSource::Backup(link) = r.source_mut() {
                    self.output.prune(link.released(), link.disk_applied());
                }
            }
        }
        Ok(())
    }

    /// The primary's logging channel to its backup, if this VMM is one.
    pub(super) fn primary_link(&mut self) -> Option<&mut logging_channel::PrimaryLink> {
        match (&mut self.inputs, &self.role) {
            (Inputs::Live(live), Role::Primary { .. }) => match live.recorder.as_mut()?.sink_mut() {
                LogSink::Primary(link) => Some(link),
                LogSink::File(_) => None,
            },
            _ => None,
        }
    }

    /// Why the backup was lost, the first time the primary notices.
    pub(super) fn newly_lost_backup(&mut self) -> Option<String> {
        if self.backup_loss_reported {
            return None;
        }
        let why = self.primary_link()?.backup_lost()?;
        self.backup_loss_reported = true;
        Some(why)
    }

    /// The primary lost its backup: win the shared disk (if there is one to
    /// arbitrate on), then stop holding output and run alone.
    pub(super) fn backup_lost(&mut self, position: Position, why: &str) -> Result<(), RunError> {
        eprintln!("ftvmm: primary: backup lost ({why}) at exit {}", position.exit);
        let Role::Primary { gate, generation, .. } = &self.role else { return Ok(()) };
        let (gate, expected) = (gate.clone(), *generation);
        if let Some(generation) = self.arbitrate("primary", expected)? {
            if let Role::Primary { generation: g, .. } = &mut self.role {
                *g = generation;
            }
        }
        eprintln!("ftvmm: primary: running alone");
        gate.acked(u64::MAX);
        self.unprotected()
    }

    /// Go-live arbitration: the test-and-set on the arbiter or the shared
    /// disk from generation `expected`. Returns the new generation (None:
    /// nothing to arbitrate on, and each side goes live on its own
    /// detection). Losing halts this VMM; unreachable storage is retried for
    /// as long as it takes, without going live.
    pub(super) fn arbitrate(&mut self, role: &str, expected: u64) -> Result<Option<u64>, RunError> {
        let arbitration = self.arbitration();
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
    pub(super) fn end_of_log(&mut self, err: RunError) -> Result<(), RunError> {
        let RunError::EndOfLog { .. } = err else { return Err(err) };
        let Role::Backup { endpoint, serial_input, expected_generation, nic, listener } = &mut self.role else {
            return Err(err);
        };
        let Some(endpoint) = endpoint.take() else { return Err(err) };
        let expected = *expected_generation;
        let Inputs::Replay(r) = &mut self.inputs else { return Err(err) };
        let (released, disk_applied, why) = match r.source_mut() {
            LogSource::Backup(link) => {
                (link.released(), link.disk_applied(), link.primary_lost().unwrap_or_else(|| "log ended".into()))
            }
            LogSource::File(_) => (0, 0, "log ended".into()),
        };
        if let Some(at) = self.resynced_at.filter(|at| released < *at) {
            // Outputs up to `at` came from the primary alone (this backup
            // restored their effects): going live would lose those it held.
            return Err(RunError::Halted(format!(
                "backup: primary lost ({why}) at exit {} before it released the outputs up to exit {at}, where this                  backup resynchronized (it released up to exit {released}); going live would lose them: halting",
                self.exits
            )));
        }
        let serial_input = serial_input.take();
        let nic = nic.take();
        let listener = listener.take();
        eprintln!("ftvmm: backup: primary lost ({why}) at exit {}", self.exits);
        let generation = self.arbitrate("backup", expected)?.unwrap_or(expected);
        self.header.disk_generation = generation;
        eprintln!("ftvmm: backup: going live at exit {}", self.exits);
        let (input, port) = endpoint
            .start_with_input(serial_input.as_deref())
            .map_err(|err| RunError::Io { what: "opening --serial-input", err })?;
        if let Some(nic) = &nic {
            // The LAN's bridges learn where the VM's MAC now is, before the
            // re-emitted frames and the guest's retransmissions go out.
            nic.announce();
        }
        // The primary's last word on what left it, then: the disk first
        // (re-issued and flushed), then the outputs that may depend on it.
        self.output.prune(released, disk_applied);
        self.output
            .go_live(port, self.disk.as_ref(), nic.as_ref().map(|n| n.tx.clone()))
            .map_err(|err| RunError::Io { what: "re-issuing the primary's disk writes", err })?;
        let host = HostClock::resume_at(self.clock.now_ns());
        let mut live = LiveInputs::new(host, Some(input), None, None);
        if let Some(nic) = &nic {
            live.attach_nic(nic.rx.clone(), &nic.waker);
            nic.rx.set_discard(false);
        }
        self.inputs = Inputs::Live(Box::new(live));
        self.role = Role::Solo;
        if let Some(listener) = listener {
            self.become_primary(listener, generation, nic.as_ref().map(|n| n.tx.clone()))?;
        }
        Ok(())
    }

    /// A backup that went live with `--listen`: it is now a primary without
    /// a backup, accepting one on `listener` (outputs pass through its gate
    /// until one has joined).
    fn become_primary(
        &mut self,
        listener: logging_channel::PrimaryListener,
        generation: u64,
        net: Option<crate::host::tap::TapTx>,
    ) -> Result<(), RunError> {
        let live_outputs = std::mem::replace(&mut self.output, Box::new(Suppressed::default()));
        let Some(port) = live_outputs.into_port() else {
            return Err(RunError::Io { what: "becoming a primary", err: std::io::Error::other("no serial port") });
        };
        let gate = OutputGate::for_primary(&port, self.disk.as_mut(), net);
        gate.acked(u64::MAX);
        eprintln!("ftvmm: live: accepting a backup on {}", listener.local_addr());
        let joiner = Joiner::start(listener, self.header.clone(), self.channel.clone(), true);
        self.role = Role::Primary {
            gate: gate.clone(),
            delivered: port.delivered(),
            finish_timeout: self.channel.heartbeat_timeout * 5,
            generation,
            shipped: (self.exits, Instant::now()),
            joiner: Some(joiner),
        };
        self.output = Box::new(Held { gate, port });
        Ok(())
    }
}
