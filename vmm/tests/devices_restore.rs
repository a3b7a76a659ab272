//! Regression test (found by the `platform_devices` fuzz target): devices
//! restored from a saved state — a snapshot, or a backup joining by state
//! transfer — go on exactly as the devices they were saved from. The UART
//! used to raise its interrupt again when it was restored with an
//! interrupt enabled and pending (vm-superio's `Serial::from_state` does),
//! an edge the original never raised a second time: the restored VM had an
//! IRQ 4 pending that the primary did not, and the two diverged.
//! No KVM needed.

use replay::TimeSource;
use vmm::devices::Devices;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn devices() -> Devices {
    Devices::new(64 << 20, Some(1 << 20), Some(MAC))
}

fn out(d: &mut Devices, port: u16, value: u8) {
    d.port_write(port, &[value], &mut |_: TimeSource| 0);
}

fn inp(d: &mut Devices, port: u16) -> u8 {
    let mut b = [0u8];
    d.port_read(port, &mut b, &mut |_: TimeSource| 0);
    b[0]
}

fn restored(d: &Devices) -> Devices {
    let mut again = devices();
    again.restore(d.state()).unwrap();
    again
}

fn same_state(a: &Devices, b: &Devices) -> bool {
    bincode::serialize(&a.state()).unwrap() == bincode::serialize(&b.state()).unwrap()
}

/// The PICs programmed as the guests' runtime does (vectors 0x20 and
/// 0x28), COM1's line unmasked.
fn init_pic(d: &mut Devices) {
    for (port, value) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0xa0, 0x11), (0xa1, 0x28)] {
        out(d, port, value);
    }
    out(d, 0xa1, 0x02);
    out(d, 0xa1, 0x01);
    out(d, 0x21, !(1 << 4));
    out(d, 0xa1, 0xff);
}

#[test]
fn a_restored_uart_raises_no_interrupt_of_its_own() {
    for ier in [0x02u8, 0x01, 0x03] {
        let mut d = devices();
        init_pic(&mut d);
        if ier & 1 != 0 {
            // Received data, so that the RX interrupt is pending too.
            d.serial_receive(b"k");
        }
        // Enabling the THR-empty interrupt raises it at once (the
        // transmitter is empty); the run loop injects it and the guest's
        // handler EOIs without reading IIR, so the UART still has it set.
        out(&mut d, 0x3f9, ier);
        assert!(d.pic.has_pending(), "IER {ier:#x}: the UART interrupted");
        assert_eq!(d.pic.acknowledge(), Some(0x24));
        out(&mut d, 0x20, 0x20);
        assert!(!d.pic.has_pending());

        let mut e = restored(&d);
        assert!(same_state(&d, &e), "IER {ier:#x}: the restored state differs");
        // Any port access forwards the UART's interrupt edges to the PIC.
        out(&mut d, 0x80, 0);
        out(&mut e, 0x80, 0);
        assert_eq!(
            e.pic.has_pending(),
            d.pic.has_pending(),
            "IER {ier:#x}: the restored devices have an interrupt of their own"
        );
        assert!(same_state(&d, &e), "IER {ier:#x}: the restored devices went another way");
        assert_eq!(inp(&mut e, 0x3fa), inp(&mut d, 0x3fa), "IER {ier:#x}: IIR");
    }
}
