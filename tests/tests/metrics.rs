//! Observability against the real thing: Debian's `prometheus` scrapes an
//! `ftdisk --metrics` while a client writes, claims and is fenced, and the
//! test reads the counters back through Prometheus's query API; `ftvmm
//! status` renders a status server's document (a stub with a fixed
//! document, and a real ftdisk), prints its JSON, refreshes with --watch,
//! and fails in one line when nothing answers. None of this needs KVM.

use ftvmm_tests::prometheus::Prometheus;
use ftvmm_tests::{ftvmm, spawn_ftdisk_with_metrics, wait, Scratch};
use serde_json::json;
use shared_disk::{ClientError, DiskClient, DiskError, TasOutcome};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use telemetry::prometheus_client::registry::Registry;
use telemetry::MetricsServer;

/// How long a value may take to show in Prometheus: a scrape a second, on
/// a loaded machine.
const SCRAPED: Duration = Duration::from_secs(30);

fn image(dir: &Scratch, bytes: u64) -> String {
    let path = dir.path("disk.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(bytes)).expect("make the image");
    path
}

#[test]
fn prometheus_scrapes_ftdisk_requests_claims_and_fencing() {
    let dir = Scratch::new("metrics-ftdisk");
    let image = image(&dir, 4 << 20);
    let (_disk, disk_addr, metrics_addr) = spawn_ftdisk_with_metrics(&["--image", &image], "127.0.0.1:0");
    let prometheus = Prometheus::start(&[("ftdisk", metrics_addr.parse().expect("metrics address"))]);
    prometheus.wait_for(r#"up{job="ftdisk"}"#, SCRAPED, |up| up == 1.0);
    let writes = r#"ftdisk_requests_total{job="ftdisk",kind="write"}"#;
    let before = prometheus.wait_for(writes, SCRAPED, |_| true);
    assert_eq!(before, 0.0);

    let mut client = DiskClient::connect(&disk_addr, Duration::from_secs(10)).expect("connect to ftdisk");
    for i in 0..20u8 {
        client.write(u64::from(i) * 512, &[i; 512], 0).expect("write");
    }
    client.flush(0).expect("flush");
    assert_eq!(client.read(512, 512).expect("read"), vec![1; 512]);
    match client.test_and_set(0, "metrics-test").expect("test-and-set") {
        TasOutcome::Won { generation: 1 } => {}
        other => panic!("the claim on a fresh disk: {other:?}"),
    }
    // A second client's claim on the same generation loses, and its write
    // at the old generation is fenced.
    let mut late = DiskClient::connect(&disk_addr, Duration::from_secs(10)).expect("connect to ftdisk");
    assert!(matches!(late.test_and_set(0, "late").expect("test-and-set"), TasOutcome::Lost { generation: 1, .. }));
    match late.write(0, &[9; 512], 0) {
        Err(ClientError::Disk(DiskError::Fenced { yours: 0, current: 1 })) => {}
        other => panic!("a write at a stale generation: {other:?}"),
    }

    let after = prometheus.wait_for(writes, SCRAPED, |v| v >= before + 21.0);
    assert_eq!(after, 21.0, "20 writes and the fenced one");
    prometheus.wait_for(r#"ftdisk_test_and_set_total{result="won"}"#, SCRAPED, |v| v >= 1.0);
    prometheus.wait_for(r#"ftdisk_test_and_set_total{result="lost"}"#, SCRAPED, |v| v == 1.0);
    prometheus.wait_for("ftdisk_fenced_writes_total", SCRAPED, |v| v == 1.0);
    prometheus.wait_for("ftdisk_written_bytes_total", SCRAPED, |v| v == 20.0 * 512.0);
    prometheus.wait_for("ftdisk_read_bytes_total", SCRAPED, |v| v == 512.0);
    prometheus.wait_for(r#"ftdisk_requests_total{kind="flush"}"#, SCRAPED, |v| v == 1.0);
    prometheus.wait_for("ftdisk_owner_generation", SCRAPED, |v| v == 1.0);
    prometheus.wait_for("ftdisk_sessions_open", SCRAPED, |v| v == 2.0);
    prometheus.wait_for("ftdisk_sessions_total", SCRAPED, |v| v == 2.0);
    prometheus.wait_for("ftdisk_image_size_bytes", SCRAPED, |v| v == f64::from(4u32 << 20));
    // A fixed label set: six kinds, whatever the traffic.
    assert_eq!(prometheus.query("count(ftdisk_requests_total)"), Some(6.0));
    // The clients go: their connections close, their sessions are kept.
    drop(client);
    drop(late);
    prometheus.wait_for("ftdisk_connections_open", SCRAPED, |v| v == 0.0);
    prometheus.wait_for("ftdisk_sessions_open", SCRAPED, |v| v == 0.0);
}

/// A status server with a fixed ftvmm-like document (plus a count of the
/// requests it answered), on a free port.
fn stub() -> (MetricsServer, String) {
    let calls = Arc::new(AtomicU64::new(0));
    let status = Arc::new(move || {
        let mut doc = ftvmm_like();
        doc["refreshes"] = json!(calls.fetch_add(1, Ordering::Relaxed) + 1);
        doc
    });
    let server = MetricsServer::start("127.0.0.1:0", Arc::new(Registry::default()), status).expect("start a stub");
    let addr = server.local_addr().to_string();
    (server, addr)
}

fn ftvmm_like() -> serde_json::Value {
    json!({
        "program": "ftvmm", "version": "0.1.0", "now_unix": 1_765_000_200.0, "uptime_seconds": 200.0,
        "role": "backup", "state": "protected", "reason": "replaying the primary's log",
        "since_unix": 1_765_000_100.0, "peer": "10.0.0.1:7000",
        "lag": {"exits": 3, "seconds": 0.002},
        "log_bytes_per_second": 2048.0,
        "commit_latency": {"p50_seconds": 0.0003, "p99_seconds": 0.0012, "max_seconds": 0.004, "count": 600, "window_seconds": 60},
        "exits_per_second": 5000.0,
        "last_failover": null
    })
}

#[test]
fn ftvmm_status_renders_prints_json_and_fails_in_one_line() {
    let (_server, addr) = stub();
    let shown = wait(ftvmm(&["status", &addr]).spawn().expect("spawn ftvmm"), Duration::from_secs(20));
    assert_eq!(shown.status, Some(0), "{}", shown.stderr);
    for line in [
        "program    ftvmm 0.1.0\n",
        "role       backup\n",
        "state      protected\n",
        "reason     replaying the primary's log\n",
        "since      2025-12-06 05:48:20 UTC (1m40s ago)\n",
        "peer       10.0.0.1:7000\n",
        "lag        3 exits, 2.00 ms\n",
        "log        2.0 KiB/s\n",
        "commit     p50 300 us, p99 1.20 ms, max 4.00 ms (600 outputs, last 60 s)\n",
        "exits      5000/s\n",
        "failover   never\n",
        "uptime     3m20s\n",
        "refreshes  1\n",
    ] {
        assert!(shown.stdout.contains(line), "no {line:?} in\n{}", shown.stdout);
    }
    assert!(shown.stderr.is_empty(), "{}", shown.stderr);

    let json = wait(ftvmm(&["status", &addr, "--json"]).spawn().expect("spawn ftvmm"), Duration::from_secs(20));
    assert_eq!(json.status, Some(0), "{}", json.stderr);
    let mut doc: serde_json::Value = serde_json::from_str(json.stdout.trim()).expect("--json prints JSON");
    assert_eq!(doc["refreshes"], 2);
    doc.as_object_mut().expect("an object").remove("refreshes");
    assert_eq!(doc, ftvmm_like());

    // Nothing listens there.
    let gone = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").to_string();
    let failed = wait(ftvmm(&["status", &gone]).spawn().expect("spawn ftvmm"), Duration::from_secs(20));
    failed.assert_error(1, &format!("cannot reach {gone}"));
    assert!(failed.stdout.is_empty());
    // With --watch too: the first fetch must succeed.
    let failed = wait(ftvmm(&["status", &gone, "--watch"]).spawn().expect("spawn ftvmm"), Duration::from_secs(20));
    failed.assert_error(1, "cannot reach");
    // A usage error.
    let usage = wait(ftvmm(&["status"]).spawn().expect("spawn ftvmm"), Duration::from_secs(20));
    assert_eq!(usage.status, Some(2), "{}", usage.stderr);
}

#[test]
fn ftvmm_status_watch_refreshes_like_top() {
    let (_server, addr) = stub();
    let mut child = ftvmm(&["status", &addr, "--watch", "--interval", "0.2"]).spawn().expect("spawn ftvmm");
    std::thread::sleep(Duration::from_millis(1500));
    let _ = child.kill();
    let watched = wait(child, Duration::from_secs(10));
    let screens = watched.stdout.matches("\x1b[H\x1b[2J").count();
    assert!(screens >= 3, "{screens} screens in 1.5 s:\n{}", watched.stdout);
    assert!(watched.stdout.contains(&format!("ftvmm status {addr}: every 0.2 s")), "{}", watched.stdout);
    assert!(watched.stdout.contains("refreshes  3\n"), "each screen is fetched anew:\n{}", watched.stdout);

    // --json --watch: one document per line.
    let mut child = ftvmm(&["status", &addr, "--watch", "--json", "--interval", "0.2"]).spawn().expect("spawn");
    std::thread::sleep(Duration::from_millis(1000));
    let _ = child.kill();
    let watched = wait(child, Duration::from_secs(10));
    let docs: Vec<serde_json::Value> =
        watched.stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert!(docs.len() >= 3, "{}", watched.stdout);
    assert!(docs.windows(2).all(|w| w[1]["refreshes"].as_u64() > w[0]["refreshes"].as_u64()));
}

#[test]
fn ftvmm_status_of_a_real_ftdisk() {
    let dir = Scratch::new("metrics-status");
    let image = image(&dir, 1 << 20);
    let (_disk, disk_addr, metrics_addr) = spawn_ftdisk_with_metrics(&["--image", &image], "127.0.0.1:0");
    let mut client = DiskClient::connect(&disk_addr, Duration::from_secs(10)).expect("connect to ftdisk");
    assert!(matches!(client.test_and_set(0, "backup@b").expect("claim"), TasOutcome::Won { generation: 1 }));
    let shown = wait(ftvmm(&["status", &metrics_addr]).spawn().expect("spawn ftvmm"), Duration::from_secs(20));
    assert_eq!(shown.status, Some(0), "{}", shown.stderr);
    for line in [
        "program        ftdisk ",
        "role           disk\n",
        "disk           owned by backup@b (generation 1), 1.0 MiB image\n",
        "sessions       1 open, 1 kept, 1 since start\n",
        "connections    1\n",
        "test-and-sets  1 won, 0 lost\n",
    ] {
        assert!(shown.stdout.contains(line), "no {line:?} in\n{}", shown.stdout);
    }
}

/// The YAML block of docs/observability.md whose first line is `# NAME`.
fn doc_block(doc: &str, name: &str) -> String {
    let start = doc.find(&format!("```yaml\n# {name}\n")).unwrap_or_else(|| panic!("no {name} block in the doc"));
    let body = &doc[start + "```yaml\n".len()..];
    body[..body.find("```").expect("an unterminated block")].to_string()
}

/// The example scrape configuration and alert rules of
/// docs/observability.md are valid, and the not-protected alert fires
/// after 60 s without a protected side, not before.
#[test]
fn the_documented_prometheus_config_and_alerts_hold() {
    let promtool = ftvmm_tests::prometheus::prometheus_bin().with_file_name("promtool");
    assert!(
        promtool.is_file(),
        "promtool is missing beside prometheus: `.ci/run` installs the Debian package prometheus"
    );
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/observability.md"))
        .expect("read docs/observability.md");
    let dir = Scratch::new("metrics-promtool");
    std::fs::write(dir.path("prometheus.yml"), doc_block(&doc, "prometheus.yml")).expect("write");
    std::fs::write(dir.path("ftvmm-rules.yml"), doc_block(&doc, "ftvmm-rules.yml")).expect("write");
    std::fs::write(
        dir.path("test.yml"),
        r#"rule_files: [ftvmm-rules.yml]
evaluation_interval: 5s
tests:
  - interval: 5s
    input_series:
      # The primary is protected for 10 s, then not; the backup never is.
      - series: 'ftvmm_ft_state{state="protected",vm="kvstore",job="ftvmm",instance="10.0.0.1:9400"}'
        values: '1 1 0x30'
      - series: 'ftvmm_ft_state{state="protected",vm="kvstore",job="ftvmm",instance="10.0.0.2:9400"}'
        values: '0x32'
      - series: 'ftdisk_fenced_writes_total{job="ftdisk",instance="10.0.0.3:9400"}'
        values: '0 0 0 1 1 1'
    alert_rule_test:
      - eval_time: 60s
        alertname: FtvmmNotProtected
        exp_alerts: []
      - eval_time: 75s
        alertname: FtvmmNotProtected
        exp_alerts:
          - exp_labels: {severity: page, vm: kvstore}
            exp_annotations:
              summary: 'VM kvstore has run unprotected for more than 60 s'
              description: 'No VMM of the pair is protected: see `ftvmm status` on each of its hosts.'
      - eval_time: 20s
        alertname: FtdiskFencedWrites
        exp_alerts:
          - exp_labels: {severity: warn, job: ftdisk, instance: '10.0.0.3:9400'}
            exp_annotations:
              summary: 'ftdisk at 10.0.0.3:9400 refused writes from a VMM that no longer owns the disk'
"#,
    )
    .expect("write");
    for args in [&["check", "config", "prometheus.yml"][..], &["test", "rules", "test.yml"]] {
        let out = std::process::Command::new(&promtool).args(args).current_dir(&dir.0).output().expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
