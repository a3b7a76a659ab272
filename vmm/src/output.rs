//! Where the guest's outputs go: the [`Outputs`] trait every regime
//! implements (serial bytes, disk ops, frames, each at the position that
//! produced it), the [`Direct`] regime of a VM without fault tolerance, and
//! [`PendingOutputs`], what a state carries of the outputs not yet out. The
//! fault-tolerant regimes (the primary's held outputs, the backup's
//! suppressed ones) are [`crate::ft`]'s.

use crate::host::console::OutputPort;
use crate::host::disk::{DiskOp, DiskPort, OpSeq};
use crate::host::tap::TapTx;
use replay::Position;

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
pub fn send_frame(net: Option<&TapTx>, frame: &[u8]) {
    if let Some(tx) = net {
        if let Err(e) = tx.write(frame) {
            tracing::debug!("sending a frame: {e}");
        }
    }
}

/// Where the guest's outputs go — serial bytes, disk writes, transmitted
/// frames —, each with the position at which the guest produced it.
pub trait Outputs {
    fn output(&mut self, position: Position, bytes: Vec<u8>);
    /// An Ethernet frame the guest transmitted.
    fn frame(&mut self, position: Position, frame: Vec<u8>);
    /// Whether disk ops are outputs here, taken by [`Outputs::disk`]; else
    /// the caller applies them at once (no output rule applies).
    fn holds_disk(&self) -> bool {
        false
    }
    /// Disk op number `seq` (a write or a flush), when [`Outputs::holds_disk`].
    fn disk(&mut self, _position: Position, _seq: OpSeq, _op: &DiskOp) {}
    /// The backup goes live: re-issue the disk ops it keeps on `disk` (and
    /// flush), then re-emit what the primary may not have released —
    /// serial output to `port`, frames on `net` —, then pass output through.
    fn go_live(&mut self, _port: OutputPort, _disk: Option<&DiskPort>, _net: Option<TapTx>) -> std::io::Result<()> {
        Ok(())
    }
    /// The primary reported outputs up to exit `released` as released and
    /// disk ops up to `disk_applied` as applied.
    fn prune(&mut self, _released: u64, _disk_applied: OpSeq) {}
    /// A VM that received a state: the outputs it had pending. A backup
    /// keeps them as if it had produced them (returns None); any other
    /// regime hands them back, to be put out (or, on a replay, ignored).
    fn take_over(&mut self, pending: PendingOutputs) -> Option<PendingOutputs> {
        Some(pending)
    }
    /// The outputs this regime holds that have not left the VMM: what a
    /// state taken now must carry (the disk's are the disk port's).
    fn pending(&self) -> PendingOutputs {
        PendingOutputs::default()
    }
    /// Lays the disk writes kept for going live over `data`, read from the
    /// storage at `offset`: what the guest reads once they are re-issued.
    fn lay_kept_writes(&self, _offset: u64, _data: &mut [u8]) {}
    /// Peak bytes of disk writes kept for going live (a backup's).
    fn kept_disk_peak(&self) -> u64 {
        0
    }
    /// After [`Outputs::go_live`]: the serial port the outputs now go to.
    fn into_port(self: Box<Self>) -> Option<OutputPort> {
        None
    }
    /// Waits until everything released so far has been written out.
    fn close(self: Box<Self>);
}

/// Output released at once (a replay has no `net`: it sends no frame).
pub struct Direct {
    pub port: OutputPort,
    pub net: Option<TapTx>,
}

impl Outputs for Direct {
    fn output(&mut self, position: Position, bytes: Vec<u8>) {
        self.port.sender().send(position.exit, bytes);
    }
    fn frame(&mut self, _position: Position, frame: Vec<u8>) {
        send_frame(self.net.as_ref(), &frame);
    }
    fn close(self: Box<Self>) {
        self.port.close();
    }
}
