//! The virtio-net NIC: two queues (0 = RX, 1 = TX), a MAC in config space,
//! the link always up; no offloads, no mergeable buffers, no control queue.
//! Features: VERSION_1, MAC, STATUS.
//!
//! Every frame carries the 12-byte `virtio_net_hdr_v1` in front (VERSION_1
//! makes `num_buffers` part of it even without MRG_RXBUF).
//!
//! Both directions happen at positions, so a replay repeats them exactly:
//! - **TX** at the guest's notify of queue 1: every available chain is
//!   gathered, its header stripped, and the Ethernet frame handed to
//!   [`NetIo::transmit`] (the run loop holds it under the output rule). A
//!   chain that is not a frame — too short or too long, with a device-
//!   writable descriptor, or broken (a loop, a `next` out of the table, a
//!   descriptor or buffer outside guest memory, an indirect table that
//!   cannot be read) — is dropped and counted, and completed all the same.
//! - **RX** when the run loop delivers a received frame (an external input,
//!   logged with its bytes) at a position: [`Net::rx_ready`] says whether
//!   the guest has posted a buffer, [`Net::deliver`] writes a zeroed header
//!   (`num_buffers` = 1) and the frame into one posted chain. A frame that
//!   does not fit the chain, or a chain that is not a set of device-writable
//!   buffers in guest memory, drops the frame (counted) and completes the
//!   chain with used length 0 — the driver sees an empty buffer, shorter
//!   than a header, which drivers (Linux's among them) count as a length
//!   error and recycle. Nothing is ever truncated into the guest.
//!
//! An available index more than a queue's size ahead of the device, a chain
//! head outside the queue, or a used ring that cannot be written is a
//! broken ring: an `Err`, and the transport stops the device until the
//! driver resets it.

use super::{RestoreError, RingError, VirtioDevice, DEVICE_ID_NET, F_VERSION_1};
use crate::memory::GuestMem;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];

/// VIRTIO_NET_F_MAC: the device has a MAC in its config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS: config space has a link status word.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const FEATURES: u64 = F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;
/// The status word's "link up" bit.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Length of `virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// An Ethernet header: the shortest frame there is.
pub const MIN_FRAME: usize = 14;
/// The longest frame: 1514 bytes with a 1500-byte MTU, plus a VLAN tag (no
/// FCS).
pub const MAX_FRAME: usize = 1514 + 4;

/// What a TX notification needs from the run loop: somewhere to put the
/// guest's frames (they are outputs: held until the output rule releases
/// them, suppressed on a replaying backup).
pub trait NetIo {
    /// One Ethernet frame the guest sent, header stripped.
    fn transmit(&mut self, frame: Vec<u8>);
}

/// What the NIC counted. Deterministic: a function of the guest's accesses
/// and the delivered frames, so it is part of the saved state and digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Frames handed to [`NetIo::transmit`].
    pub tx_frames: u64,
    /// TX chains dropped: frame shorter than [`MIN_FRAME`] or longer than
    /// [`MAX_FRAME`] (chains whose total is beyond that included).
    pub tx_bad_size: u64,
    /// TX chains dropped: broken, too many descriptors, device-writable
    /// descriptors, or memory outside the guest's.
    pub tx_malformed: u64,
    /// Frames written into the guest's RX ring.
    pub rx_frames: u64,
    /// Frames dropped because the RX chain was too small.
    pub rx_no_room: u64,
    /// Frames dropped because the RX chain was broken, had device-readable
    /// descriptors or memory outside the guest's.
    pub rx_malformed: u64,
    /// Frames refused by [`Net::deliver`]: shorter than [`MIN_FRAME`] or
    /// longer than [`MAX_FRAME`] (no buffer used).
    pub rx_bad_size: u64,
}

/// What a saved NIC holds beyond its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub counters: NetCounters,
}

/// The NIC.
pub struct Net {
    mac: [u8; 6],
    counters: NetCounters,
}

/// Why a chain carries no frame.
enum Bad {
    Size,
    Malformed,
}

/// A descriptor chain, walked once.
struct Walk {
    descs: Vec<(GuestAddress, u32)>,
    /// Sum of the descriptors' lengths.
    total: u64,
    readable: bool,
    writable: bool,
    /// Ended early: empty, a descriptor with NEXT that led nowhere (a loop
    /// cut by the chain's lifetime, an index outside the table, memory that
    /// cannot be read, an indirect table that cannot be), or more
    /// descriptors than the limit.
    broken: bool,
}

/// Walks `chain`, taking at most `limit` descriptors (the spec forbids a
/// chain longer than the queue, indirect tables included).
fn walk(chain: DescriptorChain<&GuestMem>, limit: usize) -> Walk {
    let mut w = Walk { descs: Vec::new(), total: 0, readable: false, writable: false, broken: true };
    let mut last_has_next = true;
    for d in chain {
        if w.descs.len() == limit {
            w.broken = true;
            return w;
        }
        w.total += u64::from(d.len());
        if d.is_write_only() {
            w.writable = true;
        } else {
            w.readable = true;
        }
        last_has_next = d.has_next();
        w.descs.push((d.addr(), d.len()));
    }
    // virtio-queue's iterator ends silently on every error: a chain whose
    // last descriptor still says NEXT did not end where the driver said.
    w.broken = w.descs.is_empty() || last_has_next;
    w
}

/// The next available chain of `queue`, or why its ring is broken: an
/// available index too far ahead, or a head outside the queue (which could
/// not be completed).
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMem,
    which: &'static str,
) -> Result<Option<DescriptorChain<&'m GuestMem>>, RingError> {
    let size = queue.size();
    let mut iter = queue.iter(mem).map_err(|err| RingError::Queue { ring: which, err })?;
    match iter.next() {
        Some(chain) if chain.head_index() >= size => {
            Err(RingError::HeadOutOfRange { ring: which, head: chain.head_index(), size })
        }
        chain => Ok(chain),
    }
}

fn complete(queue: &mut Queue, mem: &GuestMem, head: u16, len: u32, which: &'static str) -> Result<(), RingError> {
    queue.add_used(mem, head, len).map_err(|err| RingError::Used { ring: which, head, err })
}

/// Sets `VIRTQ_USED_F_NO_NOTIFY` in `queue`'s used ring unless it is set
/// already (read first: a write at every exit would dirty the page for
/// every state sync). A ring that cannot be read or written is left as it
/// is: the driver then notifies, which still works.
fn suppress_notifications(queue: &mut Queue, mem: &GuestMem) {
    const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
    let flags = mem.read_obj::<u16>(GuestAddress(queue.used_ring())).map(u16::from_le);
    if flags.is_ok_and(|f| f & VIRTQ_USED_F_NO_NOTIFY == 0) {
        let _ = queue.disable_notification(mem);
    }
}

fn frame_size_ok(len: usize) -> bool {
    (MIN_FRAME..=MAX_FRAME).contains(&len)
}

impl Net {
    /// A NIC with MAC `mac`.
    pub fn new(mac: [u8; 6]) -> Self {
        Net { mac, counters: NetCounters::default() }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn counters(&self) -> &NetCounters {
        &self.counters
    }

    /// Whether the guest has posted an RX buffer chain (nothing consumed).
    /// `queues` are the transport's: call it through
    /// `MmioTransport::with_device`, which checks that the driver is ready.
    /// A ring whose available index is corrupt reads as ready; the
    /// [`Net::deliver`] that follows then reports it broken.
    pub fn rx_ready(&self, queues: &[Queue], mem: &GuestMem) -> bool {
        let Some(queue) = queues.get(RX_QUEUE) else { return false };
        queue.ready()
            && queue.avail_idx(mem, Ordering::Acquire).is_ok_and(|idx| idx != std::num::Wrapping(queue.next_avail()))
    }

    /// Delivers one received frame into the next posted RX chain. Returns
    /// whether a chain was used (the guest should be interrupted): Ok(false)
    /// when no buffer is posted, or when the frame itself is shorter than
    /// [`MIN_FRAME`] or longer than [`MAX_FRAME`] (dropped and counted, no
    /// buffer used). A frame that does not fit the chain, or a chain that
    /// is not device-writable guest memory, is dropped and counted and the
    /// chain completed with used length 0: Ok(true). A broken ring: Err.
    pub fn deliver(&mut self, queues: &mut [Queue], mem: &GuestMem, frame: &[u8]) -> Result<bool, RingError> {
        if !frame_size_ok(frame.len()) {
            self.counters.rx_bad_size += 1;
            return Ok(false);
        }
        let Some(queue) = queues.get_mut(RX_QUEUE) else { return Ok(false) };
        if !queue.ready() {
            return Ok(false);
        }
        let limit = usize::from(queue.size());
        let Some(chain) = next_chain(queue, mem, "RX")? else { return Ok(false) };
        let head = chain.head_index();
        let written = match self.scatter(mem, walk(chain, limit), frame) {
            Ok(n) => {
                self.counters.rx_frames += 1;
                n
            }
            Err(Bad::Size) => {
                self.counters.rx_no_room += 1;
                0
            }
            Err(Bad::Malformed) => {
                self.counters.rx_malformed += 1;
                0
            }
        };
        complete(queue, mem, head, written, "RX")?;
        Ok(true)
    }

    /// Writes header and frame across the chain's buffers; the used length.
    fn scatter(&self, mem: &GuestMem, w: Walk, frame: &[u8]) -> Result<u32, Bad> {
        if w.broken || w.readable {
            return Err(Bad::Malformed);
        }
        let needed = NET_HDR_LEN + frame.len();
        if w.total < needed as u64 {
            return Err(Bad::Size);
        }
        let mut data = Vec::with_capacity(needed);
        // virtio_net_hdr_v1: flags, gso_type (NONE), hdr_len, gso_size,
        // csum_start, csum_offset all 0; num_buffers = 1.
        data.extend_from_slice(&[0u8; NET_HDR_LEN - 2]);
        data.extend_from_slice(&1u16.to_le_bytes());
        data.extend_from_slice(frame);
        let mut rest = data.as_slice();
        for (addr, len) in w.descs {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at(rest.len().min(len as usize));
            mem.write_slice(chunk, addr).map_err(|_| Bad::Malformed)?;
            rest = tail;
        }
        // `needed` is at most NET_HDR_LEN + MAX_FRAME.
        Ok(needed as u32)
    }

    /// Polled at every guest exit (the run loop's choice, the same on a
    /// replay): transmits what the guest queued without notifying, and
    /// tells the driver, through each ready queue's used-ring flags
    /// (`VIRTQ_USED_F_NO_NOTIFY`), that it need not notify: the frames it
    /// queues go out at its next exit, which a driver that idles or polls
    /// makes anyway. A driver that notifies all the same is served at the
    /// notify, as before. Returns whether TX buffers were used.
    pub fn poll(&mut self, queues: &mut [Queue], mem: &GuestMem, io: &mut dyn NetIo) -> Result<bool, RingError> {
        for queue in queues.iter_mut().filter(|q| q.ready()) {
            suppress_notifications(queue, mem);
        }
        let tx_waiting = queues.get(TX_QUEUE).is_some_and(|q| {
            q.ready() && q.avail_idx(mem, Ordering::Acquire).is_ok_and(|idx| idx != std::num::Wrapping(q.next_avail()))
        });
        if !tx_waiting {
            return Ok(false);
        }
        self.process_tx(queues, mem, io)
    }

    /// Transmits every available TX chain.
    fn process_tx(&mut self, queues: &mut [Queue], mem: &GuestMem, io: &mut dyn NetIo) -> Result<bool, RingError> {
        let Some(queue) = queues.get_mut(TX_QUEUE) else { return Ok(false) };
        let limit = usize::from(queue.size());
        let mut used = false;
        // At most a queue's worth of chains can be available (more is a
        // broken ring, which `next_chain` reports).
        for _ in 0..limit {
            let Some(chain) = next_chain(queue, mem, "TX")? else { break };
            let head = chain.head_index();
            match self.gather(mem, walk(chain, limit)) {
                Ok(frame) => {
                    self.counters.tx_frames += 1;
                    io.transmit(frame);
                }
                Err(Bad::Size) => self.counters.tx_bad_size += 1,
                Err(Bad::Malformed) => self.counters.tx_malformed += 1,
            }
            complete(queue, mem, head, 0, "TX")?;
            used = true;
        }
        Ok(used)
    }

    /// The frame a TX chain carries, its header stripped.
    fn gather(&self, mem: &GuestMem, w: Walk) -> Result<Vec<u8>, Bad> {
        if w.broken || w.writable {
            return Err(Bad::Malformed);
        }
        // Checked before anything is read or allocated: a huge length costs
        // nothing.
        let frame_len = w.total.checked_sub(NET_HDR_LEN as u64).ok_or(Bad::Size)?;
        if frame_len < MIN_FRAME as u64 || frame_len > MAX_FRAME as u64 {
            return Err(Bad::Size);
        }
        let mut bytes = vec![0u8; NET_HDR_LEN + frame_len as usize];
        let mut rest = bytes.as_mut_slice();
        for (addr, len) in w.descs {
            let (chunk, tail) = rest.split_at_mut((len as usize).min(rest.len()));
            mem.read_slice(chunk, addr).map_err(|_| Bad::Malformed)?;
            rest = tail;
        }
        bytes.drain(..NET_HDR_LEN);
        Ok(bytes)
    }
}

impl VirtioDevice for Net {
    type Io<'a> = dyn NetIo + 'a;
    type State = NetState;

    fn device_id(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status (le16); nothing else is
        // offered.
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn reset(&mut self) {
        self.counters = NetCounters::default();
    }

    fn queue_notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMem,
        io: &mut Self::Io<'_>,
    ) -> Result<bool, RingError> {
        match index {
            TX_QUEUE => self.process_tx(queues, mem, io),
            // RX buffers posted: frames go in when the run loop delivers
            // them, at a position of its choosing.
            _ => Ok(false),
        }
    }

    fn state(&self) -> NetState {
        NetState { mac: self.mac, counters: self.counters.clone() }
    }

    fn restore(&mut self, state: NetState) -> Result<(), RestoreError> {
        if state.mac != self.mac {
            return Err(RestoreError::Mismatch {
                what: "NIC MAC",
                saved: crate::mac::format_mac(&state.mac),
                ours: crate::mac::format_mac(&self.mac),
            });
        }
        self.counters = state.counters;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{reg, MmioTransport};
    use proptest::prelude::*;

    const MEM_SIZE: u64 = 0x20000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// Where a queue's rings live in the test memory.
    #[derive(Clone, Copy)]
    struct Rings {
        desc: u64,
        avail: u64,
        used: u64,
    }
    const RX: Rings = Rings { desc: 0x1000, avail: 0x2000, used: 0x3000 };
    const TX: Rings = Rings { desc: 0x4000, avail: 0x5000, used: 0x6000 };
    /// Buffers go from here.
    const DATA: u64 = 0x8000;

    fn memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn queue(r: Rings, size: u16) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(r.desc as u32), Some(0));
        q.set_avail_ring_address(Some(r.avail as u32), Some(0));
        q.set_used_ring_address(Some(r.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn queues(size: u16) -> Vec<Queue> {
        vec![queue(RX, size), queue(TX, size)]
    }

    fn put_desc(mem: &GuestMem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Makes `head` available, ring size `size`.
    fn push_avail(mem: &GuestMem, r: Rings, size: u16, head: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(r.avail + 2)).unwrap();
        mem.write_obj(head, GuestAddress(r.avail + 4 + 2 * u64::from(idx % size))).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(r.avail + 2)).unwrap();
    }

    fn used_idx(mem: &GuestMem, r: Rings) -> u16 {
        mem.read_obj(GuestAddress(r.used + 2)).unwrap()
    }

    /// Used element `i`: (id, len).
    fn used_elem(mem: &GuestMem, r: Rings, i: u16) -> (u32, u32) {
        let at = r.used + 4 + 8 * u64::from(i);
        (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    #[derive(Default)]
    struct Sink(Vec<Vec<u8>>);
    impl NetIo for Sink {
        fn transmit(&mut self, frame: Vec<u8>) {
            self.0.push(frame);
        }
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    fn tx(net: &mut Net, qs: &mut [Queue], mem: &GuestMem) -> (Result<bool, RingError>, Vec<Vec<u8>>) {
        let mut sink = Sink::default();
        let r = net.queue_notify(TX_QUEUE, qs, mem, &mut sink);
        (r, sink.0)
    }

    #[test]
    fn config_space_has_the_mac_and_link_up() {
        let net = Net::new(MAC);
        let mut config = [0xffu8; 10];
        net.read_config(0, &mut config);
        assert_eq!(config, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 0, 0]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP);
        net.read_config(u64::MAX, &mut status);
        assert_eq!(status, [0, 0]);
        assert_eq!(net.features(), F_VERSION_1 | (1 << 5) | (1 << 16));
        assert_eq!(net.device_id(), 1);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
    }

    #[test]
    fn a_tx_frame_is_gathered_across_descriptors_and_its_header_stripped() {
        let mem = memory();
        let mut qs = queues(16);
        let mut net = Net::new(MAC);
        let payload = frame(100);
        let mut bytes = vec![0xaau8; NET_HDR_LEN];
        bytes.extend_from_slice(&payload);
        // Header split over two descriptors, the frame over three, one of
        // them empty.
        let pieces = [5usize, 9, 0, 40, bytes.len() - 54];
        let mut at = 0;
        for (i, &n) in pieces.iter().enumerate() {
            let addr = DATA + 0x100 * i as u64;
            mem.write_slice(&bytes[at..at + n], GuestAddress(addr)).unwrap();
            let last = i == pieces.len() - 1;
            put_desc(&mem, TX.desc, 3 + i as u16, addr, n as u32, if last { 0 } else { F_NEXT }, 4 + i as u16);
            at += n;
        }
        push_avail(&mem, TX, 16, 3);
        let (r, sent) = tx(&mut net, &mut qs, &mem);
        assert!(matches!(r, Ok(true)));
        assert_eq!(sent, vec![payload]);
        assert_eq!(used_idx(&mem, TX), 1);
        assert_eq!(used_elem(&mem, TX, 0), (3, 0));
        assert_eq!(net.counters().tx_frames, 1);
        // Nothing more available: nothing used.
        assert!(matches!(tx(&mut net, &mut qs, &mem).0, Ok(false)));
        // Notifying RX does nothing.
        assert!(matches!(net.queue_notify(RX_QUEUE, &mut qs, &mem, &mut Sink::default()), Ok(false)));
    }

    #[test]
    fn tx_drops_bad_frames_but_completes_their_chains() {
        let mem = memory();
        let mut qs = queues(16);
        let mut net = Net::new(MAC);
        // 0: header + 13 bytes (too short); 1: header + 1519 (too long);
        // 2: a device-writable descriptor; 3: 4 GiB claimed; 4: a good one.
        put_desc(&mem, TX.desc, 0, DATA, (NET_HDR_LEN + 13) as u32, 0, 0);
        put_desc(&mem, TX.desc, 1, DATA, (NET_HDR_LEN + MAX_FRAME + 1) as u32, 0, 0);
        put_desc(&mem, TX.desc, 2, DATA, 100, F_WRITE, 0);
        put_desc(&mem, TX.desc, 3, DATA, u32::MAX, 0, 0);
        put_desc(&mem, TX.desc, 4, DATA, (NET_HDR_LEN + MAX_FRAME) as u32, 0, 0);
        for head in 0..5 {
            push_avail(&mem, TX, 16, head);
        }
        let (r, sent) = tx(&mut net, &mut qs, &mem);
        assert!(matches!(r, Ok(true)));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].len(), MAX_FRAME);
        assert_eq!(used_idx(&mem, TX), 5);
        for i in 0..5 {
            assert_eq!(used_elem(&mem, TX, i), (u32::from(i), 0));
        }
        let c = net.counters();
        assert_eq!((c.tx_frames, c.tx_bad_size, c.tx_malformed), (1, 3, 1));
    }

    #[test]
    fn rx_delivers_a_frame_across_two_descriptors() {
        let mem = memory();
        let mut qs = queues(16);
        let mut net = Net::new(MAC);
        assert!(!net.rx_ready(&qs, &mem));
        assert!(matches!(net.deliver(&mut qs, &mem, &frame(60)), Ok(false)), "no buffer posted");
        put_desc(&mem, RX.desc, 7, DATA, 50, F_WRITE | F_NEXT, 2);
        put_desc(&mem, RX.desc, 2, DATA + 0x1000, 1526, F_WRITE, 0);
        push_avail(&mem, RX, 16, 7);
        assert!(net.rx_ready(&qs, &mem));
        assert!(net.rx_ready(&qs, &mem), "rx_ready consumes nothing");
        let f = frame(300);
        assert!(matches!(net.deliver(&mut qs, &mem, &f), Ok(true)));
        assert!(!net.rx_ready(&qs, &mem));
        assert_eq!(used_idx(&mem, RX), 1);
        assert_eq!(used_elem(&mem, RX, 0), (7, (NET_HDR_LEN + 300) as u32));
        let mut got = vec![0u8; 50];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "zeroed header, num_buffers 1");
        assert_eq!(&got[12..], &f[..38]);
        let mut rest = vec![0u8; 262];
        mem.read_slice(&mut rest, GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(rest, &f[38..]);
        assert_eq!(net.counters().rx_frames, 1);
        // Nothing posted any more.
        assert!(matches!(net.deliver(&mut qs, &mem, &f), Ok(false)));
    }

    #[test]
    fn rx_drops_what_does_not_fit_and_completes_with_zero() {
        let mem = memory();
        let mut qs = queues(16);
        let mut net = Net::new(MAC);
        // Too small; device-readable; outside memory; then a good one.
        put_desc(&mem, RX.desc, 0, DATA, (NET_HDR_LEN + 59) as u32, F_WRITE, 0);
        put_desc(&mem, RX.desc, 1, DATA, 2000, 0, 0);
        put_desc(&mem, RX.desc, 2, MEM_SIZE - 10, 2000, F_WRITE, 0);
        put_desc(&mem, RX.desc, 3, DATA, 2000, F_WRITE, 0);
        for head in 0..4 {
            push_avail(&mem, RX, 16, head);
        }
        // Bad frames use no buffer.
        assert!(matches!(net.deliver(&mut qs, &mem, &frame(13)), Ok(false)));
        assert!(matches!(net.deliver(&mut qs, &mem, &frame(MAX_FRAME + 1)), Ok(false)));
        for _ in 0..4 {
            assert!(matches!(net.deliver(&mut qs, &mem, &frame(60)), Ok(true)));
        }
        assert_eq!(used_idx(&mem, RX), 4);
        let lens: Vec<_> = (0..4).map(|i| used_elem(&mem, RX, i).1).collect();
        assert_eq!(lens, [0, 0, 0, (NET_HDR_LEN + 60) as u32]);
        let c = net.counters();
        assert_eq!((c.rx_frames, c.rx_no_room, c.rx_malformed, c.rx_bad_size), (1, 1, 2, 2));
    }

    #[test]
    fn adversarial_chains_neither_panic_nor_hang() {
        let mem = memory();
        let mut net = Net::new(MAC);
        let size = 8u16;
        // A loop 0 -> 1 -> 0.
        put_desc(&mem, TX.desc, 0, DATA, 20, F_NEXT, 1);
        put_desc(&mem, TX.desc, 1, DATA, 20, F_NEXT, 0);
        // next outside the table.
        put_desc(&mem, TX.desc, 2, DATA, 20, F_NEXT, 300);
        // A buffer outside guest memory, and one at the very top.
        put_desc(&mem, TX.desc, 3, u64::MAX - 4, 100, 0, 0);
        put_desc(&mem, TX.desc, 4, MEM_SIZE - 50, 100, 0, 0);
        // Indirect tables: outside memory; of length 0; of a length that is
        // not a multiple of 16; pointing at descriptors outside memory.
        put_desc(&mem, TX.desc, 5, u64::MAX - 64, 64, F_INDIRECT, 0);
        put_desc(&mem, TX.desc, 6, DATA, 0, F_INDIRECT, 0);
        put_desc(&mem, TX.desc, 7, DATA + 0x800, 24, F_INDIRECT, 0);
        let mut qs = queues(size);
        for head in 0..8 {
            push_avail(&mem, TX, size, head);
        }
        let (r, sent) = tx(&mut net, &mut qs, &mem);
        assert!(matches!(r, Ok(true)));
        assert!(sent.is_empty());
        assert_eq!(used_idx(&mem, TX), 8);
        let c = net.counters().clone();
        assert_eq!(c.tx_malformed + c.tx_bad_size, 8);

        // A chain longer than the queue, through an indirect table of 300
        // zero-length descriptors (plus header and frame).
        let table = DATA + 0x2000;
        for i in 0..300u16 {
            mem.write_obj(DATA, GuestAddress(table + 16 * u64::from(i))).unwrap();
            mem.write_obj(if i == 0 { 100u32 } else { 0 }, GuestAddress(table + 16 * u64::from(i) + 8)).unwrap();
            mem.write_obj(if i == 299 { 0 } else { F_NEXT }, GuestAddress(table + 16 * u64::from(i) + 12)).unwrap();
            mem.write_obj(i + 1, GuestAddress(table + 16 * u64::from(i) + 14)).unwrap();
        }
        put_desc(&mem, TX.desc, 0, table, 300 * 16, F_INDIRECT, 0);
        push_avail(&mem, TX, size, 0);
        let (r, sent) = tx(&mut net, &mut qs, &mem);
        assert!(matches!(r, Ok(true)) && sent.is_empty());
        assert_eq!(net.counters().tx_malformed, c.tx_malformed + 1);

        // A head outside the queue: a broken ring.
        push_avail(&mem, TX, size, 9);
        let before = net.counters().clone();
        let err = tx(&mut net, &mut qs, &mem).0.unwrap_err();
        assert!(err.to_string().contains("head 9"), "{err}");
        assert_eq!(net.counters(), &before);

        // An available index far ahead: a broken ring, for TX and RX alike;
        // the RX ring reads "ready" and deliver says why not.
        let mut qs = queues(size);
        mem.write_obj(1000u16, GuestAddress(TX.avail + 2)).unwrap();
        mem.write_obj(1000u16, GuestAddress(RX.avail + 2)).unwrap();
        let before = net.counters().clone();
        assert!(tx(&mut net, &mut qs, &mem).0.is_err());
        assert!(net.rx_ready(&qs, &mem));
        assert!(net.deliver(&mut qs, &mem, &frame(60)).is_err());
        assert_eq!(net.counters(), &before, "nothing counted for a broken ring");

        // RX: a loop of writable descriptors, a zero-length one, an indirect
        // table nowhere. Each drops its frame and completes the chain.
        let mut qs = queues(size);
        mem.write_obj(0u16, GuestAddress(RX.avail + 2)).unwrap();
        put_desc(&mem, RX.desc, 0, DATA, 4, F_WRITE | F_NEXT, 0);
        put_desc(&mem, RX.desc, 1, DATA, 0, F_WRITE, 0);
        put_desc(&mem, RX.desc, 2, u64::MAX - 64, 64, F_INDIRECT, 0);
        for head in 0..3 {
            push_avail(&mem, RX, size, head);
        }
        for _ in 0..3 {
            assert!(matches!(net.deliver(&mut qs, &mem, &frame(60)), Ok(true)));
        }
        assert_eq!(used_idx(&mem, RX), 3);
        assert!((0..3).all(|i| used_elem(&mem, RX, i).1 == 0));
    }

    #[test]
    fn state_restores_only_onto_the_same_mac() {
        let mut net = Net::new(MAC);
        net.counters.tx_frames = 5;
        let saved = net.state();
        let mut same = Net::new(MAC);
        same.restore(saved.clone()).unwrap();
        assert_eq!(same.counters().tx_frames, 5);
        let mut other = Net::new([0x52, 0x54, 0, 0, 0, 1]);
        let err = other.restore(saved).unwrap_err();
        assert!(err.to_string().contains("52:54:00:12:34:56"), "{err}");
        net.reset();
        assert_eq!(net.counters(), &NetCounters::default());
    }

    /// The run loop's view: registers, DRIVER_OK, notify, and RX through
    /// `with_device`.
    #[test]
    fn works_behind_the_mmio_transport() {
        let mem = memory();
        let mut t = MmioTransport::new(Net::new(MAC));
        let w = |t: &mut MmioTransport<Net>, off: u64, v: u32| {
            t.write(off, &v.to_le_bytes());
        };
        for (i, r) in [RX, TX].into_iter().enumerate() {
            w(&mut t, reg::QUEUE_SEL, i as u32);
            w(&mut t, reg::QUEUE_NUM, 16);
            w(&mut t, reg::QUEUE_DESC_LOW, r.desc as u32);
            w(&mut t, reg::QUEUE_DRIVER_LOW, r.avail as u32);
            w(&mut t, reg::QUEUE_DEVICE_LOW, r.used as u32);
            w(&mut t, reg::QUEUE_READY, 1);
        }
        w(&mut t, reg::STATUS, 1 | 2 | 8 | 4);
        let rx_ready = |t: &mut MmioTransport<Net>| {
            let mut ready = false;
            t.with_device(&mem, |net, queues| {
                ready = net.rx_ready(queues, &mem);
                Ok(false)
            });
            ready
        };
        assert!(!rx_ready(&mut t));
        put_desc(&mem, RX.desc, 0, DATA, 2048, F_WRITE, 0);
        push_avail(&mem, RX, 16, 0);
        assert!(rx_ready(&mut t));
        let f = frame(64);
        assert!(t.with_device(&mem, |net, queues| net.deliver(queues, &mem, &f)));
        assert_eq!(used_elem(&mem, RX, 0), (0, 76));

        put_desc(&mem, TX.desc, 0, DATA + 0x1000, 76, 0, 0);
        push_avail(&mem, TX, 16, 0);
        let mut sink = Sink::default();
        assert!(t.notify(TX_QUEUE, &mem, &mut sink));
        assert_eq!(sink.0.len(), 1);
        let saved = t.state();
        let mut other = MmioTransport::new(Net::new(MAC));
        other.restore(saved).unwrap();
        assert_eq!(other.device.counters(), t.device.counters());

        // The driver suppresses TX interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT):
        // the frame still goes out and its chain is completed, without one.
        mem.write_obj(crate::devices::virtio::mmio::VIRTQ_AVAIL_F_NO_INTERRUPT.to_le(), GuestAddress(TX.avail))
            .unwrap();
        put_desc(&mem, TX.desc, 1, DATA + 0x1000, 76, 0, 0);
        push_avail(&mem, TX, 16, 1);
        assert!(!t.notify(TX_QUEUE, &mem, &mut sink), "no interrupt the driver asked not to have");
        assert_eq!(sink.0.len(), 2);
        assert_eq!(used_elem(&mem, TX, 1).0, 1, "the chain is completed all the same");
        // RX still interrupts: its flags are the RX ring's own.
        put_desc(&mem, RX.desc, 1, DATA + 0x2000, 2048, F_WRITE, 0);
        push_avail(&mem, RX, 16, 1);
        assert!(t.with_device(&mem, |net, queues| net.deliver(queues, &mem, &f)));
    }

    /// Polled at an exit: the used rings say no notify is needed, and what
    /// the guest queued without notifying goes out; a poll with nothing
    /// queued sends nothing and writes nothing.
    #[test]
    fn a_poll_transmits_unnotified_frames_and_suppresses_notifies() {
        let mem = memory();
        let mut net = Net::new(MAC);
        let mut qs = queues(16);
        let mut sink = Sink::default();
        assert!(!net.poll(&mut qs, &mem, &mut sink).unwrap(), "nothing queued");
        for r in [RX, TX] {
            let flags: u16 = mem.read_obj(GuestAddress(r.used)).unwrap();
            assert_eq!(flags & 1, 1, "VIRTQ_USED_F_NO_NOTIFY set");
        }
        put_desc(&mem, TX.desc, 0, DATA, 76, 0, 0);
        push_avail(&mem, TX, 16, 0);
        put_desc(&mem, TX.desc, 1, DATA + 0x1000, 76, 0, 0);
        push_avail(&mem, TX, 16, 1);
        assert!(net.poll(&mut qs, &mem, &mut sink).unwrap());
        assert_eq!(sink.0.len(), 2, "both queued frames, at one poll");
        assert_eq!(used_idx(&mem, TX), 2);
        assert!(!net.poll(&mut qs, &mem, &mut sink).unwrap());
        assert_eq!(sink.0.len(), 2);
    }

    /// One descriptor as the proptest makes them: addresses mostly in the
    /// data area, sometimes anywhere; lengths mostly small, sometimes huge.
    fn arb_desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        let addr = prop_oneof![
            6 => DATA..MEM_SIZE,
            1 => MEM_SIZE - 64..MEM_SIZE + 64,
            1 => any::<u64>(),
        ];
        let len = prop_oneof![
            4 => 0u32..64,
            4 => 0u32..2048,
            1 => any::<u32>(),
        ];
        let flags = prop_oneof![6 => 0u16..8, 1 => any::<u16>()];
        let next = prop_oneof![6 => 0u16..16, 1 => any::<u16>()];
        (addr, len, flags, next)
    }

    proptest! {
        // The failing input is printed; no regression file in the tree.
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// Random descriptor tables, avail rings and data (indirect tables
        /// included) thrown at TX and RX: no panic, no hang, every used
        /// entry accounted for in the counters.
        #[test]
        fn random_rings_never_panic(
            size_log in 0u32..=4,
            descs in prop::collection::vec(arb_desc(), 16),
            heads in prop::collection::vec(prop_oneof![8 => 0u16..16, 1 => any::<u16>()], 16),
            ahead in prop_oneof![8 => 0u16..=17, 1 => any::<u16>()],
            data in prop::collection::vec(any::<u8>(), 0x1000),
            frames in prop::collection::vec(0usize..1600, 0..20),
        ) {
            let size = 1u16 << size_log;
            let mem = memory();
            // Data, which indirect descriptors may point into, looks like
            // descriptors too.
            mem.write_slice(&data, GuestAddress(DATA)).unwrap();
            for r in [RX, TX] {
                for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                    put_desc(&mem, r.desc, i as u16, addr, len, flags, next);
                }
                for (i, &h) in heads.iter().enumerate() {
                    mem.write_obj(h, GuestAddress(r.avail + 4 + 2 * i as u64)).unwrap();
                }
                mem.write_obj(ahead, GuestAddress(r.avail + 2)).unwrap();
            }
            let mut net = Net::new(MAC);
            let mut qs = queues(size);
            let (r, sent) = tx(&mut net, &mut qs, &mem);
            let c = net.counters().clone();
            prop_assert_eq!(sent.len() as u64, c.tx_frames);
            prop_assert!(sent.iter().all(|f| frame_size_ok(f.len())));
            let completed = u64::from(qs[TX_QUEUE].next_used());
            prop_assert_eq!(completed, c.tx_frames + c.tx_bad_size + c.tx_malformed);
            prop_assert_eq!(used_idx(&mem, TX), qs[TX_QUEUE].next_used());
            if ahead > size {
                prop_assert!(r.is_err());
            }
            for len in frames {
                let ready = net.rx_ready(&qs, &mem);
                if matches!(net.deliver(&mut qs, &mem, &frame(len)), Ok(true)) {
                    prop_assert!(ready, "a buffer was used, so one was posted");
                }
            }
            let c = net.counters();
            prop_assert_eq!(u64::from(qs[RX_QUEUE].next_used()), c.rx_frames + c.rx_no_room + c.rx_malformed);
            prop_assert!(qs[RX_QUEUE].next_used() <= size);
        }
    }
}
