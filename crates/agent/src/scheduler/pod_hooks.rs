//! Application hooks around a backup of a claim: every pod on this node
//! that uses the claim may name a `pre` and a `post` command (pod
//! annotations, see `soda_syncer_domain::annotations::pod_keys`), run in
//! its container through the Kubernetes API. `pre` runs before the
//! point-in-time view is made; once the `pre` phase started, every pod's
//! `post` runs on every path (failure, cancel, success), exactly once.

use soda_syncer_domain::annotations::HookOnError;
use soda_syncer_domain::run::RunError;
use soda_syncer_domain::Origin;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use super::{PodHookCall, PodHookSet, PodHooks, Scheduler};
use crate::store::PolicyRecord;

/// The pod hooks of one backup run.
pub(crate) struct PodHookRun {
    runner: Option<Arc<dyn PodHooks>>,
    sets: Vec<PodHookSet>,
    post_pending: bool,
    warnings: Vec<String>,
    post_error: Option<String>,
}

impl Scheduler {
    /// Run the `pre` hooks of the pods using the policy's claim. A failure
    /// with `on-error: Fail` runs every `post` hook, then fails the run with
    /// `pre_hook_failed`; with `Continue` it becomes a warning.
    pub(crate) async fn pod_hooks_pre(
        &self,
        policy: &PolicyRecord,
        token: &CancellationToken,
    ) -> Result<PodHookRun, RunError> {
        let mut run =
            PodHookRun { runner: None, sets: Vec::new(), post_pending: false, warnings: Vec::new(), post_error: None };
        let claim = match (&policy.origin, &policy.legacy_key) {
            (Origin::Kubernetes, Some(k)) => k.strip_prefix("kube:").unwrap_or(k),
            _ => return Ok(run),
        };
        let Some(runner) = self.inner.pod_hooks.get().cloned() else { return Ok(run) };
        run.sets = runner.hooks_for(claim).map_err(|message| RunError { code: "pre_hook_failed".into(), message })?;
        run.runner = Some(runner.clone());
        if run.sets.iter().all(|s| s.pre.is_none() && s.post.is_none()) {
            return Ok(run);
        }
        run.post_pending = true;
        for hook in run.sets.iter().filter_map(|s| s.pre.clone()).collect::<Vec<_>>() {
            let result = tokio::select! {
                r = call(runner.as_ref(), &hook) => r,
                _ = token.cancelled() => Err("cancelled".into()),
            };
            let Err(why) = result else { continue };
            let message = format!("the pre hook {} {why}", shown(&hook));
            if token.is_cancelled() || hook.on_error == HookOnError::Fail {
                run.post().await;
                if token.is_cancelled() {
                    return Err(RunError { code: "cancelled".into(), message: "the run was cancelled".into() });
                }
                return Err(RunError {
                    code: "pre_hook_failed".into(),
                    message: format!("{message}; the backup was not made"),
                });
            }
            tracing::warn!(%message, "pre hook failed; going on (on-error: Continue)");
            run.warnings.push(message);
        }
        Ok(run)
    }
}

async fn call(runner: &dyn PodHooks, hook: &PodHookCall) -> Result<(), String> {
    let started = std::time::Instant::now();
    let result = runner.exec(hook).await;
    let ms = started.elapsed().as_millis() as u64;
    let outcome = match result {
        Ok(exit) if exit.code == 0 => Ok(()),
        Ok(exit) if exit.output.trim().is_empty() => Err(format!("exited with code {}", exit.code)),
        Ok(exit) => Err(format!("exited with code {}: {}", exit.code, exit.output.trim())),
        Err(e) => Err(e),
    };
    match &outcome {
        Ok(()) => tracing::info!(hook = %shown(hook), ms, "pod hook succeeded"),
        Err(e) => tracing::error!(hook = %shown(hook), ms, error = %e, "pod hook failed"),
    }
    outcome
}

fn shown(h: &PodHookCall) -> String {
    let mut argv = h.command.join(" ");
    if argv.len() > 120 {
        let cut = (0..=120).rev().find(|i| argv.is_char_boundary(*i)).unwrap_or(0);
        argv.truncate(cut);
        argv.push('…');
    }
    format!("`{argv}` in {}/{} (container {})", h.namespace, h.pod, h.container)
}

impl PodHookRun {
    /// Run every pod's `post` hook (once; later calls do nothing). Not
    /// cancellable: they undo what `pre` did; each is bounded by its timeout.
    pub(crate) async fn post(&mut self) {
        if !std::mem::take(&mut self.post_pending) {
            return;
        }
        let Some(runner) = self.runner.clone() else { return };
        for hook in self.sets.iter().filter_map(|s| s.post.as_ref()) {
            if let Err(why) = call(runner.as_ref(), hook).await {
                let message = format!("the post hook {} {why}", shown(hook));
                match hook.on_error {
                    HookOnError::Fail => {
                        self.post_error.get_or_insert(message);
                    }
                    HookOnError::Continue => self.warnings.push(message),
                }
            }
        }
    }

    /// Failures that `on-error: Continue` let pass.
    pub(crate) fn warning(&self) -> Option<String> {
        (!self.warnings.is_empty()).then(|| self.warnings.join("; "))
    }

    /// The first `post` hook that failed with `on-error: Fail`.
    pub(crate) fn post_error(&self) -> Option<&str> {
        self.post_error.as_deref()
    }
}

impl Drop for PodHookRun {
    /// Dropped with `post` still due (the run's task was aborted): run the
    /// post hooks in the background rather than leave an application paused.
    fn drop(&mut self) {
        if !self.post_pending {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let mut rest = PodHookRun {
            runner: self.runner.take(),
            sets: std::mem::take(&mut self.sets),
            post_pending: true,
            warnings: Vec::new(),
            post_error: None,
        };
        self.post_pending = false;
        tracing::error!("a backup ended without running its pods' post hooks: running them now (fallback)");
        rt.spawn(async move { rest.post().await });
    }
}
