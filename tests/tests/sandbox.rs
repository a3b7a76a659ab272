//! The seccomp filters: on by default, one on every thread of a primary
//! and a backup, and a call outside a thread's list ends the process with
//! a line naming the thread and the call (docs/sandbox.md). The rest of
//! the suite runs with the filters on, so it covers what the lists allow.

use ftvmm_tests::{ftvmm, qemu_img, wait, Proc, Run, Scratch};
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(30);
/// What a process the filter stopped ends with: 128 + SIGSYS.
const SIGSYS_STATUS: i32 = 159;

/// Runs `ftvmm args` with the testing hook making one forbidden call
/// (chroot) on the threads of `kind`.
fn selftest(kind: &str, args: &[&str]) -> Run {
    ftvmm_tests::require_kvm();
    let child = ftvmm(args).env("FTVMM_SECCOMP_SELFTEST", kind).spawn().expect("spawn ftvmm");
    wait(child, START)
}

fn assert_killed(r: &Run, kind: &str) {
    assert_eq!(r.status, Some(SIGSYS_STATUS), "the {kind} thread's forbidden call did not stop ftvmm:\n{}", r.stderr);
    let want = format!("ftvmm: seccomp: the {kind} thread made a forbidden system call: chroot (161)");
    assert!(r.stderr.contains(&want), "no {want:?} in:\n{}", r.stderr);
    assert!(r.stderr.contains("run with --no-seccomp to debug"), "{}", r.stderr);
}

#[test]
fn a_forbidden_call_kills_the_process_and_names_the_thread_and_the_call() {
    // The vCPU thread's filter goes on after set-up: the guest never runs.
    let r = selftest("vcpu", &["--guest", "hello"]);
    assert_killed(&r, "vcpu");
    assert!(!r.stdout.contains("hello from"), "the guest ran: {}", r.stdout);
    // The kicker starts with the run; the console and the metrics server
    // at set-up. The ticker runs until stopped: a thread that did not make
    // its call would leave it running, and the run time out.
    let ticker = ["--guest", "ticker", "--cmdline", "hz=50"];
    for (kind, extra) in [
        ("kicker", &[][..]),
        ("console", &["--serial", "tcp:127.0.0.1:0"][..]),
        ("metrics", &["--metrics", "127.0.0.1:0"][..]),
    ] {
        assert_killed(&selftest(kind, &[&ticker[..], extra].concat()), kind);
    }
}

#[test]
fn a_primarys_disk_writer_and_joiner_are_confined_too() {
    let dir = Scratch::new("seccomp-primary");
    let image = dir.path("disk.img");
    qemu_img(&image, 1 << 20);
    for kind in ["disk-writer", "joiner"] {
        let args = [
            "--primary",
            "--no-wait",
            "--listen",
            "127.0.0.1:0",
            "--guest",
            "ticker",
            "--cmdline",
            "hz=50",
            "--disk",
            image.as_str(),
        ];
        assert_killed(&selftest(kind, &args), kind);
    }
}

#[test]
fn the_logging_channels_threads_are_confined() {
    let mut p = Proc::spawn(&["--primary", "--listen", "127.0.0.1:0", "--guest", "timer", "--cmdline", "ticks=2000"]);
    let listen = p.wait_addr("waiting for a backup on", START);
    let b = ftvmm(&["--backup", "--connect", listen.as_str(), "--guest", "timer", "--cmdline", "ticks=2000"])
        .env("FTVMM_SECCOMP_SELFTEST", "logging-channel")
        .spawn()
        .expect("spawn the backup");
    assert_killed(&wait(b, START), "logging-channel");
    p.kill();
}

#[test]
fn without_filters_the_same_call_is_harmless() {
    for (kind, extra) in [("vcpu", None), ("metrics", Some("--metrics"))] {
        let mut args = vec!["--guest", "hello", "--no-seccomp"];
        if let Some(flag) = extra {
            args.extend([flag, "127.0.0.1:0"]);
        }
        let r = selftest(kind, &args);
        assert_eq!(r.code(), 0, "{}", r.stderr);
        assert!(r.stdout.contains("hello from ftvmm guest"), "{}", r.stdout);
        assert!(!r.stderr.contains("seccomp"), "{}", r.stderr);
    }
}

#[test]
fn an_unknown_selftest_kind_is_a_usage_error() {
    selftest("no-such-kind", &["--guest", "hello"]).assert_error(2, "FTVMM_SECCOMP_SELFTEST");
}

/// The `Seccomp:` mode of each thread of `p`: 2 is a filter.
fn unfiltered_threads(p: &Proc) -> (usize, Vec<String>) {
    let pid = p.child.id();
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let bad = tids
        .iter()
        .filter_map(|tid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
            let mode = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(str::trim).unwrap_or("?");
            (mode != "2").then(|| format!("thread {tid} ({}): Seccomp {mode}", comm.trim()))
        })
        .collect();
    (tids.len(), bad)
}

fn assert_all_filtered(p: &Proc, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (threads, bad) = unfiltered_threads(p);
        if threads > 1 && bad.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: threads without a filter: {bad:?}\n{:?}", p.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_thread_of_a_pair_has_a_filter() {
    let dir = Scratch::new("seccomp-pair");
    let image = dir.path("disk.img");
    qemu_img(&image, 4 << 20);
    let (_ftdisk, addr) = ftvmm_tests::spawn_ftdisk(&image, "127.0.0.1:0");
    let disk = format!("ftdisk:{addr}");
    let common = [
        "--guest",
        "ticker",
        "--cmdline",
        "hz=50",
        "--disk",
        disk.as_str(),
        "--serial",
        "tcp:127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut pargs = vec!["--primary", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(&common);
    let mut p = Proc::spawn(&pargs);
    let listen = p.wait_addr("waiting for a backup on", START);
    let mut bargs = vec!["--backup", "--connect", listen.as_str()];
    bargs.extend_from_slice(&common);
    let mut b = Proc::spawn(&bargs);
    p.wait_line("backup attached", START);
    assert_all_filtered(&p, "the primary");
    assert_all_filtered(&b, "the backup");
    // A console client and a scrape, served by filtered threads.
    let console = p.wait_addr("serial console on", START);
    let _client = ftvmm_tests::connect_retry(&console);
    let text = ftvmm_tests::scrape(&ftvmm_tests::metrics_addr(&p));
    assert!(text.contains("ftvmm_"), "{text}");
    std::thread::sleep(Duration::from_millis(500));
    assert_all_filtered(&p, "the primary serving a console client");
    assert!(p.child.try_wait().ok().flatten().is_none(), "the primary died: {:?}", p.stderr());
    assert!(b.child.try_wait().ok().flatten().is_none(), "the backup died: {:?}", b.stderr());
    p.kill();
    b.wait_line("going live", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(b.child.try_wait().ok().flatten().is_none(), "the live former backup died: {:?}", b.stderr());
    assert_all_filtered(&b, "the live former backup");
    b.kill();
}
