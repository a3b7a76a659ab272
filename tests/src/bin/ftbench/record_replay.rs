//! `--only record-replay`: a plain run, a recording and a replay of
//! `compute` and `timer`, and the log's rates while recording.

use crate::common::time_runs;
use ftvmm_tests::Scratch;
use replay::{Entry, LogReader, RecordSource};

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

pub(crate) fn record_replay(runs: usize) {
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
