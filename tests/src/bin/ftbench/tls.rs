//! `--only tls`: what mutual TLS on the logging channel and to ftdisk
//! costs, against plaintext, in FT throughput ratio and output-commit
//! latency, for `compute`, `ticker`, kvstore and (root) redis.

use crate::common::{kv_connect, kv_session, median, stat, time_ft_with, time_runs, Security};
use crate::redis::{redis_benchmark_tests, redis_vm_with, RedisVm};
use ftvmm_tests::resp::RespConn;
use ftvmm_tests::{qemu_img, Proc, Scratch};
use std::io::Write;
use std::time::Duration;

/// One row of the TLS comparison: a throughput ratio and commit latency.
struct Cost {
    ratio: f64,
    p50: Option<u64>,
    p99: Option<u64>,
}

fn show(v: Option<u64>) -> String {
    v.map_or("n/a".into(), |v| v.to_string())
}

/// kvstore on ftdisk, alone or with a backup: set ops/s, and (with a
/// backup) the primary's --stats line once the guest quit.
fn kv_run(with_backup: bool, security: &Security, n: usize) -> (f64, String) {
    let dir = Scratch::new("bench-kv-tls");
    let image = dir.path("kv.img");
    qemu_img(&image, 16 << 20);
    let storage = security.flags("storage");
    let mut dargs = vec!["--image", image.as_str()];
    dargs.extend(storage.iter().map(String::as_str));
    let (mut server, addr) = ftvmm_tests::spawn_ftdisk_with(&dargs, "127.0.0.1:0");
    let disk = format!("ftdisk:{addr}");
    let base = ["--guest", "kvstore", "--disk", disk.as_str(), "--serial", "tcp:127.0.0.1:0", "--stats"];
    let (p_tls, b_tls) = (security.flags("primary"), security.flags("backup"));
    let mut pargs: Vec<&str> = if with_backup { vec!["--primary", "--listen", "127.0.0.1:0"] } else { vec![] };
    pargs.extend_from_slice(&base);
    pargs.extend(p_tls.iter().map(String::as_str));
    let p = Proc::spawn(&pargs);
    let backup = with_backup.then(|| {
        let log = p.wait_addr("waiting for a backup on", Duration::from_secs(20));
        let mut bargs = vec!["--backup", "--connect", log.as_str()];
        bargs.extend_from_slice(&base);
        bargs.extend(b_tls.iter().map(String::as_str));
        let b = Proc::spawn(&bargs);
        p.wait_line("backup attached", Duration::from_secs(20));
        b
    });
    let console = p.wait_addr("serial console on", Duration::from_secs(20));
    let mut conn = kv_connect(&console);
    let sets: Vec<String> = (0..n).map(|i| format!("set key{i} value{i}")).collect();
    let (_, set_s) = kv_session(&mut conn, &sets);
    let _ = conn.get_mut().write_all(b"quit\n");
    let r = p.finish(Duration::from_secs(30));
    drop(backup);
    let _ = server.kill();
    let _ = server.wait();
    (n as f64 / set_s, r.stderr)
}

pub(crate) fn tls_cost(runs: usize) {
    let dir = Scratch::new("bench-tls");
    let tls = Security::tls(&dir, ["10.87.0.1", "10.87.0.2", "10.87.0.4"]);
    let plain = Security::Plaintext;
    println!(
        "## TLS: plaintext vs mutual TLS on the logging channel and to ftdisk (loopback; median of {runs} runs, \
         interleaved)\n"
    );
    println!("| workload | setup | FT ratio (alone/with) | commit p50 µs | commit p99 µs |");
    println!("|---|---|---|---|---|");
    let mut rows: Vec<(String, [Cost; 2])> = Vec::new();
    for (guest, cmdline) in [("compute", "rounds=3000 kib=4096"), ("ticker", "hz=1000 ticks=2000")] {
        // Interleaved (alone, plaintext, TLS, alone, ...), so that a noisy
        // neighbour hits all three alike.
        let mut alone = Vec::new();
        let mut samples: [Vec<(f64, String)>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..runs {
            alone.push(time_runs(&["--guest", guest, "--cmdline", cmdline], 1));
            for (i, security) in [&plain, &tls].into_iter().enumerate() {
                samples[i].push(time_ft_with(guest, cmdline, security));
            }
        }
        let alone = median(alone);
        let cost = |s: &Vec<(f64, String)>| {
            let with = median(s.iter().map(|x| x.0).collect());
            let pick = |key: &str| {
                let v: Vec<f64> = s.iter().filter_map(|x| stat(&x.1, key)).map(|v| v as f64).collect();
                (!v.is_empty()).then(|| median(v) as u64)
            };
            Cost { ratio: alone / with, p50: pick("p50"), p99: pick("p99") }
        };
        rows.push((format!("{guest} ({cmdline})"), [cost(&samples[0]), cost(&samples[1])]));
    }
    // kvstore: the ratio is set throughput with a backup ÷ alone.
    let n = 500;
    let mut kv: [Vec<(f64, f64, String)>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..runs {
        for (i, security) in [&plain, &tls].into_iter().enumerate() {
            let (alone, _) = kv_run(false, security, n);
            let (with, stderr) = kv_run(true, security, n);
            kv[i].push((alone, with, stderr));
        }
    }
    let kv_cost = |s: &Vec<(f64, f64, String)>| {
        let pick = |key: &str| {
            let v: Vec<f64> = s.iter().filter_map(|x| stat(&x.2, key)).map(|v| v as f64).collect();
            (!v.is_empty()).then(|| median(v) as u64)
        };
        Cost { ratio: median(s.iter().map(|x| x.1 / x.0).collect()), p50: pick("p50"), p99: pick("p99") }
    };
    rows.push((format!("kvstore ({n} sets, disk on ftdisk)"), [kv_cost(&kv[0]), kv_cost(&kv[1])]));
    if ftvmm_tests::lab::is_root() {
        let mut redis: [Vec<(f64, String)>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..runs {
            for (i, security) in [&plain, &tls].into_iter().enumerate() {
                redis[i].push(redis_ratio(&dir, security));
            }
        }
        let redis_cost = |s: &Vec<(f64, String)>| {
            let pick = |key: &str| {
                let v: Vec<f64> = s.iter().filter_map(|x| stat(&x.1, key)).map(|v| v as f64).collect();
                (!v.is_empty()).then(|| median(v) as u64)
            };
            Cost { ratio: median(s.iter().map(|x| x.0).collect()), p50: pick("p50"), p99: pick("p99") }
        };
        rows.push((
            "redis (redis-benchmark -t set -c 1 -P 1 -n 5000)".into(),
            [redis_cost(&redis[0]), redis_cost(&redis[1])],
        ));
    } else {
        println!("(redis needs root for its network-namespace hosts: skipped)\n");
    }
    for (workload, costs) in &rows {
        for (cost, security) in costs.iter().zip([&plain, &tls]) {
            println!(
                "| {workload} | {} | {:.3} | {} | {} |",
                security.label(),
                cost.ratio,
                show(cost.p50),
                show(cost.p99)
            );
        }
    }
    println!();
    println!("| workload | ratio change (TLS − plaintext) | p99 change µs |");
    println!("|---|---|---|");
    for (workload, [plain, tls]) in &rows {
        let p99 = match (plain.p99, tls.p99) {
            (Some(a), Some(b)) => format!("{:+}", b as i64 - a as i64),
            _ => "n/a".into(),
        };
        println!("| {workload} | {:+.3} | {p99} |", tls.ratio - plain.ratio);
    }
    println!();
}

/// redis-benchmark SET (-c 1 -P 1) with a backup ÷ alone, with `security`,
/// and the primary's --stats after SHUTDOWN.
fn redis_ratio(dir: &Scratch, security: &Security) -> (f64, String) {
    let rps =
        |vm: &RedisVm| redis_benchmark_tests(&vm.vm, 6379, "set", 1, 1, 5_000).first().map(|r| r.1).unwrap_or(f64::NAN);
    let alone = {
        let vm = redis_vm_with(false, dir, security);
        rps(&vm)
    };
    let mut vm = redis_vm_with(true, dir, security);
    let with = rps(&vm);
    if let Ok(mut conn) = RespConn::connect(&format!("{}:6379", vm.vm), Duration::from_secs(5)) {
        let _ = conn.cmd(&["SHUTDOWN"]);
    }
    let primary = vm.procs.remove(0);
    let r = primary.finish(Duration::from_secs(20));
    (with / alone, r.stderr)
}
