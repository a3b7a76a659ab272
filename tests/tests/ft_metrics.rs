//! A primary/backup pair watched as an operator would: Debian's
//! `prometheus` scrapes both VMMs' `--metrics` and the shared disk's
//! `ftdisk --metrics`, and the test reads, through Prometheus's query API,
//! that the pair is protected, that exits, log bytes and disk writes rise,
//! and that once the primary is killed the survivor needs a secondary
//! because it went live, with one failover counted. Every metric ftvmm
//! documents is read from a VMM's `/metrics` too, and `ftvmm status` of
//! both sides before and after the kill.

use ftvmm_tests::prometheus::Prometheus;
use ftvmm_tests::{
    ftvmm, metric as value, metrics_addr, qemu_img, require_kvm, scrape, spawn_ftdisk_with_metrics, Proc, Scratch,
};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a value may take to show in Prometheus (a scrape a second, on
/// a loaded machine).
const SCRAPED: Duration = Duration::from_secs(40);
const START: Duration = Duration::from_secs(60);

/// Every metric family an ftvmm serves with a shared disk (docs/observability.md).
const FAMILIES: &[&str] = &[
    "ftvmm_guest_exits_total",
    "ftvmm_ft_state",
    "ftvmm_ft_state_reason",
    "ftvmm_ft_state_since_seconds",
    "ftvmm_protected",
    "ftvmm_failovers_total",
    "ftvmm_joins_total",
    "ftvmm_resyncs_total",
    "ftvmm_divergences_total",
    "ftvmm_backups_lost_total",
    "ftvmm_backups_refused_total",
    "ftvmm_digest_checks_total",
    "ftvmm_state_syncs_total",
    "ftvmm_state_sync_bytes_total",
    "ftvmm_state_sync_seconds_total",
    "ftvmm_output_commit_seconds_bucket",
    "ftvmm_output_commit_seconds_count",
    "ftvmm_backup_lag_exits",
    "ftvmm_backup_lag_seconds",
    "ftvmm_held_outputs",
    "ftvmm_held_output_bytes",
    "ftvmm_log_records_sent_total",
    "ftvmm_log_sent_bytes_total",
    "ftvmm_log_records_received_total",
    "ftvmm_log_received_bytes_total",
    "ftvmm_state_transfer_sent_bytes_total",
    "ftvmm_state_transfer_received_bytes_total",
    "ftvmm_heartbeats_missed_total",
    "ftvmm_disk_ops_total",
    "ftvmm_disk_bytes_total",
    "ftvmm_disk_pending_writes_bytes",
    "ftvmm_console_dropped_bytes_total",
];

fn status(addr: &str) -> String {
    let out = ftvmm(&["status", addr]).output().expect("run ftvmm status");
    assert!(out.status.success(), "ftvmm status {addr}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn prometheus_watches_a_pair_through_protection_and_failover() {
    require_kvm();
    let dir = Scratch::new("ft-metrics");
    let image = dir.path("disk.img");
    qemu_img(&image, 16 << 20);
    let (_ftdisk, disk_addr, disk_metrics) = spawn_ftdisk_with_metrics(&["--image", &image], "127.0.0.1:0");
    let disk = format!("ftdisk:{disk_addr}");
    // Steady disk traffic for as long as the test runs.
    let common = [
        "--guest",
        "blkstress",
        "--cmdline",
        "seed=1 qd=4 ops=100000000 write=60 read=30 flush=10 pace=20000",
        "--disk",
        &disk,
        "--heartbeat-ms",
        "200",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut pargs = vec!["--primary", "--listen", "127.0.0.1:0"];
    pargs.extend_from_slice(&common);
    let mut p = Proc::spawn(&pargs);
    let log_addr = p.wait_addr("waiting for a backup on", START);
    let mut bargs = vec!["--backup", "--connect", log_addr.as_str()];
    bargs.extend_from_slice(&common);
    let b = Proc::spawn(&bargs);
    let (pm, bm) = (metrics_addr(&p), metrics_addr(&b));
    let parse = |a: &str| -> SocketAddr { a.parse().expect("a metrics address") };
    let prometheus =
        Prometheus::start(&[("ftvmm", parse(&pm)), ("ftvmm", parse(&bm)), ("ftdisk", parse(&disk_metrics))]);
    let on = |addr: &str, q: &str| q.replace("{", &format!("{{instance=\"{addr}\","));

    // Protected: the primary in lockstep with a backup that replays.
    prometheus.wait_for(&on(&pm, r#"ftvmm_ft_state{state="protected"}"#), SCRAPED, |v| v == 1.0);
    prometheus.wait_for(&format!(r#"ftvmm_protected{{instance="{pm}"}}"#), SCRAPED, |v| v == 1.0);
    prometheus.wait_for(&on(&bm, r#"ftvmm_ft_state{state="replaying"}"#), SCRAPED, |v| v == 1.0);
    // Exits, log bytes and disk writes rise.
    let exits = format!(r#"sum(ftvmm_guest_exits_total{{instance="{pm}"}})"#);
    let first = prometheus.wait_for(&exits, SCRAPED, |v| v > 0.0);
    prometheus.wait_for(&exits, SCRAPED, |v| v > first);
    let sent = format!(r#"ftvmm_log_sent_bytes_total{{instance="{pm}"}}"#);
    let first = prometheus.wait_for(&sent, SCRAPED, |v| v > 0.0);
    prometheus.wait_for(&sent, SCRAPED, |v| v > first);
    prometheus.wait_for(&format!(r#"ftvmm_log_received_bytes_total{{instance="{bm}"}}"#), SCRAPED, |v| v > 0.0);
    prometheus.wait_for(r#"ftdisk_requests_total{kind="write"}"#, SCRAPED, |v| v > 0.0);

    // Every documented metric is served, and those this workload moves, move.
    let text = scrape(&pm);
    for family in FAMILIES {
        assert!(text.lines().any(|l| l.starts_with(family)), "the primary does not serve {family}:\n{text}");
    }
    for series in [
        r#"ftvmm_guest_exits_total{kind="mmio"}"#,
        "ftvmm_log_records_sent_total",
        "ftvmm_output_commit_seconds_count",
        r#"ftvmm_disk_ops_total{op="write"}"#,
        r#"ftvmm_disk_ops_total{op="flush"}"#,
        r#"ftvmm_disk_ops_total{op="read"}"#,
        r#"ftvmm_disk_bytes_total{op="write"}"#,
        "ftvmm_digest_checks_total",
    ] {
        assert!(value(&text, series).is_some_and(|v| v > 0.0), "{series} did not move on the primary:\n{text}");
    }
    assert!(
        text.lines().any(|l| l.starts_with("ftvmm_output_commit_hop_seconds{")),
        "no commit hops on the primary:\n{text}"
    );
    let text = scrape(&bm);
    assert!(value(&text, "ftvmm_log_records_received_total").is_some_and(|v| v > 0.0), "{text}");

    // What a person sees, both sides.
    let before = (status(&pm), status(&bm));
    assert!(before.0.contains("protected") && before.0.contains("primary"), "{}", before.0);
    assert!(before.1.contains("replaying") && before.1.contains("backup"), "{}", before.1);
    eprintln!("--- status before the kill ---\n{}\n{}", before.0, before.1);

    // The primary's host dies: the survivor goes live and needs a secondary.
    p.kill();
    b.wait_line("going live", START);
    prometheus.wait_for(&on(&bm, r#"ftvmm_ft_state{state="needs_secondary"}"#), SCRAPED, |v| v == 1.0);
    prometheus.wait_for(&on(&bm, r#"ftvmm_ft_state_reason{reason="went_live"}"#), SCRAPED, |v| v == 1.0);
    prometheus.wait_for(&format!(r#"ftvmm_failovers_total{{instance="{bm}"}}"#), SCRAPED, |v| v == 1.0);
    prometheus.wait_for(&format!(r#"ftvmm_protected{{instance="{bm}"}}"#), SCRAPED, |v| v == 0.0);
    let after = status(&bm);
    assert!(after.contains("needs_secondary") && after.contains("went_live"), "{after}");
    assert!(!after.contains("failover   never"), "the failover is not shown:\n{after}");
    eprintln!("--- the survivor's status after the kill ---\n{after}");
    // The FT state's transitions were each said once, with the reason.
    let said = b.stderr().iter().filter(|l| l.contains("FT state needs_secondary (went_live)")).count();
    assert_eq!(said, 1, "{:?}", b.stderr());
}
