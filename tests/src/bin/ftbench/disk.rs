//! `--only disk`: blkstress's IOPS and bandwidth on a local image, on
//! ftdisk and on ftdisk with a backup, and the same op mix by the host on a
//! raw image.

use crate::common::{median, TIMEOUT};
use ftvmm_tests::{ftvmm, qemu_img, spawn_ftdisk, wait, Proc, Scratch};
use std::time::{Duration, Instant};

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

pub(crate) fn disk_bench(runs: usize) {
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
