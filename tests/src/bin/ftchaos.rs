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

use clap::Parser;
use ftvmm_tests::lab::Lab;
use ftvmm_tests::resp::{Reply, RespConn};
use ftvmm_tests::{ftdisk_bin, ftvmm_bin, require_kvm, Scratch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Keys the client writes versions of.
const NKEYS: usize = 8;
/// Probe keys `pN` = `pvN`, written into the image before the VM boots.
const PROBES: u32 = 400;
/// A reply later than this starts a failover...
const OP_TIMEOUT: Duration = Duration::from_millis(800);
/// ...whose probe rounds are this far apart.
const PROBE_ROUND: Duration = Duration::from_millis(300);
/// The client's pause between commands.
const THINK: Duration = Duration::from_millis(4);
/// How often a re-protection that a fault may still follow is a
/// kill-after-join.
const KILL_AFTER_JOIN: f64 = 0.5;
const SETTLE: Duration = Duration::from_secs(30);
const START: Duration = Duration::from_secs(30);
const MEM_MIB: &str = "16";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Microseconds since the Unix epoch (the ftdisk log's clock).
fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-12-01T23:22:39.007191Z` (tracing's UTC timestamps) as
/// microseconds since the epoch.
fn parse_utc_us(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<i64>().ok());
    let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let mut micros = 0i64;
    if b.get(19) == Some(&b'.') {
        let frac: String = s[20..].chars().take_while(char::is_ascii_digit).collect();
        let mut f = frac.chars().take(6).collect::<String>();
        while f.len() < 6 {
            f.push('0');
        }
        micros = f.parse().ok()?;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec;
    u64::try_from(secs * 1_000_000 + micros).ok()
}

/// A scenario's transcript: timestamped lines from every process, the
/// client and the harness.
#[derive(Clone)]
struct Transcript {
    start: Instant,
    lines: Arc<Mutex<Vec<(bool, String)>>>,
}

impl Transcript {
    fn new() -> Self {
        Transcript { start: Instant::now(), lines: Arc::default() }
    }

    fn line(&self, op: bool, msg: &str) {
        let t = self.start.elapsed().as_secs_f64();
        lock(&self.lines).push((op, format!("[{t:8.3}] {msg}")));
    }

    /// A notable event.
    fn say(&self, msg: impl AsRef<str>) {
        self.line(false, msg.as_ref());
    }

    /// One client operation (left out of the condensed transcript).
    fn op(&self, msg: impl AsRef<str>) {
        self.line(true, msg.as_ref());
    }

    fn full(&self) -> String {
        lock(&self.lines).iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// Every event, and only the last few operations before each one.
    fn condensed(&self) -> String {
        let lines = lock(&self.lines);
        let mut out = String::new();
        let mut pending: VecDeque<&str> = VecDeque::new();
        let mut skipped = 0;
        for (op, l) in lines.iter() {
            if *op {
                pending.push_back(l);
                if pending.len() > 6 {
                    pending.pop_front();
                    skipped += 1;
                }
                continue;
            }
            if skipped > 0 {
                out.push_str(&format!("           ... {skipped} client operations ...\n"));
                skipped = 0;
            }
            for p in pending.drain(..) {
                out.push_str(p);
                out.push('\n');
            }
            out.push_str(l);
            out.push('\n');
        }
        if skipped > 0 {
            out.push_str(&format!("           ... {skipped} client operations ...\n"));
        }
        for p in pending {
            out.push_str(p);
            out.push('\n');
        }
        out
    }
}

// ---------------------------------------------------------------------------
// A TCP proxy that can be cut (a partition) and restored.

struct ProxyState {
    target: String,
    cut: AtomicBool,
    closed: AtomicBool,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    /// Microseconds each chunk waits before it is passed on, in either
    /// direction (slow storage; shared by the scenario's storage proxies).
    delay_us: Option<Arc<AtomicU64>>,
    /// Bytes read from a client (a side) and not yet passed on to the
    /// target: its requests (writes) still in the network.
    in_flight_up: AtomicU64,
}

impl ProxyState {
    /// Waits while the proxy is cut; false once it is closed.
    fn wait_while_cut(&self) -> bool {
        while self.cut.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(2));
        }
        !self.closed.load(Ordering::Acquire)
    }
}

/// Cut, it holds every byte and every close in both directions (and new
/// connections are not passed on), as a partitioned network would; restored,
/// it lets them through, or resets every connection. A storage proxy may
/// also be slow: each chunk waits the scenario's current storage delay
/// before it is passed on (as a loaded SAN answers), in order.
///
/// (Not `ftvmm_tests::tcp_relay`: that one listens on 127.0.0.1 only — the
/// redis lab's hosts reach these on the LAN's bridge —, stops accepting
/// once its target refuses a connection — an ftdisk restart would end it
/// —, and can neither hold a close nor reset its connections.)
struct Proxy {
    addr: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    /// A proxy to `target`, listening on `ip` (any port).
    fn new(ip: &str, target: &str) -> Proxy {
        Proxy::with_delay(ip, target, None)
    }

    /// A proxy to `target`, listening on `ip`, whose chunks each wait
    /// `delay_us` microseconds (read at every chunk) if given.
    fn with_delay(ip: &str, target: &str, delay_us: Option<Arc<AtomicU64>>) -> Proxy {
        let listener = TcpListener::bind(format!("{ip}:0")).expect("bind a proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let state = Arc::new(ProxyState {
            target: target.to_string(),
            cut: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            next: AtomicU64::new(0),
            conns: Mutex::default(),
            delay_us,
            in_flight_up: AtomicU64::new(0),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.closed.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                let st = st.clone();
                std::thread::spawn(move || Proxy::serve(client, st));
            }
        });
        Proxy { addr, state }
    }

    fn serve(client: TcpStream, st: Arc<ProxyState>) {
        if !st.wait_while_cut() {
            return;
        }
        let Ok(server) = TcpStream::connect(&st.target) else { return };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let id = st.next.fetch_add(1, Ordering::AcqRel);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
        if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
            lock(&st.conns).insert(id, (c3, s3));
        }
        let st2 = st.clone();
        let up = std::thread::spawn(move || Proxy::pump(c2, s2, &st2, true));
        Proxy::pump(server, client, &st, false);
        let _ = up.join();
        lock(&st.conns).remove(&id);
    }

    /// Passes on what `from` sends to `to` (`up`: from the client to the
    /// target).
    fn pump(mut from: TcpStream, mut to: TcpStream, st: &ProxyState, up: bool) {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let counted = if up { n as u64 } else { 0 };
            st.in_flight_up.fetch_add(counted, Ordering::AcqRel);
            if n > 0 {
                let delay = st.delay_us.as_ref().map_or(0, |d| d.load(Ordering::Acquire));
                if delay > 0 {
                    std::thread::sleep(Duration::from_micros(delay));
                }
            }
            let passed = st.wait_while_cut() && n > 0 && to.write_all(&buf[..n]).is_ok();
            st.in_flight_up.fetch_sub(counted, Ordering::AcqRel);
            if !passed {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }

    fn cut(&self) {
        self.state.cut.store(true, Ordering::Release);
    }

    fn restore(&self, reset: bool) {
        if reset {
            self.reset();
        }
        self.state.cut.store(false, Ordering::Release);
    }

    fn reset(&self) {
        for (c, s) in lock(&self.state.conns).values() {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::Release);
        self.state.cut.store(false, Ordering::Release);
        self.reset();
        let _ = TcpStream::connect(&self.addr);
    }
}

// ---------------------------------------------------------------------------
// The storage server.

/// A won test-and-set, from the ftdisk's log.
#[derive(Clone, Debug)]
struct Win {
    at_us: u64,
    generation: u64,
    pid: u32,
    owner: String,
    /// From the winner's own log line, timestamped when the harness read
    /// it (a little late): an ftdisk killed between persisting a win and
    /// logging it leaves only this (the winner's retry on the next ftdisk
    /// recognises its own win without a new one).
    from_side: bool,
}

fn parse_win(line: &str) -> Option<Win> {
    if !line.contains("test-and-set won") {
        return None;
    }
    let at_us = parse_utc_us(line.split_whitespace().next()?)?;
    let generation = line.split("generation=").nth(1)?.split_whitespace().next()?.parse().ok()?;
    let owner = line.split("owner=").nth(1)?.trim().to_string();
    let pid = owner.split("pid ").nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some(Win { at_us, generation, pid, owner, from_side: false })
}

struct Ftdisk {
    image: String,
    addr: String,
    child: Option<Child>,
    wins: Arc<Mutex<Vec<Win>>>,
    t: Transcript,
    instance: u32,
}

impl Ftdisk {
    fn start(image: &str, ip: &str, t: &Transcript) -> Result<Ftdisk, String> {
        let port = TcpListener::bind(format!("{ip}:0")).and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let mut d = Ftdisk {
            image: image.to_string(),
            addr: format!("{ip}:{port}"),
            child: None,
            wins: Arc::default(),
            t: t.clone(),
            instance: 0,
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.instance += 1;
            let mut child = Command::new(ftdisk_bin())
                .args(["--image", &self.image, "--listen", &self.addr])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("spawn ftdisk: {e}"))?;
            let err = child.stderr.take().expect("piped stderr");
            let (tx, rx) = mpsc::channel();
            let (wins, t, n) = (self.wins.clone(), self.t.clone(), self.instance);
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    t.say(format!("ftdisk#{n}: {line}"));
                    if let Some(w) = parse_win(&line) {
                        lock(&wins).push(w);
                    }
                    if line.starts_with("ftdisk: serving") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            });
            if rx.recv_timeout(Duration::from_secs(10)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            let _ = child.kill();
            let _ = child.wait();
            if Instant::now() > deadline {
                return Err(format!("ftdisk would not serve on {}", self.addr));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Ftdisk {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// The redis guest's network.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum GuestKind {
    Kvstore,
    Redis,
}

/// VM hosts in the lab.
const NET_HOSTS: u8 = 6;

/// The redis guest's network, made once per run: a lab of hosts `v1` to
/// `v6` (network namespaces), each with a TAP bridged onto the LAN; the
/// client, the ftdisk and the proxies run in the root namespace, on the
/// LAN's bridge.
struct NetLab {
    lab: Lab,
    subnet: String,
    next: AtomicU64,
}

impl NetLab {
    fn create() -> Result<NetLab, String> {
        let name = format!("fc{}", std::process::id() % 100_000);
        let subnet = "10.91.0".to_string();
        let hosts: Vec<(String, u8)> = (1..=NET_HOSTS).map(|i| (format!("v{i}"), i)).collect();
        let refs: Vec<(&str, u8)> = hosts.iter().map(|(h, o)| (h.as_str(), *o)).collect();
        let lab = Lab::create(&name, &subnet, &refs, std::process::id()).map_err(|e| e.to_string())?;
        for (h, _) in &hosts {
            lab.add_tap(h, "fttap").map_err(|e| e.to_string())?;
        }
        Ok(NetLab { lab, subnet, next: AtomicU64::new(0) })
    }

    fn bridge_ip(&self) -> String {
        format!("{}.254", self.subnet)
    }

    fn vm_ip(&self) -> String {
        format!("{}.10", self.subnet)
    }

    fn ip(&self, host: &str) -> String {
        self.lab.host(host).map(|h| h.ip.clone()).unwrap_or_default()
    }

    fn ns(&self, host: &str) -> String {
        self.lab.host(host).map(|h| h.ns.clone()).unwrap_or_default()
    }

    /// Forgets where the VM's MAC was (the LAN's bridge and each host's):
    /// the next frames to it are flooded until a live VM answers.
    fn flush_fdb(&self) {
        let mut cmds = vec![format!("ip link set dev {}-br0 type bridge fdb_flush", self.lab.name)];
        for h in &self.lab.hosts {
            cmds.push(format!("ip -n {} link set dev br0 type bridge fdb_flush", h.ns));
        }
        let _ = Command::new("sh").args(["-c", &cmds.join("; ")]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }

    /// Restores every host's link (a scenario may end with one cut).
    fn restore_all(&self) {
        for h in &self.lab.hosts {
            let _ = self.lab.restore(&h.name);
        }
    }
}

// ---------------------------------------------------------------------------
// The VMM processes.

/// A kill armed on a stderr line: when side `watch` prints a line
/// containing `needle`, the stderr reader itself SIGKILLs `victim` (after
/// `delay`), without waiting for the harness's next look (kill-after-join:
/// the live side dies while the writes it released are still in flight).
struct Tripwire {
    watch: String,
    needle: &'static str,
    victim: u32,
    victim_name: String,
    /// The victim's way to the ftdisk: what it holds at the kill is told.
    victim_storage: Arc<Proxy>,
    /// Set before the signal is sent: the harness then counts the victim's
    /// end as its own kill.
    doomed: Arc<AtomicBool>,
    delay: Duration,
    /// The victim's host dies with it: its storage proxy drops what it
    /// holds from it (resets its connections) instead of passing it on.
    host_dies: bool,
}

/// What every side's stderr reader reports to.
#[derive(Clone)]
struct Watchers {
    t: Transcript,
    /// Wins as the winners logged them.
    wins: Arc<Mutex<Vec<Win>>>,
    tripwires: Arc<Mutex<Vec<Tripwire>>>,
}

impl Watchers {
    /// Fires (and disarms) the tripwires that `line` of side `name` trips.
    fn on_line(&self, name: &str, line: &str) {
        let fired: Vec<Tripwire> = {
            let mut wires = lock(&self.tripwires);
            let (fired, kept) = std::mem::take(&mut *wires)
                .into_iter()
                .partition(|w: &Tripwire| w.watch == name && line.contains(w.needle));
            *wires = kept;
            fired
        };
        for w in fired {
            if !w.delay.is_zero() {
                std::thread::sleep(w.delay);
            }
            w.doomed.store(true, Ordering::Release);
            // SAFETY: kill(2) on the pid of a child of ours that has not
            // been reaped (the harness reaps only after seeing `doomed`).
            let r = unsafe { libc::kill(w.victim as libc::pid_t, libc::SIGKILL) };
            let in_flight = w.victim_storage.state.in_flight_up.load(Ordering::Acquire);
            if w.host_dies {
                w.victim_storage.reset();
            }
            self.t.say(format!(
                "harness: {name} printed {:?}: SIGKILL {} (pid {}){}{}; the {in_flight} bytes from it to the ftdisk \
                 in its storage proxy {}",
                w.needle,
                w.victim_name,
                w.victim,
                if w.delay.is_zero() { String::new() } else { format!(" {:?} later", w.delay) },
                if r == 0 { "" } else { " (it was gone already)" },
                if w.host_dies { "are dropped (its host died)" } else { "go on" }
            ));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Primary,
    Backup,
}

struct Side {
    name: String,
    role: Role,
    child: Child,
    pid: u32,
    events: Arc<Mutex<Vec<String>>>,
    seen: usize,
    console: Option<String>,
    /// Where it accepts backups (once known).
    listen: Option<String>,
    /// The side it was started to back up.
    target: Option<usize>,
    log_proxy: Option<Arc<Proxy>>,
    storage: Arc<Proxy>,
    /// The last generation it won (the initial primary's claim at boot is 1).
    gen: Option<u64>,
    /// In lockstep with its target (attached at boot, or joined).
    synced: bool,
    /// Its target's generation when it got in lockstep.
    attach_gen: Option<u64>,
    exit: Option<ExitStatus>,
    killed: bool,
    digest: Option<String>,
    halted_why: Option<String>,
    /// Its `ftvmm: error:` line, if it printed one.
    error: Option<String>,
    /// The lab host it runs on (the redis guest).
    host: Option<String>,
    /// It went live (a failover).
    went_live: bool,
    /// A tripwire SIGKILLed it (or is about to): its end is the harness's kill.
    doomed: Arc<AtomicBool>,
}

impl Side {
    /// Spawns `ftvmm args`, inside lab host `host`'s network namespace if
    /// given (`ip netns exec` execs ftvmm: the child is the VMM itself).
    fn spawn(
        name: &str,
        role: Role,
        args: &[String],
        storage: Arc<Proxy>,
        host: Option<(String, String)>,
        watchers: &Watchers,
    ) -> Result<Side, String> {
        let t = &watchers.t;
        let mut cmd = match &host {
            Some((_, ns)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str()]).arg(ftvmm_bin());
                c
            }
            None => Command::new(ftvmm_bin()),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn ftvmm: {e}"))?;
        let pid = child.id();
        let on = host.as_ref().map(|(h, _)| format!(" on host {h}")).unwrap_or_default();
        t.say(format!("harness: started {name} (pid {pid}){on}: ftvmm {}", args.join(" ")));
        let err = child.stderr.take().expect("piped stderr");
        let events: Arc<Mutex<Vec<String>>> = Arc::default();
        let (ev, w, n) = (events.clone(), watchers.clone(), name.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                w.t.say(format!("{n}: {line}"));
                w.on_line(&n, &line);
                if let Some(g) = line.split("(generation ").nth(1).filter(|_| line.contains(" won the ")) {
                    if let Ok(generation) = g.trim_end_matches(')').parse() {
                        let owner = format!("{n} (pid {pid}, by its own log)");
                        lock(&w.wins).push(Win { at_us: now_us(), generation, pid, owner, from_side: true });
                    }
                }
                lock(&ev).push(line);
            }
        });
        Ok(Side {
            name: name.to_string(),
            role,
            child,
            pid,
            events,
            seen: 0,
            console: None,
            listen: None,
            target: None,
            log_proxy: None,
            storage,
            gen: None,
            synced: false,
            attach_gen: None,
            exit: None,
            killed: false,
            digest: None,
            halted_why: None,
            error: None,
            host: host.map(|(h, _)| h),
            went_live: false,
            doomed: Arc::default(),
        })
    }

    fn running(&self) -> bool {
        self.exit.is_none() && !self.killed
    }

    fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.killed = true;
        }
    }

    fn status_text(&self) -> String {
        if self.killed {
            return "killed by the harness".into();
        }
        match self.exit {
            None => "running".into(),
            Some(s) => match s.code() {
                Some(c) => format!("exited with status {c}"),
                None => format!("ended by {s}"),
            },
        }
    }
}

/// A joining backup whose state transfer was cut short (a heartbeat
/// timeout mid-transfer, on a loaded host): it ends with status 2 before
/// it is in lockstep, and the live side runs on alone.
fn aborted_join(s: &Side) -> bool {
    s.role == Role::Backup
        && !s.synced
        && s.exit.and_then(|e| e.code()) == Some(2)
        && s.error.as_deref().is_some_and(|e| e.contains("the state transfer was cut short"))
}

fn addr_at_end(line: &str) -> String {
    line.rsplit(' ').next().unwrap_or_default().trim_end_matches(';').to_string()
}

/// Reads the sides' new stderr lines and notices their exits.
fn refresh(sides: &mut [Side], t: &Transcript) {
    for i in 0..sides.len() {
        let new: Vec<String> = {
            let ev = lock(&sides[i].events);
            ev[sides[i].seen..].to_vec()
        };
        sides[i].seen += new.len();
        for line in new {
            let target_gen = sides[i].target.and_then(|j| sides[j].gen);
            let s = &mut sides[i];
            if line.contains("serial console on ") {
                s.console = Some(addr_at_end(&line));
            } else if line.contains("waiting for a backup on ")
                || line.contains("backups may join on ")
                || line.contains("live: accepting a backup on ")
                || line.contains("accepting a new backup on ")
            {
                s.listen = Some(addr_at_end(&line));
            } else if let Some(g) = line.split("(generation ").nth(1).filter(|_| line.contains(" won the ")) {
                if let Ok(g) = g.trim_end_matches(')').parse() {
                    s.gen = Some(g);
                }
            } else if line.contains("replaying in lockstep") || line.contains("restored at exit") {
                s.synced = true;
                s.attach_gen = target_gen;
            } else if line.contains("halting") {
                s.halted_why = Some(line.clone());
                s.error = Some(line.clone());
            } else if line.contains("backup: going live") {
                s.went_live = true;
            } else if line.starts_with("ftvmm: error:") {
                s.error = Some(line.clone());
            } else if let Some(d) = line.strip_prefix("state-digest: ") {
                s.digest = Some(d.trim().to_string());
            }
        }
        let s = &mut sides[i];
        if s.running() && s.doomed.load(Ordering::Acquire) {
            // A tripwire's SIGKILL (before looking at its exit: that is ours).
            s.kill();
            t.say(format!("harness: {} killed by a tripwire", s.name));
        }
        if s.exit.is_none() && !s.killed {
            if let Ok(Some(status)) = s.child.try_wait() {
                s.exit = Some(status);
                t.say(format!("harness: {} {}", s.name, s.status_text()));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The kvstore client.

enum Msg {
    Line { side: usize, line: String, at: u64 },
    Eof { side: usize },
    Partial { side: usize, text: String },
    AddConn { side: usize, name: String, pid: u32, addr: String, initial: bool },
    Final,
    Abort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Set { key: usize, ver: u64, rec: usize },
    Get { key: usize },
    Probe { id: u32 },
    GetProbe { id: u32 },
    Incr,
    Quit,
}

impl Op {
    fn text(&self) -> String {
        match *self {
            Op::Set { key, ver, .. } => format!("set k{key} k{key}-v{ver}"),
            Op::Get { key } => format!("get k{key}"),
            Op::Probe { id } | Op::GetProbe { id } => format!("get p{id}"),
            Op::Incr => "INCR counter".into(),
            Op::Quit => "quit".into(),
        }
    }
}

struct Cmd {
    op: Op,
    seq: u64,
    sent_us: u64,
    sent: Instant,
}

struct Conn {
    name: String,
    pid: u32,
    writer: Option<TcpStream>,
    fifo: VecDeque<Cmd>,
    synced: bool,
    initial: bool,
    alive: bool,
    probe_out: bool,
}

struct SetRec {
    key: usize,
    ver: u64,
    seq: u64,
    acked: bool,
}

struct GetRec {
    key: usize,
    seq: u64,
    ver: u64,
    side: String,
    at: f64,
}

/// A reply the client attributed to a command, for the split-brain check.
#[derive(Clone)]
struct ReplyRec {
    name: String,
    pid: u32,
    sent_us: u64,
    at_us: u64,
    what: String,
}

#[derive(Default)]
struct ClientView {
    current_pid: Option<u32>,
    failing_over: bool,
    /// The first side said it is ready.
    ready: bool,
    last_reply: Option<Instant>,
    acked: u64,
    switches: u32,
    finished: bool,
    /// Send no new command (the harness quiesces the client)...
    paused: bool,
    /// ...and whether none is outstanding on the serving connection.
    idle: bool,
}

#[derive(Default)]
struct ClientReport {
    violations: Vec<(String, String)>,
    replies: Vec<ReplyRec>,
    acked: u64,
    /// The final reads: key name → reply line.
    final_values: BTreeMap<String, String>,
    /// Per key name: the highest version acknowledged, the highest sent.
    bounds: BTreeMap<String, (u64, u64)>,
    quit: bool,
}

#[derive(PartialEq, Eq)]
enum Phase {
    Work,
    Final,
    Done,
}

struct Failover {
    since: Instant,
    next_round: Instant,
}

struct Kv {
    t: Transcript,
    tx: Sender<Msg>,
    view: Arc<Mutex<ClientView>>,
    rng: StdRng,
    conns: Vec<Option<Conn>>,
    current: Option<usize>,
    failover: Option<Failover>,
    phase: Phase,
    final_queue: VecDeque<Op>,
    next_op_at: Instant,
    seq: u64,
    sent_ver: [u64; NKEYS],
    sets: Vec<SetRec>,
    gets: Vec<GetRec>,
    report: ClientReport,
    probes_avail: VecDeque<u32>,
    /// The initial connection exists.
    started: bool,
}

impl Kv {
    fn violation(&mut self, kind: &str, msg: String) {
        self.t.say(format!("client: VIOLATION {kind}: {msg}"));
        self.report.violations.push((kind.to_string(), msg));
    }

    fn conn(&mut self, side: usize) -> Option<&mut Conn> {
        self.conns.get_mut(side).and_then(Option::as_mut)
    }

    fn add_conn(&mut self, side: usize, name: String, pid: u32, addr: &str, initial: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break Some(s),
                Err(e) if Instant::now() > deadline => {
                    self.t.say(format!("client: cannot connect to {name}'s console {addr}: {e}"));
                    break None;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut conn = Conn {
            name,
            pid,
            writer: None,
            fifo: VecDeque::new(),
            synced: false,
            initial,
            alive: false,
            probe_out: false,
        };
        if let Some(stream) = stream {
            let _ = stream.set_nodelay(true);
            if let Ok(w) = stream.try_clone() {
                conn.writer = Some(w);
                conn.alive = true;
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => break,
                            // The console closed after part of a line (output
                            // commit is byte-granular: a new live side
                            // re-emits the rest on its own console).
                            Ok(_) if !line.ends_with('\n') => {
                                let _ = tx.send(Msg::Partial { side, text: line });
                                break;
                            }
                            Ok(_) => {
                                let line = line.trim_end_matches(['\r', '\n']).to_string();
                                if tx.send(Msg::Line { side, line, at: now_us() }).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = tx.send(Msg::Eof { side });
                });
            }
        }
        self.t.say(format!("client: connected to {}'s console {addr}", conn.name));
        if self.conns.len() <= side {
            self.conns.resize_with(side + 1, || None);
        }
        self.conns[side] = Some(conn);
        if initial {
            self.current = Some(side);
            self.started = true;
        }
    }

    /// Sends `op` on `side`'s connection.
    fn send(&mut self, side: usize, op: Op) -> bool {
        self.seq += 1;
        let seq = self.seq;
        let t = self.t.clone();
        let Some(conn) = self.conn(side) else { return false };
        let text = op.text();
        let ok = conn.writer.as_mut().is_some_and(|w| w.write_all(format!("{text}\n").as_bytes()).is_ok());
        if !ok {
            conn.alive = false;
            t.say(format!("client: writing to {} failed", conn.name));
            return false;
        }
        t.op(format!("client> {}: {text}", conn.name));
        conn.fifo.push_back(Cmd { op, seq, sent_us: now_us(), sent: Instant::now() });
        true
    }

    fn next_op(&mut self) -> Option<Op> {
        match self.phase {
            Phase::Work => {
                let key = self.rng.gen_range(0..NKEYS);
                if self.rng.gen_bool(0.5) {
                    self.sent_ver[key] += 1;
                    let ver = self.sent_ver[key];
                    self.sets.push(SetRec { key, ver, seq: self.seq + 1, acked: false });
                    Some(Op::Set { key, ver, rec: self.sets.len() - 1 })
                } else {
                    Some(Op::Get { key })
                }
            }
            Phase::Final => self.final_queue.pop_front(),
            Phase::Done => None,
        }
    }

    fn start_final(&mut self) {
        self.t.say("client: final reads");
        self.phase = Phase::Final;
        self.final_queue = (0..NKEYS).map(|key| Op::Get { key }).collect();
        let ids: Vec<u32> = (0..PROBES).filter(|id| !self.probes_avail.contains(id)).collect();
        self.final_queue.extend(ids.into_iter().map(|id| Op::GetProbe { id }));
        self.final_queue.push_back(Op::Quit);
    }

    fn start_failover(&mut self, why: &str) {
        if self.failover.is_some() {
            return;
        }
        let now = Instant::now();
        self.t.say(format!("client: {why}; probing every console"));
        self.failover = Some(Failover { since: now, next_round: now });
        lock(&self.view).failing_over = true;
    }

    fn probe_round(&mut self) {
        for side in 0..self.conns.len() {
            let Some(c) = self.conn(side) else { continue };
            if !c.alive || c.probe_out {
                continue;
            }
            let Some(id) = self.probes_avail.pop_front() else {
                self.t.say("client: out of probe keys");
                return;
            };
            if self.send(side, Op::Probe { id }) {
                if let Some(c) = self.conn(side) {
                    c.probe_out = true;
                }
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.phase == Phase::Done || !self.started {
            return;
        }
        let cur_ok = self.current.and_then(|c| self.conns.get(c).and_then(Option::as_ref)).is_some_and(|c| c.alive);
        if !cur_ok {
            self.start_failover("no live console");
        }
        if let Some(cur) = self.current.filter(|_| cur_ok && self.failover.is_none()) {
            let conn = self.conns[cur].as_ref().expect("current conn");
            if conn.synced {
                let paused = {
                    let mut v = lock(&self.view);
                    v.idle = conn.fifo.is_empty();
                    v.paused
                };
                match conn.fifo.front() {
                    None if now >= self.next_op_at && !paused => {
                        if let Some(op) = self.next_op() {
                            if !self.send(cur, op) {
                                self.start_failover("the console write failed");
                            }
                        }
                    }
                    Some(front) if now.duration_since(front.sent) > OP_TIMEOUT => {
                        let msg = format!("no reply from {} to {:?} in {OP_TIMEOUT:?}", conn.name, front.op.text());
                        self.start_failover(&msg);
                    }
                    _ => {}
                }
            }
        }
        if let Some(f) = &mut self.failover {
            if now >= f.next_round {
                f.next_round = now + PROBE_ROUND;
                self.probe_round();
            }
        }
    }

    fn record_reply(&mut self, side: usize, cmd: &Cmd, at: u64) {
        let Some(c) = self.conns[side].as_ref() else { return };
        let rec = ReplyRec { name: c.name.clone(), pid: c.pid, sent_us: cmd.sent_us, at_us: at, what: cmd.op.text() };
        self.report.replies.push(rec);
        if Some(side) == self.current {
            lock(&self.view).last_reply = Some(Instant::now());
        }
    }

    /// `side` answered a probe: during a failover, it serves the client now.
    fn probe_answered(&mut self, side: usize) {
        if let Some(c) = self.conn(side) {
            c.probe_out = false;
        }
        let name = self.conns[side].as_ref().map(|c| c.name.clone()).unwrap_or_default();
        if let Some(f) = self.failover.take() {
            if self.current != Some(side) {
                lock(&self.view).switches += 1;
            }
            self.t.say(format!("client: {name} answered; it serves the client (after {:?})", f.since.elapsed()));
            self.current = Some(side);
            let pid = self.conns[side].as_ref().map(|c| c.pid);
            let mut v = lock(&self.view);
            v.ready = true;
            v.current_pid = pid;
            v.failing_over = false;
            v.last_reply = Some(Instant::now());
        } else if self.current != Some(side) {
            self.t.say(format!("client: {name} answered a probe late (it does not serve the client)"));
        }
    }

    fn on_line(&mut self, side: usize, line: String, at: u64) {
        let t = self.t.clone();
        let Some(conn) = self.conn(side) else { return };
        let name = conn.name.clone();
        if !conn.synced {
            if conn.initial && line.starts_with("kvstore: ready") {
                conn.synced = true;
                t.say(format!("client: {name}: {line}"));
                let pid = conn.pid;
                let mut v = lock(&self.view);
                v.current_pid = Some(pid);
                v.last_reply = Some(Instant::now());
                v.ready = true;
                return;
            }
            let pos =
                conn.fifo.iter().position(|c| matches!(c.op, Op::Probe { id } if line == format!("VALUE pv{id}")));
            let Some(pos) = pos else {
                t.say(format!("client: {name} (before its first answer, skipped): {line}"));
                return;
            };
            let before: Vec<Cmd> = conn.fifo.drain(..pos).collect();
            let probe = conn.fifo.pop_front().expect("the probe");
            conn.synced = true;
            for b in before {
                t.say(format!("client: {name}: no answer to {:?}", b.op.text()));
            }
            t.op(format!("client< {name}: {line}"));
            t.say(format!("client: {name} answered probe {:?}", probe.op.text()));
            self.record_reply(side, &probe, at);
            self.probe_answered(side);
            return;
        }
        let Some(cmd) = conn.fifo.pop_front() else {
            self.violation("unsolicited-output", format!("{name} printed {line:?} with no command outstanding"));
            return;
        };
        t.op(format!("client< {name}: {line}  ({} ms)", cmd.sent.elapsed().as_millis()));
        self.record_reply(side, &cmd, at);
        let at_s = t.start.elapsed().as_secs_f64();
        match cmd.op {
            Op::Set { key, ver, rec } => {
                if line == "OK" {
                    if !self.sets[rec].acked {
                        self.sets[rec].acked = true;
                        self.report.acked += 1;
                        lock(&self.view).acked = self.report.acked;
                    }
                } else {
                    self.violation("bad-reply", format!("{name} answered {line:?} to set k{key} k{key}-v{ver}"));
                }
            }
            Op::Get { key } => {
                let ver = if line == "NOTFOUND" {
                    Some(0)
                } else {
                    line.strip_prefix(&format!("VALUE k{key}-v")).and_then(|v| v.parse::<u64>().ok())
                };
                match ver {
                    Some(ver) => {
                        self.gets.push(GetRec { key, seq: cmd.seq, ver, side: name.clone(), at: at_s });
                        if self.phase != Phase::Work {
                            self.report.final_values.insert(format!("k{key}"), line.clone());
                        }
                    }
                    None => self.violation("bad-reply", format!("{name} answered {line:?} to get k{key}")),
                }
            }
            Op::Probe { id } => {
                if line != format!("VALUE pv{id}") {
                    self.violation("bad-reply", format!("{name} answered {line:?} to probe get p{id}"));
                }
                self.probe_answered(side);
            }
            Op::GetProbe { id } => {
                if line != format!("VALUE pv{id}") {
                    self.violation(
                        "lost-write",
                        format!("{name} answered {line:?} to get p{id} (written before boot)"),
                    );
                }
                self.report.final_values.insert(format!("p{id}"), line.clone());
            }
            Op::Incr => {}
            Op::Quit => {
                if line == "BYE" {
                    self.report.quit = true;
                    self.phase = Phase::Done;
                    t.say(format!("client: {name} said BYE"));
                } else {
                    self.violation("bad-reply", format!("{name} answered {line:?} to quit"));
                }
            }
        }
        self.next_op_at = Instant::now() + THINK;
    }

    fn on_eof(&mut self, side: usize) {
        let t = self.t.clone();
        if let Some(c) = self.conn(side) {
            c.alive = false;
            t.say(format!("client: {}'s console closed ({} commands unanswered)", c.name, c.fifo.len()));
        }
        if self.current == Some(side) && self.phase != Phase::Done {
            self.start_failover("the serving console closed");
        }
    }

    fn check_history(&mut self) {
        let (found, bounds) = check_history(&self.sets, &self.gets, &self.sent_ver);
        for (kind, msg) in found {
            self.violation(kind, msg);
        }
        self.report.bounds = bounds;
    }
}

/// The history checks: acknowledged writes visible, reads monotonic, no
/// phantom versions. Returns the violations and, per key, the highest
/// version acknowledged and the highest sent.
#[allow(clippy::type_complexity)]
fn check_history(
    sets: &[SetRec],
    gets: &[GetRec],
    sent_ver: &[u64; NKEYS],
) -> (Vec<(&'static str, String)>, BTreeMap<String, (u64, u64)>) {
    let mut acked_by_key: Vec<Vec<(u64, u64)>> = vec![Vec::new(); NKEYS];
    let mut sent_by_key: Vec<Vec<(u64, u64)>> = vec![Vec::new(); NKEYS];
    for s in sets {
        sent_by_key[s.key].push((s.seq, s.ver));
        if s.acked {
            acked_by_key[s.key].push((s.seq, s.ver));
        }
    }
    let mut found = Vec::new();
    let mut last_read: [Option<(u64, String, f64)>; NKEYS] = Default::default();
    for g in gets {
        let must = acked_by_key[g.key].iter().filter(|(seq, _)| *seq < g.seq).map(|(_, v)| *v).max().unwrap_or(0);
        if g.ver < must {
            found.push((
                "lost-write",
                format!(
                    "get k{} (at {:.3}, from {}) read version {} though version {must} was acknowledged before it was sent",
                    g.key, g.at, g.side, g.ver
                ),
            ));
        }
        let sent = sent_by_key[g.key].iter().filter(|(seq, _)| *seq < g.seq).map(|(_, v)| *v).max().unwrap_or(0);
        if g.ver > sent {
            found.push((
                "phantom-read",
                format!("get k{} (at {:.3}, from {}) read version {} never written", g.key, g.at, g.side, g.ver),
            ));
        }
        if let Some((v, side, at)) = &last_read[g.key] {
            if g.ver < *v {
                found.push((
                    "read-backwards",
                    format!(
                        "get k{} read version {} (at {:.3}, from {}) after version {v} (at {at:.3}, from {side})",
                        g.key, g.ver, g.at, g.side
                    ),
                ));
            }
        }
        if last_read[g.key].as_ref().is_none_or(|(v, _, _)| g.ver >= *v) {
            last_read[g.key] = Some((g.ver, g.side.clone(), g.at));
        }
    }
    let mut bounds = BTreeMap::new();
    for (key, (acked, sent)) in acked_by_key.iter().zip(sent_ver).enumerate() {
        let acked = acked.iter().map(|(_, v)| *v).max().unwrap_or(0);
        bounds.insert(format!("k{key}"), (acked, *sent));
    }
    (found, bounds)
}

fn client_main(
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    view: Arc<Mutex<ClientView>>,
    t: Transcript,
    seed: u64,
) -> ClientReport {
    let mut kv = Kv {
        t,
        tx,
        view: view.clone(),
        rng: StdRng::seed_from_u64(seed ^ 0x5eed_c11e),
        conns: Vec::new(),
        current: None,
        failover: None,
        phase: Phase::Work,
        final_queue: VecDeque::new(),
        next_op_at: Instant::now(),
        seq: 0,
        sent_ver: [0; NKEYS],
        sets: Vec::new(),
        gets: Vec::new(),
        report: ClientReport::default(),
        probes_avail: (0..PROBES).collect(),
        started: false,
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(Msg::Line { side, line, at }) => kv.on_line(side, line, at),
            Ok(Msg::Eof { side }) => kv.on_eof(side),
            Ok(Msg::Partial { side, text }) => {
                let name = kv.conns.get(side).and_then(Option::as_ref).map(|c| c.name.clone()).unwrap_or_default();
                kv.t.say(format!("client: {name}'s console ended in the middle of a line: {text:?}"));
            }
            Ok(Msg::AddConn { side, name, pid, addr, initial }) => kv.add_conn(side, name, pid, &addr, initial),
            Ok(Msg::Final) => kv.start_final(),
            Ok(Msg::Abort) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        kv.tick();
        if kv.phase == Phase::Done {
            break;
        }
    }
    kv.check_history();
    lock(&view).finished = true;
    kv.report
}

// ---------------------------------------------------------------------------
// The redis client: ONE connection to the VM's address for the whole
// scenario, through every failover (the VM's TCP state moves with it).

struct RedisClient {
    t: Transcript,
    view: Arc<Mutex<ClientView>>,
    rng: StdRng,
    addr: Option<String>,
    conn: Option<RespConn>,
    connections: u32,
    phase: Phase,
    final_queue: VecDeque<Op>,
    seq: u64,
    sent_ver: [u64; NKEYS],
    sets: Vec<SetRec>,
    gets: Vec<GetRec>,
    report: ClientReport,
    /// The last INCR value, while the counter's history is known.
    counter: Option<i64>,
}

impl RedisClient {
    fn violation(&mut self, kind: &str, msg: String) {
        self.t.say(format!("client: VIOLATION {kind}: {msg}"));
        self.report.violations.push((kind.to_string(), msg));
    }

    /// Connects (and waits for PONG); false if the VM does not answer yet.
    fn connect(&mut self) -> bool {
        let Some(addr) = self.addr.clone() else { return false };
        let Some(mut c) = resp_connect(&addr) else { return false };
        if !matches!(c.cmd(&["PING"]), Ok(Reply::Simple(s)) if s == "PONG") {
            return false;
        }
        self.connections += 1;
        self.t.say(format!("client: connected to {addr} (connection {})", self.connections));
        self.conn = Some(c);
        let mut v = lock(&self.view);
        v.ready = true;
        v.last_reply = Some(Instant::now());
        true
    }

    fn next_op(&mut self) -> Option<Op> {
        match self.phase {
            Phase::Work => {
                let key = self.rng.gen_range(0..NKEYS);
                match self.rng.gen_range(0..10) {
                    0..=3 => {
                        self.sent_ver[key] += 1;
                        let ver = self.sent_ver[key];
                        self.sets.push(SetRec { key, ver, seq: self.seq + 1, acked: false });
                        Some(Op::Set { key, ver, rec: self.sets.len() - 1 })
                    }
                    4..=7 => Some(Op::Get { key }),
                    _ => Some(Op::Incr),
                }
            }
            Phase::Final => self.final_queue.pop_front(),
            Phase::Done => None,
        }
    }

    fn run_op(&mut self, op: Op) {
        self.seq += 1;
        let seq = self.seq;
        let Some(conn) = self.conn.as_mut() else { return };
        let text = op.text();
        let started = Instant::now();
        let args: Vec<String> = match op {
            Op::Set { key, ver, .. } => vec!["SET".into(), format!("k{key}"), format!("k{key}-v{ver}")],
            Op::Get { key } => vec!["GET".into(), format!("k{key}")],
            Op::Incr => vec!["INCR".into(), "counter".into()],
            Op::Quit => vec!["SHUTDOWN".into()],
            Op::Probe { .. } | Op::GetProbe { .. } => return,
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.t.op(format!("client> {text}"));
        if op == Op::Quit {
            // SHUTDOWN has no reply: the VM ends.
            let sent = conn.send(&args);
            self.t.say(format!("client: SHUTDOWN sent ({sent:?})"));
            self.report.quit = sent.is_ok();
            self.phase = Phase::Done;
            return;
        }
        let reply = conn.cmd(&args);
        let took = started.elapsed();
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                self.t.say(format!("client: {text}: {e} after {took:?}"));
                self.violation(
                    "connection-broke",
                    format!("the client's connection to the VM failed at {text:?} after {took:?}: {e}"),
                );
                self.conn = None;
                if op == Op::Incr {
                    self.counter = None;
                }
                return;
            }
        };
        self.t.op(format!("client< {}  ({} ms)", reply.text(), took.as_millis()));
        if took > Duration::from_millis(300) {
            self.t.say(format!("client: {text} answered after {took:?}"));
        }
        {
            let mut v = lock(&self.view);
            v.last_reply = Some(Instant::now());
        }
        let at = self.t.start.elapsed().as_secs_f64();
        match (op, &reply) {
            (Op::Set { rec, .. }, Reply::Simple(ok)) if ok == "OK" => {
                self.sets[rec].acked = true;
                self.report.acked += 1;
                lock(&self.view).acked = self.report.acked;
            }
            (Op::Get { key }, Reply::Bulk(value)) => {
                let ver = match value {
                    None => Some(0),
                    Some(b) => String::from_utf8_lossy(b)
                        .strip_prefix(&format!("k{key}-v"))
                        .and_then(|v| v.parse::<u64>().ok()),
                };
                match ver {
                    Some(ver) => self.gets.push(GetRec { key, seq, ver, side: "the VM".into(), at }),
                    None => self.violation("bad-reply", format!("GET k{key} answered {reply:?}")),
                }
                if self.phase == Phase::Final {
                    self.report.final_values.insert(format!("k{key}"), reply_text(&reply));
                }
            }
            (Op::Incr, Reply::Int(n)) => {
                if let Some(last) = self.counter {
                    if *n != last + 1 {
                        self.violation("incr-not-consecutive", format!("INCR counter went from {last} to {n}"));
                    }
                }
                self.counter = Some(*n);
            }
            _ => self.violation("bad-reply", format!("{text} answered {reply:?}")),
        }
    }

    fn start_final(&mut self) {
        self.t.say("client: final reads");
        self.phase = Phase::Final;
        self.final_queue = (0..NKEYS).map(|key| Op::Get { key }).collect();
        self.final_queue.push_back(Op::Quit);
    }
}

/// A RESP connection to `addr`, if it accepts one within a second
/// (`RespConn::connect` alone would wait out the kernel's SYN retries).
fn resp_connect(addr: &str) -> Option<RespConn> {
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()?;
    RespConn::connect(addr, Duration::from_secs(20)).ok()
}

/// A GET's reply as the final reads and the disk check compare it.
fn reply_text(r: &Reply) -> String {
    match r {
        Reply::Bulk(Some(b)) => format!("VALUE {}", String::from_utf8_lossy(b)),
        Reply::Bulk(None) => "NOTFOUND".into(),
        other => format!("{other:?}"),
    }
}

fn redis_client_main(rx: Receiver<Msg>, view: Arc<Mutex<ClientView>>, t: Transcript, seed: u64) -> ClientReport {
    let mut c = RedisClient {
        t,
        view: view.clone(),
        rng: StdRng::seed_from_u64(seed ^ 0x5eed_c11e),
        addr: None,
        conn: None,
        connections: 0,
        phase: Phase::Work,
        final_queue: VecDeque::new(),
        seq: 0,
        sent_ver: [0; NKEYS],
        sets: Vec::new(),
        gets: Vec::new(),
        report: ClientReport::default(),
        counter: None,
    };
    'run: loop {
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::AddConn { addr, .. } => c.addr = Some(addr),
                Msg::Final => c.start_final(),
                Msg::Abort => break 'run,
                _ => {}
            }
        }
        if c.phase == Phase::Done {
            break;
        }
        if c.conn.is_none() {
            if !c.connect() {
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let paused = {
            let mut v = lock(&c.view);
            v.idle = true;
            v.paused
        };
        if paused {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        lock(&c.view).idle = false;
        if let Some(op) = c.next_op() {
            c.run_op(op);
        }
        std::thread::sleep(THINK);
    }
    let (found, bounds) = check_history(&c.sets, &c.gets, &c.sent_ver);
    for (kind, msg) in found {
        c.violation(kind, msg);
    }
    c.report.bounds = bounds;
    lock(&view).finished = true;
    c.report
}

// ---------------------------------------------------------------------------
// Faults.

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Fault {
    KillPrimary,
    KillBackup,
    FreezePrimary,
    FreezeBackup,
    CutLogging,
    RestartFtdisk,
    CutStorage,
    CutLink,
    SlowStorage,
    /// Injected at a re-protection, not drawn with the others.
    KillAfterJoin,
}

impl Fault {
    /// The faults drawn at random between settled states.
    const ALL: [Fault; 9] = [
        Fault::KillPrimary,
        Fault::KillBackup,
        Fault::FreezePrimary,
        Fault::FreezeBackup,
        Fault::CutLogging,
        Fault::RestartFtdisk,
        Fault::CutStorage,
        Fault::CutLink,
        Fault::SlowStorage,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill-primary",
            Fault::KillBackup => "kill-backup",
            Fault::FreezePrimary => "freeze-primary",
            Fault::FreezeBackup => "freeze-backup",
            Fault::CutLogging => "cut-logging",
            Fault::RestartFtdisk => "restart-ftdisk",
            Fault::CutStorage => "cut-storage",
            Fault::CutLink => "cut-link",
            Fault::SlowStorage => "slow-storage",
            Fault::KillAfterJoin => "kill-after-join",
        }
    }

    fn is_storage(self) -> bool {
        matches!(self, Fault::RestartFtdisk | Fault::CutStorage | Fault::SlowStorage)
    }

    fn is_kill(self) -> bool {
        matches!(self, Fault::KillPrimary | Fault::KillBackup | Fault::KillAfterJoin)
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// A duration around the heartbeat timeout: shorter about a third of the time.
fn around_heartbeat(rng: &mut StdRng, hb: u64, max_ms: u64) -> Duration {
    if rng.gen_bool(0.3) {
        Duration::from_millis(rng.gen_range(20..hb.max(21)) / 2 + 10)
    } else {
        Duration::from_millis(rng.gen_range(hb * 3 / 2..max_ms))
    }
}

// ---------------------------------------------------------------------------
// A scenario.

#[derive(Default)]
struct Outcome {
    faults: Vec<Fault>,
    acked: u64,
    switches: u32,
    failovers: u32,
    reprotections: u32,
    aborted_joins: u32,
    violations: Vec<(String, String)>,
    /// The storage's per-chunk delay throughout the scenario (0: fast).
    slow_base_ms: u64,
}

struct Scenario {
    seed: u64,
    rng: StdRng,
    t: Transcript,
    hb: u64,
    ftdisk: Arc<Mutex<Ftdisk>>,
    ftdisk_addr: String,
    sides: Vec<Side>,
    client_tx: Sender<Msg>,
    view: Arc<Mutex<ClientView>>,
    outcome: Outcome,
    faults_running: Vec<(Fault, JoinHandle<()>)>,
    quiesce_joins: bool,
    guest: GuestKind,
    net: Option<Arc<NetLab>>,
    /// The sides' stderr readers' hooks: wins as the winners logged them,
    /// the armed tripwires.
    watchers: Watchers,
    /// Each storage proxy's current per-chunk delay (µs), shared by all.
    storage_delay: Arc<AtomicU64>,
    /// The delay this scenario's storage has throughout (µs; 0: fast).
    storage_base_us: u64,
    _dir: Scratch,
}

impl Scenario {
    fn violation(&mut self, kind: &str, msg: String) {
        self.t.say(format!("harness: VIOLATION {kind}: {msg}"));
        self.outcome.violations.push((kind.to_string(), msg));
    }

    /// Where the harness's servers (ftdisk, proxies) listen.
    fn bind_ip(&self) -> String {
        self.net.as_ref().map_or_else(|| "127.0.0.1".to_string(), |n| n.bridge_ip())
    }

    /// A lab host with no running side (redis), round robin.
    fn pick_host(&self) -> Result<Option<(String, String)>, String> {
        let Some(net) = &self.net else { return Ok(None) };
        for _ in 0..NET_HOSTS {
            let i = net.next.fetch_add(1, Ordering::AcqRel) % u64::from(NET_HOSTS);
            let h = format!("v{}", i + 1);
            if !self.sides.iter().any(|s| s.running() && s.host.as_deref() == Some(h.as_str())) {
                let _ = net.lab.restore(&h);
                return Ok(Some((h.clone(), net.ns(&h))));
            }
        }
        Err("no free lab host".into())
    }

    /// The `--listen` address of a side on `host`.
    fn listen_arg(&self, host: &Option<(String, String)>) -> String {
        match (&self.net, host) {
            (Some(net), Some((h, _))) => format!("{}:0", net.ip(h)),
            _ => "127.0.0.1:0".into(),
        }
    }

    fn common_args(&self, storage: &Proxy) -> Vec<String> {
        let hb = self.hb.to_string();
        let disk = format!("ftdisk:{}", storage.addr);
        let args: Vec<String> = match &self.net {
            None => ["--guest", "kvstore", "--mem-mib", MEM_MIB, "--serial", "tcp:127.0.0.1:0"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            Some(net) => vec!["--guest".into(), "redis".into(), "--cmdline".into(), format!("ip={}/24", net.vm_ip())]
                .into_iter()
                .chain(["--net".to_string(), "tap:fttap".to_string()])
                .collect(),
        };
        args.into_iter().chain(["--heartbeat-ms".into(), hb, "--digest".into(), "--disk".into(), disk]).collect()
    }

    /// A side's own way to the ftdisk (cut by cut-storage, slowed by
    /// slow-storage).
    fn storage_proxy(&self) -> Proxy {
        Proxy::with_delay(&self.bind_ip(), &self.ftdisk_addr, Some(self.storage_delay.clone()))
    }

    fn side_name(&self) -> String {
        char::from(b'A' + (self.sides.len() % 26) as u8).to_string()
    }

    fn refresh(&mut self) {
        refresh(&mut self.sides, &self.t);
    }

    /// Waits until `cond` holds for side `i` (or it ends, or time is up).
    fn wait_side(
        &mut self,
        i: usize,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Side) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.refresh();
            let s = &self.sides[i];
            if cond(s) {
                return Ok(());
            }
            if !s.running() {
                return Err(format!("{} {} before {what}", s.name, s.status_text()));
            }
            if Instant::now() > deadline {
                return Err(format!("{} not {what} within {timeout:?}", s.name));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn register_console(&mut self, i: usize, initial: bool) -> Result<(), String> {
        if let Some(net) = &self.net {
            // The redis client talks to the VM's own address, whichever side is live.
            if initial {
                let s = &self.sides[i];
                let addr = format!("{}:6379", net.vm_ip());
                let msg = Msg::AddConn { side: i, name: s.name.clone(), pid: s.pid, addr, initial };
                return self.client_tx.send(msg).map_err(|_| "the client is gone".to_string());
            }
            return Ok(());
        }
        self.wait_side(i, START, "serving a console", |s| s.console.is_some())?;
        let s = &self.sides[i];
        let msg = Msg::AddConn {
            side: i,
            name: s.name.clone(),
            pid: s.pid,
            addr: s.console.clone().unwrap_or_default(),
            initial,
        };
        self.client_tx.send(msg).map_err(|_| "the client is gone".to_string())
    }

    fn start_pair(&mut self) -> Result<(), String> {
        let storage = Arc::new(self.storage_proxy());
        let host = self.pick_host()?;
        let mut args: Vec<String> = vec!["--primary".into(), "--listen".into(), self.listen_arg(&host)];
        args.extend(self.common_args(&storage));
        let mut a = Side::spawn(&self.side_name(), Role::Primary, &args, storage, host, &self.watchers)?;
        a.gen = Some(1);
        self.sides.push(a);
        self.wait_side(0, START, "listening for a backup", |s| s.listen.is_some())?;
        self.add_backup(0)?;
        self.wait_side(1, START, "in lockstep", |s| s.synced)?;
        self.register_console(0, true)?;
        self.register_console(1, false)?;
        Ok(())
    }

    /// Starts a backup of side `target` (through a logging-channel proxy);
    /// returns its index.
    fn add_backup(&mut self, target: usize) -> Result<usize, String> {
        let listen = self.sides[target].listen.clone().ok_or("the target has no --listen address")?;
        let log_proxy = Arc::new(Proxy::new(&self.bind_ip(), &listen));
        let storage = Arc::new(self.storage_proxy());
        let host = self.pick_host()?;
        let mut args: Vec<String> = vec![
            "--backup".into(),
            "--connect".into(),
            log_proxy.addr.clone(),
            "--listen".into(),
            self.listen_arg(&host),
        ];
        args.extend(self.common_args(&storage));
        let mut b = Side::spawn(&self.side_name(), Role::Backup, &args, storage, host, &self.watchers)?;
        b.target = Some(target);
        b.log_proxy = Some(log_proxy);
        self.sides.push(b);
        Ok(self.sides.len() - 1)
    }

    /// The live side: the running side that won the newest generation.
    fn live(&self) -> Option<usize> {
        let g = self.sides.iter().filter_map(|s| s.gen).max()?;
        self.sides.iter().position(|s| s.running() && s.gen == Some(g))
    }

    /// The live side's backup in lockstep, if any.
    fn backup_of(&self, live: usize) -> Option<usize> {
        let g = self.sides[live].gen;
        self.sides.iter().position(|s| s.running() && s.target == Some(live) && s.synced && s.attach_gen == g)
    }

    fn faults_done(&mut self) -> bool {
        let (done, running): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.faults_running).into_iter().partition(|(_, h)| h.is_finished());
        for (_, h) in done {
            let _ = h.join();
        }
        self.faults_running = running;
        self.faults_running.is_empty()
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for s in &self.sides {
            out.push_str(&format!(
                "{} ({:?}, pid {}): {}, generation {:?}, target {:?}, in lockstep {}, attached at {:?}; ",
                s.name,
                s.role,
                s.pid,
                s.status_text(),
                s.gen,
                s.target.map(|t| self.sides[t].name.clone()),
                s.synced,
                s.attach_gen
            ));
        }
        let v = lock(&self.view);
        out.push_str(&format!("client: serving pid {:?}, failing over {}", v.current_pid, v.failing_over));
        out
    }

    /// Waits until the faults are over, exactly one side is live, every
    /// other running side is its backup in lockstep, and the client is
    /// served by the live side.
    fn settle(&mut self) -> Result<usize, String> {
        let start = Instant::now();
        let deadline = start + SETTLE;
        loop {
            self.refresh();
            let faults_done = self.faults_done();
            if let Some(live) = self.live().filter(|_| faults_done) {
                let g = self.sides[live].gen;
                let others_ok = self.sides.iter().enumerate().all(|(i, s)| {
                    i == live || !s.running() || (s.target == Some(live) && s.synced && s.attach_gen == g)
                });
                let served = {
                    let v = lock(&self.view);
                    (self.net.is_some() || v.current_pid == Some(self.sides[live].pid))
                        && !v.failing_over
                        && v.last_reply.is_some_and(|r| r.elapsed() < Duration::from_millis(500))
                };
                if others_ok && served {
                    return Ok(live);
                }
            }
            if faults_done && self.sides.iter().all(|s| !s.running()) {
                return Err(format!("no side is left running: {}", self.describe()));
            }
            if Instant::now() > deadline {
                return Err(format!("did not settle within {SETTLE:?}: {}", self.describe()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A new backup joins the live side. Ok(false): its state transfer was
    /// cut short (a heartbeat timeout on a loaded host), which is no fault.
    fn reprotect(&mut self, live: usize) -> Result<bool, String> {
        self.t.say(format!("harness: re-protection: a new backup joins {}", self.sides[live].name));
        self.wait_side(live, START, "accepting backups", |s| s.listen.is_some())?;
        if self.quiesce_joins {
            lock(&self.view).paused = true;
            let deadline = Instant::now() + Duration::from_secs(5);
            while !lock(&self.view).idle && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            self.t.say("harness: the client pauses during the join");
        }
        let mut joiner = None;
        let result = (|| {
            let b = self.add_backup(live)?;
            joiner = Some(b);
            self.register_console(b, false)?;
            self.wait_side(b, START, "joined", |s| s.synced)
        })();
        if self.quiesce_joins {
            lock(&self.view).paused = false;
            self.t.say("harness: the client resumes");
        }
        if let (Err(e), Some(b)) = (&result, joiner) {
            std::thread::sleep(Duration::from_millis(50));
            self.refresh();
            if aborted_join(&self.sides[b]) {
                self.t.say(format!("harness: the join was cut short ({e})"));
                self.outcome.aborted_joins += 1;
                return Ok(false);
            }
        }
        result?;
        self.outcome.reprotections += 1;
        Ok(true)
    }

    /// kill-after-join: a new backup joins `live` (under slow storage most
    /// times, so that the writes the live side released are still in
    /// flight), and `live` is SIGKILLed as soon as the joiner prints that it
    /// restored the state or `live` that the backup joined (at once, or up
    /// to 30 ms later): the joined backup must go live with what it was
    /// handed. Ok(true) if the kill happened (a join cut short by a
    /// heartbeat timeout disarms it).
    fn kill_after_join(&mut self, live: usize) -> Result<bool, String> {
        let slowed = self.storage_base_us > 0 || self.rng.gen_bool(0.25);
        if !slowed {
            self.inject(Fault::SlowStorage, live, None);
            // Let the unapplied writes pile up.
            let d = Duration::from_millis(self.rng.gen_range(100..600));
            self.run_workload(d);
        }
        let joiner = self.side_name();
        let joiner_name = joiner.clone();
        let victim = self.sides[live].name.clone();
        let (watch, needle) = if self.rng.gen_bool(0.5) {
            (joiner, "restored at exit")
        } else {
            (victim.clone(), "backup joined at exit")
        };
        let delay =
            if self.rng.gen_bool(0.6) { Duration::ZERO } else { Duration::from_millis(self.rng.gen_range(1..=30)) };
        let host_dies = self.rng.gen_bool(0.5);
        self.t.say(format!(
            "harness: FAULT {}: SIGKILL {victim} {} {watch} prints {needle:?}{}",
            Fault::KillAfterJoin.name(),
            if delay.is_zero() { "as soon as".to_string() } else { format!("{delay:?} after") },
            if host_dies { " (its host dies: what its storage proxy holds from it is dropped)" } else { "" }
        ));
        let doomed = self.sides[live].doomed.clone();
        let victim_lines = lock(&self.sides[live].events).len();
        lock(&self.watchers.tripwires).push(Tripwire {
            watch,
            needle,
            victim: self.sides[live].pid,
            victim_name: victim,
            victim_storage: self.sides[live].storage.clone(),
            doomed: doomed.clone(),
            delay,
            host_dies,
        });
        let joined = self.reprotect(live);
        if matches!(joined, Ok(true)) {
            // The live side's line may come after the joiner's.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !doomed.load(Ordering::Acquire) && self.sides[live].running() && Instant::now() < deadline {
                self.refresh();
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        lock(&self.watchers.tripwires).clear();
        self.refresh();
        let fired = doomed.load(Ordering::Acquire);
        if fired {
            self.outcome.faults.push(Fault::KillAfterJoin);
        } else {
            self.t.say(format!("harness: {} disarmed: it did not fire", Fault::KillAfterJoin.name()));
        }
        // A join cut short is no fault when the live side had not finished
        // it; but once the live side said the backup joined (and released
        // what only that backup's copy of the state protects: the outputs
        // that waited for the disk alone), the backup must be able to go
        // live on its own.
        let joined_line = lock(&self.sides[live].events)
            .get(victim_lines..)
            .and_then(|new| new.iter().find(|l| l.contains("backup joined at exit")).cloned());
        let cut_short = self.sides.iter().rev().find(|s| s.name == joiner_name).filter(|s| aborted_join(s));
        match (fired, joined_line, cut_short) {
            (true, Some(line), Some(b)) => {
                let msg = format!(
                    "{} printed {line:?} and was killed; its new backup {} could not go live: {}",
                    self.sides[live].name,
                    b.name,
                    b.error.clone().unwrap_or_default()
                );
                self.violation("join-lost", msg);
            }
            (_, _, Some(_)) => self.t.say("harness: (the live side had not said the backup joined: not reported)"),
            _ => {}
        }
        joined.map(|_| fired)
    }

    /// The faults that may be injected now: those that need a backup only
    /// when there is one in lockstep; while timed faults last, only storage
    /// faults, or anything (but the same kind again) if only storage faults
    /// are under way (a kill never overlaps a freeze or a cut logging
    /// channel, so that one copy of the VM always survives).
    fn eligible(&self, backup: Option<usize>, overlapping: bool) -> Vec<Fault> {
        let running: Vec<Fault> = self.faults_running.iter().map(|(f, _)| *f).collect();
        let storage_only = running.iter().all(|r| r.is_storage());
        Fault::ALL
            .into_iter()
            .filter(|f| {
                backup.is_some()
                    || !matches!(
                        f,
                        Fault::KillPrimary
                            | Fault::KillBackup
                            | Fault::FreezeBackup
                            | Fault::CutLogging
                            | Fault::CutLink
                    )
            })
            .filter(|f| *f != Fault::CutLink || self.net.is_some())
            .filter(|f| !overlapping || (!running.contains(f) && (f.is_storage() || storage_only)))
            .collect()
    }

    fn inject(&mut self, fault: Fault, live: usize, backup: Option<usize>) {
        let hb = self.hb;
        self.outcome.faults.push(fault);
        let t = self.t.clone();
        match fault {
            Fault::KillPrimary | Fault::KillBackup => {
                let i = if fault == Fault::KillPrimary { live } else { backup.expect("a backup") };
                t.say(format!("harness: FAULT {}: SIGKILL {}", fault.name(), self.sides[i].name));
                self.sides[i].kill();
            }
            Fault::FreezePrimary | Fault::FreezeBackup => {
                let i = if fault == Fault::FreezePrimary { live } else { backup.expect("a backup") };
                let d = around_heartbeat(&mut self.rng, hb, 1500);
                let (pid, name) = (self.sides[i].pid, self.sides[i].name.clone());
                t.say(format!("harness: FAULT {}: SIGSTOP {name} for {d:?}", fault.name()));
                signal(pid, "-STOP");
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    signal(pid, "-CONT");
                    t.say(format!("harness: SIGCONT {name}"));
                });
                self.faults_running.push((fault, h));
            }
            Fault::CutLogging => {
                let b = backup.expect("a backup");
                let proxy = self.sides[b].log_proxy.clone().expect("a logging proxy");
                let d = around_heartbeat(&mut self.rng, hb, 1500);
                let reset = self.rng.gen_bool(0.3);
                t.say(format!(
                    "harness: FAULT {}: the logging channel {}-{} cut for {d:?}{}",
                    fault.name(),
                    self.sides[live].name,
                    self.sides[b].name,
                    if reset { ", then reset" } else { "" }
                ));
                proxy.cut();
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    proxy.restore(reset);
                    t.say("harness: logging channel restored");
                });
                self.faults_running.push((fault, h));
            }
            Fault::RestartFtdisk => {
                let down = Duration::from_millis(self.rng.gen_range(0..1500));
                t.say(format!("harness: FAULT {}: SIGKILL ftdisk, a new one in {down:?}", fault.name()));
                let ftdisk = self.ftdisk.clone();
                lock(&ftdisk).kill();
                let h = std::thread::spawn(move || {
                    std::thread::sleep(down);
                    let mut d = lock(&ftdisk);
                    match d.spawn() {
                        Ok(()) => t.say("harness: ftdisk restarted"),
                        Err(e) => t.say(format!("harness: ftdisk restart failed: {e}")),
                    }
                });
                self.faults_running.push((fault, h));
            }
            Fault::CutLink => {
                let b = backup.expect("a backup");
                let i = if self.rng.gen_bool(0.6) { live } else { b };
                let net = self.net.clone().expect("a lab");
                let host = self.sides[i].host.clone().unwrap_or_default();
                let d = around_heartbeat(&mut self.rng, hb, 1500);
                t.say(format!(
                    "harness: FAULT {}: {}'s host {host} cut from the LAN for {d:?}",
                    fault.name(),
                    self.sides[i].name
                ));
                let _ = net.lab.cut(&host);
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    let _ = net.lab.restore(&host);
                    t.say(format!("harness: host {host} back on the LAN"));
                });
                self.faults_running.push((fault, h));
            }
            Fault::SlowStorage => {
                let d = Duration::from_millis(self.rng.gen_range(1000..=4000));
                let per_chunk = self.rng.gen_range(1..=5u64) * 1000;
                let (delay, base) = (self.storage_delay.clone(), self.storage_base_us);
                t.say(format!(
                    "harness: FAULT {}: every storage proxy delays each chunk by {} ms for {d:?}",
                    fault.name(),
                    (base + per_chunk) as f64 / 1000.0
                ));
                delay.store(base + per_chunk, Ordering::Release);
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    delay.store(base, Ordering::Release);
                    t.say("harness: the storage is back to its usual speed");
                });
                self.faults_running.push((fault, h));
            }
            Fault::KillAfterJoin => unreachable!("kill-after-join is a re-protection (Scenario::kill_after_join)"),
            Fault::CutStorage => {
                let i = match backup {
                    Some(b) if self.rng.gen_bool(0.5) => b,
                    _ => live,
                };
                let d = Duration::from_millis(self.rng.gen_range(100..3000));
                let proxy = self.sides[i].storage.clone();
                let reset = self.rng.gen_bool(0.3);
                t.say(format!(
                    "harness: FAULT {}: {}'s storage cut for {d:?}{}",
                    fault.name(),
                    self.sides[i].name,
                    if reset { ", then reset" } else { "" }
                ));
                proxy.cut();
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    proxy.restore(reset);
                    t.say("harness: storage restored");
                });
                self.faults_running.push((fault, h));
            }
        }
    }

    fn run_workload(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.refresh();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn run(&mut self) -> Result<(), String> {
        self.start_pair()?;
        let deadline = Instant::now() + START;
        while !lock(&self.view).ready {
            self.refresh();
            if Instant::now() > deadline {
                return Err(format!("the client never got going: {}", self.describe()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let warm = Duration::from_millis(self.rng.gen_range(200..1000));
        self.run_workload(warm);
        let n_faults = self.rng.gen_range(1..=3);
        let reprotect = self.rng.gen_bool(0.8);
        let mut joins_left = n_faults + 1;
        let mut injected = 0;
        while injected < n_faults {
            let live = self.settle()?;
            let backup = self.backup_of(live);
            if backup.is_none() && reprotect && joins_left > 0 {
                joins_left -= 1;
                if self.rng.gen_bool(KILL_AFTER_JOIN) {
                    // The join is the fault: the live side dies as it ends.
                    if self.kill_after_join(live)? {
                        injected += 1;
                    }
                    let d = Duration::from_millis(self.rng.gen_range(300..1200));
                    self.run_workload(d);
                } else {
                    self.reprotect(live)?;
                    // A joined backup must stay in lockstep: give it a moment.
                    self.run_workload(Duration::from_millis(300));
                }
                continue;
            }
            let choices = self.eligible(backup, false);
            let fault = choices[self.rng.gen_range(0..choices.len())];
            self.inject(fault, live, backup);
            injected += 1;
            // Sometimes another fault while this one lasts.
            if injected < n_faults && !fault.is_kill() && self.rng.gen_bool(0.3) {
                std::thread::sleep(Duration::from_millis(self.rng.gen_range(0..300)));
                self.refresh();
                let backup = self.backup_of(live).filter(|_| self.sides[live].running());
                let choices: Vec<Fault> = self
                    .eligible(backup, true)
                    .into_iter()
                    .filter(|f| !f.is_kill() || self.sides[live].running())
                    .collect();
                if !choices.is_empty() {
                    let second = choices[self.rng.gen_range(0..choices.len())];
                    self.t.say("harness: overlapping fault");
                    self.inject(second, live, backup);
                    injected += 1;
                }
            }
            let d = Duration::from_millis(self.rng.gen_range(300..1200));
            self.run_workload(d);
        }
        let live = self.settle()?;
        if self.backup_of(live).is_none() && reprotect && joins_left > 0 {
            self.reprotect(live)?;
            self.run_workload(Duration::from_millis(300));
            self.settle()?;
        }
        let d = Duration::from_millis(self.rng.gen_range(100..500));
        self.run_workload(d);
        Ok(())
    }
}

/// Boots a fresh redis VM on the disk, on lab host `host`, and reads `keys`
/// back over the network.
fn read_redis_disk(
    net: &NetLab,
    host: &str,
    ftdisk_addr: &str,
    keys: &[String],
    t: &Transcript,
) -> Result<Vec<String>, String> {
    let disk = format!("ftdisk:{ftdisk_addr}");
    let cmdline = format!("ip={}/24", net.vm_ip());
    let ns = net.ns(host);
    let args = ["--guest", "redis", "--cmdline", &cmdline, "--net", "tap:fttap", "--disk", &disk];
    t.say(format!("harness: a fresh VM on host {host} reads the disk: ftvmm {}", args.join(" ")));
    let _ = net.lab.restore(host);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(ftvmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let err = child.stderr.take();
    let t2 = t.clone();
    std::thread::spawn(move || {
        if let Some(err) = err {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                t2.say(format!("fresh VM: {line}"));
            }
        }
    });
    let addr = format!("{}:6379", net.vm_ip());
    let result = (|| {
        let deadline = Instant::now() + START;
        let mut conn = loop {
            if let Some(mut c) = resp_connect(&addr) {
                if matches!(c.cmd(&["PING"]), Ok(Reply::Simple(p)) if p == "PONG") {
                    break c;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("the fresh VM at {addr} never answered"));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut values = Vec::new();
        for k in keys {
            let r = conn.cmd(&["GET", k]).map_err(|e| format!("GET {k} from the fresh VM: {e}"))?;
            values.push(reply_text(&r));
        }
        let _ = conn.send(&["SHUTDOWN"]);
        Ok(values)
    })();
    let status = ftvmm_tests::wait_timeout(&mut child, Duration::from_secs(20));
    let values = result?;
    match status.and_then(|s| s.code()) {
        Some(0) => Ok(values),
        other => Err(format!("the fresh VM ended with {other:?}")),
    }
}

/// An 8 MiB kvstore disk whose log already holds the probe keys: `pN` set
/// to `pvN` for N below [`PROBES`] (kvstore's records: one 512-byte sector
/// each, magic `KVS1`, the sector's index, op 1 = set, key and value
/// lengths, the key at byte 11, the value at byte 75).
fn kvstore_image(path: &str) -> std::io::Result<()> {
    let mut data = vec![0u8; PROBES as usize * 512];
    for (i, rec) in data.chunks_mut(512).enumerate() {
        let (key, value) = (format!("p{i}"), format!("pv{i}"));
        rec[..4].copy_from_slice(b"KVS1");
        rec[4..8].copy_from_slice(&(i as u32).to_le_bytes());
        rec[8] = 1;
        rec[9] = key.len() as u8;
        rec[10] = value.len() as u8;
        rec[11..11 + key.len()].copy_from_slice(key.as_bytes());
        rec[75..75 + value.len()].copy_from_slice(value.as_bytes());
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(&data)?;
    f.set_len(8 << 20)
}

/// Boots a fresh VM on the disk and reads `keys` (names) back through its
/// console, 50 commands at a time (kvstore's receive ring holds 1 KiB and
/// drops what overruns it, so the input is paced by the replies).
fn read_disk(ftdisk_addr: &str, keys: &[String], t: &Transcript) -> Result<Vec<String>, String> {
    let disk = format!("ftdisk:{ftdisk_addr}");
    let args = ["--guest", "kvstore", "--mem-mib", MEM_MIB, "--disk", &disk, "--serial", "tcp:127.0.0.1:0"];
    t.say(format!("harness: a fresh VM reads the disk: ftvmm {}", args.join(" ")));
    let mut child = Command::new(ftvmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = (|| {
        let mut err = BufReader::new(child.stderr.take().ok_or("no stderr")?);
        let mut line = String::new();
        let console = loop {
            line.clear();
            if err.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("the fresh VM ended before serving its console".to_string());
            }
            if line.contains("serial console on ") {
                break addr_at_end(line.trim_end());
            }
        };
        std::thread::spawn(move || for _ in err.lines() {});
        let stream = TcpStream::connect(&console).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let mut w = stream.try_clone().map_err(|e| e.to_string())?;
        let mut r = BufReader::new(stream);
        let mut read = || -> Result<String, String> {
            let mut l = String::new();
            match r.read_line(&mut l) {
                Ok(n) if n > 0 => Ok(l.trim_end().to_string()),
                Ok(_) => Err("the fresh VM's console closed".to_string()),
                Err(e) => Err(format!("reading the fresh VM's console: {e}")),
            }
        };
        let ready = read()?;
        t.say(format!("harness: fresh VM: {ready}"));
        let mut values = Vec::new();
        for batch in keys.chunks(50) {
            let text: String = batch.iter().map(|k| format!("get {k}\n")).collect();
            w.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
            for _ in batch {
                values.push(read()?);
            }
        }
        w.write_all(b"quit\n").map_err(|e| e.to_string())?;
        let bye = read()?;
        if bye != "BYE" {
            return Err(format!("the fresh VM answered {bye:?} to quit"));
        }
        Ok(values)
    })();
    let status = ftvmm_tests::wait_timeout(&mut child, Duration::from_secs(20));
    let values = result?;
    match status.and_then(|s| s.code()) {
        Some(0) => Ok(values),
        other => Err(format!("the fresh VM ended with {other:?}")),
    }
}

fn run_scenario(idx: u64, seed: u64, net: Option<Arc<NetLab>>, quiesce_joins: bool) -> (Outcome, Transcript) {
    let t = Transcript::new();
    let guest = if net.is_some() { GuestKind::Redis } else { GuestKind::Kvstore };
    t.say(format!("harness: scenario {idx}, seed {seed}, guest {guest:?}"));
    let dir = Scratch::new("chaos");
    let image = dir.path("disk.img");
    let made = match guest {
        GuestKind::Kvstore => kvstore_image(&image),
        GuestKind::Redis => std::fs::File::create(&image).and_then(|f| f.set_len(8 << 20)),
    };
    if let Some(net) = &net {
        net.restore_all();
        net.flush_fdb();
    }
    if let Err(e) = made {
        let outcome = Outcome {
            violations: vec![("harness".into(), format!("cannot write {image}: {e}"))],
            ..Default::default()
        };
        return (outcome, t);
    }
    let bind_ip = net.as_ref().map_or_else(|| "127.0.0.1".to_string(), |n| n.bridge_ip());
    let ftdisk = match Ftdisk::start(&image, &bind_ip, &t) {
        Ok(d) => d,
        Err(e) => {
            let outcome = Outcome {
                violations: vec![("harness".into(), format!("cannot start ftdisk: {e}"))],
                ..Default::default()
            };
            return (outcome, t);
        }
    };
    let ftdisk_addr = ftdisk.addr.clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let hb = rng.gen_range(100..=150);
    t.say(format!("harness: heartbeat {hb} ms"));
    // Some scenarios run on slow storage throughout.
    let storage_base_us = if rng.gen_bool(0.25) { rng.gen_range(1..=3u64) * 1000 } else { 0 };
    if storage_base_us > 0 {
        t.say(format!(
            "harness: slow storage throughout: every storage proxy delays each chunk by {} ms",
            storage_base_us / 1000
        ));
    }
    let view: Arc<Mutex<ClientView>> = Arc::default();
    let (client_tx, client_rx) = mpsc::channel();
    let client = {
        let (tx, view, t) = (client_tx.clone(), view.clone(), t.clone());
        match guest {
            GuestKind::Kvstore => std::thread::spawn(move || client_main(client_rx, tx, view, t, seed)),
            GuestKind::Redis => std::thread::spawn(move || redis_client_main(client_rx, view, t, seed)),
        }
    };
    let outcome = Outcome { slow_base_ms: storage_base_us / 1000, ..Default::default() };
    let mut sc = Scenario {
        seed,
        rng,
        t: t.clone(),
        hb,
        ftdisk: Arc::new(Mutex::new(ftdisk)),
        ftdisk_addr,
        sides: Vec::new(),
        client_tx,
        view,
        outcome,
        faults_running: Vec::new(),
        quiesce_joins,
        guest,
        net,
        watchers: Watchers { t: t.clone(), wins: Arc::default(), tripwires: Arc::default() },
        storage_delay: Arc::new(AtomicU64::new(storage_base_us)),
        storage_base_us,
        _dir: dir,
    };
    let result = sc.run();
    let settled = match result {
        Ok(_) => true,
        Err(e) => {
            let kind = if e.contains("settle") || e.contains("no side is left") {
                "unavailable"
            } else if e.contains("joined") {
                "join-failed"
            } else {
                "harness"
            };
            sc.violation(kind, e);
            false
        }
    };
    sc.finish(settled, client);
    let outcome = std::mem::take(&mut sc.outcome);
    drop(sc);
    (outcome, t)
}

impl Scenario {
    /// The VM was lost (every side ended before the harness ended them,
    /// the last by itself): nothing released an output that only a dead
    /// side held, so a fresh VM on the disk still reads every acknowledged
    /// write — for each key a version at least the newest acknowledged and
    /// at most the newest sent.
    fn check_disk_after_loss(&mut self, report: &ClientReport) {
        self.t.say("harness: every side is gone: the disk must still hold every acknowledged write");
        if !lock(&self.ftdisk).running() {
            let _ = lock(&self.ftdisk).spawn();
        }
        let keys: Vec<String> = report.bounds.keys().cloned().collect();
        let read = match &self.net {
            None => read_disk(&self.ftdisk_addr, &keys, &self.t),
            Some(net) => {
                let host = self.sides.iter().rev().find_map(|s| s.host.clone()).unwrap_or_else(|| "v1".into());
                net.flush_fdb();
                read_redis_disk(net, &host, &self.ftdisk_addr, &keys, &self.t)
            }
        };
        let values = match read {
            Ok(v) => v,
            Err(e) => return self.violation("disk-check", e),
        };
        let read: Vec<String> = keys.iter().zip(&values).map(|(k, v)| format!("{k}: {v}")).collect();
        let bounds: Vec<String> = report.bounds.iter().map(|(k, (a, s))| format!("{k}: {a}..={s}")).collect();
        self.t.say(format!(
            "harness: the disk holds {}; acknowledged..=sent versions: {}",
            read.join(", "),
            bounds.join(", ")
        ));
        for (k, v) in keys.iter().zip(values) {
            let (acked, sent) = report.bounds[k];
            let ver = if v == "NOTFOUND" {
                Some(0)
            } else {
                v.strip_prefix(&format!("VALUE {k}-v")).and_then(|n| n.parse::<u64>().ok())
            };
            match ver {
                Some(ver) if ver < acked => self.violation(
                    "lost-write",
                    format!("after the VM was lost, {k} reads version {ver} from the disk though version {acked} was acknowledged"),
                ),
                Some(ver) if ver > sent => self.violation(
                    "phantom-read",
                    format!("after the VM was lost, {k} reads version {ver} from the disk, never written (last sent: {sent})"),
                ),
                Some(_) => {}
                None => self.violation("disk-check", format!("{k} reads {v:?} from the disk")),
            }
        }
    }

    /// Final reads and `quit`, the endings, the disk, the split-brain check.
    fn finish(&mut self, settled: bool, client: JoinHandle<ClientReport>) {
        // Let the faults end before anything else.
        while !self.faults_done() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.client_tx.send(if settled { Msg::Final } else { Msg::Abort });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lock(&self.view).finished && Instant::now() < deadline {
            self.refresh();
            std::thread::sleep(Duration::from_millis(10));
        }
        if !lock(&self.view).finished {
            self.violation("unavailable", format!("the client could not finish its final reads: {}", self.describe()));
            let _ = self.client_tx.send(Msg::Abort);
        }
        let report = client.join().unwrap_or_default();
        self.outcome.acked = report.acked;
        self.outcome.switches = lock(&self.view).switches;
        self.outcome.failovers = self.sides.iter().filter(|s| s.went_live).count() as u32;
        for (k, m) in &report.violations {
            self.outcome.violations.push((k.clone(), m.clone()));
        }

        // Endings: once the VM quit, every side must end.
        let deadline = Instant::now() + Duration::from_secs(if report.quit { 15 } else { 0 });
        loop {
            self.refresh();
            if self.sides.iter().all(|s| !s.running()) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let still: Vec<String> = self.sides.iter().filter(|s| s.running()).map(|s| s.name.clone()).collect();
        if report.quit && !still.is_empty() {
            let d = self.describe();
            self.violation("still-running", format!("{} still running 15 s after the VM quit: {d}", still.join(", ")));
        }
        // Every side gone before the harness ends them: the VM was lost.
        let none_left = !report.quit && self.sides.iter().all(|s| !s.running());
        for s in &mut self.sides {
            s.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
        self.refresh();
        let mut found = Vec::new();
        for s in &self.sides {
            if s.killed || aborted_join(s) {
                continue;
            }
            let code = s.exit.and_then(|e| e.code());
            match code {
                Some(5) => {}
                Some(0) if report.quit => {}
                _ => found.push((
                    if code == Some(3) { "divergence" } else { "bad-exit" },
                    format!("{} {}: {}", s.name, s.status_text(), s.error.clone().unwrap_or_default()),
                )),
            }
        }
        // The sides that ended with the VM: equal digests.
        let enders: Vec<&Side> = self.sides.iter().filter(|s| s.exit.and_then(|e| e.code()) == Some(0)).collect();
        if let Some(first) = enders.first() {
            for o in &enders[1..] {
                if o.digest != first.digest || o.digest.is_none() {
                    found.push((
                        "digest-mismatch",
                        format!("{} ended with {:?}, {} with {:?}", first.name, first.digest, o.name, o.digest),
                    ));
                }
            }
        }
        for (k, m) in found {
            self.violation(k, m);
        }

        // The disk, read by a fresh VM, holds what the final reads saw.
        if report.quit {
            if !lock(&self.ftdisk).running() {
                let _ = lock(&self.ftdisk).spawn();
            }
            // The keys read at the end, and a sample of the untouched probe keys.
            let mut want_values = report.final_values.clone();
            for _ in 0..if self.guest == GuestKind::Kvstore { 24 } else { 0 } {
                let id = self.rng.gen_range(0..PROBES);
                want_values.insert(format!("p{id}"), format!("VALUE pv{id}"));
            }
            let keys: Vec<String> = want_values.keys().cloned().collect();
            let read = match &self.net {
                None => read_disk(&self.ftdisk_addr, &keys, &self.t),
                Some(net) => {
                    // On the last live side's host: the LAN knows the VM's MAC there.
                    let host = self
                        .sides
                        .iter()
                        .filter(|s| s.exit.and_then(|e| e.code()) == Some(0))
                        .max_by_key(|s| s.gen)
                        .and_then(|s| s.host.clone())
                        .unwrap_or_else(|| "v1".into());
                    net.flush_fdb();
                    read_redis_disk(net, &host, &self.ftdisk_addr, &keys, &self.t)
                }
            };
            match read {
                Ok(values) => {
                    for (k, v) in keys.iter().zip(values) {
                        let want = &want_values[k];
                        if &v != want {
                            let bounds = report.bounds.get(k).copied();
                            self.violation(
                                "disk-mismatch",
                                format!("{k} reads {v:?} from the disk but {want:?} from the live side (acknowledged, sent: {bounds:?})"),
                            );
                        }
                    }
                }
                Err(e) => self.violation("disk-check", e),
            }
        } else if none_left {
            self.check_disk_after_loss(&report);
        }

        // Split brain: who answered, and whether a newer owner existed
        // before the command was sent.
        let mut wins = lock(&lock(&self.ftdisk).wins).clone();
        for w in lock(&self.watchers.wins).iter() {
            if !wins.iter().any(|x| x.generation == w.generation && x.pid == w.pid) {
                self.t.say(format!("harness: generation {} won by {}: not in the ftdisk's log", w.generation, w.owner));
                wins.push(w.clone());
            }
        }
        let mut found = Vec::new();
        let mut by_gen: BTreeMap<u64, Vec<&Win>> = BTreeMap::new();
        for w in &wins {
            by_gen.entry(w.generation).or_default().push(w);
        }
        for (g, ws) in &by_gen {
            if ws.iter().any(|w| w.pid != ws[0].pid) {
                let owners: Vec<&str> = ws.iter().map(|w| w.owner.as_str()).collect();
                found.push(("split-brain", format!("generation {g} won by more than one side: {owners:?}")));
            }
        }
        let mut flagged: HashMap<u32, u32> = HashMap::new();
        for r in &report.replies {
            // A win read from the winner's log may be read after its first reply.
            let own = wins
                .iter()
                .filter(|w| w.pid == r.pid && w.at_us <= r.at_us + if w.from_side { 500_000 } else { 0 })
                .map(|w| w.generation)
                .max();
            let msg = match own {
                None => {
                    Some(format!("{} (pid {}) answered {:?} without having won the arbitration", r.name, r.pid, r.what))
                }
                Some(g) => wins.iter().find(|w| w.pid != r.pid && w.generation > g && w.at_us < r.sent_us).map(|w| {
                    format!(
                        "{} (pid {}, generation {g}) answered {:?}, sent {:.3} s after {} won generation {}",
                        r.name,
                        r.pid,
                        r.what,
                        (r.sent_us - w.at_us) as f64 / 1e6,
                        w.owner,
                        w.generation
                    )
                }),
            };
            if let Some(msg) = msg {
                let n = flagged.entry(r.pid).or_default();
                *n += 1;
                if *n <= 3 {
                    found.push(("split-brain", msg));
                }
            }
        }
        for (k, m) in found {
            self.violation(k, m);
        }
        let seed = self.seed;
        self.t.say(format!("harness: scenario with seed {seed} done"));
    }
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
