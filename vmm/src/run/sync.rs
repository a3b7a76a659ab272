//! Incremental state syncs: how a guest that runs long without an exit is
//! still given its interrupts at reproducible positions.
//!
//! Live (a solo run, a recording, the primary): when an interrupt is due and
//! the vCPU has run longer than `--sync-after-us` without an exit, the
//! [`Kicker`](crate::kick::Kicker) stops it. That stop is a *sync*, a
//! position of its own (the next exit count): a recording logs the pages
//! dirtied since the last sync and the complete vCPU state there; then the
//! interrupt is injected as at any exit. A run that records nothing only
//! injects.
//!
//! Replay (the backup, `--replay`): the lockstep rule holds the vCPU at each
//! exit until the log shows what follows. If that is a sync, the backup does
//! not execute the stretch (it could not stop where the primary was kicked):
//! it writes the sync's pages and sets the vCPU state instead, then takes
//! the sync's inputs.
//!
//! A shadow-paging KVM does not notice page-table pages written from
//! userspace (docs/platform.md), so when a sync changes a page of the
//! guest's paging structures the backup makes KVM rebuild its shadow tables.

use crate::error::{log_write_error, RunError};
use crate::inputs::Inputs;
use crate::memory::dirty::Consumer;
use crate::memory::{GuestMem, PAGE_SIZE};
use crate::run::Vmm;
use crate::snapshot::{self, StateItem};
use crate::vm::{VcpuState, VmError};
use replay::{Divergence, Position, SyncPart};
use std::collections::HashSet;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

/// What the run's syncs cost.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncStats {
    /// Syncs taken (live) or applied (replay).
    pub count: u64,
    /// Non-zero page bytes they carried.
    pub page_bytes: u64,
    /// Record or apply time, in total and the longest, µs.
    pub total_us: u64,
    pub max_us: u64,
    /// Applied syncs that changed the guest's page tables (replay).
    pub table_changes: u64,
}

impl SyncStats {
    fn add(&mut self, page_bytes: u64, started: Instant) {
        let us = started.elapsed().as_micros() as u64;
        self.count += 1;
        self.page_bytes += page_bytes;
        self.total_us += us;
        self.max_us = self.max_us.max(us);
    }
}

/// Most pages kept hot (writable between syncs, see `crate::dirty`); their
/// copies take as much host memory.
const MAX_HOT_PAGES: usize = 16 * 1024;

/// The primary's record of its hot pages: each one's content at the last
/// sync, to cool a page the guest stopped rewriting.
#[derive(Default)]
pub(super) struct HotPages {
    copies: std::collections::HashMap<u64, Box<[u8]>>,
}

impl HotPages {
    /// After a sync found `dirty`: pages rewritten since the last sync
    /// become (or stay) hot; hot pages found unchanged cool down. Only a
    /// hint to the tracker: a sync carries every page reported dirty.
    fn update(&mut self, mem: &GuestMem, tracker: &crate::memory::dirty::DirtyTracker, dirty: &[u64]) {
        let mut page_buf = vec![0u8; PAGE_SIZE as usize];
        for (i, &word) in dirty.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = i as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if mem.read_slice(&mut page_buf, GuestAddress(page * PAGE_SIZE)).is_err() {
                    continue;
                }
                let room = self.copies.len() < MAX_HOT_PAGES;
                match self.copies.get_mut(&page) {
                    Some(copy) if **copy == page_buf[..] => {
                        self.copies.remove(&page);
                        tracker.set_hot(page, false);
                    }
                    Some(copy) => copy.copy_from_slice(&page_buf),
                    None if room => {
                        self.copies.insert(page, page_buf.clone().into_boxed_slice());
                        tracker.set_hot(page, true);
                    }
                    None => {}
                }
            }
        }
    }
}

/// Most paging-structure pages a walk collects (a guest with more is
/// treated as having changed its tables whenever a sync writes memory).
const MAX_TABLE_PAGES: usize = 4096;

impl Vmm {
    /// When to kick the vCPU it is about to enter, if ever: once an
    /// interrupt is due and the stretch has lasted `sync_after`. Only a live
    /// run kicks; a replay follows the log.
    pub(super) fn kick_deadline(&mut self) -> Option<Instant> {
        let Inputs::Live(live) = &self.inputs else { return None };
        let due = live.host.instant_at(self.devices.pit.next_irq0_deadline()?);
        Some(due.max(self.stretch_started + self.sync_after))
    }

    /// After a kick (or any signal): whether to sync here.
    pub(super) fn sync_due(&mut self) -> bool {
        let Inputs::Live(live) = &self.inputs else { return false };
        let timer_due = self.devices.pit.next_irq0_deadline().is_some_and(|ns| live.host.elapsed_ns() >= ns);
        (timer_due || self.devices.pic.has_pending()) && self.stretch_started.elapsed() >= self.sync_after
    }

    /// Step 1 of a sync position: a recording logs it; a replay has
    /// applied it already ([`Vmm::replay_sync`]).
    pub(super) fn take_sync(&mut self, position: Position) -> Result<(), RunError> {
        self.synced_at = position.exit;
        let Inputs::Live(live) = &mut self.inputs else { return Ok(()) };
        let Some(recorder) = &mut live.recorder else { return Ok(()) };
        let started = Instant::now();
        let vcpu = self.machine.save_vcpu()?;
        let state = bincode::serialize(&vcpu).map_err(|e| RunError::Io {
            what: "encoding the vCPU state of a sync",
            err: std::io::Error::other(e.to_string()),
        })?;
        let tracker = &self.machine.dirty;
        // The first sync since the backup's memory was last equal to ours
        // (boot, or a join) carries all of memory (zero runs cost nothing);
        // tracking starts before the walk, so no later write is missed.
        let dirty = if tracker.active(Consumer::Sync) {
            Some(tracker.take(Consumer::Sync)?)
        } else {
            tracker.start(Consumer::Sync)?;
            None
        };
        if let Some(dirty) = &dirty {
            self.hot.update(&self.machine.mem, tracker, dirty);
        }
        let mut page_bytes = 0u64;
        snapshot::memory_items(&self.machine.mem, self.machine.mem_size, dirty.as_deref(), |item| {
            let part = match item {
                StateItem::Pages { first, data } => {
                    page_bytes += data.len() as u64;
                    SyncPart::Pages { first, data }
                }
                StateItem::Zeros { first, count } => SyncPart::Zeros { first, count },
                _ => return Ok(()),
            };
            recorder.sync(position, part)
        })
        .map_err(log_write_error)?;
        recorder.sync(position, SyncPart::Vcpu { state }).map_err(log_write_error)?;
        self.count_sync(page_bytes, started);
        Ok(())
    }

    /// One more state sync, in the stats and the metrics.
    fn count_sync(&mut self, page_bytes: u64, started: Instant) {
        self.syncs.add(page_bytes, started);
        self.metrics.syncs.inc();
        self.metrics.sync_bytes.inc_by(page_bytes);
        self.metrics.sync_seconds.inc_by(started.elapsed().as_secs_f64());
    }

    /// The lockstep hold of a replay, before it resumes the vCPU: if the log
    /// shows a sync next, applies it and returns true (the sync is the next
    /// position). A log that ends (inside a sync, too) is the end of the log:
    /// a backup goes live here and executes the stretch itself.
    pub(super) fn replay_sync(&mut self) -> Result<bool, RunError> {
        let Inputs::Replay(r) = &mut self.inputs else { return Ok(false) };
        let sync = match r.next_sync(self.machine.mem_size) {
            Ok(Some(sync)) => sync,
            Ok(None) => return Ok(false),
            Err(e) => {
                self.end_of_log(e.into())?;
                return Ok(false);
            }
        };
        let started = Instant::now();
        let position = sync.position;
        let page_bytes = sync.page_bytes();
        self.apply_sync(sync).map_err(|why| {
            RunError::Divergence(Divergence {
                exit: position.exit,
                expected: "a state sync that applies".into(),
                got: why.to_string(),
            })
        })?;
        let rip = self.machine.current_rip()?;
        if rip != position.rip {
            return Err(self.diverged(format_args!("the state sync at {position}"), format_args!("rip {rip:#x}")));
        }
        self.count_sync(page_bytes, started);
        Ok(true)
    }

    /// Writes a sync's pages and sets its vCPU state (the guest stopped at
    /// the end of an exit, which is completed first).
    fn apply_sync(&mut self, sync: replay::Sync) -> Result<(), SyncError> {
        let m = &mut self.machine;
        m.complete_pending_io()?;
        let vcpu: VcpuState = bincode::deserialize(&sync.vcpu).map_err(|e| SyncError::Vcpu(e.to_string()))?;
        let old_cr3 = m.vcpu.get_sregs().map_err(|err| VmError::Kvm { what: "reading special registers", err })?.cr3;
        // The paging structures before and after: a change to any of them
        // must reach KVM's shadow tables.
        let mut tables = table_pages(&m.mem, m.mem_size, old_cr3);
        let mut changed_tables = tables.len() >= MAX_TABLE_PAGES;
        let mut writes = Vec::with_capacity(sync.memory.len());
        for part in sync.memory {
            writes.push(match part {
                SyncPart::Pages { first, data } => StateItem::Pages { first, data },
                SyncPart::Zeros { first, count } => StateItem::Zeros { first, count },
                SyncPart::Vcpu { .. } => return Err(SyncError::SecondVcpu),
            });
        }
        for item in &writes {
            if !changed_tables {
                changed_tables = touches_tables(&m.mem, item, &tables);
            }
            snapshot::apply_memory(&m.mem, m.mem_size, item)?;
        }
        if !changed_tables && vcpu.sregs.cr3 != old_cr3 {
            tables = table_pages(&m.mem, m.mem_size, vcpu.sregs.cr3);
            changed_tables = tables.len() >= MAX_TABLE_PAGES;
        }
        m.restore_vcpu(&vcpu)?;
        if changed_tables {
            m.rebuild_shadow_mmu()?;
            self.syncs.table_changes += 1;
        }
        // KVM_RUN with immediate_exit: kvm_run (interrupt readiness, the
        // registers) now describes the restored state.
        Ok(self.machine.complete_pending_io()?)
    }
}

/// Why a state sync from the log cannot be applied (a divergence).
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("its vCPU state does not decode: {0}")]
    Vcpu(String),
    #[error("a second vCPU state")]
    SecondVcpu,
    #[error("its pages: {0}")]
    Pages(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// Whether writing `item` changes a page of `tables`.
fn touches_tables(mem: &GuestMem, item: &StateItem, tables: &HashSet<u64>) -> bool {
    let (first, count) = match item {
        StateItem::Pages { first, data } => (*first, data.len() as u64 / PAGE_SIZE),
        StateItem::Zeros { first, count } => (*first, *count),
        _ => return false,
    };
    let mut current = vec![0u8; PAGE_SIZE as usize];
    for page in tables.iter().copied().filter(|p| (first..first.saturating_add(count)).contains(p)) {
        if mem.read_slice(&mut current, GuestAddress(page * PAGE_SIZE)).is_err() {
            return true;
        }
        let at = ((page - first) * PAGE_SIZE) as usize;
        let new = match item {
            StateItem::Pages { data, .. } => &data[at..at + PAGE_SIZE as usize],
            _ => &[0u8; PAGE_SIZE as usize][..],
        };
        if entries_differ(&current, new) {
            return true;
        }
    }
    false
}

/// Whether a paging-structure page changes from `old` to `new` in a way
/// KVM's shadow tables must learn of. Accessed and dirty bits that only get
/// set do not count: the primary's CPU sets them in stretches the backup
/// did not execute, and a shadow entry built without them stays correct
/// (KVM catches the first write through a clean entry by its own fault).
fn entries_differ(old: &[u8], new: &[u8]) -> bool {
    const ACCESSED_DIRTY: u64 = 0x60;
    old.chunks_exact(8).zip(new.chunks_exact(8)).any(|(o, n)| {
        let o = u64::from_le_bytes(o.try_into().unwrap_or([0; 8]));
        let n = u64::from_le_bytes(n.try_into().unwrap_or([0; 8]));
        (o ^ n) & !ACCESSED_DIRTY != 0 || o & ACCESSED_DIRTY & !n != 0
    })
}

/// The guest-physical pages of the 4-level paging structures reachable
/// from `cr3` (at most [`MAX_TABLE_PAGES`]).
fn table_pages(mem: &GuestMem, mem_size: u64, cr3: u64) -> HashSet<u64> {
    const PRESENT: u64 = 1;
    const LARGE: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut tables = HashSet::new();
    // (table address, level: 4 = PML4 ... 1 = page table)
    let mut todo = vec![(cr3 & ADDR, 4u8)];
    while let Some((table, level)) = todo.pop() {
        if table >= mem_size || !tables.insert(table / PAGE_SIZE) {
            continue;
        }
        if tables.len() >= MAX_TABLE_PAGES {
            break;
        }
        if level == 1 {
            continue;
        }
        let mut entries = [0u8; PAGE_SIZE as usize];
        if mem.read_slice(&mut entries, GuestAddress(table)).is_err() {
            continue;
        }
        for entry in entries.chunks_exact(8).map(|e| u64::from_le_bytes(e.try_into().unwrap_or([0; 8]))) {
            let leaf = level < 4 && entry & LARGE != 0;
            if entry & PRESENT != 0 && !leaf {
                todo.push((entry & ADDR, level - 1));
            }
        }
    }
    tables
}

impl crate::vm::Machine {
    /// RIP now (a kicked vCPU has not made an exit whose registers KVM copied).
    pub fn current_rip(&mut self) -> Result<u64, VmError> {
        Ok(self.vcpu.get_regs().map_err(|err| VmError::Kvm { what: "reading registers", err })?.rip)
    }
}
