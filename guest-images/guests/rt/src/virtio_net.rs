//! A virtio-net driver on the virtio-mmio transport ([`crate::virtio`]).
//!
//! Queue 0 receives, queue 1 transmits. Every buffer starts with the 12-byte
//! `virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
//! csum_offset, num_buffers): sent zeroed (no offloads negotiated), skipped
//! on receive. Features: VERSION_1 and MAC (required), STATUS if offered;
//! nothing else.
//!
//! Receive: every descriptor holds one device-writable 2 KiB buffer (12 +
//! 1514 bytes fit); a consumed buffer is posted again at once, so the ring
//! stays full. ftvmm delivers frames at
//! the guest's exits and raises the interrupt; the driver learns of them by
//! reading the used ring in memory, never the interrupt status register.
//!
//! Transmit: one descriptor per frame (header and frame in one buffer);
//! frames queue up until [`Tx::flush`] notifies the device once for the
//! whole batch — or does not, when the device says it needs no notify
//! (ftvmm polls the transmit ring at every exit, so the batch goes out at
//! the guest's next exit: its idle, typically). The driver reclaims the
//! used descriptors when it next needs one. Transmit interrupts are
//! suppressed.

use crate::virtio::{self, device_id, Buffer, InitError, Transport, Virtqueue};
use crate::Static;
use core::sync::atomic::{fence, Ordering};

/// The device has a MAC address in its configuration space.
pub const F_MAC: u64 = 1 << 5;
/// The device reports link status in its configuration space.
pub const F_STATUS: u64 = 1 << 16;

/// Size of the `virtio_net_hdr_v1` that precedes every frame.
pub const HDR_LEN: usize = 12;
/// Largest Ethernet frame (without FCS) sent or received: 1500-byte MTU.
pub const MAX_FRAME: usize = 1514;
/// Size of each buffer.
pub const BUF_LEN: usize = 2048;
/// Descriptors (and buffers) of the receive and transmit queues.
pub const RX_SIZE: usize = 128;
pub const TX_SIZE: usize = 64;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const STATUS_LINK_UP: u16 = 1;

#[repr(C, align(64))]
struct Bufs<const N: usize>([[u8; BUF_LEN]; N]);

struct Mem {
    rxq: Virtqueue<RX_SIZE>,
    txq: Virtqueue<TX_SIZE>,
    rx: Bufs<RX_SIZE>,
    tx: Bufs<TX_SIZE>,
}

static MEM: Static<Mem> = Static::new(Mem {
    rxq: Virtqueue::new(),
    txq: Virtqueue::new(),
    rx: Bufs([[0; BUF_LEN]; RX_SIZE]),
    tx: Bufs([[0; BUF_LEN]; TX_SIZE]),
});

/// Why there is no network card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The VM has no virtio-net device.
    NoDevice,
    /// It has one, but bringing it up failed.
    Init(InitError),
    /// `init` already succeeded once.
    InUse,
}

/// The network card: its two queues and its MAC address.
pub struct Nic {
    pub rx: Rx,
    pub tx: Tx,
    transport: Transport,
    mac: [u8; 6],
    features: u64,
}

/// The receive queue.
pub struct Rx {
    transport: Transport,
    queue: &'static mut Virtqueue<RX_SIZE>,
    bufs: &'static mut Bufs<RX_SIZE>,
    /// The buffer each descriptor was posted with.
    buf_of: [u16; RX_SIZE],
    /// The device ran low on buffers since the last receive notify.
    low: bool,
}

/// The transmit queue.
pub struct Tx {
    transport: Transport,
    queue: &'static mut Virtqueue<TX_SIZE>,
    bufs: &'static mut Bufs<TX_SIZE>,
    /// Frames made available since the last notify.
    pending: u16,
}

/// A received frame, still in its buffer; give it back with [`Rx::repost`].
#[derive(Debug)]
pub struct RxFrame {
    buf: u16,
    len: usize,
}

impl RxFrame {
    /// Length of the Ethernet frame (0 for a buffer the device completed
    /// without a frame in it).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Finds the network card and brings it up: queues set up, receive ring
/// filled, interrupt installed (call after `hw::pic_init`).
pub fn init() -> Result<Nic, Error> {
    let transport = virtio::find(device_id::NET).ok_or(Error::NoDevice)?;
    let features = transport.negotiate(F_MAC | F_STATUS, F_MAC).map_err(Error::Init)?;
    let mem = MEM.take().ok_or(Error::InUse)?;
    transport.setup_queue(RX_QUEUE, &mut mem.rxq).map_err(Error::Init)?;
    transport.setup_queue(TX_QUEUE, &mut mem.txq).map_err(Error::Init)?;
    mem.txq.suppress_interrupts();
    let mut mac = [0u8; 6];
    transport.config_bytes(0, &mut mac);
    let mut rx = Rx { transport, queue: &mut mem.rxq, bufs: &mut mem.rx, buf_of: [0; RX_SIZE], low: false };
    for buf in 0..RX_SIZE as u16 {
        rx.post(buf);
    }
    let tx = Tx { transport, queue: &mut mem.txq, bufs: &mut mem.tx, pending: 0 };
    transport.enable_interrupt();
    transport.driver_ok();
    transport.notify(RX_QUEUE);
    Ok(Nic { rx, tx, transport, mac, features })
}

impl Nic {
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the link is up (always, if the device does not report it).
    pub fn link_up(&self) -> bool {
        self.features & F_STATUS == 0 || self.transport.config_u16(6) & STATUS_LINK_UP != 0
    }

    /// Notifies whichever queue needs it: transmit if frames are pending,
    /// receive if the device ran low on buffers since the last notify.
    pub fn flush(&mut self) {
        self.tx.flush();
        self.rx.flush();
    }
}

impl Rx {
    /// Whether a received frame is waiting (a read of the used ring in memory).
    pub fn pending(&self) -> bool {
        self.queue.has_used()
    }

    /// The next received frame, if any.
    pub fn take(&mut self) -> Option<RxFrame> {
        let (id, written) = self.queue.pop_used()?;
        // The device no longer holds this one and may be running short.
        if RX_SIZE - self.queue.num_free() < RX_SIZE / 4 {
            self.low = true;
        }
        let len = (written as usize).clamp(HDR_LEN, BUF_LEN) - HDR_LEN;
        Some(RxFrame { buf: self.buf_of[usize::from(id)], len })
    }

    /// The Ethernet frame (without the virtio header).
    pub fn frame(&self, frame: &RxFrame) -> &[u8] {
        // The device wrote the buffer before it published it in the used ring.
        fence(Ordering::SeqCst);
        &self.bufs.0[usize::from(frame.buf)][HDR_LEN..HDR_LEN + frame.len]
    }

    /// Gives the frame's buffer back to the device.
    pub fn repost(&mut self, frame: RxFrame) {
        self.post(frame.buf);
    }

    fn post(&mut self, buf: u16) {
        let desc =
            Buffer { addr: self.bufs.0[usize::from(buf)].as_ptr() as u64, len: BUF_LEN as u32, device_writes: true };
        // A descriptor is free for every buffer the driver holds.
        if let Some(id) = self.queue.add(&[desc]) {
            self.buf_of[usize::from(id)] = buf;
        }
    }

    /// Notifies the device of reposted buffers if it ran low (and wants
    /// notifications): a device that delivers frames at any exit does not
    /// need one otherwise.
    pub fn flush(&mut self) {
        if self.low {
            self.low = false;
            if self.queue.device_wants_notify() {
                self.transport.notify(RX_QUEUE);
            }
        }
    }
}

impl Tx {
    /// Reclaims the frames the device has sent. True if a buffer is free
    /// for [`Self::send`]; when the ring is full of unsent frames it
    /// notifies the device first.
    pub fn reserve(&mut self) -> bool {
        while self.queue.pop_used().is_some() {}
        if self.queue.num_free() == 0 && self.pending > 0 {
            // A notify even if the device polls: the ring is full now.
            self.pending = 0;
            self.transport.notify(TX_QUEUE);
            while self.queue.pop_used().is_some() {}
        }
        self.queue.num_free() > 0
    }

    /// Queues a frame of `len` bytes (at most [`MAX_FRAME`]) that `fill`
    /// writes; it goes out at the next [`Self::flush`]. None if no buffer
    /// is free (see [`Self::reserve`]).
    pub fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        let id = self.queue.next_head()?;
        let len = len.min(BUF_LEN - HDR_LEN);
        let buf = &mut self.bufs.0[usize::from(id)];
        buf[..HDR_LEN].fill(0);
        let result = fill(&mut buf[HDR_LEN..HDR_LEN + len]);
        let desc = Buffer { addr: buf.as_ptr() as u64, len: (HDR_LEN + len) as u32, device_writes: false };
        let added = self.queue.add(&[desc]);
        debug_assert_eq!(added, Some(id));
        self.pending += 1;
        Some(result)
    }

    /// Frames queued since the last notify.
    pub fn pending(&self) -> usize {
        usize::from(self.pending)
    }

    /// Notifies the device of the queued frames (one exit per batch),
    /// unless it said it needs no notify (`VIRTQ_USED_F_NO_NOTIFY`: ftvmm
    /// picks them up at the guest's next exit, which an idle or a poll
    /// makes anyway).
    pub fn flush(&mut self) {
        if self.pending > 0 {
            self.pending = 0;
            if self.queue.device_wants_notify() {
                self.transport.notify(TX_QUEUE);
            }
        }
    }
}
