//! Snapshots: a VM saved mid-run restores to the same state, replays the rest
//! of its recording to the same final digest, records from the snapshot on;
//! snapshots of another VM, damaged ones and other versions are refused.

use ftvmm_tests::{run, Scratch, TIMEOUT};

fn digest_of(args: &[&str]) -> String {
    let r = run(args, TIMEOUT);
    assert_eq!(r.code(), 0, "{args:?}:\n{}", r.stderr);
    r.digest().unwrap_or_else(|| panic!("no digest from {args:?}: {}", r.stderr))
}

#[test]
fn a_snapshot_taken_mid_run_replays_the_rest_of_its_recording_to_the_same_digest() {
    let dir = Scratch::new("snap");
    let (log, snap) = (dir.path("run.log"), dir.path("mid.snap"));
    // Mid-run: compute exits once a round (20), then prints its line (30
    // exits through the virtio-console, its bring-up included) and ends.
    for (guest, cmdline, at) in [("timer", "ticks=150", "400"), ("compute", "rounds=20 kib=512", "10")] {
        let recorded = digest_of(&[
            "--guest",
            guest,
            "--cmdline",
            cmdline,
            "--record",
            &log,
            "--save-snapshot",
            &snap,
            "--save-at-exit",
            at,
            "--digest",
        ]);
        let replayed =
            digest_of(&["--guest", guest, "--cmdline", cmdline, "--restore", &snap, "--replay", &log, "--digest"]);
        assert_eq!(recorded, replayed, "{guest}: restore + replay of the rest reaches the recorded state");

        // A recording begun from the snapshot replays from it, and only from it.
        let log2 = dir.path("from-snap.log");
        let live =
            digest_of(&["--guest", guest, "--cmdline", cmdline, "--restore", &snap, "--record", &log2, "--digest"]);
        let again =
            digest_of(&["--guest", guest, "--cmdline", cmdline, "--restore", &snap, "--replay", &log2, "--digest"]);
        assert_eq!(live, again, "{guest}: a recording from a snapshot replays from it");
        run(&["--guest", guest, "--cmdline", cmdline, "--replay", &log2], TIMEOUT)
            .assert_error(2, "another VM configuration");
    }
}

#[test]
fn bad_snapshots_are_refused_with_one_clear_line() {
    let dir = Scratch::new("badsnap");
    let snap = dir.path("good.snap");
    let r =
        run(&["--guest", "timer", "--cmdline", "ticks=40", "--save-snapshot", &snap, "--save-at-exit", "100"], TIMEOUT);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let good = std::fs::read(&snap).unwrap();
    let restore = |path: &str, extra: &[&str]| {
        let mut args = vec!["--guest", "timer", "--cmdline", "ticks=40", "--restore", path];
        args.extend_from_slice(extra);
        run(&args, TIMEOUT)
    };
    assert_eq!(restore(&snap, &[]).code(), 0, "the good snapshot restores");

    // Another image, another configuration.
    run(&["--guest", "hello", "--restore", &snap], TIMEOUT).assert_error(2, "another guest image");
    run(&["--guest", "timer", "--cmdline", "ticks=41", "--restore", &snap], TIMEOUT)
        .assert_error(2, "another VM configuration");
    restore(&snap, &["--mem-mib", "32"]).assert_error(2, "another VM configuration");

    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    restore(&write("short.snap", &good[..good.len() / 2]), &[]).assert_error(2, "truncated");
    restore(&write("empty.snap", &[]), &[]).assert_error(2, "truncated");
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    restore(&write("flipped.snap", &flipped), &[]).assert_error(2, "corrupt");
    let mut version = good.clone();
    version[8] = 77;
    restore(&write("version.snap", &version), &[]).assert_error(2, "version 77");
    restore(&write("garbage.snap", b"this is no snapshot at all"), &[]).assert_error(2, "not an ftvmm snapshot");
    restore(&dir.path("missing.snap"), &[]).assert_error(2, "missing.snap");
}
