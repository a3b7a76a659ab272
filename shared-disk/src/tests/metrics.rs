//! The server's metrics: what each kind of request counts, the Prometheus
//! exposition and the /status document.

use super::*;
use crate::metrics::{DiskCollector, REQUEST_KINDS};
use telemetry::prometheus_client::registry::Registry;

fn kind(name: &str) -> usize {
    REQUEST_KINDS.iter().position(|k| *k == name).unwrap()
}

#[test]
fn counts_requests_fencing_test_and_sets_and_sessions() {
    let dir = TempDir::new("metrics");
    let image = dir.image(1 << 20);
    let server = start(&image);
    let metrics = server.metrics();
    let mut c = client(&server);
    c.write(0, &block(1), 0).unwrap();
    c.write(512, &block(2), 0).unwrap();
    c.flush(0).unwrap();
    assert_eq!(c.read(0, 1024).unwrap().len(), 1024);
    assert!(matches!(c.test_and_set(0, "backup@b").unwrap(), TasOutcome::Won { generation: 1 }));
    let mut other = client(&server);
    assert!(matches!(other.test_and_set(0, "primary@a").unwrap(), TasOutcome::Lost { generation: 1, .. }));
    // The loser is fenced.
    assert_disk_error(other.write(0, &block(3), 0), DiskError::Fenced { yours: 0, current: 1 });
    assert_disk_error(other.flush(0), DiskError::Fenced { yours: 0, current: 1 });

    let s = metrics.snapshot();
    assert_eq!(s.requests[kind("write")], 3);
    assert_eq!(s.requests[kind("flush")], 2);
    assert_eq!(s.requests[kind("read")], 1);
    assert_eq!(s.requests[kind("test_and_set")], 2);
    assert_eq!(s.errors[kind("write")], 1);
    assert_eq!(s.errors[kind("flush")], 1);
    assert_eq!((s.fenced_writes, s.fenced_flushes), (1, 1));
    assert_eq!((s.test_and_sets_won, s.test_and_sets_lost), (1, 1));
    assert_eq!((s.bytes_written, s.bytes_read), (1024, 1024));
    assert_eq!((s.generation, s.owner.as_str()), (1, "backup@b"));
    assert_eq!((s.sessions_open, s.sessions_kept, s.sessions_total), (2, 2, 2));
    assert_eq!((s.connections, s.connections_total), (2, 2));
    assert_eq!(s.size, 1 << 20);

    let mut registry = Registry::default();
    registry.register_collector(Box::new(DiskCollector(metrics.clone())));
    let mut text = String::new();
    telemetry::prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "ftdisk_requests_total{kind=\"write\"} 3\n",
        "ftdisk_requests_total{kind=\"info\"} ",
        "ftdisk_fenced_writes_total 1\n",
        "ftdisk_test_and_set_total{result=\"won\"} 1\n",
        "ftdisk_test_and_set_total{result=\"lost\"} 1\n",
        "ftdisk_written_bytes_total 1024\n",
        "ftdisk_sessions_open 2\n",
        "ftdisk_sessions_total 2\n",
        "ftdisk_connections_open 2\n",
        "ftdisk_owner_generation 1\n",
        "ftdisk_image_size_bytes 1048576\n",
        "# TYPE ftdisk_read_bytes counter\n",
        "# UNIT ftdisk_read_bytes bytes\n",
    ] {
        assert!(text.contains(line), "no {line:?} in\n{text}");
    }
    assert!(text.ends_with("# EOF\n"));

    let status = metrics.status_json();
    assert_eq!(status["program"], "ftdisk");
    assert_eq!(status["role"], "disk");
    assert_eq!(status["disk"]["owner"], "backup@b");
    assert_eq!(status["disk"]["generation"], 1);
    assert_eq!(status["sessions"]["open"], 2);
    assert_eq!(status["test_and_sets"]["won"], 1);
    assert_eq!(status["requests"]["fenced_writes"], 1);

    // Connections that close are no longer open; their sessions are kept.
    drop(c);
    drop(other);
    wait_until(|| metrics.snapshot().connections == 0);
    let s = metrics.snapshot();
    assert_eq!((s.sessions_open, s.sessions_kept), (0, 2));
    // The counters outlive the server.
    server.stop();
    assert_eq!(metrics.snapshot().requests[kind("write")], 3);
}

#[test]
fn an_arbiter_counts_and_says_what_it_is() {
    let dir = TempDir::new("metrics-arbiter");
    logs();
    let server = Server::start_arbiter(&dir.0.join("state"), TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let metrics = server.metrics();
    let mut a = Arbiter::connect(&server.local_addr().to_string(), TIMEOUT).unwrap();
    assert!(matches!(a.test_and_set(0, "primary@a").unwrap(), TasOutcome::Won { generation: 1 }));
    let status = metrics.status_json();
    assert_eq!(status["role"], "arbiter");
    assert_eq!(status["disk"]["size_bytes"], 0);
    assert_eq!(metrics.snapshot().test_and_sets_won, 1);
    let text = telemetry::render_status(&status);
    assert!(text.contains("owned by primary@a (generation 1), arbiter only, no image"), "{text}");
}
