//! The backup's end: connecting to the primary, receiving and acknowledging
//! its state and records, handing them to the VMM and the replayer.

use crate::wire::{self, BusyPoll, Message, Watched};
use crate::{
    lock, new_runtime, ChannelConfig, ChannelCounters, ChannelError, LatencyHistogram, LatencySummary, LogStart,
};
use replay::{Header, LogError, Record, RecordSource};
use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
// The transport's halves (plaintext or TLS) under the names the code has
// always used for them.
use crate::transport::{self, ReadHalf as OwnedReadHalf, Stream, WriteHalf as OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

/// How often a refused connection is retried while the primary is not yet
/// listening.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// What the backup learns about its primary at connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryInfo {
    /// The log's header: authoritative (the backup must use its
    /// `wall_clock_base_ns` and `disk_generation`).
    pub header: Header,
    /// Whether the backup boots from its image ([`LogStart::Boot`]) or first
    /// restores a state ([`LogStart::State`], read with
    /// [`BackupLink::next_state_chunk`]).
    pub start: LogStart,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when records or state arrive or the primary is lost.
    arrived: Condvar,
    /// Ends the network thread (the link was dropped).
    stop: Notify,
    /// State bytes the VMM has consumed, in total: the writer acknowledges
    /// them, the reader waits on them for room.
    consumed: watch::Sender<u64>,
    /// The VMM took a record off a full queue: reading may resume.
    records_taken: tokio::sync::Notify,
    start: LogStart,
    /// How long each ack took from the batch's arrival to its write, in µs:
    /// the backup's share of the output-commit latency (`--stats`).
    ack_delay: Mutex<LatencyHistogram>,
    /// The exit of the VMM's latest resync request, for the writer to send.
    resync: watch::Sender<Option<u64>>,
}

/// Received records a backup holds before it stops reading the channel.
pub const MAX_QUEUED_RECORDS: usize = 1 << 17;

struct State {
    /// Received records not yet handed out (at most [`MAX_QUEUED_RECORDS`]
    /// and one batch).
    queue: VecDeque<Record>,
    /// The primary's latest watermark.
    watermark: u64,
    /// The primary's latest output-release position.
    released: u64,
    /// The last disk op the primary reported applied.
    disk_applied: u64,
    lost: Option<String>,
    /// Received state pieces not yet handed out, and their bytes.
    state: VecDeque<Vec<u8>>,
    state_queued: u64,
    /// State bytes handed out, in total.
    state_consumed: u64,
    /// The state's exit, once its end arrived.
    state_end: Option<u64>,
    /// `next_state_chunk` has reported the end: records may be read.
    state_done: bool,
    /// Most state bytes ever queued at once (tests).
    #[cfg(test)]
    peak_state_queued: u64,
    /// A resync was requested and the primary's StateRestart has not come
    /// yet: batches arriving meanwhile are dropped, and not acknowledged.
    awaiting_restart: bool,
    /// A resync was requested at least once: the link carries a state
    /// stream again, whatever its start.
    restarted: bool,
}

/// The backup's link to its primary: the state stream of a joining backup,
/// then a [`RecordSource`] of the primary's records. A background thread
/// receives and acknowledges them.
pub struct BackupLink {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BackupLink {
    /// Connects to the primary at `addr`, retrying every 50 ms while nothing
    /// listens there (the backup may start first) until `connect_timeout`
    /// elapses, and does the handshake: the primary's header must match
    /// `ours` (image and configuration). Returns the link and what the
    /// primary said: its header, whose `wall_clock_base_ns` the backup must
    /// use, and whether a state transfer precedes the log. Must not be
    /// called from within an async runtime (it runs its own).
    pub fn connect(
        addr: &str,
        ours: &Header,
        config: &ChannelConfig,
        connect_timeout: Duration,
    ) -> Result<(BackupLink, PrimaryInfo), ChannelError> {
        // A host name is resolved here, on the calling thread: the runtime
        // would do it on a thread of its own, which the VMM would have to
        // let read the resolver's files.
        let targets: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .map_err(|e| ChannelError::io(format!("resolving the primary's address {addr}"), e))?
            .collect();
        let runtime = new_runtime(config)?;
        let (stream, peer, info) = runtime.block_on(async {
            let deadline = Instant::now() + connect_timeout;
            let (tcp, peer) = connect_retrying(addr, &targets, deadline).await?;
            // A primary that is still starting up may have bound its
            // listener without accepting yet: its preamble may come as late
            // as the connect deadline.
            let limit = config.handshake_timeout().max(deadline.saturating_duration_since(Instant::now()));
            let handshaking = async {
                let mut stream = transport::connect(tcp, addr, config.tls.as_ref()).await?;
                handshake(&mut stream, ours).await.map(|info| (stream, info))
            };
            let (stream, info) = match tokio::time::timeout(limit, handshaking).await {
                Ok(outcome) => outcome?,
                Err(_) => {
                    return Err(ChannelError::Timeout(format!(
                        "the primary at {peer} sent no handshake within {limit:?}"
                    )))
                }
            };
            Ok((stream, peer, info))
        })?;
        info!(%peer, start = ?info.start, "connected to the primary");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                watermark: 0,
                released: 0,
                disk_applied: 0,
                lost: None,
                state: VecDeque::new(),
                state_queued: 0,
                state_consumed: 0,
                state_end: None,
                state_done: false,
                #[cfg(test)]
                peak_state_queued: 0,
                awaiting_restart: false,
                restarted: false,
            }),
            arrived: Condvar::new(),
            stop: Notify::new(),
            consumed: watch::Sender::new(0),
            records_taken: tokio::sync::Notify::new(),
            ack_delay: Mutex::new(LatencyHistogram::new()),
            start: info.start,
            resync: watch::Sender::new(None),
        });
        let for_thread = shared.clone();
        let config = config.clone();
        let thread = std::thread::Builder::new()
            .name("ftvmm-lc-backup".into())
            .spawn(move || {
                config.thread_started();
                crate::prioritize_network_thread();
                runtime.block_on(run(stream, peer, for_thread, config))
            })
            .map_err(|e| ChannelError::io("starting the network thread", e))?;
        Ok((BackupLink { shared, thread: Some(thread) }, info))
    }

    /// The next piece of the primary's state stream, blocking until it
    /// arrives; `Ok(None)` once the stream is complete (and on every call
    /// after), when the records may be read. The pieces' concatenation is
    /// the byte stream the primary sent, in order; their boundaries are the
    /// channel's (at most [`crate::STATE_FRAME`] bytes each), not the
    /// primary's chunks. Each piece is acknowledged to the primary as it is
    /// handed out: the primary's window bounds what waits here, and this
    /// side stops reading while it holds [`ChannelConfig::state_window`]
    /// bytes.
    ///
    /// Fails with [`ChannelError::Lost`] when the primary is lost before the
    /// end of the stream (pieces still queued are useless then), and with
    /// [`ChannelError::Misuse`] on a link whose log starts at boot.
    pub fn next_state_chunk(&mut self) -> Result<Option<Vec<u8>>, ChannelError> {
        let mut st = lock(&self.shared.state);
        if self.shared.start != LogStart::State && !st.restarted {
            return Err(ChannelError::Misuse("the primary sends no state: its log starts at the guest's boot".into()));
        }
        loop {
            if st.state_end.is_none() {
                if let Some(why) = &st.lost {
                    return Err(ChannelError::Lost(format!("the state transfer was cut short: {why}")));
                }
            }
            if let Some(piece) = st.state.pop_front() {
                st.state_queued -= piece.len() as u64;
                st.state_consumed += piece.len() as u64;
                let consumed = st.state_consumed;
                drop(st);
                self.shared.consumed.send_replace(consumed);
                return Ok(Some(piece));
            }
            if st.state_end.is_some() {
                st.state_done = true;
                return Ok(None);
            }
            st = self.shared.arrived.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// The guest exit the primary's state was taken at, once the end of the
    /// state stream has arrived: the records that follow are after it.
    pub fn state_exit(&self) -> Option<u64> {
        lock(&self.shared.state).state_end
    }

    /// The most state bytes ever queued here at once.
    #[cfg(test)]
    pub(crate) fn peak_state_queued(&self) -> u64 {
        lock(&self.shared.state).peak_state_queued
    }

    /// Records received and not yet handed out.
    #[cfg(test)]
    pub(crate) fn queued_records(&self) -> usize {
        lock(&self.shared.state).queue.len()
    }

    /// Repair: the backup's replay diverged at exit `exit`. Asks the primary
    /// for its whole state again (a `Resync`) and drops every record and
    /// state piece received so far; from now on no batch is acknowledged —
    /// nothing the primary holds output for is claimed received — until the
    /// new state has arrived. Read it with
    /// [`next_state_chunk`](Self::next_state_chunk) to its end, as a
    /// joining backup does; the records after it follow. If the primary is
    /// lost before the end, `next_state_chunk` fails.
    pub fn request_resync(&mut self, exit: u64) {
        {
            let mut st = lock(&self.shared.state);
            st.queue.clear();
            st.state.clear();
            st.state_queued = 0;
            st.state_consumed = 0;
            st.state_end = None;
            st.state_done = false;
            st.watermark = 0;
            st.awaiting_restart = true;
            st.restarted = true;
        }
        // The new stream's consumption counts from 0; not a change worth
        // a StateAck.
        self.shared.consumed.send_if_modified(|consumed| {
            *consumed = 0;
            false
        });
        self.shared.resync.send_replace(Some(exit));
        // A reader paused on a full queue may read (and drop) again.
        self.shared.records_taken.notify_one();
    }

    /// Records must wait until the state has been read.
    fn check_state_done(&self, st: &State) -> Result<(), LogError> {
        if (self.shared.start == LogStart::State || st.restarted) && !st.state_done {
            return Err(LogError::Io(io::Error::other(
                "the primary's state comes before its records: read it to the end with next_state_chunk first",
            )));
        }
        Ok(())
    }

    /// The latest output-release position the primary reported: outputs at
    /// positions up to it have left the primary.
    pub fn released(&self) -> u64 {
        lock(&self.shared.state).released
    }

    /// The last disk op the primary reported applied to its storage: the
    /// writes up to it need not be re-issued by a backup going live.
    pub fn disk_applied(&self) -> u64 {
        lock(&self.shared.state).disk_applied
    }

    /// Why the primary was lost, or `None` while it is alive.
    /// How long acks took from their batch's arrival to being written, as
    /// (acks, p50 µs, p99 µs, max µs), or None before the first.
    pub fn ack_delay_stats(&self) -> Option<LatencySummary> {
        lock(&self.shared.ack_delay).summary()
    }

    pub fn primary_lost(&self) -> Option<String> {
        lock(&self.shared.state).lost.clone()
    }
}

impl Drop for BackupLink {
    fn drop(&mut self) {
        self.shared.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl RecordSource for BackupLink {
    /// Hands out received records in order, blocking until one arrives.
    /// Returns `Ok(None)` once the primary is lost (heartbeat timeout, EOF,
    /// error, or the primary said Done) and every record received before
    /// was handed out. An error on a joining link whose state has not been
    /// read to the end.
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        let mut st = lock(&self.shared.state);
        self.check_state_done(&st)?;
        loop {
            if let Some(record) = st.queue.pop_front() {
                if st.queue.len() + 1 == MAX_QUEUED_RECORDS {
                    self.shared.records_taken.notify_one();
                }
                return Ok(Some(record));
            }
            if st.lost.is_some() {
                return Ok(None);
            }
            st = self.shared.arrived.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Non-blocking: true iff no received record is waiting and the
    /// primary's latest watermark has reached `exit`.
    fn passed(&mut self, exit: u64) -> Result<bool, LogError> {
        let st = lock(&self.shared.state);
        self.check_state_done(&st)?;
        Ok(st.queue.is_empty() && st.watermark >= exit)
    }
}

/// Connects, retrying while the primary is not listening yet.
/// Connects to the first of `targets` (`addr` resolved) that accepts.
async fn connect_retrying(
    addr: &str,
    targets: &[SocketAddr],
    deadline: Instant,
) -> Result<(TcpStream, SocketAddr), ChannelError> {
    loop {
        let err = match tokio::time::timeout_at(deadline, TcpStream::connect(targets)).await {
            Ok(Ok(stream)) => {
                let peer = stream.peer_addr().map_err(|e| ChannelError::io("reading the primary's address", e))?;
                return Ok((stream, peer));
            }
            Ok(Err(e)) if retryable(&e) => e,
            Ok(Err(e)) => return Err(ChannelError::io(format!("connecting to the primary at {addr}"), e)),
            Err(_) => return Err(ChannelError::Timeout(format!("connecting to the primary at {addr}"))),
        };
        if Instant::now() + CONNECT_RETRY >= deadline {
            return Err(ChannelError::Timeout(format!(
                "connecting to the primary at {addr}: nothing accepted the connection ({err})"
            )));
        }
        tokio::time::sleep(CONNECT_RETRY).await;
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::TimedOut
    )
}

/// The backup's half of the handshake: preamble out, the primary's
/// preamble and Hello in, Welcome or Reject out.
async fn handshake(stream: &mut Stream, ours: &Header) -> Result<PrimaryInfo, ChannelError> {
    stream.set_nodelay(true).map_err(|e| ChannelError::io("setting TCP_NODELAY", e))?;
    stream.write_all(&wire::preamble()).await.map_err(|e| ChannelError::io("sending the handshake", e))?;
    wire::read_preamble(stream).await?;
    // No BufReader: it could swallow the first batch, which the streaming
    // phase's reader must see.
    let (header, start) = match wire::read_frame(stream, &mut Vec::new()).await? {
        Message::Hello { header, start } => (header, start),
        other => return Err(ChannelError::Protocol(format!("expected Hello, got {}", other.kind()))),
    };
    // The primary's header is the log's: it is authoritative.
    if let Err(reason) = header.check_matches(ours) {
        let reject = Message::Reject { reason: reason.clone() };
        // Best effort: the primary is told why, but we fail either way.
        if wire::write_message(stream, &reject, "sending Reject").await.is_ok() {
            let _ = stream.shutdown().await;
        }
        return Err(ChannelError::Mismatch(reason));
    }
    wire::write_message(stream, &Message::Welcome, "sending Welcome").await?;
    Ok(PrimaryInfo { header, start })
}

/// The network thread's body: runs until the primary is lost or the link
/// is dropped.
async fn run(stream: Stream, peer: SocketAddr, shared: Arc<Shared>, config: ChannelConfig) {
    let fd = stream.as_raw_fd();
    let (rd, wr) = stream.into_split();
    let (acks, to_ack) = watch::channel(None);
    let ack_due = Cell::new(false);
    let outcome = tokio::select! {
        r = read_frames(rd, fd, &shared, &config, acks, &ack_due) => r,
        r = write_acks(wr, &shared, &config, to_ack, &ack_due) => r,
        _ = shared.stop.notified() => Ok("the link was closed".to_string()),
    };
    let reason = match outcome {
        Ok(reason) => {
            info!(%peer, "{reason}");
            reason
        }
        Err(e) => {
            if primary_died(&e) {
                info!(%peer, "lost the primary: {e}");
            } else {
                warn!(%peer, "lost the primary: {e}");
            }
            format!("lost the primary at {peer}: {e}")
        }
    };
    {
        let mut st = lock(&shared.state);
        st.lost.get_or_insert(reason);
    }
    shared.arrived.notify_all();
}

/// Whether `e`, which ended the link, is the primary's death as a backup
/// notices it: its connection ended (a FIN, a reset, a TLS stream without
/// close_notify), or it fell silent past the heartbeat timeout. That is what
/// a backup is there for, and the VMM reports it on its own line (`backup:
/// primary lost (...)`), so it is logged as information, not a warning;
/// anything else that ends the link (a protocol error, another socket
/// error) is a warning.
fn primary_died(e: &ChannelError) -> bool {
    match e {
        ChannelError::Closed | ChannelError::Truncated(_) | ChannelError::Timeout(_) => true,
        ChannelError::Io { source, .. } => matches!(
            source.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

/// Receives the state and the batches and queues them; returns why the
/// primary ended when it said Done.
async fn read_frames(
    rd: OwnedReadHalf,
    fd: RawFd,
    shared: &Shared,
    config: &ChannelConfig,
    acks: watch::Sender<Option<PendingAck>>,
    ack_due: &Cell<bool>,
) -> Result<String, ChannelError> {
    // The next batch is likely on its way: watch for it before sleeping.
    // Not while an ack waits to be written: the writer shares this thread.
    let busy = BusyPoll { fd, budget: config.busy_poll_budget(), worth_it: Box::new(|| !ack_due.get()) };
    let watched = Watched::new(rd, config.heartbeat_timeout, "the primary")
        .counting_missed(config.counters.clone(), config.heartbeat_interval());
    let mut rd = BufReader::new(watched.busy_polling(busy));
    let mut buf = Vec::new();
    let mut expected = 1u64;
    let mut consumed = shared.consumed.subscribe();
    // A joining backup receives the state first.
    let mut state_open = shared.start == LogStart::State;
    let mut state_received = 0u64;
    loop {
        if state_open {
            // Holding a window's worth: read no more until the VMM takes
            // some. The primary cannot be heard meanwhile, so its silence
            // is not held against it.
            let mut paused = false;
            loop {
                consumed.borrow_and_update();
                if lock(&shared.state).state_queued < config.state_window.max(1) {
                    break;
                }
                paused = true;
                if consumed.changed().await.is_err() {
                    // The sender lives in `shared`: cannot happen.
                    std::future::pending::<()>().await;
                }
            }
            if paused {
                rd.get_mut().touch();
            }
        }
        // The same for records: a backup whose replay falls behind stops
        // reading (and so acknowledging) at a bound, and the primary's
        // throttle then holds its guest back: the backup's lag, and its
        // memory, stay bounded.
        let mut paused = false;
        while lock(&shared.state).queue.len() >= MAX_QUEUED_RECORDS {
            paused = true;
            shared.records_taken.notified().await;
        }
        if paused {
            rd.get_mut().touch();
        }
        match wire::read_frame(&mut rd, &mut buf).await? {
            Message::State { offset, data } => {
                if !state_open {
                    return Err(ChannelError::Protocol(match shared.start {
                        LogStart::Boot => "state bytes arrived, but the log starts at the guest's boot".into(),
                        LogStart::State => "state bytes arrived after the end of the state".into(),
                    }));
                }
                if offset != state_received {
                    return Err(ChannelError::Protocol(format!(
                        "state bytes for offset {offset} arrived where offset {state_received} was due"
                    )));
                }
                let piece = data.0.into_owned();
                ChannelCounters::add(&config.counters.state_bytes_received, buf.len() as u64 + 4);
                if piece.is_empty() {
                    continue;
                }
                state_received += piece.len() as u64;
                {
                    let mut st = lock(&shared.state);
                    st.state_queued += piece.len() as u64;
                    st.state.push_back(piece);
                    #[cfg(test)]
                    {
                        st.peak_state_queued = st.peak_state_queued.max(st.state_queued);
                    }
                }
                shared.arrived.notify_all();
            }
            Message::StateEnd { exit, len } => {
                if !state_open {
                    return Err(ChannelError::Protocol("an end of the state arrived, but no state was due".into()));
                }
                if len != state_received {
                    return Err(ChannelError::Protocol(format!(
                        "the state ended at {len} bytes, but {state_received} arrived"
                    )));
                }
                state_open = false;
                lock(&shared.state).state_end = Some(exit);
                shared.arrived.notify_all();
                info!(exit, len, "state received");
            }
            Message::StateRestart => {
                if !lock(&shared.state).awaiting_restart {
                    return Err(ChannelError::Protocol(
                        "a restarted state arrived, but no resync was asked for".into(),
                    ));
                }
                lock(&shared.state).awaiting_restart = false;
                state_open = true;
                state_received = 0;
                info!("the primary restarts its state (resync)");
            }
            Message::Batch { seq, watermark, released, disk_applied, records } => {
                ChannelCounters::add(&config.counters.records_received, records.len() as u64);
                ChannelCounters::add(&config.counters.log_bytes_received, buf.len() as u64 + 4);
                if state_open {
                    return Err(ChannelError::Protocol(
                        "a batch of records arrived before the end of the state".into(),
                    ));
                }
                if seq != expected {
                    return Err(ChannelError::Protocol(format!("batch {seq} arrived where batch {expected} was due")));
                }
                expected += 1;
                if lock(&shared.state).awaiting_restart {
                    // Older than the state the primary is about to send:
                    // dropped, and not acknowledged.
                    continue;
                }
                {
                    let mut st = lock(&shared.state);
                    st.queue.extend(records.into_owned());
                    st.watermark = st.watermark.max(watermark);
                    st.released = st.released.max(released);
                    st.disk_applied = st.disk_applied.max(disk_applied);
                }
                shared.arrived.notify_all();
                // Acked on receipt, before replay: the output rule only
                // needs the backup to hold the log, not to have run it.
                acks.send_replace(Some(PendingAck { seq, watermark, received: std::time::Instant::now() }));
                ack_due.set(true);
            }
            Message::Heartbeat => {}
            Message::Done => return Ok("the primary ended the run".to_string()),
            other => return Err(ChannelError::Protocol(format!("unexpected {} from the primary", other.kind()))),
        }
    }
}

/// An ack the reader wants sent.
#[derive(Clone, Copy)]
struct PendingAck {
    seq: u64,
    watermark: u64,
    /// When its batch had been read.
    received: std::time::Instant,
}

/// Sends the latest ack whenever there is a new one (acks that pile up
/// while a write is in flight collapse into the newest, which covers them),
/// the VMM's consumption of the state likewise, and a heartbeat when
/// nothing else went out for a while.
async fn write_acks(
    mut wr: OwnedWriteHalf,
    shared: &Shared,
    config: &ChannelConfig,
    mut to_ack: watch::Receiver<Option<PendingAck>>,
    ack_due: &Cell<bool>,
) -> Result<String, ChannelError> {
    let mut ticker = tokio::time::interval(config.heartbeat_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut consumed = shared.consumed.subscribe();
    let mut resync = shared.resync.subscribe();
    let mut wrote = false;
    loop {
        tokio::select! {
            changed = resync.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
                let exit = *resync.borrow_and_update();
                if let Some(exit) = exit {
                    wire::write_message(&mut wr, &Message::Resync { exit }, "asking the primary for a resync")
                        .await?;
                    wrote = true;
                }
            }
            changed = to_ack.changed() => {
                if changed.is_err() {
                    // The reader ended; its outcome is the link's.
                    std::future::pending::<()>().await;
                }
                let ack = *to_ack.borrow_and_update();
                if let Some(PendingAck { seq, watermark, received }) = ack {
                    wire::write_message(&mut wr, &Message::Ack { seq, watermark }, "sending an ack to the primary")
                        .await?;
                    lock(&shared.ack_delay).record_between(received, std::time::Instant::now());
                    ack_due.set(false);
                    wrote = true;
                }
            }
            changed = consumed.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
                let consumed = *consumed.borrow_and_update();
                wire::write_message(&mut wr, &Message::StateAck { consumed }, "acknowledging state to the primary")
                    .await?;
                wrote = true;
            }
            _ = ticker.tick() => {
                if !wrote {
                    wire::write_message(&mut wr, &Message::Heartbeat, "sending a heartbeat to the primary").await?;
                }
                wrote = false;
            }
        }
    }
}
