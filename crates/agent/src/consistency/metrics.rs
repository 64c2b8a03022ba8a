//! Counters and histograms of the consistency methods since the agent
//! started, in `prometheus-client` types; `/metrics` adds them to its
//! registry with [`Metrics::register`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use soda_syncer_domain::consistency::Method;
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds of the histogram buckets, in seconds.
const BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

type Histograms = Family<MethodLabel, Histogram, fn() -> Histogram>;

struct Inner {
    freeze: Histograms,
    snapshot: Histograms,
    runs: Family<MethodLabel, Counter>,
    live_fallbacks: Counter,
    freeze_expired: Counter,
    drop_thaws: Counter,
    recovered: Counter,
}

/// The consistency methods' counters and histograms of one agent: made by
/// the run engine, passed to what observes (see [`super::Deps`]), added to
/// `/metrics` by [`Metrics::register`]. Clones share the values.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Metrics {
        let m = Inner {
            freeze: Family::new_with_constructor(histogram as fn() -> Histogram),
            snapshot: Family::new_with_constructor(histogram as fn() -> Histogram),
            runs: Family::default(),
            live_fallbacks: Counter::default(),
            freeze_expired: Counter::default(),
            drop_thaws: Counter::default(),
            recovered: Counter::default(),
        };
        // Every method's series exist from the start, at 0.
        for method in Method::ALL {
            let label = MethodLabel { method: method.as_str() };
            let _ = m.runs.get_or_create(&label);
            if method.freezes() {
                let _ = m.freeze.get_or_create(&label);
            }
            if method != Method::None {
                let _ = m.snapshot.get_or_create(&label);
            }
        }
        Metrics(Arc::new(m))
    }
}

impl Metrics {
    /// A backup was made consistent (or not) with `method`.
    pub fn observe(&self, method: Method, freeze: Duration, snapshot: Duration) {
        let label = MethodLabel { method: method.as_str() };
        self.0.runs.get_or_create(&label).inc();
        if method.freezes() {
            self.0.freeze.get_or_create(&label).observe(freeze.as_secs_f64());
        }
        if method != Method::None {
            self.0.snapshot.get_or_create(&label).observe(snapshot.as_secs_f64());
        }
    }

    /// `auto` found no method and backed the volume up live.
    pub fn live_fallback(&self) {
        self.0.live_fallbacks.inc();
    }

    pub fn freeze_expired(&self) {
        self.0.freeze_expired.inc();
    }

    pub fn drop_thaw(&self) {
        self.0.drop_thaws.inc();
    }

    pub fn recovered(&self, n: u64) {
        self.0.recovered.inc_by(n);
    }

    /// Add the consistency metrics to `reg` (shared handles: the registry
    /// sees the values as they change).
    pub fn register(&self, reg: &mut Registry) {
        let m = &*self.0;
        reg.register(
            "soda_syncer_consistency_runs",
            "Backups by the consistency method they used, since start",
            m.runs.clone(),
        );
        reg.register_with_unit(
            "soda_syncer_consistency_freeze",
            "How long writers were blocked by a freeze, per backup, by method",
            Unit::Seconds,
            m.freeze.clone(),
        );
        reg.register_with_unit(
            "soda_syncer_consistency_snapshot",
            "How long making the point-in-time view took, per backup, by method",
            Unit::Seconds,
            m.snapshot.clone(),
        );
        reg.register(
            "soda_syncer_consistency_live_fallbacks",
            "Backups of mode auto that found no point-in-time method and read the live volume",
            m.live_fallbacks.clone(),
        );
        reg.register(
            "soda_syncer_consistency_freeze_limit_thaws",
            "Freezes thawed because they reached maxFreezeMs",
            m.freeze_expired.clone(),
        );
        reg.register(
            "soda_syncer_consistency_fallback_thaws",
            "Freezes thawed by the guard's Drop fallback instead of an explicit release",
            m.drop_thaws.clone(),
        );
        reg.register(
            "soda_syncer_consistency_recovered",
            "Freezes, snapshots, clones and mounts a previous process left behind and the agent undid at start",
            m.recovered.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let mut reg = Registry::default();
        let fam: Histograms = Family::new_with_constructor(histogram as fn() -> Histogram);
        fam.get_or_create(&MethodLabel { method: "reflink" }).observe(0.03);
        fam.get_or_create(&MethodLabel { method: "reflink" }).observe(0.7);
        reg.register_with_unit("x", "help", Unit::Seconds, fam);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("x_seconds_bucket{le=\"0.025\",method=\"reflink\"} 0"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.05\",method=\"reflink\"} 1"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"1.0\",method=\"reflink\"} 2"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\",method=\"reflink\"} 2"), "{out}");
        assert!(out.contains("x_seconds_sum{method=\"reflink\"} 0.73"), "{out}");
        let mut all = Registry::default();
        Metrics::default().register(&mut all);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &all).unwrap();
        assert!(text.contains("# TYPE soda_syncer_consistency_freeze_seconds histogram"), "{text}");
        assert!(text.contains("soda_syncer_consistency_live_fallbacks_total "), "{text}");
    }
}
