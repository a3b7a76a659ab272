//! What an ftdisk server counts, for `ftdisk --metrics ADDR`: the counters
//! ([`DiskMetrics`], atomics bumped as requests are served, so counting
//! costs a few relaxed increments per request), their Prometheus exposition
//! ([`DiskCollector`], read at each scrape) and the server's `/status`
//! document ([`DiskMetrics::status_json`]).
//!
//! The gauges of open sessions and connections are `..._open`, not bare
//! `ftdisk_sessions`: in the OpenMetrics exposition the counter
//! `ftdisk_sessions_total` is the family `ftdisk_sessions`, and a gauge of
//! that name would be a second family with the same name.
//!
//! Every series has a fixed label set (the request kinds of the protocol,
//! won or lost): memory does not grow with the traffic. The names, by
//! Prometheus convention:
//!
//! | metric | type | meaning |
//! | --- | --- | --- |
//! | `ftdisk_requests_total{kind}` | counter | requests received, by kind: `read`, `write`, `flush`, `test_and_set`, `owner`, `info` (each retry counted) |
//! | `ftdisk_request_errors_total{kind}` | counter | requests answered with an error (fenced, out of range, stale, forbidden, I/O, ...) |
//! | `ftdisk_fenced_writes_total` | counter | writes refused because their generation is not the owner's (a VMM that lost the go-live race or was superseded) |
//! | `ftdisk_fenced_flushes_total` | counter | flushes refused likewise |
//! | `ftdisk_test_and_set_total{result}` | counter | test-and-sets executed, `won` or `lost` |
//! | `ftdisk_read_bytes_total`, `ftdisk_written_bytes_total` | counter | data read from and written to the image |
//! | `ftdisk_retries_answered_total` | counter | retried requests answered from the session's memory, not executed again |
//! | `ftdisk_stale_requests_total` | counter | requests refused because their session had moved past them |
//! | `ftdisk_sessions_open` | gauge | client sessions in use by an open connection |
//! | `ftdisk_sessions_kept` | gauge | sessions the server remembers (at most 1024) |
//! | `ftdisk_sessions_total` | counter | sessions created since the server started |
//! | `ftdisk_sessions_evicted_total` | counter | sessions forgotten because the table was full |
//! | `ftdisk_connections_open` | gauge | connections open |
//! | `ftdisk_connections_total` | counter | connections accepted |
//! | `ftdisk_connections_refused_total` | counter | connections refused at the connection limit |
//! | `ftdisk_owner_generation` | gauge | the arbitration record's generation (bumped by each won test-and-set) |
//! | `ftdisk_image_size_bytes` | gauge | the image's size; 0 for an arbiter-only server |
//! | `ftdisk_start_time_seconds` | gauge | when the server started, Unix time |
//! | `ftdisk_connection_panics_total` | counter | connection threads that panicked: a bug, should stay 0 |

use crate::proto::Op;
use crate::session::Sessions;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};
use telemetry::prometheus_client::collector::Collector;
use telemetry::prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use telemetry::prometheus_client::metrics::MetricType;
use telemetry::prometheus_client::registry::Unit;

/// The request kinds, as label values, in the order of [`kind_index`].
pub const REQUEST_KINDS: [&str; 6] = ["read", "write", "flush", "test_and_set", "owner", "info"];

/// The index of `op`'s kind in [`REQUEST_KINDS`].
pub(crate) fn kind_index(op: &Op) -> usize {
    match op {
        Op::Read { .. } => 0,
        Op::Write { .. } => 1,
        Op::Flush { .. } => 2,
        Op::TestAndSet { .. } => 3,
        Op::Owner => 4,
        Op::Info => 5,
    }
}

/// The counters of one server. Get them with
/// [`crate::Server::metrics`]; they outlive the server (they hold no file).
pub struct DiskMetrics {
    pub(crate) requests: [AtomicU64; REQUEST_KINDS.len()],
    pub(crate) errors: [AtomicU64; REQUEST_KINDS.len()],
    pub(crate) fenced_writes: AtomicU64,
    pub(crate) fenced_flushes: AtomicU64,
    pub(crate) tas_won: AtomicU64,
    pub(crate) tas_lost: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) retries_answered: AtomicU64,
    pub(crate) stale: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) panics: AtomicU64,
    sessions: Arc<Sessions>,
    /// A copy of the arbitration record (generation, owner), updated after
    /// each win; the record itself is the server's.
    record: Mutex<(u64, String)>,
    size: u64,
    started: SystemTime,
}

/// The counters' values at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiskSnapshot {
    /// Requests received, by kind (in the order of [`REQUEST_KINDS`]).
    pub requests: [u64; REQUEST_KINDS.len()],
    /// Requests answered with an error, by kind.
    pub errors: [u64; REQUEST_KINDS.len()],
    pub fenced_writes: u64,
    pub fenced_flushes: u64,
    pub test_and_sets_won: u64,
    pub test_and_sets_lost: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub retries_answered: u64,
    pub stale: u64,
    /// Sessions in use by an open connection.
    pub sessions_open: u64,
    pub sessions_kept: u64,
    pub sessions_total: u64,
    pub sessions_evicted: u64,
    pub connections: u64,
    pub connections_total: u64,
    pub connections_refused: u64,
    pub connection_panics: u64,
    pub generation: u64,
    /// The owner's name; empty at generation 0.
    pub owner: String,
    /// The image's size; 0 for an arbiter-only server.
    pub size: u64,
    /// When the server started, Unix time in seconds.
    pub started_unix: f64,
}

impl DiskMetrics {
    pub(crate) fn new(sessions: Arc<Sessions>, generation: u64, owner: String, size: u64) -> Self {
        DiskMetrics {
            requests: Default::default(),
            errors: Default::default(),
            fenced_writes: AtomicU64::new(0),
            fenced_flushes: AtomicU64::new(0),
            tas_won: AtomicU64::new(0),
            tas_lost: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            retries_answered: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            sessions,
            record: Mutex::new((generation, owner)),
            size,
            started: SystemTime::now(),
        }
    }

    /// Notes a won test-and-set.
    pub(crate) fn set_owner(&self, generation: u64, owner: String) {
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        // Wins are applied in order under the record's lock, but noted
        // after it: never go back.
        if generation > record.0 {
            *record = (generation, owner);
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> DiskSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (sessions_kept, sessions_evicted) = self.sessions.counts();
        let (generation, owner) = self.record.lock().unwrap_or_else(PoisonError::into_inner).clone();
        DiskSnapshot {
            requests: std::array::from_fn(|i| load(&self.requests[i])),
            errors: std::array::from_fn(|i| load(&self.errors[i])),
            fenced_writes: load(&self.fenced_writes),
            fenced_flushes: load(&self.fenced_flushes),
            test_and_sets_won: load(&self.tas_won),
            test_and_sets_lost: load(&self.tas_lost),
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
            retries_answered: load(&self.retries_answered),
            stale: load(&self.stale),
            sessions_open: self.sessions.in_use() as u64,
            sessions_kept: sessions_kept as u64,
            sessions_total: self.sessions.created(),
            sessions_evicted,
            connections: load(&self.connections),
            connections_total: load(&self.connections_total),
            connections_refused: load(&self.connections_refused),
            connection_panics: load(&self.panics),
            generation,
            owner,
            size: self.size,
            started_unix: unix(self.started),
        }
    }

    /// The `/status` document of `ftdisk` (see the `telemetry` crate doc).
    pub fn status_json(&self) -> serde_json::Value {
        let s = self.snapshot();
        let now = unix(SystemTime::now());
        serde_json::json!({
            "program": "ftdisk",
            "version": env!("CARGO_PKG_VERSION"),
            "now_unix": now,
            "uptime_seconds": (now - s.started_unix).max(0.0),
            "role": if s.size == 0 { "arbiter" } else { "disk" },
            "disk": { "owner": s.owner, "generation": s.generation, "size_bytes": s.size },
            "sessions": { "open": s.sessions_open, "kept": s.sessions_kept, "total": s.sessions_total },
            "connections": s.connections,
            "requests": { "total": s.requests.iter().sum::<u64>(), "fenced_writes": s.fenced_writes },
            "test_and_sets": { "won": s.test_and_sets_won, "lost": s.test_and_sets_lost },
        })
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The Prometheus collector of a server's [`DiskMetrics`]: register it
/// with `Registry::register_collector`; each scrape reads the counters.
pub struct DiskCollector(pub Arc<DiskMetrics>);

impl std::fmt::Debug for DiskCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskCollector")
    }
}

type Encoded = Result<(), std::fmt::Error>;

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, value: u64) -> Encoded {
    let mut metric = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    metric.encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn counters(enc: &mut DescriptorEncoder, name: &str, help: &str, label: &str, values: &[(&str, u64)]) -> Encoded {
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, *value)];
        metric.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(n, None)?;
    }
    Ok(())
}

fn gauge<V: telemetry::prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: V,
) -> Encoded {
    enc.encode_descriptor(name, help, unit, MetricType::Gauge)?.encode_gauge(&value)
}

impl Collector for DiskCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Encoded {
        let s = self.0.snapshot();
        let by_kind = |values: &[u64; REQUEST_KINDS.len()]| -> Vec<(&str, u64)> {
            REQUEST_KINDS.iter().copied().zip(values.iter().copied()).collect()
        };
        let e = &mut enc;
        counters(
            e,
            "ftdisk_requests",
            "Requests received, by kind (retries included).",
            "kind",
            &by_kind(&s.requests),
        )?;
        counters(e, "ftdisk_request_errors", "Requests answered with an error, by kind.", "kind", &by_kind(&s.errors))?;
        counter(
            e,
            "ftdisk_fenced_writes",
            "Writes refused: their generation is not the owner's.",
            None,
            s.fenced_writes,
        )?;
        counter(
            e,
            "ftdisk_fenced_flushes",
            "Flushes refused: their generation is not the owner's.",
            None,
            s.fenced_flushes,
        )?;
        counters(
            e,
            "ftdisk_test_and_set",
            "Test-and-sets executed, by result.",
            "result",
            &[("won", s.test_and_sets_won), ("lost", s.test_and_sets_lost)],
        )?;
        counter(e, "ftdisk_read", "Data read from the image.", Some(&Unit::Bytes), s.bytes_read)?;
        counter(e, "ftdisk_written", "Data written to the image.", Some(&Unit::Bytes), s.bytes_written)?;
        counter(
            e,
            "ftdisk_retries_answered",
            "Retried requests answered from their session's memory, not executed again.",
            None,
            s.retries_answered,
        )?;
        counter(e, "ftdisk_stale_requests", "Requests refused: their session had moved past them.", None, s.stale)?;
        gauge(e, "ftdisk_sessions_open", "Client sessions in use by an open connection.", None, s.sessions_open)?;
        gauge(e, "ftdisk_sessions_kept", "Client sessions the server remembers.", None, s.sessions_kept)?;
        counter(e, "ftdisk_sessions", "Client sessions created since the server started.", None, s.sessions_total)?;
        counter(
            e,
            "ftdisk_sessions_evicted",
            "Sessions forgotten because the table was full.",
            None,
            s.sessions_evicted,
        )?;
        gauge(e, "ftdisk_connections_open", "Connections open.", None, s.connections)?;
        counter(e, "ftdisk_connections", "Connections accepted.", None, s.connections_total)?;
        counter(
            e,
            "ftdisk_connections_refused",
            "Connections refused at the connection limit.",
            None,
            s.connections_refused,
        )?;
        counter(e, "ftdisk_connection_panics", "Connection threads that panicked (a bug).", None, s.connection_panics)?;
        gauge(e, "ftdisk_owner_generation", "The arbitration record's generation.", None, s.generation)?;
        gauge(e, "ftdisk_image_size", "The image's size (0: arbiter only).", Some(&Unit::Bytes), s.size)?;
        gauge(e, "ftdisk_start_time", "When the server started, Unix time.", Some(&Unit::Seconds), s.started_unix)
    }
}
