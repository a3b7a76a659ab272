//! The snapshot stream (vmm/src/snapshot.rs): `StateReader` over arbitrary
//! bytes, and `apply_memory` of every memory item it decodes into a small
//! guest memory (16 pages). Never a panic; an item `apply_memory` accepts
//! lies inside the memory and leaves it holding what the item says. A
//! `Machine` item's device state is restored into the devices of a VM with
//! a disk and a NIC (`Devices::restore`), which are then probed as a guest
//! would: every port read, the timers advanced, the virtio registers read.
//!
//! The input is the stream itself, or (first byte 1) its items' payloads,
//! each `length: u16 LE | payload`, which the target frames with a correct
//! length and CRC behind the magic and version (`ftvmm_fuzz`: a fuzzer
//! cannot forge a CRC-32, and the items' decoding is behind it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::Devices;
use vmm::layout;
use vmm::snapshot::{apply_memory, MachineState, StateItem, StateReader, MAGIC, VERSION};
use vmm::memory::{GuestMem, PAGE_SIZE};

const PAGES: u64 = 16;

fuzz_target!(|data: &[u8]| {
    let head = [&MAGIC[..], &VERSION.to_le_bytes()].concat();
    read(&ftvmm_fuzz::stream_or_framed(data, &head, frame));
});

/// Appends one item of `payload`: its length (u32 LE), its CRC-32, the
/// payload.
fn frame(stream: &mut Vec<u8>, payload: &[u8]) {
    stream.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    stream.extend_from_slice(&ftvmm_fuzz::crc32(payload).to_le_bytes());
    stream.extend_from_slice(payload);
}

fn read(data: &[u8]) {
    let Ok(mut reader) = StateReader::new(data) else { return };
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)]).unwrap();
    let mut ended = false;
    while let Ok(Some(item)) = reader.next_item() {
        assert!(!ended, "an item after End");
        ended = matches!(item, StateItem::End { .. });
        let applied = apply_memory(&mem, PAGES * PAGE_SIZE, &item).is_ok();
        match &item {
            StateItem::Pages { first, data } if applied => {
                let mut back = vec![0u8; data.len()];
                mem.read_slice(&mut back, GuestAddress(first * PAGE_SIZE)).unwrap();
                assert!(back == *data, "pages applied are not in memory");
            }
            StateItem::Zeros { first, count } if applied => {
                let mut back = vec![0xffu8; (count * PAGE_SIZE) as usize];
                mem.read_slice(&mut back, GuestAddress(first * PAGE_SIZE)).unwrap();
                assert!(back.iter().all(|&b| b == 0), "zero pages applied are not zero");
            }
            StateItem::Pages { .. } | StateItem::Zeros { .. } => {}
            StateItem::Machine(machine) => {
                assert!(!applied, "a non-memory item applied as memory");
                probe(machine);
            }
            _ => assert!(!applied, "a non-memory item applied as memory"),
        }
    }
}

/// Restores `machine`'s devices and reads them as a guest would.
fn probe(machine: &MachineState) {
    let mut devices = Devices::new(PAGES * PAGE_SIZE, Some(1 << 20), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
    if devices.restore(machine.devices.clone()).is_err() {
        return;
    }
    let now = machine.clock.now_ns();
    let mut clock = |_| now;
    let ports = layout::PIC_MASTER_PORTS
        .into_iter()
        .chain(layout::PIC_SLAVE_PORTS)
        .chain(layout::PIC_ELCR_PORTS)
        .chain(layout::PIT_PORTS)
        .chain([layout::PORT_B])
        .chain(layout::CMOS_PORTS)
        .chain(layout::COM1_PORTS);
    for port in ports {
        let mut byte = [0u8];
        devices.port_read(port, &mut byte, &mut clock);
    }
    for index in 0..0x80u8 {
        devices.port_write(layout::CMOS_PORTS[0], &[index], &mut clock);
        devices.port_read(layout::CMOS_PORTS[1], &mut [0u8], &mut clock);
    }
    if let Some(deadline) = devices.pit.next_irq0_deadline() {
        devices.advance_timers(deadline);
    }
    devices.advance_timers(now.saturating_add(1_000_000));
    if devices.serial_rx_room() > 0 {
        devices.serial_receive(b"x");
    }
    for slot in 0..2 {
        for offset in (0..0x110).step_by(4) {
            let mut word = [0u8; 4];
            devices.mmio_read(layout::virtio_mmio_base(slot) + offset, &mut word);
        }
    }
    let _ = devices.state();
}
