//! The outputs' regimes: [`Direct`] (released at once), [`Held`] (through
//! the primary's gate) and [`Suppressed`] (a backup's, kept for going live).

use super::gate::OutputGate;
use super::{send_frame, PendingOutputs};
use crate::host::console::{Backlog, OutputPort};
use crate::host::disk::{DiskOp, DiskPort, OpSeq};
use crate::host::tap::TapTx;
use replay::Position;
use std::collections::VecDeque;
use std::sync::Arc;

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
    /// A backup that received the VM's state: the primary's outputs not yet
    /// out of it, which this backup now keeps as if it had produced them.
    fn take_over(&mut self, _pending: PendingOutputs) {}
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

/// The primary's serial output, through the gate.
pub struct Held {
    pub gate: Arc<OutputGate>,
    pub port: OutputPort,
}

impl Outputs for Held {
    fn output(&mut self, position: Position, bytes: Vec<u8>) {
        self.gate.output(position.exit, bytes);
    }
    fn holds_disk(&self) -> bool {
        true
    }
    fn disk(&mut self, position: Position, seq: OpSeq, op: &DiskOp) {
        self.gate.disk(position.exit, seq, op.clone());
    }
    fn frame(&mut self, position: Position, frame: Vec<u8>) {
        self.gate.frame(position.exit, frame);
    }
    fn close(self: Box<Self>) {
        let Held { gate, port } = *self;
        drop(gate);
        port.close();
    }
}

/// Frames a backup keeps while it replays (1,024 full-size frames are 1.5 MiB).
pub const MAX_SUPPRESSED_FRAMES: usize = 1024;

/// The backup's outputs while it replays.
#[derive(Default)]
pub struct Suppressed {
    /// Serial output, at most what the primary's console keeps for a
    /// missing client ([`MAX_BACKLOG`]), the oldest dropped first.
    pub(super) serial: Backlog,
    /// Disk writes and flushes, until the primary reports them applied. The
    /// primary holds its guest while its unapplied writes exceed
    /// [`crate::host::disk::MAX_DEFERRED_BYTES`], and reports its progress with
    /// every batch, so these stay within that bound (and one notification's
    /// worth): the console plays no part in it.
    pub(super) disk: VecDeque<(OpSeq, DiskOp)>,
    pub(super) disk_bytes: u64,
    pub(super) disk_peak: u64,
    /// Frames, the newest [`MAX_SUPPRESSED_FRAMES`] (a NIC would have
    /// dropped older ones: TCP retransmits what is lost at the switch).
    pub(super) frames: VecDeque<(u64, Vec<u8>)>,
    pub(super) live: Option<OutputPort>,
    pub(super) net: Option<TapTx>,
    /// Outputs the primary reported released (not to be re-emitted).
    pub(super) released: u64,
    /// Disk ops the primary reported applied (not to be re-issued).
    pub(super) disk_applied: OpSeq,
}

impl Suppressed {
    fn keep_disk(&mut self, seq: OpSeq, op: DiskOp) {
        if seq <= self.disk_applied {
            return;
        }
        self.disk_bytes += op.bytes();
        self.disk_peak = self.disk_peak.max(self.disk_bytes);
        self.disk.push_back((seq, op));
    }

    fn keep_frame(&mut self, exit: u64, frame: Vec<u8>) {
        if self.frames.len() == MAX_SUPPRESSED_FRAMES {
            self.frames.pop_front();
        }
        self.frames.push_back((exit, frame));
    }
}

impl Outputs for Suppressed {
    fn prune(&mut self, released: u64, disk_applied: OpSeq) {
        self.released = self.released.max(released);
        self.serial.forget_up_to(self.released);
        while self.frames.front().is_some_and(|(exit, _)| *exit <= self.released) {
            self.frames.pop_front();
        }
        self.disk_applied = self.disk_applied.max(disk_applied);
        while self.disk.front().is_some_and(|(seq, _)| *seq <= self.disk_applied) {
            if let Some((_, op)) = self.disk.pop_front() {
                self.disk_bytes -= op.bytes();
            }
        }
    }

    fn take_over(&mut self, pending: PendingOutputs) {
        // Ours up to the state's exit are superseded (a resync) or none (a
        // join): the primary's are what the world has not seen yet.
        self.serial = Backlog::default();
        self.frames.clear();
        self.disk.clear();
        self.disk_bytes = 0;
        for (exit, bytes) in pending.serial {
            self.serial.push(exit, &bytes);
        }
        for (exit, frame) in pending.frames {
            self.keep_frame(exit, frame);
        }
        for (seq, op) in pending.disk {
            self.keep_disk(seq, op);
        }
    }

    fn lay_kept_writes(&self, offset: u64, data: &mut [u8]) {
        crate::host::disk::overlay(self.disk.iter().map(|(_, op)| op), offset, data);
    }

    fn kept_disk_peak(&self) -> u64 {
        self.disk_peak
    }

    fn frame(&mut self, position: Position, frame: Vec<u8>) {
        if self.live.is_some() {
            return send_frame(self.net.as_ref(), &frame);
        }
        self.keep_frame(position.exit, frame);
    }

    fn output(&mut self, position: Position, bytes: Vec<u8>) {
        match &self.live {
            Some(port) => port.sender().send(position.exit, bytes),
            None => {
                self.serial.push(position.exit, &bytes);
            }
        }
    }
    fn holds_disk(&self) -> bool {
        self.live.is_none()
    }
    fn disk(&mut self, _position: Position, seq: OpSeq, op: &DiskOp) {
        self.keep_disk(seq, op.clone());
    }
    fn go_live(&mut self, port: OutputPort, disk: Option<&DiskPort>, net: Option<TapTx>) -> std::io::Result<()> {
        // First the disk: output the world sees may depend on these writes
        // (a reply sent once its write was flushed). Writes are idempotent:
        // re-issuing one the primary completed is harmless.
        let kept: Vec<(OpSeq, DiskOp)> = self.disk.drain(..).collect();
        self.disk_bytes = 0;
        if let Some(d) = disk {
            d.apply_taken_over(&kept)?;
        }
        let sender = port.sender();
        self.live = Some(port);
        for (exit, bytes) in self.serial.drain() {
            sender.send(exit, bytes);
        }
        // The guest's TCP and the client's absorb the duplicates.
        for (_, frame) in self.frames.drain(..) {
            send_frame(net.as_ref(), &frame);
        }
        self.net = net;
        Ok(())
    }
    fn into_port(self: Box<Self>) -> Option<OutputPort> {
        self.live
    }
    fn close(self: Box<Self>) {
        if let Some(port) = self.live {
            port.close();
        }
    }
}
