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

use crate::host::console::{Backlog, Endpoint, OutputPort, PortSender};
use crate::host::disk::{DiskOp, DiskPort, DiskSender, OpSeq};
use crate::host::tap::{NetSpec, TapError, TapRx, TapTx};
use crate::inputs::FrameWaker;
use logging_channel::{Acked, ChannelConfig, LatencyHistogram, LatencySummary, PrimaryLink, PrimaryListener};
use replay::{Header, Position};
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
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
        /// Every disk op numbered up to this has been applied.
        disk_applied: Arc<AtomicU64>,
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

/// Accepts joining backups on a background thread, one when asked.
pub struct Joiner {
    incoming: Receiver<PrimaryLink>,
    want: Sender<()>,
    pub addr: std::net::SocketAddr,
}

impl Joiner {
    /// Starts accepting on `listener`; a backup is accepted each time
    /// [`Joiner::want_one`] asks (the first one at once if `now`).
    pub fn start(listener: PrimaryListener, header: Header, config: ChannelConfig, now: bool) -> Joiner {
        let (links, incoming) = mpsc::channel();
        let (want, wanted) = mpsc::channel::<()>();
        let addr = listener.local_addr();
        std::thread::spawn(move || {
            while wanted.recv().is_ok() {
                loop {
                    match listener.accept_joining(&header, &config) {
                        Ok(link) => {
                            if links.send(link).is_err() {
                                return;
                            }
                            break;
                        }
                        // A stranger or a mismatched backup: keep waiting.
                        Err(e) => eprintln!("ftvmm: primary: refused a joining backup: {e}"),
                    }
                }
            }
        });
        let joiner = Joiner { incoming, want, addr };
        if now {
            joiner.want_one();
        }
        joiner
    }

    /// Accept the next joining backup.
    pub fn want_one(&self) {
        let _ = self.want.send(());
    }

    /// The backup that joined, if one did since the last call.
    pub fn joined(&self) -> Option<PrimaryLink> {
        self.incoming.try_recv().ok()
    }
}

/// The host side of a VM's NIC: its TAP's receive queue and sender, the
/// waker of whichever run takes its frames, and the VM's MAC.
pub struct HostNic {
    pub rx: Arc<TapRx>,
    pub tx: TapTx,
    pub waker: FrameWaker,
    pub mac: [u8; 6],
}

/// Frames a TAP's receive queue holds before it drops (as a NIC does).
pub const RX_QUEUE_FRAMES: usize = 256;

impl HostNic {
    /// Opens the existing TAP `spec` names.
    pub fn open(spec: &NetSpec) -> Result<HostNic, TapError> {
        let waker = FrameWaker::default();
        let (rx, tx) = crate::host::tap::Tap::open(&spec.ifname)?.split(RX_QUEUE_FRAMES, waker.callback())?;
        Ok(HostNic { rx: Arc::new(rx), tx, waker, mac: spec.mac })
    }

    /// Going live: tells the LAN's bridges where the VM's MAC now is, with
    /// the RARP frames QEMU's announce-self sends, three times (now, then
    /// 50 and 150 ms later, in case one is lost).
    pub fn announce(&self) {
        let (tx, frame) = (self.tx.clone(), crate::host::tap::rarp_announce(self.mac));
        let _ = tx.write(&frame);
        std::thread::spawn(move || {
            for delay in [50, 100] {
                std::thread::sleep(std::time::Duration::from_millis(delay));
                let _ = tx.write(&frame);
            }
        });
    }
}

/// How this VMM calls itself in the arbitration record.
pub fn owner_name(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{role} pid {} on {}", std::process::id(), host.trim())
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

/// Sends a frame on the TAP. A NIC drops what it cannot send (a full queue
/// or a down link are counted by the TAP); TCP retransmits.
fn send_frame(net: Option<&TapTx>, frame: &[u8]) {
    if let Some(tx) = net {
        if let Err(e) = tx.write(frame) {
            tracing::debug!("sending a frame: {e}");
        }
    }
}

/// One output to the outside world.
#[derive(Debug, Clone)]
pub enum Item {
    Serial(Vec<u8>),
    Disk(OpSeq, DiskOp),
    Frame(Vec<u8>),
}

/// The primary's output rule: outputs wait for the backup's acknowledgement.
pub struct OutputGate {
    inner: Mutex<GateState>,
    port: PortSender,
    disk: Option<DiskSender>,
    net: Option<TapTx>,
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
    /// NIC; with the disk's applied-op counter.
    pub fn for_primary(
        port: &OutputPort,
        disk: Option<&mut DiskPort>,
        net: Option<TapTx>,
    ) -> (Arc<OutputGate>, Arc<AtomicU64>) {
        match disk {
            Some(disk) => {
                let gate = OutputGate::new(port.sender(), Some(disk.releaser()), net);
                disk.on_applied(OutputGate::applied_callback(&gate));
                (gate, disk.applied())
            }
            None => (OutputGate::new(port.sender(), None, net), Arc::default()),
        }
    }

    pub fn new(port: PortSender, disk: Option<DiskSender>, net: Option<TapTx>) -> Arc<Self> {
        let state = GateState {
            held: VecDeque::new(),
            acked: 0,
            backup_acked: false,
            handed_serial: 0,
            last_disk: 0,
            applied: 0,
            hops: CommitHops::default(),
        };
        Arc::new(OutputGate { inner: Mutex::new(state), port, disk, net })
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
    serial: Backlog,
    /// Disk writes and flushes, until the primary reports them applied. The
    /// primary holds its guest while its unapplied writes exceed
    /// [`crate::host::disk::MAX_DEFERRED_BYTES`], and reports its progress with
    /// every batch, so these stay within that bound (and one notification's
    /// worth): the console plays no part in it.
    disk: VecDeque<(OpSeq, DiskOp)>,
    disk_bytes: u64,
    disk_peak: u64,
    /// Frames, the newest [`MAX_SUPPRESSED_FRAMES`] (a NIC would have
    /// dropped older ones: TCP retransmits what is lost at the switch).
    frames: VecDeque<(u64, Vec<u8>)>,
    live: Option<OutputPort>,
    net: Option<TapTx>,
    /// Outputs the primary reported released (not to be re-emitted).
    released: u64,
    /// Disk ops the primary reported applied (not to be re-issued).
    disk_applied: OpSeq,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::console::MAX_BACKLOG;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_gate_releases_output_in_order_once_acked() {
        let out = Shared::default();
        let port = OutputPort::to_writer(Box::new(out.clone()));
        let gate = OutputGate::new(port.sender(), None, None);
        gate.output(3, b"a".to_vec());
        gate.output(5, b"b".to_vec());
        gate.output(9, b"c".to_vec());
        gate.acked(2);
        assert_eq!(gate.held(), 3, "nothing acked yet");
        gate.acked(5);
        assert_eq!(gate.held(), 1);
        // Once acked beyond, new output still waits behind held output.
        gate.output(6, b"d".to_vec());
        assert_eq!(gate.held(), 2);
        gate.acked(u64::MAX);
        assert_eq!(gate.held(), 0);
        gate.output(10, b"e".to_vec());
        port.close();
        assert_eq!(&*out.0.lock().unwrap(), b"abcde");
        let (n, _, _, _) = gate.latency_stats().unwrap();
        assert_eq!(n, 3, "held outputs released by an ack are measured; the backup's loss is not an ack");
    }

    #[test]
    fn suppressed_output_goes_live_with_what_the_primary_did_not_release() {
        let out = Shared::default();
        let mut s: Box<dyn Outputs> = Box::new(Suppressed::default());
        for exit in 1..=4 {
            s.output(pos(exit), vec![b'0' + exit as u8]);
        }
        s.prune(2, 0);
        s.prune(1, 0);
        s.go_live(OutputPort::to_writer(Box::new(out.clone())), None, None).unwrap();
        s.output(pos(5), b"5".to_vec());
        s.close();
        assert_eq!(&*out.0.lock().unwrap(), b"345");
    }

    fn pos(exit: u64) -> Position {
        Position { exit, rip: 0 }
    }

    #[test]
    fn suppressed_output_re_emits_only_what_was_not_released() {
        let mut s = Suppressed::default();
        for exit in 1..=5 {
            s.output(pos(exit), vec![exit as u8]);
        }
        s.prune(2, 0);
        assert_eq!(s.serial.exits().collect::<Vec<_>>(), vec![3, 4, 5]);
        s.prune(1, 0);
        assert_eq!(s.serial.exits().count(), 3, "a stale report prunes nothing more");
    }

    #[test]
    fn a_backup_keeps_no_more_serial_output_than_the_console_backlog() {
        let mut s = Suppressed::default();
        // A primary whose console has no client reports nothing released:
        // the backup keeps the newest MAX_BACKLOG bytes, as the console does.
        let chunk = vec![b'x'; 1000];
        for exit in 1..=(3 * MAX_BACKLOG as u64 / 1000) {
            s.output(pos(exit), chunk.clone());
        }
        assert!(s.serial.len() <= MAX_BACKLOG);
        assert!(s.serial.len() > MAX_BACKLOG - 1000);
        assert_eq!(s.serial.exits().count(), s.serial.len() / 1000);
        let newest = s.serial.exits().last();
        assert_eq!(newest, Some(3 * MAX_BACKLOG as u64 / 1000), "the newest output stays");
        // Bytes of one exit share one mark.
        let mut t = Suppressed::default();
        for b in b"tick 1\n" {
            t.output(pos(7), vec![*b]);
        }
        assert_eq!(t.serial.exits().count(), 1);
        let out = Shared::default();
        t.go_live(OutputPort::to_writer(Box::new(out.clone())), None, None).unwrap();
        Box::new(t).close();
        assert_eq!(&*out.0.lock().unwrap(), b"tick 1\n");
    }

    fn w(offset: u64, byte: u8) -> DiskOp {
        DiskOp::Write { offset, data: Arc::new(vec![byte; 512]) }
    }

    #[test]
    fn without_a_backup_output_waits_for_the_disk_ops_before_it() {
        let out = Shared::default();
        let port = OutputPort::to_writer(Box::new(out.clone()));
        let gate = OutputGate::new(port.sender(), None, None);
        gate.acked(u64::MAX);
        gate.disk(1, 1, w(0, 1));
        gate.disk(1, 2, DiskOp::Flush);
        gate.output(2, b"OK".to_vec());
        assert_eq!(gate.held(), 1, "the reply waits for its write and flush");
        gate.disk_applied(1);
        assert_eq!(gate.held(), 1, "the flush is not applied yet");
        gate.disk_applied(2);
        assert_eq!(gate.held(), 0);
        // Output with no disk op before it that is unapplied goes at once.
        gate.output(3, b"!".to_vec());
        assert_eq!(gate.held(), 0);
        port.close();
        assert_eq!(&*out.0.lock().unwrap(), b"OK!");
    }

    #[test]
    fn with_a_backup_output_waits_for_the_ack_alone_and_a_joined_backup_s_first_ack_releases_disk_waits() {
        let port = OutputPort::to_writer(Box::new(Shared::default()));
        let gate = OutputGate::new(port.sender(), None, None);
        gate.acked(u64::MAX);
        gate.disk(4, 1, w(0, 1));
        gate.output(5, b"a".to_vec());
        assert_eq!(gate.held(), 1);
        // A backup joins at exit 6. Until its first ack it may not have the
        // state (and the unapplied op in it): the output still waits.
        gate.protect_after(6);
        assert_eq!(gate.held(), 1);
        gate.disk(7, 2, w(0, 2));
        gate.output(8, b"b".to_vec());
        assert_eq!(gate.held(), 3);
        assert_eq!(gate.released(u64::MAX), 4);
        gate.acked(6);
        assert_eq!(gate.held(), 2, "acknowledged: the backup holds the op, the output may go");
        assert_eq!(gate.released(u64::MAX), 6);
        gate.acked(8);
        assert_eq!(gate.held(), 0, "acknowledged: out, whatever the storage did");
        port.close();
    }

    #[test]
    fn the_backup_keeps_disk_ops_by_number_and_re_issues_them_before_other_output() {
        let mut s = Suppressed::default();
        // Three ops of one exit: the primary applied the first only.
        s.disk(pos(5), 1, &w(0, 1));
        s.disk(pos(5), 2, &w(512, 2));
        s.disk(pos(5), 3, &DiskOp::Flush);
        s.output(pos(6), b"done".to_vec());
        s.prune(5, 1);
        assert_eq!(s.disk.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.serial.exits().count(), 1, "released by exit: exit 6 was not");
        assert_eq!(s.kept_disk_peak(), 1024);
        let mut data = vec![0u8; 1024];
        s.lay_kept_writes(0, &mut data);
        assert_eq!(&data[..512], &[0; 512][..], "op 1 is on the storage, not kept");
        assert_eq!(&data[512..], &[2; 512][..]);
        s.prune(0, 3);
        assert!(s.disk.is_empty());
        assert_eq!(s.disk_bytes, 0);
    }

    #[test]
    fn a_state_s_pending_outputs_replace_the_backup_s_own() {
        let mut s = Suppressed::default();
        s.output(pos(3), b"mine".to_vec());
        s.disk(pos(3), 1, &w(0, 9));
        s.prune(0, 0);
        let pending = PendingOutputs {
            disk: vec![(4, w(0, 1)), (5, DiskOp::Flush)],
            serial: vec![(2, b"theirs".to_vec())],
            frames: vec![(2, vec![1, 2, 3])],
        };
        s.take_over(pending);
        assert_eq!(s.disk.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(s.serial.to_vec(), vec![(2, b"theirs".to_vec())]);
        assert_eq!(s.frames.len(), 1);
        let out = Shared::default();
        s.go_live(OutputPort::to_writer(Box::new(out.clone())), None, None).unwrap();
        assert!(s.disk.is_empty());
        Box::new(s).close();
        assert_eq!(&*out.0.lock().unwrap(), b"theirs");
    }

    /// Storage that records, at each write and flush, whether any console
    /// output had been written by then.
    struct OrderWitness {
        console: Shared,
        seen_output: Arc<Mutex<Vec<bool>>>,
    }

    impl crate::host::disk::BlockBackend for OrderWitness {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read(&mut self, _offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            Ok(vec![0; len])
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
            let seen = !self.console.0.lock().unwrap().is_empty();
            self.seen_output.lock().unwrap().push(seen);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.write(0, &[])
        }
    }

    #[test]
    fn going_live_re_issues_and_flushes_the_disk_before_any_other_output() {
        let console = Shared::default();
        let seen_output = Arc::new(Mutex::new(Vec::new()));
        let storage = OrderWitness { console: console.clone(), seen_output: seen_output.clone() };
        let disk = DiskPort::new(Box::new(storage));
        let mut s = Suppressed::default();
        s.disk(pos(1), 1, &w(0, 1));
        s.output(pos(2), b"written\n".to_vec());
        s.disk(pos(3), 2, &w(512, 2));
        s.output(pos(4), b"again\n".to_vec());
        s.go_live(OutputPort::to_writer(Box::new(console.clone())), Some(&disk), None).unwrap();
        Box::new(s).close();
        assert_eq!(&*console.0.lock().unwrap(), b"written\nagain\n");
        // Two writes and the closing flush, all before the first byte out.
        assert_eq!(*seen_output.lock().unwrap(), vec![false, false, false]);
        assert_eq!(disk.applied().load(std::sync::atomic::Ordering::Acquire), 2);
    }
}
