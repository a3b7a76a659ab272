//! hello: prints a greeting on COM1 and exits 0. The smallest ftvmm guest.
#![no_std]
#![no_main]

guest_rt::entry!(main);

fn main() -> u8 {
    guest_rt::print_str("hello from ftvmm guest\n");
    0
}
