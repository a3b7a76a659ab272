//! Intel 8254 programmable interval timer (input clock [`PIT_HZ`]) at ports
//! 0x40..0x42 (counters) and 0x43 (control word), plus the PC's port 0x61
//! bits for channel 2: bit 0 drives channel 2's gate, bit 5 reads its output
//! (the speaker / TSC-calibration path). Channel 0's output is IRQ0.
//!
//! Determinism: the model never reads a clock. Counts, outputs and IRQ0
//! edges are pure functions of the virtual-clock nanosecond times the
//! caller passes in, and the lazy `now` closures are invoked only when the
//! access really depends on time (final byte of a count written to a
//! counting channel, a counter latch or read of a running channel, a
//! read-back, a port 0x61 read while channel 2 runs, a gate change on a
//! loaded channel 2). All times are clamped to be monotonic. Tick
//! conversion is `ticks = ns * PIT_HZ / 1e9` (floor, u128 intermediate);
//! rising edge `k >= 1` of a periodic run started at `T0` is at
//! `T0 + ceil(k * reload * 1e9 / PIT_HZ)`.
//!
//! What is modelled: control words (channel, access mode, mode, BCD flag),
//! the counter-latch command, the read-back command (count and status
//! latches), LSB/MSB/LSB-then-MSB reads and writes with the byte flip-flops,
//! modes 0 (interrupt on terminal count), 2 (rate generator) and 3 (square
//! wave), a reload value of 0 meaning 65536, and channel 2's gate (counting
//! pauses while it is low; a rising gate restarts modes 2/3 from the reload
//! value and resumes mode 0).
//!
//! What is deliberately simplified or left out:
//! - modes 1, 4 and 5 count and drive their output exactly like mode 0
//!   (output low until the count reaches 0, then high; one IRQ0 edge);
//! - BCD counting: the BCD bit is stored and reported by read-back, but
//!   counts are always binary;
//! - a count takes effect immediately when its last byte is written (no
//!   one-CLK load delay, and in modes 2/3 no waiting for the current period
//!   to end); writing the first byte of a two-byte count does not pause the
//!   counter;
//! - mode 3 reports `reload - elapsed mod reload` like mode 2 instead of the
//!   real decrement-by-two, and its output is high for the first
//!   `ceil(reload / 2)` ticks of each period;
//! - after a control word and before a count is written, reads return the
//!   last written reload value (undefined on real hardware); at power-on
//!   every channel is idle, so there is no IRQ0 until the guest programs
//!   channel 0 (a BIOS would have set up 18.2 Hz);
//! - a control word written to channel 0 discards IRQ0 edges that were due
//!   but not yet collected by [`Pit::advance`] (the write carries no time);
//!   loading a new count into a running channel 0 keeps them;
//! - port 0x61 bit 4 (DRAM refresh) toggles on every read instead of every
//!   15 µs, so legacy delay loops terminate without consulting time; bits
//!   6/7 (NMI sources) read 0; bit 1 (speaker data) is stored only;
//! - the control port 0x43 is write-only and reads 0xFF.

use serde::{Deserialize, Serialize};

/// Input clock of the 8254 on a PC, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

const NS_PER_SEC: u128 = 1_000_000_000;
const COUNTER_BASE: u16 = 0x40;
const CONTROL_PORT: u16 = 0x43;
const PORT_61: u16 = 0x61;
/// Port 0x61 bits 0..3 are guest-writable (gate 2, speaker, NMI enables).
const PORT_61_WRITABLE: u8 = 0x0F;

/// Whole PIT ticks in `elapsed_ns` nanoseconds.
fn ns_to_ticks(elapsed_ns: u64) -> u128 {
    u128::from(elapsed_ns) * u128::from(PIT_HZ) / NS_PER_SEC
}

/// `start_ns` plus the (rounded-up) duration of `ticks` ticks, saturating.
fn deadline_after_ticks(start_ns: u64, ticks: u128) -> u64 {
    let ns = (ticks.saturating_mul(NS_PER_SEC)).div_ceil(u128::from(PIT_HZ));
    u64::try_from(u128::from(start_ns).saturating_add(ns)).unwrap_or(u64::MAX)
}

/// Lazily evaluated, monotonic view of the caller's virtual clock for one
/// access: the closure runs at most once, and only if someone asks.
struct Clock<'a, F: FnOnce() -> u64> {
    source: Option<F>,
    cached: Option<u64>,
    last_ns: &'a mut u64,
}

impl<'a, F: FnOnce() -> u64> Clock<'a, F> {
    fn new(last_ns: &'a mut u64, source: F) -> Self {
        Clock { source: Some(source), cached: None, last_ns }
    }

    fn now(&mut self) -> u64 {
        if let Some(t) = self.cached {
            return t;
        }
        let raw = match self.source.take() {
            Some(f) => f(),
            None => *self.last_ns,
        };
        // Never let time run backwards, whatever the caller passes.
        let t = raw.max(*self.last_ns);
        *self.last_ns = t;
        self.cached = Some(t);
        t
    }
}

/// How counter reads and writes are split into bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Access {
    Lsb,
    Msb,
    LsbMsb,
}

impl Access {
    fn bits(self) -> u8 {
        match self {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::LsbMsb => 3,
        }
    }
}

/// Counting state of one channel. `initial` is, for modes 2/3, the period
/// in ticks; for one-shot modes, the count (1..=65536) that remains until
/// the terminal count, or once `fired`, just the current count value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum CountState {
    /// Control word written, no count loaded yet.
    Idle,
    /// Counting since `start_ns`.
    Running { start_ns: u64, initial: u32, fired: bool },
    /// Loaded but frozen by a low gate (channel 2 only).
    Paused { initial: u32, fired: bool },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Channel {
    /// Raw 3-bit mode field of the control word (6/7 alias 2/3).
    mode_bits: u8,
    access: Access,
    bcd: bool,
    /// Last fully written count (0 means 65536).
    reload: u16,
    state: CountState,
    gate: bool,
    /// Low byte of a two-byte count write in progress.
    write_lsb: Option<u8>,
    /// LSB-then-MSB read flip-flop.
    read_msb_next: bool,
    latched_count: Option<u16>,
    latched_status: Option<u8>,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode_bits: 0,
            access: Access::LsbMsb,
            bcd: false,
            reload: 0,
            state: CountState::Idle,
            gate,
            write_lsb: None,
            read_msb_next: false,
            latched_count: None,
            latched_status: None,
        }
    }

    fn mode(&self) -> u8 {
        match self.mode_bits & 7 {
            m @ 6..=7 => m - 4,
            m => m,
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode(), 2 | 3)
    }

    fn reload_ticks(&self) -> u32 {
        match self.reload {
            0 => 0x1_0000,
            r => u32::from(r),
        }
    }

    fn write_control(&mut self, value: u8) {
        self.access = match (value >> 4) & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::LsbMsb,
        };
        self.mode_bits = (value >> 1) & 7;
        self.bcd = value & 1 != 0;
        self.state = CountState::Idle;
        self.write_lsb = None;
        self.read_msb_next = false;
        self.latched_count = None;
        self.latched_status = None;
    }

    /// Feeds one byte of a count; true once the count is complete.
    fn write_count_byte(&mut self, value: u8) -> bool {
        match self.access {
            Access::Lsb => self.reload = u16::from(value),
            Access::Msb => self.reload = u16::from(value) << 8,
            Access::LsbMsb => match self.write_lsb.take() {
                None => {
                    self.write_lsb = Some(value);
                    return false;
                }
                Some(lsb) => self.reload = u16::from_le_bytes([lsb, value]),
            },
        }
        true
    }

    /// Starts counting from the reload value (or arms it, if the gate is low).
    fn load<F: FnOnce() -> u64>(&mut self, clock: &mut Clock<'_, F>) {
        let initial = self.reload_ticks();
        self.state = if self.gate {
            CountState::Running { start_ns: clock.now(), initial, fired: false }
        } else {
            CountState::Paused { initial, fired: false }
        };
    }

    /// Count register value after `ticks` ticks of a run.
    fn count_after(&self, initial: u32, ticks: u128) -> u16 {
        let value = if self.periodic() {
            let period = u128::from(initial.max(1));
            period - ticks % period
        } else {
            // Counts down through 0 and wraps to 0xFFFF, forever.
            (u128::from(initial) + 0x1_0000 - ticks % 0x1_0000) % 0x1_0000
        };
        (value & 0xFFFF) as u16
    }

    /// Output level after `ticks` ticks of a run.
    fn output_after(&self, initial: u32, fired: bool, ticks: u128) -> bool {
        let period = u128::from(initial.max(1));
        match self.mode() {
            // Low for the one tick where the count is 1.
            2 => period < 2 || ticks % period != period - 1,
            // High for the first half (rounded up) of each period.
            3 => ticks % period < period.div_ceil(2),
            _ => fired || ticks >= u128::from(initial),
        }
    }

    fn current_count<F: FnOnce() -> u64>(&self, clock: &mut Clock<'_, F>) -> u16 {
        match self.state {
            CountState::Idle => self.reload,
            CountState::Paused { initial, .. } => (initial & 0xFFFF) as u16,
            CountState::Running { start_ns, initial, .. } => {
                let ticks = ns_to_ticks(clock.now().saturating_sub(start_ns));
                self.count_after(initial, ticks)
            }
        }
    }

    fn output<F: FnOnce() -> u64>(&self, clock: &mut Clock<'_, F>) -> bool {
        match self.state {
            // Modes 2/3 idle high; mode 0 (and its stand-ins) idles low.
            CountState::Idle => self.periodic(),
            CountState::Paused { fired, .. } => self.periodic() || fired,
            CountState::Running { start_ns, initial, fired } => {
                let ticks = ns_to_ticks(clock.now().saturating_sub(start_ns));
                self.output_after(initial, fired, ticks)
            }
        }
    }

    /// Rising output edges of the current run up to `now_ns`.
    fn edges_by(&self, now_ns: u64) -> u64 {
        let CountState::Running { start_ns, initial, fired } = self.state else {
            return 0;
        };
        let ticks = ns_to_ticks(now_ns.saturating_sub(start_ns));
        if self.periodic() {
            u64::try_from(ticks / u128::from(initial.max(1))).unwrap_or(u64::MAX)
        } else {
            u64::from(!fired && ticks >= u128::from(initial))
        }
    }

    /// Time of rising edge number `k` (1-based) of the current run.
    fn edge_deadline(&self, k: u64) -> Option<u64> {
        let CountState::Running { start_ns, initial, fired } = self.state else {
            return None;
        };
        if self.periodic() {
            let ticks = u128::from(k).saturating_mul(u128::from(initial.max(1)));
            Some(deadline_after_ticks(start_ns, ticks))
        } else if k == 1 && !fired {
            Some(deadline_after_ticks(start_ns, u128::from(initial)))
        } else {
            None
        }
    }

    fn set_gate<F: FnOnce() -> u64>(&mut self, high: bool, clock: &mut Clock<'_, F>) {
        if high == self.gate {
            return;
        }
        self.gate = high;
        match (self.state, high) {
            (CountState::Running { start_ns, initial, fired }, false) => {
                let ticks = ns_to_ticks(clock.now().saturating_sub(start_ns));
                self.state = if self.periodic() {
                    let period = u128::from(initial.max(1));
                    CountState::Paused { initial: (period - ticks % period) as u32, fired: false }
                } else if !fired && ticks < u128::from(initial) {
                    CountState::Paused { initial: initial - ticks as u32, fired: false }
                } else {
                    CountState::Paused { initial: u32::from(self.count_after(initial, ticks)), fired: true }
                };
            }
            (CountState::Paused { initial, fired }, true) => {
                // A rising gate retriggers modes 2/3; mode 0 just resumes.
                self.state = if self.periodic() {
                    CountState::Running { start_ns: clock.now(), initial: self.reload_ticks(), fired: false }
                } else {
                    CountState::Running { start_ns: clock.now(), initial, fired }
                };
            }
            _ => {}
        }
    }

    /// Counter latch command: freeze the count for reading. A second latch
    /// before the first has been read is ignored, as on the 8254.
    fn latch_count<F: FnOnce() -> u64>(&mut self, clock: &mut Clock<'_, F>) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.current_count(clock));
        }
    }

    fn latch_status<F: FnOnce() -> u64>(&mut self, clock: &mut Clock<'_, F>) {
        if self.latched_status.is_none() {
            let out = u8::from(self.output(clock)) << 7;
            let null_count = u8::from(self.state == CountState::Idle) << 6;
            self.latched_status =
                Some(out | null_count | (self.access.bits() << 4) | (self.mode_bits << 1) | u8::from(self.bcd));
        }
    }

    /// Picks the byte of `value` the access mode says comes next; true
    /// when that was the last byte of the value.
    fn next_byte(&mut self, value: u16) -> (u8, bool) {
        let [lsb, msb] = value.to_le_bytes();
        match self.access {
            Access::Lsb => (lsb, true),
            Access::Msb => (msb, true),
            Access::LsbMsb => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    (lsb, false)
                } else {
                    (msb, true)
                }
            }
        }
    }

    fn read<F: FnOnce() -> u64>(&mut self, clock: &mut Clock<'_, F>) -> u8 {
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        if let Some(count) = self.latched_count {
            let (byte, done) = self.next_byte(count);
            if done {
                self.latched_count = None;
            }
            return byte;
        }
        let count = self.current_count(clock);
        self.next_byte(count).0
    }
}

/// The PC's 8254 PIT plus the channel-2 bits of port 0x61.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pit {
    channels: [Channel; 3],
    /// Latest virtual time seen; inputs earlier than this are clamped to it.
    last_ns: u64,
    /// IRQ0 edges of channel 0's current run already returned by `advance`.
    irq0_reported: u64,
    /// IRQ0 edges of earlier (reprogrammed) runs not yet returned.
    irq0_carried: u64,
    /// Guest-writable bits of port 0x61.
    port61: u8,
    /// Port 0x61 bit 4, flipped on every read.
    refresh: bool,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// Power-on state: all channels idle, channel 2's gate low.
    pub fn new() -> Self {
        Pit {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            last_ns: 0,
            irq0_reported: 0,
            irq0_carried: 0,
            port61: 0,
            refresh: false,
        }
    }

    /// Guest port read (0x40..0x43, 0x61). `now` is called only if the value
    /// depends on time. Unknown ports read 0xFF.
    pub fn io_read(&mut self, port: u16, now: impl FnOnce() -> u64) -> u8 {
        let mut clock = Clock::new(&mut self.last_ns, now);
        match port {
            COUNTER_BASE..=0x42 => {
                let channel = &mut self.channels[usize::from(port - COUNTER_BASE)];
                channel.read(&mut clock)
            }
            PORT_61 => {
                self.refresh = !self.refresh;
                let out2 = self.channels[2].output(&mut clock);
                (self.port61 & PORT_61_WRITABLE) | (u8::from(self.refresh) << 4) | (u8::from(out2) << 5)
            }
            _ => 0xFF,
        }
    }

    /// Guest port write (0x40..0x43, 0x61). `now` is called only if the
    /// write depends on time. Unknown ports are ignored.
    pub fn io_write(&mut self, port: u16, value: u8, now: impl FnOnce() -> u64) {
        let Pit { channels, last_ns, irq0_reported, irq0_carried, port61, .. } = self;
        let mut clock = Clock::new(last_ns, now);
        match port {
            COUNTER_BASE..=0x42 => {
                let index = usize::from(port - COUNTER_BASE);
                let channel = &mut channels[index];
                if !channel.write_count_byte(value) {
                    return;
                }
                if index == 0 {
                    // Keep edges the old run produced but nobody collected.
                    if matches!(channel.state, CountState::Running { .. }) {
                        let total = channel.edges_by(clock.now());
                        let unreported = total.saturating_sub(*irq0_reported);
                        *irq0_carried = irq0_carried.saturating_add(unreported);
                    }
                    *irq0_reported = 0;
                }
                channel.load(&mut clock);
            }
            CONTROL_PORT => {
                let select = value >> 6;
                if select == 3 {
                    // Read-back: bit 5 clear latches counts, bit 4 clear
                    // latches status, bits 1..3 select channels 0..2.
                    for (i, channel) in channels.iter_mut().enumerate() {
                        if value & (2 << i) == 0 {
                            continue;
                        }
                        if value & 0x20 == 0 {
                            channel.latch_count(&mut clock);
                        }
                        if value & 0x10 == 0 {
                            channel.latch_status(&mut clock);
                        }
                    }
                    return;
                }
                let channel = &mut channels[usize::from(select)];
                if value & 0x30 == 0 {
                    channel.latch_count(&mut clock);
                } else {
                    channel.write_control(value);
                    if select == 0 {
                        *irq0_reported = 0;
                    }
                }
            }
            PORT_61 => {
                *port61 = value & PORT_61_WRITABLE;
                channels[2].set_gate(value & 1 != 0, &mut clock);
            }
            _ => {}
        }
    }

    /// Virtual-ns time of channel 0's next IRQ0 rising edge not yet
    /// returned by [`Pit::advance`] (possibly already in the past), or
    /// `None` if channel 0 will produce no further edge.
    pub fn next_irq0_deadline(&self) -> Option<u64> {
        if self.irq0_carried > 0 {
            return Some(self.last_ns);
        }
        self.channels[0].edge_deadline(self.irq0_reported.saturating_add(1))
    }

    /// Brings channel 0 up to `now_ns` and returns how many IRQ0 rising
    /// edges happened since the previous call (saturating). A `now_ns`
    /// earlier than the latest time seen is treated as equal to it.
    pub fn advance(&mut self, now_ns: u64) -> u32 {
        let now = now_ns.max(self.last_ns);
        self.last_ns = now;
        let total = self.channels[0].edges_by(now);
        let new = total.saturating_sub(self.irq0_reported);
        self.irq0_reported = self.irq0_reported.max(total);
        let edges = new.saturating_add(self.irq0_carried);
        self.irq0_carried = 0;
        u32::try_from(edges).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn no_time() -> u64 {
        panic!("the clock must not be read for this access")
    }

    fn at(t: u64) -> impl FnOnce() -> u64 {
        move || t
    }

    /// Programs `channel` with `mode`, LSB-then-MSB, loading `reload` at `t`.
    fn program(pit: &mut Pit, channel: u8, mode: u8, reload: u16, t: u64) {
        let port = 0x40 + u16::from(channel);
        pit.io_write(0x43, (channel << 6) | 0x30 | (mode << 1), no_time);
        let [lsb, msb] = reload.to_le_bytes();
        pit.io_write(port, lsb, no_time);
        pit.io_write(port, msb, at(t));
    }

    fn read_word(pit: &mut Pit, port: u16, t: u64) -> u16 {
        let lsb = pit.io_read(port, at(t));
        let msb = pit.io_read(port, at(t));
        u16::from_le_bytes([lsb, msb])
    }

    #[test]
    fn rate_generator_at_1khz() {
        let mut pit = Pit::new();
        assert_eq!(pit.next_irq0_deadline(), None);
        program(&mut pit, 0, 2, 1193, 0);
        // ceil(1193e9 / 1193182) = 999_848 ns.
        assert_eq!(pit.next_irq0_deadline(), Some(999_848));
        assert_eq!(pit.advance(10_500_000), 10);
        assert_eq!(pit.advance(10_600_000), 0);
        let next = pit.next_irq0_deadline().unwrap();
        assert!((10_990_000..=11_000_000).contains(&next), "{next}");
        assert_eq!(pit.advance(next - 1), 0);
        assert_eq!(pit.advance(next), 1);
    }

    #[test]
    fn advance_never_goes_backwards() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 1193, 0);
        assert_eq!(pit.advance(5 * MS), 5);
        assert_eq!(pit.advance(MS), 0);
        assert_eq!(pit.advance(5 * MS), 0);
        assert_eq!(pit.advance(6 * MS), 1);
        // A read whose clock went backwards is clamped, not rewound.
        assert_eq!(read_word(&mut pit, 0x40, 0), read_word(&mut pit, 0x40, 6 * MS));
    }

    #[test]
    fn count_is_derived_from_time() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 1000, 0);
        assert_eq!(read_word(&mut pit, 0x40, 0), 1000);
        // 100 µs = 119 ticks.
        assert_eq!(read_word(&mut pit, 0x40, 100_000), 881);
        // After 1 s = 1_193_182 ticks the count has wrapped 1193 times and
        // is 182 ticks into the next period.
        assert_eq!(read_word(&mut pit, 0x40, 1_000_000_000), 1000 - 182);
    }

    #[test]
    fn latched_count_survives_later_reads() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 1000, 0);
        pit.io_write(0x43, 0x00, at(100_000));
        // Reading the latch needs no time and ignores how late it is.
        assert_eq!(pit.io_read(0x40, no_time), 881u16.to_le_bytes()[0]);
        // A second latch before the first is fully read is ignored.
        pit.io_write(0x43, 0x00, no_time);
        assert_eq!(pit.io_read(0x40, no_time), 881u16.to_le_bytes()[1]);
        // Latch consumed: the next read is live again.
        assert_eq!(read_word(&mut pit, 0x40, 200_000), 1000 - 238);
    }

    #[test]
    fn read_back_latches_status_and_count() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 1000, 0);
        // Read-back of channel 0, count and status.
        pit.io_write(0x43, 0xC2, at(100_000));
        // OUT high, count loaded, LSB-then-MSB, mode 2, binary.
        assert_eq!(pit.io_read(0x40, no_time), 0xB4);
        assert_eq!(pit.io_read(0x40, no_time), 881u16.to_le_bytes()[0]);
        assert_eq!(pit.io_read(0x40, no_time), 881u16.to_le_bytes()[1]);

        // Status only, on an idle channel 1 in mode 0 with LSB access.
        pit.io_write(0x43, 0x50, no_time);
        pit.io_write(0x43, 0xE4, no_time);
        assert_eq!(pit.io_read(0x41, no_time), 0x50);
    }

    #[test]
    fn mode0_one_shot_fires_once() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 0, 100, 0);
        // ceil(100e9 / 1193182) = 83_810 ns.
        assert_eq!(pit.next_irq0_deadline(), Some(83_810));
        assert_eq!(pit.advance(83_809), 0);
        assert_eq!(pit.advance(MS), 1);
        assert_eq!(pit.next_irq0_deadline(), None);
        // The count wraps downwards through 0xFFFF after the terminal count:
        // 1 ms = 1193 ticks, 1093 past zero: 65536 - 1093.
        assert_eq!(read_word(&mut pit, 0x40, MS), 64_443);
        assert_eq!(pit.advance(1_000 * MS), 0);
        // Rearming by writing a new count fires again.
        pit.io_write(0x40, 50, no_time);
        pit.io_write(0x40, 0, at(2_000 * MS));
        assert_eq!(pit.advance(2_001 * MS), 1);
    }

    #[test]
    fn reload_zero_means_65536() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 0, 0);
        // ceil(65536e9 / 1193182) = 54_925_402 ns: the 18.2 Hz BIOS tick.
        assert_eq!(pit.next_irq0_deadline(), Some(54_925_402));
        assert_eq!(read_word(&mut pit, 0x40, 0), 0);
        assert_eq!(read_word(&mut pit, 0x40, 1_000), 0xFFFF);
        assert_eq!(pit.advance(1_000 * MS), 18);
    }

    #[test]
    fn square_wave_on_channel2_via_port_61() {
        let mut pit = Pit::new();
        pit.io_write(0x61, 0x01, no_time); // gate high, speaker off
        program(&mut pit, 2, 3, 1000, 0);
        // 1000 ticks ≈ 838 µs period, high for the first 500 ticks.
        let out = |pit: &mut Pit, t: u64| pit.io_read(0x61, at(t)) & 0x20 != 0;
        assert!(out(&mut pit, 0));
        assert!(out(&mut pit, 400_000));
        assert!(!out(&mut pit, 500_000));
        assert!(out(&mut pit, 900_000));
        // Channel 2 never produces IRQ0.
        assert_eq!(pit.advance(10 * MS), 0);
    }

    #[test]
    fn channel2_mode0_calibration_loop() {
        // What Linux/SeaBIOS do: gate high, mode 0, poll OUT2 in 0x61.
        let mut pit = Pit::new();
        let v = pit.io_read(0x61, no_time);
        pit.io_write(0x61, (v & !0x02) | 0x01, no_time);
        pit.io_write(0x43, 0xB0, no_time);
        pit.io_write(0x42, 0xA9, no_time);
        pit.io_write(0x42, 0x04, at(10 * MS));
        assert_eq!(pit.io_read(0x61, at(10 * MS + 500_000)) & 0x21, 0x01);
        assert_eq!(pit.io_read(0x61, at(11 * MS + 100_000)) & 0x21, 0x21);
    }

    #[test]
    fn low_gate_pauses_channel2() {
        let mut pit = Pit::new();
        // Load while the gate is low: armed but not counting, no time needed.
        program(&mut pit, 2, 0, 1193, 0);
        pit.io_write(0x43, 0x80, no_time);
        pit.io_write(0x61, 0x00, no_time); // gate stays low: nothing happens
        assert_eq!(read_word(&mut pit, 0x42, 5 * MS), 1193);
        assert_eq!(pit.io_read(0x61, no_time) & 0x20, 0);
        // Start at 10 ms, count for 0.5 ms (596 ticks), pause, resume.
        pit.io_write(0x61, 0x01, at(10 * MS));
        pit.io_write(0x61, 0x00, at(10 * MS + 500_000));
        assert_eq!(read_word(&mut pit, 0x42, 50 * MS), 1193 - 596);
        pit.io_write(0x61, 0x01, at(60 * MS));
        assert_eq!(pit.io_read(0x61, at(60 * MS + 400_000)) & 0x20, 0);
        assert_eq!(pit.io_read(0x61, at(60 * MS + 600_000)) & 0x20, 0x20);
    }

    #[test]
    fn refresh_bit_toggles_per_read() {
        let mut pit = Pit::new();
        let a = pit.io_read(0x61, no_time) & 0x10;
        let b = pit.io_read(0x61, no_time) & 0x10;
        assert_ne!(a, b);
    }

    #[test]
    fn clock_is_read_only_when_needed() {
        let mut pit = Pit::new();
        // Control words, latching or reading idle channels, first count byte.
        pit.io_write(0x43, 0x34, no_time);
        pit.io_write(0x43, 0x00, no_time);
        pit.io_write(0x43, 0xFE, no_time);
        pit.io_read(0x40, no_time);
        pit.io_read(0x40, no_time);
        pit.io_read(0x40, no_time);
        pit.io_read(0x43, no_time);
        pit.io_write(0x40, 0x10, no_time);
        pit.io_write(0x61, 0x02, no_time);
        pit.io_read(0x61, no_time);
        // Once channel 0 runs, a latch does need time, exactly once.
        let mut calls = 0;
        pit.io_write(0x40, 0x00, || {
            calls += 1;
            0
        });
        pit.io_write(0x43, 0xC2, || {
            calls += 1;
            5
        });
        assert_eq!(calls, 2);
        // Pure control word to a running channel: still no clock.
        pit.io_write(0x43, 0x34, no_time);
    }

    #[test]
    fn lsb_msb_unlatched_reads_alternate() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 0x1234, 0);
        assert_eq!(pit.io_read(0x40, at(0)), 0x34);
        assert_eq!(pit.io_read(0x40, at(0)), 0x12);
        // MSB-only access.
        pit.io_write(0x43, 0x24, no_time);
        pit.io_write(0x40, 0x56, at(0));
        assert_eq!(pit.io_read(0x40, at(0)), 0x56);
        assert_eq!(pit.io_read(0x40, at(0)), 0x56);
    }

    #[test]
    fn reprogramming_running_channel0_keeps_uncollected_edges() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 1193, 0);
        assert_eq!(pit.advance(2_500_000), 2);
        // New count written (no control word) at 5.5 ms: 3 more edges so far.
        pit.io_write(0x40, 0xA9, no_time);
        pit.io_write(0x40, 0x04, at(5_500_000));
        assert_eq!(pit.next_irq0_deadline(), Some(5_500_000));
        assert_eq!(pit.advance(5_500_000), 3);
        assert_eq!(pit.next_irq0_deadline(), Some(5_500_000 + 999_848));
    }

    #[test]
    fn control_word_stops_channel0() {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 1193, 0);
        pit.io_write(0x43, 0x34, no_time);
        assert_eq!(pit.next_irq0_deadline(), None);
        assert_eq!(pit.advance(10 * MS), 0);
    }

    #[test]
    fn nonsense_input_never_panics() {
        let mut pit = Pit::new();
        let mut t = 0u64;
        for v in 0..=255u8 {
            for port in [0x40, 0x41, 0x42, 0x43, 0x61, 0xFFFF] {
                t = t.wrapping_add(u64::from(v) * 7_919);
                pit.io_write(port, v, at(t));
                pit.io_read(port, at(t / 2));
                pit.io_write(port, v.rotate_left(3), at(u64::MAX));
            }
            let _ = pit.next_irq0_deadline();
            pit.advance(u64::from(v) * 1_000);
        }
        // Tiny periods far in the future saturate instead of overflowing.
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, 1, 0);
        assert_eq!(pit.advance(u64::MAX), u32::MAX);
        let _ = pit.next_irq0_deadline();
    }
}
