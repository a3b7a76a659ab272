//! The virtio-mmio transport (register layout version 2, virtio 1.x) that
//! every virtio driver of guest-rt sits on, and a split virtqueue with
//! static storage.
//!
//! Devices are found through the boot info's device table ([`find`]). Each
//! register access is an MMIO exit to the VMM (about 35 µs under ftvmm), so
//! the drivers touch registers only to set a device up and to notify a
//! queue; everything else (used rings, buffers) is read from memory, and
//! interrupts need no acknowledgement ([`on_interrupt`]).
//!
//! Bring-up, in the order virtio 1.x (§3.1.1) prescribes:
//! [`Transport::negotiate`] (reset, ACKNOWLEDGE, DRIVER, features,
//! FEATURES_OK), [`Transport::setup_queue`] per queue, then
//! [`Transport::driver_ok`].

use crate::BootInfo;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// `"virt"`, the value of [`reg::MAGIC`].
pub const MAGIC: u32 = 0x7472_6976;
/// The register layout version this transport speaks (virtio 1.x MMIO).
pub const VERSION: u32 = 2;

/// Register offsets in a device's MMIO window (virtio 1.x §4.2.2).
pub mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const VENDOR_ID: usize = 0x00c;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_STATUS: usize = 0x060;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG_GENERATION: usize = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: usize = 0x100;
}

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 0x80;
}

/// Virtio device ids (virtio 1.x §5).
pub mod device_id {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
}

/// Interrupt status bits: a used ring was updated / the configuration changed.
pub const INTERRUPT_USED_RING: u32 = 1;
pub const INTERRUPT_CONFIG: u32 = 2;

/// Feature bit every virtio 1.x device and driver must agree on.
pub const F_VERSION_1: u64 = 1 << 32;

/// Descriptor flags.
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// `avail.flags`: the driver does not want an interrupt for this queue.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device does not need notifications for this queue.
const USED_F_NO_NOTIFY: u16 = 1;

/// Where a VMM of the first boot-info format put its only virtio device.
/// Used only when the boot info has no device table; see [`find`].
const LEGACY_PROBE_BASE: u64 = 0xd000_0000;
const LEGACY_PROBE_IRQ: u32 = 5;

/// Why a device could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// The device does not offer a feature the driver requires.
    MissingFeature(u64),
    /// The device did not keep FEATURES_OK set.
    FeaturesRejected,
    /// The device has no such queue, or a smaller one than the driver needs.
    QueueTooSmall { queue: u16, max: u32 },
    /// The queue was already set up (ready) before the driver touched it.
    QueueInUse(u16),
}

/// One virtio-mmio device.
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    base: usize,
    irq: u8,
    device_id: u32,
}

/// The device with virtio id `device_id` (the first one, in table order).
///
/// The boot info's device table says where it is. A boot info without a
/// valid table (a VMM of the first format left it zero) gets one defensive
/// probe of the address such a VMM used (0xd000_0000, IRQ 5); unclaimed
/// MMIO reads as all-ones there, so the probe finds nothing when nothing
/// is there.
pub fn find(device_id: u32) -> Option<Transport> {
    let info = BootInfo::get()?;
    let mut any_valid = false;
    for slot in info.virtio_devices() {
        any_valid = true;
        if slot.device_id == device_id {
            return Transport::probe(slot.mmio_base, slot.irq, device_id);
        }
    }
    if any_valid {
        return None;
    }
    // Transitional: no device table in the boot info.
    Transport::probe(LEGACY_PROBE_BASE, LEGACY_PROBE_IRQ, device_id)
}

/// Every virtio interrupt's handler: nothing to do. ftvmm raises a virtio
/// interrupt as an edge (a pulse on the device's PIC line per batch of used
/// buffers), never as a level held until the driver acknowledges it, so
/// the handler writes no INTERRUPT_ACK (which would be one more MMIO exit
/// per interrupt); the drivers learn what happened from their used rings.
/// The interrupt's work is to wake an idle guest, done by taking it.
fn on_interrupt(_irq: u8) {}

impl Transport {
    /// The device at `base` if its registers say it is a version-2
    /// virtio-mmio device with id `device_id`.
    fn probe(base: u64, irq: u32, device_id: u32) -> Option<Transport> {
        let t = Transport { base: base as usize, irq: irq as u8, device_id };
        if t.read(reg::MAGIC) != MAGIC || t.read(reg::VERSION) != VERSION || t.read(reg::DEVICE_ID) != device_id {
            return None;
        }
        Some(t)
    }

    /// PIC line of the device's interrupt.
    pub fn irq(&self) -> u8 {
        self.irq
    }

    /// Guest-physical address of the device's registers.
    pub fn base(&self) -> u64 {
        self.base as u64
    }

    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The 32-bit register at `offset`.
    pub fn read(&self, offset: usize) -> u32 {
        // SAFETY: the device's register window is identity-mapped MMIO (the
        // boot info or the legacy probe put it in the MMIO hole); each access
        // exits to the VMM, which emulates it.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    /// Writes the 32-bit register at `offset`.
    pub fn write(&self, offset: usize, value: u32) {
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }

    fn set_status(&self, value: u32) {
        self.write(reg::STATUS, value);
    }

    /// Resets the device, acknowledges it and negotiates features: the
    /// driver accepts `wanted` (plus VERSION_1) of what the device offers
    /// and requires every bit of `required` (VERSION_1 always). Returns the
    /// negotiated features once the device accepted them (FEATURES_OK).
    pub fn negotiate(&self, wanted: u64, required: u64) -> Result<u64, InitError> {
        self.set_status(0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(reg::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(reg::DEVICE_FEATURES)) << (32 * sel);
        }
        let required = required | F_VERSION_1;
        let missing = required & !offered;
        if missing != 0 {
            self.fail();
            return Err(InitError::MissingFeature(missing));
        }
        let features = offered & (wanted | required);
        for sel in 0..2u32 {
            self.write(reg::DRIVER_FEATURES_SEL, sel);
            self.write(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.read(reg::STATUS) & status::FEATURES_OK == 0 {
            self.fail();
            return Err(InitError::FeaturesRejected);
        }
        Ok(features)
    }

    /// Sets queue `index` up on `queue`'s rings (resetting `queue`).
    pub fn setup_queue<const N: usize>(&self, index: u16, queue: &mut Virtqueue<N>) -> Result<(), InitError> {
        self.write(reg::QUEUE_SEL, u32::from(index));
        if self.read(reg::QUEUE_READY) != 0 {
            self.fail();
            return Err(InitError::QueueInUse(index));
        }
        let max = self.read(reg::QUEUE_NUM_MAX);
        if (max as usize) < N {
            self.fail();
            return Err(InitError::QueueTooSmall { queue: index, max });
        }
        queue.reset();
        self.write(reg::QUEUE_NUM, N as u32);
        let (desc, driver, device) = queue.addresses();
        for (low, addr) in
            [(reg::QUEUE_DESC_LOW, desc), (reg::QUEUE_DRIVER_LOW, driver), (reg::QUEUE_DEVICE_LOW, device)]
        {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
        Ok(())
    }

    /// Installs the interrupt handler for the device's line and unmasks it
    /// (after `hw::pic_init`).
    pub fn enable_interrupt(&self) {
        crate::set_irq_handler(self.irq, on_interrupt);
        crate::hw::pic_unmask(self.irq);
    }

    /// Tells the device the driver is ready: it may use the queues now.
    pub fn driver_ok(&self) {
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    }

    /// Gives up on the device (sets FAILED).
    pub fn fail(&self) {
        let current = self.read(reg::STATUS);
        self.set_status(current | status::FAILED);
    }

    /// Notifies the device that queue `index` has new buffers. The ring
    /// writes before it are made visible first.
    pub fn notify(&self, index: u16) {
        fence(Ordering::SeqCst);
        self.write(reg::QUEUE_NOTIFY, u32::from(index));
        fence(Ordering::SeqCst);
    }

    /// The pending interrupt causes ([`INTERRUPT_USED_RING`], [`INTERRUPT_CONFIG`]).
    pub fn interrupt_status(&self) -> u32 {
        self.read(reg::INTERRUPT_STATUS)
    }

    /// Acknowledges the interrupt causes `bits`.
    pub fn ack_interrupt(&self, bits: u32) {
        self.write(reg::INTERRUPT_ACK, bits);
    }

    /// The configuration generation (changes when the device changes its
    /// configuration space).
    pub fn config_generation(&self) -> u32 {
        self.read(reg::CONFIG_GENERATION)
    }

    /// The byte at `offset` of the device configuration space.
    pub fn config_u8(&self, offset: usize) -> u8 {
        // SAFETY: as for `read`; the config space is byte-addressable.
        unsafe { read_volatile((self.base + reg::CONFIG + offset) as *const u8) }
    }

    /// The little-endian u16 at `offset` (2-aligned) of the configuration space.
    pub fn config_u16(&self, offset: usize) -> u16 {
        // SAFETY: as for `read`; virtio wants 16-bit fields read 16 bits wide.
        unsafe { read_volatile((self.base + reg::CONFIG + offset) as *const u16) }
    }

    /// The little-endian u32 at `offset` (4-aligned) of the configuration space.
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.read(reg::CONFIG + offset)
    }

    /// The little-endian u64 at `offset` (8-aligned) of the configuration
    /// space, read as two halves under one configuration generation.
    pub fn config_u64(&self, offset: usize) -> u64 {
        loop {
            let generation = self.config_generation();
            let value = u64::from(self.config_u32(offset)) | (u64::from(self.config_u32(offset + 4)) << 32);
            if self.config_generation() == generation {
                return value;
            }
        }
    }

    /// Bytes `offset..offset + out.len()` of the configuration space, read a
    /// byte at a time under one configuration generation.
    pub fn config_bytes(&self, offset: usize, out: &mut [u8]) {
        loop {
            let generation = self.config_generation();
            for (i, b) in out.iter_mut().enumerate() {
                *b = self.config_u8(offset + i);
            }
            if self.config_generation() == generation {
                return;
            }
        }
    }
}

/// A split-virtqueue descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(16))]
struct DescTable<const N: usize>([Desc; N]);

#[repr(C, align(2))]
struct AvailRing<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [u16; N],
    used_event: u16,
}

#[repr(C, align(4))]
struct UsedRing<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [UsedElem; N],
    avail_event: u16,
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    /// Guest-physical (= virtual: memory is identity-mapped) address.
    pub addr: u64,
    pub len: u32,
    /// The device writes it (receive buffers, status bytes); else it reads it.
    pub device_writes: bool,
}

/// A split virtqueue of `N` descriptors (a power of two up to 32768) and
/// the driver's bookkeeping of it: a free list of descriptors, the shadow of
/// the available index and how far the used ring has been consumed.
///
/// It lives in a [`crate::Static`], so its rings have a fixed address the
/// device can be given. The device writes the used ring (and the buffers)
/// only at the guest's exits to the VMM; every access to what the device
/// shares is volatile, so none is cached across an exit.
pub struct Virtqueue<const N: usize> {
    desc: DescTable<N>,
    avail: AvailRing<N>,
    used: UsedRing<N>,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
}

impl<const N: usize> Default for Virtqueue<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Virtqueue<N> {
    const VALID: () = assert!(N.is_power_of_two() && N <= 32768, "a virtqueue has 2^k <= 32768 descriptors");

    /// An empty queue (all zero, so a static of it lands in .bss); the
    /// transport's `setup_queue` resets it before use.
    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::VALID;
        Virtqueue {
            desc: DescTable([Desc { addr: 0, len: 0, flags: 0, next: 0 }; N]),
            avail: AvailRing { flags: 0, idx: 0, ring: [0; N], used_event: 0 },
            used: UsedRing { flags: 0, idx: 0, ring: [UsedElem { id: 0, len: 0 }; N], avail_event: 0 },
            free_head: 0,
            num_free: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    fn reset(&mut self) {
        for i in 0..N {
            // Chain every descriptor into the free list.
            self.desc.0[i] = Desc { addr: 0, len: 0, flags: 0, next: ((i + 1) % N) as u16 };
        }
        // SAFETY: the pointers are to fields of self, which the device does
        // not use before the queue is (re)enabled.
        unsafe {
            write_volatile(addr_of_mut!(self.avail.flags), 0);
            write_volatile(addr_of_mut!(self.avail.idx), 0);
            write_volatile(addr_of_mut!(self.used.flags), 0);
            write_volatile(addr_of_mut!(self.used.idx), 0);
        }
        self.free_head = 0;
        self.num_free = N as u16;
        self.avail_idx = 0;
        self.last_used = 0;
    }

    /// (descriptor table, driver area, device area) addresses.
    fn addresses(&self) -> (u64, u64, u64) {
        (addr_of!(self.desc) as u64, addr_of!(self.avail) as u64, addr_of!(self.used) as u64)
    }

    /// Descriptors not in a chain the device owns.
    pub fn num_free(&self) -> usize {
        usize::from(self.num_free)
    }

    /// The head descriptor the next one-descriptor chain will get from
    /// [`Self::add`], if one is free: drivers that keep buffer i with
    /// descriptor i use it to pick the buffer to post.
    pub fn next_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Asks the device not to interrupt when it uses this queue's buffers
    /// (a hint: the device may interrupt anyway).
    pub fn suppress_interrupts(&mut self) {
        // SAFETY: a field of self; the device only reads it.
        unsafe { write_volatile(addr_of_mut!(self.avail.flags), AVAIL_F_NO_INTERRUPT) }
    }

    /// Whether the device wants to be notified of new buffers.
    pub fn device_wants_notify(&self) -> bool {
        // SAFETY: a field of self, written by the device at exits.
        unsafe { read_volatile(addr_of!(self.used.flags)) & USED_F_NO_NOTIFY == 0 }
    }

    /// Makes the chain `bufs` available to the device; returns its head
    /// descriptor, or None if too few descriptors are free. The device sees
    /// it at its next look at the ring (a notify, or whenever it polls).
    pub fn add(&mut self, bufs: &[Buffer]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > usize::from(self.num_free) {
            return None;
        }
        let head = self.free_head;
        let mut id = head;
        for (i, buf) in bufs.iter().enumerate() {
            let d = &mut self.desc.0[usize::from(id)];
            let last = i + 1 == bufs.len();
            let next_free = d.next;
            d.addr = buf.addr;
            d.len = buf.len;
            d.flags = if buf.device_writes { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            if last {
                self.free_head = next_free;
            } else {
                id = next_free;
            }
        }
        self.num_free -= bufs.len() as u16;
        let slot = usize::from(self.avail_idx) % N;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptors and the ring entry are written before the index
        // that publishes them.
        fence(Ordering::SeqCst);
        // SAFETY: fields of self; the device reads them only at exits.
        unsafe {
            write_volatile(addr_of_mut!(self.avail.ring[slot]), head);
            fence(Ordering::SeqCst);
            write_volatile(addr_of_mut!(self.avail.idx), self.avail_idx);
        }
        Some(head)
    }

    /// Whether the device has used a chain the driver has not popped yet.
    pub fn has_used(&self) -> bool {
        // SAFETY: a field of self, written by the device at exits.
        unsafe { read_volatile(addr_of!(self.used.idx)) != self.last_used }
    }

    /// The next chain the device has used: (head descriptor, bytes it
    /// wrote). Its descriptors return to the free list; the buffers are the
    /// driver's again.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used) % N;
        // SAFETY: a field of self, written by the device before it advanced used.idx.
        let elem = unsafe { read_volatile(addr_of!(self.used.ring[slot])) };
        self.last_used = self.last_used.wrapping_add(1);
        let head = (elem.id as usize % N) as u16;
        // Return the chain to the free list.
        let mut id = head;
        let mut count = 1u16;
        while self.desc.0[usize::from(id)].flags & DESC_F_NEXT != 0 && usize::from(count) < N {
            id = self.desc.0[usize::from(id)].next;
            count += 1;
        }
        self.desc.0[usize::from(id)].next = self.free_head;
        self.free_head = head;
        self.num_free += count;
        Some((head, elem.len))
    }
}
