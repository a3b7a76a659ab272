//! spin: programs the PIT at `hz` and runs a CPL3 loop with no port I/O and
//! no other exit until its tick handler has counted `hz × seconds` ticks,
//! then prints `spin: ticks=N elapsed_us=E loops=L checksum=C state=S`: E
//! the virtual time the ticks took, C a hash over (tick number, loop counter
//! at that tick) for every tick, S the loop's own result.
//!
//! Unlike `timer`, the loop never calls `exit_point()`, and the PICs run in
//! auto-EOI mode so that the tick handler does not exit either: the guest's
//! only way to see a tick is the VMM kicking the vCPU and injecting the
//! interrupt at a state sync. A different host timing gives a different
//! checksum; a replay of a recording (or a backup) gives the recorded one.
//!
//! Command line: `hz=H` (default 100, 1..=1000), `seconds=S` (default 2),
//! `remap=1` to have the loop also rewrite one of its own page-directory
//! entries now and then (a 2 MiB window flips between two frames, whose
//! markers it reads): a sync then carries changed page tables, which a
//! backup must make KVM's shadow tables see.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_rt::{hw, println, Fnv};

guest_rt::entry!(main);

static TICKS: AtomicU64 = AtomicU64::new(0);
static PIT_IRQS: AtomicU64 = AtomicU64::new(0);
static LOOPS: AtomicU64 = AtomicU64::new(0);
static CHECKSUM: AtomicU64 = AtomicU64::new(0);
/// PIT interrupts per tick: the PIT cannot run slower than about 19 Hz.
static DIVISOR: AtomicU64 = AtomicU64::new(1);

fn on_tick(_irq: u8) {
    let irqs = PIT_IRQS.fetch_add(1, Ordering::Relaxed) + 1;
    if !irqs.is_multiple_of(DIVISOR.load(Ordering::Relaxed)) {
        return;
    }
    let tick = TICKS.load(Ordering::Relaxed) + 1;
    let mut h = Fnv(CHECKSUM.load(Ordering::Relaxed));
    h.u64(tick);
    h.u64(LOOPS.load(Ordering::Relaxed));
    CHECKSUM.store(h.0, Ordering::Relaxed);
    TICKS.store(tick, Ordering::Relaxed);
}

/// The page directory of the first GiB (ftvmm's boot layout: PML4 at
/// 0x9000, PDPT, then the PDs), identity-mapped and writable at CPL3.
const BOOT_PD: usize = 0xb000;
/// The window the remap flips: the 2 MiB page at 48 MiB, mapped to frame
/// A (itself) or B (the next 2 MiB).
const WINDOW: usize = 48 << 20;
const FRAME_B: usize = 50 << 20;
const PDE_FLAGS: u64 = 0x1 | 0x2 | 0x4 | 0x80;

/// Maps the window to `frame`.
fn map_window(frame: usize) {
    // SAFETY: the boot PD is identity-mapped and writable; entry WINDOW>>21
    // maps only the window, which nothing else uses.
    unsafe { core::ptr::write_volatile((BOOT_PD as *mut u64).add(WINDOW >> 21), frame as u64 | PDE_FLAGS) };
}

fn main() -> u8 {
    let remap = guest_rt::cmdline_u64("remap", 0) != 0;
    let mem_size = guest_rt::BootInfo::get().map_or(0, |b| b.mem_size()) as usize;
    if remap && mem_size < FRAME_B + (2 << 20) {
        println!("spin: remap=1 needs at least 52 MiB of memory");
        return 1;
    }
    if remap {
        // SAFETY: both frames are guest RAM that nothing else uses.
        unsafe {
            core::ptr::write_volatile(WINDOW as *mut u64, 0xa);
            core::ptr::write_volatile(FRAME_B as *mut u64, 0xb);
        }
    }
    let hz = guest_rt::cmdline_u64("hz", 100).clamp(1, 1000);
    let seconds = guest_rt::cmdline_u64("seconds", 2).max(1);
    let target = hz * seconds;
    CHECKSUM.store(Fnv::new().0, Ordering::Relaxed);
    hw::pic_init_auto_eoi();
    guest_rt::set_irq_handler(0, on_tick);
    hw::pic_unmask(0);
    let divisor = 19u64.div_ceil(hz);
    DIVISOR.store(divisor, Ordering::Relaxed);
    hw::pit_start_periodic(hz * divisor);
    println!("spin: hz={} seconds={} target={}", hz, seconds, target);
    // The virtual TSC counts nanoseconds: how long the ticks took to come.
    let started = hw::rdtsc();

    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    while TICKS.load(Ordering::Relaxed) < target {
        for _ in 0..64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
        }
        let loops = LOOPS.fetch_add(1, Ordering::Relaxed) + 1;
        if remap {
            if loops.is_multiple_of(4096) {
                map_window(if loops.is_multiple_of(8192) { WINDOW } else { FRAME_B });
            }
            // SAFETY: the window is mapped to one of the two frames.
            state = state.wrapping_add(unsafe { core::ptr::read_volatile(WINDOW as *const u64) });
        }
    }
    // What the loop saw, before the exits below can bring more ticks.
    let (ticks, loops, checksum) =
        (TICKS.load(Ordering::Relaxed), LOOPS.load(Ordering::Relaxed), CHECKSUM.load(Ordering::Relaxed));
    let elapsed_us = hw::rdtsc().wrapping_sub(started) / 1000;
    println!(
        "spin: ticks={} elapsed_us={} loops={} checksum={:016x} state={:016x}",
        ticks, elapsed_us, loops, checksum, state
    );
    if state == 0 {
        return 1;
    }
    0
}
