//! `--only sync`: the FT overhead of guests without exits in their work
//! loops, kept in lockstep by state syncs, and what the syncs cost.

use crate::common::{median, TIMEOUT};
use ftvmm_tests::{ftvmm, wait, Proc};
use std::time::{Duration, Instant};

/// The `--stats` sync line of a run: (syncs, page bytes, total µs).
fn sync_stats(stderr: &str) -> (u64, u64, u64) {
    let Some(line) = stderr.lines().find(|l| l.starts_with("ftvmm: stats: ") && l.contains(" syncs, ")) else {
        return (0, 0, 0);
    };
    let w: Vec<&str> = line.split(' ').collect();
    let num = |i: usize| w.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
    (num(2), num(4), num(7))
}

/// One workload's throughput (work units per second) from a run's output:
/// spin's loops per second of guest time, or compute's rounds per second
/// of wall time.
fn throughput(guest: &str, cmdline: &str, stdout: &str, wall: f64) -> f64 {
    if guest == "spin" {
        let field = |key: &str| -> f64 {
            stdout.split_whitespace().find_map(|f| f.strip_prefix(key)).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        };
        return field("loops=") / (field("elapsed_us=") / 1e6).max(1e-9);
    }
    let rounds: f64 =
        cmdline.split(' ').find_map(|f| f.strip_prefix("rounds=")).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    rounds / wall
}

/// FT overhead of guests without exits, kept in lockstep by state syncs.
pub(crate) fn sync_bench(runs: usize) {
    let runs = runs.min(3);
    println!("## State syncs (median of {runs} runs; primary and backup on this machine, over loopback)\n");
    println!(
        "| guest | alone /s | FT /s | FT ratio | syncs/s | KiB/sync | primary µs/sync | backup µs/sync | log MiB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut workloads: Vec<(&str, String)> =
        vec![("spin", "hz=100 seconds=3".into()), ("spin", "hz=1000 seconds=3".into())];
    for (hz, sizes) in [(100, &[64u64, 256, 1024, 4096][..]), (1000, &[64, 256, 1024][..])] {
        for &kib in sizes {
            let rounds = 4_000_000 / kib;
            workloads.push(("compute", format!("rounds={rounds} kib={kib} exitpoints=0 hz={hz}")));
        }
    }
    for (guest, cmdline) in &workloads {
        let (mut alone, mut ft, mut per_s, mut kib, mut p_us, mut b_us, mut mib_s) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let start = Instant::now();
            let r = wait(ftvmm(&["--guest", guest, "--cmdline", cmdline]).spawn().expect("spawn ftvmm"), TIMEOUT);
            assert_eq!(r.status, Some(0), "{guest} {cmdline} alone: {}", r.stderr);
            alone.push(throughput(guest, cmdline, &r.stdout, start.elapsed().as_secs_f64()));

            let port =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let addr = format!("127.0.0.1:{port}");
            let b_args = ["--backup", "--guest", guest, "--cmdline", cmdline, "--connect", &addr, "--stats"];
            let backup = Proc::spawn(&b_args);
            std::thread::sleep(Duration::from_millis(200));
            let start = Instant::now();
            let p_args = ["--primary", "--guest", guest, "--cmdline", cmdline, "--listen", &addr, "--stats"];
            let p = wait(ftvmm(&p_args).spawn().expect("spawn ftvmm"), TIMEOUT);
            let wall = start.elapsed().as_secs_f64();
            assert_eq!(p.status, Some(0), "{guest} {cmdline} primary: {}", p.stderr);
            let b = backup.finish(TIMEOUT);
            assert_eq!(b.status, Some(0), "{guest} {cmdline} backup: {}", b.stderr);
            ft.push(throughput(guest, cmdline, &p.stdout, wall));
            let (n, bytes, us) = sync_stats(&p.stderr);
            let (bn, _, bus) = sync_stats(&b.stderr);
            let n = n.max(1) as f64;
            per_s.push(n / wall);
            kib.push(bytes as f64 / n / 1024.0);
            p_us.push(us as f64 / n);
            b_us.push(bus as f64 / (bn.max(1) as f64));
            mib_s.push(bytes as f64 / wall / (1 << 20) as f64);
        }
        let (alone, ft) = (median(alone), median(ft));
        println!(
            "| {guest} {cmdline} | {alone:.0} | {ft:.0} | {:.3} | {:.0} | {:.1} | {:.0} | {:.0} | {:.2} |",
            ft / alone,
            median(per_s),
            median(kib),
            median(p_us),
            median(b_us),
            median(mib_s)
        );
    }
    println!();
}
