//! ftbench: ftvmm's benchmark. Prints tables of figures; asserts nothing
//! (speed targets are read off these figures, not enforced by timed tests).
//!
//! `cargo run --release -p ftvmm-tests --bin ftbench [-- --runs N]`
//!
//! Record/replay: for `compute` and `timer`, the median wall time of a plain
//! run, a recording and a replay, their ratios, and the log's event and byte
//! rates while recording.
//!
//! Fault tolerance (primary and backup on this machine, over loopback): the
//! FT overhead ratio (throughput with a backup attached ÷ alone) for
//! `compute` and `ticker`, the output-commit latency, the failover time from
//! SIGKILL of the primary to the new primary's first output, and the log
//! bandwidth.
//!
//! kvstore: set and get throughput and latency through the guest's TCP
//! console, alone and with a backup attached, the disk on ftdisk.
//!
//! Re-protection: a backup joining a running primary by live state
//! transfer, for idle and busy 64 MiB and 512 MiB guests: the time to join,
//! the bytes sent and their ratio to guest memory, the pre-copy rounds and
//! the final pause during which the guest did not run.
//!
//! redis (root: network-namespace hosts with TAPs): stock redis-benchmark
//! against the redis guest alone and with a backup attached (ops/s, p50,
//! p99, the FT ratio), unpipelined and pipelined; the pause a client on one
//! connection sees at a failover, for SIGKILL and for a silent death; and
//! the same redis-benchmark against a real redis-server on this host, as
//! context for what virtualization costs here.
//!
//! Output commit, hop by hop: `ticker` pairs at 100 Hz and 1 kHz with a
//! console client reading, without and with `--poll-us`: p50 and p99 of each
//! hop of an output's way, from the primary's and the backup's `--stats`.
//!
//! TLS (`--only tls`, not in the default run): the cost of mutual TLS on
//! the logging channel and to ftdisk — for `compute`, `ticker`, kvstore and
//! (root) redis, the FT throughput ratio and the primary's output-commit
//! latency (p50, p99), in plaintext and with TLS, in one run, interleaved.
//!
//! State syncs: `spin` and `compute exitpoints=0` (no exit in their work
//! loops; their ticks come by kick and sync) at 100 Hz and 1 kHz, and
//! `compute` with working sets of 64 KiB to 4 MiB: the FT overhead ratio
//! (throughput with a backup attached ÷ alone), syncs per second, page
//! bytes and the primary's µs per sync, the backup's µs to apply one, and
//! the log bandwidth the syncs' pages take.
//!
//! Disk (`--only disk`): `blkstress` (4 KiB ops, 75% writes, 24% reads
//! checked against the guest's model, 1% flushes), sequential and random,
//! at queue depth 1 and 32: IOPS and KiB/s as the guest measures them, alone
//! on a local image, alone on ftdisk, and on ftdisk with a backup attached;
//! and the same op mix by the host itself on a raw image (pwrite, pread,
//! fdatasync), as context.
//!
//! `--only SECTION` (record-replay, ft, commit, sync, kvstore, join, redis, tls, disk) runs one section.
//!
//! `ftbench soak --minutes N [--load]`: memory over time and false
//! failovers. It runs a `ticker` pair at 1 kHz with no console client, one
//! with a client reading, and a `kvstore` pair on ftdisk under a steady
//! set/get load, and prints every process's RSS each minute; with `--load`,
//! two busy loops saturate both cores and a process holds and touches
//! 4 GiB meanwhile. It counts go-lives and lost backups while both sides
//! were alive (false failovers).

use ftvmm_tests::lab::Lab;
use ftvmm_tests::resp::{Reply, RespConn};
use ftvmm_tests::{ftdisk_bin, ftvmm, qemu_img, require_kvm, spawn_ftdisk, wait, Proc, Scratch};
use replay::{Entry, LogReader, RecordSource};
use std::io::Read;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
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

/// Wall seconds of a primary run with a backup attached (the backup starts
/// first, so the handshake is immediate), and the primary's stderr.
fn time_ft(guest: &str, cmdline: &str) -> (f64, String) {
    time_ft_with(guest, cmdline, &Security::Plaintext)
}

/// [`time_ft`], with `security` on the logging channel.
fn time_ft_with(guest: &str, cmdline: &str, security: &Security) -> (f64, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let addr = format!("127.0.0.1:{port}");
    let b_tls = security.flags("backup");
    let mut bargs = vec!["--backup", "--guest", guest, "--cmdline", cmdline, "--connect", &addr];
    bargs.extend(b_tls.iter().map(String::as_str));
    let backup = Proc::spawn(&bargs);
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let p_tls = security.flags("primary");
    let mut args = vec!["--primary", "--guest", guest, "--cmdline", cmdline, "--listen", &addr, "--stats"];
    args.extend(p_tls.iter().map(String::as_str));
    let r = wait(ftvmm(&args).spawn().expect("spawn ftvmm"), TIMEOUT);
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(r.status, Some(0), "primary failed: {}", r.stderr);
    let b = backup.finish(TIMEOUT);
    assert_eq!(b.status, Some(0), "backup failed: {}", b.stderr);
    (elapsed, r.stderr)
}

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
fn sync_bench(runs: usize) {
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

fn stat(stderr: &str, key: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains("output-commit latency"))?;
    let at = line.find(key)? + key.len();
    line[at..].trim_start().split(' ').next()?.parse().ok()
}

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

fn fault_tolerance(runs: usize) {
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
    let mut failovers: Vec<f64> = (0..runs).map(|_| failover_ms()).collect();
    failovers.sort_by(|a, b| a.total_cmp(b));
    println!(
        "Failover, SIGKILL of the primary to the new primary's first output: median {:.1} ms, max {:.1} ms\n",
        median(failovers.clone()),
        failovers.last().copied().unwrap_or(0.0)
    );
}

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
fn commit_hops(runs: usize) {
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

/// A kvstore console connection, past its banner.
fn kv_connect(console: &str) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(console).expect("kvstore console");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("banner");
    reader
}

/// Per-operation latencies (µs) of `ops` commands sent one at a time to a
/// kvstore console, and the wall time they took.
fn kv_session(reader: &mut BufReader<TcpStream>, ops: &[String]) -> (Vec<f64>, f64) {
    let mut line = String::new();
    let start = Instant::now();
    let mut lat = Vec::with_capacity(ops.len());
    for op in ops {
        let t = Instant::now();
        reader.get_mut().write_all(format!("{op}\n").as_bytes()).expect("send");
        line.clear();
        reader.read_line(&mut line).expect("reply");
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    (lat, start.elapsed().as_secs_f64())
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q).round() as usize]
}

fn kvstore_bench(n: usize) {
    println!("## kvstore over its TCP console, disk on a local ftdisk ({n} sets then {n} gets, one at a time)\n");
    println!("| setup | set ops/s | set p50 µs | set p99 µs | get ops/s | get p50 µs | get p99 µs |");
    println!("|---|---|---|---|---|---|---|");
    let sets: Vec<String> = (0..n).map(|i| format!("set key{i} value{i}")).collect();
    let gets: Vec<String> = (0..n).map(|i| format!("get key{i}")).collect();
    for ft in [false, true] {
        let dir = Scratch::new("bench-kv");
        let image = dir.path("kv.img");
        qemu_img(&image, 16 << 20);
        let (mut server, addr) = spawn_ftdisk(&image, "127.0.0.1:0");
        let disk = format!("ftdisk:{addr}");
        let base = ["--guest", "kvstore", "--disk", disk.as_str(), "--serial", "tcp:127.0.0.1:0"];
        let (vm, backup) = if ft {
            let mut pargs = vec!["--primary", "--listen", "127.0.0.1:0"];
            pargs.extend_from_slice(&base);
            let p = Proc::spawn(&pargs);
            let log = p.wait_addr("waiting for a backup on", Duration::from_secs(20));
            let mut bargs = vec!["--backup", "--connect", log.as_str()];
            bargs.extend_from_slice(&base);
            let b = Proc::spawn(&bargs);
            p.wait_line("backup attached", Duration::from_secs(20));
            (p, Some(b))
        } else {
            (Proc::spawn(&base), None)
        };
        let console = vm.wait_addr("serial console on", Duration::from_secs(20));
        let mut conn = kv_connect(&console);
        let (set_lat, set_s) = kv_session(&mut conn, &sets);
        let (get_lat, get_s) = kv_session(&mut conn, &gets);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            if ft { "with a backup" } else { "alone" },
            n as f64 / set_s,
            percentile(&set_lat, 0.5),
            percentile(&set_lat, 0.99),
            n as f64 / get_s,
            percentile(&get_lat, 0.5),
            percentile(&get_lat, 0.99)
        );
        drop(vm);
        drop(backup);
        let _ = server.kill();
    }
    println!();
}

/// The figures of the "backup joined" line a primary prints.
struct Join {
    rounds: f64,
    mib: f64,
    join_ms: f64,
    pause_ms: f64,
}

fn parse_join(line: &str) -> Option<Join> {
    let num = |after: &str| -> Option<f64> {
        let rest = &line[line.find(after)? + after.len()..];
        rest.trim_start().split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?.parse().ok()
    };
    let rounds: f64 = line.split(": ").nth(3)?.split(' ').next()?.parse().ok()?;
    Some(Join { rounds, mib: num("round(s), ")?, join_ms: num("MiB sent in")?, pause_ms: num("final pause")? })
}

/// A backup joining a running primary: (idle or busy) guest of `mem_mib`.
fn join_once(guest: &[&str], mem_mib: u64) -> Join {
    let mem = mem_mib.to_string();
    let mut common = vec!["--mem-mib", mem.as_str()];
    common.extend_from_slice(guest);
    let mut pargs = vec!["--primary", "--no-wait", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(&common);
    let p = Proc::spawn(&pargs);
    let addr = p.wait_addr("backups may join on", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000));
    let mut bargs = vec!["--backup", "--connect", addr.as_str()];
    bargs.extend_from_slice(&common);
    let b = Proc::spawn(&bargs);
    let line = p.wait_line("backup joined at exit", Duration::from_secs(120));
    drop(b);
    drop(p);
    parse_join(&line).unwrap_or_else(|| panic!("cannot read {line:?}"))
}

fn reprotection(runs: usize) {
    println!("### Re-protection: a backup joins a running primary (loopback; median of {runs} runs)\n");
    println!("| guest | memory | join ms | MiB sent | sent/memory | rounds | final pause ms |");
    println!("|---|---|---|---|---|---|---|");
    let idle: &[&str] = &["--guest", "ticker", "--cmdline", "hz=20"];
    let busy: &[&str] = &["--guest", "compute", "--cmdline", "rounds=100000000 kib=32768"];
    for (name, guest) in [("idle (ticker hz=20)", idle), ("busy (compute, 32 MiB working set)", busy)] {
        for mem in [64u64, 512] {
            let joins: Vec<Join> = (0..runs).map(|_| join_once(guest, mem)).collect();
            let m = |f: fn(&Join) -> f64| median(joins.iter().map(f).collect());
            let mib = m(|j| j.mib);
            println!(
                "| {name} | {mem} MiB | {:.0} | {:.1} | {:.3} | {:.0} | {:.1} |",
                m(|j| j.join_ms),
                mib,
                mib / mem as f64,
                m(|j| j.rounds),
                m(|j| j.pause_ms)
            );
        }
    }
    println!();
}

/// redis-benchmark's CSV: test → (rps, p50 ms, p99 ms).
fn redis_benchmark(host: &str, port: u16, clients: u32, pipeline: u32, n: u32) -> Vec<(String, f64, f64, f64)> {
    redis_benchmark_tests(host, port, "set,get,incr", clients, pipeline, n)
}

/// redis-benchmark -t `tests` -c `clients` -P `pipeline` --csv: test → (rps, p50 ms, p99 ms).
fn redis_benchmark_tests(
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
struct RedisVm {
    _lab: Lab,
    procs: Vec<Proc>,
    _arbiter: Option<std::process::Child>,
    vm: String,
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
fn redis_vm_with(with_backup: bool, dir: &Scratch, security: &Security) -> RedisVm {
    let net = "10.87.0";
    let lab = Lab::create("ftbr", net, &[("p", 1), ("b", 2), ("s", 4)], std::process::id()).expect("root for labs");
    lab.add_tap("p", "fttap").unwrap();
    lab.add_tap("b", "fttap").unwrap();
    let vm = format!("{net}.10");
    let cmdline = format!("ip={vm}/24");
    let ns = |h: &str| lab.host(h).map(|h| h.ns.clone()).unwrap_or_default();
    let mut common = vec!["--guest", "redis", "--cmdline", cmdline.as_str(), "--net", "tap:fttap", "--stats"];
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

fn redis_bench(runs: usize) {
    if !ftvmm_tests::lab::is_root() {
        println!("### redis: needs root (network namespaces); skipped\n");
        return;
    }
    let dir = Scratch::new("bench-redis");
    println!("### redis over virtio-net (redis-benchmark -t set,get,incr -n 20000; client on the lab's bridge)\n");
    println!("| setup | clients, pipeline | test | ops/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for (c, p) in [(1u32, 1u32), (8, 16)] {
        let mut alone_rps = Vec::new();
        for with_backup in [false, true] {
            let vm = redis_vm(with_backup, &dir);
            let rows = redis_benchmark(&vm.vm, 6379, c, p, 20_000);
            let setup = if with_backup { "with a backup" } else { "alone" };
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

/// Plaintext, or mutual TLS with the credentials in a directory.
enum Security {
    Plaintext,
    Tls(std::path::PathBuf),
}

impl Security {
    /// Test credentials for the hosts `primary`, `backup` and `storage`,
    /// valid on loopback and at `lab_ips` (the redis lab's addresses).
    fn tls(dir: &Scratch, lab_ips: [&str; 3]) -> Security {
        let ca = credentials::issue::Authority::new("ftbench CA").expect("CA");
        ca.save(&dir.0).expect("save the CA");
        for (name, ip) in ["primary", "backup", "storage"].into_iter().zip(lab_ips) {
            let sans = [name, ip, "127.0.0.1", "localhost"].map(String::from);
            ca.issue(&dir.0, name, &sans).expect("issue");
        }
        Security::Tls(dir.0.clone())
    }

    /// The ftvmm/ftdisk flags of host `name`.
    fn flags(&self, name: &str) -> Vec<String> {
        match self {
            Security::Plaintext => Vec::new(),
            Security::Tls(dir) => {
                let file = |f: String| dir.join(f).display().to_string();
                vec![
                    "--tls-cert".into(),
                    file(format!("{name}.pem")),
                    "--tls-key".into(),
                    file(format!("{name}.key")),
                    "--tls-ca".into(),
                    file("ca.pem".into()),
                ]
            }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Security::Plaintext => "plaintext",
            Security::Tls(_) => "TLS",
        }
    }
}

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

fn tls_cost(runs: usize) {
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

/// A process's resident set in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// A primary and its backup, started on loopback with `args`.
fn soak_pair(args: &[&str]) -> (Proc, Proc, String) {
    let mut pargs = vec!["--primary", "--listen", "127.0.0.1:0", "--serial", "tcp:127.0.0.1:0"];
    pargs.extend_from_slice(args);
    let p = Proc::spawn(&pargs);
    let addr = p.wait_addr("waiting for a backup on", Duration::from_secs(30));
    let console = p.wait_addr("serial console on", Duration::from_secs(30));
    let mut bargs = vec!["--backup", "--connect", addr.as_str(), "--serial", "tcp:127.0.0.1:0"];
    bargs.extend_from_slice(args);
    let b = Proc::spawn(&bargs);
    p.wait_line("backup attached", Duration::from_secs(30));
    (p, b, console)
}

fn soak(minutes: u64, load: bool) {
    let dir = Scratch::new("soak");
    let image = dir.path("kv.img");
    qemu_img(&image, 64 << 20);
    let (mut server, addr) = spawn_ftdisk(&image, "127.0.0.1:0");
    let disk = format!("ftdisk:{addr}");
    let ticker = ["--guest", "ticker", "--cmdline", "hz=1000"];
    let (t1p, t1b, _) = soak_pair(&ticker);
    let (t2p, t2b, t2console) = soak_pair(&ticker);
    let (kvp, kvb, kvconsole) = soak_pair(&["--guest", "kvstore", "--disk", &disk]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A client reading the second ticker's console, and a steady kvstore load.
    let reader_stop = stop.clone();
    let reader = std::thread::spawn(move || {
        let Ok(stream) = TcpStream::connect(&t2console) else { return 0u64 };
        let mut lines = 0u64;
        for line in BufReader::new(stream).lines() {
            if line.is_err() || reader_stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            lines += 1;
        }
        lines
    });
    let kv_stop = stop.clone();
    let kv = std::thread::spawn(move || {
        let mut conn = kv_connect(&kvconsole);
        let mut ops = 0u64;
        while !kv_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let key = ops % 500;
            let op = if ops.is_multiple_of(2) { format!("set k{key} v{ops}") } else { format!("get k{key}") };
            let (_, _) = kv_session(&mut conn, &[op]);
            ops += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        ops
    });
    let mut hogs = Vec::new();
    if load {
        for _ in 0..2 {
            hogs.push(std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh"));
        }
        // Memory pressure: 4 GiB held and touched over and over.
        hogs.push(
            std::process::Command::new("python3")
                .args(["-c", "import time\nb=bytearray(4<<30)\nwhile True:\n  for i in range(0,len(b),4096): b[i]=(b[i]+1)%256\n  time.sleep(1)"])
                .spawn()
                .expect("python3 for memory pressure"),
        );
    }
    let procs: [(&str, &Proc); 6] = [
        ("ticker primary (no client)", &t1p),
        ("ticker backup (no client)", &t1b),
        ("ticker primary (client)", &t2p),
        ("ticker backup (client)", &t2b),
        ("kvstore primary", &kvp),
        ("kvstore backup", &kvb),
    ];
    println!(
        "### Soak: RSS in MiB each minute ({minutes} min{})\n",
        if load { ", both cores saturated, 4 GiB of memory pressure" } else { "" }
    );
    let names: Vec<&str> = procs.iter().map(|(n, _)| *n).chain(["ftdisk"]).collect();
    println!("| minute | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    let ftdisk_pid = server.id();
    let mut first = Vec::new();
    let mut last = Vec::new();
    for minute in 0..=minutes {
        if minute > 0 {
            std::thread::sleep(Duration::from_secs(60));
        }
        let rss: Vec<u64> = procs.iter().map(|(_, p)| rss_kib(p.child.id())).chain([rss_kib(ftdisk_pid)]).collect();
        println!(
            "| {minute} | {} |",
            rss.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect::<Vec<_>>().join(" | ")
        );
        if minute == 1 {
            first = rss.clone();
        }
        last = rss;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for mut h in hogs {
        let _ = h.kill();
        let _ = h.wait();
    }
    // False failovers: a go-live or a lost backup while both sides ran.
    let false_failovers: usize = procs
        .iter()
        .map(|(_, p)| p.stderr().iter().filter(|l| l.contains("going live") || l.contains("backup lost")).count())
        .sum();
    let alive = procs.iter().all(|(_, p)| p.stderr().iter().all(|l| !l.contains("error")));
    for (name, p) in &procs {
        for l in p.stderr().iter().filter(|l| l.contains("going live") || l.contains("lost") || l.contains("error")) {
            println!("{name}: {l}");
        }
    }
    println!();
    if first.len() == last.len() && minutes > 1 {
        let growth: Vec<String> = first
            .iter()
            .zip(&last)
            .map(|(a, b)| format!("{:+.0}", (*b as f64 - *a as f64) / (minutes - 1) as f64))
            .collect();
        println!("RSS growth from minute 1 to {minutes}, KiB per minute: {}", growth.join(", "));
    }
    println!(
        "False failovers (go-lives or lost backups while both sides ran): {false_failovers}; all VMMs still running without error: {alive}"
    );
    let _ = server.kill();
    let _ = reader.join();
    let _ = kv.join();
    println!();
}

/// The op mix of the disk benchmark (blkstress's keys). Flushes are rare:
/// each prints a `durable K` line, and the UART's byte-per-exit console
/// would otherwise be what is measured.
const DISK_MIX: &str = "write=75 read=24 flush=1";
/// Ops per blkstress run.
const DISK_OPS: u64 = 4000;

/// blkstress's own figures from its `done` line: (IOPS, KiB/s).
fn blkstress_rate(stdout: &str) -> Option<(f64, f64)> {
    let line = stdout.lines().find(|l| l.starts_with("blkstress: done"))?;
    let iops = line.split(": ").nth(2)?.split(' ').next()?.parse().ok()?;
    let kib = line.rsplit(", ").next()?.split(' ').next()?.parse().ok()?;
    Some((iops, kib))
}

/// Where a disk benchmark run keeps its data.
#[derive(Clone, Copy, PartialEq)]
enum DiskAt {
    LocalImage,
    Ftdisk,
}

/// One blkstress run of `params` on a fresh image (blkstress's model starts
/// from zeros), local or served by ftdisk, alone or with a backup.
fn blkstress_once(params: &str, at: DiskAt, with_backup: bool) -> (f64, f64) {
    let dir = Scratch::new("bench-disk-run");
    let image = dir.path("disk.img");
    qemu_img(&image, 64 << 20);
    let mut server = None;
    let disk = match at {
        DiskAt::LocalImage => image.clone(),
        DiskAt::Ftdisk => {
            let (child, served) = spawn_ftdisk(&image, "127.0.0.1:0");
            server = Some(child);
            format!("ftdisk:{served}")
        }
    };
    let guest = ["--guest", "blkstress", "--cmdline", params, "--disk", &disk];
    let r = if with_backup {
        let p = Proc::spawn(&[&["--primary", "--listen", "127.0.0.1:0"][..], &guest[..]].concat());
        let addr = p.wait_addr("waiting for a backup on", Duration::from_secs(30));
        let b = Proc::spawn(&[&["--backup", "--connect", &addr][..], &guest[..]].concat());
        let r = p.finish(TIMEOUT);
        assert_eq!(b.finish(TIMEOUT).status, Some(0), "backup failed");
        r
    } else {
        wait(ftvmm(&guest).spawn().expect("spawn ftvmm"), TIMEOUT)
    };
    if let Some(mut child) = server {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(r.status, Some(0), "blkstress failed: {}{}", r.stdout, r.stderr);
    blkstress_rate(&r.stdout).unwrap_or_else(|| panic!("no blkstress figures in {}", r.stdout))
}

/// The same op mix as blkstress by the host on `path`: (IOPS, KiB/s).
fn host_disk_rate(path: &str, random: bool, ops: u64) -> (f64, f64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open the raw image");
    let blocks = 4096u64;
    let mut block = vec![0x5au8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = 0u64;
    let started = Instant::now();
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = if random { x % blocks } else { (next + 1) % blocks };
        next = at;
        match x % 100 {
            0..=74 => file.write_all_at(&block, at * 4096).expect("pwrite"),
            75..=98 => file.read_exact_at(&mut block, at * 4096).expect("pread"),
            _ => file.sync_data().expect("fdatasync"),
        }
    }
    let s = started.elapsed().as_secs_f64();
    (ops as f64 / s, ops as f64 * 4.0 / s)
}

fn disk_bench(runs: usize) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split(' ').next().unwrap_or("?").to_string();
    println!("## Disk: blkstress, 4 KiB ops ({DISK_MIX}), {DISK_OPS} ops a run, median of {runs} runs, load average {load} at the start\n");
    println!("| pattern, queue depth | alone, local image IOPS (KiB/s) | alone, ftdisk | ftdisk, with a backup | FT ratio | host, raw image |");
    println!("|---|---|---|---|---|---|");
    let dir = Scratch::new("bench-disk");
    let image = dir.path("host.img");
    qemu_img(&image, 64 << 20);
    let med = |v: Vec<(f64, f64)>| {
        let iops = median(v.iter().map(|r| r.0).collect());
        let kib = median(v.iter().map(|r| r.1).collect());
        (iops, kib)
    };
    let show = |r: (f64, f64)| format!("{:.0} ({:.0})", r.0, r.1);
    for (pattern, random) in [("sequential", 0), ("random", 100)] {
        for qd in [1, 32] {
            let params = format!("seed=1 ops={DISK_OPS} qd={qd} random={random} {DISK_MIX}");
            let local = med((0..runs).map(|_| blkstress_once(&params, DiskAt::LocalImage, false)).collect());
            let alone = med((0..runs).map(|_| blkstress_once(&params, DiskAt::Ftdisk, false)).collect());
            let ft = med((0..runs).map(|_| blkstress_once(&params, DiskAt::Ftdisk, true)).collect());
            let host = med((0..runs).map(|_| host_disk_rate(&image, random > 0, DISK_OPS)).collect());
            println!(
                "| {pattern}, {qd} | {} | {} | {} | {:.2} | {} |",
                show(local),
                show(alone),
                show(ft),
                ft.0 / alone.0,
                show(host)
            );
        }
    }
    println!();
}

fn main() {
    require_kvm();
    if std::env::args().nth(1).as_deref() == Some("soak") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        let minutes = args
            .iter()
            .position(|a| a == "--minutes")
            .and_then(|i| args.get(i + 1))
            .and_then(|m| m.parse().ok())
            .unwrap_or(10);
        soak(minutes, args.iter().any(|a| a == "--load"));
        return;
    }
    let mut runs = 5;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--runs", Some(n)) => runs = n.parse().unwrap_or(5).max(1),
            ("--only", Some(s))
                if ["record-replay", "ft", "commit", "sync", "kvstore", "join", "redis", "tls", "disk"]
                    .contains(&s.as_str()) =>
            {
                only = Some(s)
            }
            _ => {
                eprintln!(
                    "usage: ftbench [--runs N] [--only record-replay|ft|commit|sync|kvstore|join|redis|tls|disk]"
                );
                std::process::exit(2);
            }
        }
    }
    let wanted = |s: &str| only.as_deref().is_none_or(|o| o == s);
    if wanted("record-replay") {
        record_replay(runs);
    }
    if wanted("ft") {
        fault_tolerance(runs);
    }
    if wanted("commit") {
        commit_hops(runs);
    }
    if wanted("sync") {
        sync_bench(runs);
    }
    if wanted("kvstore") {
        kvstore_bench(500);
    }
    if wanted("join") {
        reprotection(runs);
    }
    if wanted("redis") {
        redis_bench(runs);
    }
    if wanted("disk") {
        disk_bench(runs);
    }
    // Only when asked for: it repeats the FT runs twice over.
    if only.as_deref() == Some("tls") {
        tls_cost(runs);
    }
}
