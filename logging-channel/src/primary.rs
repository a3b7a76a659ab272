//! The primary's end: accepting a backup, streaming records to it, tracking
//! its acknowledgements.

use crate::wire::{self, Message};
use crate::{lock, new_runtime, ChannelConfig, ChannelError};
use replay::{Header, Record, RecordSink};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Most records in one batch: keeps a frame far below [`crate::MAX_FRAME`]
/// for ordinary records and bounds how long one write holds up acks of the
/// rest.
const MAX_BATCH_RECORDS: usize = 16 * 1024;

/// Where the primary waits for its backup.
pub struct PrimaryListener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl PrimaryListener {
    /// Binds the listening socket (`"127.0.0.1:0"` picks a free port).
    pub fn bind(addr: &str) -> Result<Self, ChannelError> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| ChannelError::io(format!("binding the logging channel to {addr}"), e))?;
        // tokio takes the socket over in `accept`, and requires it non-blocking.
        listener.set_nonblocking(true).map_err(|e| ChannelError::io("configuring the listening socket", e))?;
        let addr = listener.local_addr().map_err(|e| ChannelError::io("reading the listening address", e))?;
        Ok(PrimaryListener { listener, addr })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until a backup has connected and completed the handshake.
    /// Peers that fail the handshake (garbage, wrong version, rejection,
    /// silence) are reported with `tracing::warn` and the wait goes on.
    /// Handshakes run concurrently, so a silent peer does not hold up a good
    /// backup that connects after it. Must not be called from within an
    /// async runtime (it runs its own).
    pub fn accept(&self, header: &Header, config: &ChannelConfig) -> Result<PrimaryLink, ChannelError> {
        let runtime = new_runtime()?;
        let listener =
            self.listener.try_clone().map_err(|e| ChannelError::io("duplicating the listening socket", e))?;
        let (stream, peer) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| ChannelError::io("registering the listening socket", e))?;
            accept_loop(&listener, header, config).await
        })?;
        info!(%peer, "backup connected");
        PrimaryLink::start(runtime, stream, peer, config.clone())
    }
}

async fn accept_loop(
    listener: &tokio::net::TcpListener,
    header: &Header,
    config: &ChannelConfig,
) -> Result<(TcpStream, SocketAddr), ChannelError> {
    let header = Arc::new(header.clone());
    let limit = config.handshake_timeout();
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let header = header.clone();
                    handshakes.spawn(async move {
                        let outcome = match tokio::time::timeout(limit, handshake(stream, &header)).await {
                            Ok(outcome) => outcome,
                            Err(_) => Err(ChannelError::Timeout(format!("no handshake within {limit:?}"))),
                        };
                        (peer, outcome)
                    });
                }
                Err(e) if transient_accept_error(&e) => {
                    warn!("accepting a backup connection: {e}");
                    // Out of descriptors and the like: give it a moment
                    // rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(ChannelError::io("accepting a backup connection", e)),
            },
            Some(joined) = handshakes.join_next(), if !handshakes.is_empty() => match joined {
                Ok((peer, Ok(stream))) => return Ok((stream, peer)),
                Ok((peer, Err(e))) => warn!(%peer, "a backup connection failed the handshake, still waiting: {e}"),
                Err(e) => warn!("a backup handshake task failed: {e}"),
            },
        }
    }
}

fn transient_accept_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
        || matches!(e.raw_os_error(), Some(23 /* ENFILE */ | 24 /* EMFILE */ | 12 /* ENOMEM */ | 105 /* ENOBUFS */))
}

/// The primary's half of the handshake: preamble and Hello out, the
/// backup's preamble and verdict in.
async fn handshake(mut stream: TcpStream, header: &Header) -> Result<TcpStream, ChannelError> {
    stream.set_nodelay(true).map_err(|e| ChannelError::io("setting TCP_NODELAY", e))?;
    let mut hello = wire::preamble().to_vec();
    hello.extend(wire::encode(&Message::Hello { header: header.clone() })?);
    stream.write_all(&hello).await.map_err(|e| ChannelError::io("sending the handshake", e))?;
    wire::read_preamble(&mut stream).await?;
    // No BufReader: it could swallow the backup's first heartbeat, which
    // the streaming phase's reader must see.
    match wire::read_frame(&mut stream, &mut Vec::new()).await? {
        Message::Welcome => Ok(stream),
        Message::Reject { reason } => Err(ChannelError::Refused(reason)),
        other => Err(ChannelError::Protocol(format!("expected Welcome or Reject, got {}", other.kind()))),
    }
}

/// What the vCPU thread, the network thread and waiters share.
struct Shared {
    state: Mutex<State>,
    /// Signalled when `acked`, `records_acked` or `lost` change (throttle, finish).
    changed: Condvar,
    /// Wakes the writer: records, watermark, released or closing changed.
    wake: Notify,
    /// Ends the network thread without a goodbye (the link was dropped).
    stop: Notify,
    /// Mirrors `state.lost.is_some()` so `append` stays lock-free.
    lost: AtomicBool,
    config: ChannelConfig,
    peer: SocketAddr,
}

type AckCallback = Arc<dyn Fn(u64) + Send + Sync>;

struct State {
    /// Records handed over by the vCPU thread, not yet taken by the writer.
    pending: Vec<Record>,
    /// Records handed over so far, in total.
    queued: u64,
    watermark: u64,
    released: u64,
    /// Highest watermark the backup acknowledged.
    acked: u64,
    /// Records the backup acknowledged, in total.
    records_acked: u64,
    lost: Option<String>,
    /// `finish` wants a Done sent once everything is out.
    closing: bool,
    on_ack: Option<AckCallback>,
}

/// The primary's link to its backup. Used from the primary's vCPU thread;
/// a background thread does the socket I/O, heartbeats and ack handling.
///
/// Call [`RecordSink::passed`] before [`PrimaryLink::throttle`]: records
/// still buffered here are not on their way, so no ack can cover them.
pub struct PrimaryLink {
    shared: Arc<Shared>,
    /// Records appended since the last flush/passed: a plain vector, as
    /// `append` runs at every guest exit.
    buffer: Vec<Record>,
    /// Highest watermark handed to the network thread.
    handed_watermark: u64,
    /// Records or a watermark were thrown away because the backup was
    /// lost: `finish` cannot report everything acknowledged.
    discarded: bool,
    thread: Option<JoinHandle<()>>,
}

impl PrimaryLink {
    fn start(
        runtime: Runtime,
        stream: TcpStream,
        peer: SocketAddr,
        config: ChannelConfig,
    ) -> Result<PrimaryLink, ChannelError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::new(),
                queued: 0,
                watermark: 0,
                released: 0,
                acked: 0,
                records_acked: 0,
                lost: None,
                closing: false,
                on_ack: None,
            }),
            changed: Condvar::new(),
            wake: Notify::new(),
            stop: Notify::new(),
            lost: AtomicBool::new(false),
            config,
            peer,
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ftvmm-lc-primary".into())
            .spawn(move || runtime.block_on(run(stream, for_thread)))
            .map_err(|e| ChannelError::io("starting the network thread", e))?;
        Ok(PrimaryLink { shared, buffer: Vec::new(), handed_watermark: 0, discarded: false, thread: Some(thread) })
    }

    /// Outputs at positions <= `exit` have been released to the outside
    /// world. Sent on the next Batch (a Batch without records if nothing
    /// else is going out), so the backup knows what a new primary must
    /// emit again.
    pub fn released(&self, exit: u64) {
        {
            let mut st = lock(&self.shared.state);
            if st.lost.is_some() || exit <= st.released {
                return;
            }
            st.released = exit;
        }
        self.shared.wake.notify_one();
    }

    /// Highest watermark the backup has acknowledged; `u64::MAX` once the
    /// backup is lost (nothing is held back for a backup that is gone).
    pub fn acked(&self) -> u64 {
        let st = lock(&self.shared.state);
        if st.lost.is_some() {
            u64::MAX
        } else {
            st.acked
        }
    }

    /// Registers the callback the network thread calls with the new acked
    /// watermark after each Ack, and once with `u64::MAX` when the backup is
    /// lost. If the link is already lost, calls `f(u64::MAX)` at once. The
    /// callback runs on the network thread: it must be quick and must not
    /// drop the link.
    pub fn on_ack(&self, f: Box<dyn Fn(u64) + Send + Sync>) {
        let f: AckCallback = Arc::from(f);
        let lost = {
            let mut st = lock(&self.shared.state);
            st.on_ack = Some(f.clone());
            st.lost.is_some()
        };
        // Outside the lock: the callback may well call acked().
        if lost {
            f(u64::MAX);
        }
    }

    /// Blocks while `exit` is more than `max_lag_exits` ahead of the
    /// acknowledged watermark; returns at once when the backup is lost.
    pub fn throttle(&self, exit: u64) {
        let max_lag = self.shared.config.max_lag_exits;
        let mut st = lock(&self.shared.state);
        while st.lost.is_none() && exit.saturating_sub(st.acked) > max_lag {
            st = self.shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Why the backup was lost (heartbeat timeout, connection closed,
    /// protocol error), or `None` while it is connected.
    pub fn backup_lost(&self) -> Option<String> {
        lock(&self.shared.state).lost.clone()
    }

    /// The guest has ended: sends what is buffered (the caller has appended
    /// the End record and called `passed`), then waits until the backup
    /// acknowledged everything or `timeout` passes or the backup is lost;
    /// then closes. Returns whether everything was acknowledged.
    pub fn finish(mut self, timeout: Duration) -> bool {
        self.hand_over(None);
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        let (records, watermark) = (st.queued, st.watermark);
        // Records thrown away after a loss were never acknowledged.
        let mut all_acked = !self.discarded;
        while all_acked {
            // Checked before `lost`: a backup that acked everything and then
            // went away still got everything.
            if st.records_acked >= records && st.acked >= watermark {
                break;
            }
            let now = Instant::now();
            if st.lost.is_some() || now >= deadline {
                all_acked = false;
                break;
            }
            st = match self.shared.changed.wait_timeout(st, deadline - now) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        if all_acked {
            // Say goodbye so the backup tells a finished primary from a dead one.
            st.closing = true;
            drop(st);
            self.shared.wake.notify_one();
        } else {
            drop(st);
            self.shared.stop.notify_one();
        }
        self.join();
        all_acked
    }

    /// Moves the local buffer (and the watermark, if any) to the network
    /// thread. Only a short lock: never waits for the network.
    fn hand_over(&mut self, watermark: Option<u64>) {
        if self.shared.lost.load(Ordering::Relaxed) {
            self.discard(watermark);
            return;
        }
        if self.buffer.is_empty() && watermark.is_none() {
            return;
        }
        {
            let mut st = lock(&self.shared.state);
            if st.lost.is_some() {
                drop(st);
                self.discard(watermark);
                return;
            }
            st.queued += self.buffer.len() as u64;
            if st.pending.is_empty() {
                // The common case: swap, so neither vector reallocates.
                std::mem::swap(&mut st.pending, &mut self.buffer);
            } else {
                st.pending.append(&mut self.buffer);
            }
            if let Some(exit) = watermark {
                st.watermark = st.watermark.max(exit);
                self.handed_watermark = st.watermark;
            }
        }
        self.shared.wake.notify_one();
    }

    /// The backup is gone: what would have been handed over is dropped.
    fn discard(&mut self, watermark: Option<u64>) {
        if !self.buffer.is_empty() || watermark.is_some_and(|w| w > self.handed_watermark) {
            self.discarded = true;
        }
        self.buffer.clear();
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Dropped from the ack callback: joining ourselves would hang;
            // the thread ends on its own once `stop` is seen.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for PrimaryLink {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shared.stop.notify_one();
            self.join();
        }
    }
}

impl RecordSink for PrimaryLink {
    fn append(&mut self, record: &Record) -> io::Result<()> {
        if !self.shared.lost.load(Ordering::Relaxed) {
            self.buffer.push(record.clone());
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.hand_over(None);
        Ok(())
    }

    fn passed(&mut self, exit: u64) -> io::Result<()> {
        self.hand_over(Some(exit));
        Ok(())
    }
}

/// Batches sent and not yet acknowledged, oldest first: (seq, watermark,
/// records sent in total up to and including this batch).
type InFlight = RefCell<VecDeque<(u64, u64, u64)>>;

/// The network thread's body: runs until the backup is lost, the link is
/// dropped, or `finish` had Done sent.
async fn run(stream: TcpStream, shared: Arc<Shared>) {
    let (rd, wr) = stream.into_split();
    let in_flight = InFlight::default();
    let outcome = tokio::select! {
        r = read_acks(rd, &shared, &in_flight) => r,
        r = write_batches(wr, &shared, &in_flight) => r,
        _ = shared.stop.notified() => Ok(()),
    };
    match outcome {
        // We closed the link ourselves (finish or drop): nobody is left to
        // hold outputs, so the ack callback is not called.
        Ok(()) => lose(&shared, "the link was closed".to_string(), false),
        Err(e) => {
            warn!(peer = %shared.peer, "lost the backup: {e}");
            lose(&shared, format!("lost the backup at {}: {e}", shared.peer), true);
        }
    }
}

/// Marks the backup lost and wakes everyone who waits on it.
fn lose(shared: &Shared, reason: String, call_back: bool) {
    let callback = {
        let mut st = lock(&shared.state);
        if st.lost.is_some() {
            return;
        }
        st.lost = Some(reason);
        st.pending = Vec::new();
        shared.lost.store(true, Ordering::Relaxed);
        st.on_ack.clone()
    };
    shared.changed.notify_all();
    if let Some(callback) = callback.filter(|_| call_back) {
        callback(u64::MAX);
    }
}

async fn read_acks(rd: OwnedReadHalf, shared: &Shared, in_flight: &InFlight) -> Result<(), ChannelError> {
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let limit = shared.config.heartbeat_timeout;
    loop {
        let msg = match tokio::time::timeout(limit, wire::read_frame(&mut rd, &mut buf)).await {
            Ok(msg) => msg?,
            Err(_) => {
                return Err(ChannelError::Timeout(format!(
                    "no traffic from the backup for {limit:?} (heartbeat timeout)"
                )))
            }
        };
        match msg {
            Message::Heartbeat => {}
            Message::Ack { seq, watermark } => {
                let records = acknowledge(in_flight, seq, watermark)?;
                let (acked, callback) = {
                    let mut st = lock(&shared.state);
                    st.acked = st.acked.max(watermark);
                    st.records_acked = st.records_acked.max(records);
                    (st.acked, st.on_ack.clone())
                };
                shared.changed.notify_all();
                if let Some(callback) = callback {
                    callback(acked);
                }
            }
            other => return Err(ChannelError::Protocol(format!("unexpected {} from the backup", other.kind()))),
        }
    }
}

/// Retires the batches an Ack covers; returns the records acknowledged in
/// total. An Ack for a batch never sent (or with another watermark) is a
/// protocol error: trusting it could release outputs the backup lacks.
fn acknowledge(in_flight: &InFlight, seq: u64, watermark: u64) -> Result<u64, ChannelError> {
    let mut in_flight = in_flight.borrow_mut();
    while let Some(&(sent_seq, sent_watermark, records)) = in_flight.front() {
        if sent_seq > seq {
            break;
        }
        in_flight.pop_front();
        if sent_seq == seq {
            if sent_watermark != watermark {
                return Err(ChannelError::Protocol(format!(
                    "the backup acknowledged batch {seq} with watermark {watermark}, but it was sent with {sent_watermark}"
                )));
            }
            return Ok(records);
        }
    }
    Err(ChannelError::Protocol(format!("the backup acknowledged batch {seq}, which is not awaiting an ack")))
}

async fn write_batches(mut wr: OwnedWriteHalf, shared: &Shared, in_flight: &InFlight) -> Result<(), ChannelError> {
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outgoing: VecDeque<Record> = VecDeque::new();
    let (mut seq, mut sent_records, mut sent_watermark, mut sent_released) = (0u64, 0u64, 0u64, 0u64);
    let mut wrote = false;
    loop {
        let (watermark, released, closing) = {
            let mut st = lock(&shared.state);
            outgoing.extend(std::mem::take(&mut st.pending));
            (st.watermark, st.released, st.closing)
        };
        // Everything that accumulated while the previous write was in
        // flight goes out now, in as few batches as the size limit allows:
        // natural batching, no timer.
        if !outgoing.is_empty() || watermark > sent_watermark || released > sent_released {
            let mut n = outgoing.len().min(MAX_BATCH_RECORDS);
            let (frame, batch_watermark) = loop {
                // When records stay behind, the watermark may only claim the
                // exits before the first of them.
                let batch_watermark = match outgoing.get(n) {
                    Some(next) => watermark.min(next.position.exit.saturating_sub(1)),
                    None => watermark,
                }
                .max(sent_watermark);
                let records = &outgoing.make_contiguous()[..n];
                let msg = Message::Batch {
                    seq: seq + 1,
                    watermark: batch_watermark,
                    released,
                    records: Cow::Borrowed(records),
                };
                match wire::encode(&msg) {
                    Ok(frame) => break (frame, batch_watermark),
                    // Over the frame limit (huge serial input): split.
                    Err(_) if n > 1 => n /= 2,
                    Err(e) => return Err(e),
                }
            };
            seq += 1;
            sent_records += n as u64;
            in_flight.borrow_mut().push_back((seq, batch_watermark, sent_records));
            outgoing.drain(..n);
            wr.write_all(&frame).await.map_err(|e| ChannelError::io("sending to the backup", e))?;
            sent_watermark = batch_watermark;
            sent_released = released;
            wrote = true;
            continue;
        }
        if closing {
            // The backup has acknowledged everything; a backup that cannot
            // take a last small frame within a heartbeat timeout is gone
            // anyway.
            let limit = shared.config.heartbeat_timeout;
            let goodbye = async {
                wire::write_message(&mut wr, &Message::Done, "sending Done to the backup").await?;
                wr.shutdown().await.map_err(|e| ChannelError::io("closing the connection", e))
            };
            if let Err(e) = tokio::time::timeout(limit, goodbye).await.unwrap_or(Ok(())) {
                warn!(peer = %shared.peer, "saying goodbye to the backup: {e}");
            }
            return Ok(());
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = ticker.tick() => {
                if !wrote {
                    wire::write_message(&mut wr, &Message::Heartbeat, "sending a heartbeat to the backup").await?;
                }
                wrote = false;
            }
        }
    }
}
