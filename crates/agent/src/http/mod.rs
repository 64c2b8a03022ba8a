//! The HTTP API: the legacy `POST /snapshot`, `/v1` policies and runs, and
//! the operations endpoints. [`router`] builds it without binding a socket,
//! so tests call it in-process; errors all leave through [`ApiError`].

mod error;
mod views;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use soda_syncer_domain::{PolicySpec, RunKind, RunState, RunTrigger};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use error::ApiError;
use error::{parse_json, ApiJson};
use views::{policy_view, run_view};

use crate::scheduler::legacy::LegacySnapshotRequest;
use crate::scheduler::{repo_of, RunRequestError, Scheduler};
use crate::store::{PolicyRecord, RunFilter, StoreError};

/// Bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub sched: Scheduler,
    /// restic's version, or why it is unusable; re-checked by /readyz
    /// while it is missing.
    pub restic_version: Arc<Mutex<Result<String, String>>>,
    pub started: Instant,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/snapshot", post(legacy_snapshot))
        .route("/v1/policies", get(list_policies).post(create_policy))
        .route("/v1/policies/{id}", get(get_policy).put(put_policy).patch(patch_policy).delete(delete_policy))
        .route("/v1/policies/{id}/pause", post(pause_policy))
        .route("/v1/policies/{id}/resume", post(resume_policy))
        .route("/v1/policies/{id}/run", post(run_policy))
        .route("/v1/policies/{id}/snapshots", get(policy_snapshots))
        .route("/v1/policies/{id}/restore", post(not_yet))
        .route("/v1/policies/{id}/maintenance", post(not_yet))
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/runs/{id}/events", get(run_events))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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
        .with_state(state)
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

async fn legacy_snapshot(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    // soda-proxy may send no content type; a wrong one is still refused.
    if let Some(ct) = headers.get(axum::http::header::CONTENT_TYPE) {
        error::require_json(ct)?;
    }
    let body = body.map_err(ApiError::from_bytes_rejection)?;
    let req: LegacySnapshotRequest = parse_json(&body)?;
    let sched = state.sched.clone();
    let resp = tokio::task::spawn_blocking(move || sched.legacy_snapshot(req))
        .await
        .map_err(|_| ApiError::internal("the legacy request handler failed"))??;
    let status = if resp.policies.iter().any(|p| p.action == "created") { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(resp)).into_response())
}

async fn list_policies(State(state): State<AppState>) -> Result<Response, ApiError> {
    let store = state.sched.store();
    let policies = store.list_policies()?;
    let last = store.last_runs()?;
    let views: Vec<_> = policies.iter().map(|p| policy_view(p, last.get(&p.id))).collect();
    Ok(Json(json!({ "policies": views })).into_response())
}

async fn create_policy(
    State(state): State<AppState>,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<Response, ApiError> {
    let p = state.sched.create_policy(spec, soda_syncer_domain::Origin::Api, None, None)?;
    Ok((StatusCode::CREATED, Json(policy_view(&p, None))).into_response())
}

async fn get_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let last = state.sched.store().last_run_of(&p.id)?;
    Ok(Json(policy_view(&p, last.as_ref())).into_response())
}

async fn put_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let p = state.sched.replace_policy(&p.id, spec)?;
    let last = state.sched.store().last_run_of(&p.id)?;
    Ok(Json(policy_view(&p, last.as_ref())).into_response())
}

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
    let p = state.sched.patch_policy(&p.id, &patch)?;
    let last = state.sched.store().last_run_of(&p.id)?;
    Ok(Json(policy_view(&p, last.as_ref())).into_response())
}

async fn delete_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    state.sched.delete_policy(&p.id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_paused(state: AppState, id: String, paused: bool) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let p = state.sched.set_paused(&p.id, paused)?;
    let last = state.sched.store().last_run_of(&p.id)?;
    Ok(Json(policy_view(&p, last.as_ref())).into_response())
}

async fn pause_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_paused(state, id, true).await
}

async fn resume_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_paused(state, id, false).await
}

async fn run_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    match state.sched.request_run(&p, RunKind::Backup, RunTrigger::Manual) {
        Ok(run) => Ok((StatusCode::ACCEPTED, Json(run_view(&run, None))).into_response()),
        Err(RunRequestError::Busy { policy, run, state: st }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "run_in_progress",
            format!("policy {policy} already has run {run} {st}; wait for it (GET /v1/runs/{run}) or cancel it (POST /v1/runs/{run}/cancel)"),
        )),
        Err(RunRequestError::Store(e)) => Err(e.into()),
    }
}

async fn policy_snapshots(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let tag = format!("policy={}", p.id);
    let cancel = tokio_util::sync::CancellationToken::new();
    let snaps = match state.sched.restic().snapshots(&repo_of(&p), Some(&tag), None, &[], &cancel).await {
        Ok(s) => s,
        // No repository yet: nothing was backed up, which is not an error here.
        Err(crate::restic::ResticError::RepositoryNotFound { .. }) => Vec::new(),
        Err(e) => return Err(ApiError::from_restic(&e)),
    };
    let views: Vec<_> = snaps.iter().rev().map(views::snapshot_view).collect();
    Ok(Json(json!({ "snapshots": views })).into_response())
}

async fn not_yet() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "restore and maintenance runs are not implemented in this version of the agent yet (see the README's 'Not done yet')",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    policy: Option<String>,
    state: Option<String>,
    kind: Option<String>,
    limit: Option<usize>,
    before: Option<String>,
}

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
    let views: Vec<_> = runs.iter().map(|r| run_view(r, state.sched.live_progress(&r.id))).collect();
    Ok(Json(json!({ "runs": views, "next": next })).into_response())
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

async fn get_run(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let run = find_run(&state, &id)?;
    Ok(Json(run_view(&run, state.sched.live_progress(&run.id))).into_response())
}

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
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": run.id, "cancelRequested": true }))).into_response())
}

/// Server-sent events: a `progress` event about twice a second while the
/// run is queued or running, then one `end` event with the whole run.
async fn run_events(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    find_run(&state, &id)?;
    let stream = futures_util::stream::unfold((state, id, false), |(state, id, done)| async move {
        if done {
            return None;
        }
        let run = state.sched.store().get_run(&id).ok()?;
        if run.state.is_terminal() {
            let ev = Event::default().event("end").json_data(run_view(&run, None)).ok()?;
            return Some((Ok::<_, std::convert::Infallible>(ev), (state, id, true)));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let live = state.sched.live_progress(&id);
        let ev = Event::default().event("progress").json_data(run_view(&run, live)).ok()?;
        Some((Ok(ev), (state, id, false)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let needs_check = state.restic_version.lock().unwrap_or_else(|p| p.into_inner()).is_err();
    if needs_check {
        let v = state.sched.restic().version().await.map_err(|e| e.to_string());
        *state.restic_version.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
    let restic = state.restic_version.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let db_ok = state.sched.store().count_policies().is_ok();
    let sched_ok = state.sched.is_running();
    let ready = db_ok && sched_ok && restic.is_ok();
    let body = json!({
        "ready": ready,
        "node": state.sched.config().node_name,
        "database": if db_ok { "ok" } else { "unavailable" },
        "scheduler": if sched_ok { "running" } else { "stopped" },
        "restic": match &restic { Ok(v) => json!({"version": v}), Err(e) => json!({"error": e}) },
        "uptimeSeconds": state.started.elapsed().as_secs(),
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = views::metrics_text(&state.sched)?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
