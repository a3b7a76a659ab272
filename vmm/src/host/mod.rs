//! The VM's host-facing pieces, each the outside end of a device: the
//! serial console's endpoint and output port ([`console`]), the disk's
//! storage and its writer ([`disk`]), the NIC's TAP device ([`tap`]). The
//! device models never import these: the run loop connects the two.

pub mod console;
pub mod disk;
pub mod tap;
