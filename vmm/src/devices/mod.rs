//! The device models, and the buses that route guest accesses to them.
//!
//! Every model is a deterministic function of its state, the guest's accesses
//! and the inputs the run loop gives it (time readings, received bytes), so
//! the same model runs on the primary and on the backup. Where each device
//! lives is [`crate::layout`]'s table: the 8259 PIC pair ([`pic`]), the 8254
//! PIT ([`pit`]), the CMOS RTC ([`cmos`]), COM1 ([`serial`]), the platform
//! ports (exit, idle, TSC, POST) and the virtio-mmio slots ([`virtio`]).
//! Other ports read as all ones and ignore writes, as on an empty ISA bus;
//! unclaimed MMIO floats high.

pub mod cmos;
pub mod pic;
pub mod pit;
pub mod serial;
pub mod virtio;

use crate::layout;
use replay::TimeSource;
use serde::{Deserialize, Serialize};
use virtio::block::{Block, BlockState};
use virtio::console::{Console, ConsoleState};
use virtio::mmio::{MmioEvent, MmioState, MmioTransport, MmioWindow};
use virtio::net::{Net, NetState};
use virtio::RestoreError;

/// What a port write asks of the run loop beyond device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    None,
    /// The guest asked to end the VM with this status.
    Exit(u8),
    /// The guest idles until an interrupt.
    Idle,
}

/// A device in a virtio-mmio slot.
pub enum VirtioSlot {
    Block(MmioTransport<Block>),
    Net(MmioTransport<Net>),
    Console(MmioTransport<Console>),
}

impl VirtioSlot {
    fn window(&mut self) -> &mut dyn MmioWindow {
        match self {
            VirtioSlot::Block(t) => t,
            VirtioSlot::Net(t) => t,
            VirtioSlot::Console(t) => t,
        }
    }

    fn window_ref(&self) -> &dyn MmioWindow {
        match self {
            VirtioSlot::Block(t) => t,
            VirtioSlot::Net(t) => t,
            VirtioSlot::Console(t) => t,
        }
    }

    /// The virtio device id of what sits in the slot.
    pub fn device_id(&self) -> u32 {
        match self {
            VirtioSlot::Block(t) => virtio::VirtioDevice::device_id(&t.device),
            VirtioSlot::Net(t) => virtio::VirtioDevice::device_id(&t.device),
            VirtioSlot::Console(t) => virtio::VirtioDevice::device_id(&t.device),
        }
    }
}

/// What a virtio slot holds when saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VirtioSlotState {
    Block(MmioState<BlockState>),
    Net(MmioState<NetState>),
    Console(MmioState<ConsoleState>),
}

/// All devices on the buses.
pub struct Devices {
    pub uart: serial::Uart,
    uart_irq: serial::IrqEdge,
    pub tx: serial::TxBuffer,
    pub pic: pic::Pic,
    pub pit: pit::Pit,
    pub cmos: cmos::Cmos,
    /// The virtio-mmio slots in use, in slot order (see [`layout`]).
    pub virtio: Vec<VirtioSlot>,
}

/// The devices' state: what a snapshot saves and the state digest hashes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub uart: [u8; 9],
    pub uart_rx: Vec<u8>,
    pub pic: pic::Pic,
    pub pit: pit::Pit,
    pub cmos: cmos::Cmos,
    pub virtio: Vec<VirtioSlotState>,
}

/// What a guest MMIO write asks of the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioAction {
    None,
    /// The guest notified queue `queue` of the device in `slot`.
    QueueNotify {
        slot: usize,
        queue: usize,
    },
}

impl Devices {
    /// The devices of a VM with `mem_size` bytes, a disk of `disk_size`
    /// bytes if it has one and a NIC with MAC `net_mac` if it has one, and
    /// the virtio-console (in that slot order).
    pub fn new(mem_size: u64, disk_size: Option<u64>, net_mac: Option<[u8; 6]>) -> Self {
        Self::with_virtio_console(mem_size, disk_size, net_mac, true)
    }

    /// As [`Devices::new`], the virtio-console only if `console`
    /// (`--no-virtio-console` leaves it out: the guest prints on COM1).
    pub fn with_virtio_console(mem_size: u64, disk_size: Option<u64>, net_mac: Option<[u8; 6]>, console: bool) -> Self {
        let (uart, uart_irq, tx) = serial::com1();
        let mut virtio = Vec::new();
        if let Some(size) = disk_size {
            virtio.push(VirtioSlot::Block(MmioTransport::new(Block::new(size))));
        }
        if let Some(mac) = net_mac {
            virtio.push(VirtioSlot::Net(MmioTransport::new(Net::new(mac))));
        }
        // Last, so the disk and the NIC keep the slots (and IRQs) they had
        // before there was a console.
        if console {
            virtio.push(VirtioSlot::Console(MmioTransport::new(Console::new())));
        }
        Devices {
            uart,
            uart_irq,
            tx,
            pic: pic::Pic::new(),
            pit: pit::Pit::new(),
            cmos: cmos::Cmos::new(mem_size),
            virtio,
        }
    }

    /// The virtio devices for the boot info's table: (slot, device id).
    pub fn virtio_table(&self) -> Vec<(usize, u32)> {
        self.virtio.iter().enumerate().map(|(slot, d)| (slot, d.device_id())).collect()
    }

    /// The NIC and its slot, if the VM has one.
    pub fn nic(&mut self) -> Option<(usize, &mut MmioTransport<Net>)> {
        self.virtio.iter_mut().enumerate().find_map(|(slot, d)| match d {
            VirtioSlot::Net(t) => Some((slot, t)),
            _ => None,
        })
    }

    /// An MMIO read of `data.len()` bytes at `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some((slot, offset)) = layout::virtio_slot_of(addr) {
            if let Some(device) = self.virtio.get(slot) {
                device.window_ref().read(offset, data);
            }
        }
    }

    /// An MMIO write at `addr`.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> MmioAction {
        let Some((slot, offset)) = layout::virtio_slot_of(addr) else { return MmioAction::None };
        let Some(device) = self.virtio.get_mut(slot) else { return MmioAction::None };
        match device.window().write(offset, data) {
            MmioEvent::QueueNotify(queue) => MmioAction::QueueNotify { slot, queue },
            MmioEvent::None => MmioAction::None,
        }
    }

    /// Interrupts the guest for the device in virtio slot `slot`.
    pub fn virtio_interrupt(&mut self, slot: usize) {
        if let Some(&irq) = layout::VIRTIO_IRQS.get(slot) {
            self.pic.pulse_irq(irq);
        }
    }

    /// A port read of `data.len()` bytes. `clock` answers time readings.
    pub fn port_read(&mut self, port: u16, data: &mut [u8], clock: &mut dyn FnMut(TimeSource) -> u64) {
        data.fill(0xff);
        let byte = match port {
            p if is_pic_port(p) => self.pic.io_read(p),
            p if is_pit_port(p) => self.pit.io_read(p, || clock(TimeSource::Pit)),
            p if layout::CMOS_PORTS.contains(&p) => self.cmos.io_read(p, || clock(TimeSource::Rtc)),
            p if layout::COM1_PORTS.contains(&p) => self.uart.read((p - layout::COM1_BASE) as u8),
            _ => return,
        };
        data[0] = byte;
        self.forward_irqs();
    }

    /// A port write. `clock` answers time readings.
    pub fn port_write(&mut self, port: u16, data: &[u8], clock: &mut dyn FnMut(TimeSource) -> u64) -> PortAction {
        let Some(&byte) = data.first() else {
            return PortAction::None;
        };
        match port {
            layout::EXIT_PORT => return PortAction::Exit(byte),
            layout::IDLE_PORT => return PortAction::Idle,
            p if is_pic_port(p) => self.pic.io_write(p, byte),
            p if is_pit_port(p) => self.pit.io_write(p, byte, || clock(TimeSource::Pit)),
            p if layout::CMOS_PORTS.contains(&p) => self.cmos.io_write(p, byte),
            p if layout::COM1_PORTS.contains(&p) => {
                // The only error is the output writer's, and TxBuffer cannot fail.
                let _ = self.uart.write((p - layout::COM1_BASE) as u8, byte);
            }
            _ => {}
        }
        self.forward_irqs();
        PortAction::None
    }

    /// Brings the PIT up to virtual time `now_ns`, raising IRQ 0 for its edges.
    pub fn advance_timers(&mut self, now_ns: u64) {
        if self.pit.advance(now_ns) > 0 {
            self.pic.pulse_irq(layout::PIT_IRQ);
        }
    }

    /// Room in the UART's receive FIFO.
    pub fn serial_rx_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Bytes received from the outside world.
    pub fn serial_receive(&mut self, bytes: &[u8]) {
        // The caller never offers more than serial_rx_room(); the trigger is infallible.
        let _ = self.uart.enqueue_raw_bytes(bytes);
        self.forward_irqs();
    }

    fn forward_irqs(&mut self) {
        if self.uart_irq.take() {
            self.pic.pulse_irq(layout::COM1_IRQ);
        }
    }

    /// The devices' state.
    pub fn state(&self) -> DevicesState {
        let s = self.uart.state();
        DevicesState {
            uart: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            uart_rx: s.in_buffer,
            pic: self.pic.clone(),
            pit: self.pit.clone(),
            cmos: self.cmos.clone(),
            virtio: self
                .virtio
                .iter()
                .map(|d| match d {
                    VirtioSlot::Block(t) => VirtioSlotState::Block(t.state()),
                    VirtioSlot::Net(t) => VirtioSlotState::Net(t.state()),
                    VirtioSlot::Console(t) => VirtioSlotState::Console(t.state()),
                })
                .collect(),
        }
    }

    /// Restores a saved state into these devices (built for the same VM
    /// configuration), or says why it does not fit them.
    pub fn restore(&mut self, state: DevicesState) -> Result<(), RestoreError> {
        if state.virtio.len() != self.virtio.len() {
            return Err(RestoreError::Mismatch {
                what: "virtio devices",
                saved: state.virtio.len().to_string(),
                ours: self.virtio.len().to_string(),
            });
        }
        for (device, saved) in self.virtio.iter_mut().zip(state.virtio) {
            match (device, saved) {
                (VirtioSlot::Block(t), VirtioSlotState::Block(s)) => t.restore(s)?,
                (VirtioSlot::Net(t), VirtioSlotState::Net(s)) => t.restore(s)?,
                (VirtioSlot::Console(t), VirtioSlotState::Console(s)) => t.restore(s)?,
                _ => return Err(RestoreError::DeviceKinds),
            }
        }
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            state.uart;
        let uart_state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: state.uart_rx,
        };
        self.uart =
            serial::Uart::from_state(&uart_state, self.uart_irq.clone(), vm_superio::serial::NoEvents, self.tx.clone())
                .map_err(|e| RestoreError::Uart(format!("{e:?}")))?;
        // from_state raises the interrupt again if one is enabled and
        // pending; the saved PIC already holds the edge the UART raised
        // when it was (edges are forwarded at once), so a second one would
        // be the restored VM's alone.
        let _ = self.uart_irq.take();
        self.pic = state.pic;
        self.pit = state.pit;
        self.cmos = state.cmos;
        Ok(())
    }
}

fn is_pic_port(port: u16) -> bool {
    layout::PIC_MASTER_PORTS.contains(&port)
        || layout::PIC_SLAVE_PORTS.contains(&port)
        || layout::PIC_ELCR_PORTS.contains(&port)
}

fn is_pit_port(port: u16) -> bool {
    layout::PIT_PORTS.contains(&port) || port == layout::PORT_B
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_state_round_trips_through_a_snapshot() {
        let mut a = Devices::new(64 << 20, Some(1 << 20), None);
        let mut no_clock = |_| 0u64;
        // Program the PIC, the PIT, the UART and the disk's transport a little.
        a.port_write(0x20, &[0x11], &mut no_clock);
        a.port_write(0x21, &[0x20], &mut no_clock);
        a.port_write(0x43, &[0x34], &mut no_clock);
        a.port_write(0x40, &[0x9c], &mut no_clock);
        a.port_write(layout::COM1_BASE + 7, &[0x5a], &mut no_clock);
        a.serial_receive(b"hi");
        a.mmio_write(layout::VIRTIO_MMIO_BASE + virtio::mmio::reg::STATUS, &3u32.to_le_bytes());
        let saved = bincode::serialize(&a.state()).unwrap();
        let mut b = Devices::new(64 << 20, Some(1 << 20), None);
        b.restore(bincode::deserialize(&saved).unwrap()).unwrap();
        assert_eq!(bincode::serialize(&b.state()).unwrap(), saved);
        let mut status = [0u8; 4];
        b.mmio_read(layout::VIRTIO_MMIO_BASE + virtio::mmio::reg::STATUS, &mut status);
        assert_eq!(u32::from_le_bytes(status), 3);

        let mut diskless = Devices::new(64 << 20, None, None);
        assert!(diskless.restore(bincode::deserialize(&saved).unwrap()).is_err(), "a disk's state needs a disk");
    }

    #[test]
    fn the_virtio_console_takes_the_last_slot_and_its_state_is_saved() {
        const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let mut a = Devices::new(64 << 20, Some(1 << 20), Some(MAC));
        assert_eq!(a.virtio_table(), vec![(0, 2), (1, 1), (2, 3)], "disk, NIC, console");
        assert_eq!(Devices::new(64 << 20, None, None).virtio_table(), vec![(0, 3)]);
        let mut without = Devices::with_virtio_console(64 << 20, Some(1 << 20), Some(MAC), false);
        assert_eq!(without.virtio_table(), vec![(0, 2), (1, 1)]);
        let status = layout::virtio_mmio_base(2) + virtio::mmio::reg::STATUS;
        a.mmio_write(status, &3u32.to_le_bytes());
        let saved = bincode::serialize(&a.state()).unwrap();
        let mut b = Devices::new(64 << 20, Some(1 << 20), Some(MAC));
        b.restore(bincode::deserialize(&saved).unwrap()).unwrap();
        let mut got = [0u8; 4];
        b.mmio_read(status, &mut got);
        assert_eq!(u32::from_le_bytes(got), 3);
        assert!(without.restore(bincode::deserialize(&saved).unwrap()).is_err(), "a console's state needs a console");
    }
}
