//! echo: interrupt-driven serial input. Each line received on COM1 is echoed
//! back upper-cased and reversed as `echo: <line>`; the line `quit` ends the
//! guest with status 0 after printing `echo: bye`.
//!
//! The UART's receive interrupt (IRQ 4) moves bytes into guest-rt's ring; the
//! main loop idles (an exit to the VMM, HLT being illegal at CPL3) until a
//! whole line is there.
#![no_std]
#![no_main]

use guest_rt::{console, hw, print_bytes, println};

guest_rt::entry!(main);

fn main() -> u8 {
    hw::pic_init();
    console::start_rx_interrupts();
    println!("echo: ready");

    let mut lines = console::LineReader::new();
    loop {
        let Some(text) = lines.poll() else {
            guest_rt::wait_for_interrupt();
            continue;
        };
        if text == b"quit" {
            println!("echo: bye");
            return 0;
        }
        text.make_ascii_uppercase();
        text.reverse();
        print_bytes(b"echo: ");
        print_bytes(text);
        print_bytes(b"\n");
    }
}
