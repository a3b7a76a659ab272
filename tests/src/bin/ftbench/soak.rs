//! `ftbench soak`: memory over time and false failovers of FT pairs left
//! running for minutes, optionally under CPU and memory pressure.

use crate::common::{kv_connect, kv_session};
use ftvmm_tests::{qemu_img, spawn_ftdisk, Proc, Scratch};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::Duration;

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

pub(crate) fn soak(minutes: u64, load: bool) {
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
