//! clock: reads time through every path ftvmm offers — IA32_TSC with RDMSR
//! (at CPL0, in the boot hook: RDMSR faults at CPL3), then the PIT counter
//! (latched), the CMOS RTC and RDTSC at CPL3, then the time an idle woke at
//! (the idle port's 32-bit read) — and prints the readings and a hash over
//! all of them.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use guest_rt::{hw, println, Fnv};

guest_rt::entry!(main, cpl0_hook);

/// IA32_TSC read twice with RDMSR at CPL0 by `guest_cpl0_hook`.
#[no_mangle]
static CPL0_MSR_TSC: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

core::arch::global_asm!(
    r#"
    .global guest_cpl0_hook
guest_cpl0_hook:
    mov ecx, 0x10
    rdmsr
    mov dword ptr [rip + CPL0_MSR_TSC], eax
    mov dword ptr [rip + CPL0_MSR_TSC + 4], edx
    rdmsr
    mov dword ptr [rip + CPL0_MSR_TSC + 8], eax
    mov dword ptr [rip + CPL0_MSR_TSC + 12], edx
    ret
"#
);

fn bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

fn main() -> u8 {
    let mut hash = Fnv::new();
    let msr = [CPL0_MSR_TSC[0].load(Ordering::Relaxed), CPL0_MSR_TSC[1].load(Ordering::Relaxed)];
    println!("clock: rdmsr IA32_TSC at cpl0 = {}, {}", msr[0], msr[1]);
    hash.u64(msr[0]);
    hash.u64(msr[1]);
    hw::pic_init();
    hw::pit_start_periodic(100);
    let mut last_tsc = msr[1];
    for round in 0..4 {
        let pit = hw::pit_read_count();
        let (sec, min, hour) = (hw::cmos_read(0x00), hw::cmos_read(0x02), hw::cmos_read(0x04));
        let (day, month, year, century) =
            (hw::cmos_read(0x07), hw::cmos_read(0x08), hw::cmos_read(0x09), hw::cmos_read(0x32));
        let tsc = hw::rdtsc();
        if tsc < last_tsc || msr[1] < msr[0] {
            println!("clock: the TSC went backwards");
            return 1;
        }
        last_tsc = tsc;
        for v in [
            u64::from(pit),
            u64::from(sec),
            u64::from(min),
            u64::from(hour),
            u64::from(day),
            u64::from(month),
            u64::from(year),
            tsc,
        ] {
            hash.u64(v);
        }
        println!(
            "clock: round {} pit={} rtc={}{:02}-{:02}-{:02} {:02}:{:02}:{:02} tsc={}",
            round,
            pit,
            bcd(century),
            bcd(year),
            bcd(month),
            bcd(day),
            bcd(hour),
            bcd(min),
            bcd(sec),
            tsc
        );
    }
    // Idle until the next tick: the idle exit answers the time it woke at,
    // after the last reading and no later than the next.
    hw::pic_unmask(0);
    let woke = guest_rt::wait_for_interrupt_clock();
    let after = hw::rdtsc();
    println!("clock: idle woke={} after={}", woke, after);
    if woke <= last_tsc || after < woke {
        println!("clock: the wake-up time is out of order");
        return 1;
    }
    hash.u64(woke);
    hash.u64(after);
    println!("clock: hash={:016x}", hash.0);
    0
}
