//! The run loop: runs the vCPU, turns every guest-caused exit into a
//! [`Position`], lets the device models answer it, and delivers external
//! inputs — live or replayed — only at positions.
//!
//! One exit, in order (identical on a recording and on its replay):
//! 1. the exit is checked in (recorded, or matched against the log);
//! 2. the device model that owns it answers the access ([`dispatch`]); a
//!    time reading goes through the inputs (host clock + log, or log);
//! 3. timers catch up with the virtual clock;
//! 4. external inputs are taken ([`delivery`]; live: serial bytes, a due
//!    timer; replay: the logged events of this position, in their order);
//! 5. a pending PIC interrupt is injected if the guest can take it now, or an
//!    interrupt window is requested so that it is injected at the next exit;
//! 6. the FT role's bookkeeping ([`failover`]): the watermark, released
//!    output, a lost peer.

mod delivery;
mod digest_check;
mod dispatch;
mod exit;
mod failover;
mod join;
mod repair;
mod state;
mod sync;

pub use digest_check::CheckPolicy;
pub use join::StateIn;

pub use state::{check_begin, restore_state, Restored};

use crate::arbiter::{Arbitration, RemoteArbiter};
use crate::clock::{VirtualClock, TSC_HZ};
use crate::devices::{Devices, PortAction};
use crate::digest;
use crate::error::{log_write_error, RunError};
use crate::ft::{Outputs, Role};
use crate::host::disk::DiskPort;
use crate::inputs::Inputs;
use crate::log_io::{LogSink, LogSource};
use crate::vm::Machine;
use exit::GuestExit;
use logging_channel::LatencySummary;
use replay::{Divergence, ExitKind, Header, Position};
use std::collections::HashSet;

/// How a run ended when the guest ended it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u8,
    pub digest: Option<replay::Digest>,
    pub exits: u64,
    /// The primary's output-commit latency: (outputs, p50 µs, p99 µs, max µs).
    pub commit_latency: Option<LatencySummary>,
    /// Where it went, hop by hop: (hop, (outputs, p50, p99, max)).
    pub commit_hops: Vec<(&'static str, LatencySummary)>,
    /// A backup's share: its batches' arrival to their ack's write.
    pub ack_delay: Option<LatencySummary>,
    /// Digest checks logged or verified, and their average cost in µs.
    pub checks: (u64, Option<u64>),
    /// The state syncs taken (primary, recording) or applied (backup, replay).
    pub syncs: sync::SyncStats,
    /// Peak bytes of disk writes not yet applied (a primary's), and of
    /// those kept for going live (a backup's).
    pub disk_peaks: (u64, u64),
}

/// A running VM: the machine, its devices, its clock and its inputs.
pub struct Vmm {
    pub machine: Machine,
    pub devices: Devices,
    pub clock: VirtualClock,
    pub inputs: Inputs,
    output: Box<dyn Outputs>,
    role: Role,
    /// The disk's storage, if the VM has a disk.
    disk: Option<DiskPort>,
    /// The exit at which an interrupt was last injected (one per exit).
    injected_at: u64,
    /// The exit at which the disk last served its queue (one share an exit).
    disk_served_at: u64,
    /// Testing aid (`--testing-die-before-disk-read`): disk reads to go
    /// before this primary dies.
    pub die_before_disk_read: Option<u64>,
    backup_loss_reported: bool,
    /// RIPs of RDTSC instructions the loader rewrote into TSC port reads.
    rdtsc_sites: HashSet<u64>,
    /// Wall-clock time at boot, the RTC's base.
    wall_clock_base_ns: u64,
    /// What identifies this VM to a log, a peer or a snapshot.
    header: Header,
    exits: u64,
    /// Compute the final state digest (for `--digest`, recording and replay).
    want_digest: bool,
    /// The logging channel's settings, for backups that join later.
    pub channel: logging_channel::ChannelConfig,
    /// A state transfer to a joining backup, under way.
    transfer: Option<join::Transfer>,
    /// A finished transfer's exit and line, said once the backup acknowledges.
    join_report: Option<(u64, String)>,
    /// The arbiter-only ftdisk go-live arbitration happens on (`--arbiter`).
    pub arbiter: Option<RemoteArbiter>,
    /// Save a snapshot at this exit, to this file (`--save-snapshot`).
    save_at: Option<(u64, std::path::PathBuf)>,
    /// Periodic digest checks (`--check-every-ms`, `--check-every-exits`)
    /// and the `--inject-divergence-at` testing aid.
    checks: digest_check::Checks,
    /// A backup's last repair: the exit of the state it restored. It may go
    /// live only once the primary reports the outputs up to it released.
    resynced_at: Option<u64>,
    /// Kick the guest after this long without an exit when an interrupt is due.
    pub sync_after: std::time::Duration,
    /// Kicks the vCPU thread out of the guest (created when the run starts).
    kicker: Option<crate::kick::Kicker>,
    /// When the guest last exited (or was synced): its stretch began.
    stretch_started: std::time::Instant,
    /// The position of the last state sync.
    synced_at: u64,
    syncs: sync::SyncStats,
    /// The pages the syncs keep writable (a primary's).
    hot: sync::HotPages,
}

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        machine: Machine,
        devices: Devices,
        inputs: Inputs,
        output: Box<dyn Outputs>,
        role: Role,
        disk: Option<DiskPort>,
        rdtsc_sites: HashSet<u64>,
        header: Header,
        want_digest: bool,
    ) -> Self {
        Vmm {
            machine,
            devices,
            clock: VirtualClock::default(),
            inputs,
            output,
            role,
            disk,
            injected_at: 0,
            disk_served_at: 0,
            die_before_disk_read: None,
            backup_loss_reported: false,
            rdtsc_sites,
            wall_clock_base_ns: header.wall_clock_base_ns,
            header,
            exits: 0,
            want_digest,
            save_at: None,
            checks: digest_check::Checks::new(CheckPolicy::OFF, None),
            resynced_at: None,
            sync_after: std::time::Duration::from_millis(1),
            kicker: None,
            stretch_started: std::time::Instant::now(),
            synced_at: 0,
            syncs: sync::SyncStats::default(),
            hot: sync::HotPages::default(),
            arbiter: None,
            transfer: None,
            join_report: None,
            channel: Default::default(),
        }
    }

    /// Where going live is arbitrated: the arbiter, else a shared disk on
    /// ftdisk (a local disk file answers that it cannot arbitrate).
    pub(crate) fn arbitration(&self) -> Arbitration<'_> {
        match (&self.arbiter, &self.disk) {
            (Some(a), _) => Arbitration::Remote(a),
            (None, Some(d)) => Arbitration::Disk(d),
            (None, None) => Arbitration::None,
        }
    }

    /// Saves a snapshot to `path` once exit `exit` has been handled.
    pub fn save_snapshot_at(&mut self, exit: u64, path: std::path::PathBuf) {
        self.save_at = Some((exit, path));
    }

    /// Log a digest check by `policy` (recording side); flip a byte of
    /// guest memory at exit `inject_at` (replaying side, a testing aid).
    pub fn set_checks(&mut self, policy: CheckPolicy, inject_at: Option<u64>) {
        self.checks = digest_check::Checks::new(policy, inject_at);
    }

    /// Digest checks made so far and their average cost in µs.
    pub fn check_stats(&self) -> (u64, Option<u64>) {
        (self.checks.made, self.checks.average_us())
    }

    /// Guest-caused exits so far.
    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// Runs the guest until it ends the VM or something goes wrong.
    pub fn run(mut self) -> Result<Outcome, RunError> {
        let result = loop {
            match self.run_loop() {
                // A backup repairs a divergence and replays on.
                Err(RunError::Divergence(d)) if self.can_resync() => {
                    if let Err(e) = self.resync(d) {
                        break Err(e);
                    }
                }
                other => break other,
            }
        };
        // Whatever happened, what was recorded and what the guest printed stays.
        if let Inputs::Live(live) = &mut self.inputs {
            if let Some(recorder) = &mut live.recorder {
                let flushed = recorder.flush();
                if result.is_ok() {
                    flushed.map_err(log_write_error)?;
                }
            }
        }
        self.output.close();
        if let Some(disk) = &mut self.disk {
            // Released writes reach the disk before the VMM is gone.
            disk.close();
        }
        result
    }

    fn run_loop(&mut self) -> Result<Outcome, RunError> {
        self.kicker = Some(crate::kick::Kicker::for_this_thread());
        if let Inputs::Live(live) = &self.inputs {
            if live.recorder.is_some() {
                // A recording's syncs carry the pages written since the
                // replay's memory was last equal to ours: from here on.
                self.machine.dirty.start(crate::memory::dirty::Consumer::Sync)?;
            }
        }
        loop {
            let exit = self.next_exit()?;
            self.exits += 1;
            let (position, action) = if let GuestExit::Sync = exit {
                // A sync is a position of its own (recorded here on a live
                // run; already applied from the log on a replay).
                let position = Position { exit: self.exits, rip: self.machine.current_rip()? };
                tracing::trace!(exit = self.exits, rip = format_args!("{:#x}", position.rip), kind = "sync");
                self.take_sync(position)?;
                (position, PortAction::None)
            } else {
                let position = Position { exit: self.exits, rip: self.machine.exit_rip()? };
                tracing::trace!(exit = self.exits, rip = format_args!("{:#x}", position.rip), kind = %exit.kind());
                self.check_in(position, exit.kind())?;
                let action = self.dispatch(exit, position)?;
                self.serve_disk_backlog(position)?;
                let output = self.devices.tx.take();
                if !output.is_empty() {
                    self.output.output(position, output);
                }
                if let PortAction::Exit(status) = action {
                    return self.finish(position, status);
                }
                (position, action)
            };
            self.devices.advance_timers(self.clock.now_ns());
            self.digest_check_point(position)?;
            self.take_inputs(position, action == PortAction::Idle)?;
            self.passed(position)?;
            self.maybe_save_snapshot(position.exit)?;
        }
    }

    /// Step 1: the exit becomes a position in the log, or is checked against it.
    fn check_in(&mut self, position: Position, kind: ExitKind) -> Result<(), RunError> {
        match &mut self.inputs {
            Inputs::Live(live) => match &mut live.recorder {
                Some(r) => r.exit(position, kind).map_err(log_write_error),
                None => Ok(()),
            },
            Inputs::Replay(r) => match r.exit(position, kind) {
                Ok(()) => Ok(()),
                Err(e) => self.end_of_log(e.into()),
            },
        }
    }

    fn diverged(&self, expected: impl std::fmt::Display, got: impl std::fmt::Display) -> RunError {
        RunError::Divergence(Divergence { exit: self.exits, expected: expected.to_string(), got: got.to_string() })
    }

    /// The guest wrote its exit status.
    fn finish(&mut self, position: Position, status: u8) -> Result<Outcome, RunError> {
        let digest = if self.want_digest {
            Some(digest::state_digest(&self.machine, &self.devices.state(), &self.clock, self.exits)?)
        } else {
            None
        };
        match &mut self.inputs {
            Inputs::Live(live) => {
                if let (Some(mut r), Some(d)) = (live.recorder.take(), digest) {
                    r.end(status, d).map_err(log_write_error)?;
                    r.passed().map_err(log_write_error)?;
                    if let (LogSink::Primary(link), Role::Primary { finish_timeout, .. }) = (r.into_sink(), &self.role)
                    {
                        // Let the backup have the whole log, so it can end as we do.
                        if !link.finish(*finish_timeout) {
                            eprintln!("ftvmm: primary: the backup did not acknowledge the end of the log");
                        } else if let Some((_, line)) = self.join_report.take() {
                            // It acknowledged the log after its state.
                            eprintln!("{line}");
                        }
                    }
                }
            }
            Inputs::Replay(r) => {
                let d = digest.unwrap_or(replay::Digest([0; 32]));
                if let Err(e) = r.end(position, status, d) {
                    self.end_of_log(e.into())?;
                }
            }
        }
        let (commit_latency, commit_hops) = match &self.role {
            Role::Primary { gate, .. } => (gate.latency_stats(), gate.hop_stats()),
            _ => (None, Vec::new()),
        };
        // (A backup that went live has dropped its link, and its figures.)
        let ack_delay = match &mut self.inputs {
            Inputs::Replay(r) => match r.source_mut() {
                LogSource::Backup(link) => link.ack_delay_stats(),
                LogSource::File(_) => None,
            },
            Inputs::Live(_) => None,
        };
        Ok(Outcome {
            status,
            digest,
            exits: self.exits,
            commit_latency,
            commit_hops,
            ack_delay,
            checks: self.check_stats(),
            syncs: self.syncs,
            disk_peaks: (self.disk.as_ref().map_or(0, |d| d.deferred_peak()), self.output.kept_disk_peak()),
        })
    }
}

// TSC_HZ is 1 GHz, which is what lets TSC values be virtual nanoseconds.
const _: () = assert!(TSC_HZ == 1_000_000_000);
