//! A virtio-blk driver on the virtio-mmio transport ([`crate::virtio`]):
//! one queue of 16 descriptors, one request at a time, 512-byte sectors.
//!
//! ftvmm completes a request during the queue-notify exit itself, so the used
//! ring has normally advanced when the notify returns; the driver still waits
//! for it (idling until an interrupt) as a driver for a real device would.

use crate::virtio::{self, device_id, Buffer, Transport, Virtqueue};
use crate::Static;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

pub const SECTOR: usize = 512;
const QSIZE: usize = 16;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const F_FLUSH: u64 = 1 << 9;

#[repr(C, align(16))]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// The request queue and the request header and status byte the device
/// reads and writes.
struct Mem {
    queue: Virtqueue<QSIZE>,
    header: Header,
    status: u8,
}

static MEM: Static<Mem> =
    Static::new(Mem { queue: Virtqueue::new(), header: Header { kind: 0, reserved: 0, sector: 0 }, status: 0 });

/// The disk, once initialised.
pub struct Disk {
    transport: Transport,
    mem: &'static mut Mem,
    sectors: u64,
}

/// Finds and initialises the disk; None if the VM has none (or it cannot be
/// set up, or it was already initialised).
pub fn init() -> Option<Disk> {
    let transport = virtio::find(device_id::BLOCK)?;
    // FLUSH if the device has it; a device without it writes through.
    transport.negotiate(F_FLUSH, 0).ok()?;
    let mem = MEM.take()?;
    transport.setup_queue(0, &mut mem.queue).ok()?;
    transport.enable_interrupt();
    transport.driver_ok();
    let sectors = transport.config_u64(0);
    Some(Disk { transport, mem, sectors })
}

impl Disk {
    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Reads `buf.len()` bytes (a multiple of 512) from `sector`.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> bool {
        self.request(T_IN, sector, buf.as_mut_ptr() as u64, buf.len() as u32, true)
    }

    /// Writes `buf` (a multiple of 512 bytes) at `sector`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> bool {
        self.request(T_OUT, sector, buf.as_ptr() as u64, buf.len() as u32, false)
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> bool {
        self.request(T_FLUSH, 0, 0, 0, false)
    }

    fn request(&mut self, kind: u32, sector: u64, data: u64, len: u32, device_writes: bool) -> bool {
        let mem = &mut *self.mem;
        // SAFETY: fields of the driver's own memory; one request is in flight
        // at a time and the device touches header and status only at exits.
        unsafe {
            write_volatile(addr_of_mut!(mem.header), Header { kind, reserved: 0, sector });
            write_volatile(addr_of_mut!(mem.status), 0xff);
        }
        let header = Buffer { addr: addr_of!(mem.header) as u64, len: 16, device_writes: false };
        let status = Buffer { addr: addr_of!(mem.status) as u64, len: 1, device_writes: true };
        let data = Buffer { addr: data, len, device_writes };
        let chain = if len == 0 { &[header, status][..] } else { &[header, data, status][..] };
        let Some(head) = mem.queue.add(chain) else {
            return false;
        };
        self.transport.notify(0);
        loop {
            match mem.queue.pop_used() {
                Some((id, _)) if id == head => break,
                // Not ours (cannot happen with one request in flight): skip it.
                Some(_) => {}
                None => crate::wait_for_interrupt(),
            }
        }
        // SAFETY: the device wrote the status before it used the chain.
        unsafe { read_volatile(addr_of!(mem.status)) == 0 }
    }
}
