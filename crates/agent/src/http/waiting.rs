//! What an agent serves while another agent holds its state directory's
//! lock: it is alive (`/healthz` 200, so a liveness probe does not restart
//! it), not ready (`/readyz` 503 naming the holder, so a readiness probe
//! keeps traffic and the rollout waiting), and everything else is 503
//! `state_locked`. It has no database and no scheduler yet, so it has
//! nothing else to serve; once it takes the lock the full API replaces this
//! on the same socket.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;
use super::views::StateLockView;
use super::views::{DatabaseState, HealthResponse, KubeletDirView, ReadyResponse, ResticState, SchedulerState};
use crate::config::Config;

#[derive(Clone)]
pub struct WaitingState {
    pub config: Arc<Config>,
    /// restic's version, or why it is unusable, checked once before waiting.
    pub restic_version: Result<String, String>,
    pub started: Instant,
}

pub fn waiting_router(state: WaitingState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(HealthResponse { status: "ok" }) }))
        .route("/readyz", get(readyz))
        .fallback(state_locked)
        .with_state(state)
}

fn holder_sentence(state: &WaitingState) -> String {
    crate::state_lock::describe(crate::state_lock::read_holder(&state.config.state_dir).as_ref())
}

async fn readyz(State(state): State<WaitingState>) -> Response {
    let body = ReadyResponse {
        ready: false,
        node: state.config.node_name.clone(),
        database: DatabaseState::Unavailable,
        scheduler: SchedulerState::Stopped,
        restic: match &state.restic_version {
            Ok(version) => ResticState::Usable { version: version.clone() },
            Err(error) => ResticState::Unusable { error: error.clone() },
        },
        uptime_seconds: state.started.elapsed().as_secs(),
        kubelet_dir: KubeletDirView::of(&state.config),
        state_lock: StateLockView {
            held: false,
            path: crate::state_lock::lock_path(&state.config.state_dir).display().to_string(),
            holder: crate::state_lock::read_holder(&state.config.state_dir),
        },
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn state_locked(State(state): State<WaitingState>) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "state_locked",
        format!(
            "this agent is waiting for its state directory {}, which another agent holds ({}); it serves once that agent exits",
            state.config.state_dir.display(),
            holder_sentence(&state)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(app: &Router, uri: &str) -> (StatusCode, serde_json::Value) {
        let resp = app.clone().oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_waiting_agent_is_alive_not_ready_and_names_the_holder_everywhere_else() {
        let dir = tempfile::tempdir().unwrap();
        let holder = crate::state_lock::LockHolder::this_process("node-a", Some("old-pod"), chrono::Utc::now());
        let crate::state_lock::TryLock::Acquired(_lock) =
            crate::state_lock::StateLock::try_acquire(dir.path(), holder).unwrap()
        else {
            panic!("free lock")
        };
        let app = waiting_router(WaitingState {
            config: Arc::new(Config::with_state_dir(dir.path().into())),
            restic_version: Ok("0.14.0".into()),
            started: Instant::now(),
        });
        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
        let (st, ready) = get(&app, "/readyz").await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ready["ready"], false);
        assert_eq!(ready["stateLock"]["held"], false);
        assert_eq!(ready["stateLock"]["holder"]["pod"], "old-pod");
        assert_eq!(ready["stateLock"]["holder"]["pid"], std::process::id());
        for uri in ["/v1/policies", "/metrics", "/snapshot"] {
            let (st, err) = get(&app, uri).await;
            assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
            assert_eq!(err["error"]["code"], "state_locked", "{uri}");
            let msg = err["error"]["message"].as_str().unwrap();
            assert!(msg.contains("in pod old-pod") && msg.contains("node-a"), "{msg}");
        }
    }
}
