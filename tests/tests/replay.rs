//! Replay determinism: every embedded guest passes `ftvmm check` (recorded
//! under perturbed host timing, each recording replays to the same output
//! and state digest: the command users run on their own images is what CI
//! runs), and a deliberately nondeterministic image fails it; damaged logs
//! are handled without a panic; divergence is reported at the first
//! differing exit.

use ftvmm_tests::{ftvmm, run, wait, Run, Scratch, TIMEOUT};
use rand::{Rng, SeedableRng};
use replay::{Entry, LogReader, LogWriter, Record, RecordSink, RecordSource};
use std::io::BufReader;

/// How `ftvmm check` runs each embedded guest: (guest, command line,
/// serial input, needs a disk, timing-sensitive).
const CHECKED: &[(&str, &str, &str, bool, bool)] = &[
    ("hello", "", "", false, false),
    ("timer", "ticks=30", "", false, true),
    ("clock", "", "", false, true),
    ("tsc", "", "", false, true),
    ("compute", "rounds=5 kib=256", "", false, false),
    // No exit in their work loops: their ticks come by kick and state sync.
    ("compute", "rounds=5 kib=256 exitpoints=0 hz=100", "", false, true),
    ("spin", "hz=100 seconds=1", "", false, true),
    ("echo", "", "alpha\nbravo charlie\nx\nquit\n", false, true),
    ("ticker", "ticks=20 hz=50", "one\ntwo three\n", false, true),
    ("kvstore", "", "set a 1\nset b 2\nget a\ndel b\nget b\nquit\n", true, true),
    ("blkstress", "ops=300 qd=8 seed=3", "", true, true),
];

/// Embedded guests the sweep leaves out, and why.
const NOT_CHECKED: &[(&str, &str)] = &[
    ("nondet", "the deliberately nondeterministic counter-example (checked below to fail)"),
    ("redis", "needs a NIC on a TAP device, which `ftvmm check` does not drive"),
];

fn read_log(path: &str) -> (replay::Header, Vec<Record>) {
    let file = std::fs::File::open(path).expect("log exists");
    let (header, mut reader) = LogReader::new(BufReader::new(file)).expect("log header");
    let mut records = Vec::new();
    while let Some(r) = reader.next_record().expect("log reads") {
        records.push(r);
    }
    (header, records)
}

fn write_log(path: &str, header: &replay::Header, records: &[Record]) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = LogWriter::new(std::io::BufWriter::new(file), header).unwrap();
    for r in records {
        w.append(r).unwrap();
    }
    w.flush().unwrap();
}

/// Inputs and their positions: what differs between two recordings.
fn events(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .filter(|r| matches!(r.entry, Entry::Event(_)))
        .map(|r| format!("{} {:?}", r.position, r.entry))
        .collect()
}

fn record(guest: &str, cmdline: &str, log: &str, seed: u64) -> Run {
    let seed_text = seed.to_string();
    run(&["--guest", guest, "--cmdline", cmdline, "--record", log, "--digest", "--perturb-seed", &seed_text], TIMEOUT)
}

fn replay(guest: &str, cmdline: &str, log: &str) -> Run {
    run(&["--guest", guest, "--cmdline", cmdline, "--replay", log, "--digest"], TIMEOUT)
}

/// `ftvmm check args`; what it printed, and how it ended.
fn check(args: &[&str]) -> Run {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    // Three runs, each recorded and replayed twice, of at most 30 s each.
    wait(ftvmm(&all).spawn().expect("spawn ftvmm check"), TIMEOUT * 4)
}

#[test]
fn ftvmm_check_passes_on_every_embedded_guest() {
    let listed = run(&["--list-guests"], TIMEOUT);
    assert_eq!(listed.code(), 0);
    let names: Vec<&str> = listed.stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
    for name in &names {
        assert!(
            CHECKED.iter().any(|c| c.0 == *name) || NOT_CHECKED.iter().any(|c| c.0 == *name),
            "embedded guest {name} is neither in the determinism sweep nor excluded from it with a reason"
        );
    }
    let dir = Scratch::new("check-sweep");
    for &(guest, cmdline, input, disk, timing_sensitive) in CHECKED {
        assert!(names.contains(&guest), "{guest} is not embedded");
        let mut args = vec!["--guest", guest, "--cmdline", cmdline, "--runs", "3"];
        let input_file = dir.path(&format!("{guest}.in"));
        if !input.is_empty() {
            std::fs::write(&input_file, input).unwrap();
            args.extend(["--serial-input", input_file.as_str()]);
        }
        let disk_file = dir.path(&format!("{guest}.img"));
        if disk {
            std::fs::write(&disk_file, vec![0u8; 1 << 20]).unwrap();
            args.extend(["--disk", disk_file.as_str()]);
        }
        let r = check(&args);
        assert_eq!(r.code(), 0, "ftvmm check {guest}:\n{}\n{}", r.stdout, r.stderr);
        let ok = r.stdout.lines().filter(|l| l.contains("replays 2/2 match") && l.ends_with(": ok")).count();
        assert_eq!(ok, 3, "{guest}: three runs, each matched twice:\n{}", r.stdout);
        assert!(r.stdout.contains("verdict: every replay matched"), "{}", r.stdout);
        if timing_sensitive {
            assert!(
                r.stdout.contains("(the guest reads the clock") && !r.stdout.contains("recordings: 1 distinct"),
                "{guest}: recordings under different timing should differ:\n{}",
                r.stdout
            );
        }
    }
}

#[test]
fn ftvmm_check_reports_a_divergence_on_a_nondeterministic_image() {
    let r = check(&["--guest", "nondet", "--runs", "2"]);
    assert_eq!(r.code(), 3, "{}\n{}", r.stdout, r.stderr);
    let diverged: Vec<&str> = r.stdout.lines().filter(|l| l.contains("DIVERGED: replay")).collect();
    assert!(!diverged.is_empty(), "{}", r.stdout);
    // The report names the first differing exit and what differed.
    assert!(diverged.iter().all(|l| l.contains("divergence at exit ") && l.contains("expected")), "{}", r.stdout);
    assert!(r.stdout.contains("verdict: DIVERGENCE"), "{}", r.stdout);
}

#[test]
fn ftvmm_check_cuts_a_guest_that_runs_forever_and_compares_up_to_the_cut() {
    let r = check(&["--guest", "ticker", "--runs", "1", "--seconds", "2"]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("replays 2/2 agree up to the cut at 2 s: ok"), "{}", r.stdout);
}

#[test]
fn ftvmm_check_refuses_bad_input_with_one_clear_line() {
    check(&["--guest", "no-such-guest"]).assert_error(2, "no embedded guest named");
    check(&["--kernel", "/nonexistent/image.elf"]).assert_error(2, "/nonexistent/image.elf");
    let r = check(&["--guest", "hello", "--runs", "0"]);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let r = check(&["--guest", "hello", "--serial-input", "/nonexistent/input"]);
    r.assert_error(2, "cannot read serial input");
}

#[test]
fn timer_recordings_differ_and_each_replays_its_own() {
    let dir = Scratch::new("timer-twice");
    let (a, b) = (dir.path("a.log"), dir.path("b.log"));
    let ra = record("timer", "", &a, 11);
    let rb = record("timer", "", &b, 12);
    assert_ne!(events(&read_log(&a).1), events(&read_log(&b).1));
    assert_ne!(ra.stdout, rb.stdout, "the checksum of the interleaving differs");
    assert_eq!(replay("timer", "", &a).stdout, ra.stdout);
    assert_eq!(replay("timer", "", &b).stdout, rb.stdout);
}

#[test]
fn truncated_logs_replay_up_to_their_last_complete_record() {
    let dir = Scratch::new("truncate");
    let full = dir.path("full.log");
    let rec = record("timer", "ticks=10", &full, 3);
    assert_eq!(rec.code(), 0);
    let bytes = std::fs::read(&full).unwrap();
    let (_, records) = read_log(&full);
    let total_exits = records.last().unwrap().position.exit;
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let cut_log = dir.path("cut.log");
    for _ in 0..15 {
        let cut = rng.gen_range(0..bytes.len());
        std::fs::write(&cut_log, &bytes[..cut]).unwrap();
        let r = replay("timer", "ticks=10", &cut_log);
        assert!(
            r.stdout.len() <= rec.stdout.len() && rec.stdout.starts_with(&r.stdout),
            "cut at {cut}: output is not a prefix"
        );
        match r.code() {
            4 => {
                r.assert_error(4, "the log ends at exit");
                let n: u64 =
                    r.stderr.split("ends at exit ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
                assert!(n <= total_exits);
            }
            2 => r.assert_error(2, "no header"),
            other => panic!("cut at {cut}: status {other}: {}", r.stderr),
        }
    }
}

#[test]
fn corrupt_logs_are_rejected_or_diverge_never_panic() {
    let dir = Scratch::new("corrupt");
    let full = dir.path("full.log");
    assert_eq!(record("timer", "ticks=10", &full, 4).code(), 0);
    let bytes = std::fs::read(&full).unwrap();
    let bad = dir.path("bad.log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..20 {
        let mut damaged = bytes.clone();
        let at = rng.gen_range(0..damaged.len());
        damaged[at] ^= 1 << rng.gen_range(0..8);
        std::fs::write(&bad, &damaged).unwrap();
        let r = replay("timer", "ticks=10", &bad);
        let code = r.code();
        assert!(matches!(code, 2..=4), "flip at {at}: status {code}: {}", r.stderr);
        r.assert_error(code, "");
    }
    // Garbage and a foreign version.
    std::fs::write(&bad, b"definitely not a log").unwrap();
    replay("timer", "", &bad).assert_error(2, "not an ftvmm log");
    let mut other_version = bytes.clone();
    other_version[8] = 0x7f;
    std::fs::write(&bad, &other_version).unwrap();
    replay("timer", "", &bad).assert_error(2, "format version");
}

#[test]
fn divergence_is_reported_at_the_first_differing_exit() {
    let dir = Scratch::new("diverge");
    let log = dir.path("timer.log");
    assert_eq!(record("timer", "ticks=10", &log, 5).code(), 0);
    let (header, records) = read_log(&log);

    // An exit that happened elsewhere: one halfway through the recording
    // (how many exits ten ticks take depends on the host's load).
    let mut moved = records.clone();
    let exits: Vec<usize> = (0..moved.len()).filter(|&i| matches!(moved[i].entry, Entry::Exit(_))).collect();
    let k = exits[exits.len() / 2];
    let target = moved[k].position.exit;
    moved[k].position.rip += 1;
    let bad = dir.path("moved.log");
    write_log(&bad, &header, &moved);
    let r = replay("timer", "ticks=10", &bad);
    r.assert_error(3, &format!("divergence at exit {target}: expected"));

    // An interrupt the guest's state cannot explain.
    let mut wrong = records.clone();
    let i = wrong.iter().position(|r| matches!(r.entry, Entry::Event(replay::Event::Interrupt { .. }))).unwrap();
    let at = wrong[i].position.exit;
    wrong[i].entry = Entry::Event(replay::Event::Interrupt { vector: 0x77 });
    let bad = dir.path("vector.log");
    write_log(&bad, &header, &wrong);
    replay("timer", "ticks=10", &bad).assert_error(3, &format!("divergence at exit {at}: expected interrupt 0x77"));

    // A different final state.
    let mut end = records.clone();
    if let Some(Record { entry: Entry::End { digest, .. }, .. }) = end.last_mut() {
        digest.0[0] ^= 1;
    }
    let bad = dir.path("end.log");
    write_log(&bad, &header, &end);
    replay("timer", "ticks=10", &bad).assert_error(3, "state digest");
}

#[test]
fn a_log_of_another_image_or_config_is_refused() {
    let dir = Scratch::new("mismatch");
    let log = dir.path("hello.log");
    assert_eq!(run(&["--guest", "hello", "--record", &log], TIMEOUT).code(), 0);
    run(&["--guest", "timer", "--replay", &log], TIMEOUT).assert_error(2, "another guest image");
    run(&["--guest", "hello", "--mem-mib", "32", "--replay", &log], TIMEOUT)
        .assert_error(2, "another VM configuration");
    run(&["--guest", "hello", "--cmdline", "x=1", "--replay", &log], TIMEOUT)
        .assert_error(2, "another VM configuration");
    run(&["--guest", "hello", "--replay", &dir.path("missing.log")], TIMEOUT).assert_error(2, "cannot open log");
}

#[test]
fn replay_is_exact_while_the_host_is_loaded() {
    let dir = Scratch::new("loaded");
    let log = dir.path("timer.log");
    let rec = record("timer", "", &log, 6);
    assert_eq!(rec.code(), 0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let results: Vec<Run> = (0..3).map(|_| replay("timer", "", &log)).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    for r in results {
        assert_eq!(r.code(), 0, "{}", r.stderr);
        assert_eq!(r.stdout, rec.stdout);
        assert_eq!(r.digest(), rec.digest());
    }
}
