//! Replay determinism: every guest, recorded under perturbed host timing,
//! replays to the same output and state digest; damaged logs are handled
//! without a panic; divergence is reported at the first differing exit.

use ftvmm_tests::{run, run_with_input, Run, Scratch, TIMEOUT};
use rand::{Rng, SeedableRng};
use replay::{Entry, LogReader, LogWriter, Record, RecordSink, RecordSource};
use std::io::BufReader;
use std::time::Duration;

/// (guest, command line, timing-sensitive, serial input)
const GUESTS: &[(&str, &str, bool, bool)] = &[
    ("hello", "", false, false),
    ("timer", "ticks=30", true, false),
    ("clock", "", true, false),
    ("tsc", "", true, false),
    ("compute", "rounds=5 kib=256", false, false),
    ("echo", "", true, true),
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

fn record(guest: &str, cmdline: &str, serial: bool, log: &str, seed: u64) -> Run {
    let seed_text = seed.to_string();
    let args = ["--guest", guest, "--cmdline", cmdline, "--record", log, "--digest", "--perturb-seed", &seed_text];
    if !serial {
        return run(&args, TIMEOUT);
    }
    // Serial input arriving at random moments.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lines = ["alpha\n", "bravo charlie\n", "x\n", "quit\n"];
    let mut chunks: Vec<(Duration, Vec<u8>)> = Vec::new();
    for line in lines {
        let (a, b) = line.as_bytes().split_at(rng.gen_range(0..line.len()));
        for part in [a, b] {
            chunks.push((Duration::from_millis(rng.gen_range(0..40)), part.to_vec()));
        }
    }
    run_with_input(&args, &chunks, TIMEOUT)
}

fn replay(guest: &str, cmdline: &str, log: &str) -> Run {
    run(&["--guest", guest, "--cmdline", cmdline, "--replay", log, "--digest"], TIMEOUT)
}

#[test]
fn every_guest_replays_each_of_its_perturbed_recordings_exactly() {
    let dir = Scratch::new("determinism");
    for &(guest, cmdline, timing_sensitive, serial) in GUESTS {
        let mut recordings = Vec::new();
        for seed in 0..3u64 {
            let log = dir.path(&format!("{guest}-{seed}.log"));
            let rec = record(guest, cmdline, serial, &log, seed + 1);
            assert_eq!(rec.code(), 0, "{guest} recording {seed}: {}", rec.stderr);
            let digest = rec.digest().expect("digest");
            for attempt in 0..2 {
                let rep = replay(guest, cmdline, &log);
                assert_eq!(rep.code(), 0, "{guest} replay {seed}/{attempt}: {}", rep.stderr);
                assert_eq!(rep.stdout, rec.stdout, "{guest} replay {seed} output");
                assert_eq!(rep.digest().as_ref(), Some(&digest), "{guest} replay {seed} digest");
            }
            recordings.push(events(&read_log(&log).1));
        }
        if timing_sensitive {
            assert!(
                recordings[0] != recordings[1] || recordings[1] != recordings[2],
                "{guest}: three recordings under different timing logged identical inputs"
            );
            assert!(!recordings[0].is_empty(), "{guest} logged no input");
        }
    }
}

#[test]
fn timer_recordings_differ_and_each_replays_its_own() {
    let dir = Scratch::new("timer-twice");
    let (a, b) = (dir.path("a.log"), dir.path("b.log"));
    let ra = record("timer", "", false, &a, 11);
    let rb = record("timer", "", false, &b, 12);
    assert_ne!(events(&read_log(&a).1), events(&read_log(&b).1));
    assert_ne!(ra.stdout, rb.stdout, "the checksum of the interleaving differs");
    assert_eq!(replay("timer", "", &a).stdout, ra.stdout);
    assert_eq!(replay("timer", "", &b).stdout, rb.stdout);
}

#[test]
fn truncated_logs_replay_up_to_their_last_complete_record() {
    let dir = Scratch::new("truncate");
    let full = dir.path("full.log");
    let rec = record("timer", "ticks=10", false, &full, 3);
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
    assert_eq!(record("timer", "ticks=10", false, &full, 4).code(), 0);
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
    assert_eq!(record("timer", "ticks=10", false, &log, 5).code(), 0);
    let (header, records) = read_log(&log);

    // An exit that happened elsewhere.
    let mut moved = records.clone();
    let k = moved.iter().position(|r| matches!(r.entry, Entry::Exit(_)) && r.position.exit == 40).unwrap();
    moved[k].position.rip += 1;
    let bad = dir.path("moved.log");
    write_log(&bad, &header, &moved);
    let r = replay("timer", "ticks=10", &bad);
    r.assert_error(3, "divergence at exit 40: expected");

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
    let rec = record("timer", "", false, &log, 6);
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
