//! Fault tolerance glue: the VMM's role in a pair ([`Role`]), where the log
//! goes and comes from (a file, or the logging channel), and the outputs'
//! three regimes:
//! - [`Direct`]: released at once (a run alone, a recording, a replay, and a
//!   backup after it went live);
//! - [`Held`]: the primary's output rule — each output waits until the
//!   backup has acknowledged the log up to the position that produced it;
//! - [`Suppressed`]: the backup's, while it replays — kept until the primary
//!   reports it released, and re-emitted when the backup goes live.
//!
//! Disk ops are outputs too, counted by op number ([`OpSeq`]), not by exit:
//! the primary reports how far its storage has applied them, the backup
//! keeps every op above that, and a backup that joins (or resyncs) receives
//! the primary's unapplied ops with the state ([`PendingOutputs`]). Going
//! live, the backup re-issues its kept ops and flushes before it re-emits
//! any other output, which may depend on them. A primary without a backup
//! releases an output only once every disk op before it is applied: nobody
//! else holds those writes.

mod gate;
mod joiner;
mod nic;
mod outputs;
#[cfg(test)]
mod tests;

pub use gate::{CommitHops, Item, OutputGate};
pub use joiner::Joiner;
pub use nic::{HostNic, RX_QUEUE_FRAMES};
pub use outputs::{Direct, Held, Outputs, Suppressed, MAX_SUPPRESSED_FRAMES};

use crate::host::console::Endpoint;
use crate::host::disk::{DiskOp, OpSeq};
use crate::host::tap::TapTx;
use logging_channel::PrimaryListener;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The VMM's part in fault tolerance.
pub enum Role {
    /// Alone: a plain run, a recording or a replay (or a former backup, live).
    Solo,
    /// The primary: inputs go to the backup, outputs wait for its acks.
    Primary {
        gate: Arc<OutputGate>,
        /// The exit up to which serial output has reached the outside world.
        delivered: Arc<AtomicU64>,
        finish_timeout: Duration,
        /// Our owner generation of the shared disk (0: none).
        generation: u64,
        /// When the watermark was last shipped: (exit, time).
        shipped: (u64, Instant),
        /// Accepts a new backup whenever the VM has none (re-protection).
        joiner: Option<Joiner>,
    },
    /// The backup: replays the primary's log; when it ends (the primary is
    /// gone) it goes live and serves `endpoint`, with serial input from
    /// `serial_input` if given (`--serial-input`), else from the endpoint.
    Backup {
        endpoint: Option<Endpoint>,
        serial_input: Option<std::path::PathBuf>,
        /// The primary's generation of the shared disk, to claim it from.
        expected_generation: u64,
        /// The NIC's host side, its TAP drained until the backup goes live.
        nic: Option<HostNic>,
        /// Once live, accept backups of its own here (`--listen`).
        listener: Option<PrimaryListener>,
    },
}

/// How this VMM calls itself in the arbitration record.
pub fn owner_name(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{role} pid {} on {}", std::process::id(), host.trim())
}

/// A primary's outputs not yet out of it: disk ops not yet applied, serial
/// output and frames not yet delivered. They travel with the state to a
/// backup that joins or resyncs (and in a snapshot), so that whoever may go
/// live holds every output the guest has produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PendingOutputs {
    pub disk: Vec<(OpSeq, DiskOp)>,
    pub serial: Vec<(u64, Vec<u8>)>,
    pub frames: Vec<(u64, Vec<u8>)>,
}

/// Sends a frame on the TAP. A NIC drops what it cannot send (a full queue
/// or a down link are counted by the TAP); TCP retransmits.
fn send_frame(net: Option<&TapTx>, frame: &[u8]) {
    if let Some(tx) = net {
        if let Err(e) = tx.write(frame) {
            tracing::debug!("sending a frame: {e}");
        }
    }
}
