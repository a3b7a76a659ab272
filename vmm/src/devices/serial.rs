//! COM1: vm-superio's 16550 UART, wired to PIC line 4, its output captured
//! so the run loop can tag every byte with the position that produced it.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use vm_superio::{serial::NoEvents, Serial, Trigger};

/// The UART's interrupt output: an edge the bus forwards to the PIC.
#[derive(Clone, Default)]
pub struct IrqEdge(Rc<Cell<bool>>);

impl IrqEdge {
    /// Whether the device raised its line since the last call.
    pub fn take(&self) -> bool {
        self.0.replace(false)
    }
}

impl Trigger for IrqEdge {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(true);
        Ok(())
    }
}

/// Bytes the guest transmitted and the run loop has not yet routed.
#[derive(Clone, Default)]
pub struct TxBuffer(Rc<RefCell<Vec<u8>>>);

impl TxBuffer {
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.borrow_mut())
    }

    /// Appends bytes another console device (the virtio-console) sent.
    pub fn push(&self, bytes: &[u8]) {
        self.0.borrow_mut().extend_from_slice(bytes);
    }

    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}

impl std::io::Write for TxBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub type Uart = Serial<IrqEdge, NoEvents, TxBuffer>;

/// A fresh COM1 and the handles to its interrupt line and output.
pub fn com1() -> (Uart, IrqEdge, TxBuffer) {
    let irq = IrqEdge::default();
    let tx = TxBuffer::default();
    (Serial::new(irq.clone(), tx.clone()), irq, tx)
}
