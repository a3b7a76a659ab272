//! Property tests of the log format (src/format.rs): every header and
//! record `LogWriter` writes reads back equal through `LogReader`; a log cut
//! at any byte reads as a prefix of its records or fails cleanly; and any
//! bytes at all give records or errors, never a panic.

use proptest::collection::vec;
use proptest::prelude::*;
use replay::{
    Digest, Entry, Event, ExitKind, Header, LogError, LogReader, LogWriter, Position, Record, RecordSink, RecordSource,
    SyncPart, TimeSource, FORMAT_VERSION, MAGIC,
};

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn header() -> impl Strategy<Value = Header> {
    (digest(), any::<String>(), any::<u64>(), any::<u64>()).prop_map(
        |(image_hash, config, wall_clock_base_ns, disk_generation)| Header {
            image_hash,
            config,
            wall_clock_base_ns,
            disk_generation,
        },
    )
}

fn exit_kind() -> impl Strategy<Value = ExitKind> {
    prop_oneof![
        (any::<u16>(), any::<u8>()).prop_map(|(port, size)| ExitKind::IoIn { port, size }),
        (any::<u16>(), any::<u8>()).prop_map(|(port, size)| ExitKind::IoOut { port, size }),
        (any::<u64>(), any::<u8>()).prop_map(|(addr, size)| ExitKind::MmioRead { addr, size }),
        (any::<u64>(), any::<u8>()).prop_map(|(addr, size)| ExitKind::MmioWrite { addr, size }),
        Just(ExitKind::Hlt),
        any::<u32>().prop_map(|index| ExitKind::RdMsr { index }),
        any::<u32>().prop_map(|index| ExitKind::WrMsr { index }),
        Just(ExitKind::IrqWindow),
    ]
}

fn time_source() -> impl Strategy<Value = TimeSource> {
    prop_oneof![
        Just(TimeSource::TimerCheck),
        Just(TimeSource::Pit),
        Just(TimeSource::Rtc),
        Just(TimeSource::Rdtsc),
        Just(TimeSource::TscMsr),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        any::<u8>().prop_map(|vector| Event::Interrupt { vector }),
        (time_source(), any::<u64>()).prop_map(|(source, ns)| Event::TimeRead { source, ns }),
        bytes(64).prop_map(|bytes| Event::SerialRx { bytes }),
        bytes(2048).prop_map(|data| Event::DiskRead { data }),
        bytes(1600).prop_map(|frame| Event::NetRx { frame }),
        (any::<u64>(), bytes(8192)).prop_map(|(first, data)| Event::Sync(SyncPart::Pages { first, data })),
        (any::<u64>(), any::<u64>()).prop_map(|(first, count)| Event::Sync(SyncPart::Zeros { first, count })),
        bytes(3000).prop_map(|state| Event::Sync(SyncPart::Vcpu { state })),
        digest().prop_map(|digest| Event::DigestCheck { digest }),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        exit_kind().prop_map(Entry::Exit),
        event().prop_map(Entry::Event),
        (any::<u8>(), digest()).prop_map(|(status, digest)| Entry::End { status, digest }),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    (any::<u64>(), any::<u64>(), entry())
        .prop_map(|(exit, rip, entry)| Record { position: Position { exit, rip }, entry })
}

fn write_log(header: &Header, records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = LogWriter::new(&mut out, header).unwrap();
    for r in records {
        w.append(r).unwrap();
    }
    w.flush().unwrap();
    drop(w);
    out
}

/// The header, the records up to the end or the first error, whether the
/// log said it was truncated, and the error.
fn read_log(bytes: &[u8]) -> Result<(Header, Vec<Record>, bool, Option<LogError>), LogError> {
    let (header, mut r) = LogReader::new(bytes)?;
    let mut records = Vec::new();
    loop {
        match r.next_record() {
            Ok(Some(rec)) => records.push(rec),
            Ok(None) => return Ok((header, records, r.truncated(), None)),
            Err(e) => return Ok((header, records, r.truncated(), Some(e))),
        }
    }
}

proptest! {
    // The failing input is printed; no regression file in the tree.
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn everything_written_reads_back_equal(h in header(), records in vec(record(), 0..40)) {
        let bytes = write_log(&h, &records);
        let (got_header, got, truncated, err) = read_log(&bytes).unwrap();
        prop_assert_eq!(got_header, h);
        prop_assert_eq!(got, records);
        prop_assert!(!truncated);
        prop_assert!(err.is_none(), "{:?}", err);
    }

    /// Every variant on its own, NetRx frames of any legal size included.
    #[test]
    fn each_record_reads_back_alone(h in header(), r in record()) {
        let bytes = write_log(&h, std::slice::from_ref(&r));
        let (_, got, _, err) = read_log(&bytes).unwrap();
        prop_assert!(err.is_none());
        prop_assert_eq!(got, vec![r]);
    }

    /// A log cut at any byte (a crash mid-write) reads as a prefix of its
    /// records; only a cut inside the magic, version or header fails, and
    /// then as "no header" or "bad magic".
    #[test]
    fn a_log_cut_anywhere_is_a_prefix(h in header(), records in vec(record(), 1..12), cut in any::<prop::sample::Index>()) {
        let bytes = write_log(&h, &records);
        let header_len = write_log(&h, &[]).len();
        let cut = cut.index(bytes.len() + 1);
        match read_log(&bytes[..cut]) {
            Ok((got_header, got, truncated, err)) => {
                prop_assert!(cut >= header_len);
                prop_assert_eq!(&got_header, &h);
                prop_assert!(err.is_none(), "cut at {}: {:?}", cut, err);
                prop_assert_eq!(&got[..], &records[..got.len()]);
                // Cut exactly between two frames: not truncated.
                let whole = write_log(&h, &records[..got.len()]).len();
                prop_assert_eq!(truncated, cut != whole, "cut at {}, {} records are {} bytes", cut, got.len(), whole);
            }
            Err(LogError::NoHeader) | Err(LogError::BadMagic) => prop_assert!(cut < header_len),
            Err(e) => prop_assert!(false, "cut at {}: {}", cut, e),
        }
    }

    /// Random bytes after a valid start, and random bytes alone: records or
    /// errors, never a panic.
    #[test]
    fn garbage_never_panics(h in header(), tail in bytes(512), raw in bytes(512)) {
        let mut log = write_log(&h, &[]);
        log.extend_from_slice(&tail);
        let _ = read_log(&log);
        let _ = read_log(&raw);
        let mut start = MAGIC.to_vec();
        start.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        start.extend_from_slice(&raw);
        let _ = read_log(&start);
    }
}
