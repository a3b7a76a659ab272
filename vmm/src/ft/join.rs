//! Re-protection: a new backup joins the running VM by live state transfer
//! (pre-copy), so the VM survives failure after failure.
//!
//! 1. A background thread accepts a joining backup whenever the VM has
//!    none ([`Joiner`]).
//! 2. The guest keeps running while a sender thread streams all of memory,
//!    then, round after round, the pages dirtied meanwhile (KVM's dirty log
//!    and the VMM's own writes), until few remain or [`MAX_ROUNDS`] is
//!    reached.
//! 3. At the next guest-caused exit the vCPU thread stops the guest, sends
//!    the last dirty pages, the vCPU and device state and the digest, and
//!    from that exit on the log streams as usual: outputs after it wait for
//!    the new backup's acknowledgement.
//!
//! A backup that fails mid-transfer leaves the VM running alone, accepting
//! the next one.

use super::{FtRole, FtState, OutputGate, Reason, Role};
use crate::devices::Devices;
use crate::error::{log_write_error, RunError};
use crate::host::disk::{OpSeq, PendingOps};
use crate::inputs::Inputs;
use crate::log_io::LogSink;
use crate::memory::dirty::{Consumer, DirtyTracker};
use crate::memory::{GuestMem, PAGE_SIZE};
use crate::output::PendingOutputs;
use crate::run::{check_begin, restore_state, Restored, Vmm};
use crate::snapshot::{self, SnapshotError, StateItem, StateReader, StateWriter};
use crate::vm::Machine;
use logging_channel::{BackupLink, PrimaryLink, StateSender};
use replay::{Header, Recorder};
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Pre-copy rounds after the first full copy, at most...
pub const MAX_ROUNDS: u32 = 8;
/// ...and it stops early once a round finds no more dirty pages than this
/// (the final pause then copies about as many).
pub const FINAL_PAGES: u64 = 256;
/// Bytes of state buffered before they go to the channel.
const CHUNK: usize = 1 << 20;

/// Why a state transfer to a backup stopped (the backup is then lost to
/// this transfer: a joining one leaves the VM running alone).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("sending the state: {0}")]
    Send(#[from] std::io::Error),
    #[error("the logging channel: {0}")]
    Channel(#[from] logging_channel::ChannelError),
    #[error("the dirty log: {0}")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("taking the VM's state: {0}")]
    Vm(#[from] RunError),
    #[error("the pre-copy thread panicked")]
    Panicked,
    #[error("no pre-copy")]
    NoPrecopy,
}

/// A finished transfer, said once the backup acknowledges the log past it.
pub(super) struct JoinReport {
    /// The state's exit.
    exit: u64,
    /// A repair of the current backup, not a new one.
    resync: bool,
    /// What the primary says then.
    line: String,
}

/// A state transfer under way.
pub struct Transfer {
    link: PrimaryLink,
    precopy: Option<JoinHandle<Result<Precopy, TransferError>>>,
    done: Arc<AtomicBool>,
    started: Instant,
    /// A repair of the current backup ([`super::repair`]), not a new
    /// one joining: its outputs are held meanwhile, and losing it is losing
    /// the backup.
    resync: bool,
}

/// What the pre-copy thread hands back for the final round.
struct Precopy {
    writer: StateWriter<StateOut>,
    rounds: u32,
    /// Disk ops up to this one were sent (those then not yet applied):
    /// the final round sends only later ones.
    disk_sent_through: OpSeq,
}

/// Buffers the state stream and sends it in chunks of [`CHUNK`] bytes.
struct StateOut {
    sender: StateSender,
    buf: Vec<u8>,
    sent: u64,
}

impl Write for StateOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.sent += chunk.len() as u64;
        self.sender.send_state(chunk).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

fn count_pages(dirty: &[u64]) -> u64 {
    dirty.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// The pre-copy: every page, then rounds of dirty pages, while the guest runs.
fn precopy(
    dirty_log: Arc<DirtyTracker>,
    mem: GuestMem,
    mem_size: u64,
    begin: StateItem,
    sender: StateSender,
    done: Arc<AtomicBool>,
    disk: Option<PendingOps>,
) -> Result<Precopy, TransferError> {
    let result = (|| {
        let waiter = sender.clone();
        let out = StateOut { sender, buf: Vec::with_capacity(CHUNK), sent: 0 };
        let mut w = StateWriter::new(out)?;
        w.item(&begin)?;
        snapshot::memory_items(&mem, mem_size, None, |i| w.item(&i))?;
        let mut rounds = 0;
        while rounds < MAX_ROUNDS {
            let dirty = dirty_log.take(Consumer::Transfer)?;
            rounds += 1;
            let n = count_pages(&dirty);
            snapshot::memory_items(&mem, mem_size, Some(&dirty), |i| w.item(&i))?;
            if n <= FINAL_PAGES {
                break;
            }
        }
        // The disk ops not yet applied now (the writer may lag slow storage
        // by many MiB): sent while the guest runs, so that the final pause
        // carries only those issued after.
        let ops = disk.map(|d| d.list()).unwrap_or_default();
        let disk_sent_through = ops.last().map_or(0, |(seq, _)| *seq);
        let pending = PendingOutputs { disk: ops, ..Default::default() };
        snapshot::pending_items(&pending, |i| w.item(&i))?;
        // Everything so far reaches the backup before the guest stops: the
        // final round then waits for nothing but its own bytes.
        w.flush()?;
        waiter.wait_consumed()?;
        Ok(Precopy { writer: w, rounds, disk_sent_through })
    })();
    done.store(true, Ordering::Release);
    result
}

impl FtRole {
    /// For a primary without a backup: start a transfer to a backup that
    /// joined, and, `at_boundary` (the current exit fully handled), finish
    /// one whose pre-copy is done. Returns whether a finish waits for a
    /// boundary.
    pub(super) fn tend_protection(&mut self, vm: &mut Vmm, at_boundary: bool) -> Result<bool, RunError> {
        if !matches!(self.role, Role::Primary { joiner: Some(_), .. }) || vm.inputs.primary_link().is_some() {
            return Ok(false);
        }
        if let Some(t) = &self.transfer {
            let done = t.done.load(Ordering::Acquire);
            if done && at_boundary {
                self.finish_transfer(vm)?;
                return Ok(false);
            }
            return Ok(done);
        }
        let Role::Primary { joiner: Some(joiner), .. } = &self.role else { return Ok(false) };
        let Some(link) = joiner.joined() else { return Ok(false) };
        eprintln!("ftvmm: primary: a backup joins at exit {}; copying the VM's state", vm.exits());
        self.status.set_peer(Some(link.peer().to_string()));
        self.status.set(
            FtState::Starting,
            Reason::Initializing,
            format!("a backup joins from {} at exit {}: copying the VM's state", link.peer(), vm.exits()),
        );
        self.start_transfer(vm, link, false)
    }

    /// Starts the pre-copy of the whole state to the backup on `link` (a
    /// joining one, or, `resync`, the current one being repaired).
    pub(super) fn start_transfer(&mut self, vm: &mut Vmm, link: PrimaryLink, resync: bool) -> Result<bool, RunError> {
        vm.machine.dirty.start(Consumer::Transfer)?;
        let done = Arc::new(AtomicBool::new(false));
        let (dirty, mem, size, begin, sender, flag, disk) = (
            vm.machine.dirty.clone(),
            vm.machine.mem.clone(),
            vm.machine.mem_size,
            vm.state_begin(),
            link.state_sender(),
            done.clone(),
            vm.disk.as_ref().map(|d| d.pending_view()),
        );
        let precopy = std::thread::spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::StateSender);
            precopy(dirty, mem, size, begin, sender, flag, disk)
        });
        self.transfer = Some(Transfer { link, precopy: Some(precopy), done, started: Instant::now(), resync });
        Ok(false)
    }

    /// The final round, with the guest stopped at this exit; from here on
    /// the new backup protects the VM.
    fn finish_transfer(&mut self, vm: &mut Vmm) -> Result<(), RunError> {
        let Some(mut t) = self.transfer.take() else { return Ok(()) };
        let pre = t.precopy.take().map(|h| h.join().unwrap_or(Err(TransferError::Panicked)));
        let paused = Instant::now();
        let result = match pre {
            Some(Ok(pre)) => final_round(vm, pre, &t),
            Some(Err(e)) => Err(e),
            None => Err(TransferError::NoPrecopy),
        };
        vm.machine.dirty.stop(Consumer::Transfer)?;
        let (rounds, sent, (pending_ops, pending_bytes)) = match result {
            Ok(done) => done,
            Err(why) if t.resync => {
                // The backup being repaired is gone: as for any lost
                // backup, win the arbitration before releasing its outputs.
                let position = replay::Position { exit: vm.exits(), rip: 0 };
                self.backup_loss_reported = true;
                return self.backup_lost(vm, position, &format!("lost during its resynchronization: {why}"));
            }
            Err(why) => {
                eprintln!(
                    "ftvmm: primary: the joining backup was lost during the state transfer ({why}); running alone"
                );
                self.status.set_peer(None);
                self.status.set(
                    FtState::NeedsSecondary,
                    Reason::LostConnection,
                    format!("the joining backup was lost during the state transfer ({why})"),
                );
                if let Role::Primary { joiner: Some(j), .. } = &self.role {
                    j.want_one();
                }
                return Ok(());
            }
        };
        let pause = paused.elapsed();
        let exit = vm.exits();
        let Role::Primary { gate, shipped, .. } = &mut self.role else { return Ok(()) };
        // Outputs of later exits wait for the new backup's acks.
        gate.protect_after(exit);
        *shipped = (exit, Instant::now());
        t.link.on_ack(OutputGate::ack_callback(gate));
        if let Inputs::Live(live) = &mut vm.inputs {
            live.recorder = Some(Recorder::new(LogSink::Primary(t.link)));
        }
        self.backup_loss_reported = false;
        let what = if t.resync { "resynchronized" } else { "joined" };
        // Said once the backup acknowledges the log after the state: only
        // then has it the whole state (and could go live without us).
        self.join_report = Some(JoinReport {
            exit,
            resync: t.resync,
            line: format!(
                "ftvmm: primary: backup {what} at exit {exit}: {rounds} pre-copy round(s), {:.1} MiB sent in {:.0} ms, \
                 final pause {:.1} ms (with {pending_ops} disk op(s) not yet applied, {} KiB: the rest went with the \
                 pre-copy); protected",
                sent as f64 / (1 << 20) as f64,
                t.started.elapsed().as_secs_f64() * 1e3,
                pause.as_secs_f64() * 1e3,
                pending_bytes >> 10
            ),
        });
        Ok(())
    }

    /// Says the new backup joined once it has acknowledged the log past the
    /// state's exit (see [`FtRole::finish_transfer`]).
    pub(super) fn report_join(&mut self, vm: &mut Vmm) {
        let Some(report) = &self.join_report else { return };
        let exit = report.exit;
        let Some(link) = vm.inputs.primary_link() else { return };
        // (A lost link reports everything acknowledged: that is no join.)
        let (lost, acked) = (link.backup_lost().is_some(), link.acked() >= exit);
        if lost || acked {
            if let Some(report) = self.join_report.take().filter(|_| !lost) {
                self.joined(report);
            }
        }
    }

    /// The backup acknowledged the log after its state: say so, count it,
    /// and the VM is protected.
    pub(super) fn joined(&mut self, report: JoinReport) {
        eprintln!("{}", report.line);
        let m = &self.status.metrics;
        let (counter, reason) =
            if report.resync { (&m.resyncs, Reason::Resynchronized) } else { (&m.joins, Reason::BackupJoined) };
        counter.inc();
        let detail = format!("the backup acknowledged the state of exit {}", report.exit);
        self.status.set(FtState::Protected, reason, detail);
    }

    /// The primary lost its backup and won the arbitration: stop recording
    /// to the dead link, and accept the next backup.
    pub(super) fn unprotected(&mut self, vm: &mut Vmm) -> Result<(), RunError> {
        if let Inputs::Live(live) = &mut vm.inputs {
            if let Some(mut r) = live.recorder.take() {
                r.flush().map_err(log_write_error).ok();
            }
        }
        // No syncs without a backup: the next one's joining restarts them.
        vm.stop_syncs()?;
        if let Role::Primary { joiner: Some(j), .. } = &self.role {
            eprintln!("ftvmm: primary: accepting a new backup on {}", j.addr);
            j.want_one();
        }
        Ok(())
    }
}

/// Sends the last dirty pages, the machine state and the digest; ends the
/// state. Returns (rounds, bytes sent).
fn final_round(vm: &mut Vmm, pre: Precopy, t: &Transfer) -> Result<(u32, u64, (usize, u64)), TransferError> {
    let Precopy { mut writer, rounds, disk_sent_through } = pre;
    // Completing the exit may write memory (string I/O): before the last dirty log.
    let machine = vm.machine_state()?;
    let m = &vm.machine;
    let dirty = m.dirty.take(Consumer::Transfer)?;
    snapshot::memory_items(&m.mem, m.mem_size, Some(&dirty), |i| writer.item(&i))?;
    // The new backup has the memory of this exit: the next state sync
    // carries the pages written from here on.
    m.dirty.start(Consumer::Sync)?;
    // What has not left this VMM yet goes with the state: the new backup
    // must hold it to go live without losing it. Disk ops: those issued
    // since the pre-copy sent the rest. (The writer may apply some
    // meanwhile: the backup forgets them as the progress reports come.)
    let mut pending = vm.pending_outputs();
    pending.disk.retain(|(seq, _)| *seq > disk_sent_through);
    snapshot::pending_items(&pending, |i| writer.item(&i))?;
    writer.item(&StateItem::Machine(Box::new(machine)))?;
    let digest = vm.digest_now(false)?;
    writer.item(&StateItem::End { digest, memory: false })?;
    let mut out = writer.into_inner();
    out.flush()?;
    t.link.end_state(vm.exits())?;
    let pending_disk = (pending.disk.len(), pending.disk.iter().map(|(_, op)| op.bytes()).sum());
    Ok((rounds, out.sent, pending_disk))
}

/// The primary's whole state, from the logging channel (a backup joining,
/// or repairing a divergence), restored into `machine` and `devices`.
pub fn receive_state(
    link: &mut BackupLink,
    header: &Header,
    mem_size: u64,
    machine: &mut Machine,
    devices: &mut Devices,
) -> Result<Restored, SnapshotError> {
    let mut reader = StateReader::new(BufReader::with_capacity(1 << 20, StateIn::new(link)))?;
    check_begin(reader.next_item()?, header, mem_size)?;
    let restored = restore_state(machine, devices, &mut reader)?;
    // The channel's end of the state, after the stream's End item.
    let mut rest = reader.into_inner();
    if rest.fill_buf()?.is_empty() && rest.into_inner().finish()? {
        Ok(restored)
    } else {
        Err(SnapshotError::Corrupt("data after the state's End item".into()))
    }
}

/// Reads a state stream from the logging channel (a joining backup).
struct StateIn<'a> {
    link: &'a mut BackupLink,
    buf: Vec<u8>,
    at: usize,
}

impl<'a> StateIn<'a> {
    fn new(link: &'a mut BackupLink) -> Self {
        StateIn { link, buf: Vec::new(), at: 0 }
    }
}

impl StateIn<'_> {
    /// Reads the channel's end of the state; false if data comes first.
    fn finish(&mut self) -> std::io::Result<bool> {
        if self.at < self.buf.len() {
            return Ok(false);
        }
        match self.link.next_state_chunk() {
            Ok(None) => Ok(true),
            Ok(Some(chunk)) => Ok(chunk.is_empty() && self.finish()?),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }
}

impl std::io::Read for StateIn<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.link.next_state_chunk() {
                Ok(Some(chunk)) => {
                    self.buf = chunk;
                    self.at = 0;
                }
                Ok(None) => return Ok(0),
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

// A page is what the dirty log and the state stream count in.
const _: () = assert!(PAGE_SIZE == 4096);
