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
//!
//! Reading the log write-protects every page it reports, so a guest that
//! rewrites its working set between two syncs takes a fault on each of
//! those pages after every sync (on this software-nested KVM that is most
//! of what syncs cost a guest with a large working set). Where KVM offers
//! manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), reading does not
//! protect, and the tracker re-protects (KVM_CLEAR_DIRTY_LOG) only pages
//! that are not *hot*: the syncs mark the pages they keep finding rewritten
//! as hot; those stay writable and are reported dirty at every fetch (a
//! superset: always correct) until the syncs find them unchanged and cool
//! them again.

use super::{register_memory, vmm_bitmap, GuestMem, MemoryError, PAGE_SIZE};
use kvm_ioctls::VmFd;
use std::os::fd::AsRawFd;
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
    /// KVM protects pages only when told to (manual protection is on).
    manual: bool,
    /// Pages left writable: never re-protected, always reported dirty.
    hot: Vec<u64>,
    /// Each active consumer's pages dirtied since it started or last took.
    pending: [Option<Vec<u64>>; 2],
}

impl DirtyTracker {
    pub fn new(vm: Arc<VmFd>, mem: GuestMem, mem_size: u64) -> Self {
        // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.
        const MANUAL_PROTECT: u32 = 168;
        let cap = kvm_bindings::kvm_enable_cap { cap: MANUAL_PROTECT, args: [1, 0, 0, 0], ..Default::default() };
        let manual = vm.check_extension_raw(MANUAL_PROTECT.into()) & 1 != 0 && vm.enable_cap(&cap).is_ok();
        let words = (mem_size / PAGE_SIZE).div_ceil(64) as usize;
        let inner = Inner { logging: false, manual, hot: vec![0; words], pending: [None, None] };
        DirtyTracker { vm, mem, mem_size, inner: Mutex::new(inner) }
    }

    /// Marks `page` hot (left writable, reported dirty at every fetch) or
    /// not. Without manual protection there is no such thing: a no-op.
    pub fn set_hot(&self, page: u64, hot: bool) {
        let mut inner = self.lock();
        if !inner.manual {
            return;
        }
        if let Some(w) = inner.hot.get_mut((page / 64) as usize) {
            if hot {
                *w |= 1 << (page % 64);
            } else {
                *w &= !(1 << (page % 64));
            }
        }
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
    pub fn start(&self, consumer: Consumer) -> Result<(), MemoryError> {
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
    /// Hot pages are the syncs' business: they cool when the syncs stop.
    pub fn stop(&self, consumer: Consumer) -> Result<(), MemoryError> {
        let mut inner = self.lock();
        if inner.pending[consumer as usize].take().is_none() {
            return Ok(());
        }
        if consumer == Consumer::Sync {
            inner.hot.iter_mut().for_each(|w| *w = 0);
        }
        if inner.logging && inner.pending.iter().all(Option::is_none) {
            inner.logging = false;
            inner.hot.iter_mut().for_each(|w| *w = 0);
            self.set_logging(false)?;
        }
        Ok(())
    }

    /// The pages written since `consumer` started or last took, as a bitmap
    /// of u64 words (bit i = page i); an inactive consumer gets none.
    pub fn take(&self, consumer: Consumer) -> Result<Vec<u64>, MemoryError> {
        let mut inner = self.lock();
        self.fetch(&mut inner)?;
        let words = self.words();
        Ok(inner.pending[consumer as usize].as_mut().map(|p| std::mem::replace(p, vec![0; words])).unwrap_or_default())
    }

    /// Before the memory slot is deleted and re-added (which drops KVM's
    /// log): fetches what is pending; returns whether logging is on, to be
    /// re-enabled with the new slot.
    pub fn fetch_before_reregister(&self) -> Result<bool, MemoryError> {
        let mut inner = self.lock();
        self.fetch(&mut inner)?;
        Ok(inner.logging)
    }

    fn fetch(&self, inner: &mut Inner) -> Result<(), MemoryError> {
        if !inner.logging {
            return Ok(());
        }
        let mut words = self
            .vm
            .get_dirty_log(0, self.mem_size as usize)
            .map_err(|err| MemoryError::Kvm { what: "reading the dirty log", err })?;
        if inner.manual {
            // Re-protect what was reported, but the hot pages.
            let mut protect: Vec<u64> = words.iter().zip(&inner.hot).map(|(w, h)| w & !h).collect();
            if protect.iter().any(|&w| w != 0) {
                self.clear_dirty_log(&mut protect)?;
            }
        }
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

    /// KVM_CLEAR_DIRTY_LOG of the pages set in `pages` (all of the slot).
    fn clear_dirty_log(&self, pages: &mut [u64]) -> Result<(), MemoryError> {
        // KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)
        const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;
        let clear = kvm_bindings::kvm_clear_dirty_log {
            slot: 0,
            num_pages: (self.mem_size / PAGE_SIZE) as u32,
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: pages.as_mut_ptr().cast(),
            },
        };
        // SAFETY: the fd is our VM's; the bitmap has a bit for every page of
        // slot 0 (num_pages) and outlives the call, which only reads it.
        let ret = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &clear) };
        if ret != 0 {
            return Err(MemoryError::Kvm { what: "clearing the dirty log", err: kvm_ioctls::Error::last() });
        }
        Ok(())
    }

    fn set_logging(&self, on: bool) -> Result<(), MemoryError> {
        let host = self
            .mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| MemoryError::Mapping { mib: self.mem_size >> 20, why: e.to_string() })?;
        register_memory(&self.vm, host as u64, self.mem_size, on)
    }
}
