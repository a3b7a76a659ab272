//! Platform probe and guarantee (needs /dev/kvm): guest page tables written
//! from userspace after the vCPU has run, as a backup applying a state sync
//! writes them.
//!
//! A CPL3 loop (CPL3 runs natively; CPL0 code is emulated, and KVM's
//! emulator walks the guest's tables itself, so it would see any change)
//! reads a virtual address V and reports the value by an MMIO write. The
//! test runs it once, rewrites V's page-directory entry from userspace to
//! map a frame with another marker, and looks at what the guest reads next:
//! with nothing done (does KVM notice by itself?), after KVM_SET_SREGS with
//! the same registers, after KVM_SET_SREGS through another CR3 and back,
//! and after `Machine::rebuild_shadow_mmu` (what the backup does). It prints
//! what it saw (docs/platform.md records it) and asserts what the backup
//! relies on: after `rebuild_shadow_mmu` the guest sees the new mapping,
//! also with the dirty log on.

use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};
use vmm::vm::Machine;

const MEM: u64 = 64 << 20;
/// Where the loop's code lives (identity-mapped, user-accessible).
const CODE: u64 = 0x20_0000;
/// The virtual address it reads, in a 2 MiB page of its own...
const V: u64 = 0x200_0000;
/// ...first mapped (identity) to frame A, then to frame B.
const FRAME_A: u64 = V;
const FRAME_B: u64 = 0x280_0000;
const MARK_A: u64 = 0xaaaa_aaaa_0000_000a;
const MARK_B: u64 = 0xbbbb_bbbb_0000_000b;
/// An address without a memslot: the write exits as MMIO.
const REPORT: u64 = 0xd000_0000;
/// V's entry in the page directory of the first GiB (boot.rs layout).
const PDE_V: u64 = vmm::layout::PML4_ADDR + 0x2000 + 8 * (V >> 21);
const PDE_FLAGS: u64 = 0x1 | 0x2 | 0x4 | 0x80;

fn machine() -> Machine {
    let m = Machine::new(MEM).expect("KVM (/dev/kvm) is needed for this test");
    vmm::boot::write_boot_structures(&m.mem, MEM, b"", &[]).unwrap();
    // loop: movabs rax, [V]; movabs [REPORT], rax; jmp loop
    let mut code = vec![0x48, 0xa1];
    code.extend_from_slice(&V.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xa3]);
    code.extend_from_slice(&REPORT.to_le_bytes());
    code.extend_from_slice(&[0xeb, (-22i8) as u8]);
    m.mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    m.mem.write_obj(MARK_A, GuestAddress(FRAME_A)).unwrap();
    m.mem.write_obj(MARK_B, GuestAddress(FRAME_B)).unwrap();
    // Straight to CPL3: DPL3 code and stack segments, a usable TR.
    let mut sregs = vmm::boot::long_mode_sregs(m.vcpu.get_sregs().unwrap());
    sregs.cs.selector |= 3;
    sregs.cs.dpl = 3;
    for seg in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        seg.selector |= 3;
        seg.dpl = 3;
    }
    sregs.tr = kvm_bindings::kvm_segment {
        base: 0x7000,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    m.vcpu.set_sregs(&sregs).unwrap();
    m.vcpu.set_regs(&kvm_bindings::kvm_regs { rip: CODE, rflags: 0x2, ..Default::default() }).unwrap();
    m
}

/// Runs the loop to its next report.
fn read_v(m: &mut Machine) -> u64 {
    loop {
        match m.vcpu.run() {
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                assert_eq!(addr, REPORT);
                return u64::from_le_bytes(data.try_into().expect("an 8-byte write"));
            }
            Ok(VcpuExit::Intr) => continue,
            Err(e) if e.errno() == libc::EINTR => continue,
            Ok(other) => panic!("unexpected exit {other:?}"),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
}

fn map_v(m: &Machine, frame: u64) {
    m.mem.write_obj(frame | PDE_FLAGS, GuestAddress(PDE_V)).unwrap();
}

fn mark(frame: u64) -> u64 {
    if frame == FRAME_A {
        MARK_A
    } else {
        MARK_B
    }
}

/// Remaps V from userspace after the guest has used the mapping, applies
/// `remedy`, and says whether the guest then sees the new mapping.
fn sees_new_mapping(m: &mut Machine, remedy: &dyn Fn(&mut Machine)) -> bool {
    // A known starting point: the guest uses V → A, with fresh shadow tables.
    map_v(m, FRAME_A);
    m.rebuild_shadow_mmu().unwrap();
    for _ in 0..3 {
        assert_eq!(read_v(m), MARK_A, "the loop reads frame A");
    }
    map_v(m, FRAME_B);
    remedy(m);
    let seen = read_v(m);
    assert!(seen == MARK_A || seen == MARK_B, "read {seen:#x}");
    seen == mark(FRAME_B)
}

#[test]
fn page_tables_written_from_userspace_reach_the_guest_after_a_shadow_rebuild() {
    let mut m = machine();
    assert_eq!(read_v(&mut m), MARK_A);

    let nothing = sees_new_mapping(&mut m, &|_| {});
    let same_sregs = sees_new_mapping(&mut m, &|m| {
        let s = m.vcpu.get_sregs().unwrap();
        m.vcpu.set_sregs(&s).unwrap();
    });
    let cr3_round_trip = sees_new_mapping(&mut m, &|m| {
        let s = m.vcpu.get_sregs().unwrap();
        // Another CR3 (a copy of the PML4 one page up would do; any value
        // makes KVM reset the MMU context), then the real one.
        let mut other = s;
        other.cr3 = s.cr3 + 0x1000 * 16;
        m.vcpu.set_sregs(&other).unwrap();
        m.vcpu.set_sregs(&s).unwrap();
    });
    let rebuilt = sees_new_mapping(&mut m, &|m| m.rebuild_shadow_mmu().unwrap());
    m.dirty.start(vmm::memory::dirty::Consumer::Sync).unwrap();
    let rebuilt_logging = sees_new_mapping(&mut m, &|m| m.rebuild_shadow_mmu().unwrap());
    eprintln!(
        "shadow paging probe: KVM noticed a userspace page-table write by itself: {nothing}; \
         after KVM_SET_SREGS (same values): {same_sregs}; after a CR3 round trip: {cr3_round_trip}; \
         after re-registering the memory slot: {rebuilt} (dirty log on: {rebuilt_logging})"
    );
    assert!(rebuilt, "after rebuild_shadow_mmu the guest must see the new mapping");
    assert!(rebuilt_logging, "also with the dirty log on");
    // What the tracker collected across the rebuilds includes the page
    // directory the test wrote (the VMM's own writes).
    let dirty = m.dirty.take(vmm::memory::dirty::Consumer::Sync).unwrap();
    let pd_page = PDE_V / 4096;
    assert!(dirty[(pd_page / 64) as usize] & (1 << (pd_page % 64)) != 0, "the page directory is dirty");
    // What a rebuild costs, and the faults it brings back to the loop.
    let started = std::time::Instant::now();
    for _ in 0..100 {
        m.rebuild_shadow_mmu().unwrap();
        read_v(&mut m);
    }
    eprintln!("shadow paging probe: rebuild + next report: {:?} each", started.elapsed() / 100);
}
