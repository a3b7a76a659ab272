//! The COM1 16550 console: polled output, interrupt-driven input.

use crate::hw::{inb, outb};
use core::fmt::Write;

const COM1: u16 = 0x3f8;
/// PIC line of COM1.
pub const COM1_IRQ: u8 = 4;

/// Writes bytes to COM1, waiting for the transmitter like a real driver.
pub fn print_bytes(bytes: &[u8]) {
    for &b in bytes {
        while inb(COM1 + 5) & 0x20 == 0 {}
        outb(COM1, b);
    }
}

pub fn print_str(s: &str) {
    print_bytes(s.as_bytes());
}

struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        print_str(s);
        Ok(())
    }
}

/// Formats to COM1 (see the `println!` macro).
pub fn print_fmt(args: core::fmt::Arguments) {
    let _ = Console.write_fmt(args);
}

/// Enables the receive-data interrupt on COM1 (the PIC line still needs unmasking).
pub fn enable_rx_interrupt() {
    outb(COM1 + 1, 0x01);
    // OUT2 gates the UART's interrupt onto the bus on a PC.
    outb(COM1 + 4, 0x08);
}

/// A received byte, if the UART has one.
pub fn try_read_byte() -> Option<u8> {
    if inb(COM1 + 5) & 0x01 != 0 {
        Some(inb(COM1))
    } else {
        None
    }
}

#[macro_export]
macro_rules! println {
    () => { $crate::console::print_str("\n") };
    ($($arg:tt)*) => {{
        $crate::console::print_fmt(format_args!($($arg)*));
        $crate::console::print_str("\n");
    }};
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print_fmt(format_args!($($arg)*)) };
}
