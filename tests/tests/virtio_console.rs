//! The buffered console (virtio-console) on real guests: `ticker` prints
//! the same bytes with it and without it (`--no-virtio-console`, COM1
//! only), in a fraction of the exits; a recording through it replays to the
//! same state, and a pair through it ends in the same state with the
//! backup's output suppressed; a VM with the console and one without are
//! different configurations to a log or a peer; a failover re-emits the
//! held output once, through the new primary's console; panic and
//! exception messages come out through either console.

use ftvmm_tests::{check_continuity_across, connect_retry, run, Proc, Scratch, TickReader, TIMEOUT};
use std::time::Duration;

const START: Duration = Duration::from_secs(20);

/// `a` then `b`.
fn cat<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    a.iter().chain(b).copied().collect()
}

/// `(total, by kind)` from the `ftvmm: stats: N guest exits (this VMM's,
/// by kind: serial 1, mmio 2, ...)` line.
fn exits(stderr: &str) -> (u64, Vec<(String, u64)>) {
    let line = stderr.lines().find(|l| l.contains("guest exits (")).unwrap_or_else(|| panic!("no exits in:\n{stderr}"));
    let total = line.split_whitespace().nth(2).and_then(|n| n.parse().ok()).expect("exit count");
    let kinds = line
        .split_once("by kind: ")
        .map_or("", |(_, k)| k.trim_end_matches(')'))
        .split(", ")
        .filter_map(|kv| {
            let (k, v) = kv.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect();
    (total, kinds)
}

fn kind(kinds: &[(String, u64)], name: &str) -> u64 {
    kinds.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v)
}

fn ticker(ticks: u64, extra: &[&str]) -> ftvmm_tests::Run {
    let cmdline = format!("hz=100 ticks={ticks}");
    let mut args = vec!["--guest", "ticker", "--cmdline", &cmdline, "--stats", "--digest"];
    args.extend_from_slice(extra);
    let r = run(&args, TIMEOUT);
    assert_eq!(r.code(), 0, "ticker {extra:?}: {}", r.stderr);
    r
}

/// The target of issue 21: at most 3 exits a tick (the idle exit where the
/// tick's interrupt comes in, the handler's EOI, the line's one notify),
/// with output byte for byte what COM1 alone prints.
#[test]
fn ticker_prints_the_same_bytes_in_a_fraction_of_the_exits() {
    let uart = ticker(50, &["--no-virtio-console"]);
    let vcon = ticker(50, &[]);
    assert_eq!(vcon.stdout, uart.stdout, "the virtio console changed what the guest printed");
    assert!(vcon.stdout.starts_with("ticker: ready hz=100\ntick 1 "), "{}", vcon.stdout);
    assert_eq!(vcon.stdout.lines().filter(|l| l.starts_with("tick ")).count(), 50);

    let (uart_exits, uart_kinds) = exits(&uart.stderr);
    let (vcon_exits, vcon_kinds) = exits(&vcon.stderr);
    eprintln!("ticker, 50 ticks: {uart_exits} exits on COM1 ({uart_kinds:?}), {vcon_exits} with the virtio console ({vcon_kinds:?})");
    // Without the console the VM has no virtio device: guest-rt's one
    // defensive probe of a boot info without a device table is its only MMIO.
    assert!(kind(&uart_kinds, "mmio") <= 1, "no virtio device without the console: {uart_kinds:?}");
    // Through the console, COM1 is only set up for input (two writes).
    assert!(kind(&vcon_kinds, "serial") <= 4, "output still on COM1: {vcon_kinds:?}");
    assert!(vcon_exits * 5 < uart_exits, "{vcon_exits} exits with the console, {uart_exits} without");

    // A tick's own cost, without the boot's: the exits of 50 more ticks.
    let longer = ticker(100, &[]);
    let (longer_exits, _) = exits(&longer.stderr);
    let per_tick = (longer_exits - vcon_exits) as f64 / 50.0;
    eprintln!(
        "exits per tick, boot excluded: {per_tick:.2}; boot included (50 ticks): {:.2}",
        vcon_exits as f64 / 50.0
    );
    assert!(per_tick <= 3.0, "{per_tick:.2} exits per tick");
}

/// A recording through the console replays to the same state with the same
/// output; a VM without it is another configuration to that log.
#[test]
fn a_recording_through_the_console_replays_and_needs_the_console() {
    let dir = Scratch::new("vcon-replay");
    let log = dir.path("ticker.log");
    let rec = ticker(30, &["--record", &log]);
    let rep = ticker(30, &["--replay", &log]);
    assert_eq!(rep.stdout, rec.stdout, "a replay prints what the recording printed");
    assert_eq!(rep.digest(), rec.digest());
    assert!(rec.digest().is_some());
    run(&["--guest", "ticker", "--cmdline", "hz=100 ticks=30", "--replay", &log, "--no-virtio-console"], TIMEOUT)
        .assert_error(2, "another VM configuration");
}

/// A pair through the console ends in one state, the backup's output
/// suppressed; a backup without the console is refused at the handshake.
#[test]
fn a_pair_agrees_through_the_console_and_refuses_a_backup_without_it() {
    let args = ["--guest", "ticker", "--cmdline", "hz=100 ticks=30", "--digest"];
    let p = Proc::spawn(&cat(&["--primary", "--listen", "127.0.0.1:0"], &args));
    let addr = p.wait_addr("waiting for a backup on", START);
    let without = Proc::spawn(&cat(&["--backup", "--connect", &addr, "--no-virtio-console"], &args)).finish(TIMEOUT);
    assert_eq!(without.code(), 2, "{}", without.stderr);
    assert!(without.stderr.contains("another VM configuration"), "{}", without.stderr);
    let b = Proc::spawn(&cat(&["--backup", "--connect", &addr], &args));
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "{}", p.stderr);
    assert_eq!(b.code(), 0, "{}", b.stderr);
    assert_eq!(p.digest(), b.digest());
    assert!(p.digest().is_some());
    assert!(b.stdout.is_empty(), "the backup's output is suppressed, got {:?}", b.stdout);
    assert_eq!(p.stdout.lines().filter(|l| l.starts_with("tick ")).count(), 30, "{}", p.stdout);
}

/// Kill the primary of a pair whose ticks go through the console: the new
/// primary's client sees every tick, in order, repeated only at the switch
/// (the held lines it re-emits), none missing. On loopback; ft.rs has the
/// two-host version, through the console too since it is the default.
#[test]
fn a_failover_re_emits_held_console_output_and_loses_none() {
    for trial in 0..3u64 {
        let common = ["--guest", "ticker", "--cmdline", "hz=50", "--serial", "tcp:127.0.0.1:0"];
        let mut p = Proc::spawn(&cat(&["--primary", "--listen", "127.0.0.1:0"], &common));
        let addr = p.wait_addr("waiting for a backup on", START);
        let p_console = p.wait_addr("serial console on", START);
        let mut b = Proc::spawn(&cat(&["--backup", "--connect", &addr], &common));
        let b_console = b.wait_addr("serial console on", START);
        p.wait_line("backup attached", START);
        let mut reader = TickReader { lines: Vec::new() };
        reader.read_from(connect_retry(&p_console), |lines| lines.len() as u64 >= 10 + 7 * trial);
        let killed_at = reader.lines.last().map_or(0, |l| l.0);
        std::thread::sleep(Duration::from_millis(3 * trial));
        p.kill();
        b.wait_line("going live", Duration::from_secs(5));
        reader.read_from(connect_retry(&b_console), |lines| lines.last().is_some_and(|l| l.0 >= killed_at + 10));
        if let Err(e) = check_continuity_across(1, &reader.lines) {
            panic!("trial {trial}: {e}; ticks seen: {:?}", reader.lines.iter().map(|l| l.0).collect::<Vec<_>>());
        }
        b.kill();
    }
}

/// A guest's last words come out whichever console it has: a panic, a CPU
/// exception, and a panic inside a print (whose message guest-rt then puts
/// on COM1, the virtio-console being in the middle of that print).
#[test]
fn panic_and_exception_messages_come_out_through_either_console() {
    for console in [&[][..], &["--no-virtio-console"][..]] {
        for (end, status, said) in [
            ("panic", 0xe1, "guest panic: panicked at hello/src/main.rs"),
            ("fault", 0xe0, "guest exception 6 (error 0x0) at rip "),
            ("nested", 0xe1, "guest panic: panicked at hello/src/main.rs"),
        ] {
            let cmdline = format!("end={end}");
            let r = run(&cat(&["--guest", "hello", "--cmdline", &cmdline], console), TIMEOUT);
            assert_eq!(r.code(), status, "end={end} {console:?}: {}", r.stderr);
            assert!(r.stdout.starts_with("hello from ftvmm guest\n"), "end={end} {console:?}: {:?}", r.stdout);
            assert!(r.stdout.contains(said), "end={end} {console:?}: no {said:?} in {:?}", r.stdout);
            assert!(r.stdout.ends_with('\n'), "end={end} {console:?}: the message cut short: {:?}", r.stdout);
        }
    }
}
