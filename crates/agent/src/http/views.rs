//! What the API shows: policies without their secrets, runs with live
//! progress, snapshots and the operations endpoints' bodies. Each body is a
//! typed struct, so `GET /openapi.json` describes exactly what is sent.
//!
//! Keys whose value is unknown are sent as `null`, never left out (no
//! `skip_serializing_if` here), and documented as required and nullable.

use serde::Serialize;
use soda_syncer_domain::policy::{ConsistencySpec, Origin, SourceSpec};
use soda_syncer_domain::restic_json::Snapshot;
use soda_syncer_domain::run::{Progress, RunError, RunSummary};
use soda_syncer_domain::schedule::ScheduleSpec;
use soda_syncer_domain::secret::redact_url;
use soda_syncer_domain::{Retention, RunKind, RunState, RunTrigger};
use std::collections::BTreeMap;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, Type};
use utoipa::ToSchema;

use crate::ids::fmt_time;
use crate::store::{LastRun, ListedPolicy, PolicyRecord, PolicyStatus, RunRecord};

/// A policy as the API shows it: its spec without secrets, plus what the
/// agent knows about it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    /// Server-assigned, stable, URL-safe.
    pub id: String,
    pub name: String,
    pub origin: Origin,
    pub source: SourceSpec,
    pub repository: RepositoryView,
    pub schedule: ScheduleSpec,
    pub jitter_seconds: u64,
    pub retention: Retention,
    /// The repository refuses this node's deletes: retention is the maintainer's.
    pub append_only: bool,
    /// The name of the repository's maintenance Lease
    /// (`soda-syncer-maint-…`), which `soda-syncer maintain` holds while it
    /// prunes. Only in a single policy's GET: a listing does not unseal the
    /// stored URL it is derived from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance_lease: Option<String>,
    pub consistency: ConsistencySpec,
    pub exclude: Vec<String>,
    pub tags: Vec<String>,
    /// Scheduled runs of an unchanged volume are recorded as `unchanged`
    /// without running restic (README, "Unchanged volumes").
    pub verify_unchanged: bool,
    /// Paused by a user (`pausedByUser`) or by the agent (`status`).
    pub paused: bool,
    pub paused_by_user: bool,
    pub status: PolicyStatusView,
    /// The volume (PV name) a discovered policy backs up.
    #[schema(required = true)]
    pub volume: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// Null while the policy is paused.
    #[schema(required = true, format = DateTime)]
    pub next_run_at: Option<String>,
    pub consecutive_failures: u32,
    /// Set when the stored secrets cannot be unsealed (the secrets key was
    /// lost or replaced): runs fail until the password is given again.
    #[schema(required = true)]
    pub secrets_unavailable: Option<String>,
    /// The newest run of this policy, if any.
    #[schema(required = true)]
    pub last_run: Option<LastRunView>,
}

/// The repository without its secrets: `password` and each `env` value are
/// always null; `passwordSet` and `envSet` say whether one is stored.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryView {
    /// With any password in it replaced by `***`.
    #[schema(required = true)]
    pub url: Option<String>,
    #[schema(schema_with = always_null)]
    pub password: (),
    pub password_set: bool,
    #[schema(schema_with = map_of_nulls)]
    pub env: BTreeMap<String, ()>,
    pub env_set: BTreeMap<String, bool>,
    /// The Kubernetes Secret the keys are read from at each run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<soda_syncer_domain::SecretRef>,
    /// The SODA profile (id) the repository and its keys are read from at each run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soda_profile: Option<String>,
}

/// The agent's own view of a policy's health, beside the user's `paused`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyStatusView {
    pub state: PolicyState,
    /// Why the policy is not active.
    #[schema(required = true)]
    pub message: Option<String>,
}

/// `volumeGone`: a discovered volume is no longer mounted on this node, so
/// the agent paused the policy until it comes back.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum PolicyState {
    Active,
    VolumeGone,
}

impl From<PolicyStatus> for PolicyState {
    fn from(s: PolicyStatus) -> Self {
        match s {
            PolicyStatus::Active => PolicyState::Active,
            PolicyStatus::VolumeGone => PolicyState::VolumeGone,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastRunView {
    pub id: String,
    pub kind: RunKind,
    pub state: RunState,
    #[schema(required = true, format = DateTime)]
    pub finished_at: Option<String>,
    #[schema(required = true)]
    pub snapshot_id: Option<String>,
}

/// One run: a backup, restore or maintenance job of one policy.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    pub id: String,
    pub policy_id: String,
    pub kind: RunKind,
    pub trigger: RunTrigger,
    pub state: RunState,
    #[schema(format = DateTime)]
    pub queued_at: String,
    /// When the scheduler meant it to start (its slot plus jitter, or a retry time).
    #[schema(required = true, format = DateTime)]
    pub due_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub started_at: Option<String>,
    #[schema(required = true, format = DateTime)]
    pub finished_at: Option<String>,
    /// Live while the run is running; the last known numbers afterwards.
    #[schema(required = true)]
    pub progress: Option<Progress>,
    /// The full restic snapshot id.
    #[schema(required = true)]
    pub snapshot_id: Option<String>,
    #[schema(required = true)]
    pub summary: Option<RunSummary>,
    /// How the source was made consistent (method, freezeMs, pointInTime).
    #[schema(required = true, value_type = Option<Object>)]
    pub consistency: Option<serde_json::Value>,
    /// Why the run did not succeed.
    #[schema(required = true)]
    pub error: Option<RunError>,
    /// Why a partial or suspicious run is not clean.
    #[schema(required = true)]
    pub warning: Option<String>,
    /// How long of its running time the run waited for this agent's own
    /// lock on the repository (held alone by a prune, check or forget);
    /// 0 when it did not wait. Recorded as soon as a wait ends, otherwise
    /// with the run's end; null until then, or when the run never needed
    /// the repository.
    #[schema(required = true)]
    pub repository_wait_ms: Option<u64>,
    /// A scheduled backup proven unchanged: no restic ran; `snapshotId` is
    /// the snapshot the volume still matches, and this says when the walk
    /// verified it. Null for every other run.
    #[schema(required = true)]
    pub unchanged: Option<soda_syncer_domain::unchanged::UnchangedRun>,
}

/// One restic snapshot of a policy.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotView {
    /// restic's full id.
    pub id: String,
    pub short_id: String,
    /// As restic reports it (RFC 3339).
    pub time: String,
    pub paths: Vec<String>,
    pub hostname: String,
    pub tags: Vec<String>,
    /// The volume (PV name) the snapshot is of, for discovered volumes.
    #[schema(required = true)]
    pub volume: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyList {
    pub policies: Vec<PolicyView>,
    /// The `after` of the next page; null on the last page.
    #[schema(required = true)]
    pub next: Option<String>,
}

/// Newest first. `next` is the `before` of the next page, null on the last.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    pub runs: Vec<RunView>,
    #[schema(required = true)]
    pub next: Option<String>,
}

/// Newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotView>,
}

/// A cancel was asked for: a queued run is cancelled at once, a running
/// one stops shortly (poll `GET /v1/runs/{id}`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelRunResponse {
    pub id: String,
    pub cancel_requested: bool,
}

/// The process is alive.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Ready means: the database is open, the scheduler runs and restic works.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadyResponse {
    pub ready: bool,
    pub node: String,
    pub database: DatabaseState,
    pub scheduler: SchedulerState,
    pub restic: ResticState,
    pub uptime_seconds: u64,
    pub kubelet_dir: KubeletDirView,
    pub state_lock: StateLockView,
}

/// The state directory's lock: one agent per state directory. An agent
/// that waits for it is alive but not ready, and serves nothing else.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateLockView {
    /// Whether this agent holds it; false while it waits for another agent.
    pub held: bool,
    /// The lock file in the state directory.
    pub path: String,
    /// Who holds it (this agent, when `held`); null when not known yet.
    #[schema(required = true)]
    pub holder: Option<crate::state_lock::LockHolder>,
}

/// `GET /v1/status`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    pub node: String,
    pub version: &'static str,
    pub uptime_seconds: u64,
    /// null: no SODA sync (no --soda-endpoint, or Kubernetes off).
    pub soda_sync: Option<crate::kube::SodaSyncStatus>,
    pub restic: ResticStatusView,
}

/// The restic the agent drives: its version, whether it is supported, and
/// which of newer restic's features the agent uses with it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResticStatusView {
    /// null when restic could not be run or its version not read.
    pub version: Option<String>,
    /// `supported` (0.14.0 to 0.19.x), `newerThanTested` (runs, with a
    /// warning), `tooOld` (not ready), or `unknown`.
    pub support: &'static str,
    /// Why it is not ready, or what to watch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The newer-restic features in use (none with 0.14).
    pub features: Vec<&'static str>,
}

impl ResticStatusView {
    pub fn of(restic: &crate::restic::Restic, error: Option<String>) -> ResticStatusView {
        use soda_syncer_domain::restic_version::Support;
        let Some(v) = restic.detected_version() else {
            return ResticStatusView { version: None, support: "unknown", message: error, features: Vec::new() };
        };
        let support = v.support();
        ResticStatusView {
            version: Some(v.to_string()),
            support: match support {
                Support::Supported => "supported",
                Support::NewerThanTested => "newerThanTested",
                Support::TooOld => "tooOld",
            },
            message: support.message(v).or(error),
            features: v.features().names(),
        }
    }
}

/// The kubelet root the agent looks for volumes in, and how it was chosen.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubeletDirView {
    pub path: String,
    /// `configured` (--kubelet-dir), `detected` (found on disk), or `default`
    /// (nothing found; the upstream default is assumed).
    pub source: &'static str,
    /// For `detected`: the distributions that use this root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distribution: Option<&'static str>,
    /// Whether the directory exists on this node.
    pub exists: bool,
}

impl KubeletDirView {
    pub fn of(config: &crate::config::Config) -> KubeletDirView {
        use crate::kubelet::RootSource;
        let (source, distribution) = match &config.kubelet_dir_source {
            RootSource::Configured => ("configured", None),
            RootSource::Detected(d) => ("detected", Some(*d)),
            RootSource::Default => ("default", None),
        };
        KubeletDirView {
            path: config.kubelet_dir.display().to_string(),
            source,
            distribution,
            exists: config.kubelet_dir.is_dir(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseState {
    Ok,
    Unavailable,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerState {
    Running,
    Stopped,
}

/// restic's version, or why it cannot be used.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ResticState {
    Usable { version: String },
    Unusable { error: String },
}

fn always_null() -> Schema {
    ObjectBuilder::new().schema_type(Type::Null).description(Some("Write-only: always null.")).into()
}

fn map_of_nulls() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::RefOr(ObjectBuilder::new().schema_type(Type::Null).into())))
        .description(Some("The names of the stored variables; values are write-only, so always null."))
        .into()
}

pub fn policy_view(p: &PolicyRecord, last: Option<&RunRecord>) -> PolicyView {
    let r = &p.spec.repository;
    let repository = RepositoryView {
        url: r.url.as_deref().map(redact_url),
        password: (),
        password_set: r.password.as_ref().is_some_and(|p| !p.is_empty()),
        env: r.env.keys().map(|k| (k.clone(), ())).collect(),
        env_set: r.env.iter().map(|(k, v)| (k.clone(), v.as_ref().is_some_and(|v| !v.is_empty()))).collect(),
        secret_ref: r.secret_ref.clone(),
        soda_profile: r.soda_profile.clone(),
    };
    let mut v = view_of(p, repository, last.map(LastRun::from).as_ref());
    v.maintenance_lease = Some(crate::scheduler::maintenance_lease_name(&p.spec.repository_url()));
    v
}

/// A policy of a listing page: the same view as [`policy_view`] of the
/// record with its secrets, built from the record without them.
pub fn listed_policy_view(l: &ListedPolicy) -> PolicyView {
    let r = &l.policy.spec.repository;
    let s = &l.secrets;
    // As the store merges them: each stored variable over the spec's keys.
    let mut env_set: BTreeMap<String, bool> =
        r.env.iter().map(|(k, v)| (k.clone(), v.as_ref().is_some_and(|v| !v.is_empty()))).collect();
    env_set.extend(s.env_set.iter().map(|(k, v)| (k.clone(), *v)));
    let repository = RepositoryView {
        url: s.url.clone().or_else(|| r.url.as_deref().map(redact_url)),
        password: (),
        password_set: s.password_set,
        env: env_set.keys().map(|k| (k.clone(), ())).collect(),
        env_set,
        secret_ref: r.secret_ref.clone(),
        soda_profile: r.soda_profile.clone(),
    };
    view_of(&l.policy, repository, l.last_run.as_ref())
}

fn view_of(p: &PolicyRecord, repository: RepositoryView, last: Option<&LastRun>) -> PolicyView {
    let s = &p.spec;
    let paused = s.paused || p.status != PolicyStatus::Active;
    PolicyView {
        id: p.id.clone(),
        name: s.name.clone(),
        origin: p.origin,
        source: s.source.clone(),
        repository,
        schedule: s.schedule.clone(),
        jitter_seconds: s.jitter_seconds,
        retention: s.retention.clone(),
        append_only: s.append_only,
        maintenance_lease: None,
        consistency: s.consistency.clone(),
        exclude: s.exclude.clone(),
        tags: s.tags.clone(),
        verify_unchanged: s.verify_unchanged,
        paused,
        paused_by_user: s.paused,
        status: PolicyStatusView { state: p.status.into(), message: p.status_message.clone() },
        volume: p.volume.clone(),
        created_at: fmt_time(p.created_at),
        updated_at: fmt_time(p.updated_at),
        next_run_at: if paused { None } else { p.next_run_at.map(fmt_time) },
        consecutive_failures: p.consecutive_failures,
        secrets_unavailable: p.secrets_error.clone(),
        last_run: last.map(|r| LastRunView {
            id: r.id.clone(),
            kind: r.kind,
            state: r.state,
            finished_at: r.finished_at.map(fmt_time),
            snapshot_id: r.snapshot_id.clone(),
        }),
    }
}

pub fn run_view(r: &RunRecord, live: Option<Progress>) -> RunView {
    RunView {
        id: r.id.clone(),
        policy_id: r.policy_id.clone(),
        kind: r.kind,
        trigger: r.trigger,
        state: r.state,
        queued_at: fmt_time(r.queued_at),
        due_at: r.due_at.map(fmt_time),
        started_at: r.started_at.map(fmt_time),
        finished_at: r.finished_at.map(fmt_time),
        progress: live.or_else(|| r.progress.clone()),
        snapshot_id: r.snapshot_id.clone(),
        summary: r.summary.clone(),
        consistency: r.consistency.clone(),
        error: r.error.clone(),
        warning: r.warning.clone(),
        repository_wait_ms: r.repository_wait_ms,
        unchanged: r.unchanged.clone(),
    }
}

pub fn snapshot_view(s: &Snapshot) -> SnapshotView {
    SnapshotView {
        id: s.id.clone(),
        short_id: s.short_id.clone(),
        time: s.time.clone(),
        paths: s.paths.clone(),
        hostname: s.hostname.clone(),
        tags: s.tags.clone().unwrap_or_default(),
        volume: s.tag_value("volume").map(str::to_string),
    }
}
