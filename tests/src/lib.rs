//! ftvmm-tests: end-to-end tests of the `ftvmm` binary on real `/dev/kvm`
//! (`tests/*.rs`), the helpers they share (this file), and the `ftbench`
//! benchmark. Tests run the release binary the README's test command builds.
//! [`lab`] makes network-namespace hosts (also for the demo, via `ftlab`);
//! [`prometheus`] runs a real Prometheus server that scrapes what a test
//! starts.

pub mod lab;
pub mod prometheus;
pub mod resp;

use credentials::rustls;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Fails the test, saying why, where `/dev/kvm` is missing: ftvmm's tests
/// never skip silently.
pub fn require_kvm() {
    let kvm = Path::new("/dev/kvm");
    assert!(
        kvm.exists() && std::fs::OpenOptions::new().read(true).write(true).open(kvm).is_ok(),
        "/dev/kvm is missing or not accessible: ftvmm's tests need real KVM"
    );
}

/// The `ftvmm` binary: `$FTVMM_BIN`, or `ftvmm` beside this test's target dir.
pub fn ftvmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FTVMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("ftvmm");
    assert!(bin.is_file(), "ftvmm binary not found at {}: build it first (`cargo build --release`)", bin.display());
    bin
}

/// The `ftdisk` binary beside `ftvmm`.
pub fn ftdisk_bin() -> PathBuf {
    let bin = ftvmm_bin().with_file_name("ftdisk");
    assert!(bin.is_file(), "ftdisk binary not found at {}: build it first (`cargo build --release`)", bin.display());
    bin
}

/// A running `ftdisk` serving `image` on `addr` (port 0: any), and the
/// address it serves on.
pub fn spawn_ftdisk(image: &str, addr: &str) -> (KillOnDrop, String) {
    spawn_ftdisk_with(&["--image", image], addr)
}

/// A running `ftdisk` with `args` (`--image PATH`, or `--arbiter-only
/// --state PATH`) on `addr`, and the address it serves on.
pub fn spawn_ftdisk_with(args: &[&str], addr: &str) -> (KillOnDrop, String) {
    let (child, served) = spawn_ftdisk_in(None, args, addr);
    (KillOnDrop(child), served)
}

/// A running arbiter-only `ftdisk` keeping its record in `state`, on
/// `addr`, inside network namespace `ns` (None: here); it is killed when
/// dropped. Returns once it serves, with the address it serves on.
pub fn spawn_arbiter(ns: Option<&str>, state: &str, addr: &str) -> (KillOnDrop, String) {
    let (child, served) = spawn_ftdisk_in(ns, &["--arbiter-only", "--state", state], addr);
    (KillOnDrop(child), served)
}

/// A primary and a backup of the `redis` guest at `vm` (an address on the
/// lab network `net`, e.g. `10.88.0`) with a TAP `fttap` each, in network
/// namespaces `[primary, backup, arbiter]` (lab hosts .1, .2 and .4),
/// arbitrated by an arbiter-only ftdisk on the third; `extra`: more ftvmm
/// flags for both. The backup is started, not yet attached.
pub fn spawn_redis_pair(ns: [&str; 3], net: &str, vm: &str, dir: &Scratch, extra: &[&str]) -> (Proc, Proc, KillOnDrop) {
    let arbiter_addr = format!("{net}.4:7100");
    let (arbiter, _) = spawn_arbiter(Some(ns[2]), &dir.path("record"), &arbiter_addr);
    let cmdline = format!("ip={vm}/24");
    let arb = format!("ftdisk:{arbiter_addr}");
    let mut common = vec!["--guest", "redis", "--cmdline", &cmdline, "--net", "tap:fttap", "--arbiter", &arb];
    common.extend_from_slice(extra);
    let listen = format!("{net}.1:7000");
    let mut pargs = vec!["--primary", "--listen", &listen];
    pargs.extend_from_slice(&common);
    let primary = Proc::spawn_in(Some(ns[0]), &pargs);
    let mut bargs = vec!["--backup", "--connect", &listen];
    bargs.extend_from_slice(&common);
    let backup = Proc::spawn_in(Some(ns[1]), &bargs);
    (primary, backup, arbiter)
}

/// A running `ftdisk` with `args` on `addr` and its metrics on
/// `--metrics 127.0.0.1:0`: the guard, the address it serves the disk on,
/// and that of its metrics server.
pub fn spawn_ftdisk_with_metrics(args: &[&str], addr: &str) -> (KillOnDrop, String, String) {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--metrics", "127.0.0.1:0"]);
    let (child, served, metrics) = start_ftdisk(None, &all, addr);
    let metrics = metrics.unwrap_or_else(|| panic!("ftdisk never said where its metrics are"));
    (KillOnDrop(child), served, metrics)
}

/// The address in a "... metrics on http://ADDR/metrics" line.
fn metrics_url(line: &str) -> Option<String> {
    let (_, url) = line.split_once("metrics on http://")?;
    Some(url.trim_end_matches("/metrics").to_string())
}

/// The address a VMM started with `--metrics` serves on (from its
/// "metrics on http://ADDR/metrics" line).
pub fn metrics_addr(p: &Proc) -> String {
    metrics_url(&p.wait_line("metrics on http://", Duration::from_secs(60))).unwrap_or_default()
}

/// Sends `bytes` to the redis guest's discard service (TCP 9) at `vm`,
/// closes our half and waits for its close (it sends nothing): how long
/// that took.
pub fn send_to_discard(vm: &str, bytes: usize) -> Duration {
    let mut conn = TcpStream::connect((vm, 9)).expect("the guest's discard service");
    conn.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let chunk = vec![0x5a; 64 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        conn.write_all(&chunk[..n]).expect("send to the discard service");
        left -= n;
    }
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(conn.read(&mut [0u8; 16]).expect("the discard service's close"), 0, "discard sends nothing");
    start.elapsed()
}

/// Reads `bytes` from the redis guest's source service (TCP 19) at `vm`,
/// checking that they are all `x`: how long that took.
pub fn read_from_source(vm: &str, bytes: usize) -> Duration {
    let mut conn = TcpStream::connect((vm, 19)).expect("the guest's source service");
    conn.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut got = 0;
    while got < bytes {
        let n = conn.read(&mut buf).expect("read from the source service");
        assert!(n > 0, "the source service closed after {got} bytes");
        assert!(buf[..n].iter().all(|&b| b == b'x'), "the source sent other bytes than x");
        got += n;
    }
    start.elapsed()
}

/// CPU seconds (user + system, all threads) process `pid` has used so far,
/// from `/proc/PID/stat`; None once it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3:
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

/// A `/metrics` text, scraped from `addr`.
pub fn scrape(addr: &str) -> String {
    let answer = telemetry::http_get(addr, "/metrics", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
    assert_eq!(answer.status, 200, "scraping {addr}");
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// The value of the series `series` (its name and labels, exactly as
/// exposed) in a `/metrics` text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// Scrapes `addr` until `series` has a value for which `want` holds, and
/// returns it; panics after `timeout` with the last text.
pub fn wait_metric(addr: &str, series: &str, timeout: Duration, want: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let text = scrape(addr);
        if let Some(v) = metric(&text, series).filter(|v| want(*v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "{series} at {addr} never had the wanted value:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`spawn_ftdisk_with`] inside network namespace `ns` (None: here).
pub fn spawn_ftdisk_in(ns: Option<&str>, args: &[&str], addr: &str) -> (Child, String) {
    let (child, served, _) = start_ftdisk(ns, args, addr);
    (child, served)
}

/// Starts ftdisk with `args` on `addr` (inside network namespace `ns` if
/// given) and reads its log until it serves: the child, the address it
/// serves on, and its metrics address if it said one.
fn start_ftdisk(ns: Option<&str>, args: &[&str], addr: &str) -> (Child, String, Option<String>) {
    // `ip netns exec` becomes ftdisk: the child is ftdisk either way.
    let mut command = match ns {
        None => Command::new(ftdisk_bin()),
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(ftdisk_bin());
            command
        }
    };
    let mut child = command
        .args(args)
        .args(["--listen", addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftdisk");
    let err = child.stderr.take().expect("piped stderr");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(err));
    let mut metrics = None;
    let line = lines
        .by_ref()
        .map_while(Result::ok)
        .inspect(|l| {
            if metrics.is_none() {
                metrics = metrics_url(l);
            }
        })
        .find(|l| l.starts_with("ftdisk: serving"))
        .unwrap_or_else(|| panic!("ftdisk never said it was serving"));
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let served = line.rsplit(' ').next().unwrap_or_default().to_string();
    (child, served, metrics)
}

/// A client connection to the redis guest at `vm`, once it answers PING
/// (within 30 s).
pub fn redis_client(vm: &str) -> resp::RespConn {
    let addr = format!("{vm}:6379");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match resp::RespConn::connect(&addr, Duration::from_secs(20)) {
            Ok(mut c) => {
                if matches!(c.cmd(&["PING"]), Ok(resp::Reply::Simple(s)) if s == "PONG") {
                    return c;
                }
            }
            Err(e) => assert!(Instant::now() < deadline, "cannot reach redis at {addr}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A raw disk image of `bytes` bytes made by qemu-img.
pub fn qemu_img(path: &str, bytes: u64) {
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw", path, &bytes.to_string()])
        .status()
        .expect("qemu-img is installed");
    assert!(status.success(), "qemu-img create failed");
}

/// What a finished run printed and how it ended.
#[derive(Debug, Clone)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The `state-digest:` value, which must be stderr's last line.
    pub fn digest(&self) -> Option<String> {
        let last = self.stderr.lines().last()?;
        let hex = last.strip_prefix("state-digest: ")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_string())
    }

    /// The exit status, panicking (with the output) if it was killed.
    pub fn code(&self) -> i32 {
        match self.status {
            Some(c) => c,
            None => panic!("ftvmm was killed or timed out\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr),
        }
    }

    /// Asserts the run failed with status `code` and one clear error line.
    pub fn assert_error(&self, code: i32, contains: &str) {
        assert_eq!(self.code(), code, "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        // The plaintext warning of a VMM without TLS precedes any error of
        // a run that talks to other hosts; it is not an error line.
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.starts_with("state-digest:") && !l.starts_with("ftvmm: warning: no TLS"))
            .collect();
        assert_eq!(lines.len(), 1, "want exactly one error line, got:\n{}", self.stderr);
        assert!(lines[0].starts_with("ftvmm: error: "), "not an ftvmm error line: {}", lines[0]);
        assert!(lines[0].contains(contains), "error line {:?} lacks {contains:?}", lines[0]);
        assert!(!self.stderr.contains("panicked"), "ftvmm panicked: {}", self.stderr);
    }
}

/// A command for `ftvmm` with `args`.
pub fn ftvmm(args: &[&str]) -> Command {
    let mut cmd = Command::new(ftvmm_bin());
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs `ftvmm args`, killing it after `timeout`.
pub fn run(args: &[&str], timeout: Duration) -> Run {
    require_kvm();
    let child = ftvmm(args).spawn().expect("spawn ftvmm");
    wait(child, timeout)
}

/// Waits for `child` at most `timeout`, collecting its output.
pub fn wait(mut child: Child, timeout: Duration) -> Run {
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = wait_timeout(&mut child, timeout);
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Run { status: status.and_then(|s| s.code()), stdout, stderr }
}

/// Waits for `child` at most `timeout`; kills it and returns None past that.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `ftvmm args` feeding `input` to its stdin as `chunks`, each after a
/// delay (serial input arriving at chosen moments).
pub fn run_with_input(args: &[&str], chunks: &[(Duration, Vec<u8>)], timeout: Duration) -> Run {
    require_kvm();
    let mut child = ftvmm(args).stdin(Stdio::piped()).spawn().expect("spawn ftvmm");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let chunks = chunks.to_vec();
    let feeder = std::thread::spawn(move || {
        for (delay, bytes) in chunks {
            std::thread::sleep(delay);
            if stdin.write_all(&bytes).and_then(|_| stdin.flush()).is_err() {
                break;
            }
        }
    });
    let run = wait(child, timeout);
    let _ = feeder.join();
    run
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ftvmm-test-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A minimal x86-64 ELF executable: each segment is (address, bytes,
/// memory size, executable).
pub fn elf(entry: u64, segments: &[(u64, &[u8], u64, bool)]) -> Vec<u8> {
    let phoff = 64u64;
    let data_start = phoff + 56 * segments.len() as u64;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&phoff.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&56u16.to_le_bytes());
    out.extend_from_slice(&(segments.len() as u16).to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    let mut offset = data_start;
    for (addr, bytes, memsz, exec) in segments {
        out.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        out.extend_from_slice(&(if *exec { 5u32 } else { 6u32 }).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&memsz.to_le_bytes());
        out.extend_from_slice(&0x1000u64.to_le_bytes());
        offset += bytes.len() as u64;
    }
    for (_, bytes, _, _) in segments {
        out.extend_from_slice(bytes);
    }
    out
}

/// Seconds to allow a guest run: generous, these machines are shared.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A running `ftvmm` whose stderr lines can be waited for.
pub struct Proc {
    pub child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// The stderr and stdout readers, which end at their pipe's end.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Spawns `ftvmm args`.
    pub fn spawn(args: &[&str]) -> Proc {
        Proc::spawn_command(Command::new(ftvmm_bin()), args)
    }

    fn spawn_command(mut cmd: Command, args: &[&str]) -> Proc {
        require_kvm();
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftvmm");
        let stderr_lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout_bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("piped stderr");
        let lines = stderr_lines.clone();
        let err_reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                lines.lock().expect("lock").push(line);
            }
        });
        let mut out = child.stdout.take().expect("piped stdout");
        let bytes = stdout_bytes.clone();
        let out_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                bytes.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        });
        Proc { child, stderr: stderr_lines, stdout: stdout_bytes, readers: vec![err_reader, out_reader] }
    }

    /// The stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("lock").clone()
    }

    /// The stdout bytes so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().expect("lock")).into_owned()
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.stderr().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no stderr line with {needle:?} within {timeout:?}; got {:?}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The address at the end of the stderr line containing `needle`
    /// (e.g. "waiting for a backup on 127.0.0.1:4321").
    pub fn wait_addr(&self, needle: &str, timeout: Duration) -> String {
        let line = self.wait_line(needle, timeout);
        line.rsplit(' ').next().unwrap_or_default().trim_end_matches(';').to_string()
    }

    /// Waits for the process to end (killing it past `timeout`).
    pub fn finish(mut self, timeout: Duration) -> Run {
        let status = wait_timeout(&mut self.child, timeout);
        // Everything it wrote, up to its pipes' end (a fixed pause missed
        // the last lines on a loaded host); bounded, in case something else
        // holds a pipe open.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Run { status: status.and_then(|s| s.code()), stdout: self.stdout(), stderr: self.stderr().join("\n") + "\n" }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two test hosts, "primary" and "backup", as a [`lab::Lab`] whose bridge
/// the root namespace (the client) also sits on. Only as root; dropped, it
/// removes them.
pub struct Hosts {
    lab: lab::Lab,
    pub primary_ip: String,
    pub backup_ip: String,
}

impl Hosts {
    /// Creates the hosts on 10.`subnet`.0.0/24. Fails the test, saying why,
    /// when not root: ftvmm's tests never skip silently, nor fall back to
    /// something else.
    pub fn create(subnet: u8) -> Hosts {
        assert!(lab::is_root(), "this test needs root: it runs its primary and backup on network-namespace hosts");
        let name = format!("ft{}{subnet}", std::process::id() % 100_000);
        let lab = lab::Lab::create(&name, &format!("10.{subnet}.0"), &[("p", 1), ("b", 2)], std::process::id())
            .unwrap_or_else(|e| panic!("creating test hosts: {e}"));
        let ip = |h: &str| lab.host(h).map(|h| h.ip.clone()).unwrap_or_default();
        let (primary_ip, backup_ip) = (ip("p"), ip("b"));
        Hosts { lab, primary_ip, backup_ip }
    }

    pub fn primary_ns(&self) -> String {
        format!("{}-p", self.lab.name)
    }

    pub fn backup_ns(&self) -> String {
        format!("{}-b", self.lab.name)
    }

    /// Cuts the primary host's link, as a dead host's would be.
    pub fn cut_primary_link(&self) {
        let _ = self.lab.cut("p");
    }

    /// Brings the primary host's link back.
    pub fn restore_primary_link(&self) {
        let _ = self.lab.restore("p");
    }
}

impl Proc {
    /// Spawns `ftvmm args` inside network namespace `ns` (None: here).
    pub fn spawn_in(ns: Option<&str>, args: &[&str]) -> Proc {
        match ns {
            None => Proc::spawn(args),
            Some(ns) => {
                let bin = ftvmm_bin().display().to_string();
                let mut full = vec!["netns", "exec", ns, bin.as_str()];
                full.extend_from_slice(args);
                Proc::spawn_command(Command::new("ip"), &full)
            }
        }
    }
}

/// Reads `tick N H` lines from a console, checking the hash chain.
pub struct TickReader {
    pub lines: Vec<(u64, String)>,
}

impl TickReader {
    /// Reads lines until `until` holds. The whole lines already received
    /// with the last one count too: the client got them (a console that
    /// wrote two ticks at once had both delivered), so a reader that
    /// dropped them would report ticks missing that were not.
    pub fn read_from(&mut self, stream: TcpStream, until: impl Fn(&[(u64, String)]) -> bool) {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            if !matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                return;
            }
            // A line cut short (the console ended inside it: "tick 6" of
            // "tick 63 ...") is no tick: only whole lines count.
            let Some(whole) = line.strip_suffix('\n') else { return };
            self.take(whole);
            if until(&self.lines) {
                let buffered = String::from_utf8_lossy(reader.buffer()).into_owned();
                let whole = buffered.rsplit_once('\n').map_or("", |(whole, _)| whole);
                whole.lines().for_each(|l| self.take(l));
                return;
            }
        }
    }

    fn take(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("tick ") {
            let mut parts = rest.split(' ');
            let n: u64 = parts.next().unwrap().parse().unwrap();
            self.lines.push((n, parts.next().unwrap_or_default().to_string()));
        }
    }
}

pub fn connect_retry(addr: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect to {addr}: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The client's view across `switches` failovers: every tick, in order,
/// possibly some repeated at each switch, never one missing.
pub fn check_continuity_across(switches: usize, lines: &[(u64, String)]) -> Result<(), String> {
    let mut expected_next = lines.first().map(|l| l.0).ok_or("no ticks")?;
    let mut seen: std::collections::HashMap<u64, String> = Default::default();
    let mut rewinds = 0;
    for (n, hash) in lines {
        if let Some(h) = seen.get(n) {
            if h != hash {
                return Err(format!("tick {n} seen twice with different hashes"));
            }
        }
        if *n == expected_next {
            expected_next += 1;
        } else if *n < expected_next {
            // A duplicate: allowed only as a rewind at the switch, which
            // then replays consecutive ticks.
            if !seen.contains_key(&(n.wrapping_sub(1))) && *n != lines[0].0 {
                return Err(format!("duplicate tick {n} without its predecessor"));
            }
            rewinds += 1;
            expected_next = n + 1;
        } else {
            return Err(format!("tick {n} follows tick {} : ticks missing", expected_next - 1));
        }
        seen.insert(*n, hash.clone());
    }
    if rewinds > switches {
        return Err(format!("{rewinds} rewinds: reordering, not {switches} failover boundaries"));
    }
    Ok(())
}

/// A helper process (an ftdisk arbiter, a load) killed and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP relay on 127.0.0.1 to `target`, for tests that stand between two
/// peers: each chunk read, in either direction, is shown to `forward`, and
/// written on only if it returns true (false swallows it, the connections
/// staying open). With `close_on_end`, a side's end of stream is passed on
/// to the other (a shutdown of writing). Returns the relay's address.
pub fn tcp_relay(
    target: String,
    close_on_end: bool,
    forward: impl Fn(&[u8]) -> bool + Send + Sync + 'static,
) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let forward = std::sync::Arc::new(forward);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&target) else { return };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server.try_clone().unwrap(), client.try_clone().unwrap()),
            ] {
                let forward = forward.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if forward(&buf[..n]) && to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    if close_on_end {
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    }
                });
            }
        }
    });
    addr
}

/// The `ftcert` binary beside `ftvmm`.
pub fn ftcert_bin() -> PathBuf {
    let bin = ftvmm_bin().with_file_name("ftcert");
    assert!(bin.is_file(), "ftcert binary not found at {}: build it first (`cargo build --release`)", bin.display());
    bin
}

/// Makes a CA and certificates for `hosts` in `dir` with the ftcert helper
/// (each named after its host, with the SANs 127.0.0.1 and localhost).
pub fn ftcert(dir: &Scratch, hosts: &[&str]) {
    let out = Command::new(ftcert_bin()).arg("--dir").arg(&dir.0).args(hosts).output().unwrap();
    assert!(out.status.success(), "ftcert failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The TLS flags of host `name` whose credentials are in `dir`.
pub fn tls_flags(dir: &Scratch, name: &str) -> Vec<String> {
    ["--tls-cert", &dir.path(&format!("{name}.pem")), "--tls-key", &dir.path(&format!("{name}.key")), "--tls-ca"]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path("ca.pem")])
        .collect()
}

/// A TLS client's connection.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// The TLS client configuration of host `name` whose credentials (from
/// [`ftcert`]) are in `dir`: mutual TLS as ftvmm speaks it. `None`: a
/// client that trusts the CA but presents no certificate.
pub fn tls_client_config(dir: &Scratch, name: Option<&str>) -> std::sync::Arc<rustls::ClientConfig> {
    let ca = PathBuf::from(dir.path("ca.pem"));
    match name {
        Some(name) => {
            let files = credentials::TlsFiles {
                cert: PathBuf::from(dir.path(&format!("{name}.pem"))),
                key: PathBuf::from(dir.path(&format!("{name}.key"))),
                ca,
            };
            credentials::Tls::load(&files).expect("test credentials").client_config()
        }
        None => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(&ca).expect("the CA") {
                roots.add(cert.expect("a CA certificate")).expect("a usable CA");
            }
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            std::sync::Arc::new(config)
        }
    }
}

/// A TLS connection to `addr` (`host:port`, the server's certificate
/// checked against the host) with `config`, its handshake completed as far
/// as the client can tell (in TLS 1.3 a server may still refuse the
/// client's certificate after that: the first read then fails).
pub fn tls_connect(addr: &str, config: std::sync::Arc<rustls::ClientConfig>) -> std::io::Result<TlsStream> {
    let name = credentials::server_name(addr).map_err(std::io::Error::other)?;
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut io = &sock;
    while conn.is_handshaking() {
        if conn.complete_io(&mut io)? == (0, 0) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}
