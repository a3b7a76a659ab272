//! The virtio disk: kvstore on a raw image, persistence, record/replay with
//! disk reads in the log, bad disk arguments; blkstress's queued I/O, its
//! durability report checked by `verify=K`, and a 4 MiB burst.

use ftvmm_tests::{run, run_with_input, Scratch, TIMEOUT};
use std::time::Duration;

fn image(dir: &Scratch, name: &str, bytes: u64) -> String {
    let path = dir.path(name);
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw", &path, &bytes.to_string()])
        .status()
        .expect("qemu-img is installed");
    assert!(status.success());
    path
}

fn kvstore(disk: &str, input: &str, extra: &[&str]) -> ftvmm_tests::Run {
    let mut args = vec!["--guest", "kvstore", "--disk", disk];
    args.extend_from_slice(extra);
    run_with_input(&args, &[(Duration::from_millis(10), input.as_bytes().to_vec())], TIMEOUT)
}

#[test]
fn kvstore_serves_commands_and_survives_a_restart() {
    let dir = Scratch::new("kv");
    let disk = image(&dir, "kv.img", 4 << 20);
    let r = kvstore(&disk, "set a 1\nset b two\nget a\nget zz\ndel a\nget a\nset only-one-token\nquit\n", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.stdout, "kvstore: ready (0 records)\nOK\nOK\nVALUE 1\nNOTFOUND\nOK\nNOTFOUND\nERR usage: set K V | get K | del K\nBYE\n");
    let r = kvstore(&disk, "get b\nget a\nset b three\nget b\nquit\n", &[]);
    assert_eq!(r.stdout, "kvstore: ready (3 records)\nVALUE two\nNOTFOUND\nOK\nVALUE three\nBYE\n");
    let r = kvstore(&disk, "get b\nquit\n", &[]);
    assert_eq!(r.stdout, "kvstore: ready (4 records)\nVALUE three\nBYE\n");
}

#[test]
fn replay_takes_disk_reads_from_the_log_and_never_touches_the_disk() {
    let dir = Scratch::new("kv-replay");
    let disk = image(&dir, "kv.img", 4 << 20);
    assert_eq!(kvstore(&disk, "set k1 v1\nset k2 v2\nquit\n", &[]).code(), 0);
    let log = dir.path("kv.log");
    let rec = kvstore(&disk, "get k1\nset k3 v3\nget k3\nquit\n", &["--record", &log, "--digest"]);
    assert_eq!(rec.code(), 0, "{}", rec.stderr);
    let before = std::fs::read(&disk).unwrap();
    for _ in 0..2 {
        let rep = run(&["--guest", "kvstore", "--disk", &disk, "--replay", &log, "--digest"], TIMEOUT);
        assert_eq!(rep.code(), 0, "{}", rep.stderr);
        assert_eq!(rep.stdout, rec.stdout);
        assert_eq!(rep.digest(), rec.digest());
    }
    assert_eq!(std::fs::read(&disk).unwrap(), before, "a replay wrote to the disk");
    // The log is tied to the disk's size.
    let other = image(&dir, "other.img", 8 << 20);
    run(&["--guest", "kvstore", "--disk", &other, "--replay", &log], TIMEOUT)
        .assert_error(2, "another VM configuration");
}

#[test]
fn bad_disks_are_clear_errors() {
    let dir = Scratch::new("kv-bad");
    run(&["--guest", "kvstore", "--disk", &dir.path("missing.img")], TIMEOUT).assert_error(2, "--disk");
    let tiny = dir.path("tiny.img");
    std::fs::write(&tiny, b"short").unwrap();
    run(&["--guest", "kvstore", "--disk", &tiny], TIMEOUT).assert_error(2, "at least one 512-byte sector");
    let r = run(&["--guest", "kvstore"], TIMEOUT);
    assert_eq!(r.code(), 1);
    assert_eq!(r.stdout, "kvstore: no disk (run with --disk)\n");
}

fn blkstress(disk: &str, cmdline: &str) -> ftvmm_tests::Run {
    run(&["--guest", "blkstress", "--disk", disk, "--cmdline", cmdline], TIMEOUT)
}

#[test]
fn blkstress_reads_back_its_writes_and_verify_finds_what_it_made_durable() {
    let dir = Scratch::new("blkstress");
    let disk = image(&dir, "bs.img", 4 << 20);
    let r = blkstress(&disk, "ops=1500 qd=32 seed=7 blocks=512");
    assert_eq!(r.code(), 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("blkstress: done 1500 ops in ")), "{}", r.stdout);
    let durable: Vec<u64> = lines.iter().filter_map(|l| l.strip_prefix("durable ")?.parse().ok()).collect();
    assert!(durable.len() > 2 && durable.windows(2).all(|w| w[0] < w[1]), "durable counts grow: {durable:?}");
    let k = *durable.last().unwrap();
    assert_eq!(lines.last(), Some(&format!("durable {k}").as_str()), "the final flush reports last");

    let verify = |disk: &str, k: u64| blkstress(disk, &format!("verify={k} seed=7 qd=32 blocks=512"));
    let r = verify(&disk, k);
    assert_eq!(
        (r.code(), r.stdout.as_str()),
        (0, format!("blkstress: verified {k} writes over 512 blocks\n").as_str())
    );
    // Writes past K are not on the disk; a different seed's are not either.
    assert_eq!(verify(&disk, k + 1).code(), 1);
    assert_eq!(blkstress(&disk, &format!("verify={k} seed=8 qd=32 blocks=512")).code(), 1);

    // A damaged block, one that went back to zeros: LOST.
    let image = std::fs::read(&disk).unwrap();
    let written = (0..512).find(|b| image[b * 4096..b * 4096 + 4] == *b"BLKS").expect("a block was written");
    let block = written * 4096..(written + 1) * 4096;
    for damage in ["flip", "zero"] {
        let mut bad = image.clone();
        match damage {
            "flip" => bad[block.start + 64..block.start + 80].iter_mut().for_each(|b| *b ^= 0x5a),
            _ => bad[block.clone()].fill(0),
        }
        std::fs::write(&disk, &bad).unwrap();
        let r = verify(&disk, k);
        assert_eq!(r.code(), 1, "{damage}: {}", r.stdout);
        assert!(r.stdout.starts_with(&format!("blkstress: LOST block {written}: expected write >= ")), "{}", r.stdout);
    }

    // Run again over written blocks: the model starts from zeros.
    std::fs::write(&disk, &image).unwrap();
    let r = blkstress(&disk, "ops=500 seed=9 blocks=512");
    assert_eq!(r.code(), 1);
    assert!(r.stdout.contains("blkstress: MISMATCH op "), "{}", r.stdout);
}

#[test]
fn blkstress_burst_carries_many_megabytes_in_one_notify() {
    let dir = Scratch::new("blkstress-burst");
    let disk = image(&dir, "burst.img", 8 << 20);
    let r = blkstress(&disk, "burst=2");
    assert_eq!(r.code(), 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.ends_with("blkstress: burst of 2 x 4 MiB done\n"), "{}", r.stdout);
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(&image[..8], b"BURST4MB");
    assert_eq!(image[..4 << 20], image[4 << 20..]);
    let r = blkstress(&disk, "burst=3");
    assert_eq!(r.code(), 2);
    assert!(r.stdout.contains("blkstress: burst=3 needs a disk of at least 3 x 4 MiB"), "{}", r.stdout);
}
