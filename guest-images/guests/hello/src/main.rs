//! hello: prints a greeting on the console and exits 0. The smallest ftvmm
//! guest.
//!
//! For tests of a guest's last words, `end=` on the command line ends it
//! otherwise after the greeting: `panic` panics, `fault` takes a CPU
//! exception (#UD), `nested` panics in the middle of a print (the panic
//! message must come out all the same: guest-rt then prints it on COM1).
#![no_std]
#![no_main]

use core::fmt;

guest_rt::entry!(main);

/// Panics when formatted: a panic inside a print.
struct Boom;

impl fmt::Display for Boom {
    fn fmt(&self, _: &mut fmt::Formatter) -> fmt::Result {
        panic!("inside a print")
    }
}

fn main() -> u8 {
    guest_rt::print_str("hello from ftvmm guest\n");
    match guest_rt::cmdline_str("end") {
        Some(b"panic") => panic!("asked to"),
        Some(b"fault") => {
            // SAFETY: ud2 only raises #UD, whose handler ends the VM.
            unsafe { core::arch::asm!("ud2") };
        }
        Some(b"nested") => guest_rt::println!("never whole: {}", Boom),
        _ => {}
    }
    0
}
