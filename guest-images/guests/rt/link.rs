//! Build script of every guest binary (each guest's Cargo.toml says
//! `build = "../rt/link.rs"`): links it as a freestanding image with link.ld.
//!
//! These linker flags are given here, to the guests' binaries alone, rather
//! than in .cargo/config.toml's rustflags, because rustflags also reach the
//! build scripts of dependencies (smoltcp, heapless), which are ordinary host
//! programs and cannot be linked that way.

use std::env;
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let script = manifest_dir.join("../link.ld");
    let script = script.canonicalize().unwrap_or(script);
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=../rt/link.rs");
    // No C runtime, no libc, a fixed load address from link.ld, static and
    // non-PIE so the VMM can load the image as it is.
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096"]
    {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
