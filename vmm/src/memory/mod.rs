//! Guest memory, below everything that uses it: the memory type (with the
//! VMM's own record of the pages it writes), the page size, the KVM memory
//! slot, and the dirty-page tracker ([`dirty`]) that state transfers and
//! syncs read. Device models and the boot protocol need only this.

pub mod dirty;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

/// What can go wrong with guest memory and its dirty log.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{what}: {err}")]
    Kvm { what: &'static str, err: kvm_ioctls::Error },
    #[error("guest memory of {mib} MiB: {why}")]
    Mapping { mib: u64, why: String },
}

/// Guest memory. The bitmap records the pages the VMM itself writes (device
/// DMA), which KVM's dirty log does not see: a state transfer needs both.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Guest page size for dirty tracking and state transfer.
pub const PAGE_SIZE: u64 = 4096;

/// (Re)registers guest memory as slot 0, with KVM's dirty log on or off.
pub(crate) fn register_memory(vm: &VmFd, host_addr: u64, mem_size: u64, dirty_log: bool) -> Result<(), MemoryError> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if dirty_log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: 0,
        memory_size: mem_size,
        userspace_addr: host_addr,
    };
    // SAFETY: the region is a live mapping of mem_size bytes owned by the
    // Machine's guest memory, which lives as long as the VM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|err| MemoryError::Kvm { what: "registering guest memory", err })
}

/// The VMM's own record of the guest pages it wrote.
pub(crate) fn vmm_bitmap(mem: &GuestMem) -> Option<&AtomicBitmap> {
    // MmapRegion's own bitmap (the region's GuestMemoryRegion::bitmap is a slice of it).
    mem.iter().next().map(|region| std::ops::Deref::deref(region).bitmap())
}
