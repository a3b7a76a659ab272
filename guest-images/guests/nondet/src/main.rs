//! nondet: a deliberately nondeterministic test image, for `ftvmm check`
//! (and the tests) to prove that they catch what they are for.
//!
//! It writes `rdtsc; ret` into a buffer at run time and calls it: ftvmm's
//! loader rewrites every RDTSC it finds in the image's code before the guest
//! runs, but this one does not exist yet then, so it executes natively
//! (at CPL3 it reads the host's TSC) and its value is not logged. The guest
//! keeps the value in memory and lets its low bits decide how many lines it
//! prints, so a replay departs from its recording both in state and in
//! exits. Not part of the determinism sweep: it is its counter-example.
//!
//! Command line: `rounds=N` readings (default 4), `gap=G` cheap exits after
//! each (default 0), so that a fault-tolerant pair has time to repair each
//! divergence before the next.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_rt::println;

guest_rt::entry!(main);

/// Where the run-time code goes: the image's pages are writable and
/// executable (ftvmm's boot page tables set no NX bit).
#[no_mangle]
static mut CODE: [u8; 16] = [0xcc; 16];

/// The last unlogged reading: part of the state digest.
static READING: AtomicU64 = AtomicU64::new(0);

/// `rdtsc; shl rdx, 32; or rax, rdx; ret`, written at run time.
const READ_TSC: [u8; 10] = [0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0xc3];

fn read_hidden_tsc() -> u64 {
    // SAFETY: CODE is only touched here, by this single-threaded guest; the
    // bytes written are a complete function (rdtsc, combine, ret) that
    // clobbers only rax and rdx, as declared below.
    unsafe {
        let code = core::ptr::addr_of_mut!(CODE) as *mut u8;
        for (i, b) in READ_TSC.iter().enumerate() {
            core::ptr::write_volatile(code.add(i), *b);
        }
        let value: u64;
        core::arch::asm!("call {f}", f = in(reg) code, out("rax") value, out("rdx") _, options(nostack));
        value
    }
}

fn main() -> u8 {
    let rounds = guest_rt::cmdline_u64("rounds", 4).min(1000);
    let gap = guest_rt::cmdline_u64("gap", 0).min(10_000_000);
    let mut lines = 0;
    for round in 0..rounds {
        let tsc = read_hidden_tsc();
        READING.store(tsc, Ordering::Relaxed);
        // 1 to 4 lines, by the host's TSC: the exits differ from run to run.
        for _ in 0..=(tsc >> 4) & 3 {
            lines += 1;
            println!("nondet: round {round} line {lines}");
        }
        for _ in 0..gap {
            guest_rt::exit_point();
        }
    }
    println!("nondet: {lines} lines, last reading {:#x}", READING.load(Ordering::Relaxed));
    0
}
