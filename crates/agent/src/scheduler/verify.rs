//! Scheduled backups of volumes proven unchanged (README, "Unchanged
//! volumes"). Before a backup's consistency step, a scheduled run that
//! may (see `soda_syncer_domain::unchanged::may_verify`) walks the volume's
//! metadata; when its digest equals the one taken before the last clean
//! real backup, the run is recorded `succeeded` and `unchanged`, pointing
//! to that snapshot, and no restic process, hook, freeze or snapshot runs.
//! Otherwise the digest just taken becomes the basis for later runs once
//! the real backup ends clean.

use chrono::Utc;
use soda_syncer_domain::run::RunSummary;
use soda_syncer_domain::unchanged::{may_verify, Basis, ExcludeSet, Situation, UnchangedRun};
use soda_syncer_domain::{Origin, RunKind, RunState};

use super::Scheduler;
use crate::beneath::Dir;
use crate::ids::fmt_time;
use crate::store::{PolicyRecord, RunFilter, RunRecord, UnchangedBasis};
use crate::unchanged::{digest_volume, VolumeDigest};

/// What the check before a backup found.
pub(crate) enum Verdict {
    /// The run is recorded as unchanged (its fields are set); it is done.
    Unchanged,
    /// restic must run; the digest taken now, to record if it ends clean.
    Real(Option<VolumeDigest>),
}

impl Scheduler {
    pub(crate) async fn verify_unchanged(
        &self,
        policy: &PolicyRecord,
        run: &mut RunRecord,
        source: &Dir,
        exclude: &[String],
    ) -> Verdict {
        let store = &self.inner.store;
        let spec = &policy.spec;
        let has_hooks = self.has_hooks(policy);
        let wanted = spec.verify_unchanged && !has_hooks;
        let basis = store.unchanged_basis(&policy.id).ok().flatten();
        let fingerprint = spec_fingerprint(policy);
        let previous_backup = store
            .list_runs(&RunFilter {
                policy_id: Some(policy.id.clone()),
                kind: Some(RunKind::Backup),
                limit: 2,
                ..Default::default()
            })
            .ok()
            .and_then(|runs| runs.into_iter().find(|r| r.id != run.id))
            .map(|r| r.state);
        let domain_basis = basis.as_ref().map(|b| Basis {
            agent_instance: b.agent_instance.clone(),
            spec_fingerprint: b.spec_fingerprint.clone(),
            backed_up_at: b.backed_up_at,
        });
        let now = Utc::now();
        let decision = may_verify(&Situation {
            verify_unchanged: spec.verify_unchanged,
            trigger: run.trigger,
            has_hooks,
            basis: domain_basis.as_ref(),
            agent_instance: &self.inner.instance,
            spec_fingerprint: &fingerprint,
            previous_backup,
            now,
            full_backup_every: chrono::Duration::from_std(self.inner.config.full_backup_every)
                .unwrap_or(chrono::Duration::MAX),
        });
        // A real backup starts below: until it ends clean, nothing can be
        // proven unchanged against the one before it.
        let real = |digest| {
            if let Err(e) = store.clear_unchanged_basis(&policy.id) {
                tracing::warn!(error = %e, "cannot clear the digest of the last real backup");
            }
            Verdict::Real(digest)
        };
        if !wanted {
            return real(None);
        }
        // Walked also when the run must be real anyway, so the next
        // scheduled run has a digest to compare with.
        let started = std::time::Instant::now();
        let walked = match source.try_clone() {
            Ok(root) => {
                let set = ExcludeSet::new(exclude);
                tokio::task::spawn_blocking(move || digest_volume(&root, &set).map_err(|e| e.to_string()))
                    .await
                    .unwrap_or_else(|e| Err(format!("the walk panicked: {e}")))
            }
            Err(e) => Err(e.to_string()),
        };
        let walk_ms = started.elapsed().as_millis() as u64;
        let digest = match walked {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(error = %e, "the metadata walk failed: running restic");
                return real(None);
            }
        };
        if let Err(why) = decision {
            tracing::info!(reason = why.as_str(), entries = digest.entries, walk_ms, "a real backup");
            return real(Some(digest));
        }
        let basis = basis.expect("may_verify needs a basis");
        if basis.digest != digest.hex {
            tracing::info!(
                entries = digest.entries,
                walk_ms,
                "the volume changed since the last backup: running restic"
            );
            return real(Some(digest));
        }
        let verified_at = Utc::now();
        let marker = UnchangedRun {
            snapshot_id: basis.snapshot_id.clone(),
            backed_up_at: fmt_time(basis.backed_up_at),
            verified_at: fmt_time(verified_at),
            entries: digest.entries,
            walk_ms,
        };
        tracing::info!(snapshot = %basis.snapshot_id, entries = digest.entries, walk_ms, "{}", marker.describe());
        run.snapshot_id = Some(basis.snapshot_id.clone());
        // As a real backup records it, so "latest" restores find the path.
        run.params = Some(serde_json::json!({ "path": basis.path }));
        let (files, bytes) =
            basis.summary.as_ref().map_or((0, 0), |s| (s.total_files_processed, s.total_bytes_processed));
        run.summary = Some(RunSummary {
            files_unmodified: files,
            total_files_processed: files,
            total_bytes_processed: bytes,
            total_duration: walk_ms as f64 / 1000.0,
            ..Default::default()
        });
        run.unchanged = Some(marker);
        Verdict::Unchanged
    }

    /// After a real backup that ended clean: the digest taken before it
    /// becomes what later scheduled runs compare with.
    pub(crate) fn record_unchanged_basis(
        &self,
        policy: &PolicyRecord,
        run: &RunRecord,
        state: RunState,
        digest: Option<VolumeDigest>,
    ) {
        let (Some(d), Some(snapshot), RunState::Succeeded) = (digest, run.snapshot_id.clone(), state) else {
            return;
        };
        let basis = UnchangedBasis {
            policy_id: policy.id.clone(),
            digest: d.hex,
            entries: d.entries,
            spec_fingerprint: spec_fingerprint(policy),
            agent_instance: self.inner.instance.clone(),
            run_id: run.id.clone(),
            snapshot_id: snapshot,
            path: policy.spec.source.path.clone(),
            backed_up_at: run.started_at.unwrap_or_else(Utc::now),
            summary: run.summary.clone(),
        };
        if let Err(e) = self.inner.store.set_unchanged_basis(&basis) {
            tracing::warn!(error = %e, "cannot record the digest of this backup; the next scheduled run runs restic");
        }
    }

    /// Policy hooks (pre/post commands) or pod hooks may flush state the
    /// walk cannot see: such a policy always runs them, and restic.
    fn has_hooks(&self, policy: &PolicyRecord) -> bool {
        let hooks = &policy.spec.consistency.hooks;
        if !hooks.pre.is_empty() || !hooks.post.is_empty() {
            return true;
        }
        let claim = match (&policy.origin, &policy.legacy_key) {
            (Origin::Kubernetes, Some(k)) => k.strip_prefix("kube:").unwrap_or(k),
            _ => return false,
        };
        let Some(runner) = self.inner.pod_hooks.get() else { return false };
        match runner.hooks_for(claim) {
            Ok(sets) => sets.iter().any(|s| s.pre.is_some() || s.post.is_some()),
            // Unreadable hook annotations: the real backup reports them.
            Err(_) => true,
        }
    }
}

/// The policy as it is, without its secrets' values: any change of it
/// (source, excludes, repository, schedule, consistency...) forces a real
/// backup. Secrets are left out so that no hash of them is stored.
fn spec_fingerprint(policy: &PolicyRecord) -> String {
    let mut spec = policy.spec.clone();
    spec.repository.password = None;
    for v in spec.repository.env.values_mut() {
        *v = None;
    }
    spec.repository.url = spec.repository.url.as_deref().map(soda_syncer_domain::secret::redact_url);
    let json = serde_json::to_vec(&(&spec, &policy.volume)).unwrap_or_default();
    let hash = ring::digest::digest(&ring::digest::SHA256, &json);
    hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(spec: serde_json::Value) -> PolicyRecord {
        let mut p = PolicyRecord::new(Origin::Api, serde_json::from_value(spec).unwrap(), None, None, Utc::now());
        p.id = "p".into();
        p
    }

    fn spec(password: &str, exclude: &[&str]) -> serde_json::Value {
        json!({
            "name": "v", "source": {"path": "/data"}, "schedule": {"intervalSeconds": 60}, "exclude": exclude,
            "repository": {"url": "rest:http://u:pw@127.0.0.1:1/r/", "password": password, "env": {"AWS_SECRET_ACCESS_KEY": password}}
        })
    }

    #[test]
    fn the_fingerprint_follows_the_policy_but_not_its_secret_values() {
        let a = spec_fingerprint(&record(spec("one", &[])));
        assert_eq!(a, spec_fingerprint(&record(spec("two", &[]))), "a new password is no new policy");
        assert_ne!(a, spec_fingerprint(&record(spec("one", &["*.tmp"]))), "a new exclude is");
        let mut other = spec("one", &[]);
        other["verifyUnchanged"] = json!(false);
        assert_ne!(a, spec_fingerprint(&record(other)));
    }
}
