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
use soda_syncer_domain::policy::{validate_abs_path, FieldError};
use soda_syncer_domain::restic_json::Snapshot;
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
                super::policies::check_allowed(self.config(), existing).map_err(|_| {
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
        if std::fs::metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            return Err(RunError {
                code: "source_missing".into(),
                message: format!(
                    "the source {} does not exist on this node (unmounted or removed?); restore it or change the policy's source",
                    path.display()
                ),
            });
        }
        super::policies::check_allowed(&self.inner.config, &path)
            .map_err(|e| RunError { code: "source_not_allowed".into(), message: e.message })?;
        let repo = self.repo_for(policy).await?;
        let policy_tag = format!("policy={}", policy.id);
        let mut tags = vec!["soda-syncer".to_string(), policy_tag.clone()];
        if let Some(v) = &policy.volume {
            tags.push(format!("volume={v}"));
        }
        tags.extend(spec.tags.iter().cloned());
        let mut exclude = spec.exclude.clone();
        exclude.push(format!("{RESTORE_STAGING_PREFIX}*"));
        exclude.push(crate::consistency::SCRATCH_DIR.into());
        let mut req = BackupRequest { path, tags, exclude, view: None, ignore_inode: false };
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
            repository: crate::consistency::local_repository(&repo.url),
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
        req.view = prepared.view();
        req.ignore_inode = prepared.ignore_inode();
        let consistency_warning = prepared.warning().map(str::to_string);
        let restic_token = prepared.restic_token().clone();
        let backed_up = self.inner.restic.backup(&repo, &req, &restic_token, &mut on_progress).await;
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
        if !keep.is_empty() && state == RunState::Succeeded {
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
        let include: Vec<String> =
            p.include.iter().map(|i| format!("{}/{}", root.trim_end_matches('/'), i.trim_matches('/'))).collect();
        // The size to restore, for progress: from the backup run that wrote
        // the snapshot when this agent recorded it (a `restic stats` costs a
        // key derivation, ~0.7 s), else from restic.
        let recorded = self
            .inner
            .store
            .backup_of_snapshot(&policy.id, &snap.id)
            .ok()
            .flatten()
            .and_then(|r| r.summary)
            .filter(|s| s.total_bytes_processed > 0 && p.include.is_empty());
        let (total_bytes, total_files) = match recorded {
            Some(s) => (s.total_bytes_processed, s.total_files_processed),
            None => self.inner.restic.restore_size(&repo, &snap.id, token).await.unwrap_or((0, 0)),
        };
        let started = std::time::Instant::now();

        // restic restores under the snapshot's absolute path and will not
        // overwrite symlinks, so it restores into a staging directory on the
        // target's filesystem (inside the target), and the files are then
        // moved into place with renames.
        let target = PathBuf::from(p.target.clone().unwrap_or_default());
        let staging = target.join(format!("{RESTORE_STAGING_PREFIX}{}", run.id));
        std::fs::create_dir_all(&staging).map_err(|e| io_error("cannot create the restore directory", &staging, e))?;
        let req = RestoreRequest { snapshot_id: snap.id.clone(), target: staging.clone(), include, verify: p.verify };
        let result = {
            let watch = self.watch_restore_progress(&run.id, staging.clone(), total_bytes, total_files);
            let r = self.inner.restic.restore(&repo, &req, token).await;
            watch.abort();
            r
        };
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(run_error(e));
        }
        let moved = merge_into(&staging.join(root.trim_start_matches('/')), &target);
        let _ = std::fs::remove_dir_all(&staging);
        moved.map_err(|e| io_error("cannot move the restored files into place", &target, e))?;
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            run.id.clone(),
            Progress {
                percent_done: 1.0,
                files_done: total_files,
                total_files,
                bytes_done: total_bytes,
                total_bytes,
                seconds_remaining: Some(0),
            },
        );
        run.summary = Some(RunSummary {
            total_files_processed: total_files,
            total_bytes_processed: total_bytes,
            total_duration: started.elapsed().as_secs_f64(),
            ..Default::default()
        });
        Ok(RunState::Succeeded)
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
        let _exclusive = self.repo_lock(&repo, true, run, token).await?;
        let mut summary = RunSummary::default();
        let started = std::time::Instant::now();
        if p.forget {
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
        if p.prune {
            self.inner.restic.prune(&repo, token).await.map_err(run_error)?;
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
        use std::os::unix::fs::PermissionsExt;
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

        struct Scratch(PathBuf);
        impl Drop for Scratch {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let scratch = Scratch(self.inner.config.state_dir.join("drills").join(&run.id));
        std::fs::create_dir_all(&scratch.0)
            .map_err(|e| io_error("cannot create the drill directory", &scratch.0, e))?;
        let everything = sample.len() + skipped == files_in_snapshot && skipped == 0;
        let include = if everything || sample.len() > DRILL_MAX_INCLUDES {
            Vec::new()
        } else {
            sample.iter().map(|n| n.path.clone()).collect()
        };
        let req = RestoreRequest { snapshot_id: snap.id.clone(), target: scratch.0.clone(), include, verify: true };
        let mut mismatches = Vec::new();
        match self.inner.restic.restore(&repo, &req, token).await {
            Ok(()) => {}
            Err(ResticError::Failed { stderr, .. }) => {
                mismatches.push(format!("restic restore --verify reported errors: {stderr}"));
            }
            Err(e) => return Err(run_error(e)),
        }
        for n in &sample {
            let path = scratch.0.join(n.path.trim_start_matches('/'));
            let problem = match std::fs::symlink_metadata(&path) {
                Err(_) => Some("missing after the restore".to_string()),
                Ok(m) if !m.is_file() => Some("not a regular file after the restore".into()),
                Ok(m) if m.len() != n.size => Some(format!("{} bytes instead of {}", m.len(), n.size)),
                Ok(m) if m.permissions().mode() & 0o7777 != n.mode & 0o7777 => {
                    Some(format!("permissions {:o} instead of {:o}", m.permissions().mode() & 0o7777, n.mode & 0o7777))
                }
                Ok(_) => None,
            };
            if let Some(p) = problem {
                mismatches.push(format!("{}: {p}", n.path));
            }
        }
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

/// Move everything inside `from` into `to` (same filesystem: renames),
/// replacing what is there: a file or symlink is replaced atomically, a
/// directory is merged, a directory in the way of a file is removed. Then
/// `to` gets the owner, mode and times of `from`. Used to put a restore in
/// place, so restic never has to overwrite (it refuses existing symlinks).
pub(crate) fn merge_into(from: &Path, to: &Path) -> std::io::Result<()> {
    if !from.exists() {
        return Ok(()); // an include that matched nothing
    }
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let src = e.path();
        let dest = to.join(e.file_name());
        let src_is_dir = e.file_type()?.is_dir();
        let dest_meta = dest.symlink_metadata().ok();
        let dest_is_dir = dest_meta.as_ref().is_some_and(|m| m.is_dir());
        if src_is_dir && dest_is_dir {
            merge_into(&src, &dest)?;
            continue;
        }
        if dest_is_dir {
            std::fs::remove_dir_all(&dest)?;
        } else if src_is_dir && dest_meta.is_some() {
            std::fs::remove_file(&dest)?;
        }
        std::fs::rename(&src, &dest)?;
    }
    copy_dir_metadata(from, to)
}

fn copy_dir_metadata(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(from)?;
    std::os::unix::fs::chown(to, Some(m.uid()), Some(m.gid()))?;
    std::fs::set_permissions(to, m.permissions())?;
    let times = std::fs::FileTimes::new().set_accessed(m.accessed()?).set_modified(m.modified()?);
    std::fs::File::open(to)?.set_times(times)?;
    Ok(())
}

/// The snapshot a backup run wrote, as far as a restore needs it (its id and
/// the path it holds), from the run's record.
fn snapshot_of(run: &RunRecord) -> Option<Snapshot> {
    let id = run.snapshot_id.clone()?;
    let path = run.params.as_ref()?.get("path")?.as_str()?.to_string();
    Some(Snapshot { short_id: id.chars().take(8).collect(), id, paths: vec![path], ..Default::default() })
}
