//! ftbench: ftvmm's benchmark. Prints tables of figures; asserts nothing
//! (speed targets are read off these figures, not enforced by timed tests).
//!
//! `cargo run --release -p ftvmm-tests --bin ftbench [-- --runs N]`
//!
//! Record/replay: for `compute` and `timer`, the median wall time of a plain
//! run, a recording and a replay, their ratios, and the log's event and byte
//! rates while recording.

use ftvmm_tests::{ftvmm, require_kvm, wait, Scratch};
use replay::{Entry, LogReader, RecordSource};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(300);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median wall-clock seconds of `runs` runs of `ftvmm args`.
fn time_runs(args: &[&str], runs: usize) -> f64 {
    let samples = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let r = wait(ftvmm(args).spawn().expect("spawn ftvmm"), TIMEOUT);
            assert_eq!(r.status, Some(0), "ftvmm {args:?} failed: {}", r.stderr);
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(samples)
}

fn log_counts(path: &str) -> (u64, u64) {
    let file = std::fs::File::open(path).expect("log");
    let (_, mut reader) = LogReader::new(std::io::BufReader::new(file)).expect("log header");
    let (mut exits, mut events) = (0, 0);
    while let Ok(Some(r)) = reader.next_record() {
        match r.entry {
            Entry::Exit(_) => exits += 1,
            Entry::Event(_) => events += 1,
            Entry::End { .. } => {}
        }
    }
    (exits, events)
}

fn record_replay(runs: usize) {
    let dir = Scratch::new("bench");
    println!("## Record and replay (median of {runs} runs, wall time of the whole ftvmm process)\n");
    println!(
        "| guest | plain s | record s | replay s | record/plain | replay/plain | exits/s | events/s | log KiB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (guest, cmdline) in [("compute", "rounds=2000 kib=4096"), ("timer", "ticks=1000")] {
        let log = dir.path(&format!("{guest}.log"));
        let plain = time_runs(&["--guest", guest, "--cmdline", cmdline], runs);
        let record = time_runs(&["--guest", guest, "--cmdline", cmdline, "--record", &log], runs);
        let replay = time_runs(&["--guest", guest, "--cmdline", cmdline, "--replay", &log], runs);
        let bytes = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as f64;
        let (exits, events) = log_counts(&log);
        println!(
            "| {guest} ({cmdline}) | {plain:.3} | {record:.3} | {replay:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {:.1} |",
            record / plain,
            replay / plain,
            exits as f64 / record,
            events as f64 / record,
            bytes / 1024.0 / record
        );
    }
    println!();
}

fn main() {
    require_kvm();
    let mut runs = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--runs", Some(n)) => runs = n.parse().unwrap_or(5).max(1),
            _ => {
                eprintln!("usage: ftbench [--runs N]");
                std::process::exit(2);
            }
        }
    }
    record_replay(runs);
}
