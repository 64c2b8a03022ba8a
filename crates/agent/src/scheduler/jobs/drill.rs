//! A restore drill: a verified sample of the newest snapshot restored
//! into a scratch directory and compared, then removed on every path.

use super::{run_error, Scheduler};
use crate::restic::{ResticError, RestoreRequest};
use crate::store::{PolicyRecord, RunRecord};
use soda_syncer_domain::run::{RunError, RunSummary};
use soda_syncer_domain::RunState;
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

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

/// A drill restores at most this many files by name (`--include` each);
/// a drill of every file restores the whole snapshot instead.
pub(super) const DRILL_MAX_INCLUDES: usize = 5000;
