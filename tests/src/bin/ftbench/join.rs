//! `--only join`: re-protection, a backup joining a running primary by live
//! state transfer, for idle and busy guests of two memory sizes.

use crate::common::median;
use ftvmm_tests::Proc;
use std::time::Duration;

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

pub(crate) fn reprotection(runs: usize) {
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
