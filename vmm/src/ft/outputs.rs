//! The fault-tolerant outputs' regimes: [`Held`] (through the primary's
//! gate) and [`Suppressed`] (a backup's, kept for going live).

use super::gate::OutputGate;
use crate::host::console::{Backlog, OutputPort};
use crate::host::disk::{DiskOp, DiskPort, OpSeq};
use crate::host::tap::TapTx;
use crate::output::{send_frame, Outputs, PendingOutputs};
use replay::Position;
use std::collections::VecDeque;
use std::sync::Arc;

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
    fn pending(&self) -> PendingOutputs {
        // Serial output released but not yet delivered to a console client
        // comes before what the gate still holds.
        let held = self.gate.pending();
        let mut serial = self.gate.port().undelivered();
        serial.extend(held.serial);
        PendingOutputs { disk: Vec::new(), serial, frames: held.frames }
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

    fn take_over(&mut self, pending: PendingOutputs) -> Option<PendingOutputs> {
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
        None
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
