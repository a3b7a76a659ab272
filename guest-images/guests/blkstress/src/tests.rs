//! The generator, the block format, the command line and the verify check,
//! on the host (a disk is a Vec of blocks).

use super::*;
use std::collections::HashMap;

fn params(seed: u64, blocks: u64) -> Params {
    Params { seed, qd: 8, ops: 0, blocks, mix: Mix { write: 70, read: 20, flush: 10 }, random: 50, pace_us: 0 }
}

/// The command line `words` for a disk of `sectors`.
fn parse(words: &str, sectors: u64) -> Result<Config, ParamError> {
    let words: Vec<&str> = words.split(' ').filter(|w| !w.is_empty()).collect();
    let lookup = |key: &str| {
        words.iter().find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')).map(str::as_bytes))
    };
    Config::parse(lookup, sectors)
}

#[test]
fn the_op_sequence_is_a_function_of_the_parameters() {
    let p = params(7, 4096);
    let a: Vec<Op> = Generator::new(&p).take(10_000).collect();
    let b: Vec<Op> = Generator::new(&p).take(10_000).collect();
    assert_eq!(a, b);
    // qd, ops and pace do not change it.
    let other = Params { qd: 32, ops: 5, pace_us: 100, ..p };
    assert_eq!(a, Generator::new(&other).take(10_000).collect::<Vec<_>>());
    // The seed does.
    let c: Vec<Op> = Generator::new(&params(8, 4096)).take(10_000).collect();
    assert_ne!(a, c);
    // The first ops of seed 7, pinned: a change of the generator breaks
    // every `verify=K` of an image written before it.
    let first: Vec<(Kind, u64, u64)> = a[..6].iter().map(|op| (op.kind, op.block, op.write_seq)).collect();
    assert_eq!(first, PINNED_SEED_7);
}

/// Seed 7, 4096 blocks, the default mix: the first six ops.
const PINNED_SEED_7: [(Kind, u64, u64); 6] = [
    (Kind::Write, 3586, 1),
    (Kind::Read, 3587, 0),
    (Kind::Write, 3588, 2),
    (Kind::Flush, 0, 0),
    (Kind::Read, 3589, 0),
    (Kind::Write, 3590, 3),
];

#[test]
fn ops_follow_the_mix_and_the_region() {
    let p = params(3, 1000);
    let mut counts = [0u64; 3];
    let mut writes = 0;
    let mut previous: Option<u64> = None;
    let mut sequential = 0;
    let mut moves = 0;
    for (i, op) in Generator::new(&p).take(100_000).enumerate() {
        assert_eq!(op.index, i as u64);
        match op.kind {
            Kind::Write => {
                writes += 1;
                assert_eq!(op.write_seq, writes, "writes count from 1");
                counts[0] += 1;
            }
            Kind::Read => {
                assert_eq!(op.write_seq, 0);
                counts[1] += 1;
            }
            Kind::Flush => {
                assert_eq!((op.block, op.write_seq), (0, 0));
                counts[2] += 1;
                continue;
            }
        }
        assert!(op.block < 1000);
        if let Some(prev) = previous {
            moves += 1;
            sequential += u64::from(op.block == (prev + 1) % 1000);
        }
        previous = Some(op.block);
    }
    let percent = counts.map(|c| c * 100 / 100_000);
    assert!((68..=72).contains(&percent[0]) && (18..=22).contains(&percent[1]) && (8..=12).contains(&percent[2]));
    // Half go to the next block, and a random block is the next one now and then.
    let share = sequential * 100 / moves;
    assert!((48..=53).contains(&share), "{share}% sequential");

    let all_random = Params { random: 100, ..p };
    let blocks: std::collections::HashSet<u64> =
        Generator::new(&all_random).filter(|op| op.kind != Kind::Flush).take(20_000).map(|op| op.block).collect();
    assert!(blocks.len() > 990, "random ops cover the region");
    let none_random = Params { random: 0, mix: Mix { write: 50, read: 50, flush: 0 }, ..p };
    for (i, op) in Generator::new(&none_random).take(3000).enumerate() {
        assert_eq!(op.block, i as u64 % 1000, "sequential ops walk the region and wrap");
    }
}

#[test]
fn run_to_write_stops_at_that_write() {
    let p = params(11, 64);
    let mut g = Generator::new(&p);
    let mut seen = Vec::new();
    g.run_to_write(100, |op| seen.push(op.write_seq));
    assert_eq!(seen, (1..=100).collect::<Vec<_>>());
    assert_eq!(g.writes(), 100);
    // The next op is the one after write 100.
    let next = g.index() as usize;
    let all: Vec<Op> = Generator::new(&p).take(next + 1).collect();
    assert_eq!(all[next - 1].write_seq, 100);
    assert_eq!(g.next_op(), all[next]);
    // No writes in the mix: nothing to run to.
    let mut none = Generator::new(&Params { mix: Mix { write: 0, read: 100, flush: 0 }, ..p });
    none.run_to_write(5, |_| panic!("no writes"));
    assert_eq!(none.index(), 0);
}

#[test]
fn blocks_carry_what_wrote_them() {
    let mut buf = vec![0u8; BLOCK];
    assert_eq!(inspect(&buf), Found::Zeros);
    fill_block(&mut buf, 7, 42, 1234);
    assert_eq!(&buf[..4], b"BLKS");
    assert_eq!(u32::from_le_bytes(buf[4..8].try_into().unwrap()), 1234);
    assert_eq!(u64::from_le_bytes(buf[8..16].try_into().unwrap()), 42);
    assert_eq!(u64::from_le_bytes(buf[16..24].try_into().unwrap()), 7);
    let found = inspect(&buf);
    assert_eq!(found, Found::Write { seq: 42, block: 1234, seed: 7 });
    assert!(found.is(42, 1234, 7) && !found.is(41, 1234, 7) && !found.is(42, 1235, 7) && !found.is(42, 1234, 8));
    assert!(Found::Zeros.is(0, 5, 7) && !Found::Zeros.is(1, 5, 7));

    // Content is a function of (seed, seq, block), and each changes it.
    let mut again = vec![0u8; BLOCK];
    fill_block(&mut again, 7, 42, 1234);
    assert_eq!(buf, again);
    for (seed, seq, block) in [(8, 42, 1234), (7, 43, 1234), (7, 42, 1235)] {
        fill_block(&mut again, seed, seq, block);
        assert_ne!(buf[HEADER_LEN..], again[HEADER_LEN..]);
    }

    // One flipped bit anywhere, or a torn block, is not a block blkstress wrote.
    for at in [0, 5, 9, 17, 25, 31, 32, 100, 2048, BLOCK - 1] {
        let mut bad = buf.clone();
        bad[at] ^= 0x10;
        assert_eq!(inspect(&bad), Found::Garbage, "bit flipped at {at}");
    }
    let mut torn = buf.clone();
    fill_block(&mut again, 7, 50, 1234);
    torn[2048..].copy_from_slice(&again[2048..]);
    assert_eq!(inspect(&torn), Found::Garbage);
    assert_eq!(inspect(&buf[..512]), Found::Garbage);

    // A payload that is not the generator's, under a correct checksum.
    let mut forged = buf.clone();
    forged[HEADER_LEN] ^= 1;
    let check = checksum(&forged);
    forged[OFF_CHECK..HEADER_LEN].copy_from_slice(&check.to_le_bytes());
    assert_eq!(inspect(&forged), Found::Garbage);
}

#[test]
fn found_in_words() {
    let w = |seq, block, seed| Found::Write { seq, block, seed };
    assert_eq!(Found::Zeros.describe(3, 7).to_string(), "zeros");
    assert_eq!(w(12, 3, 7).describe(3, 7).to_string(), "write 12");
    assert_eq!(w(12, 4, 7).describe(3, 7).to_string(), "write 12 of block 4");
    assert_eq!(w(12, 3, 9).describe(3, 7).to_string(), "write 12 of seed 9");
    assert_eq!(Found::Garbage.describe(3, 7).to_string(), "data blkstress never writes");
    let lost = Lost { block: 3, expected: 10, found: w(5, 3, 7), seed: 7, misplaced: false };
    assert_eq!(lost.to_string(), "LOST block 3: expected write >= 10, found write 5");
}

#[test]
fn command_lines() {
    let disk = 64 << 11; // 64 MiB in sectors
    let c = parse("", disk).unwrap();
    assert_eq!(c, Config { params: params(1, 4096), mode: Mode::Run });
    assert_eq!(parse("", 100 * 8).unwrap().params.blocks, 100, "a small disk is the region");
    let c = parse("seed=7 qd=32 ops=2000 blocks=100 write=50 read=50 flush=0 random=0 pace=250", disk).unwrap();
    assert_eq!(
        c.params,
        Params {
            seed: 7,
            qd: 32,
            ops: 2000,
            blocks: 100,
            mix: Mix { write: 50, read: 50, flush: 0 },
            random: 0,
            pace_us: 250
        }
    );
    assert_eq!(parse("verify=1234 seed=7", disk).unwrap().mode, Mode::Verify(1234));
    assert_eq!(parse("burst=16", disk).unwrap().mode, Mode::Burst(16));

    assert_eq!(parse("qd=0", disk), Err(ParamError::OutOfRange { key: "qd", value: 0, min: 1, max: 32 }));
    assert_eq!(parse("qd=33", disk), Err(ParamError::OutOfRange { key: "qd", value: 33, min: 1, max: 32 }));
    assert_eq!(parse("qd=8x", disk), Err(ParamError::NotANumber("qd")));
    assert_eq!(parse("seed=", disk), Err(ParamError::NotANumber("seed")));
    assert_eq!(parse("seed=99999999999999999999", disk), Err(ParamError::NotANumber("seed")));
    assert_eq!(parse("write=100", disk), Err(ParamError::MixNot100(130)));
    assert_eq!(parse("random=101", disk), Err(ParamError::OutOfRange { key: "random", value: 101, min: 0, max: 100 }));
    assert_eq!(parse("blocks=16385", disk), Err(ParamError::RegionPastDisk { blocks: 16385, disk_blocks: 16384 }));
    assert_eq!(
        parse("blocks=0", disk),
        Err(ParamError::OutOfRange { key: "blocks", value: 0, min: 1, max: MAX_BLOCKS })
    );
    assert_eq!(parse("", 7), Err(ParamError::DiskTooSmall));
    assert_eq!(parse("verify=3 burst=1", disk), Err(ParamError::TwoModes));
    assert_eq!(parse("verify=3 write=0 read=100 flush=0", disk), Err(ParamError::NoWrites));
    assert!(parse("verify=0 write=0 read=100 flush=0", disk).is_ok());
    assert_eq!(parse("burst=0", disk), Err(ParamError::OutOfRange { key: "burst", value: 0, min: 1, max: 32 }));
    assert_eq!(parse("burst=17", disk), Err(ParamError::BurstPastDisk { burst: 17, disk_bytes: 64 << 20 }));
    assert!(parse("burst=16", disk).is_ok());
    assert!(ParamError::MixNot100(130).to_string().contains("must be 100"));
}

/// A run on a disk in memory: the first `n` ops, writes landing in order;
/// the disk as it is after `landed` writes.
fn disk_after(p: &Params, landed: u64) -> Vec<Vec<u8>> {
    let mut disk = vec![vec![0u8; BLOCK]; p.blocks as usize];
    for op in Generator::new(p).filter(|op| op.kind == Kind::Write).take(landed as usize) {
        fill_block(&mut disk[op.block as usize], p.seed, op.write_seq, op.block);
    }
    disk
}

fn verify(p: &Params, k: u64, disk: &[Vec<u8>]) -> Result<(), Lost> {
    let (mut expected, mut later) = (vec![0; p.blocks as usize], vec![0; p.blocks as usize]);
    let mut v = Verifier::new(p, k, &mut expected, &mut later);
    for (block, data) in disk.iter().enumerate() {
        v.check(block as u64, data)?;
    }
    v.finish()
}

#[test]
fn verify_accepts_the_durable_state_and_anything_later() {
    let p = params(7, 256);
    for k in [0, 1, 100, 500] {
        for landed in [k, k + 1, k + 37, k + 1000] {
            assert_eq!(verify(&p, k, &disk_after(&p, landed)), Ok(()), "K={k}, {landed} writes on the disk");
        }
    }
}

#[test]
fn verify_finds_what_is_lost() {
    let p = params(7, 256);
    let k = 500;
    let disk = disk_after(&p, k);
    // The last write up to K of each block.
    let writes: Vec<Op> = Generator::new(&p).filter(|op| op.kind == Kind::Write).take(k as usize).collect();
    let mut last = HashMap::new();
    for op in &writes {
        last.insert(op.block, op.write_seq);
    }
    let (&block, &e) = last.iter().max_by_key(|(_, seq)| **seq).unwrap();
    let lost = |found| Err(Lost { block, expected: e, found, seed: 7, misplaced: false });

    // Garbage in one block.
    let mut bad = disk.clone();
    bad[block as usize][100] ^= 0xff;
    assert_eq!(verify(&p, k, &bad), lost(Found::Garbage));
    // A durable write missing: the block went back to zeros...
    let mut bad = disk.clone();
    bad[block as usize].fill(0);
    assert_eq!(verify(&p, k, &bad), lost(Found::Zeros));
    // ... or to an older write of it.
    let older =
        writes.iter().rfind(|op| op.block == block && op.write_seq < e).expect("the block was written twice up to K");
    let mut bad = disk.clone();
    fill_block(&mut bad[block as usize], 7, older.write_seq, block);
    assert_eq!(verify(&p, k, &bad), lost(Found::Write { seq: older.write_seq, block, seed: 7 }));
    // Another block's data, another seed's.
    let mut bad = disk.clone();
    bad[block as usize] = disk[(block as usize + 1) % 256].clone();
    assert!(verify(&p, k, &bad).is_err());
    let mut bad = disk.clone();
    fill_block(&mut bad[block as usize], 8, e, block);
    assert_eq!(verify(&p, k, &bad), lost(Found::Write { seq: e, block, seed: 8 }));

    // A valid-looking later write that the generator aims elsewhere.
    let later = Generator::new(&p)
        .filter(|op| op.kind == Kind::Write && op.write_seq > k && op.block != block)
        .find(|op| op.write_seq > k + 10)
        .unwrap();
    let mut bad = disk.clone();
    fill_block(&mut bad[block as usize], 7, later.write_seq, block);
    assert_eq!(
        verify(&p, k, &bad),
        Err(Lost {
            block,
            expected: e,
            found: Found::Write { seq: later.write_seq, block, seed: 7 },
            seed: 7,
            misplaced: true
        })
    );

    // A block no write up to K targets must be zeros (or a later write).
    let untouched = (0..256).find(|b| !last.contains_key(b)).expect("some block unwritten up to K");
    let mut bad = disk.clone();
    bad[untouched as usize][0] = 1;
    assert_eq!(
        verify(&p, k, &bad),
        Err(Lost { block: untouched, expected: 0, found: Found::Garbage, seed: 7, misplaced: false })
    );
}

#[test]
fn burst_pattern() {
    let mut buf = vec![0u8; 4096];
    fill_burst(&mut buf);
    assert_eq!(&buf[..8], b"BURST4MB");
    assert_eq!(&buf[512..520], b"BURST4MB");
    assert_eq!(u64::from_le_bytes(buf[520..528].try_into().unwrap()), 1);
    assert_ne!(buf[16..512], buf[528..1024]);
}
