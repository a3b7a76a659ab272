//! Regression tests of the virtio-blk device's request bounds (found by the
//! `virtio_queues` fuzz target): the lengths of a request's data buffers
//! are the guest's, and a read's data is read from the disk, allocated and
//! logged whole before it is copied into guest memory. So a request whose
//! data buffers lie outside guest memory, or that moves more than
//! `block::MAX_REQUEST` bytes, fails with IOERR before any disk I/O —
//! before the fix one 64 KiB guest made the VMM read 1.8 GB in one request.
//! No KVM needed: the device is driven through its MMIO transport.

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::{Block, DiskIo, DiskIoError, MAX_REQUEST, SECTOR};
use vmm::devices::virtio::mmio::{reg, MmioTransport};
use vmm::memory::GuestMem;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADER: u64 = 0x4000;
const STATUS: u64 = 0x4100;
const DATA: u64 = 0x10000;
/// Enough guest memory for one request of MAX_REQUEST bytes.
const MEM_SIZE: u64 = DATA + MAX_REQUEST + 0x10000;
/// A disk far larger than any request.
const CAPACITY: u64 = 1 << 40;

/// A disk that records what it is asked and answers reads with a pattern.
#[derive(Default)]
struct Disk {
    reads: Vec<(u64, usize)>,
    writes: Vec<(u64, usize)>,
    /// The op numbers of writes and flushes, in order.
    ops: Vec<u64>,
}

impl DiskIo for Disk {
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, DiskIoError> {
        self.reads.push((offset, len));
        Ok((0..len).map(|i| (i % 251) as u8).collect())
    }
    fn write(&mut self, op: u64, offset: u64, data: Vec<u8>) -> Result<(), DiskIoError> {
        self.writes.push((offset, data.len()));
        self.ops.push(op);
        Ok(())
    }
    fn flush(&mut self, op: u64) -> Result<(), DiskIoError> {
        self.ops.push(op);
        Ok(())
    }
}

struct Vm {
    mem: GuestMem,
    disk: MmioTransport<Block>,
    requests: u16,
}

impl Vm {
    fn new() -> Self {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut disk = MmioTransport::new(Block::new(CAPACITY));
        let w = |t: &mut MmioTransport<Block>, off: u64, v: u32| {
            t.write(off, &v.to_le_bytes());
        };
        w(&mut disk, reg::QUEUE_SEL, 0);
        w(&mut disk, reg::QUEUE_NUM, 16);
        w(&mut disk, reg::QUEUE_DESC_LOW, DESC as u32);
        w(&mut disk, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        w(&mut disk, reg::QUEUE_DEVICE_LOW, USED as u32);
        w(&mut disk, reg::QUEUE_READY, 1);
        w(&mut disk, reg::STATUS, 1 | 2 | 8 | 4);
        Vm { mem, disk, requests: 0 }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes a write of `len` bytes at `sector` available without a notify,
    /// with its own header and status (request `n` of a batch).
    fn queue_write(&mut self, n: u16, sector: u64, len: u32) {
        let (header, status) = (HEADER + 0x20 * u64::from(n), STATUS + u64::from(n));
        self.mem.write_obj(T_OUT, GuestAddress(header)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(header + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let d = 3 * n;
        self.desc(d, header, 16, F_NEXT, d + 1);
        self.desc(d + 1, DATA, len, F_NEXT, d + 2);
        self.desc(d + 2, status, 1, F_WRITE, 0);
        let idx = self.requests;
        self.mem.write_obj(d, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % 16))).unwrap();
        self.mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2)).unwrap();
        self.requests += 1;
    }

    fn used(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// One request of type `kind` at `sector` with data buffers `bufs`
    /// (address, length; device-writable for a read): its status byte.
    fn request(&mut self, disk: &mut Disk, kind: u32, sector: u64, bufs: &[(u64, u32)]) -> u8 {
        self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        self.desc(0, HEADER, 16, F_NEXT, 1);
        let data_flags = F_NEXT | if kind == T_IN { F_WRITE } else { 0 };
        for (i, &(addr, len)) in bufs.iter().enumerate() {
            self.desc(1 + i as u16, addr, len, data_flags, 2 + i as u16);
        }
        self.desc(1 + bufs.len() as u16, STATUS, 1, F_WRITE, 0);
        let idx = self.requests;
        self.mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % 16))).unwrap();
        self.mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2)).unwrap();
        self.requests += 1;
        assert!(self.disk.notify(0, &self.mem, disk), "the request was completed");
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, self.requests);
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
}

#[test]
fn a_read_longer_than_guest_memory_fails_without_disk_io() {
    let mut vm = Vm::new();
    let mut disk = Disk::default();
    // One buffer claiming almost 4 GiB (virtio-queue ends a chain of more
    // than 4 GiB in all; the fuzzer's claimed 1.8 GB), and one at the very
    // top of guest memory that runs past it.
    assert_eq!(vm.request(&mut disk, T_IN, 0, &[(DATA, u32::MAX - 64)]), S_IOERR);
    assert_eq!(vm.request(&mut disk, T_IN, 0, &[(DATA, 1_821_676_692)]), S_IOERR);
    assert_eq!(vm.request(&mut disk, T_IN, 0, &[(MEM_SIZE - 512, 4096)]), S_IOERR);
    assert_eq!(vm.request(&mut disk, T_OUT, 0, &[(MEM_SIZE - 512, 4096)]), S_IOERR);
    assert_eq!(vm.request(&mut disk, T_IN, 0, &[(u64::MAX - 100, 512)]), S_IOERR);
    assert!(disk.reads.is_empty() && disk.writes.is_empty(), "{:?} {:?}", disk.reads, disk.writes);
    // The device still works.
    assert_eq!(vm.request(&mut disk, T_IN, 8, &[(DATA, 4096)]), S_OK);
    assert_eq!(disk.reads, vec![(8 * SECTOR, 4096)]);
    let mut got = vec![0u8; 4096];
    vm.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
}

#[test]
fn a_request_moves_at_most_max_request_bytes() {
    let mut vm = Vm::new();
    let mut disk = Disk::default();
    let max = MAX_REQUEST as u32;
    // Exactly the limit, in one buffer and in two: served.
    assert_eq!(vm.request(&mut disk, T_IN, 0, &[(DATA, max)]), S_OK);
    assert_eq!(vm.request(&mut disk, T_OUT, 0, &[(DATA, max / 2), (DATA + 0x1000, max / 2)]), S_OK);
    assert_eq!(disk.reads, vec![(0, MAX_REQUEST as usize)]);
    assert_eq!(disk.writes, vec![(0, MAX_REQUEST as usize)]);
    // A sector more, alone or as buffers that alias the same guest memory
    // (each inside it): refused.
    assert_eq!(vm.request(&mut disk, T_IN, 0, &[(DATA, max + 512)]), S_IOERR);
    let aliased = [(DATA, max / 2), (DATA, max / 2), (DATA, 512)];
    assert_eq!(vm.request(&mut disk, T_IN, 0, &aliased), S_IOERR);
    assert_eq!(vm.request(&mut disk, T_OUT, 0, &aliased), S_IOERR);
    assert_eq!(disk.reads.len(), 1);
    assert_eq!(disk.writes.len(), 1);
}

#[test]
fn one_notify_moves_at_most_its_budget_and_the_rest_follows_in_order() {
    use vmm::devices::virtio::block::MAX_NOTIFY_BYTES;
    let mut vm = Vm::new();
    let mut disk = Disk::default();
    // Five writes of 16 MiB in one notify: 80 MiB, over the 32 MiB budget.
    let len = MAX_REQUEST as u32;
    for n in 0..5 {
        vm.queue_write(n, u64::from(n) * (MAX_REQUEST / SECTOR), len);
    }
    assert!(vm.disk.notify(0, &vm.mem, &mut disk));
    let per_share = (MAX_NOTIFY_BYTES / MAX_REQUEST) as u16;
    assert_eq!(vm.used(), per_share, "one notification's share");
    assert!(vm.disk.device().has_backlog());
    // The run loop's next exits serve the rest, a share at each.
    while vm.disk.device().has_backlog() {
        assert!(vm.disk.notify(0, &vm.mem, &mut disk));
    }
    assert_eq!(vm.used(), 5);
    assert_eq!(disk.ops, vec![1, 2, 3, 4, 5], "ops are numbered one by one, in ring order");
    let offsets: Vec<u64> = disk.writes.iter().map(|w| w.0).collect();
    assert_eq!(offsets, (0..5).map(|n| n * MAX_REQUEST).collect::<Vec<_>>());
    for n in 0..5u64 {
        let status: u8 = vm.mem.read_obj(GuestAddress(STATUS + n)).unwrap();
        assert_eq!(status, S_OK);
    }
    // The op count goes on across a device reset: numbers never repeat.
    vm.request(&mut disk, T_OUT, 0, &[(DATA, 512)]);
    assert_eq!(disk.ops.last(), Some(&6));
}
