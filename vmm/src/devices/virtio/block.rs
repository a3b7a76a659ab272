//! The virtio-blk disk: one request queue, 512-byte sectors; IN, OUT, FLUSH
//! and GET_ID; no feature but FLUSH.
//!
//! Requests complete synchronously, at the guest's queue notification: the
//! device reads or writes through a [`DiskIo`] the run loop provides, copies
//! read data into guest memory and asks for its interrupt, all at the
//! position of that notification exit. DMA therefore happens at positions,
//! and a replay (whose `DiskIo` answers reads from the log) repeats it
//! exactly. Requests are served in the order of the available ring, so a
//! flush covers every write before it in the ring.
//!
//! One notification moves at most [`MAX_NOTIFY_BYTES`]: the requests beyond
//! stay in the ring (the device has a backlog) and the run loop lets the
//! device go on at the guest's following exits, a budget at each, until the
//! ring is empty. Between those exits the run loop may hold the guest while
//! the storage catches up, which it could not do inside one exit without
//! waiting for writes that cannot be released before the exit is passed.
//!
//! Each write and flush gets the next number of the device's op count
//! ([`DiskIo::write`]): the same on both sides of a pair and carried in the
//! device's state, it is how the storage's progress is counted.

use super::{RestoreError, RingError, VirtioDevice, DEVICE_ID_BLOCK, F_VERSION_1};
use crate::memory::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

pub const SECTOR: u64 = 512;
/// The most data one request may move (the sum of its data buffers' lengths).
/// A larger request, or one with a data buffer outside guest memory, fails
/// with IOERR before any disk I/O: the lengths are the guest's, and the VMM
/// reads, allocates and logs (as one `DiskRead` event) a read's data whole.
pub const MAX_REQUEST: u64 = 16 << 20;
/// The most data one notification (or one exit's share of a backlog) may
/// move; a single request may take it alone up to [`MAX_REQUEST`].
pub const MAX_NOTIFY_BYTES: u64 = 32 << 20;
/// Room for 32 requests of three descriptors each (header, data, status) in flight.
const QUEUE_SIZES: &[u16] = &[256];

const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const FEATURES: u64 = F_VERSION_1 | VIRTIO_BLK_F_FLUSH;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Why a request's disk I/O failed (the request then completes with
/// IOERR; the run loop reports what it must).
#[derive(Debug, thiserror::Error)]
pub enum DiskIoError {
    #[error("the VM has no disk")]
    NoDisk,
    #[error("the storage failed: {0}")]
    Storage(#[from] std::io::Error),
    #[error("the log failed: {0}")]
    Log(String),
    #[error("an earlier request of this notification failed")]
    EarlierFailure,
}

/// The disk I/O a request needs, provided by the run loop. Writes and
/// flushes come with their op number (counted from 1).
pub trait DiskIo {
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, DiskIoError>;
    fn write(&mut self, op: u64, offset: u64, data: Vec<u8>) -> Result<(), DiskIoError>;
    fn flush(&mut self, op: u64) -> Result<(), DiskIoError>;
}

/// The disk device.
pub struct Block {
    capacity: u64,
    /// Requests served, for the digest and for tests.
    requests: u64,
    /// Writes and flushes issued: the last op number.
    ops: u64,
    /// Requests wait in the ring beyond the last notification's budget.
    backlog: bool,
}

/// What a saved disk device holds beyond its transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockState {
    capacity: u64,
    requests: u64,
    ops: u64,
    backlog: bool,
}

impl Block {
    /// A disk of `capacity` bytes (rounded down to whole sectors).
    pub fn new(capacity: u64) -> Self {
        Block { capacity: capacity / SECTOR * SECTOR, requests: 0, ops: 0, backlog: false }
    }

    /// Whether requests wait in the ring for the next exit's budget.
    pub fn has_backlog(&self) -> bool {
        self.backlog
    }
}

impl VirtioDevice for Block {
    type Io<'a> = dyn DiskIo + 'a;
    type State = BlockState;

    fn device_id(&self) -> u32 {
        DEVICE_ID_BLOCK
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space: the capacity in sectors (u64), then nothing.
        let config = (self.capacity / SECTOR).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn reset(&mut self) {
        // The op count goes on: op numbers never repeat within a run.
        self.requests = 0;
        self.backlog = false;
    }

    fn queue_notify(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestMem,
        io: &mut Self::Io<'_>,
    ) -> Result<bool, RingError> {
        let Some(queue) = queues.first_mut() else { return Ok(false) };
        let mut served = false;
        let mut moved = 0u64;
        self.backlog = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<(GuestAddress, u32, bool)> = chain.map(|d| (d.addr(), d.len(), d.is_write_only())).collect();
            // A request over MAX_REQUEST fails without I/O: it costs nothing.
            let data: u64 =
                descs.get(1..descs.len().saturating_sub(1)).unwrap_or(&[]).iter().map(|d| u64::from(d.1)).sum();
            let cost = if data > MAX_REQUEST { 0 } else { data };
            if moved > 0 && moved + cost > MAX_NOTIFY_BYTES {
                // Put it back: the next exit's budget takes it.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                self.backlog = true;
                break;
            }
            moved += cost;
            let written = self.serve(mem, &descs, io);
            queue.add_used(mem, head, written).map_err(|err| RingError::Used { ring: "request", head, err })?;
            self.requests += 1;
            served = true;
        }
        Ok(served)
    }

    fn state(&self) -> BlockState {
        BlockState { capacity: self.capacity, requests: self.requests, ops: self.ops, backlog: self.backlog }
    }

    fn restore(&mut self, state: BlockState) -> Result<(), RestoreError> {
        if state.capacity != self.capacity {
            return Err(RestoreError::Mismatch {
                what: "disk bytes",
                saved: state.capacity.to_string(),
                ours: self.capacity.to_string(),
            });
        }
        self.requests = state.requests;
        self.ops = state.ops;
        self.backlog = state.backlog;
        Ok(())
    }
}

impl Block {
    /// One request: header, data descriptors, status byte. Returns the bytes
    /// written into guest memory.
    fn serve(&mut self, mem: &GuestMem, descs: &[(GuestAddress, u32, bool)], io: &mut dyn DiskIo) -> u32 {
        let (Some(&(header, header_len, _)), Some(&(status_addr, _, true))) = (descs.first(), descs.last()) else {
            return 0;
        };
        let (Ok(kind), Ok(sector)) = (mem.read_obj::<u32>(header), mem.read_obj::<u64>(header.unchecked_add(8))) else {
            return 0;
        };
        if header_len < 16 || descs.len() < 2 {
            let _ = mem.write_obj(S_IOERR, status_addr);
            return 1;
        }
        let data = &descs[1..descs.len() - 1];
        let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
        let offset = sector.saturating_mul(SECTOR);
        let in_memory = data.iter().all(|&(addr, len, _)| mem.check_range(addr, len as usize));
        let in_range =
            total <= MAX_REQUEST && in_memory && offset.checked_add(total).is_some_and(|end| end <= self.capacity);
        let mut written = 0u32;
        let status = match kind {
            T_IN if in_range && data.iter().all(|d| d.2) => match io.read(offset, total as usize) {
                Ok(bytes) if bytes.len() as u64 == total => {
                    let mut at = 0usize;
                    for &(addr, len, _) in data {
                        let chunk = &bytes[at..at + len as usize];
                        if mem.write_slice(chunk, addr).is_err() {
                            break;
                        }
                        at += len as usize;
                        written += len;
                    }
                    S_OK
                }
                Ok(_) => S_IOERR,
                Err(_) => S_IOERR,
            },
            T_OUT if in_range && data.iter().all(|d| !d.2) => {
                let mut bytes = vec![0u8; total as usize];
                let mut at = 0usize;
                let mut ok = true;
                for &(addr, len, _) in data {
                    ok &= mem.read_slice(&mut bytes[at..at + len as usize], addr).is_ok();
                    at += len as usize;
                }
                if !ok {
                    S_IOERR
                } else {
                    self.ops += 1;
                    if io.write(self.ops, offset, bytes).is_ok() {
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
            }
            T_FLUSH => {
                self.ops += 1;
                if io.flush(self.ops).is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => {
                let id = b"ftvmm-disk\0";
                if let Some(&(addr, len, true)) = data.first() {
                    let n = id.len().min(len as usize);
                    if mem.write_slice(&id[..n], addr).is_ok() {
                        written += n as u32;
                    }
                }
                S_OK
            }
            T_IN | T_OUT => S_IOERR,
            _ => S_UNSUPP,
        };
        if mem.write_obj(status, status_addr).is_ok() {
            written += 1;
        }
        written
    }
}
