//! `--only ft`: the FT overhead ratio of `compute` and `ticker`, the
//! output-commit latency, the failover time from SIGKILL of the primary to
//! the new primary's first output, and the log bandwidth.

use crate::common::{cpu_runs, median, run_ft, stat, time_ft, time_runs, FtRun};
use ftvmm_tests::{Proc, Scratch};
use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Milliseconds from SIGKILL of the primary to the first byte the backup,
/// gone live, sends its console client.
fn failover_ms() -> f64 {
    let p = Proc::spawn(&[
        "--primary",
        "--guest",
        "ticker",
        "--cmdline",
        "hz=100",
        "--listen",
        "127.0.0.1:0",
        "--serial",
        "tcp:127.0.0.1:0",
    ]);
    let addr = p.wait_addr("waiting for a backup on", Duration::from_secs(20));
    let b = Proc::spawn(&[
        "--backup",
        "--guest",
        "ticker",
        "--cmdline",
        "hz=100",
        "--connect",
        &addr,
        "--serial",
        "tcp:127.0.0.1:0",
    ]);
    let b_console = b.wait_addr("serial console on", Duration::from_secs(20));
    p.wait_line("backup attached", Duration::from_secs(20));
    // A client already waiting on the backup's console (the kernel completes
    // the connection; the backup serves it once live).
    let mut client = TcpStream::connect(&b_console).expect("backup console");
    client.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    std::thread::sleep(Duration::from_millis(500));
    let mut p = p;
    let killed = Instant::now();
    p.kill();
    let mut byte = [0u8; 1];
    let n = client.read(&mut byte).unwrap_or(0);
    let ms = killed.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(n, 1, "the backup never spoke");
    drop(b);
    ms
}

/// The FT overhead in CPU, which contention for the cores cannot blur:
/// the primary's CPU seconds alone and with a backup, and the backup's,
/// per unit of the guest's work.
pub(crate) fn cpu_overhead(runs: usize) {
    println!("## FT overhead in CPU seconds (user + system, all threads; median of {runs} runs)\n");
    println!("| workload | unit | primary alone | primary with a backup | ratio | backup |");
    println!("|---|---|---|---|---|---|");
    for (guest, cmdline, unit, units) in
        [("compute", "rounds=3000 kib=4096", "run", 1.0), ("ticker", "hz=1000 ticks=2000", "1,000 ticks", 2.0)]
    {
        let alone = cpu_runs(&["--guest", guest, "--cmdline", cmdline], runs) / units;
        let pairs: Vec<FtRun> = (0..runs).map(|_| run_ft(guest, cmdline, &[], &[])).collect();
        let primary = median(pairs.iter().map(|r| r.primary_cpu).collect()) / units;
        let backup = median(pairs.iter().map(|r| r.backup_cpu).collect()) / units;
        println!("| {guest} ({cmdline}) | {unit} | {alone:.3} | {primary:.3} | {:.2} | {backup:.3} |", primary / alone);
    }
    println!();
}

pub(crate) fn fault_tolerance(runs: usize) {
    println!("## Fault tolerance (primary and backup on this 2-core machine, loopback; median of {runs} runs)\n");
    println!(
        "| workload | alone s | with backup s | FT overhead ratio (alone/with) | ratio, worst–best run | log KiB/s |"
    );
    println!("|---|---|---|---|---|---|");
    let dir = Scratch::new("bench-ft");
    let mut ticker_stderr = String::new();
    for (guest, cmdline) in [("compute", "rounds=3000 kib=4096"), ("ticker", "hz=1000 ticks=2000")] {
        let alone = time_runs(&["--guest", guest, "--cmdline", cmdline], runs);
        let samples: Vec<(f64, String)> = (0..runs).map(|_| time_ft(guest, cmdline)).collect();
        let with = median(samples.iter().map(|s| s.0).collect());
        let slowest = samples.iter().map(|s| s.0).fold(0.0, f64::max);
        let fastest = samples.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
        if guest == "ticker" {
            ticker_stderr = samples.last().map(|s| s.1.clone()).unwrap_or_default();
        }
        let log = dir.path(&format!("{guest}.log"));
        let record = time_runs(&["--guest", guest, "--cmdline", cmdline, "--record", &log], 1);
        let bytes = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as f64;
        println!(
            "| {guest} ({cmdline}) | {alone:.3} | {with:.3} | {:.3} | {:.3}–{:.3} | {:.1} |",
            alone / with,
            alone / slowest,
            alone / fastest,
            bytes / 1024.0 / record
        );
    }
    println!();
    match (stat(&ticker_stderr, "p50"), stat(&ticker_stderr, "p99"), stat(&ticker_stderr, "max")) {
        (Some(p50), Some(p99), Some(max)) => {
            println!("Output-commit latency (ticker, every serial byte held until acked): p50 {p50} µs, p99 {p99} µs, max {max} µs\n")
        }
        _ => println!("Output-commit latency: not reported ({ticker_stderr})\n"),
    }
    // The primary's `--stats` line: "N guest exits (this VMM's, by kind: ...)".
    if let Some(line) = ticker_stderr.lines().find(|l| l.contains("guest exits (")) {
        let exits: f64 = line.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0.0);
        let kinds = line.split_once("by kind: ").map_or("", |(_, k)| k.trim_end_matches(')'));
        println!("Guest exits per tick (ticker, 2000 ticks, with a backup): {:.1} ({kinds})\n", exits / 2000.0);
    }
    let mut failovers: Vec<f64> = (0..runs).map(|_| failover_ms()).collect();
    failovers.sort_by(|a, b| a.total_cmp(b));
    println!(
        "Failover, SIGKILL of the primary to the new primary's first output: median {:.1} ms, max {:.1} ms\n",
        median(failovers.clone()),
        failovers.last().copied().unwrap_or(0.0)
    );
}
