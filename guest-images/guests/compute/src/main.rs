//! compute: a CPL3 workload that hashes a memory buffer `rounds` times and
//! prints the result; the benchmark guest. Each round ends with an exit to
//! the VMM (a POST-port write), the positions at which a backup can be kept
//! in lockstep.
//!
//! Command line: `rounds=N` (default 100), `kib=K`, the buffer size (default
//! 1024), `exitpoints=0` to run without the exit points: the whole workload
//! is then one stretch without an exit, kept in lockstep by state syncs;
//! `hz=H` (default 0: none) runs a PIT tick at H Hz meanwhile, handled
//! without an exit (auto-EOI), as an OS's timer would: the ticks are what
//! makes the VMM sync. The result does not depend on the ticks.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_rt::{hw, println, BootInfo};

guest_rt::entry!(main);

static TICKS: AtomicU64 = AtomicU64::new(0);

fn on_tick(_irq: u8) {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

fn main() -> u8 {
    let rounds = guest_rt::cmdline_u64("rounds", 100);
    let kib = guest_rt::cmdline_u64("kib", 1024).max(1);
    let exit_points = guest_rt::cmdline_u64("exitpoints", 1) != 0;
    let hz = guest_rt::cmdline_u64("hz", 0).min(1000);
    if hz > 0 {
        hw::pic_init_auto_eoi();
        guest_rt::set_irq_handler(0, on_tick);
        hw::pic_unmask(0);
        // The PIT runs no slower than about 19 Hz: close enough for a load.
        hw::pit_start_periodic(hz.max(19));
    }
    let start = (guest_rt::image_end() + 4095) & !4095;
    let mem_size = BootInfo::get().map_or(0, |b| b.mem_size()) as usize;
    let words = (kib as usize * 1024 / 8).min(mem_size.saturating_sub(start) / 8);
    if words == 0 {
        println!("compute: no memory for the buffer");
        return 1;
    }
    // SAFETY: [start, start + 8*words) is guest RAM above the image, which
    // nothing else uses, identity-mapped and writable.
    let buf = unsafe { core::slice::from_raw_parts_mut(start as *mut u64, words) };
    let mut x = 0x243f_6a88_85a3_08d3u64;
    for w in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    let mut acc = 0xcbf2_9ce4_8422_2325u64;
    for round in 0..rounds {
        for w in buf.iter_mut() {
            acc = (acc ^ *w).wrapping_mul(0x0100_0000_01b3).rotate_left(5);
            *w = w.wrapping_add(acc);
        }
        acc ^= round;
        if exit_points {
            guest_rt::exit_point();
        }
    }
    println!("compute: rounds={} kib={} exitpoints={} result={:016x}", rounds, kib, u8::from(exit_points), acc);
    0
}
