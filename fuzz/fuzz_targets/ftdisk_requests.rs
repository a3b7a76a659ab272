//! The ftdisk protocol's decoder (shared-disk/src/proto.rs), through
//! `shared_disk::proto::fuzz_wire` (hidden, for fuzzing): the input as one
//! frame's payload decoded as a Request and as a Response, then as a
//! server's connection stream (preamble, request frames). Never a panic,
//! and everything that decodes goes through a frame again unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shared_disk::proto::fuzz_wire(data);
});
