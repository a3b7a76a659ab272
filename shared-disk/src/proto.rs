//! The messages of the ftdisk protocol (version [`crate::PROTOCOL_VERSION`])
//! and their framing: what goes over the socket, and nothing about when.
//! The crate doc has the protocol as a whole; [`crate::session`] what the
//! session and sequence number of a [`Request`] mean. Decoding never trusts
//! a length from the peer: a frame is at most [`crate::MAX_FRAME`] bytes,
//! read as it arrives, and bincode is limited to the same.

use crate::{MAGIC, MAX_FRAME, PROTOCOL_VERSION};
use bincode::Options;
use serde::{Deserialize, Serialize};
use std::io::{self, Read};

/// One request from a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The client's session: a random number the client chose when it was
    /// created, the same on every connection it makes.
    pub session: u64,
    /// The request's sequence number in its session: larger than that of
    /// every earlier request of the session; a retry repeats it. Echoed in
    /// the response.
    pub seq: u64,
    /// What to do.
    pub op: Op,
}

/// What a client asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Read `len` bytes (at most [`crate::MAX_IO`]) at `offset`.
    Read { offset: u64, len: u32 },
    /// Write `data` (at most [`crate::MAX_IO`] bytes) at `offset`, if
    /// `generation` is the owner generation.
    Write {
        offset: u64,
        #[serde(with = "bytes")]
        data: Vec<u8>,
        generation: u64,
    },
    /// Make every write acknowledged so far durable (fdatasync), if
    /// `generation` is the owner generation.
    Flush { generation: u64 },
    /// Atomically: if the owner generation is `expected_generation`, bump it
    /// and record `owner` as the owner.
    TestAndSet { expected_generation: u64, owner: String },
    /// The arbitration record.
    Owner,
    /// What the server serves: the disk's size, or that it is arbiter-only.
    Info,
}

impl Op {
    /// The operation's name, for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Read { .. } => "Read",
            Op::Write { .. } => "Write",
            Op::Flush { .. } => "Flush",
            Op::TestAndSet { .. } => "TestAndSet",
            Op::Owner => "Owner",
            Op::Info => "Info",
        }
    }

    /// True for what only an authorized client may do: touch the disk's
    /// data or claim the record. Asking what is served and who owns it is
    /// open to every certificate from the CA.
    pub fn needs_authorization(&self) -> bool {
        !matches!(self, Op::Owner | Op::Info)
    }
}

/// The server's answer to one [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The request's sequence number.
    pub seq: u64,
    /// What came of it.
    pub result: Result<Reply, DiskError>,
}

/// A successful outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The bytes a `Read` asked for.
    Data(#[serde(with = "bytes")] Vec<u8>),
    /// A `Write` or `Flush` is done.
    Done,
    /// The test-and-set succeeded: the caller owns the disk at `generation`.
    Won { generation: u64 },
    /// The test-and-set failed: the record did not hold the expected
    /// generation. This is what it holds.
    Lost { generation: u64, owner: String },
    /// The arbitration record: `owner` is empty while `generation` is 0.
    Owner { generation: u64, owner: String },
    /// What the server serves. A disk server: `size` is the disk's size in
    /// bytes, a positive multiple of [`crate::SECTOR_SIZE`], and
    /// `arbiter_only` is false. An arbiter-only server (no image, only the
    /// arbitration record): `size` is 0 and `arbiter_only` true.
    Info { size: u64, arbiter_only: bool },
}

impl Reply {
    /// The reply's name, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Data(_) => "Data",
            Reply::Done => "Done",
            Reply::Won { .. } => "Won",
            Reply::Lost { .. } => "Lost",
            Reply::Owner { .. } => "Owner",
            Reply::Info { .. } => "Info",
        }
    }
}

/// Why the server refused or failed a request. Nothing was written, except
/// perhaps part of a write that failed with `Io`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DiskError {
    /// The transfer does not fit in the disk.
    #[error("{len} bytes at offset {offset} are outside the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The request's generation is not the owner generation: someone else
    /// went live since (or the caller never won).
    #[error("fenced: the request carries generation {yours} but the disk belongs to generation {current}")]
    Fenced { yours: u64, current: u64 },
    /// The transfer exceeds [`crate::MAX_IO`].
    #[error("a {len}-byte transfer exceeds the per-request limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    /// The request makes no sense (e.g. an empty owner name).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The server's own file I/O failed.
    #[error("the disk server's I/O failed: {0}")]
    Io(String),
    /// A read, write or flush sent to an arbiter-only server, which serves
    /// no disk image.
    #[error("this ftdisk server is arbiter-only: it has no disk image to read, write or flush")]
    NoImage,
    /// The request is older than one its session already had executed, and
    /// its answer is no longer remembered: it was not executed (an old
    /// request never executes after a newer one of its session).
    #[error("request {seq} of this session was not executed: the session has moved on to request {applied}")]
    Stale { seq: u64, applied: u64 },
    /// The server cannot take the request now (e.g. it tracks too many
    /// sessions); trying again later may work. Nothing was executed.
    #[error("the disk server is busy: {0}")]
    Busy(String),
    /// The client's TLS certificate (subject common name `name`) is not on
    /// the server's allow list: it may not read, write, flush or
    /// test-and-set. Nothing was executed.
    #[error("the disk server refuses the certificate {name:?}: it is not on its allow list (ftdisk --tls-allow)")]
    Forbidden { name: String },
}

/// Encodes `Vec<u8>` as bincode bytes: the same bytes on the wire as serde's
/// default sequence of `u8`, but copied in one go instead of byte by byte,
/// which matters for 4 MiB transfers.
mod bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Not trusting the size hint: it comes from the peer.
            let mut out = Vec::new();
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

/// Why a connection could not go on: the peer broke the protocol or the
/// socket failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the peer is not speaking the ftdisk protocol (bad magic)")]
    BadMagic,
    #[error("the peer speaks ftdisk protocol version {found}; this one speaks version {PROTOCOL_VERSION}")]
    Version { found: u32 },
    #[error("the peer sent a frame of {len} bytes (the limit is {MAX_FRAME})")]
    FrameTooLarge { len: u32 },
    #[error("the peer sent a message that does not decode: {0}")]
    Decode(String),
    /// Only when sending: the message does not fit in a frame.
    #[error("cannot encode a message: {0}")]
    Encode(String),
    #[error("the peer closed the connection")]
    Closed,
    /// The connection ended inside something.
    #[error("the peer closed the connection in the middle of {0}")]
    Truncated(&'static str),
}

impl WireError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        WireError::Io { what: what.into(), source }
    }

    /// True for a socket that failed or closed, as opposed to a peer that
    /// spoke something else than the ftdisk protocol.
    pub(crate) fn is_connection_failure(&self) -> bool {
        matches!(self, WireError::Io { .. } | WireError::Closed | WireError::Truncated(_))
    }

    /// True if the socket's read or write timeout expired.
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, WireError::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// The bincode options of every frame, limited so a hostile payload cannot
/// make bincode allocate without bound.
fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_varint_encoding().with_limit(u64::from(MAX_FRAME))
}

/// The bytes each side sends first.
pub(crate) fn preamble() -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(MAGIC);
    out[8..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out
}

/// Reads the peer's magic and protocol version and checks them.
pub(crate) fn read_preamble<R: Read>(r: &mut R) -> Result<(), WireError> {
    let mut buf = [0u8; 12];
    read_full(r, &mut buf, "the protocol preamble")?;
    if &buf[..8] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let found = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if found != PROTOCOL_VERSION {
        return Err(WireError::Version { found });
    }
    Ok(())
}

/// Encodes `value` as a whole frame (length prefix included), so that it
/// goes out in one write.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let mut frame = vec![0u8; 4];
    codec().serialize_into(&mut frame, value).map_err(|e| WireError::Encode(one_line(&e)))?;
    let len = u32::try_from(frame.len() - 4).unwrap_or(u32::MAX);
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLarge { len });
    }
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Decodes one frame's payload.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    codec().deserialize(payload).map_err(|e| {
        WireError::Decode(match *e {
            // Reading past the payload; bincode's own message can be empty.
            bincode::ErrorKind::Io(ref io) => format!("the message ends early ({})", io.kind()),
            _ => one_line(&e),
        })
    })
}

/// Some bincode errors span lines; a peer's garbage gets one log line.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads one frame's payload into `buf` (reused between calls). A connection
/// closed before the first byte is `Closed`, inside the frame `Truncated`.
pub(crate) fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), WireError> {
    let mut len = [0u8; 4];
    read_full(r, &mut len, "a frame")?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLarge { len });
    }
    buf.clear();
    // Through `take` the buffer grows as bytes actually arrive, instead of
    // trusting the peer's length for one big allocation up front.
    (&mut *r).take(u64::from(len)).read_to_end(buf).map_err(|source| WireError::io("reading a frame", source))?;
    if buf.len() < len as usize {
        return Err(WireError::Truncated("a frame"));
    }
    Ok(())
}

/// Fills `buf` from `r`.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), WireError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Truncated(what)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(WireError::io(format!("reading {what}"), source)),
        }
    }
    Ok(())
}

/// Fuzzing entry point (`fuzz/fuzz_targets/ftdisk_requests.rs`), not an
/// API: the whole of `bytes` decoded as one frame's payload, as a
/// [`Request`] (what the server decodes) and as a [`Response`] (what the
/// client decodes); then `bytes` read as a server reads a connection
/// (preamble, then request frames until it ends or fails). Every message
/// that decodes must encode to a frame that reads back equal. Returns the
/// number of requests read from the stream.
#[doc(hidden)]
pub fn fuzz_wire(bytes: &[u8]) -> usize {
    fn check<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
        let Ok(frame) = encode(value) else { return };
        let mut cursor = io::Cursor::new(&frame[..]);
        let mut buf = Vec::new();
        read_frame(&mut cursor, &mut buf).expect("a frame we encoded reads");
        let again: T = decode(&buf).unwrap_or_else(|e| panic!("{value:?} re-encoded does not decode: {e}"));
        assert_eq!(&again, value);
    }
    if let Ok(request) = decode::<Request>(bytes) {
        check(&request);
    }
    if let Ok(response) = decode::<Response>(bytes) {
        check(&response);
    }
    let mut stream = bytes;
    if read_preamble(&mut stream).is_err() {
        stream = bytes;
    }
    let mut buf = Vec::new();
    let mut n = 0;
    while read_frame(&mut stream, &mut buf).is_ok() {
        let Ok(request) = decode::<Request>(&buf) else { break };
        check(&request);
        n += 1;
    }
    n
}
