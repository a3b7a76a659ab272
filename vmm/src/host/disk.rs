//! Block storage behind the virtio disk: a raw image file (`--disk PATH`)
//! or a disk shared through `ftdisk` (`--disk ftdisk:ADDR`, with go-live
//! arbitration), and the [`DiskPort`] through which the run loop reads it and applies the
//! guest's writes (at once, or when the output rule releases them).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Where the disk's blocks live.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>>;
    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
    /// The go-live arbitration record's generation, or None when this
    /// storage cannot arbitrate (a local file).
    fn generation(&mut self) -> std::io::Result<Option<u64>> {
        Ok(None)
    }
    /// Test-and-set on the arbitration record: take ownership if its
    /// generation is still `expected`. None when this storage cannot
    /// arbitrate. On a win, later writes carry the new generation.
    fn claim(&mut self, _expected: u64, _owner: &str) -> std::io::Result<Option<Claim>> {
        Ok(None)
    }
}

/// The outcome of a go-live test-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Won { generation: u64 },
    Lost { generation: u64, owner: String },
}

/// A disk served by `ftdisk` (`--disk ftdisk:ADDR`): shared by primary and
/// backup, with go-live arbitration and write fencing.
pub struct FtdiskBackend {
    client: shared_disk::DiskClient,
    /// The owner generation our writes carry (0 until we own the disk).
    generation: u64,
}

impl FtdiskBackend {
    pub fn connect(addr: &str, tls: Option<credentials::Tls>) -> std::io::Result<Self> {
        let client = shared_disk::DiskClient::connect_secured(addr, std::time::Duration::from_secs(10), tls)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(FtdiskBackend { client, generation: 0 })
    }
}

fn io_error(e: shared_disk::ClientError) -> std::io::Error {
    let kind = match &e {
        shared_disk::ClientError::Disk(shared_disk::DiskError::Fenced { .. }) => std::io::ErrorKind::PermissionDenied,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e.to_string())
}

impl BlockBackend for FtdiskBackend {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.client.read(offset, len).map_err(io_error)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.client.write(offset, data, self.generation).map_err(io_error)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.client.flush(self.generation).map_err(io_error)
    }

    fn generation(&mut self) -> std::io::Result<Option<u64>> {
        self.client.owner().map(|(generation, _)| Some(generation)).map_err(io_error)
    }

    fn claim(&mut self, expected: u64, owner: &str) -> std::io::Result<Option<Claim>> {
        match self.client.test_and_set(expected, owner).map_err(io_error)? {
            shared_disk::TasOutcome::Won { generation } => {
                self.generation = generation;
                Ok(Some(Claim::Won { generation }))
            }
            shared_disk::TasOutcome::Lost { generation, owner } => Ok(Some(Claim::Lost { generation, owner })),
        }
    }
}

/// A raw image file (e.g. made by `qemu-img create -f raw`).
pub struct FileBackend {
    file: File,
    size: u64,
}

impl FileBackend {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        if size < 512 {
            return Err(std::io::Error::other(format!(
                "a disk image must hold at least one 512-byte sector ({size} bytes)"
            )));
        }
        Ok(FileBackend { file, size })
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// A disk write or flush the guest issued, as an output: under fault
/// tolerance it waits for the backup's acknowledgement like serial output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    Write { offset: u64, data: Arc<Vec<u8>> },
    Flush,
}

impl DiskOp {
    /// Bytes it carries (what it costs to keep).
    pub fn bytes(&self) -> u64 {
        match self {
            DiskOp::Write { data, .. } => data.len() as u64,
            DiskOp::Flush => 0,
        }
    }
}

/// Every disk op carries a sequence number: the guest's disk ops are
/// counted from 1 by the disk device (so both sides of a pair number them
/// alike), and "applied up to op N" is how the storage's progress is known
/// — never by exit, since one queue notification may carry many requests.
pub type OpSeq = u64;

/// Lays the writes of `ops` (in their order) over `data`, read at `offset`.
pub fn overlay<'a>(ops: impl IntoIterator<Item = &'a DiskOp>, offset: u64, data: &mut [u8]) {
    let end = offset + data.len() as u64;
    for op in ops {
        let DiskOp::Write { offset: at, data: bytes } = op else { continue };
        let (w_start, w_end) = (*at, *at + bytes.len() as u64);
        let (from, to) = (w_start.max(offset), w_end.min(end));
        if from < to {
            data[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bytes[(from - w_start) as usize..(to - w_start) as usize]);
        }
    }
}

/// Ops issued and not yet applied, in op order, and the bytes they carry.
#[derive(Default)]
struct Pending {
    ops: VecDeque<(OpSeq, DiskOp)>,
    bytes: u64,
    /// The most bytes there ever were (`--stats`).
    peak: u64,
}

/// Bytes of deferred writes (held for the backup, or released but not yet
/// applied because the storage is slow or away) beyond which the run loop
/// holds the guest at its next exit boundary until the storage catches up:
/// memory stays bounded, and a primary whose storage lags throttles its
/// guest instead of queueing without end. (One queue notification may add
/// up to [`crate::devices::virtio::block::MAX_NOTIFY_BYTES`] beyond it.)
pub const MAX_DEFERRED_BYTES: u64 = 64 << 20;
/// Ops for the writer thread; None stops it.
type OpSender = Sender<Option<(OpSeq, DiskOp)>>;
/// What the writer calls after each op it applied, with the op's number.
pub type AppliedCallback = Box<dyn Fn(OpSeq) + Send>;

/// The disk's storage as the run loop uses it: synchronous reads and
/// writes, and (for a primary) a writer thread that applies released ops
/// in op order.
///
/// Ops not yet applied stay visible to reads (the pending ops laid over the
/// storage), so the guest reads what it wrote even while the write waits
/// for the backup. The order that keeps reads exact: an op is recorded as
/// pending before it can reach the writer ([`DiskPort::defer`] comes before
/// the release), the writer applies it and only then forgets it, and a read
/// holds the pending list while it reads the storage, so it sees every op
/// either on the storage or in the list (or, for the one being forgotten,
/// in both: the same bytes).
pub struct DiskPort {
    backend: Arc<Mutex<Box<dyn BlockBackend>>>,
    pending: Arc<Mutex<Pending>>,
    size: u64,
    writer: Option<(OpSender, JoinHandle<()>)>,
    /// Every op numbered up to this has been applied.
    applied: Arc<AtomicU64>,
    on_applied: Arc<Mutex<Option<AppliedCallback>>>,
    failed: Arc<Mutex<Option<String>>>,
    /// Testing aid (`--testing-disk-stall-after-op`): the writer applies ops
    /// up to this one and no more, as if its host died right after.
    stall_after: Option<OpSeq>,
    counters: Arc<DiskCounters>,
}

/// What the storage has done, counted (for the metrics).
#[derive(Debug, Default)]
pub struct DiskCounters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub flushes: AtomicU64,
}

impl DiskCounters {
    fn applied(&self, op: &DiskOp) {
        match op {
            DiskOp::Write { data, .. } => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.written_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            DiskOp::Flush => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DiskPort {
    pub fn new(backend: Box<dyn BlockBackend>) -> Self {
        let size = backend.size();
        DiskPort {
            backend: Arc::new(Mutex::new(backend)),
            pending: Arc::default(),
            size,
            writer: None,
            applied: Arc::new(AtomicU64::new(0)),
            on_applied: Arc::default(),
            failed: Arc::default(),
            stall_after: None,
            counters: Arc::default(),
        }
    }

    /// The storage's counters, to be read from another thread.
    pub fn counters(&self) -> Arc<DiskCounters> {
        self.counters.clone()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Testing aid: the writer applies ops up to `op` and then none.
    pub fn stall_after(&mut self, op: OpSeq) {
        self.stall_after = Some(op);
    }

    /// Reads from the storage, with ops not yet applied laid over it.
    pub fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        // Held across the storage read: see the type's doc.
        let pending = lock(&self.pending);
        let mut data = lock(&self.backend).read(offset, len)?;
        overlay(pending.ops.iter().map(|(_, op)| op), offset, &mut data);
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// The arbitration record's generation (None: no arbitration here).
    pub fn generation(&self) -> std::io::Result<Option<u64>> {
        lock(&self.backend).generation()
    }

    /// Go-live test-and-set (None: no arbitration here).
    pub fn claim(&self, expected: u64, owner: &str) -> std::io::Result<Option<Claim>> {
        lock(&self.backend).claim(expected, owner)
    }

    /// Applies `op` now.
    pub fn apply(&self, op: &DiskOp) -> std::io::Result<()> {
        apply(&mut **lock(&self.backend), op, &self.counters)
    }

    /// Applies `ops` now, in order, and then flushes the storage: ops this
    /// VMM takes over from another (a backup going live, a restored
    /// snapshot). Every op up to the last of them counts as applied.
    pub fn apply_taken_over(&self, ops: &[(OpSeq, DiskOp)]) -> std::io::Result<()> {
        let mut backend = lock(&self.backend);
        for (_, op) in ops {
            apply(&mut **backend, op, &self.counters)?;
        }
        backend.flush()?;
        if let Some((seq, _)) = ops.last() {
            self.applied.fetch_max(*seq, Ordering::AcqRel);
        }
        Ok(())
    }

    /// The guest issued `op`, number `seq`, to be applied later (when the
    /// output rule releases it to [`DiskPort::releaser`]'s writer): until
    /// then reads see it. Must come before the release.
    pub fn defer(&self, seq: OpSeq, op: &DiskOp) {
        let mut pending = lock(&self.pending);
        pending.bytes += op.bytes();
        pending.peak = pending.peak.max(pending.bytes);
        pending.ops.push_back((seq, op.clone()));
    }

    /// Bytes of writes deferred and not yet applied.
    pub fn deferred_bytes(&self) -> u64 {
        lock(&self.pending).bytes
    }

    /// The most bytes of writes that were ever deferred at once.
    pub fn deferred_peak(&self) -> u64 {
        lock(&self.pending).peak
    }

    /// The ops deferred and not yet applied, in order: what a backup that
    /// joins now (or a snapshot) must hold to go live without losing any.
    pub fn pending_ops(&self) -> Vec<(OpSeq, DiskOp)> {
        self.pending_view().list()
    }

    /// A handle on the pending ops for another thread (a state transfer's).
    pub fn pending_view(&self) -> PendingOps {
        PendingOps(self.pending.clone())
    }

    /// A sender that applies released ops in order on a writer thread.
    pub fn releaser(&mut self) -> DiskSender {
        if let Some((tx, _)) = &self.writer {
            return DiskSender(tx.clone());
        }
        let (tx, rx) = mpsc::channel::<Option<(OpSeq, DiskOp)>>();
        let writer = Writer {
            backend: self.backend.clone(),
            pending: self.pending.clone(),
            applied: self.applied.clone(),
            on_applied: self.on_applied.clone(),
            failed: self.failed.clone(),
            stall_after: self.stall_after,
            counters: self.counters.clone(),
        };
        let thread = std::thread::spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::DiskWriter);
            writer.run(rx)
        });
        self.writer = Some((tx.clone(), thread));
        DiskSender(tx)
    }

    /// Calls `f` with each op number the writer has applied (on the writer's
    /// thread: it must be quick).
    pub fn on_applied(&self, f: AppliedCallback) {
        *lock(&self.on_applied) = Some(f);
    }

    /// The last op number up to which every op has been applied.
    pub fn applied_through(&self) -> OpSeq {
        self.applied.load(Ordering::Acquire)
    }

    /// Why the writer thread stopped, if a write failed.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failed).clone()
    }

    /// Waits until every op released so far has been applied.
    pub fn close(&mut self) {
        if let Some((tx, thread)) = self.writer.take() {
            let _ = tx.send(None);
            let _ = thread.join();
        }
    }
}

/// The ops a [`DiskPort`] has deferred and not yet applied.
#[derive(Clone)]
pub struct PendingOps(Arc<Mutex<Pending>>);

impl PendingOps {
    /// Bytes of the writes pending now.
    pub fn bytes(&self) -> u64 {
        lock(&self.0).bytes
    }

    /// The ops pending now, in order.
    pub fn list(&self) -> Vec<(OpSeq, DiskOp)> {
        lock(&self.0).ops.iter().cloned().collect()
    }
}

fn apply(backend: &mut dyn BlockBackend, op: &DiskOp, counters: &DiskCounters) -> std::io::Result<()> {
    match op {
        DiskOp::Write { offset, data } => backend.write(*offset, data)?,
        DiskOp::Flush => backend.flush()?,
    }
    counters.applied(op);
    Ok(())
}

/// The writer thread's share of a [`DiskPort`].
struct Writer {
    backend: Arc<Mutex<Box<dyn BlockBackend>>>,
    pending: Arc<Mutex<Pending>>,
    applied: Arc<AtomicU64>,
    on_applied: Arc<Mutex<Option<AppliedCallback>>>,
    failed: Arc<Mutex<Option<String>>>,
    stall_after: Option<OpSeq>,
    counters: Arc<DiskCounters>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Option<(OpSeq, DiskOp)>>) {
        // None: everything before it is applied; stop.
        while let Ok(Some((seq, op))) = rx.recv() {
            if self.stall_after.is_some_and(|last| seq > last) {
                continue;
            }
            // The storage lock alone while applying: reads wait for this op,
            // the guest's next ops are deferred meanwhile.
            let result = apply(&mut **lock(&self.backend), &op, &self.counters);
            if let Err(e) = result {
                *lock(&self.failed) = Some(e.to_string());
                return;
            }
            {
                let mut pending = lock(&self.pending);
                // Ops arrive in order, so it is the first one; by position
                // all the same, should a release ever skip one.
                if let Some(at) = pending.ops.iter().position(|(s, _)| *s == seq) {
                    if let Some((_, op)) = pending.ops.remove(at) {
                        pending.bytes -= op.bytes();
                    }
                }
            }
            self.applied.fetch_max(seq, Ordering::AcqRel);
            if let Some(f) = &*lock(&self.on_applied) {
                f(seq);
            }
        }
    }
}

/// Hands released disk ops to the [`DiskPort`]'s writer thread.
#[derive(Clone)]
pub struct DiskSender(OpSender);

impl DiskSender {
    pub fn send(&self, seq: OpSeq, op: DiskOp) {
        // The writer lives as long as the port; after it stopped on an error
        // the failure is reported through DiskPort::failure.
        let _ = self.0.send(Some((seq, op)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Storage in memory that takes `delay` per read and per write.
    #[derive(Clone)]
    struct Slow {
        delay: Duration,
        data: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
        flushes: Arc<AtomicU64>,
    }

    impl Slow {
        fn new(delay: Duration) -> Slow {
            Slow {
                delay,
                data: Arc::new(Mutex::new(vec![0; 1 << 20])),
                writes: Arc::default(),
                flushes: Arc::default(),
            }
        }
    }

    impl BlockBackend for Slow {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            std::thread::sleep(self.delay);
            Ok(self.data.lock().unwrap()[offset as usize..offset as usize + len].to_vec())
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            std::thread::sleep(self.delay);
            self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            self.writes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    fn write(offset: u64, byte: u8, len: usize) -> DiskOp {
        DiskOp::Write { offset, data: Arc::new(vec![byte; len]) }
    }

    #[test]
    fn a_writer_faster_than_the_recorder_leaves_nothing_behind() {
        // Storage with no delay: the writer applies each op as soon as it
        // is sent. Recorded before it is sent, each op is forgotten once
        // applied, and its bytes no longer count.
        let storage = Slow::new(Duration::ZERO);
        let mut port = DiskPort::new(Box::new(storage.clone()));
        let sender = port.releaser();
        for seq in 1..=2000u64 {
            let op = if seq % 10 == 0 { DiskOp::Flush } else { write(seq % 64 * 512, seq as u8, 512) };
            port.defer(seq, &op);
            sender.send(seq, op);
        }
        port.close();
        assert_eq!(port.deferred_bytes(), 0);
        assert!(port.pending_ops().is_empty(), "an applied op stayed in the overlay");
        assert_eq!(port.applied_through(), 2000);
        // A later write to the same sectors is what a read sees.
        assert_eq!(port.read(0, 512).unwrap(), vec![1984u64 as u8; 512]);
    }

    #[test]
    fn a_read_racing_an_apply_sees_the_newest_data() {
        // Slow reads and writes widen the window in which a read could see
        // the storage before an apply and the overlay after it.
        let storage = Slow::new(Duration::from_micros(300));
        let mut port = DiskPort::new(Box::new(storage));
        let sender = port.releaser();
        let port = Arc::new(port);
        let (done_tx, done_rx) = mpsc::channel();
        let reader = {
            let port = port.clone();
            std::thread::spawn(move || {
                let mut stale = 0;
                let mut newest_seen = 0u8;
                while done_rx.try_recv().is_err() {
                    let data = port.read(0, 512).unwrap();
                    // Writes only grow the byte: a smaller one than seen is stale.
                    if data[0] < newest_seen || data.iter().any(|b| *b != data[0]) {
                        stale += 1;
                    }
                    newest_seen = newest_seen.max(data[0]);
                }
                stale
            })
        };
        for seq in 1..=200u64 {
            let op = write(0, seq as u8, 512);
            port.defer(seq, &op);
            sender.send(seq, op);
            std::thread::sleep(Duration::from_micros(150));
        }
        while port.deferred_bytes() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        done_tx.send(()).unwrap();
        assert_eq!(reader.join().unwrap(), 0, "a read returned data older than a write it followed");
        assert_eq!(port.read(0, 512).unwrap(), vec![200u8; 512]);
    }

    #[test]
    fn applied_counts_ops_not_exits() {
        // Three ops of one queue notification: the writer applies the
        // first and stalls (its host is about to die). Applied says op 1,
        // and the other two are still pending, for a backup to re-issue.
        let storage = Slow::new(Duration::ZERO);
        let mut port = DiskPort::new(Box::new(storage.clone()));
        port.stall_after(1);
        let sender = port.releaser();
        let reported = Arc::new(AtomicU64::new(0));
        let r = reported.clone();
        port.on_applied(Box::new(move |seq| r.store(seq, Ordering::Release)));
        let ops = [write(0, 1, 512), write(512, 2, 512), DiskOp::Flush];
        for (seq, op) in (1..).zip(ops) {
            port.defer(seq, &op);
            sender.send(seq, op);
        }
        port.close();
        assert_eq!(port.applied_through(), 1);
        assert_eq!(reported.load(Ordering::Acquire), 1);
        let pending: Vec<u64> = port.pending_ops().iter().map(|(s, _)| *s).collect();
        assert_eq!(pending, vec![2, 3]);
        assert_eq!(storage.writes.load(Ordering::Relaxed), 1);
        // Taking them over applies them and flushes.
        port.apply_taken_over(&port.pending_ops()).unwrap();
        assert_eq!(storage.writes.load(Ordering::Relaxed), 2);
        assert_eq!(storage.flushes.load(Ordering::Relaxed), 2, "the taken-over flush, then one more");
        assert_eq!(port.applied_through(), 3);
    }

    #[test]
    fn overlay_lays_writes_in_order() {
        let mut data = vec![0u8; 8];
        let ops = [write(2, 1, 4), write(4, 2, 8), DiskOp::Flush, write(0, 3, 1)];
        overlay(ops.iter(), 0, &mut data);
        assert_eq!(data, [3, 0, 1, 1, 2, 2, 2, 2]);
        let mut tail = vec![9u8; 4];
        overlay(ops.iter(), 10, &mut tail);
        assert_eq!(tail, [2, 2, 9, 9]);
    }
}
