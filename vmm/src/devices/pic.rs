//! A cascaded pair of Intel 8259A programmable interrupt controllers, wired
//! as on a PC: master at ports 0x20/0x21, slave at 0xA0/0xA1, slave output
//! on master input IR2 (so IRQs 8..15 arrive through master line 2).
//!
//! What is modelled:
//! - the ICW1..ICW4 initialisation sequence (vector base from ICW2,
//!   single/cascade from ICW1, auto-EOI from ICW4);
//! - OCW1 (interrupt mask), OCW2 (non-specific and specific EOI, the rotate
//!   variants and set-priority), OCW3 (IRR/ISR read select and poll mode);
//! - edge-triggered requests: a 0->1 transition of a line latches its IRR
//!   bit, which stays latched until acknowledged even if the line drops;
//! - priority resolution (fixed, IR0 highest, unless the guest rotates it)
//!   with in-service lines blocking equal and lower priorities, and the
//!   cascade followed when acknowledging.
//!
//! What is deliberately left out:
//! - level-triggered mode (ICW1 LTIM) and the ELCR: every line is edge
//!   triggered; the ELCR ports 0x4D0/0x4D1 read 0 and ignore writes;
//! - special mask mode, special fully nested mode, buffered mode and 8080
//!   mode: the bits are accepted and ignored;
//! - ICW3 contents: the cascade wiring is fixed (slave on master IR2);
//! - spurious interrupts: [`Pic::acknowledge`] returns `None` instead of a
//!   spurious IR7 vector, because the VMM only acknowledges after
//!   [`Pic::has_pending`] said yes and both are computed the same way;
//! - an external request on master IR2: while the master is in cascade mode
//!   IR2 reflects only the slave's output (the slave's output is evaluated
//!   on demand rather than latched, so a slave request that gets masked
//!   before the acknowledge cannot turn into a spurious vector).
//!
//! Power-on state: both chips mask everything (IMR = 0xFF) and deliver
//! nothing until a complete ICW sequence has been written. As on real
//! hardware, ICW1 itself clears the IMR; delivery resumes when the sequence
//! completes.
//!
//! The model is a pure state machine: no time, no host state, so it is
//! trivially deterministic under record/replay.

use serde::{Deserialize, Serialize};

const MASTER_COMMAND: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_COMMAND: u16 = 0xA0;
const SLAVE_DATA: u16 = 0xA1;
const ELCR_MASTER: u16 = 0x4D0;
const ELCR_SLAVE: u16 = 0x4D1;

/// Master input the slave's INT output is wired to.
const CASCADE_LINE: u8 = 2;

/// Which initialisation command word the data port expects next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum InitStep {
    /// Not initialising: data port writes are OCW1 (the IMR).
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A chip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Chip {
    /// Interrupt request register: latched edges not yet acknowledged.
    irr: u8,
    /// In-service register: acknowledged, not yet EOI'd.
    isr: u8,
    /// Interrupt mask register.
    imr: u8,
    /// Current level of each input line, for edge detection.
    levels: u8,
    /// ICW2 with the low three bits cleared.
    vector_base: u8,
    /// Line that currently has the lowest priority (7 = fixed priority).
    lowest_priority: u8,
    /// OCW3 read register select: command port reads ISR when set, else IRR.
    read_isr: bool,
    /// OCW3 poll command issued: the next command port read is a poll.
    poll: bool,
    /// ICW4 AEOI: acknowledge does not set the ISR bit.
    auto_eoi: bool,
    /// OCW2 "rotate in automatic EOI mode".
    rotate_on_auto_eoi: bool,
    /// ICW1 SNGL: no cascade, so no ICW3.
    single: bool,
    /// ICW1 IC4: an ICW4 follows.
    needs_icw4: bool,
    init_step: InitStep,
    /// A complete ICW sequence has been written at least once.
    initialised: bool,
}

impl Chip {
    fn new() -> Self {
        Chip {
            irr: 0,
            isr: 0,
            imr: 0xFF,
            levels: 0,
            vector_base: 0,
            lowest_priority: 7,
            read_isr: false,
            poll: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            single: false,
            needs_icw4: false,
            init_step: InitStep::Ready,
            initialised: false,
        }
    }

    /// Drive input `line` (0..7) to `level`; a rising edge latches IRR.
    fn set_line(&mut self, line: u8, level: bool) {
        let bit = 1u8 << (line & 7);
        if level {
            if self.levels & bit == 0 {
                self.irr |= bit;
            }
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
    }

    /// Priority rank of `line`: 0 is the highest.
    fn rank(&self, line: u8) -> u8 {
        line.wrapping_sub(self.lowest_priority).wrapping_sub(1) & 7
    }

    /// Highest-priority line set in `bits`.
    fn highest(&self, bits: u8) -> Option<u8> {
        (1..=8u8).map(|i| self.lowest_priority.wrapping_add(i) & 7).find(|&line| bits & (1 << line) != 0)
    }

    /// The line this chip would hand out on an INTA, given its (possibly
    /// cascade-adjusted) request register `irr`.
    fn pending_line(&self, irr: u8) -> Option<u8> {
        if !self.initialised || self.init_step != InitStep::Ready {
            return None;
        }
        let candidate = self.highest(irr & !self.imr)?;
        match self.highest(self.isr) {
            // An in-service line blocks requests of equal or lower priority.
            Some(in_service) if self.rank(in_service) <= self.rank(candidate) => None,
            _ => Some(candidate),
        }
    }

    /// INTA for `line` on this chip: IRR -> ISR (or straight through with AEOI).
    fn ack_line(&mut self, line: u8) {
        let bit = 1u8 << (line & 7);
        self.irr &= !bit;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.lowest_priority = line & 7;
            }
        } else {
            self.isr |= bit;
        }
    }

    fn vector(&self, line: u8) -> u8 {
        self.vector_base | (line & 7)
    }

    fn non_specific_eoi(&mut self, rotate: bool) {
        if let Some(line) = self.highest(self.isr) {
            self.isr &= !(1 << line);
            if rotate {
                self.lowest_priority = line;
            }
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            self.icw1(value);
        } else if value & 0x08 != 0 {
            self.ocw3(value);
        } else {
            self.ocw2(value);
        }
    }

    fn icw1(&mut self, value: u8) {
        // Datasheet: ICW1 clears the IMR, resets priority and the read
        // select, and zeroes the ICW4 functions. Latched requests are
        // dropped too (so stale edges cannot fire into the new vector base),
        // but `levels` is kept: a line already high must go low and high
        // again before it requests ("edge sense circuit is reset").
        self.irr = 0;
        self.isr = 0;
        self.imr = 0;
        self.lowest_priority = 7;
        self.read_isr = false;
        self.poll = false;
        self.auto_eoi = false;
        self.rotate_on_auto_eoi = false;
        self.single = value & 0x02 != 0;
        self.needs_icw4 = value & 0x01 != 0;
        self.init_step = InitStep::Icw2;
    }

    fn ocw2(&mut self, value: u8) {
        let line = value & 7;
        match value >> 5 {
            0b000 => self.rotate_on_auto_eoi = false,
            0b001 => self.non_specific_eoi(false),
            0b010 => {} // no operation
            0b011 => self.isr &= !(1 << line),
            0b100 => self.rotate_on_auto_eoi = true,
            0b101 => self.non_specific_eoi(true),
            0b110 => self.lowest_priority = line,
            _ => {
                // 0b111: rotate on specific EOI.
                self.isr &= !(1 << line);
                self.lowest_priority = line;
            }
        }
    }

    fn ocw3(&mut self, value: u8) {
        // Bits 6..5 (special mask mode) are ignored.
        self.poll = value & 0x04 != 0;
        if value & 0x02 != 0 {
            self.read_isr = value & 0x01 != 0;
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            InitStep::Ready => {
                self.imr = value;
                return;
            }
            InitStep::Icw2 => {
                self.vector_base = value & 0xF8;
                self.init_step = if !self.single {
                    InitStep::Icw3
                } else if self.needs_icw4 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw3 => {
                // The cascade wiring is fixed; the value is not needed.
                self.init_step = if self.needs_icw4 { InitStep::Icw4 } else { InitStep::Ready };
            }
            InitStep::Icw4 => {
                self.auto_eoi = value & 0x02 != 0;
                self.init_step = InitStep::Ready;
            }
        }
        // Only the end of an ICW sequence (not an OCW1) initialises.
        if self.init_step == InitStep::Ready {
            self.initialised = true;
        }
    }

    /// Command port read: a poll (which acknowledges like an INTA on this
    /// chip alone) or the register selected by OCW3.
    fn read_command(&mut self, irr: u8) -> u8 {
        if self.poll {
            self.poll = false;
            return match self.pending_line(irr) {
                Some(line) => {
                    self.ack_line(line);
                    0x80 | line
                }
                None => 0,
            };
        }
        if self.read_isr {
            self.isr
        } else {
            irr
        }
    }
}

/// The PC's cascaded 8259A pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Power-on state: both chips uninitialised, everything masked.
    pub fn new() -> Self {
        Pic { master: Chip::new(), slave: Chip::new() }
    }

    /// Whether the slave's INT output (master IR2) is asserted.
    fn slave_output(&self) -> bool {
        self.slave.pending_line(self.slave.irr).is_some()
    }

    fn cascaded(&self) -> bool {
        !self.master.single
    }

    /// The master's request register as seen by its priority logic: in
    /// cascade mode IR2 is the slave's output.
    fn master_irr(&self) -> u8 {
        if self.cascaded() {
            let cascade_bit = 1 << CASCADE_LINE;
            let slave = if self.slave_output() { cascade_bit } else { 0 };
            (self.master.irr & !cascade_bit) | slave
        } else {
            self.master.irr
        }
    }

    /// Guest port read. Unknown ports read 0xFF.
    pub fn io_read(&mut self, port: u16) -> u8 {
        match port {
            MASTER_COMMAND => {
                let irr = self.master_irr();
                self.master.read_command(irr)
            }
            MASTER_DATA => self.master.imr,
            SLAVE_COMMAND => {
                let irr = self.slave.irr;
                self.slave.read_command(irr)
            }
            SLAVE_DATA => self.slave.imr,
            ELCR_MASTER | ELCR_SLAVE => 0,
            _ => 0xFF,
        }
    }

    /// Guest port write. Unknown ports (and the ELCR) ignore writes.
    pub fn io_write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_COMMAND => self.master.write_command(value),
            MASTER_DATA => self.master.write_data(value),
            SLAVE_COMMAND => self.slave.write_command(value),
            SLAVE_DATA => self.slave.write_data(value),
            _ => {}
        }
    }

    /// Drive IRQ line `irq` (0..15) to `level`. A 0->1 transition latches
    /// a request; holding the line high does not re-trigger. Out-of-range
    /// lines are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 => self.master.set_line(irq, level),
            8..=15 => self.slave.set_line(irq - 8, level),
            _ => {}
        }
    }

    /// Raise and lower `irq`: one edge, leaving the line low.
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    /// True iff [`Pic::acknowledge`] would return `Some`: the master has an
    /// unmasked request (IR2 following the slave) of higher priority than
    /// anything in service.
    pub fn has_pending(&self) -> bool {
        self.master.pending_line(self.master_irr()).is_some()
    }

    /// The INTA cycle: returns the vector of the highest-priority pending
    /// request and moves it from IRR to ISR (unless auto-EOI), on both
    /// chips for a slave request. `None` if nothing is pending.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let line = self.master.pending_line(self.master_irr())?;
        if line == CASCADE_LINE && self.cascaded() {
            // master_irr() only shows IR2 when the slave has a line ready.
            let slave_line = self.slave.pending_line(self.slave.irr)?;
            self.master.ack_line(line);
            self.slave.ack_line(slave_line);
            Some(self.slave.vector(slave_line))
        } else {
            self.master.ack_line(line);
            Some(self.master.vector(line))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classic PC init: master 0x20, slave 0x28, cascade on IR2,
    /// 8086 mode, optional auto-EOI; all lines unmasked afterwards.
    fn init(auto_eoi: bool) -> Pic {
        let mut pic = Pic::new();
        let icw4 = if auto_eoi { 0x03 } else { 0x01 };
        pic.io_write(0x20, 0x11);
        pic.io_write(0x21, 0x20);
        pic.io_write(0x21, 0x04);
        pic.io_write(0x21, icw4);
        pic.io_write(0xA0, 0x11);
        pic.io_write(0xA1, 0x28);
        pic.io_write(0xA1, 0x02);
        pic.io_write(0xA1, icw4);
        pic.io_write(0x21, 0x00);
        pic.io_write(0xA1, 0x00);
        pic
    }

    fn eoi_master(pic: &mut Pic) {
        pic.io_write(0x20, 0x20);
    }

    fn eoi_slave(pic: &mut Pic) {
        pic.io_write(0xA0, 0x20);
    }

    #[test]
    fn uninitialised_pic_masks_everything() {
        let mut pic = Pic::new();
        assert_eq!(pic.io_read(0x21), 0xFF);
        assert_eq!(pic.io_read(0xA1), 0xFF);
        pic.pulse_irq(0);
        assert!(!pic.has_pending());
        // Unmasking without initialising still delivers nothing.
        pic.io_write(0x21, 0x00);
        assert!(!pic.has_pending());
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn init_sequence_sets_bases_and_delivery_waits_for_completion() {
        let mut pic = Pic::new();
        pic.pulse_irq(1);
        pic.io_write(0x20, 0x11);
        // ICW1 clears the IMR, but nothing is delivered mid-sequence.
        assert_eq!(pic.io_read(0x21), 0x00);
        pic.pulse_irq(1);
        assert!(!pic.has_pending());
        pic.io_write(0x21, 0x20);
        pic.io_write(0x21, 0x04);
        assert!(!pic.has_pending());
        pic.io_write(0x21, 0x01);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x21));

        let mut pic = init(false);
        assert_eq!(pic.io_read(0x21), 0);
        assert_eq!(pic.io_read(0xA1), 0);
        pic.pulse_irq(9);
        assert_eq!(pic.acknowledge(), Some(0x29));
    }

    #[test]
    fn irq0_ack_and_eoi() {
        let mut pic = init(false);
        assert!(!pic.has_pending());
        pic.pulse_irq(0);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert!(!pic.has_pending());
        assert_eq!(pic.acknowledge(), None);
        // EOI alone does not re-trigger: the request was consumed.
        eoi_master(&mut pic);
        assert!(!pic.has_pending());
        pic.pulse_irq(0);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x20));
    }

    #[test]
    fn in_service_line_blocks_its_own_new_edge_until_eoi() {
        let mut pic = init(false);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.pulse_irq(0);
        assert!(!pic.has_pending());
        eoi_master(&mut pic);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x20));
    }

    #[test]
    fn masking_holds_the_request_until_unmasked() {
        let mut pic = init(false);
        pic.io_write(0x21, 0x02);
        assert_eq!(pic.io_read(0x21), 0x02);
        pic.pulse_irq(1);
        assert!(!pic.has_pending());
        assert_eq!(pic.acknowledge(), None);
        pic.io_write(0x21, 0x00);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x21));
    }

    #[test]
    fn fixed_priority_and_nesting() {
        let mut pic = init(false);
        pic.pulse_irq(1);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        // IRQ0 in service blocks IRQ1.
        assert!(!pic.has_pending());
        eoi_master(&mut pic);
        assert_eq!(pic.acknowledge(), Some(0x21));
        // IRQ1 in service blocks IRQ3 but not IRQ0.
        pic.pulse_irq(3);
        assert!(!pic.has_pending());
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        // Non-specific EOI retires the highest in service (IRQ0) first.
        eoi_master(&mut pic);
        assert!(!pic.has_pending());
        eoi_master(&mut pic);
        assert_eq!(pic.acknowledge(), Some(0x23));
    }

    #[test]
    fn specific_eoi_clears_only_the_named_line() {
        let mut pic = init(false);
        pic.pulse_irq(4);
        assert_eq!(pic.acknowledge(), Some(0x24));
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x21));
        pic.io_write(0x20, 0x0B); // OCW3: read ISR
        assert_eq!(pic.io_read(0x20), 0x12);
        pic.io_write(0x20, 0x64); // specific EOI for IR4
        assert_eq!(pic.io_read(0x20), 0x02);
    }

    #[test]
    fn slave_irqs_go_through_the_cascade() {
        let mut pic = init(false);
        pic.pulse_irq(12);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x2C));
        assert!(!pic.has_pending());
        pic.io_write(0x20, 0x0B);
        pic.io_write(0xA0, 0x0B);
        assert_eq!(pic.io_read(0x20), 0x04, "master IR2 in service");
        assert_eq!(pic.io_read(0xA0), 0x10, "slave IR4 in service");

        // A second slave IRQ is blocked by master IR2 being in service...
        pic.pulse_irq(9);
        assert!(!pic.has_pending());
        // ...and EOI on the slave alone is not enough.
        eoi_slave(&mut pic);
        assert!(!pic.has_pending());
        eoi_master(&mut pic);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x29));
        eoi_slave(&mut pic);
        eoi_master(&mut pic);
        assert!(!pic.has_pending());
    }

    #[test]
    fn slave_priority_sits_at_master_ir2() {
        let mut pic = init(false);
        pic.pulse_irq(3);
        pic.pulse_irq(15);
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x21));
        eoi_master(&mut pic);
        assert_eq!(pic.acknowledge(), Some(0x2F));
        eoi_slave(&mut pic);
        eoi_master(&mut pic);
        assert_eq!(pic.acknowledge(), Some(0x23));
    }

    #[test]
    fn masking_the_cascade_or_the_slave_line_hides_slave_irqs() {
        let mut pic = init(false);
        pic.io_write(0x21, 0x04);
        pic.pulse_irq(8);
        assert!(!pic.has_pending());
        pic.io_write(0x21, 0x00);
        pic.io_write(0xA1, 0x01);
        assert!(!pic.has_pending());
        // Master IRR shows IR2 only while the slave is really asserting.
        pic.io_write(0x20, 0x0A);
        assert_eq!(pic.io_read(0x20), 0x00);
        pic.io_write(0xA1, 0x00);
        assert_eq!(pic.io_read(0x20), 0x04);
        assert_eq!(pic.acknowledge(), Some(0x28));
    }

    #[test]
    fn auto_eoi_needs_no_eoi() {
        let mut pic = init(true);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.io_write(0x20, 0x0B);
        assert_eq!(pic.io_read(0x20), 0, "nothing in service");
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.pulse_irq(10);
        assert_eq!(pic.acknowledge(), Some(0x2A));
        pic.pulse_irq(10);
        assert_eq!(pic.acknowledge(), Some(0x2A));
    }

    #[test]
    fn held_level_does_not_retrigger() {
        let mut pic = init(false);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x24));
        eoi_master(&mut pic);
        pic.set_irq(4, true);
        assert!(!pic.has_pending());
        pic.set_irq(4, false);
        assert!(!pic.has_pending());
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x24));
    }

    #[test]
    fn request_stays_latched_after_the_line_drops() {
        let mut pic = init(false);
        pic.set_irq(5, true);
        pic.set_irq(5, false);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(0x25));
    }

    #[test]
    fn ocw3_selects_irr_or_isr() {
        let mut pic = init(false);
        pic.pulse_irq(3);
        pic.pulse_irq(5);
        // IRR is the default read after init.
        assert_eq!(pic.io_read(0x20), 0x28);
        assert_eq!(pic.acknowledge(), Some(0x23));
        pic.io_write(0x20, 0x0B);
        assert_eq!(pic.io_read(0x20), 0x08);
        assert_eq!(pic.io_read(0x20), 0x08, "selection is sticky");
        pic.io_write(0x20, 0x0A);
        assert_eq!(pic.io_read(0x20), 0x20);
        // OCW3 without RR set keeps the previous selection.
        pic.io_write(0x20, 0x08);
        assert_eq!(pic.io_read(0x20), 0x20);
    }

    #[test]
    fn poll_mode_acknowledges_on_read() {
        let mut pic = init(false);
        pic.pulse_irq(6);
        pic.io_write(0x20, 0x0C);
        assert_eq!(pic.io_read(0x20), 0x86);
        assert!(!pic.has_pending());
        pic.io_write(0x20, 0x0C);
        assert_eq!(pic.io_read(0x20), 0x00);
    }

    #[test]
    fn rotation_makes_the_serviced_line_lowest() {
        let mut pic = init(false);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.io_write(0x20, 0xA0); // rotate on non-specific EOI
        pic.pulse_irq(0);
        pic.pulse_irq(7);
        assert_eq!(pic.acknowledge(), Some(0x27));
        pic.io_write(0x20, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x20));
    }

    #[test]
    fn elcr_and_unknown_ports() {
        let mut pic = init(false);
        pic.io_write(0x4D0, 0xFF);
        pic.io_write(0x4D1, 0xFF);
        assert_eq!(pic.io_read(0x4D0), 0);
        assert_eq!(pic.io_read(0x4D1), 0);
        assert_eq!(pic.io_read(0x22), 0xFF);
    }

    #[test]
    fn nonsense_input_never_panics() {
        let mut pic = Pic::new();
        for v in 0..=255u8 {
            for port in [0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0xFFFF] {
                pic.io_write(port, v);
                pic.io_read(port);
            }
            pic.set_irq(v, v & 1 == 0);
            pic.pulse_irq(v);
            if pic.has_pending() {
                assert!(pic.acknowledge().is_some());
            } else {
                assert_eq!(pic.acknowledge(), None);
            }
        }
    }

    #[test]
    fn state_is_cloneable_and_comparable() {
        let mut pic = init(false);
        let before = pic.clone();
        assert_eq!(pic, before);
        pic.pulse_irq(3);
        assert_ne!(pic, before);
    }
}
