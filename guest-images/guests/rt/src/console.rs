//! The console: output through the virtio-console when the VM has one (a
//! print call is one exit: [`crate::virtio_console`]), else on COM1, the
//! 16550 (polled, one exit a byte); input always from COM1, interrupt-
//! driven.
//!
//! Every print call is a unit: `println!` formats its line and newline in
//! one call, so a line costs one notify. A print from an interrupt or
//! exception handler that ran at an exit of another print, and the panic
//! message of a panic inside one, go to COM1: they always come out.

use crate::hw::{inb, outb};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

const COM1: u16 = 0x3f8;
/// PIC line of COM1.
pub const COM1_IRQ: u8 = 4;

/// Bytes the 16550's transmit FIFO takes once it reports itself empty.
const TX_FIFO: usize = 16;
static FIFO_ON: AtomicBool = AtomicBool::new(false);

/// Prints bytes: through the virtio-console if the VM has one, else on
/// COM1.
pub fn print_bytes(bytes: &[u8]) {
    if !crate::virtio_console::print_bytes(bytes) {
        uart_print_bytes(bytes);
    }
}

/// Writes bytes to COM1, waiting for the transmitter like a real driver:
/// with the FIFOs on, a transmitter that reports itself empty (LSR.THRE)
/// takes a FIFO's worth, so the status is read once per 16 bytes, not per
/// byte (each access is an exit: half the exits of a line).
pub fn uart_print_bytes(bytes: &[u8]) {
    if !FIFO_ON.swap(true, Ordering::Relaxed) {
        // FCR: enable the FIFOs, clear both.
        outb(COM1 + 2, 0x07);
    }
    for chunk in bytes.chunks(TX_FIFO) {
        while inb(COM1 + 5) & 0x20 == 0 {}
        for &b in chunk {
            outb(COM1, b);
        }
    }
}

pub fn print_str(s: &str) {
    print_bytes(s.as_bytes());
}

/// COM1 as a formatting target.
struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        uart_print_bytes(s.as_bytes());
        Ok(())
    }
}

/// Formats to the console (see the `println!` macro): through the
/// virtio-console in one notify if the VM has one, else on COM1.
pub fn print_fmt(args: core::fmt::Arguments) {
    if !crate::virtio_console::print_fmt(args) {
        let _ = Uart.write_fmt(args);
    }
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

/// Prints a line: the text and its newline in one print call (one notify
/// of the virtio-console).
#[macro_export]
macro_rules! println {
    () => { $crate::console::print_str("\n") };
    ($($arg:tt)*) => {
        $crate::console::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print_fmt(format_args!($($arg)*)) };
}

/// Received bytes, queued by the receive interrupt until the guest reads them.
const RX_RING: usize = 1024;
static RX: [AtomicU8; RX_RING] = [const { AtomicU8::new(0) }; RX_RING];
static RX_HEAD: AtomicUsize = AtomicUsize::new(0);
static RX_TAIL: AtomicUsize = AtomicUsize::new(0);

fn on_rx(_irq: u8) {
    while let Some(b) = try_read_byte() {
        let head = RX_HEAD.load(Ordering::Relaxed);
        // A full ring drops the byte, as a UART overrun would.
        if head.wrapping_sub(RX_TAIL.load(Ordering::Relaxed)) < RX_RING {
            RX[head % RX_RING].store(b, Ordering::Relaxed);
            RX_HEAD.store(head.wrapping_add(1), Ordering::Release);
        }
    }
}

/// Interrupt-driven input: COM1's receive interrupt (IRQ 4) moves bytes into
/// a ring that [`pop_rx`] reads. Call after `hw::pic_init`.
pub fn start_rx_interrupts() {
    crate::set_irq_handler(COM1_IRQ, on_rx);
    enable_rx_interrupt();
    crate::hw::pic_unmask(COM1_IRQ);
}

/// The next byte the receive interrupt queued, if any.
pub fn pop_rx() -> Option<u8> {
    let tail = RX_TAIL.load(Ordering::Relaxed);
    if tail == RX_HEAD.load(Ordering::Acquire) {
        return None;
    }
    let b = RX[tail % RX_RING].load(Ordering::Relaxed);
    RX_TAIL.store(tail.wrapping_add(1), Ordering::Relaxed);
    Some(b)
}

/// Assembles lines from the interrupt-driven input ([`start_rx_interrupts`]).
/// Carriage returns are dropped; a line longer than the buffer is cut short.
pub struct LineReader {
    buf: [u8; 256],
    len: usize,
}

impl Default for LineReader {
    fn default() -> Self {
        Self::new()
    }
}

impl LineReader {
    pub const fn new() -> Self {
        LineReader { buf: [0; 256], len: 0 }
    }

    /// The next complete line (without its newline), once one has arrived.
    pub fn poll(&mut self) -> Option<&mut [u8]> {
        while let Some(b) = pop_rx() {
            match b {
                b'\n' => {
                    let len = core::mem::take(&mut self.len);
                    return Some(&mut self.buf[..len]);
                }
                b'\r' => {}
                _ if self.len < self.buf.len() => {
                    self.buf[self.len] = b;
                    self.len += 1;
                }
                _ => {}
            }
        }
        None
    }
}
