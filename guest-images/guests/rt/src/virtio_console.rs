//! A transmit-only virtio-console driver on the virtio-mmio transport
//! ([`crate::virtio`]): what makes a printed line one exit (the queue
//! notify) instead of one per byte on COM1. It owns the console's transmit
//! queue (transmitq0, queue 1), its buffers, and the lock that gives them
//! to one printing context at a time. [`crate::console`] prints through it
//! when the VM has the device, and on COM1 when it has not.
//!
//! - **Lazy**: the device is found and brought up at the first print, so
//!   printing works from the first line of `main`, before anything was set
//!   up, and costs a VM without the device one look at the boot info.
//! - **One notify per print call**: the bytes of a call are copied into
//!   buffers of [`BUF_LEN`] bytes, one descriptor each; full buffers are
//!   made available as they fill, and the call ends with one notify, during
//!   whose exit ftvmm takes every available buffer. A call that fills the
//!   whole ring notifies early and reclaims (the device completes buffers
//!   at the notify itself).
//! - **No interrupts**: transmit interrupts are suppressed (the available
//!   ring's NO_INTERRUPT flag) and no handler is installed; used buffers are
//!   reclaimed by reading the used ring in memory.
//! - **Interrupt handlers, panics and exceptions**: a print that finds the
//!   driver busy — an interrupt handler or the exception/panic handler
//!   running at an exit of a print it interrupted — is not taken here, and
//!   [`crate::console`] puts it on COM1, which always works. So is every
//!   print after the device stopped taking buffers (it failed: ftvmm's
//!   takes them all during the notify's exit): the driver then gives up on
//!   it for good.
//! - **Input** stays on COM1 ([`crate::console::start_rx_interrupts`]):
//!   receiveq0 is never set up.

use crate::virtio::{self, device_id, Buffer, Transport, Virtqueue};
use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

/// transmitq0 (receiveq0 is 0, unused).
const TX_QUEUE: u16 = 1;
/// Descriptors (and buffers) of the transmit queue.
pub const QUEUE_SIZE: usize = 16;
/// Bytes per buffer: a line or a few fit in one.
pub const BUF_LEN: usize = 512;

#[repr(C, align(64))]
struct Bufs([[u8; BUF_LEN]; QUEUE_SIZE]);

#[derive(Clone, Copy)]
enum State {
    /// Not looked for yet: the first print does.
    Unprobed,
    /// Up: prints go through it.
    Ready(Transport),
    /// No such device, it could not be brought up, or it stopped taking
    /// buffers: prints go to COM1.
    Absent,
}

/// The driver: its state, its ring and buffers, and the print in progress.
struct Driver {
    state: State,
    queue: Virtqueue<QUEUE_SIZE>,
    bufs: Bufs,
    /// The descriptor (= buffer: one-descriptor chains keep buffer i with
    /// descriptor i) being filled, if any, and how many bytes it holds.
    filling: Option<u16>,
    fill: usize,
    /// Chains made available since the last notify.
    pending: u16,
}

/// The driver behind a flag that hands it to one context at a time.
struct Locked {
    busy: AtomicBool,
    driver: UnsafeCell<Driver>,
}

// SAFETY: the driver is reached only through `Locked::try_with`, whose flag
// lets one context at a time have it; on this single CPU the contexts are
// the main flow and the interrupt handlers that run at its exits.
unsafe impl Sync for Locked {}

impl Locked {
    /// Runs `f` on the driver, unless another context has it (an interrupt
    /// or exception handler that runs at an exit of a print in progress):
    /// then None, and the driver is left alone. A panic inside `f` never
    /// returns, so the flag stays set and later prints go to COM1.
    fn try_with<R>(&self, f: impl FnOnce(&mut Driver) -> R) -> Option<R> {
        if self.busy.swap(true, Ordering::Acquire) {
            return None;
        }
        // SAFETY: the flag was clear and is now ours: no other reference to
        // the driver exists until it is cleared below.
        let result = f(unsafe { &mut *self.driver.get() });
        self.busy.store(false, Ordering::Release);
        Some(result)
    }
}

static DRIVER: Locked = Locked {
    busy: AtomicBool::new(false),
    driver: UnsafeCell::new(Driver {
        state: State::Unprobed,
        queue: Virtqueue::new(),
        bufs: Bufs([[0; BUF_LEN]; QUEUE_SIZE]),
        filling: None,
        fill: 0,
        pending: 0,
    }),
};

/// Prints `bytes` through the virtio-console: false, with nothing printed,
/// if the VM has none or the driver is busy (the caller uses COM1).
pub fn print_bytes(bytes: &[u8]) -> bool {
    print_with(|driver| driver.write(bytes))
}

/// Formats `args` through the virtio-console: false, with nothing printed,
/// if the VM has none or the driver is busy (the caller uses COM1).
pub fn print_fmt(args: core::fmt::Arguments) -> bool {
    print_with(|driver| {
        // Writing never fails (what the device does not take goes to COM1);
        // an error is a formatting trait's own, as with any writer.
        let _ = driver.write_fmt(args);
    })
}

/// Whether prints go through the virtio-console (bringing it up if it was
/// not yet looked for). False while another context is printing.
pub fn present() -> bool {
    DRIVER.try_with(|d| d.ready().is_some()).unwrap_or(false)
}

fn print_with(print: impl FnOnce(&mut Driver)) -> bool {
    DRIVER
        .try_with(|driver| {
            if driver.ready().is_none() {
                return false;
            }
            print(driver);
            driver.flush();
            true
        })
        .unwrap_or(false)
}

impl Driver {
    /// The transport, once the device is up (found and brought up at the
    /// first call).
    fn ready(&mut self) -> Option<Transport> {
        if let State::Unprobed = self.state {
            self.state = self.init();
        }
        match self.state {
            State::Ready(t) => Some(t),
            _ => None,
        }
    }

    fn init(&mut self) -> State {
        let Some(t) = virtio::find(device_id::CONSOLE) else { return State::Absent };
        // VERSION_1 only: no MULTIPORT (one port, queues 0 and 1), no SIZE,
        // no EMERG_WRITE. `negotiate` and `setup_queue` set FAILED if they
        // give up.
        if t.negotiate(0, 0).is_err() || t.setup_queue(TX_QUEUE, &mut self.queue).is_err() {
            return State::Absent;
        }
        self.queue.suppress_interrupts();
        t.driver_ok();
        State::Ready(t)
    }

    /// Copies `bytes` into buffers, making each available as it fills.
    fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let id = match self.filling {
                Some(id) => id,
                None => match self.reserve() {
                    Some(id) => {
                        self.filling = Some(id);
                        self.fill = 0;
                        id
                    }
                    None => {
                        // The device stopped taking buffers (it failed):
                        // this print's rest, and every later one, on COM1.
                        self.state = State::Absent;
                        crate::console::uart_print_bytes(bytes);
                        return;
                    }
                },
            };
            let buf = &mut self.bufs.0[usize::from(id)];
            let n = bytes.len().min(BUF_LEN - self.fill);
            buf[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == BUF_LEN {
                self.commit();
            }
        }
    }

    /// A free descriptor for the next buffer: reclaims what the device
    /// used, and if the ring is still full of buffers it has not been told
    /// of, notifies (it takes them during that exit) and reclaims again.
    /// None if the device does not take them.
    fn reserve(&mut self) -> Option<u16> {
        // (Reclaiming reorders the free list: only while no buffer is being
        // filled, whose descriptor is the free list's head.)
        self.reclaim();
        if let Some(id) = self.queue.next_head() {
            return Some(id);
        }
        self.notify();
        self.reclaim();
        self.queue.next_head()
    }

    /// Makes the buffer being filled available to the device.
    fn commit(&mut self) {
        let Some(id) = self.filling.take() else { return };
        let buf =
            Buffer { addr: self.bufs.0[usize::from(id)].as_ptr() as u64, len: self.fill as u32, device_writes: false };
        // The descriptor was the free list's head (nothing was reclaimed
        // since `reserve`), so the chain's head is the buffer's index.
        let added = self.queue.add(&[buf]);
        debug_assert_eq!(added, Some(id));
        self.fill = 0;
        self.pending += 1;
    }

    fn notify(&mut self) {
        if let (State::Ready(t), true) = (self.state, self.pending > 0) {
            self.pending = 0;
            t.notify(TX_QUEUE);
        }
    }

    fn reclaim(&mut self) {
        while self.queue.pop_used().is_some() {}
    }

    /// The end of a print: everything out, in one notify, and the buffers
    /// back (the device used them during the notify's exit).
    fn flush(&mut self) {
        self.commit();
        self.notify();
        self.reclaim();
        if self.queue.num_free() < QUEUE_SIZE {
            // ftvmm's device takes every buffer during the notify's exit:
            // one it left has failed (a broken ring stops it until a
            // reset). Later prints go to COM1, so at most this one is lost.
            self.state = State::Absent;
        }
    }
}

impl Write for Driver {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.write(s.as_bytes());
        Ok(())
    }
}
