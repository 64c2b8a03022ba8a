//! A maintenance run of a repository: forget, prune and check, one per
//! repository at a time, skipped or delegated where another holds them.

use super::*;
use super::{run_error, Scheduler};
use crate::restic::ResticError;
use crate::store::{PolicyRecord, RunRecord};
use soda_syncer_domain::run::{RunError, RunSummary};
use soda_syncer_domain::RunState;
use soda_syncer_domain::RunTrigger;
use tokio_util::sync::CancellationToken;

impl Scheduler {
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
}

/// How a scheduled maintenance run that another agent does instead begins its warning.
pub(super) const MAINTENANCE_SKIPPED: &str = "skipped";

pub(super) const MAINTENANCE_DELEGATED: &str = "the repository is append-only for this node: forget and prune are delegated to the maintainer (soda-syncer maintain), which holds the delete rights";
