//! Fault tolerance glue: the VMM's role in a pair ([`Role`]), where the log
//! goes and comes from (a file, or the logging channel), and the outputs'
//! three regimes:
//! - [`Direct`]: released at once (a run alone, a recording, a replay, and a
//!   backup after it went live);
//! - [`Held`]: the primary's output rule — each output waits until the
//!   backup has acknowledged the log up to the position that produced it;
//! - [`Suppressed`]: the backup's, while it replays — kept until the primary
//!   reports it released, and re-emitted when the backup goes live.

use crate::console::{Backlog, Endpoint, OutputPort, PortSender};
use crate::disk::{DiskOp, DiskPort, DiskSender};
use crate::run::Joiner;
use crate::tap::{HostNic, TapTx};
use logging_channel::{Acked, BackupLink, LatencyHistogram, LatencySummary, PrimaryLink, PrimaryListener};
use replay::{LogError, LogReader, LogWriter, Position, Record, RecordSink, RecordSource};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::sync::atomic::AtomicU64;
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
        /// The exit up to which released disk writes have been applied.
        disk_delivered: Arc<AtomicU64>,
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

/// Where recorded records go.
pub enum LogSink {
    File(LogWriter<BufWriter<File>>),
    Primary(PrimaryLink),
}

impl RecordSink for LogSink {
    fn append(&mut self, record: &Record) -> std::io::Result<()> {
        match self {
            LogSink::File(w) => w.append(record),
            LogSink::Primary(l) => l.append(record),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LogSink::File(w) => w.flush(),
            LogSink::Primary(l) => l.flush(),
        }
    }
    fn passed(&mut self, exit: u64) -> std::io::Result<()> {
        match self {
            LogSink::File(w) => w.passed(exit),
            LogSink::Primary(l) => l.passed(exit),
        }
    }
}

/// Where replayed records come from.
pub enum LogSource {
    File(LogReader<BufReader<File>>),
    Backup(BackupLink),
}

impl RecordSource for LogSource {
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        match self {
            LogSource::File(r) => r.next_record(),
            LogSource::Backup(l) => l.next_record(),
        }
    }
    fn passed(&mut self, exit: u64) -> Result<bool, LogError> {
        match self {
            LogSource::File(r) => r.passed(exit),
            LogSource::Backup(l) => l.passed(exit),
        }
    }
}

/// Where the guest's outputs go — serial bytes, disk writes, transmitted
/// frames —, each with the position at which the guest produced it.
pub trait Outputs {
    fn output(&mut self, position: Position, bytes: Vec<u8>);
    /// An Ethernet frame the guest transmitted.
    fn frame(&mut self, position: Position, frame: Vec<u8>);
    /// A disk write or flush. Returns false when the caller should apply it
    /// at once (no output rule applies); true when it was taken over.
    fn disk(&mut self, _position: Position, _op: &DiskOp) -> bool {
        false
    }
    /// The backup goes live: re-emit what the primary may not have released
    /// (everything produced after `released`) — serial output to `port`,
    /// disk writes re-issued on `disk`, frames sent on `net` —, then pass
    /// output through.
    fn go_live(
        &mut self,
        _released: u64,
        _port: OutputPort,
        _disk: Option<&DiskPort>,
        _net: Option<TapTx>,
    ) -> std::io::Result<()> {
        Ok(())
    }
    /// The primary reported outputs up to `released` as released.
    fn prune(&mut self, _released: u64) {}
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
    Disk(DiskOp),
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
    held: VecDeque<(u64, Instant, Item)>,
    acked: u64,
    /// The exit of the last item handed to each port: (serial, disk).
    handed: (u64, u64),
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

impl OutputGate {
    pub fn new(port: PortSender, disk: Option<DiskSender>, net: Option<TapTx>) -> Arc<Self> {
        let state = GateState { held: VecDeque::new(), acked: 0, handed: (0, 0), hops: CommitHops::default() };
        Arc::new(OutputGate { inner: Mutex::new(state), port, disk, net })
    }

    fn hand(&self, s: &mut GateState, exit: u64, item: Item) {
        match item {
            Item::Serial(bytes) => {
                s.handed.0 = exit;
                self.port.send(exit, bytes);
            }
            Item::Disk(op) => {
                s.handed.1 = exit;
                if let Some(d) = &self.disk {
                    d.send(exit, op);
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

    /// The guest issued a disk write or flush at exit `exit`.
    pub fn disk(&self, exit: u64, op: DiskOp) {
        self.push(exit, Item::Disk(op));
    }

    /// The exit up to which every output has reached the outside world, given
    /// how far each port has got: what a backup going live need not re-emit.
    pub fn released(&self, serial_delivered: u64, disk_delivered: u64) -> u64 {
        let s = self.state();
        let mut released = s.acked;
        if serial_delivered < s.handed.0 {
            released = released.min(serial_delivered);
        }
        if disk_delivered < s.handed.1 {
            released = released.min(disk_delivered);
        }
        if let Some((exit, _, _)) = s.held.front() {
            released = released.min(exit.saturating_sub(1));
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
        if s.held.is_empty() && s.acked >= exit {
            s.hops.held.record(0);
            self.hand(&mut s, exit, item);
        } else {
            s.held.push_back((exit, Instant::now(), item));
        }
    }

    /// The backup acknowledged the log up to `watermark` (u64::MAX: the
    /// backup is gone and nothing is held any more).
    pub fn acked(&self, watermark: u64) {
        self.release(watermark, None);
    }

    /// Releases what `watermark` covers; with the ack's timings, records
    /// each output's hops.
    fn release(&self, watermark: u64, ack: Option<&Acked<'_>>) {
        let mut s = self.state();
        s.acked = s.acked.max(watermark);
        while s.held.front().is_some_and(|(exit, _, _)| *exit <= watermark) {
            if let Some((exit, produced, item)) = s.held.pop_front() {
                let now = Instant::now();
                let hops = &mut s.hops;
                // Losing the backup (u64::MAX) is not an ack: not measured.
                if watermark != u64::MAX {
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
                self.hand(&mut s, exit, item);
            }
        }
    }

    /// A new backup protects the VM from exit `exit` on (it joined there):
    /// outputs of later exits wait for its acknowledgements.
    pub fn protect_after(&self, exit: u64) {
        let mut s = self.state();
        s.acked = exit;
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
    fn disk(&mut self, position: Position, op: &DiskOp) -> bool {
        self.gate.disk(position.exit, op.clone());
        true
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
    /// Disk writes and flushes, until the primary reports them applied (the
    /// primary applies them as soon as they are acknowledged, so this holds
    /// what is in flight between the two).
    disk: VecDeque<(u64, DiskOp)>,
    /// Frames, the newest [`MAX_SUPPRESSED_FRAMES`] (a NIC would have
    /// dropped older ones: TCP retransmits what is lost at the switch).
    frames: VecDeque<(u64, Vec<u8>)>,
    live: Option<OutputPort>,
    net: Option<TapTx>,
    /// Outputs the primary reported released (not to be re-emitted).
    released: u64,
}

impl Outputs for Suppressed {
    fn prune(&mut self, released: u64) {
        self.released = self.released.max(released);
        self.serial.forget_up_to(self.released);
        while self.disk.front().is_some_and(|(exit, _)| *exit <= self.released) {
            self.disk.pop_front();
        }
        while self.frames.front().is_some_and(|(exit, _)| *exit <= self.released) {
            self.frames.pop_front();
        }
    }

    fn frame(&mut self, position: Position, frame: Vec<u8>) {
        if self.live.is_some() {
            return send_frame(self.net.as_ref(), &frame);
        }
        if self.frames.len() == MAX_SUPPRESSED_FRAMES {
            self.frames.pop_front();
        }
        self.frames.push_back((position.exit, frame));
    }

    fn output(&mut self, position: Position, bytes: Vec<u8>) {
        match &self.live {
            Some(port) => port.sender().send(position.exit, bytes),
            None => {
                self.serial.push(position.exit, &bytes);
            }
        }
    }
    fn disk(&mut self, position: Position, op: &DiskOp) -> bool {
        if self.live.is_some() {
            return false;
        }
        self.disk.push_back((position.exit, op.clone()));
        true
    }
    fn go_live(
        &mut self,
        released: u64,
        port: OutputPort,
        disk: Option<&DiskPort>,
        net: Option<TapTx>,
    ) -> std::io::Result<()> {
        self.prune(released);
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
        // Writes are idempotent: re-issuing one the primary completed is harmless.
        for (_, op) in self.disk.drain(..) {
            if let Some(d) = disk {
                d.apply(&op)?;
            }
        }
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
    use crate::console::MAX_BACKLOG;

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
        s.prune(2);
        s.go_live(1, OutputPort::to_writer(Box::new(out.clone())), None, None).unwrap();
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
        s.prune(2);
        assert_eq!(s.serial.exits().collect::<Vec<_>>(), vec![3, 4, 5]);
        s.prune(1);
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
        t.go_live(0, OutputPort::to_writer(Box::new(out.clone())), None, None).unwrap();
        Box::new(t).close();
        assert_eq!(&*out.0.lock().unwrap(), b"tick 1\n");
    }
}
