//! `POST /snapshot`: the upstream route soda-proxy calls.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::{parse_json, ErrorBody};
use super::{ApiError, AppState};
use soda_syncer_domain::legacy::{LegacySnapshotRequest, LegacySnapshotResponse};

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
pub(super) async fn legacy_snapshot(
    State(state): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(ApiError::from_bytes_rejection)?;
    let req: LegacySnapshotRequest = parse_json(&body)?;
    let legacy = state.legacy.clone();
    let resp = tokio::task::spawn_blocking(move || legacy.snapshot(req))
        .await
        .map_err(|_| ApiError::internal("the legacy request handler failed"))??;
    let status = if resp.policies.iter().any(|p| p.action == "created") { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(resp)).into_response())
}
