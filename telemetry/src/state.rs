//! [`StateSet`]: a value from a fixed list of states (an FT role's state,
//! say), exposed to Prometheus as one gauge per state, 1 for the current
//! one and 0 for the others, e.g.
//!
//! ```text
//! ftvmm_ft_state{state="protected"} 1
//! ftvmm_ft_state{state="unprotected"} 0
//! ```
//!
//! which alerts use as `ftvmm_ft_state{state="protected"} == 0`. The states
//! are fixed when it is made, so the series are too; setting it is one
//! atomic store. (OpenMetrics has a `stateset` type, which
//! `prometheus_client` does not encode yet; a gauge per state is what
//! Prometheus stores for one anyway.)

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One of a fixed list of states; register it with
/// `Registry::register_collector(Box::new(state_set.clone()))` (an
/// `Arc<StateSet>` is a collector) and keep a clone to [`StateSet::set`].
///
/// ```
/// use std::sync::Arc;
/// use telemetry::StateSet;
/// use telemetry::prometheus_client::registry::Registry;
///
/// let state = Arc::new(StateSet::new("ftvmm_ft_state", "The FT state.", &["protected", "unprotected"]));
/// let mut registry = Registry::default();
/// registry.register_collector(Box::new(state.clone()));
/// assert!(state.set("unprotected"));
/// assert!(!state.set("no such state"));
/// assert_eq!(state.get(), "unprotected");
/// ```
#[derive(Debug)]
pub struct StateSet {
    name: &'static str,
    help: &'static str,
    /// The label that names the state (`state`, unless [`StateSet::labelled`]).
    label: &'static str,
    states: &'static [&'static str],
    current: AtomicUsize,
}

impl StateSet {
    /// A state set named `name` (e.g. `ftvmm_ft_state`) over `states`,
    /// in the first of them (panics if `states` is empty: a programming
    /// error).
    pub fn new(name: &'static str, help: &'static str, states: &'static [&'static str]) -> Self {
        StateSet::labelled(name, help, "state", states)
    }

    /// The same, its label named `label` (e.g. `reason`).
    pub fn labelled(
        name: &'static str,
        help: &'static str,
        label: &'static str,
        states: &'static [&'static str],
    ) -> Self {
        assert!(!states.is_empty(), "a state set needs at least one state");
        StateSet { name, help, label, states, current: AtomicUsize::new(0) }
    }

    /// Makes `state` the current one; false (and no change) if it is not
    /// one of the states.
    pub fn set(&self, state: &str) -> bool {
        match self.states.iter().position(|s| *s == state) {
            Some(i) => {
                self.current.store(i, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// The current state.
    pub fn get(&self) -> &'static str {
        self.states[self.current.load(Ordering::Relaxed).min(self.states.len() - 1)]
    }

    /// The states, in order.
    pub fn states(&self) -> &'static [&'static str] {
        self.states
    }
}

impl Collector for StateSet {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let current = self.get();
        let mut metric = encoder.encode_descriptor(self.name, self.help, None, MetricType::Gauge)?;
        for state in self.states {
            let labels = [(self.label, *state)];
            metric.encode_family(&labels)?.encode_gauge(&i64::from(*state == current))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use std::sync::Arc;

    #[test]
    fn one_series_per_state_and_one_of_them_set() {
        let state = Arc::new(StateSet::new("demo_state", "A demo.", &["a", "b", "c"]));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(state.clone()));
        assert_eq!(state.get(), "a");
        assert!(state.set("c"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert_eq!(
            text,
            "# HELP demo_state A demo.\n# TYPE demo_state gauge\ndemo_state{state=\"a\"} 0\n\
             demo_state{state=\"b\"} 0\ndemo_state{state=\"c\"} 1\n# EOF\n"
        );
        assert!(!state.set("d"));
        assert_eq!(state.get(), "c");
        assert_eq!(state.states(), ["a", "b", "c"]);
    }
}
