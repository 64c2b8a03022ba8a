//! Orchestration: when runs start, in what order, how many at once, and
//! what happens when they end. One loop wakes at the next due time (never
//! one sleeper per policy), turns due policies into queued runs, and starts
//! them up to `--max-concurrent-runs`. Each run is a task with a child
//! cancellation token. Everything is recorded in the store first, so a
//! crash loses nothing but the run in flight (marked `interrupted` at the
//! next start).

pub(crate) mod jobs;
mod pod_hooks;
mod records;
mod verify;

pub use jobs::{MaintenanceParams, RestoreParams};

use chrono::{DateTime, Utc};
use soda_syncer_domain::restic_json::Snapshot;
use soda_syncer_domain::run::{Progress, RunError};
use soda_syncer_domain::schedule::next_due;
use soda_syncer_domain::{RunKind, RunState, RunTrigger};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::ids::new_id;
use crate::metrics::RunMetrics;
use crate::restic::{Repo, Restic, ResticError};
use crate::schedules::ScheduleBook;
use crate::store::{PolicyRecord, RunRecord, Store, StoreError};

/// Why a run could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RunRequestError {
    #[error("policy {policy} already has run {run} {state}; wait for it or cancel it")]
    Busy { policy: String, run: String, state: &'static str },
    #[error("{0}")]
    Invalid(soda_syncer_domain::field::FieldError),
    #[error("{0}")]
    TargetNotEmpty(String),
    #[error("{STOPPING_REFUSED}")]
    Stopping,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a stop interrupted a run, as the run records it (code `agent_stopped`).
pub const INTERRUPTED_BY_STOP: &str =
    "agent stopping for upgrade or restart: the run was interrupted, and the next agent on this node runs it again as soon as it starts";
const INTERRUPTED_BEFORE_START: &str =
    "agent stopping for upgrade or restart before this run started: the next agent on this node runs it as soon as it starts";
const STOPPING_REFUSED: &str =
    "the agent is stopping (an upgrade or restart) and accepts no new runs: try again once the next agent on this node is ready";

#[derive(Default)]
struct Slots {
    /// Run ids waiting for a free slot, in the order they became due.
    queue: VecDeque<String>,
    /// policy id -> queued run id
    queued: HashMap<String, String>,
    /// policy id -> (run id, its cancellation token)
    running: HashMap<String, (String, CancellationToken)>,
    /// Policies whose previous run was interrupted by a stop of the agent.
    after_restart: HashSet<String>,
}

struct Inner {
    store: Store,
    restic: Restic,
    config: Config,
    wake: Notify,
    slots: Mutex<Slots>,
    live: Mutex<HashMap<String, Progress>>,
    /// Set once the loop runs; read by /readyz.
    running: AtomicBool,
    cancel: CancellationToken,
    metrics: RunMetrics,
    /// This agent's lock per repository (see `jobs`).
    repo_locks: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// Snapshot listings per policy, kept briefly so a busy dashboard does
    /// not hammer the object store.
    snapshot_cache: Mutex<HashMap<String, (std::time::Instant, Vec<Snapshot>)>>,
    /// Every run that ended, for whoever reports results elsewhere (the
    /// Kubernetes adapter writes them onto the claim).
    finished: tokio::sync::broadcast::Sender<RunRecord>,
    /// Where policies with a `repository.secretRef` get their keys.
    secrets: std::sync::OnceLock<Arc<dyn SecretSource>>,
    maintainership: std::sync::OnceLock<Arc<dyn Maintainership>>,
    /// Runs the application hooks of the pods that use a claim.
    pod_hooks: std::sync::OnceLock<Arc<dyn PodHooks>>,
    /// When drill schedules were last looked at (they are checked every 5 s).
    drills_checked: Mutex<Option<std::time::Instant>>,
    /// The earliest drill due, so the loop wakes for it.
    next_drill: Mutex<Option<DateTime<Utc>>>,
    /// Each policy's parsed schedules, as admission attached them.
    schedules: ScheduleBook,
    /// What the consistency methods journal into and count in.
    consistency: crate::consistency::Deps,
    /// A random id per start: digests recorded by an earlier agent process
    /// never prove a run unchanged (see `verify`).
    instance: String,
}

/// Across a cluster, one agent maintains (prunes and checks) each
/// repository; the others skip their scheduled maintenance of it.
/// The name of a repository's maintenance Lease, from its bookkeeping key
/// (`short_hash` of the policy's `repository_url()`).
pub fn maintenance_lease_of_key(repo_key: &str) -> String {
    format!("soda-syncer-maint-{}", &repo_key[..repo_key.len().min(16)])
}

/// The name of the maintenance Lease of the repository a policy names.
pub fn maintenance_lease_name(repository_url: &str) -> String {
    maintenance_lease_of_key(&crate::ids::short_hash(&[repository_url]))
}

pub trait Maintainership: Send + Sync {
    /// Whether this agent is (or now becomes) the repository's maintainer.
    fn is_maintainer<'a>(&'a self, repo_key: &'a str) -> futures_util::future::BoxFuture<'a, bool>;
}

/// Reads a repository's keys from a secret store when a run starts, so
/// they are never copied into the agent's database.
pub trait SecretSource: Send + Sync {
    fn repository<'a>(
        &'a self,
        r: &'a soda_syncer_domain::SecretRef,
    ) -> futures_util::future::BoxFuture<'a, Result<Repo, RunError>>;

    /// The repository a SODA profile names (`repository.sodaProfile`), read
    /// when a run starts. Sources without a SODA connection have none.
    fn profile_repository<'a>(
        &'a self,
        profile_id: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<Repo, RunError>> {
        Box::pin(async move { Err(no_soda(profile_id)) })
    }
}

fn no_soda(profile_id: &str) -> RunError {
    RunError {
        code: "secrets_unavailable".into(),
        message: format!(
            "the repository is named by SODA profile {profile_id:?}, but this agent has no SODA connection (start it with --kubernetes on and --soda-endpoint)"
        ),
    }
}

/// One application hook to run in a pod's container (`pods/exec`).
#[derive(Debug, Clone)]
pub struct PodHookCall {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub command: Vec<String>,
    pub timeout: Duration,
    pub on_error: soda_syncer_domain::annotations::HookOnError,
}

/// The hooks of one pod that uses a claim on this node.
#[derive(Debug, Clone)]
pub struct PodHookSet {
    pub namespace: String,
    pub pod: String,
    pub pre: Option<PodHookCall>,
    pub post: Option<PodHookCall>,
}

/// How a hook ended once it ran to its end: its exit code (0: success) and
/// the last bytes of its stdout and stderr.
#[derive(Debug, Clone)]
pub struct HookExit {
    pub code: i32,
    pub output: String,
}

/// Runs application hooks inside pods (the Kubernetes adapter: `pods/exec`).
pub trait PodHooks: Send + Sync {
    /// The hooks of the pods on this node that use a claim (`namespace/claim`).
    /// A pod annotation that cannot be understood is an error naming it.
    fn hooks_for(&self, claim: &str) -> Result<Vec<PodHookSet>, String>;
    /// Run one hook within its timeout. `Err`: it could not be run or did
    /// not finish in time (and was abandoned).
    fn exec<'a>(&'a self, hook: &'a PodHookCall) -> futures_util::future::BoxFuture<'a, Result<HookExit, String>>;
}

/// How long a policy's snapshot listing is served from memory.
const SNAPSHOT_CACHE_TTL: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    pub fn new(store: Store, restic: Restic, config: Config, cancel: CancellationToken) -> Scheduler {
        Scheduler {
            inner: Arc::new(Inner {
                restic,
                config,
                wake: Notify::new(),
                slots: Mutex::default(),
                live: Mutex::default(),
                running: AtomicBool::new(false),
                cancel,
                metrics: RunMetrics::default(),
                repo_locks: Mutex::default(),
                snapshot_cache: Mutex::default(),
                finished: tokio::sync::broadcast::channel(256).0,
                secrets: std::sync::OnceLock::new(),
                maintainership: std::sync::OnceLock::new(),
                pod_hooks: std::sync::OnceLock::new(),
                drills_checked: Mutex::new(None),
                next_drill: Mutex::new(None),
                instance: new_id(),
                schedules: ScheduleBook::default(),
                consistency: crate::consistency::Deps::new(Arc::new(store.clone())),
                store,
            }),
        }
    }

    fn config(&self) -> &Config {
        &self.inner.config
    }
    /// Each policy's parsed schedules: admission puts them here, the engine
    /// and the readers of due times and deadlines take them from here.
    pub fn schedules(&self) -> &ScheduleBook {
        &self.inner.schedules
    }
    /// The consistency methods' journal and metrics (for the start-up
    /// recovery, discarding kept copies, and `/metrics`).
    pub fn consistency(&self) -> &crate::consistency::Deps {
        &self.inner.consistency
    }
    /// The run counters and histograms `/metrics` shows.
    pub fn metrics(&self) -> &RunMetrics {
        &self.inner.metrics
    }
    /// Runs that end from now on (a lagging receiver loses the oldest).
    pub fn subscribe_finished(&self) -> tokio::sync::broadcast::Receiver<RunRecord> {
        self.inner.finished.subscribe()
    }
    /// Set once, by the adapter that coordinates the agents of a cluster.
    pub fn set_maintainership(&self, m: Arc<dyn Maintainership>) {
        let _ = self.inner.maintainership.set(m);
    }

    /// Set once, by the adapter that can read referenced secrets.
    pub fn set_secret_source(&self, source: Arc<dyn SecretSource>) {
        let _ = self.inner.secrets.set(source);
    }

    /// Set once, by the adapter that can exec in pods.
    pub fn set_pod_hooks(&self, hooks: Arc<dyn PodHooks>) {
        let _ = self.inner.pod_hooks.set(hooks);
    }

    /// How to reach a policy's repository: its stored keys, or those in the
    /// Secret or SODA profile it references, read now.
    /// The policy's repository with its keys, read now from wherever they
    /// live; a local path outside the repository roots is refused here too
    /// (a Secret or SODA profile may name one).
    pub async fn repo_for(&self, policy: &PolicyRecord) -> Result<Repo, RunError> {
        let repo = self.repo_unchecked(policy).await?;
        crate::admission::check_repository(&self.inner.config, &repo.url)
            .map_err(|e| RunError { code: "repository_not_allowed".into(), message: e.message })?;
        Ok(repo)
    }

    async fn repo_unchecked(&self, policy: &PolicyRecord) -> Result<Repo, RunError> {
        if let Some(id) = &policy.spec.repository.soda_profile {
            return match self.inner.secrets.get() {
                Some(source) => source.profile_repository(id).await,
                None => Err(no_soda(id)),
            };
        }
        match &policy.spec.repository.secret_ref {
            None => Ok(repo_of(policy)),
            Some(r) => match self.inner.secrets.get() {
                Some(source) => source.repository(r).await,
                None => Err(RunError {
                    code: "secrets_unavailable".into(),
                    message: format!(
                        "the repository's keys are in Secret {}/{}, but this agent is not connected to Kubernetes (start it with --kubernetes on)",
                        r.namespace, r.name
                    ),
                }),
            },
        }
    }

    pub fn is_running(&self) -> bool {
        self.inner.running.load(Ordering::Relaxed)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.inner.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs waiting for a free slot.
    pub fn queue_depth(&self) -> usize {
        self.slots().queue.len()
    }
    pub fn running_count(&self) -> usize {
        self.slots().running.len()
    }

    /// Live progress of a running run (kept in memory; the store gets the
    /// final numbers).
    pub fn live_progress(&self, run_id: &str) -> Option<Progress> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).get(run_id).cloned()
    }

    /// A policy's snapshots, from the repository or a listing younger than
    /// 15 s. Newest last, as restic lists them.
    pub async fn policy_snapshots(&self, policy: &PolicyRecord) -> Result<Vec<Snapshot>, ResticError> {
        if let Some((at, snaps)) = self.inner.snapshot_cache.lock().unwrap_or_else(|p| p.into_inner()).get(&policy.id) {
            if at.elapsed() < SNAPSHOT_CACHE_TTL {
                return Ok(snaps.clone());
            }
        }
        let tag = format!("policy={}", policy.id);
        let repo = self.repo_for(policy).await.map_err(|e| ResticError::Credentials(e.message))?;
        let snaps = match self.inner.restic.snapshots(&repo, Some(&tag), None, &[], &self.inner.cancel).await {
            Ok(s) => s,
            // No repository yet: nothing was backed up, which is no error here.
            Err(ResticError::RepositoryNotFound { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        self.inner
            .snapshot_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(policy.id.clone(), (std::time::Instant::now(), snaps.clone()));
        Ok(snaps)
    }

    fn forget_cached_snapshots(&self, policy_id: &str) {
        self.inner.snapshot_cache.lock().unwrap_or_else(|p| p.into_inner()).remove(policy_id);
    }

    /// Wake the loop: a policy was created, changed or resumed.
    pub fn poke(&self) {
        self.inner.wake.notify_one();
    }

    /// Prepare state after a start: runs left in flight are interrupted,
    /// and their policies are due at once (one catch-up run each).
    pub fn recover_after_start(&self) -> Result<usize, StoreError> {
        let now = Utc::now();
        // A crash left its runs queued or running: they become interrupted now.
        let mut ids: std::collections::BTreeSet<String> =
            self.inner.store.interrupt_unfinished_runs(now)?.into_iter().collect();
        // A clean stop (an upgrade) recorded its runs interrupted itself:
        // the policy's newest run says so. Both kinds run again at once.
        for run in self.inner.store.last_runs()?.into_values() {
            if run.state == RunState::Interrupted && run.kind == RunKind::Backup {
                tracing::info!(
                    policy = %run.policy_id,
                    interrupted_run = %run.id,
                    trigger = run.trigger.as_str(),
                    "the last stop interrupted this policy's backup; running it again now"
                );
                ids.insert(run.policy_id);
            }
        }
        for id in &ids {
            if let Ok(mut p) = self.inner.store.get_policy(id) {
                if p.next_run_at.is_none() || p.next_run_at > Some(now) {
                    p.next_slot = Some(now);
                    p.next_run_at = Some(now);
                    self.inner.store.set_policy_schedule(&p)?;
                }
            }
        }
        let n = ids.len();
        self.slots().after_restart.extend(ids);
        // Policies whose run was in flight have next_run_at NULL; give any
        // other such policy a due time too, so none is forgotten.
        for mut p in self.inner.store.list_policies()? {
            self.ensure_repository(&p)?;
            if p.next_run_at.is_none() {
                p.next_slot = Some(now);
                p.next_run_at = Some(now);
                self.inner.store.set_policy_schedule(&p)?;
            }
        }
        Ok(n)
    }

    /// Queue a run of `policy` now (manual, legacy, ...). One run per
    /// policy at a time: a second request is refused with `Busy`.
    pub fn request_run(
        &self,
        policy: &PolicyRecord,
        kind: RunKind,
        trigger: RunTrigger,
    ) -> Result<RunRecord, RunRequestError> {
        self.request_run_with(policy, kind, trigger, None)
    }

    /// As `request_run`, with the request's parameters (restore, maintenance).
    pub fn request_run_with(
        &self,
        policy: &PolicyRecord,
        kind: RunKind,
        trigger: RunTrigger,
        params: Option<serde_json::Value>,
    ) -> Result<RunRecord, RunRequestError> {
        let now = Utc::now();
        let mut slots = self.slots();
        // Under the slots' lock: the loop's stop drains the queue under it too.
        if self.inner.cancel.is_cancelled() {
            return Err(RunRequestError::Stopping);
        }
        if let Some(run) = slots.queued.get(&policy.id) {
            return Err(RunRequestError::Busy { policy: policy.spec.name.clone(), run: run.clone(), state: "queued" });
        }
        if let Some((run, _)) = slots.running.get(&policy.id) {
            return Err(RunRequestError::Busy { policy: policy.spec.name.clone(), run: run.clone(), state: "running" });
        }
        let mut run = RunRecord::new(new_id(), &policy.id, kind, trigger, now);
        run.due_at = Some(now);
        run.params = params;
        self.inner.store.save_run(&run)?;
        slots.queue.push_back(run.id.clone());
        slots.queued.insert(policy.id.clone(), run.id.clone());
        drop(slots);
        self.poke();
        Ok(run)
    }

    /// A policy was paused: its queued run (if any) is cancelled now; a
    /// running one finishes.
    pub fn policy_paused(&self, policy_id: &str) {
        let removed = {
            let mut slots = self.slots();
            let run = slots.queued.remove(policy_id);
            if let Some(r) = &run {
                slots.queue.retain(|q| q != r);
            }
            run
        };
        if let Some(run_id) = removed {
            self.finish_unstarted(
                &run_id,
                RunState::Cancelled,
                "cancelled",
                "the policy was paused before the run started",
            );
        }
    }

    /// A policy was deleted: cancel its queued and running runs.
    pub fn policy_deleted(&self, policy_id: &str) {
        self.policy_paused(policy_id);
        self.inner.schedules.forget(policy_id);
        if let Some((_, token)) = self.slots().running.get(policy_id) {
            token.cancel();
        }
    }

    /// Cancel one run. Returns false when it is not queued or running.
    pub fn cancel_run(&self, run: &RunRecord) -> bool {
        let queued = {
            let mut slots = self.slots();
            if slots.queued.get(&run.policy_id) == Some(&run.id) {
                slots.queued.remove(&run.policy_id);
                slots.queue.retain(|q| q != &run.id);
                true
            } else {
                if let Some((id, token)) = slots.running.get(&run.policy_id) {
                    if id == &run.id {
                        token.cancel();
                        return true;
                    }
                }
                false
            }
        };
        if queued {
            self.finish_unstarted(&run.id, RunState::Cancelled, "cancelled", "cancelled before it started");
        }
        queued
    }

    fn finish_unstarted(&self, run_id: &str, state: RunState, code: &str, why: &str) {
        if let Ok(mut run) = self.inner.store.get_run(run_id) {
            run.state = state;
            run.finished_at = Some(Utc::now());
            run.error = Some(RunError { code: code.into(), message: why.into() });
            let _ = self.inner.store.save_run(&run);
            if let Ok(policy) = self.inner.store.get_policy(&run.policy_id) {
                self.inner.metrics.run_ended(&policy, &run);
            }
        }
    }

    /// Recompute a policy's next run after it was created or changed, if
    /// no scheduled run of it is in flight.
    pub fn reschedule(&self, p: &mut PolicyRecord) -> Result<(), StoreError> {
        let schedules = self.inner.schedules.of(&p.id, &p.spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let retry = p.last_failed_at.map(|t| (t, p.consecutive_failures));
        if let Some((slot, due)) =
            next_due(&p.id, &schedules.backup, p.spec.jitter_seconds, p.last_slot, retry, Utc::now())
        {
            p.next_slot = Some(slot);
            p.next_run_at = Some(due);
        } else {
            p.next_slot = None;
            p.next_run_at = None;
        }
        self.inner.store.set_policy_schedule(p)?;
        self.ensure_repository(p)?;
        self.poke();
        Ok(())
    }

    /// Give the policy's repository a maintenance schedule if it has none:
    /// the first prune and check one period (plus a per-repository jitter)
    /// from now.
    fn ensure_repository(&self, p: &PolicyRecord) -> Result<(), StoreError> {
        let url = p.spec.repository_url();
        let key = crate::ids::short_hash(&[&url]);
        let now = Utc::now();
        let c = &self.inner.config;
        let jitter = soda_syncer_domain::schedule::jitter_offset(&key, now, c.maintenance_jitter.as_secs());
        let prune = now + chrono::Duration::from_std(c.prune_every).unwrap_or_default() + jitter;
        let check = now + chrono::Duration::from_std(c.check_every).unwrap_or_default() + jitter;
        self.inner.store.ensure_repository(&key, prune, check)
    }

    /// Queue a maintenance run for each repository whose prune or check is
    /// due, under the oldest schedulable policy that uses it (whose
    /// credentials it borrows).
    fn enqueue_maintenance(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let due = self.inner.store.due_repositories(now)?;
        if due.is_empty() {
            return Ok(());
        }
        let mut policies = self.inner.store.list_policies()?;
        policies.sort_by_key(|p| p.created_at);
        let c = &self.inner.config;
        for mut m in due {
            let sharing: Vec<&PolicyRecord> =
                policies.iter().filter(|p| crate::ids::short_hash(&[&p.spec.repository_url()]) == m.key).collect();
            let Some(policy) = sharing.iter().copied().find(|p| p.schedulable()) else {
                continue;
            };
            let prune = m.next_prune_at.is_some_and(|t| t <= now);
            let check = m.next_check_at.is_some_and(|t| t <= now);
            // In a gap between the repository's backups on this node (see
            // `maintenance_start`); waited for at most a quarter of the
            // shorter maintenance period, and never more than 6 hours.
            let due_since = [m.next_prune_at.filter(|_| prune), m.next_check_at.filter(|_| check)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(now);
            let busy = {
                let slots = self.slots();
                sharing.iter().any(|p| slots.running.contains_key(&p.id) || slots.queued.contains_key(&p.id))
            };
            let next_backup = sharing.iter().filter(|p| p.schedulable()).filter_map(|p| p.next_run_at).min();
            let max_wait = (c.prune_every.min(c.check_every) / 4).min(Duration::from_secs(6 * 3600));
            use soda_syncer_domain::schedule::{maintenance_start, MaintenanceStart};
            let chrono_of = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            match maintenance_start(
                now,
                due_since,
                busy,
                next_backup,
                chrono_of(c.maintenance_gap),
                chrono_of(max_wait),
            ) {
                MaintenanceStart::Now => {}
                MaintenanceStart::Wait => {
                    tracing::debug!(repository = %m.key, busy, ?next_backup, "maintenance due: waiting for a gap between backups");
                    continue;
                }
                MaintenanceStart::NowWithoutGap => tracing::warn!(
                    repository = %m.key,
                    waited_s = (now - due_since).num_seconds(),
                    "the repository's backups left no gap for its maintenance: maintaining now; its backups wait for the lock"
                ),
            }
            let params =
                MaintenanceParams { forget: false, prune, check, read_data_subset: c.check_read_data_subset.clone() };
            let kind = params.kind();
            match self.request_run_with(policy, kind, RunTrigger::Schedule, serde_json::to_value(&params).ok()) {
                Ok(_) => {
                    let jitter =
                        soda_syncer_domain::schedule::jitter_offset(&m.key, now, c.maintenance_jitter.as_secs());
                    if prune {
                        m.next_prune_at =
                            Some(now + chrono::Duration::from_std(c.prune_every).unwrap_or_default() + jitter);
                    }
                    if check {
                        m.next_check_at =
                            Some(now + chrono::Duration::from_std(c.check_every).unwrap_or_default() + jitter);
                    }
                    self.inner.store.save_repository_maintenance(&m)?;
                    tracing::info!(policy = %policy.id, prune, check, "repository maintenance queued");
                }
                Err(RunRequestError::Store(e)) => return Err(e),
                Err(_) => {} // busy: it is queued after the policy's current run ends
            }
        }
        Ok(())
    }

    /// The loop. Returns when `cancel` fires, after in-flight runs were
    /// cancelled and waited for (up to the shutdown grace).
    pub async fn run(self) {
        let mut jobs: JoinSet<()> = JoinSet::new();
        self.inner.running.store(true, Ordering::Relaxed);
        let cancel = self.inner.cancel.clone();
        loop {
            let now = Utc::now();
            if let Err(e) = self.enqueue_due(now) {
                tracing::error!(error = %e, "cannot read due policies; retrying in 5 s");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
            self.start_queued(&mut jobs);
            let sleep_for = match self.inner.store.next_wake(now) {
                Ok(Some(t)) => (t - Utc::now()).to_std().unwrap_or(Duration::ZERO).min(Duration::from_secs(60)),
                _ => Duration::from_secs(60),
            };
            let drill_at = *self.inner.next_drill.lock().unwrap_or_else(|p| p.into_inner());
            let sleep_for = match drill_at {
                Some(t) => {
                    sleep_for.min((t - Utc::now()).to_std().unwrap_or(Duration::ZERO).max(Duration::from_secs(1)))
                }
                None => sleep_for,
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(sleep_for) => {}
                Some(res) = jobs.join_next(), if !jobs.is_empty() => {
                    if let Err(e) = res {
                        tracing::error!(error = %e, "a run task panicked; the run is marked failed and the agent goes on");
                    }
                }
            }
        }
        self.inner.running.store(false, Ordering::Relaxed);
        self.shutdown(jobs).await;
    }

    async fn shutdown(&self, mut jobs: JoinSet<()>) {
        let queued: Vec<String> = {
            let mut slots = self.slots();
            slots.queued.clear();
            slots.queue.drain(..).collect()
        };
        for id in queued {
            self.finish_unstarted(&id, RunState::Interrupted, "agent_stopped", INTERRUPTED_BEFORE_START);
        }
        // Running jobs see the parent token cancelled and stop restic
        // (SIGINT, so it removes its repository lock).
        let grace = self.inner.config.run_stop_grace();
        let running = self.slots().running.len();
        if running > 0 {
            tracing::info!(runs = running, grace_s = grace.as_secs_f64(), "stopping the running runs");
        }
        if tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await.is_err() {
            let stuck: Vec<String> = self.slots().running.values().map(|(id, _)| id.clone()).collect();
            tracing::warn!(
                seconds = grace.as_secs_f64(),
                runs = ?stuck,
                "runs did not stop within the shutdown grace (--shutdown-grace-seconds less its margin); aborting them"
            );
            jobs.shutdown().await;
            // Aborted before they could record their end: record it here,
            // so the next agent finds them interrupted, not running.
            for id in stuck {
                if self.inner.store.get_run(&id).is_ok_and(|r| !r.state.is_terminal()) {
                    self.finish_unstarted(&id, RunState::Interrupted, "agent_stopped", INTERRUPTED_BY_STOP);
                }
            }
        }
    }

    /// Queue the restore drills that are due; keep each policy's next drill
    /// time in step with its `drill` schedule. A drill that finds the policy
    /// busy is tried again at the next check.
    fn enqueue_drills(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        {
            let mut last = self.inner.drills_checked.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = last.filter(|t| t.elapsed() < Duration::from_secs(5)) {
                // Come back when the pause is over: a policy may have gained a drill.
                let retry = now + chrono::Duration::from_std(Duration::from_secs(5) - t.elapsed()).unwrap_or_default();
                let mut next = self.inner.next_drill.lock().unwrap_or_else(|p| p.into_inner());
                *next = Some(next.map_or(retry, |n| n.min(retry)));
                return Ok(());
            }
            *last = Some(std::time::Instant::now());
        }
        let times = self.inner.store.drill_times()?;
        let mut earliest: Option<DateTime<Utc>> = None;
        let mut note = |t: Option<DateTime<Utc>>| {
            if let Some(t) = t {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
            }
        };
        for p in self.inner.store.list_policies()? {
            let Some(d) = &p.spec.drill else {
                if times.contains_key(&p.id) {
                    self.inner.store.set_drill_time(&p.id, None)?;
                }
                continue;
            };
            let Ok(schedules) = self.inner.schedules.of(&p.id, &p.spec) else { continue };
            let Some(schedule) = &schedules.drill else { continue };
            let next = |from: DateTime<Utc>| {
                soda_syncer_domain::schedule::next_slot(schedule, from, from).map(|t| {
                    t + soda_syncer_domain::schedule::jitter_offset(&format!("drill:{}", p.id), t, d.jitter_seconds)
                })
            };
            match times.get(&p.id) {
                // The first drill waits one period, so there is a backup to drill.
                None => {
                    self.inner.store.set_drill_time(&p.id, next(now))?;
                    note(next(now));
                }
                Some(at) if *at <= now && p.schedulable() => {
                    match self.request_run_with(&p, RunKind::Drill, RunTrigger::Schedule, None) {
                        Ok(_) => {
                            self.inner.store.set_drill_time(&p.id, next(now))?;
                            note(next(now));
                        }
                        Err(RunRequestError::Store(e)) => return Err(e),
                        Err(_) => note(Some(now + chrono::Duration::seconds(5))), // busy: try again soon
                    }
                }
                Some(at) if p.schedulable() => note(Some(*at)),
                Some(_) => {}
            }
        }
        *self.inner.next_drill.lock().unwrap_or_else(|p| p.into_inner()) = earliest;
        Ok(())
    }

    /// Turn due policies into queued runs.
    fn enqueue_due(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.enqueue_maintenance(now)?;
        self.enqueue_drills(now)?;
        let due = self.inner.store.due_policy_ids(now, 10_000)?;
        for id in due {
            let mut slots = self.slots();
            if slots.queued.contains_key(&id) || slots.running.contains_key(&id) {
                continue; // the end of the run in flight wakes us again
            }
            let Ok(mut p) = self.inner.store.get_policy(&id) else {
                continue;
            };
            let trigger = if slots.after_restart.remove(&id) {
                RunTrigger::Startup
            } else if p.consecutive_failures > 0 {
                RunTrigger::Retry
            } else if p.origin == soda_syncer_domain::Origin::Legacy {
                RunTrigger::Legacy
            } else {
                RunTrigger::Schedule
            };
            let mut run = RunRecord::new(new_id(), &p.id, RunKind::Backup, trigger, now);
            run.slot = p.next_slot.or(p.next_run_at);
            // Later than a whole period (the agent was down): this run is the
            // one catch-up for every missed slot, and the schedule counts on
            // from now, not from the first slot missed.
            if let (Some(slot), Ok(schedules)) = (run.slot, self.inner.schedules.of(&p.id, &p.spec)) {
                if schedules.backup.fire_after(slot).is_some_and(|next| next <= now) {
                    run.slot = Some(now);
                }
            }
            run.due_at = p.next_run_at;
            self.inner.store.save_run(&run)?;
            p.last_slot = run.slot;
            p.next_slot = None;
            p.next_run_at = None;
            self.inner.store.set_policy_schedule(&p)?;
            slots.queue.push_back(run.id.clone());
            slots.queued.insert(p.id.clone(), run.id.clone());
        }
        Ok(())
    }

    fn start_queued(&self, jobs: &mut JoinSet<()>) {
        loop {
            let mut slots = self.slots();
            if slots.running.len() >= self.inner.config.max_concurrent_runs {
                return;
            }
            let Some(run_id) = slots.queue.pop_front() else {
                return;
            };
            let Ok(run) = self.inner.store.get_run(&run_id) else {
                continue;
            };
            slots.queued.remove(&run.policy_id);
            let token = self.inner.cancel.child_token();
            slots.running.insert(run.policy_id.clone(), (run.id.clone(), token.clone()));
            drop(slots);
            let this = self.clone();
            let span = tracing::info_span!("run", run = %run.id, policy = %run.policy_id, kind = run.kind.as_str());
            jobs.spawn(async move { this.execute(run, token).await }.instrument(span));
        }
    }

    async fn execute(&self, mut run: RunRecord, token: CancellationToken) {
        let policy_id = run.policy_id.clone();
        // Whatever happens below (even a panic), free the slot and wake the loop.
        struct Release<'a>(&'a Scheduler, String, String);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.slots().running.remove(&self.1);
                self.0.inner.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.2);
                self.0.poke();
            }
        }
        let _release = Release(self, policy_id.clone(), run.id.clone());

        let policy = match self.inner.store.get_policy(&policy_id) {
            Ok(p) => p,
            Err(_) => return, // deleted meanwhile; its runs went with it
        };
        run.state = RunState::Running;
        run.started_at = Some(Utc::now());
        if let Err(e) = self.inner.store.save_run(&run) {
            tracing::error!(error = %e, "cannot record the run's start");
        }
        tracing::info!(trigger = run.trigger.as_str(), source = %policy.spec.source.path, "run started");

        let result = match run.kind {
            _ if policy.secrets_error.is_some() => Err(RunError {
                code: "secrets_unavailable".into(),
                message: policy.secrets_error.clone().unwrap_or_default(),
            }),
            RunKind::Backup => self.backup(&policy, &mut run, &token).await,
            RunKind::Restore => self.restore(&policy, &mut run, &token).await,
            RunKind::Prune | RunKind::Check | RunKind::Forget => self.maintenance(&policy, &mut run, &token).await,
            RunKind::Drill => self.drill(&policy, &mut run, &token).await,
        };
        let now = Utc::now();
        run.finished_at = Some(now);
        run.progress = self.live_progress(&run.id).or(run.progress.take());
        match result {
            Ok(state) => run.state = state,
            Err(mut err) => {
                run.state = if err.code == "cancelled" {
                    if self.inner.cancel.is_cancelled() {
                        err = RunError { code: "agent_stopped".into(), message: INTERRUPTED_BY_STOP.into() };
                        RunState::Interrupted
                    } else {
                        RunState::Cancelled
                    }
                } else {
                    RunState::Failed
                };
                run.error = Some(err);
            }
        }
        match run.state {
            RunState::Succeeded => tracing::info!(snapshot = run.snapshot_id.as_deref().unwrap_or(""), "run succeeded"),
            RunState::Failed => tracing::error!(
                code = run.error.as_ref().map(|e| e.code.as_str()).unwrap_or(""),
                error = run.error.as_ref().map(|e| e.message.as_str()).unwrap_or(""),
                "run failed"
            ),
            s => tracing::warn!(state = s.as_str(), warning = run.warning.as_deref().unwrap_or(""), "run ended"),
        }
        // The end must be recorded before the policy may run again (a full
        // state disk, a locked database): retry with backoff until it is, or
        // until the agent stops (the next start marks the run interrupted).
        let mut delay = Duration::from_secs(1);
        // The history is trimmed in the same transaction.
        while let Err(e) = self.inner.store.finish_run(&run, self.inner.config.keep_runs) {
            tracing::error!(error = %e, retry_in_s = delay.as_secs(), "cannot record the run's end; retrying");
            tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(60));
        }
        self.inner.metrics.run_ended(&policy, &run);
        // Schedule bookkeeping, for backups the scheduler started.
        let scheduled_backup = run.kind == RunKind::Backup && run.trigger != RunTrigger::Manual;
        if scheduled_backup && run.state != RunState::Interrupted {
            if let Ok(mut p) = self.inner.store.get_policy(&policy_id) {
                if run.state.counts_as_failure() {
                    p.consecutive_failures += 1;
                    p.last_failed_at = Some(now);
                } else {
                    p.consecutive_failures = 0;
                    p.last_failed_at = None;
                }
                if p.next_run_at.is_none() {
                    let _ = self.reschedule(&mut p);
                } else {
                    let _ = self.inner.store.set_policy_schedule(&p);
                }
            }
        }
        if matches!(run.kind, RunKind::Prune | RunKind::Check | RunKind::Forget) {
            self.maintenance_done(&policy, &run);
        }
        self.forget_cached_snapshots(&policy_id);
        // After the schedule bookkeeping, so listeners see the next run time.
        let _ = self.inner.finished.send(run.clone());
    }
}

pub(crate) fn run_error(e: ResticError) -> RunError {
    RunError { code: e.kind().into(), message: e.to_string() }
}

/// How to reach a policy's repository.
pub fn repo_of(policy: &PolicyRecord) -> Repo {
    let r = &policy.spec.repository;
    Repo {
        url: r.url.clone().unwrap_or_default(),
        password: r.password.clone().unwrap_or_default(),
        env: r.env.iter().filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v))).collect(),
    }
}
