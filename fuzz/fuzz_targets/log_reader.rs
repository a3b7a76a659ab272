//! replay's log format (replay/src/format.rs): `LogReader::new` and
//! `next_record` over arbitrary bytes. Never a panic; once the reader says
//! the log ended it keeps saying so; and every header and record it hands
//! out is one that `LogWriter` writes and `LogReader` reads back equal.
//!
//! The input is the log itself, or (first byte 1) its frames' payloads,
//! each `length: u16 LE | payload`, which the target frames with a correct
//! length and CRC behind the magic and version (`ftvmm_fuzz`: a fuzzer
//! cannot forge a CRC-32, and the records' decoding is behind it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use replay::{LogReader, LogWriter, RecordSink, RecordSource, FORMAT_VERSION, MAGIC};

fuzz_target!(|data: &[u8]| {
    let head = [&MAGIC[..], &FORMAT_VERSION.to_le_bytes()].concat();
    read(&ftvmm_fuzz::stream_or_framed(data, &head, frame));
});

/// Appends one log frame of `payload`: its length (LEB128), the payload,
/// its CRC-32.
fn frame(log: &mut Vec<u8>, payload: &[u8]) {
    let mut n = payload.len() as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        log.push(if n == 0 { byte } else { byte | 0x80 });
        if n == 0 {
            break;
        }
    }
    log.extend_from_slice(payload);
    log.extend_from_slice(&ftvmm_fuzz::crc32(payload).to_le_bytes());
}

fn read(data: &[u8]) {
    let Ok((header, mut reader)) = LogReader::new(data) else { return };
    let mut records = Vec::new();
    loop {
        match reader.next_record() {
            Ok(Some(record)) => records.push(record),
            Ok(None) => {
                assert!(matches!(reader.next_record(), Ok(None)), "a log that ended goes on");
                break;
            }
            Err(_) => break,
        }
    }
    let mut bytes = Vec::new();
    let mut w = LogWriter::new(&mut bytes, &header).expect("writing to a Vec");
    for r in &records {
        w.append(r).expect("writing to a Vec");
    }
    w.flush().expect("flushing a Vec");
    drop(w);
    let (again, mut reader) = LogReader::new(&bytes[..]).expect("a log we wrote reads");
    assert_eq!(again, header);
    for r in &records {
        assert_eq!(reader.next_record().expect("a record we wrote reads").as_ref(), Some(r));
    }
    assert!(matches!(reader.next_record(), Ok(None)));
    assert!(!reader.truncated());
}
