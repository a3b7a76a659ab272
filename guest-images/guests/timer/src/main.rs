//! timer: programs the PIT at 1 kHz and counts its interrupts while a CPL3
//! loop works, then prints a checksum of the exact interleaving: a hash over
//! (tick number, work counter at that tick) for every tick.
//!
//! The work loop exits to the VMM (a POST-port write) every few iterations:
//! ftvmm delivers interrupts only at guest-caused exits, so that the backup
//! can deliver them at the same point of execution. A different timing of
//! the host gives a different interleaving, hence a different checksum; a
//! replay of a recording gives the recorded one.
//!
//! Command line: `ticks=N` (default 50).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_rt::{hw, println, Fnv};

guest_rt::entry!(main);

static TICKS: AtomicU64 = AtomicU64::new(0);
static WORK: AtomicU64 = AtomicU64::new(0);
static CHECKSUM: AtomicU64 = AtomicU64::new(0);
/// Ticks to count: a tick beyond it (one a loaded host delivers late, at
/// the EOI of the one before) is not counted.
static TARGET: AtomicU64 = AtomicU64::new(u64::MAX);

fn on_tick(_irq: u8) {
    let tick = TICKS.load(Ordering::Relaxed) + 1;
    if tick > TARGET.load(Ordering::Relaxed) {
        return;
    }
    let mut h = Fnv(CHECKSUM.load(Ordering::Relaxed));
    h.u64(tick);
    h.u64(WORK.load(Ordering::Relaxed));
    CHECKSUM.store(h.0, Ordering::Relaxed);
    TICKS.store(tick, Ordering::Relaxed);
}

fn main() -> u8 {
    let target = guest_rt::cmdline_u64("ticks", 50).max(1);
    TARGET.store(target, Ordering::Relaxed);
    CHECKSUM.store(Fnv::new().0, Ordering::Relaxed);
    hw::pic_init();
    guest_rt::set_irq_handler(0, on_tick);
    hw::pic_unmask(0);
    hw::pit_start_periodic(1000);

    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    while TICKS.load(Ordering::Relaxed) < target {
        for _ in 0..64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
        }
        WORK.fetch_add(1, Ordering::Relaxed);
        guest_rt::exit_point();
    }
    println!(
        "timer: ticks={} work={} checksum={:016x}",
        TICKS.load(Ordering::Relaxed),
        WORK.load(Ordering::Relaxed),
        CHECKSUM.load(Ordering::Relaxed)
    );
    if state == 0 {
        return 1;
    }
    0
}
