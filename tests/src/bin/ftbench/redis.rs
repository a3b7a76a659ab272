//! `--only redis` (root): stock redis-benchmark against the redis guest on
//! lab hosts, alone and with a backup, the pause a client sees at a
//! failover, and a real redis-server on this host as context.

use crate::common::{median, Security};
use ftvmm_tests::lab::Lab;
use ftvmm_tests::resp::{Reply, RespConn};
use ftvmm_tests::{ftdisk_bin, Proc, Scratch};
use std::time::{Duration, Instant};

/// redis-benchmark's CSV: test → (rps, p50 ms, p99 ms).
fn redis_benchmark(host: &str, port: u16, clients: u32, pipeline: u32, n: u32) -> Vec<(String, f64, f64, f64)> {
    redis_benchmark_tests(host, port, "set,get,incr", clients, pipeline, n)
}

/// redis-benchmark -t `tests` -c `clients` -P `pipeline` --csv: test → (rps, p50 ms, p99 ms).
pub(crate) fn redis_benchmark_tests(
    host: &str,
    port: u16,
    tests: &str,
    clients: u32,
    pipeline: u32,
    n: u32,
) -> Vec<(String, f64, f64, f64)> {
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string(), "-t", tests, "-n", &n.to_string()])
        .args(["-c", &clients.to_string(), "-P", &pipeline.to_string(), "--csv"])
        .output()
        .expect("redis-benchmark (Debian's redis-tools) is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(|x| x.trim_matches('"')).collect();
            Some((f.first()?.to_string(), f.get(1)?.parse().ok()?, f.get(4)?.parse().ok()?, f.get(6)?.parse().ok()?))
        })
        .collect()
}

/// A redis VM on lab hosts: alone on `p`, or with a backup on `b` (and an
/// arbiter on `s`).
pub(crate) struct RedisVm {
    _lab: Lab,
    pub(crate) procs: Vec<Proc>,
    _arbiter: Option<std::process::Child>,
    pub(crate) vm: String,
}

impl Drop for RedisVm {
    fn drop(&mut self) {
        if let Some(a) = &mut self._arbiter {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

fn redis_vm(with_backup: bool, dir: &Scratch) -> RedisVm {
    redis_vm_with(with_backup, dir, &Security::Plaintext)
}

/// [`redis_vm`], with `security` on the logging channel and the arbiter.
pub(crate) fn redis_vm_with(with_backup: bool, dir: &Scratch, security: &Security) -> RedisVm {
    let net = "10.87.0";
    let lab = Lab::create("ftbr", net, &[("p", 1), ("b", 2), ("s", 4)], std::process::id()).expect("root for labs");
    lab.add_tap("p", "fttap").unwrap();
    lab.add_tap("b", "fttap").unwrap();
    let vm = format!("{net}.10");
    let cmdline = format!("ip={vm}/24");
    let ns = |h: &str| lab.host(h).map(|h| h.ns.clone()).unwrap_or_default();
    // Metrics on each lab host's own address: the exits a request costs.
    let mut common = vec![
        "--guest",
        "redis",
        "--cmdline",
        cmdline.as_str(),
        "--net",
        "tap:fttap",
        "--stats",
        "--metrics",
        "0.0.0.0:9400",
    ];
    let (p_tls, b_tls, s_tls) = (security.flags("primary"), security.flags("backup"), security.flags("storage"));
    let mut procs = Vec::new();
    let mut arbiter = None;
    let arb = format!("ftdisk:{net}.4:7100");
    let listen = format!("{net}.1:7000");
    if with_backup {
        let state = dir.path("record");
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns("s")])
            .arg(ftdisk_bin())
            .args(["--arbiter-only", "--state", &state, "--listen", &format!("{net}.4:7100")])
            .args(&s_tls)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ftdisk");
        std::thread::sleep(Duration::from_millis(300));
        arbiter = Some(child);
        common.extend_from_slice(&["--arbiter", arb.as_str()]);
        let mut pargs = vec!["--primary", "--listen", listen.as_str()];
        pargs.extend_from_slice(&common);
        pargs.extend(p_tls.iter().map(String::as_str));
        let p = Proc::spawn_in(Some(&ns("p")), &pargs);
        p.wait_line("waiting for a backup", Duration::from_secs(30));
        let mut bargs = vec!["--backup", "--connect", listen.as_str()];
        bargs.extend_from_slice(&common);
        bargs.extend(b_tls.iter().map(String::as_str));
        let b = Proc::spawn_in(Some(&ns("b")), &bargs);
        p.wait_line("backup attached", Duration::from_secs(30));
        procs.push(p);
        procs.push(b);
    } else {
        procs.push(Proc::spawn_in(Some(&ns("p")), &common));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut c) = RespConn::connect(&format!("{vm}:6379"), Duration::from_secs(5)) {
            if c.cmd(&["PING"]).is_ok() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    RedisVm { _lab: lab, procs, _arbiter: arbiter, vm }
}

/// The primary's exits so far by kind, from its `/metrics`.
fn exits_by_kind(addr: &str) -> Vec<(String, f64)> {
    let text = ftvmm_tests::scrape(addr);
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ftvmm_guest_exits_total{kind=\"")?;
            let (kind, value) = rest.split_once("\"} ")?;
            Some((kind.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Exits per request between two scrapes: in all, and by kind.
fn per_request(before: &[(String, f64)], after: &[(String, f64)], requests: u32) -> String {
    let delta = |kind: &str, v: f64| v - before.iter().find(|(k, _)| k == kind).map_or(0.0, |(_, b)| *b);
    let kinds: Vec<(String, f64)> =
        after.iter().map(|(k, v)| (k.clone(), delta(k, *v) / f64::from(requests))).filter(|(_, v)| *v > 0.0).collect();
    let total: f64 = kinds.iter().map(|(_, v)| v).sum();
    let parts: Vec<String> = kinds.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    format!("{total:.2} ({})", parts.join(", "))
}

/// CPU seconds so far of each of `vm`'s VMMs (primary first).
fn vmm_cpu(vm: &RedisVm) -> Vec<f64> {
    vm.procs.iter().map(|p| ftvmm_tests::cpu_seconds(p.child.id()).unwrap_or(f64::NAN)).collect()
}

/// The primary's log bytes sent so far (0 alone).
fn log_bytes_sent(metrics: &str) -> f64 {
    ftvmm_tests::metric(&ftvmm_tests::scrape(metrics), "ftvmm_log_sent_bytes_total").unwrap_or(0.0)
}

/// Bulk TCP throughput through the guest's NIC: one connection to the
/// redis guest's discard service (the guest receives) and one to its
/// source (it sends), alone and with a backup; the log bandwidth the
/// received data costs (it is logged, frame by frame); both VMMs' CPU.
fn bulk_throughput(dir: &Scratch, runs: usize) {
    const MIB: usize = 32;
    println!(
        "### Bulk TCP throughput: {MIB} MiB to the guest's discard service and {MIB} MiB from its source, one \
         connection each (median of {runs})\n"
    );
    println!("| setup | receive MB/s | send MB/s | log MB/s while receiving | primary CPU s | backup CPU s |");
    println!("|---|---|---|---|---|---|");
    let bytes = MIB << 20;
    let mut alone = (0.0, 0.0);
    for with_backup in [false, true] {
        let vm = redis_vm(with_backup, dir);
        let metrics = vm.vm.replace(".10", ".1:9400");
        let cpu_before = vmm_cpu(&vm);
        let mut rx = Vec::new();
        let mut tx = Vec::new();
        let mut log = Vec::new();
        for _ in 0..runs {
            let log_before = log_bytes_sent(&metrics);
            let secs = ftvmm_tests::send_to_discard(&vm.vm, bytes).as_secs_f64();
            rx.push(bytes as f64 / secs / 1e6);
            log.push((log_bytes_sent(&metrics) - log_before) / secs / 1e6);
            tx.push(bytes as f64 / ftvmm_tests::read_from_source(&vm.vm, bytes).as_secs_f64() / 1e6);
        }
        let cpu: Vec<f64> = vmm_cpu(&vm).iter().zip(&cpu_before).map(|(a, b)| a - b).collect();
        let (rx, tx) = (median(rx), median(tx));
        let setup = if with_backup {
            format!("with a backup ({:.2}× / {:.2}× alone)", rx / alone.0, tx / alone.1)
        } else {
            alone = (rx, tx);
            "alone".to_string()
        };
        let backup_cpu = cpu.get(1).map_or("–".to_string(), |c| format!("{c:.2}"));
        println!(
            "| {setup} | {rx:.1} | {tx:.1} | {:.1} | {:.2} | {backup_cpu} |",
            median(log),
            cpu.first().copied().unwrap_or(f64::NAN)
        );
    }
    println!();
}

/// `--only bulk`: [`bulk_throughput`] alone.
pub(crate) fn bulk_bench(runs: usize) {
    if !ftvmm_tests::lab::is_root() {
        println!("### bulk: needs root (network namespaces); skipped\n");
        return;
    }
    bulk_throughput(&Scratch::new("bench-bulk"), runs);
}

/// The longest pause a client on one connection sees around the primary's
/// death (`signal`: KILL, or STOP for a silent death).
fn failover_pause_ms(signal: &str, dir: &Scratch) -> f64 {
    let vm = redis_vm(true, dir);
    let mut conn = RespConn::connect(&format!("{}:6379", vm.vm), Duration::from_secs(20)).expect("connect");
    let mut longest = Duration::ZERO;
    for i in 0..150 {
        if i == 50 {
            let pid = vm.procs[0].child.id().to_string();
            let _ = std::process::Command::new("kill").args([&format!("-{signal}"), &pid]).status();
        }
        let t = Instant::now();
        match conn.cmd(&["INCR", "c"]) {
            Ok(Reply::Int(_)) => {}
            other => panic!("INCR across the failover: {other:?}"),
        }
        longest = longest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    longest.as_secs_f64() * 1e3
}

pub(crate) fn redis_bench(runs: usize) {
    if !ftvmm_tests::lab::is_root() {
        println!("### redis: needs root (network namespaces); skipped\n");
        return;
    }
    let dir = Scratch::new("bench-redis");
    println!("### redis over virtio-net (redis-benchmark -t set,get,incr -n 20000; client on the lab's bridge)\n");
    println!("| setup | clients, pipeline | test | ops/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    let mut exits_per_request = Vec::new();
    let mut cpu_per_10k = Vec::new();
    for (c, p) in [(1u32, 1u32), (8, 16)] {
        let mut alone_rps = Vec::new();
        let mut alone_cpu = f64::NAN;
        for with_backup in [false, true] {
            let vm = redis_vm(with_backup, &dir);
            let metrics = vm.vm.replace(".10", ".1:9400");
            let before = exits_by_kind(&metrics);
            let cpu_before = vmm_cpu(&vm);
            let rows = redis_benchmark(&vm.vm, 6379, c, p, 20_000);
            let cpu: Vec<f64> = vmm_cpu(&vm).iter().zip(&cpu_before).map(|(a, b)| (a - b) / 6.0).collect();
            let after = exits_by_kind(&metrics);
            let setup = if with_backup { "with a backup" } else { "alone" };
            exits_per_request.push(format!("{setup}, -c {c} -P {p}: {}", per_request(&before, &after, 3 * 20_000)));
            let primary = cpu.first().copied().unwrap_or(f64::NAN);
            cpu_per_10k.push(match cpu.get(1) {
                Some(backup) => format!(
                    "with a backup, -c {c} -P {p}: primary {primary:.2} s ({:.2}× alone), backup {backup:.2} s",
                    primary / alone_cpu
                ),
                None => {
                    alone_cpu = primary;
                    format!("alone, -c {c} -P {p}: {primary:.2} s")
                }
            });
            for (i, (test, rps, p50, p99)) in rows.iter().enumerate() {
                println!("| {setup} | -c {c} -P {p} | {test} | {rps:.0} | {p50:.3} | {p99:.3} |");
                if with_backup {
                    if let Some(a) = alone_rps.get(i) {
                        ratios.push((format!("-c {c} -P {p} {test}"), rps / a));
                    }
                } else {
                    alone_rps.push(*rps);
                }
            }
        }
    }
    println!();
    println!(
        "FT throughput ratio (with a backup ÷ alone): {}",
        ratios.iter().map(|(t, r)| format!("{t} {r:.2}")).collect::<Vec<_>>().join(", ")
    );
    println!();
    println!("Guest exits per request (the primary's, from its metrics, over the three tests):\n");
    for line in exits_per_request {
        println!("- {line}");
    }
    println!();
    println!("CPU seconds per 10,000 requests (user + system, all threads, from /proc; over the three tests):\n");
    for line in cpu_per_10k {
        println!("- {line}");
    }
    println!();
    bulk_throughput(&dir, runs);
    let kill: Vec<f64> = (0..runs).map(|_| failover_pause_ms("KILL", &dir)).collect();
    let stop: Vec<f64> = (0..runs).map(|_| failover_pause_ms("STOP", &dir)).collect();
    println!(
        "Failover pause seen by a client on one connection (median of {runs}): SIGKILL {:.0} ms, silent death (SIGSTOP) {:.0} ms\n",
        median(kill),
        median(stop)
    );
    // Context: a real redis-server on this host.
    match std::process::Command::new("redis-server")
        .args(["--port", "16379", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        Ok(mut server) => {
            std::thread::sleep(Duration::from_millis(500));
            for (c, p) in [(1u32, 1u32), (8, 16)] {
                for (test, rps, p50, p99) in redis_benchmark("127.0.0.1", 16379, c, p, 20_000) {
                    println!("| redis-server on the host | -c {c} -P {p} | {test} | {rps:.0} | {p50:.3} | {p99:.3} |");
                }
            }
            let _ = server.kill();
            let _ = server.wait();
        }
        Err(_) => println!("(no redis-server on this host for context: apt-get install redis-server)"),
    }
    println!();
}
