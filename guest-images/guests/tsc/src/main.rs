//! tsc: executes RDTSC at CPL0 (in its boot hook) and at CPL3, and prints a
//! hash of the values. ftvmm's loader rewrites each RDTSC into an exit, so
//! the values come from the virtual clock and replay exactly.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_rt::{hw, println, Fnv};

guest_rt::entry!(main, cpl0_hook);

/// Two RDTSC readings taken at CPL0 by `guest_cpl0_hook`.
#[no_mangle]
static CPL0_TSC: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

core::arch::global_asm!(
    r#"
    .global guest_cpl0_hook
guest_cpl0_hook:
    rdtsc
    mov dword ptr [rip + CPL0_TSC], eax
    mov dword ptr [rip + CPL0_TSC + 4], edx
    rdtsc
    mov dword ptr [rip + CPL0_TSC + 8], eax
    mov dword ptr [rip + CPL0_TSC + 12], edx
    ret
"#
);

fn main() -> u8 {
    let mut hash = Fnv::new();
    let mut values = [0u64; 18];
    values[0] = CPL0_TSC[0].load(Ordering::Relaxed);
    values[1] = CPL0_TSC[1].load(Ordering::Relaxed);
    let mut spin = 0u64;
    for i in 2..values.len() {
        for _ in 0..(1000 * i as u64) {
            spin = spin.wrapping_mul(31).wrapping_add(i as u64);
        }
        values[i] = hw::rdtsc();
    }
    let monotonic = values.windows(2).all(|w| w[0] <= w[1]);
    let nonzero = values.iter().all(|&v| v != 0);
    for v in values {
        hash.u64(v);
    }
    println!(
        "tsc: cpl0={},{} cpl3_last={} monotonic={} hash={:016x}",
        values[0],
        values[1],
        values[values.len() - 1],
        monotonic,
        hash.0
    );
    u8::from(!(monotonic && nonzero) || spin == 1)
}
