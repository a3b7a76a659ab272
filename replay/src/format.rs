//! The log file format.
//!
//! ```text
//! magic "FTVMMLOG" | format version: u32 LE | frame(Header) | frame(Record)*
//! frame = payload length: LEB128 | payload: bincode (varint) | CRC-32 of payload: u32 LE
//! ```
//!
//! Every record is its own frame, so a log cut short by a crash replays up to
//! its last complete record, and a flipped bit is caught by the frame's CRC
//! instead of being replayed as a different input.

use crate::{Header, Record, RecordSink, RecordSource};
use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};
use std::io::{self, BufRead, Read, Write};

/// First bytes of every log.
pub const MAGIC: &[u8; 8] = b"FTVMMLOG";
/// Version of the format written here; other versions are refused.
pub const FORMAT_VERSION: u32 = 4;
/// Largest frame accepted: bounds what a corrupt length can make us allocate.
const MAX_FRAME: u64 = 64 << 20;

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_varint_encoding().with_limit(MAX_FRAME)
}

/// Why a log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("not an ftvmm log (bad magic)")]
    BadMagic,
    #[error("log format version {found} is not supported (this ftvmm reads version {FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("the log has no header (empty or truncated file)")]
    NoHeader,
    #[error("corrupt log: record at byte {offset} {why}")]
    Corrupt { offset: u64, why: String },
    #[error("reading the log: {0}")]
    Io(#[from] io::Error),
}

/// Writes a log: the header at creation, then one frame per record.
pub struct LogWriter<W: Write> {
    out: W,
    scratch: Vec<u8>,
}

impl<W: Write> LogWriter<W> {
    pub fn new(mut out: W, header: &Header) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        let mut writer = LogWriter { out, scratch: Vec::new() };
        writer.frame(header)?;
        Ok(writer)
    }

    fn frame<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        self.scratch.clear();
        codec().serialize_into(&mut self.scratch, value).map_err(|e| io::Error::other(e.to_string()))?;
        let mut len = [0u8; 10];
        let n = encode_leb128(self.scratch.len() as u64, &mut len);
        self.out.write_all(&len[..n])?;
        self.out.write_all(&self.scratch)?;
        self.out.write_all(&crc32fast::hash(&self.scratch).to_le_bytes())?;
        Ok(())
    }
}

impl<W: Write> RecordSink for LogWriter<W> {
    fn append(&mut self, record: &Record) -> io::Result<()> {
        self.frame(record)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn encode_leb128(mut v: u64, out: &mut [u8; 10]) -> usize {
    let mut n = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out[n] = byte;
            return n + 1;
        }
        out[n] = byte | 0x80;
        n += 1;
    }
}

/// Reads a log written by [`LogWriter`].
pub struct LogReader<R: BufRead> {
    input: R,
    offset: u64,
    truncated: bool,
}

enum Frame {
    Complete(Vec<u8>),
    /// The input ended inside the frame, or exactly before it.
    End {
        partial: bool,
    },
}

impl<R: BufRead> LogReader<R> {
    /// Reads the magic, version and header.
    pub fn new(mut input: R) -> Result<(Header, Self), LogError> {
        let mut start = [0u8; 12];
        let mut have = 0;
        while have < start.len() {
            match input.read(&mut start[have..])? {
                0 if have == 0 => return Err(LogError::NoHeader),
                0 => return Err(LogError::BadMagic),
                n => have += n,
            }
        }
        if &start[..8] != MAGIC {
            return Err(LogError::BadMagic);
        }
        let found = u32::from_le_bytes([start[8], start[9], start[10], start[11]]);
        if found != FORMAT_VERSION {
            return Err(LogError::Version { found });
        }
        let mut reader = LogReader { input, offset: 12, truncated: false };
        let header = match reader.frame()? {
            Frame::Complete(payload) => reader.decode(&payload)?,
            Frame::End { .. } => return Err(LogError::NoHeader),
        };
        Ok((header, reader))
    }

    /// Whether the log ended inside a record (cut short by a crash).
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    fn decode<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, LogError> {
        codec()
            .deserialize(payload)
            .map_err(|e| LogError::Corrupt { offset: self.offset, why: format!("does not decode: {e}") })
    }

    fn frame(&mut self) -> Result<Frame, LogError> {
        let start = self.offset;
        let mut len: u64 = 0;
        let mut shift = 0;
        let mut first = true;
        loop {
            let mut byte = [0u8; 1];
            if self.input.read(&mut byte)? == 0 {
                return Ok(Frame::End { partial: !first });
            }
            first = false;
            self.offset += 1;
            if shift >= 63 {
                return Err(LogError::Corrupt { offset: start, why: "has an invalid length".into() });
            }
            len |= u64::from(byte[0] & 0x7f) << shift;
            shift += 7;
            if byte[0] & 0x80 == 0 {
                break;
            }
        }
        if len > MAX_FRAME {
            return Err(LogError::Corrupt { offset: start, why: format!("claims {len} bytes") });
        }
        let mut payload = Vec::new();
        let got = (&mut self.input).take(len + 4).read_to_end(&mut payload)?;
        self.offset += got as u64;
        if got < len as usize + 4 {
            return Ok(Frame::End { partial: true });
        }
        let crc = payload.split_off(len as usize);
        if crc32fast::hash(&payload).to_le_bytes()[..] != crc[..] {
            self.offset = start;
            return Err(LogError::Corrupt { offset: start, why: "fails its checksum".into() });
        }
        Ok(Frame::Complete(payload))
    }
}

impl<R: BufRead> RecordSource for LogReader<R> {
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        if self.truncated {
            return Ok(None);
        }
        let start = self.offset;
        match self.frame()? {
            Frame::Complete(payload) => {
                let record = self.decode(&payload).map_err(|e| match e {
                    LogError::Corrupt { why, .. } => LogError::Corrupt { offset: start, why },
                    other => other,
                })?;
                Ok(Some(record))
            }
            Frame::End { partial } => {
                self.truncated = partial;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Digest, Entry, Event, ExitKind, Position, TimeSource};

    fn header() -> Header {
        Header { image_hash: Digest([3; 32]), config: "mem_mib=64".into(), wall_clock_base_ns: 1, disk_generation: 0 }
    }

    fn records() -> Vec<Record> {
        let mut v = Vec::new();
        for i in 1..200u64 {
            let position = Position { exit: i, rip: 0x10_0000 + i * 3 };
            v.push(Record { position, entry: Entry::Exit(ExitKind::IoOut { port: 0x80, size: 1 }) });
            if i % 7 == 0 {
                v.push(Record {
                    position,
                    entry: Entry::Event(Event::TimeRead { source: TimeSource::TimerCheck, ns: i * 1000 }),
                });
                v.push(Record { position, entry: Entry::Event(Event::SerialRx { bytes: vec![i as u8; 3] }) });
            }
        }
        v
    }

    fn write_log() -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
        for r in records() {
            w.append(&r).unwrap();
        }
        w.out
    }

    fn read_all(bytes: &[u8]) -> Result<(Vec<Record>, bool), LogError> {
        let (_, mut r) = LogReader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok((out, r.truncated()))
    }

    #[test]
    fn round_trips() {
        let bytes = write_log();
        let (h, _) = LogReader::new(&bytes[..]).unwrap();
        assert_eq!(h, header());
        let (recs, truncated) = read_all(&bytes).unwrap();
        assert_eq!(recs, records());
        assert!(!truncated);
    }

    #[test]
    fn truncation_anywhere_yields_a_prefix() {
        let bytes = write_log();
        let header_len = LogWriter::new(Vec::new(), &header()).unwrap().out.len();
        let all = records();
        for cut in 0..bytes.len() {
            match read_all(&bytes[..cut]) {
                Ok((recs, _)) => assert_eq!(recs[..], all[..recs.len()], "cut at {cut}"),
                Err(LogError::NoHeader) | Err(LogError::BadMagic) => {
                    assert!(cut < header_len, "cut at {cut}")
                }
                Err(e) => panic!("cut at {cut}: {e}"),
            }
        }
    }

    #[test]
    fn flipped_bits_are_caught_never_replayed() {
        let bytes = write_log();
        let all = records();
        for i in 0..bytes.len() {
            for bit in [0, 3, 7] {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                // Either an error, or (a flip in a length) a shorter prefix.
                if let Ok((recs, _)) = read_all(&bad) {
                    assert_eq!(recs[..], all[..recs.len()], "flip at {i}:{bit}");
                }
            }
        }
    }

    #[test]
    fn rejects_other_versions_and_garbage() {
        let mut bytes = write_log();
        bytes[8] = 9;
        assert!(matches!(LogReader::new(&bytes[..]), Err(LogError::Version { found: 9 })));
        assert!(matches!(LogReader::new(&b"hello world, not a log"[..]), Err(LogError::BadMagic)));
        assert!(matches!(LogReader::new(&b""[..]), Err(LogError::NoHeader)));
    }
}
