//! What the fuzz targets share: the framing of the targets whose input is a
//! stream of CRC-checked items (`log_reader`, `snapshot_reader`). A fuzzer
//! cannot forge a CRC-32, and the items' decoding lies behind it; so such a
//! target reads either its input as the stream itself or (first byte 1) the
//! stream made of a correct head and the payloads that follow that byte,
//! each `length: u16 LE | payload`, framed with correct lengths and CRCs.

use std::borrow::Cow;

/// The stream a target reads: `data` itself, or (first byte 1) `head`
/// followed by each payload of the rest ([`payloads`]) as `frame` frames it
/// (appending it to the stream).
pub fn stream_or_framed<'a>(data: &'a [u8], head: &[u8], frame: impl Fn(&mut Vec<u8>, &[u8])) -> Cow<'a, [u8]> {
    match data.split_first() {
        Some((1, rest)) => {
            let mut stream = head.to_vec();
            for payload in payloads(rest) {
                frame(&mut stream, payload);
            }
            Cow::Owned(stream)
        }
        _ => Cow::Borrowed(data),
    }
}

/// The payloads in `input`, each `length: u16 LE | payload`; the last one
/// cut short if the input is.
pub fn payloads(mut input: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if input.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([input[0], input[1]])).min(input.len() - 2);
        let (payload, rest) = input[2..].split_at(len);
        input = rest;
        Some(payload)
    })
}

/// CRC-32 (IEEE), the checksum of the log's frames and the snapshot's items.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}
