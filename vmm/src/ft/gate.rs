//! The primary's output rule: every output waits in the gate until the
//! backup has acknowledged the log up to the exit that produced it (and,
//! without a backup that holds them, until the disk ops before it are
//! applied); with the output-commit latency, hop by hop.

use crate::host::console::OutputPort;
use crate::host::console::PortSender;
use crate::host::disk::{DiskOp, DiskPort, DiskSender, OpSeq};
use crate::host::tap::TapTx;
use crate::metrics::VmMetrics;
use crate::output::{send_frame, PendingOutputs};
use logging_channel::{Acked, LatencyHistogram, LatencySummary};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One output to the outside world.
#[derive(Debug, Clone)]
pub enum Item {
    Serial(Vec<u8>),
    Disk(OpSeq, DiskOp),
    Frame(Vec<u8>),
}

impl Item {
    /// Its bytes (a disk write's data; a flush, none).
    fn bytes(&self) -> u64 {
        match self {
            Item::Serial(b) | Item::Frame(b) => b.len() as u64,
            Item::Disk(_, op) => op.bytes(),
        }
    }
}

/// The primary's output rule: outputs wait for the backup's acknowledgement.
pub struct OutputGate {
    inner: Mutex<GateState>,
    port: PortSender,
    disk: Option<DiskSender>,
    net: Option<TapTx>,
    /// Where each output's commit latency is observed (`--metrics`).
    metrics: Option<Arc<VmMetrics>>,
}

struct GateState {
    held: VecDeque<HeldItem>,
    /// The backup's acknowledged watermark; `u64::MAX` while there is no
    /// backup (unprotected: then disk progress alone holds output back).
    acked: u64,
    /// An acknowledgement came from the current backup: it holds the disk
    /// ops not yet applied (a joining one got them with the state, which
    /// precedes every batch it acknowledges). Until then, as without a
    /// backup, disk progress holds output back.
    backup_acked: bool,
    /// The exit of the last serial output handed to the port.
    handed_serial: u64,
    /// The last disk op pushed, and the last one the storage applied.
    last_disk: OpSeq,
    applied: OpSeq,
    /// How long outputs were held, in µs, and where that time went (for
    /// `--stats`): fixed-size histograms, however long the run.
    hops: CommitHops,
}

/// The output-commit latency, whole and hop by hop (µs, per output).
#[derive(Default)]
pub struct CommitHops {
    /// Produced until released: how long the output rule held it.
    pub held: LatencyHistogram,
    /// Produced until the vCPU thread handed the watermark covering it to
    /// the logging channel's network thread.
    pub produced_to_handed: LatencyHistogram,
    /// Handed over until the batch carrying it was written to the socket.
    pub handed_to_sent: LatencyHistogram,
    /// Sent until the backup's ack was read: the network both ways plus the
    /// backup's share (its own `--stats` says how much of it that was).
    pub sent_to_acked: LatencyHistogram,
    /// Ack read until the output was released (handed to its port).
    pub acked_to_released: LatencyHistogram,
}

impl CommitHops {
    /// The named figures, in the order an output goes through them:
    /// (name, (count, p50, p99, max)).
    pub fn summary(&self) -> Vec<(&'static str, LatencySummary)> {
        [
            ("produced->handed", &self.produced_to_handed),
            ("handed->sent", &self.handed_to_sent),
            ("sent->acked", &self.sent_to_acked),
            ("acked->released", &self.acked_to_released),
        ]
        .into_iter()
        .filter_map(|(name, h)| Some((name, h.summary()?)))
        .collect()
    }
}

/// An output waiting in the gate.
struct HeldItem {
    exit: u64,
    produced: Instant,
    item: Item,
    /// The last disk op the guest issued before it.
    after_disk: OpSeq,
}

impl GateState {
    /// Whether `h` may leave now: the backup acknowledged its exit, and,
    /// without a backup to hold them, the disk ops before it are applied.
    fn releasable(&self, h: &HeldItem) -> bool {
        h.exit <= self.acked && (matches!(h.item, Item::Disk(..)) || self.backup_acked || h.after_disk <= self.applied)
    }
}

impl OutputGate {
    /// A primary's gate over its serial `port`, its disk (whose writer
    /// thread it starts, and which reports back each applied op) and its
    /// NIC.
    /// Each output's commit latency is observed in `metrics`.
    pub fn for_primary(
        port: &OutputPort,
        disk: Option<&mut DiskPort>,
        net: Option<TapTx>,
        metrics: Arc<VmMetrics>,
    ) -> Arc<OutputGate> {
        match disk {
            Some(disk) => {
                let gate = OutputGate::observed(port.sender(), Some(disk.releaser()), net, Some(metrics));
                disk.on_applied(OutputGate::applied_callback(&gate));
                gate
            }
            None => OutputGate::observed(port.sender(), None, net, Some(metrics)),
        }
    }

    pub fn new(port: PortSender, disk: Option<DiskSender>, net: Option<TapTx>) -> Arc<Self> {
        OutputGate::observed(port, disk, net, None)
    }

    fn observed(
        port: PortSender,
        disk: Option<DiskSender>,
        net: Option<TapTx>,
        metrics: Option<Arc<VmMetrics>>,
    ) -> Arc<Self> {
        let state = GateState {
            held: VecDeque::new(),
            acked: 0,
            backup_acked: false,
            handed_serial: 0,
            last_disk: 0,
            applied: 0,
            hops: CommitHops::default(),
        };
        Arc::new(OutputGate { inner: Mutex::new(state), port, disk, net, metrics })
    }

    fn hand(&self, s: &mut GateState, exit: u64, item: Item) {
        match item {
            Item::Serial(bytes) => {
                s.handed_serial = exit;
                self.port.send(exit, bytes);
            }
            Item::Disk(seq, op) => {
                if let Some(d) = &self.disk {
                    d.send(seq, op);
                }
            }
            // Written at once: a frame is delivered when it is handed.
            Item::Frame(frame) => send_frame(self.net.as_ref(), &frame),
        }
    }

    /// The guest transmitted `frame` at exit `exit`.
    pub fn frame(&self, exit: u64, frame: Vec<u8>) {
        self.push(exit, Item::Frame(frame));
    }

    /// The guest issued disk op `seq` at exit `exit`.
    pub fn disk(&self, exit: u64, seq: OpSeq, op: DiskOp) {
        self.push(exit, Item::Disk(seq, op));
    }

    /// The exit up to which every serial output and frame has reached the
    /// outside world, given how far the serial port has got: what a backup
    /// going live need not re-emit. (Disk ops count apart, by number.)
    pub fn released(&self, serial_delivered: u64) -> u64 {
        let s = self.state();
        let mut released = s.acked;
        if serial_delivered < s.handed_serial {
            released = released.min(serial_delivered);
        }
        if let Some(h) = s.held.iter().find(|h| !matches!(h.item, Item::Disk(..))) {
            released = released.min(h.exit.saturating_sub(1));
        }
        released
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        // A panic while holding the lock cannot leave the queue half-updated
        // in a way that matters more than losing the process; keep going.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The guest produced `bytes` at exit `exit`.
    pub fn output(&self, exit: u64, bytes: Vec<u8>) {
        self.push(exit, Item::Serial(bytes));
    }

    fn push(&self, exit: u64, item: Item) {
        let mut s = self.state();
        let h = HeldItem { exit, produced: Instant::now(), item, after_disk: s.last_disk };
        if let Item::Disk(seq, _) = &h.item {
            s.last_disk = *seq;
        }
        if s.held.is_empty() && s.releasable(&h) {
            s.hops.held.record(0);
            self.hand(&mut s, h.exit, h.item);
        } else {
            s.held.push_back(h);
        }
    }

    /// The backup acknowledged the log up to `watermark` (u64::MAX: the
    /// backup is gone and nothing waits for acknowledgements any more).
    pub fn acked(&self, watermark: u64) {
        self.release(watermark, None);
    }

    /// The storage applied disk ops up to `seq` (the writer thread's call).
    pub fn disk_applied(&self, seq: OpSeq) {
        let mut s = self.state();
        s.applied = s.applied.max(seq);
        self.hand_releasable(&mut s, None);
    }

    /// Releases what `watermark` covers; with the ack's timings, records
    /// each output's hops.
    fn release(&self, watermark: u64, ack: Option<&Acked<'_>>) {
        let mut s = self.state();
        s.acked = s.acked.max(watermark);
        s.backup_acked = watermark != u64::MAX;
        self.hand_releasable(&mut s, ack);
    }

    /// Hands every output at the front that may leave now.
    fn hand_releasable(&self, s: &mut GateState, ack: Option<&Acked<'_>>) {
        while s.held.front().is_some_and(|h| s.releasable(h)) {
            let Some(HeldItem { exit, produced, item, .. }) = s.held.pop_front() else { break };
            let now = Instant::now();
            let hops = &mut s.hops;
            // Released without a backup (lost, or not there): not measured.
            if s.acked != u64::MAX {
                hops.held.record_between(produced, now);
                if let Some(m) = &self.metrics {
                    m.committed(now.saturating_duration_since(produced));
                }
            }
            if let Some(a) = ack {
                // The first batch that covered it (acks coalesce).
                if let Some(b) = a.batches.iter().find(|b| b.watermark >= exit) {
                    hops.produced_to_handed.record_between(produced, b.handed);
                    hops.handed_to_sent.record_between(b.handed, b.sent);
                    hops.sent_to_acked.record_between(b.sent, a.received);
                }
                hops.acked_to_released.record_between(a.received, now);
            }
            self.hand(s, exit, item);
        }
    }

    /// A new backup protects the VM from exit `exit` on (it joined there,
    /// and gets the outputs not yet out with the state): outputs of later
    /// exits wait for its acknowledgements; those waiting for the disk go
    /// at its first one (or when the disk catches up).
    pub fn protect_after(&self, exit: u64) {
        let mut s = self.state();
        s.acked = exit;
        s.backup_acked = false;
    }

    /// The outputs waiting here, as a backup joining now must keep them
    /// (disk ops apart: the disk port lists every unapplied one).
    pub fn pending(&self) -> PendingOutputs {
        let s = self.state();
        let mut pending = PendingOutputs::default();
        for h in &s.held {
            match &h.item {
                Item::Serial(bytes) => pending.serial.push((h.exit, bytes.clone())),
                Item::Frame(frame) => pending.frames.push((h.exit, frame.clone())),
                Item::Disk(..) => {}
            }
        }
        pending
    }

    /// What the logging channel calls with each acknowledged watermark.
    /// Losing the backup (u64::MAX) is not an ack: the run loop releases
    /// held output once it has won the arbitration.
    pub fn ack_callback(gate: &Arc<OutputGate>) -> Box<dyn Fn(&Acked<'_>) + Send + Sync> {
        let gate = gate.clone();
        Box::new(move |ack| {
            if ack.watermark != u64::MAX {
                gate.release(ack.watermark, Some(ack))
            }
        })
    }

    /// What the disk's writer thread calls after each op it applied.
    pub fn applied_callback(gate: &Arc<OutputGate>) -> crate::host::disk::AppliedCallback {
        let gate = gate.clone();
        Box::new(move |seq| gate.disk_applied(seq))
    }

    /// Outputs still waiting for an acknowledgement.
    pub fn held(&self) -> usize {
        self.state().held.len()
    }

    /// The outputs held now, and their bytes.
    pub fn held_figures(&self) -> (usize, u64) {
        let s = self.state();
        let bytes = s.held.iter().map(|h| h.item.bytes()).sum();
        (s.held.len(), bytes)
    }

    /// Output-commit latency — how long outputs were held for the backup's
    /// acknowledgement — as (outputs, p50 µs, p99 µs, max µs).
    pub fn latency_stats(&self) -> Option<LatencySummary> {
        self.state().hops.held.summary()
    }

    /// Where the output-commit latency went, hop by hop, ending with the
    /// serial port's write to its client.
    pub fn hop_stats(&self) -> Vec<(&'static str, LatencySummary)> {
        let mut hops = self.state().hops.summary();
        hops.extend(self.port.write_delay().map(|w| ("released->written", w)));
        hops
    }

    /// The serial port the gate releases to.
    pub fn port(&self) -> &PortSender {
        &self.port
    }
}
