//! `--only seccomp`: what the seccomp filters cost: for `compute` and
//! `ticker`, the wall time alone, the FT throughput ratio (alone ÷ with a
//! backup) and the primary's output-commit latency (p50, p99), with the
//! filters on (the default) and off (`--no-seccomp` on every VMM),
//! interleaved in one run.

use crate::common::{median, stat, time_ft_flags, time_runs};

pub(crate) fn seccomp_cost(runs: usize) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "## Seccomp: filters on (default) vs `--no-seccomp` (loopback; median of {runs} runs, interleaved; \
         load average {})\n",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "| workload | filters | alone s | with backup s | FT ratio (alone/with) | commit p50 µs | commit p99 µs |"
    );
    println!("|---|---|---|---|---|---|---|");
    let off = vec!["--no-seccomp".to_string()];
    for (guest, cmdline) in [("compute", "rounds=3000 kib=4096"), ("ticker", "hz=1000 ticks=2000")] {
        // [on, off]: each run does both, so that drift hits both alike.
        let mut alone: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut pairs: [Vec<(f64, String)>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..runs {
            let args = ["--guest", guest, "--cmdline", cmdline];
            alone[0].push(time_runs(&args, 1));
            alone[1].push(time_runs(&[&args[..], &["--no-seccomp"]].concat(), 1));
            pairs[0].push(time_ft_flags(guest, cmdline, &[], &[]));
            pairs[1].push(time_ft_flags(guest, cmdline, &off, &off));
        }
        for (i, label) in ["on", "off"].into_iter().enumerate() {
            let alone_s = median(alone[i].clone());
            let with_s = median(pairs[i].iter().map(|x| x.0).collect());
            let pick = |key: &str| {
                let v: Vec<f64> = pairs[i].iter().filter_map(|x| stat(&x.1, key)).map(|v| v as f64).collect();
                if v.is_empty() {
                    "n/a".into()
                } else {
                    (median(v) as u64).to_string()
                }
            };
            println!(
                "| {guest} ({cmdline}) | {label} | {alone_s:.3} | {with_s:.3} | {:.3} | {} | {} |",
                alone_s / with_s,
                pick("p50"),
                pick("p99")
            );
        }
    }
    println!();
}
