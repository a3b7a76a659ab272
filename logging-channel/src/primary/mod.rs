//! The primary's end: accepting a backup, streaming records to it, tracking
//! its acknowledgements.
//!
//! - [`listener`]: where the primary waits for its backups, and the
//!   handshake each one goes through ([`PrimaryListener`]);
//! - [`link`]: the link as the vCPU thread uses it ([`PrimaryLink`]):
//!   records appended and handed over at `passed`/`flush`, the released and
//!   disk-applied positions, throttling, acknowledgements and the ack
//!   callback, the end of the log;
//! - [`state_sender`]: the state stream of a joining (or repaired) backup,
//!   from any thread ([`StateSender`]), bounded by the backup's window;
//! - [`network`]: the link's network thread, a tokio task that writes the
//!   state, the batches and heartbeats and reads the backup's acks.
//!
//! This file holds what they share: [`Shared`] and the state behind its
//! lock ([`State`], [`StateOut`]), and what a record weighs ([`weight`]).

mod link;
mod listener;
mod network;
mod state_sender;

pub use link::{Acked, BatchTimes, PrimaryLink};
pub use listener::PrimaryListener;
pub use state_sender::StateSender;

use crate::{ChannelConfig, LogStart};
use link::AckCallback;
use replay::{Entry, Event, Record, SyncPart};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex};
use std::time::Instant;
use tokio::sync::Notify;

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
    /// Pieces (at most [`STATE_FRAME`](crate::STATE_FRAME) bytes each)
    /// handed over by `send_state`, not yet taken by the writer.
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
