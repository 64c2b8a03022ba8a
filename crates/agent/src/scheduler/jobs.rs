//! What each kind of run does: backup (with retention), restore, and
//! repository maintenance (forget, prune, check). Runs that share a
//! repository coordinate through a per-repository lock: backups and
//! restores share it, forget/prune/check take it alone, so a prune waits
//! for backups in flight and queued backups wait for the prune, instead of
//! failing on restic's own lock.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use soda_syncer_domain::run::{judge_backup, Progress, RunError, RunSummary};
use soda_syncer_domain::{RunKind, RunState};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::{run_error, RunRequestError, Scheduler};
use crate::restic::{BackupRequest, Repo, ResticError, RestoreRequest};
use crate::store::{PolicyRecord, RunRecord};
use soda_syncer_domain::field::FieldError;
use soda_syncer_domain::location::RepositoryLocation;
use soda_syncer_domain::policy::validate_abs_path;
use soda_syncer_domain::restic_json::Snapshot;
use soda_syncer_domain::restore::RestoreStatus;
use soda_syncer_domain::RunTrigger;

/// `POST /v1/policies/{id}/restore`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreParams {
    /// `latest` (the policy's newest snapshot) or a snapshot id (full or short).
    #[serde(default = "latest")]
    pub snapshot: String,
    /// An absolute directory that does not exist or is empty; default: a new
    /// directory under the agent's state directory. Ignored with `inPlace`.
    #[serde(default)]
    pub target: Option<String>,
    /// Sub-paths of the volume to restore (relative to the volume's root).
    #[serde(default)]
    pub include: Vec<String>,
    /// Restore over the live source directory (changed files are replaced).
    #[serde(default)]
    pub in_place: bool,
    /// Read every restored file back and compare it with the repository.
    #[serde(default)]
    pub verify: bool,
    /// With `inPlace`: also delete the files and directories the snapshot
    /// does not hold, so the volume ends up exactly as the snapshot (within
    /// `include`, when given). Needs restic 0.18 or newer on the node.
    #[serde(default)]
    pub delete: bool,
    /// With `inPlace`: write nothing; the run's `summary.restorePreview`
    /// lists what would be overwritten, restored and deleted. Needs restic
    /// 0.18 or newer on the node.
    #[serde(default)]
    pub dry_run: bool,
}

fn latest() -> String {
    "latest".into()
}

/// `POST /v1/policies/{id}/maintenance`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintenanceParams {
    /// Apply the policy's retention (`forget`) now.
    #[serde(default)]
    pub forget: bool,
    /// Remove unreferenced data from the repository (`prune`).
    #[serde(default)]
    pub prune: bool,
    /// Verify the repository's structure (`check`).
    #[serde(default)]
    pub check: bool,
    /// With `check`: also read this part of the data (`5%`, `1/10`, `500M`).
    #[serde(default)]
    pub read_data_subset: Option<String>,
}

impl MaintenanceParams {
    pub fn kind(&self) -> RunKind {
        if self.prune {
            RunKind::Prune
        } else if self.check {
            RunKind::Check
        } else {
            RunKind::Forget
        }
    }
}

/// Holds a repository lock for as long as it lives.
pub(crate) enum RepoGuard {
    Shared(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>),
}

fn cancelled() -> RunError {
    RunError { code: "cancelled".into(), message: "the run was cancelled".into() }
}

fn params<T: serde::de::DeserializeOwned>(run: &RunRecord) -> Result<T, RunError> {
    serde_json::from_value(run.params.clone().unwrap_or_default()).map_err(|e| RunError {
        code: "invalid_request".into(),
        message: format!("the run's parameters are unreadable: {e}"),
    })
}

fn valid_snapshot_ref(s: &str) -> bool {
    s == "latest" || ((8..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit()))
}

fn valid_subset(s: &str) -> bool {
    let num = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.');
    if let Some(p) = s.strip_suffix('%') {
        return num(p);
    }
    if let Some((a, b)) = s.split_once('/') {
        return num(a) && num(b);
    }
    let body = s.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G', 't', 'T']);
    num(body) && s.len() - body.len() <= 1
}

impl Scheduler {
    /// Check a restore request and queue it. A target that exists and is
    /// not empty is refused (unless in place), and so is an in-place
    /// restore while the policy has a run in flight.
    pub fn request_restore(&self, policy: &PolicyRecord, mut p: RestoreParams) -> Result<RunRecord, RunRequestError> {
        let invalid = |f: &str, m: String| RunRequestError::Invalid(FieldError::new(f, m));
        if !valid_snapshot_ref(&p.snapshot) {
            return Err(invalid(
                "snapshot",
                format!("{:?} is neither \"latest\" nor a snapshot id (8 to 64 hex digits)", p.snapshot),
            ));
        }
        for (i, inc) in p.include.iter().enumerate() {
            let bad = inc.is_empty()
                || inc.starts_with('/')
                || inc.split('/').any(|c| c == ".." || c == ".")
                || inc.contains('\0');
            if bad {
                return Err(invalid(
                    &format!("include[{i}]"),
                    format!("{inc:?} must be a path inside the volume, relative to its root, without '..'"),
                ));
            }
        }
        if (p.delete || p.dry_run) && !p.in_place {
            let field = if p.delete { "delete" } else { "dryRun" };
            return Err(invalid(
                field,
                format!("{field} goes with inPlace: true (a new target holds nothing to delete or overwrite)"),
            ));
        }
        if (p.delete || p.dry_run) && !restic_restores_in_place(self.inner.restic.detected_version()) {
            let field = if p.delete { "delete" } else { "dryRun" };
            return Err(invalid(field, needs_restic_in_place(&p, self.inner.restic.detected_version())));
        }
        if p.in_place {
            if p.target.as_deref().is_some_and(|t| t != policy.spec.source.path) {
                return Err(invalid(
                    "target",
                    "an in-place restore goes to the policy's source; leave target out".into(),
                ));
            }
            p.target = Some(policy.spec.source.path.clone());
        } else {
            let target = p.target.clone().unwrap_or_else(|| {
                let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
                self.config().restore_dir().join(format!("{}-{stamp}", policy.spec.name)).display().to_string()
            });
            validate_abs_path("target", &target).map_err(RunRequestError::Invalid)?;
            let path = Path::new(&target);
            if path.exists() {
                let empty = std::fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(false);
                if !empty {
                    return Err(RunRequestError::TargetNotEmpty(format!(
                        "{target} exists and is not empty: choose a new or empty directory, or restore in place with inPlace: true"
                    )));
                }
            }
            if !path.starts_with(self.config().restore_dir()) {
                let existing = path.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
                crate::admission::check_allowed(self.config(), existing).map_err(|_| {
                    let roots: Vec<String> =
                        self.config().allowed_roots_in_effect().iter().map(|r| r.display().to_string()).collect();
                    invalid(
                        "target",
                        format!(
                            "{target} is outside the allowed roots ({}); restore below one of them, leave target out (the agent's restore directory), or start the agent with --allowed-root DIR",
                            roots.join(", ")
                        ),
                    )
                })?;
            }
            p.target = Some(target);
        }
        let params = serde_json::to_value(&p).ok();
        self.request_run_with(policy, RunKind::Restore, RunTrigger::Manual, params)
    }

    /// Check a maintenance request and queue it.
    pub fn request_maintenance(
        &self,
        policy: &PolicyRecord,
        p: MaintenanceParams,
    ) -> Result<RunRecord, RunRequestError> {
        if !(p.forget || p.prune || p.check) {
            return Err(RunRequestError::Invalid(FieldError::new(
                "forget",
                "ask for at least one of forget, prune, check",
            )));
        }
        if let Some(s) = &p.read_data_subset {
            if !p.check || !valid_subset(s) {
                return Err(RunRequestError::Invalid(FieldError::new(
                    "readDataSubset",
                    format!("{s:?}: goes with check: true, as a percentage (5%), a part (1/10) or a size (500M)"),
                )));
            }
        }
        let params = serde_json::to_value(&p).ok();
        self.request_run_with(policy, p.kind(), RunTrigger::Manual, params)
    }

    /// Wait (cancellably) for this agent's lock on a repository, and
    /// record on the run how long that took (its `repositoryWaitMs`: a
    /// backup queued behind a prune says so, instead of only looking slow).
    pub(crate) async fn repo_lock(
        &self,
        repo: &Repo,
        exclusive: bool,
        run: &mut RunRecord,
        token: &CancellationToken,
    ) -> Result<RepoGuard, RunError> {
        let lock = {
            let mut locks = self.inner.repo_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks
                .entry(crate::ids::short_hash(&[&repo.url]))
                .or_insert_with(|| Arc::new(tokio::sync::RwLock::new(())))
                .clone()
        };
        let now = if exclusive {
            lock.clone().try_write_owned().map(RepoGuard::Exclusive).ok()
        } else {
            lock.clone().try_read_owned().map(RepoGuard::Shared).ok()
        };
        // A backup that forgets afterwards asks twice: the waits add up.
        let before = run.repository_wait_ms.unwrap_or(0);
        if let Some(g) = now {
            run.repository_wait_ms = Some(before);
            return Ok(g);
        }
        let what = if exclusive {
            "this agent's other runs on the repository to end"
        } else {
            "this agent's prune, check or forget of the repository to end"
        };
        tracing::info!("waiting for {what}");
        let started = std::time::Instant::now();
        let got = tokio::select! {
            g = async {
                if exclusive { RepoGuard::Exclusive(lock.write_owned().await) } else { RepoGuard::Shared(lock.read_owned().await) }
            } => Ok(g),
            _ = token.cancelled() => Err(cancelled()),
        };
        let waited = started.elapsed().as_millis() as u64;
        run.repository_wait_ms = Some(before + waited);
        if got.is_ok() {
            tracing::info!(waited_ms = waited, "the repository is free; going on");
            // Shown while the run goes on, not only at its end.
            if let Err(e) = self.inner.store.save_run(run) {
                tracing::warn!(error = %e, "cannot record the wait on the run");
            }
        }
        got
    }

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
                super::verify::Verdict::Unchanged => return Ok(RunState::Succeeded),
                super::verify::Verdict::Real(digest) => (id, digest),
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
        let prepared = match crate::consistency::prepare(ctx, &self.inner.store, &self.inner.config, token).await {
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

    /// Restore a snapshot of the policy: into a new or empty directory (the
    /// volume's content lands at the directory's root), or in place over the
    /// source. Progress is measured from what has been written, against the
    /// snapshot's restore size.
    pub(crate) async fn restore(
        &self,
        policy: &PolicyRecord,
        run: &mut RunRecord,
        token: &CancellationToken,
    ) -> Result<RunState, RunError> {
        let p: RestoreParams = params(run)?;
        let repo = self.repo_for(policy).await?;
        let tag = format!("policy={}", policy.id);
        let _shared = self.repo_lock(&repo, false, run, token).await?;
        let recorded = match p.snapshot.as_str() {
            "latest" => self.latest_from_records(policy, &repo).await,
            id => self.recorded_snapshot(policy, &repo, id).await,
        };
        let snap = if let Some(snap) = recorded {
            Some(snap)
        } else if p.snapshot == "latest" {
            self.inner.restic.latest_snapshot(&repo, Some(&tag), None, token).await.map_err(run_error)?
        } else {
            self.inner
                .restic
                .snapshots(&repo, Some(&tag), None, &[&p.snapshot], token)
                .await
                .map_err(run_error)?
                .into_iter()
                .next()
        };
        let snap = snap.ok_or_else(|| RunError {
            code: "snapshot_not_found".into(),
            message: format!("policy {} has no snapshot {:?} in its repository", policy.spec.name, p.snapshot),
        })?;
        run.snapshot_id = Some(snap.id.clone());
        let root = snap.paths.first().cloned().unwrap_or_else(|| policy.spec.source.path.clone());
        let native = p.in_place && restic_restores_in_place(self.inner.restic.detected_version());
        if (p.delete || p.dry_run) && !native {
            // Checked when asked; restic may have been replaced since.
            return Err(RunError {
                code: "restic_too_old".into(),
                message: needs_restic_in_place(&p, self.inner.restic.detected_version()),
            });
        }
        // The size to restore, for progress and the space check: from the
        // backup run that wrote the snapshot when this agent recorded it,
        // else the snapshot's own summary (restic 0.17+), else restic.
        let recorded = self
            .inner
            .store
            .backup_of_snapshot(&policy.id, &snap.id)
            .ok()
            .flatten()
            .and_then(|r| r.summary)
            .filter(|s| s.total_bytes_processed > 0);
        let (total_bytes, total_files) = match (recorded, &snap.summary) {
            (Some(s), _) => (s.total_bytes_processed, s.total_files_processed),
            (None, Some(s)) => (s.total_bytes_processed, s.total_files_processed),
            (None, None) => self.inner.restic.restore_size(&repo, &snap.id, token).await.unwrap_or((0, 0)),
        };
        let started = std::time::Instant::now();

        // The target, resolved now (an in-place target is the volume, which
        // may have been swapped for a link since the request).
        let target_path = PathBuf::from(p.target.clone().unwrap_or_default());
        let target = self.open_restore_target(&target_path, p.in_place)?;
        let job = RestoreJob {
            run_id: run.id.clone(),
            repo: &repo,
            snapshot_id: &snap.id,
            root: &root,
            params: &p,
            target: &target,
            target_path: &target_path,
            totals: (total_bytes, total_files),
            token,
        };
        let done = if native {
            match self.restore_natively(&job).await? {
                InPlace::Preview(preview) => {
                    run.summary = Some(RunSummary {
                        restore_preview: Some(preview),
                        total_duration: started.elapsed().as_secs_f64(),
                        ..Default::default()
                    });
                    return Ok(RunState::Succeeded);
                }
                InPlace::Restored(s) => s,
            }
        } else {
            self.restore_staged(&job).await?
        };
        let (files, bytes) = match &done {
            Some(s) => (s.files_restored + s.files_skipped, s.bytes_restored + s.bytes_skipped),
            None => (total_files, total_bytes),
        };
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            run.id.clone(),
            Progress {
                percent_done: 1.0,
                files_done: files,
                total_files: files,
                bytes_done: bytes,
                total_bytes: bytes,
                seconds_remaining: Some(0),
            },
        );
        run.summary = Some(RunSummary {
            total_files_processed: files,
            total_bytes_processed: bytes,
            files_restored: done.as_ref().map_or(0, |s| s.files_restored),
            files_skipped: done.as_ref().map_or(0, |s| s.files_skipped),
            files_deleted: done.as_ref().map_or(0, |s| s.files_deleted),
            bytes_restored: done.as_ref().map_or(0, |s| s.bytes_restored),
            total_duration: started.elapsed().as_secs_f64(),
            ..Default::default()
        });
        Ok(RunState::Succeeded)
    }

    /// restic restores into a staging directory on the target's filesystem
    /// (inside the target), since it restores under the snapshot's absolute
    /// path and before 0.17 will not overwrite; the files are then moved
    /// into place with renames relative to held directories. The whole
    /// snapshot (or the included part) must fit beside what is there.
    async fn restore_staged(&self, job: &RestoreJob<'_>) -> Result<Option<RestoreStatus>, RunError> {
        let (target, p) = (job.target, job.params);
        let (total_bytes, total_files) = job.totals;
        if p.include.is_empty() && total_bytes > 0 {
            let (why, hint) = if p.in_place {
                (
                    "the whole snapshot is written beside the volume's files, then moved into place",
                    Some("or run the agent with restic 0.18 or newer, whose in-place restore writes only the files that differ"),
                )
            } else {
                ("the whole snapshot is written", None)
            };
            self.check_space(target, job.target_path, total_bytes, why, hint)?;
        }
        let staging_name = std::ffi::OsString::from(format!("{RESTORE_STAGING_PREFIX}{}", job.run_id));
        let staging_err = |e: crate::beneath::PathError| RunError {
            code: if e.kind() == "disk_full" { "disk_full" } else { "restore_target_failed" }.into(),
            message: format!("cannot create the restore's staging directory: {e}"),
        };
        target.remove(&staging_name).map_err(staging_err)?;
        let staging = target.create_new(&staging_name, 0o700).map_err(staging_err)?;
        let pin = self.pin_for_restore(&staging).map_err(staging_err)?;
        let restic_target = pin.as_ref().map(|p| p.at().to_path_buf()).unwrap_or_else(|| staging.path().to_path_buf());
        let include =
            p.include.iter().map(|i| format!("{}/{}", job.root.trim_end_matches('/'), i.trim_matches('/'))).collect();
        let req = RestoreRequest {
            snapshot_id: job.snapshot_id.to_string(),
            target: restic_target,
            include,
            verify: p.verify,
            pin: pin.map(Arc::new),
            ..Default::default()
        };
        let result = if self.inner.restic.features().restore_json {
            let mut on_status = self.restore_progress(&job.run_id);
            self.inner.restic.restore_with_progress(job.repo, &req, job.token, &mut on_status).await
        } else {
            let watch = self.watch_restore_progress(&job.run_id, staging.proc_path(), total_bytes, total_files);
            let r = self.inner.restic.restore(job.repo, &req, job.token).await.map(|()| Default::default());
            watch.abort();
            r
        };
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                // Measured before the partial files are removed.
                let e = self.restore_error(e, target, job.target_path);
                let _ = target.remove(&staging_name);
                return Err(e);
            }
        };
        let moved = match staging.open(Path::new(job.root.trim_start_matches('/'))) {
            Ok(from) => crate::beneath::merge_into(&from, target),
            Err(crate::beneath::PathError::Missing { .. }) => Ok(()), // an include that matched nothing
            Err(e) => Err(e),
        };
        let _ = target.remove(&staging_name);
        moved.map_err(|e| RunError {
            code: if e.kind() == "disk_full" { "disk_full" } else { "restore_target_failed" }.into(),
            message: format!("cannot move the restored files into place in {}: {e}", job.target_path.display()),
        })?;
        Ok(outcome.summary)
    }

    /// restic's own in-place restore (0.18+): `--overwrite if-changed`
    /// writes only the files that differ, `--delete` removes what the
    /// snapshot does not hold. restic sees the volume through a pin (it
    /// follows no link there, opens no device). A dry run first says what
    /// will change: it is the preview a `dryRun` request asks for, and it
    /// gives the space the restore needs, checked before anything is
    /// written. FIFOs, sockets and device nodes where the snapshot has
    /// something else are removed first (restic would open them: a FIFO
    /// blocks it for good).
    async fn restore_natively(&self, job: &RestoreJob<'_>) -> Result<InPlace, RunError> {
        let (target, p) = (job.target, job.params);
        let refused = |e: crate::beneath::PathError| RunError {
            code: "restore_target_failed".into(),
            message: format!("cannot prepare the in-place restore: {e}"),
        };
        let pin = self.pin_for_restore(target).map_err(refused)?.map(Arc::new);
        let restic_target = pin.as_ref().map(|p| p.at().to_path_buf()).unwrap_or_else(|| target.path().to_path_buf());
        let mut req = RestoreRequest {
            snapshot_id: job.snapshot_id.to_string(),
            target: restic_target.clone(),
            include: p.include.iter().map(|i| format!("/{}", i.trim_matches('/'))).collect(),
            verify: p.verify,
            pin,
            folder: Some(job.root.to_string()),
            overwrite_if_changed: true,
            delete: p.delete,
            dry_run: true,
            // The agent's own directories in the volume: never deleted
            // (restic takes either includes or excludes, not both).
            exclude: if p.include.is_empty() {
                vec![format!("/{RESTORE_STAGING_PREFIX}*"), format!("/{}", crate::consistency::SCRATCH_DIR)]
            } else {
                Vec::new()
            },
        };
        self.remove_specials_where_files_go(job).await?;
        let planned = self
            .inner
            .restic
            .restore_with_progress(job.repo, &req, job.token, &mut |_| {})
            .await
            .map_err(|e| self.restore_error(e, target, job.target_path))?;
        let mut preview = soda_syncer_domain::restore::RestorePreview::default();
        let mut needed: u64 = 0;
        let shown_target = restic_target.display().to_string();
        for item in &planned.items {
            preview.add(item, &shown_target);
            match item.action.as_str() {
                "restored" => needed += item.size,
                "updated" => {
                    // Rewritten in place: only growth needs room.
                    let rel = item.item.trim_start_matches('/');
                    let current = lstat_below(target, rel).map_or(0, |st| st.st_size as u64);
                    needed += item.size.saturating_sub(current);
                }
                _ => {}
            }
        }
        if p.dry_run {
            return Ok(InPlace::Preview(preview));
        }
        self.check_space(
            target,
            job.target_path,
            needed,
            "only the files that differ from the snapshot are written",
            None,
        )?;
        req.dry_run = false;
        let mut on_status = self.restore_progress(&job.run_id);
        let outcome = self
            .inner
            .restic
            .restore_with_progress(job.repo, &req, job.token, &mut on_status)
            .await
            .map_err(|e| self.restore_error(e, target, job.target_path))?;
        Ok(InPlace::Restored(outcome.summary))
    }

    /// restic opens whatever it finds where the snapshot has a regular
    /// file (to compare it, even in a dry run): a FIFO there blocks it for
    /// good, a device node fails on the pin's nodev mount. So such FIFOs,
    /// sockets and device nodes are removed first (they hold no data; the
    /// snapshot's own ones are recreated by restic without opening them).
    /// The snapshot is listed only when the volume has any.
    async fn remove_specials_where_files_go(&self, job: &RestoreJob<'_>) -> Result<(), RunError> {
        let refused = |e: crate::beneath::PathError| RunError {
            code: "restore_target_failed".into(),
            message: format!("cannot prepare the in-place restore: {e}"),
        };
        let specials = job.target.specials().map_err(refused)?;
        let included = |rel: &Path| {
            job.params.include.is_empty() || job.params.include.iter().any(|i| rel.starts_with(i.trim_matches('/')))
        };
        let specials: Vec<PathBuf> = specials.into_iter().filter(|s| included(s)).collect();
        if specials.is_empty() {
            return Ok(());
        }
        let nodes = self.inner.restic.ls(job.repo, job.snapshot_id, job.token).await.map_err(run_error)?;
        let root = Path::new(job.root);
        let files: std::collections::HashSet<PathBuf> = nodes
            .iter()
            .filter(|n| n.kind == "file")
            .filter_map(|n| Path::new(&n.path).strip_prefix(root).ok().map(Path::to_path_buf))
            .collect();
        for s in specials.iter().filter(|s| files.contains(*s)) {
            tracing::info!(path = %s.display(), "removing a FIFO, socket or device node where the snapshot has a file");
            remove_below(job.target, &s.to_string_lossy()).map_err(refused)?;
        }
        Ok(())
    }

    /// Progress from restic's own status lines (0.16+).
    fn restore_progress(&self, run_id: &str) -> impl FnMut(&RestoreStatus) + Send + '_ {
        let run_id = run_id.to_string();
        move |s: &RestoreStatus| {
            self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).insert(run_id.clone(), Progress::from(s));
        }
    }

    /// Refuse a restore that cannot fit, before anything is written,
    /// naming the filesystem and how much is missing.
    fn check_space(
        &self,
        target: &crate::beneath::Dir,
        target_path: &Path,
        needed: u64,
        why: &str,
        hint: Option<&str>,
    ) -> Result<(), RunError> {
        use soda_syncer_domain::restore::{fits, human_bytes};
        let Ok((free, _)) = target.space() else { return Ok(()) };
        if fits(needed, free) {
            return Ok(());
        }
        Err(RunError {
            code: "disk_full".into(),
            message: format!(
                "the restore needs {} on {}, which has {} free ({why}): nothing was written; free space there{}",
                human_bytes(needed),
                describe_fs(target, target_path),
                human_bytes(free),
                hint.map(|h| format!(", {h}")).unwrap_or_default()
            ),
        })
    }

    /// A failed restic restore as a run error; a full disk names the
    /// filesystem that filled up (the target's, or the state directory's
    /// where restic keeps its cache).
    fn restore_error(&self, e: ResticError, target: &crate::beneath::Dir, target_path: &Path) -> RunError {
        let ResticError::DiskFull { stderr } = &e else { return run_error(e) };
        use soda_syncer_domain::restore::human_bytes;
        let mut full = Vec::new();
        if let Ok((free, size)) = target.space() {
            if free < (size / 100).max(16 << 20) {
                full.push(format!(
                    "{} (the restore's target, {} free)",
                    describe_fs(target, target_path),
                    human_bytes(free)
                ));
            }
        }
        if let Ok(state) = crate::beneath::Dir::open_trusted(&self.inner.config.state_dir) {
            if let Ok((free, size)) = state.space() {
                if free < (size / 100).max(16 << 20) {
                    full.push(format!(
                        "{} (the state directory, with restic's cache, {} free)",
                        describe_fs(&state, &self.inner.config.state_dir),
                        human_bytes(free)
                    ));
                }
            }
        }
        let which = if full.is_empty() {
            "a filesystem restic writes to (none is full now: the restore's partial files were removed)".to_string()
        } else {
            full.join(" and ")
        };
        RunError { code: "disk_full".into(), message: format!("the restore ran out of space on {which}: {stderr}") }
    }

    /// The restore's target, resolved at the moment of use: the volume
    /// itself (in place) below its allowed root, or a new or empty
    /// directory below the restore directory or an allowed root, created
    /// without following any link.
    fn open_restore_target(&self, path: &Path, in_place: bool) -> Result<crate::beneath::Dir, RunError> {
        let config = &self.inner.config;
        let refused = |e: crate::beneath::PathError| RunError {
            code: match e.kind() {
                "disk_full" => "disk_full",
                "path_io_failed" => "restore_target_failed",
                _ => "target_not_allowed",
            }
            .into(),
            message: format!("the restore was refused, nothing was written: {e}"),
        };
        if in_place {
            let (_, dir) = crate::beneath::open_under(&config.allowed_roots_in_effect(), path, ALLOWED_ROOT_HINT)
                .map_err(refused)?;
            return Ok(dir);
        }
        let mut roots = vec![config.restore_dir()];
        roots.extend(config.allowed_roots_in_effect());
        if path.starts_with(config.restore_dir()) {
            std::fs::create_dir_all(config.restore_dir())
                .map_err(|e| io_error("cannot create the restore directory", &config.restore_dir(), e))?;
        }
        let (_, dir) = crate::beneath::create_under(&roots, path, 0o700, ALLOWED_ROOT_HINT).map_err(refused)?;
        if !dir.is_empty().map_err(refused)? {
            return Err(RunError {
                code: "target_not_empty".into(),
                message: format!(
                    "{} is no longer empty (something was put there after the request): nothing was restored",
                    path.display()
                ),
            });
        }
        Ok(dir)
    }

    /// Where a restic child sees `dir` (see [`crate::beneath::Pin`]): a
    /// fixed directory of the agent's state directory, mounted over in the
    /// child's own mount namespace. None when the agent is not root (it
    /// cannot make mounts; restic then writes by name, with its rights).
    fn pin_for_restore(
        &self,
        dir: &crate::beneath::Dir,
    ) -> Result<Option<crate::beneath::Pin>, crate::beneath::PathError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let state = crate::beneath::Dir::open_trusted(&self.inner.config.state_dir)?;
        let at = state.create(Path::new(PIN_DIR), 0o700)?;
        crate::beneath::Pin::writable(dir, at.path()).map(Some)
    }

    /// restic's `latest` snapshot of the policy without asking restic (one
    /// more key derivation and index load, ~0.5 s of a restore): the newest
    /// snapshot a backup run of the policy recorded, when it is still in the
    /// repository and every snapshot there is one this agent recorded, so no
    /// newer one can hide among them (from another host or agent, or written
    /// before this state database). A directory listing of the repository
    /// answers that for local and REST repositories; otherwise None, and
    /// restic is asked.
    async fn latest_from_records(&self, policy: &PolicyRecord, repo: &Repo) -> Option<Snapshot> {
        let run = self.inner.store.last_snapshot_backup(&policy.id).ok()??;
        let snap = snapshot_of(&run)?;
        let in_repo = self.inner.restic.snapshot_ids(repo).await?;
        if !in_repo.contains(&snap.id) {
            return None;
        }
        let recorded = self.inner.store.recorded_snapshot_ids().ok()?;
        if !in_repo.iter().all(|s| recorded.contains(s)) {
            return None;
        }
        tracing::debug!(snapshot = %snap.id, "latest snapshot from this agent's run records");
        Some(snap)
    }

    /// A snapshot named by its id (or a prefix of it that names one snapshot
    /// in the repository) that a backup run of this policy recorded, and
    /// that is still there: restored without asking restic first.
    async fn recorded_snapshot(&self, policy: &PolicyRecord, repo: &Repo, wanted: &str) -> Option<Snapshot> {
        if wanted.is_empty() {
            return None;
        }
        let in_repo = self.inner.restic.snapshot_ids(repo).await?;
        let mut hits = in_repo.into_iter().filter(|n| n.starts_with(wanted));
        let (Some(id), None) = (hits.next(), hits.next()) else { return None };
        snapshot_of(&self.inner.store.backup_of_snapshot(&policy.id, &id).ok()??)
    }

    /// Report restore progress by adding up what has been written so far
    /// (restic 0.14 prints nothing while it restores).
    fn watch_restore_progress(
        &self,
        run_id: &str,
        dir: PathBuf,
        total_bytes: u64,
        total_files: u64,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let run_id = run_id.to_string();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let d = dir.clone();
                let (bytes, files) = tokio::task::spawn_blocking(move || tree_size(&d)).await.unwrap_or((0, 0));
                let fraction = if total_bytes > 0 { (bytes as f64 / total_bytes as f64).min(1.0) } else { 0.0 };
                let secs = started.elapsed().as_secs_f64();
                let remaining = (fraction > 0.0).then(|| (secs / fraction - secs).max(0.0) as u64);
                this.inner.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    run_id.clone(),
                    Progress {
                        percent_done: fraction,
                        files_done: files,
                        total_files,
                        bytes_done: bytes,
                        total_bytes,
                        seconds_remaining: remaining,
                    },
                );
            }
        })
    }

    /// Forget (the policy's retention), prune, check: whichever were asked
    /// for, in that order, alone on the repository.
    pub(crate) async fn maintenance(
        &self,
        policy: &PolicyRecord,
        run: &mut RunRecord,
        token: &CancellationToken,
    ) -> Result<RunState, RunError> {
        let p: MaintenanceParams = params(run)?;
        // An append-only repository is the maintainer's (`soda-syncer
        // maintain`, with the delete rights): scheduled runs are left to
        // it and do not take the repository's maintenance Lease it holds.
        // Asked by hand, check still runs; forget and prune are reported.
        let skip_delegated = |run: &mut RunRecord| {
            run.warning = Some(format!("{MAINTENANCE_SKIPPED}: {MAINTENANCE_DELEGATED}"));
            Ok(RunState::Succeeded)
        };
        let declared = self.declared_append_only(&policy.spec, &policy.spec.repository_url());
        if declared && run.trigger == RunTrigger::Schedule {
            return skip_delegated(run);
        }
        // Scheduled prune and check: only the repository's maintainer in the
        // cluster runs them (asked by hand, they always run).
        if run.trigger == RunTrigger::Schedule && (p.prune || p.check) {
            if let Some(m) = self.inner.maintainership.get() {
                let key = crate::ids::short_hash(&[&policy.spec.repository_url()]);
                if !m.is_maintainer(&key).await {
                    run.warning = Some(format!(
                        "{MAINTENANCE_SKIPPED}: another node's agent maintains this repository (Lease soda-syncer-maint-{})",
                        &key[..key.len().min(16)]
                    ));
                    return Ok(RunState::Succeeded);
                }
            }
        }
        let repo = self.repo_for(policy).await?;
        // Or found out by a refused delete since the agent started.
        let append_only = self.append_only(&policy.spec, &repo);
        if append_only && run.trigger == RunTrigger::Schedule {
            return skip_delegated(run);
        }
        let _exclusive = self.repo_lock(&repo, true, run, token).await?;
        let mut summary = RunSummary::default();
        let started = std::time::Instant::now();
        if append_only && (p.forget || p.prune) {
            summary.retention = Some(RETENTION_DELEGATED.into());
            run.warning = Some(MAINTENANCE_DELEGATED.into());
        } else if p.forget {
            let keep = policy.spec.retention.forget_args();
            if keep.is_empty() {
                run.warning = Some("the policy has no retention rules, so forget removed nothing".into());
            } else {
                let groups = self
                    .inner
                    .restic
                    .forget(&repo, &format!("policy={}", policy.id), &keep, token)
                    .await
                    .map_err(|e| RunError { code: "retention_failed".into(), message: e.to_string() })?;
                summary.snapshots_forgotten = groups.iter().map(|g| g.removed().len() as u64).sum();
            }
        }
        if p.prune && !append_only {
            match self.inner.restic.prune(&repo, token).await {
                Ok(_) => {}
                Err(ResticError::DeletesRefused { .. }) => {
                    summary.retention = Some(RETENTION_DELEGATED.into());
                    run.warning = Some(MAINTENANCE_DELEGATED.into());
                }
                Err(e) => return Err(run_error(e)),
            }
        }
        if p.check {
            self.inner.restic.check(&repo, p.read_data_subset.as_deref(), token).await.map_err(|e| match e {
                ResticError::Failed { stderr, .. }
                    if stderr.contains("contains errors") || stderr.contains("error") =>
                {
                    RunError {
                        code: "repository_damaged".into(),
                        message: format!("restic check found errors in the repository: {stderr}"),
                    }
                }
                other => run_error(other),
            })?;
        }
        summary.total_duration = started.elapsed().as_secs_f64();
        run.summary = Some(summary);
        Ok(RunState::Succeeded)
    }

    /// After a maintenance run: record it in the repository's bookkeeping,
    /// and retry a failed scheduled one in an hour rather than a week.
    pub(crate) fn maintenance_done(&self, policy: &PolicyRecord, run: &RunRecord) {
        let Ok(p) = params::<MaintenanceParams>(run) else { return };
        let key = crate::ids::short_hash(&[&policy.spec.repository_url()]);
        let Ok(Some(mut m)) = self.inner.store.repository_maintenance(&key) else { return };
        let now = Utc::now();
        if run.warning.as_deref().is_some_and(|w| w.starts_with(MAINTENANCE_SKIPPED)) {
            return; // its next times were set when it was queued; nothing was done
        }
        let ok = run.state == RunState::Succeeded;
        if p.prune {
            if ok {
                m.last_prune_at = Some(now);
            } else {
                m.next_prune_at = Some(now + chrono::Duration::hours(1));
            }
        }
        if p.check {
            if ok {
                m.last_check_at = Some(now);
            } else {
                m.next_check_at = Some(now + chrono::Duration::hours(1));
            }
        }
        if let Err(e) = self.inner.store.save_repository_maintenance(&m) {
            tracing::warn!(error = %e, "cannot record the repository's maintenance");
        }
    }
}

/// How a scheduled maintenance run that another agent does instead begins its warning.
const MAINTENANCE_SKIPPED: &str = "skipped";

/// A run summary's `retention` when the repository refuses this node's deletes.
pub const RETENTION_DELEGATED: &str = "delegated to the maintainer";

const MAINTENANCE_DELEGATED: &str = "the repository is append-only for this node: forget and prune are delegated to the maintainer (soda-syncer maintain), which holds the delete rights";

impl Scheduler {
    /// Whether the repository takes no deletes from this node: the policy
    /// or the agent says so, or the repository refused one already.
    fn append_only(&self, spec: &soda_syncer_domain::PolicySpec, repo: &Repo) -> bool {
        self.declared_append_only(spec, &repo.url) || self.inner.restic.deletes_refused(repo)
    }

    /// Declared append-only: by the policy, the agent (all repositories),
    /// or the agent's list of repositories (`url`: the repository's URL or
    /// the policy's `repository_url()`, compared without user and password).
    fn declared_append_only(&self, spec: &soda_syncer_domain::PolicySpec, url: &str) -> bool {
        let c = &self.inner.config;
        let bare = crate::maintainer::without_userinfo;
        spec.append_only
            || c.append_only
            || c.append_only_repositories
                .iter()
                .any(|r| bare(r) == bare(url) || bare(r) == bare(&spec.repository_url()))
    }
}

/// A drill restores at most this many files by name (`--include` each);
/// a drill of every file restores the whole snapshot instead.
const DRILL_MAX_INCLUDES: usize = 5000;

impl Scheduler {
    /// A restore drill: restore files of the newest snapshot into a scratch
    /// directory under the state directory, let restic verify their content
    /// against the repository (`--verify`), compare type, size and
    /// permissions with the snapshot's listing, and remove the scratch
    /// directory on every path.
    pub(crate) async fn drill(
        &self,
        policy: &PolicyRecord,
        run: &mut RunRecord,
        token: &CancellationToken,
    ) -> Result<RunState, RunError> {
        let d = policy.spec.drill.clone().unwrap_or(soda_syncer_domain::policy::DrillSpec {
            schedule: Default::default(),
            jitter_seconds: 0,
            sample_files: 100,
            max_bytes: 1 << 30,
        });
        let repo = self.repo_for(policy).await?;
        let _shared = self.repo_lock(&repo, false, run, token).await?;
        let tag = format!("policy={}", policy.id);
        let snap = self.inner.restic.latest_snapshot(&repo, Some(&tag), None, token).await.map_err(run_error)?;
        let snap = snap.ok_or_else(|| RunError {
            code: "snapshot_not_found".into(),
            message: format!(
                "policy {} has no snapshot to drill yet; drills start after the first backup",
                policy.spec.name
            ),
        })?;
        run.snapshot_id = Some(snap.id.clone());
        let started = std::time::Instant::now();
        let nodes = self.inner.restic.ls(&repo, &snap.id, token).await.map_err(run_error)?;
        let count = if d.sample_files == 0 { 0 } else { (d.sample_files as usize).min(DRILL_MAX_INCLUDES) };
        let (sample, skipped) = soda_syncer_domain::drill::sample(&nodes, count, d.max_bytes, &run.id);
        let files_in_snapshot = nodes.iter().filter(|n| n.kind == "file").count();
        if sample.is_empty() {
            run.warning = Some(if files_in_snapshot == 0 {
                "the snapshot holds no files, so the drill checked nothing".into()
            } else {
                format!("no file of the snapshot fits the drill's maxBytes ({} bytes)", d.max_bytes)
            });
            return Ok(RunState::Suspicious);
        }

        // The scratch directory, created and held now; restic sees it
        // through a pin, and every check below goes through held directories.
        struct Scratch(crate::beneath::Dir, std::ffi::OsString);
        impl Drop for Scratch {
            fn drop(&mut self) {
                if let Err(e) = self.0.remove(&self.1) {
                    tracing::warn!(error = %e, "cannot remove the drill's scratch directory");
                }
            }
        }
        let scratch_err = |e: crate::beneath::PathError| RunError {
            code: if e.kind() == "disk_full" { "disk_full" } else { "restore_target_failed" }.into(),
            message: format!("cannot create the drill's scratch directory, nothing was restored: {e}"),
        };
        let state = crate::beneath::Dir::open_trusted(&self.inner.config.state_dir).map_err(scratch_err)?;
        let drills = state.create(Path::new("drills"), 0o700).map_err(scratch_err)?;
        let name = std::ffi::OsString::from(&run.id);
        drills.remove(&name).map_err(scratch_err)?;
        let dir = drills.create_new(&name, 0o700).map_err(scratch_err)?;
        let scratch = Scratch(drills, name);
        let everything = sample.len() + skipped == files_in_snapshot && skipped == 0;
        let include = if everything || sample.len() > DRILL_MAX_INCLUDES {
            Vec::new()
        } else {
            sample.iter().map(|n| n.path.clone()).collect()
        };
        let pin = self.pin_for_restore(&dir).map_err(scratch_err)?;
        let target = pin.as_ref().map(|p| p.at().to_path_buf()).unwrap_or_else(|| dir.path().to_path_buf());
        let req = RestoreRequest {
            snapshot_id: snap.id.clone(),
            target,
            include,
            verify: true,
            pin: pin.map(Arc::new),
            ..Default::default()
        };
        let mut mismatches = Vec::new();
        match self.inner.restic.restore(&repo, &req, token).await {
            Ok(()) => {}
            Err(ResticError::Failed { stderr, .. }) => {
                mismatches.push(format!("restic restore --verify reported errors: {stderr}"));
            }
            Err(e) => return Err(run_error(e)),
        }
        for n in &sample {
            let rel = Path::new(n.path.trim_start_matches('/'));
            let (parent, file) = (rel.parent().unwrap_or(Path::new("")), rel.file_name().unwrap_or_default());
            let st = dir.open(parent).and_then(|d| d.lstat(file));
            let problem = match st {
                Err(crate::beneath::PathError::Missing { .. }) | Ok(None) => {
                    Some("missing after the restore".to_string())
                }
                Err(e) => Some(format!("cannot be checked: {e}")),
                Ok(Some(m)) if crate::beneath::Kind::of(m.st_mode) != crate::beneath::Kind::File => {
                    Some("not a regular file after the restore".into())
                }
                Ok(Some(m)) if m.st_size as u64 != n.size => Some(format!("{} bytes instead of {}", m.st_size, n.size)),
                Ok(Some(m)) if m.st_mode & 0o7777 != n.mode & 0o7777 => {
                    Some(format!("permissions {:o} instead of {:o}", m.st_mode & 0o7777, n.mode & 0o7777))
                }
                Ok(Some(_)) => None,
            };
            if let Some(p) = problem {
                mismatches.push(format!("{}: {p}", n.path));
            }
        }
        drop(scratch);
        let count = mismatches.len();
        mismatches.truncate(50);
        run.summary = Some(RunSummary {
            files_checked: sample.len() as u64,
            bytes_checked: sample.iter().map(|n| n.size).sum(),
            mismatches: mismatches.clone(),
            total_duration: started.elapsed().as_secs_f64(),
            ..Default::default()
        });
        if skipped > 0 {
            run.warning = Some(format!("{skipped} files with glob characters in their names were not sampled"));
        }
        if count > 0 {
            return Err(RunError {
                code: "drill_mismatch".into(),
                message: format!(
                    "{count} problem(s) restoring {} files of snapshot {}: {}",
                    sample.len(),
                    &snap.id[..snap.id.len().min(8)],
                    mismatches.first().cloned().unwrap_or_default()
                ),
            });
        }
        Ok(RunState::Succeeded)
    }
}

/// The directory of the state directory where restic children see the
/// directory they restore into (each in its own mount namespace).
pub const PIN_DIR: &str = "restic-target";

/// What one restore run works with.
struct RestoreJob<'a> {
    run_id: String,
    repo: &'a Repo,
    snapshot_id: &'a str,
    /// The folder of the snapshot that holds the volume.
    root: &'a str,
    params: &'a RestoreParams,
    target: &'a crate::beneath::Dir,
    target_path: &'a Path,
    /// Bytes and files of the whole snapshot (0 when unknown).
    totals: (u64, u64),
    token: &'a CancellationToken,
}

enum InPlace {
    Preview(soda_syncer_domain::restore::RestorePreview),
    Restored(Option<RestoreStatus>),
}

/// The oldest restic whose own in-place restore the agent uses: the
/// oldest whose tests here prove it replaces a link, a hard link to a file
/// outside, a FIFO or a device node planted in the volume instead of
/// following or opening it (0.14 wrote through a planted link; 0.17 is
/// untested here, so it restores through a staging directory).
pub const IN_PLACE_RESTIC: soda_syncer_domain::restic_version::ResticVersion =
    soda_syncer_domain::restic_version::ResticVersion::new(0, 18, 0);

pub fn restic_restores_in_place(v: Option<soda_syncer_domain::restic_version::ResticVersion>) -> bool {
    v.is_some_and(|v| v >= IN_PLACE_RESTIC)
}

/// Why `delete` or `dryRun` cannot be had with the restic at hand.
fn needs_restic_in_place(p: &RestoreParams, v: Option<soda_syncer_domain::restic_version::ResticVersion>) -> String {
    let what = if p.delete { "delete" } else { "dryRun" };
    let flag = if p.delete { "--delete" } else { "--dry-run" };
    let have = v.map_or("an unknown version".to_string(), |v| format!("restic {v}"));
    format!(
        "{what} needs restic 0.17 or newer (restic restore {flag}), and this agent uses restic's own in-place restore from restic {IN_PLACE_RESTIC} on (the oldest its tests prove never follows a link planted in the volume); this node runs {have}: install restic {IN_PLACE_RESTIC} or newer, or restore without {what}"
    )
}

/// "/dev/vdb (ext4, mounted at /srv)" for the filesystem `dir` is on.
fn describe_fs(dir: &crate::beneath::Dir, shown: &Path) -> String {
    match crate::consistency::filesystem_of(&dir.proc_path()) {
        Some((device, fs_type, mount_point)) => format!("{device} ({fs_type}, mounted at {mount_point})"),
        None => format!("the filesystem of {}", shown.display()),
    }
}

/// lstat of `rel` below `dir`, through held directories (None: missing or unreachable).
fn lstat_below(dir: &crate::beneath::Dir, rel: &str) -> Option<libc::stat> {
    let rel = Path::new(rel);
    let (parent, name) = (rel.parent().unwrap_or(Path::new("")), rel.file_name()?);
    dir.open(parent).ok()?.lstat(name).ok().flatten()
}

fn remove_below(dir: &crate::beneath::Dir, rel: &str) -> Result<(), crate::beneath::PathError> {
    let rel = Path::new(rel);
    let (parent, Some(name)) = (rel.parent().unwrap_or(Path::new("")), rel.file_name()) else { return Ok(()) };
    dir.open(parent)?.remove(name)
}

/// How to fix a path refused for lying outside the allowed roots.
const ALLOWED_ROOT_HINT: &str = "choose a path below one of them, or start the agent with --allowed-root DIR";

/// The policy's source, resolved at the moment of use below its allowed
/// root: the root and the source, held open.
fn open_source(
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
fn pin_for_backup(
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

/// Restores stage their files in a directory of this name inside the
/// target; backups exclude it, in case a crash left one behind.
pub const RESTORE_STAGING_PREFIX: &str = ".soda-syncer-restore-";

fn consistency_error(e: &crate::consistency::ConsistencyError) -> RunError {
    RunError { code: e.kind().into(), message: e.to_string() }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> RunError {
    let code = if e.raw_os_error() == Some(libc::ENOSPC) { "disk_full" } else { "restore_target_failed" };
    RunError { code: code.into(), message: format!("{what} {}: {e}", path.display()) }
}

/// Total size and count of the regular files below `dir`.
fn tree_size(dir: &Path) -> (u64, u64) {
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

/// The snapshot a backup run wrote, as far as a restore needs it (its id and
/// the path it holds), from the run's record.
fn snapshot_of(run: &RunRecord) -> Option<Snapshot> {
    let id = run.snapshot_id.clone()?;
    let path = run.params.as_ref()?.get("path")?.as_str()?.to_string();
    Some(Snapshot { short_id: id.chars().take(8).collect(), id, paths: vec![path], ..Default::default() })
}
