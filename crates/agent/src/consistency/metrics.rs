//! Counters and histograms of the consistency methods since the agent
//! started, rendered in Prometheus text for `/metrics` by [`render`].
//! Process-wide (like the runs they count): one agent per process.

use soda_syncer_domain::consistency::Method;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::LazyLock;
use std::time::Duration;

/// Upper bounds of the histogram buckets, in seconds.
const BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if s <= *le {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, method: &str) {
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{method=\"{method}\",le=\"{le}\"}} {}", self.buckets[i].load(Relaxed));
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{method=\"{method}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{method=\"{method}\"}} {}", self.sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{method=\"{method}\"}} {count}");
    }
}

#[derive(Default)]
struct Metrics {
    freeze: [Histogram; 6],
    snapshot: [Histogram; 6],
    runs: [AtomicU64; 6],
    live_fallbacks: AtomicU64,
    freeze_expired: AtomicU64,
    drop_thaws: AtomicU64,
    recovered: AtomicU64,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

fn idx(m: Method) -> usize {
    Method::ALL.iter().position(|x| *x == m).unwrap_or(0)
}

/// A backup was made consistent (or not) with `method`.
pub fn observe(method: Method, freeze: Duration, snapshot: Duration) {
    let i = idx(method);
    METRICS.runs[i].fetch_add(1, Relaxed);
    if method.freezes() {
        METRICS.freeze[i].observe(freeze);
    }
    if method != Method::None {
        METRICS.snapshot[i].observe(snapshot);
    }
}

/// `auto` found no method and backed the volume up live.
pub fn live_fallback() {
    METRICS.live_fallbacks.fetch_add(1, Relaxed);
}

pub fn freeze_expired() {
    METRICS.freeze_expired.fetch_add(1, Relaxed);
}

pub fn drop_thaw() {
    METRICS.drop_thaws.fetch_add(1, Relaxed);
}

pub fn recovered(n: u64) {
    METRICS.recovered.fetch_add(n, Relaxed);
}

/// The metrics in Prometheus text format 0.0.4, to append to `/metrics`.
pub fn render() -> String {
    let m = &*METRICS;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP soda_syncer_consistency_runs_total Backups by the consistency method they used, since start.\n# TYPE soda_syncer_consistency_runs_total counter");
    for method in Method::ALL {
        let _ = writeln!(
            out,
            "soda_syncer_consistency_runs_total{{method=\"{}\"}} {}",
            method.as_str(),
            m.runs[idx(method)].load(Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP soda_syncer_consistency_freeze_seconds How long writers were blocked by a freeze, per backup.\n# TYPE soda_syncer_consistency_freeze_seconds histogram");
    for method in Method::ALL.into_iter().filter(|m| m.freezes()) {
        m.freeze[idx(method)].render(&mut out, "soda_syncer_consistency_freeze_seconds", method.as_str());
    }
    let _ = writeln!(out, "# HELP soda_syncer_consistency_snapshot_seconds How long making the point-in-time view took, per backup.\n# TYPE soda_syncer_consistency_snapshot_seconds histogram");
    for method in Method::ALL.into_iter().filter(|m| *m != Method::None) {
        m.snapshot[idx(method)].render(&mut out, "soda_syncer_consistency_snapshot_seconds", method.as_str());
    }
    let counters = [
        (
            "soda_syncer_consistency_live_fallbacks_total",
            "Backups of mode auto that found no point-in-time method and read the live volume.",
            &m.live_fallbacks,
        ),
        (
            "soda_syncer_consistency_freeze_limit_thaws_total",
            "Freezes thawed because they reached maxFreezeMs.",
            &m.freeze_expired,
        ),
        (
            "soda_syncer_consistency_fallback_thaws_total",
            "Freezes thawed by the guard's Drop fallback instead of an explicit release.",
            &m.drop_thaws,
        ),
        (
            "soda_syncer_consistency_recovered_total",
            "Freezes, snapshots, clones and mounts a previous process left behind and the agent undid at start.",
            &m.recovered,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_millis(700));
        let mut out = String::new();
        h.render(&mut out, "x", "reflink");
        assert!(out.contains("x_bucket{method=\"reflink\",le=\"0.025\"} 0"), "{out}");
        assert!(out.contains("x_bucket{method=\"reflink\",le=\"0.05\"} 1"), "{out}");
        assert!(out.contains("x_bucket{method=\"reflink\",le=\"1\"} 2"), "{out}");
        assert!(out.contains("x_bucket{method=\"reflink\",le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("x_sum{method=\"reflink\"} 0.73"), "{out}");
        let all = render();
        assert!(all.contains("# TYPE soda_syncer_consistency_freeze_seconds histogram"), "{all}");
        assert!(all.contains("soda_syncer_consistency_live_fallbacks_total "), "{all}");
    }
}
