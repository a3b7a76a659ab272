//! ticker: prints `tick N H` at a steady rate, driven by PIT interrupts, where
//! H chains a hash over every tick so far (H(N) = FNV(H(N-1), N)), and answers
//! each input line with `said: <line>`. A client can check that it saw every
//! tick, in order: the failover guest.
//!
//! Command line: `hz=N` ticks a second (default 20), `ticks=N` to stop after
//! N ticks with status 0 (default 0: run until the VM is killed).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_rt::{console, hw, print_bytes, println, Fnv};

guest_rt::entry!(main);

static TICKS: AtomicU64 = AtomicU64::new(0);
static PIT_IRQS: AtomicU64 = AtomicU64::new(0);
/// PIT interrupts per tick: the PIT cannot run slower than about 19 Hz.
static DIVISOR: AtomicU64 = AtomicU64::new(1);

fn on_tick(_irq: u8) {
    let irqs = PIT_IRQS.fetch_add(1, Ordering::Relaxed) + 1;
    if irqs % DIVISOR.load(Ordering::Relaxed) == 0 {
        TICKS.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() -> u8 {
    let hz = guest_rt::cmdline_u64("hz", 20).clamp(1, 1000);
    let stop_after = guest_rt::cmdline_u64("ticks", 0);
    hw::pic_init();
    guest_rt::set_irq_handler(0, on_tick);
    hw::pic_unmask(0);
    console::start_rx_interrupts();
    let divisor = 19u64.div_ceil(hz);
    DIVISOR.store(divisor, Ordering::Relaxed);
    hw::pit_start_periodic(hz * divisor);
    println!("ticker: ready hz={}", hz);

    let mut printed = 0u64;
    let mut chain = Fnv::new();
    let mut lines = console::LineReader::new();
    loop {
        // Every tick gets its line, in order, even if interrupts coalesced.
        while printed < TICKS.load(Ordering::Relaxed) {
            printed += 1;
            chain.u64(printed);
            println!("tick {} {:016x}", printed, chain.0);
            if printed == stop_after {
                return 0;
            }
        }
        let mut busy = false;
        while let Some(line) = lines.poll() {
            busy = true;
            print_bytes(b"said: ");
            print_bytes(line);
            print_bytes(b"\n");
        }
        if !busy && printed == TICKS.load(Ordering::Relaxed) {
            guest_rt::wait_for_interrupt();
        }
    }
}
