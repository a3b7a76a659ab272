//! Fault tolerance: the VMM's role in a pair and everything it does as one.
//! The run loop ([`crate::run`]) asks the role at the points that matter
//! through [`RoleHooks`]; [`FtRole`] answers:
//! - the role's state ([`Role`]: a primary, a backup, or alone after going
//!   live) — nothing outside this module looks inside it;
//! - the outputs' fault-tolerant regimes ([`outputs`]): [`Held`], the
//!   primary's output rule — each output waits in the [`OutputGate`] until
//!   the backup has acknowledged the log up to the position that produced
//!   it; [`Suppressed`], the backup's while it replays — kept until the
//!   primary reports it released, re-emitted when the backup goes live
//!   (a VM alone uses [`crate::output::Direct`]);
//! - [`failover`]: the primary's watermark and acks, a lost backup, the
//!   go-live arbitration, and a backup going live where its primary's log
//!   ends (with [`HostNic`]'s MAC announcement);
//! - [`join`]: re-protection, a new backup joining by live state transfer
//!   (accepted by the [`Joiner`]);
//! - [`repair`]: a diverged backup restoring the primary's whole state.
//!
//! Disk ops are outputs too, counted by op number (`OpSeq`), not by exit:
//! the primary reports how far its storage has applied them, the backup
//! keeps every op above that, and a backup that joins (or resyncs) receives
//! the primary's unapplied ops with the state (`PendingOutputs`). Going
//! live, the backup re-issues its kept ops and flushes before it re-emits
//! any other output, which may depend on them. A primary without a backup
//! releases an output only once every disk op before it is applied: nobody
//! else holds those writes.

mod failover;
mod gate;
mod join;
mod joiner;
mod nic;
mod outputs;
mod repair;
pub mod status;
#[cfg(test)]
mod tests;

pub use gate::{CommitHops, Item, OutputGate};
pub use join::receive_state;
pub use joiner::Joiner;
pub use nic::{HostNic, RX_QUEUE_FRAMES};
pub use outputs::{Held, Suppressed, MAX_SUPPRESSED_FRAMES};
pub use status::{FtState, FtStatus, Reason};

use crate::arbiter::RemoteArbiter;
use crate::error::RunError;
use crate::host::console::{Endpoint, OutputPort};
use crate::log_io::LogSink;
use crate::run::{Idle, RoleHooks, Vmm};
use logging_channel::{ChannelConfig, LatencySummary, PrimaryListener};
use replay::{Divergence, Position};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The VMM's part in fault tolerance.
pub enum Role {
    /// Alone: a former backup, live (without `--listen`).
    Solo,
    /// The primary: inputs go to the backup, outputs wait for its acks.
    Primary {
        gate: Arc<OutputGate>,
        /// The exit up to which serial output has reached the outside world.
        delivered: Arc<AtomicU64>,
        finish_timeout: Duration,
        /// When the watermark was last shipped: (exit, time).
        shipped: (u64, Instant),
        /// Accepts a new backup whenever the VM has none (re-protection).
        joiner: Option<Joiner>,
    },
    /// The backup: replays the primary's log; when it ends (the primary is
    /// gone) it goes live and serves `endpoint`, with serial input from
    /// `serial_input` if given (`--serial-input`, opened at build time so
    /// that a VMM that dropped root can still use it), else from the endpoint.
    Backup {
        endpoint: Option<Endpoint>,
        serial_input: Option<std::fs::File>,
        /// The NIC's host side, its TAP drained until the backup goes live.
        nic: Option<HostNic>,
        /// Once live, accept backups of its own here (`--listen`).
        listener: Option<PrimaryListener>,
    },
}

impl Role {
    /// A primary at exit `exit`: outputs through `gate` to `port`'s
    /// console, accepting backups with `joiner` (and `channel`'s settings).
    pub fn primary(
        gate: &Arc<OutputGate>,
        port: &OutputPort,
        channel: &ChannelConfig,
        joiner: Joiner,
        exit: u64,
    ) -> Role {
        Role::Primary {
            gate: gate.clone(),
            delivered: port.delivered(),
            finish_timeout: channel.heartbeat_timeout * 5,
            shipped: (exit, Instant::now()),
            joiner: Some(joiner),
        }
    }

    /// A backup that goes live on `endpoint` (its serial input from
    /// `serial_input` if given), with the NIC's host side `nic`, accepting
    /// backups of its own on `listener` once live.
    pub fn backup(
        endpoint: Endpoint,
        serial_input: Option<std::fs::File>,
        nic: Option<HostNic>,
        listener: Option<PrimaryListener>,
    ) -> Role {
        Role::Backup { endpoint: Some(endpoint), serial_input, nic, listener }
    }
}

/// A primary's or a backup's role, with what it keeps across exits. (The
/// shared disk's owner generation is the VM's: its header's.)
pub struct FtRole {
    role: Role,
    /// The arbiter-only ftdisk go-live arbitration happens on (`--arbiter`).
    arbiter: Option<RemoteArbiter>,
    /// The logging channel's settings, for backups that join later.
    channel: ChannelConfig,
    /// A state transfer to a joining (or resyncing) backup, under way.
    transfer: Option<join::Transfer>,
    /// A finished transfer's exit and line, said once the backup acknowledges.
    join_report: Option<join::JoinReport>,
    /// The primary has said it lost its current backup (once).
    backup_loss_reported: bool,
    /// A backup's last repair: the exit of the state it restored. It may go
    /// live only once the primary reports the outputs up to it released.
    resynced_at: Option<u64>,
    /// The FT state operators watch, and the metrics behind it.
    status: Arc<FtStatus>,
    /// Watermarks shipped and not yet acknowledged, with when (the most
    /// recent [`MAX_LAG_MARKS`]): the backup's lag in seconds.
    lag_marks: VecDeque<(u64, Instant)>,
    /// When the primary's figures (lag, held output) were last sampled.
    sampled_at: Instant,
    /// Would-be backups refused, as last seen.
    refused_seen: u64,
}

/// Watermarks remembered for the lag in seconds (one per shipment, at
/// most every [`failover::SHIP_EVERY`] or so: seconds of them).
const MAX_LAG_MARKS: usize = 4096;
/// How often the primary's figures are sampled into the metrics.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

impl FtRole {
    /// `role`, arbitrating on `arbiter` (else on the shared disk, if any),
    /// accepting later backups with `channel`'s settings.
    /// `status`: its FT state, already set as the VMM starts.
    pub fn new(role: Role, arbiter: Option<RemoteArbiter>, channel: ChannelConfig, status: Arc<FtStatus>) -> FtRole {
        FtRole {
            role,
            arbiter,
            channel,
            transfer: None,
            join_report: None,
            backup_loss_reported: false,
            resynced_at: None,
            status,
            lag_marks: VecDeque::new(),
            sampled_at: Instant::now(),
            refused_seen: 0,
        }
    }

    /// The figures of the last seconds (exits and log bytes per second)
    /// and a primary's into the metrics, at most every [`SAMPLE_EVERY`]:
    /// the backup's lag in exits and seconds (from the
    /// shipped watermarks not yet acknowledged), the held outputs, the
    /// commit hops.
    fn sample(&mut self, vm: &mut Vmm) {
        if self.sampled_at.elapsed() < SAMPLE_EVERY {
            return;
        }
        self.sampled_at = Instant::now();
        let m = &self.status.metrics;
        let c = &self.channel.counters;
        let log_bytes = c.log_bytes_sent.load(Ordering::Relaxed) + c.log_bytes_received.load(Ordering::Relaxed);
        m.observe_rates(log_bytes);
        // A would-be backup refused while the VM needs one: that is why.
        let refused = c.peers_refused.load(Ordering::Relaxed);
        if refused > self.refused_seen {
            self.refused_seen = refused;
            if self.status.state() == FtState::NeedsSecondary {
                self.status.set(FtState::NeedsSecondary, Reason::BackupRefused, format!("{refused} backup(s) refused"));
            }
        }
        let Role::Primary { gate, .. } = &self.role else { return };
        let (held, bytes) = gate.held_figures();
        m.held_outputs.set(held as i64);
        m.held_output_bytes.set(bytes as i64);
        for (hop, (_, p50, p99, _)) in gate.hop_stats() {
            for (quantile, us) in [("0.5", p50), ("0.99", p99)] {
                m.commit_hop_seconds.get_or_create(&crate::metrics::HopLabels { hop, quantile }).set(us as f64 / 1e6);
            }
        }
        let acked = vm.inputs.primary_link().map(|link| link.acked());
        match acked {
            Some(acked) => {
                while self.lag_marks.front().is_some_and(|(exit, _)| *exit <= acked) {
                    self.lag_marks.pop_front();
                }
                m.lag_exits.set(vm.exits().saturating_sub(acked) as i64);
                m.lag_seconds.set(self.lag_marks.front().map_or(0.0, |(_, at)| at.elapsed().as_secs_f64()));
            }
            None => {
                self.lag_marks.clear();
                m.lag_exits.set(0);
                m.lag_seconds.set(0.0);
            }
        }
    }

    /// The primary shipped the watermark `exit` now.
    fn shipped(&mut self, exit: u64) {
        if self.lag_marks.len() == MAX_LAG_MARKS {
            self.lag_marks.pop_front();
        }
        self.lag_marks.push_back((exit, Instant::now()));
    }
}

impl RoleHooks for FtRole {
    fn passed(&mut self, vm: &mut Vmm, position: Position) -> Result<(), RunError> {
        self.tend_role(vm, position)?;
        self.report_join(vm);
        self.sample(vm);
        Ok(())
    }

    fn holding_for_disk(&mut self, vm: &mut Vmm, position: Position) -> Result<(), RunError> {
        // A lost backup's writes are released once the arbitration is won;
        // a transfer under way (whose final round needs a boundary) ends here.
        if let Some(why) = self.newly_lost_backup(vm) {
            self.backup_lost(vm, position, &why)?;
        }
        self.answer_resync(vm)?;
        self.tend_protection(vm, true)?;
        Ok(())
    }

    fn end_of_log(&mut self, vm: &mut Vmm, err: RunError) -> Result<(), RunError> {
        self.go_live(vm, err)
    }

    fn diverged(&mut self, vm: &mut Vmm, divergence: Divergence) -> Result<(), RunError> {
        if !self.can_resync(vm) {
            return Err(RunError::Divergence(divergence));
        }
        self.status.metrics.divergences.inc();
        self.status.set(FtState::Resynchronizing, Reason::Divergence, divergence.to_string());
        let repaired = self.resync(vm, divergence);
        match &repaired {
            Ok(()) => {
                self.status.metrics.resyncs.inc();
                self.status.set(
                    FtState::Replaying,
                    Reason::Resynchronized,
                    format!("resynchronized at exit {}", vm.exits()),
                );
            }
            Err(e) => self.status.set(FtState::Halted, Reason::DivergenceHalted, e.to_string()),
        }
        repaired
    }

    fn idling(&mut self, vm: &mut Vmm, position: Position) -> Result<Idle, RunError> {
        if self.tend_protection(vm, false)? {
            // A joining backup's state is ready for its final round, which
            // needs an exit boundary: let the idle guest resume.
            return Ok(Idle::Resume);
        }
        if let Some(why) = self.newly_lost_backup(vm) {
            self.backup_lost(vm, position, &why)?;
        }
        // A backup that joined just before the guest went idle acknowledges
        // while it idles.
        self.report_join(vm);
        self.sample(vm);
        // Keep an eye on the backup (or a joining one) while the guest idles.
        let watch_peer =
            vm.inputs.primary_link().is_some() || matches!(self.role, Role::Primary { joiner: Some(_), .. });
        Ok(Idle::Wait { watch_peer })
    }

    fn may_go_live(&self) -> bool {
        matches!(self.role, Role::Backup { endpoint: Some(_), .. })
    }

    fn log_complete(&mut self, sink: LogSink) {
        let (LogSink::Primary(link), Role::Primary { finish_timeout, .. }) = (sink, &self.role) else { return };
        // Let the backup have the whole log, so it can end as we do.
        if !link.finish(*finish_timeout) {
            eprintln!("ftvmm: primary: the backup did not acknowledge the end of the log");
        } else if let Some(report) = self.join_report.take() {
            // It acknowledged the log after its state.
            self.joined(report);
        }
    }

    fn commit_stats(&self) -> (Option<LatencySummary>, Vec<(&'static str, LatencySummary)>) {
        match &self.role {
            Role::Primary { gate, .. } => (gate.latency_stats(), gate.hop_stats()),
            _ => (None, Vec::new()),
        }
    }
}

/// How this VMM calls itself in the arbitration record.
pub fn owner_name(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{role} pid {} on {}", std::process::id(), host.trim())
}
