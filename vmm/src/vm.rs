//! The KVM virtual machine: one vCPU, guest memory, the CPUID model and the
//! MSR filter, and raw access to the parts of `kvm_run` the run loop answers.
//!
//! No in-kernel irqchip, PIT or kvmclock is created: every interrupt and every
//! time reading passes through the VMM, which records or replays it.

use crate::boot;
use crate::cpuid;
use crate::memory::dirty::DirtyTracker;
use crate::memory::{register_memory, GuestMem, MemoryError};
use kvm_bindings::{
    kvm_enable_cap, kvm_regs, kvm_run, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// IA32_TSC: reads and writes exit to the VMM, which answers from its clock.
pub const MSR_IA32_TSC: u32 = 0x10;

/// MSRs whose accesses exit to the VMM (KVM would otherwise answer them from
/// host state): time stamp and performance counters, TSC adjust/deadline/aux,
/// and KVM's paravirtual clock MSRs. Everything but IA32_TSC gets a #GP, as on
/// a CPU without those features (see the CPUID model).
pub const FILTERED_MSRS: &[(u32, u32)] = &[
    (0x10, 1),        // IA32_TSC
    (0x11, 2),        // KVM's old kvmclock MSRs
    (0x3b, 1),        // IA32_TSC_ADJUST
    (0xe7, 2),        // IA32_MPERF, IA32_APERF
    (0x6e0, 1),       // IA32_TSC_DEADLINE
    (0x4b56_4d00, 8), // KVM's paravirtual MSRs (kvmclock, steal time, async PF, PV EOI...)
    (0xc000_0103, 1), // IA32_TSC_AUX (RDTSCP)
];

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "/dev/kvm is not available ({0}): ftvmm needs KVM (is the kvm module loaded, and may this user open /dev/kvm?)"
    )]
    NoKvm(kvm_ioctls::Error),
    #[error("KVM lacks {0}, which ftvmm needs")]
    MissingCap(&'static str),
    #[error("{0}")]
    Cpu(String),
    #[error("{what}: {err}")]
    Kvm { what: &'static str, err: kvm_ioctls::Error },
    #[error("guest memory of {0} MiB: {1}")]
    Memory(u64, String),
    #[error(transparent)]
    Guest(#[from] MemoryError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

/// The VM and its single vCPU.
pub struct Machine {
    /// Shared with a state transfer's sender thread (dirty log).
    pub vm: Arc<VmFd>,
    pub vcpu: VcpuFd,
    pub mem: GuestMem,
    pub mem_size: u64,
    /// The one reader of KVM's dirty log (state transfers and syncs).
    pub dirty: Arc<DirtyTracker>,
    /// KVM copies the registers into `kvm_run` at every exit
    /// (KVM_CAP_SYNC_REGS), sparing a KVM_GET_REGS per exit.
    sync_regs: bool,
}

impl Machine {
    /// Creates the VM with `mem_size` bytes of memory at guest address 0.
    pub fn new(mem_size: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        for (cap, name) in [(Cap::UserMemory, "KVM_CAP_USER_MEMORY"), (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT")] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let vm = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
        // Needed by VMX hosts for real-mode emulation; unused in long mode but harmless.
        let _ = vm.set_tss_address(0xfffb_d000);

        let mem = GuestMem::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .map_err(|e| VmError::Memory(mem_size >> 20, e.to_string()))?;
        let host_addr =
            mem.get_host_address(GuestAddress(0)).map_err(|e| VmError::Memory(mem_size >> 20, e.to_string()))?;
        register_memory(&vm, host_addr as u64, mem_size, false)?;

        install_msr_filter(&vm)?;

        let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("creating the vCPU"))?;
        let sync_regs = kvm.check_extension(Cap::SyncRegs);
        if sync_regs {
            vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        }
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("reading supported CPUID"))?;
        let model = cpuid::model(&supported).map_err(|e| VmError::Cpu(e.to_string()))?;
        vcpu.set_cpuid2(&model).map_err(kvm_err("setting the CPUID model"))?;
        let vm = Arc::new(vm);
        let dirty = Arc::new(DirtyTracker::new(vm.clone(), mem.clone(), mem_size));
        Ok(Machine { vm, vcpu, mem, mem_size, dirty, sync_regs })
    }

    /// Makes KVM drop every shadow page table it built for guest memory, so
    /// that it rebuilds them from the guest's page tables as they are now:
    /// after a state sync wrote page-table pages from userspace, which a
    /// shadow-paging KVM does not notice (see docs/platform.md). Deleting
    /// and re-adding the memory slot is the documented way to make KVM
    /// forget everything it derived from a slot; the dirty log, if on, is
    /// re-enabled with it (its pending bits are fetched first).
    pub fn rebuild_shadow_mmu(&self) -> Result<(), VmError> {
        let logging = self.dirty.fetch_before_reregister()?;
        let host = self
            .mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmError::Memory(self.mem_size >> 20, e.to_string()))?;
        let gone = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: host as u64,
        };
        // SAFETY: deleting slot 0 (memory_size 0) unmaps nothing of ours.
        unsafe { self.vm.set_user_memory_region(gone) }.map_err(kvm_err("deleting the memory slot"))?;
        Ok(register_memory(&self.vm, host as u64, self.mem_size, logging)?)
    }

    /// The vCPU's complete state. Call it at a guest-caused exit: it first
    /// completes the exit just answered, so that registers are final.
    pub fn save_vcpu(&mut self) -> Result<VcpuState, VmError> {
        self.complete_pending_io()?;
        let events = self.vcpu.get_vcpu_events().map_err(kvm_err("reading vCPU events"))?;
        Ok(VcpuState {
            regs: self.vcpu.get_regs().map_err(kvm_err("reading registers"))?,
            sregs: self.vcpu.get_sregs().map_err(kvm_err("reading special registers"))?,
            xsave: self.vcpu.get_xsave().map_err(kvm_err("reading the XSAVE state"))?,
            xcrs: self.vcpu.get_xcrs().map_err(kvm_err("reading XCRs"))?,
            msrs: self.read_msrs(SAVED_MSRS),
            events,
            irq_window: self.vcpu.get_kvm_run().request_interrupt_window != 0,
        })
    }

    /// Puts the vCPU in a saved state.
    pub fn restore_vcpu(&mut self, state: &VcpuState) -> Result<(), VmError> {
        self.vcpu.set_sregs(&state.sregs).map_err(kvm_err("setting special registers"))?;
        self.vcpu.set_regs(&state.regs).map_err(kvm_err("setting registers"))?;
        // SAFETY: a kvm_xsave (4 KiB) is what KVM_SET_XSAVE reads; the vCPU
        // was created with the same fixed CPU model the state was saved under.
        unsafe { self.vcpu.set_xsave(&state.xsave) }.map_err(kvm_err("setting the XSAVE state"))?;
        self.vcpu.set_xcrs(&state.xcrs).map_err(kvm_err("setting XCRs"))?;
        let entries: Vec<kvm_bindings::kvm_msr_entry> = state
            .msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry { index, data, ..Default::default() })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| VmError::Cpu(format!("saved MSRs: {e:?}")))?;
        self.vcpu.set_msrs(&msrs).map_err(kvm_err("setting MSRs"))?;
        self.vcpu.set_vcpu_events(&state.events).map_err(kvm_err("setting vCPU events"))?;
        self.vcpu.get_kvm_run().request_interrupt_window = u8::from(state.irq_window);
        Ok(())
    }

    /// Puts the vCPU at `entry` in 64-bit mode per the boot protocol.
    pub fn set_boot_state(&self, entry: u64) -> Result<(), VmError> {
        let sregs = self.vcpu.get_sregs().map_err(kvm_err("reading sregs"))?;
        self.vcpu.set_sregs(&boot::long_mode_sregs(sregs)).map_err(kvm_err("setting sregs"))?;
        self.vcpu.set_regs(&boot::entry_regs(entry)).map_err(kvm_err("setting registers"))?;
        self.vcpu.set_fpu(&boot::entry_fpu()).map_err(kvm_err("setting the FPU"))?;
        Ok(())
    }

    /// RIP at the exit the vCPU just made.
    pub fn exit_rip(&mut self) -> Result<u64, VmError> {
        if self.sync_regs {
            return Ok(self.vcpu.sync_regs().regs.rip);
        }
        Ok(self.vcpu.get_regs().map_err(kvm_err("reading registers"))?.rip)
    }

    /// Queues `vector` as an external interrupt for the next entry
    /// (`KVM_INTERRUPT`, usable without an in-kernel irqchip).
    pub fn inject_interrupt(&self, vector: u8) -> Result<(), VmError> {
        // KVM_INTERRUPT = _IOW(KVMIO, 0x86, struct kvm_interrupt { __u32 irq; })
        const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;
        let irq: u32 = vector.into();
        // SAFETY: the fd is our vCPU's; the kernel reads one u32 from a valid pointer.
        let ret = unsafe { libc::ioctl(self.vcpu.as_raw_fd(), KVM_INTERRUPT, &irq as *const u32) };
        if ret != 0 {
            return Err(VmError::Kvm { what: "injecting an interrupt", err: kvm_ioctls::Error::last() });
        }
        Ok(())
    }

    /// The shared `kvm_run` area of the vCPU.
    pub fn run_area(&mut self) -> &mut kvm_run {
        self.vcpu.get_kvm_run()
    }

    /// Answers the pending `KVM_EXIT_IO` port read with `data` (repeated
    /// `count` times for string I/O is the caller's business: `data` covers
    /// size × count bytes).
    pub fn complete_io_in(&mut self, data: &[u8]) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO (the caller's contract), so the
        // `io` member of the union is the active one.
        let io = unsafe { run.__bindgen_anon_1.io };
        let len = (usize::from(io.size) * io.count as usize).min(data.len());
        let base = run as *mut kvm_run as *mut u8;
        // SAFETY: KVM places the I/O data at data_offset inside the mmap'd run
        // area (run_size bytes, larger than size*count); nothing else aliases it
        // while the vCPU is stopped in userspace.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(io.data_offset as usize), len) };
    }

    /// Lets KVM finish the exit just answered (e.g. write an IN's data to
    /// RAX and step past it) without running any further guest instruction:
    /// `KVM_RUN` with `immediate_exit` set, as the KVM API documents.
    pub fn complete_pending_io(&mut self) -> Result<(), VmError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let result = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(err) => Err(VmError::Kvm { what: "completing an I/O exit", err }),
            Ok(exit) => Err(VmError::Kvm {
                what: match exit {
                    kvm_ioctls::VcpuExit::Intr => "completing an I/O exit (interrupted)",
                    _ => "completing an I/O exit (the guest ran on)",
                },
                err: kvm_ioctls::Error::new(libc::EPROTO),
            }),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        result
    }

    /// Answers the pending MMIO read with `data`.
    pub fn complete_mmio_read(&mut self, data: &[u8]) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_MMIO, so `mmio` is the active member.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = (mmio.len as usize).min(8).min(data.len());
        mmio.data[..len].copy_from_slice(&data[..len]);
    }

    /// Answers the pending RDMSR with `value`, or a #GP when `None`.
    pub fn complete_msr(&mut self, value: Option<u64>) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_X86_RDMSR/WRMSR, so `msr` is the active member.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        match value {
            Some(v) => {
                msr.data = v;
                msr.error = 0;
            }
            None => msr.error = 1,
        }
    }

    /// The suberror of the last KVM_EXIT_INTERNAL_ERROR.
    pub fn internal_error_suberror(&mut self) -> u32 {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is active.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// Reads the MSRs a saved state carries ([`SAVED_MSRS`], which the
    /// state digest also covers); any the host cannot read are skipped.
    pub fn digest_msrs(&self) -> Vec<(u32, u64)> {
        self.read_msrs(SAVED_MSRS)
    }

    /// Reads `indices`; any the host cannot read are skipped.
    fn read_msrs(&self, indices: &[u32]) -> Vec<(u32, u64)> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> =
            indices.iter().map(|&index| kvm_bindings::kvm_msr_entry { index, ..Default::default() }).collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            return Vec::new();
        };
        let read = self.vcpu.get_msrs(&mut msrs).unwrap_or(0);
        msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)).collect()
    }
}

/// MSRs a saved vCPU state carries, and the state digest covers, beyond
/// those in sregs: the SYSCALL/SYSENTER and miscellaneous ones a guest may
/// program.
pub const SAVED_MSRS: &[u32] = &[
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// A vCPU's complete state at a guest-caused exit: registers, special
/// registers, FPU/SSE/XSAVE state, XCRs, the MSRs that matter, KVM's vCPU
/// events (a queued interrupt or exception, the interrupt shadow) and
/// whether an interrupt window was requested.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub irq_window: bool,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VcpuState {{ rip: {:#x}, .. }}", self.regs.rip)
    }
}

fn install_msr_filter(vm: &VmFd) -> Result<(), VmError> {
    // KVM_CAP_X86_USER_SPACE_MSR with KVM_MSR_EXIT_REASON_FILTER: filtered
    // accesses exit to userspace instead of raising #GP in the guest.
    const KVM_CAP_X86_USER_SPACE_MSR: u32 = 188;
    const KVM_MSR_EXIT_REASON_FILTER: u64 = 1 << 2;
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [KVM_MSR_EXIT_REASON_FILTER, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|_| VmError::MissingCap("KVM_CAP_X86_USER_SPACE_MSR (MSR exits to userspace)"))?;
    // A clear bit denies the access, which (with the cap above) exits to us.
    let denied = [0u8; 1];
    let ranges: Vec<MsrFilterRange> = FILTERED_MSRS
        .iter()
        .map(|&(base, count)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count: count,
            bitmap: &denied,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges).map_err(kvm_err("installing the MSR filter"))
}
