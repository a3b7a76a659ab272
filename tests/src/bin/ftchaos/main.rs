//! ftchaos: ftvmm's fault-injection harness.
//!
//! `ftchaos --scenarios N [--seed S] [--guest kvstore|redis] [--minutes M]
//! [--quiesce-joins] [--verbose] [--transcripts DIR]`
//!
//! Each scenario (scenario `i` of a run uses seed `S + i`; rerun one with
//! `--seed S+i --scenarios 1`) starts an `ftdisk` on a fresh image, a
//! primary and a backup (`--heartbeat-ms` 100 to 150, the disk on the
//! ftdisk, every side with `--listen` so that it accepts backups of its own
//! once live), and a client that writes and reads throughout. A quarter of
//! the scenarios run on slow storage throughout (every chunk to and from the
//! ftdisk delayed 1 to 3 ms, see `slow-storage`). Then 1 to 3 random
//! faults:
//!
//! - `kill-primary`, `kill-backup`: SIGKILL of the live side (only while it
//!   has a backup in lockstep) or of its backup;
//! - `freeze-primary`, `freeze-backup`: SIGSTOP for up to 1.5 s (about a
//!   third of the time shorter than the heartbeat timeout), then SIGCONT;
//! - `cut-logging`: the logging channel runs through a proxy; cut, it holds
//!   every byte (and every close) in both directions for up to 1.5 s, as a
//!   partition does, then lets them through or resets the connections;
//! - `restart-ftdisk`: SIGKILL of the storage server, then, 0 to 1.5 s
//!   later, a new one on the same image and address;
//! - `cut-storage`: each side reaches the ftdisk through a proxy of its
//!   own; one side's is cut for 0.1 to 3 s;
//! - `slow-storage`: for 1 to 4 s, every side's storage proxy delays each
//!   chunk, in either direction, by 1 to 5 ms more (chosen per fault), as
//!   a loaded SAN answers: a primary's released writes pile up unapplied;
//! - `cut-link` (redis only): a VM host's link to the LAN is cut for up to
//!   1.5 s (its logging channel, storage and the VM's network at once);
//! - `kill-after-join`: not drawn with the others but instead of half the
//!   re-protections a fault may still follow: a new backup joins the live
//!   side (three times in four under a `slow-storage` started 0.1 to 0.6 s
//!   before, if the scenario's storage is not slow throughout), and the
//!   live side is SIGKILLed as soon as the joiner prints `restored at
//!   exit` or the live side `backup joined at exit` (the side's stderr
//!   reader sends the signal itself; at once, or 1 to 30 ms later), while
//!   the writes it released are still in flight; half the time its host
//!   dies with it (its storage proxy drops the bytes it holds from it
//!   instead of passing them on). The joined backup must go live with the
//!   unapplied writes it was handed and re-issue them. (A join cut short
//!   before either line disarms it; it is counted only if the kill
//!   happened.)
//!
//! Timed faults may overlap (a kill only overlaps storage faults, so that
//! one copy of the VM always survives). After each fault the scenario
//! settles (one live side, every other side either gone or a backup of it
//! in lockstep, the client served); when a side is gone, a new backup joins
//! the survivor by live state transfer (re-protection) in most scenarios.
//! A join whose state transfer a heartbeat timeout cuts short (a loaded
//! host) is counted, not reported.
//!
//! `--guest kvstore` (loopback): the client holds one connection to every
//! side's serial console from the side's start (a backup's console accepts
//! it once it goes live) and sends commands to the side serving it, one at
//! a time: `set kI kI-vJ` with J increasing per key, and `get kI`. A reply
//! that does not come within 800 ms starts a failover: the client sends a
//! probe to every side still connected, `get pN` of one of 400 probe keys
//! written into the image before boot (`pN` = `pvN`, so the answer `VALUE
//! pvN` names the probe), and the first side that answers serves it from
//! then on; what a new live side prints before it answers the probe (the
//! replies its predecessor may not have released — possibly the end of a
//! line whose start the old console printed) is skipped. At the end it
//! reads every key and sends `quit` (kvstore ends with status 0); then the
//! harness boots a fresh VM on the disk and reads the keys again.
//!
//! `--guest redis` (root): a lab of six network-namespace hosts, each with
//! a TAP bridged onto the LAN; the VM is 10.91.0.10 and moves with the live
//! side; ftdisk, the proxies and the client run in the root namespace on
//! the LAN's bridge. The client holds ONE TCP connection to the VM for the
//! whole scenario and sends `SET kI kI-vJ`, `GET kI` and `INCR counter`; at
//! the end it reads every key and sends `SHUTDOWN` (the VM ends with status
//! 0), and a fresh VM on the last live side's host reads the disk.
//!
//! `--quiesce-joins` (for humans; CI runs without it): the client sends
//! nothing while a backup joins, to tell a join bug that needs input in
//! flight from one that does not. (It was the workaround for a kvstore
//! backup that joined while serial input was pending in the UART and then
//! diverged — `Serial::from_state` re-triggered the pending interrupt on
//! top of the restored PIC's — until `Devices::restore` was fixed; without
//! the flag, every join happens under load. With it, a kill-after-join
//! still finds the writes the client sent before the pause unapplied when
//! the storage is slow.)
//!
//! Checks (each violation is printed with the scenario's seed and its
//! transcript, and counted):
//!
//! - acknowledged writes: a read reflects every write sent before it whose
//!   acknowledgement the client saw (for kvstore, whichever side sent the
//!   `OK`), i.e. it reads a version at least as new; the fresh VM on the
//!   disk reads what the final reads read; and when the VM was lost (every
//!   side gone before the end), a fresh VM on the disk still reads, for
//!   each key, a version at least the newest acknowledged (and at most the
//!   newest sent);
//! - reads never go backwards: in the order the replies arrive, a key's
//!   version never decreases; and no read returns a version not yet sent;
//!   (redis) the INCR values are consecutive and the connection never
//!   breaks;
//! - at most one side answers at a time: no generation of the go-live
//!   arbitration is won by two sides (the ftdisk's log of won test-and-sets,
//!   with its timestamps and the winner's pid, completed by the winners'
//!   own "won" lines: an ftdisk killed between persisting a win and logging
//!   it leaves no line, and the winner's retry on the next ftdisk
//!   recognises its own win); (kvstore) every reply comes
//!   from a side that had won the arbitration, no side answers a command
//!   sent after another side won a newer generation (a stale side holds its
//!   output for acks that never come, then halts), and a console that
//!   answered a probe prints nothing but answers to its own commands, in
//!   order;
//! - endings: after the `quit`/`SHUTDOWN`, the live side and its backup (if
//!   one is in lockstep) end with status 0 and equal state digests; every
//!   other side was killed by the harness or halted with status 5 (it lost
//!   the go-live arbitration, or its writes were fenced); any other status
//!   (3: a divergence, 2, 4...), a side still running 15 s after the VM
//!   quit, a scenario that does not settle within 30 s or a client left
//!   without service are violations too;
//! - joins: a live side killed after it printed `backup joined at exit`
//!   (kill-after-join) leaves a backup that goes live; its state transfer
//!   cut short is a `join-lost` violation (before that line, it is the
//!   double fault a join cut short by a heartbeat timeout is).
//!
//! It prints a line per scenario and a summary — scenarios, faults injected
//! by kind (`faults injected: N (kill-primary 2, slow-storage 1, ...)`),
//! scenarios on slow storage throughout, acknowledged writes, go-lives,
//! re-protections, violations by kind — and exits with status 1 if there
//! was any violation.

mod clients;
mod faults;
mod ftdisk;
mod lab;
mod proxy;
mod scenario;
mod sides;
mod transcript;

use clap::Parser;
use faults::Fault;
use ftvmm_tests::{ftdisk_bin, ftvmm_bin, require_kvm};
use lab::NetLab;
use scenario::run_scenario;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "ftvmm's fault-injection harness: random faults against an FT pair, safety checks")]
struct Args {
    /// How many scenarios to run.
    #[arg(long, default_value_t = 10)]
    scenarios: u64,
    /// The first scenario's seed (scenario i uses seed + i); random if not given.
    #[arg(long)]
    seed: Option<u64>,
    /// The guest and client: kvstore (over the serial consoles).
    #[arg(long, default_value = "kvstore")]
    guest: String,
    /// Start no new scenario after this many minutes.
    #[arg(long)]
    minutes: Option<f64>,
    /// Where the full transcripts of violating scenarios go (default: a
    /// directory under the system's temp dir).
    #[arg(long)]
    transcripts: Option<PathBuf>,
    /// Print every scenario's transcript, not only the violating ones'.
    #[arg(long)]
    verbose: bool,
    /// The client pauses while a backup joins (no serial input pending at
    /// the join).
    #[arg(long)]
    quiesce_joins: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn main() {
    let args = Args::parse();
    require_kvm();
    let net = match args.guest.as_str() {
        "kvstore" => None,
        "redis" => {
            if !ftvmm_tests::lab::is_root() {
                eprintln!("ftchaos: --guest redis needs root (network-namespace hosts with TAPs)");
                std::process::exit(2);
            }
            match NetLab::create() {
                Ok(n) => Some(Arc::new(n)),
                Err(e) => {
                    eprintln!("ftchaos: cannot make the lab: {e}");
                    std::process::exit(2);
                }
            }
        }
        other => {
            eprintln!("ftchaos: --guest {other}: want kvstore or redis");
            std::process::exit(2);
        }
    };
    let _ = (ftvmm_bin(), ftdisk_bin());
    let base = args.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let dir = args.transcripts.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("ftchaos-{base}")));
    println!(
        "ftchaos: {} scenarios from seed {base} (scenario i: seed {base}+i), guest {}",
        args.scenarios, args.guest
    );
    let started = Instant::now();
    let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ran, mut acked, mut violations, mut switches, mut reprotections, mut bad) = (0u64, 0, 0, 0, 0, Vec::new());
    let (mut aborted_joins, mut failovers, mut slow_throughout) = (0, 0, 0);
    for i in 0..args.scenarios {
        if args.minutes.is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0) {
            println!("ftchaos: --minutes reached; stopping after {ran} scenarios");
            break;
        }
        let seed = base.wrapping_add(i);
        let s0 = Instant::now();
        let (outcome, t) = run_scenario(i, seed, net.clone(), args.quiesce_joins);
        ran += 1;
        acked += outcome.acked;
        switches += outcome.switches;
        failovers += outcome.failovers;
        reprotections += outcome.reprotections;
        aborted_joins += outcome.aborted_joins;
        for f in &outcome.faults {
            *faults.entry(*f).or_default() += 1;
        }
        let names: Vec<&str> = outcome.faults.iter().map(|f| f.name()).collect();
        if outcome.slow_base_ms > 0 {
            slow_throughout += 1;
        }
        println!(
            "scenario {i:3} seed {seed}: {:.1} s, {}faults [{}], {} acknowledged writes, {} go-lives, {} re-protections, {}",
            s0.elapsed().as_secs_f64(),
            if outcome.slow_base_ms > 0 { format!("storage {} ms slow, ", outcome.slow_base_ms) } else { String::new() },
            names.join(", "),
            outcome.acked,
            outcome.failovers,
            outcome.reprotections,
            if outcome.violations.is_empty() { "ok".to_string() } else { format!("{} VIOLATIONS", outcome.violations.len()) }
        );
        for (k, m) in &outcome.violations {
            *by_kind.entry(k.clone()).or_default() += 1;
            println!("  VIOLATION {k} (scenario {i}, seed {seed}): {m}");
        }
        if !outcome.violations.is_empty() || args.verbose {
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("scenario-{i}-seed-{seed}.txt"));
            let _ = std::fs::write(&path, t.full());
            println!("  transcript (condensed; full: {}):", path.display());
            for l in t.condensed().lines() {
                println!("    {l}");
            }
        }
        if !outcome.violations.is_empty() {
            violations += outcome.violations.len();
            bad.push(seed);
        }
    }
    println!();
    println!("ftchaos summary ({:.1} min)", started.elapsed().as_secs_f64() / 60.0);
    println!("  scenarios: {ran}");
    let total: u64 = faults.values().sum();
    let list: Vec<String> = faults.iter().map(|(f, n)| format!("{} {n}", f.name())).collect();
    println!("  faults injected: {total} ({})", list.join(", "));
    println!("  scenarios on slow storage throughout: {slow_throughout}");
    println!("  acknowledged writes: {acked}");
    if args.guest == "kvstore" {
        println!("  backups that went live: {failovers}; the client moved to another console {switches} times");
    } else {
        println!("  backups that went live: {failovers}");
    }
    println!("  re-protections: {reprotections} (and {aborted_joins} joins cut short by a heartbeat timeout)");
    let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "  violations: {violations}{}",
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({}) in scenarios with seeds {bad:?}", kinds.join(", "))
        }
    );
    drop(net);
    std::process::exit(i32::from(violations > 0));
}
