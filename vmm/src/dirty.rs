//! Dirty-page tracking for everything that needs "the guest pages written
//! since I last looked": a live state transfer's pre-copy rounds and the
//! incremental state syncs. KVM has one dirty log per memory slot, and
//! reading it (KVM_GET_DIRTY_LOG) clears it, so two readers of it would
//! steal pages from each other. This tracker is its only reader: each fetch
//! ORs KVM's log and the VMM's own record of its writes (device DMA, which
//! KVM does not see) into a bitmap per active consumer, and a consumer takes
//! and clears only its own.
//!
//! KVM's logging is on while any consumer is active: a guest pays for the
//! write faults it brings back only while someone needs the pages.

use crate::vm::{register_memory, vmm_bitmap, GuestMem, VmError, PAGE_SIZE};
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Who wants dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consumer {
    /// The incremental state syncs of a recording (file or backup).
    Sync = 0,
    /// A live state transfer to a joining backup.
    Transfer = 1,
}

/// The one reader of KVM's dirty log; shared by the vCPU thread and a state
/// transfer's sender thread.
pub struct DirtyTracker {
    vm: Arc<VmFd>,
    mem: GuestMem,
    mem_size: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    /// KVM's dirty logging is on.
    logging: bool,
    /// Each active consumer's pages dirtied since it started or last took.
    pending: [Option<Vec<u64>>; 2],
}

impl DirtyTracker {
    pub fn new(vm: Arc<VmFd>, mem: GuestMem, mem_size: u64) -> Self {
        DirtyTracker { vm, mem, mem_size, inner: Mutex::new(Inner { logging: false, pending: [None, None] }) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn words(&self) -> usize {
        (self.mem_size / PAGE_SIZE).div_ceil(64) as usize
    }

    /// Whether `consumer` is tracking.
    pub fn active(&self, consumer: Consumer) -> bool {
        self.lock().pending[consumer as usize].is_some()
    }

    /// `consumer` starts (or restarts) tracking: its next [`take`](Self::take)
    /// has the pages written from now on.
    pub fn start(&self, consumer: Consumer) -> Result<(), VmError> {
        let mut inner = self.lock();
        if !inner.logging {
            self.set_logging(true)?;
            inner.logging = true;
            vmm_bitmap(&self.mem).map(AtomicBitmap::reset);
        } else {
            // What accumulated so far belongs to the others.
            self.fetch(&mut inner)?;
        }
        inner.pending[consumer as usize] = Some(vec![0; self.words()]);
        Ok(())
    }

    /// `consumer` stops tracking; KVM's logging goes off with the last one.
    pub fn stop(&self, consumer: Consumer) -> Result<(), VmError> {
        let mut inner = self.lock();
        if inner.pending[consumer as usize].take().is_none() {
            return Ok(());
        }
        if inner.logging && inner.pending.iter().all(Option::is_none) {
            inner.logging = false;
            self.set_logging(false)?;
        }
        Ok(())
    }

    /// The pages written since `consumer` started or last took, as a bitmap
    /// of u64 words (bit i = page i); an inactive consumer gets none.
    pub fn take(&self, consumer: Consumer) -> Result<Vec<u64>, VmError> {
        let mut inner = self.lock();
        self.fetch(&mut inner)?;
        let words = self.words();
        Ok(inner.pending[consumer as usize].as_mut().map(|p| std::mem::replace(p, vec![0; words])).unwrap_or_default())
    }

    /// Before the memory slot is deleted and re-added (which drops KVM's
    /// log): fetches what is pending; returns whether logging is on, to be
    /// re-enabled with the new slot.
    pub fn fetch_before_reregister(&self) -> Result<bool, VmError> {
        let mut inner = self.lock();
        self.fetch(&mut inner)?;
        Ok(inner.logging)
    }

    fn fetch(&self, inner: &mut Inner) -> Result<(), VmError> {
        if !inner.logging {
            return Ok(());
        }
        let mut words = self
            .vm
            .get_dirty_log(0, self.mem_size as usize)
            .map_err(|err| VmError::Kvm { what: "reading the dirty log", err })?;
        if let Some(bitmap) = vmm_bitmap(&self.mem) {
            for (w, v) in words.iter_mut().zip(bitmap.get_and_reset()) {
                *w |= v;
            }
        }
        for pending in inner.pending.iter_mut().flatten() {
            for (p, w) in pending.iter_mut().zip(&words) {
                *p |= w;
            }
        }
        Ok(())
    }

    fn set_logging(&self, on: bool) -> Result<(), VmError> {
        let host = self
            .mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmError::Memory(self.mem_size >> 20, e.to_string()))?;
        register_memory(&self.vm, host as u64, self.mem_size, on)
    }
}
