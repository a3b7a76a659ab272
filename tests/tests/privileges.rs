//! `--run-as`: a VMM started as root gives up root once the VM is built,
//! and fails over, takes a joining backup and serves its NIC unprivileged.
//! (The tests run as root, as CI does: they need KVM, TAPs and namespaces.)

use ftvmm_tests::lab::Lab;
use ftvmm_tests::resp::Reply;
use ftvmm_tests::{qemu_img, spawn_ftdisk, Proc, Scratch};
use std::process::Command;
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(30);
const JOIN: Duration = Duration::from_secs(60);
/// `nobody` and its group (`nogroup` on Debian, `nobody` elsewhere).
const NOBODY: &str = "65534";

/// Each test runs two VMs on the machine's two cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The fields of the `key:` line of /proc/`pid`/task/`tid`/status.
fn status_fields(pid: u32, tid: &str, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|rest| rest.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Every thread of process `pid` runs as nobody: real, effective, saved and
/// filesystem uid and gid 65534, no other group. Waits a little for the
/// drop (it follows the "serial console" line by the build's last steps).
fn assert_unprivileged(p: &Proc, what: &str) {
    let pid = p.child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let bad: Vec<String> = tids
            .iter()
            .filter_map(|tid| {
                let (uid, gid, groups) = (
                    status_fields(pid, tid, "Uid:"),
                    status_fields(pid, tid, "Gid:"),
                    status_fields(pid, tid, "Groups:"),
                );
                let ok = uid.len() == 4
                    && uid.iter().all(|u| u == NOBODY)
                    && gid.len() == 4
                    && gid.iter().all(|g| g == NOBODY)
                    && groups == [NOBODY];
                (!ok).then(|| format!("thread {tid}: Uid {uid:?} Gid {gid:?} Groups {groups:?}"))
            })
            .collect();
        if !tids.is_empty() && bad.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} (pid {pid}) is not all nobody: {bad:?}\n{:?}", p.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_unprivileged_pair_fails_over_and_the_survivor_runs_on_unprivileged() {
    let _serial = one_at_a_time();
    let dir = Scratch::new("runas-pair");
    let image = dir.path("disk.img");
    qemu_img(&image, 16 << 20);
    // ftdisk (root) holds the image: the VMMs need no permission on it.
    let (_ftdisk, addr) = spawn_ftdisk(&image, "127.0.0.1:0");
    let disk = format!("ftdisk:{addr}");
    let common = [
        "--guest",
        "ticker",
        "--cmdline",
        "hz=50",
        "--disk",
        disk.as_str(),
        "--heartbeat-ms",
        "100",
        "--serial",
        "tcp:127.0.0.1:0",
        "--run-as",
        "nobody",
    ];
    let mut pargs = vec!["--primary", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(&common);
    let mut p = Proc::spawn(&pargs);
    let listen = p.wait_addr("waiting for a backup on", START);
    // The backup's serial input once live: a file only root may read,
    // opened before the drop (it used to be opened on going live).
    let input = dir.path("input");
    std::fs::write(&input, b"typed after the failover\n").unwrap();
    std::fs::set_permissions(&input, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut bargs = vec!["--backup", "--connect", listen.as_str(), "--serial-input", input.as_str()];
    bargs.extend_from_slice(&common);
    let b = Proc::spawn(&bargs);
    p.wait_line("backup attached", START);
    assert_unprivileged(&p, "the primary");
    assert_unprivileged(&b, "the backup");
    // Let it run protected a while (logging, acks, digest checks).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(p.child.try_wait().ok().flatten().is_none(), "the primary died: {:?}", p.stderr());
    p.kill();
    b.wait_line("going live", Duration::from_secs(10));
    // Live and still running, still as nobody.
    std::thread::sleep(Duration::from_millis(1500));
    let mut b = b;
    assert!(b.child.try_wait().ok().flatten().is_none(), "the live backup died: {:?}", b.stderr());
    assert_unprivileged(&b, "the live former backup");
    b.kill();
}

#[test]
fn an_unprivileged_primary_takes_a_joining_backup() {
    let _serial = one_at_a_time();
    let common = ["--guest", "timer", "--cmdline", "ticks=5000", "--digest", "--run-as", "nobody"];
    let mut pargs = vec!["--primary", "--no-wait", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(&common);
    let p = Proc::spawn(&pargs);
    let addr = p.wait_addr("backups may join on", START);
    assert_unprivileged(&p, "the primary");
    std::thread::sleep(Duration::from_millis(300));
    let mut bargs = vec!["--backup", "--connect", addr.as_str()];
    bargs.extend_from_slice(&common);
    let b = Proc::spawn(&bargs);
    p.wait_line("backup joined at exit", JOIN);
    assert_unprivileged(&b, "the joined backup");
    let (p, b) = (p.finish(JOIN), b.finish(JOIN));
    assert_eq!(p.code(), 0, "{}", p.stderr);
    assert_eq!(b.code(), 0, "{}", b.stderr);
    assert!(b.stderr.contains("restored at exit"), "{}", b.stderr);
    let (pd, bd) = (p.digest(), b.digest());
    assert!(pd.is_some(), "{}", p.stderr);
    assert_eq!(pd, bd, "the joined backup ends in the primary's state");
}

#[test]
fn a_user_or_group_that_does_not_exist_is_a_usage_error() {
    for (spec, says) in [
        ("no-such-user-ftvmm", "no user \"no-such-user-ftvmm\""),
        ("nobody:no-such-group-ftvmm", "no group \"no-such-group-ftvmm\""),
        ("nobody:", "want USER[:GROUP] or UID[:GID]"),
    ] {
        let r = ftvmm_tests::run(&["--guest", "hello", "--run-as", spec], START);
        r.assert_error(2, says);
        assert!(!r.stdout.contains("Hello"), "nothing ran: {}", r.stdout);
    }
}

#[test]
fn a_numeric_uid_and_gid_are_taken_as_they_are() {
    // Not in the user database: fine with both given.
    let r = ftvmm_tests::run(&["--guest", "hello", "--run-as", "54321:54321"], START);
    assert_eq!(r.code(), 0, "{}", r.stderr);
}

/// The redis guest on a NIC, both VMMs unprivileged: the backup that goes
/// live announces the MAC on its TAP and serves the same address.
#[test]
fn an_unprivileged_pair_with_a_nic_fails_over() {
    let _serial = one_at_a_time();
    ftvmm_tests::require_kvm();
    let net = "10.94.0";
    let lab = Lab::create(
        &format!("pv{}", std::process::id() % 100_000),
        net,
        &[("p", 1), ("b", 2), ("s", 4)],
        std::process::id(),
    )
    .expect("the network tests need root (network namespaces)");
    lab.add_tap("p", "fttap").unwrap();
    lab.add_tap("b", "fttap").unwrap();
    let dir = Scratch::new("runas-net");
    let ns = |h: &str| lab.host(h).unwrap().ns.clone();
    let vm = format!("{net}.10");
    let extra = ["--heartbeat-ms", "100", "--run-as", "nobody"];
    let (p, b, _arbiter) = ftvmm_tests::spawn_redis_pair([&ns("p"), &ns("b"), &ns("s")], net, &vm, &dir, &extra);
    p.wait_line("backup attached", START);
    assert_unprivileged(&p, "the primary");
    assert_unprivileged(&b, "the backup");
    let mut conn = ftvmm_tests::redis_client(&vm);
    assert_eq!(conn.cmd(&["SET", "before", "1"]).unwrap(), Reply::Simple("OK".into()));
    let _ = Command::new("kill").args(["-KILL", &p.child.id().to_string()]).status();
    let _ = lab.cut("p");
    b.wait_line("going live", Duration::from_secs(10));
    // The same connection, to the same address, now served by the backup.
    assert_eq!(conn.cmd(&["GET", "before"]).unwrap(), Reply::Bulk(Some(b"1".to_vec())));
    assert_eq!(conn.cmd(&["SET", "after", "2"]).unwrap(), Reply::Simple("OK".into()));
    assert_eq!(ftvmm_tests::redis_client(&vm).cmd(&["GET", "after"]).unwrap(), Reply::Bulk(Some(b"2".to_vec())));
    assert_unprivileged(&b, "the live former backup");
}
