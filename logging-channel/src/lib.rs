//! logging-channel: the primary↔backup transport of ftvmm — framing, acks,
//! heartbeats, flow control and the output rule's bookkeeping.
//!
//! This crate owns the TCP link between a primary VMM, which records every
//! nondeterministic input of its guest as [`replay::Record`]s, and a backup
//! VMM, which replays the guest in lockstep from them:
//!
//! - the handshake ([`PrimaryListener::accept`], [`BackupLink::connect`]):
//!   magic and protocol version, then the primary's [`replay::Header`], which
//!   the backup checks against its own guest image and configuration, and
//!   how the log starts ([`LogStart`]): at the guest's boot, or — for a
//!   backup joining a VM that is already running
//!   ([`PrimaryListener::accept_joining`]) — after a state transfer;
//! - the state transfer ([`PrimaryLink::send_state`],
//!   [`PrimaryLink::end_state`], [`BackupLink::next_state_chunk`]): an
//!   opaque, ordered byte stream (the VMM's snapshot), flow-controlled by
//!   the backup's consumption of it, before the first record;
//! - streaming: the primary's [`PrimaryLink`] is a [`replay::RecordSink`] whose
//!   `passed` watermarks turn into batches; the backup's [`BackupLink`] is a
//!   [`replay::RecordSource`] that hands the records out in order;
//! - acknowledgements ([`PrimaryLink::acked`], [`PrimaryLink::on_ack`]), which
//!   the VMM uses to release held outputs (the output rule), and the released
//!   position the primary reports back ([`BackupLink::released`]) so a backup
//!   that takes over knows which outputs it must emit again;
//! - flow control ([`PrimaryLink::throttle`], bounded in exits and in bytes)
//!   and failure detection: both sides heartbeat, and a peer that closes,
//!   errs, misbehaves or sends nothing at all for
//!   [`ChannelConfig::heartbeat_timeout`] is declared lost.
//!
//! - transport security ([`ChannelConfig::tls`]): with credentials, the
//!   connection is mutual TLS, set up before anything below is sent; a
//!   peer that fails it is refused like one that fails the handshake.
//!
//! # Wire format (protocol version 3)
//!
//! ```text
//! each side, at connect: magic "FTVMMLCH" | protocol version: u32 LE
//! then frames:           payload length: u32 LE (at most 64 MiB) | payload: bincode (varint) of a Message
//! primary → backup: Hello{header, start}
//!                   [start = State: State{offset, data}* StateEnd{exit, len}]
//!                   then Batch{seq, watermark, released, disk_applied, records}*, Done; Heartbeat at any time
//! backup → primary: Welcome | Reject{reason}
//!                   then Ack{seq, watermark}*, StateAck{consumed}* (while a state is sent); Heartbeat at any time
//! repair:           backup Resync{exit}; primary StateRestart State{offset, data}* StateEnd{exit, len}, then Batch*
//! ```
//!
//! - `State{offset, data}`: the next piece of the state stream; `offset` is
//!   the number of state bytes sent before it. At most [`STATE_FRAME`]
//!   bytes of data per frame, so that no frame holds the link up for long.
//! - `StateEnd{exit, len}`: the stream is complete, `len` bytes in all; it is
//!   the VM's state at guest exit `exit`, and the batches that follow carry
//!   the records of the exits after it.
//! - `StateAck{consumed}`: the backup's VMM has taken `consumed` state bytes
//!   in all. The primary keeps at most [`ChannelConfig::state_window`] bytes
//!   sent and not consumed.
//! - A peer is alive while bytes arrive from it: a large frame arriving
//!   slowly counts, silence for the heartbeat timeout does not.
//!
//! - Repair (version 3): a backup whose replay diverged sends
//!   `Resync{exit}` ([`BackupLink::request_resync`]) and acknowledges no
//!   batch from then on; the primary's VMM sees it
//!   ([`PrimaryLink::take_resync_request`]), stops appending records, and
//!   restarts the state stream on the same connection
//!   ([`PrimaryLink::restart_state`]): `StateRestart`, then `State` from
//!   offset 0 and `StateEnd{exit}` as for a joining backup, then batches of
//!   the exits after it. The backup drops the batches that arrive between
//!   its Resync and the StateRestart (they are older than the new state).
//!
//! Version 1 had `Hello{header}` only and no state messages; version 2 had
//! no repair.
//!
mod backup;
mod latency;
mod primary;
mod transport;
mod wire;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
#[cfg(test)]
mod wire_props;

pub use backup::{BackupLink, PrimaryInfo};
pub use latency::{micros, LatencyHistogram, LatencySummary};
pub use primary::{Acked, BatchTimes, PrimaryLink, PrimaryListener, StateSender};
#[doc(hidden)]
pub use wire::fuzz_wire;

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Version of the protocol spoken here; a peer speaking another is refused.
pub const PROTOCOL_VERSION: u32 = 4;
/// First bytes each side sends on a logging-channel connection.
pub const MAGIC: &[u8; 8] = b"FTVMMLCH";
/// Largest frame payload sent or accepted: bounds what a corrupt length can
/// make us allocate.
pub const MAX_FRAME: u32 = 64 << 20;
/// Most state bytes in one frame: at 100 Mbit/s a frame takes 21 ms.
pub const STATE_FRAME: usize = 256 << 10;

/// How the log a backup receives starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStart {
    /// At the guest's boot: the backup boots from its own image and replays
    /// from exit 0. A primary that boots with its backup
    /// ([`PrimaryListener::accept`]).
    Boot,
    /// After a state transfer: the backup restores the state it reads with
    /// [`BackupLink::next_state_chunk`], then replays from the exit after the
    /// state's. A backup joining a running VM ([`PrimaryListener::accept_joining`]).
    State,
}

/// What a VMM's links have carried, counted (for its metrics): every link
/// made with one [`ChannelConfig`] adds to the same counters, so they run
/// on across backups and joins.
#[derive(Debug, Default)]
pub struct ChannelCounters {
    /// Log records sent (a primary's) and their batches' bytes on the wire.
    pub records_sent: AtomicU64,
    pub log_bytes_sent: AtomicU64,
    /// State bytes sent on the wire (joins and resyncs).
    pub state_bytes_sent: AtomicU64,
    /// Log records received (a backup's) and their batches' bytes.
    pub records_received: AtomicU64,
    pub log_bytes_received: AtomicU64,
    /// State bytes received.
    pub state_bytes_received: AtomicU64,
    /// Would-be backups refused: a failed handshake (a stranger, another
    /// VM's backup, a bad certificate) or a join that could not start.
    pub peers_refused: AtomicU64,
    /// Heartbeat intervals the peer let pass without a word beyond the
    /// one allowed (each silence of n intervals counts n - 1; the silence
    /// that declares the peer lost counts too).
    pub heartbeats_missed: AtomicU64,
}

impl ChannelCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Timing and flow-control settings of a link.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// The peer is declared lost after this long without any traffic from it.
    pub heartbeat_timeout: Duration,
    /// The primary throttles ([`PrimaryLink::throttle`] blocks) while it is
    /// more than this many exits ahead of the backup's acknowledged watermark.
    pub max_lag_exits: u64,
    /// ... or while the records queued to send or sent and not yet
    /// acknowledged take more than this many bytes.
    pub max_lag_bytes: u64,
    /// [`PrimaryLink::send_state`] blocks while more than this many state
    /// bytes are handed to it and not yet consumed by the backup's VMM; the
    /// backup stops reading while it holds this many unconsumed.
    pub state_window: u64,
    /// Busy-poll budget: a network thread that would sleep waiting for the
    /// peer's next frame while one is due soon (the primary with a batch in
    /// flight, the backup after each batch) first watches the socket for up
    /// to this long, saving a sleep and a wake-up. Zero (the default): no
    /// busy-polling; it costs a core while it spins.
    pub poll: Duration,
    /// Mutual TLS on the channel (and so on the state transfer it
    /// carries): the primary accepts only a backup whose certificate chains
    /// to the CA, the backup only a primary whose certificate does and names
    /// the address it connects to. `None`: plaintext, unauthenticated.
    pub tls: Option<credentials::Tls>,
    /// Where the links made with this configuration count what they carry.
    pub counters: Arc<ChannelCounters>,
    /// Run first on every thread the channel starts (a link's network
    /// thread, a runtime's blocking threads): the VMM confines them there
    /// (its seccomp filters). `None`: nothing.
    pub on_thread_start: Option<ThreadHook>,
}

/// A function a new thread calls on itself before anything else.
#[derive(Clone)]
pub struct ThreadHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadHook")
    }
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            heartbeat_timeout: Duration::from_millis(200),
            max_lag_exits: 50_000,
            max_lag_bytes: 64 << 20,
            state_window: 8 << 20,
            poll: Duration::ZERO,
            tls: None,
            counters: Arc::default(),
            on_thread_start: None,
        }
    }
}

impl ChannelConfig {
    /// Runs [`ChannelConfig::on_thread_start`], if any, on the calling thread.
    pub(crate) fn thread_started(&self) {
        if let Some(hook) = &self.on_thread_start {
            (hook.0)();
        }
    }

    /// How long a peer has to complete the handshake: max(1 s, 5 × heartbeat_timeout).
    /// Longer than the heartbeat timeout because a peer may be busy starting up.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(1).max(self.heartbeat_timeout.saturating_mul(5))
    }

    /// How often each side sends a heartbeat when it has nothing else to
    /// send: a quarter of the timeout, so that a delayed frame or two do not
    /// make the peer declare us lost.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.heartbeat_timeout / 4).max(Duration::from_millis(1))
    }

    /// The busy-poll budget in force: [`ChannelConfig::poll`], but at most a
    /// quarter of the heartbeat interval, since a spinning network thread
    /// sends no heartbeat.
    pub fn busy_poll_budget(&self) -> Duration {
        self.poll.min(self.heartbeat_interval() / 4)
    }
}

/// Why a link could not be set up or was lost.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A socket operation failed; `what` says which.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the peer is not an ftvmm logging channel (bad magic)")]
    BadMagic,
    #[error("the peer speaks logging-channel protocol version {found}; this ftvmm speaks version {PROTOCOL_VERSION}")]
    Version { found: u32 },
    #[error("the peer sent a frame of {len} bytes (the limit is {MAX_FRAME})")]
    FrameTooLarge { len: u32 },
    #[error("the peer sent a message that does not decode: {0}")]
    Decode(String),
    /// The peer rejected us.
    #[error("the peer refused us: {0}")]
    Refused(String),
    /// We rejected the peer.
    #[error("the peer does not match this VM: {0}")]
    Mismatch(String),
    /// The TLS handshake failed: no certificate, one from another CA, the
    /// wrong name, or a peer that does not speak TLS.
    #[error("the TLS handshake failed: {0}")]
    Tls(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("the peer closed the connection")]
    Closed,
    /// The connection ended inside a message.
    #[error("the peer closed the connection in the middle of {0}")]
    Truncated(&'static str),
    /// The peer sent a message that makes no sense at this point.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer was lost (the reason says why) while we needed it.
    #[error("{0}")]
    Lost(String),
    /// The VMM called something that does not apply to this link (a state
    /// on a link whose log starts at boot, a state after its end...).
    #[error("logging channel misused: {0}")]
    Misuse(String),
}

impl ChannelError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ChannelError::Io { what: what.into(), source }
    }
}

/// A current-thread runtime: each link has one background thread, which is
/// all the I/O of one peer needs.
/// Threads it starts (its blocking pool, should a task need one) run
/// `config`'s hook first.
pub(crate) fn new_runtime(config: &ChannelConfig) -> Result<tokio::runtime::Runtime, ChannelError> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    if let Some(hook) = config.on_thread_start.clone() {
        builder.on_thread_start(move || (hook.0)());
    }
    builder.enable_io().enable_time().build().map_err(|e| ChannelError::io("starting the network runtime", e))
}

/// Puts the calling thread — a link's network thread, which sends the
/// heartbeats and judges the peer's silence — ahead of busy threads (the
/// vCPUs, or anything else saturating the host), so that a starved CPU does
/// not look like a dead peer: the lowest real-time priority (SCHED_RR 1)
/// where allowed (root), else nice -10, else as it is. The thread mostly
/// sleeps in epoll, so it takes little from what it preempts.
pub(crate) fn prioritize_network_thread() {
    // SAFETY: sched_setscheduler(0, ...) and setpriority(PRIO_PROCESS, 0, ...)
    // act on the calling thread with a valid parameter struct; failure only
    // leaves the priority as it was.
    unsafe {
        let param = libc::sched_param { sched_priority: 1 };
        if libc::sched_setscheduler(0, libc::SCHED_RR, &param) == 0 {
            return;
        }
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, -10) != 0 {
            tracing::debug!("the logging channel's network thread keeps its normal priority");
        }
    }
}

/// Locks a mutex, ignoring poisoning: the state behind our mutexes is
/// consistent after every statement, and a panic elsewhere must not turn into
/// a second one here.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
