//! The network under fault tolerance: a client's TCP connection to the VM's
//! own address survives the primary host's death — killed, or silently
//! frozen —, and the backup sends nothing on its TAP before it goes live.
//!
//! Hosts are network namespaces (root; CI is root): the primary and the
//! backup each bridge a TAP onto the LAN, the arbiter (an arbiter-only
//! ftdisk) has a host of its own, and the client is the root namespace on
//! the LAN's bridge.

use ftvmm_tests::lab::Lab;
use ftvmm_tests::resp::{Reply, RespConn};
use ftvmm_tests::{KillOnDrop, Proc, Scratch};
use rand::{Rng, SeedableRng};
use std::process::Command;
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(30);

/// Each test runs VMs on both cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A primary and a backup of the `redis` guest on two lab hosts.
struct NetPair {
    lab: Lab,
    primary: Proc,
    backup: Proc,
    _arbiter: KillOnDrop,
    vm: String,
    _dir: Scratch,
}

fn lab_name(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

impl NetPair {
    fn start(tag: &str, subnet: u8) -> NetPair {
        ftvmm_tests::require_kvm();
        let net = format!("10.{subnet}.0");
        let lab = Lab::create(&lab_name(tag), &net, &[("p", 1), ("b", 2), ("s", 4)], std::process::id())
            .expect("the network tests need root (network namespaces)");
        lab.add_tap("p", "fttap").unwrap();
        lab.add_tap("b", "fttap").unwrap();
        let dir = Scratch::new("netft");
        let (pns, bns, sns) =
            (lab.host("p").unwrap().ns.clone(), lab.host("b").unwrap().ns.clone(), lab.host("s").unwrap().ns.clone());
        let vm = format!("{net}.10");
        // Metrics on each host's own address (the test reaches both).
        let extra = ["--heartbeat-ms", "100", "--metrics", "0.0.0.0:9400"];
        let (primary, backup, arbiter) = ftvmm_tests::spawn_redis_pair([&pns, &bns, &sns], &net, &vm, &dir, &extra);
        primary.wait_line("backup attached", START);
        NetPair { lab, primary, backup, _arbiter: arbiter, vm, _dir: dir }
    }

    fn redis(&self) -> RespConn {
        ftvmm_tests::redis_client(&self.vm)
    }

    /// Frames the backup's VMM has written to its TAP (the TAP's receive
    /// count, as the kernel sees it).
    fn backup_tap_frames(&self) -> u64 {
        let ns = &self.lab.host("b").unwrap().ns;
        let out = Command::new("ip").args(["-n", ns, "-s", "link", "show", "fttap"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // "RX:  bytes packets ..." then the numbers on the next line.
        let mut lines = text.lines().skip_while(|l| !l.trim_start().starts_with("RX:"));
        lines.next();
        let numbers = lines.next().unwrap_or_default();
        numbers.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(u64::MAX)
    }
}

#[derive(Clone, Copy, Debug)]
enum Death {
    Kill,
    Freeze,
    CutLink,
}

/// The client's session across a failover: INCRs and SETs on ONE connection.
fn failover_trial(rng: &mut impl Rng, trial: u32, death: Death, tag: &str, subnet: u8) {
    let pair = NetPair::start(tag, subnet);
    let mut conn = pair.redis();
    assert_eq!(pair.backup_tap_frames(), 0, "trial {trial}: the backup sent frames before going live");
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut last_incr = 0;
    let kill_after = rng.gen_range(5..60);
    let mut killed_at = None;
    let mut pause = Duration::ZERO;
    let mut i = 0;
    while killed_at.is_none_or(|k| i < k + 30) {
        if i == kill_after {
            kill_primary(&pair, death);
            killed_at = Some(i);
        }
        let started = Instant::now();
        let incr = conn.cmd(&["INCR", "counter"]).unwrap_or_else(|e| {
            panic!(
                "trial {trial} ({death:?}): the connection broke at op {i}: {e}\nprimary: {:?}\nbackup: {:?}",
                pair.primary.stderr(),
                pair.backup.stderr()
            )
        });
        pause = pause.max(started.elapsed());
        match incr {
            Reply::Int(n) => {
                assert_eq!(n, last_incr + 1, "trial {trial} ({death:?}): INCR values not consecutive at op {i}");
                last_incr = n;
            }
            other => panic!("trial {trial}: INCR answered {other:?}"),
        }
        let (k, v) = (format!("key{i}"), format!("value{i}-{trial}"));
        match conn.cmd(&["SET", &k, &v]) {
            Ok(Reply::Simple(s)) if s == "OK" => acked.push((k, v)),
            other => panic!("trial {trial} ({death:?}): SET answered {other:?}"),
        }
        i += 1;
    }
    pair.backup.wait_line("going live", Duration::from_secs(5));
    assert!(pair.backup_tap_frames() > 0, "the live backup sends on its TAP");
    for (k, v) in &acked {
        match conn.cmd(&["GET", k]) {
            Ok(Reply::Bulk(Some(got))) => assert_eq!(got, v.as_bytes(), "trial {trial}: {k}"),
            other => panic!("trial {trial} ({death:?}): acknowledged SET {k} reads back as {other:?}"),
        }
    }
    eprintln!("trial {trial} ({death:?}): killed at op {kill_after}, longest pause {pause:?}");
}

fn kill_primary(pair: &NetPair, death: Death) {
    let pid = pair.primary.child.id().to_string();
    match death {
        // `ip netns exec` execs ftvmm: the child is the VMM itself.
        Death::Kill => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            let _ = pair.lab.cut("p");
        }
        Death::Freeze => {
            let _ = Command::new("kill").args(["-STOP", &pid]).status();
        }
        Death::CutLink => {
            let _ = pair.lab.cut("p");
        }
    }
}

#[test]
fn a_client_connection_survives_twenty_primary_host_deaths() {
    let _serial = one_at_a_time();
    let mut rng = rand::rngs::StdRng::seed_from_u64(20_261_201);
    for trial in 0..20 {
        failover_trial(&mut rng, trial, Death::Kill, "nk", 83);
    }
}

#[test]
fn a_client_connection_survives_a_silent_primary_death() {
    let _serial = one_at_a_time();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (trial, death) in [Death::Freeze, Death::CutLink, Death::Freeze, Death::CutLink].into_iter().enumerate() {
        failover_trial(&mut rng, trial as u32, death, "ns", 84);
    }
}

#[test]
fn the_backup_sends_nothing_on_its_tap_while_it_replays() {
    let _serial = one_at_a_time();
    let pair = NetPair::start("nb", 85);
    let mut conn = pair.redis();
    for i in 0..200 {
        let v = format!("v{i}");
        assert_eq!(conn.cmd(&["SET", &format!("k{i}"), &v]).unwrap(), Reply::Simple("OK".into()));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pair.backup_tap_frames(), 0, "the backup wrote frames to its TAP while replaying");
    // Each side's TAP counters are served (none dropped on a quiet LAN).
    let net = pair.vm.trim_end_matches(".10");
    for host in [1, 2] {
        let text = ftvmm_tests::scrape(&format!("{net}.{host}:9400"));
        for reason in ["rx_queue_full", "rx_bad_size", "tx_queue_full", "tx_link_down"] {
            let series = format!(r#"ftvmm_tap_dropped_frames_total{{reason="{reason}"}}"#);
            assert_eq!(ftvmm_tests::metric(&text, &series), Some(0.0), "host .{host}: {series}:\n{text}");
        }
    }
}

/// Re-protection with the network: the same client TCP connection survives
/// three failovers in a row, a new backup joining the live side after each.
#[test]
fn one_client_connection_survives_three_failovers_in_a_row() {
    let _serial = one_at_a_time();
    ftvmm_tests::require_kvm();
    let net = "10.88.0";
    let hosts = [("h1", 1u8), ("h2", 2), ("h3", 5), ("h4", 6), ("s", 4)];
    let lab = Lab::create(&lab_name("nr"), net, &hosts, std::process::id()).expect("root for labs");
    for (h, _) in &hosts[..4] {
        lab.add_tap(h, "fttap").unwrap();
    }
    let dir = Scratch::new("netchain");
    let sns = lab.host("s").unwrap().ns.clone();
    let (_arbiter, _) = ftvmm_tests::spawn_arbiter(Some(&sns), &dir.path("record"), &format!("{net}.4:7100"));
    let (vm, arb) = (format!("{net}.10"), format!("ftdisk:{net}.4:7100"));
    let cmdline = format!("ip={vm}/24");
    let common =
        ["--guest", "redis", "--cmdline", &cmdline, "--net", "tap:fttap", "--arbiter", &arb, "--heartbeat-ms", "100"];
    let addr = |i: usize| format!("{net}.{}:7000", hosts[i].1);
    let ns = |i: usize| lab.host(hosts[i].0).unwrap().ns.clone();
    let spawn = |i: usize, args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&common);
        Proc::spawn_in(Some(&ns(i)), &all)
    };
    let listen0 = addr(0);
    let mut live = spawn(0, &["--primary", "--listen", &listen0]);
    live.wait_line("waiting for a backup", START);
    let (c1, l1) = (addr(0), addr(1));
    let mut backup = Some(spawn(1, &["--backup", "--connect", &c1, "--listen", &l1]));
    live.wait_line("backup attached", START);
    let mut conn = ftvmm_tests::redis_client(&vm);
    let mut last = 0;
    let mut acked = Vec::new();
    let mut graveyard = Vec::new();
    for side in 0..4 {
        for j in 0..40 {
            let n = match conn.cmd(&["INCR", "counter"]) {
                Ok(Reply::Int(n)) => n,
                other => panic!("side {side}: INCR {other:?}\nlive: {:?}", live.stderr()),
            };
            assert_eq!(n, last + 1, "side {side}: INCR values not consecutive");
            last = n;
            let (k, v) = (format!("k{side}x{j}"), format!("v{side}x{j}"));
            assert_eq!(conn.cmd(&["SET", &k, &v]).unwrap(), Reply::Simple("OK".into()));
            acked.push((k, v));
        }
        if side == 3 {
            break;
        }
        // The live side's host dies; its backup goes live; a new backup
        // joins it (but after the third death).
        let pid = live.child.id().to_string();
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        let _ = lab.cut(&lab.hosts[side].name);
        let next = backup.take().expect("a backup");
        next.wait_line("going live", Duration::from_secs(10));
        graveyard.push(std::mem::replace(&mut live, next));
        if side + 2 < 4 {
            let (connect, listen) = (addr(side + 1), addr(side + 2));
            backup = Some(spawn(side + 2, &["--backup", "--connect", &connect, "--listen", &listen]));
            live.wait_line("backup joined at exit", Duration::from_secs(60));
        }
    }
    for (k, v) in &acked {
        assert_eq!(conn.cmd(&["GET", k]).unwrap(), Reply::Bulk(Some(v.clone().into_bytes())), "{k}");
    }
}
