//! The machine-readable API description served at `GET /openapi.json`. It
//! is generated from the handlers' `#[utoipa::path]` annotations and from
//! the types they accept and send, so it cannot drift from the code.

use std::sync::LazyLock;

use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "soda-syncer agent API",
        description = "Scheduled, consistent restic backups of this node's volumes. Errors always have the body \
            `{\"error\": {\"code\", \"message\", \"field\"?}}`. Secrets are accepted on write and never returned."
    ),
    paths(
        super::legacy::legacy_snapshot,
        super::policies::list_policies,
        super::policies::create_policy,
        super::policies::get_policy,
        super::policies::put_policy,
        super::policies::patch_policy,
        super::policies::delete_policy,
        super::policies::pause_policy,
        super::policies::resume_policy,
        super::runs::run_policy,
        super::runs::drill_policy,
        super::snapshots::policy_snapshots,
        super::snapshots::restore_policy,
        super::runs::maintain_policy,
        super::runs::list_runs,
        super::runs::get_run,
        super::runs::cancel_run,
        super::runs::run_events,
        super::status::agent_status,
        super::status::cluster_view,
        super::status::healthz,
        super::status::readyz,
        super::status::metrics,
        openapi_json,
    ),
    tags(
        (name = "legacy", description = "The upstream route soda-proxy calls"),
        (name = "policies", description = "What to back up, where to and when"),
        (name = "runs", description = "Backups and other jobs, queued, running and done"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
struct ApiDoc;

/// The OpenAPI document of the agent's API.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// [`document`] as JSON, built once.
pub fn json() -> &'static str {
    static JSON: LazyLock<String> =
        LazyLock::new(|| document().to_pretty_json().expect("an OpenAPI document always serializes"));
    &JSON
}

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 description of this API", body = Object))
)]
pub(super) async fn openapi_json() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], json()).into_response()
}
