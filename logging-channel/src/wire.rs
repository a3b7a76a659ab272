//! Framing and messages: what goes over the socket, and nothing about when.

use crate::{ChannelCounters, ChannelError, LogStart, MAGIC, MAX_FRAME, PROTOCOL_VERSION};
use bincode::Options;
use replay::{Header, Record};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The same options style as the log file format (replay/src/format.rs),
/// limited so a hostile payload cannot make bincode allocate without bound.
fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_varint_encoding().with_limit(u64::from(MAX_FRAME))
}

/// One frame's payload. `records` and `data` borrow so the primary can
/// encode from its outgoing queues without moving or cloning them; decoding
/// always yields owned data.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Message<'a> {
    /// Primary → backup, first frame: what the log is recorded from, and
    /// whether a state transfer precedes the records.
    Hello { header: Header, start: LogStart },
    /// Backup → primary: the header matches, streaming may start.
    Welcome,
    /// Backup → primary: the header does not match; the connection ends.
    Reject { reason: String },
    /// Primary → backup: the records after the previous batch's; every
    /// record at a position <= `watermark` is in this batch or an earlier
    /// one; outputs at positions <= `released` have left the primary, and
    /// its disk ops numbered up to `disk_applied` are on its storage.
    Batch { seq: u64, watermark: u64, released: u64, disk_applied: u64, records: Cow<'a, [Record]> },
    /// Backup → primary: batches up to `seq` (whose watermark is
    /// `watermark`) have been received.
    Ack { seq: u64, watermark: u64 },
    /// Either way: nothing else to say, but still alive.
    Heartbeat,
    /// Primary → backup: the guest ended and everything was acknowledged.
    Done,
    /// Primary → backup: the state stream's bytes from `offset` on.
    State { offset: u64, data: Bytes<'a> },
    /// Primary → backup: the state stream is complete (`len` bytes); it is
    /// the VM's at exit `exit`, and the records that follow are after it.
    StateEnd { exit: u64, len: u64 },
    /// Backup → primary: the VMM has consumed `consumed` state bytes in all.
    StateAck { consumed: u64 },
    /// Backup → primary: the backup's replay diverged at exit `exit`; it
    /// needs the VM's whole state again, and acknowledges no batch until
    /// that state has ended (repair).
    Resync { exit: u64 },
    /// Primary → backup, after a Resync: a new state stream follows (State
    /// from offset 0, then StateEnd) that replaces the backup's state; the
    /// batches between the Resync and it are obsolete.
    StateRestart,
}

/// A byte string that bincode encodes as its length and the bytes
/// themselves, in one copy each way (a plain `[u8]` goes element by element
/// through serde). The layout is the same as a `Vec<u8>`'s.
pub(crate) struct Bytes<'a>(pub(crate) Cow<'a, [u8]>);

impl std::fmt::Debug for Bytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes<'_> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        deserializer.deserialize_byte_buf(Visitor).map(|v| Bytes(Cow::Owned(v)))
    }
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
            Message::State { .. } => "State",
            Message::StateEnd { .. } => "StateEnd",
            Message::StateAck { .. } => "StateAck",
            Message::Resync { .. } => "Resync",
            Message::StateRestart => "StateRestart",
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

/// A reader that fails once the peer has sent nothing for `limit` while we
/// wanted to read: the heartbeat timeout. It counts bytes, not frames, so a
/// large frame arriving slowly over a slow link is traffic too.
pub(crate) struct Watched<'a, R> {
    inner: R,
    busy_poll: Option<BusyPoll<'a>>,
    limit: Duration,
    /// "the backup" or "the primary", for the error message.
    peer: &'static str,
    last_traffic: Instant,
    /// Fires at or before `last_traffic + limit`; pushed back lazily.
    alarm: Pin<Box<Sleep>>,
    /// Where silences are counted in heartbeat intervals, and the interval.
    missed: Option<(Arc<ChannelCounters>, Duration)>,
}

impl<'a, R> Watched<'a, R> {
    pub(crate) fn new(inner: R, limit: Duration, peer: &'static str) -> Self {
        let now = Instant::now();
        Watched {
            inner,
            busy_poll: None,
            limit,
            peer,
            last_traffic: now,
            alarm: Box::pin(tokio::time::sleep_until(now + limit)),
            missed: None,
        }
    }

    /// Counts the peer's silences, in heartbeat intervals, into `counters`.
    pub(crate) fn counting_missed(mut self, counters: Arc<ChannelCounters>, interval: Duration) -> Self {
        self.missed = Some((counters, interval.max(Duration::from_millis(1))));
        self
    }

    /// A silence of `gap` ended (or ended the link): the intervals in it
    /// beyond the one a heartbeat may take.
    fn count_silence(&self, gap: Duration) {
        if let Some((counters, interval)) = &self.missed {
            let intervals = (gap.as_nanos() / interval.as_nanos()) as u64;
            ChannelCounters::add(&counters.heartbeats_missed, intervals.saturating_sub(1));
        }
    }

    /// Busy-polls as `busy` says before each sleep (none if its budget is 0).
    pub(crate) fn busy_polling(mut self, busy: BusyPoll<'a>) -> Self {
        self.busy_poll = Some(busy).filter(|b| !b.budget.is_zero());
        self
    }

    /// Restarts the silence clock: for a reader that chose not to read for a
    /// while (the peer's silence then was our doing).
    pub(crate) fn touch(&mut self) {
        self.last_traffic = Instant::now();
    }
}

/// Watching a socket for a while before sleeping on it: when the frame is
/// expected soon, the spin costs less than the sleep and the wake-up.
pub(crate) struct BusyPoll<'a> {
    /// The socket under the reader (beneath any TLS layer).
    pub fd: std::os::fd::RawFd,
    /// How long to watch at most, each time the reader would sleep.
    pub budget: Duration,
    /// Whether watching is worth it now (a frame is due, and the thread has
    /// nothing else to do); looked at again while spinning.
    pub worth_it: Box<dyn Fn() -> bool + 'a>,
}

impl BusyPoll<'_> {
    /// Spins until the socket is readable (true), or the budget is spent or
    /// spinning stops being worth it (false).
    fn wait_readable(&self) -> bool {
        let until = std::time::Instant::now() + self.budget;
        while (self.worth_it)() && std::time::Instant::now() < until {
            let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: poll(2) on one valid pollfd, with a zero timeout.
            if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }
}

/// The error a [`Watched`] reader fails with; `read_full` and `read_frame`
/// turn it into [`ChannelError::Timeout`].
#[derive(Debug)]
struct Silence(String);

impl std::fmt::Display for Silence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Silence {}

impl<R: AsyncRead + Unpin> AsyncRead for Watched<'_, R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let now = Instant::now();
                    this.count_silence(now - this.last_traffic);
                    this.last_traffic = now;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Readable now: the runtime's next look at its epoll finds the
            // event at once and polls us again, without sleeping.
            Poll::Pending if this.busy_poll.as_ref().is_some_and(BusyPoll::wait_readable) => Poll::Pending,
            Poll::Pending => loop {
                // Nothing to read: is the silence too long already?
                if this.alarm.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = this.last_traffic + this.limit;
                if Instant::now() >= due {
                    this.count_silence(this.limit);
                    let why = format!("no traffic from {} for {:?} (heartbeat timeout)", this.peer, this.limit);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, Silence(why))));
                }
                // Traffic came since the alarm was set: set it again, and
                // poll it so that it wakes us.
                this.alarm.as_mut().reset(due);
            },
        }
    }
}

/// A read error; a [`Watched`] reader's silence is a timeout.
fn read_error(what: String, e: io::Error) -> ChannelError {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Silence>()) {
        Some(Silence(why)) => ChannelError::Timeout(why.clone()),
        None => ChannelError::io(what, e),
    }
}

/// Fills `buf` from `r`; tells a connection closed before the first byte
/// (`Closed`) from one closed inside `what` (`Truncated`).
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), ChannelError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await.map_err(|e| read_error(format!("reading {what}"), e))?;
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
    (&mut *r).take(u64::from(len)).read_to_end(buf).await.map_err(|e| read_error("reading a frame".into(), e))?;
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

/// Fuzzing entry point (`fuzz/fuzz_targets/channel_frames.rs`), not an API:
/// the whole of `bytes` decoded as one frame's payload, then `bytes` read as
/// a connection's stream (preamble, then frames until it ends or fails), as
/// a backup or primary reads it. Every message that decodes must encode
/// again, and what that encodes to must decode and encode to the same bytes.
/// Returns the number of messages read from the stream.
#[doc(hidden)]
pub fn fuzz_wire(bytes: &[u8]) -> usize {
    fn check(msg: &Message<'_>) {
        let Ok(frame) = encode(msg) else { return };
        let again = decode(&frame[4..]).unwrap_or_else(|e| panic!("a re-encoded {} does not decode: {e}", msg.kind()));
        assert_eq!(encode(&again).ok().as_deref(), Some(&frame[..]), "a {} does not re-encode the same", msg.kind());
    }
    if let Ok(msg) = decode(bytes) {
        check(&msg);
    }
    // Reading from a byte slice never waits: each future completes at its
    // first poll.
    fn now<T>(f: impl Future<Output = T>) -> T {
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => unreachable!("a read from a byte slice waited"),
        }
    }
    let mut stream = bytes;
    if now(read_preamble(&mut stream)).is_err() {
        stream = bytes;
    }
    let mut buf = Vec::new();
    let mut n = 0;
    while let Ok(msg) = now(read_frame(&mut stream, &mut buf)) {
        check(&msg);
        n += 1;
    }
    n
}
