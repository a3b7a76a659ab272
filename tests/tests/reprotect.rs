//! Re-protection: a new backup joins a running VM by live state transfer,
//! so the VM survives failure after failure.

use ftvmm_tests::{check_continuity_across, connect_retry, qemu_img, spawn_ftdisk, Proc, Scratch, TickReader};
use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(20);
const JOIN: Duration = Duration::from_secs(30);

/// These tests each keep both cores busy with several VMs: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A backup of the VM at `connect` that accepts backups of its own once live.
fn joining_backup(common: &[&str], connect: &str) -> Proc {
    let mut args = vec!["--backup", "--connect", connect, "--listen", "127.0.0.1:0", "--serial", "tcp:127.0.0.1:0"];
    args.extend_from_slice(common);
    Proc::spawn(&args)
}

/// A primary, then a chain of backups: each kill of the live side makes its
/// backup live, and a new backup joins that one. Returns the consoles in
/// the order they were live; `during` runs while side `i` is live.
fn chain_of_failovers(common: &[&str], failovers: usize, mut during: impl FnMut(usize, &str)) {
    let mut pargs = vec!["--primary", "--listen", "127.0.0.1:0", "--serial", "tcp:127.0.0.1:0"];
    pargs.extend_from_slice(common);
    let mut live = Proc::spawn(&pargs);
    let mut log_addr = live.wait_addr("waiting for a backup on", START);
    let mut console = live.wait_addr("serial console on", START);
    let mut backup = joining_backup(common, &log_addr);
    live.wait_line("backup attached", START);
    let mut graveyard = Vec::new();
    for i in 0..=failovers {
        during(i, &console);
        if i == failovers {
            break;
        }
        live.kill();
        backup.wait_line("going live", Duration::from_secs(5));
        log_addr = backup.wait_addr("live: accepting a backup on", START);
        console = backup.wait_addr("serial console on", START);
        graveyard.push(std::mem::replace(&mut live, backup));
        backup = joining_backup(common, &log_addr);
        // From here on the new live side's outputs wait for the new backup.
        live.wait_line("backup joined at exit", JOIN);
        backup.wait_line("restored at exit", JOIN);
    }
}

/// The ticks a console reader has seen so far.
type SharedTicks = Arc<Mutex<Vec<(u64, String)>>>;

#[test]
fn three_failovers_in_a_row_lose_no_tick() {
    let _serial = one_at_a_time();
    let common = ["--guest", "ticker", "--cmdline", "hz=50", "--heartbeat-ms", "150"];
    // Each live side's console is read to its end, the kill included: what
    // a side's TCP delivered to the client before it died counts as
    // released, so a reader that stopped early would drop ticks the next
    // side rightly does not repeat.
    let mut sides: Vec<(SharedTicks, std::thread::JoinHandle<()>)> = Vec::new();
    chain_of_failovers(&common, 3, |i, console| {
        let stream = connect_retry(console);
        let start = sides.last().and_then(|(lines, _)| lines.lock().unwrap().last().map(|l| l.0)).unwrap_or(0);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let into = lines.clone();
        let reader = std::thread::spawn(move || {
            let mut reader = TickReader { lines: Vec::new() };
            reader.read_from(stream, |seen| {
                *into.lock().unwrap() = seen.to_vec();
                false
            });
        });
        // On each live side: past the previous one's last tick, and 15 more.
        let deadline = Instant::now() + Duration::from_secs(30);
        while lines.lock().unwrap().last().is_none_or(|l| l.0 < start + 15) {
            assert!(Instant::now() < deadline, "side {i}: no tick past {} within 30 s", start + 15);
            std::thread::sleep(Duration::from_millis(5));
        }
        sides.push((lines, reader));
    });
    // Every side is dead now (the last one dropped with the chain): each
    // reader has reached its console's end.
    let mut all = Vec::new();
    for (i, (lines, reader)) in sides.into_iter().enumerate() {
        reader.join().unwrap();
        let lines = lines.lock().unwrap().clone();
        eprintln!("side {i}: ticks {:?} to {:?}", lines.first().map(|l| l.0), lines.last().map(|l| l.0));
        all.extend(lines);
    }
    if let Err(e) = check_continuity_across(3, &all) {
        panic!("{e}; ticks seen: {:?}", all.iter().map(|l| l.0).collect::<Vec<_>>());
    }
}

#[test]
fn three_failovers_in_a_row_lose_no_acknowledged_set_on_the_shared_disk() {
    let _serial = one_at_a_time();
    let dir = Scratch::new("reprotect-kv");
    let image = dir.path("disk.img");
    qemu_img(&image, 8 << 20);
    let (mut ftdisk, addr) = spawn_ftdisk(&image, "127.0.0.1:0");
    let disk = format!("ftdisk:{addr}");
    let common = ["--guest", "kvstore", "--disk", &disk, "--heartbeat-ms", "150"];
    let mut acked: Vec<(String, String)> = Vec::new();
    chain_of_failovers(&common, 3, |i, console| {
        let stream = connect_retry(console);
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut lines = BufReader::new(stream).lines();
        // A new live side first re-emits replies the old one may not have
        // delivered: skip them, up to the answer to a key never set.
        writeln!(w, "get never-set-{i}").unwrap();
        while lines.next().expect("a reply").expect("a line") != "NOTFOUND" {}
        for j in 0..20 {
            let (k, v) = (format!("k{i}x{j}"), format!("v{i}x{j}"));
            writeln!(w, "set {k} {v}").unwrap();
            let line = lines.next().expect("a reply").expect("a line");
            assert_eq!(line, "OK", "set {k}");
            acked.push((k, v));
        }
        if i < 3 {
            return;
        }
        // Every acknowledged set reads back from the last live side.
        for (k, v) in &acked {
            writeln!(w, "get {k}").unwrap();
            let line = lines.next().expect("a reply").expect("a line");
            assert_eq!(line, format!("VALUE {v}"), "acknowledged set {k} lost across the failovers");
        }
    });
    assert_eq!(acked.len(), 80);
    let _ = ftdisk.kill();
}

fn digest(run: &ftvmm_tests::Run) -> String {
    run.digest().unwrap_or_else(|| panic!("no digest:\n{}", run.stderr))
}

#[test]
fn a_backup_that_joins_mid_run_ends_in_the_primarys_state() {
    let _serial = one_at_a_time();
    for (guest, cmdline) in [("timer", "ticks=5000"), ("compute", "rounds=4000 kib=1024")] {
        let common = ["--guest", guest, "--cmdline", cmdline, "--digest"];
        let mut pargs = vec!["--primary", "--no-wait", "--listen", "127.0.0.1:0"];
        pargs.extend_from_slice(&common);
        let p = Proc::spawn(&pargs);
        let addr = p.wait_addr("backups may join on", START);
        std::thread::sleep(Duration::from_millis(300));
        let mut bargs = vec!["--backup", "--connect", addr.as_str()];
        bargs.extend_from_slice(&common);
        let b = Proc::spawn(&bargs);
        p.wait_line("backup joined at exit", JOIN);
        let (p, b) = (p.finish(JOIN), b.finish(JOIN));
        assert_eq!(p.code(), 0, "{}", p.stderr);
        assert_eq!(b.code(), 0, "{}", b.stderr);
        assert_eq!(digest(&p), digest(&b), "{guest}: the joined backup ends in the primary's state");
        assert!(b.stderr.contains("restored at exit"), "{}", b.stderr);
    }
}

#[test]
fn joining_a_guest_that_dirties_memory_fast_converges() {
    let _serial = one_at_a_time();
    // compute hashes a 16 MiB buffer over and over: every round finds
    // pages dirty again; the rounds are bounded, then stop-and-copy.
    let common = ["--guest", "compute", "--cmdline", "rounds=300 kib=16384", "--digest"];
    let mut pargs = vec!["--primary", "--no-wait", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(&common);
    let p = Proc::spawn(&pargs);
    let addr = p.wait_addr("backups may join on", START);
    std::thread::sleep(Duration::from_millis(500));
    let mut bargs = vec!["--backup", "--connect", addr.as_str()];
    bargs.extend_from_slice(&common);
    let b = Proc::spawn(&bargs);
    let joined = p.wait_line("backup joined at exit", Duration::from_secs(60));
    eprintln!("{joined}");
    let (p, b) = (p.finish(Duration::from_secs(120)), b.finish(Duration::from_secs(120)));
    assert_eq!(digest(&p), digest(&b));
}

#[test]
fn a_backup_killed_mid_transfer_leaves_the_primary_unharmed_and_accepting() {
    let _serial = one_at_a_time();
    // A large guest memory full of data makes the transfer last.
    let common = ["--guest", "compute", "--cmdline", "rounds=2000 kib=65536", "--mem-mib", "256", "--digest"];
    let mut pargs = vec!["--primary", "--no-wait", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(&common);
    let p = Proc::spawn(&pargs);
    let addr = p.wait_addr("backups may join on", START);
    std::thread::sleep(Duration::from_millis(1500));
    let mut bargs = vec!["--backup", "--connect", addr.as_str()];
    bargs.extend_from_slice(&common);
    let mut doomed = Proc::spawn(&bargs);
    p.wait_line("a backup joins at exit", JOIN);
    std::thread::sleep(Duration::from_millis(20));
    doomed.kill();
    // Either the transfer was cut short, or it had completed and the
    // backup is then lost: the primary runs on alone and accepts the next.
    let lost = p.wait_line("running alone", JOIN);
    eprintln!("{lost}");
    let b = Proc::spawn(&bargs);
    let joined = p.wait_line("protected", JOIN);
    eprintln!("{joined}");
    let (p, b) = (p.finish(Duration::from_secs(180)), b.finish(Duration::from_secs(180)));
    assert_eq!(p.code(), 0, "{}", p.stderr);
    assert_eq!(digest(&p), digest(&b));
}

#[test]
fn a_joining_backup_of_another_vm_is_refused_and_the_primary_keeps_accepting() {
    let _serial = one_at_a_time();
    let p = Proc::spawn(&[
        "--primary",
        "--no-wait",
        "--listen",
        "127.0.0.1:0",
        "--guest",
        "timer",
        "--cmdline",
        "ticks=6000",
        "--digest",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let addr = p.wait_addr("backups may join on", START);
    let metrics = ftvmm_tests::metrics_addr(&p);
    let wrong = ftvmm_tests::run(
        &["--backup", "--connect", &addr, "--guest", "timer", "--cmdline", "ticks=1499"],
        Duration::from_secs(30),
    );
    wrong.assert_error(2, "configuration");
    // The operator sees the refusal: counted, and the reason the VM still
    // needs a secondary.
    ftvmm_tests::wait_metric(&metrics, "ftvmm_backups_refused_total", JOIN, |v| v == 1.0);
    ftvmm_tests::wait_metric(&metrics, r#"ftvmm_ft_state_reason{reason="backup_refused"}"#, JOIN, |v| v == 1.0);
    assert_eq!(ftvmm_tests::metric(&ftvmm_tests::scrape(&metrics), "ftvmm_protected"), Some(0.0));
    let b = Proc::spawn(&["--backup", "--connect", &addr, "--guest", "timer", "--cmdline", "ticks=6000", "--digest"]);
    p.wait_line("backup joined at exit", JOIN);
    // Joined: counted, protected, and the state transfer's bytes counted.
    ftvmm_tests::wait_metric(&metrics, "ftvmm_joins_total", JOIN, |v| v == 1.0);
    ftvmm_tests::wait_metric(&metrics, r#"ftvmm_ft_state{state="protected"}"#, JOIN, |v| v == 1.0);
    ftvmm_tests::wait_metric(&metrics, "ftvmm_state_transfer_sent_bytes_total", JOIN, |v| v > 0.0);
    let (p, b) = (p.finish(JOIN), b.finish(JOIN));
    assert_eq!(digest(&p), digest(&b));
}
