//! What the API shows: policies without their secrets, runs with live
//! progress, snapshots, and the Prometheus text.

use serde_json::{json, Value};
use soda_syncer_domain::restic_json::Snapshot;
use soda_syncer_domain::run::Progress;
use soda_syncer_domain::secret::redact_url;
use std::fmt::Write;

use crate::ids::fmt_time;
use crate::scheduler::Scheduler;
use crate::store::{PolicyRecord, PolicyStatus, RunRecord, StoreError};

pub fn policy_view(p: &PolicyRecord, last: Option<&RunRecord>) -> Value {
    let s = &p.spec;
    let env: serde_json::Map<String, Value> = s.repository.env.keys().map(|k| (k.clone(), Value::Null)).collect();
    let env_set: serde_json::Map<String, Value> =
        s.repository.env.iter().map(|(k, v)| (k.clone(), json!(v.as_ref().is_some_and(|v| !v.is_empty())))).collect();
    let paused = s.paused || p.status != PolicyStatus::Active;
    json!({
        "id": p.id,
        "name": s.name,
        "origin": p.origin,
        "source": s.source,
        "repository": {
            "url": s.repository.url.as_deref().map(redact_url),
            "password": Value::Null,
            "passwordSet": s.repository.password.as_ref().is_some_and(|p| !p.is_empty()),
            "env": env,
            "envSet": env_set,
        },
        "schedule": s.schedule,
        "jitterSeconds": s.jitter_seconds,
        "retention": s.retention,
        "consistency": s.consistency,
        "exclude": s.exclude,
        "tags": s.tags,
        "paused": paused,
        "pausedByUser": s.paused,
        "status": { "state": p.status, "message": p.status_message },
        "volume": p.volume,
        "createdAt": fmt_time(p.created_at),
        "updatedAt": fmt_time(p.updated_at),
        "nextRunAt": if paused { None } else { p.next_run_at.map(fmt_time) },
        "consecutiveFailures": p.consecutive_failures,
        "lastRun": last.map(|r| json!({
            "id": r.id,
            "kind": r.kind,
            "state": r.state,
            "finishedAt": r.finished_at.map(fmt_time),
            "snapshotId": r.snapshot_id,
        })),
    })
}

pub fn run_view(r: &RunRecord, live: Option<Progress>) -> Value {
    json!({
        "id": r.id,
        "policyId": r.policy_id,
        "kind": r.kind,
        "trigger": r.trigger,
        "state": r.state,
        "queuedAt": fmt_time(r.queued_at),
        "dueAt": r.due_at.map(fmt_time),
        "startedAt": r.started_at.map(fmt_time),
        "finishedAt": r.finished_at.map(fmt_time),
        "progress": live.or_else(|| r.progress.clone()),
        "snapshotId": r.snapshot_id,
        "summary": r.summary,
        "consistency": r.consistency,
        "error": r.error,
        "warning": r.warning,
    })
}

pub fn snapshot_view(s: &Snapshot) -> Value {
    json!({
        "id": s.id,
        "shortId": s.short_id,
        "time": s.time,
        "paths": s.paths,
        "hostname": s.hostname,
        "tags": s.tags.clone().unwrap_or_default(),
        "volume": s.tag_value("volume"),
    })
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text format. Labels carry ids and names, never secrets.
pub fn metrics_text(sched: &Scheduler) -> Result<String, StoreError> {
    let store = sched.store();
    let mut out = String::new();
    let policies = store.list_policies()?;
    let last = store.last_runs()?;
    let _ =
        writeln!(out, "# HELP soda_syncer_policies Policies known to this agent.\n# TYPE soda_syncer_policies gauge");
    let _ = writeln!(out, "soda_syncer_policies {}", policies.len());
    let _ = writeln!(
        out,
        "# HELP soda_syncer_runs Runs recorded in the database, by kind and state.\n# TYPE soda_syncer_runs gauge"
    );
    for (kind, state, n) in store.run_counts()? {
        let _ = writeln!(out, "soda_syncer_runs{{kind=\"{kind}\",state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP soda_syncer_queue_depth Runs waiting for a free slot.\n# TYPE soda_syncer_queue_depth gauge"
    );
    let _ = writeln!(out, "soda_syncer_queue_depth {}", sched.queue_depth());
    let _ = writeln!(out, "# HELP soda_syncer_running_runs Runs executing now.\n# TYPE soda_syncer_running_runs gauge");
    let _ = writeln!(out, "soda_syncer_running_runs {}", sched.running_count());
    let _ = writeln!(out, "# HELP soda_syncer_run_errors_total Failed runs by error code since start.\n# TYPE soda_syncer_run_errors_total counter");
    for (code, n) in sched.counters().restic_errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "soda_syncer_run_errors_total{{code=\"{code}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP soda_syncer_policy_next_run_timestamp_seconds When the policy runs next (0 when paused).\n# TYPE soda_syncer_policy_next_run_timestamp_seconds gauge"
    );
    for p in &policies {
        let next = if p.schedulable() { p.next_run_at.map(|t| t.timestamp()).unwrap_or(0) } else { 0 };
        let _ = writeln!(
            out,
            "soda_syncer_policy_next_run_timestamp_seconds{{policy=\"{}\",name=\"{}\"}} {next}",
            p.id,
            label(&p.spec.name)
        );
    }
    let _ = writeln!(
        out,
        "# HELP soda_syncer_policy_paused 1 when the policy is paused by a user or by the agent.\n# TYPE soda_syncer_policy_paused gauge"
    );
    for p in &policies {
        let _ = writeln!(
            out,
            "soda_syncer_policy_paused{{policy=\"{}\",name=\"{}\"}} {}",
            p.id,
            label(&p.spec.name),
            u8::from(!p.schedulable())
        );
    }
    let _ = writeln!(
        out,
        "# HELP soda_syncer_policy_last_run_ok 1 when the policy's newest run ended succeeded, 0 otherwise.\n# TYPE soda_syncer_policy_last_run_ok gauge"
    );
    for p in &policies {
        if let Some(r) = last.get(&p.id).filter(|r| r.state.is_terminal()) {
            let _ = writeln!(
                out,
                "soda_syncer_policy_last_run_ok{{policy=\"{}\",name=\"{}\",state=\"{}\"}} {}",
                p.id,
                label(&p.spec.name),
                r.state.as_str(),
                u8::from(r.state.is_clean_success())
            );
        }
    }
    Ok(out)
}
