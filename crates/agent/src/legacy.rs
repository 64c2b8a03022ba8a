//! The upstream `POST /snapshot` contract, kept for soda-proxy: the body,
//! turned into policies of origin `legacy`. An explicit source becomes one
//! policy; an empty one subscribes the repository to every CSI volume on
//! this node, now and later (the rescan loop adds volumes that appear and
//! pauses the policies of volumes that go away).

use chrono::Utc;
use soda_syncer_domain::legacy::{
    policy_name, LegacyPolicyRef, LegacySnapshotRequest, LegacySnapshotResponse, LegacyTarget,
};
use soda_syncer_domain::policy::{validate_abs_path, RepositorySpec};
use soda_syncer_domain::schedule::ScheduleSpec;
use soda_syncer_domain::Origin;
use std::collections::HashSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ids::{new_id, short_hash};
use crate::kubelet::{scan_csi_volumes, CsiVolume};
use crate::policies::{Policies, PolicyError};
use crate::store::{PolicyStatus, Store, Subscription};
use std::sync::{Arc, OnceLock};

/// Hands a legacy call for "every volume" on to the agents of the other
/// nodes (the proxy reaches only the agent on its own node).
pub trait LegacyPublisher: Send + Sync {
    fn publish(&self, fields: std::collections::BTreeMap<String, String>);
}

/// The legacy route's service: turns upstream bodies into policies through
/// [`Policies`], keeps the subscriptions for "every CSI volume", and
/// rescans the kubelet's volumes for them.
#[derive(Clone)]
pub struct Legacy {
    policies: Policies,
    store: Store,
    config: Config,
    publisher: Arc<OnceLock<Arc<dyn LegacyPublisher>>>,
}

impl Legacy {
    pub fn new(policies: Policies, store: Store, config: Config) -> Legacy {
        Legacy { policies, store, config, publisher: Arc::default() }
    }

    /// Create the policy for (repository, source) or update its interval
    /// and credentials: the same body twice never makes two schedules.
    fn upsert_legacy(
        &self,
        key_parts: &[&str],
        name_hint: &str,
        path: &str,
        volume: Option<String>,
        target: &LegacyTarget,
    ) -> Result<LegacyPolicyRef, PolicyError> {
        let key = short_hash(key_parts);
        if let Some(existing) = self.store.get_policy_by_legacy_key(&key)? {
            let mut spec = existing.spec.clone();
            spec.schedule = ScheduleSpec { interval_seconds: Some(target.interval), ..Default::default() };
            if target.repository.password.is_some() {
                spec.repository.password = target.repository.password.clone();
            }
            for (k, v) in &target.repository.env {
                spec.repository.env.insert(k.clone(), v.clone());
            }
            let moved = spec.source.path != path;
            spec.source.path = path.to_string();
            let p = if spec != existing.spec || moved {
                self.policies.replace(&existing.id, spec, Origin::Legacy)?
            } else {
                existing
            };
            if p.status != PolicyStatus::Active {
                self.policies.set_status(&p.id, PolicyStatus::Active, None)?;
            }
            return Ok(LegacyPolicyRef {
                id: p.id,
                name: p.spec.name,
                source: path.to_string(),
                volume,
                action: "updated",
            });
        }
        let name = policy_name(name_hint, &key);
        let p = self.policies.create(target.spec(name, path), Origin::Legacy, volume.clone(), Some(key))?;
        Ok(LegacyPolicyRef { id: p.id, name: p.spec.name, source: path.to_string(), volume, action: "created" })
    }

    /// Set once, by the Kubernetes adapter.
    pub fn set_publisher(&self, p: std::sync::Arc<dyn LegacyPublisher>) {
        let _ = self.publisher.set(p);
    }

    /// Handle one `POST /snapshot`. Never waits for a volume or a backup.
    /// A call for every volume is also handed on to the other nodes.
    pub fn snapshot(&self, req: LegacySnapshotRequest) -> Result<LegacySnapshotResponse, PolicyError> {
        let fields = req.to_fields();
        let every_volume = req.restic_source_repo.as_deref().is_none_or(str::is_empty);
        let mut resp = self.apply(req)?;
        if let (true, Some(p)) = (every_volume, self.publisher.get()) {
            p.publish(fields);
            resp.message.push_str("; the request was handed on to the agents of every node");
        }
        Ok(resp)
    }

    /// Apply a legacy call on this node only.
    pub fn apply(&self, req: LegacySnapshotRequest) -> Result<LegacySnapshotResponse, PolicyError> {
        let target = LegacyTarget::of(&req)?;
        let repo_key = target.repository.url.clone().unwrap_or_else(|| "<default>".into());
        match req.restic_source_repo.as_deref().filter(|s| !s.is_empty()) {
            Some(path) => {
                validate_abs_path("resticSourceRepo", path)?;
                let hint = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("root");
                let r = self.upsert_legacy(&[&repo_key, "path", path], hint, path, None, &target)?;
                Ok(LegacySnapshotResponse {
                    message: format!("backups of {path} every {} s are scheduled", target.interval),
                    policies: vec![r],
                    subscription: None,
                })
            }
            None => {
                let now = Utc::now();
                let sub = Subscription {
                    id: new_id(),
                    repository: repo_key.clone(),
                    password: target.repository.password.clone().unwrap_or_default(),
                    env: target.repository.env.iter().filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v))).collect(),
                    interval_seconds: target.interval,
                    created_at: now,
                    updated_at: now,
                };
                self.store.upsert_subscription(&sub)?;
                let volumes = scan_csi_volumes(&self.config.kubelet_dir, self.config.require_mountpoints);
                let mut refs = Vec::new();
                for v in &volumes {
                    match self.upsert_legacy(
                        &[&repo_key, "pv", &v.pv],
                        &v.pv,
                        &v.mount.display().to_string(),
                        Some(v.pv.clone()),
                        &target,
                    ) {
                        Ok(r) => refs.push(r),
                        Err(e) => {
                            tracing::warn!(volume = %v.pv, error = %e, "cannot create a policy for a CSI volume")
                        }
                    }
                }
                let message = if volumes.is_empty() {
                    format!(
                        "no CSI volume is mounted on this node under {} yet; volumes that appear will be backed up every {} s",
                        self.config.kubelet_dir.display(),
                        target.interval
                    )
                } else {
                    format!("{} CSI volume(s) on this node will be backed up every {} s; volumes that appear later are added", volumes.len(), target.interval)
                };
                Ok(LegacySnapshotResponse { message, policies: refs, subscription: Some(repo_key_display(&repo_key)) })
            }
        }
    }

    /// One pass of the volume rescan: every subscription gets a policy per
    /// volume mounted now; policies of volumes no longer mounted are paused
    /// and flagged (never deleted), and resumed when the volume returns.
    pub fn rescan_volumes(&self) -> Result<(), PolicyError> {
        let subs = self.store.list_subscriptions()?;
        if subs.is_empty() {
            return Ok(());
        }
        let volumes: Vec<CsiVolume> = scan_csi_volumes(&self.config.kubelet_dir, self.config.require_mountpoints);
        let mut seen_keys = HashSet::new();
        for sub in &subs {
            let target = LegacyTarget {
                repository: RepositorySpec {
                    url: (sub.repository != "<default>").then(|| sub.repository.clone()),
                    password: (sub.repository != "<default>").then(|| sub.password.clone()),
                    env: sub.env.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect(),
                    ..Default::default()
                },
                interval: sub.interval_seconds,
            };
            for v in &volumes {
                let key = short_hash(&[&sub.repository, "pv", &v.pv]);
                seen_keys.insert(key.clone());
                let existing = self.store.get_policy_by_legacy_key(&key)?;
                let path = v.mount.display().to_string();
                let needs_work = match &existing {
                    None => true,
                    Some(p) => p.status != PolicyStatus::Active || p.spec.source.path != path,
                };
                if needs_work {
                    match self.upsert_legacy(&[&sub.repository, "pv", &v.pv], &v.pv, &path, Some(v.pv.clone()), &target)
                    {
                        Ok(r) => {
                            tracing::info!(volume = %v.pv, policy = %r.id, action = r.action, "CSI volume picked up")
                        }
                        Err(e) => {
                            tracing::warn!(volume = %v.pv, error = %e, "cannot create a policy for a CSI volume")
                        }
                    }
                }
            }
        }
        for p in self.store.list_policies()? {
            let (Some(key), Some(volume)) = (&p.legacy_key, &p.volume) else {
                continue;
            };
            if p.origin == Origin::Legacy && !seen_keys.contains(key) && p.status == PolicyStatus::Active {
                tracing::warn!(policy = %p.id, volume = %volume, "CSI volume no longer mounted on this node: policy paused");
                self.policies.set_status(
                    &p.id,
                    PolicyStatus::VolumeGone,
                    Some(format!("volume {volume} is no longer mounted on this node; backups resume when it returns")),
                )?;
            }
        }
        Ok(())
    }

    /// Rescan every `rescan_interval` until cancelled.
    pub async fn rescan_loop(self, cancel: CancellationToken) {
        let every: Duration = self.config.rescan_interval;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.rescan_volumes() {
                tracing::error!(error = %e, "volume rescan failed; trying again at the next interval");
            }
        }
    }
}

fn repo_key_display(key: &str) -> String {
    soda_syncer_domain::secret::redact_url(key)
}
