//! Results where operators look: annotations on the claim (last backup
//! time, state, snapshot id, next run, and why a claim is not backed up) and
//! events.k8s.io/v1 Events (through kube-runtime's Recorder, which folds
//! repeats into a series), so `kubectl describe pvc` tells the story and a
//! failure is loud there, not only in the agent's log.

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::Api;
use soda_syncer_domain::annotations::status_keys as keys;
use soda_syncer_domain::{ConsistencyMode, Origin, RunKind, RunState};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

use super::discovery::{View, KEY_PREFIX};
use crate::config::Config;
use crate::scheduler::Scheduler;
use crate::store::{PolicyRecord, RunRecord};

#[derive(Clone)]
pub struct Reporter {
    client: kube::Client,
    recorder: Recorder,
    node: String,
    view: Arc<View>,
    /// claim key -> the last status reported, so an unchanged state is not
    /// written again at every reconcile.
    last: Arc<Mutex<HashMap<String, String>>>,
}

impl Reporter {
    pub fn new(client: kube::Client, config: &Config, view: Arc<View>) -> Reporter {
        let reporter = kube::runtime::events::Reporter {
            controller: "soda-syncer".into(),
            instance: Some(config.pod_name.clone().unwrap_or_else(|| format!("soda-syncer-{}", config.node_name))),
        };
        Reporter {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            node: config.node_name.clone(),
            view,
            last: Arc::default(),
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

    async fn annotate(&self, namespace: &str, claim: &str, annotations: serde_json::Value) {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
        if let Err(e) = api.patch(claim, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::warn!(claim = %format!("{namespace}/{claim}"), error = %e, "cannot annotate the claim");
        }
    }

    async fn event(&self, namespace: &str, claim: &str, warning: bool, reason: &str, note: String) {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Backup".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &self.reference(namespace, claim)).await {
            tracing::warn!(claim = %format!("{namespace}/{claim}"), error = %e, "cannot publish an Event on the claim");
        }
    }

    /// An opted-in claim this node cannot back up: say why, on the claim.
    pub async fn claim_problem(&self, namespace: &str, claim: &str, reason: &str, message: &str) {
        let status = format!("error: {message}");
        if !self.changed(namespace, claim, &status) {
            return;
        }
        self.annotate(namespace, claim, serde_json::json!({ keys::STATUS: status, keys::NODE: self.node })).await;
        self.event(namespace, claim, true, reason, message.to_string()).await;
    }

    /// The claim is backed up by this node under `policy`.
    pub async fn claim_active(&self, namespace: &str, claim: &str, policy: &PolicyRecord, reason: &str) {
        let status =
            if policy.spec.paused { "paused by a user of the agent's API".to_string() } else { "active".into() };
        let next = policy.next_run_at.map(|t| t.to_rfc3339()).unwrap_or_default();
        if !self.changed(namespace, claim, &format!("{status} {} {next}", policy.id)) {
            return;
        }
        self.annotate(
            namespace,
            claim,
            serde_json::json!({
                keys::STATUS: status,
                keys::NODE: self.node,
                keys::POLICY: policy.id,
                keys::NEXT_BACKUP_TIME: if next.is_empty() { serde_json::Value::Null } else { next.into() },
            }),
        )
        .await;
        if !reason.is_empty() {
            let note = format!(
                "policy {} ({}) backs up {} on node {}",
                policy.spec.name, policy.id, policy.spec.source.path, self.node
            );
            self.event(namespace, claim, false, reason, note).await;
        }
    }

    pub async fn claim_paused(&self, namespace: &str, claim: &str, why: &str) {
        let status = format!("paused: {why}");
        if !self.changed(namespace, claim, &status) {
            return;
        }
        self.annotate(namespace, claim, serde_json::json!({ keys::STATUS: status, keys::NEXT_BACKUP_TIME: null }))
            .await;
        self.event(namespace, claim, true, "BackupPaused", format!("backups on node {} are paused: {why}", self.node))
            .await;
    }

    /// A run of a claim's policy ended: annotations and an Event.
    async fn run_ended(&self, namespace: &str, claim: &str, policy: &PolicyRecord, run: &RunRecord) {
        let error = run.error.as_ref().map(|e| format!("{}: {}", e.code, e.message));
        if run.kind == RunKind::Backup {
            let mut a = serde_json::json!({
                keys::LAST_BACKUP_TIME: run.finished_at.map(|t| t.to_rfc3339()),
                keys::LAST_BACKUP_STATE: run.state.as_str(),
                keys::LAST_ERROR: error.clone().or_else(|| run.warning.clone()),
                keys::NEXT_BACKUP_TIME: policy.next_run_at.map(|t| t.to_rfc3339()),
            });
            if let Some(id) = &run.snapshot_id {
                a[keys::LAST_SNAPSHOT] = id.clone().into();
            }
            self.annotate(namespace, claim, a).await;
        }
        let what = match run.kind {
            RunKind::Backup => "Backup",
            RunKind::Restore => "Restore",
            RunKind::Drill => "Drill",
            _ => return, // maintenance is the repository's business, not the claim's
        };
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
        let (warning, reason, note) = match run.state {
            RunState::Succeeded => (false, format!("{what}Succeeded"), format!("{snapshot}{summary}")),
            RunState::Partial => (
                true,
                format!("{what}Partial"),
                format!("{snapshot}{summary}; {}", run.warning.clone().unwrap_or_default()),
            ),
            RunState::Suspicious => (
                true,
                format!("{what}Suspicious"),
                format!("{snapshot}{summary}; {}", run.warning.clone().unwrap_or_default()),
            ),
            RunState::Failed => (true, format!("{what}Failed"), error.unwrap_or_default()),
            RunState::Cancelled | RunState::Interrupted => {
                (true, format!("{what}Interrupted"), error.unwrap_or_default())
            }
            RunState::Queued | RunState::Running => return,
        };
        self.event(namespace, claim, warning, &reason, note).await;
        let degraded = policy.spec.consistency.mode != ConsistencyMode::None
            && run.consistency.as_ref().and_then(|c| c.get("method")).and_then(|m| m.as_str()) == Some("none");
        if run.kind == RunKind::Backup && degraded {
            self.event(
                namespace,
                claim,
                true,
                "ConsistencyDegraded",
                format!(
                    "consistency mode {:?} found no point-in-time method for this volume; the live files were backed up",
                    policy.spec.consistency.mode
                ),
            )
            .await;
        }
    }
}

/// Follow every run that ends and report those of claims' policies.
pub async fn report_runs(sched: Scheduler, reporter: Reporter, cancel: CancellationToken) {
    let mut rx = sched.subscribe_finished();
    loop {
        let run = tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.recv() => match r {
                Ok(r) => r,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "too many runs ended at once; some were not reported on their claims");
                    continue;
                }
                Err(_) => return,
            },
        };
        let Ok(policy) = sched.store().get_policy(&run.policy_id) else { continue };
        if policy.origin != Origin::Kubernetes {
            continue;
        }
        let Some((namespace, claim)) =
            policy.legacy_key.as_deref().and_then(|k| k.strip_prefix(KEY_PREFIX)).and_then(|k| k.split_once('/'))
        else {
            continue;
        };
        reporter.run_ended(namespace, claim, &policy, &run).await;
    }
}
