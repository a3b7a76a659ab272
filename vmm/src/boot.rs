//! The ftvmm boot protocol: what guest memory and the vCPU look like when the
//! guest's first instruction runs.
//!
//! The guest enters its ELF entry point in 64-bit long mode at CPL0, with:
//! - paging on, identity-mapping the low 4 GiB (guest memory, and the MMIO
//!   hole from 3 GiB where the virtio devices live) with 2 MiB pages that are
//!   user-accessible (guests do their work at CPL3);
//! - a minimal GDT (64-bit code at selector 0x08, data at 0x10), no IDT
//!   (the guest installs its own), interrupts disabled;
//! - CR0.MP/NE and CR4.OSFXSR/OSXMMEXCPT set so SSE works;
//! - RDI = address of the boot info (little-endian words, at
//!   [`layout::BOOT_INFO_ADDR`]):
//!
//!   | offset | field |
//!   | --- | --- |
//!   | 0 | magic `FTVMBOOT` |
//!   | 8 | memory size in bytes |
//!   | 16, 24 | command line address and length (0, 0: none) |
//!   | 32 | number of virtio devices (at most 4) |
//!   | 40 + 24·i | virtio device i: u64 MMIO base, u64 MMIO size, u32 virtio device id, u32 PIC line |
//!
//!   RSP is 0: the guest sets up its own stack.
//!
//! Everything the VMM writes lives below 1 MiB; images load at 1 MiB or above.

use crate::layout::{self, BOOT_INFO_ADDR, CMDLINE_ADDR, GDT_ADDR, PML4_ADDR};
use crate::memory::GuestMem;
use vm_memory::{Bytes, GuestAddress};

const PDPT_ADDR: u64 = PML4_ADDR + 0x1000;
const PD_ADDR: u64 = PDPT_ADDR + 0x1000;

/// `b"FTVMBOOT"` as a little-endian u64.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"FTVMBOOT");

/// A virtio device as the boot info lists it: its slot and device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioEntry {
    pub slot: usize,
    pub device_id: u32,
}

pub const CODE64_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

/// Writes the page tables, GDT, boot info (with its virtio device table) and
/// command line into guest memory.
pub fn write_boot_structures(
    mem: &GuestMem,
    mem_size: u64,
    cmdline: &[u8],
    virtio: &[VirtioEntry],
) -> Result<(), vm_memory::GuestMemoryError> {
    // GDT: null, 64-bit code (DPL0), data (DPL0).
    let gdt: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }

    // Identity map of the low 4 GiB — guest memory and the MMIO hole above
    // 3 GiB — in 2 MiB pages, one PD per GiB.
    let flags = PTE_PRESENT | PTE_WRITE | PTE_USER;
    mem.write_obj(PDPT_ADDR | flags, GuestAddress(PML4_ADDR))?;
    let gibs = mem_size.div_ceil(1 << 30).max(4);
    for gib in 0..gibs {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | flags, GuestAddress(PDPT_ADDR + 8 * gib))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | flags | PTE_HUGE, GuestAddress(pd + 8 * i))?;
        }
    }

    let count = virtio.len().min(layout::VIRTIO_IRQS.len());
    let info: [u64; 5] =
        [BOOT_MAGIC, mem_size, if cmdline.is_empty() { 0 } else { CMDLINE_ADDR }, cmdline.len() as u64, count as u64];
    for (i, word) in info.iter().enumerate() {
        mem.write_obj(*word, GuestAddress(BOOT_INFO_ADDR + 8 * i as u64))?;
    }
    for (i, entry) in virtio.iter().take(count).enumerate() {
        let at = BOOT_INFO_ADDR + 40 + 24 * i as u64;
        mem.write_obj(layout::virtio_mmio_base(entry.slot), GuestAddress(at))?;
        mem.write_obj(layout::VIRTIO_MMIO_SIZE, GuestAddress(at + 8))?;
        mem.write_obj(entry.device_id, GuestAddress(at + 16))?;
        mem.write_obj(u32::from(layout::VIRTIO_IRQS[entry.slot]), GuestAddress(at + 20))?;
    }
    mem.write_slice(cmdline, GuestAddress(CMDLINE_ADDR))?;
    Ok(())
}

/// Special registers for 64-bit mode at CPL0 with the boot GDT and page tables.
pub fn long_mode_sregs(mut sregs: kvm_bindings::kvm_sregs) -> kvm_bindings::kvm_sregs {
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE64_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_bindings::kvm_segment { selector: DATA_SELECTOR, type_: 0x3, l: 0, db: 1, ..code };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;

    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_WP: u64 = 1 << 16;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    const EFER_SCE: u64 = 1;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    const EFER_NXE: u64 = 1 << 11;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    sregs
}

/// General registers at entry.
pub fn entry_regs(entry: u64) -> kvm_bindings::kvm_regs {
    kvm_bindings::kvm_regs { rip: entry, rdi: BOOT_INFO_ADDR, rflags: 0x2, ..Default::default() }
}

/// FPU state at entry: x87 and SSE in their reset configuration.
pub fn entry_fpu() -> kvm_bindings::kvm_fpu {
    kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}
