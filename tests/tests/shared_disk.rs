//! The shared disk under fault tolerance: go-live arbitration when the
//! logging channel is cut (split brain), and a storage server restarting
//! under load.

use ftvmm_tests::{qemu_img, spawn_arbiter, spawn_ftdisk, Proc, Scratch};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(20);

/// A TCP proxy for the logging channel that can be cut: after `cut`, bytes
/// are swallowed in both directions while the connections stay open, as on a
/// partitioned network.
struct Proxy {
    addr: String,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    fn new(target: String) -> Proxy {
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let addr = ftvmm_tests::tcp_relay(target, false, move |_| !flag.load(Ordering::Relaxed));
        Proxy { addr, cut }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }
}

/// `arbitration`: the flags that give the pair its go-live arbitration;
/// `won`: what the winner says.
fn split_brain_trial(arbitration: &[&str], won: &str, trial: u32) {
    let mut common = vec!["--guest", "ticker", "--cmdline", "hz=50", "--heartbeat-ms", "100"];
    common.extend_from_slice(arbitration);
    let mut pargs = vec!["--primary", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(&common);
    let mut p = Proc::spawn(&pargs);
    let target = p.wait_addr("waiting for a backup on", START);
    let proxy = Proxy::new(target);
    let mut bargs = vec!["--backup", "--connect", proxy.addr.as_str()];
    bargs.extend_from_slice(&common);
    let mut b = Proc::spawn(&bargs);
    p.wait_line("backup attached", START);
    std::thread::sleep(Duration::from_millis(100 + (trial as u64 * 37) % 200));
    proxy.cut();

    // Exactly one side wins the disk and runs on; the other halts (status 5).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut p_status, mut b_status) = (None, None);
    while Instant::now() < deadline && p_status.is_none() && b_status.is_none() {
        p_status = p.child.try_wait().unwrap().map(|s| s.code());
        b_status = b.child.try_wait().unwrap().map(|s| s.code());
        std::thread::sleep(Duration::from_millis(10));
    }
    // Give the winner a moment to show it is still running.
    std::thread::sleep(Duration::from_millis(300));
    p_status = p_status.or_else(|| p.child.try_wait().unwrap().map(|s| s.code()));
    b_status = b_status.or_else(|| b.child.try_wait().unwrap().map(|s| s.code()));
    let context = || format!("trial {trial}\nprimary: {:?}\nbackup: {:?}", p.stderr(), b.stderr());
    match (p_status, b_status) {
        (Some(Some(5)), None) => {
            b.wait_line(won, Duration::from_secs(2));
            b.wait_line("going live", Duration::from_secs(2));
        }
        (None, Some(Some(5))) => {
            p.wait_line(won, Duration::from_secs(2));
            p.wait_line("running alone", Duration::from_secs(2));
        }
        other => panic!("not exactly one survivor: {other:?}\n{}", context()),
    }
    let loser = if p_status.is_some() { p.stderr() } else { b.stderr() };
    assert!(loser.iter().any(|l| l.contains("lost the go-live arbitration")), "{}", context());
    p.kill();
    b.kill();
}

/// A primary and a backup attached to it, both with `common` arguments.
fn start_pair(common: &[&str]) -> (Proc, Proc) {
    let mut pargs = vec!["--primary", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(common);
    let p = Proc::spawn(&pargs);
    let log_addr = p.wait_addr("waiting for a backup on", START);
    let mut bargs = vec!["--backup", "--connect", log_addr.as_str()];
    bargs.extend_from_slice(common);
    let b = Proc::spawn(&bargs);
    p.wait_line("backup attached", START);
    (p, b)
}

#[test]
fn a_cut_logging_channel_leaves_exactly_one_side_live() {
    let dir = Scratch::new("split-brain");
    let image = dir.path("disk.img");
    qemu_img(&image, 1 << 20);
    let (mut ftdisk, addr) = spawn_ftdisk(&image, "127.0.0.1:0");
    let disk = format!("ftdisk:{addr}");
    for trial in 0..50 {
        split_brain_trial(&["--disk", &disk], "won the shared disk", trial);
    }
    let _ = ftdisk.kill();
}

#[test]
fn a_cut_logging_channel_leaves_exactly_one_side_live_with_an_arbiter_and_no_disk() {
    let dir = Scratch::new("split-brain-arbiter");
    let (_arbiter, addr) = spawn_arbiter(None, &dir.path("record"), "127.0.0.1:0");
    let arbiter_flag = format!("ftdisk:{addr}");
    for trial in 0..50 {
        split_brain_trial(&["--arbiter", &arbiter_flag], "won the arbiter", trial);
    }
}

#[test]
fn a_pair_without_arbitration_is_warned_and_the_arbiter_flag_is_checked() {
    let (p, b) = start_pair(&["--guest", "ticker", "--cmdline", "hz=50 ticks=20"]);
    for side in [&p, &b] {
        side.wait_line("no go-live arbitration", START);
    }
    drop((p, b));
    let r = ftvmm_tests::run(&["--guest", "hello", "--arbiter", "10.0.0.1:1"], START);
    r.assert_error(2, "want ftdisk:ADDR");
    let r =
        ftvmm_tests::run(&["--guest", "hello", "--arbiter", "ftdisk:1.2.3.4:1", "--disk", "ftdisk:1.2.3.4:2"], START);
    r.assert_error(2, "already arbitrates");
}

#[test]
fn acknowledged_writes_survive_a_storage_server_restart() {
    let dir = Scratch::new("ftdisk-restart");
    let image = dir.path("disk.img");
    qemu_img(&image, 4 << 20);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let (mut ftdisk, _) = spawn_ftdisk(&image, &addr);
    let disk = format!("ftdisk:{addr}");
    let common = ["--guest", "kvstore", "--disk", disk.as_str(), "--serial", "tcp:127.0.0.1:0"];
    let (p, b) = start_pair(&common);
    let console = p.wait_addr("serial console on", START);

    let stream = TcpStream::connect(&console).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("kvstore: ready"), "{line}");
    let mut ask = |q: String| -> String {
        reader.get_mut().write_all(format!("{q}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        reply.trim_end().to_string()
    };
    for i in 0..60 {
        if i == 20 {
            // The storage server dies and comes back on the same address.
            let _ = ftdisk.kill();
            let _ = ftdisk.wait();
            std::thread::sleep(Duration::from_millis(200));
            ftdisk = spawn_ftdisk(&image, &addr).0;
        }
        assert_eq!(ask(format!("set k{i} v{i}")), "OK", "set k{i}");
    }
    for i in 0..60 {
        assert_eq!(ask(format!("get k{i}")), format!("VALUE v{i}"));
    }
    // The guest quits, so that the primary applies every released write
    // before it exits (a kill could leave the last ones queued in its
    // writer thread, still held up by the restart's retries).
    assert_eq!(ask("quit".into()), "BYE");
    let (p, b) = (p.finish(START), b.finish(START));
    assert_eq!(p.code(), 0, "{}", p.stderr);
    assert_eq!(b.code(), 0, "{}", b.stderr);
    // And it is all on the disk: a fresh VM reads it back.
    let _ = ftdisk.kill();
    let _ = ftdisk.wait();
    let (mut ftdisk, served) = spawn_ftdisk(&image, "127.0.0.1:0");
    let input = dir.path("gets.txt");
    std::fs::write(&input, (0..60).map(|i| format!("get k{i}\n")).collect::<String>() + "quit\n").unwrap();
    let disk = format!("ftdisk:{served}");
    let r = ftvmm_tests::run(&["--guest", "kvstore", "--disk", &disk, "--serial-input", &input], ftvmm_tests::TIMEOUT);
    let expected: String = (0..60).map(|i| format!("VALUE v{i}\n")).collect::<String>() + "BYE\n";
    assert!(r.stdout.ends_with(&expected), "{}\n{}", r.stdout, r.stderr);
    let _ = ftdisk.kill();
}

#[test]
fn a_backup_that_cannot_reach_the_storage_does_not_go_live_until_it_can() {
    let dir = Scratch::new("ftdisk-down");
    let image = dir.path("disk.img");
    qemu_img(&image, 1 << 20);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let (mut ftdisk, _) = spawn_ftdisk(&image, &addr);
    let disk = format!("ftdisk:{addr}");
    let common = ["--guest", "ticker", "--cmdline", "hz=50", "--disk", disk.as_str(), "--heartbeat-ms", "100"];
    let (mut p, mut b) = start_pair(&common);

    // The storage goes away, then the primary dies.
    let _ = ftdisk.kill();
    let _ = ftdisk.wait();
    p.kill();
    b.wait_line("primary lost", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !b.stderr().iter().any(|l| l.contains("going live") || l.contains("won the shared disk")),
        "went live without the storage: {:?}",
        b.stderr()
    );
    assert!(b.child.try_wait().unwrap().is_none(), "the backup gave up instead of waiting");
    // The storage comes back: now the backup wins it and goes live.
    let (mut ftdisk, _) = spawn_ftdisk(&image, &addr);
    b.wait_line("won the shared disk (generation 2)", Duration::from_secs(20));
    b.wait_line("going live", Duration::from_secs(5));
    let _ = ftdisk.kill();
}
