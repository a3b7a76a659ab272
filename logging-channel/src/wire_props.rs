//! Property tests of the wire format (wire.rs): every message encodes and
//! decodes back equal, through a frame as `read_frame` reads it; random
//! bytes, as a payload or as a stream, give errors, never a panic.

use crate::wire::{decode, encode, preamble, read_frame, read_preamble, Bytes, Message};
use crate::{ChannelError, LogStart, MAX_FRAME};
use proptest::collection::vec;
use proptest::prelude::*;
use replay::{Digest, Entry, Event, ExitKind, Header, Position, Record, TimeSource};
use std::borrow::Cow;
use std::future::Future;
use std::task::{Context, Poll, Waker};

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

fn header() -> impl Strategy<Value = Header> {
    (any::<[u8; 32]>(), any::<String>(), any::<u64>(), any::<u64>()).prop_map(
        |(hash, config, wall_clock_base_ns, disk_generation)| Header {
            image_hash: Digest(hash),
            config,
            wall_clock_base_ns,
            disk_generation,
        },
    )
}

fn record() -> impl Strategy<Value = Record> {
    let entry = prop_oneof![
        (any::<u16>(), any::<u8>()).prop_map(|(port, size)| Entry::Exit(ExitKind::IoOut { port, size })),
        (any::<u64>(), any::<u8>()).prop_map(|(addr, size)| Entry::Exit(ExitKind::MmioWrite { addr, size })),
        Just(Entry::Exit(ExitKind::Hlt)),
        any::<u8>().prop_map(|vector| Entry::Event(Event::Interrupt { vector })),
        any::<u64>().prop_map(|ns| Entry::Event(Event::TimeRead { source: TimeSource::Rdtsc, ns })),
        bytes(32).prop_map(|bytes| Entry::Event(Event::SerialRx { bytes })),
        bytes(600).prop_map(|data| Entry::Event(Event::DiskRead { data })),
        bytes(1600).prop_map(|frame| Entry::Event(Event::NetRx { frame })),
        (any::<u8>(), any::<[u8; 32]>()).prop_map(|(status, d)| Entry::End { status, digest: Digest(d) }),
        any::<[u8; 32]>().prop_map(|d| Entry::Event(Event::DigestCheck { digest: Digest(d) })),
    ];
    (any::<u64>(), any::<u64>(), entry)
        .prop_map(|(exit, rip, entry)| Record { position: Position { exit, rip }, entry })
}

fn message() -> impl Strategy<Value = Message<'static>> {
    let start = prop_oneof![Just(LogStart::Boot), Just(LogStart::State)];
    prop_oneof![
        (header(), start).prop_map(|(header, start)| Message::Hello { header, start }),
        Just(()).prop_map(|_| Message::Welcome),
        any::<String>().prop_map(|reason| Message::Reject { reason }),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), vec(record(), 0..16)).prop_map(
            |(seq, watermark, released, disk_applied, records)| Message::Batch {
                seq,
                watermark,
                released,
                disk_applied,
                records: Cow::Owned(records)
            }
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, watermark)| Message::Ack { seq, watermark }),
        Just(()).prop_map(|_| Message::Heartbeat),
        Just(()).prop_map(|_| Message::Done),
        (any::<u64>(), bytes(4096)).prop_map(|(offset, data)| Message::State { offset, data: Bytes(Cow::Owned(data)) }),
        (any::<u64>(), any::<u64>()).prop_map(|(exit, len)| Message::StateEnd { exit, len }),
        any::<u64>().prop_map(|consumed| Message::StateAck { consumed }),
        any::<u64>().prop_map(|exit| Message::Resync { exit }),
        Just(()).prop_map(|_| Message::StateRestart),
    ]
}

/// `Message` has no PartialEq (it borrows); two messages are equal when
/// their variants and fields are, which their Debug shows — except a
/// `State`'s data, which Debug shows as a length.
fn same(a: &Message<'_>, b: &Message<'_>) -> bool {
    match (a, b) {
        (Message::State { offset: o1, data: d1 }, Message::State { offset: o2, data: d2 }) => o1 == o2 && d1.0 == d2.0,
        (Message::Batch { records: r1, .. }, Message::Batch { records: r2, .. }) => {
            r1 == r2 && format!("{a:?}") == format!("{b:?}")
        }
        _ => format!("{a:?}") == format!("{b:?}"),
    }
}

/// Runs a read from a byte slice, which never waits.
fn now<T>(f: impl Future<Output = T>) -> T {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a read from a byte slice waited"),
    }
}

proptest! {
    // The failing input is printed; no regression file in the tree.
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips_through_a_frame(msgs in vec(message(), 1..6)) {
        let mut stream = preamble().to_vec();
        for m in &msgs {
            let frame = encode(m).unwrap();
            let len = u32::from_le_bytes(frame[..4].try_into().unwrap());
            prop_assert_eq!(len as usize, frame.len() - 4);
            prop_assert!(len <= MAX_FRAME);
            let alone = decode(&frame[4..]).unwrap();
            prop_assert!(same(&alone, m), "{:?} decoded as {:?}", m, alone);
            stream.extend_from_slice(&frame);
        }
        let mut r = &stream[..];
        now(read_preamble(&mut r)).unwrap();
        let mut buf = Vec::new();
        for m in &msgs {
            let got = now(read_frame(&mut r, &mut buf)).unwrap();
            prop_assert!(same(&got, m), "{:?} read as {:?}", m, got);
        }
        prop_assert!(matches!(now(read_frame(&mut r, &mut buf)), Err(ChannelError::Closed)));
    }

    /// A stream cut inside a frame is `Truncated`, never a message.
    #[test]
    fn a_cut_frame_is_truncated(m in message(), cut in any::<prop::sample::Index>()) {
        let frame = encode(&m).unwrap();
        let cut = 1 + cut.index(frame.len() - 1);
        let mut r = &frame[..cut];
        let mut buf = Vec::new();
        prop_assert!(matches!(now(read_frame(&mut r, &mut buf)), Err(ChannelError::Truncated(_))));
    }

    /// Random bytes as a payload, as a stream, and after a valid preamble:
    /// errors or messages, never a panic (the fuzzing entry point checks
    /// that whatever decodes re-encodes the same).
    #[test]
    fn random_bytes_never_panic(raw in bytes(2048)) {
        let _ = decode(&raw);
        crate::wire::fuzz_wire(&raw);
        let mut stream = preamble().to_vec();
        stream.extend_from_slice(&raw);
        crate::wire::fuzz_wire(&stream);
        let mut framed = (raw.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&raw);
        let mut r = &framed[..];
        let mut buf = Vec::new();
        let _ = now(read_frame(&mut r, &mut buf));
    }

    /// A frame longer than the limit is refused from its length alone.
    #[test]
    fn an_oversize_length_is_refused(len in MAX_FRAME + 1..=u32::MAX) {
        let bytes = len.to_le_bytes();
        let mut r = &bytes[..];
        let mut buf = Vec::new();
        prop_assert!(
            matches!(now(read_frame(&mut r, &mut buf)), Err(ChannelError::FrameTooLarge { len: l }) if l == len),
            "an oversize length was not refused"
        );
    }
}
