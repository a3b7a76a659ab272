//! The pure parts of the `blkstress` guest (see its binary for the whole
//! story): the command line, the op generator, the block format and the
//! check of a disk image against a durable write count. No I/O, no
//! `guest-rt`, so its unit tests run on the host. From `guest-images/guests`:
//!
//! ```text
//! cargo test -p blkstress --lib --target-dir target/host
//! ```
#![cfg_attr(not(test), no_std)]

use core::fmt;

/// Bytes of a block: every op moves one.
pub const BLOCK: usize = 4096;
/// 512-byte sectors per block.
pub const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;
/// Most requests in flight (the driver's slots).
pub const MAX_QD: u64 = 32;
/// The largest region (1 GiB): the guest keeps a u64 per block, twice.
pub const MAX_BLOCKS: u64 = 1 << 18;
/// The default region, if the disk is that large.
pub const DEFAULT_BLOCKS: u64 = 4096;
/// Bytes of a burst request, and the alignment of its regions.
pub const BURST_BYTES: usize = 4 << 20;
/// Sectors of a burst request.
pub const BURST_SECTORS: u64 = (BURST_BYTES / 512) as u64;
/// Longest pause between batches: a minute.
pub const MAX_PACE_US: u64 = 60_000_000;

/// The first bytes of every block blkstress writes.
pub const MAGIC: [u8; 4] = *b"BLKS";
/// Bytes of a block's header; the payload follows.
pub const HEADER_LEN: usize = 32;
/// Header layout, little-endian: magic, block index u32, write seq u64,
/// seed u64, checksum u64.
const OFF_BLOCK: usize = 4;
const OFF_SEQ: usize = 8;
const OFF_SEED: usize = 16;
const OFF_CHECK: usize = 24;

/// The op mix, in percent (they add up to 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    pub write: u64,
    pub read: u64,
    pub flush: u64,
}

/// What every mode shares: the parameters the op sequence depends on, and
/// how to issue it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub seed: u64,
    /// Requests in flight at most, 1..=32 (the op sequence does not
    /// depend on it).
    pub qd: u64,
    /// Ops to issue; 0 = until the VM is stopped.
    pub ops: u64,
    /// Size of the region, in blocks from sector 0.
    pub blocks: u64,
    pub mix: Mix,
    /// Percent of reads and writes at a random block (else the block after
    /// the previous read or write).
    pub random: u64,
    /// Virtual microseconds to idle between batches.
    pub pace_us: u64,
}

/// What the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Issue the op sequence, checking reads and reporting durability.
    Run,
    /// Check that every write up to this one is on the disk.
    Verify(u64),
    /// That many 4 MiB writes with one notify.
    Burst(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub params: Params,
    pub mode: Mode,
}

/// A command line blkstress does not accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamError {
    /// `key=` is not a decimal number.
    NotANumber(&'static str),
    OutOfRange {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    /// write + read + flush is not 100.
    MixNot100(u64),
    /// The disk is smaller than one block.
    DiskTooSmall,
    /// `blocks=` is larger than the disk.
    RegionPastDisk {
        blocks: u64,
        disk_blocks: u64,
    },
    /// `burst=N` needs N × 4 MiB of disk.
    BurstPastDisk {
        burst: u64,
        disk_bytes: u64,
    },
    /// Both `verify=` and `burst=`.
    TwoModes,
    /// `verify=K` with K > 0 but `write=0`: there is no write K.
    NoWrites,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ParamError::NotANumber(key) => write!(f, "{key}= is not a decimal number"),
            ParamError::OutOfRange { key, value, min, max } => {
                write!(f, "{key}={value} is out of range ({min}..={max})")
            }
            ParamError::MixNot100(sum) => write!(f, "write= + read= + flush= must be 100, not {sum}"),
            ParamError::DiskTooSmall => write!(f, "the disk is smaller than one 4 KiB block"),
            ParamError::RegionPastDisk { blocks, disk_blocks } => {
                write!(f, "blocks={blocks} is past the end of the disk ({disk_blocks} blocks)")
            }
            ParamError::BurstPastDisk { burst, disk_bytes } => {
                write!(f, "burst={burst} needs a disk of at least {burst} x 4 MiB (it has {disk_bytes} bytes)")
            }
            ParamError::TwoModes => write!(f, "verify= and burst= are different modes: give one"),
            ParamError::NoWrites => write!(f, "verify=K with K > 0 needs write= > 0"),
        }
    }
}

/// A strict decimal u64 (digits only, no overflow).
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

impl Config {
    /// The configuration from the command line, whose `key=value` words
    /// `lookup` finds, for a disk of `disk_sectors` 512-byte sectors.
    pub fn parse<'c>(lookup: impl Fn(&str) -> Option<&'c [u8]>, disk_sectors: u64) -> Result<Config, ParamError> {
        let number = |key: &'static str, default: u64, min: u64, max: u64| -> Result<u64, ParamError> {
            let Some(text) = lookup(key) else {
                return Ok(default);
            };
            let value = parse_u64(text).ok_or(ParamError::NotANumber(key))?;
            if !(min..=max).contains(&value) {
                return Err(ParamError::OutOfRange { key, value, min, max });
            }
            Ok(value)
        };
        let disk_blocks = disk_sectors / SECTORS_PER_BLOCK;
        if disk_blocks == 0 {
            return Err(ParamError::DiskTooSmall);
        }
        let blocks = number("blocks", disk_blocks.min(DEFAULT_BLOCKS), 1, MAX_BLOCKS)?;
        if blocks > disk_blocks {
            return Err(ParamError::RegionPastDisk { blocks, disk_blocks });
        }
        let mix = Mix {
            write: number("write", 70, 0, 100)?,
            read: number("read", 20, 0, 100)?,
            flush: number("flush", 10, 0, 100)?,
        };
        let sum = mix.write + mix.read + mix.flush;
        if sum != 100 {
            return Err(ParamError::MixNot100(sum));
        }
        let params = Params {
            seed: number("seed", 1, 0, u64::MAX)?,
            qd: number("qd", 8, 1, MAX_QD)?,
            ops: number("ops", 0, 0, u64::MAX)?,
            blocks,
            mix,
            random: number("random", 50, 0, 100)?,
            pace_us: number("pace", 0, 0, MAX_PACE_US)?,
        };
        let mode = match (lookup("verify").is_some(), lookup("burst").is_some()) {
            (true, true) => return Err(ParamError::TwoModes),
            (true, false) => {
                let k = number("verify", 0, 0, u64::MAX)?;
                if k > 0 && mix.write == 0 {
                    return Err(ParamError::NoWrites);
                }
                Mode::Verify(k)
            }
            (false, true) => {
                let burst = number("burst", 1, 1, MAX_QD)?;
                let disk_bytes = disk_sectors * 512;
                if burst * BURST_BYTES as u64 > disk_bytes {
                    return Err(ParamError::BurstPastDisk { burst, disk_bytes });
                }
                Mode::Burst(burst)
            }
            (false, false) => Mode::Run,
        };
        Ok(Config { params, mode })
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={} qd={} ops={} blocks={} write={} read={} flush={} random={} pace={}",
            self.seed,
            self.qd,
            self.ops,
            self.blocks,
            self.mix.write,
            self.mix.read,
            self.mix.flush,
            self.random,
            self.pace_us
        )
    }
}

/// splitmix64's finaliser: a good 64-bit mixing function.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A hash of three words, each mixed in with its own step.
fn hash3(a: u64, b: u64, c: u64) -> u64 {
    const STEP: u64 = 0x9e37_79b9_7f4a_7c15;
    mix64(mix64(mix64(a.wrapping_add(STEP)).wrapping_add(b).wrapping_add(STEP)).wrapping_add(c))
}

/// Domain tags: each random choice of an op draws from its own stream.
const DRAW_KIND: u64 = 1;
const DRAW_RANDOM: u64 = 2;
const DRAW_BLOCK: u64 = 3;
const DRAW_PAYLOAD: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Write,
    Read,
    Flush,
}

/// One op of the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// Its index, from 0.
    pub index: u64,
    pub kind: Kind,
    /// The block it moves (0 for a flush).
    pub block: u64,
    /// A write's number, counting writes from 1 (0 for reads and flushes).
    pub write_seq: u64,
}

/// The op sequence: op i's kind, and whether it goes to a random block and
/// which, are hashes of (seed, i); a read or write that does not go to a
/// random block goes to the block after the previous read or write's
/// (from block 0, wrapping at the region's end). So the sequence is a
/// function of (seed, blocks, mix, random) alone, never of timing.
#[derive(Clone, Debug)]
pub struct Generator {
    seed: u64,
    blocks: u64,
    mix: Mix,
    random: u64,
    index: u64,
    next_block: u64,
    writes: u64,
}

impl Generator {
    pub fn new(params: &Params) -> Generator {
        Generator {
            seed: params.seed,
            blocks: params.blocks.max(1),
            mix: params.mix,
            random: params.random,
            index: 0,
            next_block: 0,
            writes: 0,
        }
    }

    /// Writes generated so far: the last one's `write_seq`.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Ops generated so far: the next one's index.
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn next_op(&mut self) -> Op {
        let i = self.index;
        self.index += 1;
        let draw = |stream: u64| hash3(self.seed, stream, i);
        let pick = draw(DRAW_KIND) % 100;
        let kind = if pick < self.mix.write {
            Kind::Write
        } else if pick < self.mix.write + self.mix.read {
            Kind::Read
        } else {
            Kind::Flush
        };
        if kind == Kind::Flush {
            return Op { index: i, kind, block: 0, write_seq: 0 };
        }
        let block =
            if draw(DRAW_RANDOM) % 100 < self.random { draw(DRAW_BLOCK) % self.blocks } else { self.next_block };
        self.next_block = (block + 1) % self.blocks;
        let write_seq = if kind == Kind::Write {
            self.writes += 1;
            self.writes
        } else {
            0
        };
        Op { index: i, kind, block, write_seq }
    }

    /// Generates ops up to and including write `seq`, calling `each` with
    /// every write on the way (none if `seq` is not past the writes
    /// generated so far, or the mix has no writes).
    pub fn run_to_write(&mut self, seq: u64, mut each: impl FnMut(&Op)) {
        // Without writes in the mix there is no write `seq` to stop at.
        while self.writes < seq && self.mix.write > 0 {
            let op = self.next_op();
            if op.kind == Kind::Write {
                each(&op);
            }
        }
    }
}

impl Iterator for Generator {
    type Item = Op;

    fn next(&mut self) -> Option<Op> {
        Some(self.next_op())
    }
}

/// A block's checksum: FNV-1a 64 taken a little-endian 8-byte word at a
/// time (not a byte: eight times fewer multiplications, a few hundred
/// nanoseconds a block), over every word but the checksum's own (the
/// header before it, then the payload). Each step is a bijection of the
/// hash state, so a change confined to one word always changes the result.
pub fn checksum(block: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for (i, word) in block.chunks_exact(8).enumerate() {
        if i != OFF_CHECK / 8 {
            hash = (hash ^ le_u64(word)).wrapping_mul(PRIME);
        }
    }
    hash
}

/// The payload's 8-byte words: a wyrand stream (one 64×64→128-bit
/// multiplication a word, cheap next to an exit) seeded by a hash of
/// (seed, seq, block). The payload is a whole number of words.
struct Payload(u64);

const _: () = assert!((BLOCK - HEADER_LEN).is_multiple_of(8));

impl Payload {
    fn new(seed: u64, seq: u64, block: u64) -> Payload {
        Payload(hash3(seed ^ DRAW_PAYLOAD, seq, block))
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64 ^ t as u64).to_le_bytes()
    }
}

/// Writes into `buf` ([`BLOCK`] bytes) what write `seq` puts in `block`:
/// header (magic, block index, seq, seed, checksum), then the payload.
pub fn fill_block(buf: &mut [u8], seed: u64, seq: u64, block: u64) {
    buf[..4].copy_from_slice(&MAGIC);
    buf[OFF_BLOCK..OFF_SEQ].copy_from_slice(&(block as u32).to_le_bytes());
    buf[OFF_SEQ..OFF_SEED].copy_from_slice(&seq.to_le_bytes());
    buf[OFF_SEED..OFF_CHECK].copy_from_slice(&seed.to_le_bytes());
    let mut payload = Payload::new(seed, seq, block);
    for word in buf[HEADER_LEN..].chunks_exact_mut(8) {
        word.copy_from_slice(&payload.next_word());
    }
    let check = checksum(buf);
    buf[OFF_CHECK..HEADER_LEN].copy_from_slice(&check.to_le_bytes());
}

/// What a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// All zeros: never written.
    Zeros,
    /// Exactly what write `seq` of blkstress with `seed` puts in `block`
    /// (magic, checksum and payload all right).
    Write { seq: u64, block: u64, seed: u64 },
    /// Anything else.
    Garbage,
}

fn le_u64(b: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&b[..8]);
    u64::from_le_bytes(word)
}

/// Identifies the contents of a block ([`BLOCK`] bytes).
pub fn inspect(buf: &[u8]) -> Found {
    if buf.len() != BLOCK {
        return Found::Garbage;
    }
    if buf.iter().all(|&b| b == 0) {
        return Found::Zeros;
    }
    if buf[..4] != MAGIC || le_u64(&buf[OFF_CHECK..]) != checksum(buf) {
        return Found::Garbage;
    }
    let block = u64::from(u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]));
    let (seq, seed) = (le_u64(&buf[OFF_SEQ..]), le_u64(&buf[OFF_SEED..]));
    // The checksum only says the block is intact; this says it is one
    // blkstress writes.
    let mut payload = Payload::new(seed, seq, block);
    let payload_right = buf[HEADER_LEN..].chunks_exact(8).all(|word| *word == payload.next_word());
    if !payload_right {
        return Found::Garbage;
    }
    Found::Write { seq, block, seed }
}

impl Found {
    /// Whether this is write `seq` (0: zeros) of `block` with `seed`.
    pub fn is(&self, seq: u64, block: u64, seed: u64) -> bool {
        match *self {
            Found::Zeros => seq == 0,
            Found::Write { seq: s, block: b, seed: x } => (s, b, x) == (seq, block, seed),
            Found::Garbage => false,
        }
    }

    /// Says what this is, for a message about `block` with `seed`.
    pub fn describe(self, block: u64, seed: u64) -> Describe {
        Describe { found: self, block, seed }
    }
}

/// [`Found`] in words: `zeros`, `write 12`, `write 12 of block 7`,
/// `write 12 of seed 3`, or `data blkstress never writes`.
pub struct Describe {
    found: Found,
    block: u64,
    seed: u64,
}

impl fmt::Display for Describe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.found {
            Found::Zeros => write!(f, "zeros"),
            Found::Garbage => write!(f, "data blkstress never writes"),
            Found::Write { seq, block, seed } => {
                write!(f, "write {seq}")?;
                if block != self.block {
                    write!(f, " of block {block}")?;
                }
                if seed != self.seed {
                    write!(f, " of seed {seed}")?;
                }
                Ok(())
            }
        }
    }
}

/// A block that does not hold what `verify=K` requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lost {
    pub block: u64,
    /// The last write up to K that targets it (0: none).
    pub expected: u64,
    pub found: Found,
    /// The seed verified.
    pub seed: u64,
    /// Found a valid later write, but the generator aims it at another block.
    pub misplaced: bool,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LOST block {}: expected write >= {}, found ", self.block, self.expected)?;
        match self.found {
            Found::Write { seq, .. } if self.misplaced => write!(f, "write {seq}, which is not aimed at this block"),
            found => write!(f, "{}", found.describe(self.block, self.seed)),
        }
    }
}

/// The check of `verify=K`: every block of the region must hold the last
/// write up to K that targets it, or a later write that targets it (later
/// writes may have reached the disk too); a block no write up to K targets
/// must hold zeros or such a later write.
///
/// [`Self::new`] replays the generator to write K (no I/O); [`Self::check`]
/// takes each block as read; [`Self::finish`] checks that the later writes
/// found are aimed at the blocks they were found in, replaying the
/// generator further, as far as the latest of them.
pub struct Verifier<'m> {
    params: Params,
    k: u64,
    /// Per block: the last write up to K that targets it (0: none).
    expected: &'m mut [u64],
    /// Per block: the write past K found there, to check in `finish` (0: none).
    later: &'m mut [u64],
    latest: u64,
    generator: Generator,
}

impl<'m> Verifier<'m> {
    /// `expected` and `later` hold at least `params.blocks` entries. With K
    /// > 0 the mix must have writes.
    pub fn new(params: &Params, k: u64, expected: &'m mut [u64], later: &'m mut [u64]) -> Verifier<'m> {
        let blocks = params.blocks as usize;
        let (expected, later) = (&mut expected[..blocks], &mut later[..blocks]);
        expected.fill(0);
        later.fill(0);
        let mut generator = Generator::new(params);
        generator.run_to_write(k, |op| expected[op.block as usize] = op.write_seq);
        Verifier { params: *params, k, expected, later, latest: 0, generator }
    }

    /// Checks what was read from `block`.
    pub fn check(&mut self, block: u64, buf: &[u8]) -> Result<(), Lost> {
        let expected = self.expected[block as usize];
        let found = inspect(buf);
        let lost = Lost { block, expected, found, seed: self.params.seed, misplaced: false };
        match found {
            Found::Zeros if expected == 0 => Ok(()),
            Found::Write { seq, block: b, seed } if b == block && seed == self.params.seed => {
                if seq > self.k {
                    self.later[block as usize] = seq;
                    self.latest = self.latest.max(seq);
                    Ok(())
                } else if seq == expected && seq != 0 {
                    // A write up to K that targets this block and is not
                    // older than `expected`, the last of them, is it.
                    Ok(())
                } else {
                    Err(lost)
                }
            }
            _ => Err(lost),
        }
    }

    /// Checks that every later write found is aimed at its block.
    pub fn finish(mut self) -> Result<(), Lost> {
        let later = &mut *self.later;
        if self.latest > 0 {
            self.generator.run_to_write(self.latest, |op| {
                if later[op.block as usize] == op.write_seq {
                    later[op.block as usize] = 0;
                }
            });
        }
        match later.iter().position(|&seq| seq != 0) {
            None => Ok(()),
            Some(block) => Err(Lost {
                block: block as u64,
                expected: self.expected[block],
                found: Found::Write { seq: later[block], block: block as u64, seed: self.params.seed },
                seed: self.params.seed,
                misplaced: true,
            }),
        }
    }
}

/// The burst buffer's contents: each 512-byte sector starts with
/// `BURST4MB` and its index in the buffer, then bytes counting up from it.
pub fn fill_burst(buf: &mut [u8]) {
    for (i, sector) in buf.chunks_mut(512).enumerate() {
        sector[..8].copy_from_slice(b"BURST4MB");
        sector[8..16].copy_from_slice(&(i as u64).to_le_bytes());
        for (j, b) in sector[16..].iter_mut().enumerate() {
            *b = (i + j) as u8;
        }
    }
}

#[cfg(test)]
mod tests;
