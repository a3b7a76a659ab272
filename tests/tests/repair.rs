//! Divergence repair: a divergence no exit reveals is found by the periodic
//! digest checks within one period; a backup repairs it by a full state
//! sync from its primary and replays on; a backup whose primary dies during
//! the repair halts instead of going live from a diverged state.

use ftvmm_tests::{metrics_addr, run, wait_metric, Proc, Scratch, TIMEOUT};
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(20);
/// The primary logs a digest check every this many exits.
const PERIOD: u64 = 200;
/// Generous on a loaded machine: a pair whose network threads starve for
/// 200 ms must not be taken for a failure here (the primary also waits
/// five times this for the backup to acknowledge the end of the log).
const HEARTBEAT_MS: &str = "1000";

fn primary(cmdline: &str) -> (Proc, String) {
    let period = PERIOD.to_string();
    let p = Proc::spawn(&[
        "--primary",
        "--guest",
        "timer",
        "--cmdline",
        cmdline,
        "--listen",
        "127.0.0.1:0",
        "--digest",
        "--check-every-exits",
        &period,
        "--heartbeat-ms",
        HEARTBEAT_MS,
        "--metrics",
        "127.0.0.1:0",
    ]);
    let addr = p.wait_addr("waiting for a backup on", START);
    (p, addr)
}

fn backup(cmdline: &str, addr: &str, inject_at: u64) -> Proc {
    let at = inject_at.to_string();
    Proc::spawn(&[
        "--backup",
        "--guest",
        "timer",
        "--cmdline",
        cmdline,
        "--connect",
        addr,
        "--digest",
        "--inject-divergence-at",
        &at,
        "--heartbeat-ms",
        HEARTBEAT_MS,
        "--metrics",
        "127.0.0.1:0",
    ])
}

/// Asserts `out` is the timer guest's one line for at least `ticks` ticks
/// (a tick may land between its loop's last check and its print).
fn assert_timer_line(out: &str, ticks: u64) {
    let counted: Option<u64> =
        out.strip_prefix("timer: ticks=").and_then(|rest| rest.split(' ').next()).and_then(|n| n.parse().ok());
    assert!(
        counted.is_some_and(|n| n >= ticks) && out.ends_with('\n') && out.lines().count() == 1,
        "not the timer's line for {ticks} ticks: {out:?}"
    );
}

/// The exit a "divergence at exit N: ..." line names.
fn divergence_exit(line: &str) -> u64 {
    line.split("divergence at exit ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exit in {line:?}"))
}

#[test]
fn an_injected_divergence_is_found_within_one_check_period_and_repaired() {
    let inject_at = 500;
    // Far longer than the repair, so that the primary is still running when
    // even a slow backup finds the divergence.
    let (p, addr) = primary("ticks=1000");
    let b = backup("ticks=1000", &addr, inject_at);
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "primary: {}", p.stderr);
    assert_eq!(b.code(), 0, "backup: {}", b.stderr);
    let line = b.stderr.lines().find(|l| l.contains("; resynchronizing")).unwrap_or_else(|| panic!("{}", b.stderr));
    assert!(line.contains("at the digest check"), "{line}");
    let found = divergence_exit(line);
    assert!(found > inject_at && found <= inject_at + PERIOD, "injected at {inject_at}, found at {found}");
    assert!(b.stderr.contains("resynchronized at exit"), "{}", b.stderr);
    assert!(p.stderr.contains("backup resynchronized at exit"), "{}", p.stderr);
    // Repaired: both end in the same state, and the output is the guest's.
    assert_eq!(p.digest(), b.digest(), "primary:\n{}\nbackup:\n{}", p.stderr, b.stderr);
    assert_timer_line(&p.stdout, 1000);
    assert!(b.stdout.is_empty(), "the backup never went live: {:?}", b.stdout);
}

#[test]
fn a_replay_of_a_log_file_finds_an_injected_divergence_at_the_next_check() {
    let dir = Scratch::new("check-replay");
    let log = dir.path("timer.log");
    let period = PERIOD.to_string();
    let rec = run(
        &["--guest", "timer", "--cmdline", "ticks=200", "--record", &log, "--digest", "--check-every-exits", &period],
        TIMEOUT,
    );
    assert_eq!(rec.code(), 0, "{}", rec.stderr);
    let clean = run(&["--guest", "timer", "--cmdline", "ticks=200", "--replay", &log, "--digest"], TIMEOUT);
    assert_eq!(clean.code(), 0, "{}", clean.stderr);
    assert_eq!(clean.digest(), rec.digest());
    let flipped = run(
        &["--guest", "timer", "--cmdline", "ticks=200", "--replay", &log, "--inject-divergence-at", "250"],
        TIMEOUT,
    );
    assert_eq!(flipped.code(), 3, "{}", flipped.stderr);
    assert!(flipped.stderr.contains("divergence at exit 400: expected state digest"), "{}", flipped.stderr);
}

#[test]
fn a_repaired_backup_still_takes_over_when_its_primary_dies() {
    // Long enough that the primary still runs when it is killed, after a
    // repair that may take seconds on a loaded machine.
    let (mut p, addr) = primary("ticks=3000");
    let b = backup("ticks=3000", &addr, 300);
    let (pm, bm) = (metrics_addr(&p), metrics_addr(&b));
    b.wait_line("resynchronized at exit", TIMEOUT);
    // What an operator sees of the repair, on both sides.
    let resynced = r#"ftvmm_ft_state_reason{reason="resynchronized"}"#;
    for (addr, state) in [(&bm, r#"ftvmm_ft_state{state="replaying"}"#), (&pm, r#"ftvmm_ft_state{state="protected"}"#)]
    {
        wait_metric(addr, "ftvmm_divergences_total", TIMEOUT, |v| v >= 1.0);
        wait_metric(addr, "ftvmm_resyncs_total", TIMEOUT, |v| v >= 1.0);
        wait_metric(addr, state, TIMEOUT, |v| v == 1.0);
        wait_metric(addr, resynced, TIMEOUT, |v| v == 1.0);
    }
    // Long enough for an ack past the state's exit and the primary's
    // released report to reach the backup.
    std::thread::sleep(Duration::from_millis(500));
    p.kill();
    let released = p.stdout();
    let b = b.finish(TIMEOUT);
    assert_eq!(b.code(), 0, "backup: {}", b.stderr);
    assert!(b.stderr.contains("going live"), "{}", b.stderr);
    // The primary may have released the start of the line: the live backup
    // emits the rest, so that together it is whole.
    let whole = released + &b.stdout;
    assert_timer_line(&whole, 3000);
}

#[test]
fn a_backup_whose_primary_dies_during_its_resync_halts() {
    let (p, addr) = primary("ticks=3000");
    let b = backup("ticks=3000", &addr, 300);
    b.wait_line("; resynchronizing", TIMEOUT);
    // Freeze the primary before it can send the state: to the backup it
    // is silent, hence lost.
    let pid = p.child.id().to_string();
    let stopped = std::process::Command::new("kill").args(["-STOP", &pid]).status().expect("kill -STOP");
    assert!(stopped.success());
    let started = Instant::now();
    let b = b.finish(TIMEOUT);
    drop(p);
    assert_eq!(b.code(), 5, "backup: {}", b.stderr);
    assert!(b.stderr.contains("cannot go live: halting"), "{}", b.stderr);
    assert!(!b.stderr.contains("resynchronized at exit"), "{}", b.stderr);
    assert!(b.stdout.is_empty(), "a diverged backup produced output: {:?}", b.stdout);
    assert!(started.elapsed() < Duration::from_secs(10), "the halt took {:?}", started.elapsed());
}

#[test]
fn a_nondeterministic_guest_under_ft_is_repaired_at_every_divergence() {
    // Each round reads the host's TSC unlogged (see guests/nondet): the
    // backup departs at an exit or, at the latest, at the next check; the
    // gap after each round leaves time to repair it before the next.
    let cmdline = "rounds=3 gap=20000";
    let p = Proc::spawn(&[
        "--primary",
        "--guest",
        "nondet",
        "--cmdline",
        cmdline,
        "--listen",
        "127.0.0.1:0",
        "--digest",
        "--check-every-exits",
        "500",
        "--heartbeat-ms",
        HEARTBEAT_MS,
        "--metrics",
        "127.0.0.1:0",
    ]);
    let addr = p.wait_addr("waiting for a backup on", START);
    let b = Proc::spawn(&[
        "--backup",
        "--guest",
        "nondet",
        "--cmdline",
        cmdline,
        "--connect",
        &addr,
        "--digest",
        "--heartbeat-ms",
        HEARTBEAT_MS,
    ]);
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "primary: {}", p.stderr);
    assert_eq!(b.code(), 0, "backup: {}", b.stderr);
    let said = |what: &str| b.stderr.lines().filter(|l| l.contains(what) && !l.contains("FT state")).count();
    let diverged = said("; resynchronizing");
    let repaired = said("resynchronized at exit");
    // One per round, unless a slow repair's state already covers the next
    // round's reading; every divergence is repaired.
    assert!(
        (1..=3).contains(&diverged) && repaired == diverged,
        "{diverged} divergences, {repaired} repairs:\n{}",
        b.stderr
    );
    assert_eq!(p.digest(), b.digest(), "primary:\n{}\nbackup:\n{}", p.stderr, b.stderr);
    let last = p.stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("nondet: ") && last.contains(" lines, last reading "), "{:?}", p.stdout);
}

#[test]
fn a_primary_whose_backup_dies_during_its_resync_runs_on_alone() {
    let (p, addr) = primary("ticks=600");
    let mut b = backup("ticks=600", &addr, 300);
    p.wait_line("the backup diverged at exit", TIMEOUT);
    b.kill();
    let p = p.finish(TIMEOUT);
    assert_eq!(p.code(), 0, "primary: {}", p.stderr);
    assert!(p.stderr.contains("running alone"), "{}", p.stderr);
    // Its held outputs were released once it ran alone.
    assert_timer_line(&p.stdout, 600);
}
