//! A backup run: the source held below its root, the unchanged check,
//! the consistency step, restic, the judgement of the snapshot, retention.

use super::*;
use super::{run_error, Scheduler};
use crate::restic::{BackupRequest, ResticError};
use crate::store::{PolicyRecord, RunRecord};
use soda_syncer_domain::location::RepositoryLocation;
use soda_syncer_domain::run::{judge_backup, Progress, RunError, RunSummary};
use soda_syncer_domain::RunState;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

impl Scheduler {
    pub(crate) async fn backup(
        &self,
        policy: &PolicyRecord,
        run: &mut RunRecord,
        token: &CancellationToken,
    ) -> Result<RunState, RunError> {
        let spec = &policy.spec;
        let path = PathBuf::from(&spec.source.path);
        // Gone (a volume unmounted, a directory removed) is not "not allowed":
        // its own code, so an alert and the operator look at the right thing.
        if std::fs::symlink_metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            return Err(RunError {
                code: "source_missing".into(),
                message: format!(
                    "the source {} does not exist on this node (unmounted or removed?); restore it or change the policy's source",
                    path.display()
                ),
            });
        }
        // Resolved now, not at admission: the volume or its parents may
        // have been swapped for a link since. (Not held open: a volume
        // being unmounted must not find it busy while the run waits.)
        let mut exclude = spec.exclude.clone();
        exclude.push(format!("{RESTORE_STAGING_PREFIX}*"));
        exclude.push(crate::consistency::SCRATCH_DIR.into());
        let (source_id, digest) = {
            let (_, source_dir) = open_source(&self.inner.config, &path)?;
            let id = source_dir.stat().map(|st| (st.st_dev, st.st_ino)).ok();
            // Before hooks, freeze or snapshot: an unchanged volume needs none.
            match self.verify_unchanged(policy, run, &source_dir, &exclude).await {
                crate::scheduler::verify::Verdict::Unchanged => return Ok(RunState::Succeeded),
                crate::scheduler::verify::Verdict::Real(digest) => (id, digest),
            }
        };
        let repo = self.repo_for(policy).await?;
        let policy_tag = format!("policy={}", policy.id);
        let mut tags = vec!["soda-syncer".to_string(), policy_tag.clone()];
        if let Some(v) = &policy.volume {
            tags.push(format!("volume={v}"));
        }
        tags.extend(spec.tags.iter().cloned());
        let mut req = BackupRequest { path, tags, exclude, pin: None, ignore_inode: false };
        let live = &self.inner.live;
        let run_id = run.id.clone();
        let mut on_progress = |s: &soda_syncer_domain::restic_json::BackupStatus| {
            live.lock().unwrap_or_else(|p| p.into_inner()).insert(run_id.clone(), Progress::from(s));
        };
        let shared = self.repo_lock(&repo, false, run, token).await?;
        // The point-in-time view (hooks, snapshot or freeze), restic on it,
        // then its release, which thaws and cleans up whatever restic did.
        let ctx = crate::consistency::Context {
            run_id: run.id.clone(),
            policy_id: policy.id.clone(),
            policy_name: spec.name.clone(),
            volume: policy.volume.clone(),
            source: req.path.clone(),
            spec: spec.consistency.clone(),
            repository: RepositoryLocation::parse(&repo.url).local_path().map(Path::to_path_buf),
            source_id,
        };
        let first = self.inner.store.last_clean_backup(&policy.id).ok().flatten().is_none();
        if first && spec.consistency.mode == soda_syncer_domain::policy::ConsistencyMode::Fsfreeze {
            // Creating the repository takes seconds: not while the volume is frozen.
            let _ = self.inner.restic.init(&repo, token).await;
        }
        // Application hooks in the pods using the claim: pre now, post once
        // the point-in-time view exists (or after restic for a live backup).
        let mut pod_hooks = self.pod_hooks_pre(policy, token).await?;
        run.warning = pod_hooks.warning();
        let prepared =
            match crate::consistency::prepare(ctx, &self.inner.consistency, &self.inner.config.consistency(), token)
                .await
            {
                Ok(p) => p,
                Err(f) => {
                    pod_hooks.post().await;
                    run.consistency = f.report.and_then(|r| serde_json::to_value(r).ok());
                    return Err(consistency_error(&f.error));
                }
            };
        // A snapshot exists now; a live backup or a freeze lasts through restic.
        use soda_syncer_domain::consistency::Method;
        if !matches!(prepared.method(), Method::None | Method::Fsfreeze) {
            pod_hooks.post().await;
        }
        // restic reads the directory just checked (or the view made of it)
        // through a pin: at the volume's path, read-only, following no link.
        // Resolved once more at the moment of use: still the directory checked.
        let pinned = match open_source(&self.inner.config, &req.path) {
            Ok((_, source)) if source.stat().map(|st| (st.st_dev, st.st_ino)).ok() != source_id => Err(RunError {
                code: "source_not_allowed".into(),
                message: format!(
                    "the backup was refused: {} is no longer the directory the run checked (it was swapped)",
                    req.path.display()
                ),
            }),
            Ok((root, source)) => prepared
                .view_dir()
                .and_then(|view| pin_for_backup(&root, &source, view.as_ref(), &req.path))
                .map_err(|e| RunError { code: "source_not_allowed".into(), message: e.to_string() }),
            Err(e) => Err(e),
        };
        match pinned {
            Ok(pin) => req.pin = pin.map(Arc::new),
            Err(e) => {
                let released = prepared.release().await;
                pod_hooks.post().await;
                run.consistency = serde_json::to_value(&released.report).ok();
                return Err(e);
            }
        }
        req.ignore_inode = prepared.ignore_inode();
        let consistency_warning = prepared.warning().map(str::to_string);
        let restic_token = prepared.restic_token().clone();
        let backed_up = self.inner.restic.backup(&repo, &req, &restic_token, &mut on_progress).await;
        // The pin holds the view open: closed before the view is unmounted.
        req.pin = None;
        let released = prepared.release().await;
        pod_hooks.post().await;
        drop(shared);
        run.consistency = serde_json::to_value(&released.report).ok();
        let post_hook_error = match released.error {
            Some(e @ crate::consistency::ConsistencyError::PostHook { .. }) => Some(e),
            // A freeze past its limit or a failed thaw: the snapshot is not one instant.
            Some(e) => {
                let mut err = consistency_error(&e);
                if let Ok(o) = &backed_up {
                    err.message.push_str(&format!(
                        "; restic finished snapshot {} anyway, which may mix moments: do not rely on it",
                        o.summary.snapshot_id
                    ));
                }
                return Err(err);
            }
            None => None,
        };
        let outcome = backed_up.map_err(run_error)?;

        let mut summary = RunSummary::from(&outcome.summary);
        summary.unreadable = outcome.unreadable.clone();
        let previous = self
            .inner
            .store
            .last_clean_backup(&policy.id)
            .ok()
            .flatten()
            .and_then(|r| r.summary)
            .map(|s| (s.total_files_processed, s.total_bytes_processed));
        let (state, warning) = judge_backup(
            outcome.partial,
            outcome.summary.total_files_processed,
            outcome.summary.total_bytes_processed,
            previous,
            self.inner.config.suspicious_drop_fraction,
        );
        run.warning = match (consistency_warning, warning) {
            (Some(c), Some(w)) => Some(format!("{c}; {w}")),
            (c, w) => c.or(w),
        };
        if let Some(h) = pod_hooks.warning() {
            run.warning = Some(run.warning.take().map_or(h.clone(), |w| format!("{w}; {h}")));
        }
        let short_id: String = outcome.summary.snapshot_id.chars().take(8).collect();
        run.snapshot_id = Some(outcome.summary.snapshot_id.clone());

        // Retention: forget this policy's old snapshots. A suspicious
        // snapshot must not push a good one out, so retention waits for a
        // clean backup.
        let keep = spec.retention.forget_args();
        // restic 0.15+ prints the full id in its summary; 0.14 only the short
        // one, which is resolved below (after forget, which lists it anyway).
        let mut full_id = outcome.summary.full_snapshot_id().map(str::to_string);
        if !keep.is_empty() && state == RunState::Succeeded && self.append_only(spec, &repo) {
            summary.retention = Some(RETENTION_DELEGATED.into());
        } else if !keep.is_empty() && state == RunState::Succeeded {
            // forget takes restic's exclusive lock: wait for this agent's other
            // runs on the repository instead of colliding with them.
            let _exclusive = self.repo_lock(&repo, true, run, token).await?;
            match self.inner.restic.forget(&repo, &policy_tag, &keep, token).await {
                Ok(groups) => {
                    summary.snapshots_forgotten = groups.iter().map(|g| g.removed().len() as u64).sum();
                    full_id = full_id.or_else(|| {
                        groups
                            .iter()
                            .flat_map(|g| g.kept())
                            .find(|s| s.short_id == short_id || s.id.starts_with(&short_id))
                            .map(|s| s.id.clone())
                    });
                }
                // Found out now: not this run's failure, the maintainer's job.
                Err(ResticError::DeletesRefused { .. }) => summary.retention = Some(RETENTION_DELEGATED.into()),
                Err(e) => {
                    run.summary = Some(summary);
                    return Err(RunError {
                        code: "retention_failed".into(),
                        message: format!("the snapshot {short_id} was written, but applying retention failed: {e}"),
                    });
                }
            }
        }
        if full_id.is_none() {
            full_id = self.inner.restic.resolve_snapshot_id(&repo, &short_id, token).await;
        }
        if let Some(id) = full_id {
            run.snapshot_id = Some(id);
            // The path the snapshot holds, so a restore of it needs no
            // `restic snapshots` (see `latest_from_records`).
            run.params = Some(serde_json::json!({ "path": req.path }));
        }
        run.summary = Some(summary);
        if let Some(e) = post_hook_error {
            return Err(RunError {
                code: e.kind().into(),
                message: format!("the snapshot {short_id} was written, but {e}"),
            });
        }
        if let Some(e) = pod_hooks.post_error() {
            return Err(RunError {
                code: "post_hook_failed".into(),
                message: format!("the snapshot {short_id} was written, but {e}"),
            });
        }
        self.record_unchanged_basis(policy, run, state, digest);
        Ok(state)
    }
}

/// The policy's source, resolved at the moment of use below its allowed
/// root: the root and the source, held open.
pub(super) fn open_source(
    config: &crate::config::Config,
    path: &Path,
) -> Result<(crate::beneath::Dir, crate::beneath::Dir), RunError> {
    crate::beneath::open_under(&config.allowed_roots_in_effect(), path, ALLOWED_ROOT_HINT).map_err(|e| {
        let code = match e {
            crate::beneath::PathError::Missing { .. } | crate::beneath::PathError::NotDirectory { .. } => {
                "source_missing"
            }
            _ => "source_not_allowed",
        };
        RunError { code: code.into(), message: format!("the backup was refused: {e}") }
    })
}

/// What restic reads for a backup: `view` (or the source itself) mounted
/// at the source's path in its own mount namespace. Only root can; an
/// agent running as another user reads by name, with that user's rights.
pub(super) fn pin_for_backup(
    root: &crate::beneath::Dir,
    source: &crate::beneath::Dir,
    view: Option<&crate::beneath::Dir>,
    path: &Path,
) -> Result<Option<crate::beneath::Pin>, crate::beneath::PathError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    crate::beneath::Pin::read_only(view.unwrap_or(source), root, path).map(Some)
}

/// Total size and count of the regular files below `dir`.
pub(super) fn tree_size(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                bytes += m.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}
