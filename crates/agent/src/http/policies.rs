//! `/v1/policies`: list (in cached pages), create, read, replace, patch,
//! delete, pause and resume policies.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use soda_syncer_domain::PolicySpec;
use std::sync::{Arc, Mutex};
use utoipa::IntoParams;

use super::error::{ApiJson, ErrorBody};
use super::schema::PolicyPatch;
use super::views::{listed_policy_view, policy_view, PolicyList, PolicyView};
use super::{find_policy, ApiError, AppState};
use crate::store::DataVersion;

/// `GET /v1/policies` pages as sent, each with the [`DataVersion`] it was
/// read at: while the database is unchanged, a page is sent again as it is
/// (a listing is otherwise a query, parsing and JSON for every policy).
/// Few and small: pages of other versions are dropped as soon as one is
/// stored, and at most [`PolicyPages::MAX_PAGES`] pages of together at most
/// [`PolicyPages::MAX_BYTES`] are kept (the oldest go first).
#[derive(Default)]
pub(super) struct PolicyPages {
    pages: Mutex<Vec<PolicyPage>>,
}

pub(super) struct PolicyPage {
    after: String,
    limit: usize,
    version: DataVersion,
    body: Bytes,
}

impl PolicyPages {
    pub(super) const MAX_PAGES: usize = 16;
    pub(super) const MAX_BYTES: usize = 2 * 1024 * 1024;

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PolicyPage>> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn get(&self, after: &str, limit: usize, version: DataVersion) -> Option<Bytes> {
        let pages = self.lock();
        pages.iter().find(|p| p.version == version && p.limit == limit && p.after == after).map(|p| p.body.clone())
    }

    pub(super) fn put(&self, after: &str, limit: usize, version: DataVersion, body: Bytes) {
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

/// Paging of `GET /v1/policies`; other parameters are refused.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct PoliciesQuery {
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
pub(super) async fn list_policies(
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
    if let Some(body) = state.store.try_data_version().and_then(|v| pages.get(&after, limit, v)) {
        return Ok(json(body));
    }
    // SQLite work off the async workers.
    let store = state.store.clone();
    let body = tokio::task::spawn_blocking(move || -> Result<Bytes, ApiError> {
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
pub(super) async fn create_policy(
    State(state): State<AppState>,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<Response, ApiError> {
    let p = state.policies.create(spec, soda_syncer_domain::Origin::Api, None, None)?;
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
pub(super) async fn get_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let last = state.store.last_run_of(&p.id)?;
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
pub(super) async fn put_policy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let p = state.policies.replace(&p.id, spec, soda_syncer_domain::Origin::Api)?;
    let last = state.store.last_run_of(&p.id)?;
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
pub(super) async fn patch_policy(
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
    let p = state.policies.patch(&p.id, &patch)?;
    let last = state.store.last_run_of(&p.id)?;
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
pub(super) async fn delete_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    crate::admission::may_change(&p, soda_syncer_domain::Origin::Api).map_err(crate::policies::PolicyError::from)?;
    state.policies.delete(&p.id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn set_paused(state: AppState, id: String, paused: bool) -> Result<Response, ApiError> {
    let p = find_policy(&state, &id)?;
    let p = state.policies.set_paused(&p.id, paused)?;
    let last = state.store.last_run_of(&p.id)?;
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
pub(super) async fn pause_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
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
pub(super) async fn resume_policy(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_paused(state, id, false).await
}
