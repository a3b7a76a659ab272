//! `ftvmm check`: the replay-determinism check as a user command, for any
//! guest image.
//!
//! It records N runs of the guest under timing perturbations (random delays
//! before interrupt injections and timer jitter from `--perturb-seed`,
//! serial input at random moments), replays each recording twice, and
//! compares each replay's serial output, exit status and final state digest
//! with the recording's; the recordings carry digest checks, so a replay
//! that departs from its recording reports the first differing exit and
//! what differed. It also checks that the recordings of a guest that reads
//! the clock really differ (else the perturbations did not reach it and the
//! check proved little). Each run is a child `ftvmm` process (this same
//! binary), exactly as a user would run it.
//!
//! Exit status: 0 when every replay matched, 3 on a divergence, 1 when the
//! recordings of a clock-reading guest were all identical, 2 when a run
//! could not be made at all (a bad image, a guest that fails).

use crate::config::ImageSource;
use rand::{Rng, SeedableRng};
use replay::{Entry, Event, LogReader, RecordSource};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What `ftvmm check` checks, and how.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    pub image: ImageSource,
    pub cmdline: String,
    pub mem_mib: u64,
    /// Recordings to make (each replayed twice).
    pub runs: u32,
    /// A recording still running after this long is cut there (a guest
    /// that serves forever): its replays must agree up to the cut.
    pub seconds: u64,
    /// Fed to the guest's serial port in random pieces at random moments.
    pub serial_input: Option<Vec<u8>>,
    /// The perturbation seed of the first run (the next runs add 1 each).
    pub seed: u64,
    /// The recordings log a digest check every this many exits.
    pub check_every_exits: u64,
    /// Keep the logs here (else a temporary directory, removed).
    pub keep: Option<PathBuf>,
    /// A raw disk image: each recording starts from a copy of its own.
    pub disk: Option<PathBuf>,
}

/// How a child `ftvmm` ended.
struct Ran {
    /// None: killed at the deadline.
    status: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Ran {
    fn digest(&self) -> Option<&str> {
        self.stderr.lines().rev().find_map(|l| l.strip_prefix("state-digest: ")).map(str::trim)
    }

    /// The VMM's own error line, if it printed one.
    fn error(&self) -> Option<&str> {
        self.stderr.lines().find_map(|l| l.strip_prefix("ftvmm: error: "))
    }
}

/// What a recording's log holds.
#[derive(Default)]
struct LogStats {
    exits: u64,
    events: u64,
    checks: u64,
    syncs: u64,
    /// Clock readings and timer interrupts: inputs whose values or
    /// positions depend on host timing.
    clock_reads: u64,
    bytes: u64,
    /// A hash of the exits and inputs with their positions, digest checks
    /// left out: what two recordings under different timing should differ
    /// in (a hash, so that a long recording costs no memory here).
    inputs: [u8; 32],
}

/// A run's verdict.
enum Verdict {
    Matched,
    Diverged(String),
    Failed(String),
}

/// Runs the check; prints its report on stdout; returns the exit status.
pub fn run(config: &CheckConfig) -> u8 {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("ftvmm: error: check: cannot find the ftvmm binary to run: {e}");
            return 2;
        }
    };
    let (dir, temporary) = match &config.keep {
        Some(dir) => (dir.clone(), false),
        None => (std::env::temp_dir().join(format!("ftvmm-check-{}", std::process::id())), true),
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("ftvmm: error: check: cannot create {}: {e}", dir.display());
        return 2;
    }
    let status = check_in(config, &exe, &dir);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    status
}

fn image_args(config: &CheckConfig) -> Vec<String> {
    let mut args = match &config.image {
        ImageSource::Embedded(name) => vec!["--guest".to_string(), name.clone()],
        ImageSource::File(path) => vec!["--kernel".to_string(), path.display().to_string()],
    };
    args.extend(["--cmdline".into(), config.cmdline.clone(), "--mem-mib".into(), config.mem_mib.to_string()]);
    args
}

fn check_in(config: &CheckConfig, exe: &Path, dir: &Path) -> u8 {
    let name = match &config.image {
        ImageSource::Embedded(name) => name.clone(),
        ImageSource::File(path) => path.display().to_string(),
    };
    // A bad image is one clear error, not a failed run per run.
    let missing = match &config.image {
        ImageSource::Embedded(name) if guest_images::find(name).is_none() => {
            let names: Vec<_> = guest_images::GUESTS.iter().map(|g| g.name).collect();
            Some(format!("no embedded guest named {name:?} (available: {})", names.join(", ")))
        }
        ImageSource::File(path) => std::fs::metadata(path).err().map(|e| format!("{}: {e}", path.display())),
        ImageSource::Embedded(_) => None,
    };
    if let Some(why) = missing {
        eprintln!("ftvmm: error: check: {why}");
        return 2;
    }
    println!(
        "ftvmm check: {name} (cmdline {:?}), {} run(s) of at most {} s, each replayed twice",
        config.cmdline, config.runs, config.seconds
    );
    let limit = Duration::from_secs(config.seconds);
    let mut diverged = false;
    let mut failed = false;
    let mut recordings = Vec::new();
    for run in 0..config.runs {
        let seed = config.seed.wrapping_add(u64::from(run));
        let log = dir.join(format!("run-{}.log", run + 1));
        let log_text = log.display().to_string();
        let mut args = image_args(config);
        if let Some(disk) = &config.disk {
            // Every recording starts from the same disk; its replays name
            // the same file (a replay reads its disk data from the log).
            let copy = dir.join(format!("run-{}.img", run + 1));
            if let Err(e) = std::fs::copy(disk, &copy) {
                eprintln!("ftvmm: error: check: copying the disk {}: {e}", disk.display());
                return 2;
            }
            args.extend(["--disk".into(), copy.display().to_string()]);
        }
        args.extend([
            "--record".into(),
            log_text.clone(),
            "--digest".into(),
            "--perturb-seed".into(),
            seed.to_string(),
            "--check-every-exits".into(),
            config.check_every_exits.to_string(),
        ]);
        let input = config.serial_input.as_deref().map(|bytes| input_schedule(bytes, seed));
        let recorded = match spawn(exe, &args, input, limit) {
            Ok(ran) => ran,
            Err(e) => {
                println!("run {} (seed {seed}): cannot run ftvmm: {e}", run + 1);
                failed = true;
                continue;
            }
        };
        let cut = recorded.status.is_none();
        if let (Some(status), Some(why)) = (recorded.status, recorded.error()) {
            println!("run {} (seed {seed}): the recording failed with status {status}: {why}", run + 1);
            failed = true;
            continue;
        }
        let stats = log_stats(&log);
        let mut args = image_args(config);
        if config.disk.is_some() {
            args.extend(["--disk".into(), dir.join(format!("run-{}.img", run + 1)).display().to_string()]);
        }
        args.extend(["--replay".into(), log_text, "--digest".into()]);
        let mut verdict = Verdict::Matched;
        let mut first: Option<Ran> = None;
        for attempt in 1..=2 {
            // A replay of a cut log may take longer than the cut recording
            // (it waits for nothing, but it has no deadline of its own).
            let replayed = match spawn(exe, &args, None, limit * 2 + Duration::from_secs(10)) {
                Ok(ran) => ran,
                Err(e) => {
                    verdict = Verdict::Failed(format!("cannot run the replay: {e}"));
                    break;
                }
            };
            if let Some(v) = compare(&recorded, &replayed, cut, attempt) {
                verdict = v;
                break;
            }
            if let Some(first) = &first {
                // Replays of one log agree exactly, cut or not.
                if first.stdout != replayed.stdout
                    || first.status != replayed.status
                    || first.error() != replayed.error()
                {
                    verdict = Verdict::Diverged(format!(
                        "the two replays differ (status {:?} and {:?}, outputs from byte {})",
                        first.status,
                        replayed.status,
                        first_difference(&first.stdout, &replayed.stdout)
                    ));
                    break;
                }
            }
            first = Some(replayed);
        }
        let what = match &verdict {
            Verdict::Matched if cut => format!("replays 2/2 agree up to the cut at {} s: ok", config.seconds),
            Verdict::Matched => "replays 2/2 match (output, status, digest): ok".to_string(),
            Verdict::Diverged(why) => {
                diverged = true;
                format!("DIVERGED: {why}")
            }
            Verdict::Failed(why) => {
                failed = true;
                format!("FAILED: {why}")
            }
        };
        println!(
            "run {} (seed {seed}): {} exits, {} events ({} syncs, {} digest checks), log {:.1} KiB; {what}",
            run + 1,
            stats.exits,
            stats.events,
            stats.syncs,
            stats.checks,
            stats.bytes as f64 / 1024.0
        );
        recordings.push(stats);
    }
    let clock_reading = !recordings.is_empty() && recordings.iter().all(|s| s.clock_reads > 0);
    let mut identical = false;
    if recordings.len() >= 2 {
        let distinct = {
            let mut seen: Vec<&[u8; 32]> = Vec::new();
            for s in &recordings {
                if !seen.contains(&&s.inputs) {
                    seen.push(&s.inputs);
                }
            }
            seen.len()
        };
        identical = distinct == 1 && clock_reading;
        println!(
            "recordings: {distinct} distinct of {}{}",
            recordings.len(),
            if clock_reading { " (the guest reads the clock: they should differ)" } else { "" }
        );
    }
    if diverged {
        println!("verdict: DIVERGENCE: a replay departed from its recording");
        3
    } else if failed {
        println!("verdict: FAILED: a run could not be recorded or replayed");
        2
    } else if identical {
        println!("verdict: FAILED: the timing perturbations did not change the recordings of a clock-reading guest");
        1
    } else {
        println!("verdict: every replay matched");
        0
    }
}

/// A replay against its recording: None when they agree.
fn compare(recorded: &Ran, replayed: &Ran, cut: bool, attempt: u32) -> Option<Verdict> {
    if replayed.status == Some(3) {
        let why = replayed.error().unwrap_or("status 3");
        return Some(Verdict::Diverged(format!("replay {attempt}: {why}")));
    }
    let Some(status) = replayed.status else {
        return Some(Verdict::Failed(format!("replay {attempt} did not end")));
    };
    if cut {
        // The log ends where the recording was cut (status 4). Killed, the
        // recording may have logged output it had not written yet, or
        // written output whose log records were still buffered: one
        // output is a prefix of the other.
        if status != 4 && status != 0 {
            let why = replayed.error().unwrap_or("");
            return Some(Verdict::Failed(format!("replay {attempt} of the cut log: status {status} {why}")));
        }
        if !recorded.stdout.starts_with(&replayed.stdout) && !replayed.stdout.starts_with(&recorded.stdout) {
            return Some(Verdict::Diverged(format!(
                "replay {attempt}: its output departs from the recording's at byte {}",
                first_difference(&recorded.stdout, &replayed.stdout)
            )));
        }
        return None;
    }
    if Some(status) != recorded.status {
        let why = replayed.error().unwrap_or("");
        return Some(Verdict::Diverged(format!(
            "replay {attempt}: status {status}, the recording's {} {why}",
            recorded.status.unwrap_or(-1)
        )));
    }
    if replayed.stdout != recorded.stdout {
        return Some(Verdict::Diverged(format!(
            "replay {attempt}: its output differs from the recording's at byte {}",
            first_difference(&recorded.stdout, &replayed.stdout)
        )));
    }
    if replayed.digest() != recorded.digest() {
        return Some(Verdict::Diverged(format!(
            "replay {attempt}: final state digest {}, the recording's {}",
            replayed.digest().unwrap_or("none"),
            recorded.digest().unwrap_or("none")
        )));
    }
    None
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()))
}

/// The serial input cut into pieces (each line split at a random point),
/// each after a random delay of up to 40 ms.
fn input_schedule(bytes: &[u8], seed: u64) -> Vec<(Duration, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5e71a1);
    let mut chunks = Vec::new();
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let (a, b) = line.split_at(rng.gen_range(0..line.len().max(1)));
        for part in [a, b] {
            if !part.is_empty() {
                chunks.push((Duration::from_millis(rng.gen_range(0..40)), part.to_vec()));
            }
        }
    }
    chunks
}

/// Runs `exe args`, feeding `input` on stdin if given (else none: the
/// serial input is closed), for at most `limit` (then it is killed).
fn spawn(
    exe: &Path,
    args: &[String],
    input: Option<Vec<(Duration, Vec<u8>)>>,
    limit: Duration,
) -> std::io::Result<Ran> {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let feeder = match (child.stdin.take(), input) {
        (Some(mut stdin), Some(chunks)) => Some(std::thread::spawn(move || {
            for (delay, bytes) in chunks {
                std::thread::sleep(delay);
                if stdin.write_all(&bytes).and_then(|_| stdin.flush()).is_err() {
                    break;
                }
            }
        })),
        _ => None,
    };
    let out = collect(child.stdout.take());
    let err = collect(child.stderr.take());
    let status = wait_at_most(&mut child, limit)?;
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    Ok(Ran { status: status.map(|s| s.code().unwrap_or(-1)), stdout, stderr })
}

fn collect(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Waits for `child` at most `limit`; kills it (None) past that.
fn wait_at_most(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Counts what a recording's log holds (up to its last complete record).
fn log_stats(path: &Path) -> LogStats {
    let mut stats = LogStats { bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0), ..LogStats::default() };
    let Ok(file) = std::fs::File::open(path) else { return stats };
    let Ok((_, mut reader)) = LogReader::new(BufReader::new(file)) else { return stats };
    let mut inputs = blake3::Hasher::new();
    while let Ok(Some(record)) = reader.next_record() {
        stats.exits = stats.exits.max(record.position.exit);
        if let Entry::Event(event) = &record.entry {
            stats.events += 1;
            match event {
                Event::DigestCheck { .. } => {
                    stats.checks += 1;
                    continue;
                }
                Event::TimeRead { .. } | Event::Interrupt { .. } => stats.clock_reads += 1,
                _ => {}
            }
            if is_sync(event) {
                stats.syncs += 1;
            }
        }
        if let Ok(bytes) = bincode::serialize(&record) {
            inputs.update(&bytes);
        }
    }
    stats.inputs = *inputs.finalize().as_bytes();
    stats
}

/// Whether `event` completes a state sync (its vCPU part is the last of
/// its records: one per sync).
fn is_sync(event: &Event) -> bool {
    matches!(event, Event::Sync(replay::SyncPart::Vcpu { .. }))
}
