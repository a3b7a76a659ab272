//! Incremental state sync: guests that run long stretches without an exit
//! (`spin`, `compute exitpoints=0`) get their timer interrupts by kick and
//! sync, alone, recorded and replayed, under FT, and through a failover in
//! the middle of a stretch.

use ftvmm_tests::{run, Proc, Run, Scratch, TIMEOUT};
use std::time::Duration;

const START: Duration = Duration::from_secs(20);

/// The value of `key=` in the `spin:` result line of `out`.
fn spin_field(out: &str, key: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with("spin: ticks=")).unwrap_or_else(|| panic!("no result in {out:?}"));
    let field = line
        .split(' ')
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    if key == "checksum" || key == "state" {
        u64::from_str_radix(field, 16).unwrap()
    } else {
        field.parse().unwrap()
    }
}

fn digest_of(run: &Run) -> String {
    run.digest().unwrap_or_else(|| panic!("no digest; stderr:\n{}", run.stderr))
}

/// `(syncs, syncs that changed page tables)` from a `--stats` run.
fn syncs(run: &Run) -> (u64, u64) {
    let Some(line) = run.stderr.lines().find(|l| l.starts_with("ftvmm: stats: ") && l.contains(" syncs, ")) else {
        return (0, 0);
    };
    let words: Vec<&str> = line.split(' ').collect();
    let count = words[2].parse().unwrap();
    let tables = words[words.len() - 4].parse().unwrap();
    (count, tables)
}

#[test]
fn spin_alone_receives_its_ticks() {
    // Ticks received against those due in the (virtual) time they took.
    // Missed PIT periods coalesce, as on hardware, when the host deschedules
    // the vCPU thread for longer than a period: on a host loaded by other
    // work a run can fall short for that reason alone, so the best of three
    // runs counts (without kicks the guest would get no tick at all).
    let mut best = 0.0f64;
    for _ in 0..3 {
        let r = run(&["--guest", "spin", "--cmdline", "hz=100 seconds=2"], TIMEOUT);
        assert_eq!(r.code(), 0, "{}", r.stderr);
        let ticks = spin_field(&r.stdout, "ticks");
        assert_eq!(ticks, 200, "{}", r.stdout);
        assert!(spin_field(&r.stdout, "loops") > 0);
        let due = 100.0 * spin_field(&r.stdout, "elapsed_us") as f64 / 1e6;
        best = best.max(ticks as f64 / due);
        if best >= 0.9 {
            return;
        }
    }
    panic!("spin received at best {:.0}% of the ticks due", best * 100.0);
}

#[test]
fn spin_and_compute_without_exit_points_replay_their_recordings() {
    let dir = Scratch::new("sync-replay");
    for (i, cmdline) in
        ["hz=100 seconds=1", "hz=1000 seconds=1", "hz=100 seconds=1 remap=1", "rounds=2000 kib=256 exitpoints=0 hz=100"]
            .iter()
            .enumerate()
    {
        let guest = if cmdline.contains("rounds") { "compute" } else { "spin" };
        let log = dir.path(&format!("{i}.log"));
        let rec = run(&["--guest", guest, "--cmdline", cmdline, "--record", &log, "--digest", "--stats"], TIMEOUT);
        assert_eq!(rec.code(), 0, "{cmdline}: {}", rec.stderr);
        let rep = run(&["--guest", guest, "--cmdline", cmdline, "--replay", &log, "--digest", "--stats"], TIMEOUT);
        assert_eq!(rep.code(), 0, "{cmdline}: replay: {}", rep.stderr);
        assert_eq!(digest_of(&rec), digest_of(&rep), "{cmdline}: record and replay digests differ");
        assert_eq!(rec.stdout, rep.stdout, "{cmdline}: the replay prints what the recording did");
        let (taken, _) = syncs(&rec);
        let (applied, table_changes) = syncs(&rep);
        assert!(taken > 0, "{cmdline}: the recording took syncs: {}", rec.stderr);
        assert_eq!(taken, applied, "{cmdline}: the replay applied every sync");
        if cmdline.contains("remap=1") {
            assert!(table_changes > 0, "{cmdline}: syncs carried page-table changes: {}", rep.stderr);
        }
    }
}

fn primary(guest: &str, cmdline: &str) -> (Proc, String) {
    let args = ["--primary", "--guest", guest, "--cmdline", cmdline, "--listen", "127.0.0.1:0", "--digest", "--stats"];
    let p = Proc::spawn(&args);
    let addr = p.wait_addr("waiting for a backup on", START);
    (p, addr)
}

fn backup(guest: &str, cmdline: &str, addr: &str) -> Proc {
    Proc::spawn(&["--backup", "--guest", guest, "--cmdline", cmdline, "--connect", addr, "--digest", "--stats"])
}

#[test]
fn primary_and_backup_of_guests_without_exits_end_in_the_same_state() {
    for (guest, cmdline) in [
        ("spin", "hz=100 seconds=2"),
        ("spin", "hz=1000 seconds=1 remap=1"),
        ("compute", "rounds=2000 kib=256 exitpoints=0 hz=100"),
    ] {
        let (p, addr) = primary(guest, cmdline);
        let b = backup(guest, cmdline, &addr);
        let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
        assert_eq!(p.code(), 0, "{guest} {cmdline} primary: {}", p.stderr);
        assert_eq!(b.code(), 0, "{guest} {cmdline} backup: {}", b.stderr);
        assert_eq!(digest_of(&p), digest_of(&b), "{guest} {cmdline}: primary and backup digests differ");
        assert!(b.stdout.is_empty(), "the backup's output is suppressed: {:?}", b.stdout);
        let (taken, _) = syncs(&p);
        assert!(taken > 0, "{guest} {cmdline}: the primary synced: {}", p.stderr);
        assert_eq!(syncs(&b).0, taken, "{guest} {cmdline}: the backup applied every sync");
        if guest == "spin" {
            let hz: u64 = if cmdline.contains("hz=1000") { 1000 } else { 100 };
            assert!(spin_field(&p.stdout, "ticks") >= hz, "{}", p.stdout);
        }
    }
}

#[test]
fn a_backup_that_goes_live_in_a_spin_stretch_finishes_with_every_tick() {
    let cmdline = "hz=100 seconds=4";
    let (mut p, addr) = primary("spin", cmdline);
    let b = backup("spin", cmdline, &addr);
    p.wait_line("backup attached", START);
    // Into the stretch: the first line is out, then a second of syncs.
    let deadline = std::time::Instant::now() + START;
    while !p.stdout().contains("target=400") {
        assert!(std::time::Instant::now() < deadline, "no first line from the primary: {:?}", p.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let before = p.stdout();
    p.kill();
    let b = b.finish(TIMEOUT);
    assert_eq!(b.code(), 0, "backup: {}", b.stderr);
    assert!(b.stderr.contains("going live"), "{}", b.stderr);
    assert_eq!(spin_field(&b.stdout, "ticks"), 400, "the new primary counts every tick: {}", b.stdout);
    // Continuous output: the first line once (twice at most, at the
    // failover boundary), then the result line, nothing lost or reordered.
    let first = "spin: hz=100 seconds=4 target=400\n";
    assert!(!before.contains("ticks="), "the primary was killed mid-stretch: {before:?}");
    let all = before + &b.stdout;
    let rest = all.strip_prefix(first).unwrap_or_else(|| panic!("output starts with the first line: {all:?}"));
    let rest = rest.strip_prefix(first).unwrap_or(rest);
    assert!(rest.starts_with("spin: ticks=400 ") && rest.lines().count() == 1, "then the result: {all:?}");
}

#[test]
fn a_backup_joins_a_spinning_primary_and_ends_in_its_state() {
    // The join's final round happens at a sync (spin never exits), and the
    // log after the transferred state begins with syncs.
    let common = ["--guest", "spin", "--cmdline", "hz=100 seconds=4 remap=1", "--digest", "--stats"];
    let mut pargs = vec!["--primary", "--no-wait", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(&common);
    let p = Proc::spawn(&pargs);
    let addr = p.wait_addr("backups may join on", START);
    std::thread::sleep(Duration::from_millis(1000));
    let mut bargs = vec!["--backup", "--connect", addr.as_str()];
    bargs.extend_from_slice(&common);
    let b = Proc::spawn(&bargs);
    p.wait_line("protected", START);
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "primary: {}", p.stderr);
    assert_eq!(b.code(), 0, "backup: {}", b.stderr);
    assert_eq!(digest_of(&p), digest_of(&b), "the joined backup ends in the primary's state");
    assert!(syncs(&b).0 > 0, "the joined backup applied syncs: {}", b.stderr);
    assert_eq!(spin_field(&p.stdout, "ticks"), 400);
}
