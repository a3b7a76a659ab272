//! blkstress: a storage stress guest, for tests of durability across
//! failovers (where the disk image is the only witness) and as a benchmark
//! of the virtio disk. Everything it does is a deterministic function of
//! its command line, so under ftvmm a backup replays it exactly.
//!
//! # Command line (defaults in brackets)
//!
//! - `seed=S` [1]; `qd=N` requests in flight at most, 1..=32 [8];
//! - `ops=N` ops to issue, then exit 0; 0 = until the VM is stopped [0];
//! - `blocks=N` the region, in 4 KiB blocks from sector 0
//!   [min(disk, 4096 blocks)], at most 262144 (1 GiB);
//! - `write=P read=P flush=P` the op mix in percent, adding up to 100
//!   [70, 20, 10]; `random=P` percent of reads and writes at a random
//!   block, the others at the block after the previous read or write's
//!   [50];
//! - `pace=US` virtual microseconds to idle between batches (0 = none) [0];
//! - `verify=K` or `burst=N` select the other two modes (below).
//!
//! A bad command line, or no disk, prints `blkstress: <why>` and exits 2.
//!
//! # The op sequence and the block format
//!
//! Op i's kind, and whether it goes to a random block and which, are hashes
//! of (seed, i); a sequential read or write goes to the block after the
//! previous read or write's. So the sequence is a function of (seed,
//! blocks, mix, random) alone: not of `qd`, nor of timing. Every op moves
//! one 4 KiB block. Write w (writes count from 1) of block b holds, little-
//! endian: magic `BLKS`, b as u32, w as u64, the seed as u64, a checksum
//! u64 of everything else in the block (FNV-1a 64 over its 8-byte words:
//! the header before it, the payload after), then a payload from a PRNG
//! seeded by (seed, w, b). A block never written is all zeros. (See the
//! `blkstress` library: `Generator`, `fill_block`, `checksum`, `inspect`.)
//!
//! # Run (the default mode)
//!
//! Loop: submit ops while fewer than `qd` are in flight, kick once (one
//! notify for the whole batch), wait until at least one completes (idling
//! until the disk's interrupt), handle every completion there is, repeat.
//!
//! - A request the disk fails prints `blkstress: I/O error on op I`, exit 1.
//! - A read must find the last write to its block submitted before it (in
//!   submission order: ftvmm serves the ring in order), or zeros if there
//!   is none, else `blkstress: MISMATCH op I block B: expected write W,
//!   found ...` (W = 0: zeros), exit 1. The model starts from zeros: run on
//!   a fresh (zeroed) region.
//! - When a flush completes: `durable K`, K the highest write such that it
//!   and every write before it had been seen completing before the flush
//!   was submitted, whenever K grew. Each such line costs about 2 exits a
//!   byte on the serial port: a benchmark that should not pay for them
//!   runs with `flush=0`.
//! - At most once a second of virtual time (looked at every 16 batches: a
//!   clock read is an exit): `blkstress: N ops (W writes, R reads, F
//!   flushes)`, counting completed ops.
//! - After `ops=N` ops: `blkstress: done N ops in T ms: X IOPS, Y KiB/s`
//!   (virtual time from the first submission to the last completion; Y
//!   counts reads and writes), then a final flush (op N, for an error
//!   message) and always `durable K`; exit 0.
//!
//! # `verify=K`
//!
//! With the seed, blocks and mix of the run (qd only sets how many reads
//! are in flight), and no writes: replays the generator to write K without
//! I/O, then reads every block of the region, qd at a time. A block that
//! write E (the last up to K aimed at it) targets must hold write E or a
//! later write aimed at it (a valid block: magic, checksum, payload, its
//! own index, the seed); a block no write up to K targets, zeros or such a
//! later write. Later writes may have reached the disk too; whether one is
//! aimed at the block it was found in is checked by running the generator
//! on past K. Prints `blkstress: verified K writes over B blocks`, exit 0,
//! or `blkstress: LOST block B: expected write >= E, found ...`, exit 1.
//! Each request is one pwrite of the VMM: a 4 KiB write is never found
//! half-done after a VMM dies, and a torn block would be reported LOST.
//!
//! # `burst=N` (1..=32)
//!
//! Whether one notify may carry a lot: N writes of 4 MiB each (the same
//! static buffer, a recognisable pattern: each sector starts with
//! `BURST4MB`) to the 4 MiB-aligned regions i × 4 MiB, one kick, wait for
//! all N, then read back the first and the last region and compare; prints
//! `blkstress: burst of N x 4 MiB done`, exit 0 (1 on any error). The disk
//! must hold N × 4 MiB.
//!
//! # Memory
//!
//! About 12.4 MiB of static buffers (two 4 MiB burst buffers, two u64s per
//! block of the largest region, 32 request buffers, all .bss): the image,
//! loaded at 1 MiB, ends near 13.5 MiB. ftvmm's default `--mem-mib 64` is
//! plenty: nothing to pass; `--mem-mib 14` is the least it boots in.
#![no_std]
#![no_main]

use blkstress::{
    fill_block, fill_burst, inspect, Config, Found, Generator, Kind, Mode, Op, Params, Verifier, BLOCK, BURST_BYTES,
    BURST_SECTORS, MAX_BLOCKS, MAX_QD, SECTORS_PER_BLOCK,
};
use guest_rt::virtio_blk::{self, Completion, Data, Disk, MAX_REQUESTS};
use guest_rt::{hw, println, Static};

guest_rt::entry!(main);

const OK: u8 = 0;
const FAILED: u8 = 1;
const USAGE: u8 = 2;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Batches between two looks at the clock (each look is an exit).
const CLOCK_EVERY: u64 = 16;

const _: () = assert!(MAX_QD as usize <= MAX_REQUESTS);

#[repr(C, align(4096))]
struct Blocks([[u8; BLOCK]; MAX_QD as usize]);

#[repr(C, align(4096))]
struct Burst([u8; BURST_BYTES]);

/// Per block of the region: the model of a run (the last write submitted),
/// or a verify's expected and later writes.
struct Models {
    expected: [u64; MAX_BLOCKS as usize],
    later: [u64; MAX_BLOCKS as usize],
}

// All zero: .bss, nothing in the image.
static BLOCKS: Static<Blocks> = Static::new(Blocks([[0; BLOCK]; MAX_QD as usize]));
static MODELS: Static<Models> =
    Static::new(Models { expected: [0; MAX_BLOCKS as usize], later: [0; MAX_BLOCKS as usize] });
static BURST_OUT: Static<Burst> = Static::new(Burst([0; BURST_BYTES]));
static BURST_BACK: Static<Burst> = Static::new(Burst([0; BURST_BYTES]));

fn main() -> u8 {
    hw::pic_init_auto_eoi();
    let Some(mut disk) = virtio_blk::init() else {
        println!("blkstress: no disk (run ftvmm with --disk IMAGE)");
        return USAGE;
    };
    let config = match Config::parse(guest_rt::cmdline_str, disk.sectors()) {
        Ok(config) => config,
        Err(e) => {
            println!("blkstress: {}", e);
            return USAGE;
        }
    };
    let (Some(pool), Some(models)) = (Pool::new(), MODELS.take()) else {
        return FAILED;
    };
    let params = config.params;
    let result = match config.mode {
        Mode::Run => {
            if params.pace_us > 0 {
                // The PIT's one-shots end the pauses.
                hw::pic_unmask(0);
            }
            println!("blkstress: run {}", params);
            Runner::new(params, &mut disk, pool, &mut models.expected).run()
        }
        Mode::Verify(k) => verify(&params, k, &mut disk, pool, models),
        Mode::Burst(n) => burst(n, &mut disk),
    };
    match result {
        Ok(()) => OK,
        Err(status) => status,
    }
}

/// The request buffers: one per request in flight.
struct Pool {
    free: [Option<&'static mut [u8]>; MAX_QD as usize],
}

impl Pool {
    fn new() -> Option<Pool> {
        let blocks: &'static mut [[u8; BLOCK]; MAX_QD as usize] = &mut BLOCKS.take()?.0;
        let mut bufs = blocks.iter_mut();
        Some(Pool { free: core::array::from_fn(|_| bufs.next().map(|b| &mut b[..])) })
    }

    fn take(&mut self) -> Option<&'static mut [u8]> {
        self.free.iter_mut().find_map(Option::take)
    }

    fn put(&mut self, buf: &'static mut [u8]) {
        if let Some(slot) = self.free.iter_mut().find(|s| s.is_none()) {
            *slot = Some(buf);
        }
    }
}

/// Calls `each` with the next completion (waiting for one) and with every
/// other one there is already: one batch's worth.
fn batch(disk: &mut Disk, mut each: impl FnMut(Completion) -> Result<(), u8>) -> Result<(), u8> {
    let Some(first) = disk.wait_any() else {
        println!("blkstress: waited for a request, but none is in flight");
        return Err(FAILED);
    };
    each(first)?;
    while let Some(done) = disk.poll() {
        each(done)?;
    }
    Ok(())
}

/// Virtual nanoseconds (ftvmm's TSC runs at 1 GHz); each read is an exit.
fn now() -> u64 {
    hw::rdtsc()
}

/// Idles for `us` virtual microseconds (PIT one-shots, IRQ 0 unmasked);
/// returns the time at the end.
fn sleep(us: u64) -> u64 {
    let deadline = now().saturating_add(us * 1000);
    loop {
        let t = now();
        if t >= deadline {
            return t;
        }
        let ticks = ((deadline - t).saturating_mul(hw::PIT_HZ) / NS_PER_SEC).clamp(1, 0xffff);
        hw::pit_one_shot(ticks as u16);
        // An earlier interrupt (the disk's) only costs another round.
        guest_rt::wait_for_interrupt();
    }
}

/// What a request in flight is.
#[derive(Clone, Copy)]
struct Pending {
    op: Op,
    /// A read's expected write (0: zeros).
    expected: u64,
    /// A flush's durable count: it covers writes 1..=covers.
    covers: u64,
}

#[derive(Default)]
struct Counts {
    ops: u64,
    writes: u64,
    reads: u64,
    flushes: u64,
}

/// The run mode's state.
struct Runner<'a> {
    params: Params,
    disk: &'a mut Disk,
    pool: Pool,
    /// Per block: the last write submitted to it (0: none).
    model: &'a mut [u64],
    /// By driver slot.
    pending: [Option<Pending>; MAX_REQUESTS],
    in_flight: usize,
    last_write: u64,
    /// The last `durable K` printed.
    durable: u64,
    done: Counts,
}

impl<'a> Runner<'a> {
    fn new(params: Params, disk: &'a mut Disk, pool: Pool, model: &'a mut [u64]) -> Runner<'a> {
        let model = &mut model[..params.blocks as usize];
        Runner {
            params,
            disk,
            pool,
            model,
            pending: [None; MAX_REQUESTS],
            in_flight: 0,
            last_write: 0,
            durable: 0,
            done: Counts::default(),
        }
    }

    fn run(mut self) -> Result<(), u8> {
        let p = self.params;
        let mut generator = Generator::new(&p);
        let more = |g: &Generator| p.ops == 0 || g.index() < p.ops;
        let start = now();
        let mut last_progress = start;
        let mut batches = 0u64;
        loop {
            while self.in_flight < p.qd as usize && more(&generator) {
                self.submit(generator.next_op())?;
            }
            if self.in_flight == 0 {
                break;
            }
            self.disk.kick();
            let Some(first) = self.disk.wait_any() else {
                println!("blkstress: waited for a request, but none is in flight");
                return Err(FAILED);
            };
            self.complete(first)?;
            while let Some(done) = self.disk.poll() {
                self.complete(done)?;
            }
            batches += 1;
            let t = if p.pace_us > 0 && more(&generator) {
                Some(sleep(p.pace_us))
            } else if batches.is_multiple_of(CLOCK_EVERY) {
                Some(now())
            } else {
                None
            };
            if let Some(t) = t.filter(|t| t.saturating_sub(last_progress) >= NS_PER_SEC) {
                last_progress = t;
                let d = &self.done;
                println!("blkstress: {} ops ({} writes, {} reads, {} flushes)", d.ops, d.writes, d.reads, d.flushes);
            }
        }
        let elapsed = now().saturating_sub(start).max(1);
        let d = &self.done;
        let per_sec = |n: u64| (u128::from(n) * u128::from(NS_PER_SEC) / u128::from(elapsed)) as u64;
        println!(
            "blkstress: done {} ops in {} ms: {} IOPS, {} KiB/s",
            d.ops,
            elapsed / 1_000_000,
            per_sec(d.ops),
            per_sec((d.reads + d.writes) * (BLOCK as u64 / 1024))
        );
        // Nothing is in flight: every write submitted has completed.
        let covers = self.last_write;
        let flushed = self.disk.submit_flush().and_then(|t| self.disk.wait(t)).is_some_and(|c| c.ok);
        if !flushed {
            println!("blkstress: I/O error on op {}", generator.index());
            return Err(FAILED);
        }
        println!("durable {}", covers.max(self.durable));
        Ok(())
    }

    /// The highest write that, with every write before it, has been seen
    /// completing: what a flush submitted now makes durable.
    fn completed_writes(&self) -> u64 {
        let oldest_open =
            self.pending.iter().flatten().filter(|p| p.op.kind == Kind::Write).map(|p| p.op.write_seq).min();
        oldest_open.map_or(self.last_write, |seq| seq - 1)
    }

    fn submit(&mut self, op: Op) -> Result<(), u8> {
        let sector = op.block * SECTORS_PER_BLOCK;
        let mut pending = Pending { op, expected: 0, covers: 0 };
        let token = match op.kind {
            Kind::Write => self.pool.take().and_then(|buf| {
                fill_block(buf, self.params.seed, op.write_seq, op.block);
                self.disk.submit_write(sector, Data::Owned(buf)).ok()
            }),
            Kind::Read => {
                pending.expected = self.model[op.block as usize];
                self.pool.take().and_then(|buf| self.disk.submit_read(sector, buf).ok())
            }
            Kind::Flush => {
                pending.covers = self.completed_writes();
                self.disk.submit_flush()
            }
        };
        // Fewer than qd <= MAX_REQUESTS requests are in flight: there is a
        // buffer and a slot.
        let Some(token) = token else {
            println!("blkstress: no slot or buffer for op {}", op.index);
            return Err(FAILED);
        };
        if op.kind == Kind::Write {
            self.model[op.block as usize] = op.write_seq;
            self.last_write = op.write_seq;
        }
        self.pending[token.slot()] = Some(pending);
        self.in_flight += 1;
        Ok(())
    }

    fn complete(&mut self, done: Completion) -> Result<(), u8> {
        let Some(p) = self.pending[done.token.slot()].take() else {
            println!("blkstress: a completion of no request (slot {})", done.token.slot());
            return Err(FAILED);
        };
        self.in_flight -= 1;
        let buf = done.data.into_owned();
        if !done.ok {
            println!("blkstress: I/O error on op {}", p.op.index);
            return Err(FAILED);
        }
        match p.op.kind {
            Kind::Write => self.done.writes += 1,
            Kind::Read => {
                self.done.reads += 1;
                let found = buf.as_deref().map_or(Found::Garbage, inspect);
                if !found.is(p.expected, p.op.block, self.params.seed) {
                    println!(
                        "blkstress: MISMATCH op {} block {}: expected write {}, found {}",
                        p.op.index,
                        p.op.block,
                        p.expected,
                        found.describe(p.op.block, self.params.seed)
                    );
                    return Err(FAILED);
                }
            }
            Kind::Flush => {
                self.done.flushes += 1;
                if p.covers > self.durable {
                    self.durable = p.covers;
                    println!("durable {}", p.covers);
                }
            }
        }
        if let Some(buf) = buf {
            self.pool.put(buf);
        }
        self.done.ops += 1;
        Ok(())
    }
}

/// `verify=K`: reads the region, qd blocks at a time, through a [`Verifier`].
fn verify(params: &Params, k: u64, disk: &mut Disk, mut pool: Pool, models: &mut Models) -> Result<(), u8> {
    let mut verifier = Verifier::new(params, k, &mut models.expected, &mut models.later);
    let mut block_of = [0u64; MAX_REQUESTS];
    let (mut next, mut in_flight) = (0u64, 0u64);
    while next < params.blocks || in_flight > 0 {
        while in_flight < params.qd && next < params.blocks {
            let token = pool.take().and_then(|buf| disk.submit_read(next * SECTORS_PER_BLOCK, buf).ok());
            let Some(token) = token else {
                println!("blkstress: no slot or buffer to read block {}", next);
                return Err(FAILED);
            };
            block_of[token.slot()] = next;
            next += 1;
            in_flight += 1;
        }
        disk.kick();
        batch(disk, |done| {
            in_flight -= 1;
            let block = block_of[done.token.slot()];
            let Some(buf) = done.data.into_owned().filter(|_| done.ok) else {
                println!("blkstress: I/O error reading block {}", block);
                return Err(FAILED);
            };
            if let Err(lost) = verifier.check(block, buf) {
                println!("blkstress: {}", lost);
                return Err(FAILED);
            }
            pool.put(buf);
            Ok(())
        })?;
    }
    if let Err(lost) = verifier.finish() {
        println!("blkstress: {}", lost);
        return Err(FAILED);
    }
    println!("blkstress: verified {} writes over {} blocks", k, params.blocks);
    Ok(())
}

/// `burst=N`: N 4 MiB writes of one buffer with one notify, then the first
/// and the last region read back.
fn burst(n: u64, disk: &mut Disk) -> Result<(), u8> {
    let (Some(out), Some(back)) = (BURST_OUT.take(), BURST_BACK.take()) else {
        return Err(FAILED);
    };
    fill_burst(&mut out.0);
    // Nothing writes it from now on, so every request may read it at once.
    let out: &'static Burst = out;
    let start = now();
    let mut region_of = [0u64; MAX_REQUESTS];
    for i in 0..n {
        let Ok(token) = disk.submit_write(i * BURST_SECTORS, Data::Shared(&out.0)) else {
            println!("blkstress: no slot for burst write {}", i);
            return Err(FAILED);
        };
        region_of[token.slot()] = i;
    }
    disk.kick();
    if let Some(failed) = disk.wait_all().find(|done| !done.ok) {
        println!("blkstress: I/O error on burst write {}", region_of[failed.token.slot()]);
        return Err(FAILED);
    }
    println!("blkstress: burst wrote {} x 4 MiB with one notify in {} ms", n, now().saturating_sub(start) / 1_000_000);
    let mut back: &'static mut [u8] = &mut back.0;
    let last = n - 1;
    for region in [0, last].into_iter().take(if last == 0 { 1 } else { 2 }) {
        back.fill(0);
        let done = match disk.submit_read(region * BURST_SECTORS, back) {
            Ok(token) => disk.wait(token),
            Err(_) => None,
        };
        let Some(buf) = done.filter(|d| d.ok).and_then(|d| d.data.into_owned()) else {
            println!("blkstress: I/O error reading back burst region {}", region);
            return Err(FAILED);
        };
        if let Some(at) = buf.iter().zip(out.0.iter()).position(|(a, b)| a != b) {
            println!("blkstress: burst region {} reads back different data at byte {}", region, at);
            return Err(FAILED);
        }
        back = buf;
    }
    println!("blkstress: burst of {} x 4 MiB done", n);
    Ok(())
}
