//! guest-images: the guests ftvmm boots, built from source by this crate's
//! build script and embedded in the binary.
//!
//! The guests live in `guests/`, a workspace of their own: freestanding
//! (`#![no_std]`, `panic = "abort"`) Rust binaries for the host target, linked
//! at 1 MiB by `guests/link.ld`. `guests/rt` is their shared runtime: a CPL0
//! boot stub of a few dozen assembly instructions, then everything at CPL3.

/// One embedded guest image.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// The name `ftvmm --guest` takes.
    pub name: &'static str,
    /// One line saying what the guest does (its crate description).
    pub description: &'static str,
    /// The ELF image.
    pub image: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The embedded guest called `name`.
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_is_embedded_as_an_elf() {
        let hello = find("hello").expect("hello is built");
        assert_eq!(&hello.image[..4], b"\x7fELF");
        assert!(!hello.description.is_empty());
        assert!(find("no-such-guest").is_none());
    }
}
