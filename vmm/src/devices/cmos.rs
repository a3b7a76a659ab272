//! The PC CMOS real-time clock and NVRAM (MC146818-style): index port 0x70,
//! data port 0x71, 128 bytes.
//!
//! What is modelled:
//! - the date/time registers (0x00 seconds, 0x02 minutes, 0x04 hours,
//!   0x06 weekday with 1 = Sunday, 0x07 day of month, 0x08 month,
//!   0x09 two-digit year, 0x32 century), computed on every read from the
//!   caller's UTC wall clock and encoded per status B: BCD or binary (DM,
//!   bit 2) and 24-hour or 12-hour with bit 7 of the hour meaning PM
//!   (bit 1);
//! - status A (0x0A): divider/rate bits are guest-writable RAM; UIP (bit 7)
//!   reads as set during the last 244 µs of each wall-clock second, so
//!   guests that wait for an update edge make progress deterministically;
//! - status B (0x0B) is plain guest-writable RAM that controls the encoding;
//!   status C (0x0C) reads 0 (no interrupt flags ever become set);
//!   status D (0x0D) reads 0x80 (valid RAM and time);
//! - the BIOS memory-size bytes, pre-filled from the guest RAM size;
//! - everything else, including the alarm registers 0x01/0x03/0x05, as
//!   plain NVRAM.
//!
//! What is deliberately left out:
//! - setting the clock: writes to the date/time registers are stored as
//!   RAM but never change the reported time, which the VMM owns (the guest
//!   cannot set the virtual RTC);
//! - the SET bit (status B bit 7) freezes nothing, and the UIP bit ignores
//!   it and the divider bits;
//! - periodic, alarm and update-ended interrupts: IRQ8 never fires, and
//!   the interrupt-enable bits in status B are stored only;
//! - NMI masking: bit 7 of the index written to port 0x70 is ignored;
//! - daylight-saving (status B bit 0) and the CMOS checksum bytes.
//!
//! Determinism: the model never reads a clock. The lazy `wall_clock_ns`
//! closure is called only when a date/time register or status A is read,
//! so the VMM logs a wall-clock reading exactly when one is used.

use serde::{Deserialize, Serialize};

const INDEX_PORT: u16 = 0x70;
const DATA_PORT: u16 = 0x71;
const SIZE: usize = 128;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0A;
const REG_STATUS_B: u8 = 0x0B;
const REG_STATUS_C: u8 = 0x0C;
const REG_STATUS_D: u8 = 0x0D;
const REG_CENTURY: u8 = 0x32;

const STATUS_A_UIP: u8 = 0x80;
const STATUS_B_BINARY: u8 = 0x04;
const STATUS_B_24H: u8 = 0x02;
const STATUS_D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

/// 32.768 kHz time base, 1.024 kHz rate: what a BIOS leaves in status A.
const DEFAULT_STATUS_A: u8 = 0x26;
/// 24-hour mode, BCD encoding, no interrupts.
const DEFAULT_STATUS_B: u8 = STATUS_B_24H;

const NS_PER_SEC: u64 = 1_000_000_000;
/// UIP is set this long before each second boundary (244 µs, the
/// MC146818's update cycle warning window).
const UIP_WINDOW_NS: u64 = 244_000;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A broken-down UTC date and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: u64,
    month: u8,
    day: u8,
    /// 0 = Sunday .. 6 = Saturday.
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Converts days since 1970-01-01 into (year, month, day) with Howard
/// Hinnant's `civil_from_days`, restricted to non-negative day counts.
fn civil_from_days(days: u64) -> (u64, u8, u8) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // day of era, [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // March-based month, [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month as u8, day as u8)
}

impl DateTime {
    fn from_unix_seconds(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            // 1970-01-01 was a Thursday.
            weekday: ((days + 4) % 7) as u8,
            hour: (rem / 3_600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }
}

fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// The CMOS RTC/NVRAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cmos {
    /// Register selected through port 0x70 (NMI bit stripped).
    index: u8,
    /// The 128 bytes of RAM (a Vec because serde derives arrays only up to
    /// 32 elements; accesses use `get` so a malformed snapshot cannot panic).
    ram: Vec<u8>,
}

impl Cmos {
    /// A CMOS with default status registers and the BIOS memory-size bytes
    /// filled in for `mem_size_bytes` of guest RAM.
    pub fn new(mem_size_bytes: u64) -> Self {
        let mut cmos = Cmos { index: 0, ram: vec![0; SIZE] };
        cmos.set(REG_STATUS_A, DEFAULT_STATUS_A);
        cmos.set(REG_STATUS_B, DEFAULT_STATUS_B);

        // Base memory: always the conventional 640 KiB.
        cmos.set_u16(0x15, 640);
        // Extended memory above 1 MiB in KiB, twice (0x17 is what int 15h
        // AH=88h reports, 0x30 the POST-tested copy).
        let extended_kib = mem_size_bytes.saturating_sub(MIB) / KIB;
        let extended_kib = extended_kib.min(0xFFFF) as u16;
        cmos.set_u16(0x17, extended_kib);
        cmos.set_u16(0x30, extended_kib);
        // Memory above 16 MiB in 64 KiB units (SeaBIOS/QEMU convention).
        let above_16m = mem_size_bytes.saturating_sub(16 * MIB) / (64 * KIB);
        cmos.set_u16(0x34, above_16m.min(0xFFFF) as u16);
        cmos
    }

    fn get(&self, reg: u8) -> u8 {
        self.ram.get(usize::from(reg)).copied().unwrap_or(0xFF)
    }

    fn set(&mut self, reg: u8, value: u8) {
        if let Some(byte) = self.ram.get_mut(usize::from(reg)) {
            *byte = value;
        }
    }

    /// Stores a little-endian 16-bit value at `reg`, `reg + 1`.
    fn set_u16(&mut self, reg: u8, value: u16) {
        let [lo, hi] = value.to_le_bytes();
        self.set(reg, lo);
        self.set(reg.wrapping_add(1), hi);
    }

    /// Guest port read. Port 0x70 is write-only and reads 0xFF, as do
    /// unknown ports. `wall_clock_ns` (ns since the Unix epoch, UTC) is
    /// called only for date/time registers and status A.
    pub fn io_read(&mut self, port: u16, wall_clock_ns: impl FnOnce() -> u64) -> u8 {
        if port != DATA_PORT {
            return 0xFF;
        }
        match self.index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH | REG_YEAR | REG_CENTURY => {
                self.read_clock(self.index, wall_clock_ns())
            }
            REG_STATUS_A => {
                let into_second = wall_clock_ns() % NS_PER_SEC;
                let uip = if into_second >= NS_PER_SEC - UIP_WINDOW_NS { STATUS_A_UIP } else { 0 };
                (self.get(REG_STATUS_A) & !STATUS_A_UIP) | uip
            }
            // Reading C clears its flags; none are ever raised.
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D_VRT,
            reg => self.get(reg),
        }
    }

    /// Guest port write: 0x70 selects the register (bit 7, the NMI mask,
    /// is ignored), 0x71 writes it. Status C/D are read-only, UIP is
    /// read-only, and date/time registers are stored but not used.
    pub fn io_write(&mut self, port: u16, value: u8) {
        match port {
            INDEX_PORT => self.index = value & 0x7F,
            DATA_PORT => match self.index {
                REG_STATUS_A => self.set(REG_STATUS_A, value & !STATUS_A_UIP),
                REG_STATUS_C | REG_STATUS_D => {}
                reg => self.set(reg, value),
            },
            _ => {}
        }
    }

    /// Encodes date/time register `reg` for wall-clock time `ns`.
    fn read_clock(&self, reg: u8, ns: u64) -> u8 {
        let status_b = self.get(REG_STATUS_B);
        let encode = |value: u8| {
            if status_b & STATUS_B_BINARY != 0 {
                value
            } else {
                to_bcd(value)
            }
        };
        let now = DateTime::from_unix_seconds(ns / NS_PER_SEC);
        match reg {
            REG_SECONDS => encode(now.second),
            REG_MINUTES => encode(now.minute),
            REG_HOURS if status_b & STATUS_B_24H != 0 => encode(now.hour),
            REG_HOURS => {
                // 12-hour mode: 12, 1..11 with the PM flag outside the encoding.
                let hour12 = match now.hour % 12 {
                    0 => 12,
                    h => h,
                };
                let pm = if now.hour >= 12 { HOUR_PM } else { 0 };
                encode(hour12) | pm
            }
            REG_WEEKDAY => encode(now.weekday + 1),
            REG_DAY => encode(now.day),
            REG_MONTH => encode(now.month),
            REG_YEAR => encode((now.year % 100) as u8),
            // u64 nanoseconds end in year 2554, so the century fits a byte.
            _ => encode((now.year / 100 % 100) as u8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NS_PER_SEC;

    fn no_clock() -> u64 {
        panic!("the wall clock must not be read for this register")
    }

    fn read(cmos: &mut Cmos, reg: u8, wall_ns: u64) -> u8 {
        cmos.io_write(0x70, reg);
        cmos.io_read(0x71, || wall_ns)
    }

    /// (year, month, day, weekday 1=Sun, hour, minute, second) in binary.
    fn read_all_binary(cmos: &mut Cmos, wall_ns: u64) -> (u16, u8, u8, u8, u8, u8, u8) {
        let century = u16::from(read(cmos, 0x32, wall_ns));
        let year = u16::from(read(cmos, 0x09, wall_ns));
        (
            century * 100 + year,
            read(cmos, 0x08, wall_ns),
            read(cmos, 0x07, wall_ns),
            read(cmos, 0x06, wall_ns),
            read(cmos, 0x04, wall_ns),
            read(cmos, 0x02, wall_ns),
            read(cmos, 0x00, wall_ns),
        )
    }

    fn binary_24h() -> Cmos {
        let mut cmos = Cmos::new(0);
        cmos.io_write(0x70, 0x0B);
        cmos.io_write(0x71, 0x06);
        cmos
    }

    #[test]
    fn epoch_is_thursday_1970_01_01() {
        let mut cmos = binary_24h();
        assert_eq!(read_all_binary(&mut cmos, 0), (1970, 1, 1, 5, 0, 0, 0));
    }

    #[test]
    fn known_timestamps() {
        let mut cmos = binary_24h();
        assert_eq!(read_all_binary(&mut cmos, 1_700_000_000 * S), (2023, 11, 14, 3, 22, 13, 20));
        // Leap day 2024-02-29 (a Thursday) and the day after it.
        assert_eq!(read_all_binary(&mut cmos, 1_709_164_800 * S + 1), (2024, 2, 29, 5, 0, 0, 0));
        assert_eq!(read_all_binary(&mut cmos, 1_709_251_199 * S), (2024, 2, 29, 5, 23, 59, 59));
        assert_eq!(read_all_binary(&mut cmos, 1_709_251_200 * S), (2024, 3, 1, 6, 0, 0, 0));
        // 2000 was a leap year (divisible by 400), 2100 is not.
        assert_eq!(read_all_binary(&mut cmos, 951_782_400 * S), (2000, 2, 29, 3, 0, 0, 0));
        assert_eq!(read_all_binary(&mut cmos, 4_107_542_400 * S), (2100, 3, 1, 2, 0, 0, 0));
        // New Year's Eve rolling over, sub-second part ignored.
        assert_eq!(read_all_binary(&mut cmos, 1_704_067_199 * S + 999_999_999), (2023, 12, 31, 1, 23, 59, 59));
    }

    #[test]
    fn civil_from_days_matches_a_day_by_day_walk() {
        let days_in_month = |y: u64, m: u8| match m {
            2 if (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970u64, 1u8, 1u8);
        for days in 0..200_000u64 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            d += 1;
            if d > days_in_month(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn bcd_is_the_default_encoding() {
        let mut cmos = Cmos::new(0);
        assert_eq!(read(&mut cmos, 0x0B, 0), 0x02);
        let t = 1_700_000_000 * S;
        assert_eq!(read(&mut cmos, 0x00, t), 0x20);
        assert_eq!(read(&mut cmos, 0x02, t), 0x13);
        assert_eq!(read(&mut cmos, 0x04, t), 0x22);
        assert_eq!(read(&mut cmos, 0x06, t), 0x03);
        assert_eq!(read(&mut cmos, 0x07, t), 0x14);
        assert_eq!(read(&mut cmos, 0x08, t), 0x11);
        assert_eq!(read(&mut cmos, 0x09, t), 0x23);
        assert_eq!(read(&mut cmos, 0x32, t), 0x20);
        // Switching DM to binary changes the encoding of the same instant.
        cmos.io_write(0x70, 0x0B);
        cmos.io_write(0x71, 0x06);
        assert_eq!(read(&mut cmos, 0x00, t), 20);
        assert_eq!(read(&mut cmos, 0x04, t), 22);
        assert_eq!(read(&mut cmos, 0x09, t), 23);
    }

    #[test]
    fn twelve_hour_mode_sets_pm_bit() {
        let mut cmos = Cmos::new(0);
        cmos.io_write(0x70, 0x0B);
        cmos.io_write(0x71, 0x00); // 12h, BCD
        let day = 1_699_920_000 * S; // 2023-11-14 00:00:00
        let hour = |cmos: &mut Cmos, h: u64| read(cmos, 0x04, day + h * 3_600 * S);
        assert_eq!(hour(&mut cmos, 0), 0x12, "midnight is 12 AM");
        assert_eq!(hour(&mut cmos, 1), 0x01);
        assert_eq!(hour(&mut cmos, 11), 0x11);
        assert_eq!(hour(&mut cmos, 12), 0x92, "noon is 12 PM");
        assert_eq!(hour(&mut cmos, 22), 0x90, "10 PM");
        cmos.io_write(0x70, 0x0B);
        cmos.io_write(0x71, 0x04); // 12h, binary
        assert_eq!(hour(&mut cmos, 22), 0x80 | 10);
        assert_eq!(hour(&mut cmos, 0), 12);
    }

    #[test]
    fn uip_is_set_in_the_last_244us_of_a_second() {
        let mut cmos = Cmos::new(0);
        assert_eq!(read(&mut cmos, 0x0A, 5 * S), 0x26);
        assert_eq!(read(&mut cmos, 0x0A, 6 * S - 244_001), 0x26);
        assert_eq!(read(&mut cmos, 0x0A, 6 * S - 244_000), 0xA6);
        assert_eq!(read(&mut cmos, 0x0A, 6 * S - 1), 0xA6);
        // Divider bits are writable, UIP is not.
        cmos.io_write(0x70, 0x0A);
        cmos.io_write(0x71, 0xA0);
        assert_eq!(read(&mut cmos, 0x0A, 5 * S), 0x20);
    }

    #[test]
    fn memory_size_bytes_for_64_mib() {
        let mut cmos = Cmos::new(64 * MIB);
        let mut byte = |reg: u8| {
            cmos.io_write(0x70, reg);
            cmos.io_read(0x71, no_clock)
        };
        // 640 KiB base.
        assert_eq!((byte(0x15), byte(0x16)), (0x80, 0x02));
        // 63 MiB = 64512 KiB = 0xFC00 extended.
        assert_eq!((byte(0x17), byte(0x18)), (0x00, 0xFC));
        assert_eq!((byte(0x30), byte(0x31)), (0x00, 0xFC));
        // 48 MiB above 16 MiB = 768 x 64 KiB.
        assert_eq!((byte(0x34), byte(0x35)), (0x00, 0x03));
    }

    #[test]
    fn memory_size_bytes_are_capped() {
        let mut cmos = Cmos::new(64 * 1024 * MIB);
        for reg in [0x17, 0x18, 0x30, 0x31, 0x34, 0x35] {
            assert_eq!(read(&mut cmos, reg, 0), 0xFF, "reg {reg:#x}");
        }
        let mut small = Cmos::new(512 * KIB);
        for reg in [0x17, 0x18, 0x30, 0x31, 0x34, 0x35] {
            assert_eq!(read(&mut small, reg, 0), 0, "reg {reg:#x}");
        }
    }

    #[test]
    fn index_stays_selected_and_nmi_bit_is_ignored() {
        let mut cmos = Cmos::new(0);
        cmos.io_write(0x70, 0x80 | 0x40);
        cmos.io_write(0x71, 0x5A);
        assert_eq!(cmos.io_read(0x71, no_clock), 0x5A);
        assert_eq!(cmos.io_read(0x71, no_clock), 0x5A);
        cmos.io_write(0x71, 0xA5);
        assert_eq!(cmos.io_read(0x71, no_clock), 0xA5);
        cmos.io_write(0x70, 0x40);
        assert_eq!(cmos.io_read(0x71, no_clock), 0xA5);
        assert_eq!(cmos.io_read(0x70, no_clock), 0xFF);
    }

    #[test]
    fn clock_is_not_read_for_ram_or_status_b_c_d() {
        let mut cmos = Cmos::new(0);
        for reg in [0x01, 0x03, 0x05, 0x0B, 0x0C, 0x0D, 0x0E, 0x10, 0x31, 0x33, 0x7F] {
            cmos.io_write(0x70, reg);
            cmos.io_read(0x71, no_clock);
        }
        cmos.io_write(0x70, 0x0C);
        assert_eq!(cmos.io_read(0x71, no_clock), 0);
        cmos.io_write(0x70, 0x0D);
        assert_eq!(cmos.io_read(0x71, no_clock), 0x80);
    }

    #[test]
    fn guest_cannot_set_the_clock_but_alarms_are_ram() {
        let mut cmos = binary_24h();
        cmos.io_write(0x70, 0x00);
        cmos.io_write(0x71, 42);
        assert_eq!(read(&mut cmos, 0x00, 7 * S), 7);
        cmos.io_write(0x70, 0x01);
        cmos.io_write(0x71, 42);
        assert_eq!(cmos.io_read(0x71, no_clock), 42);
        // Status C and D ignore writes.
        cmos.io_write(0x70, 0x0C);
        cmos.io_write(0x71, 0xFF);
        assert_eq!(cmos.io_read(0x71, no_clock), 0);
        cmos.io_write(0x70, 0x0D);
        cmos.io_write(0x71, 0x00);
        assert_eq!(cmos.io_read(0x71, no_clock), 0x80);
    }

    #[test]
    fn extreme_times_and_bytes_never_panic() {
        let mut cmos = Cmos::new(u64::MAX);
        for reg in 0..=255u8 {
            for t in [0, u64::MAX, u64::MAX / 2] {
                cmos.io_write(0x70, reg);
                cmos.io_write(0x71, reg);
                cmos.io_read(0x71, || t);
            }
        }
        // Latest representable instant: 2554-07-21 23:34:33 UTC.
        let mut cmos = binary_24h();
        assert_eq!(read_all_binary(&mut cmos, u64::MAX), (2554, 7, 21, 1, 23, 34, 33));
    }
}
