//! The primary's end: accepting a backup, streaming records to it, tracking
//! its acknowledgements.

use crate::wire::{self, BusyPoll, Bytes, Message, Watched};
use crate::{lock, new_runtime, ChannelConfig, ChannelError, LogStart, STATE_FRAME};
use replay::{Entry, Event, Header, Record, RecordSink, SyncPart};
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader};
// The transport's halves (plaintext or TLS) under the names the code has
// always used for them.
use crate::transport::{self, ReadHalf as OwnedReadHalf, Stream, WriteHalf as OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Most records in one batch: keeps a frame far below [`crate::MAX_FRAME`]
/// for ordinary records and bounds how long one write holds up acks of the
/// rest.
const MAX_BATCH_RECORDS: usize = 16 * 1024;
/// Most record bytes (by [`weight`]) in one batch, unless a single record
/// is larger: a frame takes 84 ms at 100 Mbit/s.
const MAX_BATCH_BYTES: u64 = 1 << 20;

/// What a queued record costs in memory: the record and the bytes it owns.
/// Every variant is listed, so that a new kind of input carrying data
/// cannot be left out of the byte bound by accident.
fn weight(record: &Record) -> u64 {
    let owned = match &record.entry {
        Entry::Event(Event::SerialRx { bytes }) => bytes.len(),
        Entry::Event(Event::DiskRead { data }) => data.len(),
        Entry::Event(Event::NetRx { frame }) => frame.len(),
        Entry::Event(Event::Sync(SyncPart::Pages { data, .. })) => data.len(),
        Entry::Event(Event::Sync(SyncPart::Vcpu { state })) => state.len(),
        Entry::Event(Event::Sync(SyncPart::Zeros { .. })) => 0,
        Entry::Event(Event::Interrupt { .. } | Event::TimeRead { .. } | Event::DigestCheck { .. })
        | Entry::Exit(_)
        | Entry::End { .. } => 0,
    };
    (std::mem::size_of::<Record>() + owned) as u64
}

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

    /// Blocks until a backup has connected and completed the handshake, for
    /// a primary that boots with its backup: the log starts at the guest's
    /// boot ([`LogStart::Boot`]). Peers that fail the handshake (garbage,
    /// wrong version, rejection, silence) are reported with `tracing::warn`
    /// and the wait goes on. Handshakes run concurrently, so a silent peer
    /// does not hold up a good backup that connects after it. Must not be
    /// called from within an async runtime (it runs its own).
    ///
    /// A listener serves any number of backups one after the other: accept
    /// one, lose it, accept the next (from any thread: the listener is
    /// `Send` and `Sync`). Connections that arrive while nobody accepts wait
    /// in the socket's backlog until the next call.
    pub fn accept(&self, header: &Header, config: &ChannelConfig) -> Result<PrimaryLink, ChannelError> {
        self.accept_as(header, config, LogStart::Boot)
    }

    /// Like [`accept`](Self::accept), for a VM that is already running: the
    /// backup is told that a state transfer precedes the log
    /// ([`LogStart::State`]). Send the state with
    /// [`PrimaryLink::send_state`] and [`PrimaryLink::end_state`]; records go
    /// out after it.
    pub fn accept_joining(&self, header: &Header, config: &ChannelConfig) -> Result<PrimaryLink, ChannelError> {
        self.accept_as(header, config, LogStart::State)
    }

    fn accept_as(&self, header: &Header, config: &ChannelConfig, start: LogStart) -> Result<PrimaryLink, ChannelError> {
        let runtime = new_runtime()?;
        let listener =
            self.listener.try_clone().map_err(|e| ChannelError::io("duplicating the listening socket", e))?;
        let (stream, peer) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| ChannelError::io("registering the listening socket", e))?;
            accept_loop(&listener, header, config, start).await
        })?;
        info!(%peer, ?start, "backup connected");
        PrimaryLink::start(runtime, stream, peer, config.clone(), start)
    }
}

async fn accept_loop(
    listener: &tokio::net::TcpListener,
    header: &Header,
    config: &ChannelConfig,
    start: LogStart,
) -> Result<(Stream, SocketAddr), ChannelError> {
    let header = Arc::new(header.clone());
    let limit = config.handshake_timeout();
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let header = header.clone();
                    let tls = config.tls.clone();
                    handshakes.spawn(async move {
                        let handshaking = handshake(stream, &header, start, tls.as_ref());
                        let outcome = match tokio::time::timeout(limit, handshaking).await {
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
async fn handshake(
    stream: TcpStream,
    header: &Header,
    start: LogStart,
    tls: Option<&credentials::Tls>,
) -> Result<Stream, ChannelError> {
    let mut stream = transport::accept(stream, tls).await?;
    stream.set_nodelay(true).map_err(|e| ChannelError::io("setting TCP_NODELAY", e))?;
    let mut hello = wire::preamble().to_vec();
    hello.extend(wire::encode(&Message::Hello { header: header.clone(), start })?);
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
    /// Signalled when `acked`, `records_acked`, `bytes_acked`,
    /// `state.consumed` or `lost` change (throttle, finish, send_state).
    changed: Condvar,
    /// Wakes the writer: records, watermark, released or closing changed.
    wake: Notify,
    /// Ends the network thread without a goodbye (the link was dropped).
    stop: Notify,
    /// Mirrors `state.lost.is_some()` so `append` stays lock-free.
    lost: AtomicBool,
    config: ChannelConfig,
    peer: SocketAddr,
    start: LogStart,
    /// Held by `send_state` for a whole chunk, so that chunks sent from
    /// several threads at once do not interleave.
    sending: Mutex<()>,
}

type AckCallback = Arc<dyn Fn(&Acked<'_>) + Send + Sync>;

/// One acknowledgement as the ack callback sees it: the watermark, and the
/// way each batch it retires went (for the per-hop output-commit figures of
/// `--stats`).
#[derive(Clone, Copy, Debug)]
pub struct Acked<'a> {
    /// Highest watermark acknowledged so far; `u64::MAX` when the backup is lost.
    pub watermark: u64,
    /// The batches this ack retires, oldest first (none when the backup is lost).
    pub batches: &'a [BatchTimes],
    /// When the ack was read from the socket.
    pub received: Instant,
}

/// When one batch went each step of its way out.
#[derive(Clone, Copy, Debug)]
pub struct BatchTimes {
    /// The watermark it carried.
    pub watermark: u64,
    /// When the vCPU thread handed over that watermark.
    pub handed: Instant,
    /// When its last byte was written to the socket.
    pub sent: Instant,
}

impl Acked<'static> {
    fn lost() -> Self {
        Acked { watermark: u64::MAX, batches: &[], received: Instant::now() }
    }
}

struct State {
    /// Records handed over by the vCPU thread, not yet taken by the writer.
    pending: Vec<Record>,
    /// Records handed over so far, in total.
    queued: u64,
    /// Their bytes (by [`weight`]), in total.
    queued_bytes: u64,
    watermark: u64,
    /// When the vCPU thread last handed something over.
    handed_at: Instant,
    released: u64,
    /// The last disk op the VMM reported applied.
    disk_applied: u64,
    /// Highest watermark the backup acknowledged.
    acked: u64,
    /// Records the backup acknowledged, in total.
    records_acked: u64,
    /// Their bytes, in total.
    bytes_acked: u64,
    /// Most record bytes ever queued or in flight at once (tests).
    #[cfg(test)]
    peak_unacked_bytes: u64,
    lost: Option<String>,
    /// `finish` wants a Done sent once everything is out.
    closing: bool,
    on_ack: Option<AckCallback>,
    state: StateOut,
    /// The backup's Resync: the exit it diverged at, until the VMM takes it.
    resync_requested: Option<u64>,
    /// From a Resync until the restarted state has ended: no throttling,
    /// since the backup acknowledges nothing meanwhile.
    resyncing: bool,
}

/// The state stream of a joining link, on its way out.
#[derive(Default)]
struct StateOut {
    /// Pieces (at most [`STATE_FRAME`] bytes each) handed over by
    /// `send_state`, not yet taken by the writer.
    pieces: VecDeque<Vec<u8>>,
    /// State bytes handed over, in total.
    handed: u64,
    /// State bytes the backup's VMM has consumed, in total.
    consumed: u64,
    /// Set by `end_state`: the exit the state was taken at.
    end: Option<u64>,
    /// Most state bytes ever handed over and not consumed at once (tests).
    #[cfg(test)]
    peak_unconsumed: u64,
    /// `restart_state` was called: the writer sends StateRestart next.
    restart: bool,
    /// The stream was restarted (repair) at least once: a link whose log
    /// started at boot carries state from then on.
    restarted: bool,
}

impl State {
    /// Record bytes queued here or in flight, not yet acknowledged.
    fn unacked_bytes(&self) -> u64 {
        self.queued_bytes.saturating_sub(self.bytes_acked)
    }
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
    /// Their bytes, by [`weight`].
    buffer_bytes: u64,
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
        stream: Stream,
        peer: SocketAddr,
        config: ChannelConfig,
        start: LogStart,
    ) -> Result<PrimaryLink, ChannelError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::new(),
                queued: 0,
                queued_bytes: 0,
                watermark: 0,
                handed_at: Instant::now(),
                released: 0,
                disk_applied: 0,
                acked: 0,
                records_acked: 0,
                bytes_acked: 0,
                #[cfg(test)]
                peak_unacked_bytes: 0,
                lost: None,
                closing: false,
                on_ack: None,
                state: StateOut::default(),
                resync_requested: None,
                resyncing: false,
            }),
            changed: Condvar::new(),
            wake: Notify::new(),
            stop: Notify::new(),
            lost: AtomicBool::new(false),
            config,
            peer,
            start,
            sending: Mutex::new(()),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ftvmm-lc-primary".into())
            .spawn(move || {
                crate::prioritize_network_thread();
                runtime.block_on(run(stream, for_thread))
            })
            .map_err(|e| ChannelError::io("starting the network thread", e))?;
        Ok(PrimaryLink {
            shared,
            buffer: Vec::new(),
            buffer_bytes: 0,
            handed_watermark: 0,
            discarded: false,
            thread: Some(thread),
        })
    }

    /// How this link's log starts: [`LogStart::State`] for a link from
    /// [`PrimaryListener::accept_joining`].
    pub fn log_start(&self) -> LogStart {
        self.shared.start
    }

    /// Sends the next part of the state stream (a joining link only). The
    /// stream is opaque and ordered: the backup's VMM reads the same bytes in
    /// the same order, though cut into other pieces. Callable from any
    /// thread (see also [`state_sender`](Self::state_sender)); calls from
    /// several threads at once are sent in some order, each chunk whole.
    ///
    /// Blocks while more than [`ChannelConfig::state_window`] state bytes
    /// are sent and not yet consumed by the backup's VMM. Fails with
    /// [`ChannelError::Lost`] once the backup is lost (also while blocked),
    /// and with [`ChannelError::Misuse`] on a link whose log starts at boot
    /// or after [`end_state`](Self::end_state).
    pub fn send_state(&self, chunk: Vec<u8>) -> Result<(), ChannelError> {
        send_state(&self.shared, chunk)
    }

    /// The state stream is complete: it is the VM's state at guest exit
    /// `exit`, and the log goes on with the records of the exits after it.
    /// Waits for a chunk another thread is sending to be handed over, not
    /// for the backup. Records appended before this call wait
    /// until the state is out; a record at an exit up to `exit` is a misuse
    /// that loses the backup (the state already covers it). Until this call,
    /// [`throttle`](Self::throttle) bounds the records by bytes only; after
    /// it, the lag in exits counts from `exit`.
    pub fn end_state(&self, exit: u64) -> Result<(), ChannelError> {
        end_state(&self.shared, exit)
    }

    /// A handle for sending the state from another thread while this link
    /// stays with the vCPU thread.
    pub fn state_sender(&self) -> StateSender {
        StateSender { shared: self.shared.clone() }
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

    /// The guest's disk ops numbered up to `op` have been applied to the
    /// storage. Sent like [`released`](Self::released), so the backup can
    /// forget the writes it keeps for going live.
    pub fn disk_applied(&self, op: u64) {
        {
            let mut st = lock(&self.shared.state);
            if st.lost.is_some() || op <= st.disk_applied {
                return;
            }
            st.disk_applied = op;
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
    pub fn on_ack(&self, f: Box<dyn Fn(&Acked<'_>) + Send + Sync>) {
        let f: AckCallback = Arc::from(f);
        let lost = {
            let mut st = lock(&self.shared.state);
            st.on_ack = Some(f.clone());
            st.lost.is_some()
        };
        // Outside the lock: the callback may well call acked().
        if lost {
            f(&Acked::lost());
        }
    }

    /// Blocks while `exit` is more than `max_lag_exits` ahead of the
    /// acknowledged watermark, or while the records handed over and not
    /// yet acknowledged take more than `max_lag_bytes`; returns at once when
    /// the backup is lost. On a joining link the lag in exits counts from the
    /// state's exit, and not at all before [`end_state`](Self::end_state).
    pub fn throttle(&self, exit: u64) {
        let config = &self.shared.config;
        let mut st = lock(&self.shared.state);
        loop {
            if st.lost.is_some() || st.resyncing {
                return;
            }
            let base = match self.shared.start {
                _ if st.state.restarted => st.state.end,
                LogStart::Boot => Some(0),
                LogStart::State => st.state.end,
            };
            let behind_exits = base.is_some_and(|base| exit.saturating_sub(st.acked.max(base)) > config.max_lag_exits);
            let behind_bytes = st.unacked_bytes() > config.max_lag_bytes;
            if !behind_exits && !behind_bytes {
                return;
            }
            st = self.shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Record bytes handed over and not yet acknowledged.
    #[cfg(test)]
    pub(crate) fn unacked_bytes(&self) -> u64 {
        lock(&self.shared.state).unacked_bytes()
    }

    /// The most record bytes ever handed over and not acknowledged at once.
    #[cfg(test)]
    pub(crate) fn peak_unacked_bytes(&self) -> u64 {
        lock(&self.shared.state).peak_unacked_bytes
    }

    /// The most state bytes ever handed over and not consumed at once.
    #[cfg(test)]
    pub(crate) fn peak_unconsumed_state(&self) -> u64 {
        lock(&self.shared.state).state.peak_unconsumed
    }

    /// The exit at which the backup reported its replay diverged (a
    /// `Resync`), once: the VMM answers with
    /// [`restart_state`](Self::restart_state) and a whole state.
    pub fn take_resync_request(&self) -> Option<u64> {
        lock(&self.shared.state).resync_requested.take()
    }

    /// Repair: the state stream starts again on this link (any link, also
    /// one whose log started at boot), replacing the backup's state. The
    /// VMM appends no record until [`end_state`](Self::end_state); records
    /// handed over before this call and not yet sent are dropped (the new
    /// state covers them). Send the state with
    /// [`send_state`](Self::send_state) or a [`StateSender`] as for a
    /// joining backup. Throttling is off until the state ends.
    pub fn restart_state(&self) {
        {
            let mut st = lock(&self.shared.state);
            st.state = StateOut { restart: true, restarted: true, ..StateOut::default() };
            st.resyncing = true;
        }
        self.shared.changed.notify_all();
        self.shared.wake.notify_one();
    }

    /// Why the backup was lost (heartbeat timeout, connection closed,
    /// protocol error), or `None` while it is connected.
    pub fn backup_lost(&self) -> Option<String> {
        lock(&self.shared.state).lost.clone()
    }

    /// The guest has ended: sends what is buffered (the caller has appended
    /// the End record and called `passed`), then waits until the backup
    /// acknowledged everything or `timeout` passes or the backup is lost;
    /// then closes. Returns whether everything was acknowledged (never, on a
    /// joining link whose state was not ended).
    pub fn finish(mut self, timeout: Duration) -> bool {
        self.hand_over(None);
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        let (records, watermark) = (st.queued, st.watermark);
        // Records thrown away after a loss were never acknowledged; a
        // backup with half a state has nothing to replay.
        let state_complete = self.shared.start == LogStart::Boot || st.state.end.is_some();
        let mut all_acked = !self.discarded && state_complete;
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
            st.queued_bytes += std::mem::take(&mut self.buffer_bytes);
            #[cfg(test)]
            {
                st.peak_unacked_bytes = st.peak_unacked_bytes.max(st.unacked_bytes());
            }
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
            st.handed_at = Instant::now();
        }
        self.shared.wake.notify_one();
    }

    /// The backup is gone: what would have been handed over is dropped.
    fn discard(&mut self, watermark: Option<u64>) {
        if !self.buffer.is_empty() || watermark.is_some_and(|w| w > self.handed_watermark) {
            self.discarded = true;
        }
        self.buffer.clear();
        self.buffer_bytes = 0;
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

/// A handle on a joining [`PrimaryLink`]'s state stream, for a thread other
/// than the one that holds the link: `Clone`, `Send` and `Sync`. Its calls
/// fail with [`ChannelError::Lost`] once the link is lost or dropped.
#[derive(Clone)]
pub struct StateSender {
    shared: Arc<Shared>,
}

impl StateSender {
    /// [`PrimaryLink::send_state`].
    pub fn send_state(&self, chunk: Vec<u8>) -> Result<(), ChannelError> {
        send_state(&self.shared, chunk)
    }

    /// [`PrimaryLink::end_state`].
    pub fn end_state(&self, exit: u64) -> Result<(), ChannelError> {
        end_state(&self.shared, exit)
    }

    /// [`PrimaryLink::backup_lost`].
    pub fn backup_lost(&self) -> Option<String> {
        lock(&self.shared.state).lost.clone()
    }

    /// Blocks until the backup's VMM has consumed every state byte handed
    /// over so far (so that what is sent next goes out at once); fails once
    /// the backup is lost.
    pub fn wait_consumed(&self) -> Result<(), ChannelError> {
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(why) = &st.lost {
                return Err(cut_short(why));
            }
            if st.state.consumed >= st.state.handed {
                return Ok(());
            }
            st = self.shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

fn no_state() -> ChannelError {
    ChannelError::Misuse(
        "this link's log starts at the guest's boot: it carries no state (accept a joining backup with accept_joining)"
            .into(),
    )
}

fn cut_short(why: &str) -> ChannelError {
    ChannelError::Lost(format!("the state transfer was cut short: {why}"))
}

/// Whether the link carries a state stream: a joining link, or one whose
/// stream was restarted for a repair.
fn carries_state(shared: &Shared) -> bool {
    shared.start == LogStart::State || lock(&shared.state).state.restarted
}

fn send_state(shared: &Shared, chunk: Vec<u8>) -> Result<(), ChannelError> {
    if !carries_state(shared) {
        return Err(no_state());
    }
    // Pieces no larger than the window, so that the window holds exactly.
    let piece = usize::try_from(shared.config.state_window).unwrap_or(usize::MAX).clamp(1, STATE_FRAME);
    let _whole = lock(&shared.sending);
    if chunk.len() <= piece {
        return hand_piece(shared, chunk);
    }
    for part in chunk.chunks(piece) {
        hand_piece(shared, part.to_vec())?;
    }
    Ok(())
}

/// Hands one piece to the writer once the window has room for it.
fn hand_piece(shared: &Shared, piece: Vec<u8>) -> Result<(), ChannelError> {
    let len = piece.len() as u64;
    let mut st = lock(&shared.state);
    loop {
        if let Some(why) = &st.lost {
            return Err(cut_short(why));
        }
        if st.state.end.is_some() {
            return Err(ChannelError::Misuse("send_state after end_state".into()));
        }
        let unconsumed = st.state.handed - st.state.consumed;
        if unconsumed == 0 || unconsumed + len <= shared.config.state_window {
            break;
        }
        st = shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    if len == 0 {
        return Ok(());
    }
    st.state.handed += len;
    st.state.pieces.push_back(piece);
    #[cfg(test)]
    {
        st.state.peak_unconsumed = st.state.peak_unconsumed.max(st.state.handed - st.state.consumed);
    }
    drop(st);
    shared.wake.notify_one();
    Ok(())
}

fn end_state(shared: &Shared, exit: u64) -> Result<(), ChannelError> {
    if !carries_state(shared) {
        return Err(no_state());
    }
    // After a chunk another thread is sending, never inside it.
    let _after = lock(&shared.sending);
    {
        let mut st = lock(&shared.state);
        if let Some(why) = &st.lost {
            return Err(cut_short(why));
        }
        if let Some(earlier) = st.state.end {
            return Err(ChannelError::Misuse(format!("end_state({exit}) after end_state({earlier})")));
        }
        st.state.end = Some(exit);
        st.resyncing = false;
    }
    shared.wake.notify_one();
    Ok(())
}

impl RecordSink for PrimaryLink {
    fn append(&mut self, record: &Record) -> io::Result<()> {
        if !self.shared.lost.load(Ordering::Relaxed) {
            self.buffer_bytes += weight(record);
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

/// A batch sent and not yet acknowledged.
struct Sent {
    seq: u64,
    watermark: u64,
    /// Records sent in total, up to and including this batch.
    records: u64,
    /// Their bytes, by [`weight`].
    bytes: u64,
    times: BatchTimes,
}

/// What the network thread's reader and writer share (one task: no lock).
#[derive(Default)]
struct Local {
    /// Batches sent and not yet acknowledged, oldest first.
    in_flight: RefCell<VecDeque<Sent>>,
    /// State bytes written to the socket (or being written), in total.
    state_sent: Cell<u64>,
    /// The batches the latest ack retired (reused: no allocation per ack).
    retired: RefCell<Vec<BatchTimes>>,
}

/// The network thread's body: runs until the backup is lost, the link is
/// dropped, or `finish` had Done sent.
async fn run(stream: Stream, shared: Arc<Shared>) {
    let fd = stream.as_raw_fd();
    let (rd, wr) = stream.into_split();
    let local = Local::default();
    let outcome = tokio::select! {
        r = read_acks(rd, fd, &shared, &local) => r,
        r = write_batches(wr, &shared, &local) => r,
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
        st.state.pieces = VecDeque::new();
        shared.lost.store(true, Ordering::Relaxed);
        st.on_ack.clone()
    };
    shared.changed.notify_all();
    if let Some(callback) = callback.filter(|_| call_back) {
        callback(&Acked::lost());
    }
}

async fn read_acks(rd: OwnedReadHalf, fd: RawFd, shared: &Shared, local: &Local) -> Result<(), ChannelError> {
    // An ack is due while batches are in flight; spinning for it is worth
    // it until the vCPU thread hands over more to send.
    let busy = BusyPoll {
        fd,
        budget: shared.config.busy_poll_budget(),
        worth_it: Box::new(|| {
            !local.in_flight.borrow().is_empty() && shared.state.try_lock().is_ok_and(|st| st.pending.is_empty())
        }),
    };
    let mut rd = BufReader::new(Watched::new(rd, shared.config.heartbeat_timeout, "the backup").busy_polling(busy));
    let mut buf = Vec::new();
    loop {
        let msg = wire::read_frame(&mut rd, &mut buf).await?;
        match msg {
            Message::Heartbeat => {}
            Message::Ack { seq, watermark } => {
                let received = Instant::now();
                let mut retired = local.retired.borrow_mut();
                retired.clear();
                let (records, bytes) = acknowledge(&local.in_flight, seq, watermark, &mut retired)?;
                let (acked, callback) = {
                    let mut st = lock(&shared.state);
                    st.acked = st.acked.max(watermark);
                    st.records_acked = st.records_acked.max(records);
                    st.bytes_acked = st.bytes_acked.max(bytes);
                    (st.acked, st.on_ack.clone())
                };
                shared.changed.notify_all();
                if let Some(callback) = callback {
                    callback(&Acked { watermark: acked, batches: &retired, received });
                }
            }
            Message::Resync { exit } => {
                warn!(peer = %shared.peer, exit, "the backup diverged and asks for the whole state");
                {
                    let mut st = lock(&shared.state);
                    st.resync_requested = Some(exit);
                    st.resyncing = true;
                }
                shared.changed.notify_all();
            }
            Message::StateAck { consumed } => {
                if !carries_state(shared) {
                    return Err(ChannelError::Protocol("a StateAck from the backup, but no state was sent".into()));
                }
                let sent = local.state_sent.get();
                {
                    let mut st = lock(&shared.state);
                    if consumed > sent || consumed < st.state.consumed {
                        return Err(ChannelError::Protocol(format!(
                            "the backup acknowledged {consumed} state bytes, after {}, of {sent} sent",
                            st.state.consumed
                        )));
                    }
                    st.state.consumed = consumed;
                }
                shared.changed.notify_all();
            }
            other => return Err(ChannelError::Protocol(format!("unexpected {} from the backup", other.kind()))),
        }
    }
}

/// Retires the batches an Ack covers (their times go to `retired`); returns
/// the records and their bytes acknowledged in total. An Ack for a batch never sent (or with another
/// watermark) is a protocol error: trusting it could release outputs the
/// backup lacks.
fn acknowledge(
    in_flight: &RefCell<VecDeque<Sent>>,
    seq: u64,
    watermark: u64,
    retired: &mut Vec<BatchTimes>,
) -> Result<(u64, u64), ChannelError> {
    let mut in_flight = in_flight.borrow_mut();
    while let Some(sent) = in_flight.pop_front() {
        if sent.seq > seq {
            in_flight.push_front(sent);
            break;
        }
        retired.push(sent.times);
        if sent.seq == seq {
            if sent.watermark != watermark {
                return Err(ChannelError::Protocol(format!(
                    "the backup acknowledged batch {seq} with watermark {watermark}, but it was sent with {}",
                    sent.watermark
                )));
            }
            return Ok((sent.records, sent.bytes));
        }
    }
    Err(ChannelError::Protocol(format!("the backup acknowledged batch {seq}, which is not awaiting an ack")))
}

async fn write_batches(mut wr: OwnedWriteHalf, shared: &Shared, local: &Local) -> Result<(), ChannelError> {
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outgoing: VecDeque<Record> = VecDeque::new();
    let (mut seq, mut sent_records, mut sent_bytes, mut sent_watermark) = (0u64, 0u64, 0u64, 0u64);
    let (mut sent_released, mut sent_disk_applied) = (0u64, 0u64);
    // A joining link sends its state first; records wait behind it.
    let mut state_open = shared.start == LogStart::State;
    // Set once the state ended: the exit no record may be at or before.
    let mut state_exit = None;
    let mut wrote = false;
    loop {
        let (watermark, handed, (released, disk_applied), closing, piece, state_end, restart) = {
            let mut st = lock(&shared.state);
            outgoing.extend(std::mem::take(&mut st.pending));
            let restart = std::mem::take(&mut st.state.restart);
            let (piece, end) =
                if state_open && !restart { (st.state.pieces.pop_front(), st.state.end) } else { (None, None) };
            (st.watermark, st.handed_at, (st.released, st.disk_applied), st.closing, piece, end, restart)
        };
        if restart {
            // Repair: records not yet sent are older than the new state,
            // which covers them; they count as sent, so that the acks after
            // the state cover their bytes.
            sent_records += outgoing.len() as u64;
            sent_bytes += outgoing.drain(..).map(|r| weight(&r)).sum::<u64>();
            local.state_sent.set(0);
            state_open = true;
            state_exit = None;
            wire::write_message(&mut wr, &Message::StateRestart, "restarting the state stream").await?;
            info!(peer = %shared.peer, "state stream restarted (repair)");
            wrote = true;
            continue;
        }
        if state_open {
            if let Some(piece) = piece {
                let offset = local.state_sent.get();
                let frame = wire::encode(&Message::State { offset, data: Bytes(Cow::Borrowed(&piece)) })?;
                // Counted before the write: the backup may acknowledge the
                // piece as soon as its last byte is out.
                local.state_sent.set(offset + piece.len() as u64);
                drop(piece);
                wr.write_all(&frame).await.map_err(|e| ChannelError::io("sending the state to the backup", e))?;
                wrote = true;
                continue;
            }
            if let Some(exit) = state_end {
                // `end_state` comes after every piece: all of them are out.
                let len = local.state_sent.get();
                wire::write_message(&mut wr, &Message::StateEnd { exit, len }, "sending the state's end to the backup")
                    .await?;
                info!(peer = %shared.peer, exit, len, "state sent");
                state_open = false;
                state_exit = Some(exit);
                wrote = true;
                continue;
            }
        } else if !outgoing.is_empty()
            || watermark > sent_watermark
            || released > sent_released
            || disk_applied > sent_disk_applied
        {
            if let (Some(exit), Some(first)) = (state_exit, outgoing.front()) {
                if first.position.exit <= exit {
                    return Err(ChannelError::Misuse(format!(
                        "a record at exit {} follows the state taken at exit {exit}, which covers it",
                        first.position.exit
                    )));
                }
                state_exit = None;
            }
            // Everything that accumulated while the previous write was in
            // flight goes out now, in as few batches as the size limits
            // allow: natural batching, no timer.
            let mut n = 0;
            let mut bytes = 0;
            for record in outgoing.iter().take(MAX_BATCH_RECORDS) {
                let w = weight(record);
                if n > 0 && bytes + w > MAX_BATCH_BYTES {
                    break;
                }
                n += 1;
                bytes += w;
            }
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
                    disk_applied,
                    records: Cow::Borrowed(records),
                };
                match wire::encode(&msg) {
                    Ok(frame) => break (frame, batch_watermark),
                    // Over the frame limit (huge records): split.
                    Err(_) if n > 1 => n /= 2,
                    Err(e) => return Err(e),
                }
            };
            seq += 1;
            sent_records += n as u64;
            sent_bytes += outgoing.drain(..n).map(|r| weight(&r)).sum::<u64>();
            wr.write_all(&frame).await.map_err(|e| ChannelError::io("sending to the backup", e))?;
            // In flight once written: the ack reader runs on this thread, so
            // no ack for it can be read before this.
            local.in_flight.borrow_mut().push_back(Sent {
                seq,
                watermark: batch_watermark,
                records: sent_records,
                bytes: sent_bytes,
                times: BatchTimes { watermark: batch_watermark, handed, sent: Instant::now() },
            });
            sent_watermark = batch_watermark;
            sent_released = released;
            sent_disk_applied = disk_applied;
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
