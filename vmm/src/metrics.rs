//! What a running VMM counts for its operators: the Prometheus metrics the
//! run loop, the FT role and the host pieces update as they go (exits by
//! kind, the FT state, failovers and joins, the output-commit latency, the
//! backup's lag, ...), and probes — values read from their owners at each
//! scrape (the logging channel's counters, the TAP's drops, the disk's
//! pending writes). A leaf: everything that counts imports it, it imports
//! none of them. Served by [`crate::watch`] (`--metrics ADDR`).
//!
//! Updating a metric is an atomic operation; nothing here grows with the
//! run (no per-output series, labels from fixed lists).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use telemetry::prometheus_client::collector::Collector;
use telemetry::prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use telemetry::prometheus_client::metrics::counter::Counter;
use telemetry::prometheus_client::metrics::family::Family;
use telemetry::prometheus_client::metrics::gauge::Gauge;
use telemetry::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use telemetry::prometheus_client::metrics::MetricType;
use telemetry::prometheus_client::registry::{Registry, Unit};
use telemetry::{LatencyWindow, RateWindow, StateSet, WindowSummary};

/// What a guest-caused exit was, for counting (in [`ExitClass::ALL`]'s
/// order: the discriminant indexes the counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// A port access of no kind below.
    Port,
    /// The UART (COM1): a byte in or out, or its status.
    Serial,
    /// The PIC: an end of interrupt, a mask.
    Pic,
    /// Programming the PIT (a write to its ports).
    Timer,
    /// A read of the time: the TSC port (a rewritten RDTSC), the PIT's
    /// counter or the RTC.
    ClockRead,
    Mmio,
    /// HLT, or a write to the idle port: the guest idles.
    Idle,
    Msr,
    InterruptWindow,
    /// A state sync of a compute-bound stretch.
    Sync,
}

impl ExitClass {
    pub const ALL: [ExitClass; 10] = [
        ExitClass::Port,
        ExitClass::Serial,
        ExitClass::Pic,
        ExitClass::Timer,
        ExitClass::ClockRead,
        ExitClass::Mmio,
        ExitClass::Idle,
        ExitClass::Msr,
        ExitClass::InterruptWindow,
        ExitClass::Sync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitClass::Port => "port",
            ExitClass::Serial => "serial",
            ExitClass::Pic => "pic",
            ExitClass::Timer => "timer",
            ExitClass::ClockRead => "clock_read",
            ExitClass::Mmio => "mmio",
            ExitClass::Idle => "idle",
            ExitClass::Msr => "msr",
            ExitClass::InterruptWindow => "interrupt_window",
            ExitClass::Sync => "sync",
        }
    }
}

/// The labels of a commit-latency hop figure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HopLabels {
    pub hop: &'static str,
    pub quantile: &'static str,
}

/// The labels of a by-kind figure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// A value read from its owner at each scrape.
struct Probe {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    counter: bool,
    label: Option<(&'static str, &'static str)>,
    read: Box<dyn Fn() -> f64 + Send + Sync>,
}

/// The probes, as a collector.
#[derive(Clone, Default)]
struct Probes(Arc<Mutex<Vec<Probe>>>);

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probes")
    }
}

impl Collector for Probes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let probes = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // One descriptor per name, then its series (probes of a name are
        // added together, labelled alike).
        let mut i = 0;
        while i < probes.len() {
            let first = &probes[i];
            let kind = if first.counter { MetricType::Counter } else { MetricType::Gauge };
            let mut metric = encoder.encode_descriptor(first.name, first.help, first.unit.as_ref(), kind)?;
            while i < probes.len() && probes[i].name == first.name {
                let p = &probes[i];
                let value = (p.read)();
                match p.label {
                    Some((key, val)) => {
                        let labels = [(key, val)];
                        let mut series = metric.encode_family(&labels)?;
                        if p.counter {
                            series.encode_counter::<NoLabelSet, _, u64>(&(value as u64), None)?;
                        } else {
                            series.encode_gauge(&value)?;
                        }
                    }
                    None if p.counter => metric.encode_counter::<NoLabelSet, _, u64>(&(value as u64), None)?,
                    None => metric.encode_gauge(&value)?,
                }
                i += 1;
            }
        }
        Ok(())
    }
}

/// A VMM's metrics (see the module doc and `docs/observability.md`).
pub struct VmMetrics {
    exits: Family<KindLabel, Counter>,
    exit_counters: [Counter; 10],
    /// The FT state and its reason (a gauge per value, 1 for the current).
    pub ft_state: Arc<StateSet>,
    pub ft_reason: Arc<StateSet>,
    /// When the VM entered its FT state (Unix time, seconds).
    pub ft_state_since: Gauge<f64, AtomicU64>,
    /// Whether the VM survives its host's death now (1) or not (0).
    pub protected: Gauge,
    pub failovers: Counter,
    pub joins: Counter,
    pub resyncs: Counter,
    pub divergences: Counter,
    pub backups_lost: Counter,
    pub digest_checks: Counter,
    pub syncs: Counter,
    pub sync_bytes: Counter,
    pub sync_seconds: Counter<f64, AtomicU64>,
    /// How long each output waited for the backup's acknowledgement.
    pub commit_latency: Histogram,
    commit_window: Mutex<LatencyWindow>,
    /// The backup's lag behind the primary (the primary's view).
    pub lag_exits: Gauge,
    pub lag_seconds: Gauge<f64, AtomicU64>,
    /// Outputs held for the backup's acknowledgement now, and their bytes.
    pub held_outputs: Gauge,
    pub held_output_bytes: Gauge,
    /// The output-commit latency hop by hop (p50 and p99, whole run).
    pub commit_hop_seconds: Family<HopLabels, Gauge<f64, AtomicU64>>,
    probes: Probes,
    started: Instant,
    rates: Mutex<(RateWindow, RateWindow)>,
}

impl std::fmt::Debug for VmMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VmMetrics")
    }
}

/// The histogram buckets of the output-commit latency: 10 µs to ~10 s.
fn commit_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(10e-6, 2.0, 21)
}

impl VmMetrics {
    /// The metrics, registered in a new registry, with the FT states and
    /// reasons they may take.
    pub fn new(states: &'static [&'static str], reasons: &'static [&'static str]) -> (Arc<VmMetrics>, Registry) {
        let m = VmMetrics {
            exits: Family::default(),
            exit_counters: Default::default(),
            ft_state: Arc::new(StateSet::new("ftvmm_ft_state", "The FT state (1 for the current one).", states)),
            ft_reason: Arc::new(StateSet::labelled(
                "ftvmm_ft_state_reason",
                "Why the VM is in its FT state (1 for the current reason).",
                "reason",
                reasons,
            )),
            ft_state_since: Gauge::default(),
            protected: Gauge::default(),
            failovers: Counter::default(),
            joins: Counter::default(),
            resyncs: Counter::default(),
            divergences: Counter::default(),
            backups_lost: Counter::default(),
            digest_checks: Counter::default(),
            syncs: Counter::default(),
            sync_bytes: Counter::default(),
            sync_seconds: Counter::default(),
            commit_latency: Histogram::new(commit_buckets()),
            commit_window: Mutex::new(LatencyWindow::last_minute()),
            lag_exits: Gauge::default(),
            lag_seconds: Gauge::default(),
            held_outputs: Gauge::default(),
            held_output_bytes: Gauge::default(),
            commit_hop_seconds: Family::default(),
            probes: Probes::default(),
            started: Instant::now(),
            rates: Mutex::new((RateWindow::new(Duration::from_secs(10)), RateWindow::new(Duration::from_secs(10)))),
        };
        let exit_counters = ExitClass::ALL.map(|c| m.exits.get_or_create(&KindLabel { kind: c.name() }).clone());
        let m = VmMetrics { exit_counters, ..m };
        let mut r = Registry::default();
        r.register("ftvmm_guest_exits", "Guest-caused exits, by kind.", m.exits.clone());
        r.register_collector(Box::new(m.ft_state.clone()));
        r.register_collector(Box::new(m.ft_reason.clone()));
        r.register_with_unit(
            "ftvmm_ft_state_since",
            "When the VM entered its FT state (Unix time).",
            Unit::Seconds,
            m.ft_state_since.clone(),
        );
        r.register(
            "ftvmm_protected",
            "1 while the VM survives its host's death (protected, or a backup in lockstep).",
            m.protected.clone(),
        );
        r.register("ftvmm_failovers", "Times this VMM, a backup, went live.", m.failovers.clone());
        r.register("ftvmm_joins", "Backups that joined the running VM by state transfer.", m.joins.clone());
        r.register("ftvmm_resyncs", "Resynchronizations of a diverged backup, completed.", m.resyncs.clone());
        r.register(
            "ftvmm_divergences",
            "Divergences found (backup) or reported to it (primary).",
            m.divergences.clone(),
        );
        r.register("ftvmm_backups_lost", "Backups the primary lost.", m.backups_lost.clone());
        r.register("ftvmm_digest_checks", "State digest checks logged or verified.", m.digest_checks.clone());
        r.register("ftvmm_state_syncs", "State syncs taken (primary) or applied (backup).", m.syncs.clone());
        r.register_with_unit(
            "ftvmm_state_sync",
            "Page data carried by state syncs.",
            Unit::Bytes,
            m.sync_bytes.clone(),
        );
        r.register_with_unit("ftvmm_state_sync", "Time spent in state syncs.", Unit::Seconds, m.sync_seconds.clone());
        r.register_with_unit(
            "ftvmm_output_commit",
            "How long outputs waited for the backup's acknowledgement.",
            Unit::Seconds,
            m.commit_latency.clone(),
        );
        r.register(
            "ftvmm_backup_lag_exits",
            "Guest exits the backup has not acknowledged (primary).",
            m.lag_exits.clone(),
        );
        r.register_with_unit(
            "ftvmm_backup_lag",
            "How long ago the primary passed the exit its backup last acknowledged.",
            Unit::Seconds,
            m.lag_seconds.clone(),
        );
        r.register("ftvmm_held_outputs", "Outputs held for the backup's acknowledgement now.", m.held_outputs.clone());
        r.register_with_unit(
            "ftvmm_held_output",
            "Bytes of the outputs held now.",
            Unit::Bytes,
            m.held_output_bytes.clone(),
        );
        r.register_with_unit(
            "ftvmm_output_commit_hop",
            "Output-commit latency hop by hop over the run (quantile 0.5 and 0.99).",
            Unit::Seconds,
            m.commit_hop_seconds.clone(),
        );
        r.register_collector(Box::new(m.probes.clone()));
        (Arc::new(m), r)
    }

    /// Counts one guest-caused exit.
    pub fn exit(&self, class: ExitClass) {
        self.exit_counters[class as usize].inc();
    }

    /// Guest-caused exits so far, by kind.
    pub fn exits_by_kind(&self) -> Vec<(&'static str, u64)> {
        ExitClass::ALL.iter().zip(&self.exit_counters).map(|(c, n)| (c.name(), n.get())).collect()
    }

    /// Guest-caused exits so far, all kinds.
    pub fn exits_total(&self) -> u64 {
        self.exit_counters.iter().map(Counter::get).sum()
    }

    /// One output released after waiting `latency` for the backup.
    pub fn committed(&self, latency: Duration) {
        self.commit_latency.observe(latency.as_secs_f64());
        self.commit_window.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(latency);
    }

    /// The output-commit latency over the last minute.
    pub fn commit_last_minute(&self) -> WindowSummary {
        self.commit_window.lock().unwrap_or_else(std::sync::PoisonError::into_inner).summary()
    }

    /// Observes the totals for the recent rates (`log_bytes`: sent and
    /// received): called every so often by the vCPU thread.
    pub fn observe_rates(&self, log_bytes: u64) {
        let mut r = self.rates.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        r.0.observe(self.exits_total());
        r.1.observe(log_bytes);
    }

    /// Recent rates: (exits per second, log bytes per second).
    pub fn rates(&self) -> (Option<f64>, Option<f64>) {
        let r = self.rates.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (r.0.per_second(), r.1.per_second())
    }

    /// Seconds since the VMM started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Adds a value read from its owner at each scrape: a counter (`counter`)
    /// or a gauge named `name`, with one label if given.
    pub fn probe(
        &self,
        name: &'static str,
        help: &'static str,
        unit: Option<Unit>,
        counter: bool,
        label: Option<(&'static str, &'static str)>,
        read: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        let mut probes = self.probes.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let probe = Probe { name, help, unit, counter, label, read: Box::new(read) };
        // Probes of one name stay together (one descriptor).
        match probes.iter().rposition(|p| p.name == name) {
            Some(at) => probes.insert(at + 1, probe),
            None => probes.push(probe),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_exit_class_counts_under_its_own_kind() {
        for (i, class) in ExitClass::ALL.iter().enumerate() {
            assert_eq!(*class as usize, i, "{class:?} out of ALL's order");
        }
        let (m, _) = VmMetrics::new(&["s"], &["r"]);
        m.exit(ExitClass::Mmio);
        m.exit(ExitClass::Mmio);
        m.exit(ExitClass::Sync);
        let counted: Vec<_> = m.exits_by_kind().into_iter().filter(|(_, n)| *n > 0).collect();
        assert_eq!(counted, vec![("mmio", 2), ("sync", 1)]);
        assert_eq!(m.exits_total(), 3);
    }
}
