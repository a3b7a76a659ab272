//! The platform devices as an adversarial guest drives them
//! (vmm/src/devices: PIC, PIT with port 0x61, CMOS/RTC, the 16550 UART, the
//! virtio-mmio register windows, all behind `Devices`): any port reads and
//! writes, time passing, timers advanced, serial input, interrupts
//! acknowledged as the run loop does — optionally from a saved device
//! state decoded from the input.
//!
//! Never a panic, and the two properties fault tolerance rests on:
//! - determinism: the same accesses at the same times give the same reads,
//!   output, interrupts and state (two runs compared);
//! - the saved state is the whole state: a run that saves the devices,
//!   restores them into new ones and goes on (as a snapshot or a joining
//!   backup does) reads, outputs, interrupts and ends exactly as a run
//!   that never did.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use replay::TimeSource;
use vmm::devices::{Devices, DevicesState, PortAction};
use vmm::layout;

const MEM_SIZE: u64 = 64 << 20;
const DISK: u64 = 1 << 30;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
/// Wall-clock time at boot: the RTC's base.
const WALL_BASE_NS: u64 = 1_700_000_000_000_000_000;

/// The ports the devices answer, and a few they do not.
const PORTS: &[u16] = &[
    0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, // PIC
    0x40, 0x41, 0x42, 0x43, 0x61, // PIT, port B
    0x70, 0x71, // CMOS
    0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, // COM1
    0x80, 0xf4, 0xf5, 0xf6, 0x64, // POST, exit, idle, TSC, nothing
];

#[derive(Arbitrary, Debug)]
struct Input {
    /// Virtual time at the start, in ns (taken modulo 2^56: two years).
    start_ns: u64,
    /// A saved device state (bincode) to start from, if it decodes and
    /// the devices take it.
    state: Option<Vec<u8>>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Port {
    Known(u8),
    Any(u16),
}

impl Port {
    fn get(&self) -> u16 {
        match *self {
            Port::Known(i) => PORTS[usize::from(i) % PORTS.len()],
            Port::Any(p) => p,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Out {
        port: Port,
        value: u8,
    },
    In {
        port: Port,
        wide: bool,
    },
    /// Time passes.
    Wait {
        ns: u32,
    },
    /// Timers brought up to now (the run loop does so when one is due).
    Timers,
    /// Time jumps to the PIT's next IRQ0 deadline and the timers run.
    ToDeadline,
    /// Serial input, as much as the UART has room for.
    Serial(Vec<u8>),
    /// The run loop injects what the PIC has pending.
    Inject,
    /// A virtio device's interrupt.
    VirtioIrq {
        slot: u8,
    },
    /// A virtio-mmio register access (no queue notify: no guest memory).
    Mmio {
        slot: u8,
        offset: u16,
        value: u32,
        write: bool,
    },
    /// Saves the devices and goes on with new ones restored from it.
    SaveRestore,
}

/// Everything a run showed the guest and the outside world.
#[derive(Debug, PartialEq, Eq, Default)]
struct Trace {
    reads: Vec<u8>,
    actions: Vec<String>,
    vectors: Vec<u8>,
    tx: Vec<u8>,
    state: Vec<u8>,
}

fn new_devices() -> Devices {
    Devices::new(MEM_SIZE, Some(DISK), Some(MAC))
}

fn run(input: &Input, save_restore: bool) -> Trace {
    let mut now = input.start_ns % (1 << 56);
    let mut d = new_devices();
    if let Some(state) = input.state.as_deref().and_then(|b| bincode::deserialize::<DevicesState>(b).ok()) {
        let _ = d.restore(state);
    }
    let mut t = Trace::default();
    for op in &input.ops {
        let mut clock = |source: TimeSource| if source == TimeSource::Rtc { WALL_BASE_NS + now } else { now };
        match op {
            Op::Out { port, value } => {
                let action = d.port_write(port.get(), &[*value], &mut clock);
                if !matches!(action, PortAction::None) {
                    t.actions.push(format!("{action:?}"));
                }
            }
            Op::In { port, wide } => {
                let mut data = [0u8; 4];
                let n = if *wide { 4 } else { 1 };
                d.port_read(port.get(), &mut data[..n], &mut clock);
                t.reads.extend_from_slice(&data[..n]);
            }
            Op::Wait { ns } => now += u64::from(*ns),
            Op::Timers => d.advance_timers(now),
            Op::ToDeadline => {
                if let Some(deadline) = d.pit.next_irq0_deadline() {
                    // The run loop's clock never goes backwards.
                    now = now.max(deadline);
                    d.advance_timers(now);
                }
            }
            Op::Serial(bytes) => {
                let room = d.serial_rx_room().min(bytes.len());
                if room > 0 {
                    d.serial_receive(&bytes[..room]);
                }
            }
            Op::Inject => {
                if d.pic.has_pending() {
                    match d.pic.acknowledge() {
                        Some(v) => t.vectors.push(v),
                        None => t.actions.push("spurious".into()),
                    }
                }
            }
            Op::VirtioIrq { slot } => d.virtio_interrupt(usize::from(*slot % 5)),
            Op::Mmio { slot, offset, value, write } => {
                let addr = layout::virtio_mmio_base(usize::from(*slot % 3)) + u64::from(*offset % 0x1000);
                if *write {
                    let _ = d.mmio_write(addr, &value.to_le_bytes());
                } else {
                    let mut word = [0u8; 4];
                    d.mmio_read(addr, &mut word);
                    t.reads.extend_from_slice(&word);
                }
            }
            Op::SaveRestore if save_restore => {
                t.tx.extend(d.tx.take());
                let state = d.state();
                let bytes = bincode::serialize(&state).expect("a device state serializes");
                let state: DevicesState = bincode::deserialize(&bytes).expect("a saved device state deserializes");
                let mut again = new_devices();
                again.restore(state).expect("a saved device state restores");
                d = again;
            }
            Op::SaveRestore => {}
        }
    }
    t.tx.extend(d.tx.take());
    t.state = bincode::serialize(&d.state()).expect("a device state serializes");
    t
}

fuzz_target!(|input: Input| {
    let plain = run(&input, false);
    assert_eq!(plain, run(&input, false), "two runs of the same accesses differ");
    if input.ops.iter().any(|op| matches!(op, Op::SaveRestore)) {
        let restored = run(&input, true);
        assert_eq!(plain, restored, "a run that saved and restored its devices differs from one that did not");
    }
});
