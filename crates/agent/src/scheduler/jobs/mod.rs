//! What each kind of run does, one file per job body: `backup.rs` (with
//! retention), `restore.rs`, `maintenance.rs` (forget, prune, check) and
//! `drill.rs`; here the parameters runs are asked with, the requests that
//! queue them, and what the bodies share. Runs that share a repository
//! coordinate through a per-repository lock: backups and restores share it,
//! forget/prune/check take it alone, so a prune waits for backups in flight
//! and queued backups wait for the prune, instead of failing on restic's own
//! lock.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use soda_syncer_domain::run::RunError;
use soda_syncer_domain::{RunKind, RunState};
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use super::{run_error, RunRequestError, Scheduler};
use crate::restic::Repo;
use crate::store::{PolicyRecord, RunRecord};
use soda_syncer_domain::field::FieldError;
use soda_syncer_domain::policy::validate_abs_path;
use soda_syncer_domain::restic_json::Snapshot;
use soda_syncer_domain::RunTrigger;

mod backup;
mod drill;
mod maintenance;
mod restore;

use backup::tree_size;
use maintenance::MAINTENANCE_SKIPPED;
use restore::needs_restic_in_place;
pub use restore::restic_restores_in_place;

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

/// A run summary's `retention` when the repository refuses this node's deletes.
pub const RETENTION_DELEGATED: &str = "delegated to the maintainer";

/// How to fix a path refused for lying outside the allowed roots.
const ALLOWED_ROOT_HINT: &str = "choose a path below one of them, or start the agent with --allowed-root DIR";

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

/// The snapshot a backup run wrote, as far as a restore needs it (its id and
/// the path it holds), from the run's record.
fn snapshot_of(run: &RunRecord) -> Option<Snapshot> {
    let id = run.snapshot_id.clone()?;
    let path = run.params.as_ref()?.get("path")?.as_str()?.to_string();
    Some(Snapshot { short_id: id.chars().take(8).collect(), id, paths: vec![path], ..Default::default() })
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
        let bare = soda_syncer_domain::location::without_userinfo;
        spec.append_only
            || c.append_only
            || c.append_only_repositories
                .iter()
                .any(|r| bare(r) == bare(url) || bare(r) == bare(&spec.repository_url()))
    }
}
