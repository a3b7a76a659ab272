//! `--net` usage: a missing, busy or non-TAP device, a bad MAC, and fault
//! tolerance without an arbiter each get one clear line and status 2; a
//! pair whose MACs differ is refused at the handshake.

use ftvmm_tests::lab::Lab;
use ftvmm_tests::{ftvmm_bin, run, Proc, TIMEOUT};
use std::process::Command;
use std::time::Duration;

/// ftvmm inside the lab host's namespace (where its TAP lives).
fn run_in(ns: &str, args: &[&str]) -> ftvmm_tests::Run {
    let bin = ftvmm_bin().display().to_string();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, &bin]).args(args);
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    ftvmm_tests::wait(cmd.spawn().expect("spawn ftvmm"), TIMEOUT)
}

#[test]
fn bad_net_devices_and_flags_are_refused_with_status_2() {
    ftvmm_tests::require_kvm();
    let lab = Lab::create(&format!("nu{}", std::process::id() % 10_000), "10.81.0", &[("h", 1)], std::process::id())
        .expect("this test needs root to make a TAP in a network namespace");
    lab.add_tap("h", "fttap").unwrap();
    let ns = lab.host("h").unwrap().ns.clone();
    run_in(&ns, &["--guest", "hello", "--net", "tap:nosuchtap"]).assert_error(2, "nosuchtap");
    run_in(&ns, &["--guest", "hello", "--net", "tap:lo"]).assert_error(2, "lo");
    run_in(&ns, &["--guest", "hello", "--net", "tap:eth0"]).assert_error(2, "eth0");
    for bad in [
        "tap:fttap,mac=01:00:5e:00:00:01",
        "tap:fttap,mac=52:54:00:zz:00:01",
        "tap:",
        "tun:fttap",
        "tap:fttap,speed=10",
    ] {
        let r = run_in(&ns, &["--guest", "hello", "--net", bad]);
        assert_eq!(r.code(), 2, "--net {bad}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
    // A TAP one VM holds is busy for another.
    let holder = Proc::spawn_in(Some(&ns), &["--guest", "ticker", "--cmdline", "hz=20", "--net", "tap:fttap"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(holder.stderr().iter().all(|l| !l.contains("error")), "{:?}", holder.stderr());
    run_in(&ns, &["--guest", "hello", "--net", "tap:fttap"]).assert_error(2, "busy");
    drop(holder);
    // And free again once it is gone.
    let r = run_in(&ns, &["--guest", "hello", "--net", "tap:fttap"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
}

#[test]
fn fault_tolerance_with_a_nic_needs_an_arbiter() {
    let r = run(&["--primary", "--listen", "127.0.0.1:0", "--guest", "hello", "--net", "tap:x"], TIMEOUT);
    r.assert_error(2, "needs go-live arbitration");
    let r = run(&["--backup", "--connect", "127.0.0.1:9", "--guest", "hello", "--net", "tap:x"], TIMEOUT);
    r.assert_error(2, "needs go-live arbitration");
}

#[test]
fn a_pair_whose_macs_differ_is_refused() {
    ftvmm_tests::require_kvm();
    let lab = Lab::create(
        &format!("nm{}", std::process::id() % 10_000),
        "10.82.0",
        &[("p", 1), ("b", 2)],
        std::process::id(),
    )
    .expect("this test needs root");
    lab.add_tap("p", "fttap").unwrap();
    lab.add_tap("b", "fttap").unwrap();
    let dir = ftvmm_tests::Scratch::new("macs");
    let (_arbiter, addr) = ftvmm_tests::spawn_arbiter(None, &dir.path("record"), "10.82.0.254:0");
    let arb = format!("ftdisk:{addr}");
    let (pns, bns) = (lab.host("p").unwrap().ns.clone(), lab.host("b").unwrap().ns.clone());
    let p = Proc::spawn_in(
        Some(&pns),
        &[
            "--primary",
            "--listen",
            "10.82.0.1:7000",
            "--guest",
            "ticker",
            "--arbiter",
            &arb,
            "--net",
            "tap:fttap,mac=52:54:00:00:00:01",
        ],
    );
    p.wait_line("waiting for a backup", Duration::from_secs(20));
    let b = run_in(
        &bns,
        &[
            "--backup",
            "--connect",
            "10.82.0.1:7000",
            "--guest",
            "ticker",
            "--arbiter",
            &arb,
            "--net",
            "tap:fttap,mac=52:54:00:00:00:02",
        ],
    );
    assert_eq!(b.code(), 2, "{}", b.stderr);
    assert!(b.stderr.contains("net_mac"), "the refusal names the MAC: {}", b.stderr);
}
