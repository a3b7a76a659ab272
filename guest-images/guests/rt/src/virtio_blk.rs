//! A virtio-blk driver on the virtio-mmio transport ([`crate::virtio`]):
//! one request queue of 128 descriptors, up to [`MAX_REQUESTS`] requests in
//! flight, 512-byte sectors.
//!
//! # Queued requests
//!
//! Like Linux's driver, it separates submitting from notifying and from
//! completing, so that many requests cost one queue notify (one MMIO exit,
//! about 40 µs under ftvmm) and one interrupt:
//!
//! - [`Disk::submit_read`], [`Disk::submit_write`], [`Disk::submit_flush`]
//!   put a request (header, data, status: three descriptors) on the ring and
//!   return a [`Token`], or give the data back when all [`MAX_REQUESTS`]
//!   slots are taken (or the length is not a positive multiple of 512);
//! - [`Disk::kick`] notifies the device once for everything submitted since
//!   the last kick;
//! - [`Disk::poll`] takes the next completed request, if any, reading the
//!   used ring in memory (no exit); [`Disk::wait_any`], [`Disk::wait`] and
//!   [`Disk::wait_all`] idle with [`crate::wait_for_interrupt`] until the
//!   device has used what they wait for (kicking first if needed). Every
//!   [`Completion`] says whether its request succeeded.
//!
//! Each request has a slot (0..[`MAX_REQUESTS`], [`Token::slot`]) with its
//! own header and status byte, so callers can keep per-request state in an
//! array indexed by it. A slot is busy from submission until its completion
//! has been taken (by `poll`, `wait_any`, `wait` or `wait_all`).
//!
//! # Buffers
//!
//! The device reads and writes a request's buffer whenever it serves it,
//! possibly long after the submitting call returned. The queued calls
//! therefore take buffers the driver can hold for as long as that: a
//! `&'static mut [u8]` ([`Data::Owned`], given back in the request's
//! [`Completion`]) or, for a write, a `&'static [u8]` nobody writes any more
//! ([`Data::Shared`], which several requests may share). No unsafe code is
//! needed to use them, and a buffer is never reachable by the caller while
//! the device may still be writing it.
//!
//! The blocking calls ([`Disk::read`], [`Disk::write`], [`Disk::flush`],
//! [`Disk::write_and_flush`]) take ordinary borrowed buffers: they are built
//! on the same queue but do not return before the device has completed
//! their requests. They need free slots: they fail if every slot holds a
//! request of the queued API (which they do not complete for their owner).
//!
//! # Ordering and flushes
//!
//! Per the virtio specification a FLUSH makes durable the writes that had
//! *completed* when the device took it; it says nothing of writes still in
//! the queue, which a device may serve in any order. A flush submitted after
//! writes in the same notify ([`Disk::write_and_flush`] does just that)
//! covers them only because ftvmm serves the available ring strictly in
//! order, each request completed before the next one starts. A driver for
//! an arbitrary device would wait for the writes before submitting the
//! flush, at the price of a second notify.
//!
//! ftvmm serves requests synchronously at the notify exit (a very large
//! notify may be finished over the following exits, still in ring order)
//! and raises the interrupt once when it used any, so the used ring has
//! normally advanced when [`Disk::kick`] returns; the waits still idle until
//! an interrupt when it has not, as a driver for a real device must.
//!
//! ftvmm moves at most 16 MiB per request ([`MAX_REQUEST_BYTES`]); larger
//! requests fail with an I/O error.

use crate::virtio::{self, device_id, Buffer, Transport, Virtqueue};
use crate::Static;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

pub const SECTOR: usize = 512;
/// Requests in flight at most: each takes a slot with its header and status.
pub const MAX_REQUESTS: usize = 32;
/// The most data ftvmm's device moves in one request.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Descriptors of the queue: room for every slot's three-descriptor chain.
const QSIZE: usize = 128;
const _: () = assert!(MAX_REQUESTS * 3 <= QSIZE && MAX_REQUESTS < 256);

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// The device has a FLUSH command (else it writes through).
pub const F_FLUSH: u64 = 1 << 9;
const S_OK: u8 = 0;
/// What a status byte holds until the device writes it.
const S_PENDING: u8 = 0xff;
const NO_SLOT: u8 = u8::MAX;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// What the device reads and writes apart from data buffers: the queue, and
/// each slot's request header and status byte.
struct Mem {
    queue: Virtqueue<QSIZE>,
    headers: [Header; MAX_REQUESTS],
    status: [u8; MAX_REQUESTS],
}

static MEM: Static<Mem> = Static::new(Mem {
    queue: Virtqueue::new(),
    headers: [Header { kind: 0, reserved: 0, sector: 0 }; MAX_REQUESTS],
    status: [0; MAX_REQUESTS],
});

/// The data buffer of a queued request, which the driver holds until the
/// request completes and then hands back in its [`Completion`].
#[derive(Debug, Default)]
pub enum Data {
    /// No buffer: a flush, or a request of the blocking API.
    #[default]
    None,
    /// A buffer the device reads into (a read) or writes from (a write).
    Owned(&'static mut [u8]),
    /// A write's source that nothing writes any more; several requests may
    /// write it at once.
    Shared(&'static [u8]),
}

impl Data {
    /// The owned buffer, if that is what this is.
    pub fn into_owned(self) -> Option<&'static mut [u8]> {
        match self {
            Data::Owned(buf) => Some(buf),
            _ => None,
        }
    }

    /// (address, length) of the buffer.
    fn span(&self) -> (u64, usize) {
        match self {
            Data::None => (0, 0),
            Data::Owned(buf) => (buf.as_ptr() as u64, buf.len()),
            Data::Shared(buf) => (buf.as_ptr() as u64, buf.len()),
        }
    }
}

/// A submitted request: its slot and the serial number that tells it from
/// later requests in the same slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    slot: u8,
    serial: u64,
}

impl Token {
    /// The request's slot, in 0..[`MAX_REQUESTS`]: an index for the
    /// caller's own per-request state. Unique among requests not yet taken.
    pub fn slot(&self) -> usize {
        usize::from(self.slot)
    }

    /// The request's number: requests are numbered from 0 in submission order.
    pub fn serial(&self) -> u64 {
        self.serial
    }
}

/// A request the device has completed.
#[derive(Debug)]
pub struct Completion {
    pub token: Token,
    /// The device reported success (status OK).
    pub ok: bool,
    /// The request's buffer, back from the device.
    pub data: Data,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    /// On the ring; the device has not used it yet.
    InFlight,
    /// Used by the device, not yet taken: `order` ranks its completion.
    Done {
        ok: bool,
        order: u64,
    },
}

struct Slot {
    state: State,
    serial: u64,
    data: Data,
}

/// The disk, once initialised.
pub struct Disk {
    transport: Transport,
    mem: &'static mut Mem,
    sectors: u64,
    features: u64,
    slots: [Slot; MAX_REQUESTS],
    /// The slot whose chain starts at each descriptor (NO_SLOT if none).
    slot_of_head: [u8; QSIZE],
    /// Requests put on the ring since the last notify.
    unkicked: usize,
    /// Requests on the ring that the device has not used yet.
    in_flight: usize,
    next_serial: u64,
    /// Completions seen so far (ranks them: they are taken in this order).
    completions: u64,
}

/// Finds and initialises the disk; None if the VM has none (or it cannot be
/// set up, or it was already initialised).
pub fn init() -> Option<Disk> {
    let transport = virtio::find(device_id::BLOCK)?;
    // FLUSH if the device has it; a device without it writes through.
    let features = transport.negotiate(F_FLUSH, 0).ok()?;
    let mem = MEM.take()?;
    transport.setup_queue(0, &mut mem.queue).ok()?;
    transport.enable_interrupt();
    transport.driver_ok();
    let sectors = transport.config_u64(0);
    Some(Disk {
        transport,
        mem,
        sectors,
        features,
        slots: core::array::from_fn(|_| Slot { state: State::Free, serial: 0, data: Data::None }),
        slot_of_head: [NO_SLOT; QSIZE],
        unkicked: 0,
        in_flight: 0,
        next_serial: 0,
        completions: 0,
    })
}

impl Disk {
    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The negotiated feature bits ([`F_FLUSH`]...).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Slots free for a new request.
    pub fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.state == State::Free).count()
    }

    /// Requests submitted and not yet used by the device.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a read of `buf.len()` bytes (a positive multiple of 512) from
    /// `sector` into `buf`, which comes back with the completion. Gives `buf`
    /// back if no slot is free or the length is wrong.
    pub fn submit_read(&mut self, sector: u64, buf: &'static mut [u8]) -> Result<Token, &'static mut [u8]> {
        self.submit(T_IN, sector, Data::Owned(buf)).map_err(|data| data.into_owned().unwrap_or_default())
    }

    /// Queues a write of `data` (an [`Data::Owned`] or [`Data::Shared`]
    /// buffer, a positive multiple of 512 bytes) at `sector`. Gives `data`
    /// back if no slot is free or the length is wrong.
    pub fn submit_write(&mut self, sector: u64, data: Data) -> Result<Token, Data> {
        if matches!(data, Data::None) {
            return Err(data);
        }
        self.submit(T_OUT, sector, data)
    }

    /// Queues a flush. See the module doc for what it covers.
    pub fn submit_flush(&mut self) -> Option<Token> {
        self.submit(T_FLUSH, 0, Data::None).ok()
    }

    /// Notifies the device of every request submitted since the last kick:
    /// one exit for all of them. Does nothing if there are none.
    pub fn kick(&mut self) {
        if self.unkicked > 0 {
            self.unkicked = 0;
            self.transport.notify(0);
        }
    }

    /// The next completed request not yet taken (in completion order), if
    /// any. Reads the used ring in memory: no exit.
    pub fn poll(&mut self) -> Option<Completion> {
        self.collect();
        let slot = (0..MAX_REQUESTS)
            .filter_map(|i| match self.slots[i].state {
                State::Done { order, .. } => Some((order, i)),
                _ => None,
            })
            .min()?
            .1;
        Some(self.take(slot))
    }

    /// The next completed request, waiting (kicking first if needed) until
    /// there is one. None if no request is in flight or completed.
    pub fn wait_any(&mut self) -> Option<Completion> {
        loop {
            if let Some(done) = self.poll() {
                return Some(done);
            }
            if self.in_flight == 0 {
                return None;
            }
            self.idle();
        }
    }

    /// Waits (kicking first if needed) until the request of `token` has
    /// completed and takes its completion. Other requests that complete
    /// meanwhile stay for [`Self::poll`]. None if `token` is not a request
    /// of this disk that is still to be taken.
    pub fn wait(&mut self, token: Token) -> Option<Completion> {
        let slot = self.slots.get(token.slot())?;
        if slot.serial != token.serial || slot.state == State::Free {
            return None;
        }
        loop {
            self.collect();
            if matches!(self.slots[token.slot()].state, State::Done { .. }) {
                return Some(self.take(token.slot()));
            }
            self.idle();
        }
    }

    /// Waits (kicking first if needed) until every submitted request has
    /// completed, then yields every completion not yet taken, in completion
    /// order. What the iterator is not asked for stays for [`Self::poll`].
    pub fn wait_all(&mut self) -> Drain<'_> {
        loop {
            self.collect();
            if self.in_flight == 0 {
                return Drain(self);
            }
            self.idle();
        }
    }

    /// Reads `buf.len()` bytes (a positive multiple of 512) from `sector`,
    /// waiting for the device.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> bool {
        let (addr, len) = (buf.as_mut_ptr() as u64, buf.len());
        // SAFETY: the request is waited for before `buf`'s borrow ends.
        let token = unsafe { self.submit_raw(T_IN, sector, addr, len) };
        token.is_some_and(|t| self.wait_ok(t))
    }

    /// Writes `buf` (a positive multiple of 512 bytes) at `sector`, waiting
    /// for the device.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> bool {
        // SAFETY: the request is waited for before `buf`'s borrow ends.
        let token = unsafe { self.submit_raw(T_OUT, sector, buf.as_ptr() as u64, buf.len()) };
        token.is_some_and(|t| self.wait_ok(t))
    }

    /// Makes every completed write durable, waiting for the device.
    pub fn flush(&mut self) -> bool {
        self.submit_flush().is_some_and(|t| self.wait_ok(t))
    }

    /// Writes `buf` (a positive multiple of 512 bytes) at `sector` and makes
    /// it durable: the write and a flush behind it go to the device with one
    /// notify and are waited for together. True if both succeeded. Relies on
    /// the device serving the ring in order (see the module doc).
    pub fn write_and_flush(&mut self, sector: u64, buf: &[u8]) -> bool {
        // SAFETY: the request is waited for below, before `buf`'s borrow ends.
        let Some(write) = (unsafe { self.submit_raw(T_OUT, sector, buf.as_ptr() as u64, buf.len()) }) else {
            return false;
        };
        let flush = self.submit_flush();
        self.kick();
        let wrote = self.wait_ok(write);
        let flushed = flush.is_some_and(|t| self.wait_ok(t));
        wrote && flushed
    }

    fn wait_ok(&mut self, token: Token) -> bool {
        self.wait(token).is_some_and(|c| c.ok)
    }

    fn submit(&mut self, kind: u32, sector: u64, data: Data) -> Result<Token, Data> {
        let (addr, len) = data.span();
        // SAFETY: `data` is a 'static buffer (or none), and the slot holds it
        // until the request's completion is taken, so it outlives the request
        // and the caller cannot reach it meanwhile (a Shared one is never
        // written by anyone).
        match unsafe { self.submit_raw(kind, sector, addr, len) } {
            Some(token) => {
                self.slots[token.slot()].data = data;
                Ok(token)
            }
            None => Err(data),
        }
    }

    /// Puts a request on the ring: header, the `len` bytes at `addr` (none
    /// for a flush), status. None if no slot is free or `len` is not a
    /// positive multiple of 512 (for a read or write).
    ///
    /// # Safety
    /// Unless `len` is 0, the `len` bytes at `addr` must stay valid, and
    /// untouched by anything but the device (for a write: unwritten), until
    /// the request's completion has been taken (`poll`, `wait_any`, `wait`,
    /// `wait_all`); if it never is, forever.
    unsafe fn submit_raw(&mut self, kind: u32, sector: u64, addr: u64, len: usize) -> Option<Token> {
        let has_data = kind != T_FLUSH;
        if has_data && (len == 0 || !len.is_multiple_of(SECTOR) || len > u32::MAX as usize) {
            return None;
        }
        let slot = self.slots.iter().position(|s| s.state == State::Free)?;
        let mem = &mut *self.mem;
        // SAFETY: this slot's header and status are not in any chain the
        // device holds (the slot is free); the device reads them at exits.
        unsafe {
            write_volatile(addr_of_mut!(mem.headers[slot]), Header { kind, reserved: 0, sector });
            write_volatile(addr_of_mut!(mem.status[slot]), S_PENDING);
        }
        let header = Buffer { addr: addr_of!(mem.headers[slot]) as u64, len: 16, device_writes: false };
        let status = Buffer { addr: addr_of!(mem.status[slot]) as u64, len: 1, device_writes: true };
        let buffer = Buffer { addr, len: len as u32, device_writes: kind == T_IN };
        let chain = if has_data { &[header, buffer, status][..] } else { &[header, status][..] };
        // The queue has three descriptors for every slot: a free slot has them.
        let head = mem.queue.add(chain)?;
        self.slot_of_head[usize::from(head)] = slot as u8;
        let serial = self.next_serial;
        self.next_serial += 1;
        self.slots[slot] = Slot { state: State::InFlight, serial, data: Data::None };
        self.in_flight += 1;
        self.unkicked += 1;
        Some(Token { slot: slot as u8, serial })
    }

    /// Moves what the device used from the used ring into the slots.
    fn collect(&mut self) {
        while let Some((head, _written)) = self.mem.queue.pop_used() {
            let slot = core::mem::replace(&mut self.slot_of_head[usize::from(head)], NO_SLOT);
            // A head the driver did not post (a confused device) is dropped.
            let Some(s) = self.slots.get_mut(usize::from(slot)) else {
                continue;
            };
            if s.state != State::InFlight {
                continue;
            }
            // SAFETY: a field of the driver's memory, which the device wrote
            // before it used the chain.
            let status = unsafe { read_volatile(addr_of!(self.mem.status[usize::from(slot)])) };
            s.state = State::Done { ok: status == S_OK, order: self.completions };
            self.completions += 1;
            self.in_flight -= 1;
        }
    }

    /// Frees a completed slot and returns its completion.
    fn take(&mut self, slot: usize) -> Completion {
        let s = &mut self.slots[slot];
        let ok = matches!(s.state, State::Done { ok: true, .. });
        s.state = State::Free;
        Completion { token: Token { slot: slot as u8, serial: s.serial }, ok, data: core::mem::take(&mut s.data) }
    }

    /// Kicks if requests await a notify, else idles until an interrupt.
    /// Interrupts come only at exits, so none can slip by between the
    /// caller's look at the used ring and the idle exit; after a kick the
    /// caller looks again (the device has usually served the requests).
    fn idle(&mut self) {
        if self.unkicked > 0 {
            self.kick();
        } else {
            crate::wait_for_interrupt();
        }
    }
}

/// The completions [`Disk::wait_all`] yields.
pub struct Drain<'d>(&'d mut Disk);

impl Iterator for Drain<'_> {
    type Item = Completion;

    fn next(&mut self) -> Option<Completion> {
        self.0.poll()
    }
}
