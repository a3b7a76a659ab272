//! The virtio disk: kvstore on a raw image, persistence, record/replay with
//! disk reads in the log, bad disk arguments.

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
