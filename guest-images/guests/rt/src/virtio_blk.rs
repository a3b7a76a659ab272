//! A virtio-blk driver for ftvmm's virtio-mmio disk (at 0xd000_0000, IRQ 5):
//! one queue of 16 descriptors, one request at a time, 512-byte sectors.
//!
//! ftvmm completes a request during the queue-notify exit itself, so the used
//! ring has normally advanced when the notify returns; the driver still waits
//! for it (idling until an interrupt) as a driver for a real device would.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const BASE: usize = 0xd000_0000;
/// PIC line of the disk.
pub const IRQ: u8 = 5;
pub const SECTOR: usize = 512;
const QSIZE: usize = 16;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(16))]
struct Ring {
    desc: [Desc; QSIZE],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QSIZE],
    used_event: u16,
    _pad: [u8; 2],
    used_flags: u16,
    used_idx: u16,
    used_ring: [(u32, u32); QSIZE],
    avail_event: u16,
}

#[repr(C, align(16))]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

static mut RING: Ring = Ring {
    desc: [Desc { addr: 0, len: 0, flags: 0, next: 0 }; QSIZE],
    avail_flags: 0,
    avail_idx: 0,
    avail_ring: [0; QSIZE],
    used_event: 0,
    _pad: [0; 2],
    used_flags: 0,
    used_idx: 0,
    used_ring: [(0, 0); QSIZE],
    avail_event: 0,
};
static mut HEADER: Header = Header { kind: 0, reserved: 0, sector: 0 };
static mut STATUS: u8 = 0xff;

fn reg_read(offset: usize) -> u32 {
    // SAFETY: the virtio-mmio registers are identity-mapped MMIO; each access
    // exits to the VMM.
    unsafe { read_volatile((BASE + offset) as *const u32) }
}

fn reg_write(offset: usize, value: u32) {
    // SAFETY: as for reg_read.
    unsafe { write_volatile((BASE + offset) as *mut u32, value) }
}

fn on_interrupt(_irq: u8) {
    let status = reg_read(0x060);
    reg_write(0x064, status);
}

/// The disk, once initialised.
pub struct Disk {
    sectors: u64,
    last_used: u16,
}

/// Finds and initialises the disk; None if the VM has none.
pub fn init() -> Option<Disk> {
    if reg_read(0x000) != 0x7472_6976 || reg_read(0x004) != 2 || reg_read(0x008) != 2 {
        return None;
    }
    reg_write(0x070, 0); // reset
    reg_write(0x070, 1 | 2); // ACKNOWLEDGE | DRIVER
    reg_write(0x014, 1);
    if reg_read(0x010) & 1 == 0 {
        return None; // no VIRTIO_F_VERSION_1
    }
    reg_write(0x024, 0);
    reg_write(0x020, 1 << 9); // FLUSH
    reg_write(0x024, 1);
    reg_write(0x020, 1); // VERSION_1
    reg_write(0x070, 1 | 2 | 8); // FEATURES_OK
    if reg_read(0x070) & 8 == 0 {
        return None;
    }
    reg_write(0x030, 0);
    if (reg_read(0x034) as usize) < QSIZE {
        return None;
    }
    reg_write(0x038, QSIZE as u32);
    // SAFETY: only addresses of the statics are taken; the device reads them.
    let (desc, avail, used) =
        unsafe { (addr_of!(RING.desc) as u64, addr_of!(RING.avail_flags) as u64, addr_of!(RING.used_flags) as u64) };
    for (offset, addr) in [(0x080, desc), (0x090, avail), (0x0a0, used)] {
        reg_write(offset, addr as u32);
        reg_write(offset + 4, (addr >> 32) as u32);
    }
    reg_write(0x044, 1);
    crate::set_irq_handler(IRQ, on_interrupt);
    crate::hw::pic_unmask(IRQ);
    reg_write(0x070, 1 | 2 | 8 | 4); // DRIVER_OK
    let sectors = u64::from(reg_read(0x100)) | (u64::from(reg_read(0x104)) << 32);
    Some(Disk { sectors, last_used: 0 })
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
        // SAFETY: one request at a time; the device only touches the ring,
        // header, status and data buffer during the notify exit below, and
        // the interrupt handler never touches them.
        unsafe {
            let ring = &mut *addr_of_mut!(RING);
            write_volatile(addr_of_mut!(HEADER), Header { kind, reserved: 0, sector });
            write_volatile(addr_of_mut!(STATUS), 0xff);
            ring.desc[0] = Desc { addr: addr_of!(HEADER) as u64, len: 16, flags: F_NEXT, next: 1 };
            let status = Desc { addr: addr_of!(STATUS) as u64, len: 1, flags: F_WRITE, next: 0 };
            if len == 0 {
                ring.desc[0].next = 2;
            } else {
                let flags = F_NEXT | if device_writes { F_WRITE } else { 0 };
                ring.desc[1] = Desc { addr: data, len, flags, next: 2 };
            }
            ring.desc[2] = status;
            let idx = read_volatile(addr_of!(ring.avail_idx));
            write_volatile(addr_of_mut!(ring.avail_ring[usize::from(idx) % QSIZE]), 0);
            fence(Ordering::SeqCst);
            write_volatile(addr_of_mut!(ring.avail_idx), idx.wrapping_add(1));
            fence(Ordering::SeqCst);
            reg_write(0x050, 0);
            while read_volatile(addr_of!(ring.used_idx)) == self.last_used {
                crate::wait_for_interrupt();
            }
            self.last_used = self.last_used.wrapping_add(1);
            fence(Ordering::SeqCst);
            read_volatile(addr_of!(STATUS)) == 0
        }
    }
}
