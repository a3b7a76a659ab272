//! The VMM core: every embedded guest boots and does what it must, digests
//! are stable, and bad input ends in one clear error line and status 2.

use ftvmm_tests::{elf, run, run_with_input, Scratch, TIMEOUT};
use std::time::Duration;

fn line_with<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn list_guests_names_every_guest() {
    let r = run(&["--list-guests"], TIMEOUT);
    assert_eq!(r.code(), 0);
    for g in ["hello", "timer", "clock", "echo", "compute", "tsc"] {
        assert!(r.stdout.lines().any(|l| l.split_whitespace().next() == Some(g)), "{g} missing from:\n{}", r.stdout);
    }
}

#[test]
fn hello_greets_and_its_digest_is_stable() {
    let mut digests = Vec::new();
    for _ in 0..3 {
        let r = run(&["--guest", "hello", "--digest"], TIMEOUT);
        assert_eq!(r.code(), 0, "{}", r.stderr);
        assert_eq!(r.stdout, "hello from ftvmm guest\n");
        digests.push(r.digest().expect("state-digest as the last stderr line"));
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "digests differ: {digests:?}");
    // The digest covers memory size: another configuration, another state.
    let r = run(&["--guest", "hello", "--digest", "--mem-mib", "32"], TIMEOUT);
    assert_ne!(r.digest().unwrap(), digests[0]);
}

#[test]
fn kernel_flag_boots_an_image_file() {
    let dir = Scratch::new("kernel");
    let image = dir.path("hello.elf");
    // A hand-made image: write 'k' to COM1, then status 7 to the exit port.
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'k', // mov al, 'k'
        0xee, // out dx, al
        0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
        0xb0, 0x07, // mov al, 7
        0xee, // out dx, al
        0xeb, 0xfe, // jmp .
    ];
    std::fs::write(&image, elf(0x10_0000, &[(0x10_0000, &code, code.len() as u64, true)])).unwrap();
    let r = run(&["--kernel", &image, "--digest"], TIMEOUT);
    assert_eq!(r.code(), 7, "{}", r.stderr);
    assert_eq!(r.stdout, "k");
    assert!(r.digest().is_some());
}

#[test]
fn timer_counts_ticks_and_prints_a_checksum() {
    let r = run(&["--guest", "timer", "--digest"], TIMEOUT);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let line = line_with(&r.stdout, "timer: ");
    assert_eq!(field(line, "ticks"), "50");
    assert!(field(line, "work").parse::<u64>().unwrap() > 0, "{line}");
    assert_eq!(field(line, "checksum").len(), 16);
    assert!(r.digest().is_some());
    let r = run(&["--guest", "timer", "--cmdline", "ticks=5"], TIMEOUT);
    assert_eq!(field(line_with(&r.stdout, "timer: "), "ticks"), "5");
}

#[test]
fn clock_reads_every_time_source() {
    let r = run(&["--guest", "clock"], TIMEOUT);
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    let msr = line_with(&r.stdout, "clock: rdmsr IA32_TSC at cpl0 = ");
    let values: Vec<u64> = msr.rsplit("= ").next().unwrap().split(", ").map(|v| v.parse().unwrap()).collect();
    assert!(values[0] > 0 && values[1] >= values[0], "{msr}");
    let rounds: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("clock: round")).collect();
    assert_eq!(rounds.len(), 4);
    // The RTC tells this year's date (the VMM's wall clock).
    let year =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 31_556_952 + 1970;
    assert!(
        rounds[0].contains(&format!("rtc={year}-")) || rounds[0].contains(&format!("rtc={}-", year - 1)),
        "{}",
        rounds[0]
    );
    let tscs: Vec<u64> = rounds.iter().map(|l| field(l, "tsc").parse().unwrap()).collect();
    assert!(tscs.windows(2).all(|w| w[0] < w[1]) && tscs[0] >= values[1], "{tscs:?}");
    // The idle port's read: the time the guest woke at (the next 100 Hz
    // tick, up to 10 ms after the last reading), before the RDTSC after it.
    let idle = line_with(&r.stdout, "clock: idle ");
    let (woke, after): (u64, u64) = (field(idle, "woke").parse().unwrap(), field(idle, "after").parse().unwrap());
    let last = tscs[3];
    assert!(last < woke && woke <= after && woke - last <= 20_000_000, "{idle} (last reading {last})");
    assert_eq!(field(line_with(&r.stdout, "clock: hash"), "hash").len(), 16);
}

#[test]
fn tsc_reads_rdtsc_at_cpl3_and_cpl0() {
    let r = run(&["--guest", "tsc"], TIMEOUT);
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    let line = line_with(&r.stdout, "tsc: ");
    assert_eq!(field(line, "monotonic"), "true");
    let cpl0: Vec<u64> = field(line, "cpl0").split(',').map(|v| v.parse().unwrap()).collect();
    assert!(cpl0[0] > 0 && cpl0[1] > cpl0[0], "{line}");
    // The virtual TSC runs at 1 GHz from boot: a run this short stays far
    // below a host TSC, which counts from the host's boot.
    let last: u64 = field(line, "cpl3_last").parse().unwrap();
    assert!(last > cpl0[1] && last < 60_000_000_000, "{line}");
}

#[test]
fn echo_answers_lines_from_interrupt_driven_input() {
    let chunks = vec![
        (Duration::from_millis(50), b"hello world\n".to_vec()),
        (Duration::from_millis(30), b"ab".to_vec()),
        (Duration::from_millis(30), b"c\nquit\n".to_vec()),
    ];
    let r = run_with_input(&["--guest", "echo", "--digest"], &chunks, TIMEOUT);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(r.stdout, "echo: ready\necho: DLROW OLLEH\necho: CBA\necho: bye\n");

    let dir = Scratch::new("echo");
    let input = dir.path("in.txt");
    std::fs::write(&input, "one\ntwo\nquit\n").unwrap();
    let r = run(&["--guest", "echo", "--serial-input", &input], TIMEOUT);
    assert_eq!(r.stdout, "echo: ready\necho: ENO\necho: OWT\necho: bye\n");
}

#[test]
fn echo_without_input_reports_an_idle_guest_instead_of_hanging() {
    let r = run(&["--guest", "echo"], TIMEOUT);
    r.assert_error(2, "idle with no interrupt source left");
}

#[test]
fn compute_is_deterministic_and_configurable() {
    let a = run(&["--guest", "compute", "--cmdline", "rounds=20 kib=256", "--digest"], TIMEOUT);
    let b = run(&["--guest", "compute", "--cmdline", "rounds=20 kib=256", "--digest"], TIMEOUT);
    assert_eq!(a.code(), 0, "{}", a.stderr);
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(a.digest(), b.digest());
    let line = line_with(&a.stdout, "compute: ");
    assert_eq!(field(line, "rounds"), "20");
    assert_eq!(field(line, "kib"), "256");
    let c = run(&["--guest", "compute", "--cmdline", "rounds=21 kib=256"], TIMEOUT);
    assert_ne!(field(line_with(&c.stdout, "compute: "), "result"), field(line, "result"));
}

#[test]
fn missing_image_is_a_clear_error() {
    run(&["--kernel", "/nonexistent/guest.elf"], TIMEOUT)
        .assert_error(2, "cannot read guest image /nonexistent/guest.elf");
    run(&["--guest", "no-such-guest"], TIMEOUT).assert_error(2, "no embedded guest named \"no-such-guest\"");
}

#[test]
fn not_an_elf_is_a_clear_error() {
    let dir = Scratch::new("notelf");
    let path = dir.path("garbage.bin");
    std::fs::write(&path, b"this is not an ELF image at all, just text").unwrap();
    run(&["--kernel", &path], TIMEOUT).assert_error(2, "not an x86-64 ELF image");
    std::fs::write(&path, b"").unwrap();
    run(&["--kernel", &path], TIMEOUT).assert_error(2, "not an x86-64 ELF image");
    // A truncated real image: headers promise data the file lacks.
    let mut image = elf(0x10_0000, &[(0x10_0000, &[0xeb, 0xfe], 2, true)]);
    image.truncate(image.len() - 1);
    std::fs::write(&path, &image).unwrap();
    run(&["--kernel", &path], TIMEOUT).assert_error(2, "outside the file");
}

#[test]
fn image_that_does_not_fit_is_a_clear_error() {
    let dir = Scratch::new("toobig");
    let path = dir.path("big.elf");
    // 100 MiB of bss in a 64 MiB guest.
    std::fs::write(&path, elf(0x10_0000, &[(0x10_0000, &[0xeb, 0xfe], 100 << 20, true)])).unwrap();
    run(&["--kernel", &path], TIMEOUT).assert_error(2, "does not fit in guest memory");
    // Fits once memory is large enough.
    let r = run(&["--kernel", &path, "--mem-mib", "128"], Duration::from_secs(2));
    assert_eq!(r.status, None, "a spinning guest runs until killed");
    // Below 1 MiB is the VMM's.
    std::fs::write(&path, elf(0x1000, &[(0x1000, &[0xeb, 0xfe], 2, true)])).unwrap();
    run(&["--kernel", &path], TIMEOUT).assert_error(2, "below the lowest allowed address");
}

#[test]
fn triple_fault_is_a_clear_error() {
    let dir = Scratch::new("triple");
    let path = dir.path("ud2.elf");
    // ud2 with no IDT: #UD, then #DF, then shutdown.
    std::fs::write(&path, elf(0x10_0000, &[(0x10_0000, &[0x0f, 0x0b], 2, true)])).unwrap();
    let r = run(&["--kernel", &path, "--digest"], TIMEOUT);
    r.assert_error(2, "triple fault");
    assert!(r.stderr.contains("at rip 0x100000 after 0 exits"), "{}", r.stderr);
}

#[test]
fn bad_flags_are_usage_errors() {
    let r = run(&["--guest", "hello", "--mem-mib", "0"], TIMEOUT);
    assert_eq!(r.code(), 2);
    let r = run(&["--guest", "hello", "--kernel", "x"], TIMEOUT);
    assert_eq!(r.code(), 2);
    let r = run(&[], TIMEOUT);
    assert_eq!(r.code(), 2);
    let r = run(&["--help"], TIMEOUT);
    assert_eq!(r.code(), 0);
    for flag in
        ["--guest", "--kernel", "--list-guests", "--mem-mib", "--serial-input", "--digest", "--record", "--replay"]
    {
        assert!(r.stdout.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn emulation_failure_is_a_clear_error() {
    let dir = Scratch::new("emulation");
    let path = dir.path("pxor.elf");
    // pxor at CPL0, then status 9 to the exit port. Where CPL0 code is
    // emulated by KVM (software-nested hosts) KVM cannot emulate SSE
    // arithmetic: an internal error. On hardware virtualization it just runs.
    let code = [0x66, 0x0f, 0xef, 0xc0, 0x66, 0xba, 0xf4, 0x00, 0xb0, 0x09, 0xee, 0xeb, 0xfe];
    std::fs::write(&path, elf(0x10_0000, &[(0x10_0000, &code, code.len() as u64, true)])).unwrap();
    let r = run(&["--kernel", &path], TIMEOUT);
    if r.code() != 9 {
        r.assert_error(2, "KVM internal error: emulation failure at rip 0x100000 after 0 exits");
    }
}
