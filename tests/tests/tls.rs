//! Mutual TLS end to end, with credentials made by `ftcert`: a TLS pair on
//! TLS storage is in lockstep and fails over; strangers on the logging
//! channel are refused while the primary waits for its backup; ftdisk
//! refuses a certificate that is not on its allow list and the image stays
//! unchanged; a capture of the logging channel does not show the guest's
//! input; half a configuration is a usage error.

use ftvmm_tests::{
    check_continuity_across, connect_retry, ftcert, qemu_img, spawn_ftdisk_with, tls_flags as tls, Proc, Scratch,
    TickReader,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const START: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = ftvmm_tests::TIMEOUT;

fn args<'a>(fixed: &[&'a str], more: &'a [String]) -> Vec<&'a str> {
    fixed.iter().copied().chain(more.iter().map(String::as_str)).collect()
}

fn digest_of(run: &ftvmm_tests::Run) -> String {
    run.digest().unwrap_or_else(|| panic!("no digest; stderr:\n{}", run.stderr))
}

#[test]
fn a_tls_pair_on_tls_storage_is_in_lockstep_and_fails_over() {
    let dir = Scratch::new("tls-pair");
    ftcert(&dir, &["primary", "backup", "storage"]);
    let allow = ["--tls-allow", "primary", "--tls-allow", "backup"];

    // kvstore on a TLS ftdisk: both sides end in the same state.
    let image = dir.path("kv.img");
    qemu_img(&image, 1 << 20);
    let storage = tls(&dir, "storage");
    let (ftdisk, addr) =
        spawn_ftdisk_with(&args(&[&["--image", &image][..], &allow[..]].concat(), &storage), "127.0.0.1:0");
    let _ftdisk = ftdisk;
    let disk = format!("ftdisk:{addr}");
    let input = dir.path("kv.in");
    std::fs::write(&input, "set a 1\nset b 2\nget a\nquit\n").unwrap();
    let (p_tls, b_tls) = (tls(&dir, "primary"), tls(&dir, "backup"));
    let p = Proc::spawn(&args(
        &[
            "--primary",
            "--guest",
            "kvstore",
            "--listen",
            "127.0.0.1:0",
            "--digest",
            "--disk",
            &disk,
            "--serial-input",
            &input,
        ],
        &p_tls,
    ));
    let log_addr = p.wait_addr("waiting for a backup on", START);
    let b = Proc::spawn(&args(
        &["--backup", "--guest", "kvstore", "--connect", &log_addr, "--digest", "--disk", &disk],
        &b_tls,
    ));
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "primary: {}", p.stderr);
    assert_eq!(b.code(), 0, "backup: {}", b.stderr);
    assert_eq!(digest_of(&p), digest_of(&b), "primary and backup digests differ over TLS");
    assert_eq!(p.stdout, "kvstore: ready (0 records)\nOK\nOK\nVALUE 1\nBYE\n");
    assert!(!p.stderr.contains("plaintext") && !b.stderr.contains("plaintext"), "{}\n{}", p.stderr, b.stderr);

    // ticker arbitrated on a TLS arbiter-only ftdisk: the backup goes live
    // when the primary is killed, and no tick is lost.
    let state = dir.path("arbiter.state");
    let (arbiter, arbiter_addr) = spawn_ftdisk_with(
        &args(&[&["--arbiter-only", "--state", &state][..], &allow[..]].concat(), &storage),
        "127.0.0.1:0",
    );
    let _arbiter = arbiter;
    let arbiter_flag = format!("ftdisk:{arbiter_addr}");
    let common = ["--guest", "ticker", "--cmdline", "hz=50", "--arbiter", &arbiter_flag, "--serial", "tcp:127.0.0.1:0"];
    let mut p = Proc::spawn(&args(&[&["--primary", "--listen", "127.0.0.1:0"][..], &common[..]].concat(), &p_tls));
    let log_addr = p.wait_addr("waiting for a backup on", START);
    let p_console = p.wait_addr("serial console on", START);
    let mut b = Proc::spawn(&args(&[&["--backup", "--connect", &log_addr][..], &common[..]].concat(), &b_tls));
    let b_console = b.wait_addr("serial console on", START);
    p.wait_line("backup attached", START);
    let mut reader = TickReader { lines: Vec::new() };
    reader.read_from(connect_retry(&p_console), |lines| lines.len() >= 15);
    let killed_at = reader.lines.last().map(|l| l.0).unwrap_or(0);
    p.kill();
    b.wait_line("going live", Duration::from_secs(5));
    reader.read_from(connect_retry(&b_console), |lines| lines.last().is_some_and(|l| l.0 >= killed_at + 20));
    if let Err(e) = check_continuity_across(1, &reader.lines) {
        panic!("{e}; ticks: {:?}", reader.lines.iter().map(|l| l.0).collect::<Vec<_>>());
    }
    b.kill();
}

#[test]
fn strangers_are_refused_while_the_primary_waits_for_its_backup() {
    let dir = Scratch::new("tls-strangers");
    ftcert(&dir, &["primary", "backup"]);
    let foreign = Scratch::new("tls-strangers-foreign");
    ftcert(&foreign, &["backup"]);
    let input = dir.path("echo.in");
    std::fs::write(&input, "one\nquit\n").unwrap();
    let p = Proc::spawn(&args(
        &["--primary", "--guest", "echo", "--listen", "127.0.0.1:0", "--digest", "--serial-input", &input],
        &tls(&dir, "primary"),
    ));
    let log_addr = p.wait_addr("waiting for a backup on", START);
    let backup = |more: &[String]| {
        Proc::spawn(&args(&["--backup", "--guest", "echo", "--connect", &log_addr, "--digest"], more)).finish(TIMEOUT)
    };

    // A backup in plaintext, and one with a certificate from another CA.
    let plaintext = backup(&[]);
    assert_ne!(plaintext.code(), 0, "a plaintext backup attached: {}", plaintext.stderr);
    let other_ca = backup(&tls(&foreign, "backup"));
    assert_ne!(other_ca.code(), 0, "a backup from another CA attached: {}", other_ca.stderr);
    assert!(other_ca.stderr.contains("TLS"), "{}", other_ca.stderr);
    // Garbage, and a peer that pretends to start TLS and stops.
    for bytes in [&b"FTVMMLCH\x02\0\0\0"[..], &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2][..], &b"\xff\xfe garbage"[..]] {
        let mut s = TcpStream::connect(&log_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.read_to_end(&mut Vec::new());
    }
    // Each refusal is logged with the peer's address, and the primary waits on.
    std::thread::sleep(Duration::from_millis(300));
    let refusals: Vec<String> =
        p.stderr().into_iter().filter(|l| l.contains("failed the handshake, still waiting")).collect();
    assert!(refusals.len() >= 5, "want 5 refusals logged, got {refusals:?}");
    assert!(refusals.iter().all(|l| l.contains("127.0.0.1:")), "a refusal without the peer's address: {refusals:?}");
    assert!(!p.stderr().iter().any(|l| l.contains("backup attached")));

    // The right backup still attaches, and the pair ends in one state.
    let b =
        Proc::spawn(&args(&["--backup", "--guest", "echo", "--connect", &log_addr, "--digest"], &tls(&dir, "backup")));
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "primary: {}", p.stderr);
    assert_eq!(b.code(), 0, "backup: {}", b.stderr);
    assert_eq!(digest_of(&p), digest_of(&b));
    assert_eq!(p.stdout, "echo: ready\necho: ENO\necho: bye\n");
    assert!(!p.stderr.contains("panicked"), "{}", p.stderr);
}

#[test]
fn ftdisk_refuses_an_unlisted_certificate_and_the_image_is_unchanged() {
    let dir = Scratch::new("tls-unlisted");
    ftcert(&dir, &["storage", "primary", "intruder"]);
    let image = dir.path("kv.img");
    qemu_img(&image, 1 << 20);
    let allow_file = dir.path("allowed");
    std::fs::write(&allow_file, "# who may use the disk\nprimary\n").unwrap();
    let (ftdisk, addr) = spawn_ftdisk_with(
        &args(&["--image", &image, "--tls-allow-file", &allow_file], &tls(&dir, "storage")),
        "127.0.0.1:0",
    );
    let _ftdisk = ftdisk;
    let disk = format!("ftdisk:{addr}");
    let input = dir.path("kv.in");
    std::fs::write(&input, "set secret 42\nquit\n").unwrap();
    let before = std::fs::read(&image).unwrap();
    let owner = dir.path("kv.img.owner");
    let owner_before = std::fs::read(&owner).ok();

    let intruder = ftvmm_tests::run(
        &args(&["--guest", "kvstore", "--disk", &disk, "--serial-input", &input], &tls(&dir, "intruder")),
        TIMEOUT,
    );
    intruder.assert_error(2, "not on its allow list");
    assert!(std::fs::read(&image).unwrap() == before, "the intruder changed the image");
    assert_eq!(std::fs::read(&owner).ok(), owner_before, "the intruder changed the arbitration record");

    // Control: the listed certificate does write the image.
    let allowed = ftvmm_tests::run(
        &args(&["--guest", "kvstore", "--disk", &disk, "--serial-input", &input], &tls(&dir, "primary")),
        TIMEOUT,
    );
    assert_eq!(allowed.code(), 0, "{}", allowed.stderr);
    assert!(std::fs::read(&image).unwrap() != before, "the allowed VMM's writes did not reach the image");
}

/// A TCP proxy that records every byte it forwards, both ways.
struct RecordingProxy {
    addr: String,
    captured: Arc<Mutex<Vec<u8>>>,
}

impl RecordingProxy {
    fn new(target: String) -> RecordingProxy {
        let captured = Arc::new(Mutex::new(Vec::new()));
        let sink = captured.clone();
        let addr = ftvmm_tests::tcp_relay(target, true, move |bytes| {
            sink.lock().unwrap().extend_from_slice(bytes);
            true
        });
        RecordingProxy { addr, captured }
    }

    fn contains(&self, needle: &[u8]) -> bool {
        self.captured.lock().unwrap().windows(needle.len()).any(|w| w == needle)
    }

    fn len(&self) -> usize {
        self.captured.lock().unwrap().len()
    }
}

/// Runs an echo pair whose logging channel passes through a recording
/// proxy, the guest reading `secret`; returns the proxy and the primary's
/// stderr.
fn captured_pair(dir: &Scratch, secret: &str, with_tls: bool) -> (RecordingProxy, String) {
    let input = dir.path(&format!("echo-{with_tls}.in"));
    std::fs::write(&input, format!("{secret}\nquit\n")).unwrap();
    let (p_tls, b_tls) = if with_tls { (tls(dir, "primary"), tls(dir, "backup")) } else { (vec![], vec![]) };
    let p = Proc::spawn(&args(
        &["--primary", "--guest", "echo", "--listen", "127.0.0.1:0", "--digest", "--serial-input", &input],
        &p_tls,
    ));
    let log_addr = p.wait_addr("waiting for a backup on", START);
    let proxy = RecordingProxy::new(log_addr);
    let b = Proc::spawn(&args(&["--backup", "--guest", "echo", "--connect", &proxy.addr, "--digest"], &b_tls));
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "primary: {}", p.stderr);
    assert_eq!(b.code(), 0, "backup: {}", b.stderr);
    assert_eq!(digest_of(&p), digest_of(&b));
    // echo answers each line reversed and in capitals.
    let answer: String = secret.chars().rev().collect::<String>().to_uppercase();
    assert!(p.stdout.contains(&answer), "the guest did not receive the secret: {}", p.stdout);
    (proxy, p.stderr)
}

#[test]
fn a_capture_of_the_logging_channel_does_not_show_the_guests_input() {
    let dir = Scratch::new("tls-capture");
    ftcert(&dir, &["primary", "backup"]);
    let secret = "PASSWORD-hunter2-9f3c1a";
    let (proxy, _) = captured_pair(&dir, secret, true);
    assert!(proxy.len() > 1000, "the proxy saw only {} bytes", proxy.len());
    assert!(!proxy.contains(secret.as_bytes()), "the secret is readable in the TLS capture");
    // Control: without TLS the same capture shows it, and a warning said so.
    let (proxy, stderr) = captured_pair(&dir, secret, false);
    assert!(proxy.contains(secret.as_bytes()), "the plaintext capture lacks the secret: the check is blind");
    assert!(stderr.contains("warning: no TLS") && stderr.contains("plaintext"), "{stderr}");
}

#[test]
fn half_a_tls_configuration_is_a_usage_error() {
    let dir = Scratch::new("tls-half");
    ftcert(&dir, &["primary"]);
    let cert = dir.path("primary.pem");
    let r = ftvmm_tests::run(&["--guest", "hello", "--tls-cert", &cert], START);
    r.assert_error(2, "missing --tls-key and --tls-ca");
    let ca = dir.path("ca.pem");
    let r = ftvmm_tests::run(&["--guest", "hello", "--tls-ca", &ca], START);
    r.assert_error(2, "missing --tls-cert and --tls-key");
    // A key that is not the certificate's.
    ftcert(&dir, &["other"]);
    let r = ftvmm_tests::run(
        &[
            "--guest",
            "hello",
            "--primary",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &dir.path("other.key"),
            "--tls-ca",
            &ca,
        ],
        START,
    );
    r.assert_error(2, "do not make a TLS identity");
    let out = Command::new(ftvmm_tests::ftdisk_bin())
        .args(["--image", &dir.path("none.img"), "--listen", "127.0.0.1:0", "--tls-key", &dir.path("primary.key")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("missing --tls-cert and --tls-ca"), "{stderr}");
}

#[test]
fn strangers_do_not_disturb_a_running_vm_and_a_backup_joins_it_over_tls() {
    let dir = Scratch::new("tls-join");
    ftcert(&dir, &["primary", "backup"]);
    let common = ["--guest", "ticker", "--cmdline", "hz=50", "--serial", "tcp:127.0.0.1:0"];
    let p = Proc::spawn(&args(
        &[&["--primary", "--no-wait", "--listen", "127.0.0.1:0"][..], &common[..]].concat(),
        &tls(&dir, "primary"),
    ));
    let log_addr = p.wait_addr("backups may join on", START);
    let console = p.wait_addr("serial console on", START);
    // One reader for the whole run (a reader's buffer would lose lines
    // between two): it stops 10 ticks after `done`.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reading = {
        let (stream, done) = (connect_retry(&console), done.clone());
        std::thread::spawn(move || {
            let mut reader = TickReader { lines: Vec::new() };
            let mark = std::cell::Cell::new(None);
            reader.read_from(stream, |lines| {
                if !done.load(std::sync::atomic::Ordering::SeqCst) {
                    return false;
                }
                let at = mark.get().unwrap_or(lines.len());
                mark.set(Some(at));
                lines.len() >= at + 10
            });
            reader.lines
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // Strangers while the VM runs unprotected: a plaintext backup, garbage.
    let plaintext = Proc::spawn(&[&["--backup", "--connect", &log_addr][..], &common[..]].concat()).finish(TIMEOUT);
    assert_ne!(plaintext.code(), 0, "a plaintext backup joined: {}", plaintext.stderr);
    let mut s = TcpStream::connect(&log_addr).unwrap();
    let _ = s.write_all(b"\x16\x03\x01\x02\x00 not really a ClientHello");
    drop(s);

    // The right backup joins by state transfer over TLS; no tick is lost.
    let b =
        Proc::spawn(&args(&[&["--backup", "--connect", &log_addr][..], &common[..]].concat(), &tls(&dir, "backup")));
    p.wait_line("backup joined at exit", Duration::from_secs(60));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let lines = reading.join().unwrap();
    assert!(lines.len() >= 20, "the VM printed only {} ticks", lines.len());
    if let Err(e) = check_continuity_across(0, &lines) {
        panic!("{e}; ticks: {:?}", lines.iter().map(|l| l.0).collect::<Vec<_>>());
    }
    let refusals = p.stderr().into_iter().filter(|l| l.contains("failed the handshake")).count();
    assert!(refusals >= 2, "the strangers' refusals were not logged: {:?}", p.stderr());
    assert!(b.stderr().iter().any(|l| l.contains("joining the running VM")), "{:?}", b.stderr());
}
