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
//! 6. the FT role's bookkeeping, through [`RoleHooks`] (the watermark,
//!    released output, a lost peer: [`crate::ft`]).
//!
//! The role is asked at every point where fault tolerance changes what
//! happens ([`role`]): an exit passed, the end of the log, a divergence, an
//! idle guest, the end of the run. No code here knows which role it is.

mod delivery;
mod digest_check;
mod dispatch;
mod exit;
mod role;
mod state;
mod sync;

pub use digest_check::CheckPolicy;
pub use role::{Alone, Idle, RoleHooks};

pub use state::{check_begin, restore_state, Restored};

use crate::clock::{VirtualClock, TSC_HZ};
use crate::devices::{Devices, PortAction};
use crate::digest;
use crate::error::{log_write_error, RunError};
use crate::host::disk::{DiskPort, MAX_DEFERRED_BYTES};
use crate::inputs::Inputs;
use crate::log_io::LogSource;
use crate::metrics::VmMetrics;
use crate::output::Outputs;
use crate::vm::Machine;
use exit::GuestExit;
use logging_channel::LatencySummary;
use replay::{Divergence, ExitKind, Header, Position};
use std::collections::HashSet;
use std::sync::Arc;

/// How a run ended when the guest ended it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u8,
    pub digest: Option<replay::Digest>,
    pub exits: u64,
    /// The exits by kind (`--stats`), as the metrics count them.
    pub exits_by_kind: Vec<(&'static str, u64)>,
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
    pub(crate) output: Box<dyn Outputs>,
    /// The VMM's part in fault tolerance (taken out while it is asked).
    role: Box<dyn RoleHooks>,
    /// The disk's storage, if the VM has a disk.
    pub(crate) disk: Option<DiskPort>,
    /// The exit at which an interrupt was last injected (one per exit).
    injected_at: u64,
    /// The exit at which the disk last served its queue (one share an exit).
    disk_served_at: u64,
    /// This exit is an idle that answers the time it woke at.
    wake_clock_due: bool,
    /// That time, when a replay found it logged among the exit's inputs.
    logged_wake_ns: Option<u64>,
    /// Testing aid (`--testing-die-before-disk-read`): disk reads to go
    /// before this primary dies.
    pub die_before_disk_read: Option<u64>,
    /// RIPs of RDTSC instructions the loader rewrote into TSC port reads.
    rdtsc_sites: HashSet<u64>,
    /// Wall-clock time at boot, the RTC's base.
    wall_clock_base_ns: u64,
    /// What identifies this VM to a log, a peer or a snapshot; its
    /// `disk_generation` is the VM's current owner generation of the shared
    /// disk (the primary's, on a backup).
    pub(crate) header: Header,
    exits: u64,
    /// Compute the final state digest (for `--digest`, recording and replay).
    want_digest: bool,
    /// Save a snapshot at this exit, to this file (`--save-snapshot`).
    save_at: Option<(u64, std::path::PathBuf)>,
    /// Periodic digest checks (`--check-every-ms`, `--check-every-exits`)
    /// and the `--inject-divergence-at` testing aid.
    checks: digest_check::Checks,
    /// Kick the guest after this long without an exit when an interrupt is due.
    pub sync_after: std::time::Duration,
    /// Kicks the vCPU thread out of the guest (created when the run starts).
    kicker: Option<crate::kick::Kicker>,
    /// When the guest last exited (or was synced): its stretch began.
    stretch_started: std::time::Instant,
    /// The position of the last state sync.
    pub(crate) synced_at: u64,
    syncs: sync::SyncStats,
    /// The pages the syncs keep writable (a primary's).
    hot: sync::HotPages,
    /// What operators watch (`--metrics`): counted as the run goes.
    pub(crate) metrics: Arc<VmMetrics>,
    /// The metrics server, serving for as long as the VM runs.
    watcher: Option<telemetry::MetricsServer>,
}

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        machine: Machine,
        devices: Devices,
        inputs: Inputs,
        output: Box<dyn Outputs>,
        role: Box<dyn RoleHooks>,
        disk: Option<DiskPort>,
        rdtsc_sites: HashSet<u64>,
        header: Header,
        want_digest: bool,
        metrics: Arc<VmMetrics>,
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
            wake_clock_due: false,
            logged_wake_ns: None,
            die_before_disk_read: None,
            rdtsc_sites,
            wall_clock_base_ns: header.wall_clock_base_ns,
            header,
            exits: 0,
            want_digest,
            save_at: None,
            checks: digest_check::Checks::new(CheckPolicy::OFF, None),
            sync_after: std::time::Duration::from_millis(1),
            kicker: None,
            stretch_started: std::time::Instant::now(),
            synced_at: 0,
            syncs: sync::SyncStats::default(),
            hot: sync::HotPages::default(),
            metrics,
            watcher: None,
        }
    }

    /// Keeps `server` serving the VM's metrics while it runs.
    pub fn keep_serving(&mut self, server: telemetry::MetricsServer) {
        self.watcher = Some(server);
    }

    /// Asks the role: `hook` gets it and the VM. (The role is out of the
    /// VM meanwhile; no hook asks it again.)
    fn with_role<T>(&mut self, hook: impl FnOnce(&mut dyn RoleHooks, &mut Vmm) -> T) -> T {
        let mut role = std::mem::replace(&mut self.role, Box::new(Alone));
        let out = hook(role.as_mut(), self);
        self.role = role;
        out
    }

    /// A replay ran out of log: the role says whether the VM carries on
    /// (a backup goes live) or the run ends with `err`.
    fn end_of_log(&mut self, err: RunError) -> Result<(), RunError> {
        self.with_role(|role, vm| role.end_of_log(vm, err))
    }

    /// Stops the state syncs (a primary without a backup: the next one's
    /// joining restarts them).
    pub(crate) fn stop_syncs(&mut self) -> Result<(), RunError> {
        self.machine.dirty.stop(crate::memory::dirty::Consumer::Sync)?;
        self.hot = Default::default();
        Ok(())
    }

    /// The VMM is done with exit `position` and resumes the guest: the
    /// role's bookkeeping, and the disk's unapplied writes kept within
    /// their bound.
    fn passed(&mut self, position: Position) -> Result<(), RunError> {
        self.check_disk()?;
        self.with_role(|role, vm| role.passed(vm, position))?;
        self.wait_for_disk_room(position)
    }

    /// A VMM whose storage failed a write halts: what the guest saw
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
    /// the backup's acks release the writes to the writer thread; the role
    /// does the rest ([`RoleHooks::holding_for_disk`]).
    fn wait_for_disk_room(&mut self, position: Position) -> Result<(), RunError> {
        while self.disk.as_ref().is_some_and(|d| d.deferred_bytes() > MAX_DEFERRED_BYTES) {
            self.check_disk()?;
            self.with_role(|role, vm| role.holding_for_disk(vm, position))?;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
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
                Err(RunError::Divergence(d)) => {
                    if let Err(e) = self.with_role(|role, vm| role.diverged(vm, d)) {
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
            self.metrics.exit(exit.class());
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
                self.poll_nic(position);
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
            if std::mem::take(&mut self.wake_clock_due) {
                self.answer_wake_clock()?;
            }
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
                    self.role.log_complete(r.into_sink());
                }
            }
            Inputs::Replay(r) => {
                let d = digest.unwrap_or(replay::Digest([0; 32]));
                if let Err(e) = r.end(position, status, d) {
                    self.end_of_log(e.into())?;
                }
            }
        }
        let (commit_latency, commit_hops) = self.role.commit_stats();
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
            exits_by_kind: self.metrics.exits_by_kind(),
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
