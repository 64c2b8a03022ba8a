//! The HTTP API: the legacy `POST /snapshot`, `/v1` policies and runs, and
//! the operations endpoints. [`router`] builds it without binding a socket,
//! so tests call it in-process; errors all leave through [`ApiError`].
//! Each handler carries its `#[utoipa::path]`, from which [`openapi`]
//! builds `GET /openapi.json`.

pub mod auth;
mod error;
pub mod metrics;
pub mod openapi;
pub mod serve;
pub mod slow;
mod views;
pub mod waiting;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use soda_syncer_domain::{PolicySpec, RunKind, RunState, RunTrigger};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use utoipa::IntoParams;

pub use error::ApiError;
use error::{parse_json, ApiJson, ErrorBody};
use openapi::{PolicyPatch, RunEvent};
use views::{
    listed_policy_view, policy_view, run_view, CancelRunResponse, DatabaseState, HealthResponse, PolicyList,
    PolicyView, ReadyResponse, ResticState, RunList, RunView, SchedulerState, SnapshotList, StateLockView,
    StatusResponse,
};

use crate::scheduler::legacy::{LegacySnapshotRequest, LegacySnapshotResponse};
use crate::scheduler::{MaintenanceParams, RestoreParams, Scheduler};
use crate::store::{DataVersion, PolicyRecord, RunFilter, StoreError};

/// Bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub sched: Scheduler,
    /// restic's version, or why it is unusable; re-checked by /readyz
    /// while it is missing.
    pub restic_version: Arc<Mutex<Result<String, String>>>,
    pub started: Instant,
    pub auth: Arc<auth::Auth>,
    /// This agent's entry in the state directory's lock file; `None` when
    /// no lock is held (routers built in tests).
    pub state_lock: Option<crate::state_lock::LockHolder>,
}

pub fn router(state: AppState) -> Router {
    let registry = Arc::new(metrics::Metrics::new(&state.sched, &state.auth));
    let body_deadline =
        slow::BodyDeadline { timeout: state.sched.config().request_read_timeout, metrics: registry.clone() };
    Router::new()
        .route("/snapshot", post(legacy_snapshot))
        .route("/v1/policies", get(list_policies).post(create_policy))
        .route("/v1/policies/{id}", get(get_policy).put(put_policy).patch(patch_policy).delete(delete_policy))
        .route("/v1/policies/{id}/pause", post(pause_policy))
        .route("/v1/policies/{id}/resume", post(resume_policy))
        .route("/v1/policies/{id}/run", post(run_policy))
        .route("/v1/policies/{id}/drill", post(drill_policy))
        .route("/v1/policies/{id}/snapshots", get(policy_snapshots))
        .route("/v1/policies/{id}/restore", post(restore_policy))
        .route("/v1/policies/{id}/maintenance", post(maintain_policy))
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/runs/{id}/events", get(run_events))
        .route("/v1/status", get(agent_status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such route; see GET /openapi.json for the API")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard))
        .layer(axum::middleware::from_fn_with_state(body_deadline, slow::body_deadline))
        .layer(axum::middleware::from_fn_with_state(registry.clone(), metrics::track))
        .layer(Extension(registry))
        .layer(Extension(Arc::new(PolicyPages::default())))
        .with_state(state)
}

/// `GET /v1/policies` pages as sent, each with the [`DataVersion`] it was
/// read at: while the database is unchanged, a page is sent again as it is
/// (a listing is otherwise a query, parsing and JSON for every policy).
/// Few and small: pages of other versions are dropped as soon as one is
/// stored, and at most [`PolicyPages::MAX_PAGES`] pages of together at most
/// [`PolicyPages::MAX_BYTES`] are kept (the oldest go first).
#[derive(Default)]
struct PolicyPages {
    pages: Mutex<Vec<PolicyPage>>,
}

struct PolicyPage {
    after: String,
    limit: usize,
    version: DataVersion,
    body: Bytes,
}

impl PolicyPages {
    const MAX_PAGES: usize = 16;
    const MAX_BYTES: usize = 2 * 1024 * 1024;

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PolicyPage>> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, after: &str, limit: usize, version: DataVersion) -> Option<Bytes> {
        let pages = self.lock();
        pages.iter().find(|p| p.version == version && p.limit == limit && p.after == after).map(|p| p.body.clone())
    }

    fn put(&self, after: &str, limit: usize, version: DataVersion, body: Bytes) {
        let size = |after: &str, body: &Bytes| after.len() + body.len();
        if size(after, &body) > Self::MAX_BYTES {
            return;
        }
        let mut pages = self.lock();
        pages.retain(|p| p.version == version && !(p.limit == limit && p.after == after));
        // The newest last, so the oldest go first.
        let mut total: usize = pages.iter().map(|p| size(&p.after, &p.body)).sum::<usize>() + size(after, &body);
        while !pages.is_empty() && (total > Self::MAX_BYTES || pages.len() >= Self::MAX_PAGES) {
            let old = pages.remove(0);
            total -= size(&old.after, &old.body);
        }
        pages.push(PolicyPage { after: after.to_string(), limit, version, body });
    }
}

fn find_policy(state: &AppState, id_or_name: &str) -> Result<PolicyRecord, ApiError> {
    let store = state.sched.store();
    match store.get_policy(id_or_name) {
        Ok(p) => Ok(p),
        Err(StoreError::NotFound) => store.get_policy_by_name(id_or_name).map_err(|e| match e {
            StoreError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "policy_not_found",
                format!("there is no policy with id or name {id_or_name:?}; GET /v1/policies lists them"),
            ),
            other => other.into(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Schedule backups (the upstream route soda-proxy calls).
///
/// Backs up one path, or every CSI volume on this node (now and later) when
/// `resticSourceRepo` is empty. Answers at once; never waits for a volume or
/// a backup. The same repository and source again update the interval. The
/// body must be JSON whatever the content type says: the prototype took any,
/// and `curl -d` sends `application/x-www-form-urlencoded`.
#[utoipa::path(
    post,
    path = "/snapshot",
    tag = "legacy",
    request_body(content = LegacySnapshotRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "At least one policy was created", body = LegacySnapshotResponse),
        (status = 200, description = "Existing policies were updated", body = LegacySnapshotResponse),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 409, description = "A policy of another origin has the generated name", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 422, description = "The body does not fit, or a field is invalid", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn legacy_snapshot(
    State(state): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(ApiError::from_bytes_rejection)?;
    let req: LegacySnapshotRequest = parse_json(&body)?;
    let sched = state.sched.clone();
    let resp = tokio::task::spawn_blocking(move || sched.legacy_snapshot(req))
        .await
        .map_err(|_| ApiError::internal("the legacy request handler failed"))??;
    let status = if resp.policies.iter().any(|p| p.action == "created") { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(resp)).into_response())
}

/// Paging of `GET /v1/policies`; other parameters are refused.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PoliciesQuery {
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<usize>,
    /// Only policies whose name sorts after this one (the previous page's `next`).
    after: Option<String>,
}

/// List the policies, by name, in pages.
#[utoipa::path(
    get,
    path = "/v1/policies",
    tag = "policies",
    params(PoliciesQuery),
    responses(
        (status = 200, description = "A page of policies, by name", body = PolicyList),
        (status = 400, description = "An unknown parameter or an invalid value (`field` names it)", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
    )
)]
async fn list_policies(
    State(state): State<AppState>,
    Extension(pages): Extension<Arc<PolicyPages>>,
    q: Result<Query<PoliciesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", format!("{}; allowed: limit, after", e.body_text()))
    })?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "limit",
            "limit must be between 1 and 1000",
        ));
    }
    let after = q.after.unwrap_or_default();
    let json = |body: Bytes| ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response();
    // The page as sent before, if the database is unchanged since: checked
    // here if that does not wait for the database.
    if let Some(body) = state.sched.store().try_data_version().and_then(|v| pages.get(&after, limit, v)) {
        return Ok(json(body));
    }
    // SQLite work off the async workers.
    let sched = state.sched.clone();
    let body = tokio::task::spawn_blocking(move || -> Result<Bytes, ApiError> {
        let store = sched.store();
        if let Some(body) = pages.get(&after, limit, store.data_version()?) {
            return Ok(body);
        }
        let (version, mut policies) = store.list_policies_page_shown(&after, limit + 1)?;
        let next = (policies.len() > limit).then(|| {
            policies.truncate(limit);
            policies.last().map(|p| p.policy.spec.name.clone()).unwrap_or_default()
        });
        let list = PolicyList { policies: policies.iter().map(listed_policy_view).collect(), next };
        let body =
            Bytes::from(serde_json::to_vec(&list).map_err(|_| ApiError::internal("listing the policies failed"))?);
        pages.put(&after, limit, version, body.clone());
        Ok(body)
    })
    .await
    .map_err(|_| ApiError::internal("listing the policies failed"))??;
    Ok(json(body))
}

/// Create a policy.
///
/// Its first run is due at once (plus jitter).
#[utoipa::path(
    post,
    path = "/v1/policies",
    tag = "policies",
    request_body(content = PolicySpec, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = PolicyView),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 409, description = "A policy with this name exists", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "No JSON content type", body = ErrorBody),
        (status = 422, description = "The body does not fit, or a field is invalid (`field` names it)", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn create_policy(
    State(state): State<AppState>,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<Response, ApiError> {
    let p = state.sched.create_policy(spec, soda_syncer_domain::Origin::Api, None, None)?;
    Ok((StatusCode::CREATED, Json(policy_view(&p, None))).into_response())
}

/// Get a policy.
#[utoipa::path(
    get,
    path = "/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    responses(
        (status = 200, description = "The policy", body = PolicyView),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
    )
)]
async fn get_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let last = state.sched.store().last_run_of(&p.id)?;
    Ok(Json(policy_view(&p, last.as_ref())).into_response())
}

/// Replace a policy.
///
/// Secrets left out (or null) keep their stored values, so the body of a
/// GET can be edited and sent back.
#[utoipa::path(
    put,
    path = "/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    request_body(content = PolicySpec, content_type = "application/json"),
    responses(
        (status = 200, description = "Replaced", body = PolicyView),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 409, description = "Another policy has this name", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "No JSON content type", body = ErrorBody),
        (status = 422, description = "The body does not fit, or a field is invalid (`field` names it)", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn put_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    not_managed_by_kubernetes(&p)?;
    let p = state.sched.replace_policy(&p.id, spec)?;
    let last = state.sched.store().last_run_of(&p.id)?;
    Ok(Json(policy_view(&p, last.as_ref())).into_response())
}

/// Change some fields of a policy (RFC 7396 JSON merge patch).
///
/// The merged policy is checked like a PUT body.
#[utoipa::path(
    patch,
    path = "/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    request_body(content(
        (PolicyPatch = "application/merge-patch+json"),
        (PolicyPatch = "application/json"),
    )),
    responses(
        (status = 200, description = "Changed", body = PolicyView),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 409, description = "Another policy has this name", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "No JSON content type", body = ErrorBody),
        (status = 422, description = "Not an object, or the patched policy does not fit or is invalid", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn patch_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    if !patch.is_object() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "a PATCH body is a JSON object (RFC 7396 merge patch)",
        ));
    }
    let p = find_policy(&state, &id)?;
    not_managed_by_kubernetes(&p)?;
    let p = state.sched.patch_policy(&p.id, &patch)?;
    let last = state.sched.store().last_run_of(&p.id)?;
    Ok(Json(policy_view(&p, last.as_ref())).into_response())
}

/// Delete a policy.
///
/// Its queued and running runs are cancelled; its snapshots stay in the
/// repository.
#[utoipa::path(
    delete,
    path = "/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 409, description = "The policy is managed by Kubernetes annotations", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn delete_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    not_managed_by_kubernetes(&p)?;
    state.sched.delete_policy(&p.id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A policy made from a claim's annotations follows them: editing it here
/// would be undone at the next change of the claim, so it is refused with
/// the way to do it. Pausing and running it by hand stay allowed.
fn not_managed_by_kubernetes(p: &crate::store::PolicyRecord) -> Result<(), ApiError> {
    if p.origin != soda_syncer_domain::Origin::Kubernetes {
        return Ok(());
    }
    let claim = p.legacy_key.as_deref().and_then(|k| k.strip_prefix("kube:")).unwrap_or("its claim");
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "managed_by_kubernetes",
        format!("this policy is made from the soda-syncer.io/ annotations of the PersistentVolumeClaim {claim}: change the annotations (kubectl annotate pvc), or remove soda-syncer.io/backup to stop it"),
    ))
}

async fn set_paused(state: AppState, id: String, paused: bool) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let p = state.sched.set_paused(&p.id, paused)?;
    let last = state.sched.store().last_run_of(&p.id)?;
    Ok(Json(policy_view(&p, last.as_ref())).into_response())
}

/// Pause a policy.
///
/// No more scheduled runs; a queued run is cancelled, a running one finishes.
#[utoipa::path(
    post,
    path = "/v1/policies/{id}/pause",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    responses(
        (status = 200, description = "Paused (or already paused)", body = PolicyView),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn pause_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_paused(state, id, true).await
}

/// Resume a paused policy.
#[utoipa::path(
    post,
    path = "/v1/policies/{id}/resume",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    responses(
        (status = 200, description = "Resumed (or not paused)", body = PolicyView),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn resume_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_paused(state, id, false).await
}

/// Back up now.
///
/// Queues a manual backup run; one run per policy at a time.
#[utoipa::path(
    post,
    path = "/v1/policies/{id}/run",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    responses(
        (status = 202, description = "Queued", body = RunView),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 409, description = "The policy already has a queued or running run", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 503, description = "The agent is stopping (agent_stopping): try the next agent", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn run_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let run = state.sched.request_run(&p, RunKind::Backup, RunTrigger::Manual)?;
    Ok((StatusCode::ACCEPTED, Json(run_view(&run, None))).into_response())
}

/// Run a restore drill now.
///
/// Restores a sample of the newest snapshot's files (the policy's `drill`
/// settings, or 100 files / 1 GiB) into a scratch directory, has restic
/// verify their content, compares them with the snapshot's listing, and
/// removes them. The run's kind is `drill`.
#[utoipa::path(
    post,
    path = "/v1/policies/{id}/drill",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    responses(
        (status = 202, description = "Queued", body = RunView),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 409, description = "The policy already has a queued or running run", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 503, description = "The agent is stopping (agent_stopping): try the next agent", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn drill_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let run = state.sched.request_run(&p, RunKind::Drill, RunTrigger::Manual)?;
    Ok((StatusCode::ACCEPTED, Json(run_view(&run, None))).into_response())
}

/// List the policy's snapshots.
///
/// Read from its repository; empty before the first backup created it.
#[utoipa::path(
    get,
    path = "/v1/policies/{id}/snapshots",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    responses(
        (status = 200, description = "Newest first", body = SnapshotList),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 422, description = "The repository refuses the policy's password or credentials", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 502, description = "restic failed", body = ErrorBody),
        (status = 503, description = "restic is missing, or the repository is unreachable or locked", body = ErrorBody),
        (status = 507, description = "A disk restic writes to is full", body = ErrorBody),
    )
)]
async fn policy_snapshots(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let snaps = state.sched.policy_snapshots(&p).await.map_err(|e| ApiError::from_restic(&e))?;
    let snapshots = snaps.iter().rev().map(views::snapshot_view).collect();
    Ok(Json(SnapshotList { snapshots }).into_response())
}

/// Restore a snapshot.
///
/// Queues a run of kind `restore`: `latest` or a snapshot id, into a new or
/// empty directory (the volume's content at its root), limited to sub-paths
/// with `include`, or over the live source with `inPlace`.
#[utoipa::path(
    post,
    path = "/v1/policies/{id}/restore",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    request_body(content = RestoreParams, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued", body = RunView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 409, description = "The target is not empty, or the policy has a run in flight", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid request (the field is named)", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 503, description = "The agent is stopping (agent_stopping): try the next agent", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn restore_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RestoreParams>,
) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let run = state.sched.request_restore(&p, req)?;
    Ok((StatusCode::ACCEPTED, Json(run_view(&run, None))).into_response())
}

/// Forget, prune or check the policy's repository.
///
/// Queues one run doing the steps asked for, in that order, alone on the
/// repository (the agent's other runs on it wait).
#[utoipa::path(
    post,
    path = "/v1/policies/{id}/maintenance",
    tag = "policies",
    params(("id" = String, Path, description = "The policy's id or name")),
    request_body(content = MaintenanceParams, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued", body = RunView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 409, description = "The policy has a run in flight", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid request (the field is named)", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
        (status = 503, description = "The agent is stopping (agent_stopping): try the next agent", body = ErrorBody),
        (status = 507, description = "The agent's disk is full", body = ErrorBody),
    )
)]
async fn maintain_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MaintenanceParams>,
) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let run = state.sched.request_maintenance(&p, req)?;
    Ok((StatusCode::ACCEPTED, Json(run_view(&run, None))).into_response())
}

/// Filters of `GET /v1/runs`; an empty value is no filter. Other
/// parameters are refused.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RunsQuery {
    /// Only the runs of this policy (id or name).
    policy: Option<String>,
    #[param(schema_with = openapi::run_state_filter)]
    state: Option<String>,
    #[param(schema_with = openapi::run_kind_filter)]
    kind: Option<String>,
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 50)]
    limit: Option<usize>,
    /// Only runs older than this run id (the previous page's `next`).
    before: Option<String>,
}

/// List runs, newest first, in pages.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    params(RunsQuery),
    responses(
        (status = 200, description = "A page of runs", body = RunList),
        (status = 400, description = "An unknown parameter or an invalid value (`field` names it)", body = ErrorBody),
        (status = 404, description = "No such policy", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
    )
)]
async fn list_runs(
    State(state): State<AppState>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("{}; allowed: policy, state, kind, limit, before", e.body_text()),
        )
    })?;
    let policy_id = match q.policy.as_deref().filter(|s| !s.is_empty()) {
        Some(p) => Some(find_policy(&state, p)?.id),
        None => None,
    };
    let st = match q.state.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(RunState::parse(s).ok_or_else(|| {
            let all: Vec<_> = RunState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::field(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "state",
                format!("unknown state {s:?}; use one of {}", all.join(", ")),
            )
        })?),
        None => None,
    };
    let kind = match q.kind.as_deref().filter(|s| !s.is_empty()) {
        Some(k) => Some(RunKind::parse(k).ok_or_else(|| {
            ApiError::field(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "kind",
                format!("unknown kind {k:?}; use backup, restore, forget, prune, check or drill"),
            )
        })?),
        None => None,
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "limit",
            "limit must be between 1 and 1000",
        ));
    }
    let runs = state.sched.store().list_runs(&RunFilter { policy_id, state: st, kind, before: q.before, limit })?;
    let next = if runs.len() == limit { runs.last().map(|r| r.id.clone()) } else { None };
    let runs = runs.iter().map(|r| run_view(r, state.sched.live_progress(&r.id))).collect();
    Ok(Json(RunList { runs, next }).into_response())
}

fn find_run(state: &AppState, id: &str) -> Result<crate::store::RunRecord, ApiError> {
    state.sched.store().get_run(id).map_err(|e| match e {
        StoreError::NotFound => ApiError::new(
            StatusCode::NOT_FOUND,
            "run_not_found",
            format!("there is no run with id {id:?}; GET /v1/runs lists them"),
        ),
        other => other.into(),
    })
}

/// Get a run.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run, with live progress while it runs", body = RunView),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
    )
)]
async fn get_run(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let run = find_run(&state, &id)?;
    Ok(Json(run_view(&run, state.sched.live_progress(&run.id))).into_response())
}

/// Cancel a queued or running run.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/cancel",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 202, description = "Cancelling", body = CancelRunResponse),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run has already ended", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
    )
)]
async fn cancel_run(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let run = find_run(&state, &id)?;
    if run.state.is_terminal() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "run_finished",
            format!("run {id} has already ended ({})", run.state.as_str()),
        ));
    }
    state.sched.cancel_run(&run);
    Ok((StatusCode::ACCEPTED, Json(CancelRunResponse { id: run.id, cancel_requested: true })).into_response())
}

/// The `event` names of `GET /v1/runs/{id}/events`.
const EVENT_PROGRESS: &str = "progress";
const EVENT_END: &str = "end";

/// Follow a run as server-sent events.
///
/// A `progress` event about twice a second while the run is queued or
/// running, then one `end` event with the whole run, sent the moment the
/// run ends (a client waiting for a run neither polls nor lags).
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/events",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, content_type = "text/event-stream", body = RunEvent,
            description = "`event: progress` (about twice a second while queued or running) and a last `event: end`, \
                each with the run as JSON `data`; the schema is that of one event"),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
    )
)]
async fn run_events(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    // Subscribed before the first read, so an end between the two is not missed.
    let finished = state.sched.subscribe_finished();
    find_run(&state, &id)?;
    let stream =
        futures_util::stream::unfold((state, id, finished, false), |(state, id, mut finished, done)| async move {
            if done {
                return None;
            }
            let run = state.sched.store().get_run(&id).ok()?;
            if run.state.is_terminal() {
                let ev = Event::default().event(EVENT_END).json_data(run_view(&run, None)).ok()?;
                return Some((Ok::<_, std::convert::Infallible>(ev), (state, id, finished, true)));
            }
            // The next progress event in half a second, or the end at once.
            let ended = until_run_ends(&mut finished, &id, Duration::from_millis(500)).await;
            let run = if ended { state.sched.store().get_run(&id).ok()? } else { run };
            if run.state.is_terminal() {
                let ev = Event::default().event(EVENT_END).json_data(run_view(&run, None)).ok()?;
                return Some((Ok(ev), (state, id, finished, true)));
            }
            let live = state.sched.live_progress(&id);
            let ev = Event::default().event(EVENT_PROGRESS).json_data(run_view(&run, live)).ok()?;
            Some((Ok(ev), (state, id, finished, false)))
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// Wait up to `most` for the run `id` to end; true when it did (or when
/// endings were missed, so the caller looks again).
async fn until_run_ends(
    finished: &mut tokio::sync::broadcast::Receiver<crate::store::RunRecord>,
    id: &str,
    most: Duration,
) -> bool {
    use tokio::sync::broadcast::error::RecvError;
    let deadline = tokio::time::sleep(most);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return false,
            r = finished.recv() => match r {
                Ok(run) if run.id == id => return true,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => return true,
                Err(RecvError::Closed) => {
                    deadline.await;
                    return false;
                }
            },
        }
    }
}

/// The agent's state beyond readiness: the SODA sync (who leads, how far
/// behind SODA is, the last error) and the profile poll.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "operations",
    responses((status = 200, description = "The agent's state", body = StatusResponse))
)]
async fn agent_status(State(state): State<AppState>) -> Response {
    Json(StatusResponse {
        node: state.sched.config().node_name.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        soda_sync: crate::kube::soda_sync_status(),
        restic: views::ResticStatusView::of(
            state.sched.restic(),
            state.restic_version.lock().unwrap_or_else(|p| p.into_inner()).clone().err(),
        ),
    })
    .into_response()
}

/// Liveness.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process is alive", body = HealthResponse))
)]
async fn healthz() -> Response {
    Json(HealthResponse { status: "ok" }).into_response()
}

/// Readiness: this agent holds the state directory's lock, its database
/// is open, its scheduler runs and restic is usable. An agent waiting for
/// the lock answers 503 here with `stateLock.held` false and the holder.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = ReadyResponse),
        (status = 503, description = "Not ready: the body says what is missing", body = ReadyResponse),
    )
)]
async fn readyz(State(state): State<AppState>) -> Response {
    let needs_check = state.restic_version.lock().unwrap_or_else(|p| p.into_inner()).is_err();
    if needs_check {
        let v = state.sched.restic().version().await.map_err(|e| e.to_string());
        *state.restic_version.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
    let restic = state.restic_version.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let db_ok = state.sched.store().count_policies().is_ok();
    let sched_ok = state.sched.is_running();
    let held = state.state_lock.is_some();
    let ready = db_ok && sched_ok && restic.is_ok() && held;
    let body = ReadyResponse {
        ready,
        node: state.sched.config().node_name.clone(),
        database: if db_ok { DatabaseState::Ok } else { DatabaseState::Unavailable },
        scheduler: if sched_ok { SchedulerState::Running } else { SchedulerState::Stopped },
        restic: match restic {
            Ok(version) => ResticState::Usable { version },
            Err(error) => ResticState::Unusable { error },
        },
        uptime_seconds: state.started.elapsed().as_secs(),
        kubelet_dir: views::KubeletDirView::of(state.sched.config()),
        state_lock: StateLockView {
            held,
            path: crate::state_lock::lock_path(&state.sched.config().state_dir).display().to_string(),
            holder: state.state_lock.clone(),
        },
    };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// Prometheus metrics.
///
/// OpenMetrics text, ending in `# EOF`, when the scraper asks for it (as
/// Prometheus does); otherwise the Prometheus text format 0.0.4, which
/// `promtool check metrics` reads. The README's Operations section lists
/// the metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "OpenMetrics text 1.0.0 when accepted, else Prometheus text 0.0.4",
         content((String = "application/openmetrics-text"), (String = "text/plain"))),
        (status = 500, description = "The agent's state database failed", body = ErrorBody),
    )
)]
async fn metrics(Extension(m): Extension<Arc<metrics::Metrics>>, headers: HeaderMap) -> Result<Response, ApiError> {
    metrics::response(&m, &headers)
}

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 description of this API", body = Object))
)]
async fn openapi_json() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], openapi::json()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use serde_json::{json, Value};
    use std::collections::BTreeMap;
    use tower::ServiceExt;

    const TOKEN: &str = "test-token-0123456789";
    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const OTHER_KEY: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const SECRETS: [&str; 4] = ["hunter2", "urlpass", "s3cr3tkey", "n3wpass"];

    struct Harness {
        app: Router,
        store: crate::store::Store,
        db: std::path::PathBuf,
        data: std::path::PathBuf,
        /// The scheduler's token: cancelled when the agent stops.
        stop: tokio_util::sync::CancellationToken,
        _dir: tempfile::TempDir,
    }

    /// The router over a store that seals secrets, as the agent runs it.
    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let data = dir.path().join("allowed/data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&state_dir).unwrap();
        std::fs::write(state_dir.join("repository.password"), "pw").unwrap();
        std::fs::write(state_dir.join("token"), format!("{TOKEN}\n")).unwrap();
        let mut config = crate::Config::with_state_dir(state_dir.clone());
        config.allowed_roots = vec![dir.path().join("allowed")];
        let db = config.db_path();
        let store = crate::store::Store::open(&db)
            .unwrap()
            .with_seal_key(crate::sealed::SealKey::from_hex(KEY, "test").unwrap())
            .unwrap();
        let restic = crate::restic::Restic::new(
            "restic".into(),
            config.cache_dir(),
            "n1".into(),
            std::time::Duration::from_secs(60),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let sched = Scheduler::new(store.clone(), restic, config, stop.clone());
        let auth = auth::Auth::new(state_dir.join("token"), auth::LegacyMode::Network, vec![]);
        let app = router(AppState {
            sched,
            restic_version: Arc::new(Mutex::new(Ok("0.14.0".into()))),
            started: Instant::now(),
            auth: Arc::new(auth),
            state_lock: None,
        });
        Harness { app, store, db, data, stop, _dir: dir }
    }

    async fn call(h: &Harness, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, String) {
        let req = Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {TOKEN}"));
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        };
        let resp = h.app.clone().oneshot(req.unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// Every policy of the listing, each checked to be exactly what its own
    /// GET shows, and no secret anywhere.
    async fn listing(h: &Harness) -> BTreeMap<String, Value> {
        let (st, text) = call(h, "GET", "/v1/policies?limit=1000", None).await;
        assert_eq!(st, StatusCode::OK, "{text}");
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        let list: Value = serde_json::from_str(&text).unwrap();
        let mut out = BTreeMap::new();
        for p in list["policies"].as_array().unwrap() {
            let (st, one) = call(h, "GET", &format!("/v1/policies/{}", p["id"].as_str().unwrap()), None).await;
            assert_eq!(st, StatusCode::OK, "{one}");
            let mut one: Value = serde_json::from_str(&one).unwrap();
            // Only a policy's own GET names its maintenance Lease: it is
            // derived from the sealed URL, which a listing does not unseal.
            assert!(one.as_object_mut().unwrap().remove("maintenanceLease").is_some(), "{one}");
            assert_eq!(p, &one, "the listing differs from GET");
            out.insert(p["name"].as_str().unwrap().to_string(), p.clone());
        }
        out
    }

    fn run(h: &Harness, policy_id: &str, state: RunState) -> String {
        // Run ids sort by their millisecond: two made in one have no order.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let now = chrono::Utc::now();
        let mut r =
            crate::store::RunRecord::new(crate::ids::new_id(), policy_id, RunKind::Backup, RunTrigger::Manual, now);
        r.state = state;
        r.finished_at = Some(now);
        r.snapshot_id = Some("ab".repeat(32));
        h.store.save_run(&r).unwrap();
        r.id
    }

    #[tokio::test]
    async fn a_stopping_agent_refuses_new_runs_with_503_and_queues_nothing() {
        let h = harness();
        let body =
            json!({"name": "late", "source": {"path": h.data}, "schedule": {"intervalSeconds": 3600}, "paused": true});
        let (st, text) = call(&h, "POST", "/v1/policies", Some(body)).await;
        assert_eq!(st, StatusCode::CREATED, "{text}");
        h.stop.cancel();
        for route in ["run", "drill", "maintenance"] {
            let body = (route == "maintenance").then(|| json!({"check": true}));
            let (st, text) = call(&h, "POST", &format!("/v1/policies/late/{route}"), body).await;
            assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{route}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["code"], "agent_stopping", "{route}: {text}");
            assert!(v["error"]["message"].as_str().unwrap().contains("next agent"), "{text}");
        }
        let (_, runs) = call(&h, "GET", "/v1/runs", None).await;
        assert_eq!(serde_json::from_str::<Value>(&runs).unwrap()["runs"], json!([]), "nothing was queued");
    }

    #[tokio::test]
    async fn the_listing_shows_each_policy_as_its_get_does_and_every_change_at_once() {
        let h = harness();
        let a = json!({
            "name": "a", "source": {"path": h.data}, "schedule": {"intervalSeconds": 3600},
            "repository": {"url": "rest:http://user:urlpass@127.0.0.1:1/r/", "password": "hunter2",
                           "env": {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "s3cr3tkey"}},
        });
        let b = json!({"name": "b", "source": {"path": h.data}, "schedule": {"intervalSeconds": 60}, "paused": true});
        let mut ids = BTreeMap::new();
        for spec in [a, b] {
            let (st, text) = call(&h, "POST", "/v1/policies", Some(spec)).await;
            assert_eq!(st, StatusCode::CREATED, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            ids.insert(v["name"].as_str().unwrap().to_string(), v["id"].as_str().unwrap().to_string());
        }
        let l = listing(&h).await;
        assert_eq!(l["a"]["repository"]["url"], "rest:http://user:***@127.0.0.1:1/r/");
        assert_eq!(l["a"]["repository"]["passwordSet"], true);
        assert_eq!(l["a"]["repository"]["envSet"], json!({"AWS_ACCESS_KEY_ID": false, "AWS_SECRET_ACCESS_KEY": true}));
        assert_eq!(l["a"]["lastRun"], Value::Null);

        // The same page twice is the same bytes.
        let (_, first) = call(&h, "GET", "/v1/policies", None).await;
        let (_, again) = call(&h, "GET", "/v1/policies", None).await;
        assert_eq!(first, again);

        // Runs: the newest shows, also one recorded while the page is kept.
        run(&h, &ids["a"], RunState::Failed);
        let newest = run(&h, &ids["a"], RunState::Succeeded);
        let l = listing(&h).await;
        assert_eq!(l["a"]["lastRun"]["id"], newest.as_str());
        assert_eq!(l["a"]["lastRun"]["state"], "succeeded");

        // Edits through the API: spec and secrets.
        let patch =
            json!({"tags": ["edited"], "repository": {"password": "n3wpass", "env": {"AWS_ACCESS_KEY_ID": "id"}}});
        let (st, text) = call(&h, "PATCH", "/v1/policies/a", Some(patch)).await;
        assert_eq!(st, StatusCode::OK, "{text}");
        let l = listing(&h).await;
        assert_eq!(l["a"]["tags"], json!(["edited"]));
        assert_eq!(l["a"]["repository"]["envSet"]["AWS_ACCESS_KEY_ID"], true);
        let (st, _) = call(&h, "POST", "/v1/policies/b/resume", None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(listing(&h).await["b"]["paused"], false);

        // Writes by another connection to the same database.
        let outside = rusqlite::Connection::open(&h.db).unwrap();
        outside.execute("UPDATE policies SET status_message = 'from outside' WHERE name = 'b'", []).unwrap();
        assert_eq!(listing(&h).await["b"]["status"]["message"], "from outside");
        // Secrets sealed under another key: the policy stays listed, without them.
        let other = crate::sealed::SealKey::from_hex(OTHER_KEY, "test").unwrap();
        outside
            .execute("UPDATE policies SET secrets = ?1 WHERE name = 'a'", [other.seal(br#"{"password":"hunter2"}"#)])
            .unwrap();
        let l = listing(&h).await;
        assert!(l["a"]["secretsUnavailable"].as_str().is_some_and(|m| !m.is_empty()), "{}", l["a"]);
        assert_eq!(l["a"]["repository"]["passwordSet"], false);

        let (st, _) = call(&h, "DELETE", "/v1/policies/b", None).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        assert_eq!(listing(&h).await.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn kept_pages_are_few_small_and_of_one_version() {
        let store = crate::store::Store::open(&tempfile::tempdir().unwrap().path().join("s.db")).unwrap();
        let v1 = store.data_version().unwrap();
        let pages = PolicyPages::default();
        for i in 0..PolicyPages::MAX_PAGES + 4 {
            pages.put(&format!("p{i}"), 100, v1, Bytes::from_static(b"{}"));
        }
        assert_eq!(pages.lock().len(), PolicyPages::MAX_PAGES);
        assert!(pages.get("p0", 100, v1).is_none(), "the oldest went first");
        assert!(pages.get(&format!("p{}", PolicyPages::MAX_PAGES + 3), 100, v1).is_some());
        assert!(pages.get(&format!("p{}", PolicyPages::MAX_PAGES + 3), 10, v1).is_none(), "another limit");
        pages.put("big", 1000, v1, Bytes::from(vec![b' '; PolicyPages::MAX_BYTES]));
        assert!(pages.get("big", 1000, v1).is_none(), "too big to keep");
        assert_eq!(store.data_version().unwrap(), v1, "reads change nothing");
        store.count_policies().unwrap();
        assert_eq!(store.data_version().unwrap(), v1, "reads change nothing");
        store.ensure_repository("k", chrono::Utc::now(), chrono::Utc::now()).unwrap();
        let v2 = store.data_version().unwrap();
        assert_ne!(v1, v2);
        assert!(pages.get("p19", 100, v2).is_none());
        pages.put("", 100, v2, Bytes::from_static(b"{}"));
        assert_eq!(pages.lock().len(), 1, "pages of the older version were dropped");
    }
}
