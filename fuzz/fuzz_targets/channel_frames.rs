//! The logging channel's wire format (logging-channel/src/wire.rs): the
//! frame decoder and the message decoding of the handshake and of
//! streaming, through `logging_channel::fuzz_wire` (hidden, for fuzzing):
//! the input as one frame's payload, then as a connection's byte stream
//! (preamble, frames). Never a panic, and every message that decodes
//! re-encodes to bytes that decode and encode the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logging_channel::fuzz_wire(data);
});
