//! Serving a running VM to its operators (`--metrics ADDR`): the
//! Prometheus registry with the probes that read the logging channel's,
//! the TAP's and the disk's counters at each scrape, and the `/status`
//! document (the FT state, its reason and since when, the peer, the
//! backup's lag, the log bandwidth, the commit latency of the last minute,
//! exits per second, the last failover) that `ftvmm status` shows. The
//! server is the `telemetry` crate's.

use crate::ft::FtStatus;
use crate::host::disk::{DiskCounters, PendingOps};
use crate::host::tap::{TapRx, TapTx};
use crate::metrics::VmMetrics;
use logging_channel::ChannelCounters;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;
use telemetry::prometheus_client::registry::{Registry, Unit};
use telemetry::{MetricsServer, TelemetryError};

/// What the probes read, besides the metrics themselves.
pub struct Watched {
    pub status: Arc<FtStatus>,
    pub channel: Arc<ChannelCounters>,
    pub nic: Option<(Arc<TapRx>, TapTx)>,
    pub disk: Option<(Arc<DiskCounters>, PendingOps)>,
}

fn read(counter: &AtomicU64) -> f64 {
    counter.load(Ordering::Relaxed) as f64
}

/// Adds the probes of `watched` to `metrics`.
fn add_probes(metrics: &VmMetrics, watched: &Watched) {
    let c = &watched.channel;
    type Field = fn(&ChannelCounters) -> &AtomicU64;
    let counters: [(&'static str, &'static str, Option<Unit>, Field); 8] = [
        ("ftvmm_log_records_sent", "Log records sent to the backup.", None, |c| &c.records_sent),
        ("ftvmm_log_sent", "Log bytes sent to the backup (batches on the wire).", Some(Unit::Bytes), |c| {
            &c.log_bytes_sent
        }),
        ("ftvmm_log_records_received", "Log records received from the primary.", None, |c| &c.records_received),
        ("ftvmm_log_received", "Log bytes received from the primary.", Some(Unit::Bytes), |c| &c.log_bytes_received),
        ("ftvmm_state_transfer_sent", "State bytes sent to joining or resyncing backups.", Some(Unit::Bytes), |c| {
            &c.state_bytes_sent
        }),
        ("ftvmm_state_transfer_received", "State bytes received from the primary.", Some(Unit::Bytes), |c| {
            &c.state_bytes_received
        }),
        (
            "ftvmm_backups_refused",
            "Would-be backups refused (a failed handshake: a stranger, another VM's).",
            None,
            |c| &c.peers_refused,
        ),
        ("ftvmm_heartbeats_missed", "Heartbeat intervals the peer let pass in silence (beyond one).", None, |c| {
            &c.heartbeats_missed
        }),
    ];
    for (name, help, unit, field) in counters {
        let c = c.clone();
        metrics.probe(name, help, unit, true, None, move || read(field(&c)));
    }
    metrics.probe(
        "ftvmm_console_dropped",
        "Console output dropped: produced while no client came for it, beyond what is kept (4 MiB).",
        Some(Unit::Bytes),
        true,
        None,
        || crate::host::console::output_dropped_bytes() as f64,
    );
    if let Some((rx, tx)) = &watched.nic {
        let help = "Frames the TAP dropped, by where and why.";
        let (rx1, rx2, tx1, tx2) = (rx.clone(), rx.clone(), tx.clone(), tx.clone());
        let name = "ftvmm_tap_dropped_frames";
        metrics.probe(name, help, None, true, Some(("reason", "rx_queue_full")), move || rx1.dropped().0 as f64);
        metrics.probe(name, help, None, true, Some(("reason", "rx_bad_size")), move || rx2.dropped().1 as f64);
        metrics.probe(name, help, None, true, Some(("reason", "tx_queue_full")), move || tx1.dropped().0 as f64);
        metrics.probe(name, help, None, true, Some(("reason", "tx_link_down")), move || tx2.dropped().1 as f64);
    }
    if let Some((disk, pending)) = &watched.disk {
        type Field = fn(&DiskCounters) -> &AtomicU64;
        let ops = "Disk operations done on the storage, by kind.";
        let bytes = "Disk data moved to or from the storage, by kind.";
        let series: [(&'static str, &'static str, Option<Unit>, &'static str, Field); 5] = [
            ("ftvmm_disk_ops", ops, None, "read", |d| &d.reads),
            ("ftvmm_disk_ops", ops, None, "write", |d| &d.writes),
            ("ftvmm_disk_ops", ops, None, "flush", |d| &d.flushes),
            ("ftvmm_disk", bytes, Some(Unit::Bytes), "read", |d| &d.read_bytes),
            ("ftvmm_disk", bytes, Some(Unit::Bytes), "write", |d| &d.written_bytes),
        ];
        for (name, help, unit, op, field) in series {
            let disk = disk.clone();
            metrics.probe(name, help, unit, true, Some(("op", op)), move || read(field(&disk)));
        }
        let pending = PendingOps::clone(pending);
        metrics.probe(
            "ftvmm_disk_pending_writes",
            "Disk writes not yet applied to the storage (held for the backup, or queued).",
            Some(Unit::Bytes),
            false,
            None,
            move || pending.bytes() as f64,
        );
    }
}

/// The `/status` document now.
fn status_document(metrics: &VmMetrics, watched: &Watched) -> serde_json::Value {
    let c = watched.status.current();
    let unix = |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let (exits_per_second, log_bytes_per_second) = metrics.rates();
    let commit = metrics.commit_last_minute();
    json!({
        "program": "ftvmm",
        "version": env!("CARGO_PKG_VERSION"),
        "now_unix": unix(std::time::SystemTime::now()),
        "uptime_seconds": metrics.uptime().as_secs_f64(),
        "role": c.role,
        "state": c.state.name(),
        "reason": c.reason.name(),
        "detail": c.detail,
        "since_unix": unix(c.since),
        "peer": c.peer,
        "lag": { "exits": metrics.lag_exits.get(), "seconds": metrics.lag_seconds.get() },
        "log_bytes_per_second": log_bytes_per_second,
        "commit_latency": if commit.count > 0 { commit.to_json() } else { serde_json::Value::Null },
        "exits_per_second": exits_per_second,
        "guest_exits": metrics.exits_total(),
        "failovers": metrics.failovers.get(),
        "last_failover": c.last_failover.map(|(at, why)| json!({ "unix": unix(at), "reason": why })),
    })
}

/// Serves `metrics` (registered in `registry`) and the status on `addr`,
/// from threads under the metrics server's seccomp filter.
pub fn serve(
    addr: &str,
    metrics: Arc<VmMetrics>,
    registry: Registry,
    watched: Watched,
) -> Result<MetricsServer, TelemetryError> {
    add_probes(&metrics, &watched);
    let status = move || status_document(&metrics, &watched);
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| TelemetryError::Bind { addr: addr.to_string(), source })?;
    let confine = crate::seccomp::hook(crate::seccomp::ThreadKind::Metrics);
    MetricsServer::start_hooked(listener, Arc::new(registry), Arc::new(status), Some(confine))
}
