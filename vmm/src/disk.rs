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
#[derive(Debug, Clone)]
pub enum DiskOp {
    Write { offset: u64, data: Arc<Vec<u8>> },
    Flush,
}

/// Writes not yet applied: (exit, offset, data), in issue order.
type Overlay = Arc<Mutex<VecDeque<(u64, u64, Arc<Vec<u8>>)>>>;

/// Bytes of deferred writes (held for the backup, or released but not yet
/// applied because the storage is slow or away) beyond which the guest's
/// next disk write waits: memory stays bounded, and a primary whose storage
/// lags throttles its guest's writes instead of queueing without end.
pub const MAX_DEFERRED_BYTES: u64 = 64 << 20;
/// Ops for the writer thread, each with its exit; None stops it.
type OpSender = Sender<(u64, Option<DiskOp>)>;

/// The disk's storage as the run loop uses it: synchronous reads and
/// writes, and (for a primary) a writer thread that applies released writes
/// in order. Writes not yet applied stay visible to reads (the overlay), so
/// the guest reads what it wrote even while the write waits for the backup.
pub struct DiskPort {
    backend: Arc<Mutex<Box<dyn BlockBackend>>>,
    overlay: Overlay,
    size: u64,
    writer: Option<(OpSender, JoinHandle<()>)>,
    delivered: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<String>>>,
    /// Bytes in the overlay.
    deferred: Arc<AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DiskPort {
    pub fn new(backend: Box<dyn BlockBackend>) -> Self {
        let size = backend.size();
        DiskPort {
            backend: Arc::new(Mutex::new(backend)),
            overlay: Arc::default(),
            size,
            writer: None,
            delivered: Arc::new(AtomicU64::new(0)),
            failed: Arc::default(),
            deferred: Arc::default(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads from the storage, with writes not yet applied laid over it.
    pub fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut data = lock(&self.backend).read(offset, len)?;
        let end = offset + len as u64;
        for (_, at, bytes) in lock(&self.overlay).iter() {
            let (w_start, w_end) = (*at, *at + bytes.len() as u64);
            let (from, to) = (w_start.max(offset), w_end.min(end));
            if from < to {
                data[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&bytes[(from - w_start) as usize..(to - w_start) as usize]);
            }
        }
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
        let mut backend = lock(&self.backend);
        match op {
            DiskOp::Write { offset, data } => backend.write(*offset, data),
            DiskOp::Flush => backend.flush(),
        }
    }

    /// The guest issued `op` at exit `exit`, to be applied later (when the
    /// output rule releases it): until then reads see it through the overlay.
    pub fn defer(&self, exit: u64, op: &DiskOp) {
        if let DiskOp::Write { offset, data } = op {
            self.wait_for_room();
            self.deferred.fetch_add(data.len() as u64, Ordering::AcqRel);
            lock(&self.overlay).push_back((exit, *offset, data.clone()));
        }
    }

    /// Waits while deferred writes exceed [`MAX_DEFERRED_BYTES`] (until the
    /// writer has applied enough, or has failed, or no writer will ever
    /// drain them: then the bound cannot be kept without losing writes).
    fn wait_for_room(&self) {
        while self.deferred.load(Ordering::Acquire) > MAX_DEFERRED_BYTES
            && self.writer.is_some()
            && self.failure().is_none()
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Bytes of writes deferred and not yet applied.
    pub fn deferred_bytes(&self) -> u64 {
        self.deferred.load(Ordering::Acquire)
    }

    /// A sender that applies released ops in order on a writer thread.
    pub fn releaser(&mut self) -> DiskSender {
        if let Some((tx, _)) = &self.writer {
            return DiskSender(tx.clone());
        }
        let (tx, rx) = mpsc::channel::<(u64, Option<DiskOp>)>();
        let (backend, overlay, delivered, failed, deferred) = (
            self.backend.clone(),
            self.overlay.clone(),
            self.delivered.clone(),
            self.failed.clone(),
            self.deferred.clone(),
        );
        let thread = std::thread::spawn(move || {
            // None: everything before it is applied; stop.
            while let Ok((exit, Some(op))) = rx.recv() {
                let result = {
                    let mut b = lock(&backend);
                    match &op {
                        DiskOp::Write { offset, data } => b.write(*offset, data),
                        DiskOp::Flush => b.flush(),
                    }
                };
                match result {
                    Ok(()) => {
                        let mut o = lock(&overlay);
                        if let (DiskOp::Write { .. }, Some(pos)) = (&op, o.iter().position(|(e, _, _)| *e == exit)) {
                            if let Some((_, _, data)) = o.remove(pos) {
                                deferred.fetch_sub(data.len() as u64, Ordering::AcqRel);
                            }
                        }
                        delivered.fetch_max(exit, Ordering::Release);
                    }
                    Err(e) => {
                        *lock(&failed) = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        self.writer = Some((tx.clone(), thread));
        DiskSender(tx)
    }

    /// The exit up to which released ops have been applied.
    pub fn delivered(&self) -> Arc<AtomicU64> {
        self.delivered.clone()
    }

    /// Why the writer thread stopped, if a write failed.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failed).clone()
    }

    /// Waits until every op released so far has been applied.
    pub fn close(&mut self) {
        if let Some((tx, thread)) = self.writer.take() {
            let _ = tx.send((0, None));
            let _ = thread.join();
        }
    }
}

/// Hands released disk ops to the [`DiskPort`]'s writer thread.
#[derive(Clone)]
pub struct DiskSender(OpSender);

impl DiskSender {
    pub fn send(&self, exit: u64, op: DiskOp) {
        // The writer lives as long as the port; after it stopped on an error
        // the failure is reported through DiskPort::failure.
        let _ = self.0.send((exit, Some(op)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Storage that takes `delay` per write.
    struct Slow {
        delay: Duration,
        writes: Arc<AtomicU64>,
    }

    impl BlockBackend for Slow {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn read(&mut self, _offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            Ok(vec![0; len])
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
            std::thread::sleep(self.delay);
            self.writes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn deferred_writes_stay_bounded_while_the_storage_lags() {
        let writes = Arc::new(AtomicU64::new(0));
        let mut port = DiskPort::new(Box::new(Slow { delay: Duration::from_millis(2), writes: writes.clone() }));
        let sender = port.releaser();
        let chunk = Arc::new(vec![7u8; 4 << 20]);
        let started = Instant::now();
        let mut peak = 0;
        for exit in 1..=40u64 {
            let op = DiskOp::Write { offset: exit * (4 << 20), data: chunk.clone() };
            port.defer(exit, &op);
            peak = peak.max(port.deferred_bytes());
            sender.send(exit, op);
        }
        assert!(peak <= MAX_DEFERRED_BYTES + (4 << 20), "deferred writes peaked at {peak} bytes");
        assert!(writes.load(Ordering::Relaxed) > 0, "the guest waited for the storage");
        port.close();
        assert_eq!(writes.load(Ordering::Relaxed), 40, "nothing lost");
        assert_eq!(port.deferred_bytes(), 0);
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
