//! The upstream `POST /snapshot` contract, kept for soda-proxy: the body,
//! turned into policies of origin `legacy`. An explicit source becomes one
//! policy; an empty one subscribes the repository to every CSI volume on
//! this node, now and later (the rescan loop adds volumes that appear and
//! pauses the policies of volumes that go away).

use chrono::Utc;
use serde::{Deserialize, Serialize};
use soda_syncer_domain::policy::{validate_abs_path, FieldError, RepositorySpec, SourceSpec};
use soda_syncer_domain::schedule::{ScheduleSpec, MAX_INTERVAL_SECONDS};
use soda_syncer_domain::{Origin, PolicySpec, Secret};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::policies::PolicyError;
use super::Scheduler;
use crate::ids::{new_id, short_hash};
use crate::kubelet::{scan_csi_volumes, CsiVolume};
use crate::store::{PolicyStatus, Subscription};

/// The upstream body, field names exactly as soda-proxy sends them.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LegacySnapshotRequest {
    #[serde(rename = "AWS_ACCESS_KEY_ID", default)]
    #[schema(write_only, value_type = Option<String>, format = Password)]
    pub aws_access_key_id: Option<Secret>,
    #[serde(rename = "AWS_SECRET_ACCESS_KEY", default)]
    #[schema(write_only, value_type = Option<String>, format = Password)]
    pub aws_secret_access_key: Option<Secret>,
    /// A restic repository URL; empty or absent means the agent's default repository.
    #[serde(rename = "RESTIC_REPOSITORY", default)]
    pub restic_repository: Option<String>,
    /// Required with `RESTIC_REPOSITORY`.
    #[serde(rename = "RESTIC_PASSWORD", default)]
    #[schema(write_only, value_type = Option<String>, format = Password)]
    pub restic_password: Option<Secret>,
    /// Seconds between backups (1 s to 31 days).
    #[serde(rename = "timeInterval")]
    #[schema(minimum = 1, maximum = 2678400)]
    pub time_interval: i64,
    /// An absolute path on this node; empty or absent means every CSI volume
    /// mounted on this node, now and later.
    #[serde(rename = "resticSourceRepo", default)]
    pub restic_source_repo: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegacyPolicyRef {
    pub id: String,
    pub name: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// "created" or "updated".
    #[schema(value_type = String, example = "created")]
    pub action: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegacySnapshotResponse {
    pub message: String,
    pub policies: Vec<LegacyPolicyRef>,
    /// For an empty `resticSourceRepo`: volumes that appear later on this
    /// node are picked up by this subscription.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription: Option<String>,
}

impl LegacySnapshotRequest {
    /// The body as the proxy sent it (secrets included), for handing it on
    /// to the other nodes' agents.
    pub fn to_wire(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<&str>| {
            if let Some(v) = v {
                m.insert(k.into(), v.into());
            }
        };
        put("AWS_ACCESS_KEY_ID", self.aws_access_key_id.as_ref().map(Secret::expose));
        put("AWS_SECRET_ACCESS_KEY", self.aws_secret_access_key.as_ref().map(Secret::expose));
        put("RESTIC_REPOSITORY", self.restic_repository.as_deref());
        put("RESTIC_PASSWORD", self.restic_password.as_ref().map(Secret::expose));
        put("resticSourceRepo", self.restic_source_repo.as_deref());
        m.insert("timeInterval".into(), self.time_interval.into());
        m
    }
}

/// Hands a legacy call for "every volume" on to the agents of the other
/// nodes (the proxy reaches only the agent on its own node).
pub trait LegacyPublisher: Send + Sync {
    fn publish(&self, body: serde_json::Map<String, serde_json::Value>);
}

/// What a legacy body asks for, validated.
struct LegacyTarget {
    repository: RepositorySpec,
    interval: u64,
}

impl Scheduler {
    fn legacy_target(&self, req: &LegacySnapshotRequest) -> Result<LegacyTarget, FieldError> {
        if !(1..=MAX_INTERVAL_SECONDS as i64).contains(&req.time_interval) {
            return Err(FieldError::new(
                "timeInterval",
                format!("timeInterval must be between 1 and {MAX_INTERVAL_SECONDS} seconds; got {}", req.time_interval),
            ));
        }
        let mut env = BTreeMap::new();
        if let Some(k) = req.aws_access_key_id.clone().filter(|s| !s.is_empty()) {
            env.insert("AWS_ACCESS_KEY_ID".to_string(), Some(k));
        }
        if let Some(k) = req.aws_secret_access_key.clone().filter(|s| !s.is_empty()) {
            env.insert("AWS_SECRET_ACCESS_KEY".to_string(), Some(k));
        }
        let url = req.restic_repository.clone().filter(|u| !u.trim().is_empty());
        let password = req.restic_password.clone().filter(|p| !p.is_empty());
        if url.is_some() && password.is_none() {
            return Err(FieldError::new(
                "RESTIC_PASSWORD",
                "RESTIC_PASSWORD is required with RESTIC_REPOSITORY (set it in the SODA profile's customProperties)",
            ));
        }
        let mut repository = RepositorySpec { url, password, env, ..Default::default() };
        if repository.url.is_none() {
            // The agent's default repository (its own password).
            repository.password = None;
        }
        Ok(LegacyTarget { repository, interval: req.time_interval as u64 })
    }

    fn legacy_spec(&self, name: String, path: &str, target: &LegacyTarget) -> PolicySpec {
        PolicySpec {
            name,
            source: SourceSpec { path: path.to_string() },
            repository: target.repository.clone(),
            schedule: ScheduleSpec { interval_seconds: Some(target.interval), ..Default::default() },
            jitter_seconds: 0,
            retention: Default::default(),
            append_only: false,
            consistency: Default::default(),
            exclude: Vec::new(),
            tags: Vec::new(),
            paused: false,
            drill: None,
            id: None,
            origin: None,
            created_at: None,
            updated_at: None,
            next_run_at: None,
            last_run: None,
            status: None,
            volume: None,
            paused_by_user: None,
            consecutive_failures: None,
            secrets_unavailable: None,
            maintenance_lease: None,
        }
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
        if let Some(existing) = self.store().get_policy_by_legacy_key(&key)? {
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
            let p = if spec != existing.spec || moved { self.replace_policy(&existing.id, spec)? } else { existing };
            if p.status != PolicyStatus::Active {
                self.set_status(&p.id, PolicyStatus::Active, None)?;
            }
            return Ok(LegacyPolicyRef {
                id: p.id,
                name: p.spec.name,
                source: path.to_string(),
                volume,
                action: "updated",
            });
        }
        let name = legacy_name(name_hint, &key);
        let p = self.create_policy(self.legacy_spec(name, path, target), Origin::Legacy, volume.clone(), Some(key))?;
        Ok(LegacyPolicyRef { id: p.id, name: p.spec.name, source: path.to_string(), volume, action: "created" })
    }

    /// Set once, by the Kubernetes adapter.
    pub fn set_legacy_publisher(&self, p: std::sync::Arc<dyn LegacyPublisher>) {
        let _ = self.inner.legacy_publisher.set(p);
    }

    /// Handle one `POST /snapshot`. Never waits for a volume or a backup.
    /// A call for every volume is also handed on to the other nodes.
    pub fn legacy_snapshot(&self, req: LegacySnapshotRequest) -> Result<LegacySnapshotResponse, PolicyError> {
        let wire = req.to_wire();
        let every_volume = req.restic_source_repo.as_deref().is_none_or(str::is_empty);
        let mut resp = self.apply_legacy(req)?;
        if let (true, Some(p)) = (every_volume, self.inner.legacy_publisher.get()) {
            p.publish(wire);
            resp.message.push_str("; the request was handed on to the agents of every node");
        }
        Ok(resp)
    }

    /// Apply a legacy call on this node only.
    pub fn apply_legacy(&self, req: LegacySnapshotRequest) -> Result<LegacySnapshotResponse, PolicyError> {
        let target = self.legacy_target(&req)?;
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
                self.store().upsert_subscription(&sub)?;
                let volumes = scan_csi_volumes(&self.config().kubelet_dir, self.config().require_mountpoints);
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
                        self.config().kubelet_dir.display(),
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
        let subs = self.store().list_subscriptions()?;
        if subs.is_empty() {
            return Ok(());
        }
        let volumes: Vec<CsiVolume> = scan_csi_volumes(&self.config().kubelet_dir, self.config().require_mountpoints);
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
                let existing = self.store().get_policy_by_legacy_key(&key)?;
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
        for p in self.store().list_policies()? {
            let (Some(key), Some(volume)) = (&p.legacy_key, &p.volume) else {
                continue;
            };
            if p.origin == Origin::Legacy && !seen_keys.contains(key) && p.status == PolicyStatus::Active {
                tracing::warn!(policy = %p.id, volume = %volume, "CSI volume no longer mounted on this node: policy paused");
                self.set_status(
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
        let every: Duration = self.config().rescan_interval;
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

/// `legacy-<hint>-<hash>`, cut to fit the name rule.
fn legacy_name(hint: &str, key: &str) -> String {
    let clean: String = hint
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let clean = clean.trim_matches('-');
    let clean = if clean.len() > 44 { &clean[..44] } else { clean };
    let clean = clean.trim_matches('-');
    if clean.is_empty() {
        format!("legacy-{}", &key[..8])
    } else {
        format!("legacy-{clean}-{}", &key[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_are_valid_policy_names() {
        for hint in ["pvc-0a1b", "weird name; rm -rf /", "", "---", &"x".repeat(200)] {
            let n = legacy_name(hint, "0123456789abcdef");
            soda_syncer_domain::policy::validate_name(&n).unwrap_or_else(|e| panic!("{hint:?} -> {n:?}: {e}"));
        }
    }

    #[test]
    fn the_upstream_body_parses_exactly() {
        let body = r#"{"AWS_ACCESS_KEY_ID":"AKIA","AWS_SECRET_ACCESS_KEY":"s","RESTIC_REPOSITORY":"s3:h/b","RESTIC_PASSWORD":"p","timeInterval":3600,"resticSourceRepo":""}"#;
        let r: LegacySnapshotRequest = serde_json::from_str(body).unwrap();
        assert_eq!(r.time_interval, 3600);
        assert_eq!(r.restic_source_repo.as_deref(), Some(""));
        assert!(serde_json::from_str::<LegacySnapshotRequest>(r#"{"timeInterval":1,"extra":1}"#).is_err());
    }
}
