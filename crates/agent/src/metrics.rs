//! The run metrics the scheduler updates as runs end ([`RunMetrics`], in
//! `prometheus-client` types) and when a policy's next successful backup is
//! due ([`backup_deadline`]). `GET /metrics` (in `http`) registers them
//! beside the consistency metrics, the HTTP metrics and the per-policy
//! gauges it reads from the store at each scrape. Labels are policy ids and
//! names, kinds, states and error codes from fixed lists: never a secret,
//! never a repository URL.

use chrono::{DateTime, Duration, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use soda_syncer_domain::schedule::Schedule;
use soda_syncer_domain::{RunKind, RunState};

use crate::store::{PolicyRecord, RunRecord};

/// Error codes of failed runs: the label values of
/// `soda_syncer_run_errors_total`. Anything else counts as `other`, so the
/// label set stays bounded whatever an error says.
pub const ERROR_CODES: [&str; 37] = [
    "drill_mismatch",
    "restic_missing",
    "restic_spawn_failed",
    "wrong_password",
    "repository_not_found",
    "repository_access_denied",
    "repository_locked",
    "repository_unreachable",
    "source_missing",
    "disk_full",
    "cancelled",
    "timed_out",
    "restic_failed",
    "retention_failed",
    "source_not_allowed",
    "unsupported",
    "agent_stopped",
    "secrets_unavailable",
    "snapshot_not_found",
    "repository_damaged",
    "restore_target_failed",
    "target_not_allowed",
    "target_not_empty",
    "restic_too_old",
    "invalid_request",
    "consistency_needs_root",
    "consistency_unavailable",
    "database_error",
    "freeze_failed",
    "freeze_refused",
    "hook_not_allowed",
    "max_freeze_exceeded",
    "post_hook_failed",
    "pre_hook_failed",
    "snapshot_failed",
    "source_inspect_failed",
    "thaw_failed",
];

/// The label value for an error code: itself if known, else `other`.
pub fn error_code_label(code: &str) -> &'static str {
    ERROR_CODES.into_iter().find(|k| *k == code).unwrap_or("other")
}

const RUN_KINDS: [RunKind; 6] =
    [RunKind::Backup, RunKind::Restore, RunKind::Forget, RunKind::Prune, RunKind::Check, RunKind::Drill];

/// Upper bounds of the run duration buckets, in seconds (1 s to a day).
const RUN_BUCKETS: [f64; 14] =
    [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub kind: &'static str,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// A policy by its id and its name (both chosen by the API, neither secret).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
    pub name: String,
}

impl PolicyLabels {
    pub fn of(p: &PolicyRecord) -> PolicyLabels {
        PolicyLabels { policy: p.id.clone(), name: p.spec.name.clone() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

fn run_histogram() -> Histogram {
    Histogram::new(RUN_BUCKETS)
}

/// Counters and histograms of finished runs since the agent started. The
/// families are shared handles: clones registered in a registry see the
/// same values.
#[derive(Clone, Debug)]
pub struct RunMetrics {
    runs: Family<RunLabels, Counter>,
    duration: Family<KindLabel, Histogram, fn() -> Histogram>,
    repository_wait: Family<KindLabel, Histogram, fn() -> Histogram>,
    bytes_added: Family<PolicyLabels, Counter>,
    files_processed: Family<PolicyLabels, Counter>,
    errors: Family<CodeLabel, Counter>,
    /// Scheduled backups proven unchanged (no restic), per policy.
    unchanged: Family<PolicyLabels, Counter>,
}

impl Default for RunMetrics {
    fn default() -> Self {
        let m = RunMetrics {
            runs: Family::default(),
            duration: Family::new_with_constructor(run_histogram as fn() -> Histogram),
            repository_wait: Family::new_with_constructor(run_histogram as fn() -> Histogram),
            bytes_added: Family::default(),
            files_processed: Family::default(),
            errors: Family::default(),
            unchanged: Family::default(),
        };
        // Every series an alert watches exists from the start at 0, so
        // `increase()` sees the first failure too.
        for kind in RUN_KINDS {
            for state in RunState::ALL.into_iter().filter(|s| s.is_terminal()) {
                let _ = m.runs.get_or_create(&RunLabels { kind: kind.as_str(), state: state.as_str() });
            }
        }
        for code in ERROR_CODES.into_iter().chain(["other"]) {
            let _ = m.errors.get_or_create(&CodeLabel { code });
        }
        m
    }
}

impl RunMetrics {
    /// Count a run that reached a terminal state.
    pub fn run_ended(&self, policy: &PolicyRecord, run: &RunRecord) {
        let kind = run.kind.as_str();
        self.runs.get_or_create(&RunLabels { kind, state: run.state.as_str() }).inc();
        if let (Some(start), Some(end)) = (run.started_at, run.finished_at) {
            let secs = (end - start).num_milliseconds().max(0) as f64 / 1000.0;
            self.duration.get_or_create(&KindLabel { kind }).observe(secs);
        }
        if let Some(ms) = run.repository_wait_ms {
            self.repository_wait.get_or_create(&KindLabel { kind }).observe(ms as f64 / 1000.0);
        }
        if run.unchanged.is_some() {
            // No restic ran: nothing was read or added.
            self.unchanged.get_or_create(&PolicyLabels::of(policy)).inc();
        } else if let (RunKind::Backup, Some(s)) = (run.kind, &run.summary) {
            let labels = PolicyLabels::of(policy);
            self.bytes_added.get_or_create(&labels).inc_by(s.data_added);
            self.files_processed.get_or_create(&labels).inc_by(s.total_files_processed);
        }
        if let Some(e) = &run.error {
            self.errors.get_or_create(&CodeLabel { code: error_code_label(&e.code) }).inc();
        }
    }

    /// A deleted policy's series go with it.
    pub fn policy_deleted(&self, policy: &PolicyRecord) {
        let labels = PolicyLabels::of(policy);
        self.bytes_added.remove(&labels);
        self.files_processed.remove(&labels);
        self.unchanged.remove(&labels);
    }

    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "soda_syncer_runs",
            "Runs that ended since the agent started, by kind and final state",
            self.runs.clone(),
        );
        reg.register_with_unit(
            "soda_syncer_run_duration",
            "How long runs took from start to end, by kind",
            Unit::Seconds,
            self.duration.clone(),
        );
        reg.register_with_unit(
            "soda_syncer_run_repository_wait",
            "How long runs waited for this agent's own lock on their repository (a prune, check or forget holds it alone), by kind",
            Unit::Seconds,
            self.repository_wait.clone(),
        );
        reg.register_with_unit(
            "soda_syncer_backup_data_added",
            "Bytes backups added to their repository (after deduplication), per policy",
            Unit::Bytes,
            self.bytes_added.clone(),
        );
        reg.register(
            "soda_syncer_backup_files_processed",
            "Files backups read, per policy",
            self.files_processed.clone(),
        );
        reg.register(
            "soda_syncer_backup_unchanged",
            "Scheduled backups recorded as unchanged since the previous snapshot (a metadata walk found nothing changed; no restic ran), per policy",
            self.unchanged.clone(),
        );
        reg.register(
            "soda_syncer_run_errors",
            "Runs that ended with an error since the agent started, by error code (unknown codes count as other)",
            self.errors.clone(),
        );
    }
}

/// The schedule's period at `at`: the interval, or for cron the gap
/// between the first fire after `at` and the one after it.
pub fn schedule_period(schedule: &Schedule, at: DateTime<Utc>) -> Option<Duration> {
    let first = schedule.fire_after(at)?;
    Some(schedule.fire_after(first)? - first)
}

/// When the next successful backup of a policy is due: the first slot of
/// its schedule after `base` (the end of its last clean backup, or its
/// creation), plus the jitter that slot may start late by, plus `grace`.
/// Without a configured grace it is one more period: one failed slot that a
/// retry repairs raises nothing, a second missed slot does. So an interval
/// policy is due within two intervals (plus jitter) of its last success.
pub fn backup_deadline(
    schedule: &Schedule,
    jitter_seconds: u64,
    base: DateTime<Utc>,
    grace: Option<std::time::Duration>,
) -> Option<DateTime<Utc>> {
    let slot = schedule.fire_after(base)?;
    let grace = match grace {
        Some(g) => Duration::from_std(g).ok()?,
        None => schedule_period(schedule, base)?,
    };
    slot.checked_add_signed(Duration::seconds(jitter_seconds as i64))?.checked_add_signed(grace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use soda_syncer_domain::schedule::ScheduleSpec;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn an_interval_policy_is_due_two_intervals_and_its_jitter_after_its_last_success() {
        let s = Schedule::parse(&ScheduleSpec { interval_seconds: Some(3600), ..Default::default() }).unwrap();
        let base = at("2025-01-01T00:00:00Z");
        assert_eq!(backup_deadline(&s, 60, base, None), Some(at("2025-01-01T02:01:00Z")));
        let grace = std::time::Duration::from_secs(600);
        assert_eq!(backup_deadline(&s, 0, base, Some(grace)), Some(at("2025-01-01T01:10:00Z")));
    }

    #[test]
    fn a_cron_policy_is_due_one_period_after_its_next_slot() {
        let spec = ScheduleSpec { cron: Some("0 */6 * * *".into()), ..Default::default() };
        let s = Schedule::parse(&spec).unwrap();
        let base = at("2025-01-01T01:30:00Z");
        assert_eq!(schedule_period(&s, base), Some(Duration::hours(6)));
        assert_eq!(backup_deadline(&s, 0, base, None), Some(at("2025-01-01T12:00:00Z")));
    }

    #[test]
    fn unknown_error_codes_share_one_label() {
        assert_eq!(error_code_label("wrong_password"), "wrong_password");
        assert_eq!(error_code_label("rest:http://u:secret@host/"), "other");
    }
}
