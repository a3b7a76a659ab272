//! `--only metrics`: what `--metrics` costs: the FT throughput ratio and
//! the output-commit latency of `compute` and `ticker` with both VMMs
//! serving metrics (and scraped every second, as Prometheus would) against
//! without, interleaved in one run.

use crate::common::{free_addr, median, stat, time_ft_flags, time_runs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Scrapes `addrs` every second until `stop`; returns how many scrapes
/// answered.
fn scraper(addrs: Vec<String>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut answered = 0;
        while !stop.load(Ordering::Relaxed) {
            for addr in &addrs {
                if telemetry::http_get(addr, "/metrics", Duration::from_secs(1)).is_ok_and(|a| a.status == 200) {
                    answered += 1;
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        answered
    })
}

pub(crate) fn metrics_cost(runs: usize) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "## Metrics: `--metrics` on both VMMs (scraped every second) vs off (loopback; median of {runs} runs, \
         interleaved; load average {})\n",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("| workload | metrics | FT ratio (alone/with) | commit p50 µs | commit p99 µs | scrapes answered |");
    println!("|---|---|---|---|---|---|");
    for (guest, cmdline) in [("compute", "rounds=3000 kib=4096"), ("ticker", "hz=1000 ticks=2000")] {
        let mut alone = Vec::new();
        let mut samples: [Vec<(f64, String)>; 2] = [Vec::new(), Vec::new()];
        let mut scrapes = 0;
        for _ in 0..runs {
            alone.push(time_runs(&["--guest", guest, "--cmdline", cmdline], 1));
            samples[0].push(time_ft_flags(guest, cmdline, &[], &[]));
            let (pm, bm) = (free_addr(), free_addr());
            let stop = Arc::new(AtomicBool::new(false));
            let scraping = scraper(vec![pm.clone(), bm.clone()], stop.clone());
            let flag = |a: &str| vec!["--metrics".to_string(), a.to_string()];
            samples[1].push(time_ft_flags(guest, cmdline, &flag(&pm), &flag(&bm)));
            stop.store(true, Ordering::Relaxed);
            scrapes += scraping.join().unwrap_or(0);
        }
        let alone = median(alone);
        for (i, label) in ["off", "on"].into_iter().enumerate() {
            let s = &samples[i];
            let with = median(s.iter().map(|x| x.0).collect());
            let pick = |key: &str| {
                let v: Vec<f64> = s.iter().filter_map(|x| stat(&x.1, key)).map(|v| v as f64).collect();
                if v.is_empty() {
                    "n/a".into()
                } else {
                    (median(v) as u64).to_string()
                }
            };
            let answered = if i == 1 { scrapes.to_string() } else { "-".into() };
            println!(
                "| {guest} ({cmdline}) | {label} | {:.2} | {} | {} | {answered} |",
                alone / with,
                pick("p50"),
                pick("p99")
            );
        }
    }
    println!();
}
