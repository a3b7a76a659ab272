//! The write-ahead log on the disk: every write command becomes a record;
//! at boot the records are replayed into the store.
//!
//! The log is a byte stream from sector 0. Records are appended to an
//! in-memory batch; [`Journal::commit`] pads the batch with zeros to a
//! sector boundary, writes it after the previous batch and flushes (one
//! [`BlockDev::write_and_flush`]: the guest's disk sends both with one
//! notify and waits for them together). So a batch always starts on a fresh sector and a commit never rewrites a
//! sector an earlier commit wrote: a torn write can only lose the batch it
//! belongs to. Many commands (all those of one round of the server's loop)
//! share one commit: group commit.
//!
//! A record, little-endian:
//! ```text
//! magic "RDL1" | seq u64 | len u32 | epoch u32 | check u64 | payload (len bytes)
//! payload: op u8 | argc u16 | argc × (arg_len u16 | arg bytes)
//! ```
//! `seq` counts records from 1; `epoch` counts the boots that appended to
//! the log (each boot appends with the last record's epoch + 1); `check`
//! is FNV-1a 64 over the previous record's `check` (a fixed start value
//! for the first), `seq`, `len`, `epoch` and the payload.
//!
//! Replay accepts a record only if its magic, `seq` and `check` are right,
//! which chains each record to the whole history before it. A record that
//! fails where it starts mid-sector (the zero padding at a batch's end, or
//! a batch torn there) makes replay look again at the next sector, where
//! the next boot's first batch would be; one that fails at a sector start
//! ends the log. The next batch goes at the sector after the last good
//! record. The epoch keeps what a torn batch left on the disk dead: a
//! record of the next boot differs from the torn one of the same `seq` even
//! with the same command, so the torn batch's later records, chained to the
//! torn one, never pass after it.

use crate::store::Store;

pub const SECTOR: usize = 512;
/// Bytes of a record before its payload.
pub const HEADER_LEN: usize = 28;
/// Largest payload.
pub const MAX_PAYLOAD: usize = 32 * 1024;
/// Smallest journal buffer: the largest record, plus a sector of slack for
/// the replay window's alignment.
pub const MIN_BUFFER: usize = HEADER_LEN + MAX_PAYLOAD + SECTOR;

const MAGIC: [u8; 4] = *b"RDL1";
const CHAIN_START: u64 = 0x5244_4c31_6674_766d;

/// Record operations.
pub mod op {
    /// key value
    pub const SET: u8 = 1;
    /// key...
    pub const DEL: u8 = 2;
    /// (key value)...
    pub const MSET: u8 = 3;
    /// (no arguments)
    pub const FLUSHALL: u8 = 4;
}

/// What the journal needs of a disk.
pub trait BlockDev {
    /// Capacity in 512-byte sectors.
    fn sectors(&self) -> u64;
    /// Reads `buf.len()` bytes (a multiple of 512) from `sector`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> bool;
    /// Writes `buf` (a multiple of 512 bytes) at `sector`.
    fn write(&mut self, sector: u64, buf: &[u8]) -> bool;
    /// Makes the completed writes durable.
    fn flush(&mut self) -> bool;
    /// Writes `buf` at `sector` and makes it durable: what a commit does.
    /// A device driver can do both in one round trip (the guest's disk
    /// submits the write and the flush with one notify); by default, a
    /// write, then a flush.
    fn write_and_flush(&mut self, sector: u64, buf: &[u8]) -> bool {
        self.write(sector, buf) && self.flush()
    }
}

/// No disk: for an [`crate::Engine`] that keeps the store in memory only.
pub struct NoDisk;

impl BlockDev for NoDisk {
    fn sectors(&self) -> u64 {
        0
    }
    fn read(&mut self, _: u64, _: &mut [u8]) -> bool {
        false
    }
    fn write(&mut self, _: u64, _: &[u8]) -> bool {
        false
    }
    fn flush(&mut self) -> bool {
        false
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogError {
    /// The disk has no room for the record.
    Full,
    /// The record is larger than [`MAX_PAYLOAD`].
    TooLarge,
    /// The disk failed a read, write or flush (the journal then refuses
    /// every further record).
    Io,
}

/// What replaying the log found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Records replayed.
    pub records: u64,
    /// Sectors the log occupies.
    pub sectors: u64,
    /// Records the store could not apply (it is smaller than the one that
    /// wrote the log, or a record is malformed).
    pub failed: u64,
}

/// The log: its position on the disk and the batch not yet committed.
pub struct Journal<'a, D: BlockDev> {
    dev: D,
    buf: &'a mut [u8],
    pending: usize,
    next_sector: u64,
    seq: u64,
    chain: u64,
    epoch: u32,
    broken: bool,
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, data: &[u8]) -> &mut Fnv {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }
}

fn check(prev: u64, seq: u64, epoch: u32, payload: &[u8]) -> u64 {
    Fnv::new()
        .bytes(&prev.to_le_bytes())
        .bytes(&seq.to_le_bytes())
        .bytes(&(payload.len() as u32).to_le_bytes())
        .bytes(&epoch.to_le_bytes())
        .bytes(payload)
        .0
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// The arguments of a record's payload, or None if it is malformed.
pub struct Args<'p> {
    rest: &'p [u8],
    left: u16,
}

impl<'p> Iterator for Args<'p> {
    type Item = &'p [u8];
    fn next(&mut self) -> Option<&'p [u8]> {
        if self.left == 0 || self.rest.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([self.rest[0], self.rest[1]]));
        let arg = self.rest.get(2..2 + len)?;
        self.rest = &self.rest[2 + len..];
        self.left -= 1;
        Some(arg)
    }
}

/// (op, argc, arguments) of a payload.
fn decode(payload: &[u8]) -> Option<(u8, u16, Args<'_>)> {
    if payload.len() < 3 {
        return None;
    }
    let argc = u16::from_le_bytes([payload[1], payload[2]]);
    Some((payload[0], argc, Args { rest: &payload[3..], left: argc }))
}

/// Applies one record's payload to the store.
fn apply(store: &mut Store, payload: &[u8]) -> bool {
    let Some((op, argc, mut args)) = decode(payload) else {
        return false;
    };
    let mut ok = true;
    let mut seen = 0u16;
    match op {
        op::SET | op::MSET => {
            while let Some(key) = args.next() {
                let Some(value) = args.next() else {
                    return false;
                };
                ok &= store.set(key, value).is_ok();
                seen += 2;
            }
        }
        op::DEL => {
            for key in args.by_ref() {
                store.del(key);
                seen += 1;
            }
        }
        op::FLUSHALL => store.clear(),
        _ => return false,
    }
    ok && seen == argc
}

impl<'a, D: BlockDev> Journal<'a, D> {
    /// Replays the log on `dev` into `store` (which should be empty) and
    /// returns the journal, ready to append after it. `buf` (a multiple of
    /// [`SECTOR`], at least [`MIN_BUFFER`]) is the replay's read window, then
    /// the batch buffer. Fails only if the disk cannot be read.
    pub fn open(mut dev: D, buf: &'a mut [u8], store: &mut Store) -> Result<(Journal<'a, D>, Loaded), LogError> {
        assert!(buf.len() >= MIN_BUFFER && buf.len().is_multiple_of(SECTOR), "journal buffer too small");
        let disk_bytes = dev.sectors() * SECTOR as u64;
        let window_sectors = (buf.len() / SECTOR) as u64;
        let (mut win_start, mut win_len) = (0u64, 0usize);
        let mut loaded = Loaded::default();
        let (mut pos, mut seq, mut chain) = (0u64, 1u64, CHAIN_START);
        // Makes disk bytes pos..pos+n (n <= MIN_BUFFER - SECTOR, within the
        // disk) readable in the window; returns their offset in it.
        let mut ensure = |dev: &mut D, buf: &mut [u8], pos: u64, n: usize| -> Result<usize, LogError> {
            if pos < win_start || pos + n as u64 > win_start + win_len as u64 {
                let first = pos / SECTOR as u64;
                let count = window_sectors.min(dev.sectors() - first);
                let bytes = count as usize * SECTOR;
                if !dev.read(first, &mut buf[..bytes]) {
                    return Err(LogError::Io);
                }
                (win_start, win_len) = (first * SECTOR as u64, bytes);
            }
            Ok((pos - win_start) as usize)
        };
        // Just past the last good record, and its epoch.
        let (mut end, mut epoch) = (0u64, 0u32);
        while pos + HEADER_LEN as u64 <= disk_bytes {
            let at = ensure(&mut dev, buf, pos, HEADER_LEN)?;
            let header = &buf[at..at + HEADER_LEN];
            let len = le_u32(&header[12..]) as usize;
            let good = header[..4] == MAGIC
                && le_u64(&header[4..]) == seq
                && len <= MAX_PAYLOAD
                && pos + (HEADER_LEN + len) as u64 <= disk_bytes;
            let record = if good {
                let (record_epoch, record_check) = (le_u32(&header[16..]), le_u64(&header[20..]));
                let at = ensure(&mut dev, buf, pos, HEADER_LEN + len)?;
                let payload = &buf[at + HEADER_LEN..at + HEADER_LEN + len];
                (check(chain, seq, record_epoch, payload) == record_check).then_some((record_epoch, record_check, at))
            } else {
                None
            };
            let Some((record_epoch, record_check, at)) = record else {
                if pos % SECTOR as u64 == 0 {
                    break;
                }
                // Padding, or a batch torn here: a later boot's batch starts
                // at the next sector.
                pos = pos.next_multiple_of(SECTOR as u64);
                continue;
            };
            if !apply(store, &buf[at + HEADER_LEN..at + HEADER_LEN + len]) {
                loaded.failed += 1;
            }
            chain = record_check;
            epoch = record_epoch;
            seq += 1;
            loaded.records += 1;
            pos += (HEADER_LEN + len) as u64;
            end = pos;
        }
        let next_sector = end.div_ceil(SECTOR as u64);
        loaded.sectors = next_sector;
        let journal =
            Journal { dev, buf, pending: 0, next_sector, seq, chain, epoch: epoch.wrapping_add(1), broken: false };
        Ok((journal, loaded))
    }

    /// Adds a record of `op` with `args` to the batch (committing the batch
    /// first if the record does not fit in it). It is durable once
    /// [`Self::commit`] succeeds.
    pub fn append<'x, I>(&mut self, op: u8, args: I) -> Result<(), LogError>
    where
        I: Iterator<Item = &'x [u8]> + Clone,
    {
        if self.broken {
            return Err(LogError::Io);
        }
        let mut payload_len = 3usize;
        let mut argc = 0usize;
        for arg in args.clone() {
            if arg.len() > usize::from(u16::MAX) {
                return Err(LogError::TooLarge);
            }
            payload_len += 2 + arg.len();
            argc += 1;
        }
        if payload_len > MAX_PAYLOAD || argc > usize::from(u16::MAX) {
            return Err(LogError::TooLarge);
        }
        let record_len = HEADER_LEN + payload_len;
        if self.pending + record_len > self.buf.len() {
            self.commit()?;
        }
        let sectors_after = self.next_sector + (self.pending + record_len).div_ceil(SECTOR) as u64;
        if sectors_after > self.dev.sectors() {
            return Err(LogError::Full);
        }
        let record = &mut self.buf[self.pending..self.pending + record_len];
        let (header, payload) = record.split_at_mut(HEADER_LEN);
        payload[0] = op;
        payload[1..3].copy_from_slice(&(argc as u16).to_le_bytes());
        let mut at = 3;
        for arg in args {
            payload[at..at + 2].copy_from_slice(&(arg.len() as u16).to_le_bytes());
            payload[at + 2..at + 2 + arg.len()].copy_from_slice(arg);
            at += 2 + arg.len();
        }
        let record_check = check(self.chain, self.seq, self.epoch, payload);
        header[..4].copy_from_slice(&MAGIC);
        header[4..12].copy_from_slice(&self.seq.to_le_bytes());
        header[12..16].copy_from_slice(&(payload_len as u32).to_le_bytes());
        header[16..20].copy_from_slice(&self.epoch.to_le_bytes());
        header[20..28].copy_from_slice(&record_check.to_le_bytes());
        self.chain = record_check;
        self.seq += 1;
        self.pending += record_len;
        Ok(())
    }

    /// Whether records await a commit.
    pub fn has_pending(&self) -> bool {
        self.pending > 0
    }

    /// Writes and flushes the batch: one [`BlockDev::write_and_flush`].
    pub fn commit(&mut self) -> Result<(), LogError> {
        if self.broken {
            return Err(LogError::Io);
        }
        if self.pending == 0 {
            return Ok(());
        }
        let bytes = self.pending.next_multiple_of(SECTOR);
        self.buf[self.pending..bytes].fill(0);
        if !self.dev.write_and_flush(self.next_sector, &self.buf[..bytes]) {
            self.broken = true;
            return Err(LogError::Io);
        }
        self.next_sector += (bytes / SECTOR) as u64;
        self.pending = 0;
        Ok(())
    }

    /// Sectors the log occupies on the disk (committed batches).
    pub fn sectors_used(&self) -> u64 {
        self.next_sector
    }

    /// Capacity of the disk in sectors.
    pub fn sectors_total(&self) -> u64 {
        self.dev.sectors()
    }

    /// Records written so far (replayed and appended).
    pub fn records(&self) -> u64 {
        self.seq - 1
    }

    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{Entry, Store};

    /// A disk in memory that can fail and tear writes.
    pub struct MemDisk {
        pub data: Vec<u8>,
        /// Sectors of the next write that reach the disk (the rest is lost).
        pub tear_after: Option<usize>,
        pub fail_writes: bool,
        pub writes: usize,
        pub flushes: usize,
    }

    impl MemDisk {
        pub fn new(sectors: usize) -> MemDisk {
            MemDisk { data: vec![0; sectors * SECTOR], tear_after: None, fail_writes: false, writes: 0, flushes: 0 }
        }
    }

    impl BlockDev for &mut MemDisk {
        fn sectors(&self) -> u64 {
            (self.data.len() / SECTOR) as u64
        }
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> bool {
            let at = sector as usize * SECTOR;
            buf.copy_from_slice(&self.data[at..at + buf.len()]);
            true
        }
        fn write(&mut self, sector: u64, buf: &[u8]) -> bool {
            if self.fail_writes {
                return false;
            }
            self.writes += 1;
            let at = sector as usize * SECTOR;
            let keep = self.tear_after.take().map_or(buf.len(), |s| (s * SECTOR).min(buf.len()));
            self.data[at..at + keep].copy_from_slice(&buf[..keep]);
            true
        }
        fn flush(&mut self) -> bool {
            self.flushes += 1;
            true
        }
    }

    pub fn store(n: usize) -> Store<'static> {
        let entries = Box::leak(vec![Entry::ZERO; n].into_boxed_slice());
        let index = Box::leak(vec![0u32; (2 * n).next_power_of_two()].into_boxed_slice());
        Store::new(entries, index)
    }

    fn buffer() -> &'static mut [u8] {
        Box::leak(vec![0u8; 2 * MIN_BUFFER.next_multiple_of(SECTOR)].into_boxed_slice())
    }

    fn open<'d>(disk: &'d mut MemDisk, store: &mut Store) -> (Journal<'static, &'d mut MemDisk>, Loaded) {
        Journal::open(disk, buffer(), store).unwrap()
    }

    fn set<D: BlockDev>(j: &mut Journal<D>, k: &[u8], v: &[u8]) {
        j.append(op::SET, [k, v].into_iter()).unwrap();
    }

    #[test]
    fn empty_disk_and_round_trip() {
        let mut disk = MemDisk::new(64);
        let mut s = store(16);
        let (mut j, loaded) = open(&mut disk, &mut s);
        assert_eq!(loaded, Loaded::default());
        set(&mut j, b"a", b"1");
        set(&mut j, b"b", b"2");
        j.append(op::DEL, [&b"a"[..]].into_iter()).unwrap();
        j.commit().unwrap();
        j.append(op::MSET, [&b"c"[..], b"3", b"d", b"4"].into_iter()).unwrap();
        j.commit().unwrap();
        assert_eq!(j.sectors_used(), 2, "one sector per batch");
        drop(j);
        assert_eq!((disk.writes, disk.flushes), (2, 2));

        let mut s = store(16);
        let (mut j, loaded) = open(&mut disk, &mut s);
        assert_eq!(loaded, Loaded { records: 4, sectors: 2, failed: 0 });
        assert_eq!(
            (s.get(b"a"), s.get(b"b"), s.get(b"c"), s.get(b"d")),
            (None, Some(&b"2"[..]), Some(&b"3"[..]), Some(&b"4"[..]))
        );
        // Appending continues the chain.
        j.append(op::FLUSHALL, core::iter::empty()).unwrap();
        set(&mut j, b"e", b"5");
        j.commit().unwrap();
        drop(j);
        let mut s = store(16);
        let (_, loaded) = open(&mut disk, &mut s);
        assert_eq!(loaded.records, 6);
        assert_eq!(s.len(), 1);
        assert_eq!(s.get(b"e"), Some(&b"5"[..]));
    }

    #[test]
    fn records_spanning_sectors_and_windows() {
        // Enough big records to cross sector and replay-window boundaries.
        let mut disk = MemDisk::new(4096);
        let mut s = store(512);
        let (mut j, _) = open(&mut disk, &mut s);
        let value = [b'v'; 512];
        for i in 0..400u32 {
            let key = format!("key-{i:04}-{}", "k".repeat(i as usize % 500));
            set(&mut j, key.as_bytes(), &value[..(i as usize * 7) % 513]);
            if i % 37 == 0 {
                j.commit().unwrap();
            }
        }
        j.commit().unwrap();
        let used = j.sectors_used();
        drop(j);
        let mut s = store(512);
        let (_, loaded) = open(&mut disk, &mut s);
        assert_eq!((loaded.records, loaded.sectors, loaded.failed), (400, used, 0));
        assert_eq!(s.len(), 400);
        let key = format!("key-{:04}-{}", 399, "k".repeat(399 % 500));
        assert_eq!(s.get(key.as_bytes()).map(<[u8]>::len), Some((399 * 7) % 513));
    }

    #[test]
    fn torn_batch_is_ignored_and_overwritten() {
        let mut disk = MemDisk::new(64);
        let mut s = store(64);
        let (mut j, _) = open(&mut disk, &mut s);
        set(&mut j, b"first", b"1");
        j.commit().unwrap();
        // A batch of four sectors of which only the first two reach the disk.
        for i in 0..20u8 {
            set(&mut j, &[b'x', i], &[i; 80]);
        }
        j.device().tear_after = Some(2);
        j.commit().unwrap();
        drop(j);

        let mut s = store(64);
        let (mut j, loaded) = open(&mut disk, &mut s);
        assert!(loaded.records >= 2 && loaded.records < 21, "{loaded:?}");
        let survivors = loaded.records - 1;
        for i in 0..20u8 {
            assert_eq!(s.contains(&[b'x', i]), u64::from(i) < survivors, "x{i}");
        }
        // New records go after the last good one; the stale tail of the torn
        // batch past them never comes back.
        set(&mut j, b"after", b"2");
        j.commit().unwrap();
        drop(j);
        let mut s = store(64);
        let (_, reloaded) = open(&mut disk, &mut s);
        assert_eq!(reloaded.records, loaded.records + 1);
        assert_eq!(s.get(b"after"), Some(&b"2"[..]));
        assert_eq!(s.len() as u64, reloaded.records);
    }

    #[test]
    fn corruption_ends_the_log() {
        let mut disk = MemDisk::new(64);
        let mut s = store(16);
        let (mut j, _) = open(&mut disk, &mut s);
        for i in 0..3u8 {
            set(&mut j, &[b'k', i], b"v");
            j.commit().unwrap();
        }
        drop(j);
        // Flip a payload byte of the second record (sector 1).
        disk.data[SECTOR + HEADER_LEN + 4] ^= 1;
        let mut s = store(16);
        let (_, loaded) = open(&mut disk, &mut s);
        assert_eq!(loaded.records, 1);
        assert_eq!(loaded.sectors, 1);
    }

    #[test]
    fn stale_records_past_a_hole_never_come_back() {
        // A batch whose middle sector did not reach the disk: the records in
        // the sectors after the hole are intact and correctly chained, but
        // the log ends at the hole, and after new appends they stay dead.
        let mut disk = MemDisk::new(64);
        let mut s = store(64);
        let (mut j, _) = open(&mut disk, &mut s);
        for i in 0..30u8 {
            set(&mut j, &[b'x', i], &[i; 60]);
        }
        j.commit().unwrap();
        assert!(j.sectors_used() >= 5);
        j.device().data[SECTOR..2 * SECTOR].fill(0);
        drop(j);
        let mut s = store(64);
        let (mut j, loaded) = open(&mut disk, &mut s);
        assert!(loaded.records < 10, "{loaded:?}");
        for round in 0..3u8 {
            set(&mut j, &[b'n', round], b"new");
            j.commit().unwrap();
        }
        drop(j);
        let mut s = store(64);
        let (_, reloaded) = open(&mut disk, &mut s);
        assert_eq!(reloaded.records, loaded.records + 3);
        for i in loaded.records as u8..30 {
            assert!(!s.contains(&[b'x', i]), "stale x{i} came back");
        }
    }

    #[test]
    fn foreign_data_is_no_log() {
        let mut disk = MemDisk::new(8);
        disk.data[..4].copy_from_slice(b"KVS1");
        disk.data[512..1024].fill(0xab);
        let mut s = store(4);
        let (_, loaded) = open(&mut disk, &mut s);
        assert_eq!(loaded, Loaded::default());
    }

    /// A disk whose write-and-flush is one operation of its own, as the
    /// guest's virtio disk is (one notify for both).
    struct OneTrip {
        disk: MemDisk,
        trips: usize,
        fail: bool,
    }

    impl BlockDev for &mut OneTrip {
        fn sectors(&self) -> u64 {
            (self.disk.data.len() / SECTOR) as u64
        }
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> bool {
            (&mut self.disk).read(sector, buf)
        }
        fn write(&mut self, _: u64, _: &[u8]) -> bool {
            panic!("a commit writes with write_and_flush")
        }
        fn flush(&mut self) -> bool {
            panic!("a commit flushes with write_and_flush")
        }
        fn write_and_flush(&mut self, sector: u64, buf: &[u8]) -> bool {
            self.trips += 1;
            !self.fail && (&mut self.disk).write(sector, buf) && (&mut self.disk).flush()
        }
    }

    #[test]
    fn a_commit_is_one_write_and_flush() {
        let mut dev = OneTrip { disk: MemDisk::new(64), trips: 0, fail: false };
        let mut s = store(16);
        let (mut j, _) = Journal::open(&mut dev, buffer(), &mut s).unwrap();
        set(&mut j, b"a", b"1");
        set(&mut j, b"b", b"2");
        j.commit().unwrap();
        j.commit().unwrap();
        set(&mut j, b"c", b"3");
        j.commit().unwrap();
        assert_eq!(j.device().trips, 2, "one round trip per non-empty batch");
        j.device().fail = true;
        set(&mut j, b"d", b"4");
        assert_eq!(j.commit(), Err(LogError::Io));
        assert_eq!(j.append(op::SET, [&b"e"[..], b"5"].into_iter()), Err(LogError::Io));
        drop(j);
        let mut s = store(16);
        let (_, loaded) = open(&mut dev.disk, &mut s);
        assert_eq!(loaded.records, 3);
        assert_eq!(s.get(b"c"), Some(&b"3"[..]));
    }

    #[test]
    fn full_disk_and_io_errors() {
        let mut disk = MemDisk::new(2);
        let mut s = store(16);
        let (mut j, _) = open(&mut disk, &mut s);
        let value = [b'v'; 400];
        set(&mut j, b"a", &value);
        set(&mut j, b"b", &value);
        assert_eq!(j.append(op::SET, [&b"c"[..], &value].into_iter()), Err(LogError::Full));
        j.commit().unwrap();
        assert_eq!(j.append(op::SET, [&b"c"[..], &value].into_iter()), Err(LogError::Full));
        let big = vec![0u8; MAX_PAYLOAD];
        assert_eq!(j.append(op::SET, [&b"k"[..], &big].into_iter()), Err(LogError::TooLarge));
        drop(j);

        let mut disk = MemDisk::new(8);
        let (mut j, _) = open(&mut disk, &mut s);
        set(&mut j, b"a", b"1");
        j.device().fail_writes = true;
        assert_eq!(j.commit(), Err(LogError::Io));
        j.device().fail_writes = false;
        assert_eq!(j.commit(), Err(LogError::Io), "a broken journal stays broken");
        assert_eq!(j.append(op::SET, [&b"a"[..], b"1"].into_iter()), Err(LogError::Io));
    }
}
