//! The `redis` guest on a real (namespaced) LAN: stock `redis-cli` and
//! `redis-benchmark` get the right answers (and, with a virtio disk, find
//! their writes again after a restart); a session whose frames arrive
//! at random moments replays to the same output and state digest, and a
//! primary and its backup end a session with equal digests; bad frames on
//! the LAN and garbage RESP on a connection have clear outcomes and leave
//! the VM serving and its store intact.
//!
//! Hosts are network namespaces (root; CI is root): the VM's host bridges a
//! TAP onto the LAN, and the client is the root namespace on the LAN's
//! bridge, at `.254`.

use ftvmm_tests::lab::Lab;
use ftvmm_tests::resp::{Reply, RespConn};
use ftvmm_tests::{KillOnDrop, Proc, Run, Scratch, TIMEOUT};
use rand::{Rng, SeedableRng};
use replay::{Entry, Event, LogReader, Record, RecordSource};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a VM may take to boot and answer, on a shared machine.
const START: Duration = Duration::from_secs(30);
/// How long one reply may take.
const REPLY: Duration = Duration::from_secs(10);
/// The NIC of every VM here (the TAP lives in the VM host's namespace).
const NET: &str = "tap:fttap";
/// The VM's MAC: ftvmm's default.
const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Each test runs VMs on both cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A lab on 10.`subnet`.0.0/24 whose hosts each carry a TAP `fttap` when
/// named in `taps`.
fn lab(tag: &str, subnet: u8, hosts: &[(&str, u8)], taps: &[&str]) -> Lab {
    ftvmm_tests::require_kvm();
    let name = format!("{tag}{}", std::process::id() % 100_000);
    let lab = Lab::create(&name, &format!("10.{subnet}.0"), hosts, std::process::id())
        .unwrap_or_else(|e| panic!("the redis network tests need root (network namespaces): {e}"));
    for host in taps {
        lab.add_tap(host, "fttap").unwrap_or_else(|e| panic!("TAP on {host}: {e}"));
    }
    lab
}

/// What a VMM printed so far, for failure messages.
fn context(p: &Proc) -> String {
    format!("VMM stdout:\n{}\nVMM stderr:\n{}", p.stdout(), p.stderr().join("\n"))
}

/// A connection to the VM's redis that has answered PING.
fn connect(p: &mut Proc, vm: &str) -> RespConn {
    let addr = format!("{vm}:6379");
    let deadline = Instant::now() + START;
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("the VMM exited ({status}) before redis answered\n{}", context(p));
        }
        if let Ok(mut c) = RespConn::connect(&addr, REPLY) {
            if matches!(c.cmd(&["PING"]), Ok(Reply::Simple(s)) if s == "PONG") {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "redis at {addr} never answered PING\n{}", context(p));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The redis guest at `vm` on `host`'s TAP, answering; `extra` flags added.
fn start_vm(lab: &Lab, host: &str, vm: &str, extra: &[&str]) -> Proc {
    let ns = lab.host(host).unwrap().ns.clone();
    let cmdline = format!("ip={vm}/24");
    let mut args = vec!["--guest", "redis", "--cmdline", &cmdline, "--net", NET];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn_in(Some(&ns), &args);
    drop(connect(&mut p, vm));
    p
}

/// Sends SHUTDOWN (which has no reply: the VM exits) and waits for the VMM.
fn shutdown(p: Proc, vm: &str) -> Run {
    let mut c = RespConn::connect(&format!("{vm}:6379"), REPLY)
        .unwrap_or_else(|e| panic!("cannot connect to send SHUTDOWN: {e}\n{}", context(&p)));
    c.send(&["SHUTDOWN"]).expect("send SHUTDOWN");
    let run = p.finish(TIMEOUT);
    assert_eq!(run.code(), 0, "SHUTDOWN ends the VM with status 0\nstdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("redis: shutting down"), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(!run.stderr.contains("panicked"), "the VMM panicked:\n{}", run.stderr);
    run
}

/// Asserts the VMM is still running and has reported no error.
fn assert_alive(p: &mut Proc, when: &str) {
    if let Ok(Some(status)) = p.child.try_wait() {
        panic!("{when}: the VMM exited ({status})\n{}", context(p));
    }
    let stderr = p.stderr().join("\n");
    assert!(!stderr.contains("panicked") && !stderr.contains("error"), "{when}: the VMM reported\n{}", context(p));
}

/// Runs a stock client (`redis-cli`, `redis-benchmark`), killing it past `timeout`.
fn tool(program: &str, args: &[&str], timeout: Duration) -> Run {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} (Debian's redis-tools): {e}"));
    ftvmm_tests::wait(child, timeout)
}

/// `redis-cli -h VM args`: its stdout, once it exited 0.
fn cli(p: &Proc, vm: &str, args: &[&str]) -> String {
    let mut full = vec!["-h", vm, "-p", "6379"];
    full.extend_from_slice(args);
    let r = tool("redis-cli", &full, Duration::from_secs(30));
    assert_eq!(
        r.status,
        Some(0),
        "redis-cli {args:?}: status {:?}\nstdout:\n{}\nstderr:\n{}\n{}",
        r.status,
        r.stdout,
        r.stderr,
        context(p)
    );
    r.stdout
}

fn bulk(reply: std::io::Result<Reply>) -> Option<String> {
    match reply {
        Ok(Reply::Bulk(b)) => b.map(|b| String::from_utf8_lossy(&b).into_owned()),
        other => panic!("want a bulk reply, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// a. Stock clients.

#[test]
fn redis_cli_and_redis_benchmark_get_the_right_answers() {
    let _serial = one_at_a_time();
    let lab = lab("ra", 86, &[("h", 1)], &["h"]);
    let vm = "10.86.0.10";
    let started = Instant::now();
    let mut p = start_vm(&lab, "h", vm, &[]);
    eprintln!("booted and answering in {:?}", started.elapsed());

    assert_eq!(cli(&p, vm, &["PING"]), "PONG\n");
    assert_eq!(cli(&p, vm, &["SET", "greeting", "hello world"]), "OK\n");
    assert_eq!(cli(&p, vm, &["GET", "greeting"]), "hello world\n");
    assert_eq!(cli(&p, vm, &["GET", "no-such-key"]), "\n", "a missing key is nil (an empty line)");
    assert_eq!(cli(&p, vm, &["INCR", "n"]), "1\n");
    assert_eq!(cli(&p, vm, &["INCR", "n"]), "2\n");
    assert_eq!(cli(&p, vm, &["INCRBY", "n", "40"]), "42\n");
    assert_eq!(cli(&p, vm, &["MSET", "a", "1", "b", "two words", "c", "3"]), "OK\n");
    assert_eq!(cli(&p, vm, &["MGET", "a", "b", "no-such-key", "c"]), "1\ntwo words\n\n3\n");
    assert_eq!(cli(&p, vm, &["GET", "n"]), "42\n");
    let err = cli(&p, vm, &["INCR", "greeting"]);
    assert!(err.contains("ERR value is not an integer"), "INCR of a string: {err:?}");
    assert_eq!(cli(&p, vm, &["DBSIZE"]), "5\n");

    let started = Instant::now();
    let bench = tool(
        "redis-benchmark",
        &["-h", vm, "-p", "6379", "-t", "ping,set,get,incr", "-n", "2000", "-c", "8", "-P", "4", "-q"],
        Duration::from_secs(300),
    );
    let took = started.elapsed();
    let all = format!("{}\n{}", bench.stdout, bench.stderr);
    assert_eq!(
        bench.status,
        Some(0),
        "redis-benchmark: status {:?} after {took:?}\n{all}\n{}",
        bench.status,
        context(&p)
    );
    // Its progress lines end in CR: look at every piece.
    let pieces: Vec<&str> = all.split(['\r', '\n']).map(str::trim).filter(|l| !l.is_empty()).collect();
    let errors: Vec<&&str> = pieces.iter().filter(|l| l.to_ascii_lowercase().contains("error")).collect();
    assert!(errors.is_empty(), "redis-benchmark reported errors: {errors:?}\n{all}");
    for test in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"] {
        assert!(
            pieces.iter().any(|l| l.starts_with(&format!("{test}: ")) && l.contains("requests per second")),
            "redis-benchmark has no result for {test}:\n{all}"
        );
    }
    eprintln!(
        "redis-benchmark took {took:?}:\n{}",
        pieces.iter().filter(|l| l.contains("p50")).cloned().collect::<Vec<_>>().join("\n")
    );
    // Its INCR test increments one key (no -r) once per request, its SET
    // test sets one key to a 3-byte value.
    assert_eq!(cli(&p, vm, &["GET", "counter:__rand_int__"]), "2000\n", "every benchmark INCR counted once");
    assert_eq!(cli(&p, vm, &["GET", "key:__rand_int__"]).trim_end_matches('\n').len(), 3);
    assert_eq!(cli(&p, vm, &["DBSIZE"]), "7\n");
    assert_eq!(cli(&p, vm, &["MGET", "greeting", "n", "b"]), "hello world\n42\ntwo words\n");
    assert_alive(&mut p, "after redis-benchmark");
    shutdown(p, vm);
}

// ---------------------------------------------------------------------------
// a'. The write-ahead log on a virtio disk (each commit: one write and its
// flush, sent with one notify).

#[test]
fn writes_logged_on_the_disk_survive_a_restart() {
    let _serial = one_at_a_time();
    let lab = lab("rd", 92, &[("h", 1)], &["h"]);
    let vm = "10.92.0.10";
    let dir = Scratch::new("redis-disk");
    let disk = dir.path("redis.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();

    let mut p = start_vm(&lab, "h", vm, &["--disk", &disk]);
    assert!(p.stdout().contains("disk: 0 keys loaded from 0 records"), "{}", context(&p));
    assert_eq!(cli(&p, vm, &["SET", "greeting", "hello world"]), "OK\n");
    assert_eq!(cli(&p, vm, &["MSET", "a", "1", "b", "two words", "gone", "x"]), "OK\n");
    assert_eq!(cli(&p, vm, &["INCRBY", "n", "40"]), "40\n");
    assert_eq!(cli(&p, vm, &["INCR", "n"]), "41\n");
    assert_eq!(cli(&p, vm, &["DEL", "gone"]), "1\n");
    // Pipelined clients: many records to a commit.
    let bench = tool(
        "redis-benchmark",
        &["-h", vm, "-p", "6379", "-t", "set,incr", "-n", "2000", "-c", "8", "-P", "8", "-q"],
        Duration::from_secs(300),
    );
    assert_eq!(bench.status, Some(0), "redis-benchmark:\n{}\n{}\n{}", bench.stdout, bench.stderr, context(&p));
    assert_eq!(cli(&p, vm, &["DBSIZE"]), "6\n");
    assert_alive(&mut p, "after the writes");
    shutdown(p, vm);

    let p = start_vm(&lab, "h", vm, &["--disk", &disk]);
    assert!(p.stdout().contains("disk: 6 keys loaded from "), "{}", context(&p));
    assert_eq!(cli(&p, vm, &["MGET", "greeting", "a", "b", "gone", "n"]), "hello world\n1\ntwo words\n\n41\n");
    assert_eq!(cli(&p, vm, &["GET", "counter:__rand_int__"]), "2000\n", "every benchmark INCR was logged");
    assert_eq!(cli(&p, vm, &["DBSIZE"]), "6\n");
    shutdown(p, vm);
}

// ---------------------------------------------------------------------------
// b. Replay of a session with frames arriving at random moments, and a
// primary and backup that end with equal digests.

fn read_log(path: &str) -> Vec<Record> {
    let file = std::fs::File::open(path).expect("log exists");
    let (_, mut reader) = LogReader::new(BufReader::new(file)).expect("log header");
    let mut records = Vec::new();
    while let Some(r) = reader.next_record().expect("log reads") {
        records.push(r);
    }
    records
}

/// A client session against `vm`: the same commands whatever the seed, on
/// several connections (some replaced along the way, some commands
/// pipelined), with random pauses (from `seed`) between them, every reply
/// checked against a model of the store. Returns the commands sent.
fn random_session(p: &Proc, vm: &str, seed: u64) -> usize {
    let addr = format!("{vm}:6379");
    let open = || RespConn::connect(&addr, REPLY).unwrap_or_else(|e| panic!("connect: {e}\n{}", context(p)));
    let mut script = rand::rngs::StdRng::seed_from_u64(1000);
    let mut timing = rand::rngs::StdRng::seed_from_u64(seed);
    let mut conns: Vec<RespConn> = (0..3).map(|_| open()).collect();
    let mut model: HashMap<String, String> = HashMap::new();
    let mut sent = 0;
    for step in 0..150 {
        std::thread::sleep(Duration::from_micros(timing.gen_range(0..15_000)));
        let c = &mut conns[script.gen_range(0..3)];
        let key = format!("k{}", script.gen_range(0..20));
        let what = format!("step {step} (seed {seed})");
        match script.gen_range(0..8) {
            0 | 1 => {
                let value = format!("v{step}-{}", "x".repeat(script.gen_range(0..300)));
                assert_eq!(c.cmd(&["SET", &key, &value]).unwrap(), Reply::Simple("OK".into()), "{what}");
                model.insert(key, value);
                sent += 1;
            }
            2 => {
                assert_eq!(bulk(c.cmd(&["GET", &key])), model.get(&key).cloned(), "{what}: GET {key}");
                sent += 1;
            }
            3 => {
                let counter = format!("c{}", script.gen_range(0..3));
                let n = model.get(&counter).map_or(0, |v| v.parse::<i64>().unwrap()) + 1;
                assert_eq!(c.cmd(&["INCR", &counter]).unwrap(), Reply::Int(n), "{what}: INCR {counter}");
                model.insert(counter, n.to_string());
                sent += 1;
            }
            4 => {
                let (k2, v1, v2) = (format!("k{}", script.gen_range(0..20)), format!("m{step}"), format!("n{step}"));
                assert_eq!(c.cmd(&["MSET", &key, &v1, &k2, &v2]).unwrap(), Reply::Simple("OK".into()), "{what}");
                model.insert(key.clone(), v1);
                model.insert(k2.clone(), v2);
                let want: Vec<Reply> = [&key, &k2, &"nokey".to_string()]
                    .iter()
                    .map(|k| Reply::Bulk(model.get(*k).map(|v| v.as_bytes().to_vec())))
                    .collect();
                assert_eq!(c.cmd(&["MGET", &key, &k2, "nokey"]).unwrap(), Reply::Array(Some(want)), "{what}: MGET");
                sent += 2;
            }
            5 => {
                let existed = model.remove(&key).is_some();
                assert_eq!(c.cmd(&["DEL", &key]).unwrap(), Reply::Int(existed as i64), "{what}: DEL {key}");
                sent += 1;
            }
            6 => {
                // Pipelined: several commands in flight before any reply.
                let n = script.gen_range(2..6);
                let mut expected = Vec::new();
                for i in 0..n {
                    let (k, v) = (format!("p{}", script.gen_range(0..10)), format!("pipe{step}.{i}"));
                    c.send(&["SET", &k, &v]).unwrap();
                    c.send(&["GET", &k]).unwrap();
                    expected.push(Reply::Simple("OK".into()));
                    expected.push(Reply::Bulk(Some(v.as_bytes().to_vec())));
                    model.insert(k, v);
                }
                for (i, want) in expected.into_iter().enumerate() {
                    assert_eq!(c.read_reply().unwrap(), want, "{what}: pipelined reply {i}");
                }
                sent += 2 * n;
            }
            _ => {
                // A connection replaced: QUIT, or just closed.
                let i = script.gen_range(0..3);
                let mut old = std::mem::replace(&mut conns[i], open());
                if script.gen_bool(0.5) {
                    assert_eq!(old.cmd(&["QUIT"]).unwrap(), Reply::Simple("OK".into()), "{what}: QUIT");
                    sent += 1;
                }
            }
        }
    }
    let c = &mut conns[0];
    assert_eq!(c.cmd(&["DBSIZE"]).unwrap(), Reply::Int(model.len() as i64), "DBSIZE at the end (seed {seed})");
    for (k, v) in &model {
        assert_eq!(bulk(c.cmd(&["GET", k])).as_ref(), Some(v), "GET {k} at the end (seed {seed})");
    }
    sent + 1 + model.len()
}

#[test]
fn sessions_with_frames_at_random_moments_replay_to_the_same_output_and_digest() {
    let _serial = one_at_a_time();
    let lab = lab("rr", 87, &[("h", 1)], &["h"]);
    let dir = Scratch::new("redis-replay");
    let vm = "10.87.0.10";
    let cmdline = format!("ip={vm}/24");
    let mut arrivals: Vec<Vec<u64>> = Vec::new();
    for seed in 1..=3u64 {
        let log = dir.path(&format!("session-{seed}.log"));
        let seed_text = seed.to_string();
        let started = Instant::now();
        let p = start_vm(&lab, "h", vm, &["--record", &log, "--digest", "--perturb-seed", &seed_text]);
        let commands = random_session(&p, vm, seed);
        let rec = shutdown(p, vm);
        let digest = rec.digest().unwrap_or_else(|| panic!("no digest:\n{}", rec.stderr));
        let recorded = started.elapsed();
        for attempt in 0..2 {
            // The TAP is not opened: frames come from the log (and there is
            // no fttap in this namespace).
            let started = Instant::now();
            let rep = ftvmm_tests::run(
                &["--guest", "redis", "--cmdline", &cmdline, "--net", NET, "--replay", &log, "--digest"],
                TIMEOUT,
            );
            assert_eq!(rep.code(), 0, "replay {seed}/{attempt}:\n{}", rep.stderr);
            assert_eq!(rep.stdout, rec.stdout, "replay {seed}/{attempt}: serial output");
            assert_eq!(rep.digest().as_ref(), Some(&digest), "replay {seed}/{attempt}: state digest\n{}", rep.stderr);
            eprintln!("seed {seed}: {commands} commands recorded in {recorded:?}, replayed in {:?}", started.elapsed());
        }
        let records = read_log(&log);
        let rx: Vec<u64> = records
            .iter()
            .filter(|r| matches!(r.entry, Entry::Event(Event::NetRx { .. })))
            .map(|r| r.position.exit)
            .collect();
        assert!(
            rx.len() > commands / 2,
            "seed {seed}: only {} received frames logged for {commands} commands",
            rx.len()
        );
        arrivals.push(rx);
    }
    // Where the frames arrived (the exits they were delivered at) differs
    // from one recording to the next: the session was timing-sensitive.
    for (a, b) in [(0, 1), (1, 2), (0, 2)] {
        assert_ne!(arrivals[a], arrivals[b], "recordings {} and {} took frames at the same exits", a + 1, b + 1);
    }
}

/// A primary and a backup of the `redis` guest on two lab hosts, with an
/// arbiter on a third, both printing their state digest at exit.
struct Pair {
    primary: Proc,
    backup: Proc,
    _arbiter: KillOnDrop,
    _lab: Lab,
    _dir: Scratch,
}

impl Pair {
    fn start(tag: &str, subnet: u8, vm: &str) -> Pair {
        let net = format!("10.{subnet}.0");
        let lab = lab(tag, subnet, &[("p", 1), ("b", 2), ("s", 4)], &["p", "b"]);
        let dir = Scratch::new("redis-pair");
        let ns = |h: &str| lab.host(h).unwrap().ns.clone();
        let (primary, backup, arbiter) = ftvmm_tests::spawn_redis_pair(
            [&ns("p"), &ns("b"), &ns("s")],
            &net,
            vm,
            &dir,
            &["--heartbeat-ms", "300", "--digest"],
        );
        let pair = Pair { primary, backup, _arbiter: arbiter, _lab: lab, _dir: dir };
        let deadline = Instant::now() + START;
        while !pair.primary.stderr().iter().any(|l| l.contains("backup attached")) {
            assert!(
                Instant::now() < deadline,
                "the backup never attached\nprimary: {}\nbackup: {}",
                context(&pair.primary),
                context(&pair.backup)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pair
    }
}

#[test]
fn a_primary_and_its_backup_end_a_scripted_session_with_equal_digests() {
    let _serial = one_at_a_time();
    let vm = "10.88.0.10";
    let mut pair = Pair::start("rp", 88, vm);
    let mut c = connect(&mut pair.primary, vm);
    let mut other = connect(&mut pair.primary, vm);
    for i in 0..100 {
        let (k, v) = (format!("key{i}"), format!("value{i}"));
        assert_eq!(c.cmd(&["SET", &k, &v]).unwrap(), Reply::Simple("OK".into()), "SET {k}");
        assert_eq!(other.cmd(&["INCR", "counter"]).unwrap(), Reply::Int(i + 1), "INCR {i}");
    }
    assert_eq!(c.cmd(&["MSET", "a", "1", "b", "2"]).unwrap(), Reply::Simple("OK".into()));
    assert_eq!(c.cmd(&["DEL", "key0", "nokey"]).unwrap(), Reply::Int(1));
    assert_eq!(bulk(other.cmd(&["GET", "key99"])).as_deref(), Some("value99"));
    assert_eq!(c.cmd(&["DBSIZE"]).unwrap(), Reply::Int(99 + 1 + 2));
    drop(other);
    // Bulk traffic both ways through the pair: 4 MiB into the guest's
    // discard service, 4 MiB out of its source, while the backup replays
    // every frame (window-full bursts, transmits picked up at exits).
    ftvmm_tests::send_to_discard(vm, 4 << 20);
    ftvmm_tests::read_from_source(vm, 4 << 20);
    c.send(&["SHUTDOWN"]).unwrap();
    let Pair { primary, backup, .. } = pair;
    let (p, b) = (primary.finish(TIMEOUT), backup.finish(TIMEOUT));
    let both = format!("primary stdout:\n{}\nprimary stderr:\n{}\nbackup stderr:\n{}", p.stdout, p.stderr, b.stderr);
    assert_eq!(p.code(), 0, "the primary's status\n{both}");
    assert_eq!(b.code(), 0, "the backup's status\n{both}");
    assert!(p.stdout.contains("redis: shutting down"), "{both}");
    assert!(!b.stderr.contains("going live"), "the backup went live although the primary ended cleanly\n{both}");
    let (pd, bd) = (p.digest(), b.digest());
    assert!(pd.is_some(), "no primary digest\n{both}");
    assert_eq!(pd, bd, "the primary's and the backup's state digests\n{both}");
}

// ---------------------------------------------------------------------------
// f. Bad input.

/// An AF_PACKET socket that sends raw Ethernet frames out of an interface
/// (and receives nothing: it is bound with protocol 0), paced so that the
/// frames reach the guest rather than overflow the VMM's receive queue.
struct RawSocket(std::os::fd::OwnedFd, std::cell::Cell<u64>);

impl RawSocket {
    fn bind(ifname: &str) -> RawSocket {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {} (needs root)", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let sock = RawSocket(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }, Default::default());
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: name is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index != 0, "no interface {ifname}: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; all zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        // SAFETY: addr is a sockaddr_ll of the size given, alive for the call.
        let r = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "bind to {ifname}: {}", std::io::Error::last_os_error());
        sock
    }

    /// Sends one frame as it is (retrying while the device queue is full).
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        self.1.set(self.1.get() + 1);
        if self.1.get().is_multiple_of(16) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut tries = 0;
        loop {
            // SAFETY: sends frame.len() bytes from a live slice.
            let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n == frame.len() as isize {
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            if n < 0 && err.raw_os_error() == Some(libc::ENOBUFS) && tries < 100 {
                tries += 1;
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            return Err(if n < 0 { err } else { std::io::Error::other(format!("sent {n} of {} bytes", frame.len())) });
        }
    }
}

/// Our frames' source: a locally administered MAC nobody has.
const FAKE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
const BROADCAST: [u8; 6] = [0xff; 6];

fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&FAKE_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet with a correct 20-byte header.
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Recomputes an IPv4 header's checksum after a tweak (header of `ihl` words,
/// or what there is of it).
fn fix_ip_checksum(p: &mut [u8]) {
    let len = (usize::from(p[0] & 0xf) * 4).clamp(20, p.len());
    p[10] = 0;
    p[11] = 0;
    let sum = checksum(&p[..len]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// A TCP segment with a correct checksum; `offset_words` overrides the
/// data offset the options imply.
fn tcp(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), flags: u8, options: &[u8], offset_words: Option<u8>) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&ports.0.to_be_bytes());
    s.extend_from_slice(&ports.1.to_be_bytes());
    s.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    s.extend_from_slice(&0u32.to_be_bytes());
    let words = offset_words.unwrap_or((5 + options.len().div_ceil(4)) as u8);
    s.push(words << 4);
    s.push(flags);
    s.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    s.extend_from_slice(options);
    while s.len() % 4 != 0 {
        s.push(0);
    }
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(s.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&s);
    let sum = checksum(&pseudo);
    s[16..18].copy_from_slice(&sum.to_be_bytes());
    s
}

fn random_bytes(rng: &mut impl Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.gen()).collect()
}

/// Runts, bogus ethertypes, truncated and inconsistent IPv4/TCP/UDP/ICMP/ARP
/// headers, and maximum-size frames, each as (what, frame) to the VM's MAC.
fn bad_frames(rng: &mut impl Rng, vm: [u8; 4], fake: [u8; 4]) -> Vec<(String, Vec<u8>)> {
    let mut f: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |what: &str, frame: Vec<u8>| f.push((what.to_string(), frame));
    add("a 60-byte runt of zeros (IPv4)", eth(VM_MAC, 0x0800, &[0; 46]));
    add("a 60-byte runt of zeros (ARP)", eth(VM_MAC, 0x0806, &[0; 46]));
    add("a 60-byte runt of zeros (IPv6)", eth(VM_MAC, 0x86dd, &[0; 46]));
    add("an Ethernet header alone", eth(VM_MAC, 0x0800, &[]));
    add("a 15-byte frame", eth(VM_MAC, 0x0800, &[0x45]));
    for ethertype in [0x1234, 0xffff, 0x0000, 0x05dc, 0x88cc, 0x8100, 0x88a8, 0x8863] {
        let n = rng.gen_range(1..600);
        add(&format!("ethertype {ethertype:#06x}, {n} garbage bytes"), eth(VM_MAC, ethertype, &random_bytes(rng, n)));
    }
    let syn = tcp(fake, vm, (40000, 6379), 0x02, &[2, 4, 5, 0xb4], None);
    let good = ipv4(fake, vm, 6, &syn);
    add("an IPv4 header cut at 10 bytes", eth(VM_MAC, 0x0800, &good[..10]));
    add("an IPv4 header cut at 19 bytes", eth(VM_MAC, 0x0800, &good[..19]));
    for (what, byte, value) in [
        ("IPv4 IHL 15 in a 44-byte packet", 0, 0x4f),
        ("IPv4 IHL 4", 0, 0x44),
        ("IPv4 IHL 0", 0, 0x40),
        ("IP version 6 under the IPv4 ethertype", 0, 0x65),
        ("IP version 0", 0, 0x05),
        ("IPv4 fragment with more-fragments set", 6, 0x20),
        ("IPv4 fragment at offset 8191*8", 6, 0x1f),
        ("IPv4 TTL 0", 8, 0),
        ("IPv4 protocol 255", 9, 255),
    ] {
        let mut p = good.clone();
        p[byte] = value;
        if byte == 6 && value == 0x1f {
            p[7] = 0xff;
        }
        fix_ip_checksum(&mut p);
        add(what, eth(VM_MAC, 0x0800, &p));
    }
    for (what, total) in [
        ("IPv4 total length 1500 in a short frame", 1500u16),
        ("IPv4 total length 10", 10),
        ("IPv4 total length 0", 0),
        ("IPv4 total length 65535", 65535),
    ] {
        let mut p = good.clone();
        p[2..4].copy_from_slice(&total.to_be_bytes());
        fix_ip_checksum(&mut p);
        add(what, eth(VM_MAC, 0x0800, &p));
    }
    let mut p = good.clone();
    p[10] ^= 0xff;
    add("an IPv4 header with a bad checksum", eth(VM_MAC, 0x0800, &p));
    let mut opts = ipv4(fake, vm, 6, &syn);
    opts.splice(20..20, [0x44, 0x00, 0x05, 0x00]); // a timestamp option of length 0
    opts[0] = 0x46;
    let total = opts.len() as u16;
    opts[2..4].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut opts);
    add("IPv4 options with an option of length 0", eth(VM_MAC, 0x0800, &opts));
    add("a TCP header cut at 8 bytes", eth(VM_MAC, 0x0800, &ipv4(fake, vm, 6, &syn[..8])));
    add("a TCP header cut at 19 bytes", eth(VM_MAC, 0x0800, &ipv4(fake, vm, 6, &syn[..19])));
    for (what, options, offset) in [
        ("TCP data offset 15 in a 24-byte segment", &[2u8, 4, 5, 0xb4][..], Some(15)),
        ("TCP data offset 2", &[][..], Some(2)),
        ("TCP data offset 0", &[][..], Some(0)),
        ("a TCP option of length 0", &[2, 0, 5, 0xb4][..], None),
        ("a TCP option of length 1", &[3, 1, 0, 0][..], None),
        ("a TCP option of length 40", &[2, 40, 5, 0xb4][..], None),
        ("a TCP window-scale option of length 2", &[3, 2, 1, 1][..], None),
        ("a TCP SACK option of length 255", &[5, 255, 0, 0, 0, 0, 0, 0][..], None),
        ("TCP options with no end", &[1, 1, 1, 8][..], None),
    ] {
        let seg = tcp(fake, vm, (40001, 6379), 0x02, options, offset);
        add(&format!("a SYN to 6379 with {what}"), eth(VM_MAC, 0x0800, &ipv4(fake, vm, 6, &seg)));
    }
    add(
        "a TCP segment with every flag set",
        eth(VM_MAC, 0x0800, &ipv4(fake, vm, 6, &tcp(fake, vm, (40002, 6379), 0xff, &[], None))),
    );
    add(
        "a TCP segment with no flag set",
        eth(VM_MAC, 0x0800, &ipv4(fake, vm, 6, &tcp(fake, vm, (40003, 6379), 0, &[], None))),
    );
    add(
        "a TCP ACK to a closed port",
        eth(VM_MAC, 0x0800, &ipv4(fake, vm, 6, &tcp(fake, vm, (40004, 1), 0x10, &[], None))),
    );
    add(
        "a TCP ACK for no connection on 6379",
        eth(VM_MAC, 0x0800, &ipv4(fake, vm, 6, &tcp(fake, vm, (40005, 6379), 0x18, &[], None))),
    );
    let mut bad_sum = tcp(fake, vm, (40006, 6379), 0x02, &[], None);
    bad_sum[16] ^= 0x55;
    add("a SYN with a bad TCP checksum", eth(VM_MAC, 0x0800, &ipv4(fake, vm, 6, &bad_sum)));
    add("a UDP header cut at 4 bytes", eth(VM_MAC, 0x0800, &ipv4(fake, vm, 17, &[0x12, 0x34, 0x00, 0x35])));
    add(
        "a UDP length of 65535",
        eth(VM_MAC, 0x0800, &ipv4(fake, vm, 17, &[0x12, 0x34, 0x00, 0x35, 0xff, 0xff, 0, 0, 1, 2])),
    );
    add("a UDP length of 2", eth(VM_MAC, 0x0800, &ipv4(fake, vm, 17, &[0x12, 0x34, 0x00, 0x44, 0x00, 0x02, 0, 0])));
    add("an ICMP header cut at 3 bytes", eth(VM_MAC, 0x0800, &ipv4(fake, vm, 1, &[8, 0, 0])));
    add(
        "an ICMP echo with a bad checksum",
        eth(VM_MAC, 0x0800, &ipv4(fake, vm, 1, &[8, 0, 0x12, 0x34, 0, 1, 0, 1, 9, 9])),
    );
    let mut echo = vec![8u8, 0, 0, 0, 0x42, 0x42, 0, 1];
    echo.extend(random_bytes(rng, 1514 - 14 - 20 - 8));
    let sum = checksum(&echo);
    echo[2..4].copy_from_slice(&sum.to_be_bytes());
    add("a maximum-size ICMP echo request (1514 bytes)", eth(VM_MAC, 0x0800, &ipv4(fake, vm, 1, &echo)));
    add("an ARP packet cut at 10 bytes", eth(VM_MAC, 0x0806, &[0, 1, 8, 0, 6, 4, 0, 1, 2, 0]));
    let mut arp = vec![0u8, 1, 8, 0, 255, 255, 0, 1];
    arp.extend(random_bytes(rng, 30));
    add("an ARP packet with lengths 255/255", eth(VM_MAC, 0x0806, &arp));
    let mut arp = vec![0u8, 99, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&FAKE_MAC);
    arp.extend_from_slice(&fake);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&vm);
    add("an ARP request for the VM with hardware type 99", eth(VM_MAC, 0x0806, &arp));
    add("an IPv6 header cut at 10 bytes", eth(VM_MAC, 0x86dd, &[0x60, 0, 0, 0, 0xff, 0xff, 58, 64, 0xfe, 0x80]));
    let mut v6 = vec![0x60u8, 0, 0, 0, 0xff, 0xff, 0, 64];
    v6.extend(random_bytes(rng, 32 + 40));
    add("an IPv6 hop-by-hop header claiming 65535 bytes", eth(VM_MAC, 0x86dd, &v6));
    add("UDP garbage to 255.255.255.255", eth(VM_MAC, 0x0800, &ipv4(fake, [255; 4], 17, &random_bytes(rng, 100))));
    for (what, ethertype) in [("IPv4", 0x0800u16), ("ARP", 0x0806), ("ethertype 0x4242", 0x4242)] {
        add(
            &format!("a maximum-size (1514-byte) {what} frame of garbage"),
            eth(VM_MAC, ethertype, &random_bytes(rng, 1500)),
        );
    }
    let data = random_bytes(rng, 1460);
    let mut seg = tcp(fake, vm, (40007, 6379), 0x18, &[], None);
    seg.extend_from_slice(&data);
    add("a maximum-size TCP segment for no connection", eth(VM_MAC, 0x0800, &ipv4(fake, vm, 6, &seg)));
    for n in 1515..=1518 {
        add(&format!("a {n}-byte VLAN-tagged frame (longer than the guest's 1514)"), vlan_frame(rng, n));
    }
    f
}

/// A VLAN-tagged IPv4 frame of `n` bytes (on a 1500-byte LAN, tagged frames
/// may be up to 1518 bytes long) with a garbage payload.
fn vlan_frame(rng: &mut impl Rng, n: usize) -> Vec<u8> {
    let mut payload = vec![0x00, 0x01, 0x08, 0x00];
    payload.extend(random_bytes(rng, n - 18));
    eth(VM_MAC, 0x8100, &payload)
}

/// The TAP's transmit counters as its namespace's kernel sees them: frames
/// handed to the VMM, and frames dropped before it.
fn tap_tx(ns: &str) -> (u64, u64) {
    let out = Command::new("ip").args(["-n", ns, "-s", "link", "show", "fttap"]).output().expect("ip -s link");
    let text = String::from_utf8_lossy(&out.stdout);
    // "TX:  bytes packets errors dropped ..." then the numbers on the next line.
    let numbers: Vec<u64> = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("TX:"))
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(numbers.len() >= 4, "cannot read the TAP's counters:\n{text}");
    (numbers[1], numbers[3])
}

fn ip_link(args: &str) {
    let status = Command::new("sh").args(["-c", &format!("ip {args}")]).status().expect("ip");
    assert!(status.success(), "`ip {args}` failed");
}

#[test]
fn runt_oversize_and_garbage_frames_leave_the_vm_serving_its_store_intact() {
    let _serial = one_at_a_time();
    let lab = lab("rf", 89, &[("h", 1)], &["h"]);
    let vm = "10.89.0.10";
    let vm_ip = [10, 89, 0, 10];
    let fake_ip = [10, 89, 0, 200];
    let mut p = start_vm(&lab, "h", vm, &[]);
    let mut c = connect(&mut p, vm);
    for i in 0..50 {
        assert_eq!(c.cmd(&["SET", &format!("before{i}"), &format!("value{i}")]).unwrap(), Reply::Simple("OK".into()));
    }
    // A client keeps INCRementing on its own connection meanwhile.
    let worker = Incrementer::start(vm, "during");
    let before = worker.count();

    let ns = lab.host("h").unwrap().ns.clone();
    // Where br_netfilter is loaded, bridges hand IPv4/IPv6 frames to
    // iptables, which drops malformed ones before they reach the TAP: turn
    // that off in the VM host's namespace (its own sysctls; the root
    // namespace's are untouched).
    let nf = "for f in /proc/sys/net/bridge/bridge-nf-call-*; do [ -e \"$f\" ] && echo 0 > \"$f\"; done; true";
    let status = Command::new("ip").args(["netns", "exec", &ns, "sh", "-c", nf]).status().expect("ip netns exec");
    assert!(status.success(), "cannot turn br_netfilter off in {ns}");
    let tap_before = tap_tx(&ns);
    let raw = RawSocket::bind(&format!("{}-br0", lab.name));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xf0f0);
    let frames = bad_frames(&mut rng, vm_ip, fake_ip);
    let started = Instant::now();
    let mut sent = 0;
    for round in 0..3 {
        for (what, frame) in &frames {
            for dst in [VM_MAC, BROADCAST] {
                let mut frame = frame.clone();
                frame[..6].copy_from_slice(&dst);
                raw.send(&frame).unwrap_or_else(|e| panic!("sending {what} ({} bytes): {e}", frame.len()));
                sent += 1;
            }
        }
        eprintln!("round {round}: {} kinds of bad frame sent", frames.len());
    }
    // More frames the guest cannot take (1515..1518 bytes: the VMM takes
    // them, finds they do not fit the guest's buffer, and completes it
    // empty) than its receive ring has buffers.
    for i in 0..600 {
        raw.send(&vlan_frame(&mut rng, 1515 + i % 4)).unwrap();
        sent += 1;
    }
    // A flood of random frames of random sizes.
    for _ in 0..3000 {
        let dst = if rng.gen_bool(0.5) { VM_MAC } else { BROADCAST };
        let ethertype = [0x0800, 0x0806, 0x86dd, rng.gen()][rng.gen_range(0..4)];
        let n = rng.gen_range(0..=1500);
        raw.send(&eth(dst, ethertype, &random_bytes(&mut rng, n))).unwrap();
        sent += 1;
    }
    // Oversize frames (the VMM takes at most 1518 bytes): raise the LAN's
    // MTU to the largest a TAP takes (65521: 65535-byte frames), send, and put
    // it back.
    let path = [
        format!("link set {}-v1 mtu MTU", lab.name),
        format!("-n {ns} link set eth0 mtu MTU"),
        format!("-n {ns} link set fttap mtu MTU"),
        format!("-n {ns} link set br0 mtu MTU"),
        format!("link set {}-br0 mtu MTU", lab.name),
    ];
    for step in &path {
        ip_link(&step.replace("MTU", "65521"));
    }
    for n in [1519, 1600, 4000, 9014, 16_000, 65_535] {
        for _ in 0..20 {
            let frame = eth(VM_MAC, 0x0800, &random_bytes(&mut rng, n - 14));
            raw.send(&frame).unwrap_or_else(|e| panic!("sending an oversize frame of {n} bytes: {e}"));
            sent += 1;
        }
    }
    for step in path.iter().rev() {
        ip_link(&step.replace("MTU", "1500"));
    }
    eprintln!("{sent} bad frames sent in {:?}", started.elapsed());
    // They all went out of the TAP, to the VMM (every one is to the VM's MAC
    // or broadcast), besides the client's own traffic.
    let tap_after = tap_tx(&ns);
    let (handed, dropped) = (tap_after.0 - tap_before.0, tap_after.1 - tap_before.1);
    eprintln!("the TAP handed the VMM {handed} frames and dropped {dropped}");
    assert!(
        handed >= sent,
        "only {handed} of {sent} frames reached the VMM ({dropped} dropped; is a netfilter bridge hook filtering the lab?)"
    );

    let during = worker.count() - before;
    eprintln!("{during} INCRs on the other connection while they were sent");
    // That connection carries on.
    worker.wait_for(worker.count() + 20, &p);
    let incrs = worker.stop(&p);
    assert_alive(&mut p, "after the bad frames");
    // The connection made before still works, and so does a new one.
    assert_eq!(c.cmd(&["PING"]).unwrap(), Reply::Simple("PONG".into()), "{}", context(&p));
    let mut fresh = connect(&mut p, vm);
    assert_eq!(fresh.cmd(&["SET", "after", "frames"]).unwrap(), Reply::Simple("OK".into()));
    assert_eq!(bulk(c.cmd(&["GET", "after"])).as_deref(), Some("frames"));
    for i in 0..50 {
        assert_eq!(bulk(fresh.cmd(&["GET", &format!("before{i}")])), Some(format!("value{i}")), "before{i}");
    }
    assert_eq!(bulk(fresh.cmd(&["GET", "during"])), Some(incrs.to_string()));
    assert_eq!(fresh.cmd(&["DBSIZE"]).unwrap(), Reply::Int(52));
    drop((c, fresh));
    shutdown(p, vm);
}

/// A client INCRementing one key on its own connection, in a thread,
/// checking that every value is the one before plus one.
struct Incrementer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicI64>,
    handle: std::thread::JoinHandle<Result<i64, String>>,
}

impl Incrementer {
    /// Starts once its connection has done a first INCR.
    fn start(vm: &str, key: &str) -> Incrementer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicI64::new(0));
        let (addr, key) = (format!("{vm}:6379"), key.to_string());
        let handle = {
            let (stop, count) = (stop.clone(), count.clone());
            std::thread::spawn(move || -> Result<i64, String> {
                let mut c = RespConn::connect(&addr, REPLY).map_err(|e| e.to_string())?;
                let mut n = 0;
                while n == 0 || !stop.load(Ordering::Relaxed) {
                    match c.cmd(&["INCR", &key]) {
                        Ok(Reply::Int(v)) if v == n + 1 => n = v,
                        other => return Err(format!("INCR {key} number {} answered {other:?}", n + 1)),
                    }
                    count.store(n, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(n)
            })
        };
        let worker = Incrementer { stop, count, handle };
        let deadline = Instant::now() + REPLY;
        while worker.count() == 0 && !worker.handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        worker
    }

    /// INCRs answered so far.
    fn count(&self) -> i64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits (at most REPLY) until `n` INCRs were answered.
    fn wait_for(&self, n: i64, p: &Proc) {
        let deadline = Instant::now() + REPLY;
        while self.count() < n {
            assert!(
                Instant::now() < deadline && !self.handle.is_finished(),
                "the INCRementing connection stalled at {} (want {n})\n{}",
                self.count(),
                context(p)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops it: the number of INCRs, all answered in order.
    fn stop(self, p: &Proc) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("the INCRementing connection broke: {e}\n{}", context(p)),
            Err(_) => panic!("the INCRementing thread panicked"),
        }
    }
}

/// What a garbage request must get.
enum Outcome {
    /// An error reply containing this, then the server closes.
    ErrorThenClose(&'static str),
    /// A reply line starting with this, and the connection stays usable.
    ReplyStaysOpen(&'static str),
    /// No reply; the server closes (the client half-closed mid-request).
    ClosedSilently,
}

/// A plain connection for garbage.
struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    fn connect(vm: &str) -> Raw {
        let s = TcpStream::connect(format!("{vm}:6379")).expect("connect");
        s.set_read_timeout(Some(REPLY)).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { writer: s.try_clone().unwrap(), reader: BufReader::new(s) }
    }

    /// One reply line; Ok(None) at EOF.
    fn line(&mut self) -> std::io::Result<Option<String>> {
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf)? {
            0 => Ok(None),
            _ => Ok(Some(String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string())),
        }
    }

    /// True once the server has closed: EOF or a reset, within REPLY.
    fn closed(&mut self) -> Result<bool, String> {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => Ok(true),
            Ok(_) => Err(format!("more bytes before the close: {:?}", String::from_utf8_lossy(&rest))),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
            Err(e) => Err(format!("not closed: {e}")),
        }
    }
}

#[test]
fn garbage_resp_on_one_connection_leaves_the_others_and_the_store_intact() {
    let _serial = one_at_a_time();
    let lab = lab("rg", 90, &[("h", 1)], &["h"]);
    let vm = "10.90.0.10";
    let mut p = start_vm(&lab, "h", vm, &[]);
    let mut c = connect(&mut p, vm);
    for i in 0..50 {
        assert_eq!(c.cmd(&["SET", &format!("key{i}"), &format!("value{i}")]).unwrap(), Reply::Simple("OK".into()));
    }
    assert_eq!(c.cmd(&["SET", "text", "not a number"]).unwrap(), Reply::Simple("OK".into()));

    let worker = Incrementer::start(vm, "ticks");
    let before = worker.count();

    let big_bulk = [&b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$100000\r\n"[..], &[b'x'; 20_000]].concat();
    let long_value = format!("*3\r\n$3\r\nSET\r\n$4\r\nkey1\r\n$600\r\n{}\r\n", "y".repeat(600));
    let long_key = format!("*3\r\n$3\r\nSET\r\n$513\r\n{}\r\n$1\r\nv\r\n", "k".repeat(513));
    let cases: Vec<(&str, Vec<u8>, Outcome)> = vec![
        ("*abc", b"*abc\r\n".to_vec(), Outcome::ErrorThenClose("Protocol error: invalid multibulk length")),
        ("a bulk length of -5", b"*1\r\n$-5\r\n".to_vec(), Outcome::ErrorThenClose("invalid bulk length")),
        ("$-5 as an inline command", b"$-5\r\n".to_vec(), Outcome::ReplyStaysOpen("-ERR unknown command '$-5'")),
        ("a bulk length over 1 MiB", b"*1\r\n$2000000\r\n".to_vec(), Outcome::ErrorThenClose("invalid bulk length")),
        ("a 100000-byte bulk string", big_bulk, Outcome::ErrorThenClose("request too large")),
        (
            "a bulk length of 2^63",
            b"*1\r\n$9223372036854775808\r\n".to_vec(),
            Outcome::ErrorThenClose("invalid bulk length"),
        ),
        ("5000 arguments", b"*5000\r\n".to_vec(), Outcome::ErrorThenClose("too many arguments")),
        (
            "an overlong array length",
            b"*99999999999999999999999\r\n".to_vec(),
            Outcome::ErrorThenClose("invalid multibulk length"),
        ),
        (
            "a bulk string not ended by CRLF",
            b"*1\r\n$4\r\nPINGxx".to_vec(),
            Outcome::ErrorThenClose("not followed by CRLF"),
        ),
        ("a simple string in a request", b"*1\r\n+PING\r\n".to_vec(), Outcome::ErrorThenClose("expected '$'")),
        ("an inline line of 70000 bytes", vec![b'a'; 70_000], Outcome::ErrorThenClose("request too large")),
        ("NUL bytes", b"\0\0\0\0\r\n".to_vec(), Outcome::ReplyStaysOpen("-ERR unknown command")),
        (
            "an empty and a null array, then PING",
            b"*0\r\n*-1\r\n\r\nPING\r\n".to_vec(),
            Outcome::ReplyStaysOpen("+PONG"),
        ),
        ("a 600-byte value", long_value.into_bytes(), Outcome::ReplyStaysOpen("-ERR key or value too long")),
        ("a 513-byte key", long_key.into_bytes(), Outcome::ReplyStaysOpen("-ERR key or value too long")),
        ("INCR of a string", b"INCR text\r\n".to_vec(), Outcome::ReplyStaysOpen("-ERR value is not an integer")),
        (
            "INCRBY of garbage",
            b"INCRBY key2 12abc\r\n".to_vec(),
            Outcome::ReplyStaysOpen("-ERR value is not an integer"),
        ),
        ("SET with options", b"SET key3 x EX 10\r\n".to_vec(), Outcome::ReplyStaysOpen("-ERR syntax error")),
        (
            "MSET with an odd count",
            b"MSET key4 a key5\r\n".to_vec(),
            Outcome::ReplyStaysOpen("-ERR wrong number of arguments"),
        ),
        ("GET with no key", b"*1\r\n$3\r\nGET\r\n".to_vec(), Outcome::ReplyStaysOpen("-ERR wrong number of arguments")),
        (
            "an unknown command",
            b"FLY me to the moon\r\n".to_vec(),
            Outcome::ReplyStaysOpen("-ERR unknown command 'FLY'"),
        ),
        (
            "half a SET, then the client half-closes",
            b"*3\r\n$3\r\nSET\r\n$4\r\nhalf\r\n".to_vec(),
            Outcome::ClosedSilently,
        ),
    ];
    for (what, bytes, outcome) in &cases {
        let mut g = Raw::connect(vm);
        // The server may close (or reset) while a long request is still
        // being written: fine, what it answered is still readable.
        let _ = g.writer.write_all(bytes);
        macro_rules! fail {
            ($($why:tt)*) => {
                panic!("{what}: {}\n{}", format!($($why)*), context(&p))
            };
        }
        match outcome {
            Outcome::ErrorThenClose(text) => {
                let line = g.line().unwrap_or_else(|e| fail!("no reply: {e}"));
                match line {
                    Some(l) if l.starts_with("-ERR") && l.contains(text) => {}
                    other => fail!("want an error with {text:?}, got {other:?}"),
                }
                if let Err(e) = g.closed() {
                    fail!("the connection was not closed after the error: {e}");
                }
            }
            Outcome::ReplyStaysOpen(text) => {
                let line = g.line().unwrap_or_else(|e| fail!("no reply: {e}"));
                match line {
                    Some(l) if l.starts_with(text) => {}
                    other => fail!("want a reply starting {text:?}, got {other:?}"),
                }
                g.writer.write_all(b"PING\r\n").unwrap();
                match g.line() {
                    Ok(Some(l)) if l == "+PONG" => {}
                    other => fail!("the connection is out of step afterwards: {other:?}"),
                }
            }
            Outcome::ClosedSilently => {
                g.writer.shutdown(Shutdown::Write).unwrap();
                if let Err(e) = g.closed() {
                    fail!("want a silent close: {e}");
                }
            }
        }
    }
    // Random bytes: whatever they are, only error replies, or a close, or
    // (an incomplete request) nothing yet.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xbad);
    let (mut refused, mut closed) = (0, 0);
    for i in 0..20 {
        let n = rng.gen_range(1..5000);
        let mut bytes = random_bytes(&mut rng, n);
        if i % 2 == 0 {
            bytes[0] = b'*';
        }
        let mut g = Raw::connect(vm);
        let _ = g.writer.write_all(&bytes);
        g.reader.get_ref().set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut got = Vec::new();
        closed += g.reader.read_to_end(&mut got).is_ok() as usize;
        let text = String::from_utf8_lossy(&got);
        for line in text.split_terminator("\r\n") {
            assert!(
                line.starts_with("-ERR"),
                "random bytes #{i}: a reply that is not an error: {line:?} (all: {text:?})\n{}",
                context(&p)
            );
        }
        refused += !got.is_empty() as usize;
    }
    eprintln!("random bytes: 20 connections, {refused} got errors, {closed} were closed by the server");
    assert!(refused >= 10, "only {refused} of 20 connections sending random bytes got an error reply");
    // A command before the garbage, in the same write, is done; the garbage
    // after it is refused.
    let mut g = Raw::connect(vm);
    g.writer.write_all(b"*3\r\n$3\r\nSET\r\n$4\r\ngood\r\n$2\r\nok\r\n*x\r\n").unwrap();
    assert_eq!(g.line().unwrap().as_deref(), Some("+OK"));
    assert!(g.line().unwrap().is_some_and(|l| l.starts_with("-ERR Protocol error")));
    assert_eq!(g.closed(), Ok(true));

    let during = worker.count() - before;
    assert!(during > 0, "no INCR went through on the other connection while the garbage was sent");
    eprintln!("{during} INCRs on the other connection while the garbage was sent");
    worker.wait_for(worker.count() + 20, &p);
    let ticks = worker.stop(&p);
    assert_alive(&mut p, "after the garbage");
    // The store: what was set before, untouched by the refused writes.
    for i in 0..50 {
        assert_eq!(bulk(c.cmd(&["GET", &format!("key{i}")])), Some(format!("value{i}")), "key{i}");
    }
    assert_eq!(bulk(c.cmd(&["GET", "text"])).as_deref(), Some("not a number"));
    assert_eq!(bulk(c.cmd(&["GET", "good"])).as_deref(), Some("ok"));
    assert_eq!(bulk(c.cmd(&["GET", "ticks"])), Some(ticks.to_string()));
    for refused in ["big", "half"] {
        assert_eq!(bulk(c.cmd(&["GET", refused])), None, "{refused} was never set");
    }
    assert_eq!(c.cmd(&["DBSIZE"]).unwrap(), Reply::Int(50 + 1 + 1 + 1));
    drop(c);
    shutdown(p, vm);
}
