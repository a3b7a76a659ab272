//! Framing and messages: what goes over the socket, and nothing about when.

use crate::{ChannelError, MAGIC, MAX_FRAME, PROTOCOL_VERSION};
use bincode::Options;
use replay::{Header, Record};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The same options style as the log file format (replay/src/format.rs),
/// limited so a hostile payload cannot make bincode allocate without bound.
fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_varint_encoding().with_limit(u64::from(MAX_FRAME))
}

/// One frame's payload. `records` is a `Cow` so the primary can encode a
/// slice of its outgoing queue without moving or cloning it; decoding always
/// yields an owned vector.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Message<'a> {
    /// Primary → backup, first frame: what the log is recorded from.
    Hello { header: Header },
    /// Backup → primary: the header matches, streaming may start.
    Welcome,
    /// Backup → primary: the header does not match; the connection ends.
    Reject { reason: String },
    /// Primary → backup: the records after the previous batch's; every
    /// record at a position <= `watermark` is in this batch or an earlier
    /// one; outputs at positions <= `released` have left the primary.
    Batch { seq: u64, watermark: u64, released: u64, records: Cow<'a, [Record]> },
    /// Backup → primary: batches up to `seq` (whose watermark is
    /// `watermark`) have been received.
    Ack { seq: u64, watermark: u64 },
    /// Either way: nothing else to say, but still alive.
    Heartbeat,
    /// Primary → backup: the guest ended and everything was acknowledged.
    Done,
}

impl Message<'_> {
    /// The message's name, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome => "Welcome",
            Message::Reject { .. } => "Reject",
            Message::Batch { .. } => "Batch",
            Message::Ack { .. } => "Ack",
            Message::Heartbeat => "Heartbeat",
            Message::Done => "Done",
        }
    }
}

/// The bytes each side sends first.
pub(crate) fn preamble() -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(MAGIC);
    out[8..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out
}

/// Encodes `msg` as a whole frame (length prefix included), so that it goes
/// out in a single write: with TCP_NODELAY two writes would be two segments.
pub(crate) fn encode(msg: &Message<'_>) -> Result<Vec<u8>, ChannelError> {
    let mut frame = vec![0u8; 4];
    codec()
        .serialize_into(&mut frame, msg)
        .map_err(|e| ChannelError::Protocol(format!("cannot encode a {} message: {e}", msg.kind())))?;
    let len = u32::try_from(frame.len() - 4)
        .ok()
        .filter(|len| *len <= MAX_FRAME)
        .ok_or_else(|| ChannelError::Protocol(format!("a {} message is too large to send", msg.kind())))?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Fills `buf` from `r`; tells a connection closed before the first byte
/// (`Closed`) from one closed inside `what` (`Truncated`).
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), ChannelError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await.map_err(|e| ChannelError::io(format!("reading {what}"), e))?;
        if n == 0 {
            return Err(if filled == 0 { ChannelError::Closed } else { ChannelError::Truncated(what) });
        }
        filled += n;
    }
    Ok(())
}

/// Reads the peer's magic and protocol version and checks them.
pub(crate) async fn read_preamble<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), ChannelError> {
    let mut buf = [0u8; 12];
    read_full(r, &mut buf, "the protocol preamble").await?;
    if &buf[..8] != MAGIC {
        return Err(ChannelError::BadMagic);
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&buf[8..]);
    let found = u32::from_le_bytes(version);
    if found != PROTOCOL_VERSION {
        return Err(ChannelError::Version { found });
    }
    Ok(())
}

/// Reads one frame into `buf` (reused between calls) and decodes it.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Message<'static>, ChannelError> {
    let mut len = [0u8; 4];
    read_full(r, &mut len, "a frame").await?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(ChannelError::FrameTooLarge { len });
    }
    buf.clear();
    // Through `take` the buffer grows as bytes actually arrive, instead of
    // trusting the peer's length for one big allocation up front.
    (&mut *r).take(u64::from(len)).read_to_end(buf).await.map_err(|e| ChannelError::io("reading a frame", e))?;
    if buf.len() < len as usize {
        return Err(ChannelError::Truncated("a frame"));
    }
    decode(buf)
}

/// Decodes one frame's payload.
pub(crate) fn decode(payload: &[u8]) -> Result<Message<'static>, ChannelError> {
    // Some bincode errors span lines; a peer's garbage gets one log line.
    codec()
        .deserialize(payload)
        .map_err(|e| ChannelError::Decode(e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")))
}

/// Encodes and sends one message.
pub(crate) async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message<'_>,
    what: &'static str,
) -> Result<(), ChannelError> {
    let frame = encode(msg)?;
    w.write_all(&frame).await.map_err(|e| ChannelError::io(what, e))
}
