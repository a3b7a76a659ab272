//! Port I/O and the legacy PC devices ftvmm emulates: 8259 PIC pair, 8254 PIT,
//! CMOS RTC. Every access here is a port I/O exit to the VMM.
//!
//! The asm of each exit deliberately does not claim `nomem`: at an exit the
//! VMM may write guest memory (a virtio device fills a receive buffer and
//! its used ring) and an interrupt handler may run, so the compiler must
//! not carry memory values across one.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// Vector of PIC line 0 after [`pic_init`]; line n is `PIC_VECTOR_BASE + n`.
pub const PIC_VECTOR_BASE: u8 = 32;
/// Input clock of the 8254 PIT.
pub const PIT_HZ: u64 = 1_193_182;

#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: IOPL 3; every port is emulated by the VMM.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) }
}

#[inline]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: IOPL 3; every port is emulated by the VMM.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) }
    value
}

#[inline]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: IOPL 3; every port is emulated by the VMM.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags)) }
    value
}

/// Initialises both PICs: vectors 32..48, slave on IR2, every line masked.
pub fn pic_init() {
    pic_init_with_icw4(0x01);
    AUTO_EOI.store(false, Ordering::Relaxed);
}

/// Like [`pic_init`], but in auto-EOI mode: the PICs end each interrupt
/// themselves when the CPU takes it, so the handler dispatch sends no EOI
/// (one port exit less per interrupt). A line's handler can then be
/// entered again, at one of its own exits, by that same line.
pub fn pic_init_auto_eoi() {
    pic_init_with_icw4(0x03);
    AUTO_EOI.store(true, Ordering::Relaxed);
}

static AUTO_EOI: AtomicBool = AtomicBool::new(false);

/// Whether the PICs run in auto-EOI mode ([`pic_init_auto_eoi`]).
pub fn pic_auto_eoi() -> bool {
    AUTO_EOI.load(Ordering::Relaxed)
}

fn pic_init_with_icw4(icw4: u8) {
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, PIC_VECTOR_BASE);
    outb(0xa1, PIC_VECTOR_BASE + 8);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, icw4);
    outb(0xa1, icw4);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// Unmasks PIC line `irq`.
pub fn pic_unmask(irq: u8) {
    if irq < 8 {
        outb(0x21, inb(0x21) & !(1 << irq));
    } else {
        outb(0xa1, inb(0xa1) & !(1 << (irq - 8)));
        outb(0x21, inb(0x21) & !(1 << 2));
    }
}

/// End of interrupt for line `irq`.
pub fn pic_eoi(irq: u8) {
    if irq >= 8 {
        outb(0xa0, 0x20);
    }
    outb(0x20, 0x20);
}

/// Programs PIT channel 0 as a rate generator firing `hz` times a second.
pub fn pit_start_periodic(hz: u64) {
    let reload = (PIT_HZ / hz.max(19)).clamp(1, 0xffff) as u16;
    outb(0x43, 0x34);
    outb(0x40, reload as u8);
    outb(0x40, (reload >> 8) as u8);
}

/// Programs PIT channel 0 as a one-shot (mode 0, interrupt on terminal
/// count): IRQ 0 fires once, `ticks` PIT clocks ([`PIT_HZ`]) from now.
/// Reprogramming before it fires replaces the pending shot.
pub fn pit_one_shot(ticks: u16) {
    outb(0x43, 0x30);
    outb(0x40, ticks as u8);
    outb(0x40, (ticks >> 8) as u8);
}

/// Latches and reads PIT channel 0's current count.
pub fn pit_read_count() -> u16 {
    outb(0x43, 0x00);
    let lo = inb(0x40);
    let hi = inb(0x40);
    u16::from_le_bytes([lo, hi])
}

/// Reads CMOS register `reg`.
pub fn cmos_read(reg: u8) -> u8 {
    outb(0x70, reg);
    inb(0x71)
}

/// Reads the time stamp counter. ftvmm's loader rewrites this RDTSC into an
/// exit, so the value comes from the VMM's virtual clock.
#[inline]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no memory effects on real hardware; under ftvmm it is
    // an exit (hence no `nomem`, see the module docs).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}
