//! The agent's own state: `/v1/status`, `/healthz`, `/readyz`, the
//! cluster view (`/v1/cluster`), `/metrics` and `/openapi.json`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::sync::Arc;
use utoipa::IntoParams;

use super::error::ErrorBody;
use super::views::{
    DatabaseState, HealthResponse, ReadyResponse, ResticState, SchedulerState, StateLockView, StatusResponse,
};
use super::{metrics, ApiError, AppState};

/// Parameters of `GET /v1/cluster`; others are refused.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ClusterQuery {
    /// Only claims in this namespace [default: every namespace].
    namespace: Option<String>,
}

/// The cluster view: every claim in the cluster, protected or why not.
///
/// The same report as `soda-syncer cluster -o json`, read from the API
/// server with this agent's service account; only while Kubernetes is on.
#[utoipa::path(
    get,
    path = "/v1/cluster",
    tag = "operations",
    params(ClusterQuery),
    responses(
        (status = 200, description = "One row per claim, and the agents' liveness", body = crate::kube::cluster::ClusterReport),
        (status = 400, description = "An unknown parameter", body = ErrorBody),
        (status = 409, description = "Kubernetes is off on this agent (kubernetes_off)", body = ErrorBody),
        (status = 502, description = "The Kubernetes API server failed or refused", body = ErrorBody),
    )
)]
pub(super) async fn cluster_view(
    State(state): State<AppState>,
    q: Result<Query<ClusterQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", format!("{}; allowed: namespace", e.body_text()))
    })?;
    let Some(reader) = state.cluster.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "kubernetes_off",
            "Kubernetes is off on this agent, so it has no cluster view; start it with --kubernetes on (or auto, in a pod)",
        ));
    };
    let namespace = q.namespace.filter(|n| !n.is_empty());
    let report = reader.report(namespace.as_deref()).await.map_err(|e| {
        ApiError::new(StatusCode::BAD_GATEWAY, "kubernetes_failed", format!("reading the cluster failed: {e:#}"))
    })?;
    Ok(Json(report).into_response())
}

/// The agent's state beyond readiness: the SODA sync (who leads, how far
/// behind SODA is, the last error) and the profile poll.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "operations",
    responses((status = 200, description = "The agent's state", body = StatusResponse))
)]
pub(super) async fn agent_status(State(state): State<AppState>) -> Response {
    Json(StatusResponse {
        node: state.config.node_name.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        soda_sync: state.soda_sync.as_ref().map(|b| b.snapshot()),
        restic: super::views::ResticStatusView::of(
            &state.restic,
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
pub(super) async fn healthz() -> Response {
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
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let needs_check = state.restic_version.lock().unwrap_or_else(|p| p.into_inner()).is_err();
    if needs_check {
        let v = state.restic.version().await.map_err(|e| e.to_string());
        *state.restic_version.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
    let restic = state.restic_version.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let db_ok = state.store.count_policies().is_ok();
    let sched_ok = state.sched.is_running();
    let held = state.state_lock.is_some();
    let ready = db_ok && sched_ok && restic.is_ok() && held;
    let body = ReadyResponse {
        ready,
        node: state.config.node_name.clone(),
        database: if db_ok { DatabaseState::Ok } else { DatabaseState::Unavailable },
        scheduler: if sched_ok { SchedulerState::Running } else { SchedulerState::Stopped },
        restic: match restic {
            Ok(version) => ResticState::Usable { version },
            Err(error) => ResticState::Unusable { error },
        },
        uptime_seconds: state.started.elapsed().as_secs(),
        kubelet_dir: super::views::KubeletDirView::of(&state.config),
        state_lock: StateLockView {
            held,
            path: crate::state_lock::lock_path(&state.config.state_dir).display().to_string(),
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
pub(super) async fn metrics(
    Extension(m): Extension<Arc<metrics::Metrics>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    metrics::response(&m, &headers)
}
