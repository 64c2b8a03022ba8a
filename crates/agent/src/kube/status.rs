//! Results where operators look, on every claim this agent backs up,
//! whatever made the policy: the claim's own annotations, a SODA profile,
//! the legacy `POST /snapshot` (a CSI volume found under the kubelet's
//! directory, named by its PersistentVolume), or a `/v1` policy whose source
//! is a claim's volume (the kubelet's path of a pod's volume, or a local or
//! hostPath PersistentVolume's path). The claim gets annotations (last backup
//! time, state, snapshot, last success, next run, deadline, node, policy,
//! consistency used) and events.k8s.io/v1 Events (through kube-runtime's
//! Recorder, which folds repeats into a series), so `kubectl describe pvc`
//! and `soda-syncer cluster` tell the story.
//!
//! The agent writes no more than the API server can take. Writes go through
//! an outbox keyed by claim: what is still unwritten when a newer result
//! comes is merged into one patch (the newest value of each key wins), and
//! a writer sends at most [`CLAIM_WRITES_PER_SECOND`] claims' writes a
//! second, changes before repeats. A change (a state or error code that
//! differs from the last one reported for the claim) gets an Event at once;
//! a repeated success gets none, and a repeated warning at most one an hour.

use crate::schedules::ScheduleBook;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::Api;
use soda_syncer_domain::annotations::status_keys as keys;
use soda_syncer_domain::{ConsistencyMode, Origin, RunKind, RunState};
use std::collections::{HashMap, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::view::{View, KEY_PREFIX};
use crate::config::Config;
use crate::scheduler::Scheduler;
use crate::store::{PolicyRecord, RunRecord, Store};

/// How many claims' writes (one annotation patch and their Events each)
/// the agent sends per second at most; the rest wait, merged per claim.
pub const CLAIM_WRITES_PER_SECOND: u64 = 20;
/// A warning that repeats (the same failure again) is re-announced as an
/// Event at most this often; the annotations follow every run.
const REPEAT_WARNING_EVERY: Duration = Duration::from_secs(3600);
/// Events kept per claim while it waits in the outbox (the newest).
const MAX_PENDING_EVENTS: usize = 8;
/// How often the agent re-reads its policies to annotate claims whose
/// policy was not made from their annotations (legacy, `/v1`).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Reporter {
    client: kube::Client,
    recorder: Recorder,
    node: String,
    kubelet_dir: PathBuf,
    grace: Option<Duration>,
    view: Arc<View>,
    /// claim key -> the last status reported, so an unchanged state is not
    /// written again at every reconcile.
    last: Arc<Mutex<HashMap<String, String>>>,
    /// `claim#what` -> the last outcome reported, to tell a change from a repeat.
    outcomes: Arc<Mutex<HashMap<String, Outcome>>>,
    outbox: Arc<Outbox>,
    store: Store,
    schedules: ScheduleBook,
}

/// The last run result reported on a claim, for one kind of run.
struct Outcome {
    signature: String,
    /// When an Event about it was last sent.
    announced: Instant,
}

struct PendingEvent {
    warning: bool,
    reason: String,
    note: String,
}

/// Everything not yet written for one claim.
#[derive(Default)]
struct Pending {
    annotations: serde_json::Map<String, serde_json::Value>,
    events: VecDeque<PendingEvent>,
}

#[derive(Default)]
struct OutboxState {
    pending: HashMap<String, Pending>,
    /// Claims waiting with a change, written first; then the repeats.
    changes: VecDeque<String>,
    repeats: VecDeque<String>,
}

/// Writes per claim, merged while they wait (see the module's docs).
#[derive(Default)]
struct Outbox {
    state: Mutex<OutboxState>,
    wake: tokio::sync::Notify,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, claim: &str, annotations: serde_json::Value, event: Option<PendingEvent>, change: bool) {
        {
            let mut st = self.lock();
            let new = !st.pending.contains_key(claim);
            let p = st.pending.entry(claim.to_string()).or_default();
            if let serde_json::Value::Object(m) = annotations {
                p.annotations.extend(m);
            }
            if let Some(e) = event {
                if p.events.len() == MAX_PENDING_EVENTS {
                    p.events.pop_front();
                }
                p.events.push_back(e);
            }
            // A claim already waiting as a repeat moves up when it changes;
            // its stale place in `repeats` is skipped when reached.
            if change {
                if new || !st.changes.contains(&claim.to_string()) {
                    st.changes.push_back(claim.to_string());
                }
            } else if new {
                st.repeats.push_back(claim.to_string());
            }
        }
        self.wake.notify_one();
    }

    fn next(&self) -> Option<(String, Pending)> {
        let mut st = self.lock();
        loop {
            let key = st.changes.pop_front().or_else(|| st.repeats.pop_front())?;
            if let Some(p) = st.pending.remove(&key) {
                return Some((key, p));
            }
        }
    }

    fn len(&self) -> usize {
        self.lock().pending.len()
    }
}

impl Reporter {
    pub fn new(
        client: kube::Client,
        config: &Config,
        view: Arc<View>,
        store: Store,
        schedules: ScheduleBook,
    ) -> Reporter {
        let reporter = kube::runtime::events::Reporter {
            controller: "soda-syncer".into(),
            instance: Some(config.pod_name.clone().unwrap_or_else(|| format!("soda-syncer-{}", config.node_name))),
        };
        Reporter {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            node: config.node_name.clone(),
            kubelet_dir: config.kubelet_dir.clone(),
            grace: config.deadline_grace,
            view,
            last: Arc::default(),
            outcomes: Arc::default(),
            outbox: Arc::default(),
            store,
            schedules,
        }
    }

    /// The claim (`namespace`, `name`) a policy backs up, if it is one:
    /// named by the policy's key (annotations, profiles), by its volume
    /// (legacy), or by its source path.
    fn claim_of(&self, policy: &PolicyRecord) -> Option<(String, String)> {
        self.claim_by(policy, |pv| self.view.claim_of_volume(pv), |path| self.view.volume_at_path(path))
    }

    /// As `claim_of`, with the view's lookups given (an index for many).
    fn claim_by(
        &self,
        policy: &PolicyRecord,
        claim_of_volume: impl Fn(&str) -> Option<String>,
        volume_at_path: impl Fn(&str) -> Option<String>,
    ) -> Option<(String, String)> {
        let key = if policy.origin == Origin::Kubernetes {
            policy.legacy_key.as_deref().and_then(|k| k.strip_prefix(KEY_PREFIX)).map(str::to_string)
        } else {
            let pv = policy
                .volume
                .clone()
                .or_else(|| volume_in_kubelet_path(&self.kubelet_dir, Path::new(&policy.spec.source.path)))
                .or_else(|| volume_at_path(&policy.spec.source.path));
            pv.and_then(|pv| claim_of_volume(&pv))
        }?;
        let (namespace, claim) = key.split_once('/')?;
        Some((namespace.to_string(), claim.to_string()))
    }

    /// Send what waits in the outbox, at most [`CLAIM_WRITES_PER_SECOND`]
    /// claims a second, until cancelled.
    pub async fn write_loop(self, cancel: CancellationToken) {
        let mut pace = tokio::time::interval(Duration::from_millis(1000 / CLAIM_WRITES_PER_SECOND));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some((claim, pending)) = self.outbox.next() else {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.outbox.wake.notified() => continue,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = pace.tick() => {}
            }
            let Some((namespace, name)) = claim.split_once('/') else { continue };
            if !pending.annotations.is_empty() {
                self.write_annotations(namespace, name, serde_json::Value::Object(pending.annotations)).await;
            }
            for e in pending.events {
                self.write_event(namespace, name, e).await;
            }
            tracing::trace!(claim = %claim, waiting = self.outbox.len(), "claim status written");
        }
    }

    fn reference(&self, namespace: &str, claim: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some(namespace.into()),
            name: Some(claim.into()),
            uid: self.view.claim(&format!("{namespace}/{claim}")).map(|c| c.uid),
            ..Default::default()
        }
    }

    /// Whether `status` differs from what was last reported for the claim.
    fn changed(&self, namespace: &str, claim: &str, status: &str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let key = format!("{namespace}/{claim}");
        if last.get(&key).map(String::as_str) == Some(status) {
            return false;
        }
        last.insert(key, status.to_string());
        true
    }

    /// Queue annotations for the claim (a change goes before repeats).
    fn annotate(&self, namespace: &str, claim: &str, annotations: serde_json::Value, change: bool) {
        self.outbox.push(&format!("{namespace}/{claim}"), annotations, None, change);
    }

    /// Queue an Event about the claim; it is always a change.
    fn event(&self, namespace: &str, claim: &str, warning: bool, reason: &str, note: String) {
        let ev = PendingEvent { warning, reason: reason.into(), note };
        self.outbox.push(&format!("{namespace}/{claim}"), serde_json::json!({}), Some(ev), true);
    }

    async fn write_annotations(&self, namespace: &str, claim: &str, annotations: serde_json::Value) {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
        if let Err(e) = api.patch(claim, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::warn!(claim = %format!("{namespace}/{claim}"), error = %e, "cannot annotate the claim");
        }
    }

    async fn write_event(&self, namespace: &str, claim: &str, e: PendingEvent) {
        let ev = Event {
            type_: if e.warning { EventType::Warning } else { EventType::Normal },
            reason: e.reason,
            note: Some(e.note.chars().take(1000).collect()),
            action: "Backup".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &self.reference(namespace, claim)).await {
            tracing::warn!(claim = %format!("{namespace}/{claim}"), error = %e, "cannot publish an Event on the claim");
        }
    }

    /// An opted-in claim this node cannot back up: say why, on the claim.
    pub fn claim_problem(&self, namespace: &str, claim: &str, reason: &str, message: &str) {
        let status = format!("error: {message}");
        if !self.changed(namespace, claim, &status) {
            return;
        }
        self.annotate(namespace, claim, serde_json::json!({ keys::STATUS: status, keys::NODE: self.node }), true);
        self.event(namespace, claim, true, reason, message.to_string());
    }

    /// The claim is backed up by this node under `policy`.
    pub fn claim_active(&self, namespace: &str, claim: &str, policy: &PolicyRecord, reason: &str) {
        let status = claim_status(policy);
        let next = policy.next_run_at.map(|t| t.to_rfc3339()).unwrap_or_default();
        let key = format!("{namespace}/{claim}");
        // Only the next run moved: a repeat; the status or policy: a change.
        let (was, now) = {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            (last.get(&key).cloned(), format!("{status} {}", policy.id))
        };
        if !self.changed(namespace, claim, &format!("{now} {next}")) {
            return;
        }
        let change = was.is_none_or(|w| !w.starts_with(&format!("{now} ")));
        let mut a = serde_json::json!({
            keys::STATUS: status,
            keys::NODE: self.node,
            keys::POLICY: policy.id,
            keys::POLICY_NAME: policy.spec.name,
            keys::NEXT_BACKUP_TIME: if next.is_empty() { serde_json::Value::Null } else { next.into() },
        });
        if let Some(deadline) = self.deadline(policy, None) {
            a[keys::BACKUP_DEADLINE] = deadline.into();
        }
        self.annotate(namespace, claim, a, change);
        if !reason.is_empty() {
            let note = format!(
                "policy {} ({}) backs up {} on node {}",
                policy.spec.name, policy.id, policy.spec.source.path, self.node
            );
            self.event(namespace, claim, false, reason, note);
        }
    }

    /// When the policy's next successful backup is due (RFC 3339), from its
    /// last clean backup (read from the store when not given) or creation.
    fn deadline(&self, policy: &PolicyRecord, last_success: Option<chrono::DateTime<chrono::Utc>>) -> Option<String> {
        let schedules = self.schedules.of(&policy.id, &policy.spec).ok()?;
        let last_success = last_success
            .or_else(|| self.store.last_clean_backup(&policy.id).ok().flatten().and_then(|r| r.finished_at));
        let base = last_success.unwrap_or(policy.created_at);
        crate::metrics::backup_deadline(&schedules.backup, policy.spec.jitter_seconds, base, self.grace)
            .map(|t| t.to_rfc3339())
    }

    /// Whether this outcome differs from the last one reported for the
    /// claim (`what`: the kind of run, or the consistency), and whether an
    /// Event should say so (a change, or a warning not told for an hour).
    fn outcome(&self, claim: &str, what: &str, signature: &str, warning: bool) -> (bool, bool) {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        let key = format!("{claim}#{what}");
        let now = Instant::now();
        match outcomes.get_mut(&key) {
            Some(o) if o.signature == signature => {
                let tell = warning && now.duration_since(o.announced) >= REPEAT_WARNING_EVERY;
                if tell {
                    o.announced = now;
                }
                (false, tell)
            }
            _ => {
                outcomes.insert(key, Outcome { signature: signature.to_string(), announced: now });
                (true, true)
            }
        }
    }

    pub fn claim_paused(&self, namespace: &str, claim: &str, why: &str) {
        let status = format!("paused: {why}");
        if !self.changed(namespace, claim, &status) {
            return;
        }
        self.annotate(
            namespace,
            claim,
            serde_json::json!({ keys::STATUS: status, keys::NEXT_BACKUP_TIME: null }),
            true,
        );
        self.event(namespace, claim, true, "BackupPaused", format!("backups on node {} are paused: {why}", self.node));
    }

    /// A run of a claim's policy ended: annotations, and an Event when it
    /// is news (see [`Reporter::outcome`]).
    fn run_ended(&self, namespace: &str, claim: &str, policy: &PolicyRecord, run: &RunRecord) {
        let key = format!("{namespace}/{claim}");
        let error = run.error.as_ref().map(|e| format!("{}: {}", e.code, e.message));
        let method =
            run.consistency.as_ref().and_then(|c| c.get("method")).and_then(|m| m.as_str()).map(str::to_string);
        let degraded = run.kind == RunKind::Backup
            && policy.spec.consistency.mode != ConsistencyMode::None
            && method.as_deref() == Some("none");
        let what = match run.kind {
            RunKind::Backup => "Backup",
            RunKind::Restore => "Restore",
            RunKind::Drill => "Drill",
            _ => return, // maintenance is the repository's business, not the claim's
        };
        let (warning, reason, note) = match run.state {
            RunState::Succeeded => (false, format!("{what}Succeeded"), String::new()),
            RunState::Partial => (true, format!("{what}Partial"), run.warning.clone().unwrap_or_default()),
            RunState::Suspicious => (true, format!("{what}Suspicious"), run.warning.clone().unwrap_or_default()),
            RunState::Failed => (true, format!("{what}Failed"), error.clone().unwrap_or_default()),
            RunState::Cancelled | RunState::Interrupted => {
                (true, format!("{what}Interrupted"), error.clone().unwrap_or_default())
            }
            RunState::Queued | RunState::Running => return,
        };
        let code = run.error.as_ref().map(|e| e.code.as_str()).unwrap_or("");
        let (change, tell) = self.outcome(&key, what, &format!("{} {code}", run.state.as_str()), warning);
        if run.kind == RunKind::Backup {
            let last_success = match run.state {
                RunState::Succeeded => run.finished_at,
                _ => self.store.last_clean_backup(&policy.id).ok().flatten().and_then(|r| r.finished_at),
            };
            let mut a = serde_json::json!({
                keys::STATUS: claim_status(policy),
                keys::NODE: self.node,
                keys::POLICY: policy.id,
                keys::POLICY_NAME: policy.spec.name,
                keys::LAST_BACKUP_TIME: run.finished_at.map(|t| t.to_rfc3339()),
                keys::LAST_BACKUP_STATE: run.state.as_str(),
                keys::LAST_ERROR: error.clone().or_else(|| run.warning.clone()),
                keys::NEXT_BACKUP_TIME: policy.next_run_at.map(|t| t.to_rfc3339()),
                keys::LAST_SUCCESS_TIME: last_success.map(|t| t.to_rfc3339()),
                keys::BACKUP_DEADLINE: self.deadline(policy, last_success),
                keys::CONSISTENCY_USED: method.clone().unwrap_or_else(|| "none".into()),
            });
            if let Some(id) = &run.snapshot_id {
                a[keys::LAST_SNAPSHOT] = id.clone().into();
            }
            self.annotate(namespace, claim, a, change);
        }
        if tell {
            let summary = run
                .summary
                .as_ref()
                .map(|s| {
                    if run.kind == RunKind::Drill {
                        return format!(
                            ": {} files, {} bytes restored and verified, {} mismatches, {:.1} s",
                            s.files_checked,
                            s.bytes_checked,
                            s.mismatches.len(),
                            s.total_duration
                        );
                    }
                    format!(
                        ", {} files ({} new, {} changed), {} bytes added, {:.1} s",
                        s.files_new + s.files_changed + s.files_unmodified,
                        s.files_new,
                        s.files_changed,
                        s.data_added,
                        s.total_duration
                    )
                })
                .unwrap_or_default();
            let snapshot =
                run.snapshot_id.as_deref().map(|s| format!("snapshot {}", &s[..s.len().min(8)])).unwrap_or_default();
            let note = match run.state {
                RunState::Succeeded => format!("{snapshot}{summary} (policy {}, node {})", policy.spec.name, self.node),
                RunState::Partial | RunState::Suspicious => format!("{snapshot}{summary}; {note}"),
                _ => note,
            };
            self.event(namespace, claim, warning, &reason, note);
        }
        if run.kind == RunKind::Backup && run.state != RunState::Failed {
            let (change, tell) = self.outcome(&key, "consistency", if degraded { "degraded" } else { "ok" }, degraded);
            if degraded && tell {
                self.event(
                    namespace,
                    claim,
                    true,
                    "ConsistencyDegraded",
                    format!(
                        "consistency mode {:?} found no point-in-time method for this volume; the live files were backed up",
                        policy.spec.consistency.mode
                    ),
                );
            } else if !degraded && change && policy.spec.consistency.mode != ConsistencyMode::None {
                let used = method.unwrap_or_else(|| "none".into());
                self.event(namespace, claim, false, "ConsistencyRestored", format!("point in time again, by {used}"));
            }
        }
    }

    /// Annotate the claims of policies that no claim annotation made
    /// (legacy, `/v1`): status, node, policy, next run and deadline, also
    /// before their first run ends.
    fn sweep(&self) {
        let Ok(policies) = self.store.list_policies() else { return };
        let (by_volume, by_path) = self.view.claim_index();
        for p in policies.iter().filter(|p| p.origin != Origin::Kubernetes) {
            let found = self.claim_by(p, |pv| by_volume.get(pv).cloned(), |path| by_path.get(path).cloned());
            if let Some((namespace, claim)) = found {
                self.claim_active(&namespace, &claim, p, "");
            }
        }
    }
}

/// The claim's `status` annotation for the policy that backs it up.
fn claim_status(policy: &PolicyRecord) -> String {
    if policy.spec.paused {
        return "paused by a user of the agent's API".into();
    }
    match policy.status {
        crate::store::PolicyStatus::Active => "active".into(),
        crate::store::PolicyStatus::VolumeGone => {
            format!("paused: {}", policy.status_message.as_deref().unwrap_or("its volume is no longer on this node"))
        }
    }
}

/// The PersistentVolume named in a path under the kubelet's directory:
/// `pods/<uid>/volumes/<plugin>/<pv>/...` (CSI's `.../<pv>/mount`, a local
/// volume's `.../kubernetes.io~local-volume/<pv>`).
pub fn volume_in_kubelet_path(kubelet: &Path, path: &Path) -> Option<String> {
    let rest = path.strip_prefix(kubelet).ok()?;
    let parts: Vec<&str> = rest
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        ["pods", _uid, "volumes", _plugin, pv, ..] => Some(pv.to_string()),
        _ => None,
    }
}

/// Follow every run that ends and report those of claims' policies; every
/// [`SWEEP_EVERY`], annotate the claims of policies no annotation made.
pub async fn report_runs(sched: Scheduler, reporter: Reporter, cancel: CancellationToken) {
    let mut rx = sched.subscribe_finished();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let run = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sweep.tick() => {
                reporter.sweep();
                continue;
            }
            r = rx.recv() => match r {
                Ok(r) => r,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "too many runs ended at once; some were not reported on their claims");
                    continue;
                }
                Err(_) => return,
            },
        };
        let Ok(policy) = reporter.store.get_policy(&run.policy_id) else { continue };
        let Some((namespace, claim)) = reporter.claim_of(&policy) else { continue };
        if policy.origin != Origin::Kubernetes {
            reporter.claim_active(&namespace, &claim, &policy, "");
        }
        reporter.run_ended(&namespace, &claim, &policy, &run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_volume_is_read_from_kubelet_paths_of_pod_volumes_only() {
        let k = Path::new("/var/lib/kubelet");
        let at = |p: &str| volume_in_kubelet_path(k, Path::new(p));
        assert_eq!(at("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pv-1/mount"), Some("pv-1".into()));
        assert_eq!(at("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pv-1/mount/sub"), Some("pv-1".into()));
        assert_eq!(at("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~local-volume/pv-2"), Some("pv-2".into()));
        assert_eq!(at("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi"), None);
        assert_eq!(at("/var/lib/kubelet/plugins/kubernetes.io/csi/d/abc/globalmount"), None);
        assert_eq!(at("/data/pods/u1/volumes/x/pv-3"), None);
        assert_eq!(at("/var/lib/kubelet/pods/u1/volumes/x/../pv-3"), None);
    }

    #[tokio::test]
    async fn the_outbox_merges_a_claims_writes_and_sends_changes_before_repeats() {
        let o = Outbox::default();
        o.push("app/a", serde_json::json!({"k": "1", "x": "a"}), None, false);
        o.push("app/b", serde_json::json!({"k": "1"}), None, false);
        o.push("app/a", serde_json::json!({"k": "2"}), None, false);
        let ev = PendingEvent { warning: true, reason: "BackupFailed".into(), note: String::new() };
        o.push("app/b", serde_json::json!({"k": "3"}), Some(ev), true);
        assert_eq!(o.len(), 2, "one entry per claim");
        let (first, p) = o.next().unwrap();
        assert_eq!(first, "app/b", "the change goes first");
        assert_eq!(p.annotations["k"], "3");
        assert_eq!(p.events.len(), 1);
        let (second, p) = o.next().unwrap();
        assert_eq!(second, "app/a");
        assert_eq!(
            serde_json::Value::Object(p.annotations),
            serde_json::json!({"k": "2", "x": "a"}),
            "merged, newest wins"
        );
        assert!(o.next().is_none(), "app/b's old place among the repeats is skipped");
    }
}
