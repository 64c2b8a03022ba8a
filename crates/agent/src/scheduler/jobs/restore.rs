//! A restore run: into a new directory or in place, through restic's own
//! in-place restore (0.18+) or a staging directory, with its space check.

use super::*;
use super::{run_error, Scheduler};
use crate::restic::{Repo, ResticError, RestoreRequest};
use crate::store::{PolicyRecord, RunRecord};
use soda_syncer_domain::restic_json::Snapshot;
use soda_syncer_domain::restore::RestoreStatus;
use soda_syncer_domain::run::{Progress, RunError, RunSummary};
use soda_syncer_domain::RunState;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl Scheduler {
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
    pub(super) async fn restore_staged(&self, job: &RestoreJob<'_>) -> Result<Option<RestoreStatus>, RunError> {
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
    pub(super) async fn restore_natively(&self, job: &RestoreJob<'_>) -> Result<InPlace, RunError> {
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
    pub(super) async fn remove_specials_where_files_go(&self, job: &RestoreJob<'_>) -> Result<(), RunError> {
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
    pub(super) fn restore_progress(&self, run_id: &str) -> impl FnMut(&RestoreStatus) + Send + '_ {
        let run_id = run_id.to_string();
        move |s: &RestoreStatus| {
            self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).insert(run_id.clone(), Progress::from(s));
        }
    }

    /// Refuse a restore that cannot fit, before anything is written,
    /// naming the filesystem and how much is missing.
    pub(super) fn check_space(
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
    pub(super) fn restore_error(&self, e: ResticError, target: &crate::beneath::Dir, target_path: &Path) -> RunError {
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
    pub(super) fn open_restore_target(&self, path: &Path, in_place: bool) -> Result<crate::beneath::Dir, RunError> {
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
    pub(super) fn pin_for_restore(
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
    pub(super) async fn latest_from_records(&self, policy: &PolicyRecord, repo: &Repo) -> Option<Snapshot> {
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
    pub(super) async fn recorded_snapshot(&self, policy: &PolicyRecord, repo: &Repo, wanted: &str) -> Option<Snapshot> {
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
    pub(super) fn watch_restore_progress(
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
}

/// The directory of the state directory where restic children see the
/// directory they restore into (each in its own mount namespace).
pub const PIN_DIR: &str = "restic-target";

/// What one restore run works with.
pub(super) struct RestoreJob<'a> {
    pub(super) run_id: String,
    pub(super) repo: &'a Repo,
    pub(super) snapshot_id: &'a str,
    /// The folder of the snapshot that holds the volume.
    pub(super) root: &'a str,
    pub(super) params: &'a RestoreParams,
    pub(super) target: &'a crate::beneath::Dir,
    pub(super) target_path: &'a Path,
    /// Bytes and files of the whole snapshot (0 when unknown).
    pub(super) totals: (u64, u64),
    pub(super) token: &'a CancellationToken,
}

pub(super) enum InPlace {
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
pub(super) fn needs_restic_in_place(
    p: &RestoreParams,
    v: Option<soda_syncer_domain::restic_version::ResticVersion>,
) -> String {
    let what = if p.delete { "delete" } else { "dryRun" };
    let flag = if p.delete { "--delete" } else { "--dry-run" };
    let have = v.map_or("an unknown version".to_string(), |v| format!("restic {v}"));
    format!(
        "{what} needs restic 0.17 or newer (restic restore {flag}), and this agent uses restic's own in-place restore from restic {IN_PLACE_RESTIC} on (the oldest its tests prove never follows a link planted in the volume); this node runs {have}: install restic {IN_PLACE_RESTIC} or newer, or restore without {what}"
    )
}

/// "/dev/vdb (ext4, mounted at /srv)" for the filesystem `dir` is on.
pub(super) fn describe_fs(dir: &crate::beneath::Dir, shown: &Path) -> String {
    match crate::consistency::filesystem_of(&dir.proc_path()) {
        Some((device, fs_type, mount_point)) => format!("{device} ({fs_type}, mounted at {mount_point})"),
        None => format!("the filesystem of {}", shown.display()),
    }
}

/// lstat of `rel` below `dir`, through held directories (None: missing or unreachable).
pub(super) fn lstat_below(dir: &crate::beneath::Dir, rel: &str) -> Option<libc::stat> {
    let rel = Path::new(rel);
    let (parent, name) = (rel.parent().unwrap_or(Path::new("")), rel.file_name()?);
    dir.open(parent).ok()?.lstat(name).ok().flatten()
}

pub(super) fn remove_below(dir: &crate::beneath::Dir, rel: &str) -> Result<(), crate::beneath::PathError> {
    let rel = Path::new(rel);
    let (parent, Some(name)) = (rel.parent().unwrap_or(Path::new("")), rel.file_name()) else { return Ok(()) };
    dir.open(parent)?.remove(name)
}
