//! Primary and backup: lockstep, the output rule, failover, a lost backup,
//! bad peers on the logging channel.

use ftvmm_tests::{check_continuity_across, connect_retry, Hosts, Proc, TickReader, TIMEOUT};
use rand::{Rng, SeedableRng};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(20);

/// A primary waiting on an ephemeral port, and its logging address.
fn primary(guest: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["--primary", "--guest", guest, "--listen", "127.0.0.1:0", "--digest"];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args);
    let addr = p.wait_addr("waiting for a backup on", START);
    (p, addr)
}

fn backup(guest: &str, addr: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--backup", "--guest", guest, "--connect", addr, "--digest"];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

fn digest_of(run: &ftvmm_tests::Run) -> String {
    run.digest().unwrap_or_else(|| panic!("no digest; stderr:\n{}", run.stderr))
}

#[test]
fn primary_and_backup_end_in_the_same_state() {
    let dir = ftvmm_tests::Scratch::new("lockstep");
    let input = dir.path("echo.in");
    std::fs::write(&input, "one\ntwo three\nquit\n").unwrap();
    let kv_input = dir.path("kv.in");
    std::fs::write(&kv_input, "set a 1\nset b 2\nget a\ndel b\nget b\nquit\n").unwrap();
    let disk = dir.path("kv.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    for (guest, cmdline, extra) in [
        ("kvstore", "", vec!["--serial-input", kv_input.as_str(), "--disk", disk.as_str()]),
        ("timer", "ticks=40", vec![]),
        ("compute", "rounds=30 kib=512", vec![]),
        ("echo", "", vec!["--serial-input", input.as_str()]),
        ("clock", "", vec![]),
    ] {
        let mut pargs = vec!["--cmdline", cmdline];
        pargs.extend(extra.iter().copied());
        let (p, addr) = primary(guest, &pargs);
        let mut bargs = vec!["--cmdline", cmdline];
        if guest == "kvstore" {
            bargs.extend(["--disk", disk.as_str()]);
        }
        let b = backup(guest, &addr, &bargs);
        let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
        assert_eq!(p.code(), 0, "{guest} primary: {}", p.stderr);
        assert_eq!(b.code(), 0, "{guest} backup: {}", b.stderr);
        assert_eq!(digest_of(&p), digest_of(&b), "{guest}: primary and backup digests differ");
        assert!(b.stdout.is_empty(), "{guest}: the backup's output is suppressed, got {:?}", b.stdout);
        assert!(!p.stdout.is_empty(), "{guest}: the primary released its output");
        if guest == "echo" {
            assert_eq!(p.stdout, "echo: ready\necho: ENO\necho: EERHT OWT\necho: bye\n");
        }
        if guest == "kvstore" {
            assert_eq!(p.stdout, "kvstore: ready (0 records)\nOK\nOK\nVALUE 1\nOK\nNOTFOUND\nBYE\n");
        }
    }
}

#[test]
fn either_side_may_start_first() {
    // The backup first: it keeps trying until the primary listens.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let b = backup("timer", &addr, &["--cmdline", "ticks=10"]);
    std::thread::sleep(Duration::from_millis(300));
    let p = Proc::spawn(&["--primary", "--guest", "timer", "--cmdline", "ticks=10", "--listen", &addr, "--digest"]);
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "{}", p.stderr);
    assert_eq!(b.code(), 0, "{}", b.stderr);
    assert_eq!(digest_of(&p), digest_of(&b));
}

#[test]
fn continuity_checker_catches_gaps_and_reordering() {
    let l = |v: &[u64]| v.iter().map(|n| (*n, format!("h{n}"))).collect::<Vec<_>>();
    assert!(check_continuity_across(1, &l(&[1, 2, 3, 4])).is_ok());
    assert!(check_continuity_across(1, &l(&[1, 2, 3, 2, 3, 4])).is_ok());
    assert!(check_continuity_across(1, &l(&[1, 2, 4])).is_err());
    assert!(check_continuity_across(1, &l(&[1, 3, 2])).is_err());
    assert!(check_continuity_across(1, &l(&[1, 2, 3, 2, 3, 2, 3])).is_err());
}

fn failover_trial(rng: &mut impl Rng, trial: u32, hosts: &Hosts) {
    let (p_ip, b_ip) = (&hosts.primary_ip, &hosts.backup_ip);
    hosts.restore_primary_link();
    let (listen, p_serial, b_serial) = (format!("{p_ip}:0"), format!("tcp:{p_ip}:0"), format!("tcp:{b_ip}:0"));
    let p_args = ["--primary", "--guest", "ticker", "--cmdline", "hz=50", "--listen", &listen, "--serial", &p_serial];
    let mut p = Proc::spawn_in(Some(&hosts.primary_ns()), &p_args);
    let addr = p.wait_addr("waiting for a backup on", START);
    let p_console = p.wait_addr("serial console on", START);
    let b_args = ["--backup", "--guest", "ticker", "--cmdline", "hz=50", "--connect", &addr, "--serial", &b_serial];
    let mut b = Proc::spawn_in(Some(&hosts.backup_ns()), &b_args);
    let b_console = b.wait_addr("serial console on", START);
    p.wait_line("backup attached", START);

    let mut reader = TickReader { lines: Vec::new() };
    let kill_after = rng.gen_range(5..40u64);
    let stream = connect_retry(&p_console);
    reader.read_from(stream, |lines| lines.len() as u64 >= kill_after);
    let killed_at = reader.lines.last().map(|l| l.0).unwrap_or(0);
    // Kill at a random moment, not only right after a line.
    std::thread::sleep(Duration::from_micros(rng.gen_range(0..20_000)));
    p.kill();
    hosts.cut_primary_link();
    b.wait_line("going live", Duration::from_secs(5));
    let stream = connect_retry(&b_console);
    reader.read_from(stream, |lines| lines.last().is_some_and(|l| l.0 >= killed_at + 20));
    if let Err(e) = check_continuity_across(1, &reader.lines) {
        panic!("trial {trial}: {e}; ticks seen: {:?}", reader.lines.iter().map(|l| l.0).collect::<Vec<_>>());
    }
    b.kill();
}

/// On two hosts (network namespaces: root, as CI is; without root the test
/// fails saying so, it does not fall back to loopback).
#[test]
fn failover_loses_no_tick_and_reorders_none() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let hosts = Hosts::create(78);
    for trial in 0..20 {
        failover_trial(&mut rng, trial, &hosts);
    }
}

/// The number of a `tick N H` line.
fn tick_number(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?.split(' ').next()?.parse().ok()
}

#[test]
fn a_lost_backup_releases_the_primarys_output_within_the_heartbeat_timeout() {
    let (p, addr) = primary("ticker", &["--cmdline", "hz=50", "--serial", "tcp:127.0.0.1:0", "--heartbeat-ms", "150"]);
    let console = p.wait_addr("serial console on", START);
    let mut b = backup("ticker", &addr, &["--cmdline", "hz=50", "--heartbeat-ms", "150"]);
    p.wait_line("backup attached", START);
    let stream = connect_retry(&console);
    // Without the heartbeat timeout the output would be held for good:
    // this read timeout is what would end the test then.
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut lines = BufReader::new(stream).lines();
    let mut ticks = Vec::new();
    while ticks.len() < 10 {
        ticks.extend(tick_number(&lines.next().unwrap().unwrap()));
    }
    // Stop the backup without a word (SIGSTOP: no FIN, no RST): only the
    // heartbeat timeout can tell. Output is held meanwhile, then released.
    let pid = b.child.id().to_string();
    std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let mut longest_gap = Duration::ZERO;
    let mut previous = Instant::now();
    while ticks.len() < 40 {
        let line = lines.next().expect("primary keeps printing").expect("line");
        if let Some(n) = tick_number(&line) {
            let now = Instant::now();
            longest_gap = longest_gap.max(now - previous);
            previous = now;
            ticks.push(n);
        }
    }
    // What ended the hold: the primary declared the backup lost after
    // 150 ms without traffic, as configured.
    let lost = p.wait_line("backup lost", Duration::from_secs(2));
    assert!(lost.contains("150ms (heartbeat timeout)"), "{lost}");
    // Held, then released whole: no tick lost, none repeated or reordered.
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "ticks across the hold: {ticks:?}");
    // The hold lasts the heartbeat timeout plus the wake-ups that follow
    // it; 3 s (20 timeouts) leaves a loaded 2-core machine room while
    // still telling the 150 ms timeout from a hold that lasts.
    assert!(longest_gap < Duration::from_secs(3), "output held {longest_gap:?} after the backup stopped");
    b.kill();
}

#[test]
fn garbage_on_the_logging_port_is_refused_and_the_primary_carries_on() {
    let (p, addr) = primary("timer", &["--cmdline", "ticks=10"]);
    let bad_peers: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        [&b"FTVMMLCH"[..], &99u32.to_le_bytes()].concat(),
        [&b"FTVMMLCH"[..], &1u32.to_le_bytes(), &[0xff, 0xff, 0xff, 0x7f]].concat(),
        [&b"FTVMMLCH"[..], &1u32.to_le_bytes(), &[10, 0, 0, 0, 1, 2]].concat(),
    ];
    for bytes in bad_peers {
        let mut s = TcpStream::connect(&addr).unwrap();
        let _ = s.write_all(&bytes);
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let b = backup("timer", &addr, &["--cmdline", "ticks=10"]);
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "{}", p.stderr);
    assert_eq!(b.code(), 0, "{}", b.stderr);
    assert_eq!(digest_of(&p), digest_of(&b));
    assert!(!p.stderr.contains("panicked"));
}

#[test]
fn a_backup_talking_to_garbage_fails_clearly() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in listener.incoming().take(1) {
            let mut s = s.unwrap();
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let b = backup("timer", &addr, &[]).finish(TIMEOUT);
    assert_eq!(b.code(), 2, "{}", b.stderr);
    assert!(b.stderr.lines().any(|l| l.starts_with("ftvmm: error: backup: logging channel")), "{}", b.stderr);
    assert!(!b.stderr.contains("panicked"));
}

#[test]
fn a_backup_with_another_image_or_config_is_refused_at_handshake() {
    let (p, addr) = primary("timer", &["--cmdline", "ticks=10"]);
    let other_image = backup("hello", &addr, &[]).finish(TIMEOUT);
    assert_eq!(other_image.code(), 2);
    assert!(other_image.stderr.contains("another guest image"), "{}", other_image.stderr);
    let other_config = backup("timer", &addr, &["--cmdline", "ticks=10", "--mem-mib", "32"]).finish(TIMEOUT);
    assert_eq!(other_config.code(), 2);
    assert!(other_config.stderr.contains("another VM configuration"), "{}", other_config.stderr);
    // The primary is still waiting for a proper backup.
    let b = backup("timer", &addr, &["--cmdline", "ticks=10"]);
    let (p, b) = (p.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(p.code(), 0, "{}", p.stderr);
    assert_eq!(digest_of(&p), digest_of(&b));
}

/// Sends `line` and reads one reply line.
fn ask(reader: &mut BufReader<TcpStream>, line: &str) -> Option<String> {
    reader.get_mut().write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut reply = String::new();
    match reader.read_line(&mut reply) {
        Ok(n) if n > 0 => Some(reply.trim_end().to_string()),
        _ => None,
    }
}

#[test]
fn acknowledged_writes_survive_a_failover() {
    let dir = ftvmm_tests::Scratch::new("kv-failover");
    let mut rng = rand::rngs::StdRng::seed_from_u64(55);
    for trial in 0..3 {
        let disk = dir.path(&format!("kv{trial}.img"));
        let made =
            std::process::Command::new("qemu-img").args(["create", "-q", "-f", "raw", &disk, "4M"]).status().unwrap();
        assert!(made.success());
        let (mut p, addr) = primary("kvstore", &["--disk", &disk, "--serial", "tcp:127.0.0.1:0"]);
        let p_console = p.wait_addr("serial console on", START);
        let b = backup("kvstore", &addr, &["--disk", &disk, "--serial", "tcp:127.0.0.1:0"]);
        let b_console = b.wait_addr("serial console on", START);
        p.wait_line("backup attached", START);

        let stream = connect_retry(&p_console);
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(stream);
        let mut ready = String::new();
        reader.read_line(&mut ready).unwrap();
        assert!(ready.starts_with("kvstore: ready"), "{ready}");
        let kill_after = rng.gen_range(5..40);
        let mut acked = Vec::new();
        for i in 0..kill_after {
            match ask(&mut reader, &format!("set k{i} v{i}")).as_deref() {
                Some("OK") => acked.push(i),
                other => panic!("trial {trial}: set k{i}: {other:?}"),
            }
        }
        p.kill();
        b.wait_line("going live", Duration::from_secs(5));
        let stream = connect_retry(&b_console);
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(stream);
        // The new primary re-emits output the old one may not have released
        // (the ready line, some OKs): skip to our own question's answer.
        reader.get_mut().write_all(b"get probe-key\n").unwrap();
        loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "trial {trial}: backup console closed");
            if line.trim_end() == "NOTFOUND" {
                break;
            }
        }
        for i in &acked {
            assert_eq!(
                ask(&mut reader, &format!("get k{i}")).as_deref(),
                Some(format!("VALUE v{i}").as_str()),
                "trial {trial}"
            );
        }
        assert_eq!(ask(&mut reader, "set after failover").as_deref(), Some("OK"));
        drop(b);
        // The disk agrees with what the new primary served: a fresh run finds
        // every acknowledged write on it.
        let gets: String = acked.iter().map(|i| format!("get k{i}\n")).collect::<String>() + "get after\nquit\n";
        let input = dir.path("gets.txt");
        std::fs::write(&input, gets).unwrap();
        let r = ftvmm_tests::run(&["--guest", "kvstore", "--disk", &disk, "--serial-input", &input], TIMEOUT);
        let expected: String =
            acked.iter().map(|i| format!("VALUE v{i}\n")).collect::<String>() + "VALUE failover\nBYE\n";
        assert!(r.stdout.ends_with(&expected), "trial {trial}: disk after failover:\n{}", r.stdout);
    }
}
