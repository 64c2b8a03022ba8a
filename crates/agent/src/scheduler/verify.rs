//! Scheduled backups of volumes proven unchanged (README, "Unchanged
//! volumes"). Before a backup's consistency step, a scheduled run that
//! may (see `soda_syncer_domain::unchanged::may_verify`) proves the volume
//! unchanged since the last clean real backup, and is then recorded
//! `succeeded` and `unchanged`, pointing to that snapshot, and no restic
//! process, hook, freeze or snapshot runs. Two proofs, cheapest first:
//!
//! - btrfs: when the source is the root of a subvolume with nothing nested
//!   or mounted inside, its committed generation (after a syncfs) equal to
//!   the one read before the last real backup proves that its tree was not
//!   modified, without a walk (see `crate::btrfs::committed_generation`).
//! - Otherwise, or when the generation moved (an excluded file, the
//!   agent's own snapshots, any write): the metadata walk, whose digest
//!   must equal the one taken before that backup.
//!
//! The generation and digest taken now become the basis for later runs
//! once the real backup ends clean; a walk that proves the volume
//! unchanged moves the basis to the generation read before it.

use chrono::Utc;
use soda_syncer_domain::run::RunSummary;
use soda_syncer_domain::unchanged::{may_verify, Basis, ExcludeSet, Situation, UnchangedProof, UnchangedRun};
use soda_syncer_domain::{Origin, RunKind, RunState};

use super::Scheduler;
use crate::beneath::Dir;
use crate::btrfs::SubvolumeGeneration;
use crate::ids::fmt_time;
use crate::store::{PolicyRecord, RunFilter, RunRecord, UnchangedBasis};
use crate::unchanged::{digest_volume, VolumeDigest};

/// What the check before a backup found.
pub(crate) enum Verdict {
    /// The run is recorded as unchanged (its fields are set); it is done.
    Unchanged,
    /// restic must run; what was taken now, to record if it ends clean.
    Real(Option<Taken>),
}

/// Taken before a real backup: the walk's digest, and the subvolume's
/// generation (read first: a change after it moves it).
pub(crate) struct Taken {
    digest: VolumeDigest,
    generation: Option<SubvolumeGeneration>,
}

/// The basis's `digest` column: the walk's digest, then, when the source
/// is a btrfs subvolume, its generation (`<hex> btrfs:<tree>:<uuid>:<gen>`).
/// One column for both keeps the schema (and migration 6) as it is; a
/// basis written before this format is a digest alone.
fn encode_basis(t: &Taken) -> String {
    match &t.generation {
        Some(g) => format!("{} {}", t.digest.hex, g.encode()),
        None => t.digest.hex.clone(),
    }
}

fn decode_basis(s: &str) -> (&str, Option<SubvolumeGeneration>) {
    match s.split_once(' ') {
        Some((hex, g)) => (hex, SubvolumeGeneration::parse(g)),
        None => (s, None),
    }
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
        let started = std::time::Instant::now();
        // The generation first (a syncfs, then one ioctl): read before the
        // walk, and before restic reads anything, a change made after it
        // moves it.
        let generation = match source.try_clone() {
            Ok(root) => tokio::task::spawn_blocking(move || {
                let real = std::fs::read_link(root.proc_path()).unwrap_or_else(|_| root.path().to_path_buf());
                crate::btrfs::committed_generation(root.raw_fd(), real.as_os_str().as_encoded_bytes())
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("reading the generation panicked: {e}"))),
            Err(e) => Err(e.to_string()),
        };
        let generation_ms = started.elapsed().as_millis() as u64;
        let (basis_hex, basis_generation) = match &basis {
            Some(b) => {
                let (hex, g) = decode_basis(&b.digest);
                (Some(hex.to_string()), g)
            }
            None => (None, None),
        };
        match (&generation, &decision, &basis, &basis_generation) {
            (Ok(now), Ok(()), Some(b), Some(then)) if now == then => {
                let entries = b.entries;
                self.mark_unchanged(run, b, entries, generation_ms, UnchangedProof::BtrfsGeneration);
                return Verdict::Unchanged;
            }
            (Ok(now), _, _, then) => tracing::debug!(
                generation = now.generation,
                basis = then.as_ref().map(|g| g.generation),
                generation_ms,
                "btrfs subvolume generation read"
            ),
            (Err(why), _, _, _) => tracing::debug!(reason = %why, "no btrfs generation shortcut: walking"),
        }
        let generation = generation.ok();
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
        let taken = Taken { digest, generation };
        if let Err(why) = decision {
            tracing::info!(reason = why.as_str(), entries = taken.digest.entries, walk_ms, "a real backup");
            return real(Some(taken));
        }
        let basis = basis.expect("may_verify needs a basis");
        if basis_hex.as_deref() != Some(taken.digest.hex.as_str()) {
            tracing::info!(
                entries = taken.digest.entries,
                walk_ms,
                "the volume changed since the last backup: running restic"
            );
            return real(Some(taken));
        }
        if taken.generation.is_some() && taken.generation != basis_generation {
            // Nothing restic backs up changed up to the walk, and any
            // change after the generation was read moves it again: the
            // next runs compare with this generation and need no walk.
            let moved = UnchangedBasis { digest: encode_basis(&taken), ..basis.clone() };
            if let Err(e) = store.set_unchanged_basis(&moved) {
                tracing::warn!(error = %e, "cannot record the subvolume's new generation; the next run walks again");
            }
        }
        self.mark_unchanged(run, &basis, taken.digest.entries, walk_ms, UnchangedProof::Walk);
        Verdict::Unchanged
    }

    /// Record `run` as unchanged since the snapshot of `basis`.
    fn mark_unchanged(
        &self,
        run: &mut RunRecord,
        basis: &UnchangedBasis,
        entries: u64,
        check_ms: u64,
        proof: UnchangedProof,
    ) {
        let marker = UnchangedRun {
            snapshot_id: basis.snapshot_id.clone(),
            backed_up_at: fmt_time(basis.backed_up_at),
            verified_at: fmt_time(Utc::now()),
            entries,
            walk_ms: check_ms,
            proof,
        };
        tracing::info!(snapshot = %basis.snapshot_id, entries, check_ms, proof = proof.as_str(), "{}", marker.describe());
        run.snapshot_id = Some(basis.snapshot_id.clone());
        // As a real backup records it, so "latest" restores find the path.
        run.params = Some(serde_json::json!({ "path": basis.path }));
        let (files, bytes) =
            basis.summary.as_ref().map_or((0, 0), |s| (s.total_files_processed, s.total_bytes_processed));
        run.summary = Some(RunSummary {
            files_unmodified: files,
            total_files_processed: files,
            total_bytes_processed: bytes,
            total_duration: check_ms as f64 / 1000.0,
            ..Default::default()
        });
        run.unchanged = Some(marker);
    }

    /// After a real backup that ended clean: the digest and generation
    /// taken before it become what later scheduled runs compare with.
    pub(crate) fn record_unchanged_basis(
        &self,
        policy: &PolicyRecord,
        run: &RunRecord,
        state: RunState,
        taken: Option<Taken>,
    ) {
        let (Some(t), Some(snapshot), RunState::Succeeded) = (taken, run.snapshot_id.clone(), state) else {
            return;
        };
        let basis = UnchangedBasis {
            policy_id: policy.id.clone(),
            digest: encode_basis(&t),
            entries: t.digest.entries,
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
