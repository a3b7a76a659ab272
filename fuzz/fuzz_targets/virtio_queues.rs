//! The virtio devices against an adversarial guest (vmm/src/devices/virtio):
//! a 64 KiB guest memory whose descriptor tables, rings and buffers the
//! input writes, and the virtio-mmio transport of the disk (`Block`, with a
//! `DiskIo` stub), of the NIC (`Net`, with a `NetIo` stub and received
//! frames delivered as the run loop does) or of the console (`Console`)
//! driven through its registers:
//! status, feature negotiation, queue setup, notify, reset, save and
//! restore (also of a state decoded from the input).
//!
//! Never a panic and never a hang; and the devices keep their promises: the
//! disk reads and writes only inside the disk, at most
//! `block::MAX_REQUEST` bytes at a time (before that bound a 64 KiB guest
//! made it read 1.8 GB: seeds/virtio_queues/regress-read-of-1.8GB), and
//! reports no more bytes used than a request's writable buffers hold; the
//! NIC transmits only frames of a legal size, and uses a posted receive
//! buffer for every frame of a legal size while one is posted; the console
//! transmits at most `console::MAX_NOTIFY_BYTES` plus one chain per notify,
//! and counts every byte it transmits.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::{self, Block, DiskIo, DiskIoError};
use vmm::devices::virtio::console::{self, Console};
use vmm::devices::virtio::mmio::{reg, MmioEvent, MmioState, MmioTransport, MmioWindow};
use vmm::devices::virtio::net::{Net, NetIo, MAX_FRAME, MIN_FRAME};
use vmm::devices::virtio::VirtioDevice;
use vmm::memory::GuestMem;

const MEM_SIZE: u64 = 64 << 10;
/// The disk behind the `DiskIo` stub: 1 TiB, of which the first 64 KiB are
/// kept (the rest reads as zeros and ignores writes).
const CAPACITY: u64 = 1 << 40;
const KEPT: usize = 64 << 10;
/// The most one request may move: what a guest can make the VMM allocate,
/// read from the disk and log at once.
const MAX_REQUEST: usize = block::MAX_REQUEST as usize;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
/// Where the standard setup puts queue q's rings: (descriptors, avail, used).
const RINGS: [(u64, u64, u64); 2] = [(0x1000, 0x2000, 0x3000), (0x4000, 0x5000, 0x6000)];

/// Every register of the window, for register writes by index.
const REGS: &[u64] = &[
    reg::MAGIC,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID,
    reg::DEVICE_FEATURES,
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_STATUS,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_DRIVER_LOW,
    reg::QUEUE_DRIVER_HIGH,
    reg::QUEUE_DEVICE_LOW,
    reg::QUEUE_DEVICE_HIGH,
    reg::CONFIG_GENERATION,
    reg::CONFIG,
];

#[derive(Arbitrary, Debug)]
struct Input {
    /// Which device: 1 the NIC, 3 the console, else the disk (of old seeds,
    /// whose first byte was a `net` bool, a 3 was the NIC).
    device: u8,
    /// Unless `raw`: set the queues up at `RINGS` with 2^(size_log % 9)
    /// entries (at most the device's maximum) and write DRIVER_OK, before
    /// the operations; `raw` leaves it all to register writes.
    raw: bool,
    size_log: u8,
    /// How the disk stub answers: bit 0 fails reads, bit 1 answers reads
    /// with a wrong length, bit 2 fails writes, bit 3 fails flushes.
    disk_faults: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Addr {
    /// Inside guest memory (mostly).
    In(u16),
    Anywhere(u64),
}

impl Addr {
    fn get(&self) -> u64 {
        match *self {
            Addr::In(a) => u64::from(a),
            Addr::Anywhere(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The guest writes bytes into its memory.
    Mem { addr: u16, bytes: Vec<u8> },
    /// Descriptor `index` of queue `queue`'s table at `RINGS`.
    Desc { queue: bool, index: u8, addr: Addr, len: u32, flags: u16, next: u16 },
    /// Makes `head` available on queue `queue` (ring at `RINGS`, of `size`).
    Avail { queue: bool, head: u16, size: u8 },
    /// Sets queue `queue`'s available index.
    AvailIdx { queue: bool, idx: u16 },
    /// A 32-bit register write, by index into `REGS`.
    Reg { index: u8, value: u32 },
    /// Any write into the register window.
    Write { offset: u16, value: u64, len: u8 },
    /// Any read of the register window.
    Read { offset: u16, len: u8 },
    /// Received frames, delivered as the run loop does: while the guest
    /// has a buffer posted.
    Frames { lens: Vec<u16>, fill: u8 },
    /// Saves the transport's state through bincode and restores it into a
    /// new one, which goes on.
    SaveRestore,
    /// Restores a state decoded from these bytes (if it decodes and the
    /// transport takes it).
    Restore(Vec<u8>),
    /// A well-formed chain of buffers in the data area (each `len % 2048`
    /// bytes, device-writable if `write`, `fill` bytes), put at the next
    /// descriptors of queue `queue` and made available; then a notify.
    Chain { queue: bool, bufs: Vec<(u16, bool)>, fill: u8, notify: bool },
    /// A disk request, well formed but for what the fuzzer chooses: header
    /// (`kind`, `sector`), data buffers, status byte; then a notify.
    /// A data buffer's length is `len % 4096`, or `len` itself if that is
    /// 64 KiB or more (a length the memory behind it does not have).
    Request { kind: u8, sector: u8, bufs: Vec<(u32, bool)>, header_len: u8, status_writable: bool },
    /// Notifies queue `queue` (through the QUEUE_NOTIFY register).
    Notify { queue: u8 },
}

/// The driver's side: where the next chain goes.
struct Driver {
    /// Next free descriptor of each queue.
    next_desc: [u16; 2],
    /// Next free byte of the data area.
    next_data: u64,
    size: u16,
}

/// The data area of the standard layout: after the rings.
const DATA: (u64, u64) = (0x7000, MEM_SIZE);

impl Driver {
    fn alloc(&mut self, len: u64) -> u64 {
        if self.next_data + len > DATA.1 {
            self.next_data = DATA.0;
        }
        let at = self.next_data;
        self.next_data = (self.next_data + len).min(DATA.1);
        at
    }

    /// Puts the chain `bufs` (address, length, device-writable) at the next
    /// descriptors of queue `q` and makes it available.
    /// Returns the chain's head.
    fn chain(&mut self, mem: &GuestMem, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        if bufs.is_empty() {
            return 0;
        }
        let (table, avail, _) = RINGS[q];
        let size = self.size.max(1);
        let head = self.next_desc[q] % size;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % size;
            let last = i + 1 == bufs.len();
            let flags = u16::from(!last) | if write { 2 } else { 0 };
            put_desc(mem, table, index as u8, addr, len, flags, (index + 1) % size);
        }
        self.next_desc[q] = (head + bufs.len() as u16) % size;
        let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
        let _ = mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(idx % size)));
        mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).unwrap();
        head
    }
}

struct Disk {
    faults: u8,
    image: Vec<u8>,
    /// The last write or flush op number the device gave.
    last_op: u64,
}

impl DiskIo for Disk {
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, DiskIoError> {
        assert!(len <= MAX_REQUEST, "a disk read of {len} bytes");
        let end = offset.checked_add(len as u64).expect("a read's end overflows");
        assert!(end <= CAPACITY, "a read of {len} bytes at {offset} beyond the {CAPACITY}-byte disk");
        if self.faults & 1 != 0 {
            return Err(DiskIoError::Storage(std::io::Error::other("read fault")));
        }
        let mut data = vec![0u8; len];
        let kept = (offset as usize).min(KEPT)..(end as usize).min(KEPT);
        data[..kept.len()].copy_from_slice(&self.image[kept]);
        if self.faults & 2 != 0 {
            data.push(0);
        }
        Ok(data)
    }

    fn write(&mut self, op: u64, offset: u64, data: Vec<u8>) -> Result<(), DiskIoError> {
        assert!(op > self.last_op, "op numbers must grow: {op} after {}", self.last_op);
        self.last_op = op;
        assert!(data.len() <= MAX_REQUEST, "a disk write of {} bytes", data.len());
        let end = offset.checked_add(data.len() as u64).expect("a write's end overflows");
        assert!(end <= CAPACITY, "a write of {} bytes at {offset} beyond the {CAPACITY}-byte disk", data.len());
        if self.faults & 4 != 0 {
            return Err(DiskIoError::Storage(std::io::Error::other("write fault")));
        }
        let kept = (offset as usize).min(KEPT)..(end as usize).min(KEPT);
        let n = kept.len();
        self.image[kept].copy_from_slice(&data[..n]);
        Ok(())
    }

    fn flush(&mut self, op: u64) -> Result<(), DiskIoError> {
        assert!(op > self.last_op, "op numbers must grow: {op} after {}", self.last_op);
        self.last_op = op;
        if self.faults & 8 != 0 {
            return Err(DiskIoError::Storage(std::io::Error::other("flush fault")));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Wire(Vec<Vec<u8>>);

impl NetIo for Wire {
    fn transmit(&mut self, frame: Vec<u8>) {
        assert!((MIN_FRAME..=MAX_FRAME).contains(&frame.len()), "transmitted a frame of {} bytes", frame.len());
        self.0.push(frame);
    }
}

/// Everything a run showed the guest and the outside world.
#[derive(Debug, PartialEq, Eq)]
struct Trace {
    /// Register reads, and whether each notify and delivery interrupted.
    log: Vec<u8>,
    frames: Vec<Vec<u8>>,
    disk: Vec<u8>,
    mem: Vec<u8>,
    state: Vec<u8>,
}

/// What differs between the two devices, for one driver.
trait Device: VirtioDevice + Sized {
    fn fresh() -> Self;
    fn notify(t: &mut MmioTransport<Self>, queue: usize, mem: &GuestMem, disk: &mut Disk, wire: &mut Wire) -> bool;
    fn frames(t: &mut MmioTransport<Self>, mem: &GuestMem, lens: &[u16], fill: u8, log: &mut Vec<u8>);
}

impl Device for Block {
    fn fresh() -> Self {
        Block::new(CAPACITY)
    }
    fn notify(t: &mut MmioTransport<Self>, queue: usize, mem: &GuestMem, disk: &mut Disk, _: &mut Wire) -> bool {
        t.notify(queue, mem, disk)
    }
    fn frames(_: &mut MmioTransport<Self>, _: &GuestMem, _: &[u16], _: u8, _: &mut Vec<u8>) {}
}

impl Device for Console {
    fn fresh() -> Self {
        Console::new()
    }
    fn notify(t: &mut MmioTransport<Self>, queue: usize, mem: &GuestMem, _: &mut Disk, wire: &mut Wire) -> bool {
        let before = t.device.counters().tx_bytes;
        let mut out = Vec::new();
        let raised = t.notify(queue, mem, &mut out);
        assert!(
            out.len() <= console::MAX_NOTIFY_BYTES + console::MAX_CHAIN_BYTES as usize,
            "one notify transmitted {} bytes",
            out.len()
        );
        assert_eq!(t.device.counters().tx_bytes - before, out.len() as u64, "bytes transmitted but not counted");
        // The console's output is compared as the NIC's frames are.
        if !out.is_empty() {
            wire.0.push(out);
        }
        raised
    }
    fn frames(_: &mut MmioTransport<Self>, _: &GuestMem, _: &[u16], _: u8, _: &mut Vec<u8>) {}
}

impl Device for Net {
    fn fresh() -> Self {
        Net::new(MAC)
    }
    fn notify(t: &mut MmioTransport<Self>, queue: usize, mem: &GuestMem, _: &mut Disk, wire: &mut Wire) -> bool {
        t.notify(queue, mem, wire)
    }
    fn frames(t: &mut MmioTransport<Self>, mem: &GuestMem, lens: &[u16], fill: u8, log: &mut Vec<u8>) {
        // As vmm/src/run/delivery.rs does: a frame while the guest has a
        // buffer posted (and the device works).
        let rx_ready = |t: &mut MmioTransport<Net>| {
            let mut ready = false;
            t.with_device(mem, |net, queues| {
                ready = net.rx_ready(queues, mem);
                Ok(false)
            });
            ready
        };
        for &len in lens {
            if !rx_ready(t) {
                break;
            }
            let frame = vec![fill; usize::from(len)];
            let before = t.device.counters().clone();
            let mut outcome = None;
            t.with_device(mem, |net, queues| {
                let r = net.deliver(queues, mem, &frame);
                // The outcome as Ok(delivered) or Err(()): the error is the device's.
                outcome = Some(r.as_ref().map(|d| *d).map_err(|_| ()));
                r
            });
            let outcome = outcome.expect("a ready device runs");
            log.push(match outcome {
                Ok(true) => 1,
                Ok(false) => 0,
                Err(_) => 2,
            });
            let good = (MIN_FRAME..=MAX_FRAME).contains(&frame.len());
            if good {
                // A posted buffer is used, or the ring is broken: a good
                // frame is never dropped while a buffer waits.
                assert_ne!(outcome, Ok(false), "a {len}-byte frame with a buffer posted was not delivered");
            } else {
                assert_eq!(outcome, Ok(false), "a {len}-byte frame used a buffer");
                assert_eq!(t.device.counters().rx_bad_size, before.rx_bad_size + 1);
            }
        }
    }
}

fn write32(window: &mut impl MmioWindow, offset: u64, value: u32) -> MmioEvent {
    window.write(offset, &value.to_le_bytes())
}

fn put_desc(mem: &GuestMem, table: u64, i: u8, addr: u64, len: u32, flags: u16, next: u16) {
    let at = table + 16 * u64::from(i);
    // Past the end of the 64 KiB memory a write fails; that is fine.
    let _ = mem.write_obj(addr, GuestAddress(at));
    let _ = mem.write_obj(len, GuestAddress(at + 8));
    let _ = mem.write_obj(flags, GuestAddress(at + 12));
    let _ = mem.write_obj(next, GuestAddress(at + 14));
}

/// Runs the input; with `save_restore`, SaveRestore operations save the
/// transport and go on with a new one restored from it (else they do
/// nothing).
fn run<D: Device>(input: &Input, save_restore: bool) -> Trace
where
    MmioState<D::State>: serde::Serialize + serde::de::DeserializeOwned,
{
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let mut disk = Disk { faults: input.disk_faults, image: vec![0; KEPT], last_op: 0 };
    let mut wire = Wire::default();
    let mut log = Vec::new();
    let mut t = MmioTransport::new(D::fresh());
    let queues = t.device.queue_max_sizes().len();
    let max = t.device.queue_max_sizes()[0];
    let mut driver = Driver { next_desc: [0; 2], next_data: DATA.0, size: (1u16 << (input.size_log % 9)).min(max) };
    if !input.raw {
        let size = u32::from(driver.size);
        for (q, &(desc, avail, used)) in RINGS.iter().enumerate().take(queues) {
            write32(&mut t, reg::QUEUE_SEL, q as u32);
            write32(&mut t, reg::QUEUE_NUM, size);
            write32(&mut t, reg::QUEUE_DESC_LOW, desc as u32);
            write32(&mut t, reg::QUEUE_DRIVER_LOW, avail as u32);
            write32(&mut t, reg::QUEUE_DEVICE_LOW, used as u32);
            write32(&mut t, reg::QUEUE_READY, 1);
        }
        write32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write32(&mut t, reg::DRIVER_FEATURES, 1);
        write32(&mut t, reg::STATUS, 1 | 2 | 8 | 4);
    }
    // Whether the rings are still where the setup put them, and the
    // descriptors and rings only what the Chain and Request operations
    // wrote there.
    let mut pristine = !input.raw;
    for op in &input.ops {
        if !matches!(
            op,
            Op::Chain { .. } | Op::Request { .. } | Op::Notify { .. } | Op::Read { .. } | Op::Frames { .. }
        ) {
            pristine = false;
        }
        let event = match op {
            Op::Mem { addr, bytes } => {
                let _ = mem.write_slice(bytes, GuestAddress(u64::from(*addr)));
                MmioEvent::None
            }
            Op::Desc { queue, index, addr, len, flags, next } => {
                put_desc(&mem, RINGS[usize::from(*queue)].0, *index, addr.get(), *len, *flags, *next);
                MmioEvent::None
            }
            Op::Avail { queue, head, size } => {
                let avail = RINGS[usize::from(*queue)].1;
                let size = u16::from(*size).max(1);
                let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
                mem.write_obj(*head, GuestAddress(avail + 4 + 2 * u64::from(idx % size))).unwrap();
                mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).unwrap();
                MmioEvent::None
            }
            Op::AvailIdx { queue, idx } => {
                mem.write_obj(*idx, GuestAddress(RINGS[usize::from(*queue)].1 + 2)).unwrap();
                MmioEvent::None
            }
            Op::Reg { index, value } => write32(&mut t, REGS[usize::from(*index) % REGS.len()], *value),
            Op::Write { offset, value, len } => {
                let bytes = value.to_le_bytes();
                t.write(u64::from(*offset), &bytes[..usize::from(*len) % 9])
            }
            Op::Read { offset, len } => {
                let mut data = vec![0xa5u8; usize::from(*len) % 9];
                t.read(u64::from(*offset), &mut data);
                log.extend_from_slice(&data);
                MmioEvent::None
            }
            Op::Frames { lens, fill } => {
                D::frames(&mut t, &mem, lens, *fill, &mut log);
                MmioEvent::None
            }
            Op::SaveRestore if !save_restore => MmioEvent::None,
            Op::SaveRestore => {
                let bytes = bincode::serialize(&t.state()).expect("a state serializes");
                let state: MmioState<D::State> = bincode::deserialize(&bytes).expect("a saved state deserializes");
                let mut other = MmioTransport::new(D::fresh());
                other.restore(state).expect("a saved state restores");
                t = other;
                MmioEvent::None
            }
            Op::Chain { queue, bufs, fill, notify } => {
                let q = usize::from(*queue);
                let bufs: Vec<_> = bufs
                    .iter()
                    .map(|&(len, write)| {
                        let len = u64::from(len % 2048);
                        let at = driver.alloc(len);
                        let _ = mem.write_slice(&vec![*fill; len as usize], GuestAddress(at));
                        (at, len as u32, write)
                    })
                    .collect();
                let _ = driver.chain(&mem, q, &bufs);
                if *notify {
                    write32(&mut t, reg::QUEUE_NOTIFY, q as u32)
                } else {
                    MmioEvent::None
                }
            }
            Op::Request { kind, sector, bufs, header_len, status_writable } => {
                let header = driver.alloc(16);
                // Mostly the request types there are (IN, OUT, FLUSH, GET_ID).
                let kind = match kind % 8 {
                    0..=1 => 0,
                    2..=3 => 1,
                    4 => 4,
                    5 => 8,
                    _ => u32::from(*kind),
                };
                mem.write_obj(kind, GuestAddress(header)).unwrap();
                mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
                mem.write_obj(u64::from(*sector), GuestAddress(header + 8)).unwrap();
                let mut chain = vec![(header, u32::from(*header_len % 32), false)];
                for &(len, write) in bufs {
                    let len = if len < 1 << 16 { len % 4096 } else { len };
                    chain.push((driver.alloc(u64::from(len.min(4096))), len, write));
                }
                chain.push((driver.alloc(1), 1, *status_writable));
                let head = driver.chain(&mem, 0, &chain);
                let used = RINGS[0].2;
                let before: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
                if let MmioEvent::QueueNotify(q) = write32(&mut t, reg::QUEUE_NOTIFY, 0) {
                    let raised = D::notify(&mut t, q, &mem, &mut disk, &mut wire);
                    log.push(u8::from(raised));
                }
                let after: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
                // With the rings where the setup put them and the chain
                // whole in the table, the request completed last is this
                // one: the device wrote at most its writable buffers' bytes.
                if pristine && after != before && chain.len() <= usize::from(driver.size) {
                    let at = used + 4 + 8 * u64::from(after.wrapping_sub(1) % driver.size);
                    let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                    let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
                    let writable: u64 = chain.iter().filter(|b| b.2).map(|b| u64::from(b.1)).sum();
                    if id == u32::from(head) {
                        assert!(
                            u64::from(len) <= writable,
                            "used length {len} of a chain with {writable} writable bytes"
                        );
                    }
                }
                MmioEvent::None
            }
            Op::Notify { queue } => write32(&mut t, reg::QUEUE_NOTIFY, u32::from(*queue % 3)),
            Op::Restore(bytes) => {
                if let Ok(state) = bincode::deserialize::<MmioState<D::State>>(bytes) {
                    let mut other = MmioTransport::new(D::fresh());
                    if other.restore(state).is_ok() {
                        t = other;
                    }
                }
                MmioEvent::None
            }
        };
        if let MmioEvent::QueueNotify(queue) = event {
            assert!(queue < queues, "notify of queue {queue} of {queues}");
            let raised = D::notify(&mut t, queue, &mem, &mut disk, &mut wire);
            log.push(u8::from(raised));
        }
    }
    let mut guest = vec![0u8; MEM_SIZE as usize];
    mem.read_slice(&mut guest, GuestAddress(0)).unwrap();
    let state = bincode::serialize(&t.state()).expect("a state serializes");
    Trace { log, frames: wire.0, disk: disk.image, mem: guest, state }
}

fn check<D: Device>(input: &Input)
where
    MmioState<D::State>: serde::Serialize + serde::de::DeserializeOwned,
{
    let plain = run::<D>(input, false);
    // Determinism, and a saved state that is the whole state: the device a
    // snapshot or a joining backup restores goes on as the original does.
    assert!(plain == run::<D>(input, false), "two runs of the same input differ");
    if input.ops.iter().any(|op| matches!(op, Op::SaveRestore)) {
        let restored = run::<D>(input, true);
        assert_eq!(plain.log, restored.log, "a run that saved and restored differs in what it showed");
        assert_eq!(plain.frames, restored.frames, "a run that saved and restored sent other frames");
        assert!(plain.disk == restored.disk, "a run that saved and restored wrote another disk");
        assert!(plain.mem == restored.mem, "a run that saved and restored left other guest memory");
        assert_eq!(plain.state, restored.state, "a run that saved and restored ends in another state");
    }
}

fuzz_target!(|input: Input| {
    match input.device % 4 {
        1 => check::<Net>(&input),
        3 => check::<Console>(&input),
        _ => check::<Block>(&input),
    }
});
