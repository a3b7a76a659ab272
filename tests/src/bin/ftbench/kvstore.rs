//! `--only kvstore`: set and get throughput and latency through kvstore's
//! TCP console, alone and with a backup, the disk on ftdisk.

use crate::common::{kv_connect, kv_session};
use ftvmm_tests::{qemu_img, spawn_ftdisk, Proc, Scratch};
use std::time::Duration;

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q).round() as usize]
}

pub(crate) fn kvstore_bench(n: usize) {
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
