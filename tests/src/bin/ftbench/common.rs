//! What the benchmarks share: the time limit of a run, medians, timed
//! `ftvmm` runs alone and as a primary with its backup, the primary's
//! output-commit figures, a kvstore console session, and the security
//! (plaintext or mutual TLS) of a pair's channels.

use ftvmm_tests::{ftvmm, wait, Proc, Scratch};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub(crate) const TIMEOUT: Duration = Duration::from_secs(300);

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median wall-clock seconds of `runs` runs of `ftvmm args`.
pub(crate) fn time_runs(args: &[&str], runs: usize) -> f64 {
    let samples = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let r = wait(ftvmm(args).spawn().expect("spawn ftvmm"), TIMEOUT);
            assert_eq!(r.status, Some(0), "ftvmm {args:?} failed: {}", r.stderr);
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(samples)
}

/// Wall seconds of a primary run with a backup attached (the backup starts
/// first, so the handshake is immediate), and the primary's stderr.
pub(crate) fn time_ft(guest: &str, cmdline: &str) -> (f64, String) {
    time_ft_with(guest, cmdline, &Security::Plaintext)
}

/// [`time_ft`], with `security` on the logging channel.
pub(crate) fn time_ft_with(guest: &str, cmdline: &str, security: &Security) -> (f64, String) {
    time_ft_flags(guest, cmdline, &security.flags("primary"), &security.flags("backup"))
}

/// A free loopback address.
pub(crate) fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    format!("127.0.0.1:{port}")
}

/// [`time_ft`], with more flags for the primary and the backup.
pub(crate) fn time_ft_flags(guest: &str, cmdline: &str, p_flags: &[String], b_flags: &[String]) -> (f64, String) {
    let run = run_ft(guest, cmdline, p_flags, b_flags);
    (run.secs, run.stderr)
}

/// CPU seconds (user + system) of the children reaped by `reap`: run it
/// with no other child of ftbench exiting meanwhile.
pub(crate) fn reaped_cpu<T>(reap: impl FnOnce() -> T) -> (T, f64) {
    let children = || {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; RUSAGE_CHILDREN is always valid.
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(usage.ru_utime) + secs(usage.ru_stime)
    };
    let before = children();
    let result = reap();
    (result, children() - before)
}

/// Median CPU seconds of `runs` runs of `ftvmm args` alone.
pub(crate) fn cpu_runs(args: &[&str], runs: usize) -> f64 {
    median((0..runs).map(|_| reaped_cpu(|| time_runs(args, 1)).1).collect())
}

/// A primary's run with its backup: wall seconds, the primary's stderr and
/// both VMMs' CPU seconds.
pub(crate) struct FtRun {
    pub(crate) secs: f64,
    pub(crate) stderr: String,
    pub(crate) primary_cpu: f64,
    pub(crate) backup_cpu: f64,
}

/// [`time_ft_flags`], with the CPU each VMM used.
pub(crate) fn run_ft(guest: &str, cmdline: &str, p_flags: &[String], b_flags: &[String]) -> FtRun {
    let addr = free_addr();
    let mut bargs = vec!["--backup", "--guest", guest, "--cmdline", cmdline, "--connect", &addr];
    bargs.extend(b_flags.iter().map(String::as_str));
    let backup = Proc::spawn(&bargs);
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let mut args = vec!["--primary", "--guest", guest, "--cmdline", cmdline, "--listen", &addr, "--stats"];
    args.extend(p_flags.iter().map(String::as_str));
    let (r, primary_cpu) = reaped_cpu(|| wait(ftvmm(&args).spawn().expect("spawn ftvmm"), TIMEOUT));
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(r.status, Some(0), "primary failed: {}", r.stderr);
    let (b, backup_cpu) = reaped_cpu(|| backup.finish(TIMEOUT));
    assert_eq!(b.status, Some(0), "backup failed: {}", b.stderr);
    FtRun { secs, stderr: r.stderr, primary_cpu, backup_cpu }
}

pub(crate) fn stat(stderr: &str, key: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains("output-commit latency"))?;
    let at = line.find(key)? + key.len();
    line[at..].trim_start().split(' ').next()?.parse().ok()
}

/// A kvstore console connection, past its banner.
pub(crate) fn kv_connect(console: &str) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(console).expect("kvstore console");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("banner");
    reader
}

/// Per-operation latencies (µs) of `ops` commands sent one at a time to a
/// kvstore console, and the wall time they took.
pub(crate) fn kv_session(reader: &mut BufReader<TcpStream>, ops: &[String]) -> (Vec<f64>, f64) {
    let mut line = String::new();
    let start = Instant::now();
    let mut lat = Vec::with_capacity(ops.len());
    for op in ops {
        let t = Instant::now();
        reader.get_mut().write_all(format!("{op}\n").as_bytes()).expect("send");
        line.clear();
        reader.read_line(&mut line).expect("reply");
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    (lat, start.elapsed().as_secs_f64())
}

/// Plaintext, or mutual TLS with the credentials in a directory.
pub(crate) enum Security {
    Plaintext,
    Tls(std::path::PathBuf),
}

impl Security {
    /// Test credentials for the hosts `primary`, `backup` and `storage`,
    /// valid on loopback and at `lab_ips` (the redis lab's addresses).
    pub(crate) fn tls(dir: &Scratch, lab_ips: [&str; 3]) -> Security {
        let ca = credentials::issue::Authority::new("ftbench CA").expect("CA");
        ca.save(&dir.0).expect("save the CA");
        for (name, ip) in ["primary", "backup", "storage"].into_iter().zip(lab_ips) {
            let sans = [name, ip, "127.0.0.1", "localhost"].map(String::from);
            ca.issue(&dir.0, name, &sans).expect("issue");
        }
        Security::Tls(dir.0.clone())
    }

    /// The ftvmm/ftdisk flags of host `name`.
    pub(crate) fn flags(&self, name: &str) -> Vec<String> {
        match self {
            Security::Plaintext => Vec::new(),
            Security::Tls(dir) => {
                let file = |f: String| dir.join(f).display().to_string();
                vec![
                    "--tls-cert".into(),
                    file(format!("{name}.pem")),
                    "--tls-key".into(),
                    file(format!("{name}.key")),
                    "--tls-ca".into(),
                    file("ca.pem".into()),
                ]
            }
        }
    }

    pub(crate) fn label(&self) -> &'static str {
        match self {
            Security::Plaintext => "plaintext",
            Security::Tls(_) => "TLS",
        }
    }
}
