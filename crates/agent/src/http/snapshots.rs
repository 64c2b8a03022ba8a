//! A policy's snapshots in its repository, and restoring one.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::{ApiJson, ErrorBody};
use super::views::{run_view, RunView, SnapshotList};
use super::{find_policy, ApiError, AppState};
use crate::scheduler::RestoreParams;

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
pub(super) async fn policy_snapshots(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let snaps = state.sched.policy_snapshots(&p).await.map_err(|e| ApiError::from_restic(&e))?;
    let snapshots = snaps.iter().rev().map(super::views::snapshot_view).collect();
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
pub(super) async fn restore_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RestoreParams>,
) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let run = state.sched.request_restore(&p, req)?;
    Ok((StatusCode::ACCEPTED, Json(run_view(&run, None))).into_response())
}
