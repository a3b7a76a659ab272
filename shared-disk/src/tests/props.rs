//! Property tests of every encoder and decoder: the messages and their
//! framing, the preamble and the arbitration record's file; random bytes
//! give errors, never panics.

use super::*;
use crate::owner::{self, OwnerRecord};
use proptest::collection::vec;
use proptest::prelude::*;
use std::io::Cursor;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Op::Read { offset, len }),
        (any::<u64>(), bytes(2048), any::<u64>()).prop_map(|(offset, data, generation)| Op::Write {
            offset,
            data,
            generation
        }),
        any::<u64>().prop_map(|generation| Op::Flush { generation }),
        (any::<u64>(), any::<String>())
            .prop_map(|(expected_generation, owner)| Op::TestAndSet { expected_generation, owner }),
        Just(Op::Owner),
        Just(Op::Info),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        bytes(2048).prop_map(Reply::Data),
        Just(Reply::Done),
        any::<u64>().prop_map(|generation| Reply::Won { generation }),
        (any::<u64>(), any::<String>()).prop_map(|(generation, owner)| Reply::Lost { generation, owner }),
        (any::<u64>(), any::<String>()).prop_map(|(generation, owner)| Reply::Owner { generation, owner }),
        (any::<u64>(), any::<bool>()).prop_map(|(size, arbiter_only)| Reply::Info { size, arbiter_only }),
    ]
}

fn disk_error() -> impl Strategy<Value = DiskError> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(offset, len, size)| DiskError::OutOfRange {
            offset,
            len,
            size
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(yours, current)| DiskError::Fenced { yours, current }),
        (any::<u64>(), any::<u64>()).prop_map(|(len, max)| DiskError::TooLarge { len, max }),
        any::<String>().prop_map(DiskError::Invalid),
        any::<String>().prop_map(DiskError::Io),
        Just(DiskError::NoImage),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, applied)| DiskError::Stale { seq, applied }),
        any::<String>().prop_map(DiskError::Busy),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (any::<u64>(), any::<u64>(), op()).prop_map(|(session, seq, op)| Request { session, seq, op })
}

fn response() -> impl Strategy<Value = Response> {
    let result = prop_oneof![reply().prop_map(Ok), disk_error().prop_map(Err)];
    (any::<u64>(), result).prop_map(|(seq, result)| Response { seq, result })
}

/// Encodes `value` as a frame, reads the frame back and decodes it.
fn through_a_frame<T>(value: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let frame = proto::encode(value).unwrap();
    let mut cursor = Cursor::new(&frame);
    let mut buf = Vec::new();
    proto::read_frame(&mut cursor, &mut buf).unwrap();
    assert_eq!(cursor.position() as usize, frame.len(), "the frame was not read whole");
    proto::decode(&buf).unwrap()
}

fn valid_owner() -> impl Strategy<Value = String> {
    // Printable, no control characters, 1..=MAX_OWNER_LEN bytes.
    "[ -~\u{a0}-\u{2fff}]{1,64}".prop_filter("at most MAX_OWNER_LEN bytes", |s| s.len() <= MAX_OWNER_LEN)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn requests_round_trip(request in request()) {
        prop_assert_eq!(through_a_frame(&request), request);
    }

    #[test]
    fn responses_round_trip(response in response()) {
        prop_assert_eq!(through_a_frame(&response), response);
    }

    #[test]
    fn frames_in_a_stream_round_trip(requests in vec(request(), 0..8)) {
        let stream: Vec<u8> = requests.iter().flat_map(|r| proto::encode(r).unwrap()).collect();
        let mut cursor = Cursor::new(&stream);
        let mut buf = Vec::new();
        for request in &requests {
            proto::read_frame(&mut cursor, &mut buf).unwrap();
            prop_assert_eq!(&proto::decode::<Request>(&buf).unwrap(), request);
        }
        // Then the stream ends cleanly.
        prop_assert!(matches!(proto::read_frame(&mut cursor, &mut buf), Err(proto::WireError::Closed)));
    }

    #[test]
    fn random_payloads_decode_to_errors_not_panics(payload in bytes(512)) {
        let _ = proto::decode::<Request>(&payload);
        let _ = proto::decode::<Response>(&payload);
    }

    #[test]
    fn damaged_messages_decode_to_errors_not_panics(
        request in request(),
        response in response(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        for mut payload in [proto::encode(&request).unwrap()[4..].to_vec(), proto::encode(&response).unwrap()[4..].to_vec()] {
            for (at, byte) in &flips {
                let i = at.index(payload.len());
                payload[i] ^= byte;
            }
            let _ = proto::decode::<Request>(&payload);
            let _ = proto::decode::<Response>(&payload);
            let short = &payload[..cut.index(payload.len())];
            let _ = proto::decode::<Request>(short);
            let _ = proto::decode::<Response>(short);
        }
    }

    #[test]
    fn random_streams_read_to_errors_not_panics(stream in bytes(2048)) {
        let mut cursor = Cursor::new(&stream);
        let _ = proto::read_preamble(&mut cursor);
        let mut cursor = Cursor::new(&stream);
        let mut buf = Vec::new();
        // Each iteration consumes bytes or fails: this ends.
        while proto::read_frame(&mut cursor, &mut buf).is_ok() {
            let _ = proto::decode::<Request>(&buf);
            prop_assert!(buf.len() <= MAX_FRAME as usize);
        }
    }

    #[test]
    fn a_claimed_frame_length_is_not_trusted(len in any::<u32>(), body in bytes(64)) {
        let stream = [&len.to_le_bytes()[..], &body].concat();
        let mut buf = Vec::new();
        match proto::read_frame(&mut Cursor::new(&stream), &mut buf) {
            Ok(()) => prop_assert_eq!(buf.len(), len as usize),
            Err(proto::WireError::FrameTooLarge { .. }) => prop_assert!(len > MAX_FRAME),
            Err(proto::WireError::Truncated(_)) => prop_assert!(body.len() < len as usize),
            Err(e) => prop_assert!(false, "unexpected {}", e),
        }
        prop_assert!(buf.capacity() <= body.len().max(64) * 2 + 64, "allocated {} for {} bytes", buf.capacity(), body.len());
    }

    #[test]
    fn preambles_check_magic_and_version(version in any::<u32>(), magic in any::<[u8; 8]>()) {
        let mut preamble = [0u8; 12];
        preamble[..8].copy_from_slice(&magic);
        preamble[8..].copy_from_slice(&version.to_le_bytes());
        let result = proto::read_preamble(&mut Cursor::new(&preamble));
        prop_assert_eq!(result.is_ok(), &magic == MAGIC && version == PROTOCOL_VERSION);
        if &magic == MAGIC && version != PROTOCOL_VERSION {
            let found = matches!(result, Err(proto::WireError::Version { found }) if found == version);
            prop_assert!(found, "a wrong version is reported as one");
        }
    }

    #[test]
    fn owner_records_round_trip(generation in 1..u64::MAX, owner in valid_owner()) {
        let record = OwnerRecord { generation, owner };
        prop_assert_eq!(owner::parse(owner::render(&record).as_bytes()).unwrap(), record);
    }

    #[test]
    fn random_owner_records_are_errors_not_panics(file in bytes(512), text in "ftdisk-owner 1\ngeneration [0-9a-z]{0,24}\nowner .{0,40}\n?") {
        let _ = owner::parse(&file);
        if let Ok(record) = owner::parse(text.as_bytes()) {
            // What parses is a valid record (it renders and parses back).
            prop_assert_eq!(owner::parse(owner::render(&record).as_bytes()).unwrap(), record);
        }
    }
}

#[test]
fn the_empty_record_round_trips() {
    let record = OwnerRecord { generation: 0, owner: String::new() };
    assert_eq!(owner::parse(owner::render(&record).as_bytes()).unwrap(), record);
}

#[test]
fn the_largest_messages_fit_in_a_frame() {
    let write = Request {
        session: u64::MAX,
        seq: u64::MAX,
        op: Op::Write { offset: u64::MAX, data: vec![0xff; MAX_IO as usize], generation: u64::MAX },
    };
    assert_eq!(through_a_frame(&write), write);
    let data = Response { seq: u64::MAX, result: Ok(Reply::Data(vec![0xff; MAX_IO as usize])) };
    assert_eq!(through_a_frame(&data), data);
    let lost =
        Response { seq: u64::MAX, result: Ok(Reply::Lost { generation: u64::MAX, owner: "x".repeat(MAX_OWNER_LEN) }) };
    assert_eq!(through_a_frame(&lost), lost);
    // One byte of data more than a frame holds is refused when sending.
    let too_big =
        Request { session: 1, seq: 1, op: Op::Write { offset: 0, data: vec![0; MAX_FRAME as usize], generation: 0 } };
    assert!(proto::encode(&too_big).is_err());
}

/// The server, fed random bytes after a valid preamble, closes the
/// connection (or answers what happens to be a request) and keeps serving
/// others; no connection thread panics.
#[test]
fn the_server_survives_random_input() {
    let dir = TempDir::new("fuzz");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 48, ..ProptestConfig::default() });
    runner
        .run(&(bytes(256), any::<bool>()), |(garbage, frame_it)| {
            let payload = if frame_it { frame(&garbage) } else { garbage };
            let _ = hostile(server.local_addr(), &with_preamble(&payload), true);
            prop_assert_eq!(server.stats().connection_panics, 0);
            Ok(())
        })
        .unwrap();
    let mut c = client(&server);
    c.read(0, 512).unwrap();
    assert_eq!(server.stats().connection_panics, 0);
}
