//! The platform's layout, in one table: where things live in guest memory,
//! which ports and MMIO windows the devices answer, and their PIC lines.
//!
//! | what | where | IRQ |
//! | --- | --- | --- |
//! | boot GDT | 0x500 | |
//! | boot info ([`crate::boot`]), its virtio device table included | 0x6000 | |
//! | command line (up to [`CMDLINE_MAX`] bytes) | 0x6100 | |
//! | boot page tables (PML4, PDPT, PDs) | 0x9000.. | |
//! | guest image | from 1 MiB ([`IMAGE_MIN_ADDR`]) | |
//! | MMIO hole | from 3 GiB ([`MAX_MEM_BYTES`]) | |
//! | virtio-mmio slot *i* | [`VIRTIO_MMIO_BASE`] + *i* × [`VIRTIO_MMIO_SIZE`] | [`VIRTIO_IRQS`]\[*i*\] |
//! | 8259 PIC pair | ports 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1 | |
//! | 8254 PIT, channel 0 | ports 0x40-0x43, 0x61 | 0 |
//! | COM1 16550 UART | ports 0x3f8-0x3ff | 4 |
//! | CMOS RTC and NVRAM | ports 0x70-0x71 | 8 (unused) |
//! | POST port: ignored, a cheap guest exit | port 0x80 | |
//! | exit device: the status the VM ends with | port 0xf4 | |
//! | idle: wait for an interrupt (HLT faults at CPL3) | port 0xf5 | |
//! | TSC port: a 32-bit read is a rewritten RDTSC | port 0xf6 | |
//!
//! Virtio devices take slots in a fixed order — the disk first, then the
//! NIC, then the virtio-console (unless `--no-virtio-console`) — so a VM
//! with only a NIC has it in slot 0. The guest learns which
//! devices exist, and where, from the boot info's device table, never from
//! constants of its own.

/// Where the boot GDT lives.
pub const GDT_ADDR: u64 = 0x500;
/// Where the boot info lives.
pub const BOOT_INFO_ADDR: u64 = 0x6000;
/// Where the command line lives (up to [`CMDLINE_MAX`] bytes).
pub const CMDLINE_ADDR: u64 = 0x6100;
/// Longest accepted command line.
pub const CMDLINE_MAX: usize = 0xf00;
/// The boot page tables: PML4, then PDPT, then one page directory per GiB.
pub const PML4_ADDR: u64 = 0x9000;
/// Lowest address a guest image may load at.
pub const IMAGE_MIN_ADDR: u64 = 0x10_0000;
/// Largest guest memory: it must stay below the MMIO hole at 3 GiB, and the
/// page directories must fit below [`IMAGE_MIN_ADDR`].
pub const MAX_MEM_BYTES: u64 = 3 << 30;

/// First virtio-mmio slot, inside the MMIO hole.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Each slot's register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The PIC line of each virtio-mmio slot; also the number of slots.
pub const VIRTIO_IRQS: [u8; 4] = [5, 6, 10, 11];

/// The guest-physical window of virtio-mmio slot `slot`.
pub const fn virtio_mmio_base(slot: usize) -> u64 {
    VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE
}

/// The slot whose register window holds `addr`, and the offset in it.
pub fn virtio_slot_of(addr: u64) -> Option<(usize, u64)> {
    let offset = addr.checked_sub(VIRTIO_MMIO_BASE)?;
    let slot = (offset / VIRTIO_MMIO_SIZE) as usize;
    (slot < VIRTIO_IRQS.len()).then_some((slot, offset % VIRTIO_MMIO_SIZE))
}

pub const PIC_MASTER_PORTS: [u16; 2] = [0x20, 0x21];
pub const PIC_SLAVE_PORTS: [u16; 2] = [0xa0, 0xa1];
/// The ELCR (edge/level control) registers beside the PICs.
pub const PIC_ELCR_PORTS: [u16; 2] = [0x4d0, 0x4d1];
/// PIT counters and control word.
pub const PIT_PORTS: std::ops::RangeInclusive<u16> = 0x40..=0x43;
/// Port B: the PIT's channel 2 gate and output.
pub const PORT_B: u16 = 0x61;
pub const PIT_IRQ: u8 = 0;
pub const CMOS_PORTS: [u16; 2] = [0x70, 0x71];
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's eight registers.
pub const COM1_PORTS: std::ops::Range<u16> = COM1_BASE..COM1_BASE + 8;
pub const COM1_IRQ: u8 = 4;
/// POST diagnostic port: ignored, so writing it is a cheap guest exit.
pub const POST_PORT: u16 = 0x80;
/// The guest writes the status the VM ends with here.
pub const EXIT_PORT: u16 = 0xf4;
/// A write idles the guest until an interrupt; a string read of two
/// doublewords (`rep insd`) does too, and stores the virtual TSC at
/// wake-up, so the guest's first clock read after idling costs no exit of
/// its own.
pub const IDLE_PORT: u16 = 0xf5;
/// A 32-bit read here is a rewritten RDTSC.
pub const TSC_PORT: u16 = 0xf6;

// The boot structures fit where they go: the command line below the page
// tables, and PML4 + PDPT + one PD per GiB of the 4 GiB map below the image.
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= PML4_ADDR);
const _: () = assert!(PML4_ADDR + (2 + 4) * 0x1000 <= IMAGE_MIN_ADDR);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_tile_their_windows() {
        assert_eq!(virtio_slot_of(VIRTIO_MMIO_BASE), Some((0, 0)));
        assert_eq!(virtio_slot_of(virtio_mmio_base(1) + 0x70), Some((1, 0x70)));
        assert_eq!(virtio_slot_of(virtio_mmio_base(VIRTIO_IRQS.len())), None);
        assert_eq!(virtio_slot_of(VIRTIO_MMIO_BASE - 1), None);
    }
}
