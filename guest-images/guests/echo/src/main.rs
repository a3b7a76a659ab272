//! echo: interrupt-driven serial input. Each line received on COM1 is echoed
//! back upper-cased and reversed as `echo: <line>`; the line `quit` ends the
//! guest with status 0 after printing `echo: bye`.
//!
//! The UART's receive interrupt (IRQ 4) moves bytes into a ring buffer; the
//! main loop idles (an exit to the VMM, HLT being illegal at CPL3) until a
//! whole line is there.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use guest_rt::{console, hw, print_bytes, println};

guest_rt::entry!(main);

const RING: usize = 1024;
static BUF: [AtomicU8; RING] = [const { AtomicU8::new(0) }; RING];
static HEAD: AtomicUsize = AtomicUsize::new(0);
static TAIL: AtomicUsize = AtomicUsize::new(0);

fn on_serial(_irq: u8) {
    while let Some(b) = console::try_read_byte() {
        let head = HEAD.load(Ordering::Relaxed);
        if head.wrapping_sub(TAIL.load(Ordering::Relaxed)) < RING {
            BUF[head % RING].store(b, Ordering::Relaxed);
            HEAD.store(head.wrapping_add(1), Ordering::Release);
        }
    }
}

fn pop() -> Option<u8> {
    let tail = TAIL.load(Ordering::Relaxed);
    if tail == HEAD.load(Ordering::Acquire) {
        return None;
    }
    let b = BUF[tail % RING].load(Ordering::Relaxed);
    TAIL.store(tail.wrapping_add(1), Ordering::Relaxed);
    Some(b)
}

fn main() -> u8 {
    hw::pic_init();
    guest_rt::set_irq_handler(console::COM1_IRQ, on_serial);
    console::enable_rx_interrupt();
    hw::pic_unmask(console::COM1_IRQ);
    println!("echo: ready");

    let mut line = [0u8; 256];
    let mut len = 0;
    loop {
        let Some(b) = pop() else {
            guest_rt::wait_for_interrupt();
            continue;
        };
        match b {
            b'\r' => {}
            b'\n' => {
                let text = &mut line[..len];
                if text == b"quit" {
                    println!("echo: bye");
                    return 0;
                }
                text.make_ascii_uppercase();
                text.reverse();
                print_bytes(b"echo: ");
                print_bytes(text);
                print_bytes(b"\n");
                len = 0;
            }
            _ if len < line.len() => {
                line[len] = b;
                len += 1;
            }
            _ => {}
        }
    }
}
