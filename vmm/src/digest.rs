//! The state digest: BLAKE3 over everything that determines the guest's
//! future — all guest memory, the complete vCPU state (general and special
//! registers, the FPU/SSE state, the MSRs that matter), the device models,
//! the virtual clock and the exit count. Two runs with equal digests are in
//! the same state; every determinism test compares them.

use crate::clock::VirtualClock;
use crate::devices::DevicesState;
use crate::error::RunError;
use crate::vm::Machine;
use crate::vm::VmError;
use replay::Digest;
use vm_memory::{GuestAddress, GuestMemoryBackend};

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RunError {
    move |err| RunError::Vm(VmError::Kvm { what, err })
}

/// Digest of a VM's state: its machine (memory and vCPU), its devices'
/// state, its virtual clock and the guest-caused exits so far.
pub fn state_digest(m: &Machine, devices: &DevicesState, clock: &VirtualClock, exits: u64) -> Result<Digest, RunError> {
    digest(m, devices, clock, exits, true)
}

/// The same without guest memory: what a live state transfer checks with
/// the guest stopped (hashing all of memory would lengthen that pause; the
/// memory copy is checked by construction, and runs by their final digest).
pub fn machine_digest(
    m: &Machine,
    devices: &DevicesState,
    clock: &VirtualClock,
    exits: u64,
) -> Result<Digest, RunError> {
    digest(m, devices, clock, exits, false)
}

fn digest(
    m: &Machine,
    devices: &DevicesState,
    clock: &VirtualClock,
    exits: u64,
    with_memory: bool,
) -> Result<Digest, RunError> {
    let mut h = blake3::Hasher::new();
    h.update(if with_memory { b"ftvmm state digest v1\0" } else { b"ftvmm machine digest\0" });

    if with_memory {
        hash_memory(&mut h, m)?;
    }
    hash_cpu(&mut h, m)?;
    let devices = bincode::serialize(devices)
        .map_err(|e| RunError::Io { what: "serializing device state", err: std::io::Error::other(e.to_string()) })?;
    h.update(&devices);
    h.update(&clock.now_ns().to_le_bytes());
    h.update(&clock.tsc().to_le_bytes());
    h.update(&exits.to_le_bytes());
    Ok(Digest(*h.finalize().as_bytes()))
}

fn hash_memory(h: &mut blake3::Hasher, m: &Machine) -> Result<(), RunError> {
    let host = m
        .mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| RunError::Vm(VmError::Memory(m.mem_size >> 20, e.to_string())))?;
    // SAFETY: guest memory is one mapping of mem_size bytes at `host`, alive
    // as long as `m`; the vCPU is stopped in userspace, so nothing writes it
    // while we read.
    let memory = unsafe { std::slice::from_raw_parts(host as *const u8, m.mem_size as usize) };
    h.update(memory);
    Ok(())
}

fn hash_cpu(h: &mut blake3::Hasher, m: &Machine) -> Result<(), RunError> {
    let r = m.vcpu.get_regs().map_err(kvm("reading registers"))?;
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        r.rip, r.rflags,
    ] {
        h.update(&v.to_le_bytes());
    }

    let s = m.vcpu.get_sregs().map_err(kvm("reading special registers"))?;
    for seg in [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt] {
        h.update(&seg.base.to_le_bytes());
        h.update(&seg.limit.to_le_bytes());
        h.update(&seg.selector.to_le_bytes());
        h.update(&[seg.type_, seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable]);
    }
    for table in [s.gdt, s.idt] {
        h.update(&table.base.to_le_bytes());
        h.update(&table.limit.to_le_bytes());
    }
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer] {
        h.update(&v.to_le_bytes());
    }
    for v in s.interrupt_bitmap {
        h.update(&v.to_le_bytes());
    }

    let f = m.vcpu.get_fpu().map_err(kvm("reading the FPU"))?;
    for reg in f.fpr.iter().chain(f.xmm.iter()) {
        h.update(reg);
    }
    h.update(&f.fcw.to_le_bytes());
    h.update(&f.fsw.to_le_bytes());
    h.update(&[f.ftwx]);
    h.update(&f.last_opcode.to_le_bytes());
    h.update(&f.last_ip.to_le_bytes());
    h.update(&f.last_dp.to_le_bytes());
    h.update(&f.mxcsr.to_le_bytes());

    for (index, value) in m.digest_msrs() {
        h.update(&index.to_le_bytes());
        h.update(&value.to_le_bytes());
    }
    Ok(())
}
