//! The virtio-console: a buffered console beside COM1, so a guest's line
//! of output costs one exit (its queue notify) instead of one per byte.
//!
//! One port, no MULTIPORT, no SIZE, no EMERG_WRITE: features VERSION_1
//! only, config space all zeros. Queues: receiveq0 (0) and transmitq0 (1).
//!
//! - **TX** at the guest's notify of queue 1: every available chain's
//!   device-readable bytes are appended, in ring order, to the bytes this
//!   notify transmitted (the run loop adds them to the console output of
//!   the notify's position, beside the UART's: the same output rule,
//!   suppression on a replaying backup and re-emit at go-live). A chain
//!   that is broken (a loop, a `next` out of the table, a descriptor or
//!   buffer outside guest memory, an indirect table that cannot be read),
//!   has a device-writable descriptor, or carries more than
//!   [`MAX_CHAIN_BYTES`] is dropped and counted, and completed all the
//!   same. One notify gathers chains until it holds [`MAX_NOTIFY_BYTES`] or
//!   more; chains left over stay available for the next notify (guest-rt's
//!   driver never posts that much at once). The used-ring interrupt is
//!   raised only if the driver has not set the available ring's
//!   NO_INTERRUPT flag (guest-rt's does: it reclaims buffers by reading the
//!   used ring, so a transmit costs no interrupt exits).
//! - **RX**: input stays on COM1 (a logged `SerialRx` event delivered to
//!   the UART). A driver may post receive buffers; this device never fills
//!   them, so a notify of queue 0 does nothing.
//!
//! An available index more than a queue's size ahead of the device, a chain
//! head outside the queue, or a used ring that cannot be written is a
//! broken ring: an `Err`, and the transport stops the device until the
//! driver resets it.
//!
//! The device owns no host resource: it is a deterministic function of
//! guest memory at the notify, so a replay gathers the same bytes at the
//! same position.

use super::{RestoreError, RingError, VirtioDevice, DEVICE_ID_CONSOLE, F_VERSION_1};
use crate::memory::GuestMem;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// The receive queue's index (unused: input is on COM1).
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZES: &[u16] = &[128, 128];

/// The most one TX chain may carry; a longer chain is dropped (checked
/// before anything is read or allocated, so a huge claimed length costs
/// nothing).
pub const MAX_CHAIN_BYTES: u64 = 64 << 10;
/// One notify stops taking chains once it has gathered this much (so it
/// gathers at most this plus one chain).
pub const MAX_NOTIFY_BYTES: usize = 256 << 10;

/// `avail.flags`: the driver wants no interrupt when buffers are used.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// What the console counted. Deterministic: a function of the guest's
/// accesses, so it is part of the saved state and the digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleCounters {
    /// TX chains whose bytes were transmitted (empty ones included).
    pub tx_chains: u64,
    /// Bytes transmitted.
    pub tx_bytes: u64,
    /// TX chains dropped: more than [`MAX_CHAIN_BYTES`].
    pub tx_too_long: u64,
    /// TX chains dropped: broken, too many descriptors, device-writable
    /// descriptors, or memory outside the guest's.
    pub tx_malformed: u64,
}

/// What a saved console holds beyond its transport.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    pub counters: ConsoleCounters,
}

/// The virtio-console device.
#[derive(Debug, Default)]
pub struct Console {
    counters: ConsoleCounters,
}

/// Why a chain's bytes are not transmitted.
enum Bad {
    TooLong,
    Malformed,
}

/// The (address, length) of each descriptor of `chain`, at most `limit` of
/// them (the spec forbids a chain longer than the queue, indirect tables
/// included), or why the chain carries no output.
fn readable_descriptors(chain: DescriptorChain<&GuestMem>, limit: usize) -> Result<Vec<(GuestAddress, u32)>, Bad> {
    let mut descs = Vec::new();
    let mut total = 0u64;
    let mut last_has_next = true;
    for d in chain {
        if descs.len() == limit || d.is_write_only() {
            return Err(Bad::Malformed);
        }
        total += u64::from(d.len());
        last_has_next = d.has_next();
        descs.push((d.addr(), d.len()));
    }
    // virtio-queue's iterator ends silently on every error (a loop cut by
    // the chain's lifetime, a `next` outside the table, an indirect table
    // that cannot be read): a chain whose last descriptor still says NEXT
    // did not end where the driver said.
    if descs.is_empty() || last_has_next {
        return Err(Bad::Malformed);
    }
    if total > MAX_CHAIN_BYTES {
        return Err(Bad::TooLong);
    }
    Ok(descs)
}

impl Console {
    pub fn new() -> Self {
        Console::default()
    }

    pub fn counters(&self) -> &ConsoleCounters {
        &self.counters
    }

    /// Transmits every available TX chain (up to the notify's budget) into
    /// `out`. Returns whether the guest should be interrupted.
    fn process_tx(&mut self, queues: &mut [Queue], mem: &GuestMem, out: &mut Vec<u8>) -> Result<bool, RingError> {
        let Some(queue) = queues.get_mut(TX_QUEUE) else { return Ok(false) };
        let size = queue.size();
        let limit = usize::from(size);
        let start = out.len();
        let mut used = false;
        // At most a queue's worth of chains can be available (more is a
        // broken ring, which `iter` reports).
        for _ in 0..limit {
            if out.len() - start >= MAX_NOTIFY_BYTES {
                break;
            }
            let next = queue.iter(mem).map_err(|err| RingError::Queue { ring: "TX", err })?.next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            if head >= size {
                // It could not be completed: the ring is broken.
                return Err(RingError::HeadOutOfRange { ring: "TX", head, size });
            }
            let before = out.len();
            match readable_descriptors(chain, limit).and_then(|descs| Self::gather(mem, &descs, out)) {
                Ok(()) => {
                    self.counters.tx_chains += 1;
                    self.counters.tx_bytes += (out.len() - before) as u64;
                }
                Err(bad) => {
                    // Nothing of a dropped chain goes out.
                    out.truncate(before);
                    match bad {
                        Bad::TooLong => self.counters.tx_too_long += 1,
                        Bad::Malformed => self.counters.tx_malformed += 1,
                    }
                }
            }
            queue.add_used(mem, head, 0).map_err(|err| RingError::Used { ring: "TX", head, err })?;
            used = true;
        }
        // The driver may have asked for no interrupt (a hint the spec lets
        // the device follow; it saves the guest the interrupt's exits). A
        // valid queue's available ring is readable; if not, interrupt.
        let no_interrupt = mem
            .read_obj::<u16>(GuestAddress(queue.avail_ring()))
            .is_ok_and(|flags| flags & VRING_AVAIL_F_NO_INTERRUPT != 0);
        Ok(used && !no_interrupt)
    }

    /// Appends the bytes of `descs` to `out` (their total is within
    /// [`MAX_CHAIN_BYTES`]).
    fn gather(mem: &GuestMem, descs: &[(GuestAddress, u32)], out: &mut Vec<u8>) -> Result<(), Bad> {
        for &(addr, len) in descs {
            let at = out.len();
            out.resize(at + len as usize, 0);
            mem.read_slice(&mut out[at..], addr).map_err(|_| Bad::Malformed)?;
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    /// The bytes a TX notify transmitted are appended here.
    type Io<'a> = Vec<u8>;
    type State = ConsoleState;

    fn device_id(&self) -> u32 {
        DEVICE_ID_CONSOLE
    }

    fn features(&self) -> u64 {
        F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // struct virtio_console_config (cols, rows, max_nr_ports,
        // emerg_wr): none of SIZE, MULTIPORT and EMERG_WRITE is offered, so
        // no field is valid; it reads as zeros.
        data.fill(0);
    }

    fn reset(&mut self) {
        self.counters = ConsoleCounters::default();
    }

    fn queue_notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMem,
        out: &mut Vec<u8>,
    ) -> Result<bool, RingError> {
        match index {
            TX_QUEUE => self.process_tx(queues, mem, out),
            // Receive buffers posted: input arrives on COM1, never here.
            _ => Ok(false),
        }
    }

    fn state(&self) -> ConsoleState {
        ConsoleState { counters: self.counters.clone() }
    }

    fn restore(&mut self, state: ConsoleState) -> Result<(), RestoreError> {
        self.counters = state.counters;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{reg, MmioTransport};
    use proptest::prelude::*;

    const MEM_SIZE: u64 = 0x40000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    /// Where a queue's rings live in the test memory.
    #[derive(Clone, Copy)]
    struct Rings {
        desc: u64,
        avail: u64,
        used: u64,
    }
    const RX: Rings = Rings { desc: 0x1000, avail: 0x2000, used: 0x3000 };
    const TX: Rings = Rings { desc: 0x4000, avail: 0x5000, used: 0x6000 };
    /// Buffers go from here.
    const DATA: u64 = 0x8000;

    fn memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn queue(r: Rings, size: u16) -> Queue {
        let mut q = Queue::new(128).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(r.desc as u32), Some(0));
        q.set_avail_ring_address(Some(r.avail as u32), Some(0));
        q.set_used_ring_address(Some(r.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn queues(size: u16) -> Vec<Queue> {
        vec![queue(RX, size), queue(TX, size)]
    }

    fn put_desc(mem: &GuestMem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Makes `head` available, ring size `size`.
    fn push_avail(mem: &GuestMem, r: Rings, size: u16, head: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(r.avail + 2)).unwrap();
        mem.write_obj(head, GuestAddress(r.avail + 4 + 2 * u64::from(idx % size))).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(r.avail + 2)).unwrap();
    }

    fn used_idx(mem: &GuestMem, r: Rings) -> u16 {
        mem.read_obj(GuestAddress(r.used + 2)).unwrap()
    }

    /// Used element `i`: (id, len).
    fn used_elem(mem: &GuestMem, r: Rings, i: u16) -> (u32, u32) {
        let at = r.used + 4 + 8 * u64::from(i);
        (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    fn tx(console: &mut Console, qs: &mut [Queue], mem: &GuestMem) -> (Result<bool, RingError>, Vec<u8>) {
        let mut out = Vec::new();
        let r = console.queue_notify(TX_QUEUE, qs, mem, &mut out);
        (r, out)
    }

    #[test]
    fn identifies_as_a_console_with_only_version_1_and_zero_config() {
        let c = Console::new();
        assert_eq!(c.device_id(), 3);
        assert_eq!(c.features(), F_VERSION_1);
        assert_eq!(c.queue_max_sizes().len(), 2, "receiveq0 and transmitq0: no MULTIPORT");
        let mut config = [0xffu8; 12];
        c.read_config(0, &mut config);
        assert_eq!(config, [0; 12]);
        c.read_config(u64::MAX, &mut config[..4]);
        assert_eq!(config, [0; 12]);
    }

    #[test]
    fn tx_gathers_chains_across_descriptors_in_ring_order() {
        let mem = memory();
        let mut qs = queues(16);
        let mut c = Console::new();
        // Chain 3 -> 4 -> 5 (one of them empty), then chain 0 alone.
        mem.write_slice(b"tick ", GuestAddress(DATA)).unwrap();
        mem.write_slice(b"42\n", GuestAddress(DATA + 0x200)).unwrap();
        mem.write_slice(b"said: hi\n", GuestAddress(DATA + 0x400)).unwrap();
        put_desc(&mem, TX.desc, 3, DATA, 5, F_NEXT, 4);
        put_desc(&mem, TX.desc, 4, DATA + 0x100, 0, F_NEXT, 5);
        put_desc(&mem, TX.desc, 5, DATA + 0x200, 3, 0, 0);
        put_desc(&mem, TX.desc, 0, DATA + 0x400, 9, 0, 0);
        push_avail(&mem, TX, 16, 3);
        push_avail(&mem, TX, 16, 0);
        let (r, out) = tx(&mut c, &mut qs, &mem);
        assert!(matches!(r, Ok(true)), "no NO_INTERRUPT flag: interrupt");
        assert_eq!(out, b"tick 42\nsaid: hi\n");
        assert_eq!(used_idx(&mem, TX), 2);
        assert_eq!(used_elem(&mem, TX, 0), (3, 0));
        assert_eq!(used_elem(&mem, TX, 1), (0, 0));
        assert_eq!(c.counters(), &ConsoleCounters { tx_chains: 2, tx_bytes: 17, ..Default::default() });
        // Nothing more available: nothing used, nothing sent.
        let (r, out) = tx(&mut c, &mut qs, &mem);
        assert!(matches!(r, Ok(false)) && out.is_empty());
        // Notifying the receive queue does nothing.
        let mut out = Vec::new();
        assert!(matches!(c.queue_notify(RX_QUEUE, &mut qs, &mem, &mut out), Ok(false)));
        assert!(out.is_empty());
    }

    #[test]
    fn the_no_interrupt_flag_suppresses_the_interrupt() {
        let mem = memory();
        let mut qs = queues(16);
        let mut c = Console::new();
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, GuestAddress(TX.avail)).unwrap();
        put_desc(&mem, TX.desc, 0, DATA, 4, 0, 0);
        push_avail(&mem, TX, 16, 0);
        let (r, out) = tx(&mut c, &mut qs, &mem);
        assert!(matches!(r, Ok(false)), "buffers used, but no interrupt wanted");
        assert_eq!(out.len(), 4);
        assert_eq!(used_idx(&mem, TX), 1, "completed all the same");
    }

    #[test]
    fn tx_drops_bad_chains_but_completes_them() {
        let mem = memory();
        let mut qs = queues(16);
        let mut c = Console::new();
        mem.write_slice(b"ok", GuestAddress(DATA)).unwrap();
        // 0: device-writable; 1: readable then writable; 2: 4 GiB claimed;
        // 3: one byte over the cap over two descriptors; 4: exactly the cap;
        // 5: outside guest memory; 6: a good one.
        put_desc(&mem, TX.desc, 0, DATA, 2, F_WRITE, 0);
        put_desc(&mem, TX.desc, 1, DATA, 2, F_NEXT, 7);
        put_desc(&mem, TX.desc, 7, DATA, 2, F_WRITE, 0);
        put_desc(&mem, TX.desc, 2, DATA, u32::MAX, 0, 0);
        put_desc(&mem, TX.desc, 3, DATA, MAX_CHAIN_BYTES as u32, F_NEXT, 8);
        put_desc(&mem, TX.desc, 8, DATA, 1, 0, 0);
        put_desc(&mem, TX.desc, 4, DATA, MAX_CHAIN_BYTES as u32, 0, 0);
        put_desc(&mem, TX.desc, 5, MEM_SIZE - 1, 2, 0, 0);
        put_desc(&mem, TX.desc, 6, DATA, 2, 0, 0);
        for head in 0..7 {
            push_avail(&mem, TX, 16, head);
        }
        let (r, out) = tx(&mut c, &mut qs, &mem);
        assert!(matches!(r, Ok(true)));
        assert_eq!(out.len() as u64, MAX_CHAIN_BYTES + 2);
        assert_eq!(&out[out.len() - 2..], b"ok");
        assert_eq!(used_idx(&mem, TX), 7);
        for i in 0..7 {
            assert_eq!(used_elem(&mem, TX, i), (u32::from(i), 0));
        }
        let k = c.counters();
        assert_eq!((k.tx_chains, k.tx_too_long, k.tx_malformed), (2, 2, 3));
        assert_eq!(k.tx_bytes, out.len() as u64);
    }

    #[test]
    fn one_notify_stops_at_its_budget_and_the_next_takes_the_rest() {
        let mem = memory();
        let mut qs = queues(16);
        let mut c = Console::new();
        // Six chains of 60 KiB: the budget of 256 KiB is reached after five.
        let len = 60u32 << 10;
        for head in 0..6 {
            put_desc(&mem, TX.desc, head, DATA, len, 0, 0);
            push_avail(&mem, TX, 16, head);
        }
        let (r, out) = tx(&mut c, &mut qs, &mem);
        assert!(matches!(r, Ok(true)));
        assert_eq!(out.len(), 5 * len as usize);
        assert_eq!(used_idx(&mem, TX), 5);
        let (r, out) = tx(&mut c, &mut qs, &mem);
        assert!(matches!(r, Ok(true)));
        assert_eq!(out.len(), len as usize);
        assert_eq!(used_idx(&mem, TX), 6);
    }

    #[test]
    fn adversarial_chains_neither_panic_nor_hang() {
        let mem = memory();
        let mut c = Console::new();
        let size = 8u16;
        // A loop 0 -> 1 -> 0.
        put_desc(&mem, TX.desc, 0, DATA, 20, F_NEXT, 1);
        put_desc(&mem, TX.desc, 1, DATA, 20, F_NEXT, 0);
        // next outside the table.
        put_desc(&mem, TX.desc, 2, DATA, 20, F_NEXT, 300);
        // A buffer outside guest memory, and one across its top.
        put_desc(&mem, TX.desc, 3, u64::MAX - 4, 100, 0, 0);
        put_desc(&mem, TX.desc, 4, MEM_SIZE - 50, 100, 0, 0);
        // Indirect tables: outside memory; of length 0; of a length that is
        // not a multiple of 16.
        put_desc(&mem, TX.desc, 5, u64::MAX - 64, 64, F_INDIRECT, 0);
        put_desc(&mem, TX.desc, 6, DATA, 0, F_INDIRECT, 0);
        put_desc(&mem, TX.desc, 7, DATA + 0x800, 24, F_INDIRECT, 0);
        let mut qs = queues(size);
        for head in 0..8 {
            push_avail(&mem, TX, size, head);
        }
        let (r, out) = tx(&mut c, &mut qs, &mem);
        assert!(matches!(r, Ok(true)));
        assert!(out.is_empty(), "nothing of a dropped chain goes out");
        assert_eq!(used_idx(&mem, TX), 8);
        assert_eq!(c.counters().tx_malformed + c.counters().tx_too_long, 8);

        // A chain longer than the queue, through an indirect table of 300
        // one-byte descriptors.
        let table = DATA + 0x2000;
        for i in 0..300u16 {
            let at = table + 16 * u64::from(i);
            mem.write_obj(DATA, GuestAddress(at)).unwrap();
            mem.write_obj(1u32, GuestAddress(at + 8)).unwrap();
            mem.write_obj(if i == 299 { 0 } else { F_NEXT }, GuestAddress(at + 12)).unwrap();
            mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
        }
        put_desc(&mem, TX.desc, 0, table, 300 * 16, F_INDIRECT, 0);
        push_avail(&mem, TX, size, 0);
        let before = c.counters().tx_malformed;
        let (r, out) = tx(&mut c, &mut qs, &mem);
        assert!(matches!(r, Ok(true)) && out.is_empty());
        assert_eq!(c.counters().tx_malformed, before + 1);

        // A head outside the queue: a broken ring, nothing counted.
        push_avail(&mem, TX, size, 9);
        let before = c.counters().clone();
        let err = tx(&mut c, &mut qs, &mem).0.unwrap_err();
        assert!(err.to_string().contains("head 9"), "{err}");
        assert_eq!(c.counters(), &before);

        // An available index far ahead: a broken ring.
        let mut qs = queues(size);
        mem.write_obj(1000u16, GuestAddress(TX.avail + 2)).unwrap();
        assert!(tx(&mut c, &mut qs, &mem).0.is_err());
        assert_eq!(c.counters(), &before);
    }

    #[test]
    fn state_round_trips_and_reset_clears_it() {
        let mut c = Console::new();
        c.counters.tx_bytes = 5;
        let mut other = Console::new();
        other.restore(c.state()).unwrap();
        assert_eq!(other.counters(), c.counters());
        c.reset();
        assert_eq!(c.counters(), &ConsoleCounters::default());
    }

    /// The run loop's view: registers, DRIVER_OK, notify through the
    /// transport, an unready receive queue, save and restore.
    #[test]
    fn works_behind_the_mmio_transport_with_only_the_transmit_queue() {
        let mem = memory();
        let mut t = MmioTransport::new(Console::new());
        let w = |t: &mut MmioTransport<Console>, off: u64, v: u32| {
            t.write(off, &v.to_le_bytes());
        };
        w(&mut t, reg::QUEUE_SEL, TX_QUEUE as u32);
        w(&mut t, reg::QUEUE_NUM, 16);
        w(&mut t, reg::QUEUE_DESC_LOW, TX.desc as u32);
        w(&mut t, reg::QUEUE_DRIVER_LOW, TX.avail as u32);
        w(&mut t, reg::QUEUE_DEVICE_LOW, TX.used as u32);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, 1 | 2 | 8 | 4);
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, GuestAddress(TX.avail)).unwrap();
        mem.write_slice(b"hello\n", GuestAddress(DATA)).unwrap();
        put_desc(&mem, TX.desc, 0, DATA, 6, 0, 0);
        push_avail(&mem, TX, 16, 0);
        let mut out = Vec::new();
        assert!(!t.notify(RX_QUEUE, &mem, &mut out), "receiveq0 was never set up");
        assert!(!t.notify(TX_QUEUE, &mem, &mut out), "no interrupt asked for");
        assert_eq!(out, b"hello\n");
        let mut status = [0u8; 4];
        t.read(reg::INTERRUPT_STATUS, &mut status);
        assert_eq!(u32::from_le_bytes(status), 0);
        let saved = t.state();
        let mut other = MmioTransport::new(Console::new());
        other.restore(saved).unwrap();
        assert_eq!(other.device.counters(), t.device.counters());
    }

    /// One descriptor as the proptest makes them: addresses mostly in the
    /// data area, sometimes anywhere; lengths mostly small, sometimes huge.
    fn arb_desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        let addr = prop_oneof![
            6 => DATA..MEM_SIZE,
            1 => MEM_SIZE - 64..MEM_SIZE + 64,
            1 => any::<u64>(),
        ];
        let len = prop_oneof![
            4 => 0u32..64,
            4 => 0u32..0x10000,
            1 => any::<u32>(),
        ];
        let flags = prop_oneof![6 => 0u16..8, 1 => any::<u16>()];
        let next = prop_oneof![6 => 0u16..16, 1 => any::<u16>()];
        (addr, len, flags, next)
    }

    proptest! {
        // The failing input is printed; no regression file in the tree.
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// Random descriptor tables, avail rings and data (indirect tables
        /// included) thrown at TX: no panic, no hang, the output within the
        /// notify's bound, every used entry accounted for in the counters.
        #[test]
        fn random_rings_never_panic(
            size_log in 0u32..=4,
            descs in prop::collection::vec(arb_desc(), 16),
            heads in prop::collection::vec(prop_oneof![8 => 0u16..16, 1 => any::<u16>()], 16),
            ahead in prop_oneof![8 => 0u16..=17, 1 => any::<u16>()],
            no_interrupt in any::<bool>(),
            data in prop::collection::vec(any::<u8>(), 0x1000),
        ) {
            let size = 1u16 << size_log;
            let mem = memory();
            // Data, which indirect descriptors may point into, looks like
            // descriptors too.
            mem.write_slice(&data, GuestAddress(DATA)).unwrap();
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                put_desc(&mem, TX.desc, i as u16, addr, len, flags, next);
            }
            for (i, &h) in heads.iter().enumerate() {
                mem.write_obj(h, GuestAddress(TX.avail + 4 + 2 * i as u64)).unwrap();
            }
            mem.write_obj(u16::from(no_interrupt), GuestAddress(TX.avail)).unwrap();
            mem.write_obj(ahead, GuestAddress(TX.avail + 2)).unwrap();
            let mut c = Console::new();
            let mut qs = queues(size);
            let mut total = 0usize;
            // Notify until nothing is left (or the ring is broken).
            for _ in 0..=size {
                let (r, out) = tx(&mut c, &mut qs, &mem);
                prop_assert!(out.len() <= MAX_NOTIFY_BYTES + MAX_CHAIN_BYTES as usize);
                total += out.len();
                match r {
                    Ok(true) => prop_assert!(!no_interrupt),
                    Ok(false) => {}
                    Err(_) => {
                        prop_assert!(ahead > size || heads.iter().any(|&h| h >= size));
                        break;
                    }
                }
            }
            let k = c.counters();
            prop_assert_eq!(k.tx_bytes, total as u64);
            let completed = u64::from(qs[TX_QUEUE].next_used());
            prop_assert_eq!(completed, k.tx_chains + k.tx_too_long + k.tx_malformed);
            prop_assert_eq!(used_idx(&mem, TX), qs[TX_QUEUE].next_used());
            prop_assert!(completed <= u64::from(ahead));
        }
    }
}
