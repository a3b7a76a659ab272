//! The serial console as a server, on real guests: one client at a time (a
//! second one is told the console is busy; with `--serial-takeover` it
//! takes over and the first one's input stops reaching the guest); a client
//! that floods the console, or a flood on stdin, leaves the VMM's memory
//! flat; `--serial tls:` serves a client with a certificate from the CA and
//! refuses one without; a plaintext console beyond loopback is warned
//! about; `tls:` without credentials is a usage error.

use ftvmm_tests::{
    connect_retry, ftcert, ftvmm, run, tls_client_config, tls_connect, tls_flags, Proc, Scratch, TlsStream,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(20);
const BUSY: &str = "ftvmm: console busy: another client is connected\n";
/// How much the VMM's resident memory may grow while a client floods it.
const FLAT_RSS_KIB: u64 = 32 << 10;
const FLOOD: Duration = Duration::from_secs(5);
/// How soon after a flood the guest must tick on: it takes what the VMM
/// held of the flood first (at most some 130 KiB, echoing its lines).
const RECOVERY: Duration = Duration::from_secs(60);

fn ticker(more: &[&str]) -> Proc {
    let args: Vec<&str> =
        ["--guest", "ticker", "--cmdline", "hz=20"].iter().copied().chain(more.iter().copied()).collect();
    Proc::spawn(&args)
}

/// Reads lines from `from` until one satisfies `want`; returns every line
/// read (it panics on the console's end, a silence as long as its read
/// timeout, or 30 s without the line wanted).
fn read_until(from: &mut impl BufRead, want: impl Fn(&str) -> bool) -> Vec<String> {
    let started = Instant::now();
    let mut lines = Vec::new();
    loop {
        assert!(started.elapsed() < Duration::from_secs(30), "no line wanted within 30 s; read {lines:?}");
        let mut line = String::new();
        match from.read_line(&mut line) {
            Ok(n) if n > 0 => {}
            other => panic!(
                "the console ended ({other:?}) after {:?}, before the line wanted; read {lines:?}",
                started.elapsed()
            ),
        }
        let done = want(line.trim_end());
        lines.push(line.trim_end().to_string());
        if done {
            return lines;
        }
    }
}

fn is_tick(line: &str) -> bool {
    line.starts_with("tick ")
}

/// The number of a `tick N H` line.
fn tick_number(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?.split(' ').next()?.parse().ok()
}

/// A console client that has been served (it read a tick).
fn served(addr: &str) -> BufReader<TcpStream> {
    let stream = connect_retry(addr);
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream);
    read_until(&mut reader, is_tick);
    reader
}

/// Says `line` (after a newline that ends whatever the guest has of an
/// earlier line) and waits for the guest's `said: line`; returns what was
/// read.
fn say(client: &mut BufReader<TcpStream>, line: &str) -> Vec<String> {
    client.get_mut().write_all(format!("\n{line}\n").as_bytes()).unwrap();
    let want = format!("said: {line}");
    read_until(client, |l| l == want)
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the VMM's /proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("a VmRSS line");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("VmRSS in kB")
}

/// Writes lines to `to` as fast as it takes them for [`FLOOD`], sampling
/// the RSS of `pid` meanwhile; returns (bytes written, highest RSS seen).
fn flood(mut to: impl Write + Send + 'static, pid: u32) -> (u64, u64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let writer = std::thread::spawn(move || {
        let block = b"flood flood flood flood flood flood flood flood flood flood\n".repeat(1 << 10);
        let mut sent = 0u64;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            match to.write(&block) {
                Ok(n) => sent += n as u64,
                // A write timeout: the VMM is not reading; try again.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        sent
    });
    let deadline = Instant::now() + FLOOD;
    let mut peak = 0;
    while Instant::now() < deadline {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = writer.join().unwrap();
    (sent, peak.max(rss_kib(pid)))
}

#[test]
fn a_second_client_is_told_the_console_is_busy_while_the_first_keeps_it() {
    let p = ticker(&["--serial", "tcp:127.0.0.1:0"]);
    let addr = p.wait_addr("serial console on", START);
    let mut first = served(&addr);
    say(&mut first, "hello");

    let mut second = TcpStream::connect(&addr).unwrap();
    second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = second.write_all(b"let me in\n");
    let mut told = String::new();
    second.read_to_string(&mut told).expect("the console closes a refused client");
    assert_eq!(told, BUSY);
    p.wait_line("refused 127.0.0.1:", START);

    // The first client still has the console, input and output; nothing of
    // the second reached the guest.
    let lines = say(&mut first, "still mine");
    assert!(!lines.iter().any(|l| l.contains("let me in")), "{lines:?}");
    // Once it hangs up, the next client is served.
    drop(first);
    let mut third = served(&addr);
    say(&mut third, "my turn");
}

#[test]
fn a_client_that_floods_the_console_leaves_the_vmms_memory_flat() {
    // With takeover: the next client gets the console at once, though the
    // flooder's kernel still holds megabytes it could not send (its
    // connection only ends once they are read).
    let p = ticker(&["--serial", "tcp:127.0.0.1:0", "--serial-takeover"]);
    let addr = p.wait_addr("serial console on", START);
    let stream = connect_retry(&addr);
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut client = BufReader::new(stream);
    let seen = read_until(&mut client, is_tick);
    let ticked = seen.last().and_then(|l| tick_number(l)).expect("a tick");
    let pid = p.child.id();
    let before = rss_kib(pid);
    let stream = client.into_inner();
    stream.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
    let (sent, peak) = flood(stream, pid);
    eprintln!(
        "console flood: VmRSS {before} kB before, at most {peak} kB during {FLOOD:?}; the client sent {sent} bytes"
    );
    assert!(
        peak < before + FLAT_RSS_KIB,
        "the VMM grew from {before} kB to {peak} kB while a client flooded its console ({sent} bytes sent)"
    );
    // The client was held back, not buffered: far less went in than a
    // loopback socket takes in 5 s.
    assert!(sent < 256 << 20, "{sent} bytes went in");
    // The VM runs on: once the flood stops, what the VMM still holds of it
    // is bounded, and the guest soon ticks on (its receive handler loops
    // while input is there: it does nothing else meanwhile).
    let stopped = Instant::now();
    let stream = connect_retry(&addr);
    stream.set_read_timeout(Some(RECOVERY)).unwrap();
    let mut next = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = next.read_line(&mut line).unwrap_or(0);
        assert!(n > 0, "no tick after tick {ticked} within {RECOVERY:?} of the flood's end: {:?}", p.stderr());
        if tick_number(line.trim_end()).is_some_and(|n| n > ticked) {
            break;
        }
        assert!(stopped.elapsed() < RECOVERY, "no tick after tick {ticked} within {RECOVERY:?} of the flood's end");
    }
    eprintln!("console flood: the guest ticked on {:?} after the flood", stopped.elapsed());
    assert!(rss_kib(pid) < before + FLAT_RSS_KIB);
    assert!(p.stderr().iter().all(|l| !l.contains("error")), "{:?}", p.stderr());
}

#[test]
fn a_flood_on_stdin_leaves_the_vmms_memory_flat() {
    let mut child = ftvmm(&["--guest", "ticker", "--cmdline", "hz=20"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ftvmm");
    let stdin = child.stdin.take().expect("piped stdin");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);
    // A pipe's writes block when it is full: the flood stops there.
    let (sent, peak) = flood(stdin, pid);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("stdin flood: VmRSS {before} kB before, at most {peak} kB during {FLOOD:?}; {sent} bytes went in");
    assert!(running, "the VM ended during the flood");
    assert!(peak < before + FLAT_RSS_KIB, "the VMM grew from {before} kB to {peak} kB while its stdin was flooded");
}

/// Reads lines from a TLS console until one satisfies `want`.
fn tls_read_until(from: &mut BufReader<TlsStream>, want: impl Fn(&str) -> bool) -> Vec<String> {
    read_until(from, want)
}

#[test]
fn a_tls_console_serves_a_client_with_a_certificate_and_refuses_others() {
    let dir = Scratch::new("console-tls");
    ftcert(&dir, &["vmm", "operator"]);
    let flags = tls_flags(&dir, "vmm");
    let args: Vec<&str> = ["--serial", "tls:127.0.0.1:0"].into_iter().chain(flags.iter().map(String::as_str)).collect();
    let p = ticker(&args);
    let addr = p.wait_addr("serial console on", START);
    assert!(!p.stderr().iter().any(|l| l.contains("plaintext")), "{:?}", p.stderr());

    // A client with a certificate from the CA: the console, both ways.
    let operator = tls_client_config(&dir, Some("operator"));
    let mut client = BufReader::new(tls_connect(&addr, operator.clone()).expect("the operator's handshake"));
    tls_read_until(&mut client, is_tick);
    client.get_mut().write_all(b"over tls\n").unwrap();
    client.get_mut().flush().unwrap();
    tls_read_until(&mut client, |l| l == "said: over tls");

    // A second client with a certificate is told the console is busy.
    let mut second = tls_connect(&addr, operator.clone()).expect("the second handshake");
    let mut told = String::new();
    let _ = second.read_to_string(&mut told);
    assert_eq!(told, BUSY);

    // A client without a certificate: its handshake is refused (in TLS 1.3
    // the client learns it at its first read); it reads nothing.
    let anonymous = tls_client_config(&dir, None);
    match tls_connect(&addr, anonymous) {
        Err(_) => {}
        Ok(mut s) => {
            let _ = s.write_all(b"anonymous\n");
            let mut got = Vec::new();
            let read = s.read_to_end(&mut got);
            assert!(
                read.is_err() || got.is_empty(),
                "a client without a certificate read {:?}",
                String::from_utf8_lossy(&got)
            );
        }
    }
    // A plaintext client reads no tick either.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = plain.write_all(b"hello\n");
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("tick"), "a plaintext client read the console");
    p.wait_line("refused 127.0.0.1:", START);

    // The operator still has the console; nothing of the others reached it.
    client.get_mut().write_all(b"still here\n").unwrap();
    client.get_mut().flush().unwrap();
    let lines = tls_read_until(&mut client, |l| l == "said: still here");
    assert!(!lines.iter().any(|l| l.contains("anonymous") || l.contains("said: hello")), "{lines:?}");
}

#[test]
fn a_backups_tls_console_serves_once_it_is_live() {
    let dir = Scratch::new("console-tls-pair");
    ftcert(&dir, &["primary", "backup", "operator"]);
    let (p_tls, b_tls) = (tls_flags(&dir, "primary"), tls_flags(&dir, "backup"));
    let common = ["--guest", "ticker", "--cmdline", "hz=50", "--serial", "tls:127.0.0.1:0"];
    let with = |fixed: &[&str], tls: &[String]| -> Proc {
        let args: Vec<&str> =
            fixed.iter().copied().chain(common.iter().copied()).chain(tls.iter().map(String::as_str)).collect();
        Proc::spawn(&args)
    };
    let mut p = with(&["--primary", "--listen", "127.0.0.1:0"], &p_tls);
    let log_addr = p.wait_addr("waiting for a backup on", START);
    let p_console = p.wait_addr("serial console on", START);
    let mut b = with(&["--backup", "--connect", &log_addr], &b_tls);
    let b_console = b.wait_addr("serial console on", START);
    p.wait_line("backup attached", START);
    let operator = tls_client_config(&dir, Some("operator"));
    let mut client = BufReader::new(tls_connect(&p_console, operator.clone()).expect("the primary's console"));
    tls_read_until(&mut client, is_tick);
    p.kill();
    b.wait_line("going live", Duration::from_secs(5));
    let mut client = BufReader::new(tls_connect(&b_console, operator).expect("the live backup's console"));
    tls_read_until(&mut client, is_tick);
    client.get_mut().write_all(b"live\n").unwrap();
    client.get_mut().flush().unwrap();
    tls_read_until(&mut client, |l| l == "said: live");
    b.kill();
}

#[test]
fn with_takeover_a_new_client_replaces_the_old_whose_input_no_longer_counts() {
    let p = ticker(&["--serial", "tcp:127.0.0.1:0", "--serial-takeover"]);
    let addr = p.wait_addr("serial console on", START);
    let mut old = served(&addr);
    say(&mut old, "one");
    let mut new = served(&addr);
    p.wait_line("takes the console over from", START);
    // The old client's connection ends...
    let mut rest = String::new();
    let ended = old.read_to_string(&mut rest);
    assert!(ended.is_ok(), "the old client was not disconnected: {ended:?}");
    // ...and what it still manages to send never reaches the guest.
    let _ = old.get_mut().write_all(b"stale\n");
    std::thread::sleep(Duration::from_millis(200));
    let lines = say(&mut new, "two");
    let after = read_until(&mut new, is_tick);
    assert!(
        !lines.iter().chain(&after).any(|l| l.contains("stale")),
        "the replaced client's input reached the guest: {lines:?} {after:?}"
    );
}

#[test]
fn a_plaintext_console_beyond_loopback_is_warned_about() {
    let p = ticker(&["--serial", "tcp:0.0.0.0:0"]);
    // The address served is still the one line's that says so.
    let served = p.wait_addr("serial console on", START);
    assert!(served.starts_with("0.0.0.0:"), "{served}");
    let warning = p.wait_line("warning: the console (--serial tcp:0.0.0.0:", START);
    assert!(warning.contains("plaintext"), "{warning}");
    let quiet = ticker(&["--serial", "tcp:127.0.0.1:0"]);
    quiet.wait_addr("serial console on", START);
    assert!(!quiet.stderr().iter().any(|l| l.contains("warning")), "{:?}", quiet.stderr());
}

#[test]
fn a_tls_console_without_credentials_and_takeover_without_a_server_are_usage_errors() {
    let timeout = Duration::from_secs(20);
    run(&["--guest", "ticker", "--serial", "tls:127.0.0.1:0"], timeout)
        .assert_error(2, "--serial tls:127.0.0.1:0 serves the console over mutual TLS: it needs --tls-cert");
    run(&["--guest", "ticker", "--serial-takeover"], timeout)
        .assert_error(2, "--serial-takeover is for a console server");
}
