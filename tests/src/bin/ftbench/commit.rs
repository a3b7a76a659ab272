//! `--only commit`: the output-commit latency of `ticker` pairs, hop by hop,
//! from the primary's and the backup's `--stats`.

use crate::common::{median, TIMEOUT};
use ftvmm_tests::Proc;
use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

/// `--stats` figures of one hop: "...NAME over N outputs: p50 X us, p99 Y us, max Z us".
fn hop_figures(stderr: &str, name: &str) -> Option<(u64, u64)> {
    let line = stderr.lines().find(|l| l.contains(name))?;
    let after = |key: &str| -> Option<u64> {
        let at = line.find(key)? + key.len();
        line[at..].trim_start().split(' ').next()?.parse().ok()
    };
    Some((after("p50")?, after("p99")?))
}

/// One `ticker` pair with a console client reading the primary's output;
/// returns the primary's and the backup's stderr.
fn ticker_pair_with_client(cmdline: &str, extra: &[&str]) -> (String, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let addr = format!("127.0.0.1:{port}");
    let mut b_args = vec!["--backup", "--guest", "ticker", "--cmdline", cmdline, "--connect", &addr, "--stats"];
    b_args.extend(extra);
    let backup = Proc::spawn(&b_args);
    std::thread::sleep(Duration::from_millis(200));
    let mut p_args = vec![
        "--primary",
        "--guest",
        "ticker",
        "--cmdline",
        cmdline,
        "--listen",
        &addr,
        "--serial",
        "tcp:127.0.0.1:0",
        "--stats",
    ];
    p_args.extend(extra);
    let primary = Proc::spawn(&p_args);
    let console = primary.wait_addr("serial console on", Duration::from_secs(20));
    let mut client = TcpStream::connect(&console).expect("primary console");
    let reader = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink);
    });
    let p = primary.finish(TIMEOUT);
    assert_eq!(p.status, Some(0), "primary failed: {}", p.stderr);
    let b = backup.finish(TIMEOUT);
    assert_eq!(b.status, Some(0), "backup failed: {}", b.stderr);
    let _ = reader.join();
    (p.stderr, b.stderr)
}

/// The output-commit latency of `ticker`, hop by hop (median over runs of
/// each hop's p50 and p99).
pub(crate) fn commit_hops(runs: usize) {
    const HOPS: [(&str, &str); 7] = [
        ("produced->handed", "vCPU thread: output produced → its watermark handed to the network thread"),
        ("handed->sent", "network thread wakes, batch written to the socket"),
        ("sent->acked", "round trip: network, backup receives and acks, ack read"),
        ("backup ack delay", "of which the backup: batch read → ack written"),
        ("acked->released", "ack read → output released"),
        ("released->written", "released → written to the console client's socket"),
        ("output-commit latency", "total held: produced → released"),
    ];
    println!("## Output commit, hop by hop (ticker pair on loopback, a console client reading; median of {runs} runs of each hop's p50 / p99, µs)\n");
    let configs: [(&str, &[&str]); 4] = [
        ("hz=100 ticks=1000", &[]),
        ("hz=1000 ticks=2000", &[]),
        ("hz=100 ticks=1000", &["--poll-us", "100"]),
        ("hz=1000 ticks=2000", &["--poll-us", "100"]),
    ];
    let mut columns = Vec::new();
    for (cmdline, extra) in configs {
        let samples: Vec<(String, String)> = (0..runs).map(|_| ticker_pair_with_client(cmdline, extra)).collect();
        let figures: Vec<Option<(f64, f64)>> = HOPS
            .iter()
            .map(|(hop, _)| {
                let found: Vec<(u64, u64)> = samples
                    .iter()
                    .filter_map(|(p, b)| hop_figures(if *hop == "backup ack delay" { b } else { p }, hop))
                    .collect();
                (!found.is_empty()).then(|| {
                    (
                        median(found.iter().map(|f| f.0 as f64).collect()),
                        median(found.iter().map(|f| f.1 as f64).collect()),
                    )
                })
            })
            .collect();
        columns.push((format!("{cmdline} {}", extra.join(" ")).trim().to_string(), figures));
    }
    print!("| hop |");
    for (name, _) in &columns {
        print!(" {name} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(columns.len()));
    for (i, (hop, what)) in HOPS.iter().enumerate() {
        print!("| {hop} ({what}) |");
        for (_, figures) in &columns {
            match figures[i] {
                Some((p50, p99)) => print!(" {p50:.0} / {p99:.0} |"),
                None => print!(" – |"),
            }
        }
        println!();
    }
    println!();
}
