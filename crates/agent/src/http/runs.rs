//! `/v1/runs` and the actions that start one (`run`, `drill`,
//! `maintenance` on a policy): list, read, cancel, and follow a run's
//! progress as server-sent events.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use soda_syncer_domain::{RunKind, RunState, RunTrigger};
use std::time::Duration;
use utoipa::IntoParams;

use super::error::{ApiJson, ErrorBody};
use super::schema::{RunEvent, EVENT_END, EVENT_PROGRESS};
use super::views::{run_view, CancelRunResponse, RunList, RunView};
use super::{find_policy, find_run, ApiError, AppState};
use crate::scheduler::MaintenanceParams;
use crate::store::RunFilter;

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
pub(super) async fn run_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
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
pub(super) async fn drill_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let run = state.sched.request_run(&p, RunKind::Drill, RunTrigger::Manual)?;
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
pub(super) async fn maintain_policy(
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
pub(super) struct RunsQuery {
    /// Only the runs of this policy (id or name).
    policy: Option<String>,
    #[param(schema_with = super::schema::run_state_filter)]
    state: Option<String>,
    #[param(schema_with = super::schema::run_kind_filter)]
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
pub(super) async fn list_runs(
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
    let runs = state.store.list_runs(&RunFilter { policy_id, state: st, kind, before: q.before, limit })?;
    let next = if runs.len() == limit { runs.last().map(|r| r.id.clone()) } else { None };
    let runs = runs.iter().map(|r| run_view(r, state.sched.live_progress(&r.id))).collect();
    Ok(Json(RunList { runs, next }).into_response())
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
pub(super) async fn get_run(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
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
pub(super) async fn cancel_run(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
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
pub(super) async fn run_events(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    // Subscribed before the first read, so an end between the two is not missed.
    let finished = state.sched.subscribe_finished();
    find_run(&state, &id)?;
    let stream =
        futures_util::stream::unfold((state, id, finished, false), |(state, id, mut finished, done)| async move {
            if done {
                return None;
            }
            let run = state.store.get_run(&id).ok()?;
            if run.state.is_terminal() {
                let ev = Event::default().event(EVENT_END).json_data(run_view(&run, None)).ok()?;
                return Some((Ok::<_, std::convert::Infallible>(ev), (state, id, finished, true)));
            }
            // The next progress event in half a second, or the end at once.
            let ended = until_run_ends(&mut finished, &id, Duration::from_millis(500)).await;
            let run = if ended { state.store.get_run(&id).ok()? } else { run };
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
pub(super) async fn until_run_ends(
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
