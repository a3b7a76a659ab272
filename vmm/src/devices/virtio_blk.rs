//! A virtio-blk disk on the virtio-mmio transport (virtio 1.x, version 2
//! registers), with one request queue handled by the virtio-queue crate.
//!
//! Requests complete synchronously, at the guest's queue notification: the
//! device reads or writes through a [`DiskIo`] the run loop provides, copies
//! read data into guest memory and raises its interrupt, all at the position
//! of that notification exit. DMA therefore happens at positions, and a
//! replay (whose `DiskIo` answers reads from the log) repeats it exactly.
//! Supported: IN, OUT, FLUSH and GET_ID; 512-byte sectors; no other features.

use serde::Serialize;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Where the device's registers live.
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_SIZE: u64 = 0x1000;
/// PIC line of the disk's interrupt.
pub const IRQ: u8 = 5;
pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 64;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const STATUS_FAILED: u32 = 0x80;

/// The disk I/O a request needs, provided by the run loop.
pub trait DiskIo {
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, String>;
    fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), String>;
    fn flush(&mut self) -> Result<(), String>;
}

/// The device (its guest-visible state is part of the state digest).
pub struct VirtioBlk {
    capacity: u64,
    queue: Queue,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    queue_sel: u32,
    /// Requests served, for the digest and for tests.
    requests: u64,
}

/// What the state digest covers.
#[derive(Serialize)]
pub struct VirtioBlkState {
    capacity: u64,
    features: (u32, u32, u64),
    status: u32,
    interrupt_status: u32,
    queue: (u16, bool, u64, u64, u64, u16, u16),
    requests: u64,
}

/// What an MMIO write asks of the run loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Notify {
    None,
    /// The guest notified the queue: process it.
    Queue,
}

impl VirtioBlk {
    /// A disk of `capacity` bytes (rounded down to whole sectors).
    pub fn new(capacity: u64) -> Self {
        VirtioBlk {
            capacity: capacity / SECTOR * SECTOR,
            queue: Queue::new(QUEUE_SIZE).unwrap_or_else(|_| unreachable!("64 is a valid queue size")),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            queue_sel: 0,
            requests: 0,
        }
    }

    pub fn contains(addr: u64) -> bool {
        (MMIO_BASE..MMIO_BASE + MMIO_SIZE).contains(&addr)
    }

    pub fn state(&self) -> VirtioBlkState {
        let q = &self.queue;
        VirtioBlkState {
            capacity: self.capacity,
            features: (self.device_features_sel, self.driver_features_sel, self.driver_features),
            status: self.status,
            interrupt_status: self.interrupt_status,
            queue: (q.size(), q.ready(), q.desc_table(), q.avail_ring(), q.used_ring(), q.next_avail(), q.next_used()),
            requests: self.requests,
        }
    }

    /// An MMIO read of `data.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        let offset = addr - MMIO_BASE;
        if offset >= 0x100 {
            // Config space: capacity in sectors (u64), then nothing.
            let mut config = [0u8; 8];
            config.copy_from_slice(&(self.capacity / SECTOR).to_le_bytes());
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get((offset - 0x100) as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        let value: u32 = match offset {
            0x000 => 0x7472_6976, // "virt"
            0x004 => 2,
            0x008 => 2,           // block device
            0x00c => 0x4d56_5446, // "FTVM"
            0x010 => (FEATURES >> (32 * u64::from(self.device_features_sel.min(1)))) as u32,
            0x034 if self.queue_sel == 0 => u32::from(QUEUE_SIZE),
            0x044 if self.queue_sel == 0 => u32::from(self.queue.ready()),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => 0,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// An MMIO write at `addr`.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Notify {
        let offset = addr - MMIO_BASE;
        let mut bytes = [0u8; 4];
        for (i, b) in data.iter().take(4).enumerate() {
            bytes[i] = *b;
        }
        let value = u32::from_le_bytes(bytes);
        let q0 = self.queue_sel == 0;
        match offset {
            0x014 => self.device_features_sel = value,
            0x020 => {
                let shift = 32 * u64::from(self.driver_features_sel.min(1));
                self.driver_features &= !(0xffff_ffffu64 << shift);
                self.driver_features |= (u64::from(value) << shift) & FEATURES;
            }
            0x024 => self.driver_features_sel = value,
            0x030 => self.queue_sel = value,
            0x038 if q0 => self.queue.set_size(value.min(u32::from(QUEUE_SIZE)) as u16),
            0x044 if q0 => self.queue.set_ready(value == 1),
            0x050 if value == 0 => return Notify::Queue,
            0x064 => self.interrupt_status &= !value,
            0x070 => {
                if value == 0 {
                    self.reset();
                } else {
                    self.status = value;
                }
            }
            0x080 if q0 => self.queue.set_desc_table_address(Some(value), None),
            0x084 if q0 => self.queue.set_desc_table_address(None, Some(value)),
            0x090 if q0 => self.queue.set_avail_ring_address(Some(value), None),
            0x094 if q0 => self.queue.set_avail_ring_address(None, Some(value)),
            0x0a0 if q0 => self.queue.set_used_ring_address(Some(value), None),
            0x0a4 if q0 => self.queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
        Notify::None
    }

    fn reset(&mut self) {
        *self = VirtioBlk::new(self.capacity);
    }

    /// Serves every request the guest made available. Returns whether the
    /// interrupt should be raised.
    pub fn process(&mut self, mem: &GuestMemoryMmap, io: &mut dyn DiskIo) -> bool {
        if !self.queue.ready() || self.status & STATUS_FAILED != 0 || !self.queue.is_valid(mem) {
            return false;
        }
        let mut served = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<(GuestAddress, u32, bool)> = chain.map(|d| (d.addr(), d.len(), d.is_write_only())).collect();
            let written = self.serve(mem, &descs, io);
            if self.queue.add_used(mem, head, written).is_err() {
                self.status |= STATUS_FAILED;
                return served;
            }
            self.requests += 1;
            served = true;
        }
        if served {
            self.interrupt_status |= 1;
        }
        served
    }

    /// One request: header, data descriptors, status byte. Returns the bytes
    /// written into guest memory.
    fn serve(&mut self, mem: &GuestMemoryMmap, descs: &[(GuestAddress, u32, bool)], io: &mut dyn DiskIo) -> u32 {
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
        let in_range = offset.checked_add(total).is_some_and(|end| end <= self.capacity);
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
                if ok && io.write(offset, bytes).is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_FLUSH => {
                if io.flush().is_ok() {
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
