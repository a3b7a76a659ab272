//! logging-channel: the primary↔backup transport of ftvmm — framing, acks,
//! heartbeats, flow control and the output rule's bookkeeping.
//!
//! This crate owns the TCP link between a primary VMM, which records every
//! nondeterministic input of its guest as [`replay::Record`]s, and a backup
//! VMM, which replays the guest in lockstep from them:
//!
//! - the handshake ([`PrimaryListener::accept`], [`BackupLink::connect`]):
//!   magic and protocol version, then the primary's [`replay::Header`], which
//!   the backup checks against its own guest image and configuration;
//! - streaming: the primary's [`PrimaryLink`] is a [`replay::RecordSink`] whose
//!   `passed` watermarks turn into batches; the backup's [`BackupLink`] is a
//!   [`replay::RecordSource`] that hands the records out in order;
//! - acknowledgements ([`PrimaryLink::acked`], [`PrimaryLink::on_ack`]), which
//!   the VMM uses to release held outputs (the output rule), and the released
//!   position the primary reports back ([`BackupLink::released`]) so a backup
//!   that takes over knows which outputs it must emit again;
//! - flow control ([`PrimaryLink::throttle`]) and failure detection: both
//!   sides heartbeat, and a peer that closes, errs, misbehaves or goes silent
//!   for [`ChannelConfig::heartbeat_timeout`] is declared lost.
//!
//! # Wire format
//!
//! ```text
//! each side, at connect: magic "FTVMMLCH" | protocol version: u32 LE
//! then frames:           payload length: u32 LE (at most 64 MiB) | payload: bincode (varint) of a Message
//! primary → backup: Hello{header}, then Batch{seq, watermark, released, records}*, Heartbeat, Done
//! backup → primary: Welcome | Reject{reason}, then Ack{seq, watermark}*, Heartbeat
//! ```
//!
//! The socket I/O of a link runs on a background thread with a
//! single-threaded tokio runtime, so the VMM's vCPU thread never blocks on the
//! network: it only hands buffers over under a short lock.

mod backup;
mod primary;
mod wire;

#[cfg(test)]
mod tests;

pub use backup::BackupLink;
pub use primary::{PrimaryLink, PrimaryListener};

use std::time::Duration;

/// Version of the protocol spoken here; a peer speaking another is refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// First bytes each side sends on a logging-channel connection.
pub const MAGIC: &[u8; 8] = b"FTVMMLCH";
/// Largest frame payload sent or accepted: bounds what a corrupt length can
/// make us allocate.
pub const MAX_FRAME: u32 = 64 << 20;

/// Timing and flow-control settings of a link.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// The peer is declared lost after this long without any traffic from it.
    pub heartbeat_timeout: Duration,
    /// The primary throttles ([`PrimaryLink::throttle`] blocks) while it is
    /// more than this many exits ahead of the backup's acknowledged watermark.
    pub max_lag_exits: u64,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig { heartbeat_timeout: Duration::from_millis(200), max_lag_exits: 50_000 }
    }
}

impl ChannelConfig {
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
}

impl ChannelError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ChannelError::Io { what: what.into(), source }
    }
}

/// A current-thread runtime: each link has one background thread, which is
/// all the I/O of one peer needs.
pub(crate) fn new_runtime() -> Result<tokio::runtime::Runtime, ChannelError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| ChannelError::io("starting the network runtime", e))
}

/// Locks a mutex, ignoring poisoning: the state behind our mutexes is
/// consistent after every statement, and a panic elsewhere must not turn into
/// a second one here.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
