//! The virtio-mmio transport (virtio 1.x, register layout version 2): the
//! one place that knows the registers — magic, version, ids, feature
//! negotiation, queue setup, queue notify, interrupt status and ack, device
//! status, config generation and config space. Every virtio device sits
//! behind it as a [`VirtioDevice`].

use super::{RestoreError, RingError, SavedQueue, VirtioDevice};
use crate::memory::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The register layout of virtio 1.x over MMIO.
pub const VERSION: u32 = 2;
/// "FTVM", little-endian.
pub const VENDOR_ID: u32 = 0x4d56_5446;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

/// Interrupt status: the device used buffers.
pub const INT_USED_RING: u32 = 1;

/// A virtio device on its virtio-mmio registers.
pub struct MmioTransport<D: VirtioDevice> {
    pub device: D,
    queues: Vec<Queue>,
    regs: Registers,
}

/// The transport's registers (everything but the queues and the device).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Registers {
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    queue_sel: u32,
}

/// The saved state of a transport and its device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MmioState<S> {
    regs: Registers,
    queues: Vec<SavedQueue>,
    pub device: S,
}

/// What an MMIO write asks of the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioEvent {
    None,
    /// The driver notified this queue: let the device process it.
    QueueNotify(usize),
}

/// `avail.flags`: the driver does not want an interrupt when this queue's
/// buffers are used (virtio-queue does not look at it).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver of `queue` wants an interrupt for used buffers: it
/// did not set [`VIRTQ_AVAIL_F_NO_INTERRUPT`]. A flag in guest memory, so a
/// replay decides the same; an unreadable ring asks for one.
fn wants_interrupt(queue: &Queue, mem: &GuestMem) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    let flags = mem.read_obj::<u16>(GuestAddress(queue.avail_ring())).unwrap_or(0);
    u16::from_le(flags) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
}

fn new_queues(sizes: &[u16]) -> Vec<Queue> {
    // A device's maximum queue sizes are powers of two up to 32768, which
    // virtio-queue always accepts.
    sizes.iter().map(|&n| Queue::new(n).unwrap_or_else(|_| unreachable!("queue size {n}"))).collect()
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport { device, queues, regs: Registers::default() }
    }

    /// The queue the driver selected, if it exists.
    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    /// Whether the driver has finished setting the device up and it works.
    pub fn driver_ok(&self) -> bool {
        const DRIVER_OK: u32 = 4;
        self.regs.status & DRIVER_OK != 0 && self.regs.status & STATUS_FAILED == 0
    }

    /// The features both sides agreed on.
    pub fn acked_features(&self) -> u64 {
        self.regs.driver_features
    }

    /// A read of `data.len()` bytes at `offset` in the register window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let queue = self.queues.get(self.regs.queue_sel as usize);
        let value: u32 = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.regs.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.regs.interrupt_status,
            reg::STATUS => self.regs.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A write at `offset` in the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> MmioEvent {
        let mut bytes = [0u8; 4];
        for (i, b) in data.iter().take(4).enumerate() {
            bytes[i] = *b;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.regs.device_features_sel = value,
            reg::DRIVER_FEATURES if self.regs.driver_features_sel < 2 => {
                let shift = 32 * u64::from(self.regs.driver_features_sel);
                self.regs.driver_features &= !(0xffff_ffffu64 << shift);
                // The driver cannot accept what the device did not offer.
                self.regs.driver_features |= (u64::from(value) << shift) & self.device.features();
            }
            reg::DRIVER_FEATURES_SEL => self.regs.driver_features_sel = value,
            reg::QUEUE_SEL => self.regs.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected() {
                    let n = value.min(u32::from(q.max_size())) as u16;
                    q.set_size(n);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_NOTIFY => {
                let index = value as usize;
                if index < self.queues.len() {
                    return MmioEvent::QueueNotify(index);
                }
            }
            reg::INTERRUPT_ACK => self.regs.interrupt_status &= !value,
            reg::STATUS => {
                if value == 0 {
                    self.reset();
                } else {
                    self.regs.status = value;
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => {}
        }
        MmioEvent::None
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = new_queues(self.device.queue_max_sizes());
        self.regs = Registers::default();
    }

    /// Runs `f` on the device with its queues, if the driver has set the
    /// device up and every ready queue is valid in guest memory; marks the
    /// used-ring interrupt when `f` says the device used buffers of a queue
    /// whose driver wants interrupts. Returns whether the guest should be
    /// interrupted.
    pub fn with_device(
        &mut self,
        mem: &GuestMem,
        f: impl FnOnce(&mut D, &mut [Queue]) -> Result<bool, RingError>,
    ) -> bool {
        if !self.driver_ok() || self.queues.iter().any(|q| q.ready() && !q.is_valid(mem)) {
            return false;
        }
        let used_before: Vec<u16> = self.queues.iter().map(|q| q.next_used()).collect();
        match f(&mut self.device, &mut self.queues) {
            Ok(true) => {
                let wanted = self
                    .queues
                    .iter()
                    .zip(used_before)
                    .any(|(q, before)| q.next_used() != before && wants_interrupt(q, mem));
                if wanted {
                    self.regs.interrupt_status |= INT_USED_RING;
                }
                wanted
            }
            Ok(false) => false,
            Err(why) => {
                // Stopped until the driver resets it, as the spec's
                // DEVICE_NEEDS_RESET would have it.
                tracing::warn!("virtio device {}: {why}; stopped until reset", self.device.device_id());
                self.regs.status |= STATUS_FAILED;
                false
            }
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The driver notified queue `index`: let the device process it.
    pub fn notify(&mut self, index: usize, mem: &GuestMem, io: &mut D::Io<'_>) -> bool {
        let ready = self.queues.get(index).is_some_and(|q| q.ready());
        ready && self.with_device(mem, |device, queues| device.queue_notify(index, queues, mem, io))
    }

    pub fn state(&self) -> MmioState<D::State> {
        MmioState {
            regs: self.regs.clone(),
            queues: self.queues.iter().map(SavedQueue::of).collect(),
            device: self.device.state(),
        }
    }

    pub fn restore(&mut self, state: MmioState<D::State>) -> Result<(), RestoreError> {
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::Mismatch {
                what: "queues on a virtio device",
                saved: state.queues.len().to_string(),
                ours: self.queues.len().to_string(),
            });
        }
        let queues = state.queues.iter().map(SavedQueue::to_queue).collect::<Result<Vec<_>, _>>()?;
        self.device.restore(state.device)?;
        self.queues = queues;
        self.regs = state.regs;
        Ok(())
    }
}

/// The register window of any virtio device, for the MMIO bus.
pub trait MmioWindow {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> MmioEvent;
}

impl<D: VirtioDevice> MmioWindow for MmioTransport<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> MmioEvent {
        MmioTransport::write(self, offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::F_VERSION_1;

    /// A device with two queues that counts its notifications.
    #[derive(Default)]
    struct Probe {
        notified: Vec<usize>,
        resets: u32,
    }

    impl VirtioDevice for Probe {
        type Io<'a> = ();
        type State = u32;
        fn device_id(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | 0b101
        }
        fn queue_max_sizes(&self) -> &'static [u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config = [1u8, 2, 3, 4];
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn queue_notify(&mut self, index: usize, _: &mut [Queue], _: &GuestMem, _: &mut ()) -> Result<bool, RingError> {
            self.notified.push(index);
            Ok(true)
        }
        fn state(&self) -> u32 {
            self.resets
        }
        fn restore(&mut self, state: u32) -> Result<(), RestoreError> {
            self.resets = state;
            Ok(())
        }
    }

    fn read32(t: &MmioTransport<Probe>, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(t: &mut MmioTransport<Probe>, offset: u64, value: u32) -> MmioEvent {
        t.write(offset, &value.to_le_bytes())
    }

    #[test]
    fn identifies_itself_and_negotiates_only_offered_features() {
        let mut t = MmioTransport::new(Probe::default());
        assert_eq!(read32(&t, reg::MAGIC), MAGIC);
        assert_eq!(read32(&t, reg::VERSION), 2);
        assert_eq!(read32(&t, reg::DEVICE_ID), 42);
        assert_eq!(read32(&t, reg::DEVICE_FEATURES), 0b101);
        write32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 0 of the high word");
        write32(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(read32(&t, reg::DEVICE_FEATURES), 0, "no feature words beyond the second");
        write32(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        write32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write32(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features(), F_VERSION_1 | 0b101);
        let mut config = [0u8; 4];
        t.read(reg::CONFIG + 2, &mut config);
        assert_eq!(config, [3, 4, 0, 0]);
    }

    #[test]
    fn queues_are_selected_sized_and_notified_by_index() {
        let mut t = MmioTransport::new(Probe::default());
        write32(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(read32(&t, reg::QUEUE_NUM_MAX), 8);
        write32(&mut t, reg::QUEUE_NUM, 1000);
        write32(&mut t, reg::QUEUE_SEL, 5);
        assert_eq!(read32(&t, reg::QUEUE_NUM_MAX), 0, "a queue that does not exist");
        write32(&mut t, reg::QUEUE_READY, 1); // ignored
        assert_eq!(write32(&mut t, reg::QUEUE_NOTIFY, 1), MmioEvent::QueueNotify(1));
        assert_eq!(write32(&mut t, reg::QUEUE_NOTIFY, 2), MmioEvent::None);
        let mem = GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
        assert!(!t.notify(1, &mem, &mut ()), "no work before DRIVER_OK and a ready queue");
        assert!(t.device.notified.is_empty());
    }

    #[test]
    fn a_status_write_of_zero_resets_device_and_queues() {
        let mut t = MmioTransport::new(Probe::default());
        write32(&mut t, reg::STATUS, 1 | 2 | STATUS_FEATURES_OK);
        write32(&mut t, reg::QUEUE_NUM, 4);
        write32(&mut t, reg::STATUS, 0);
        assert_eq!(read32(&t, reg::STATUS), 0);
        assert_eq!(t.device.resets, 1);
        let saved = t.state();
        let mut other = MmioTransport::new(Probe::default());
        other.restore(saved).unwrap();
        assert_eq!(other.device.resets, 1);
    }
}
