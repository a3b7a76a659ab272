//! The device models and the port I/O bus that routes guest accesses to them.
//!
//! Every model is a deterministic function of its state, the guest's accesses
//! and the inputs the run loop gives it (time readings, received bytes), so
//! the same model runs on the primary and on the backup. Port map:
//!
//! | ports | device |
//! | --- | --- |
//! | 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1 | 8259 PIC pair ([`pic`]) |
//! | 0x40-0x43, 0x61 | 8254 PIT, channel 0 on IRQ 0 ([`pit`]) |
//! | 0x70-0x71 | CMOS RTC and NVRAM ([`cmos`]) |
//! | 0x3f8-0x3ff | COM1 16550 UART on IRQ 4 ([`serial`]) |
//! | 0x80 | POST port: ignored, a cheap guest exit |
//! | 0xf4 | exit device: write the status the VM ends with |
//! | 0xf5 | idle: write to wait for an interrupt (HLT faults at CPL3) |
//! | 0xf6 | TSC port: 32-bit read = rewritten RDTSC |
//!
//! MMIO: a virtio-blk disk on virtio-mmio at 0xd000_0000 (IRQ 5), when the
//! VM has a disk ([`virtio_blk`]).
//!
//! Other ports read as all ones and ignore writes, as on an empty ISA bus.

pub mod cmos;
pub mod pic;
pub mod pit;
pub mod serial;
pub mod virtio_blk;

use replay::TimeSource;
use serde::Serialize;

pub const POST_PORT: u16 = 0x80;
pub const EXIT_PORT: u16 = 0xf4;
pub const IDLE_PORT: u16 = 0xf5;
pub const TSC_PORT: u16 = 0xf6;
pub const PIT_IRQ: u8 = 0;

/// What a port write asks of the run loop beyond device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    None,
    /// The guest asked to end the VM with this status.
    Exit(u8),
    /// The guest idles until an interrupt.
    Idle,
}

/// All devices on the bus.
pub struct Devices {
    pub uart: serial::Uart,
    uart_irq: serial::IrqEdge,
    pub tx: serial::TxBuffer,
    pub pic: pic::Pic,
    pub pit: pit::Pit,
    pub cmos: cmos::Cmos,
    pub disk: Option<virtio_blk::VirtioBlk>,
}

/// The devices' state, for the state digest.
#[derive(Serialize)]
pub struct DevicesState<'a> {
    pub uart: [u8; 9],
    pub uart_rx: Vec<u8>,
    pub pic: &'a pic::Pic,
    pub pit: &'a pit::Pit,
    pub cmos: &'a cmos::Cmos,
    pub disk: Option<virtio_blk::VirtioBlkState>,
}

impl Devices {
    /// The devices of a VM with `mem_size` bytes, and a disk of `disk_size`
    /// bytes if it has one.
    pub fn new(mem_size: u64, disk_size: Option<u64>) -> Self {
        let (uart, uart_irq, tx) = serial::com1();
        Devices {
            uart,
            uart_irq,
            tx,
            pic: pic::Pic::new(),
            pit: pit::Pit::new(),
            cmos: cmos::Cmos::new(mem_size),
            disk: disk_size.map(virtio_blk::VirtioBlk::new),
        }
    }

    /// A port read of `data.len()` bytes. `clock` answers time readings.
    pub fn port_read(&mut self, port: u16, data: &mut [u8], clock: &mut dyn FnMut(TimeSource) -> u64) {
        data.fill(0xff);
        let byte = match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.io_read(port),
            0x40..=0x43 | 0x61 => self.pit.io_read(port, || clock(TimeSource::Pit)),
            0x70 | 0x71 => self.cmos.io_read(port, || clock(TimeSource::Rtc)),
            p if (serial::COM1_BASE..serial::COM1_BASE + 8).contains(&p) => {
                self.uart.read((p - serial::COM1_BASE) as u8)
            }
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
            EXIT_PORT => return PortAction::Exit(byte),
            IDLE_PORT => return PortAction::Idle,
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.io_write(port, byte),
            0x40..=0x43 | 0x61 => self.pit.io_write(port, byte, || clock(TimeSource::Pit)),
            0x70 | 0x71 => self.cmos.io_write(port, byte),
            p if (serial::COM1_BASE..serial::COM1_BASE + 8).contains(&p) => {
                // The only error is the output writer's, and TxBuffer cannot fail.
                let _ = self.uart.write((p - serial::COM1_BASE) as u8, byte);
            }
            _ => {}
        }
        self.forward_irqs();
        PortAction::None
    }

    /// Brings the PIT up to virtual time `now_ns`, raising IRQ 0 for its edges.
    pub fn advance_timers(&mut self, now_ns: u64) {
        if self.pit.advance(now_ns) > 0 {
            self.pic.pulse_irq(PIT_IRQ);
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
            self.pic.pulse_irq(serial::COM1_IRQ);
        }
    }

    pub fn state(&self) -> DevicesState<'_> {
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
            pic: &self.pic,
            pit: &self.pit,
            cmos: &self.cmos,
            disk: self.disk.as_ref().map(|d| d.state()),
        }
    }
}
